//! 4-bit weight, fp32 activation linears on the CPU (W4A16 in spirit: the
//! activations stay in full precision).
//!
//! At load the AutoAWQ `[in, out/8]` nibbles are repacked per output row:
//! row `n` is a run of groups along the input dimension; each group of `g`
//! values is `g/2` bytes, byte `j` holding value `j` in its low nibble and
//! value `j + g/2` in its high nibble (so a SIMD unpack yields two
//! contiguous halves). Beside them: one scale and one `-zero·scale` per
//! group. A skinny batch then reads each weight row once, contiguously:
//! `y = Σ_g s_g · (x_g · q_g) − z_g·s_g · Σ x_g`.

use rayon::prelude::*;

use super::simd::{W4Row, W4RowsFn};
use super::Matrix;
use crate::quant::awq::{unpack_int4, AwqTensors};

/// A repacked 4-bit weight.
pub struct W4Weight {
    /// `[out][in/2]`, half-split per group (see the module docs).
    nibbles: Vec<u8>,
    /// `[out][in/g]`.
    scales: Vec<f32>,
    /// `[out][in/g]`, `-zero · scale`.
    neg_zero_scaled: Vec<f32>,
    group_size: usize,
    in_features: usize,
    out_features: usize,
}

impl W4Weight {
    pub fn from_awq(t: &AwqTensors) -> Self {
        let (k, n, g) = (t.in_features, t.out_features, t.group_size);
        let q = unpack_int4(&t.qweight, k, n);
        let z = unpack_int4(&t.qzeros, k / g, n);
        let groups = k / g;
        let mut nibbles = vec![0u8; n * k / 2];
        let mut scales = vec![0f32; n * groups];
        let mut neg_zero_scaled = vec![0f32; n * groups];
        let half = g / 2;
        for o in 0..n {
            for gi in 0..groups {
                for j in 0..half {
                    let (a, b) = (gi * g + j, gi * g + j + half);
                    nibbles[o * k / 2 + gi * half + j] = q[a * n + o] | (q[b * n + o] << 4);
                }
            }
            for gi in 0..groups {
                let s = t.scales[gi * n + o].to_f32();
                scales[o * groups + gi] = s;
                neg_zero_scaled[o * groups + gi] = -(z[gi * n + o] as f32) * s;
            }
        }
        W4Weight {
            nibbles,
            scales,
            neg_zero_scaled,
            group_size: g,
            in_features: k,
            out_features: n,
        }
    }

    /// Bytes of nibbles, scales and zero terms.
    pub fn stored_bytes(&self) -> usize {
        self.nibbles.len() + 4 * (self.scales.len() + self.neg_zero_scaled.len())
    }

    /// One output row, dequantized into `dst` (`in_features` values).
    fn dequantize_row(&self, o: usize, dst: &mut [f32]) {
        let (k, g) = (self.in_features, self.group_size);
        let groups = k / g;
        let row = &self.nibbles[o * k / 2..(o + 1) * k / 2];
        let half = g / 2;
        for gi in 0..groups {
            let s = self.scales[o * groups + gi];
            let zs = self.neg_zero_scaled[o * groups + gi];
            let bytes = &row[gi * half..(gi + 1) * half];
            let out = &mut dst[gi * g..(gi + 1) * g];
            for (j, &b) in bytes.iter().enumerate() {
                out[j] = (b & 0xf) as f32 * s + zs;
                out[j + half] = (b >> 4) as f32 * s + zs;
            }
        }
    }

