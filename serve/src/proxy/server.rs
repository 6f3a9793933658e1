//! Starting and stopping the proxy: check the nodes once, bind, announce
//! readiness, run health checks on the interval, serve until SIGTERM or
//! Ctrl-C, then let responses in flight finish within the shutdown
//! timeout.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

use super::config::ProxyConfig;
use super::health;
use super::nodes::{Node, Registry};
use super::routes::{router, ProxyApp};
use crate::error::ServeError;
use crate::server::{no_delay, shutdown_futures};

/// How the proxy listens.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub host: String,
    /// 0 picks a free port; the ready callback gets the real one.
    pub port: u16,
    /// Larger request bodies get 413.
    pub max_request_bytes: u64,
    /// After SIGTERM, how long responses in flight may run before they
    /// are dropped (which cancels them on their nodes).
    pub shutdown_timeout: Duration,
}

/// Runs the proxy until SIGTERM or Ctrl-C. `ready` gets the bound address
/// and the number of nodes once the listener is bound and every node has
/// been checked once.
pub fn run_proxy(
    config: ProxyConfig,
    options: ProxyOptions,
    ready: impl FnOnce(SocketAddr, usize),
) -> Result<(), ServeError> {
    if options.max_request_bytes == 0 {
        return Err(ServeError::InvalidOption(
            "--max-request-bytes must be at least 1".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lmq-proxy")
        .build()?;
    let result = runtime.block_on(serve(config, options, ready));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(
    config: ProxyConfig,
    options: ProxyOptions,
    ready: impl FnOnce(SocketAddr, usize),
) -> Result<(), ServeError> {
    let listener = TcpListener::bind((options.host.as_str(), options.port))
        .await
        .map_err(|source| ServeError::Bind {
            address: format!("{}:{}", options.host, options.port),
            source,
        })?;
    let address = listener.local_addr()?;
    let nodes: Vec<Arc<Node>> = config
        .nodes
        .iter()
        .map(|e| Arc::new(Node::new(e)))
        .collect();
    let count = nodes.len();
    let registry = Arc::new(Registry::new(nodes));
    let client = health::client();
    let interval = config.health_interval();
    let health_timeout = health::check_timeout(interval);
    // Route from the first request on: nodes are unhealthy until checked.
    health::check_all(&client, &registry, health_timeout).await;
    let checker = health::spawn_loop(client.clone(), registry.clone(), interval);
    let app = Arc::new(ProxyApp {
        registry: registry.clone(),
        client,
        strategy: config.strategy,
        admin_key: config.admin_key.clone(),
        max_request_bytes: options.max_request_bytes,
        health_timeout,
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        unroutable: AtomicU64::new(0),
        retries: AtomicU64::new(0),
    });

    let watched = registry.clone();
    let (graceful, deadline) = shutdown_futures("proxy", options.shutdown_timeout, move || {
        watched.all().iter().map(|n| n.outstanding()).sum()
    });

    ready(address, count);
    let server = axum::serve(no_delay(listener), router(app)).with_graceful_shutdown(graceful);
    let result = tokio::select! {
        result = server => result.map_err(ServeError::from),
        _ = deadline => {
            let left: usize = registry.all().iter().map(|n| n.outstanding()).sum();
            eprintln!("lmq proxy: shutdown timeout reached; dropping {left} request(s)");
            Ok(())
        }
    };
    checker.abort();
    result
}
