//! One module per subcommand.

pub mod bench;
pub mod eval;
pub mod generate;
pub mod import;
pub mod proxy;
pub mod quantize;
pub mod serve;
pub mod synth;

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use lmq_turbomind::backend::cpu::{CpuBackend, CpuOptions, W4Activations};
use lmq_turbomind::backend::cuda::CudaBackend;
use lmq_turbomind::backend::Backend;
use lmq_turbomind::engine::{spawn_engine, EngineConfig, EngineHandle, KvCacheSize};
use lmq_turbomind::model::Model;
use lmq_turbomind::quant::kv::{KvDtype, KvMode};
use lmq_turbomind::tokenizer::Tokenizer;

/// Engine options shared by the commands that run a model.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// KV cache dtype: fp32, fp16, int8 or int4 (default: the checkpoint's
    /// `kv_cache_quant`, else fp16).
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// Where int8/int4 KV parameters come from: online (per token and head)
    /// or static (the checkpoint's calibrated ones).
    #[arg(long)]
    pub kv_cache_mode: Option<String>,
    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` for GPU N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// CPU: output projection weights, `fp16` (as stored), `int8` (per-32
    /// groups: half the bytes read per decode token) or `auto` (int8 for
    /// 4-bit checkpoints, fp16 otherwise).
    #[arg(long, default_value = "auto")]
    pub lm_head_dtype: String,
    /// CPU: activations of 4-bit linears, `int8` (integer dot products),
    /// `fp32` (exact; slower) or `fp16` (every linear's input rounded to
    /// fp16 as the CUDA backend does, for CPU-vs-GPU comparisons).
    #[arg(long, default_value = "int8")]
    pub w4_activations: String,
}

/// The device a command runs its model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> std::result::Result<Device, String> {
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {other:?} (cpu, cuda, cuda:N)")),
    }
}

/// Work that needs a loaded model on whichever backend `--device` chose:
/// the command writes its body once, generic over the backend.
pub trait WithModel {
    type Output;
    fn run<B: Backend + 'static>(
        self,
        model: Model<B>,
        tokenizer: Tokenizer,
    ) -> Result<Self::Output>;
}

/// Loads the model on the device the engine options name and hands it to `task`.
pub fn with_model<T: WithModel>(dir: &Path, engine: &EngineArgs, task: T) -> Result<T::Output> {
    match engine.device {
        Device::Cpu => {
            let (model, tokenizer) = load_on_cpu(dir, engine)?;
            task.run(model, tokenizer)
        }
        Device::Cuda(ordinal) => {
            let backend = CudaBackend::new(ordinal)?;
            let (model, tokenizer) = load(dir, engine, backend)?;
            task.run(model, tokenizer)
        }
    }
}

/// Loads a model on the CPU with the CPU options of `engine`.
fn load_on_cpu(dir: &Path, engine: &EngineArgs) -> Result<(Model<CpuBackend>, Tokenizer)> {
    let backend = CpuBackend::with_options(CpuOptions {
        w4_activations: W4Activations::parse(&engine.w4_activations)?,
    });
    let (mut model, tokenizer) = load(dir, engine, backend)?;
    // 4-bit checkpoints already trade exactness for speed, and there the
    // fp16 output projection is as many bytes per token as every layer
    // together; dense checkpoints keep exact fp16 logits by default.
    let head = match engine.lm_head_dtype.as_str() {
        "int8" => Some(model.backend().int8_linear(model.output_projection())?),
        "fp16" => None,
        // A width the 8-bit layout cannot hold keeps fp16.
        "auto" if model.config.quantization.is_some() => {
            model.backend().int8_linear(model.output_projection()).ok()
        }
        "auto" => None,
        other => anyhow::bail!("unknown --lm-head-dtype {other:?} (auto, fp16, int8)"),
    };
    if let Some(head) = head {
        model.set_output_projection(head);
    }
    Ok((model, tokenizer))
}

/// Batching-engine options (for `serve` and `bench`).
#[derive(clap::Args, Debug, Clone)]
pub struct BatchArgs {
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: usize,
    /// Prompt tokens computed per step, across sequences (chunked prefill).
    #[arg(long, default_value_t = 2048)]
    pub max_prefill_tokens: usize,
    /// Positions per KV-cache block.
    #[arg(long, default_value_t = 64)]
    pub cache_block_seq_len: usize,
    /// KV-cache size as a fraction of the memory free after loading.
    #[arg(long, default_value_t = 0.5, conflicts_with = "kv_cache_bytes")]
    pub cache_max_entry_count: f64,
    /// KV-cache size in bytes (suffixes K, M, G, KiB, MiB, GiB accepted).
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_bytes: Option<u64>,
    /// Reuse the KV blocks of identical prompt prefixes.
    #[arg(long)]
    pub enable_prefix_caching: bool,
    /// Requests held at once (running and waiting); more are refused.
    #[arg(long, default_value_t = 1024)]
    pub max_queued_requests: usize,
}

impl BatchArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch_size: self.max_batch_size,
            max_prefill_tokens: self.max_prefill_tokens,
            block_len: self.cache_block_seq_len,
            kv_cache: match self.kv_cache_bytes {
                Some(b) => KvCacheSize::Bytes(b),
                None => KvCacheSize::FractionOfFree(self.cache_max_entry_count),
            },
            prefix_caching: self.enable_prefix_caching,
            max_queued_requests: self.max_queued_requests,
        }
    }
}

/// Parses `1073741824`, `512M`, `1.5GiB`, … into bytes.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size in bytes (e.g. 512M, 2GiB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("{text:?} must be a positive size"));
    }
    Ok((value * scale) as u64)
}

struct StartEngine<'a>(&'a BatchArgs);

impl WithModel for StartEngine<'_> {
    type Output = EngineHandle;
    fn run<B: Backend + 'static>(
        self,
        model: Model<B>,
        tokenizer: Tokenizer,
    ) -> Result<EngineHandle> {
        Ok(spawn_engine(
            model,
            Arc::new(tokenizer),
            &self.0.engine_config(),
        )?)
    }
}

/// Loads a model on the chosen device and starts a batching engine for it.
pub fn start_engine(dir: &Path, engine: &EngineArgs, batch: &BatchArgs) -> Result<EngineHandle> {
    with_model(dir, engine, StartEngine(batch))
}

/// Loads a model folder and its tokenizer onto `backend`.
pub fn load<B: Backend>(
    dir: &Path,
    engine: &EngineArgs,
    backend: B,
) -> Result<(Model<B>, Tokenizer)> {
    if !dir.is_dir() {
        anyhow::bail!("model folder {} not found", dir.display());
    }
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut model = Model::load(dir, backend)?;
    if engine.kv_cache_dtype.is_some() || engine.kv_cache_mode.is_some() {
        let current = model.kv_cache_config().clone();
        let dtype = match &engine.kv_cache_dtype {
            Some(d) => KvDtype::parse(d)?,
            None => current.dtype,
        };
        let mode = match &engine.kv_cache_mode {
            Some(m) => KvMode::parse(m)?,
            None => current.mode,
        };
        model.set_kv_cache(dtype, mode)?;
    }
    Ok((model, tokenizer))
}
