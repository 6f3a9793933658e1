//! Kernels for the tiled quantized weights of `qweight.rs`: one tile (16
//! outputs) times a few activation rows, over the whole input dimension.
//!
//! Two families, each chosen at run time for this CPU:
//! - **Integer** (the default): activations quantized to int8 per block of
//!   [`ACT_BLOCK`] inputs (`x ≈ d·xq`), and per block `P = Σ q·xq`
//!   computed exactly in int32 (AVX-512 VNNI `vpdpbusd`, or AVX2
//!   `vpmaddubsw`), then folded into fp32 as `res += d · (s·P − z·s·Σxq)`
//!   with the scale `s` and zero `z` of the weight group holding the block.
//!   The integer part is exact and the fp32 epilogue is the same sequence
//!   of roundings in every variant, so the AVX-512, AVX2 and scalar kernels
//!   give the same bits.
//! - **Exact** (`--w4-activations fp32`): fp32 activations, codes widened
//!   to fp32, `res += s·Σ q·x − z·s·Σx` per group; only the weights are
//!   quantized.
//!
//! Every row goes through the same operations in the same order whatever
//! else is in the call, so a row's result does not depend on the batch
//! (batch invariance).
//!
//! On aarch64 the NEON versions live in `qkernels_neon.rs`: the integer
//! family with `sdot` ("neon-dotprod", when the CPU has it) or plain NEON
//! ("neon"), both bit for bit the portable kernel, and the exact family.

use std::ops::Range;

use half::f16;

/// Outputs per tile.
pub const TILE: usize = 16;

/// Inputs per int8 activation block (as llama.cpp's Q8_0). Weight groups
/// are whole numbers of blocks.
pub const ACT_BLOCK: usize = 32;

/// 64 bytes of codes: 16 outputs × 4 bytes (8 four-bit or 4 eight-bit
/// values each), aligned so that one vector load reads one chunk.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk(pub [u8; 64]);

/// One tile of a quantized weight (see `qweight.rs` for the layout).
pub struct Tile<'a> {
    /// `k · bits / 32` chunks.
    pub codes: &'a [Chunk],
    /// `[group][TILE]`.
    pub scales: &'a [f16],
    /// `[group][TILE]`, unsigned zero points.
    pub zeros: &'a [u8],
    pub group: usize,
    /// 4 or 8.
    pub bits: u32,
}

/// Activation rows quantized to int8 per block of [`ACT_BLOCK`].
pub struct QRows<'a> {
    /// `[row][k]`.
    pub xq: &'a [i8],
    /// `[row][block]`: the scale `d`.
    pub d: &'a [f32],
    /// `[row][block]`: `Σ xq` of the block.
    pub isum: &'a [i32],
    pub k: usize,
}

/// Activation rows in fp32, with their per-group sums.
pub struct FRows<'a> {
    /// `[row][k]`.
    pub x: &'a [f32],
    /// `[row][group]`.
    pub gsum: &'a [f32],
    pub k: usize,
}

/// `out[i] = tile · row (rows.start + i)` for the integer family.
pub type IntTileFn = fn(&Tile<'_>, &QRows<'_>, Range<usize>, &mut [[f32; TILE]]);
/// The same for the exact family.
pub type F32TileFn = fn(&Tile<'_>, &FRows<'_>, Range<usize>, &mut [[f32; TILE]]);

/// The kernels chosen for this CPU.
#[derive(Clone, Copy)]
pub struct QKernels {
    pub int: IntTileFn,
    pub exact: F32TileFn,
    /// Which integer kernel (for benchmarks and logs).
    pub int_name: &'static str,
}

impl QKernels {
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            let exact: F32TileFn = if avx2 { exact_avx2 } else { exact_portable };
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return QKernels {
                    int: int_vnni,
                    exact,
                    int_name: "avx512-vnni",
                };
            }
            if avx2 {
                return QKernels {
                    int: int_avx2,
                    exact,
                    int_name: "avx2",
                };
            }
        }
        // NEON is part of the baseline of the usual aarch64 targets; only
        // `sdot` (the `dotprod` extension) needs a run-time check.
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        {
            if neon::has_dotprod() {
                return QKernels {
                    int: neon::int_dotprod,
                    exact: neon::exact_neon,
                    int_name: "neon-dotprod",
                };
            }
            return QKernels {
                int: neon::int_neon,
                exact: neon::exact_neon,
                int_name: "neon",
            };
        }
        #[allow(unreachable_code)]
        Self::portable()
    }

    pub fn portable() -> Self {
        QKernels {
            int: int_portable,
            exact: exact_portable,
            int_name: "portable",
        }
    }
}

