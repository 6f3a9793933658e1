//! KV-cache quantization: dtypes, modes, the calibrated parameters a
//! checkpoint carries, and the per-head quantization math.
//!
//! - **online** (TurboMind's scheme): each token's K (and V) of each KV head
//!   is quantized asymmetrically with its own scale and zero, stored beside
//!   it: `q = round((x - zero) / scale)`, `zero = min`, `scale = (max - min)
//!   / levels`.
//! - **static**: one calibrated (scale, zero) per layer, per KV head, for K
//!   and for V, read from the checkpoint.
//!
//! Checkpoint format: `config.json` gets `"kv_cache_quant": {"dtype":
//! "int8"|"int4", "mode": "online"|"static"}` (the defaults the engine
//! uses), and each layer gets F32 `[num_kv_heads]` tensors
//! `model.layers.{i}.self_attn.kv_quant.{k_scale,k_zero,v_scale,v_zero}`,
//! computed from post-RoPE K and V on the calibration set.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// How the KV cache stores each value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    Int8,
    Int4,
}

impl KvDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "fp32" | "f32" => KvDtype::F32,
            "fp16" | "f16" => KvDtype::F16,
            "int8" => KvDtype::Int8,
            "int4" => KvDtype::Int4,
            other => {
                return Err(Error::InvalidRequest(format!(
                    "KV cache dtype {other:?} is not supported (fp32, fp16, int8, int4)"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "fp32",
            KvDtype::F16 => "fp16",
            KvDtype::Int8 => "int8",
            KvDtype::Int4 => "int4",
        }
    }

    /// The largest integer level, for quantized dtypes.
    pub fn levels(self) -> Option<f32> {
        match self {
            KvDtype::Int8 => Some(255.0),
            KvDtype::Int4 => Some(15.0),
            _ => None,
        }
    }

    /// Bytes per stored value, counting int4 as a half.
    pub fn bytes_per_value(self) -> f32 {
        match self {
            KvDtype::F32 => 4.0,
            KvDtype::F16 => 2.0,
            KvDtype::Int8 => 1.0,
            KvDtype::Int4 => 0.5,
        }
    }
}

/// Where quantization parameters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMode {
    Online,
    Static,
}

impl KvMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "online" => Ok(KvMode::Online),
            "static" => Ok(KvMode::Static),
            other => Err(Error::InvalidRequest(format!(
                "KV cache mode {other:?} is not supported (online, static)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvMode::Online => "online",
            KvMode::Static => "static",
        }
    }
}

/// Calibrated (scale, zero) per layer and KV head, for K and V.
#[derive(Debug, Clone, PartialEq)]
pub struct KvStaticParams {
    /// `[layer][head]`.
    pub k_scale: Vec<Vec<f32>>,
    pub k_zero: Vec<Vec<f32>>,
    pub v_scale: Vec<Vec<f32>>,
    pub v_zero: Vec<Vec<f32>>,
    /// The integer range the scales were written for (255 for int8, 15
    /// for int4); running at another dtype rescales them so the
    /// calibrated range [zero, zero + scale·levels] is kept.
    pub levels: f32,
}

/// The names of the four per-layer parameter tensors.
pub const PARAM_NAMES: [&str; 4] = ["k_scale", "k_zero", "v_scale", "v_zero"];

/// `model.layers.{i}.self_attn.kv_quant.{param}`, from the layer prefix.
pub fn param_tensor_name(layer_prefix: &str, param: &str) -> String {
    format!("{layer_prefix}self_attn.kv_quant.{param}")
}

/// The KV cache a model runs with.
#[derive(Debug, Clone)]
pub struct KvCacheConfig {
    pub dtype: KvDtype,
    pub mode: KvMode,
    pub static_params: Option<Arc<KvStaticParams>>,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        KvCacheConfig {
            dtype: KvDtype::F16,
            mode: KvMode::Online,
            static_params: None,
        }
    }
}

/// The `kv_cache_quant` entry of `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCheckpointDefaults {
    pub dtype: KvDtype,
    pub mode: KvMode,
}

impl KvCheckpointDefaults {
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| Error::config(path, format!("kv_cache_quant.{k} is missing")))
        };
        let wrap = |e: Error| Error::config(path, e.to_string());
        Ok(KvCheckpointDefaults {
            dtype: KvDtype::parse(field("dtype")?).map_err(wrap)?,
            mode: KvMode::parse(field("mode")?).map_err(wrap)?,
        })
    }

    pub fn to_json(self) -> Value {
        json!({"dtype": self.dtype.as_str(), "mode": self.mode.as_str()})
    }
}

/// Online parameters of one head vector: (scale, zero) with zero = min.
pub fn online_params(x: &[f32], levels: f32) -> (f32, f32) {
    let (min, max) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let scale = ((max - min) / levels).max(1e-8);
    (scale, min)
}

/// The integer level of one value.
#[inline]
pub fn quantize_value(x: f32, scale: f32, zero: f32, levels: f32) -> u8 {
    ((x - zero) / scale).round().clamp(0.0, levels) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_round_trip_error_is_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 20.0) / 7.0)
            .collect();
        for levels in [255.0, 15.0] {
            let (scale, zero) = online_params(&x, levels);
            for &v in &x {
                let q = quantize_value(v, scale, zero, levels);
                let back = q as f32 * scale + zero;
                assert!((back - v).abs() <= scale * 0.5 + 1e-6);
            }
        }
    }
}