    /// The whole weight as fp32 `[out, in]`, for blocked GEMM on wide batches.
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.in_features;
        let mut w = vec![0f32; self.out_features * k];
        w.par_chunks_mut(k)
            .enumerate()
            .for_each(|(o, dst)| self.dequantize_row(o, dst));
        w
    }

    /// `out[r][o] = x[r] · w[o]` for a few rows. Each output row's nibbles
    /// are decoded once for several input rows; every row's arithmetic is
    /// the same as if it were alone.
    pub fn skinny(&self, x: &Matrix, out: &mut Matrix, rows_fn: W4RowsFn) {
        let (k, g, n, m) = (self.in_features, self.group_size, self.out_features, x.rows);
        let groups = k / g;
        // Σx per row and group, shared by every output.
        let mut group_sums = vec![0f32; m * groups];
        for r in 0..m {
            for gi in 0..groups {
                group_sums[r * groups + gi] = x.row(r)[gi * g..(gi + 1) * g].iter().sum();
            }
        }
        let xs: Vec<&[f32]> = (0..m).map(|r| x.row(r)).collect();
        let sums: Vec<&[f32]> = group_sums.chunks_exact(groups).collect();
        const CHUNK: usize = 32;
        let mut transposed = vec![0f32; n * m];
        transposed
            .par_chunks_mut(CHUNK * m)
            .enumerate()
            .for_each(|(c, dst)| {
                for (j, cell) in dst.chunks_exact_mut(m).enumerate() {
                    let o = c * CHUNK + j;
                    let row = W4Row {
                        nibbles: &self.nibbles[o * k / 2..(o + 1) * k / 2],
                        scales: &self.scales[o * groups..(o + 1) * groups],
                        neg_zero_scaled: &self.neg_zero_scaled[o * groups..(o + 1) * groups],
                        group_size: g,
                    };
                    rows_fn(&row, &xs, &sums, cell);
                }
            });
        for (o, cell) in transposed.chunks_exact(m).enumerate() {
            for (r, &v) in cell.iter().enumerate() {
                out.data[r * n + o] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::backend::cpu::simd::best_w4_rows;
    use crate::quant::awq::pack_int4;

    /// The skinny kernel against an f64 product with the weights
    /// dequantized straight from the AutoAWQ tensors, for every batch size
    /// it serves and each group size; and each row equal, bit for bit, to
    /// that row computed alone.
    #[test]
    fn skinny_matches_an_f64_product_and_is_batch_invariant() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for g in [32usize, 64, 128] {
            let (k, n) = (256usize, 40usize);
            let q: Vec<u8> = (0..k * n).map(|_| (next() % 16) as u8).collect();
            let z: Vec<u8> = (0..k / g * n).map(|_| (next() % 16) as u8).collect();
            let scales: Vec<f16> = (0..k / g * n)
                .map(|_| f16::from_f32(0.001 + (next() % 100) as f32 * 1e-4))
                .collect();
            let t = AwqTensors {
                in_features: k,
                out_features: n,
                group_size: g,
                qweight: pack_int4(&q, k, n),
                qzeros: pack_int4(&z, k / g, n),
                scales: scales.clone(),
            };
            let w = W4Weight::from_awq(&t);
            for m in [1usize, 3, 4, 5, 16] {
                let x = Matrix {
                    data: (0..m * k)
                        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                        .collect(),
                    rows: m,
                    cols: k,
                };
                let mut out = Matrix::zeros(m, n);
                w.skinny(&x, &mut out, best_w4_rows());
                for r in 0..m {
                    for o in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| {
                                let gi = i / g;
                                let s = scales[gi * n + o].to_f32() as f64;
                                let deq = (q[i * n + o] as f64 - z[gi * n + o] as f64) * s;
                                deq * x.row(r)[i] as f64
                            })
                            .sum();
                        let got = out.data[r * n + o] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "g={g} m={m} row {r} out {o}: {got} vs {want}"
                        );
                    }
                    let alone = Matrix {
                        data: x.row(r).to_vec(),
                        rows: 1,
                        cols: k,
                    };
                    let mut one = Matrix::zeros(1, n);
                    w.skinny(&alone, &mut one, best_w4_rows());
                    assert_eq!(one.data, out.data[r * n..(r + 1) * n]);
                }
            }
        }
    }
}