/// Whether a call satisfies the kernels' length contract; the SIMD kernels
/// read through raw pointers only after this holds. `sums` is the length of
/// the per-row sums and `per_row` how many each row has.
fn fits(
    t: &Tile<'_>,
    k: usize,
    rows: &Range<usize>,
    x_len: usize,
    sums: usize,
    per_row: usize,
) -> bool {
    let g = t.group;
    g > 0
        && g.is_multiple_of(ACT_BLOCK)
        && k.is_multiple_of(g)
        && (t.bits == 4 || t.bits == 8)
        && t.codes.len() * 32 == k * t.bits as usize
        && t.scales.len() == k / g * TILE
        && t.zeros.len() == k / g * TILE
        && rows.end * k <= x_len
        && rows.end * per_row <= sums
}

fn int_fits(t: &Tile<'_>, a: &QRows<'_>, rows: &Range<usize>, out: &[[f32; TILE]]) -> bool {
    let sums = a.d.len().min(a.isum.len());
    fits(t, a.k, rows, a.xq.len(), sums, a.k / ACT_BLOCK) && out.len() >= rows.len()
}

fn exact_fits(t: &Tile<'_>, a: &FRows<'_>, rows: &Range<usize>, out: &[[f32; TILE]]) -> bool {
    let per_row = a.k.checked_div(t.group).unwrap_or(0);
    fits(t, a.k, rows, a.x.len(), a.gsum.len(), per_row) && out.len() >= rows.len()
}

/// Code `j` (0..8 for 4 bits, 0..4 for 8 bits) of output `o` in a chunk.
#[inline(always)]
fn code(chunk: &Chunk, bits: u32, o: usize, j: usize) -> u8 {
    if bits == 8 {
        chunk.0[o * 4 + j]
    } else if j < 4 {
        chunk.0[o * 4 + j] & 0xf
    } else {
        chunk.0[o * 4 + j - 4] >> 4
    }
}

/// The integer family without SIMD: the reference the others match bit for
/// bit.
fn int_portable(t: &Tile<'_>, a: &QRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !int_fits(t, a, &rows, out) {
        out.iter_mut().for_each(|o| *o = [f32::NAN; TILE]);
        return;
    }
    let (k, g) = (a.k, t.group);
    let blocks = k / ACT_BLOCK;
    // Chunks per activation block: 4 (4-bit) or 8 (8-bit).
    let per_block = t.bits as usize;
    let per_chunk = 32 / t.bits as usize;
    for (i, r) in rows.enumerate() {
        let xq = &a.xq[r * k..(r + 1) * k];
        let mut res = [0f32; TILE];
        for b in 0..blocks {
            let gi = b * ACT_BLOCK / g;
            let d = a.d[r * blocks + b];
            let isum = a.isum[r * blocks + b] as f32;
            let chunks = &t.codes[b * per_block..(b + 1) * per_block];
            for (o, res) in res.iter_mut().enumerate() {
                let mut p = 0i32;
                for (c, chunk) in chunks.iter().enumerate() {
                    for j in 0..per_chunk {
                        let x = xq[b * ACT_BLOCK + c * per_chunk + j] as i32;
                        p += code(chunk, t.bits, o, j) as i32 * x;
                    }
                }
                let s = t.scales[gi * TILE + o].to_f32();
                let zs = t.zeros[gi * TILE + o] as f32 * s;
                // The same roundings as the SIMD epilogue: a product, a
                // fused negated multiply-add, a fused multiply-add.
                let v = (-zs).mul_add(isum, p as f32 * s);
                *res = v.mul_add(d, *res);
            }
        }
        out[i] = res;
    }
}

