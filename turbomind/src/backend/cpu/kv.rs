//! The CPU's KV block pool: one allocation holding every block, each block
//! every layer's K and V for `block_len` positions, in fp32, fp16, int8 or
//! int4 (online, static or smooth parameters).
//!
//! Layout. A block is `[layer][K, V][kv_head][token][head_dim]`, so that
//! attention reads one head's tokens of a block contiguously. Integer codes
//! keep the same order (int4: two per byte, low nibble first); online
//! parameters sit in a parallel array, one fp16 (scale, zero) pair per
//! token and head, as TurboMind stores them. Static mode stores no
//! parameters: they come from the checkpoint.
//!
//! The allocation is zero-initialised, which the OS maps lazily, so an
//! unused pool costs address space rather than memory.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::shape_error;
use crate::backend::{KvPoolSpec, SeqSpan};
use crate::error::{Error, Result};
use crate::quant::kv::{hadamard, online_params_f16, quantize_value, KvDtype, KvMode};

#[derive(Clone)]
enum Store {
    F32(Vec<f32>),
    /// fp16 bit patterns (a `u16` vector gets a zeroed allocation).
    F16(Vec<u16>),
    Quant {
        codes: Vec<u8>,
        /// fp16 bits of (scale, zero) per token-head; empty in static mode.
        params: Vec<u16>,
    },
}

/// The KV block pool of the CPU backend.
#[derive(Clone)]
pub struct CpuKvPool {
    spec: KvPoolSpec,
    store: Store,
    /// Stored values (or code bytes) per token-head.
    per_token: usize,
    /// fp16 bits to f32, the fastest way this CPU has.
    widen: fn(&[u16], &mut [f32]),
}

impl CpuKvPool {
    pub fn new(spec: &KvPoolSpec) -> Result<Self> {
        let shape = &spec.shape;
        let config = &spec.config;
        if spec.block_len == 0 || spec.num_blocks == 0 {
            return Err(Error::InvalidRequest(format!(
                "a KV pool needs at least one block of at least one position (got {} blocks of {})",
                spec.num_blocks, spec.block_len
            )));
        }
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
        let token_heads =
            spec.num_blocks * shape.num_layers * 2 * shape.num_kv_heads * spec.block_len;
        let per_token = match config.dtype {
            KvDtype::Int4 => shape.head_dim / 2,
            _ => shape.head_dim,
        };
        let too_big = || {
            Error::InvalidRequest(format!(
                "a KV pool of {} blocks does not fit in memory",
                spec.num_blocks
            ))
        };
        let values = token_heads.checked_mul(per_token).ok_or_else(too_big)?;
        let store = match config.dtype {
            KvDtype::F32 => Store::F32(vec![0.0; values]),
            KvDtype::F16 => Store::F16(vec![0; values]),
            KvDtype::Int8 | KvDtype::Int4 => Store::Quant {
                codes: vec![0; values],
                params: if config.mode == KvMode::Static {
                    Vec::new()
                } else {
                    vec![0; token_heads * 2]
                },
            },
        };
        Ok(CpuKvPool {
            spec: spec.clone(),
            store,
            per_token,
            widen: super::simd::best_widen_f16(),
        })
    }

    pub fn spec(&self) -> &KvPoolSpec {
        &self.spec
    }

    /// Index of one (block, layer, K/V, head) run of `block_len` tokens.
    fn segment(&self, block: usize, layer: usize, which: usize, head: usize) -> usize {
        let s = &self.spec.shape;
        ((block * s.num_layers + layer) * 2 + which) * s.num_kv_heads + head
    }

    /// The static (scale, zero) of one layer, tensor (0 = K) and head.
    fn static_param(&self, layer: usize, which: usize, head: usize) -> Option<(f32, f32)> {
        let config = &self.spec.config;
        if config.mode != KvMode::Static {
            return None;
        }
        let p = config.static_params.as_ref()?;
        let rescale = p.levels / config.dtype.levels()?;
        Some(if which == 0 {
            (p.k_scale[layer][head] * rescale, p.k_zero[layer][head])
        } else {
            (p.v_scale[layer][head] * rescale, p.v_zero[layer][head])
        })
    }

    /// The key smoothing divisors of a layer (`[kv_dim]`), in smooth mode of
    /// an integer dtype. Keys are stored divided by them and values
    /// Hadamard-rotated; attention undoes both on the query and the output.
    pub fn smoothing(&self, layer: usize) -> Option<&[f32]> {
        let config = &self.spec.config;
        if config.mode != KvMode::Smooth || config.dtype.levels().is_none() {
            return None;
        }
        config
            .static_params
            .as_ref()
            .map(|p| p.k_smooth[layer].as_slice())
    }

    /// Checks that a span's blocks cover its positions and exist.
    pub fn check_span(&self, span: &SeqSpan) -> Result<()> {
        let end = span.start_pos + span.len();
        let needed = end.div_ceil(self.spec.block_len);
        if span.blocks.len() < needed {
            return Err(shape_error(format!(
                "KV block table has {} blocks of {}, positions up to {end} need {needed}",
                span.blocks.len(),
                self.spec.block_len
            )));
        }
        if let Some(&b) = span.blocks[..needed]
            .iter()
            .find(|&&b| b as usize >= self.spec.num_blocks)
        {
            return Err(shape_error(format!(
                "KV block {b} is outside the pool of {}",
                self.spec.num_blocks
            )));
        }
        Ok(())
    }

