//! The inner loops of attention over one dequantized KV block, for one
//! query: the scores against every key, and the online-softmax update with
//! the weighted sum of values. AVX-512 versions for head sizes 64 and 128
//! (the query, or the output accumulator, stays in registers across keys),
//! a portable version otherwise.
//!
//! A score is always computed the same way (the same lanes, the same
//! reduction), whatever else the task holds, so a row's attention does not
//! depend on which rows share its task (batch invariance).
//!
//! On aarch64, `attn_neon.rs` holds NEON versions for head sizes 64 and 128
//! (f32 and in-place fp16).

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
#[path = "attn_neon.rs"]
mod neon;

/// `scores[t] = q · keys[t]` for `t < scores.len()` (`keys` is
/// `[t][head_dim]`, `q` one head).
pub type ScoresFn = fn(q: &[f32], keys: &[f32], scores: &mut [f32]);

/// The online-softmax step for one query over a block: given its scores
/// (replaced by their exponentials), folds the block into the running
/// `max`, `sum` and `acc` (`head_dim` values) with the block's `values`.
pub type OnlineFn =
    fn(scores: &mut [f32], values: &[f32], max: &mut f32, sum: &mut f32, acc: &mut [f32]);

/// [`ScoresFn`] on keys stored as fp16 bits (the fp16 KV cache, read in
/// place). fp16 widens to f32 exactly, so the results are those of
/// [`ScoresFn`] on the widened keys, bit for bit.
pub type ScoresF16Fn = fn(q: &[f32], keys: &[u16], scores: &mut [f32]);

/// [`OnlineFn`] on values stored as fp16 bits, bit for bit the same.
pub type OnlineF16Fn =
    fn(scores: &mut [f32], values: &[u16], max: &mut f32, sum: &mut f32, acc: &mut [f32]);

/// The kernels for one head size on this CPU.
#[derive(Clone, Copy)]
pub struct AttnKernels {
    pub scores: ScoresFn,
    pub online: OnlineFn,
    /// In-place fp16 kernels, where this CPU and head size have them.
    pub f16: Option<(ScoresF16Fn, OnlineF16Fn)>,
}

/// Where a kernel reads K or V from: f32 values, or fp16 bits widened on
/// the fly.
#[cfg(target_arch = "x86_64")]
trait Elem: Copy {
    /// Sixteen values at `p`, as f32.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl Elem for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable values at `p`.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Elem for u16 {
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable values at `p`; the
        // callers enable AVX-512F, which `vcvtph2ps` on zmm needs.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl AttnKernels {
    pub fn best(head_dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                match head_dim {
                    64 => {
                        return AttnKernels {
                            scores: |q, k, s| {
                                // SAFETY: chosen after checking AVX-512F.
                                unsafe { scores_avx512::<64, f32>(q, k, s) }
                            },
                            online: |s, v, m, l, a| {
                                // SAFETY: chosen after checking AVX-512F.
                                unsafe { online_avx512::<64, f32>(s, v, m, l, a) }
                            },
                            f16: Some((
                                |q, k, s| {
                                    // SAFETY: chosen after checking AVX-512F.
                                    unsafe { scores_avx512::<64, u16>(q, k, s) }
                                },
                                |s, v, m, l, a| {
                                    // SAFETY: chosen after checking AVX-512F.
                                    unsafe { online_avx512::<64, u16>(s, v, m, l, a) }
                                },
                            )),
                        };
                    }
                    128 => {
                        return AttnKernels {
                            scores: |q, k, s| {
                                // SAFETY: chosen after checking AVX-512F.
                                unsafe { scores_avx512::<128, f32>(q, k, s) }
                            },
                            online: |s, v, m, l, a| {
                                // SAFETY: chosen after checking AVX-512F.
                                unsafe { online_avx512::<128, f32>(s, v, m, l, a) }
                            },
                            f16: Some((
                                |q, k, s| {
                                    // SAFETY: chosen after checking AVX-512F.
                                    unsafe { scores_avx512::<128, u16>(q, k, s) }
                                },
                                |s, v, m, l, a| {
                                    // SAFETY: chosen after checking AVX-512F.
                                    unsafe { online_avx512::<128, u16>(s, v, m, l, a) }
                                },
                            )),
                        };
                    }
                    _ => {}
                }
            }
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        {
            if let Some(k) = neon::kernels(head_dim) {
                return k;
            }
        }
        AttnKernels {
            scores: scores_portable,
            online: online_portable,
            f16: None,
        }
    }
}

