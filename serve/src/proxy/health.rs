//! The pooled HTTP client to the nodes, and health checks: `GET /health`
//! on every node each interval and, for nodes without a fixed model list,
//! `GET /v1/models` to (re)discover what they serve.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::nodes::{Node, Registry};

/// One client for every node: it keeps idle keep-alive connections per
/// node, so requests do not pay a TCP handshake each.
pub type HttpClient = Client<HttpConnector, Body>;

/// Largest `/v1/models` body read during discovery.
const MODELS_BODY_LIMIT: usize = 4 << 20;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    // A dead host must fail fast so the request can fail over.
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Checks one node and updates its state; returns whether it is healthy.
pub async fn check(client: &HttpClient, node: &Node, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, probe(client, node)).await {
        Ok(Ok(models)) => {
            node.mark_healthy(models);
            true
        }
        Ok(Err(why)) => {
            node.mark_unhealthy(why);
            false
        }
        Err(_) => {
            node.mark_unhealthy(format!(
                "health check timed out after {:.1} s",
                timeout.as_secs_f64()
            ));
            false
        }
    }
}

/// Checks every node at once.
pub async fn check_all(client: &HttpClient, registry: &Registry, timeout: Duration) {
    let nodes = registry.all();
    futures_util::future::join_all(nodes.iter().map(|n| check(client, n, timeout))).await;
}

/// Runs health checks every `interval` until the task is dropped.
pub fn spawn_loop(
    client: HttpClient,
    registry: Arc<Registry>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    let timeout = check_timeout(interval);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick fires at once; the caller has just checked.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            check_all(&client, &registry, timeout).await;
        }
    })
}

/// A check may take as long as the interval, within 1 to 10 s: a node busy
/// with a long prefill still answers `/health` quickly, a dead one never.
pub fn check_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The node's models if it is healthy, else why not.
async fn probe(client: &HttpClient, node: &Node) -> Result<Vec<String>, String> {
    let (status, _) = get(client, node, "/health", false).await?;
    if !status.is_success() {
        return Err(format!("GET /health answered {status}"));
    }
    if let Some(models) = &node.fixed_models {
        return Ok(models.clone());
    }
    let (status, body) = get(client, node, "/v1/models", true).await?;
    if status == StatusCode::UNAUTHORIZED {
        return Err(
            "GET /v1/models answered 401: give this node's api_key in the proxy config, or its models"
                .into(),
        );
    }
    if !status.is_success() {
        return Err(format!("GET /v1/models answered {status}"));
    }
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| format!("GET /v1/models is not JSON: {e}"))?;
    let models: Vec<String> = value["data"]
        .as_array()
        .map(|cards| {
            cards
                .iter()
                .filter_map(|c| c["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if models.is_empty() {
        return Err("GET /v1/models lists no model".into());
    }
    Ok(models)
}

async fn get(
    client: &HttpClient,
    node: &Node,
    path: &str,
    with_key: bool,
) -> Result<(StatusCode, axum::body::Bytes), String> {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(format!("{}{path}", node.url));
    if let (true, Some(key)) = (with_key, &node.api_key) {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = request
        .body(Body::empty())
        .map_err(|e| format!("bad request to {}: {e}", node.url))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("GET {path} failed: {}", describe(&e)))?;
    let status = response.status();
    // Reading the body to its end returns the connection to the pool.
    let body = axum::body::to_bytes(Body::new(response.into_body()), MODELS_BODY_LIMIT)
        .await
        .map_err(|e| format!("GET {path}: reading the body failed: {e}"))?;
    Ok((status, body))
}

/// The error and its causes on one line (hyper's own text is terse).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
