use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use lmq_lite::quantize::{quantize, GroupSize, Method, QuantizeConfig};

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Awq,
    Rtn,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Input model folder (fp16/bf16/fp32 Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// Output folder (AutoAWQ gemm layout).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "awq")]
    method: MethodArg,
    #[arg(long, default_value_t = 4)]
    w_bits: u32,
    /// auto, 32, 64 or 128.
    #[arg(long, default_value = "auto")]
    group_size: String,
    /// Symmetric quantization (zero fixed at 8).
    #[arg(long)]
    w_sym: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn parse_group_size(s: &str) -> Result<GroupSize> {
    match s {
        "auto" => Ok(GroupSize::Auto),
        n => match n.parse::<usize>() {
            Ok(g @ (32 | 64 | 128)) => Ok(GroupSize::Fixed(g)),
            _ => bail!("--group-size must be auto, 32, 64 or 128; got {n:?}"),
        },
    }
}

/// Peak resident memory of this process, from /proc (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let config = QuantizeConfig {
        method: match args.method {
            MethodArg::Awq => Method::Awq,
            MethodArg::Rtn => Method::Rtn,
        },
        w_bits: args.w_bits,
        group_size: parse_group_size(&args.group_size)?,
        symmetric: args.w_sym,
        overwrite: args.force,
        quiet: args.quiet,
    };
    let s = quantize(&args.model, &args.out, &config)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "quantized {} linears at group size {} in {:.1}s; peak RSS {}; {:.1} MiB -> {:.1} MiB ({:.2}x smaller); wrote {}",
        s.quantized_linears,
        s.group_size,
        s.elapsed.as_secs_f64(),
        peak_rss_mib().map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into()),
        mib(s.input_bytes),
        mib(s.output_bytes),
        s.input_bytes as f64 / s.output_bytes.max(1) as f64,
        s.out_dir.display()
    );
    Ok(())
}