fn scores_portable(q: &[f32], keys: &[f32], scores: &mut [f32]) {
    let hd = q.len();
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd.max(1))) {
        let mut lanes = [0f32; 8];
        for (i, (&a, &b)) in q.iter().zip(k).enumerate() {
            lanes[i % 8] += a * b;
        }
        *s = lanes.iter().sum();
    }
}

fn online_portable(
    scores: &mut [f32],
    values: &[f32],
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
) {
    let hd = acc.len();
    let block_max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let new_max = max.max(block_max);
    let correction = (*max - new_max).exp();
    *max = new_max;
    if correction != 1.0 {
        acc.iter_mut().for_each(|x| *x *= correction);
    }
    let mut block_sum = 0f32;
    for (s, v) in scores.iter_mut().zip(values.chunks_exact(hd.max(1))) {
        let p = (*s - new_max).exp();
        *s = p;
        block_sum += p;
        for (o, &x) in acc.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    *sum = *sum * correction + block_sum;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512<const HD: usize, E: Elem>(q: &[f32], keys: &[E], scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let nt = scores.len().min(keys.len() / HD);
    if q.len() < HD {
        scores[..nt].iter_mut().for_each(|s| *s = f32::NAN);
        return;
    }
    // SAFETY (loads): q holds HD values (checked), keys nt·HD.
    let qv: [__m512; 16] = std::array::from_fn(|c| {
        if c < HD / 16 {
            _mm512_loadu_ps(q.as_ptr().add(16 * c))
        } else {
            _mm512_setzero_ps()
        }
    });
    let pk = keys.as_ptr();
    // Keys go 16 at a time (counted from the start of the block, so a key
    // always sits in the same slot): one vector of partial products per
    // key, then one transposing reduction gives all 16 scores, each summed
    // in the same fixed tree. That is about 3 instructions per key instead
    // of a full horizontal sum each.
    let mut t = 0;
    while t < nt {
        let count = (nt - t).min(16);
        // A constant trip count (16, with a test inside) lets the loop
        // unroll fully, so that the 16 vectors stay in registers.
        let acc: [__m512; 16] = std::array::from_fn(|j| {
            if j < count {
                let k = pk.add((t + j) * HD);
                let mut v = _mm512_mul_ps(qv[0], E::load16(k));
                let mut c = 1;
                while c < HD / 16 {
                    v = _mm512_fmadd_ps(qv[c], E::load16(k.add(16 * c)), v);
                    c += 1;
                }
                v
            } else {
                _mm512_setzero_ps()
            }
        });
        let sums = transpose_sum16(acc);
        _mm512_mask_storeu_ps(scores.as_mut_ptr().add(t), tail_mask(count), sums);
        t += 16;
    }
}

/// Lane `j` of the result is the sum of the 16 lanes of `v[j]`, always as
/// `((l0 + l1) + (l2 + l3))` over `l_i = (x_i + x_{i+8}) + (x_{i+4} + x_{i+12})`
/// whatever `j`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose_sum16(v: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Halves: lanes 0..8 of each result hold key 2i, lanes 8..16 key 2i+1.
    let s1: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xee>(a, b),
        )
    });
    // Quarters: 128-bit lane q holds key 4i + q.
    let s2: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (s1[2 * i], s1[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xdd>(a, b),
        )
    });
    // Within 128-bit lanes: pairs of elements.
    let s3: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (s2[2 * i], s2[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(a, b),
            _mm512_shuffle_ps::<0xdd>(a, b),
        )
    });
    let s4 = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(s3[0], s3[1]),
        _mm512_shuffle_ps::<0xdd>(s3[0], s3[1]),
    );
    // Element e of 128-bit lane q now holds key q + 4e.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, s4)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn online_avx512<const HD: usize, E: Elem>(
    scores: &mut [f32],
    values: &[E],
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nt = scores.len().min(values.len() / HD);
    if acc.len() < HD || nt == 0 {
        // Nothing visible (or a bad call): the state stays as it is.
        return;
    }
    let ps = scores.as_mut_ptr();
    // SAFETY (loads and stores): lanes past `nt` are masked off; `values`
    // holds nt·HD values and `acc` HD (checked above).
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut t = 0;
    while t < nt {
        let m = tail_mask(nt - t);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, ps.add(t)));
        t += 16;
    }
    let new_max = max.max(_mm512_reduce_max_ps(vmax));
    let correction = (*max - new_max).exp();
    *max = new_max;
    let vnew = _mm512_set1_ps(new_max);
    let mut vsum = _mm512_setzero_ps();
    t = 0;
    while t < nt {
        let m = tail_mask(nt - t);
        let e = super::simd::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, ps.add(t)), vnew));
        let e = _mm512_maskz_mov_ps(m, e);
        vsum = _mm512_add_ps(vsum, e);
        _mm512_mask_storeu_ps(ps.add(t), m, e);
        t += 16;
    }
    let mut out: [__m512; 8] = std::array::from_fn(|c| {
        if c < HD / 16 {
            _mm512_loadu_ps(acc.as_ptr().add(16 * c))
        } else {
            _mm512_setzero_ps()
        }
    });
    if correction != 1.0 {
        let vc = _mm512_set1_ps(correction);
        for o in out.iter_mut().take(HD / 16) {
            *o = _mm512_mul_ps(*o, vc);
        }
    }
    let pv = values.as_ptr();
    for t in 0..nt {
        let p = _mm512_set1_ps(*ps.add(t));
        let v = pv.add(t * HD);
        for (c, o) in out.iter_mut().take(HD / 16).enumerate() {
            *o = _mm512_fmadd_ps(p, E::load16(v.add(16 * c)), *o);
        }
    }
    for (c, o) in out.iter().take(HD / 16).enumerate() {
        _mm512_storeu_ps(acc.as_mut_ptr().add(16 * c), *o);
    }
    *sum = *sum * correction + _mm512_reduce_add_ps(vsum);
}

