//! `lmq serve`: starts one engine per model and serves them over an
//! OpenAI-compatible HTTP API (the `lmq_serve` crate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lmq_serve::config::{default_served_name, ByteSize, ModelEntry, ModelsFile};
use lmq_serve::{ProxyRegistration, ServedModel, ServerOptions};

use super::{parse_bytes, start_engine, BatchArgs, EngineArgs};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The model folder to serve.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// The name clients put in `model` (default: the folder's name).
    #[arg(long, requires = "model")]
    pub served_model_name: Option<String>,
    /// A YAML file listing several models to serve, each with its own
    /// engine and options; flags give the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the ready line prints it).
    #[arg(long, default_value_t = 23333)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Larger request bodies get 413 (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub max_request_bytes: u64,
    /// Seconds in-flight requests may run after SIGTERM before they are
    /// cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Register with this `lmq proxy` (http://host:port) once ready, and
    /// deregister on shutdown. Failures are logged and retried a few
    /// times; the server keeps serving either way.
    #[arg(long)]
    pub proxy_url: Option<String>,
    /// The proxy's `admin_key` (default: $LMQ_PROXY_ADMIN_KEY, which keeps
    /// it out of the process list).
    #[arg(long, requires = "proxy_url")]
    pub proxy_admin_key: Option<String>,
    /// The URL the proxy should use to reach this server (default:
    /// http://HOST:PORT as bound; required with --host 0.0.0.0).
    #[arg(long, requires = "proxy_url")]
    pub advertise_url: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !(args.shutdown_timeout >= 0.0 && args.shutdown_timeout.is_finite()) {
        bail!(
            "--shutdown-timeout must be a number of seconds >= 0; got {}",
            args.shutdown_timeout
        );
    }
    // Checked before any model loads, so a typo fails in a second.
    let proxy = args
        .proxy_url
        .as_deref()
        .map(|url| {
            let key = args
                .proxy_admin_key
                .clone()
                .or_else(|| std::env::var("LMQ_PROXY_ADMIN_KEY").ok());
            ProxyRegistration::new(url, key, args.advertise_url.as_deref(), &args.host)
        })
        .transpose()?;
    let entries = match (&args.model, &args.config) {
        (Some(dir), _) => vec![(
            args.served_model_name
                .clone()
                .unwrap_or_else(|| default_served_name(dir)),
            dir.clone(),
            args.engine.clone(),
            args.batch.clone(),
        )],
        (None, Some(path)) => ModelsFile::from_path(path)?
            .models
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                with_overrides(entry, &args.engine, &args.batch)
                    .with_context(|| format!("{}: models[{i}]", path.display()))
            })
            .collect::<Result<_>>()?,
        (None, None) => bail!("give --model DIR or --config models.yaml"),
    };
    let mut models = Vec::with_capacity(entries.len());
    for (name, dir, engine, batch) in entries {
        let handle = start_engine(&dir, &engine, &batch)
            .with_context(|| format!("cannot start model `{name}` from {}", dir.display()))?;
        models.push(ServedModel {
            name,
            engine: handle,
        });
    }
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let options = ServerOptions {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        max_request_bytes: args.max_request_bytes,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
        proxy,
    };
    lmq_serve::run(models, options, |address| {
        // Tests and scripts wait for this line: print it only now that the
        // listener is bound and every model is loaded.
        println!(
            "lmq serve: listening on http://{address} (models: {})",
            names.join(", ")
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}

/// A models-file entry over the command-line defaults.
fn with_overrides(
    entry: &ModelEntry,
    engine: &EngineArgs,
    batch: &BatchArgs,
) -> Result<(String, PathBuf, EngineArgs, BatchArgs)> {
    let name = entry
        .name
        .clone()
        .unwrap_or_else(|| default_served_name(&entry.model));
    let mut engine = engine.clone();
    let mut batch = batch.clone();
    if let Some(v) = &entry.kv_cache_dtype {
        engine.kv_cache_dtype = Some(v.clone());
    }
    if let Some(v) = &entry.kv_cache_mode {
        engine.kv_cache_mode = Some(v.clone());
    }
    if let Some(v) = entry.max_batch_size {
        batch.max_batch_size = v;
    }
    if let Some(v) = entry.max_prefill_tokens {
        batch.max_prefill_tokens = v;
    }
    if let Some(v) = entry.cache_block_seq_len {
        batch.cache_block_seq_len = v;
    }
    if let Some(v) = entry.cache_max_entry_count {
        batch.cache_max_entry_count = v;
        // A fraction in the file overrides a size given by flag.
        batch.kv_cache_bytes = None;
    }
    match &entry.kv_cache_bytes {
        Some(ByteSize::Bytes(b)) => batch.kv_cache_bytes = Some(*b),
        Some(ByteSize::Text(t)) => {
            batch.kv_cache_bytes =
                Some(parse_bytes(t).map_err(|e| anyhow::anyhow!("kv_cache_bytes: {e}"))?)
        }
        None => {}
    }
    if let Some(v) = entry.enable_prefix_caching {
        batch.enable_prefix_caching = v;
    }
    if let Some(v) = entry.max_queued_requests {
        batch.max_queued_requests = v;
    }
    Ok((name, entry.model.clone(), engine, batch))
}
