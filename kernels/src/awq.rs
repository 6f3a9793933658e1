//! Host-side repacking of AutoAWQ "gemm" 4-bit weights into the layout the
//! W4A16 kernel streams (see `cu/w4a16.cu` and kernels/README.md).
//!
//! AutoAWQ layout, for `in` inputs, `out` outputs and group size `g`:
//! `qweight` int32 `[in, out/8]` where nibble `i` of packed column `c` holds
//! output `8c + AWQ_ORDER[i]`; `qzeros` int32 `[in/g, out/8]` packed the
//! same way; `scales` fp16 `[in/g, out]`; `w[k][n] = (q − z) · s`. The order
//! mirrors `lmq_turbomind::quant::awq::AWQ_PACK_ORDER`, which this crate
//! cannot import (turbomind depends on kernels).

use half::f16;

use crate::error::{KernelError, Result};

/// Which output column nibble `i` of an AutoAWQ int32 holds, relative to 8c.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Group sizes the kernel supports.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Inputs per k-block of the kernel layout; `in` is padded up to a multiple.
pub const K_BLOCK: usize = 128;

/// 4-bit weights in the kernel's layout, still on the host.
///
/// - `qw`: for column tile `nt` (8 outputs) and k-block `kb` (128 inputs),
///   512 bytes at words `((nt·KB + kb)·32 + lane)·4 .. +4`. Lane `4g + t`
///   owns output `8nt + g`; nibble `p` of its word `i` holds input
///   `128kb + 32i + 8t + 2(p & 3) + (p >> 2)`. Inputs past `in` hold 0.
/// - `scales`: `[in/g][out]` fp16, as in AutoAWQ.
/// - `zeros`: `[in/g][out]` fp16 holding `1024 + z` (the kernel subtracts
///   it from `1024 + q`, which is what the code bits become as fp16).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedW4 {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    pub qw: Vec<u32>,
    pub scales: Vec<f16>,
    pub zeros: Vec<f16>,
}

impl PackedW4 {
    /// k-blocks per column tile (`ceil(in / 128)`).
    pub fn k_blocks(&self) -> usize {
        self.in_features.div_ceil(K_BLOCK)
    }

    /// Bytes the kernel reads per call for the weights (codes plus scales and zeros).
    pub fn weight_bytes(&self) -> usize {
        4 * self.qw.len() + 2 * (self.scales.len() + self.zeros.len())
    }

    /// Where input `k` of output `n` lives: (word index into `qw`, nibble).
    pub fn locate(in_features: usize, k: usize, n: usize) -> (usize, u32) {
        let kbs = in_features.div_ceil(K_BLOCK);
        let (nt, g) = (n / 8, n % 8);
        let (kb, kk) = (k / K_BLOCK, k % K_BLOCK);
        let (word, r) = (kk / 32, kk % 32);
        let (t, o) = (r / 8, r % 8);
        // o = 2(p & 3) + (p >> 2)
        let p = (o >> 1) | ((o & 1) << 2);
        let lane = 4 * g + t;
        (((nt * kbs + kb) * 32 + lane) * 4 + word, p as u32)
    }

    /// Where output `n` of a stacked `[gate | up]` layer (each half
    /// `out/2` outputs) sits after [`Self::interleave_halves`]: gate tile
    /// `b` (outputs `8b .. 8b + 8`) becomes tile `2b`, up tile `b` tile
    /// `2b + 1`.
    pub fn interleaved_column(out_features: usize, n: usize) -> usize {
        let half = out_features / 2;
        let (part, c) = if n < half { (0, n) } else { (8, n - half) };
        16 * (c / 8) + part + c % 8
    }

