//! `lmq serve` end to end: the real binary on a loopback port, driven over
//! real HTTP (a minimal HTTP/1.1 client on `std::net`, so no client crate
//! is built). Covers the OpenAI endpoints, streaming, stop, seeds,
//! logprobs, every kind of bad input, overload, client disconnects (KV
//! blocks come back), SIGTERM, several models from YAML, and the official
//! `openai` Python client (tests/serve_client.py).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{Client, Process};
use serde_json::{json, Value};

/// A running `lmq serve`; killed when dropped.
type Server = Process;

/// Serves the test model with a small KV cache plus `args`.
fn start_server(args: &[&str]) -> Server {
    let dir = common::model_dir();
    let mut all = vec!["--model", dir.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    spawn_server(&all)
}

/// `lmq serve` on a free port with a small KV cache plus `args`; the
/// client sends the `--api-key` given, if any.
fn spawn_server(args: &[&str]) -> Server {
    let mut all = vec!["--port", "0", "--kv-cache-bytes", "32M"];
    all.extend_from_slice(args);
    let mut server = Process::spawn("serve", &all);
    server.client.key = args
        .iter()
        .position(|&a| a == "--api-key")
        .map(|i| args[i + 1].to_string());
    server
}

fn completion(server: &Server, body: Value) -> Value {
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn chat_messages() -> Value {
    json!([{"role": "user", "content": "What is the capital of France?"}])
}

#[test]
fn serves_completions_and_chat() {
    let s = start_server(&["--served-model-name", "smol"]);
    assert_eq!(s.get("/health").status, 200);
    let models = s.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(s.get("/v1/models/smol").json()["id"], "smol");
    s.get("/v1/models/other").error(404);

    let prompt = "The capital of France is";
    let r = completion(
        &s,
        json!({"model": "smol", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(r["object"], "text_completion");
    assert!(r["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    assert!(r["created"].as_u64().is_some());
    assert_eq!(r["model"], "smol");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let text = r["choices"][0]["text"].as_str().expect("text").to_string();
    assert!(text.contains("Paris"), "{text}");
    let u = &r["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 12)
    );

    // A stop string from the middle of that text ends it just before.
    let mid = (1..text.len())
        .find(|&i| i >= text.len() / 2 && text.is_char_boundary(i))
        .unwrap();
    let end = text[mid..]
        .char_indices()
        .nth(2)
        .map_or(text.len(), |(i, _)| mid + i);
    let stop = &text[mid..end];
    let cut = &text[..text.find(stop).unwrap()];
    let r = completion(
        &s,
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(r["choices"][0]["text"], cut, "stop {stop:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // The same seed gives the same sample; choice k of `n` uses seed + k.
    let sampled = |seed: u64, n: u64| {
        completion(
            &s,
            json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n}),
        )
    };
    let a = sampled(42, 1)["choices"][0]["text"].clone();
    assert_eq!(sampled(42, 1)["choices"][0]["text"], a);
    let b = sampled(43, 1)["choices"][0]["text"].clone();
    let pair = sampled(42, 2);
    assert_eq!(pair["choices"][0]["text"], a);
    assert_eq!(pair["choices"][1]["text"], b);
    assert_eq!(pair["choices"][1]["index"], 1);
    assert_eq!(pair["usage"]["completion_tokens"], 16);

    // Completions logprobs: greedy picks the most likely token.
    let r = completion(
        &s,
        json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 3}),
    );
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["text_offset"][0], 0);
    for (chosen, top) in lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
    {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((chosen.as_f64().unwrap() - best).abs() < 1e-4 && best <= 0.0);
    }

    // Chat, whole and streamed with usage; the two agree.
    let r = s.post("/v1/chat/completions", &json!({"messages": chat_messages(), "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let message = &r["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let content = message["content"].as_str().unwrap().to_string();
    assert!(content.contains("Paris"), "{content}");
    let entries = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    // One entry per token of the text (an EOS that ended it has none).
    let joined: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, content);
    assert!(entries
        .iter()
        .all(|e| e["top_logprobs"].as_array().unwrap().len() == 2
            && e["logprob"].as_f64().unwrap() <= 0.0));

    let chunks = s
        .stream("/v1/chat/completions", &[], &json!({"messages": chat_messages(), "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}))
        .all();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        r["usage"]["completion_tokens"]
    );
    assert_eq!(last["usage"]["prompt_tokens"], r["usage"]["prompt_tokens"]);

    // Streamed completions with two choices: each ends once.
    let chunks = s
        .stream(
            "/v1/completions",
            &[],
            &json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "n": 2, "stream": true}),
        )
        .all();
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|c| c["index"] == index)
            .collect();
        let text: String = mine.iter().filter_map(|c| c["text"].as_str()).collect();
        assert_eq!(
            text,
            completion(
                &s,
                json!({"prompt": prompt, "max_tokens": 5, "temperature": 0})
            )["choices"][0]["text"]
        );
        assert_eq!(
            mine.iter()
                .filter(|c| c["finish_reason"] == "length")
                .count(),
            1
        );
    }
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    s.wait_idle();
}

#[test]
fn bad_input_gets_openai_errors() {
    let s = start_server(&["--api-key", "sekrit", "--max-request-bytes", "64K"]);
    let model = common::model_dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let ok = json!({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0});

    let mut anonymous = Client {
        port: s.port,
        key: None,
    };
    let e = anonymous.post("/v1/completions", &ok).error(401);
    assert_eq!(e["code"], "invalid_api_key");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));
    anonymous.key = Some("wrong".into());
    anonymous.post("/v1/completions", &ok).error(401);
    anonymous.get("/v1/models").error(401);
    assert_eq!(anonymous.get("/health").status, 200);

    let raw = |body: &[u8]| {
        s.send(
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            body,
        )
    };
    let e = raw(b"{\"prompt\": \"Hello\",").error(400);
    assert!(
        e["message"].as_str().unwrap().contains("not valid JSON"),
        "{e}"
    );
    let e = raw(b"{\"prompt\": \"caf\xe9\"}").error(400);
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");
    raw(b"").error(400);
    raw(b"[1, 2]").error(400);
    let huge = format!("{{\"prompt\": \"{}\"}}", "a".repeat(100_000));
    let e = raw(huge.as_bytes()).error(413);
    assert!(e["message"].as_str().unwrap().contains("64000"), "{e}");

    let with = |extra: Value| {
        let mut body = ok.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for (path, extra, param) in [
        (
            "/v1/completions",
            json!({"temperature": "hot"}),
            "temperature",
        ),
        ("/v1/completions", json!({"max_tokens": 1.5}), "max_tokens"),
        ("/v1/completions", json!({"stream": "yes"}), "stream"),
        (
            "/v1/completions",
            json!({"prompt": {"text": "x"}}),
            "prompt",
        ),
        ("/v1/completions", json!({"prompt": null}), "prompt"),
        ("/v1/completions", json!({"temperature": 3}), "temperature"),
        ("/v1/completions", json!({"top_p": 0}), "top_p"),
        ("/v1/completions", json!({"n": 0}), "n"),
        ("/v1/completions", json!({"max_tokens": 0}), "max_tokens"),
        ("/v1/completions", json!({"max_tokens": 9000}), "max_tokens"),
        ("/v1/completions", json!({"logprobs": 50}), "logprobs"),
        ("/v1/completions", json!({"stop": 7}), "stop"),
        (
            "/v1/completions",
            json!({"frequency_penalty": -3}),
            "frequency_penalty",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 999999]}),
            "prompt",
        ),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "hi"}]}),
            "messages[0]",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": chat_messages(), "top_logprobs": 2}),
            "top_logprobs",
        ),
    ] {
        let e = s.post(path, &with(extra.clone())).error(400);
        assert_eq!(e["param"], param, "{extra}: {e}");
    }

    let e = s
        .post("/v1/completions", &with(json!({"model": "gpt-4"})))
        .error(404);
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains(&model), "{e}");

    let long = with(json!({"prompt": "hello ".repeat(9000)}));
    let e = s.post("/v1/completions", &long).error(400);
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("9001") && m.contains("8192"), "{m}");
    assert_eq!(e["code"], "context_length_exceeded");

    s.get("/v1/nothing").error(404);
    s.send("DELETE", "/v1/models", &[], b"").error(405);

    // It still serves.
    let r = s.post("/v1/completions", &ok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    s.wait_idle();
}

