use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ImportArgs {
    /// The GGUF file to convert.
    gguf: PathBuf,
    /// The model folder to write.
    out_dir: PathBuf,
    /// Replace OUT_DIR if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    let summary = lmq_lite::gguf::import_gguf(&args.gguf, &args.out_dir, args.force)?;
    eprintln!(
        "imported {} ({} tensors, {:.1}M parameters, {} shard(s)) into {}",
        summary.architecture,
        summary.tensors,
        summary.parameters as f64 / 1e6,
        summary.shards,
        summary.out_dir.display()
    );
    Ok(())
}
