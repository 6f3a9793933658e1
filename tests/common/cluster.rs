//! Starting `lmq serve` nodes and an `lmq proxy` in front of them for the
//! proxy tests, and small helpers over their HTTP answers.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{Client, Process};

/// The flags every test node gets: the test model under `name` on a free
/// port with `kv_cache` of KV cache, then `args`.
fn node_args(name: &str, kv_cache: &str, args: &[&str]) -> Vec<String> {
    let dir = super::model_dir();
    let mut all: Vec<String> = [
        "--model",
        dir.to_str().expect("utf-8 path"),
        "--served-model-name",
        name,
        "--port",
        "0",
        "--kv-cache-bytes",
        kv_cache,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    all
}

/// An `lmq serve` of the test model under `name` (32 MB of KV cache),
/// plus `args`.
pub fn node(name: &str, args: &[&str]) -> Process {
    let all = node_args(name, "32M", args);
    Process::spawn("serve", &all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// [`node`] with `kv_cache` bytes of KV cache and its stderr kept.
pub fn node_logged(name: &str, kv_cache: &str, args: &[&str]) -> Process {
    let all = node_args(name, kv_cache, args);
    Process::spawn_logged("serve", &all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Starts the nodes at once (each loads the model) and returns them in
/// order.
pub fn nodes(specs: &[(&'static str, &'static [&'static str])]) -> Vec<Process> {
    let handles: Vec<_> = specs
        .iter()
        .map(|&(name, args)| std::thread::spawn(move || node(name, args)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("node starts"))
        .collect()
}

/// An `lmq proxy` on a free port with `yaml` as its config.
pub fn proxy(dir: &Path, yaml: &str) -> Process {
    proxy_on(dir, yaml, 0)
}

/// An `lmq proxy` on `port` (0: a free one) with `yaml` as its config.
pub fn proxy_on(dir: &Path, yaml: &str, port: u16) -> Process {
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, yaml).expect("writes config");
    Process::spawn(
        "proxy",
        &[
            "--config",
            path.to_str().expect("utf-8 path"),
            "--port",
            &port.to_string(),
        ],
    )
}

/// A loopback port that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("address").port()
}

pub fn url(c: &Client) -> String {
    format!("http://127.0.0.1:{}", c.port)
}

pub fn model_ids(c: &Client) -> Vec<String> {
    let r = c.get("/v1/models");
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ids: Vec<String> = r.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

pub fn chat(model: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// The URLs `/nodes/status` lists, with the admin key `admin`.
pub fn listed_nodes(proxy: &Client, admin: &str) -> Vec<Value> {
    let r = proxy.get_with("/nodes/status", &[("Authorization", admin)]);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["nodes"].as_array().cloned().unwrap_or_default()
}

/// Sends SIGTERM (a graceful stop).
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Waits up to `limit` for the process to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "the process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A per-node series of the proxy's `/metrics`.
pub fn node_series(proxy: &Client, name: &str, node: &Client) -> f64 {
    proxy.series(&format!("{name}{{node=\"{}\"}}", url(node)))
}
