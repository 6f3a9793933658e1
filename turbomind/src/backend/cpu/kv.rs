//! The CPU's KV block pool: one allocation holding every block, each block
//! every layer's K and V for `block_len` positions, in fp32, fp16, int8 or
//! int4 (online, static or smooth parameters).
//!
//! Layout. A block is `[layer][K, V][kv_head][token][head_dim]`, so that
//! attention reads one head's tokens of a block contiguously. Integer codes
//! keep the same order (int4: two per byte, low nibble first); online
//! parameters sit in two parallel arrays, an fp16 scale and the stored zero
//! per token and head ([`OnlineParams`]: a one-byte zero-point for int8,
//! an fp16 zero for int4). Static mode stores no
//! parameters: they come from the checkpoint.
//!
//! The allocation is zero-initialised, which the OS maps lazily, so an
//! unused pool costs address space rather than memory.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::shape_error;
use crate::backend::{KvPoolSpec, SeqSpan};
use crate::error::{Error, Result};
use crate::quant::kv::{hadamard, quantize_value, KvDtype, KvMode, OnlineParams, StoredZero};

#[derive(Clone)]
enum Store {
    F32(Vec<f32>),
    /// fp16 bit patterns (a `u16` vector gets a zeroed allocation).
    F16(Vec<u16>),
    Quant {
        codes: Vec<u8>,
        /// fp16 bits of the scale per token-head; empty in static mode.
        scales: Vec<u16>,
        /// The stored zero per token-head ([`OnlineParams`]): one byte (the
        /// int8 zero-point) or two (int4's fp16 zero, little-endian); empty
        /// in static mode.
        zeros: Vec<u8>,
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
        if let (KvMode::Smooth, Some(p)) = (config.mode, config.static_params.as_ref()) {
            let kv_dim = shape.num_kv_heads * shape.head_dim;
            let layers = 0..shape.num_layers;
            let fits = |t: &Vec<Vec<f32>>, optional: bool| {
                layers.clone().all(|l| {
                    t.get(l)
                        .is_some_and(|v| v.len() == kv_dim || (optional && v.is_empty()))
                        || (optional && t.get(l).is_none())
                })
            };
            if !fits(&p.k_smooth, false) || !fits(&p.k_shift, true) {
                return Err(Error::InvalidRequest(
                    "the checkpoint's k_smooth/k_shift tensors do not match the model's layers and KV width".into(),
                ));
            }
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
                scales: if config.mode == KvMode::Static {
                    Vec::new()
                } else {
                    vec![0; token_heads]
                },
                zeros: if config.mode == KvMode::Static {
                    Vec::new()
                } else {
                    vec![0; token_heads * OnlineParams::zero_bytes(config.dtype)]
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

    /// The key offsets of a layer (`[kv_dim]`) that smooth mode subtracts
    /// before dividing, where the checkpoint has them.
    pub fn key_shift(&self, layer: usize) -> Option<&[f32]> {
        self.smoothing(layer)?;
        let p = self.spec.config.static_params.as_ref()?;
        p.k_shift
            .get(layer)
            .filter(|s| !s.is_empty())
            .map(Vec::as_slice)
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
        let shift = self.key_shift(layer).map(<[f32]>::to_vec);
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
                        if let Some(mu) = &shift {
                            row_buf.iter_mut().zip(mu).for_each(|(x, &m)| *x -= m);
                        }
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
            Store::Quant {
                codes,
                scales,
                zeros,
            } => {
                let (scale, zero) = match statics {
                    Some(p) => p,
                    None => {
                        let p = OnlineParams::of(x, self.spec.config.dtype);
                        scales[th] = p.scale.to_bits();
                        match p.zero {
                            StoredZero::Point(zp) => zeros[th] = zp,
                            StoredZero::Value(z) => {
                                zeros[2 * th..2 * th + 2].copy_from_slice(&z.to_le_bytes())
                            }
                        }
                        p.scale_zero()
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
            Store::Quant {
                codes,
                scales,
                zeros,
            } => {
                let statics = self.static_param(layer, which, head);
                let int4 = self.spec.config.dtype == KvDtype::Int4;
                for (t, dst) in out.chunks_exact_mut(hd).enumerate() {
                    let th = first + t;
                    let (scale, zero) = statics.unwrap_or_else(|| {
                        OnlineParams {
                            scale: f16::from_bits(scales[th]),
                            zero: if int4 {
                                StoredZero::Value(f16::from_le_bytes([
                                    zeros[2 * th],
                                    zeros[2 * th + 1],
                                ]))
                            } else {
                                StoredZero::Point(zeros[th])
                            },
                        }
                        .scale_zero()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::AttnShape;
    use crate::quant::kv::KvCacheConfig;

    /// Online int8/int4 rows written into the pool come back within half a
    /// quantization step of each token-head's own range, for ranges that
    /// straddle zero and ranges far from it on either side; and the pool
    /// allocates exactly the bytes that the engine budgets per block.
    #[test]
    fn online_rows_round_trip_within_half_a_step() {
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 64,
            num_layers: 2,
        };
        let (hd, kv_dim, block_len) = (64, 128, 8);
        for dtype in [KvDtype::Int8, KvDtype::Int4] {
            let config = KvCacheConfig {
                dtype,
                mode: KvMode::Online,
                static_params: None,
            };
            let spec = KvPoolSpec {
                shape,
                config: config.clone(),
                num_blocks: 4,
                block_len,
            };
            let mut pool = CpuKvPool::new(&spec).expect("pool");
            let Store::Quant {
                codes,
                scales,
                zeros,
            } = &pool.store
            else {
                panic!("an integer pool stores codes");
            };
            let stored = codes.len() + 2 * scales.len() + zeros.len();
            let budget = 4 * KvPoolSpec::bytes_per_block(&shape, &config, block_len);
            assert_eq!(stored, budget);

            // Row r, head h: a range chosen per (r, h) among four kinds.
            let rows = 11;
            let ranges = [
                (-3.0f32, 2.0f32),
                (10.0, 10.5),
                (-40.0, -39.0),
                (-0.01, 0.02),
            ];
            let mut k = vec![0f32; rows * kv_dim];
            for (i, x) in k.iter_mut().enumerate() {
                let (r, h, d) = (i / kv_dim, i % kv_dim / hd, i % hd);
                let (lo, hi) = ranges[(r + h) % ranges.len()];
                *x = lo + (hi - lo) * (((d * 29 + r * 7) % 64) as f32 / 63.0);
            }
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            let span = SeqSpan {
                rows: 0..rows,
                start_pos: 3,
                blocks: vec![2, 0, 3],
            };
            pool.write(1, &k, &v, &span).expect("write");
            let levels = dtype.levels().expect("integer dtype");
            for (which, src) in [&k, &v].into_iter().enumerate() {
                for h in 0..2 {
                    for r in 0..rows {
                        let pos = 3 + r;
                        let mut out = vec![0f32; block_len * hd];
                        let block = span.blocks[pos / block_len] as usize;
                        pool.load(1, which, block, h, block_len, &mut out);
                        let got = &out[(pos % block_len) * hd..][..hd];
                        let want = &src[r * kv_dim + h * hd..][..hd];
                        let (lo, hi) = want
                            .iter()
                            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                        // The step never exceeds the asymmetric one by more
                        // than what reaching a far-from-zero range needs.
                        let step = ((hi - lo) / levels)
                            .max(lo.abs().max(hi.abs()) / 120.0)
                            .max(6.2e-5);
                        for (g, w) in got.iter().zip(want) {
                            assert!(
                                (g - w).abs() <= 0.5 * step + 1e-6,
                                "{dtype:?} which {which} head {h} row {r}: {w} read back as {g}"
                            );
                        }
                    }
                }
            }
        }
    }
}
