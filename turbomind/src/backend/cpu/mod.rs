//! The CPU backend: fp32 activations and accumulation, spread over cores
//! by a spinning thread pool (`pool.rs`).
//!
//! Dense linears keep their weights as fp16 (where exact) or fp32
//! `[out, in]` rows: skinny batches (decode) go through a row-parallel
//! dot-product kernel that reads each weight row once, wider batches
//! (prefill) through the `gemm` crate's blocked matrix multiply. Quantized
//! linears (4-bit AWQ, and the optional 8-bit output projection) are
//! repacked at load into 16-output tiles (`qweight.rs`) and multiplied by
//! int8-quantized activations with integer dot products (`qkernels.rs`),
//! or by fp32 activations where exact numerics are asked for
//! ([`W4Activations::F32`]; [`W4Activations::F16`] also rounds every
//! linear's input to fp16, the CUDA backend's numerics).

mod attention;
mod attn_simd;
mod kv;
mod linear;
pub mod pool;
pub mod qkernels;
pub mod qweight;
pub mod simd;

use std::sync::Mutex;

use super::{AttnShape, Backend, HostLinear, KvPoolSpec, SeqSpan};
use crate::error::{Error, Result};
use crate::rope::Rope;

pub use linear::CpuLinear;
pub use pool::pool as thread_pool;

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

/// What quantized (4-bit and 8-bit) linears multiply their weights with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum W4Activations {
    /// Activations quantized to int8 per weight group, integer dot
    /// products (AVX-512 VNNI / AVX2): the fast path, as llama.cpp's
    /// Q4_0 × Q8_0. The error this adds is measured in docs/BENCHMARKS.md
    /// (2026-11-28, fast W4A16 on CPU).
    #[default]
    Int8,
    /// fp32 activations: only the weights are quantized.
    F32,
    /// Every linear's input (dense ones too) rounded to fp16, then fp32
    /// products and sums: what the CUDA backend computes (fp16 × fp16
    /// tensor-core products, fp32 accumulation), so that CPU and GPU runs
    /// can be compared with the same numerics (parity checks, not speed).
    F16,
}

impl W4Activations {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(W4Activations::Int8),
            "fp32" | "f32" => Ok(W4Activations::F32),
            "fp16" | "f16" => Ok(W4Activations::F16),
            other => Err(Error::InvalidRequest(format!(
                "unknown quantized-linear activation type {other:?} (expected int8, fp32 or fp16)"
            ))),
        }
    }
}

/// Options of the CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuOptions {
    pub w4_activations: W4Activations,
}

/// The CPU implementation of [`Backend`].
pub struct CpuBackend {
    kernels: linear::Kernels,
    /// Round every linear's input to fp16 first ([`W4Activations::F16`]).
    fp16_inputs: bool,
    row_ops: simd::RowOps,
    /// Rotary cos/sin per position, computed once (see [`RopeTable`]).
    rope_table: Mutex<RopeTable>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::with_options(CpuOptions::default())
    }

    pub fn with_options(options: CpuOptions) -> Self {
        CpuBackend {
            row_ops: simd::RowOps::best(),
            kernels: linear::Kernels {
                dot: simd::best_dot(),
                dot_f16: simd::best_dot_f16(),
                quant: qkernels::QKernels::best(),
                exact_w4: options.w4_activations != W4Activations::Int8,
            },
            fp16_inputs: options.w4_activations == W4Activations::F16,
            rope_table: Mutex::new(RopeTable::default()),
        }
    }

    /// An 8-bit copy of a dense linear (per-32-input symmetric groups,
    /// fp16 scales), for the output projection: half the bytes of fp16 to
    /// stream per decode token.
    pub fn int8_linear(&self, w: &CpuLinear) -> Result<CpuLinear> {
        w.to_int8()
    }

    /// Which integer kernel quantized linears use on this CPU.
    pub fn quant_kernel_name(&self) -> &'static str {
        self.kernels.quant.int_name
    }
}