/// The exact family without SIMD.
fn exact_portable(t: &Tile<'_>, a: &FRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !exact_fits(t, a, &rows, out) {
        out.iter_mut().for_each(|o| *o = [f32::NAN; TILE]);
        return;
    }
    let (k, g) = (a.k, t.group);
    let groups = k / g;
    let per_chunk = 32 / t.bits as usize;
    for (i, r) in rows.enumerate() {
        let x = &a.x[r * k..(r + 1) * k];
        let mut res = [0f32; TILE];
        for gi in 0..groups {
            let chunks = &t.codes[gi * g / per_chunk..(gi + 1) * g / per_chunk];
            let gsum = a.gsum[r * groups + gi];
            for (o, res) in res.iter_mut().enumerate() {
                let mut dot = 0f32;
                for (c, chunk) in chunks.iter().enumerate() {
                    for j in 0..per_chunk {
                        dot += code(chunk, t.bits, o, j) as f32 * x[gi * g + c * per_chunk + j];
                    }
                }
                let s = t.scales[gi * TILE + o].to_f32();
                let zs = t.zeros[gi * TILE + o] as f32 * s;
                *res += s * dot - zs * gsum;
            }
        }
        out[i] = res;
    }
}

/// Runs `body::<R>` over `rows` in runs of up to 8 rows, then 4, 2, 1.
macro_rules! by_rows {
    ($rows:expr, $out:expr, |$r0:ident, $o:ident, $R:ident| $call:expr) => {{
        let mut r = $rows.start;
        let mut i = 0usize;
        while r < $rows.end {
            let left = $rows.end - r;
            let $r0 = r;
            let $o = &mut $out[i..];
            let step = if left >= 8 {
                const $R: usize = 8;
                $call;
                8
            } else if left >= 4 {
                const $R: usize = 4;
                $call;
                4
            } else if left >= 2 {
                const $R: usize = 2;
                $call;
                2
            } else {
                const $R: usize = 1;
                $call;
                1
            };
            r += step;
            i += step;
        }
    }};
}

// Declared after `by_rows!`, which it uses.
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
#[path = "qkernels_neon.rs"]
mod neon;

#[cfg(target_arch = "x86_64")]
fn int_vnni(t: &Tile<'_>, a: &QRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !int_fits(t, a, &rows, out) {
        return int_portable(t, a, rows, out);
    }
    by_rows!(rows, out, |r0, o, R| {
        // SAFETY: only chosen after checking AVX-512F/BW/VNNI; the length
        // contract was checked above.
        unsafe {
            if t.bits == 4 {
                int_vnni_rows::<R, 4>(t, a, r0, o)
            } else {
                int_vnni_rows::<R, 8>(t, a, r0, o)
            }
        }
    });
}

/// Broadcasts the four int8 activations at `p` to every 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bcast4_512(p: *const i8) -> std::arch::x86_64::__m512i {
    // SAFETY: the caller guarantees four readable bytes at `p`.
    unsafe { std::arch::x86_64::_mm512_set1_epi32((p as *const i32).read_unaligned()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int_vnni_rows<const R: usize, const BITS: u32>(
    t: &Tile<'_>,
    a: &QRows<'_>,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let (k, g) = (a.k, t.group);
    let blocks = k / ACT_BLOCK;
    let blocks_per_group = g / ACT_BLOCK;
    let mask = _mm512_set1_epi8(0x0f);
    let mut res = [_mm512_setzero_ps(); R];
    let xs: [*const i8; R] = std::array::from_fn(|r| a.xq.as_ptr().add((r0 + r) * k));
    let codes = t.codes.as_ptr() as *const __m512i;
    let (mut s, mut zs) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    // SAFETY (all loads below): `int_fits` checked that the tile holds
    // `k·BITS/32` chunks and `k/g·TILE` scales and zeros, and that rows
    // `r0..r0+R` of the activations and their block sums exist.
    for b in 0..blocks {
        if b % blocks_per_group == 0 {
            let gi = b / blocks_per_group;
            s = _mm512_cvtph_ps(_mm256_loadu_si256(
                t.scales.as_ptr().add(gi * TILE) as *const __m256i
            ));
            let z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                t.zeros.as_ptr().add(gi * TILE) as *const __m128i,
            )));
            zs = _mm512_mul_ps(z, s);
        }
        // Two accumulators per row, so that consecutive `vpdpbusd`s do not
        // wait on each other.
        let mut acc0 = [_mm512_setzero_si512(); R];
        let mut acc1 = [_mm512_setzero_si512(); R];
        // A block is BITS chunks: 4 of 8 inputs, or 8 of 4.
        let base = codes.add(b * BITS as usize);
        let k0 = b * ACT_BLOCK;
        if BITS == 4 {
            for c in 0..4 {
                let v = _mm512_load_si512(base.add(c));
                let lo = _mm512_and_si512(v, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                for r in 0..R {
                    let x = xs[r].add(k0 + 8 * c);
                    acc0[r] = _mm512_dpbusd_epi32(acc0[r], lo, bcast4_512(x));
                    acc1[r] = _mm512_dpbusd_epi32(acc1[r], hi, bcast4_512(x.add(4)));
                }
            }
        } else {
            for c in (0..8).step_by(2) {
                let v0 = _mm512_load_si512(base.add(c));
                let v1 = _mm512_load_si512(base.add(c + 1));
                for r in 0..R {
                    let x = xs[r].add(k0 + 4 * c);
                    acc0[r] = _mm512_dpbusd_epi32(acc0[r], v0, bcast4_512(x));
                    acc1[r] = _mm512_dpbusd_epi32(acc1[r], v1, bcast4_512(x.add(4)));
                }
            }
        }
        for r in 0..R {
            let idx = (r0 + r) * blocks + b;
            let p = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0[r], acc1[r]));
            let isum = _mm512_set1_ps(*a.isum.get_unchecked(idx) as f32);
            let v = _mm512_fnmadd_ps(zs, isum, _mm512_mul_ps(p, s));
            res[r] = _mm512_fmadd_ps(v, _mm512_set1_ps(*a.d.get_unchecked(idx)), res[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), res[r]);
    }
}

