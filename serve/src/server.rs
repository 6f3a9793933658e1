//! Starting and stopping the server: bind, announce readiness, register
//! with a proxy (`--proxy-url`), serve until SIGTERM or Ctrl-C, then
//! deregister and drain in-flight requests within the shutdown timeout.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{App, ServedModel};
use crate::error::ServeError;
use crate::register::{ProxyRegistration, Registrar};

/// How the server listens and guards itself.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    /// 0 picks a free port; the ready callback gets the real one.
    pub port: u16,
    /// When set, `/v1/*` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Larger request bodies get 413.
    pub max_request_bytes: u64,
    /// After SIGTERM, how long in-flight requests may run before they are
    /// cancelled.
    pub shutdown_timeout: Duration,
    /// `--proxy-url`: register with this proxy once ready, deregister on
    /// shutdown.
    pub proxy: Option<ProxyRegistration>,
}

fn validate(models: &[ServedModel], options: &ServerOptions) -> Result<(), ServeError> {
    if models.is_empty() {
        return Err(ServeError::InvalidOption("no model to serve".into()));
    }
    let mut seen = HashSet::new();
    for m in models {
        if m.name.trim().is_empty() {
            return Err(ServeError::InvalidOption(
                "a served model name is empty".into(),
            ));
        }
        if !seen.insert(m.name.as_str()) {
            return Err(ServeError::InvalidOption(format!(
                "two models are served as `{}`; give them different names",
                m.name
            )));
        }
    }
    if options.api_key.as_deref().is_some_and(str::is_empty) {
        return Err(ServeError::InvalidOption(
            "--api-key must not be empty".into(),
        ));
    }
    if options.max_request_bytes == 0 {
        return Err(ServeError::InvalidOption(
            "--max-request-bytes must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Serves `models` until SIGTERM or Ctrl-C. `ready` is called once the
/// listener is bound (the engines are already running), with the bound
/// address. Returns after a clean shutdown.
pub fn run(
    models: Vec<ServedModel>,
    options: ServerOptions,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    validate(&models, &options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lmq-serve")
        .build()?;
    let result = runtime.block_on(serve(models, options, ready));
    // Connections still open after the timeout are dropped here, which
    // cancels their engine requests.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(
    models: Vec<ServedModel>,
    options: ServerOptions,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let listener = TcpListener::bind((options.host.as_str(), options.port))
        .await
        .map_err(|source| ServeError::Bind {
            address: format!("{}:{}", options.host, options.port),
            source,
        })?;
    let address = listener.local_addr()?;
    let app = Arc::new(App::new(
        models,
        options.api_key.clone(),
        options.max_request_bytes,
    ));
    let router = crate::routes::router(app.clone());

    let watched = app.clone();
    let (graceful, deadline) = shutdown_futures("serve", options.shutdown_timeout, move || {
        watched.models.iter().map(|m| m.engine.outstanding()).sum()
    });

    ready(address);
    // Registration starts only now: the listener is bound and every model
    // is loaded, so the proxy's first health check of this node passes.
    let registrar = options.proxy.as_ref().map(|p| {
        let names = app.names().iter().map(|n| n.to_string()).collect();
        Arc::new(Registrar::new(p, address, names))
    });
    let registering = registrar.clone().map(|r| {
        tokio::spawn(async move {
            r.register().await;
        })
    });
    let graceful = async move {
        graceful.await;
        // Leave the proxy before refusing connections, so it stops sending
        // new requests here while this server still accepts them.
        if let Some(task) = registering {
            task.abort();
        }
        if let Some(r) = registrar {
            r.deregister().await;
        }
    };
    let server = axum::serve(no_delay(listener), router).with_graceful_shutdown(graceful);
    tokio::select! {
        result = server => result?,
        _ = deadline => {
            let left: usize = app.models.iter().map(|m| m.engine.outstanding()).sum();
            eprintln!("lmq serve: shutdown timeout reached; cancelling {left} request(s)");
        }
    }
    Ok(())
}

/// The listener with `TCP_NODELAY` on every accepted connection: a stream
/// writes one small chunk per token, and Nagle's algorithm would hold a
/// chunk back until the previous one is acknowledged.
pub(crate) fn no_delay(listener: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    listener.tap_io(|tcp| {
        // A socket that refuses the option still works, only slower.
        let _ = tcp.set_nodelay(true);
    })
}

/// The two futures of a graceful shutdown: `graceful` resolves on SIGTERM
/// or Ctrl-C (stop accepting, let requests in flight finish), `deadline`
/// `timeout` later (give up on them). `in_flight` counts requests for the
/// log line.
pub(crate) fn shutdown_futures(
    command: &'static str,
    timeout: std::time::Duration,
    in_flight: impl Fn() -> usize + Send + 'static,
) -> (
    impl std::future::Future<Output = ()>,
    impl std::future::Future<Output = ()>,
) {
    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!(
            "lmq {command}: shutting down; waiting up to {:.1} s for {} request(s) in flight",
            timeout.as_secs_f64(),
            in_flight()
        );
        let _ = stop.send(true);
        // Keep the sender alive: its drop would read as a second signal.
        std::future::pending::<()>().await;
    });
    let mut on_stop = stopping.clone();
    let graceful = async move {
        let _ = on_stop.wait_for(|&s| s).await;
    };
    let mut on_deadline = stopping;
    let deadline = async move {
        let _ = on_deadline.wait_for(|&s| s).await;
        tokio::time::sleep(timeout).await;
    };
    (graceful, deadline)
}

/// Resolves on SIGTERM or Ctrl-C. A signal that cannot be watched is
/// ignored rather than treated as received.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
