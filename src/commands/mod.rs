//! One module per subcommand.

pub mod eval;
pub mod generate;
pub mod import;
pub mod quantize;

use std::path::Path;

use anyhow::Result;
use lmq_turbomind::backend::cpu::CpuBackend;
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
}

/// Loads a model folder and its tokenizer on the CPU backend.
pub fn load_cpu(dir: &Path, engine: &EngineArgs) -> Result<(Model<CpuBackend>, Tokenizer)> {
    if !dir.is_dir() {
        anyhow::bail!("model folder {} not found", dir.display());
    }
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut model = Model::load(dir, CpuBackend::new())?;
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