#[cfg(target_arch = "x86_64")]
fn int_avx2(t: &Tile<'_>, a: &QRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !int_fits(t, a, &rows, out) {
        return int_portable(t, a, rows, out);
    }
    for half in 0..2 {
        by_rows!(rows, out, |r0, o, R| {
            // SAFETY: only chosen after checking AVX2 and FMA; the length
            // contract was checked above. `R` is at most 8 here, but AVX2
            // has 16 registers, so runs are capped at 4 rows below.
            unsafe {
                if R > 4 {
                    int_avx2_rows::<4>(t, a, r0, half, o);
                    int_avx2_rows::<4>(t, a, r0 + 4, half, &mut o[4..]);
                } else {
                    int_avx2_rows::<R>(t, a, r0, half, o)
                }
            }
        });
    }
}

/// The integer family on AVX2, for outputs `8·half..8·half+8` of the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int_avx2_rows<const R: usize>(
    t: &Tile<'_>,
    a: &QRows<'_>,
    r0: usize,
    half: usize,
    out: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let (k, g) = (a.k, t.group);
    let blocks = k / ACT_BLOCK;
    let blocks_per_group = g / ACT_BLOCK;
    let bits = t.bits as usize;
    let mask = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let mut res = [_mm256_setzero_ps(); R];
    let xs: [*const i8; R] = std::array::from_fn(|r| a.xq.as_ptr().add((r0 + r) * k));
    let bcast = |p: *const i8| _mm256_set1_epi32((p as *const i32).read_unaligned());
    let (mut s, mut zs) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // SAFETY (all loads below): as in `int_vnni_rows`; each chunk is 64
    // bytes, of which this half reads 32 at offset 32·half.
    for b in 0..blocks {
        if b % blocks_per_group == 0 {
            let gi = b / blocks_per_group;
            s = _mm256_cvtph_ps(_mm_loadu_si128(
                t.scales.as_ptr().add(gi * TILE + 8 * half) as *const __m128i
            ));
            let z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                t.zeros.as_ptr().add(gi * TILE + 8 * half) as *const __m128i,
            )));
            zs = _mm256_mul_ps(z, s);
        }
        let mut acc = [_mm256_setzero_si256(); R];
        let k0 = b * ACT_BLOCK;
        // A block is `bits` chunks: 4 of 8 inputs, or 8 of 4.
        for c in 0..bits {
            let chunk = t.codes.as_ptr().add(b * bits + c) as *const u8;
            let v = _mm256_load_si256(chunk.add(32 * half) as *const __m256i);
            if bits == 4 {
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                for r in 0..R {
                    let x = xs[r].add(k0 + 8 * c);
                    // Codes are at most 15, so the pair sums cannot
                    // saturate 16 bits, nor can their sum over lo and hi.
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast(x)),
                        _mm256_maddubs_epi16(hi, bcast(x.add(4))),
                    );
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
                }
            } else {
                // Eight-bit codes would saturate `vpmaddubsw` as unsigned
                // operands, so they go in signed (code − 128) against |x|
                // with x's sign moved onto them, as llama.cpp does; codes
                // are never 0 (see `qweight.rs`), so no −128 arises.
                let w = _mm256_xor_si256(v, flip);
                for r in 0..R {
                    let x = bcast(xs[r].add(k0 + 4 * c));
                    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for r in 0..R {
            let idx = (r0 + r) * blocks + b;
            let isum = *a.isum.get_unchecked(idx);
            let mut p = acc[r];
            if bits == 8 {
                // Back from signed codes: Σ code·x = Σ (code − 128)·x + 128·Σx.
                p = _mm256_add_epi32(p, _mm256_set1_epi32(128 * isum));
            }
            let v = _mm256_fnmadd_ps(
                zs,
                _mm256_set1_ps(isum as f32),
                _mm256_mul_ps(_mm256_cvtepi32_ps(p), s),
            );
            res[r] = _mm256_fmadd_ps(v, _mm256_set1_ps(*a.d.get_unchecked(idx)), res[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), res[r]);
    }
}

#[cfg(target_arch = "x86_64")]
fn exact_avx2(t: &Tile<'_>, a: &FRows<'_>, rows: Range<usize>, out: &mut [[f32; TILE]]) {
    if !exact_fits(t, a, &rows, out) {
        return exact_portable(t, a, rows, out);
    }
    for half in 0..2 {
        by_rows!(rows, out, |r0, o, R| {
            // SAFETY: only chosen after checking AVX2 and FMA; the length
            // contract was checked above.
            unsafe {
                if R > 4 {
                    exact_avx2_rows::<4>(t, a, r0, half, o);
                    exact_avx2_rows::<4>(t, a, r0 + 4, half, &mut o[4..]);
                } else {
                    exact_avx2_rows::<R>(t, a, r0, half, o)
                }
            }
        });
    }
}

/// The exact family on AVX2, for outputs `8·half..8·half+8` of the tile:
/// each code is widened to fp32 and multiplied with a broadcast activation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exact_avx2_rows<const R: usize>(
    t: &Tile<'_>,
    a: &FRows<'_>,
    r0: usize,
    half: usize,
    out: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let (k, g) = (a.k, t.group);
    let groups = k / g;
    let bits = t.bits as usize;
    let per_chunk = 32 / bits;
    let per_group = g / per_chunk;
    let byte = _mm256_set1_epi32(0xff);
    let mut res = [_mm256_setzero_ps(); R];
    let xs: [*const f32; R] = std::array::from_fn(|r| a.x.as_ptr().add((r0 + r) * k));
    // SAFETY (all loads below): as in `int_avx2_rows`.
    for gi in 0..groups {
        let mut acc = [_mm256_setzero_ps(); R];
        for c in 0..per_group {
            let chunk = t.codes.as_ptr().add(gi * per_group + c) as *const u8;
            let v = _mm256_load_si256(chunk.add(32 * half) as *const __m256i);
            let (lo, hi) = if bits == 4 {
                let m = _mm256_set1_epi8(0x0f);
                (
                    _mm256_and_si256(v, m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), m),
                )
            } else {
                (v, v)
            };
            let kc = gi * g + c * per_chunk;
            for j in 0..per_chunk {
                let src = if j < 4 { lo } else { hi };
                let shifted = match j % 4 {
                    0 => src,
                    1 => _mm256_srli_epi32::<8>(src),
                    2 => _mm256_srli_epi32::<16>(src),
                    _ => _mm256_srli_epi32::<24>(src),
                };
                let w = _mm256_cvtepi32_ps(_mm256_and_si256(shifted, byte));
                for r in 0..R {
                    let x = _mm256_broadcast_ss(&*xs[r].add(kc + j));
                    acc[r] = _mm256_fmadd_ps(w, x, acc[r]);
                }
            }
        }
        let s = _mm256_cvtph_ps(_mm_loadu_si128(
            t.scales.as_ptr().add(gi * TILE + 8 * half) as *const __m128i
        ));
        let z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
            t.zeros.as_ptr().add(gi * TILE + 8 * half) as *const __m128i,
        )));
        let zs = _mm256_mul_ps(z, s);
        for r in 0..R {
            let gsum = _mm256_set1_ps(*a.gsum.get_unchecked((r0 + r) * groups + gi));
            res[r] = _mm256_fnmadd_ps(zs, gsum, _mm256_fmadd_ps(s, acc[r], res[r]));
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), res[r]);
    }
}

#[cfg(test)]
#[path = "qkernels_tests.rs"]
mod tests;
