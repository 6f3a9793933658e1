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
    let lo = _mm256_castps256_ps128(sum);
    let hi = _mm256_extractf128_ps(sum, 1);
    let s4 = _mm_add_ps(lo, hi);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    let mut total = _mm_cvtss_f32(s1);
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
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
        }
    }
}
