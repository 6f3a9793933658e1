//! The proxy's HTTP surface: `/v1/chat/completions` and `/v1/completions`
//! forwarded by `model` (the `forward` module), `/v1/models` aggregated,
//! `/health` and `/metrics` about the proxy itself, and the admin-only
//! `/nodes/*`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::config::{normalize_url, NodeEntry, Strategy};
use super::health::{self, HttpClient};
use super::nodes::{Node, Registry};
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
    /// Attempts on a further replica after a node failed or answered
    /// 429/5xx.
    pub retries: AtomicU64,
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
    super::forward::forward(&app, "/v1/chat/completions", &headers, body).await
}

async fn completions(
    State(app): State<Arc<ProxyApp>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    super::forward::forward(&app, "/v1/completions", &headers, body).await
}

pub(super) fn read_body(
    app: &ProxyApp,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(app.max_request_bytes)
        } else {
            ApiError::bad_request(format!("Could not read the request body: {rejection}"))
        }
    })
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
        super::metrics::render(
            &app.registry.all(),
            app.unroutable.load(Ordering::Relaxed),
            app.retries.load(Ordering::Relaxed),
        ),
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
        // The code lets a restarted `lmq serve` tell this apart from a
        // bad request and replace its old entry.
        let mut e = ApiError::invalid("url", format!("{} is already registered", entry.url));
        e.code = Some("node_exists");
        return Err(e);
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
