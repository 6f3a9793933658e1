//! `lmq serve`: an OpenAI-compatible HTTP server over one or more engines.
//!
//! It owns the HTTP surface (`/v1/models`, `/v1/completions`,
//! `/v1/chat/completions`, `/health`, `/metrics`), the mapping between
//! OpenAI request fields and engine requests, OpenAI's error shape, the
//! API-key check, and the `--config models.yaml` format.
//!
//! Invariants:
//! - An engine is reached only through its [`EngineHandle`]
//!   (`lmq_turbomind::engine`): submit, read events, drop to cancel. This
//!   crate never imports `lite` and never touches a model.
//! - Every engine request is owned by the response (or handler future)
//!   that serves it, so a client that goes away cancels its requests and
//!   frees their KV blocks; nothing is spawned that outlives a connection.
//! - Every error a client sees is `{"error": {"message", "type", "param",
//!   "code"}}` with a meaningful status: bad input is a 400 that names the
//!   parameter, never a plain-text rejection or a panic.
//!
//! The [`proxy`] module (`lmq proxy`) shares only the error shape and
//! JSON reading with the server; it never touches an engine. A server
//! started with `--proxy-url` registers with a proxy through its admin
//! endpoints once it is ready, and deregisters on shutdown (`register`).
//!
//! [`EngineHandle`]: lmq_turbomind::engine::EngineHandle

mod app;
pub mod config;
mod error;
mod extract;
mod format;
mod metrics;
mod params;
pub mod proxy;
mod register;
mod routes;
mod run;
mod server;

pub use app::ServedModel;
pub use error::{ApiError, ServeError};
pub use register::ProxyRegistration;
pub use server::{run, ServerOptions};
