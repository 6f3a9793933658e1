//! NEON (aarch64) versions of the small kernels of `simd.rs`: fp16
//! widening, the fp16-by-fp32 dot product, the int8 activation quantizer,
//! `exp` and SiLU·mul. NEON is baseline on the aarch64 targets this is
//! compiled for, so none needs a run-time check.
//!
//! fp16 is widened with `fcvtl`/`fcvtl2` in inline assembly: they are base
//! Armv8 NEON (the `fp16` extension only adds fp16 arithmetic), and the
//! `vcvt_f32_f16` intrinsic is newer than this crate's minimum Rust.

use std::arch::aarch64::*;
use std::arch::asm;

/// Eight fp16 values (as bits) widened to f32, as two vectors of 4. The
/// conversion is exact.
#[inline(always)]
pub(in crate::backend::cpu) fn widen_f16x8(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: register-only conversions of base aarch64 NEON. `lo` is an
    // early output (distinct from `h`, which the second instruction still
    // reads); `hi` is written last.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = lateout(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    (lo, hi)
}

/// fp16 bit patterns to f32, 16 at a time, the rest as the portable
/// version.
pub(super) fn widen_f16(bits: &[u16], out: &mut [f32]) {
    let n = bits.len().min(out.len());
    let full = n / 8 * 8;
    let mut i = 0;
    // SAFETY (loads and stores): i + 8 <= full <= the length of both.
    unsafe {
        while i < full {
            let (lo, hi) = widen_f16x8(vld1q_u16(bits.as_ptr().add(i)));
            vst1q_f32(out.as_mut_ptr().add(i), lo);
            vst1q_f32(out.as_mut_ptr().add(i + 4), hi);
            i += 8;
        }
    }
    super::widen_f16_portable(&bits[full..n], &mut out[full..n]);
}

/// `Σ a·b` with `a` in fp16, in exactly the order of `super::dot_body`
/// (32 lanes of fused multiply-adds, a plain tail, the same pairwise
/// reduction), so that for weights that fp16 holds exactly it returns the
/// fp32 dot product's bits.
pub(super) fn dot_f16(a: &[half::f16], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr());
    let chunks = n / 32;
    // SAFETY: NEON is baseline on this target; the loads read at
    // (c + 1)·32 <= n, and both slices hold n values.
    let mut acc = unsafe {
        let mut acc = [vdupq_n_f32(0.0); 8];
        for c in 0..chunks {
            for h in 0..4 {
                let (lo, hi) = widen_f16x8(vld1q_u16(pa.add(32 * c + 8 * h)));
                let y = pb.add(32 * c + 8 * h);
                acc[2 * h] = vfmaq_f32(acc[2 * h], lo, vld1q_f32(y));
                acc[2 * h + 1] = vfmaq_f32(acc[2 * h + 1], hi, vld1q_f32(y.add(4)));
            }
        }
        acc
    };
    let mut tail = 0f32;
    for i in chunks * 32..n {
        tail += a[i].to_f32() * b[i];
    }
    // `dot_body`'s reduction: lanes `i += i + width` for widths 16, 8, 4
    // (whole vectors), then 2 and 1 within the first vector.
    // SAFETY: register-only NEON arithmetic (baseline on this target).
    unsafe {
        for width in [4, 2, 1] {
            for i in 0..width {
                acc[i] = vaddq_f32(acc[i], acc[i + width]);
            }
        }
        let v = acc[0];
        let pair = vadd_f32(vget_low_f32(v), vget_high_f32(v));
        (vget_lane_f32::<0>(pair) + vget_lane_f32::<1>(pair)) + tail
    }
}

/// The int8 quantizer of `simd.rs`, 16 values at a time: the same values
/// as the portable version (the maximum and the NaN test do not depend on
/// the order, and each code is the same rounding of the same product).
pub(super) fn quantize_group(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use super::{group_scale, quantize_one, ROUND_MAGIC};
    let n = x.len().min(q.len());
    let full = n / 16 * 16;
    let px = x.as_ptr();
    // SAFETY (here and below): NEON is baseline on this target; the loads
    // read at i + 4 <= full <= n, the length of both slices.
    let (mut amax, mut poison) = unsafe {
        let zero = vdupq_n_f32(0.0);
        let (mut vmax, mut vpoison) = (zero, zero);
        for i in (0..full).step_by(4) {
            let v = vld1q_f32(px.add(i));
            // `fmaxnm` ignores NaN as `f32::max` does; NaN is caught by
            // the poison sum.
            vmax = vmaxnmq_f32(vmax, vabsq_f32(v));
            vpoison = vaddq_f32(vpoison, vmulq_f32(v, zero));
        }
        (vmaxnmvq_f32(vmax), vaddvq_f32(vpoison))
    };
    for &v in &x[full..n] {
        amax = amax.max(v.abs());
        poison += v * 0.0;
    }
    let Some((d, inv)) = group_scale(amax, poison) else {
        q.iter_mut().for_each(|c| *c = 0);
        return (f32::NAN, 0);
    };
    // SAFETY (loads and stores): i + 16 <= full <= n.
    let mut sum = unsafe {
        let vinv = vdupq_n_f32(inv);
        let magic = vdupq_n_f32(ROUND_MAGIC);
        let (lo, hi) = (vdupq_n_f32(-127.0), vdupq_n_f32(127.0));
        let mut vsum = vdupq_n_s32(0);
        for i in (0..full).step_by(16) {
            let c: [int32x4_t; 4] = std::array::from_fn(|j| {
                let t = vmulq_f32(vld1q_f32(px.add(i + 4 * j)), vinv);
                let r = vsubq_f32(vaddq_f32(t, magic), magic);
                // `r` is already a whole number, so truncation is exact.
                vcvtq_s32_f32(vminq_f32(vmaxq_f32(r, lo), hi))
            });
            for v in c {
                vsum = vaddq_s32(vsum, v);
            }
            let h0 = vcombine_s16(vmovn_s32(c[0]), vmovn_s32(c[1]));
            let h1 = vcombine_s16(vmovn_s32(c[2]), vmovn_s32(c[3]));
            let b = vcombine_s8(vmovn_s16(h0), vmovn_s16(h1));
            vst1q_s8(q.as_mut_ptr().add(i), b);
        }
        vaddvq_s32(vsum)
    };
    for (c, &v) in q[full..n].iter_mut().zip(&x[full..n]) {
        let r = quantize_one(v, inv);
        *c = r as i8;
        sum += r;
    }
    (d, sum)
}