    /// This stacked `[gate | up]` layer with its column tiles interleaved
    /// (gate tile `b`, then up tile `b`; see
    /// [`Self::interleaved_column`]), so that one block of the W4A16 kernel,
    /// which owns tiles `2b` and `2b + 1`, holds matching gate and up
    /// outputs and can store `silu(gate) · up` itself
    /// (`W4A16Linear::forward_silu_pairs`). Needs `out_features` a
    /// multiple of 16 (whole tiles in each half).
    pub fn interleave_halves(&self) -> Result<PackedW4> {
        let n = self.out_features;
        if !n.is_multiple_of(16) {
            return Err(KernelError::shape(
                "W4A16 gate/up interleave",
                format!("{n} outputs do not split into two halves of whole 8-output tiles"),
            ));
        }
        let tile_words = self.k_blocks() * 32 * 4;
        let mut qw = vec![0u32; self.qw.len()];
        for old in 0..n / 8 {
            let new = Self::interleaved_column(n, 8 * old) / 8;
            qw[new * tile_words..(new + 1) * tile_words]
                .copy_from_slice(&self.qw[old * tile_words..(old + 1) * tile_words]);
        }
        let permute = |v: &[f16]| -> Vec<f16> {
            let mut out = vec![f16::ZERO; v.len()];
            for (row_in, row_out) in v.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
                for (c, &x) in row_in.iter().enumerate() {
                    row_out[Self::interleaved_column(n, c)] = x;
                }
            }
            out
        };
        Ok(PackedW4 {
            in_features: self.in_features,
            out_features: n,
            group_size: self.group_size,
            qw,
            scales: permute(&self.scales),
            zeros: permute(&self.zeros),
        })
    }

    /// Repacks AutoAWQ gemm tensors (see the module docs) for the kernel.
    pub fn from_awq(
        qweight: &[i32],
        qzeros: &[i32],
        scales: &[f16],
        in_features: usize,
        out_features: usize,
        group_size: usize,
    ) -> Result<Self> {
        const OP: &str = "W4A16 repack";
        if !GROUP_SIZES.contains(&group_size) {
            return Err(KernelError::invalid(
                OP,
                format!("group size {group_size} is not supported (supported: 32, 64, 128)"),
            ));
        }
        if in_features == 0 || !in_features.is_multiple_of(group_size) {
            return Err(KernelError::shape(
                OP,
                format!("in_features {in_features} must be a positive multiple of the group size {group_size}"),
            ));
        }
        if out_features == 0 || !out_features.is_multiple_of(8) {
            return Err(KernelError::shape(
                OP,
                format!("out_features {out_features} must be a positive multiple of 8"),
            ));
        }
        if in_features > i32::MAX as usize / 2 || out_features > i32::MAX as usize / 2 {
            return Err(KernelError::shape(
                OP,
                "dimensions exceed the kernel's 32-bit indexing",
            ));
        }
        let groups = in_features / group_size;
        let pc = out_features / 8;
        let check = |what: &str, got: usize, want: usize, shape: String| {
            if got == want {
                Ok(())
            } else {
                Err(KernelError::shape(
                    OP,
                    format!("{what} must be {shape} = {want} elements, got {got}"),
                ))
            }
        };
        check(
            "qweight",
            qweight.len(),
            in_features * pc,
            format!("[{in_features}, {pc}]"),
        )?;
        check(
            "qzeros",
            qzeros.len(),
            groups * pc,
            format!("[{groups}, {pc}]"),
        )?;
        check(
            "scales",
            scales.len(),
            groups * out_features,
            format!("[{groups}, {out_features}]"),
        )?;

        let kbs = in_features.div_ceil(K_BLOCK);
        let mut qw = vec![0u32; pc * kbs * 32 * 4];
        for k in 0..in_features {
            for c in 0..pc {
                let word = qweight[k * pc + c] as u32;
                for (i, &o) in AWQ_ORDER.iter().enumerate() {
                    let q = (word >> (4 * i)) & 0xF;
                    let (idx, p) = Self::locate(in_features, k, 8 * c + o);
                    qw[idx] |= q << (4 * p);
                }
            }
        }
        let mut zeros = vec![f16::ZERO; groups * out_features];
        for grp in 0..groups {
            for c in 0..pc {
                let zword = qzeros[grp * pc + c] as u32;
                for (i, &o) in AWQ_ORDER.iter().enumerate() {
                    let z = (zword >> (4 * i)) & 0xF;
                    zeros[grp * out_features + 8 * c + o] = f16::from_f32(1024.0 + z as f32);
                }
            }
        }
        Ok(Self {
            in_features,
            out_features,
            group_size,
            qw,
            scales: scales.to_vec(),
            zeros,
        })
    }
}

#[cfg(test)]
mod tests {
    /// AutoAWQ packing of `rows × cols` codes (the format's definition).
    fn pack_awq(vals: &[u32], rows: usize, cols: usize) -> Vec<i32> {
        let mut out = vec![0i32; rows * cols / 8];
        for r in 0..rows {
            for c in 0..cols / 8 {
                let mut w = 0u32;
                for (i, &o) in AWQ_ORDER.iter().enumerate() {
                    w |= vals[r * cols + 8 * c + o] << (4 * i);
                }
                out[r * cols / 8 + c] = w as i32;
            }
        }
        out
    }

    use super::*;