    /// Writes K and V rows (`rows × kv_dim` each) of one sequence at its
    /// positions, for one layer.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], span: &SeqSpan) -> Result<()> {
        self.check_span(span)?;
        let shape = self.spec.shape;
        let (hd, heads) = (shape.head_dim, shape.num_kv_heads);
        let kv_dim = heads * hd;
        let smooth = self.smoothing(layer).map(<[f32]>::to_vec);
        let mut row_buf = vec![0f32; kv_dim];
        for (i, (k_row, v_row)) in k
            .chunks_exact(kv_dim)
            .zip(v.chunks_exact(kv_dim))
            .enumerate()
        {
            let pos = span.start_pos + i;
            let block = span.blocks[pos / self.spec.block_len] as usize;
            let token = pos % self.spec.block_len;
            for (which, src) in [k_row, v_row].into_iter().enumerate() {
                row_buf.copy_from_slice(src);
                if let Some(sm) = &smooth {
                    if which == 0 {
                        row_buf.iter_mut().zip(sm).for_each(|(x, &f)| *x /= f);
                    } else {
                        row_buf.chunks_exact_mut(hd).for_each(hadamard);
                    }
                }
                for h in 0..heads {
                    let seg = self.segment(block, layer, which, h);
                    let statics = self.static_param(layer, which, h);
                    self.write_token_head(seg, token, statics, &row_buf[h * hd..(h + 1) * hd]);
                }
            }
        }
        Ok(())
    }

    fn write_token_head(
        &mut self,
        seg: usize,
        token: usize,
        statics: Option<(f32, f32)>,
        x: &[f32],
    ) {
        let th = seg * self.spec.block_len + token;
        let at = th * self.per_token;
        let n = self.per_token;
        let levels = self.spec.config.dtype.levels().unwrap_or(255.0);
        match &mut self.store {
            Store::F32(buf) => buf[at..at + n].copy_from_slice(x),
            Store::F16(buf) => buf[at..at + n]
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(x),
            Store::Quant { codes, params } => {
                let (scale, zero) = match statics {
                    Some(p) => p,
                    None => {
                        let (s, z) = online_params_f16(x, levels);
                        params[th * 2] = s.to_bits();
                        params[th * 2 + 1] = z.to_bits();
                        (s.to_f32(), z.to_f32())
                    }
                };
                let dst = &mut codes[at..at + n];
                if levels > 15.0 {
                    for (d, &v) in dst.iter_mut().zip(x) {
                        *d = quantize_value(v, scale, zero, levels);
                    }
                } else {
                    for (d, pair) in dst.iter_mut().zip(x.chunks_exact(2)) {
                        let lo = quantize_value(pair[0], scale, zero, levels);
                        let hi = quantize_value(pair[1], scale, zero, levels);
                        *d = lo | (hi << 4);
                    }
                }
            }
        }
    }

    /// One block's head of K (`which` = 0) or V as stored, when the pool
    /// holds fp16: `block_len × head_dim` fp16 bit patterns, for attention
    /// to read in place.
    pub fn f16_segment(
        &self,
        layer: usize,
        which: usize,
        block: usize,
        head: usize,
    ) -> Option<&[u16]> {
        let Store::F16(buf) = &self.store else {
            return None;
        };
        let len = self.spec.block_len * self.per_token;
        let first = self.segment(block, layer, which, head) * len;
        buf.get(first..first + len)
    }

    /// Dequantizes the first `tokens` positions of one block's head into
    /// `out` (`tokens × head_dim`), as stored (smoothing not undone).
    pub fn load(
        &self,
        layer: usize,
        which: usize,
        block: usize,
        head: usize,
        tokens: usize,
        out: &mut [f32],
    ) {
        let hd = self.spec.shape.head_dim;
        let seg = self.segment(block, layer, which, head);
        let first = seg * self.spec.block_len;
        let n = self.per_token;
        let out = &mut out[..tokens * hd];
        match &self.store {
            Store::F32(buf) => out.copy_from_slice(&buf[first * n..(first + tokens) * n]),
            Store::F16(buf) => (self.widen)(&buf[first * n..(first + tokens) * n], out),
            Store::Quant { codes, params } => {
                let statics = self.static_param(layer, which, head);
                let int4 = self.spec.config.dtype == KvDtype::Int4;
                for (t, dst) in out.chunks_exact_mut(hd).enumerate() {
                    let th = first + t;
                    let (scale, zero) = statics.unwrap_or_else(|| {
                        (
                            f16::from_bits(params[th * 2]).to_f32(),
                            f16::from_bits(params[th * 2 + 1]).to_f32(),
                        )
                    });
                    let c = &codes[th * n..(th + 1) * n];
                    if int4 {
                        for (pair, &byte) in dst.chunks_exact_mut(2).zip(c) {
                            pair[0] = (byte & 0xf) as f32 * scale + zero;
                            pair[1] = (byte >> 4) as f32 * scale + zero;
                        }
                    } else {
                        for (d, &q) in dst.iter_mut().zip(c) {
                            *d = q as f32 * scale + zero;
                        }
                    }
                }
            }
        }
    }
}
