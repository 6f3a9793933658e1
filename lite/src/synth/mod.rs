//! `lmq synth-model`: a random-weight checkpoint of any Llama-like shape,
//! like vLLM's dummy load format, so that a model of a real size (say
//! Llama-2-7B in AWQ) can be benchmarked without downloading it.
//!
//! The folder is what `lmq quantize` or `lmq import-gguf` would write:
//! `config.json` (LlamaForCausalLM, with the same `quantization_config` as
//! `lmq quantize` for 4-bit weights), safetensors shards from the shared
//! shard writer, and a byte-level BPE tokenizer of exactly `vocab_size`
//! tokens ([`vocab`]). The weight distribution is documented in
//! [`tensors`]; every tensor is drawn from the seed and its own name, so
//! the same arguments give byte-identical files.
//!
//! Memory stays at one tensor plus one pending shard: tensors are generated
//! one at a time and handed to the shard writer.

pub mod tensors;
pub mod vocab;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lmq_turbomind::config::ModelConfig;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::output::{ShardWriter, StagedDir, DEFAULT_SHARD_BYTES};
use crate::quantize::{
    awq_quantization_config, dir_size, layer_linears, resolve_group_size, GroupSize,
};
use crate::rng::named_substream;
use tensors::{
    awq_linear, dequantized_f16_bytes, f16_bytes, half_width_for_std, i32_bytes, uniform_f16_bytes,
};

/// The shape of a Llama-like decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// `None`: `hidden_size / num_heads`.
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

/// Shapes of well-known models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Llama2_7b,
    Llama3_8b,
    Smollm2_135m,
    /// Two small layers, for tests.
    Tiny,
}

impl Preset {
    /// The shape, from each model's published `config.json`.
    pub fn shape(self) -> SynthShape {
        let llama = |intermediate, kv_heads, vocab, context, theta| SynthShape {
            hidden_size: 4096,
            intermediate_size: intermediate,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: kv_heads,
            head_dim: None,
            vocab_size: vocab,
            max_position_embeddings: context,
            rope_theta: theta,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        };
        match self {
            Preset::Llama2_7b => llama(11008, 32, 32000, 4096, 10000.0),
            Preset::Llama3_8b => llama(14336, 8, 128256, 8192, 500000.0),
            Preset::Smollm2_135m => SynthShape {
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: None,
                vocab_size: 49152,
                max_position_embeddings: 8192,
                rope_theta: 100000.0,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: true,
            },
            Preset::Tiny => SynthShape {
                hidden_size: 128,
                intermediate_size: 256,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: None,
                vocab_size: 512,
                max_position_embeddings: 1024,
                rope_theta: 10000.0,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: false,
            },
        }
    }
}

/// How the decoder linears are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthWeights {
    /// 4-bit, AutoAWQ gemm layout.
    Awq,
    /// fp16: the dequantized 4-bit weights of the same seed.
    Fp16,
}

impl SynthWeights {
    pub fn as_str(self) -> &'static str {
        match self {
            SynthWeights::Awq => "awq",
            SynthWeights::Fp16 => "fp16",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub shape: SynthShape,
    pub weights: SynthWeights,
    /// The 4-bit group size; fp16 weights are drawn at it too, so that
    /// both formats of one seed hold the same function.
    pub group_size: GroupSize,
    pub seed: u64,
    pub overwrite: bool,
    pub quiet: bool,
}

/// What `synth_model` wrote, for the summary line.
#[derive(Debug)]
pub struct SynthSummary {
    pub out_dir: PathBuf,
    pub group_size: usize,
    pub parameters: u64,
    pub output_bytes: u64,
    pub shards: usize,
    pub elapsed: Duration,
}

/// Checks the shape with the flag names a user typed, before anything is
/// written (the engine's config parser checks the result again).
fn check_shape(s: &SynthShape) -> Result<()> {
    let invalid = |message: String| Err(Error::Invalid { message });
    for (flag, value) in [
        ("--hidden-size", s.hidden_size),
        ("--intermediate-size", s.intermediate_size),
        ("--num-layers", s.num_layers),
        ("--num-heads", s.num_heads),
        ("--num-kv-heads", s.num_kv_heads),
        ("--max-position-embeddings", s.max_position_embeddings),
    ] {
        if value == 0 {
            return invalid(format!("{flag} must be positive"));
        }
    }
    if s.head_dim.is_none() && !s.hidden_size.is_multiple_of(s.num_heads) {
        return invalid(format!(
            "--num-heads {} does not divide --hidden-size {}; pick a divisor, or give --head-dim",
            s.num_heads, s.hidden_size
        ));
    }
    if !s.num_heads.is_multiple_of(s.num_kv_heads) {
        return invalid(format!(
            "--num-kv-heads {} does not divide --num-heads {}",
            s.num_kv_heads, s.num_heads
        ));
    }
    let head_dim = s.head_dim.unwrap_or(s.hidden_size / s.num_heads);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return invalid(format!(
            "the head dimension is {head_dim}; rotary embeddings need a positive even one"
        ));
    }
    vocab::check_vocab_size(s.vocab_size)
}