    /// The repacked codes decode (by the documented formula) to the same
    /// q and zero/scale as the AutoAWQ input.
    #[test]
    fn repack_round_trips() {
        let (inf, outf, g) = (384usize, 24usize, 64usize);
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let q: Vec<u32> = (0..inf * outf).map(|_| (next() % 16) as u32).collect();
        let z: Vec<u32> = (0..inf / g * outf).map(|_| (next() % 16) as u32).collect();
        let s: Vec<f16> = (0..inf / g * outf)
            .map(|_| f16::from_f32((next() % 1000) as f32 * 1e-5 + 1e-3))
            .collect();
        let pack = |vals: &[u32], rows: usize| pack_awq(vals, rows, outf);
        let p = PackedW4::from_awq(&pack(&q, inf), &pack(&z, inf / g), &s, inf, outf, g).unwrap();
        let kbs = inf.div_ceil(K_BLOCK);
        for nt in 0..outf / 8 {
            for kb in 0..kbs {
                for lane in 0..32 {
                    for i in 0..4 {
                        let word = p.qw[((nt * kbs + kb) * 32 + lane) * 4 + i];
                        for pos in 0..8u32 {
                            let (g8, t) = (lane / 4, lane % 4);
                            let pu = pos as usize;
                            let k = 128 * kb + 32 * i + 8 * t + 2 * (pu & 3) + (pu >> 2);
                            let got = (word >> (4 * pos)) & 0xF;
                            let want = if k < inf {
                                q[k * outf + 8 * nt + g8]
                            } else {
                                0
                            };
                            assert_eq!(
                                got, want,
                                "nt {nt} kb {kb} lane {lane} word {i} nibble {pos}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(p.scales, s);
        for (i, zb) in p.zeros.iter().enumerate() {
            assert_eq!(zb.to_f32(), 1024.0 + z[i] as f32);
        }
    }

    #[test]
    fn repack_rejects_bad_shapes() {
        let e = PackedW4::from_awq(&[], &[], &[], 100, 8, 64).unwrap_err();
        assert!(e.to_string().contains("multiple of the group size"), "{e}");
        let e = PackedW4::from_awq(&[], &[], &[], 128, 12, 64).unwrap_err();
        assert!(e.to_string().contains("multiple of 8"), "{e}");
        let e = PackedW4::from_awq(&[0; 5], &[0; 2], &[f16::ZERO; 16], 128, 8, 64).unwrap_err();
        assert!(e.to_string().contains("qweight"), "{e}");
        let e = PackedW4::from_awq(&[], &[], &[], 128, 8, 16).unwrap_err();
        assert!(e.to_string().contains("group size 16"), "{e}");
    }

    /// Interleaving moves every code, scale and zero of output `n` to
    /// output `interleaved_column(n)`, which is a permutation: gate and up
    /// alternate by tiles of 8.
    #[test]
    fn interleave_halves_moves_whole_columns() {
        let (inf, outf, g) = (192, 48, 64);
        let mut state = 0x1234_5678u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as u32
        };
        let q: Vec<u32> = (0..inf * outf).map(|_| next() % 16).collect();
        let z: Vec<u32> = (0..inf / g * outf).map(|_| next() % 16).collect();
        let s: Vec<f16> = (0..inf / g * outf)
            .map(|_| f16::from_f32((next() % 1000) as f32 * 1e-3))
            .collect();
        let pack = |vals: &[u32], rows: usize| pack_awq(vals, rows, outf);
        let p = PackedW4::from_awq(&pack(&q, inf), &pack(&z, inf / g), &s, inf, outf, g).unwrap();
        let il = p.interleave_halves().unwrap();
        let mut seen = vec![false; outf];
        for n in 0..outf {
            let m = PackedW4::interleaved_column(outf, n);
            assert!(!seen[m], "column {m} is the image of two outputs");
            seen[m] = true;
            // Gate output c and up output c share a block (tiles 2b, 2b + 1).
            if n < outf / 2 {
                let up = PackedW4::interleaved_column(outf, n + outf / 2);
                assert_eq!((m / 16, m % 8, m % 16 < 8), (up / 16, up % 8, true));
                assert_eq!(up % 16, m % 16 + 8);
            }
            for k in 0..inf {
                let (wo, no) = PackedW4::locate(inf, k, n);
                let (wi, ni) = PackedW4::locate(inf, k, m);
                assert_eq!((p.qw[wo] >> (4 * no)) & 0xF, (il.qw[wi] >> (4 * ni)) & 0xF);
            }
            for grp in 0..inf / g {
                assert_eq!(p.scales[grp * outf + n], il.scales[grp * outf + m]);
                assert_eq!(p.zeros[grp * outf + n], il.zeros[grp * outf + m]);
            }
        }
        let odd = PackedW4 {
            out_features: 40,
            ..p.clone()
        };
        assert!(odd.interleave_halves().is_err(), "40 outputs interleaved");
    }
}
