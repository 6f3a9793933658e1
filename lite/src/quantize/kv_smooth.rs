//! The search for the `smooth` KV mode's per-channel key factors.
//!
//! In `smooth` mode the engine stores each key channel divided by a factor
//! `s_c` and multiplies the queries by the same factor, which leaves the
//! attention scores unchanged in exact arithmetic (`q·k = (q∘s)·(k/s)`)
//! while flattening the key outliers that a per-token int4 grid cannot
//! hold. Which factor is best depends on both sides of the product: a
//! channel's quantization error reaches the score multiplied by the query,
//! so a key channel that is large where the queries are small can be
//! divided down harder. The family searched is therefore SmoothQuant's,
//! `s_c = max|k_c|^α / max|q_c|^β`, over a small grid of (α, β).
//!
//! The loss is the error of the attention output itself: the calibration
//! subset's attention over an int4 `smooth` pool, run by the engine's own
//! CPU kernels (so the quantizer, the Walsh-Hadamard rotation of values and
//! the rounding are exactly the ones served), against the same attention
//! over an fp32 pool. A KV head's keys and values reach only the query
//! heads of its group, so the loss separates by KV head and each KV head
//! keeps its own (α, β).
//!
//! Each candidate is also tried with the keys shifted to their per-channel
//! midpoints first (`(k − mid) / s`, with `s` built from the half range).
//! The shift is exact: every score of a query moves by the same `q·mid`,
//! which the softmax cancels. It shrinks the per-token range where a
//! channel sits far from zero, which post-RoPE low-frequency channels do.

use std::sync::Arc;

use lmq_turbomind::backend::cpu::{CpuBackend, Matrix};
use lmq_turbomind::backend::{AttnShape, Backend, KvPoolSpec, SeqSpan};
use lmq_turbomind::quant::kv::{KvCacheConfig, KvDtype, KvMode, KvStaticParams, K_SMOOTH_EXPONENT};

use super::awq::CALIB_BLOCK_LEN;
use crate::error::Result;

/// The key exponents tried; 0 is no key smoothing.
pub const KEY_EXPONENTS: [f32; 7] = [0.0, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25];
/// The query exponents tried; 0 ignores the queries.
pub const QUERY_EXPONENTS: [f32; 4] = [0.0, 0.25, 0.5, 0.75];

/// Floor on the statistics, so a dead channel gets a finite factor.
const STAT_FLOOR: f32 = 1e-5;

/// One layer's post-RoPE queries, keys and values on the scoring subset,
/// with the per-channel statistics the factors are built from.
pub struct KvSearchInput<'a> {
    pub q: &'a Matrix,
    pub k: &'a Matrix,
    pub v: &'a Matrix,
    pub spans: &'a [SeqSpan],
    /// `[kv_dim]`: largest |k| per key channel over all calibration tokens.
    pub k_absmax: &'a [f32],
    /// `[kv_dim]`: (min, max) of each key channel over all calibration
    /// tokens.
    pub k_range: &'a [(f32, f32)],
    /// `[q_dim]`: largest |q| per query channel over all calibration tokens.
    pub q_absmax: &'a [f32],
}

/// The chosen factors and, per KV head, the exponents and the losses.
#[derive(Debug, Clone)]
pub struct KvSmoothChoice {
    /// `[kv_dim]`, the checkpoint's `k_smooth`.
    pub factors: Vec<f32>,
    /// `[kv_dim]`, the checkpoint's `k_shift` (zeros for unshifted heads).
    pub shift: Vec<f32>,
    /// Per KV head, the chosen (α, β).
    pub exponents: Vec<(f32, f32)>,
    /// Per KV head, whether its keys are shifted to their midpoints.
    pub shifted: Vec<bool>,
    /// Per KV head, the attention output's squared error with the chosen
    /// factors and with the fixed `max|k|^0.75` of earlier checkpoints.
    pub loss: Vec<f64>,
    pub loss_fixed: Vec<f64>,
}

