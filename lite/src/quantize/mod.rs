//! `lmq quantize`: a model folder becomes a 4-bit AutoAWQ-gemm checkpoint.
//!
//! Layer by layer: one decoder layer's weights are read from the
//! memory-mapped input, quantized and handed to the shard writer before the
//! next layer is read, so memory holds about one layer plus one output
//! shard. Everything is written into a staged folder that is renamed into
//! place only when complete.

pub mod groupwise;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lmq_turbomind::checkpoint::Checkpoint;
use lmq_turbomind::config::ModelConfig;
use lmq_turbomind::quant::awq::{AwqConfig, GROUP_SIZES};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::output::{ShardWriter, StagedDir};
use groupwise::GroupSpec;

/// Shards are cut at about this many bytes.
const SHARD_BYTES: usize = 2 << 30;

/// How the integer weights are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Activation-aware scale and clip search.
    Awq,
    /// Plain round-to-nearest, the baseline.
    Rtn,
}

/// Requested group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// 128 if every quantized layer allows it, else 64, else 32.
    Auto,
    Fixed(usize),
}

#[derive(Debug, Clone)]
pub struct QuantizeConfig {
    pub method: Method,
    pub w_bits: u32,
    pub group_size: GroupSize,
    pub symmetric: bool,
    pub overwrite: bool,
    pub quiet: bool,
}

/// What `quantize` did, for the summary line.
#[derive(Debug)]
pub struct QuantizeSummary {
    pub out_dir: PathBuf,
    pub group_size: usize,
    pub elapsed: Duration,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub quantized_linears: usize,
}

/// The linears of a decoder layer that are quantized, as (module, out, in).
fn layer_linears(c: &ModelConfig, layer: usize) -> Vec<(String, usize, usize)> {
    let n = &c.arch.names;
    let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    [
        (n.q_proj, q, h),
        (n.k_proj, kv, h),
        (n.v_proj, kv, h),
        (n.o_proj, h, q),
        (n.gate_proj, f, h),
        (n.up_proj, f, h),
        (n.down_proj, h, f),
    ]
    .into_iter()
    .map(|(m, out, inp)| (n.layer(layer, m), out, inp))
    .collect()
}

/// Picks the group size, or explains which layer forbids the requested one.
pub fn resolve_group_size(c: &ModelConfig, requested: GroupSize) -> Result<usize> {
    let linears = layer_linears(c, 0);
    let fits = |g: usize| {
        linears
            .iter()
            .all(|(_, out, inp)| inp % g == 0 && out % 8 == 0)
    };
    match requested {
        GroupSize::Auto => GROUP_SIZES
            .iter()
            .rev()
            .copied()
            .find(|&g| fits(g))
            .ok_or_else(|| Error::Invalid {
                message: format!(
                    "no group size in {GROUP_SIZES:?} divides every layer's in_features ({})",
                    describe_in_features(&linears)
                ),
            }),
        GroupSize::Fixed(g) => {
            if let Some((name, _, inp)) = linears.iter().find(|(_, _, inp)| inp % g != 0) {
                let working: Vec<usize> =
                    GROUP_SIZES.iter().copied().filter(|&s| fits(s)).collect();
                return Err(Error::Invalid {
                    message: format!(
                        "--group-size {g} does not divide in_features {inp} of {name}; group sizes that work for this model: {working:?}"
                    ),
                });
            }
            Ok(g)
        }
    }
}

