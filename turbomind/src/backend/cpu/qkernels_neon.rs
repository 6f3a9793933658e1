//! NEON (aarch64) versions of the tile kernels of `qkernels.rs`, chosen by
//! [`QKernels::best`](super::QKernels::best) on aarch64.
//!
//! - **Integer family**: per 4-byte group of one output lane, `Σ q·xq` in
//!   int32, either with `sdot` by element (the `dotprod` extension, checked
//!   at run time; reported as "neon-dotprod"), or with plain NEON
//!   (`smull`/`smull2`, `addp`, `sadalp`; reported as "neon"). Both are
//!   exact, and the fp32 epilogue is the portable kernel's sequence of
//!   roundings, so they give the portable kernel's bits.
//! - **Exact family**: codes widened to fp32 and multiplied with fp32
//!   activations by `fmla` by element, as the AVX2 kernel does.
//!
//! A 128-bit vector holds 4 output lanes of a 64-byte chunk (4 bytes
//! each), so a tile is 4 vectors; the kernels work on half a tile (8
//! outputs, 2 vectors) at a time and at most 4 rows, which keeps the
//! accumulators within the 32 vector registers.
//!
//! `vdotq_s32` is not stable Rust, so `sdot` is written as inline assembly
//! in functions compiled with the `dotprod` feature.

use std::arch::aarch64::*;
use std::ops::Range;

use super::super::simd::widen_f16x8;
use super::{
    exact_fits, exact_portable, int_fits, int_portable, FRows, QRows, Tile, ACT_BLOCK, TILE,
};

/// Whether this CPU has the `sdot` instructions.
pub(super) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// How the integer kernel sums 4 byte products per 32-bit lane.
trait Dot4 {
    /// `acc[i] + Σ_j w[4i+j] · x[4L+j]` for the 4 lanes `i`, in exact
    /// int32 arithmetic. `L` is 0..4.
    ///
    /// # Safety
    ///
    /// The CPU must have the instructions this implementation uses.
    unsafe fn dot4<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;

    /// [`int_rows`] with this `dot4`, compiled with the features it needs.
    ///
    /// # Safety
    ///
    /// As [`int_rows`].
    unsafe fn rows<const R: usize>(
        t: &Tile<'_>,
        a: &QRows<'_>,
        r0: usize,
        half: usize,
        out: &mut [[f32; TILE]],
    );
}

/// `sdot` by element (the `dotprod` extension).
struct SDot;

impl Dot4 for SDot {
    #[inline(always)]
    unsafe fn dot4<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only arithmetic; the caller guarantees that the
        // CPU has `dotprod` (and runs this inside `int_rows_dotprod`,
        // compiled with it, so that the assembler accepts `sdot`).
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                l = const L,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    #[inline(always)]
    unsafe fn rows<const R: usize>(
        t: &Tile<'_>,
        a: &QRows<'_>,
        r0: usize,
        half: usize,
        out: &mut [[f32; TILE]],
    ) {
        // SAFETY: the caller's contract, which includes `dotprod`.
        unsafe { int_rows_dotprod::<R>(t, a, r0, half, out) }
    }
}

/// [`int_rows`] with `sdot`, compiled with `dotprod`.
///
/// # Safety
///
/// As [`int_rows`]; the CPU has `dotprod`.
#[target_feature(enable = "dotprod")]
unsafe fn int_rows_dotprod<const R: usize>(
    t: &Tile<'_>,
    a: &QRows<'_>,
    r0: usize,
    half: usize,
    out: &mut [[f32; TILE]],
) {
    // SAFETY: the caller's contract.
    unsafe { int_rows::<SDot, R>(t, a, r0, half, out) }
}

/// Plain NEON: widening products of the 16 bytes, then pairwise sums.
struct Widen;

