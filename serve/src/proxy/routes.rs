//! The proxy's HTTP surface: `/v1/chat/completions` and `/v1/completions`
//! forwarded by `model`, `/v1/models` aggregated, `/health` and
//! `/metrics` about the proxy itself, and the admin-only `/nodes/*`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::config::{normalize_url, NodeEntry, Strategy};
use super::health::{self, describe, HttpClient};
use super::nodes::{InFlight, Node, Registry};
use crate::error::ApiError;
use crate::extract::{field_set, parse_object};

/// What every proxy handler shares.
pub struct ProxyApp {
    pub registry: Arc<Registry>,
    pub client: HttpClient,
    pub strategy: Strategy,
    pub admin_key: Option<String>,
    pub max_request_bytes: u64,
    pub health_timeout: std::time::Duration,
    /// Unix time the proxy started (`created` of the model cards).
    pub started: u64,
    /// Requests answered 404/503 because no node could take them.
    pub unroutable: AtomicU64,
}

pub(crate) fn router(app: Arc<ProxyApp>) -> Router {
    let limit = usize::try_from(app.max_request_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(retrieve_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/nodes/status", get(nodes_status))
        .route("/nodes/add", post(nodes_add))
        .route("/nodes/remove", post(nodes_remove))
        .fallback(|| async {
            ApiError::not_found("No such endpoint; see /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics, /nodes/status")
        })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn chat(
    State(app): State<Arc<ProxyApp>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    forward(&app, "/v1/chat/completions", &headers, body).await
}

async fn completions(
    State(app): State<Arc<ProxyApp>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    forward(&app, "/v1/completions", &headers, body).await
}

fn read_body(app: &ProxyApp, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(app.max_request_bytes)
        } else {
            ApiError::bad_request(format!("Could not read the request body: {rejection}"))
        }
    })
}

/// Sends the request to a node serving its model and streams the answer
/// back. A node that fails before answering (refused connection, reset)
/// is marked unhealthy and the request goes to the next replica; nothing
/// has reached the client yet, so the retry is invisible to it.
async fn forward(
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
    loop {
        let Some(node) = app.registry.pick(&model, app.strategy, &tried) else {
            app.unroutable.fetch_add(1, Ordering::Relaxed);
            return Err(no_node(app, &model, &tried));
        };
        let in_flight = InFlight::new(node.clone());
        let request = upstream_request(&node, path, headers, bytes.clone())?;
        let sent = Instant::now();
        match app.client.request(request).await {
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
                tried.push(node.url.clone());
            }
        }
    }
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
    let mut out = Response::new(Body::from_stream(chunks));
    *out.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

fn model_card(app: &ProxyApp, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": app.started, "owned_by": "lmq"})
}

/// The models some healthy node serves: what a request can reach now.
async fn list_models(State(app): State<Arc<ProxyApp>>) -> Json<Value> {
    let data: Vec<Value> = app
        .registry
        .available_models()
        .iter()
        .map(|id| model_card(&app, id))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn retrieve_model(
    State(app): State<Arc<ProxyApp>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) =
        id.map_err(|e| ApiError::bad_request(format!("Invalid model id in the path: {e}")))?;
    let available = app.registry.available_models();
    if available.contains(&id) {
        return Ok(Json(model_card(&app, &id)));
    }
    let names: Vec<&str> = available.iter().map(String::as_str).collect();
    Err(ApiError::model_not_found(&id, &names))
}

async fn health(State(app): State<Arc<ProxyApp>>) -> Json<Value> {
    let nodes = app.registry.all();
    let healthy = nodes.iter().filter(|n| n.is_healthy()).count();
    Json(json!({"status": "ok", "nodes": nodes.len(), "healthy_nodes": healthy}))
}

async fn metrics(State(app): State<Arc<ProxyApp>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::render(&app.registry.all(), app.unroutable.load(Ordering::Relaxed)),
    )
        .into_response()
}

/// `/nodes/*` need `Authorization: Bearer ADMIN_KEY`; without a
/// configured key they are off (403), never open.
fn require_admin(app: &ProxyApp, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.admin_key else {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: "The /nodes endpoints are disabled: set admin_key in the proxy config".into(),
            kind: "permission_error",
            param: None,
            code: Some("admin_disabled"),
            retry_after: None,
        });
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| v.strip_prefix(b"Bearer "));
    match given {
        Some(g) if constant_time_eq(g, key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("Incorrect admin key")),
        None => Err(ApiError::unauthorized(
            "The /nodes endpoints need `Authorization: Bearer ADMIN_KEY`",
        )),
    }
}

/// Compares keys without an early exit, so timing does not reveal how
/// much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn nodes_status(
    State(app): State<Arc<ProxyApp>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require_admin(&app, &headers)?;
    let nodes: Vec<Value> = app.registry.all().iter().map(|n| n.status()).collect();
    Ok(Json(
        json!({"strategy": app.strategy.name(), "nodes": nodes}),
    ))
}

/// Registers a node (`{"url", "models"?, "weight"?, "api_key"?}`) and
/// checks it at once; an unreachable node is kept, unhealthy, and joins
/// when a health check succeeds.
async fn nodes_add(
    State(app): State<Arc<ProxyApp>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&app, &headers)?;
    let value = parse_object(&read_body(&app, body)?)?;
    let mut entry: NodeEntry = field_set(&value)?;
    entry.check().map_err(|e| {
        let field = e.split(':').next().unwrap_or("url").trim().to_string();
        ApiError::invalid(field, e)
    })?;
    let node = Arc::new(Node::new(&entry));
    if !app.registry.add(node.clone()) {
        return Err(ApiError::invalid(
            "url",
            format!("{} is already registered", entry.url),
        ));
    }
    health::check(&app.client, &node, app.health_timeout).await;
    Ok(Json(json!({"added": node.status()})))
}

async fn nodes_remove(
    State(app): State<Arc<ProxyApp>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&app, &headers)?;
    let value = parse_object(&read_body(&app, body)?)?;
    let Some(url) = value.get("url").and_then(Value::as_str) else {
        return Err(ApiError::invalid("url", "`url` (a string) is required"));
    };
    let url = normalize_url(url).map_err(|e| ApiError::invalid("url", e))?;
    if !app.registry.remove(&url) {
        return Err(ApiError::not_found(format!("No node {url} is registered")));
    }
    Ok(Json(json!({"removed": url})))
}