fn describe_in_features(linears: &[(String, usize, usize)]) -> String {
    let mut sizes: Vec<usize> = linears.iter().map(|l| l.2).collect();
    sizes.sort();
    sizes.dedup();
    format!("{sizes:?}")
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Files copied unchanged from the input folder when present.
const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Quantizes `model_dir` into `out_dir`.
pub fn quantize(model_dir: &Path, out_dir: &Path, cfg: &QuantizeConfig) -> Result<QuantizeSummary> {
    let t0 = Instant::now();
    if cfg.w_bits != 4 {
        return Err(Error::Invalid {
            message: format!(
                "--w-bits {}: only 4-bit weights are supported (the AutoAWQ gemm layout)",
                cfg.w_bits
            ),
        });
    }
    if cfg.method == Method::Awq {
        return Err(Error::Invalid {
            message: "--method awq is not implemented yet in this build; use --method rtn".into(),
        });
    }
    let config = ModelConfig::from_dir(model_dir)?;
    if config.quantization.is_some() {
        return Err(Error::Invalid {
            message: format!(
                "{} is already quantized (config.json has quantization_config); quantize the original fp16/bf16 model",
                model_dir.display()
            ),
        });
    }
    let group_size = resolve_group_size(&config, cfg.group_size)?;
    let spec = GroupSpec {
        bits: cfg.w_bits,
        group_size,
        symmetric: cfg.symmetric,
    };
    let checkpoint = Checkpoint::open(model_dir)?;

    let staged = StagedDir::new(out_dir, cfg.overwrite)?;
    let mut writer = ShardWriter::new(&staged, SHARD_BYTES);
    let progress = if cfg.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(config.num_layers as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] layer {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    };

    let mut quantized = std::collections::HashSet::new();
    let mut quantized_linears = 0;
    for layer in 0..config.num_layers {
        progress.set_message("quantize");
        for (module, out, inp) in layer_linears(&config, layer) {
            let name = format!("{module}.weight");
            let w = checkpoint.f32(&name, &[out, inp])?;
            if let Some(bad) = w.iter().position(|x| !x.is_finite()) {
                return Err(Error::Invalid {
                    message: format!("{name} holds a non-finite value at index {bad}"),
                });
            }
            let t = spec.quantize(&w, out, inp);
            let i32_bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            writer.push(
                format!("{module}.qweight"),
                safetensors::Dtype::I32,
                vec![inp, out / 8],
                i32_bytes(&t.qweight),
            )?;
            writer.push(
                format!("{module}.qzeros"),
                safetensors::Dtype::I32,
                vec![inp / group_size, out / 8],
                i32_bytes(&t.qzeros),
            )?;
            writer.push(
                format!("{module}.scales"),
                safetensors::Dtype::F16,
                vec![inp / group_size, out],
                t.scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )?;
            quantized.insert(name);
            quantized_linears += 1;
        }
        progress.inc(1);
    }
    progress.finish_and_clear();

    // Everything else (embeddings, norms, biases, lm_head) stays fp16.
    let mut rest: Vec<String> = checkpoint
        .names()
        .filter(|n| !quantized.contains(*n))
        .map(String::from)
        .collect();
    rest.sort();
    for name in rest {
        let meta = checkpoint.meta(&name).ok_or_else(|| Error::Invalid {
            message: format!("tensor {name} vanished from the checkpoint"),
        })?;
        let values = checkpoint.f32(&name, &meta.shape)?;
        writer.push_f16(name, meta.shape, &values)?;
    }
    writer.finish()?;

    let config_path = model_dir.join("config.json");
    let mut config_json: Value = lmq_turbomind::error::read_json(&config_path)?;
    let awq = AwqConfig {
        bits: cfg.w_bits,
        group_size,
        zero_point: true,
        modules_to_not_convert: Vec::new(),
    };
    config_json["quantization_config"] = awq.to_json();
    config_json["torch_dtype"] = Value::String("float16".into());
    staged.write_json("config.json", &config_json)?;
    for file in COPIED_FILES {
        let src = model_dir.join(file);
        if src.exists() {
            std::fs::copy(&src, staged.path(file)).map_err(|e| Error::io(&src, e))?;
        }
    }
    let out = staged.commit()?;
    Ok(QuantizeSummary {
        output_bytes: dir_size(&out),
        input_bytes: dir_size(model_dir),
        out_dir: out,
        group_size,
        elapsed: t0.elapsed(),
        quantized_linears,
    })
}