/// `config.json` for the shape, before the 4-bit fields.
fn shape_json(s: &SynthShape) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim.unwrap_or(s.hidden_size / s.num_heads),
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.max_position_embeddings,
        "vocab_size": s.vocab_size,
        "tie_word_embeddings": s.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": vocab::BOS_ID,
        "eos_token_id": vocab::EOS_ID,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    })
}

/// Adds the 4-bit fields (as `lmq quantize` writes them) and where the
/// weights came from, so nobody mistakes the folder for a trained model.
fn add_weight_fields(config: &mut Value, cfg: &SynthConfig, group_size: usize) {
    config["lmq_synthetic"] = json!({
        "seed": cfg.seed,
        "weights": cfg.weights.as_str(),
        "group_size": group_size,
    });
    if cfg.weights == SynthWeights::Awq {
        config["quantization_config"] = awq_quantization_config(4, group_size).to_json();
    }
}

/// Writes a synthetic model folder at `out_dir`.
pub fn synth_model(out_dir: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    let t0 = Instant::now();
    check_shape(&cfg.shape)?;
    // The engine's parser validates the shape before the group size is
    // resolved on it, and the finished config once more.
    let config_path = out_dir.join("config.json");
    let mut config_value = shape_json(&cfg.shape);
    let shape = ModelConfig::from_json(&config_value, &config_path)?;
    let group_size = resolve_group_size(&shape, cfg.group_size)?;
    add_weight_fields(&mut config_value, cfg, group_size);
    let config = ModelConfig::from_json(&config_value, &config_path)?;
    let tokenizer = vocab::tokenizer_json_for(cfg.shape.vocab_size)?;

    let staged = StagedDir::new(out_dir, cfg.overwrite)?;
    staged.write_json("config.json", &config_value)?;
    staged.write_json(
        "generation_config.json",
        &json!({"bos_token_id": vocab::BOS_ID, "eos_token_id": vocab::EOS_ID}),
    )?;
    staged.write_json("tokenizer.json", &tokenizer)?;
    staged.write_json(
        "tokenizer_config.json",
        &vocab::tokenizer_config_json(cfg.shape.max_position_embeddings),
    )?;

    let mut out = TensorSink {
        writer: ShardWriter::new(&staged, DEFAULT_SHARD_BYTES),
        seed: cfg.seed,
        parameters: 0,
    };
    let names = &config.arch.names;
    let (vocab_size, hidden) = (config.vocab_size, config.hidden_size);
    let embed_half_width = half_width_for_std(1.0 / (hidden as f32).sqrt());
    out.uniform(
        names.embed_tokens,
        vec![vocab_size, hidden],
        0.0,
        embed_half_width,
    )?;
    let progress = progress_bar(cfg.quiet, config.num_layers);
    for layer in 0..config.num_layers {
        for norm in [names.input_norm, names.post_attention_norm] {
            out.norm(&names.layer(layer, norm), hidden)?;
        }
        for (module, out_features, in_features) in layer_linears(&config, layer) {
            out.linear(&module, out_features, in_features, group_size, cfg.weights)?;
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    out.norm(names.final_norm, hidden)?;
    if !config.tie_word_embeddings {
        out.uniform(
            names.lm_head,
            vec![vocab_size, hidden],
            0.0,
            embed_half_width,
        )?;
    }
    let parameters = out.parameters;
    let shards = out.writer.finish()?;
    let out_dir = staged.commit()?;
    Ok(SynthSummary {
        output_bytes: dir_size(&out_dir),
        out_dir,
        group_size,
        parameters,
        shards,
        elapsed: t0.elapsed(),
    })
}

fn progress_bar(quiet: bool, layers: usize) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(layers as u64);
    bar.set_style(
        ProgressStyle::with_template("synthesize [{bar:30}] layer {pos}/{len} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Draws tensors by name and hands them to the shard writer.
struct TensorSink<'a> {
    writer: ShardWriter<'a>,
    seed: u64,
    parameters: u64,
}

impl TensorSink<'_> {
    /// An fp16 tensor uniform around `center`, named `{module}.weight`.
    fn uniform(
        &mut self,
        module: &str,
        shape: Vec<usize>,
        center: f32,
        half_width: f32,
    ) -> Result<()> {
        let name = format!("{module}.weight");
        let len = shape.iter().product();
        let bytes = uniform_f16_bytes(len, center, half_width, named_substream(self.seed, &name));
        self.parameters += len as u64;
        self.writer
            .push(name, safetensors::Dtype::F16, shape, bytes)
    }

    fn norm(&mut self, module: &str, len: usize) -> Result<()> {
        self.uniform(module, vec![len], 1.0, 0.1)
    }

    /// A decoder linear: AWQ tensors, or their dequantized fp16 weight.
    fn linear(
        &mut self,
        module: &str,
        out_features: usize,
        in_features: usize,
        group_size: usize,
        weights: SynthWeights,
    ) -> Result<()> {
        // Both formats draw from the same stream, so that they agree.
        let seed = named_substream(self.seed, &format!("{module}.qweight"));
        let t = awq_linear(in_features, out_features, group_size, seed);
        t.validate(module, Path::new("synthetic"))?;
        self.parameters += (in_features * out_features) as u64;
        let (k, n, g) = (in_features, out_features, group_size);
        match weights {
            SynthWeights::Fp16 => self.writer.push(
                format!("{module}.weight"),
                safetensors::Dtype::F16,
                vec![n, k],
                dequantized_f16_bytes(&t),
            ),
            SynthWeights::Awq => {
                let i32_tensor = |suffix: &str, shape: Vec<usize>, values: &[i32]| {
                    (
                        format!("{module}.{suffix}"),
                        safetensors::Dtype::I32,
                        shape,
                        i32_bytes(values),
                    )
                };
                for (name, dtype, shape, bytes) in [
                    i32_tensor("qweight", vec![k, n / 8], &t.qweight),
                    i32_tensor("qzeros", vec![k / g, n / 8], &t.qzeros),
                    (
                        format!("{module}.scales"),
                        safetensors::Dtype::F16,
                        vec![k / g, n],
                        f16_bytes(&t.scales),
                    ),
                ] {
                    self.writer.push(name, dtype, shape, bytes)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(shape: SynthShape) -> SynthConfig {
        SynthConfig {
            shape,
            weights: SynthWeights::Awq,
            group_size: GroupSize::Auto,
            seed: 0,
            overwrite: false,
            quiet: true,
        }
    }

    #[test]
    fn presets_parse_as_engine_configs() {
        for preset in [
            Preset::Llama2_7b,
            Preset::Llama3_8b,
            Preset::Smollm2_135m,
            Preset::Tiny,
        ] {
            let cfg = config(preset.shape());
            check_shape(&cfg.shape).expect("valid preset");
            let mut value = shape_json(&cfg.shape);
            add_weight_fields(&mut value, &cfg, 64);
            let parsed = ModelConfig::from_json(&value, Path::new("config.json")).expect("parses");
            assert_eq!(parsed.hidden_size, cfg.shape.hidden_size);
            assert_eq!(parsed.quantization.map(|q| q.group_size), Some(64));
        }
    }

    #[test]
    fn bad_shapes_name_the_flag() {
        let mut s = Preset::Tiny.shape();
        s.num_heads = 3;
        let e = check_shape(&s)
            .expect_err("3 does not divide 128")
            .to_string();
        assert!(
            e.contains("--num-heads 3") && e.contains("--hidden-size 128"),
            "{e}"
        );
        s.head_dim = Some(32);
        s.num_kv_heads = 3;
        check_shape(&s).expect("--head-dim lifts the divisibility rule");
        s.num_kv_heads = 2;
        assert!(check_shape(&s)
            .expect_err("2 does not divide 3")
            .to_string()
            .contains("--num-kv-heads"));
        let mut s = Preset::Tiny.shape();
        s.num_layers = 0;
        assert!(check_shape(&s)
            .expect_err("zero")
            .to_string()
            .contains("--num-layers"));
        s.num_layers = 2;
        s.vocab_size = 100;
        assert!(check_shape(&s)
            .expect_err("tiny vocab")
            .to_string()
            .contains("--vocab-size 100"));
    }
}
