//! One module per subcommand.

pub mod eval;
pub mod generate;
pub mod import;
pub mod quantize;

use std::path::Path;

use anyhow::Result;
use lmq_turbomind::backend::cpu::CpuBackend;
use lmq_turbomind::model::Model;
use lmq_turbomind::tokenizer::Tokenizer;

/// Loads a model folder and its tokenizer on the CPU backend.
pub fn load_cpu(dir: &Path) -> Result<(Model<CpuBackend>, Tokenizer)> {
    if !dir.is_dir() {
        anyhow::bail!("model folder {} not found", dir.display());
    }
    let tokenizer = Tokenizer::from_dir(dir)?;
    let model = Model::load(dir, CpuBackend::new())?;
    Ok((model, tokenizer))
}
