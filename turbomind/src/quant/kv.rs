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
//! plus F32 `[num_kv_heads · head_dim]` `k_smooth` (per key channel
//! divisors for the `smooth` mode) and, optionally, `k_shift` (per key
//! channel offsets subtracted before the division), all computed from post-RoPE K and V on
//! the calibration set. `lmq quantize` searches `k_smooth` per KV head as
//! `max|k|^α / max|q|^β` (the queries' maximum over the heads sharing the
//! KV head) for the least int4 attention error; checkpoints written before
//! the search hold `max|k|^0.75`. The engine reads the factors as they are.

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
    /// Online per token and head, after two outlier-flattening transforms
    /// that are undone on read: each key channel is divided by its
    /// calibrated `k_smooth` factor (queries are multiplied by it), and
    /// each value head vector is rotated by a normalized Walsh-Hadamard
    /// transform (head_dim a power of two).
    Smooth,
}

impl KvMode {
    /// Whether this mode needs the checkpoint's calibrated tensors.
    pub fn needs_calibration(self) -> bool {
        self != KvMode::Online
    }
}

impl KvMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "online" => Ok(KvMode::Online),
            "static" => Ok(KvMode::Static),
            "smooth" => Ok(KvMode::Smooth),
            other => Err(Error::InvalidRequest(format!(
                "KV cache mode {other:?} is not supported (online, static, smooth)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvMode::Online => "online",
            KvMode::Static => "static",
            KvMode::Smooth => "smooth",
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
    /// `[layer][kv_dim]`: per key channel divisors, for
    /// [`KvMode::Smooth`].
    pub k_smooth: Vec<Vec<f32>>,
    /// `[layer][kv_dim]`: per key channel offsets that [`KvMode::Smooth`]
    /// subtracts before dividing (`(k − shift) / k_smooth`); an empty
    /// layer (or one missing from an older checkpoint) subtracts nothing.
    /// Exact: a query's scores all move by the same `q·shift`, which the
    /// softmax cancels, so nothing is added back on read.
    pub k_shift: Vec<Vec<f32>>,
    /// The integer range the scales were written for (255 for int8, 15
    /// for int4); running at another dtype rescales them so the
    /// calibrated range [zero, zero + scale·levels] is kept.
    pub levels: f32,
}

/// The names of the four per-layer, per-head parameter tensors.
pub const PARAM_NAMES: [&str; 4] = ["k_scale", "k_zero", "v_scale", "v_zero"];

/// The per-layer `[kv_dim]` key smoothing divisor tensor.
pub const SMOOTH_NAME: &str = "k_smooth";

/// The optional per-layer `[kv_dim]` key offset tensor of the `smooth`
/// mode.
pub const SHIFT_NAME: &str = "k_shift";

/// The fixed `k_smooth = absmax^K_SMOOTH_EXPONENT` of checkpoints written
/// before the per-head search; the search still scores it, and falls back
/// to it where no candidate gives a finite error. Chosen by measurement on
/// SmolLM2-135M int4 KV (docs/QUALITY.md): 1.0 and 0.5 were worse.
pub const K_SMOOTH_EXPONENT: f32 = 0.75;

/// In-place normalized fast Walsh-Hadamard transform; orthogonal and its
/// own inverse. `x.len()` must be a power of two.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

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

/// Online parameters as a KV block stores them: an fp16 scale, plus
///
/// - **int8:** an integer zero-point `zp` in one byte (`0..=255`), so that a
///   code `q` reads back as `(q − zp)·scale`. Three bytes per token-head
///   instead of an fp16 (scale, zero) pair: with head_dim 64 that is what
///   lets int8 KV hold more than 1.9× the tokens of fp16 (128 / 67 bytes)
///   rather than 1.88× (128 / 68). The scale is the asymmetric one, `(max −
///   min) / 255`, whenever the range contains zero; a range that excludes
///   zero is stretched to reach it (`zp` = 0 or 255), which is never coarser
///   than symmetric int8. The scale is rounded up to fp16 and `zp =
///   round(−min / scale)` clamped, so the grid holds `[min, max]` to within
///   half a step at each end and every value quantizes within half a step.
/// - **int4:** an fp16 zero (the minimum), as TurboMind stores it. With 16
///   levels the half-step shift that an integer zero-point puts on the
///   range's ends costs measurable perplexity (docs/QUALITY.md), and int4
///   meets its memory ratio with the pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlineParams {
    pub scale: half::f16,
    pub zero: StoredZero,
}

/// The zero of [`OnlineParams`] as a block stores it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StoredZero {
    /// int8: the zero-point, `x = (q − zp)·scale`.
    Point(u8),
    /// int4: the zero itself, `x = q·scale + zero`.
    Value(half::f16),
}