/// `e^x` for 4 lanes: `super::exp512`'s method (Cephes' `expf`: a degree-5
/// polynomial on `x − n·ln 2`, then `·2ⁿ`), with inputs clamped to ±88.3.
/// `2ⁿ` is applied as two factors `2^(n/2)`, `2^(n − n/2)`, each a normal
/// float, so that results down to the subnormals are rounded once.
#[inline(always)]
pub(in crate::backend::cpu) fn exp4(x: float32x4_t) -> float32x4_t {
    // SAFETY: register-only NEON arithmetic (baseline on this target).
    unsafe {
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-88.3)), vdupq_n_f32(88.3));
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
        let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4));
        let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
        let mut p = vdupq_n_f32(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let r2 = vmulq_f32(r, r);
        let y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), p, r2);
        // |n| <= 128, so both halves lie in -64..=64.
        let ni = vcvtq_s32_f32(n);
        let n1 = vshrq_n_s32::<1>(ni);
        let n2 = vsubq_s32(ni, n1);
        let pow2 =
            |k: int32x4_t| vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(k, vdupq_n_s32(127))));
        vmulq_f32(vmulq_f32(y, pow2(n1)), pow2(n2))
    }
}

/// `out = silu(gate) · up`, 4 lanes at a time, the rest as the portable
/// version.
pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len().min(up.len()).min(out.len());
    let full = n / 4 * 4;
    // SAFETY: NEON is baseline on this target; the loads and stores are at
    // i + 4 <= full <= the length of all three slices.
    unsafe {
        let one = vdupq_n_f32(1.0);
        for i in (0..full).step_by(4) {
            let g = vld1q_f32(gate.as_ptr().add(i));
            let u = vld1q_f32(up.as_ptr().add(i));
            let s = vdivq_f32(g, vaddq_f32(one, exp4(vnegq_f32(g))));
            vst1q_f32(out.as_mut_ptr().add(i), vmulq_f32(s, u));
        }
    }
    super::silu_mul_portable(&gate[full..n], &up[full..n], &mut out[full..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_for_every_fp16_value() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let (mut got, mut want) = (vec![0f32; bits.len()], vec![0f32; bits.len()]);
        widen_f16(&bits, &mut got);
        super::super::widen_f16_portable(&bits, &mut want);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{i:#06x}: {g} vs {w}"
            );
        }
        // Lengths that are not a multiple of 8 (the portable tail).
        let mut short = vec![0f32; 13];
        widen_f16(&bits[1000..1013], &mut short);
        assert_eq!(short, want[1000..1013]);
    }

    #[test]
    fn dot_f16_gives_the_f32_dot_product_bits() {
        for n in [0usize, 1, 31, 32, 33, 64, 100, 576, 1537] {
            let a: Vec<half::f16> = (0..n)
                .map(|i| half::f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 17.0))
                .collect();
            let wide: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0)
                .collect();
            assert_eq!(
                dot_f16(&a, &b).to_bits(),
                super::super::dot_body(&wide, &b).to_bits(),
                "n {n}"
            );
        }
    }

    #[test]
    fn exp4_is_within_a_few_ulp_of_libm() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0441).collect();
        for c in xs.chunks_exact(4) {
            let mut got = [0f32; 4];
            // SAFETY: `c` and `got` hold 4 values each.
            unsafe { vst1q_f32(got.as_mut_ptr(), exp4(vld1q_f32(c.as_ptr()))) };
            for (&x, &g) in c.iter().zip(&got) {
                let want = (x as f64).exp();
                let tol = 4.0 * f32::EPSILON as f64 * want + f32::MIN_POSITIVE as f64;
                assert!(
                    (g as f64 - want).abs() <= tol,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
    }
}
