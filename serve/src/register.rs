//! `lmq serve --proxy-url URL`: joining an `lmq proxy` at startup and
//! leaving it on shutdown, through the proxy's admin endpoints.
//!
//! Behaviour (documented for operators in the README):
//! - Registration (`POST /nodes/add` with `{"url", "models"}` and
//!   `Authorization: Bearer ADMIN_KEY`) starts only once the listener is
//!   bound and every model is loaded, i.e. right after the ready line, so
//!   the proxy's immediate health check of the node passes.
//! - A failure that may pass (no connection, a timeout, a 5xx) is logged
//!   and retried after 0.5, 1, 2, 4 and 8 s (six attempts over about
//!   15 s), then given up with a log line. A refusal that will not pass
//!   (401/403: wrong or missing admin key, or `/nodes/*` disabled; any
//!   other 4xx) is logged once and not retried. Either way the server
//!   keeps serving directly: registration never stops it.
//! - When the proxy already lists this URL (a restart on the same port),
//!   the old entry is removed and this one added, so its models are
//!   current.
//! - On SIGTERM or Ctrl-C the server first deregisters (`POST
//!   /nodes/remove`, one attempt, at most 3 s), so the proxy stops sending
//!   it new requests, then stops accepting and drains. Best effort: a
//!   node that dies without deregistering is taken out by the proxy's
//!   health checks within one interval.
//!
//! The node sends its model names, so the proxy needs no API key to
//! discover them; client requests carry their own key.
//!
//! Registration happens once per start: a proxy restarted later forgets
//! the node (its registry lives in memory), so nodes that must survive a
//! proxy restart belong in its `proxy.yaml`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::error::ServeError;
use crate::proxy::config::normalize_url;
use crate::proxy::{describe, http_client, HttpClient};

/// Waits before the 2nd, 3rd, … attempt to register.
const BACKOFF_MS: [u64; 5] = [500, 1000, 2000, 4000, 8000];

/// One registration attempt at most this long: the proxy health-checks
/// the node before it answers, which takes well under a second here.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// Deregistration happens during shutdown; it must not hold it up long.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest answer body read from the proxy.
const BODY_LIMIT: usize = 1 << 20;

/// Where and how to register: `--proxy-url`, the admin key, and the URL
/// the proxy should use to reach this server.
#[derive(Clone)]
pub struct ProxyRegistration {
    proxy_url: String,
    admin_key: String,
    advertise_url: Option<String>,
}

impl std::fmt::Debug for ProxyRegistration {
    // The admin key stays out of debug output and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyRegistration")
            .field("proxy_url", &self.proxy_url)
            .field("admin_key", &"<redacted>")
            .field("advertise_url", &self.advertise_url)
            .finish()
    }
}

impl ProxyRegistration {
    /// Checks the options before anything is loaded. `host` is the
    /// address the server will listen on: an unspecified one (`0.0.0.0`,
    /// `::`) says nothing about how the proxy reaches it, so then
    /// `advertise_url` is required.
    pub fn new(
        proxy_url: &str,
        admin_key: Option<String>,
        advertise_url: Option<&str>,
        host: &str,
    ) -> Result<Self, ServeError> {
        let invalid = ServeError::InvalidOption;
        let proxy_url =
            normalize_url(proxy_url).map_err(|e| invalid(format!("--proxy-url: {e}")))?;
        let admin_key = match admin_key {
            Some(k) if !k.trim().is_empty() => k,
            _ => {
                return Err(invalid(
                    "--proxy-url needs the proxy's admin key (--proxy-admin-key or LMQ_PROXY_ADMIN_KEY): the proxy guards /nodes/add with it".into(),
                ))
            }
        };
        let advertise_url = advertise_url
            .map(normalize_url)
            .transpose()
            .map_err(|e| invalid(format!("--advertise-url: {e}")))?;
        let unspecified = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        if unspecified && advertise_url.is_none() {
            return Err(invalid(format!(
                "--host {host} listens on every interface, so the proxy cannot be told where to reach this server: give --advertise-url http://THIS-HOST:PORT"
            )));
        }
        Ok(ProxyRegistration {
            proxy_url,
            admin_key,
            advertise_url,
        })
    }
}

/// Registers and deregisters one server with one proxy.
pub(crate) struct Registrar {
    client: HttpClient,
    proxy_url: String,
    admin_key: String,
    /// This server as the proxy sees it.
    node_url: String,
    models: Vec<String>,
}

/// How one attempt ended.
enum Attempt {
    Done,
    /// May pass on a later attempt.
    Retry(String),
    /// Will not pass by retrying.
    Refused(String),
    /// The proxy lists this URL already.
    Exists,
}

impl Registrar {
    pub(crate) fn new(
        options: &ProxyRegistration,
        bound: SocketAddr,
        models: Vec<String>,
    ) -> Registrar {
        Registrar {
            client: http_client(),
            proxy_url: options.proxy_url.clone(),
            admin_key: options.admin_key.clone(),
            node_url: options
                .advertise_url
                .clone()
                .unwrap_or_else(|| format!("http://{bound}")),
            models,
        }
    }

