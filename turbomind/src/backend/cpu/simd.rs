//! Dot products for the best instruction set this CPU has, chosen once at
//! run time: AVX2+FMA intrinsics on x86-64, an auto-vectorized loop on
//! aarch64 (NEON is baseline there), and a portable loop elsewhere. Each
//! keeps a fixed summation order, independent of the batch, which batch
//! invariance relies on.

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

/// `Σ q[i]·x[i]` over one group of 4-bit values stored half-split: byte
/// `j` holds `q[j]` in its low nibble and `q[j + n/2]` in its high nibble,
/// where `n = x.len()` (a multiple of 32).
pub type NibbleDotFn = fn(&[u8], &[f32]) -> f32;

fn nibble_dot_portable(q: &[u8], x: &[f32]) -> f32 {
    let half = x.len() / 2;
    let mut acc = [0f32; 8];
    for (j, &b) in q.iter().enumerate() {
        acc[j % 8] += (b & 0xf) as f32 * x[j] + (b >> 4) as f32 * x[j + half];
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nibble_dot_avx2(q: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let half = x.len() / 2;
    let mask = _mm_set1_epi8(0x0f);
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let px = x.as_ptr();
    let mut j = 0;
    // SAFETY (loads below): j + 16 <= half = q.len(), and x holds 2·half
    // values, so every 8-wide load at j, j+8, half+j, half+j+8 is in bounds.
    while j + 16 <= half {
        let bytes = _mm_loadu_si128(q.as_ptr().add(j) as *const __m128i);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        acc0 = _mm256_fmadd_ps(f(lo), _mm256_loadu_ps(px.add(j)), acc0);
        acc1 = _mm256_fmadd_ps(
            f(_mm_srli_si128(lo, 8)),
            _mm256_loadu_ps(px.add(j + 8)),
            acc1,
        );
        acc0 = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(px.add(half + j)), acc0);
        acc1 = _mm256_fmadd_ps(
            f(_mm_srli_si128(hi, 8)),
            _mm256_loadu_ps(px.add(half + j + 8)),
            acc1,
        );
        j += 16;
    }
    let mut total = hsum_avx(_mm256_add_ps(acc0, acc1));
    while j < half {
        total += (q[j] & 0xf) as f32 * x[j] + (q[j] >> 4) as f32 * x[j + half];
        j += 1;
    }
    total
}

/// One output row of a 4-bit weight (see `w4.rs`): its nibbles, half-split
/// per group, and per group a scale and `-zero · scale`.
pub struct W4Row<'a> {
    pub nibbles: &'a [u8],
    pub scales: &'a [f32],
    pub neg_zero_scaled: &'a [f32],
    pub group_size: usize,
}

