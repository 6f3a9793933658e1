//! `lmq proxy`: one address in front of many `lmq serve` nodes, routing
//! each request by its `model` (the `lmq_serve::proxy` module).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use lmq_serve::proxy::{run_proxy, ProxyConfig, ProxyOptions};

use super::parse_bytes;

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// The proxy YAML: strategy, health_check_interval_s, admin_key,
    /// nodes (each a url, with optional models and weight).
    #[arg(long)]
    pub config: PathBuf,
    /// The address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the ready line prints it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Larger request bodies get 413 (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub max_request_bytes: u64,
    /// Seconds responses in flight may run after SIGTERM before they are
    /// dropped.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

pub fn run(args: ProxyArgs) -> Result<()> {
    if !(args.shutdown_timeout >= 0.0 && args.shutdown_timeout.is_finite()) {
        bail!(
            "--shutdown-timeout must be a number of seconds >= 0; got {}",
            args.shutdown_timeout
        );
    }
    let config = ProxyConfig::from_path(&args.config)?;
    let options = ProxyOptions {
        host: args.host.clone(),
        port: args.port,
        max_request_bytes: args.max_request_bytes,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
    };
    run_proxy(config, options, |address, nodes| {
        // Tests and scripts wait for this line: print it only once the
        // listener is bound and every node has been checked once.
        println!("lmq proxy: listening on http://{address} (nodes: {nodes})");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
