//! The CPU backend: fp32 activations and accumulation, rayon across cores.
//!
//! Dense linears keep their weights as fp32 `[out, in]` rows. Skinny
//! batches (decode) go through a row-parallel dot-product kernel that reads
//! each weight row once; wider batches (prefill) go through the `gemm`
//! crate's blocked matrix multiply.

mod attention;
mod kv;
mod linear;
pub mod simd;
mod w4;

use rayon::prelude::*;

use super::{AttnShape, Backend, HostLinear, KvPoolSpec, SeqSpan};
use crate::error::{Error, Result};
use crate::rope::Rope;

pub use linear::CpuLinear;

/// A row-major `rows × cols` fp32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

pub use kv::CpuKvPool;

/// The CPU implementation of [`Backend`].
pub struct CpuBackend {
    dot: simd::DotFn,
    kernels: linear::Kernels,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend {
            dot: simd::best_dot(),
            kernels: linear::Kernels {
                dot: simd::best_dot(),
                dot_f16: simd::best_dot_f16(),
                w4_rows: simd::best_w4_rows(),
            },
        }
    }
}

fn shape_error(message: String) -> Error {
    Error::Backend {
        backend: "cpu",
        message,
    }
}

fn same_shape(a: &Matrix, b: &Matrix, op: &str) -> Result<()> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(shape_error(format!(
            "{op}: shapes {}x{} and {}x{} differ",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum_sq: f32 = x.iter().map(|&v| v * v).sum();
    let inv = 1.0 / (sum_sq / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

impl Backend for CpuBackend {
    type Act = Matrix;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type KvPool = CpuKvPool;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload_linear(&self, w: HostLinear) -> Result<CpuLinear> {
        CpuLinear::new(w)
    }

    fn linear_bytes(&self, w: &CpuLinear) -> usize {
        w.stored_bytes()
    }

    fn upload_vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn new_kv_pool(&self, spec: &KvPoolSpec) -> Result<CpuKvPool> {
        CpuKvPool::new(spec)
    }

    fn free_memory(&self) -> Option<u64> {
        crate::engine::config::host_available_memory()
    }

    fn embedding(&self, table: &CpuLinear, ids: &[u32]) -> Result<Matrix> {
        let dim = table.in_features;
        if !table.is_dense() {
            return Err(shape_error(
                "embedding tables must be dense, not quantized".into(),
            ));
        }
        let mut out = Matrix::zeros(ids.len(), dim);
        for (row, &id) in out.data.chunks_exact_mut(dim).zip(ids) {
            let id = id as usize;
            if id >= table.out_features {
                return Err(Error::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    table.out_features
                )));
            }
            table.dense_row(id, row);
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &Matrix, w: &Vec<f32>, eps: f32) -> Result<Matrix> {
        let mut out = Matrix::zeros(x.rows, x.cols);
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(o, r)| rms_norm_row(r, w, eps, o));
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        residual: &mut Matrix,
        delta: &Matrix,
        w: &Vec<f32>,
        eps: f32,
    ) -> Result<Matrix> {
        same_shape(residual, delta, "add_rms_norm")?;
        let mut out = Matrix::zeros(residual.rows, residual.cols);
        let cols = residual.cols;
        out.data
            .par_chunks_mut(cols)
            .zip(residual.data.par_chunks_mut(cols))
            .zip(delta.data.par_chunks(cols))
            .for_each(|((o, r), d)| {
                for (a, &b) in r.iter_mut().zip(d) {
                    *a += b;
                }
                rms_norm_row(r, w, eps, o);
            });
        Ok(out)
    }

    fn add_in_place(&self, residual: &mut Matrix, delta: &Matrix) -> Result<()> {
        same_shape(residual, delta, "add")?;
        for (a, &b) in residual.data.iter_mut().zip(&delta.data) {
            *a += b;
        }
        Ok(())
    }

    fn linear(&self, x: &Matrix, w: &CpuLinear) -> Result<Matrix> {
        w.forward(x, &self.kernels)
    }

    fn rope(&self, x: &mut Matrix, heads: usize, spans: &[SeqSpan], rope: &Rope) -> Result<()> {
        let hd = rope.head_dim;
        if x.cols != heads * hd {
            return Err(shape_error(format!(
                "rope: {} columns for {heads} heads of {hd}",
                x.cols
            )));
        }
        let half = hd / 2;
        let cols = x.cols;
        for span in spans {
            let rows = &mut x.data[span.rows.start * cols..span.rows.end * cols];
            rows.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
                let mut cos = vec![0f32; half];
                let mut sin = vec![0f32; half];
                rope.cos_sin(span.start_pos + i, &mut cos, &mut sin);
                for head in row.chunks_exact_mut(hd) {
                    let (a, b) = head.split_at_mut(half);
                    for j in 0..half {
                        let (x0, x1) = (a[j], b[j]);
                        a[j] = x0 * cos[j] - x1 * sin[j];
                        b[j] = x1 * cos[j] + x0 * sin[j];
                    }
                }
            });
        }
        Ok(())
    }

    fn write_kv(
        &self,
        layer: usize,
        k: &Matrix,
        v: &Matrix,
        pool: &mut CpuKvPool,
        spans: &[SeqSpan],
    ) -> Result<()> {
        let d = pool.spec().shape.kv_dim();
        if k.cols != d || v.cols != d || k.rows != v.rows {
            return Err(shape_error(format!(
                "write_kv: K is {}x{}, V is {}x{}, the pool stores {d} columns",
                k.rows, k.cols, v.rows, v.cols
            )));
        }
        for span in spans {
            if span.rows.end > k.rows {
                return Err(shape_error(format!(
                    "write_kv: rows {:?} of a {}-row batch",
                    span.rows, k.rows
                )));
            }
            pool.write(
                layer,
                &k.data[span.rows.start * d..span.rows.end * d],
                &v.data[span.rows.start * d..span.rows.end * d],
                span,
            )?;
        }
        Ok(())
    }

    fn attention(
        &self,
        layer: usize,
        q: &Matrix,
        pool: &CpuKvPool,
        spans: &[SeqSpan],
        shape: &AttnShape,
    ) -> Result<Matrix> {
        attention::paged(self.dot, layer, q, pool, spans, shape)
    }

    fn silu_mul(&self, gate: &Matrix, up: &Matrix) -> Result<Matrix> {
        same_shape(gate, up, "silu_mul")?;
        let mut out = Matrix::zeros(gate.rows, gate.cols);
        out.data
            .par_chunks_mut(4096)
            .zip(gate.data.par_chunks(4096).zip(up.data.par_chunks(4096)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok(out)
    }

    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Result<Matrix> {
        let mut out = Matrix::zeros(rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols.max(1)).zip(rows) {
            if r >= x.rows {
                return Err(shape_error(format!("gather_rows: row {r} of {}", x.rows)));
            }
            dst.copy_from_slice(x.row(r));
        }
        Ok(out)
    }

    fn to_host(&self, x: &Matrix) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }
}
