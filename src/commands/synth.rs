use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use lmq_lite::synth::{synth_model, Preset, SynthConfig, SynthWeights};

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    #[value(name = "llama2-7b")]
    Llama2_7b,
    #[value(name = "llama3-8b")]
    Llama3_8b,
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// Two layers of width 128, for tests.
    Tiny,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsArg {
    /// 4-bit decoder linears in the AutoAWQ gemm layout.
    Awq,
    /// fp16 decoder linears: the dequantized 4-bit weights of the same seed.
    Fp16,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder (Hugging Face layout).
    #[arg(long)]
    out: PathBuf,
    /// The shape to start from; the shape flags below override its fields.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: PresetArg,
    #[arg(long)]
    hidden_size: Option<usize>,
    #[arg(long)]
    intermediate_size: Option<usize>,
    #[arg(long)]
    num_layers: Option<usize>,
    #[arg(long)]
    num_heads: Option<usize>,
    #[arg(long)]
    num_kv_heads: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Default: hidden size / heads.
    #[arg(long)]
    head_dim: Option<usize>,
    #[arg(long)]
    max_position_embeddings: Option<usize>,
    #[arg(long, value_enum, default_value = "awq")]
    weights: WeightsArg,
    /// auto, 32, 64 or 128 (also used for fp16 weights, which are the
    /// dequantized 4-bit ones).
    #[arg(long, default_value = "auto")]
    group_size: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let preset = match args.preset {
        PresetArg::Llama2_7b => Preset::Llama2_7b,
        PresetArg::Llama3_8b => Preset::Llama3_8b,
        PresetArg::Smollm2_135m => Preset::Smollm2_135m,
        PresetArg::Tiny => Preset::Tiny,
    };
    let mut shape = preset.shape();
    for (field, flag) in [
        (&mut shape.hidden_size, args.hidden_size),
        (&mut shape.intermediate_size, args.intermediate_size),
        (&mut shape.num_layers, args.num_layers),
        (&mut shape.num_heads, args.num_heads),
        (&mut shape.num_kv_heads, args.num_kv_heads),
        (&mut shape.vocab_size, args.vocab_size),
        (
            &mut shape.max_position_embeddings,
            args.max_position_embeddings,
        ),
    ] {
        if let Some(value) = flag {
            *field = value;
        }
    }
    shape.head_dim = args.head_dim.or(shape.head_dim);
    let config = SynthConfig {
        shape,
        weights: match args.weights {
            WeightsArg::Awq => SynthWeights::Awq,
            WeightsArg::Fp16 => SynthWeights::Fp16,
        },
        group_size: super::quantize::parse_group_size(&args.group_size)?,
        seed: args.seed,
        overwrite: args.force,
        quiet: args.quiet,
    };
    let s = synth_model(&args.out, &config)?;
    eprintln!(
        "synthesized {:.1}M parameters ({} weights, group size {}, seed {}) in {:.1}s; peak RSS {}; {:.1} MiB in {} shard(s); wrote {}",
        s.parameters as f64 / 1e6,
        config.weights.as_str(),
        s.group_size,
        config.seed,
        s.elapsed.as_secs_f64(),
        super::quantize::peak_rss_mib()
            .map(|m| format!("{m:.0} MiB"))
            .unwrap_or_else(|| "n/a".into()),
        s.output_bytes as f64 / (1 << 20) as f64,
        s.shards,
        s.out_dir.display()
    );
    Ok(())
}
