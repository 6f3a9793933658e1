//! Linear layers on the CPU: dense weights (fp16 where that is exact, else
//! fp32) and 4-bit AWQ weights.

use rayon::prelude::*;

use half::f16;

use super::simd::{DotF16Fn, DotFn, W4RowsFn};
use super::w4::W4Weight;
use super::{shape_error, Matrix};
use crate::backend::{HostLinear, HostWeight};
use crate::error::Result;

/// Batches up to this many rows use the dot-product kernel, which streams
/// each weight row once for all of them; wider ones use blocked GEMM. The
/// dot kernel computes every row the same way whatever the batch, so a
/// decode batch of up to 16 sequences gives each exactly the tokens it gets
/// alone (batch invariance).
pub const SKINNY_ROWS: usize = 16;

/// How a CPU linear stores its weight.
pub enum CpuWeight {
    /// fp32 `[out, in]` row-major.
    Dense(Vec<f32>),
    /// fp16 `[out, in]` row-major, for weights that fp16 holds exactly
    /// (every fp16 checkpoint): half the bytes to stream per token, the
    /// same results.
    DenseF16(Vec<f16>),
    /// 4-bit groups, repacked per output row.
    W4(W4Weight),
}

/// A linear layer on the CPU.
pub struct CpuLinear {
    pub(super) weight: CpuWeight,
    pub(super) bias: Option<Vec<f32>>,
    pub out_features: usize,
    pub in_features: usize,
}

impl CpuLinear {
    pub fn new(w: HostLinear) -> Result<Self> {
        let weight = match w.weight {
            HostWeight::Dense(values) => {
                if values.len() != w.out_features * w.in_features {
                    return Err(shape_error(format!(
                        "linear weight has {} values, expected {}x{}",
                        values.len(),
                        w.out_features,
                        w.in_features
                    )));
                }
                let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                if halves
                    .iter()
                    .zip(&values)
                    .all(|(h, v)| h.to_f32().to_bits() == v.to_bits())
                {
                    CpuWeight::DenseF16(halves)
                } else {
                    CpuWeight::Dense(values)
                }
            }
            HostWeight::Awq(t) => {
                if t.in_features != w.in_features || t.out_features != w.out_features {
                    return Err(shape_error(format!(
                        "AWQ weight is {}x{}, expected {}x{}",
                        t.out_features, t.in_features, w.out_features, w.in_features
                    )));
                }
                CpuWeight::W4(W4Weight::from_awq(&t))
            }
        };
        if let Some(b) = &w.bias {
            if b.len() != w.out_features {
                return Err(shape_error(format!(
                    "bias has {} values, expected {}",
                    b.len(),
                    w.out_features
                )));
            }
        }
        Ok(CpuLinear {
            weight,
            bias: w.bias,
            out_features: w.out_features,
            in_features: w.in_features,
        })
    }

    pub fn forward(&self, x: &Matrix, kernels: &Kernels) -> Result<Matrix> {
        let (k, n) = (self.in_features, self.out_features);
        if x.cols != k {
            return Err(shape_error(format!(
                "linear: input has {} columns, weight expects {k}",
                x.cols
            )));
        }
        let m = x.rows;
        let mut out = Matrix::zeros(m, n);
        if m == 0 {
            return Ok(out);
        }
        let dequantized;
        let dense = match &self.weight {
            CpuWeight::Dense(w) if m <= SKINNY_ROWS => {
                self.skinny(w, x, &mut out, kernels.dot);
                return Ok(self.add_bias(out));
            }
            CpuWeight::DenseF16(w) if m <= SKINNY_ROWS => {
                self.skinny(w, x, &mut out, kernels.dot_f16);
                return Ok(self.add_bias(out));
            }
            CpuWeight::W4(w4) if m <= SKINNY_ROWS => {
                w4.skinny(x, &mut out, kernels.w4_rows);
                return Ok(self.add_bias(out));
            }
            CpuWeight::Dense(w) => w,
            CpuWeight::DenseF16(w) => {
                dequantized = widen(w);
                &dequantized
            }
            CpuWeight::W4(w4) => {
                dequantized = w4.dequantize();
                &dequantized
            }
        };
        {
            // SAFETY: `out` is m×n with row stride n, `x` is m×k with row
            // stride k, and the weight is n×k row-major, read as the k×n
            // right-hand side with row stride 1 and column stride k; all
            // three buffers are exactly that large (checked above).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.data.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.data.as_ptr(),
                    1,
                    k as isize,
                    dense.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        Ok(self.add_bias(out))
    }

    fn add_bias(&self, mut out: Matrix) -> Matrix {
        if let Some(bias) = &self.bias {
            for row in out.data.chunks_exact_mut(self.out_features) {
                for (o, &b) in row.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
        out
    }

    /// Copies row `i` of a dense weight into `dst` (embedding lookup);
    /// false for quantized weights.
    pub fn dense_row(&self, i: usize, dst: &mut [f32]) -> bool {
        let k = self.in_features;
        match &self.weight {
            CpuWeight::Dense(w) => dst.copy_from_slice(&w[i * k..(i + 1) * k]),
            CpuWeight::DenseF16(w) => {
                for (d, h) in dst.iter_mut().zip(&w[i * k..(i + 1) * k]) {
                    *d = h.to_f32();
                }
            }
            CpuWeight::W4(_) => return false,
        }
        true
    }

    /// Bytes of the stored weight and bias.
    pub fn stored_bytes(&self) -> usize {
        let weight = match &self.weight {
            CpuWeight::Dense(w) => w.len() * 4,
            CpuWeight::DenseF16(w) => w.len() * 2,
            CpuWeight::W4(w4) => w4.stored_bytes(),
        };
        weight + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    pub fn is_dense(&self) -> bool {
        !matches!(self.weight, CpuWeight::W4(_))
    }

    /// Output columns are split across threads; each thread streams its
    /// weight rows once and multiplies them with every input row.
    fn skinny<T: Sync>(
        &self,
        weight: &[T],
        x: &Matrix,
        out: &mut Matrix,
        dot: fn(&[T], &[f32]) -> f32,
    ) {
        let (k, n, m) = (self.in_features, self.out_features, x.rows);
        const CHUNK: usize = 64;
        let mut transposed = vec![0f32; n * m];
        transposed
            .par_chunks_mut(CHUNK * m)
            .enumerate()
            .for_each(|(c, dst)| {
                let first = c * CHUNK;
                for (j, cell) in dst.chunks_exact_mut(m).enumerate() {
                    let w = &weight[(first + j) * k..(first + j + 1) * k];
                    for (r, o) in cell.iter_mut().enumerate() {
                        *o = dot(w, x.row(r));
                    }
                }
            });
        for (j, cell) in transposed.chunks_exact(m).enumerate() {
            for (r, &v) in cell.iter().enumerate() {
                out.data[r * n + j] = v;
            }
        }
    }
}

/// An fp16 weight widened to fp32, for blocked GEMM on wide batches.
fn widen(w: &[f16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(1 << 16)
        .zip(w.par_chunks(1 << 16))
        .for_each(|(o, h)| h.convert_to_f32_slice(o));
    out
}

/// The kernels chosen for this CPU at start-up.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub dot: DotFn,
    pub dot_f16: DotF16Fn,
    pub w4_rows: W4RowsFn,
}