/// A mask of the first `min(left, 16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tail_mask(left: usize) -> u16 {
    if left >= 16 {
        0xffff
    } else {
        (1u16 << left) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_a_plain_softmax_attention() {
        for hd in [64usize, 128, 24] {
            let k = AttnKernels::best(hd);
            // NEON has in-place fp16 kernels for 64 and 128, so they are
            // compared below.
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            assert_eq!(k.f16.is_some(), hd == 64 || hd == 128);
            let nt = 37;
            let q: Vec<f32> = (0..hd).map(|i| ((i * 7 % 13) as f32 - 6.0) / 9.0).collect();
            let keys: Vec<f32> = (0..nt * hd)
                .map(|i| ((i * 11 % 17) as f32 - 8.0) / 7.0)
                .collect();
            let values: Vec<f32> = (0..nt * hd)
                .map(|i| ((i * 5 % 19) as f32 - 9.0) / 5.0)
                .collect();
            // Two blocks of 20 and 17 keys, folded online.
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
            let mut acc = vec![0f32; hd];
            for (lo, hi) in [(0usize, 20usize), (20, nt)] {
                let mut s = vec![0f32; hi - lo];
                (k.scores)(&q, &keys[lo * hd..hi * hd], &mut s);
                for (t, &v) in s.iter().enumerate() {
                    let want: f64 = (0..hd)
                        .map(|d| q[d] as f64 * keys[(lo + t) * hd + d] as f64)
                        .sum();
                    assert!((v as f64 - want).abs() < 1e-4, "hd {hd} score {t}");
                }
                (k.online)(
                    &mut s,
                    &values[lo * hd..hi * hd],
                    &mut max,
                    &mut sum,
                    &mut acc,
                );
            }
            // The fp16 kernels on fp16 copies give the f32 kernels' bits.
            if let Some((scores16, online16)) = k.f16 {
                let h = |v: &[f32]| -> (Vec<f32>, Vec<u16>) {
                    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                    (
                        h.iter().map(|x| x.to_f32()).collect(),
                        h.iter().map(|x| x.to_bits()).collect(),
                    )
                };
                let ((kf, kb), (vf, vb)) = (h(&keys), h(&values));
                let (mut a, mut b) = (vec![0f32; nt], vec![0f32; nt]);
                (k.scores)(&q, &kf, &mut a);
                scores16(&q, &kb, &mut b);
                assert_eq!(a, b);
                let (mut s1, mut s2) = ((f32::NEG_INFINITY, 0f32), (f32::NEG_INFINITY, 0f32));
                let (mut acc1, mut acc2) = (vec![0f32; hd], vec![0f32; hd]);
                (k.online)(&mut a, &vf, &mut s1.0, &mut s1.1, &mut acc1);
                online16(&mut b, &vb, &mut s2.0, &mut s2.1, &mut acc2);
                assert_eq!((s1, &acc1), (s2, &acc2));
            }
            let s: Vec<f64> = (0..nt)
                .map(|t| (0..hd).map(|d| q[d] as f64 * keys[t * hd + d] as f64).sum())
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let total: f64 = w.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..nt)
                    .map(|t| w[t] * values[t * hd + d] as f64)
                    .sum::<f64>()
                    / total;
                let got = acc[d] as f64 / sum as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "hd {hd} out {d}: {got} vs {want}"
                );
            }
        }
    }
}