#[test]
fn disconnects_cancel_and_overload_is_429() {
    let s = start_server(&["--max-queued-requests", "1"]);
    let long = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "temperature": 0});

    // A client that leaves mid-stream frees its blocks.
    let mut stream_body = long.clone();
    stream_body["stream"] = json!(true);
    let mut events = s.stream("/v1/completions", &[], &stream_body);
    for _ in 0..2 {
        events.next().expect("an event");
    }
    assert!(s.metric("lmq_kv_blocks_used") >= 1.0);
    // The one queue slot is taken.
    let r = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}));
    let e = r.error(429);
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("--max-queued-requests"));
    assert_eq!(r.header("retry-after"), Some("1"));
    events.close();
    s.wait_idle();
    let page = s.get("/metrics").text();
    assert!(page.contains("reason=\"cancelled\"} 1"), "{page}");

    // So does one that leaves while waiting for a whole response.
    let mut c = s.connect();
    let body = long.to_string();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let start = Instant::now();
    while s.metric("lmq_kv_blocks_used") == 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the request never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    s.wait_idle();
    assert!(s.get("/metrics").text().contains("reason=\"cancelled\"} 2"));
    // The slot is free again.
    assert_eq!(
        completion(&s, json!({"prompt": "Hi", "max_tokens": 2}))["usage"]["completion_tokens"],
        2
    );
}

