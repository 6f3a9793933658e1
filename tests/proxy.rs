//! `lmq proxy` end to end: real `lmq serve` nodes and a real proxy on
//! loopback ports, driven over real HTTP. Covers routing by model,
//! aggregation, streaming passthrough, the OpenAI errors, the admin key on
//! `/nodes/*`, forwarding of the client's key, concurrent streams (every
//! KV block comes back), client disconnects reaching the node, failover
//! when a replica dies, and config errors.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::http::{Client, Process};
use serde_json::{json, Value};

/// An `lmq serve` of the test model under `name`, plus `args`.
fn node(name: &str, args: &[&str]) -> Process {
    let dir = common::model_dir();
    let mut all = vec![
        "--model",
        dir.to_str().expect("utf-8 path"),
        "--served-model-name",
        name,
        "--port",
        "0",
        "--kv-cache-bytes",
        "32M",
    ];
    all.extend_from_slice(args);
    Process::spawn("serve", &all)
}

/// Starts the nodes at once (each loads the model) and returns them in
/// order.
fn nodes(specs: &[(&'static str, &'static [&'static str])]) -> Vec<Process> {
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
fn proxy(dir: &Path, yaml: &str) -> Process {
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, yaml).expect("writes config");
    Process::spawn(
        "proxy",
        &[
            "--config",
            path.to_str().expect("utf-8 path"),
            "--port",
            "0",
        ],
    )
}

fn url(c: &Client) -> String {
    format!("http://127.0.0.1:{}", c.port)
}

fn model_ids(c: &Client) -> Vec<String> {
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

fn chat(model: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

const NODE_KEY: &str = "node-secret";
const ADMIN: &str = "Bearer admin-secret";

#[test]
fn routes_by_model_streams_and_guards_admin() {
    let started = Instant::now();
    let [a, b]: [Process; 2] = nodes(&[("a", &["--api-key", NODE_KEY]), ("b", &[])])
        .try_into()
        .unwrap_or_else(|_| panic!("two nodes"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "strategy: min_observed_latency\nhealth_check_interval_s: 1\nadmin_key: admin-secret\nnodes:\n  - url: {}\n    api_key: {NODE_KEY}\n  - url: {}/\n",
        url(&a),
        url(&b)
    );
    let p = proxy(tmp.path(), &yaml);
    let key = format!("Bearer {NODE_KEY}");
    let auth = [("Authorization", key.as_str())];

    assert_eq!(p.get("/health").json()["healthy_nodes"], 2);
    assert_eq!(model_ids(&p), ["a", "b"]);
    assert_eq!(p.get("/v1/models/b").json()["id"], "b");
    p.get("/v1/models/c").error(404);

    // Routing by `model`; the client's key reaches node a, which needs it.
    let r = p.post_with("/v1/chat/completions", &auth, &chat("a", 3));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "a");
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    p.post("/v1/chat/completions", &chat("a", 3)).error(401);
    let r = p.post(
        "/v1/completions",
        &json!({"model": "b", "prompt": "Paris is", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "b");
    assert_eq!(r.json()["object"], "text_completion");

    // Streaming passes through as SSE, ending with [DONE].
    let mut body = chat("b", 4);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = p.stream("/v1/chat/completions", &[], &body);
    assert!(events
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let chunks = events.all();
    assert!(chunks.iter().all(|c| c["model"] == "b"));
    assert_eq!(
        chunks.last().expect("usage chunk")["usage"]["completion_tokens"],
        4
    );

    // Errors in OpenAI's shape.
    let e = p.post("/v1/chat/completions", &chat("nope", 1)).error(404);
    assert_eq!(e["code"], "model_not_found");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("a, b"), "{message}");
    let e = p
        .post("/v1/completions", &json!({"prompt": "Hi"}))
        .error(400);
    assert_eq!(e["param"], "model");
    p.send("POST", "/v1/completions", &[], b"{\"model\": ")
        .error(400);

    // /nodes/* need the admin key.
    p.get("/nodes/status").error(401);
    p.get_with("/nodes/status", &[("Authorization", "Bearer wrong")])
        .error(401);
    let remove = json!({"url": url(&b)});
    p.post("/nodes/remove", &remove).error(401);
    let admin = [("Authorization", ADMIN)];
    let status = p.get_with("/nodes/status", &admin);
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(status.json()["nodes"].as_array().map(Vec::len), Some(2));
    assert_eq!(status.json()["strategy"], "min_observed_latency");
    let r = p.post_with("/nodes/remove", &admin, &remove);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(model_ids(&p), ["a"]);
    p.post("/v1/chat/completions", &chat("b", 1)).error(404);
    p.post_with("/nodes/remove", &admin, &remove).error(404);
    let r = p.post_with("/nodes/add", &admin, &json!({"url": url(&b)}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["added"]["healthy"], true);
    assert_eq!(r.json()["added"]["models"], json!(["b"]));
    p.post_with("/nodes/add", &admin, &json!({"url": url(&b)}))
        .error(400);
    let e = p
        .post_with("/nodes/add", &admin, &json!({"url": "ftp://x"}))
        .error(400);
    assert_eq!(e["param"], "url");
    assert_eq!(model_ids(&p), ["a", "b"]);

    // 30 concurrent short streams over both nodes all finish with their
    // token counts, and every KV block comes back.
    let threads: Vec<_> = (0..30)
        .map(|i| {
            let proxy_client = p.client.clone();
            std::thread::spawn(move || {
                let model = if i % 2 == 0 { "a" } else { "b" };
                let tokens = 2 + i % 5;
                let key = format!("Bearer {NODE_KEY}");
                let mut body = json!({
                    "model": model,
                    "prompt": format!("Count to {i}:"),
                    "max_tokens": tokens,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                if i % 3 == 0 {
                    body = chat(model, tokens);
                    body["ignore_eos"] = json!(true);
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                }
                let path = if i % 3 == 0 {
                    "/v1/chat/completions"
                } else {
                    "/v1/completions"
                };
                let chunks = proxy_client
                    .stream(path, &[("Authorization", key.as_str())], &body)
                    .all();
                let last = chunks.last().expect("usage chunk");
                assert_eq!(last["model"], model);
                assert_eq!(last["usage"]["completion_tokens"], tokens, "request {i}");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("stream completes");
    }
    a.wait_idle();
    b.wait_idle();
    assert_eq!(a.metric("lmq_kv_blocks_used"), 0.0);
    assert_eq!(b.metric("lmq_kv_blocks_used"), 0.0);
    let page = p.get("/metrics").text();
    assert!(
        page.contains("lmq_proxy_node_outstanding{node=\""),
        "{page}"
    );
    assert_eq!(p.metric("lmq_proxy_node_outstanding"), 0.0);
    assert!(
        p.metric("lmq_proxy_requests_routed_total") >= 15.0,
        "{page}"
    );
    eprintln!(
        "routes_by_model_streams_and_guards_admin: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn fails_over_when_a_replica_dies_and_passes_disconnects_on() {
    let started = Instant::now();
    let [mut c, d]: [Process; 2] = nodes(&[("shared", &[]), ("shared", &[])])
        .try_into()
        .unwrap_or_else(|_| panic!("two nodes"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "health_check_interval_s: 1\nnodes:\n  - url: {}\n  - url: {}\n    models: [shared]\n",
        url(&c),
        url(&d)
    );
    let p = proxy(tmp.path(), &yaml);
    // Without an admin key the node endpoints are off, not open.
    let e = p.get("/nodes/status").error(403);
    assert_eq!(e["code"], "admin_disabled");

    // Equal nodes share the load.
    for _ in 0..4 {
        let r = p.post("/v1/chat/completions", &chat("shared", 1));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(served(&c) >= 1.0);
    assert!(served(&d) >= 1.0);

    // A client that leaves mid-stream cancels its request on the node.
    let mut body = json!({"model": "shared", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true});
    let mut events = p.stream("/v1/completions", &[], &body);
    events.next().expect("a first event");
    events.close();
    c.wait_idle();
    d.wait_idle();
    let cancelled = [&c, &d]
        .iter()
        .any(|n| n.get("/metrics").text().contains("reason=\"cancelled\"} 1"));
    assert!(cancelled, "the node never saw the cancellation");

    // So does one that leaves while waiting for a whole response.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let conn = p.open(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        whole.to_string().as_bytes(),
    );
    let start = Instant::now();
    while c.metric("lmq_kv_blocks_used") + d.metric("lmq_kv_blocks_used") == 0.0 {
        assert!(start.elapsed().as_secs() < 10, "the request never ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(conn);
    c.wait_idle();
    d.wait_idle();

    // Kill c: every new request still succeeds, the first ones by failing
    // over from c's refused connection, then by c being marked down.
    c.child.kill().expect("kills node c");
    c.child.wait().expect("node c exits");
    for _ in 0..4 {
        let r = p.post("/v1/chat/completions", &chat("shared", 1));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    body["max_tokens"] = json!(2);
    let chunks = p.stream("/v1/completions", &[], &body).all();
    assert!(!chunks.is_empty());
    let page = p.get("/metrics").text();
    let c_healthy = format!("lmq_proxy_node_healthy{{node=\"{}\"}} 0", url(&c));
    assert!(page.contains(&c_healthy), "{page}");
    assert_eq!(p.get("/health").json()["healthy_nodes"], 1);
    assert_eq!(model_ids(&p), ["shared"]);

    // With d gone too, the model is known but unavailable: 503.
    drop(d);
    let e = p
        .post("/v1/chat/completions", &chat("shared", 1))
        .error(503);
    assert_eq!(e["code"], "no_healthy_node");
    eprintln!(
        "fails_over_when_a_replica_dies_and_passes_disconnects_on: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Generation tokens a node has produced (its Prometheus counter).
fn served(c: &Client) -> f64 {
    c.metric("lmq_generation_tokens_total")
}

#[test]
fn bad_config_names_the_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (yaml, needle) in [
        (
            "nodes:\n  - url: http://127.0.0.1:1\n    weight: -1\n",
            "nodes[0].weight",
        ),
        (
            "strategy: fastest\nnodes:\n  - url: http://127.0.0.1:1\n",
            "fastest",
        ),
        ("nodes:\n  - url: 127.0.0.1:1\n", "nodes[0].url"),
        ("nodes: []\n", "admin_key"),
    ] {
        let path = tmp.path().join("bad.yaml");
        std::fs::write(&path, yaml).expect("writes config");
        let out = Command::new(env!("CARGO_BIN_EXE_lmq"))
            .args([
                "proxy",
                "--config",
                path.to_str().expect("utf-8"),
                "--port",
                "0",
            ])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{yaml}: {stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    // A node that is down at start is kept and reported, not fatal.
    let p = proxy(tmp.path(), "nodes:\n  - url: http://127.0.0.1:1\n");
    assert_eq!(p.get("/health").json()["healthy_nodes"], 0);
    p.post("/v1/chat/completions", &chat("a", 1)).error(404);
}
