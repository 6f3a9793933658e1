use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use lmq_lite::calib::CalibConfig;
use lmq_lite::quantize::{quantize, GroupSize, Method, QuantizeConfig};
use lmq_turbomind::quant::kv::KvDtype;

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
    /// Calibration text or JSONL (field "text"); default: calib_data/calib.txt.
    #[arg(long)]
    calib_data: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    #[arg(long, default_value_t = 512)]
    calib_seqlen: usize,
    /// Calibration sequences that score AWQ's scale candidates.
    #[arg(long, default_value_t = 8)]
    search_samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Default KV-cache dtype to record, with calibrated static parameters:
    /// none, int8 or int4.
    #[arg(long, default_value = "none")]
    kv: String,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub(super) fn parse_group_size(s: &str) -> Result<GroupSize> {
    match s {
        "auto" => Ok(GroupSize::Auto),
        n => match n.parse::<usize>() {
            Ok(g @ (32 | 64 | 128)) => Ok(GroupSize::Fixed(g)),
            _ => bail!("--group-size must be auto, 32, 64 or 128; got {n:?}"),
        },
    }
}

/// `calib_data/calib.txt` next to the binary's source tree, or in the
/// current directory.
fn default_calib_data() -> PathBuf {
    let local = PathBuf::from("calib_data/calib.txt");
    if local.exists() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("calib_data/calib.txt")
}

/// Peak resident memory of this process, from /proc (Linux).
pub(super) fn peak_rss_mib() -> Option<f64> {
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
        calib_data: args.calib_data.unwrap_or_else(default_calib_data),
        calib: CalibConfig {
            samples: args.calib_samples,
            seqlen: args.calib_seqlen,
            seed: args.seed,
        },
        search_samples: args.search_samples,
        kv: match args.kv.as_str() {
            "none" => None,
            "int8" => Some(KvDtype::Int8),
            "int4" => Some(KvDtype::Int4),
            other => bail!("--kv must be none, int8 or int4; got {other:?}"),
        },
        overwrite: args.force,
        quiet: args.quiet,
    };
    let s = quantize(&args.model, &args.out, &config)?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if !s.mean_alpha.is_empty() {
        let parts: Vec<String> = s
            .mean_alpha
            .iter()
            .map(|(n, a)| format!("{n} {a:.2}"))
            .collect();
        eprintln!("mean AWQ alpha per group: {}", parts.join(", "));
    }
    if let Some(r) = s.kv_smooth_error_ratio {
        eprintln!(
            "int4 smooth KV: searched key factors leave {:.0}% of the fixed factors' attention error on the calibration subset",
            100.0 * r
        );
    }
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