/// cos/sin of every channel pair for positions `0..positions`, kept for
/// the rope in use: computing them (in f64) per call cost more than the
/// rotation. The values are those of [`Rope::cos_sin`], so results do not
/// change.
#[derive(Default)]
struct RopeTable {
    inv_freq: Vec<f32>,
    position_scale: f32,
    positions: usize,
    /// `[position][pair]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn cover(&mut self, rope: &Rope, positions: usize) {
        let half = rope.head_dim / 2;
        if self.inv_freq != rope.inv_freq
            || self.position_scale.to_bits() != rope.position_scale.to_bits()
        {
            *self = RopeTable {
                inv_freq: rope.inv_freq.clone(),
                position_scale: rope.position_scale,
                ..RopeTable::default()
            };
        }
        if positions <= self.positions {
            return;
        }
        // Grow geometrically so that a long generation does not recompute.
        let target = positions.max(self.positions * 2).max(256);
        self.cos.resize(target * half, 0.0);
        self.sin.resize(target * half, 0.0);
        for p in self.positions..target {
            rope.cos_sin(
                p,
                &mut self.cos[p * half..(p + 1) * half],
                &mut self.sin[p * half..(p + 1) * half],
            );
        }
        self.positions = target;
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

/// Runs `f` over blocks of `rows`: inline for a decode-sized batch (a
/// thread-pool hand-off costs more than the work), on the pool otherwise.
fn for_row_blocks<F: Fn(std::ops::Range<usize>) + Sync>(rows: usize, f: F) {
    const BLOCK: usize = 16;
    if rows <= BLOCK {
        f(0..rows);
    } else {
        pool::pool().run(rows.div_ceil(BLOCK), |b| {
            f(b * BLOCK..((b + 1) * BLOCK).min(rows))
        });
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
        let cols = x.cols;
        let dst = pool::SyncPtr(out.data.as_mut_ptr());
        for_row_blocks(x.rows, |rows| {
            for r in rows {
                // SAFETY: each block of rows is written by one task only,
                // and row r lies inside the rows × cols output.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * cols), cols) };
                (self.row_ops.rms_norm)(x.row(r), w, eps, o);
            }
        });
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
        let dst = pool::SyncPtr(out.data.as_mut_ptr());
        let res = pool::SyncPtr(residual.data.as_mut_ptr());
        for_row_blocks(residual.rows, |rows| {
            for r in rows {
                // SAFETY: each block of rows is written by one task only;
                // row r lies inside both rows × cols matrices.
                let (o, x) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dst.get().add(r * cols), cols),
                        std::slice::from_raw_parts_mut(res.get().add(r * cols), cols),
                    )
                };
                for (a, &b) in x.iter_mut().zip(delta.row(r)) {
                    *a += b;
                }
                (self.row_ops.rms_norm)(x, w, eps, o);
            }
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
        if self.fp16_inputs {
            let mut rounded = x.clone();
            for v in &mut rounded.data {
                *v = half::f16::from_f32(*v).to_f32();
            }
            return w.forward(&rounded, &self.kernels);
        }
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
        let positions = spans
            .iter()
            .map(|s| s.start_pos + s.len())
            .max()
            .unwrap_or(0);
        let mut table = self.rope_table.lock().unwrap_or_else(|e| e.into_inner());
        table.cover(rope, positions);
        let table = &*table;
        for span in spans {
            if span.rows.end > x.rows {
                return Err(shape_error(format!(
                    "rope: rows {:?} of a {}-row batch",
                    span.rows, x.rows
                )));
            }
            let first = span.rows.start;
            let dst = pool::SyncPtr(x.data.as_mut_ptr());
            for_row_blocks(span.len(), |rows| {
                for i in rows {
                    let pos = span.start_pos + i;
                    let cos = &table.cos[pos * half..(pos + 1) * half];
                    let sin = &table.sin[pos * half..(pos + 1) * half];
                    // SAFETY: each block of rows is written by one task
                    // only; row first + i is inside the batch (checked).
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(dst.get().add((first + i) * cols), cols)
                    };
                    (self.row_ops.rope)(row, hd, cos, sin);
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
        attention::paged(layer, q, pool, spans, shape)
    }

    fn silu_mul(&self, gate: &Matrix, up: &Matrix) -> Result<Matrix> {
        same_shape(gate, up, "silu_mul")?;
        let mut out = Matrix::zeros(gate.rows, gate.cols);
        let cols = gate.cols;
        let dst = pool::SyncPtr(out.data.as_mut_ptr());
        let silu = simd::best_silu_mul();
        for_row_blocks(gate.rows, |rows| {
            let span = rows.start * cols..rows.end * cols;
            // SAFETY: each block of rows is written by one task only, and
            // the span lies inside the rows × cols output.
            let o =
                unsafe { std::slice::from_raw_parts_mut(dst.get().add(span.start), span.len()) };
            silu(&gate.data[span.clone()], &up.data[span], o);
        });
        Ok(out)
    }

    /// Stacked linears measured 13% slower prefill and about 5% faster
    /// decode on SmolLM2 (docs/BENCHMARKS.md, 2026-11-28): the bigger
    /// product and the split copy cost more than the saved passes over the
    /// input.
    fn prefers_stacked_linears(&self) -> bool {
        false
    }

    fn silu_mul_halves(&self, gate_up: &Matrix) -> Result<Matrix> {
        if !gate_up.cols.is_multiple_of(2) {
            return Err(shape_error(format!(
                "silu_mul_halves: {} columns do not split into gate and up",
                gate_up.cols
            )));
        }
        let n = gate_up.cols / 2;
        let mut out = Matrix::zeros(gate_up.rows, n);
        let dst = pool::SyncPtr(out.data.as_mut_ptr());
        let silu = simd::best_silu_mul();
        for_row_blocks(gate_up.rows, |rows| {
            for r in rows {
                let row = &gate_up.data[r * 2 * n..(r + 1) * 2 * n];
                // SAFETY: each row is written by one task only, and row r's
                // n values lie inside the rows × n output.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * n), n) };
                silu(&row[..n], &row[n..], o);
            }
        });
        Ok(out)
    }

    fn split_cols(&self, x: &Matrix, widths: &[usize]) -> Result<Vec<Matrix>> {
        if widths.iter().sum::<usize>() != x.cols {
            return Err(shape_error(format!(
                "split_cols: widths {widths:?} do not add up to {} columns",
                x.cols
            )));
        }
        let mut outs: Vec<Matrix> = widths.iter().map(|&w| Matrix::zeros(x.rows, w)).collect();
        let dsts: Vec<pool::SyncPtr<f32>> = outs
            .iter_mut()
            .map(|o| pool::SyncPtr(o.data.as_mut_ptr()))
            .collect();
        for_row_blocks(x.rows, |rows| {
            for r in rows {
                let mut at = 0;
                for (dst, &w) in dsts.iter().zip(widths) {
                    // SAFETY: each row is written by one task only, and row
                    // r's w values lie inside that output's rows × w.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * w), w) };
                    o.copy_from_slice(&x.row(r)[at..at + w]);
                    at += w;
                }
            }
        });
        Ok(outs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{HostLinear, HostWeight};

    /// `W4Activations::F16` is the exact path on inputs rounded to fp16:
    /// bit for bit the same as the fp32 path given the rounded inputs, and
    /// not the same as the fp32 path given the raw ones (dense weights
    /// here; the rounding sits in front of every linear).
    #[test]
    fn fp16_inputs_round_every_linear_input() {
        let (k, n, m) = (64, 24, 3);
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let weights: Vec<f32> = (0..n * k).map(|_| next() * 0.1).collect();
        let x = Matrix {
            data: (0..m * k).map(|_| next() + 1.0 / 3.0).collect(),
            rows: m,
            cols: k,
        };
        let mut rounded = x.clone();
        for v in &mut rounded.data {
            *v = half::f16::from_f32(*v).to_f32();
        }
        let host = HostLinear {
            weight: HostWeight::Dense(weights),
            out_features: n,
            in_features: k,
            bias: None,
        };
        let backend = |a| CpuBackend::with_options(CpuOptions { w4_activations: a });
        let (f16b, f32b) = (backend(W4Activations::F16), backend(W4Activations::F32));
        let (w16, w32) = (
            f16b.upload_linear(host.clone()).unwrap(),
            f32b.upload_linear(host).unwrap(),
        );
        let got = f16b.linear(&x, &w16).unwrap();
        let want = f32b.linear(&rounded, &w32).unwrap();
        let raw = f32b.linear(&x, &w32).unwrap();
        assert_eq!(got.data, want.data);
        assert_ne!(got.data, raw.data);
        assert_eq!(W4Activations::parse("fp16").unwrap(), W4Activations::F16);
        assert!(W4Activations::parse("bf16").is_err());
    }
}