    /// Registers with retries as the module header describes, logging
    /// each outcome to stderr. Returns whether the node is registered.
    pub(crate) async fn register(&self) -> bool {
        let attempts = BACKOFF_MS.len() + 1;
        let mut replaced = false;
        let mut attempt = 1;
        loop {
            match self.add().await {
                Attempt::Done => {
                    eprintln!(
                        "lmq serve: registered with the proxy at {} as {} (models: {})",
                        self.proxy_url,
                        self.node_url,
                        self.models.join(", ")
                    );
                    return true;
                }
                Attempt::Exists if !replaced => {
                    // A previous run on this address never deregistered;
                    // replace its entry so the proxy has today's models.
                    replaced = true;
                    eprintln!(
                        "lmq serve: the proxy at {} already lists {}; replacing that entry",
                        self.proxy_url, self.node_url
                    );
                    if let Err(why) = self.remove(ATTEMPT_TIMEOUT).await {
                        eprintln!("lmq serve: removing the old entry failed ({why})");
                    }
                    continue;
                }
                Attempt::Exists => {
                    eprintln!(
                        "lmq serve: the proxy at {} still lists {} after removing it; leaving that entry",
                        self.proxy_url, self.node_url
                    );
                    return true;
                }
                Attempt::Refused(why) => {
                    eprintln!(
                        "lmq serve: the proxy at {} refused to register {} ({why}); not retrying. This server still answers at {}",
                        self.proxy_url, self.node_url, self.node_url
                    );
                    return false;
                }
                Attempt::Retry(why) if attempt < attempts => {
                    let wait = Duration::from_millis(BACKOFF_MS[attempt - 1]);
                    eprintln!(
                        "lmq serve: cannot register with the proxy at {} (attempt {attempt}/{attempts}: {why}); retrying in {:.1} s",
                        self.proxy_url,
                        wait.as_secs_f64()
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Attempt::Retry(why) => {
                    eprintln!(
                        "lmq serve: gave up registering with the proxy at {} after {attempts} attempts ({why}). This server still answers at {}",
                        self.proxy_url, self.node_url
                    );
                    return false;
                }
            }
        }
    }

    /// Deregisters once, briefly, logging the outcome.
    pub(crate) async fn deregister(&self) {
        match self.remove(DEREGISTER_TIMEOUT).await {
            Ok(()) => eprintln!(
                "lmq serve: deregistered {} from the proxy at {}",
                self.node_url, self.proxy_url
            ),
            Err(why) => eprintln!(
                "lmq serve: could not deregister from the proxy at {} ({why}); its health checks will take this node out",
                self.proxy_url
            ),
        }
    }

    async fn add(&self) -> Attempt {
        let body = json!({"url": self.node_url, "models": self.models});
        match self.post("/nodes/add", &body, ATTEMPT_TIMEOUT).await {
            Err(why) => Attempt::Retry(why),
            Ok((status, _)) if status.is_success() => Attempt::Done,
            Ok((_, answer)) if answer["error"]["code"] == "node_exists" => Attempt::Exists,
            Ok((status, answer)) => {
                let why = format!("{status}: {}", message(&answer));
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    Attempt::Retry(why)
                } else {
                    Attempt::Refused(why)
                }
            }
        }
    }

    /// Removes this node's entry; a 404 (never registered, or already
    /// removed) counts as done.
    async fn remove(&self, timeout: Duration) -> Result<(), String> {
        let body = json!({"url": self.node_url});
        let (status, answer) = self.post("/nodes/remove", &body, timeout).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(format!("{status}: {}", message(&answer)))
        }
    }

    /// Posts `body` to the proxy with the admin key; the status and the
    /// answer as JSON (`null` when it is not JSON).
    async fn post(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.proxy_url))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.admin_key))
            .body(Body::from(body.to_string()))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| describe(&e))?;
            let status = response.status();
            let bytes = axum::body::to_bytes(Body::new(response.into_body()), BODY_LIMIT)
                .await
                .map_err(|e| format!("reading the answer failed: {e}"))?;
            Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:.0} s", timeout.as_secs_f64()))?
    }
}

/// The message of an OpenAI-shaped error, else a placeholder.
fn message(answer: &Value) -> String {
    answer["error"]["message"]
        .as_str()
        .unwrap_or("no error message")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_loading() {
        let ok = ProxyRegistration::new("http://p:8000/", Some("k".into()), None, "127.0.0.1")
            .expect("valid");
        assert_eq!(ok.proxy_url, "http://p:8000");
        let r = Registrar::new(&ok, "127.0.0.1:5".parse().unwrap(), vec!["m".into()]);
        assert_eq!(r.node_url, "http://127.0.0.1:5");

        let err = |url: &str, key: Option<&str>, advertise: Option<&str>, host: &str| {
            ProxyRegistration::new(url, key.map(str::to_string), advertise, host)
                .unwrap_err()
                .to_string()
        };
        assert!(err("p:8000", Some("k"), None, "127.0.0.1").contains("--proxy-url"));
        assert!(err("http://p:1", None, None, "127.0.0.1").contains("--proxy-admin-key"));
        assert!(err("http://p:1", Some(" "), None, "127.0.0.1").contains("--proxy-admin-key"));
        assert!(err("http://p:1", Some("k"), None, "0.0.0.0").contains("--advertise-url"));
        assert!(err("http://p:1", Some("k"), Some("ftp://x"), "::").contains("--advertise-url"));

        let wide =
            ProxyRegistration::new("http://p:1", Some("k".into()), Some("http://n:2/"), "::")
                .expect("valid");
        let r = Registrar::new(&wide, "[::]:2".parse().unwrap(), vec![]);
        assert_eq!(r.node_url, "http://n:2");
    }
}
