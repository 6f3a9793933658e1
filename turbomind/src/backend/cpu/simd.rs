//! Small SIMD kernels for the best instruction set this CPU has, chosen
//! once at run time: dot products (AVX2+FMA on x86-64, auto-vectorized on
//! aarch64, portable elsewhere), the int8 activation quantizer, `exp`
//! (SiLU, softmax), fp16 widening, and the row-wise RMS norm and rotary
//! embedding (AVX-512 where present, portable otherwise). Each keeps a fixed
//! summation order, independent of the batch, which batch invariance relies
//! on.
//!
//! On aarch64, `simd_neon.rs` holds NEON versions of fp16 widening, the fp16
//! dot product, the quantizer, `exp` and SiLU·mul; the f32 dot product, RMS
//! norm and rotary embedding are the portable bodies, which vectorize to
//! NEON as they are.

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
#[path = "simd_neon.rs"]
mod neon;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub(super) use neon::{exp4, widen_f16x8};

#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let chunks = n / LANES;
    for c in 0..chunks {
        let xa = &a[c * LANES..(c + 1) * LANES];
        let xb = &b[c * LANES..(c + 1) * LANES];
        for i in 0..LANES {
            acc[i] = xa[i].mul_add(xb[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..n {
        tail += a[i] * b[i];
    }
    // Pairwise reduction keeps the summation order fixed and independent of
    // the batch, which batch invariance relies on.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

/// The sum of the 8 lanes, in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_avx(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): i + 32 <= n, and both slices hold n values.
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(i + 8 * j));
            let y = _mm256_loadu_ps(pb.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = _mm256_loadu_ps(pa.add(i));
        let y = _mm256_loadu_ps(pb.add(i));
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut total = hsum_avx(sum);
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

/// [`dot_avx2`] with the first operand stored as fp16: the same
/// operations in the same order on the converted values, so for weights
/// that fp16 holds exactly it returns the same bits as the fp32 kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(a: &[half::f16], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    let load = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    // SAFETY (all loads below): i + 32 <= n, and both slices hold n values.
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = load(pa.add(i + 8 * j));
            let y = _mm256_loadu_ps(pb.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = load(pa.add(i));
        let y = _mm256_loadu_ps(pb.add(i));
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut total = hsum_avx(sum);
    while i < n {
        total += a[i].to_f32() * b[i];
        i += 1;
    }
    total
}

/// A dot product of fp16 weights with fp32 activations.
pub type DotF16Fn = fn(&[half::f16], &[f32]) -> f32;

fn dot_f16_portable(a: &[half::f16], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i].to_f32() * b[c * 8 + i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..n {
        s += a[i].to_f32() * b[i];
    }
    s
}

/// Picks the fastest fp16-by-fp32 dot product this CPU supports.
pub fn best_dot_f16() -> DotF16Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return |a, b| {
                // SAFETY: returned only after checking AVX2, FMA and F16C.
                unsafe { dot_f16_avx2(a, b) }
            };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        // The same order as `best_dot` here (`dot_body`).
        return neon::dot_f16;
    }
    #[allow(unreachable_code)]
    dot_f16_portable
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Without FMA hardware, mul_add falls back to a slow libm call; the
    // portable path therefore multiplies and adds separately.
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// A dot-product function pointer for this machine.
pub type DotFn = fn(&[f32], &[f32]) -> f32;

/// Picks the fastest dot product this CPU supports.
pub fn best_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |a, b| {
                // SAFETY: this closure is only returned after the CPU was
                // checked for AVX2 and FMA above.
                unsafe { dot_avx2(a, b) }
            };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // NEON and FMA are baseline on aarch64, so the generic body
        // vectorizes without a feature gate.
        return dot_body;
    }
    #[allow(unreachable_code)]
    dot_portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64_reference() {
        for n in [0usize, 1, 7, 31, 32, 33, 100, 576, 1537] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0)
                .collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            for f in [best_dot(), dot_portable as DotFn] {
                let got = f(&a, &b) as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "n={n} got {got} want {want}"
                );
            }
            // fp16 storage of values fp16 holds exactly changes nothing.
            let a16: Vec<half::f16> = a.iter().map(|&x| half::f16::from_f32(x)).collect();
            let exact: Vec<f32> = a16.iter().map(|x| x.to_f32()).collect();
            assert_eq!(
                best_dot_f16()(&a16, &b).to_bits(),
                best_dot()(&exact, &b).to_bits()
            );
            let want: f64 = exact
                .iter()
                .zip(&b)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum();
            let got = dot_f16_portable(&a16, &b) as f64;
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()));
        }
    }
}