/// `out[r] = Σ_g s_g · (q_g · x_r,g) + zs_g · Σx_r,g` for several input
/// rows `xs` (each `in_features` long) with their per-group sums `gsums`.
pub type W4RowsFn = fn(&W4Row<'_>, &[&[f32]], &[&[f32]], &mut [f32]);

/// `Σ_g zs_g · gsum_g` in a fixed order: the zero-point term of one row.
#[inline(always)]
fn zero_term(neg_zero_scaled: &[f32], gsums: &[f32]) -> f32 {
    neg_zero_scaled
        .iter()
        .zip(gsums)
        .fold(0f32, |acc, (&z, &s)| z.mul_add(s, acc))
}

/// [`W4RowsFn`] for `R` rows at once: each run of nibbles is decoded once
/// and multiplied into every row. A group's products are accumulated in
/// vector lanes, scaled into a running vector (one horizontal sum per
/// output, not per group), and the zero-point term is added at the end.
/// Per row the operations and their order are the same for any `R`, so a
/// row's result does not depend on how many rows share the call (batch
/// invariance). Group sizes are multiples of 32 (the format allows 32, 64
/// and 128), so there is no scalar tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn w4_rows_avx2<const R: usize>(
    w: &W4Row<'_>,
    xs: [&[f32]; R],
    gsums: [&[f32]; R],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let g = w.group_size;
    let half = g / 2;
    let groups = w.scales.len();
    let mask = _mm_set1_epi8(0x0f);
    let mut lanes = [_mm256_setzero_ps(); R];
    let q = w.nibbles.as_ptr();
    let px: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
    // SAFETY (loads below): the caller guarantees nibbles hold groups·g/2
    // bytes and every row groups·g values; j + 16 <= half keeps each load
    // inside its group.
    for gi in 0..groups {
        // Four accumulators per row keep four FMA chains in flight.
        let mut acc0 = [_mm256_setzero_ps(); R];
        let mut acc1 = [_mm256_setzero_ps(); R];
        let mut acc2 = [_mm256_setzero_ps(); R];
        let mut acc3 = [_mm256_setzero_ps(); R];
        let qg = q.add(gi * half);
        _mm_prefetch::<_MM_HINT_T0>(qg.wrapping_add(1024) as *const i8);
        let mut j = 0;
        while j < half {
            let bytes = _mm_loadu_si128(qg.add(j) as *const __m128i);
            let lo = _mm_and_si128(bytes, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let (w0, w1, w2, w3) = (
                f(lo),
                f(_mm_srli_si128(lo, 8)),
                f(hi),
                f(_mm_srli_si128(hi, 8)),
            );
            for r in 0..R {
                let x = px[r].add(gi * g + j);
                acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc1[r]);
                acc2[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x.add(half)), acc2[r]);
                acc3[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x.add(half + 8)), acc3[r]);
            }
            j += 16;
        }
        let sv = _mm256_set1_ps(*w.scales.get_unchecked(gi));
        for r in 0..R {
            let group = _mm256_add_ps(
                _mm256_add_ps(acc0[r], acc2[r]),
                _mm256_add_ps(acc1[r], acc3[r]),
            );
            lanes[r] = _mm256_fmadd_ps(sv, group, lanes[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_avx(lanes[r]) + zero_term(w.neg_zero_scaled, gsums[r]);
    }
}

/// [`w4_rows_avx2`] with 512-bit vectors: 16 nibbles per conversion and
/// FMA, so about half the instructions per weight; the same structure and
/// the same per-row order for any `R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn w4_rows_avx512<const R: usize>(
    w: &W4Row<'_>,
    xs: [&[f32]; R],
    gsums: [&[f32]; R],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let g = w.group_size;
    let half = g / 2;
    let groups = w.scales.len();
    let mask = _mm_set1_epi8(0x0f);
    let mut lanes = [_mm512_setzero_ps(); R];
    let q = w.nibbles.as_ptr();
    let px: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
    // SAFETY (loads below): as in `w4_rows_avx2`.
    for gi in 0..groups {
        // Two accumulators per row (low and high nibbles) halve the FMA
        // dependency chain.
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_hi = [_mm512_setzero_ps(); R];
        let qg = q.add(gi * half);
        _mm_prefetch::<_MM_HINT_T0>(qg.wrapping_add(1024) as *const i8);
        let mut j = 0;
        while j < half {
            let bytes = _mm_loadu_si128(qg.add(j) as *const __m128i);
            let lo = _mm_and_si128(bytes, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            let w_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
            let w_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
            for r in 0..R {
                let x = px[r].add(gi * g + j);
                acc[r] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x), acc[r]);
                acc_hi[r] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x.add(half)), acc_hi[r]);
            }
            j += 16;
        }
        let sv = _mm512_set1_ps(*w.scales.get_unchecked(gi));
        for r in 0..R {
            lanes[r] = _mm512_fmadd_ps(sv, _mm512_add_ps(acc[r], acc_hi[r]), lanes[r]);
        }
    }
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(lanes[r]) + zero_term(w.neg_zero_scaled, gsums[r]);
    }
}

fn w4_rows_portable(w: &W4Row<'_>, xs: &[&[f32]], gsums: &[&[f32]], out: &mut [f32]) {
    let g = w.group_size;
    for ((o, x), gs) in out.iter_mut().zip(xs).zip(gsums) {
        let mut total = 0f32;
        for (gi, q) in w.nibbles.chunks_exact(g / 2).enumerate() {
            let dot = nibble_dot_portable(q, &x[gi * g..(gi + 1) * g]);
            total += w.scales[gi] * dot + w.neg_zero_scaled[gi] * gs[gi];
        }
        *o = total;
    }
}

/// Picks the fastest multi-row 4-bit kernel this CPU supports.
/// Whether a call satisfies the SIMD kernels' length contract: whole groups
/// of a multiple of 32 values, and every row and group sum long enough.
fn w4_call_fits(w: &W4Row<'_>, xs: &[&[f32]], gsums: &[&[f32]], out: &[f32]) -> bool {
    let groups = w.scales.len();
    let g = w.group_size;
    g.is_multiple_of(32)
        && w.nibbles.len() == groups * g / 2
        && w.neg_zero_scaled.len() == groups
        && xs.len() == gsums.len()
        && out.len() >= xs.len()
        && xs.iter().all(|x| x.len() >= groups * g)
        && gsums.iter().all(|s| s.len() >= groups)
}

