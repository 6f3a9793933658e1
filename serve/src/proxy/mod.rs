//! `lmq proxy`: one address in front of many `lmq serve` nodes, routing
//! each OpenAI request by its `model` field.
//!
//! - `config`: the `proxy.yaml` format (strategy, health interval, admin
//!   key, nodes).
//! - `nodes`: the registry of nodes and the routing strategies.
//! - `health`: the pooled HTTP client to the nodes, health checks and
//!   model discovery.
//! - `routes`: forwarding with failover and streaming passthrough,
//!   `/v1/models`, `/health`, `/metrics` and the admin `/nodes/*`.
//! - `server`: bind, readiness, graceful shutdown.
//!
//! Invariants:
//! - The proxy never touches an engine: it speaks HTTP to its nodes only.
//! - A response body is relayed chunk by chunk, never buffered; the
//!   client's connection owns the node connection, so a client that goes
//!   away cancels its request on the node.
//! - A request is retried on another replica only when its node failed
//!   before answering, i.e. before any byte reached the client.
//! - `/nodes/*` need the admin key; without one configured they are off.

pub mod config;
mod health;
mod metrics;
mod nodes;
mod routes;
mod server;

pub use config::{NodeEntry, ProxyConfig, Strategy};
pub use server::{run_proxy, ProxyOptions};
