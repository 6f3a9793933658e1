//! A minimal HTTP/1.1 client on `std::net` for the end-to-end tests of
//! `lmq serve` and `lmq proxy` (so no client crate is built), and a way
//! to start either command on a free port and wait for its ready line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `lmq` process that serves HTTP; killed when dropped.
pub struct Process {
    pub child: Child,
    pub client: Client,
    /// Its stderr lines so far, when started with [`Process::spawn_logged`].
    pub log: Option<Log>,
}

/// The stderr lines of a process, collected as they are written (and
/// echoed, so a failing test still shows them).
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn collect(self, stderr: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// Waits up to `timeout` for a line containing `needle`; returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                start.elapsed() < timeout,
                "no stderr line with {needle:?} within {timeout:?}; stderr:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl std::ops::Deref for Process {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Runs `lmq SUBCOMMAND ARGS` and waits for the line
    /// `lmq SUBCOMMAND: listening on http://127.0.0.1:PORT …`.
    pub fn spawn(subcommand: &str, args: &[&str]) -> Process {
        Self::start(subcommand, args, false)
    }

    /// [`Process::spawn`], keeping its stderr lines in `log`.
    pub fn spawn_logged(subcommand: &str, args: &[&str]) -> Process {
        Self::start(subcommand, args, true)
    }

    /// The log of a process started with [`Process::spawn_logged`].
    pub fn log(&self) -> &Log {
        self.log.as_ref().expect("started with spawn_logged")
    }

    fn start(subcommand: &str, args: &[&str], logged: bool) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmq"))
            .arg(subcommand)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .unwrap_or_else(|e| panic!("lmq {subcommand} starts: {e}"));
        let log = child.stderr.take().map(|stderr| {
            let log = Log::default();
            log.clone().collect(stderr);
            log
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("lmq {subcommand} prints its ready line"));
        let port = line
            .strip_prefix(&format!("lmq {subcommand}: listening on http://127.0.0.1:"))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected ready line: {line}"));
        Process {
            child,
            client: Client { port, key: None },
            log,
        }
    }
}

/// Where to send requests, and the API key to send (if any).
#[derive(Debug, Clone)]
pub struct Client {
    pub port: u16,
    pub key: Option<String>,
}

impl Client {
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connects");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        s
    }

    /// Opens a connection and writes one request (with the key, if any).
    pub fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> TcpStream {
        let mut s = self.connect();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(key) = &self.key {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).expect("writes head");
        // The server may answer (413) before reading a large body.
        let _ = s.write_all(body);
        s
    }

    /// Sends one request on a fresh connection and reads the whole reply.
    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut raw = Vec::new();
        let _ = self.open(method, path, headers, body).read_to_end(&mut raw);
        Reply::parse(&raw)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], b"")
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", path, headers, b"")
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_with(path, &[], body)
    }

    pub fn post_with(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        self.send("POST", path, &all, body.to_string().as_bytes())
    }

    /// Posts a streaming request and returns its open event stream.
    pub fn stream(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Events {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        let s = self.open("POST", path, &all, body.to_string().as_bytes());
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.contains(" 200 "), "stream status: {status}");
        let mut content_type = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-type") {
                    content_type = Some(value.trim().to_string());
                }
            }
        }
        Events {
            reader,
            buffer: String::new(),
            content_type,
        }
    }

    /// The value of the first sample of metric `name` (any labels).
    pub fn metric(&self, name: &str) -> f64 {
        let page = self.get("/metrics").text();
        page.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{page}"))
    }

    /// The value of one exact series, e.g. `name{node="http://…"}`.
    pub fn series(&self, series: &str) -> f64 {
        let page = self.get("/metrics").text();
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{page}"))
    }

    /// Waits until an `lmq serve` holds no request and no KV block.
    pub fn wait_idle(&self) {
        let start = Instant::now();
        while self.metric("lmq_kv_blocks_used") != 0.0 || self.metric("lmq_requests_running") != 0.0
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "KV blocks were not freed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn parse(raw: &[u8]) -> Reply {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete HTTP reply");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", self.text()))
    }

    /// Asserts an OpenAI-shaped error with `status` and returns its object.
    pub fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert!(self
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")));
        let e = self.json()["error"].clone();
        for key in ["message", "type", "param", "code"] {
            assert!(e.get(key).is_some(), "error lacks `{key}`: {e}");
        }
        assert!(!e["message"].as_str().unwrap_or("").is_empty());
        e
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 4 + size..];
    }
    out
}

/// Server-sent events read off a chunked response as they arrive.
pub struct Events {
    reader: BufReader<TcpStream>,
    buffer: String,
    pub content_type: Option<String>,
}

impl Events {
    /// The next `data:` payload; `None` at the end of the stream.
    pub fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(data.join("\n"));
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).ok()?;
            self.buffer
                .push_str(&String::from_utf8_lossy(&chunk[..size]));
        }
    }

    /// Every JSON chunk up to `[DONE]` (which must come).
    pub fn all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(data) = self.next() {
            if data == "[DONE]" {
                return out;
            }
            out.push(serde_json::from_str(&data).expect("chunk is JSON"));
        }
        panic!("the stream ended without [DONE] after {out:?}");
    }

    pub fn close(self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}
