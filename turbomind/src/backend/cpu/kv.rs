//! The CPU's per-sequence KV store: every layer's K and V, appended token
//! by token, in fp32, fp16, int8 or int4 (online or static parameters).
//! Attention materializes a sequence's K and V for one layer as fp32 once
//! per call, so dequantization costs one pass over the cache.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::backend::AttnShape;
use crate::error::{Error, Result};
use crate::quant::kv::{hadamard, online_params, quantize_value, KvCacheConfig, KvDtype, KvMode};

#[derive(Clone)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Codes per token-head (int8: one per byte; int4: two per byte, low
    /// nibble first), and per token-head online (scale, zero).
    Quant {
        codes: Vec<u8>,
        params: Vec<(f32, f32)>,
    },
}

/// One sequence's KV cache.
#[derive(Clone)]
pub struct CpuKv {
    /// `[layer][0 = K, 1 = V]`.
    stores: Vec<[Store; 2]>,
    lens: Vec<usize>,
    heads: usize,
    head_dim: usize,
    config: KvCacheConfig,
}

impl CpuKv {
    pub fn new(shape: &AttnShape, config: &KvCacheConfig) -> Result<Self> {
        if config.mode.needs_calibration() && config.dtype.levels().is_some() {
            let p = config.static_params.as_ref().ok_or_else(|| {
                Error::InvalidRequest(
                    "static KV quantization needs calibrated parameters; this checkpoint has none (quantize with --kv)".into(),
                )
            })?;
            if p.k_scale.len() < shape.num_layers
                || p.k_scale.iter().any(|h| h.len() != shape.num_kv_heads)
            {
                return Err(Error::InvalidRequest(
                    "static KV parameters do not match the model's layers and KV heads".into(),
                ));
            }
        }
        if config.mode == KvMode::Smooth && !shape.head_dim.is_power_of_two() {
            return Err(Error::InvalidRequest(format!(
                "--kv-cache-mode smooth needs a power-of-two head_dim; this model has {}",
                shape.head_dim
            )));
        }
        if config.dtype == KvDtype::Int4 && !shape.head_dim.is_multiple_of(2) {
            return Err(Error::InvalidRequest(
                "int4 KV needs an even head_dim".into(),
            ));
        }
        let empty = || match config.dtype {
            KvDtype::F32 => Store::F32(Vec::new()),
            KvDtype::F16 => Store::F16(Vec::new()),
            KvDtype::Int8 | KvDtype::Int4 => Store::Quant {
                codes: Vec::new(),
                params: Vec::new(),
            },
        };
        Ok(CpuKv {
            stores: (0..shape.num_layers).map(|_| [empty(), empty()]).collect(),
            lens: vec![0; shape.num_layers],
            heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            config: config.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    fn codes_per_head(&self) -> usize {
        match self.config.dtype {
            KvDtype::Int4 => self.head_dim / 2,
            _ => self.head_dim,
        }
    }

    /// The static (scale, zero) of one layer, head and tensor (0 = K).
    fn static_param(&self, layer: usize, which: usize, head: usize) -> Option<(f32, f32)> {
        if self.config.mode != KvMode::Static {
            return None;
        }
        let p = self.config.static_params.as_ref()?;
        let rescale = p.levels / self.config.dtype.levels()?;
        Some(if which == 0 {
            (p.k_scale[layer][head] * rescale, p.k_zero[layer][head])
        } else {
            (p.v_scale[layer][head] * rescale, p.v_zero[layer][head])
        })
    }

    /// Keeps the first `len` positions of one layer.
    pub fn truncate(&mut self, layer: usize, len: usize) {
        let kv_dim = self.heads * self.head_dim;
        let per_head = self.codes_per_head();
        let heads = self.heads;
        for store in self.stores[layer].iter_mut() {
            match store {
                Store::F32(v) => v.truncate(len * kv_dim),
                Store::F16(v) => v.truncate(len * kv_dim),
                Store::Quant { codes, params } => {
                    codes.truncate(len * heads * per_head);
                    params.truncate(len * heads);
                }
            }
        }
        self.lens[layer] = self.lens[layer].min(len);
    }

    /// The key smoothing factors of a layer, in Smooth mode.
    fn smoothing(&self, layer: usize) -> Option<&[f32]> {
        if self.config.mode != KvMode::Smooth || self.config.dtype.levels().is_none() {
            return None;
        }
        self.config
            .static_params
            .as_ref()
            .map(|p| p.k_smooth[layer].as_slice())
    }

    /// Appends `rows` tokens of K and V (`rows × kv_dim` each) to a layer.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let kv_dim = self.heads * self.head_dim;
        let rows = k.len() / kv_dim;
        let levels = self.config.dtype.levels();
        let (hd, heads) = (self.head_dim, self.heads);
        // Smooth mode stores K / k_smooth and H·V; materialize undoes both.
        let transformed: Option<[Vec<f32>; 2]> = self.smoothing(layer).map(|sm| {
            let keys = k
                .chunks_exact(kv_dim)
                .flat_map(|row| row.iter().zip(sm).map(|(&x, &f)| x / f))
                .collect();
            let mut values = v.to_vec();
            values.chunks_exact_mut(hd).for_each(hadamard);
            [keys, values]
        });
        for which in 0..2 {
            let src = match &transformed {
                Some(t) => t[which].as_slice(),
                None if which == 0 => k,
                None => v,
            };
            let statics: Vec<Option<(f32, f32)>> = (0..heads)
                .map(|h| self.static_param(layer, which, h))
                .collect();
            match &mut self.stores[layer][which] {
                Store::F32(buf) => buf.extend_from_slice(src),
                Store::F16(buf) => {
                    let start = buf.len();
                    buf.resize(start + src.len(), f16::ZERO);
                    buf[start..].convert_from_f32_slice(src);
                }
                Store::Quant { codes, params } => {
                    let levels = levels.unwrap_or(255.0);
                    for head_vec in src.chunks_exact(hd) {
                        let h = (params.len()) % heads;
                        let (scale, zero) =
                            statics[h].unwrap_or_else(|| online_params(head_vec, levels));
                        params.push((scale, zero));
                        if levels > 15.0 {
                            codes.extend(
                                head_vec
                                    .iter()
                                    .map(|&x| quantize_value(x, scale, zero, levels)),
                            );
                        } else {
                            for pair in head_vec.chunks_exact(2) {
                                let lo = quantize_value(pair[0], scale, zero, levels);
                                let hi = quantize_value(pair[1], scale, zero, levels);
                                codes.push(lo | (hi << 4));
                            }
                        }
                    }
                }
            }
        }
        self.lens[layer] += rows;
    }

    /// K and V of the first `len` positions of a layer, as fp32
    /// `[pos][kv_head][head_dim]`.
    pub fn materialize(&self, layer: usize, len: usize) -> [Vec<f32>; 2] {
        let kv_dim = self.heads * self.head_dim;
        let per_head = self.codes_per_head();
        let hd = self.head_dim;
        let int4 = self.config.dtype == KvDtype::Int4;
        let read = |store: &Store| -> Vec<f32> {
            match store {
                Store::F32(v) => v[..len * kv_dim].to_vec(),
                Store::F16(v) => {
                    // The slice conversion uses F16C where the CPU has it.
                    let mut out = vec![0f32; len * kv_dim];
                    v[..len * kv_dim].convert_to_f32_slice(&mut out);
                    out
                }
                Store::Quant { codes, params } => {
                    let mut out = vec![0f32; len * kv_dim];
                    for (th, dst) in out.chunks_exact_mut(hd).enumerate() {
                        let (scale, zero) = params[th];
                        let c = &codes[th * per_head..(th + 1) * per_head];
                        if int4 {
                            for (j, &byte) in c.iter().enumerate() {
                                dst[2 * j] = (byte & 0xf) as f32 * scale + zero;
                                dst[2 * j + 1] = (byte >> 4) as f32 * scale + zero;
                            }
                        } else {
                            for (d, &q) in dst.iter_mut().zip(c) {
                                *d = q as f32 * scale + zero;
                            }
                        }
                    }
                    out
                }
            }
        };
        let mut keys = read(&self.stores[layer][0]);
        if let Some(sm) = self.smoothing(layer) {
            for row in keys.chunks_exact_mut(kv_dim) {
                row.iter_mut().zip(sm).for_each(|(x, &f)| *x *= f);
            }
        }
        let mut values = read(&self.stores[layer][1]);
        if self.smoothing(layer).is_some() {
            values.chunks_exact_mut(hd).for_each(hadamard);
        }
        [keys, values]
    }
}