/// `max|q|` over the query heads that share each KV head, per channel
/// (`[kv_dim]`): the factor of a key channel multiplies every query head of
/// its group.
fn group_query_absmax(q_absmax: &[f32], shape: &AttnShape) -> Vec<f32> {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let mut out = vec![0f32; shape.num_kv_heads * hd];
    for (h, seg) in q_absmax.chunks_exact(hd).enumerate() {
        let kv = h / group;
        for (o, &m) in out[kv * hd..(kv + 1) * hd].iter_mut().zip(seg) {
            *o = o.max(m);
        }
    }
    out
}

/// The factors of one (α, β) for every channel, each head's divided by
/// their geometric mean. A head-wide constant changes nothing (the
/// per-token grid scales with it), so this only keeps the stored keys and
/// the scaled queries near their original magnitude, away from fp16's
/// limits on the GPU.
fn factors(
    k_absmax: &[f32],
    q_group_absmax: &[f32],
    head_dim: usize,
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut out: Vec<f32> = k_absmax
        .iter()
        .zip(q_group_absmax)
        .map(|(&k, &q)| k.max(STAT_FLOOR).powf(alpha) / q.max(STAT_FLOOR).powf(beta))
        .collect();
    for head in out.chunks_exact_mut(head_dim) {
        let log_mean = head.iter().map(|f| f.ln() as f64).sum::<f64>() / head.len() as f64;
        let mean = log_mean.exp() as f32;
        if mean.is_finite() && mean > 0.0 {
            head.iter_mut().for_each(|f| *f /= mean);
        }
    }
    out
}

/// The fixed `max|k|^K_SMOOTH_EXPONENT` factors of earlier checkpoints,
/// normalized like every candidate.
fn fixed_factors(k_absmax: &[f32], head_dim: usize) -> Vec<f32> {
    let ones = vec![1.0; k_absmax.len()];
    factors(k_absmax, &ones, head_dim, K_SMOOTH_EXPONENT, 0.0)
}

/// Attention of the subset's queries over a one-layer pool of `config`.
fn attention_over(
    backend: &CpuBackend,
    shape: AttnShape,
    config: KvCacheConfig,
    input: &KvSearchInput<'_>,
) -> Result<Matrix> {
    let num_blocks = input
        .spans
        .iter()
        .flat_map(|s| s.blocks.iter())
        .max()
        .map_or(1, |&b| b as usize + 1);
    let spec = KvPoolSpec {
        shape,
        config,
        num_blocks,
        block_len: CALIB_BLOCK_LEN,
    };
    let mut pool = backend.new_kv_pool(&spec)?;
    backend.write_kv(0, input.k, input.v, &mut pool, input.spans)?;
    Ok(backend.attention(0, input.q, &pool, input.spans, &shape)?)
}

/// Squared error per KV head between two attention outputs.
fn head_losses(out: &Matrix, reference: &Matrix, shape: &AttnShape) -> Vec<f64> {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let mut loss = vec![0f64; shape.num_kv_heads];
    for r in 0..out.rows {
        for (h, (a, b)) in out
            .row(r)
            .chunks_exact(hd)
            .zip(reference.row(r).chunks_exact(hd))
            .enumerate()
        {
            let e: f64 = a
                .iter()
                .zip(b)
                .map(|(&x, &y)| ((x - y) as f64).powi(2))
                .sum();
            loss[h / group] += e;
        }
    }
    loss
}

/// A KV head's best so far: its loss, exponents and whether it is shifted.
type HeadBest = Option<(f64, (f32, f32), bool)>;

/// One scored candidate: factors and offsets for every channel.
struct Candidate {
    factors: Vec<f32>,
    shift: Vec<f32>,
    exponents: (f32, f32),
    shifted: bool,
}

