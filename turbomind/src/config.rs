//! `config.json` and `generation_config.json`: the model's shape and its
//! defaults, validated once so that the decoder can trust them.

use std::path::Path;

use serde_json::Value;

use crate::arch::{self, Architecture};
use crate::error::{read_json, Error, Result};
use crate::quant::awq::AwqConfig;
use crate::quant::kv::KvCheckpointDefaults;

/// Llama-3 style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// `rope_type: "linear"`: positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// `rope_type: "llama3"`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The validated shape of a decoder model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: &'static Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Bias on gate/up/down (`mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's `quantization_config`, validated.
    pub quantization: Option<AwqConfig>,
    /// The checkpoint's default KV-cache quantization (`kv_cache_quant`).
    pub kv_cache_quant: Option<KvCheckpointDefaults>,
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| {
            Error::config(
                path,
                format!("field {key:?} is missing or not a positive integer"),
            )
        })
}

/// Reads token ids given either as one integer or as a list.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses and validates `config.json` in a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        let mut config = Self::from_json(&v, &path)?;
        // generation_config.json may name more end-of-sequence tokens (chat
        // models often end turns with a different token than pretraining).
        for id in GenerationConfig::from_dir(dir)?.eos_token_ids {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
        Ok(config)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let classes: Vec<String> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(Value::as_str);
        let arch =
            arch::lookup(&classes, model_type).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                name: classes
                    .first()
                    .cloned()
                    .or(model_type.map(String::from))
                    .unwrap_or_else(|| "<none>".into()),
                supported: arch::supported_list(),
            })?;
        let hidden_size = usize_field(v, "hidden_size", path)?;
        let num_heads = usize_field(v, "num_attention_heads", path)?;
        let num_kv_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => usize_field(v, "num_key_value_heads", path)?,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                format!("num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"),
            ));
        }
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::config(
                        path,
                        format!("hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"),
                    ));
                }
                hidden_size / num_heads
            }
            Some(_) => usize_field(v, "head_dim", path)?,
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head_dim ({head_dim}) must be even for rotary embeddings"),
            ));
        }
        let rope_scaling = parse_rope_scaling(v.get("rope_scaling"), path)?;
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool);
        let mut max_position_embeddings = v
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize;
        // Sliding-window attention is not implemented; capping the context
        // at the window keeps every supported length exact.
        if let Some(window) = v.get("sliding_window").and_then(Value::as_u64) {
            let use_sliding = v
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if use_sliding && (window as usize) < max_position_embeddings {
                max_position_embeddings = window as usize;
            }
        }
        let f = |key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default);
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size", path)?,
            num_layers: usize_field(v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_field(v, "vocab_size", path)?,
            rms_norm_eps: f("rms_norm_eps", 1e-6) as f32,
            rope_theta: f("rope_theta", 10000.0),
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: attention_bias.unwrap_or(arch.default_qkv_bias),
            o_bias: arch.attention_bias_covers_o && attention_bias.unwrap_or(false),
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            quantization: match v.get("quantization_config") {
                Some(q) if !q.is_null() => Some(AwqConfig::from_json(q, path)?),
                _ => None,
            },
            kv_cache_quant: match v.get("kv_cache_quant") {
                Some(q) if !q.is_null() => Some(KvCheckpointDefaults::from_json(q, path)?),
                _ => None,
            },
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

fn parse_rope_scaling(v: Option<&Value>, path: &Path) -> Result<RopeScaling> {
    let Some(obj) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::config(path, format!("rope_scaling.{key} is missing")))
    };
    let positive = |key: &str| {
        num(key).and_then(|x| {
            if x > 0.0 && x.is_finite() {
                Ok(x)
            } else {
                Err(Error::config(
                    path,
                    format!("rope_scaling.{key} must be positive; got {x}"),
                ))
            }
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: positive("factor")?,
        }),
        "llama3" => {
            let (low, high) = (positive("low_freq_factor")?, positive("high_freq_factor")?);
            if low >= high {
                return Err(Error::config(
                    path,
                    format!("rope_scaling.low_freq_factor ({low}) must be below high_freq_factor ({high})"),
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: positive("original_max_position_embeddings")?,
            })
        }
        other => Err(Error::config(
            path,
            format!(
                "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
            ),
        )),
    }
}

/// Stop tokens from `generation_config.json`.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` if the folder has one.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let v = read_json(&path)?;
        Ok(GenerationConfig {
            eos_token_ids: token_ids(v.get("eos_token_id")),
        })
    }
}
