//! Linear layers on the CPU: dense weights (fp16 where that is exact, else
//! fp32), and quantized weights in the tiled layout of `qweight.rs` (4-bit
//! AWQ, 8-bit output projections).

use half::f16;

use super::pool::{pool, SyncPtr};
use super::qkernels::QKernels;
use super::qweight::QWeight;
use super::simd::{DotF16Fn, DotFn};
use super::{shape_error, Matrix};
use crate::backend::{HostLinear, HostWeight};
use crate::error::Result;

/// Dense batches up to this many rows use the dot-product kernel, which
/// streams each weight row once for all of them; wider ones use blocked
/// GEMM. The dot kernel computes every row the same way whatever the batch,
/// so a decode batch of up to 16 sequences gives each exactly the tokens it
/// gets alone (batch invariance). Quantized weights use one kernel for
/// every batch size.
pub const SKINNY_ROWS: usize = 16;

/// How a CPU linear stores its weight.
pub enum CpuWeight {
    /// fp32 `[out, in]` row-major.
    Dense(Vec<f32>),
    /// fp16 `[out, in]` row-major, for weights that fp16 holds exactly
    /// (every fp16 checkpoint): half the bytes to stream per token, the
    /// same results.
    DenseF16(Vec<f16>),
    /// 4-bit or 8-bit codes in the tiled layout.
    Quant(QWeight),
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
                CpuWeight::Quant(QWeight::from_awq(&t)?)
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

    /// An 8-bit copy of a dense linear (see `qweight.rs`), for the output
    /// projection; the bias is kept as is.
    pub fn to_int8(&self) -> Result<CpuLinear> {
        let (n, k) = (self.out_features, self.in_features);
        if !self.is_dense() {
            return Err(shape_error(
                "only a dense linear can be requantized to int8".into(),
            ));
        }
        let q = QWeight::int8_from_rows(n, k, &|o, buf| {
            self.dense_row(o, buf);
        })?;
        Ok(CpuLinear {
            weight: CpuWeight::Quant(q),
            bias: self.bias.clone(),
            out_features: n,
            in_features: k,
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
        match &self.weight {
            CpuWeight::Quant(q) => {
                return Ok(self.add_bias(q.forward(x, &kernels.quant, kernels.exact_w4)?));
            }
            CpuWeight::Dense(w) if m <= SKINNY_ROWS => {
                self.skinny(w, x, &mut out, kernels.dot);
            }
            CpuWeight::DenseF16(w) if m <= SKINNY_ROWS => {
                self.skinny(w, x, &mut out, kernels.dot_f16);
            }
            CpuWeight::Dense(w) => self.gemm(x, &mut out, DenseRef::F32(w)),
            CpuWeight::DenseF16(w) => self.gemm(x, &mut out, DenseRef::F16(w)),
        }
        Ok(self.add_bias(out))
    }

    /// Blocked GEMM (the `gemm` crate, one thread per task) over blocks of
    /// output columns spread on the thread pool; an fp16 weight is widened
    /// one block at a time, by the task that uses it.
    fn gemm(&self, x: &Matrix, out: &mut Matrix, weight: DenseRef<'_>) {
        let (m, k, n) = (x.rows, self.in_features, self.out_features);
        let threads = pool().threads();
        let cols = n.div_ceil(threads * 4).next_multiple_of(16).max(16);
        let dst = SyncPtr(out.data.as_mut_ptr());
        pool().run(n.div_ceil(cols), |task| {
            let (n0, n1) = (task * cols, ((task + 1) * cols).min(n));
            let widened: Vec<f32>;
            let w = match weight {
                DenseRef::F32(w) => &w[n0 * k..n1 * k],
                DenseRef::F16(w) => {
                    use half::slice::HalfFloatSliceExt;
                    let mut buf = vec![0f32; (n1 - n0) * k];
                    w[n0 * k..n1 * k].convert_to_f32_slice(&mut buf);
                    widened = buf;
                    &widened
                }
            };
            // SAFETY: the destination is columns n0..n1 of the m×n output
            // (row stride n), which only this task writes; `x` is m×k with
            // row stride k; `w` holds rows n0..n1 of the n×k weight, read as
            // the k×(n1−n0) right-hand side with row stride 1 and column
            // stride k (its length is (n1−n0)·k by construction).
            unsafe {
                gemm::gemm(
                    m,
                    n1 - n0,
                    k,
                    dst.get().add(n0),
                    1,
                    n as isize,
                    false,
                    x.data.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
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
                use half::slice::HalfFloatSliceExt;
                w[i * k..(i + 1) * k].convert_to_f32_slice(dst);
            }
            CpuWeight::Quant(_) => return false,
        }
        true
    }

    /// Bytes of the stored weight and bias.
    pub fn stored_bytes(&self) -> usize {
        let weight = match &self.weight {
            CpuWeight::Dense(w) => w.len() * 4,
            CpuWeight::DenseF16(w) => w.len() * 2,
            CpuWeight::Quant(q) => q.stored_bytes(),
        };
        weight + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    pub fn is_dense(&self) -> bool {
        !matches!(self.weight, CpuWeight::Quant(_))
    }

    /// Bits per stored weight value: 32, 16, or the quantized width.
    pub fn weight_bits(&self) -> u32 {
        match &self.weight {
            CpuWeight::Dense(_) => 32,
            CpuWeight::DenseF16(_) => 16,
            CpuWeight::Quant(q) => q.bits(),
        }
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
        let dst = SyncPtr(out.data.as_mut_ptr());
        pool().run(n.div_ceil(CHUNK), |c| {
            for j in c * CHUNK..((c + 1) * CHUNK).min(n) {
                let w = &weight[j * k..(j + 1) * k];
                for r in 0..m {
                    let v = dot(w, x.row(r));
                    // SAFETY: task `c` alone writes columns
                    // 64c..64c+64 of the m×n output.
                    unsafe { *dst.get().add(r * n + j) = v };
                }
            }
        });
    }
}

/// A dense weight as stored.
#[derive(Clone, Copy)]
enum DenseRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// The kernels chosen for this CPU at start-up, and the numerics asked for.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub dot: DotFn,
    pub dot_f16: DotF16Fn,
    pub quant: QKernels,
    /// Quantized weights multiply fp32 activations (exact) instead of
    /// int8-quantized ones.
    pub exact_w4: bool,
}