pub fn best_w4_rows() -> W4RowsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return |w, xs, gsums, out| {
                if !w4_call_fits(w, xs, gsums, out) {
                    return w4_rows_portable(w, xs, gsums, out);
                }
                let mut r = 0;
                while r < xs.len() {
                    // SAFETY: returned only after checking for AVX-512F;
                    // the lengths were checked just above.
                    unsafe {
                        if r + 4 <= xs.len() {
                            w4_rows_avx512::<4>(
                                w,
                                [xs[r], xs[r + 1], xs[r + 2], xs[r + 3]],
                                [gsums[r], gsums[r + 1], gsums[r + 2], gsums[r + 3]],
                                &mut out[r..r + 4],
                            );
                            r += 4;
                        } else {
                            w4_rows_avx512::<1>(w, [xs[r]], [gsums[r]], &mut out[r..r + 1]);
                            r += 1;
                        }
                    }
                }
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |w, xs, gsums, out| {
                if !w4_call_fits(w, xs, gsums, out) {
                    return w4_rows_portable(w, xs, gsums, out);
                }
                // Rows go four at a time, the rest singly; each row sees the
                // same arithmetic whatever the batch.
                let mut r = 0;
                while r < xs.len() {
                    // SAFETY: returned only after checking for AVX2 and FMA;
                    // the lengths were checked just above.
                    unsafe {
                        if r + 4 <= xs.len() {
                            w4_rows_avx2::<4>(
                                w,
                                [xs[r], xs[r + 1], xs[r + 2], xs[r + 3]],
                                [gsums[r], gsums[r + 1], gsums[r + 2], gsums[r + 3]],
                                &mut out[r..r + 4],
                            );
                            r += 4;
                        } else {
                            w4_rows_avx2::<1>(w, [xs[r]], [gsums[r]], &mut out[r..r + 1]);
                            r += 1;
                        }
                    }
                }
            };
        }
    }
    w4_rows_portable
}

/// Picks the fastest 4-bit group dot product this CPU supports.
pub fn best_nibble_dot() -> NibbleDotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |q, x| {
                // SAFETY: returned only after checking for AVX2 and FMA.
                unsafe { nibble_dot_avx2(q, x) }
            };
        }
    }
    nibble_dot_portable
}

#[cfg(test)]
mod nibble_tests {
    use super::*;

    #[test]
    fn nibble_dot_matches_a_plain_sum() {
        for n in [32usize, 64, 128] {
            let q: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % 16) as u8).collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 23) as f32 - 11.0) / 5.0)
                .collect();
            let packed: Vec<u8> = (0..n / 2).map(|j| q[j] | (q[j + n / 2] << 4)).collect();
            let want: f64 = q.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            for f in [best_nibble_dot(), nibble_dot_portable as NibbleDotFn] {
                let got = f(&packed, &x) as f64;
                assert!(
                    (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "n={n}: {got} vs {want}"
                );
            }
            // The multi-row kernel, on one group with scale 1 and zero 0,
            // gives every row its single result, bit for bit.
            let rows: Vec<Vec<f32>> = (0..7)
                .map(|r| x.iter().map(|v| v * (r as f32 + 0.5)).collect())
                .collect();
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let zero = vec![0f32; 1];
            let sums: Vec<&[f32]> = (0..7).map(|_| zero.as_slice()).collect();
            let w = W4Row {
                nibbles: &packed,
                scales: &[1.0],
                neg_zero_scaled: &[0.0],
                group_size: n,
            };
            let mut out = vec![0f32; 7];
            best_w4_rows()(&w, &refs, &sums, &mut out);
            for (r, &got) in out.iter().enumerate() {
                let want: f64 = q
                    .iter()
                    .zip(&rows[r])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                assert!(
                    (got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "row {r}: {got} vs {want}"
                );
                let mut one = [0f32];
                best_w4_rows()(&w, &refs[r..r + 1], &sums[..1], &mut one);
                assert_eq!(one[0].to_bits(), got.to_bits());
            }
        }
    }
}