/// Quantizes one group of activations to int8: returns `(d, Σ q)` with
/// `x ≈ d · q`, `d = max|x| / 127`, each `q = x · (127 / max|x|)` rounded
/// to nearest (ties to even). A group holding a NaN or infinity gets
/// `d = NaN`, so that the product is NaN as in fp32. Every variant computes
/// the same values.
pub type QuantizeGroupFn = fn(&[f32], &mut [i8]) -> (f32, i32);

/// Adding then subtracting 1.5·2²³ rounds an f32 below 2²² in magnitude to
/// the nearest integer, ties to even, with plain IEEE additions (the same
/// in scalar and SIMD code, and no libm call).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The scale, its inverse, or `None` for a group that is not finite.
#[inline(always)]
fn group_scale(amax: f32, poison: f32) -> Option<(f32, f32)> {
    if poison.is_nan() {
        return None;
    }
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    Some((amax / 127.0, inv))
}

#[inline(always)]
fn quantize_one(v: f32, inv: f32) -> i32 {
    let t = v * inv;
    ((t + ROUND_MAGIC) - ROUND_MAGIC).clamp(-127.0, 127.0) as i32
}

fn quantize_group_portable(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let mut amax = 0f32;
    // `v · 0` is NaN exactly when `v` is NaN or infinite.
    let mut poison = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
        poison += v * 0.0;
    }
    let Some((d, inv)) = group_scale(amax, poison) else {
        q.iter_mut().for_each(|c| *c = 0);
        return (f32::NAN, 0);
    };
    let mut sum = 0;
    for (c, &v) in q.iter_mut().zip(x) {
        let r = quantize_one(v, inv);
        *c = r as i8;
        sum += r;
    }
    (d, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_group_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = x.len().min(q.len());
    let full = n / 16 * 16;
    let px = x.as_ptr();
    let mut vmax = _mm512_setzero_ps();
    let mut vpoison = _mm512_setzero_ps();
    let zero = _mm512_setzero_ps();
    // SAFETY (loads and stores below): i + 16 <= full <= n, the length of
    // both slices.
    let mut i = 0;
    while i < full {
        let v = _mm512_loadu_ps(px.add(i));
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        vpoison = _mm512_add_ps(vpoison, _mm512_mul_ps(v, zero));
        i += 16;
    }
    let mut amax = _mm512_reduce_max_ps(vmax);
    let mut poison = _mm512_reduce_add_ps(vpoison);
    for &v in &x[full..n] {
        amax = amax.max(v.abs());
        poison += v * 0.0;
    }
    let Some((d, inv)) = group_scale(amax, poison) else {
        q.iter_mut().for_each(|c| *c = 0);
        return (f32::NAN, 0);
    };
    let vinv = _mm512_set1_ps(inv);
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut vsum = _mm512_setzero_si512();
    let pq = q.as_mut_ptr();
    i = 0;
    while i < full {
        let t = _mm512_mul_ps(_mm512_loadu_ps(px.add(i)), vinv);
        let r = _mm512_sub_ps(_mm512_add_ps(t, magic), magic);
        let c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
        vsum = _mm512_add_epi32(vsum, c);
        _mm_storeu_si128(pq.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(c));
        i += 16;
    }
    let mut sum = _mm512_reduce_add_epi32(vsum);
    for (c, &v) in q[full..n].iter_mut().zip(&x[full..n]) {
        let r = quantize_one(v, inv);
        *c = r as i8;
        sum += r;
    }
    (d, sum)
}

/// Picks the fastest activation quantizer this CPU supports.
pub fn best_quantize_group() -> QuantizeGroupFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return |x, q| {
                // SAFETY: returned only after checking for AVX-512F.
                unsafe { quantize_group_avx512(x, q) }
            };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        return neon::quantize_group;
    }
    #[allow(unreachable_code)]
    quantize_group_portable
}

#[cfg(test)]
mod quantize_tests {
    use super::*;

    #[test]
    fn quantize_group_matches_the_portable_version_and_bounds_the_error() {
        for n in [8usize, 32, 40, 64, 128] {
            for scale in [0.0f32, 1e-3, 1.0, 300.0] {
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 * scale)
                    .collect();
                let (mut a, mut b) = (vec![0i8; n], vec![0i8; n]);
                let (da, sa) = best_quantize_group()(&x, &mut a);
                let (db, sb) = quantize_group_portable(&x, &mut b);
                assert_eq!((da.to_bits(), sa, &a), (db.to_bits(), sb, &b));
                assert_eq!(sa, a.iter().map(|&c| c as i32).sum::<i32>());
                for (&v, &c) in x.iter().zip(&a) {
                    assert!(
                        (v - da * c as f32).abs() <= 0.5001 * da + 1e-30,
                        "{v} vs {c}·{da}"
                    );
                }
            }
        }
        let mut x = vec![1.0f32; 32];
        x[5] = f32::INFINITY;
        let mut q = vec![0i8; 32];
        assert!(best_quantize_group()(&x, &mut q).0.is_nan());
        assert!(quantize_group_portable(&x, &mut q).0.is_nan());
    }
}

