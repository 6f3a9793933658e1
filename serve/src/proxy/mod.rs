//! `lmq proxy`: one address in front of many `lmq serve` nodes, routing
//! each OpenAI request by its `model` field.
//!
//! - `config`: the `proxy.yaml` format (strategy, health interval, admin
//!   key, nodes).
//! - `nodes`: the registry of nodes and the routing strategies.
//! - `health`: the pooled HTTP client to the nodes, health checks and
//!   model discovery.
//! - `forward`: forwarding one request with failover and retries, and
//!   streaming passthrough.
//! - `routes`: the HTTP surface: the forwarded endpoints, `/v1/models`,
//!   `/health`, `/metrics` and the admin `/nodes/*`.
//! - `server`: bind, readiness, graceful shutdown.
//!
//! Invariants:
//! - The proxy never touches an engine: it speaks HTTP to its nodes only.
//! - A response body is relayed chunk by chunk, never buffered; the
//!   client's connection owns the node connection, so a client that goes
//!   away cancels its request on the node.
//! - A request is retried on another replica only before any byte reached
//!   the client: when its node failed before answering, or answered 429
//!   or 5xx. Each replica is tried once per request.
//! - `/nodes/*` need the admin key; without one configured they are off.

pub mod config;
mod forward;
mod health;
mod metrics;
mod nodes;
mod routes;
mod server;

pub use config::{NodeEntry, ProxyConfig, Strategy};
// `lmq serve --proxy-url` registers with the same pooled client.
pub(crate) use health::{client as http_client, describe, HttpClient};
pub use server::{run_proxy, ProxyOptions};