impl Dot4 for Widen {
    #[inline(always)]
    unsafe fn dot4<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // Broadcast the 4 activations of lane L to every lane.
        let xb = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(x)));
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(xb));
        let hi = vmull_high_s8(w, xb);
        // Pairs of products fit 16 bits: |w| <= 127 (4-bit codes, or
        // 8-bit codes minus 128, never −128 as codes are never 0) and
        // |x| <= 128, so a pair is at most 2·127·128 = 32512. Then
        // `sadalp` adds each lane's two pairs into its int32.
        vpadalq_s16(acc, vpaddq_s16(lo, hi))
    }

    #[inline(always)]
    unsafe fn rows<const R: usize>(
        t: &Tile<'_>,
        a: &QRows<'_>,
        r0: usize,
        half: usize,
        out: &mut [[f32; TILE]],
    ) {
        // SAFETY: the caller's contract (plain NEON is baseline).
        unsafe { int_rows::<Widen, R>(t, a, r0, half, out) }
    }
}

/// The integer family with `sdot`.
pub(super) fn int_dotprod(
    t: &Tile<'_>,
    a: &QRows<'_>,
    rows: Range<usize>,
    out: &mut [[f32; TILE]],
) {
    int_with::<SDot>(t, a, rows, out)
}

/// The integer family with plain NEON.
pub(super) fn int_neon(t: &Tile<'_>, a: &QRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    int_with::<Widen>(t, a, rows, out)
}

#[inline(always)]
fn int_with<D: Dot4>(t: &Tile<'_>, a: &QRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !int_fits(t, a, &rows, out) {
        return int_portable(t, a, rows, out);
    }
    for half in 0..2 {
        by_rows!(rows, out, |r0, o, R| {
            // SAFETY: `int_dotprod` is only chosen after checking `dotprod`
            // (NEON itself is baseline on this target); the length
            // contract was checked above. Runs of 8 rows go as two of 4 to
            // stay within the vector registers.
            unsafe {
                if R > 4 {
                    D::rows::<4>(t, a, r0, half, o);
                    D::rows::<4>(t, a, r0 + 4, half, &mut o[4..]);
                } else {
                    D::rows::<R>(t, a, r0, half, o)
                }
            }
        });
    }
}

/// The fp16 scales and `zero · scale` of outputs `8·half..8·half+8` of
/// group `gi`.
///
/// # Safety
///
/// The tile must hold `(gi + 1) · TILE` scales and zeros.
#[inline(always)]
unsafe fn group_scales(
    t: &Tile<'_>,
    gi: usize,
    half: usize,
) -> ([float32x4_t; 2], [float32x4_t; 2]) {
    let at = gi * TILE + 8 * half;
    // SAFETY: the caller guarantees 8 scales and 8 zeros at `at`.
    unsafe {
        let (s0, s1) = widen_f16x8(vld1q_u16(t.scales.as_ptr().add(at) as *const u16));
        let z = vmovl_u8(vld1_u8(t.zeros.as_ptr().add(at)));
        let z0 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(z)));
        let z1 = vcvtq_f32_u32(vmovl_high_u16(z));
        ([s0, s1], [vmulq_f32(z0, s0), vmulq_f32(z1, s1)])
    }
}