#[test]
fn sigterm_finishes_requests_in_flight() {
    let mut s = start_server(&[]);
    let mut events = s.stream("/v1/completions", &[], &json!({"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": true, "temperature": 0, "stream": true}));
    events.next().expect("a first event");
    let kill = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let chunks = events.all();
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = s.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lmq serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(("127.0.0.1", s.port)).is_err());

    // With a short timeout, a long request is cut and the server exits.
    let mut s = start_server(&["--shutdown-timeout", "0.5"]);
    let mut events = s.stream(
        "/v1/completions",
        &[],
        &json!({"prompt": "Once", "max_tokens": 1000, "ignore_eos": true, "stream": true}),
    );
    events.next().expect("a first event");
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .expect("kill runs");
    let start = Instant::now();
    while s.child.try_wait().expect("wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the shutdown timeout was not applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.child.wait().unwrap().success());
}

#[test]
fn serves_several_models_from_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model_dir();
    let config = dir.path().join("models.yaml");
    std::fs::write(
        &config,
        format!("models:\n  - model: {m}\n    name: alpha\n  - model: {m}\n    name: beta\n    max_batch_size: 4\n    kv_cache_bytes: 16M\n", m = model.display()),
    )
    .unwrap();
    let s = spawn_server(&["--config", config.to_str().unwrap()]);
    let ids: Vec<Value> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("alpha"), json!("beta")]);
    for name in ["alpha", "beta"] {
        let r = s.post(
            "/v1/chat/completions",
            &json!({"model": name, "messages": chat_messages(), "max_tokens": 3, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["model"], name);
    }
    let e = s
        .post("/v1/completions", &json!({"model": "gamma", "prompt": "x"}))
        .error(404);
    assert!(
        e["message"].as_str().unwrap().contains("alpha, beta"),
        "{e}"
    );
    let e = s
        .post("/v1/completions", &json!({"prompt": "x"}))
        .error(400);
    assert_eq!(e["param"], "model");
    let page = s.get("/metrics").text();
    assert!(
        page.contains("lmq_kv_blocks_total{model=\"beta\"}")
            && page.contains("lmq_kv_blocks_total{model=\"alpha\"}")
    );

    // A typo in the file is an error that names it.
    std::fs::write(
        &config,
        format!(
            "models:\n  - model: {}\n    max_batch: 4\n",
            model.display()
        ),
    )
    .unwrap();
    let out = common::lmq(&["serve", "--config", config.to_str().unwrap(), "--port", "0"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("max_batch"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn official_openai_client() {
    let available = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        eprintln!("SKIPPED official_openai_client: the `openai` Python package is not installed (python3 -m pip install openai; .ci/run does)");
        return;
    }
    let s = start_server(&["--api-key", "sekrit", "--served-model-name", "smol"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve_client.py");
    let out = Command::new("python3")
        .args([
            script,
            &format!("http://127.0.0.1:{}/v1", s.port),
            "sekrit",
            "smol",
        ])
        .output()
        .expect("python3 runs");
    let report = format!("{}{}", common::stdout(&out), common::stderr(&out));
    assert!(
        out.status.success(),
        "tests/serve_client.py failed:\n{report}"
    );
    assert!(report.contains("all checks passed"), "{report}");
    s.wait_idle();
}