impl OnlineParams {
    /// Bytes the stored zero takes per token-head.
    pub fn zero_bytes(dtype: KvDtype) -> usize {
        if dtype == KvDtype::Int8 {
            1
        } else {
            2
        }
    }

    pub fn of(x: &[f32], dtype: KvDtype) -> Self {
        let levels = dtype.levels().unwrap_or(255.0);
        let (step, min) = online_params(x, levels);
        let at_least = |v: f32| {
            let v = v.max(half::f16::MIN_POSITIVE.to_f32());
            let h = half::f16::from_f32(v);
            if h.to_f32() < v {
                half::f16::from_bits(h.to_bits() + 1)
            } else {
                h
            }
        };
        if dtype != KvDtype::Int8 {
            return OnlineParams {
                scale: half::f16::from_f32(step.max(half::f16::MIN_POSITIVE.to_f32())),
                zero: StoredZero::Value(half::f16::from_f32(min)),
            };
        }
        let max = min + step * levels;
        let ideal = (-min / step).round();
        let needed = if ideal > levels {
            // Entirely below zero: zp = 255 ends the grid at zero.
            step.max(-min / levels)
        } else if ideal < 0.0 {
            // Entirely above zero: zp = 0 starts the grid at zero.
            step.max(max / levels)
        } else {
            step
        };
        let scale = at_least(needed);
        let zp = (-min / scale.to_f32()).round().clamp(0.0, levels);
        OnlineParams {
            scale,
            zero: StoredZero::Point(zp as u8),
        }
    }

    /// (scale, zero) in the form the readers use: `x = q·scale + zero`.
    #[inline]
    pub fn scale_zero(self) -> (f32, f32) {
        let scale = self.scale.to_f32();
        match self.zero {
            StoredZero::Point(zp) => (scale, -(zp as f32) * scale),
            StoredZero::Value(z) => (scale, z.to_f32()),
        }
    }
}

/// Bytes one token of one KV head takes in a KV block, for K or for V: its
/// codes, plus an fp16 scale and the stored zero ([`OnlineParams`]) where
/// parameters are per token (online and smooth modes of the integer
/// dtypes).
pub fn bytes_per_token_head(head_dim: usize, config: &KvCacheConfig) -> usize {
    let codes = (head_dim as f32 * config.dtype.bytes_per_value()).ceil() as usize;
    let per_token_params = config.dtype.levels().is_some() && config.mode != KvMode::Static;
    codes
        + if per_token_params {
            2 + OnlineParams::zero_bytes(config.dtype)
        } else {
            0
        }
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
    fn hadamard_is_orthogonal_and_self_inverse() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0)
            .collect();
        let mut y = x.clone();
        hadamard(&mut y);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x));
        // H·e0 is the constant vector 1/sqrt(n).
        let mut e0 = vec![0f32; 8];
        e0[0] = 1.0;
        hadamard(&mut e0);
        assert!(e0.iter().all(|&v| (v - 1.0 / 8f32.sqrt()).abs() < 1e-6));
        hadamard(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// The stored form keeps the half-step bound on ranges that straddle
    /// zero, sit far from it on either side, or are a single value.
    #[test]
    fn stored_online_params_round_trip_within_half_a_step() {
        let shapes: [(f32, f32); 6] = [
            (-3.0, 2.0),
            (10.0, 10.5),
            (-40.0, -39.9),
            (0.0, 1e-3),
            (5.0, 5.0),
            (-1e4, 3e4),
        ];
        for (lo, hi) in shapes {
            let x: Vec<f32> = (0..64)
                .map(|i| lo + (hi - lo) * ((i * 37 % 64) as f32 / 63.0))
                .collect();
            for dtype in [KvDtype::Int8, KvDtype::Int4] {
                let levels = dtype.levels().expect("integer dtype");
                let p = OnlineParams::of(&x, dtype);
                let (scale, zero) = p.scale_zero();
                assert!(scale > 0.0);
                for &v in &x {
                    let q = quantize_value(v, scale, zero, levels);
                    let back = q as f32 * scale + zero;
                    assert!(
                        (back - v).abs() <= scale * 0.5 * (1.0 + 1e-3) + v.abs() * 1e-6,
                        "[{lo}, {hi}] in {dtype:?}: {v} came back as {back} (scale {scale})"
                    );
                }
                // Where the range contains zero, or for int4 always, the
                // step is the asymmetric one, up to fp16 rounding.
                if (lo <= 0.0 && hi >= 0.0) || dtype == KvDtype::Int4 {
                    let step = ((hi - lo) / levels).max(half::f16::MIN_POSITIVE.to_f32());
                    assert!(scale <= step * (1.0 + 2e-3), "[{lo}, {hi}] in {dtype:?}");
                }
            }
        }
    }

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