/// The integer family for outputs `8·half..8·half+8` of the tile and rows
/// `r0..r0+R`.
///
/// # Safety
///
/// `int_fits` holds for rows `r0..r0+R`, `out` has `R` rows, and the CPU
/// has what `D` uses.
#[inline(always)]
unsafe fn int_rows<D: Dot4, const R: usize>(
    t: &Tile<'_>,
    a: &QRows<'_>,
    r0: usize,
    half: usize,
    out: &mut [[f32; TILE]],
) {
    let (k, g) = (a.k, t.group);
    let blocks = k / ACT_BLOCK;
    let blocks_per_group = g / ACT_BLOCK;
    let bits = t.bits as usize;
    let mask = vdupq_n_u8(0x0f);
    let flip = vdupq_n_u8(0x80);
    let zero = vdupq_n_f32(0.0);
    let mut res = [[zero; 2]; R];
    let (mut s, mut zs) = ([zero; 2], [zero; 2]);
    // SAFETY (all loads below): `int_fits` checked that the tile holds
    // `k·bits/32` chunks and `k/g·TILE` scales and zeros, and that rows
    // `r0..r0+R` of the activations and their block sums exist. Each chunk
    // is 64 bytes, of which this half reads 32 at offset 32·half.
    unsafe {
        let xs: [*const i8; R] = std::array::from_fn(|r| a.xq.as_ptr().add((r0 + r) * k));
        let codes = t.codes.as_ptr() as *const u8;
        // The two vectors (outputs 8·half..+4, +4..+8) of chunk `c`.
        let load = |c: usize| -> [uint8x16_t; 2] {
            let p = codes.add(64 * c + 32 * half);
            [vld1q_u8(p), vld1q_u8(p.add(16))]
        };
        for b in 0..blocks {
            if b % blocks_per_group == 0 {
                (s, zs) = group_scales(t, b / blocks_per_group, half);
            }
            let mut acc = [[vdupq_n_s32(0); 2]; R];
            let k0 = b * ACT_BLOCK;
            // A block is `bits` chunks: 4 of 8 inputs, or 8 of 4. Each
            // 16-byte load of activations serves 2 chunks of 4 bits or 4
            // of 8 bits, one 4-byte lane per `dot4`.
            if bits == 4 {
                for pair in 0..2 {
                    let (v0, v1) = (load(b * 4 + 2 * pair), load(b * 4 + 2 * pair + 1));
                    let lo = |v: [uint8x16_t; 2]| v.map(|v| vreinterpretq_s8_u8(vandq_u8(v, mask)));
                    let hi =
                        |v: [uint8x16_t; 2]| v.map(|v| vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)));
                    let (l0, h0, l1, h1) = (lo(v0), hi(v0), lo(v1), hi(v1));
                    for r in 0..R {
                        let x = vld1q_s8(xs[r].add(k0 + 16 * pair));
                        for i in 0..2 {
                            let mut p = D::dot4::<0>(acc[r][i], l0[i], x);
                            p = D::dot4::<1>(p, h0[i], x);
                            p = D::dot4::<2>(p, l1[i], x);
                            acc[r][i] = D::dot4::<3>(p, h1[i], x);
                        }
                    }
                }
            } else {
                for quad in 0..2 {
                    // Eight-bit codes go in signed as `code − 128`; the
                    // epilogue adds `128·Σx` back.
                    let w: [[int8x16_t; 2]; 4] = std::array::from_fn(|j| {
                        load(b * 8 + 4 * quad + j).map(|v| vreinterpretq_s8_u8(veorq_u8(v, flip)))
                    });
                    for r in 0..R {
                        let x = vld1q_s8(xs[r].add(k0 + 16 * quad));
                        for i in 0..2 {
                            let mut p = D::dot4::<0>(acc[r][i], w[0][i], x);
                            p = D::dot4::<1>(p, w[1][i], x);
                            p = D::dot4::<2>(p, w[2][i], x);
                            acc[r][i] = D::dot4::<3>(p, w[3][i], x);
                        }
                    }
                }
            }
            for r in 0..R {
                let idx = (r0 + r) * blocks + b;
                let isum = *a.isum.get_unchecked(idx);
                let visum = vdupq_n_f32(isum as f32);
                let d = vdupq_n_f32(*a.d.get_unchecked(idx));
                for i in 0..2 {
                    let mut p = acc[r][i];
                    if bits == 8 {
                        // Σ code·x = Σ (code − 128)·x + 128·Σx, exactly.
                        p = vaddq_s32(p, vdupq_n_s32(128 * isum));
                    }
                    // The portable kernel's roundings: a product, a fused
                    // multiply-subtract, a fused multiply-add.
                    let v = vfmsq_f32(vmulq_f32(vcvtq_f32_s32(p), s[i]), zs[i], visum);
                    res[r][i] = vfmaq_f32(res[r][i], v, d);
                }
            }
        }
        for (r, res) in res.iter().enumerate() {
            for (i, &v) in res.iter().enumerate() {
                vst1q_f32(out[r].as_mut_ptr().add(8 * half + 4 * i), v);
            }
        }
    }
}

