//! NEON (aarch64) versions of the attention kernels of `attn_simd.rs`, for
//! head sizes 64 and 128, over f32 or fp16 keys and values (widened with
//! `fcvtl`, exactly, so the fp16 kernels give the f32 kernels' bits).
//!
//! A score is always summed the same way: four accumulators over the head,
//! added as `(a0 + a1) + (a2 + a3)`, then across lanes by `faddp`, whatever
//! else the block holds (batch invariance).

use std::arch::aarch64::*;

use super::super::simd::{exp4, widen_f16x8};
use super::AttnKernels;

/// Where a kernel reads K or V from: f32 values, or fp16 bits.
pub(super) trait Elem: Copy {
    /// Eight values at `p`, as f32.
    ///
    /// # Safety
    ///
    /// Eight values must be readable at `p`.
    unsafe fn load8(p: *const Self) -> [float32x4_t; 2];
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> [float32x4_t; 2] {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        unsafe { [vld1q_f32(p), vld1q_f32(p.add(4))] }
    }
}

impl Elem for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> [float32x4_t; 2] {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        let (lo, hi) = widen_f16x8(unsafe { vld1q_u16(p) });
        [lo, hi]
    }
}

/// The NEON kernels for `head_dim`, where there are some.
pub(super) fn kernels(head_dim: usize) -> Option<AttnKernels> {
    match head_dim {
        64 => Some(AttnKernels {
            scores: scores::<64, f32>,
            online: online::<64, f32>,
            f16: Some((scores::<64, u16>, online::<64, u16>)),
        }),
        128 => Some(AttnKernels {
            scores: scores::<128, f32>,
            online: online::<128, f32>,
            f16: Some((scores::<128, u16>, online::<128, u16>)),
        }),
        _ => None,
    }
}

fn scores<const HD: usize, E: Elem>(q: &[f32], keys: &[E], scores: &mut [f32]) {
    let nt = scores.len().min(keys.len() / HD);
    if q.len() < HD {
        scores[..nt].iter_mut().for_each(|s| *s = f32::NAN);
        return;
    }
    // SAFETY (loads): `q` holds HD values (checked) and `keys` nt·HD.
    unsafe {
        let qv: [float32x4_t; 32] = std::array::from_fn(|c| {
            if c < HD / 4 {
                vld1q_f32(q.as_ptr().add(4 * c))
            } else {
                vdupq_n_f32(0.0)
            }
        });
        for (t, s) in scores[..nt].iter_mut().enumerate() {
            let k = keys.as_ptr().add(t * HD);
            let mut acc = [vdupq_n_f32(0.0); 4];
            for c in 0..HD / 8 {
                let [k0, k1] = E::load8(k.add(8 * c));
                let a = 2 * (c % 2);
                acc[a] = vfmaq_f32(acc[a], qv[2 * c], k0);
                acc[a + 1] = vfmaq_f32(acc[a + 1], qv[2 * c + 1], k1);
            }
            let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
            *s = vaddvq_f32(v);
        }
    }
}

fn online<const HD: usize, E: Elem>(
    scores: &mut [f32],
    values: &[E],
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
) {
    let nt = scores.len().min(values.len() / HD);
    if acc.len() < HD || nt == 0 {
        // Nothing visible (or a bad call): the state stays as it is.
        return;
    }
    let scores = &mut scores[..nt];
    let block_max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let new_max = max.max(block_max);
    let correction = (*max - new_max).exp();
    *max = new_max;
    // SAFETY (here and below): NEON is baseline on this target, and the
    // loads and stores stay inside `lanes` (4 values), `acc` (HD, checked
    // above) and `values` (nt·HD).
    let total = unsafe {
        let vnew = vdupq_n_f32(new_max);
        let mut vsum = vdupq_n_f32(0.0);
        // Every score goes through `exp4`, the last partial vector through a
        // padded copy, so a score's weight does not depend on its position.
        for chunk in scores.chunks_mut(4) {
            let mut lanes = [new_max; 4];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let e = exp4(vsubq_f32(vld1q_f32(lanes.as_ptr()), vnew));
            vst1q_f32(lanes.as_mut_ptr(), e);
            lanes[chunk.len()..].iter_mut().for_each(|l| *l = 0.0);
            chunk.copy_from_slice(&lanes[..chunk.len()]);
            vsum = vaddq_f32(vsum, vld1q_f32(lanes.as_ptr()));
        }
        vaddvq_f32(vsum)
    };
    // SAFETY: as above; `out` keeps the HD accumulators in registers
    // across keys.
    unsafe {
        let mut out: [float32x4_t; 32] = std::array::from_fn(|c| {
            if c < HD / 4 {
                vld1q_f32(acc.as_ptr().add(4 * c))
            } else {
                vdupq_n_f32(0.0)
            }
        });
        if correction != 1.0 {
            let vc = vdupq_n_f32(correction);
            for o in out.iter_mut().take(HD / 4) {
                *o = vmulq_f32(*o, vc);
            }
        }
        for (t, &p) in scores.iter().enumerate() {
            let p = vdupq_n_f32(p);
            let v = values.as_ptr().add(t * HD);
            for c in 0..HD / 8 {
                let [v0, v1] = E::load8(v.add(8 * c));
                out[2 * c] = vfmaq_f32(out[2 * c], p, v0);
                out[2 * c + 1] = vfmaq_f32(out[2 * c + 1], p, v1);
            }
        }
        for (c, o) in out.iter().take(HD / 4).enumerate() {
            vst1q_f32(acc.as_mut_ptr().add(4 * c), *o);
        }
    }
    *sum = *sum * correction + total;
}
