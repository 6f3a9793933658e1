//! Forwarding one OpenAI request to a node: pick a replica, send, and
//! either relay its answer unbuffered or, when the node failed before
//! answering or answered 429/5xx, try the next replica.
//!
//! Retry rule. Nothing reaches the client until a node answers with a
//! status other than 429 or 5xx, so trying another replica is invisible
//! to it:
//! - a node that fails before answering (refused connection, reset,
//!   closed) is marked unhealthy: it gets no traffic until a health check
//!   passes again;
//! - a node that answers 429 (its queue is full) or 5xx (its engine
//!   failed or stopped) stays healthy, because it still answers and one
//!   bad request must not take a replica out; its `/health` decides. Its
//!   small error body is read and kept, and when no replica is left the
//!   client gets the last such answer as the node sent it (status,
//!   `Retry-After`, OpenAI error body), not a generic one.
//!
//! Each replica is tried at most once per request, so a request makes at
//! most as many attempts as there are nodes serving its model.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, HeaderName, Method, Request, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::Value;

use super::health::describe;
use super::nodes::{InFlight, Node};
use super::routes::{read_body, ProxyApp};
use crate::error::ApiError;
use crate::extract::parse_object;

/// Largest error body kept from a 429/5xx answer; a larger one is cut.
const ERROR_BODY_LIMIT: usize = 64 << 10;

/// How long reading a 429/5xx body may take before the proxy gives up on
/// it (the answer is then relayed without it if it is the last).
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends the request to a node serving its model and streams the answer
/// back, trying other replicas as the module header describes.
pub(super) async fn forward(
    app: &ProxyApp,
    path: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(app, body)?;
    let value = parse_object(&bytes)?;
    let model = match value.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "model",
                "`model` is required: the proxy routes each request by it (see /v1/models)",
            ))
        }
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    };
    let mut tried: Vec<String> = Vec::new();
    // The last 429/5xx answer, kept in case no replica is left.
    let mut rejected: Option<Response> = None;
    loop {
        let Some(node) = app.registry.pick(&model, app.strategy, &tried) else {
            if let Some(answer) = rejected {
                return Ok(answer);
            }
            app.unroutable.fetch_add(1, Ordering::Relaxed);
            return Err(no_node(app, &model, &tried));
        };
        if !tried.is_empty() {
            app.retries.fetch_add(1, Ordering::Relaxed);
        }
        tried.push(node.url.clone());
        let in_flight = InFlight::new(node.clone());
        let request = upstream_request(&node, path, headers, bytes.clone())?;
        let sent = Instant::now();
        match app.client.request(request).await {
            Ok(response) if retryable(response.status()) => {
                let status = response.status();
                node.record_rejection();
                // 429 is routine back-pressure under load; a 5xx is a node
                // problem an operator wants to see.
                if status.is_server_error() {
                    eprintln!(
                        "lmq proxy: node {} answered {status}; trying another replica",
                        node.url
                    );
                }
                rejected = Some(buffer(response.map(Body::new)).await);
                drop(in_flight);
            }
            Ok(response) => {
                if response.status().is_success() {
                    node.observe_latency(sent.elapsed());
                }
                return Ok(relay(response.map(Body::new), in_flight));
            }
            Err(e) => {
                // Node addresses stay out of client answers; operators
                // see them here and in /nodes/status.
                let why = describe(&e);
                eprintln!("lmq proxy: node {} failed ({why}); marked down", node.url);
                node.record_failure(why);
            }
        }
    }
}

/// Answers that another replica may serve better: the node's queue is
/// full (429) or the node itself failed (5xx).
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// 404 for a model no node serves, else 503 (its nodes are down).
fn no_node(app: &ProxyApp, model: &str, tried: &[String]) -> ApiError {
    if tried.is_empty() && !app.registry.knows(model) {
        let available = app.registry.available_models();
        let names: Vec<&str> = available.iter().map(String::as_str).collect();
        return ApiError::model_not_found(model, &names);
    }
    let message = if tried.is_empty() {
        format!("No healthy node serves `{model}` right now; try again later")
    } else {
        format!(
            "Every node serving `{model}` failed ({} tried); try again later",
            tried.len()
        )
    };
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message,
        kind: "server_error",
        param: None,
        code: Some("no_healthy_node"),
        retry_after: Some(1),
    }
}

/// Request headers passed to the node: the client's key (so nodes with
/// `--api-key` keep working) and what describes the body or the answer
/// it wants.
const FORWARDED: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::USER_AGENT,
];

fn upstream_request(
    node: &Node,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Body>, ApiError> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", node.url));
    for name in FORWARDED {
        if let Some(v) = headers.get(&name) {
            request = request.header(name, v);
        }
    }
    if !headers.contains_key(header::CONTENT_TYPE) {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    request
        .body(Body::from(body))
        .map_err(|e| ApiError::server(format!("cannot build the request to {}: {e}", node.url)))
}

/// Headers that describe one hop, not the message: never copied.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "content-length"
    )
}

/// A response with the node's status and end-to-end headers over `body`.
fn rebuild(parts: &axum::http::response::Parts, body: Body) -> Response {
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// The node's answer, its body streamed chunk by chunk as it arrives. The
/// body owns the in-flight guard and the upstream body: when the client
/// goes away axum drops it, which closes the node connection, which
/// cancels the request on the node.
fn relay(response: Response, in_flight: InFlight) -> Response {
    let (parts, upstream) = response.into_parts();
    let chunks = upstream.into_data_stream().map(move |chunk| {
        let _held = &in_flight;
        chunk
    });
    rebuild(&parts, Body::from_stream(chunks))
}

/// A 429/5xx answer read into memory, so that its connection goes back
/// to the pool and the answer can still be relayed if it is the last. A
/// body that is too large or too slow is replaced by a generic error.
async fn buffer(response: Response) -> Response {
    let (parts, upstream) = response.into_parts();
    let read = axum::body::to_bytes(upstream, ERROR_BODY_LIMIT);
    let body = match tokio::time::timeout(ERROR_BODY_TIMEOUT, read).await {
        Ok(Ok(bytes)) => bytes,
        // Still an OpenAI-shaped error, should this answer reach the
        // client.
        _ => {
            let mut e = ApiError::server(format!("The model's node answered {}", parts.status));
            e.status = parts.status;
            Bytes::from(e.body().to_string())
        }
    };
    rebuild(&parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overload_and_server_errors_are_retried() {
        for code in [429, 500, 502, 503, 504] {
            assert!(retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [200, 400, 401, 404, 413, 422] {
            assert!(!retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
