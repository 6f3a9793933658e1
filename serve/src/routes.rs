//! The HTTP surface: routes, the API-key check, and the handlers that
//! turn a validated [`Plan`] into a JSON response or an SSE stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use crate::app::App;
use crate::error::ApiError;
use crate::extract::{field_set, JsonBody};
use crate::format::{Api, Formatter, UsageSum};
use crate::params::{self, ChatFields, CommonFields, CompletionFields, Plan};
use crate::run::{self, Piece};

pub(crate) fn router(app: Arc<App>) -> Router {
    let limit = usize::try_from(app.max_request_bytes).unwrap_or(usize::MAX);
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(retrieve_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("No such endpoint; see /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// Guards `/v1/*` when the server has an API key; `/health` and
/// `/metrics` stay open for load balancers and scrapers.
async fn require_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match app.authorize(req.headers().get(AUTHORIZATION).map(|v| v.as_bytes())) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// 200 while every model's engine runs, else 503 naming the dead ones (a
/// proxy's health check then stops routing here).
async fn health(State(app): State<Arc<App>>) -> Response {
    let dead: Vec<&str> = app
        .models
        .iter()
        .filter(|m| !m.engine.is_alive())
        .map(|m| m.name.as_str())
        .collect();
    if dead.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "dead_engines": dead})),
        )
            .into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let snapshot: Vec<_> = app
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.engine.stats(), &m.metrics))
        .collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&snapshot),
    )
        .into_response()
}

fn model_card(app: &App, m: &crate::app::Model) -> Value {
    json!({
        "id": m.name,
        "object": "model",
        "created": app.started,
        "owned_by": "lmq",
        "max_model_len": m.engine.info().max_context,
    })
}

async fn list_models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.models.iter().map(|m| model_card(&app, m)).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn retrieve_model(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) =
        id.map_err(|e| ApiError::bad_request(format!("Invalid model id in the path: {e}")))?;
    let index = app.model_index(Some(&id))?;
    Ok(Json(model_card(&app, &app.models[index])))
}

async fn completions(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let common: CommonFields = field_set(&body)?;
    let fields: CompletionFields = field_set(&body)?;
    let index = app.model_index(common.model.as_deref())?;
    let engine = &app.models[index].engine;
    let plan = params::completion_plan(&common, &fields, engine.tokenizer(), engine.info().into())?;
    respond(&app, index, plan, Api::Completion, received).await
}

async fn chat(State(app): State<Arc<App>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let received = Instant::now();
    let common: CommonFields = field_set(&body)?;
    let fields: ChatFields = field_set(&body)?;
    let index = app.model_index(common.model.as_deref())?;
    let model = &app.models[index];
    let plan = params::chat_plan(
        &common,
        &fields,
        &model.name,
        model.engine.tokenizer(),
        model.engine.info().into(),
    )?;
    respond(&app, index, plan, Api::Chat, received).await
}

async fn respond(
    app: &Arc<App>,
    index: usize,
    plan: Plan,
    api: Api,
    received: Instant,
) -> Result<Response, ApiError> {
    let model = &app.models[index];
    let fmt = Formatter::new(
        api,
        &model.name,
        model.engine.tokenizer().clone(),
        plan.request.logprobs.is_some(),
    );
    let runs = run::submit(app, index, &plan, received)?;
    let mut usage = UsageSum {
        prompt: plan.prompt_tokens(),
        ..Default::default()
    };
    if plan.stream {
        return Ok(stream_response(runs, fmt, &plan, usage));
    }
    // Dropping this future (the client went away) drops the runs, which
    // cancels their engine requests.
    let choices = run::collect(runs).await?;
    for (k, c) in choices.iter().enumerate() {
        usage.completion += c.usage.completion_tokens;
        // Choices of one prompt share it; count its cached part once.
        if k % plan.n == 0 {
            usage.cached += c.usage.cached_tokens;
        }
    }
    Ok(Json(fmt.response(&choices, usage)).into_response())
}

/// State of one SSE response.
struct Streaming {
    pieces: futures_util::stream::SelectAll<run::PieceStream>,
    fmt: Formatter,
    include_usage: bool,
    n: usize,
    /// Bytes of text sent so far per choice (completions' `text_offset`).
    offsets: Vec<usize>,
    usage: UsageSum,
    queue: VecDeque<Event>,
    ended: bool,
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl Streaming {
    /// Turns the next piece into events; false once every choice ended.
    async fn advance(&mut self) -> bool {
        match self.pieces.next().await {
            Some(Piece::Delta {
                index,
                text,
                tokens,
            }) => {
                let chunk = self.fmt.chunk(
                    index,
                    &text,
                    &tokens,
                    None,
                    &mut self.offsets[index],
                    self.include_usage,
                );
                self.queue.push_back(data(&chunk));
            }
            Some(Piece::Finish {
                index,
                text,
                tokens,
                reason,
                usage,
            }) => {
                self.usage.completion += usage.completion_tokens;
                if index % self.n == 0 {
                    self.usage.cached += usage.cached_tokens;
                }
                let chunk = self.fmt.chunk(
                    index,
                    &text,
                    &tokens,
                    Some(reason),
                    &mut self.offsets[index],
                    self.include_usage,
                );
                self.queue.push_back(data(&chunk));
            }
            Some(Piece::Error { index, message }) => {
                // The status line is long gone: report in the stream, as
                // OpenAI-compatible servers do.
                let e = ApiError::server(format!("choice {index} failed: {message}"));
                self.queue.push_back(data(&e.body()));
            }
            None => {
                if self.include_usage {
                    self.queue
                        .push_back(data(&self.fmt.usage_chunk(self.usage)));
                }
                self.queue.push_back(Event::default().data("[DONE]"));
                return false;
            }
        }
        true
    }
}

fn stream_response(
    runs: Vec<run::ChoiceRun>,
    fmt: Formatter,
    plan: &Plan,
    usage: UsageSum,
) -> Response {
    let mut queue = VecDeque::new();
    if fmt.api == Api::Chat {
        for index in 0..runs.len() {
            queue.push_back(data(&fmt.role_chunk(index, plan.include_usage)));
        }
    }
    let state = Streaming {
        offsets: vec![0; runs.len()],
        pieces: run::merge(runs),
        fmt,
        include_usage: plan.include_usage,
        n: plan.n,
        usage,
        queue,
        ended: false,
    };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.queue.pop_front() {
                return Some((Ok::<Event, Infallible>(event), st));
            }
            if st.ended {
                return None;
            }
            st.ended = !st.advance().await;
        }
    });
    // Comments every 15 s keep idle proxies from closing a long prefill.
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