/// `e^x` for 16 lanes (Cephes' `expf`: a degree-5 polynomial on
/// `x − n·ln 2`, then `·2ⁿ`), within 2 ulp of `exp` over the range that
/// does not overflow; inputs are clamped to ±88.3 (so −∞ gives a tiny
/// positive value rather than 0, which softmax and SiLU absorb).
///
/// # Safety
///
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-88.3)),
        _mm512_set1_ps(88.3),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(y, n)
}

/// `out = silu(gate) · up` over equal-length slices.
pub type SiluMulFn = fn(&[f32], &[f32], &mut [f32]);

fn silu_mul_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = gate.len().min(up.len()).min(out.len());
    let full = n / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    // SAFETY (loads and stores): i + 16 <= full <= the length of all three.
    while i < full {
        let g = _mm512_loadu_ps(gate.as_ptr().add(i));
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(s, u));
        i += 16;
    }
    silu_mul_portable(&gate[full..n], &up[full..n], &mut out[full..n]);
}

/// Picks the fastest SiLU·mul this CPU supports.
pub fn best_silu_mul() -> SiluMulFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return |g, u, o| {
                // SAFETY: returned only after checking for AVX-512F.
                unsafe { silu_mul_avx512(g, u, o) }
            };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        return neon::silu_mul;
    }
    #[allow(unreachable_code)]
    silu_mul_portable
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn silu_mul_matches_libm() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 7.0).collect();
        let up: Vec<f32> = (0..1000)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0)
            .collect();
        let mut got = vec![0f32; 1000];
        best_silu_mul()(&gate, &up, &mut got);
        for ((&g, &u), &o) in gate.iter().zip(&up).zip(&got) {
            let want = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            assert!(
                (o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({g})·{u}: {o} vs {want}"
            );
        }
    }
}

/// `out = x / rms(x) · w`, one row, with the sum of squares kept in 16
/// lanes (a fixed order) so that it vectorizes.
#[inline(always)]
fn rms_norm_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let mut sum_sq = 0f32;
    for &v in tail {
        sum_sq += v * v;
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    sum_sq += lanes[0];
    let inv = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// Rotates each head of a row in place: channel `j` with `j + half`, by
/// the angles whose cos/sin are given (`half` values each).
#[inline(always)]
fn rope_body(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim.max(1)) {
        let (a, b) = head.split_at_mut(half);
        for (((x, y), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let (x0, x1) = (*x, *y);
            *x = x0 * c - x1 * s;
            *y = x1 * c + x0 * s;
        }
    }
}

/// Row-wise ops, compiled for AVX-512 where the CPU has it (the same
/// arithmetic, wider vectors).
#[derive(Clone, Copy)]
pub struct RowOps {
    pub rms_norm: fn(&[f32], &[f32], f32, &mut [f32]),
    pub rope: fn(&mut [f32], usize, &[f32], &[f32]),
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rms_norm_avx512(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_body(x, w, eps, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rope_avx512(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    rope_body(row, head_dim, cos, sin)
}

impl RowOps {
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return RowOps {
                    rms_norm: |x, w, eps, out| {
                        // SAFETY: chosen after checking AVX-512F.
                        unsafe { rms_norm_avx512(x, w, eps, out) }
                    },
                    rope: |row, hd, cos, sin| {
                        // SAFETY: chosen after checking AVX-512F.
                        unsafe { rope_avx512(row, hd, cos, sin) }
                    },
                };
            }
        }
        RowOps {
            rms_norm: rms_norm_body,
            rope: rope_body,
        }
    }
}

/// fp16 bit patterns to f32 (`out` as long as `bits`, or shorter).
fn widen_f16_portable(bits: &[u16], out: &mut [f32]) {
    use half::slice::HalfBitsSliceExt;
    let n = bits.len().min(out.len());
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(
        bits[..n].reinterpret_cast::<half::f16>(),
        &mut out[..n],
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_f16_avx512(bits: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = bits.len().min(out.len());
    let full = n / 16 * 16;
    let mut i = 0;
    // SAFETY (loads and stores): i + 16 <= full <= the length of both.
    while i < full {
        let h = _mm256_loadu_si256(bits.as_ptr().add(i) as *const __m256i);
        _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        i += 16;
    }
    widen_f16_portable(&bits[full..n], &mut out[full..n]);
}

/// Picks the fastest fp16-to-f32 conversion this CPU supports (the KV
/// cache's fp16 blocks; `half`'s slice conversion goes 8 values per call).
pub fn best_widen_f16() -> fn(&[u16], &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return |b, o| {
                // SAFETY: returned only after checking for AVX-512F.
                unsafe { widen_f16_avx512(b, o) }
            };
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        return neon::widen_f16;
    }
    #[allow(unreachable_code)]
    widen_f16_portable
}
