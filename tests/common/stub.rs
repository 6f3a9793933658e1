//! A stub OpenAI node on a loopback port, for proxy behaviour that a real
//! `lmq serve` cannot be made to show on demand: it passes health checks,
//! lists fixed models, and answers every POST with a 5xx error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A running stub; its thread ends with the test process.
pub struct StubNode {
    pub port: u16,
    posts: Arc<AtomicUsize>,
}

impl StubNode {
    /// Serves `models`; every POST gets `status` with an OpenAI error
    /// body whose code is `stub_error`, and `Retry-After: 7`.
    pub fn start(models: &[&str], status: u16) -> StubNode {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
        let port = listener.local_addr().expect("address").port();
        let cards: Vec<_> = models
            .iter()
            .map(|m| serde_json::json!({"id": m, "object": "model"}))
            .collect();
        let list = serde_json::json!({"object": "list", "data": cards}).to_string();
        let posts = Arc::new(AtomicUsize::new(0));
        let counter = posts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                answer(stream, &list, status, &counter);
            }
        });
        StubNode { port, posts }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// POSTs answered so far.
    pub fn posts(&self) -> usize {
        self.posts.load(Ordering::SeqCst)
    }
}

/// Reads one request and answers it; every answer closes the connection.
fn answer(stream: TcpStream, list: &str, status: u16, posts: &AtomicUsize) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let (code, extra, text) = if request_line.starts_with("POST ") {
        posts.fetch_add(1, Ordering::SeqCst);
        let error = serde_json::json!({"error": {"message": "stub node failure", "type": "server_error", "param": null, "code": "stub_error"}});
        (status, "Retry-After: 7\r\n", error.to_string())
    } else if request_line.starts_with("GET /v1/models ") {
        (200, "", list.to_string())
    } else {
        (200, "", "{\"status\":\"ok\"}".to_string())
    };
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{text}",
        text.len()
    );
}