/// The exact family on NEON.
pub(super) fn exact_neon(t: &Tile<'_>, a: &FRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !exact_fits(t, a, &rows, out) {
        return exact_portable(t, a, rows, out);
    }
    for half in 0..2 {
        by_rows!(rows, out, |r0, o, R| {
            // SAFETY: NEON is baseline on this target; the length contract
            // was checked above.
            unsafe {
                if R > 4 {
                    exact_rows::<4>(t, a, r0, half, o);
                    exact_rows::<4>(t, a, r0 + 4, half, &mut o[4..]);
                } else {
                    exact_rows::<R>(t, a, r0, half, o)
                }
            }
        });
    }
}

/// `acc + w · x[j]` (fused), for a lane `j` known when inlined.
#[inline(always)]
fn fma_lane(acc: float32x4_t, w: float32x4_t, x: float32x4_t, j: usize) -> float32x4_t {
    // SAFETY: register-only arithmetic; NEON is baseline on this target.
    unsafe {
        match j {
            0 => vfmaq_laneq_f32::<0>(acc, w, x),
            1 => vfmaq_laneq_f32::<1>(acc, w, x),
            2 => vfmaq_laneq_f32::<2>(acc, w, x),
            _ => vfmaq_laneq_f32::<3>(acc, w, x),
        }
    }
}

/// The exact family for outputs `8·half..8·half+8` of the tile: each code
/// is widened to fp32 and multiplied with an activation by element.
///
/// # Safety
///
/// `exact_fits` holds for rows `r0..r0+R`, and `out` has `R` rows.
#[inline(always)]
unsafe fn exact_rows<const R: usize>(
    t: &Tile<'_>,
    a: &FRows<'_>,
    r0: usize,
    half: usize,
    out: &mut [[f32; TILE]],
) {
    let (k, g) = (a.k, t.group);
    let groups = k / g;
    let bits = t.bits as usize;
    let per_chunk = 32 / bits;
    let per_group = g / per_chunk;
    let zero = vdupq_n_f32(0.0);
    let mut res = [[zero; 2]; R];
    // SAFETY (all loads below): as in `int_rows`, with `exact_fits`.
    unsafe {
        let xs: [*const f32; R] = std::array::from_fn(|r| a.x.as_ptr().add((r0 + r) * k));
        let codes = t.codes.as_ptr() as *const u8;
        let code_mask = vdupq_n_u32(if bits == 4 { 0x0f } else { 0xff });
        for gi in 0..groups {
            let mut acc = [[zero; 2]; R];
            for c in 0..per_group {
                let p = codes.add(64 * (gi * per_group + c) + 32 * half);
                let v = [
                    vld1q_u32(p as *const u32),
                    vld1q_u32(p.add(16) as *const u32),
                ];
                let kc = gi * g + c * per_chunk;
                // The chunk's activations: 4 or 8 per row.
                let x: [[float32x4_t; 2]; R] = std::array::from_fn(|r| {
                    let lo = vld1q_f32(xs[r].add(kc));
                    [
                        lo,
                        if bits == 4 {
                            vld1q_f32(xs[r].add(kc + 4))
                        } else {
                            lo
                        },
                    ]
                });
                for j in 0..per_chunk {
                    // Code `j` of every lane: byte `j % 4`, low nibble for
                    // j < 4 and high for j >= 4 (4 bits).
                    let shift = 8 * (j % 4) + 4 * (j / 4);
                    let by = vdupq_n_s32(-(shift as i32));
                    let w = v.map(|v| vcvtq_f32_u32(vandq_u32(vshlq_u32(v, by), code_mask)));
                    for r in 0..R {
                        for i in 0..2 {
                            acc[r][i] = fma_lane(acc[r][i], w[i], x[r][j / 4], j % 4);
                        }
                    }
                }
            }
            let (s, zs) = group_scales(t, gi, half);
            for r in 0..R {
                let gsum = vdupq_n_f32(*a.gsum.get_unchecked((r0 + r) * groups + gi));
                for i in 0..2 {
                    res[r][i] = vfmsq_f32(vfmaq_f32(res[r][i], s[i], acc[r][i]), zs[i], gsum);
                }
            }
        }
        for (r, res) in res.iter().enumerate() {
            for (i, &v) in res.iter().enumerate() {
                vst1q_f32(out[r].as_mut_ptr().add(8 * half + 4 * i), v);
            }
        }
    }
}