/// Searches the factors (and offsets) of one layer (`shape.num_layers` is
/// 1) for int4 `smooth` KV.
pub fn search_key_factors(
    backend: &CpuBackend,
    shape: AttnShape,
    input: &KvSearchInput<'_>,
) -> Result<KvSmoothChoice> {
    let kv_dim = shape.num_kv_heads * shape.head_dim;
    let hd = shape.head_dim;
    let heads = shape.num_kv_heads;
    if !hd.is_power_of_two() {
        // The smooth mode cannot run at this head size (its value rotation
        // needs a power of two), so there is nothing to score: keep the
        // fixed factors, which stay in the checkpoint for completeness.
        return Ok(KvSmoothChoice {
            factors: fixed_factors(input.k_absmax, hd),
            shift: vec![0.0; kv_dim],
            exponents: vec![(K_SMOOTH_EXPONENT, 0.0); heads],
            shifted: vec![false; heads],
            loss: Vec::new(),
            loss_fixed: Vec::new(),
        });
    }
    let reference = attention_over(
        backend,
        shape,
        KvCacheConfig {
            dtype: KvDtype::F32,
            mode: KvMode::Online,
            static_params: None,
        },
        input,
    )?;
    let q_group = group_query_absmax(input.q_absmax, &shape);
    let score = |c: &Candidate| -> Result<Vec<f64>> {
        let params = KvStaticParams {
            k_scale: vec![vec![1.0; heads]],
            k_zero: vec![vec![0.0; heads]],
            v_scale: vec![vec![1.0; heads]],
            v_zero: vec![vec![0.0; heads]],
            k_smooth: vec![c.factors.clone()],
            k_shift: vec![c.shift.clone()],
            levels: 15.0,
        };
        let config = KvCacheConfig {
            dtype: KvDtype::Int4,
            mode: KvMode::Smooth,
            static_params: Some(Arc::new(params)),
        };
        let out = attention_over(backend, shape, config, input)?;
        Ok(head_losses(&out, &reference, &shape))
    };

    let fixed = Candidate {
        factors: fixed_factors(input.k_absmax, hd),
        shift: vec![0.0; kv_dim],
        exponents: (K_SMOOTH_EXPONENT, 0.0),
        shifted: false,
    };
    let loss_fixed = score(&fixed)?;
    // With offsets, a channel's magnitude is its half range about the
    // midpoint, not its largest |k|.
    let half_range: Vec<f32> = input
        .k_range
        .iter()
        .map(|&(lo, hi)| 0.5 * (hi - lo))
        .collect();
    let mid: Vec<f32> = input
        .k_range
        .iter()
        .map(|&(lo, hi)| 0.5 * (hi + lo))
        .collect();
    // Every head starts from the fixed factors and no offsets, and keeps
    // them if no candidate scores finite.
    let mut chosen_factors = fixed.factors.clone();
    let mut chosen_shift = vec![0.0; kv_dim];
    let mut best: Vec<HeadBest> = vec![None; heads];
    for shifted in [false, true] {
        let (stat, shift) = if shifted {
            (&half_range[..], mid.clone())
        } else {
            (input.k_absmax, vec![0.0; kv_dim])
        };
        for &alpha in &KEY_EXPONENTS {
            for &beta in &QUERY_EXPONENTS {
                let c = Candidate {
                    factors: factors(stat, &q_group, hd, alpha, beta),
                    shift: shift.clone(),
                    exponents: (alpha, beta),
                    shifted,
                };
                let loss = score(&c)?;
                for h in 0..heads {
                    if !loss[h].is_finite() || best[h].is_some_and(|(b, _, _)| loss[h] >= b) {
                        continue;
                    }
                    best[h] = Some((loss[h], c.exponents, c.shifted));
                    let head = h * hd..(h + 1) * hd;
                    chosen_factors[head.clone()].copy_from_slice(&c.factors[head.clone()]);
                    chosen_shift[head.clone()].copy_from_slice(&c.shift[head]);
                }
            }
        }
    }
    let mut loss = Vec::with_capacity(heads);
    let mut exponents = Vec::with_capacity(heads);
    let mut shifted = Vec::with_capacity(heads);
    for b in best {
        // A head where no candidate gave a finite loss (non-finite
        // activations) keeps the fixed factors it was initialized with.
        let (l, e, s) = b.unwrap_or((f64::NAN, fixed.exponents, false));
        loss.push(l);
        exponents.push(e);
        shifted.push(s);
    }
    Ok(KvSmoothChoice {
        factors: chosen_factors,
        shift: chosen_shift,
        exponents,
        shifted,
        loss,
        loss_fixed,
    })
}

#[cfg(test)]
#[path = "kv_smooth_tests.rs"]
mod tests;
