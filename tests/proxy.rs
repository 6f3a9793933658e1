//! `lmq proxy` end to end: real `lmq serve` nodes and a real proxy on
//! loopback ports, driven over real HTTP. Covers routing by model,
//! aggregation, streaming passthrough, the OpenAI errors, the admin key on
//! `/nodes/*`, forwarding of the client's key, concurrent streams (every
//! KV block comes back), client disconnects reaching the node, failover
//! when a replica dies, config errors, `lmq serve --proxy-url`
//! registration, retries after 429/5xx answers, and, with the official
//! `openai` Python client (tests/serve_client.py, tests/load_client.py),
//! the OpenAI API through the proxy, 200 concurrent streams, and a node
//! killed under load.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{
    chat, free_port, listed_nodes, model_ids, node_logged, node_series, nodes, proxy, proxy_on,
    sigterm, url, wait_exit,
};
use common::http::{Client, Process};
use common::python::Script;
use common::stub::StubNode;
use serde_json::json;

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
    // The count can trail the freed blocks by a moment under load, so poll
    // a little; on failure show how each node counted its requests.
    let counts = || -> Vec<String> {
        [&c, &d]
            .iter()
            .flat_map(|n| {
                n.get("/metrics")
                    .text()
                    .lines()
                    .filter(|l| l.starts_with("lmq_requests_total{"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let cancelled = loop {
        if counts()
            .iter()
            .any(|l| l.contains("reason=\"cancelled\"} 1"))
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        cancelled,
        "the node never saw the cancellation; request counts: {:?}",
        counts()
    );

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

/// Bad `--proxy-url` options fail at once, before any model loads.
#[test]
fn serve_proxy_flags_are_checked_before_loading() {
    let dir = common::model_dir();
    for (extra, needle) in [
        (
            &["--proxy-url", "127.0.0.1:1", "--proxy-admin-key", "k"][..],
            "--proxy-url",
        ),
        (
            &["--proxy-url", "http://127.0.0.1:1"][..],
            "--proxy-admin-key",
        ),
        (
            &[
                "--proxy-url",
                "http://127.0.0.1:1",
                "--proxy-admin-key",
                "k",
                "--host",
                "0.0.0.0",
            ][..],
            "--advertise-url",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_lmq"))
            .args([
                "serve",
                "--model",
                dir.to_str().expect("utf-8"),
                "--port",
                "0",
            ])
            .args(extra)
            .env_remove("LMQ_PROXY_ADMIN_KEY")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

/// `lmq serve --proxy-url` joins a proxy once it is ready, retrying while
/// the proxy is not up yet; a wrong admin key is refused and not retried;
/// SIGTERM deregisters before the process exits.
#[test]
fn serve_registers_with_the_proxy_and_deregisters_on_sigterm() {
    let started = Instant::now();
    let port = free_port();
    let proxy_url = format!("http://127.0.0.1:{port}");
    // Both nodes start before the proxy exists, so their first attempts
    // fail and are retried.
    let handles: Vec<_> = ["admin-secret", "wrong-key"]
        .into_iter()
        .map(|key| {
            let proxy_url = proxy_url.clone();
            std::thread::spawn(move || {
                node_logged(
                    "reg",
                    "32M",
                    &["--proxy-url", &proxy_url, "--proxy-admin-key", key],
                )
            })
        })
        .collect();
    let [mut good, bad]: [Process; 2] = handles
        .into_iter()
        .map(|h| h.join().expect("node starts"))
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or_else(|_| panic!("two nodes"));
    let minute = Duration::from_secs(60);
    for n in [&good, &bad] {
        let line = n.log().wait_for("retrying in", minute);
        assert!(line.contains("attempt 1/6"), "{line}");
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    let p = proxy_on(
        tmp.path(),
        "health_check_interval_s: 0.5\nadmin_key: admin-secret\n",
        port,
    );
    let line = good.log().wait_for("registered with the proxy", minute);
    assert!(
        line.contains(&url(&good)) && line.contains("models: reg"),
        "{line}"
    );
    let line = bad.log().wait_for("refused to register", minute);
    assert!(
        line.contains("401") && line.contains("not retrying"),
        "{line}"
    );

    let listed = listed_nodes(&p, ADMIN);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["url"], url(&good));
    assert_eq!(listed[0]["healthy"], true);
    assert_eq!(listed[0]["models"], json!(["reg"]));
    let r = p.post("/v1/chat/completions", &chat("reg", 2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "reg");
    assert_eq!(served(&good), 2.0);
    // Registration never stops a node: the refused one still serves.
    let r = bad.post("/v1/chat/completions", &chat("reg", 1));
    assert_eq!(r.status, 200, "{}", r.text());

    // SIGTERM: the node leaves the proxy, then exits cleanly.
    sigterm(&good.child);
    assert!(wait_exit(&mut good.child, minute).success());
    good.log().wait_for("deregistered", Duration::from_secs(5));
    assert!(listed_nodes(&p, ADMIN).is_empty());
    assert_eq!(p.get("/health").json()["nodes"], 0);
    eprintln!(
        "serve_registers_with_the_proxy_and_deregisters_on_sigterm: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A node that answers 429 (its queue is full) or 5xx is skipped for
/// another replica before any byte reaches the client, and stays in
/// routing; with no replica left the client gets the node's own answer.
#[test]
fn retries_on_another_replica_after_429_or_5xx() {
    let [full, free]: [Process; 2] =
        nodes(&[("busy", &["--max-queued-requests", "1"]), ("busy", &[])])
            .try_into()
            .unwrap_or_else(|_| panic!("two nodes"));
    // No real node can be made to answer 5xx on demand; the stub can.
    let stub = StubNode::start(&["busy", "stub-only"], 503);
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "health_check_interval_s: 1\nnodes:\n  - url: {}\n  - url: {}\n  - url: {}\n",
        url(&full),
        url(&free),
        stub.url()
    );
    let p = proxy(tmp.path(), &yaml);
    assert_eq!(p.get("/health").json()["healthy_nodes"], 3);

    // Fill `full`'s one queue slot directly, so that it answers 429. The
    // request must outlast the six below on a fast machine (400 tokens did
    // not), and fit the node's 32M of KV cache (about 1450 tokens); it is
    // cancelled at the end.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 1200, "ignore_eos": true, "stream": true});
    let mut events = full.stream("/v1/completions", &[], &long);
    events.next().expect("a first event");
    full.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}))
        .error(429);

    // Ties rotate, so `full` and the stub are each tried first by some of
    // these; every one is answered by `free`.
    for i in 0..6 {
        let r = p.post("/v1/chat/completions", &chat("busy", 1));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(served(&free), 6.0);
    assert!(node_series(&p, "lmq_proxy_node_rejections_total", &full) >= 1.0);
    assert!(stub.posts() >= 1);
    assert!(p.metric("lmq_proxy_retries_total") >= 2.0);
    // Answering 429/5xx does not take a node out of routing.
    assert_eq!(node_series(&p, "lmq_proxy_node_healthy", &full), 1.0);
    assert_eq!(p.get("/health").json()["healthy_nodes"], 3);

    // No replica left: the node's own error, status and Retry-After.
    let r = p.post("/v1/chat/completions", &chat("stub-only", 1));
    assert_eq!(r.error(503)["code"], "stub_error");
    assert_eq!(r.header("retry-after"), Some("7"));
    events.close();
    full.wait_idle();
    free.wait_idle();
}

/// Two nodes behind the proxy serving `smol` with `--api-key NODE_KEY`
/// and room for 64 sequences each.
fn load_cluster(tmp: &std::path::Path) -> (Process, Process, Process) {
    let handles: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| node_logged("smol", "96M", &["--api-key", NODE_KEY])))
        .collect();
    let mut n = handles.into_iter().map(|h| h.join().expect("node starts"));
    let (a, b) = (n.next().expect("a"), n.next().expect("b"));
    let yaml = format!(
        "health_check_interval_s: {}\nnodes:\n  - url: {}\n    api_key: {NODE_KEY}\n  - url: {}\n    api_key: {NODE_KEY}\n",
        HEALTH_INTERVAL.as_secs_f64(),
        url(&a),
        url(&b)
    );
    let p = proxy(tmp, &yaml);
    assert_eq!(p.get("/health").json()["healthy_nodes"], 2);
    (a, b, p)
}

const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// A request record of tests/load_client.py `--results`.
#[derive(serde::Deserialize)]
struct Record {
    ok: bool,
    start_unix: f64,
    error: Option<String>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The summary line tests/load_client.py prints last.
fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

/// The official `openai` client through the proxy (chat, completions,
/// streaming, usage, stop, seeds, logprobs, errors), then 200 concurrent
/// streams: each gets exactly its 4 tokens, both nodes share them, and
/// afterwards every KV block is free. Prints the latency percentiles.
#[test]
fn openai_client_and_200_concurrent_streams_through_the_proxy() {
    if !common::python::has_openai("openai_client_and_200_concurrent_streams_through_the_proxy") {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, p) = load_cluster(tmp.path());
    let base = format!("{}/v1", url(&p));
    let limit = Duration::from_secs(240);

    let out = Script::run(
        "serve_client.py",
        &[&base, NODE_KEY, "smol", "--proxy"],
        limit,
    );
    assert!(
        out.success,
        "serve_client.py through the proxy:\n{}",
        out.report()
    );
    assert!(out.stdout.contains("all checks passed"), "{}", out.report());

    let load_started = Instant::now();
    let args = [
        "--target",
        &base,
        "--api-key",
        NODE_KEY,
        "--model",
        "smol",
        "--requests",
        "200",
        "--max-tokens",
        "4",
        "--check",
    ];
    let out = Script::run("load_client.py", &args, limit);
    assert!(out.success, "load_client.py:\n{}", out.report());
    let s = &summary(&out.stdout)["targets"][&base];
    assert_eq!(s["ok"], 200, "{s}");
    for node in [&a, &b] {
        node.wait_idle();
        assert_eq!(node.metric("lmq_kv_blocks_used"), 0.0);
        // Prefix caching is off, so no block is even kept as cache.
        let total = node.metric("lmq_kv_blocks_total");
        assert!(total >= 64.0, "{total}");
        assert_eq!(node.metric("lmq_kv_blocks_free"), total);
        assert_eq!(
            node.series("lmq_requests_total{model=\"smol\",reason=\"failed\"}"),
            0.0
        );
        // least_outstanding spreads 200 requests over both nodes.
        assert!(served(node) >= 4.0 * 50.0, "{}", served(node));
        assert_eq!(node_series(&p, "lmq_proxy_node_outstanding", node), 0.0);
    }
    common::report(&format!(
        "proxy load: 200 concurrent streams x 4 tokens through lmq proxy to 2 lmq serve nodes in {:.1} s: TTFT p50 {} ms, p99 {} ms; e2e p50 {} ms, p99 {} ms",
        load_started.elapsed().as_secs_f64(),
        s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["e2e_ms"]["p50"], s["e2e_ms"]["p99"]
    ));
    eprintln!(
        "openai_client_and_200_concurrent_streams_through_the_proxy: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Kill -9 one node under streaming load: streams in flight on the
/// survivor complete (it cancels and fails none), only requests started
/// before the kill fail (at most those in flight on the dead node), every
/// later one succeeds, and within one health interval no request is sent
/// to the dead node any more.
#[test]
fn failover_under_load_when_a_node_is_killed() {
    if !common::python::has_openai("failover_under_load_when_a_node_is_killed") {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (survivor, mut victim, p) = load_cluster(tmp.path());
    let base = format!("{}/v1", url(&p));
    let results = tmp.path().join("results.jsonl");
    let results_arg = results.to_str().expect("utf-8 path");
    let load = Script::start(
        "load_client.py",
        &[
            "--target",
            &base,
            "--api-key",
            NODE_KEY,
            "--model",
            "smol",
            "--requests",
            "160",
            "--concurrency",
            "40",
            "--max-tokens",
            "4",
            "--check",
            "--results",
            results_arg,
        ],
    );

    // Kill once the load is steady: 20 requests done, some on the victim.
    let routed = |n: &Client| node_series(&p, "lmq_proxy_requests_routed_total", n);
    let wait = Instant::now();
    while routed(&survivor) + routed(&victim) < 60.0
        || node_series(&p, "lmq_proxy_node_outstanding", &victim) < 1.0
    {
        assert!(
            wait.elapsed() < Duration::from_secs(120),
            "the load never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_flight_on_victim = node_series(&p, "lmq_proxy_node_outstanding", &victim);
    let routed_before_kill = routed(&victim);
    victim.child.kill().expect("kills the node");
    victim.child.wait().expect("the node exits");
    let killed = unix_now();
    std::thread::sleep(HEALTH_INTERVAL);
    assert_eq!(node_series(&p, "lmq_proxy_node_healthy", &victim), 0.0);
    let routed_to_victim = routed(&victim);

    let out = load.finish(Duration::from_secs(240));
    let records: Vec<Record> = std::fs::read_to_string(&results)
        .unwrap_or_else(|e| panic!("no results ({e}):\n{}", out.report()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect();
    assert_eq!(records.len(), 160, "{}", out.report());
    let failed: Vec<&Record> = records.iter().filter(|r| !r.ok).collect();
    // The kill hit requests in flight on the victim: a stream it had
    // begun to answer breaks (a failed record); one it had not answered
    // yet counts as a node failure and the proxy retries it on the
    // survivor (so it succeeds). Either shows the kill came under load.
    let victim_failures = node_series(&p, "lmq_proxy_node_failures_total", &victim);
    assert!(
        !failed.is_empty() || victim_failures >= 1.0,
        "the kill broke no stream and failed no request on the victim; it did not happen under \
         load"
    );
    // Only streams on the victim can break: those in flight when it was
    // read, plus any sent to it between that reading and its death.
    let could_break = in_flight_on_victim + routed_to_victim - routed_before_kill;
    assert!(
        failed.len() as f64 <= could_break,
        "{} failed; at most {could_break} were on the victim",
        failed.len()
    );
    for r in &failed {
        assert!(
            r.start_unix < killed,
            "a request started after the kill failed: {:?}",
            r.error
        );
    }
    let after = records.iter().filter(|r| r.start_unix > killed).count();
    assert!(after >= 40, "only {after} requests started after the kill");
    assert_eq!(
        routed(&victim),
        routed_to_victim,
        "requests still went to the dead node"
    );

    survivor.wait_idle();
    assert_eq!(survivor.metric("lmq_kv_blocks_used"), 0.0);
    for reason in ["cancelled", "failed"] {
        let series = format!("lmq_requests_total{{model=\"smol\",reason=\"{reason}\"}}");
        assert_eq!(survivor.series(&series), 0.0, "{reason} on the survivor");
    }
    assert_eq!(p.get("/health").json()["healthy_nodes"], 1);
    common::report(&format!(
        "proxy failover: node killed with {in_flight_on_victim} streams in flight on it; {} of 160 failed (all started before the kill), {victim_failures} failed on it before answering and were retried, {after} started after it all succeeded",
        failed.len()
    ));
    eprintln!(
        "failover_under_load_when_a_node_is_killed: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
