//! The CUDA backend's activation matrix: fp32 values, as on the CPU, plus
//! the fp16 copy a linear reads where the op that made the matrix wrote
//! one (the norms, SiLU·mul and attention do:
//! their outputs feed linears), so that a linear needs no conversion
//! launch of its own.
//!
//! Invariant: the fp16 copy, when present, is `fp16(values)` element for
//! element. Mutable access to the values drops it.
//!
//! A deferred norm's output ([`CudaAct::deferred`], made by
//! `linear_add_rms_norm`) is the exception: its fp16 matrix is `fp16(r · w · 2^-k)`
//! before the norm's factor, and its "values" are the factor's partial
//! sums of squares (`rows × parts`), not activations. The linears take it
//! (`CudaLinear::forward_after_norm`, `forward_gate_up_silu`): they apply
//! the factor or materialize the values first; the backend's other ops
//! that read an activation's values materialize them
//! (`CudaBackend::values_of`). Only code that reads `values` directly
//! through `Deref` would see the partial sums.

use std::ops::{Deref, DerefMut};

use half::f16;
use lmq_kernels::{DeviceMatrix, RowScale};

/// A `rows × cols` fp32 activation on the GPU, with an optional fp16 copy.
pub struct CudaAct {
    values: DeviceMatrix<f32>,
    half: Option<DeviceMatrix<f16>>,
    /// A deferred norm's eps and factor scale `2^k`: `values` are partial
    /// sums, `half` is `fp16(r · w · 2^-k)` (see the module's header).
    deferred: Option<(f32, f32)>,
}

/// The parts of a deferred norm's output.
pub struct DeferredNorm<'a> {
    /// `fp16(r · w · 2^-k)`, `rows × d`.
    pub scaled_input: &'a DeviceMatrix<f16>,
    /// Partial sums of `r²`, `rows × ⌈d/16⌉`.
    pub parts: &'a DeviceMatrix<f32>,
    pub eps: f32,
    /// `2^k`, by which the norm's factor is multiplied.
    pub factor_scale: f32,
}

impl<'a> DeferredNorm<'a> {
    /// The norm's factor as a linear after it takes it.
    pub fn row_scale(&self) -> RowScale<'a> {
        RowScale {
            parts: self.parts,
            eps: self.eps,
            scale: self.factor_scale,
        }
    }
}

impl CudaAct {
    /// `values` with their fp16 copy (already written by the same op).
    pub(super) fn with_half(values: DeviceMatrix<f32>, half: DeviceMatrix<f16>) -> Self {
        CudaAct {
            values,
            half: Some(half),
            deferred: None,
        }
    }

    /// A deferred norm's output: `scaled_input = fp16(r · w · 2^-k)`, the
    /// partial sums of `r²` that give the norm's factor, and `2^k`.
    pub(super) fn deferred(
        parts: DeviceMatrix<f32>,
        scaled_input: DeviceMatrix<f16>,
        eps: f32,
        factor_scale: f32,
    ) -> Self {
        CudaAct {
            values: parts,
            half: Some(scaled_input),
            deferred: Some((eps, factor_scale)),
        }
    }

    /// The parts of a deferred norm's output, if this is one.
    pub fn deferred_norm(&self) -> Option<DeferredNorm<'_>> {
        match (self.deferred, &self.half) {
            (Some((eps, factor_scale)), Some(h)) => Some(DeferredNorm {
                scaled_input: h,
                parts: &self.values,
                eps,
                factor_scale,
            }),
            _ => None,
        }
    }

    /// The fp16 copy, if the op that made this matrix wrote one.
    pub fn half(&self) -> Option<&DeviceMatrix<f16>> {
        self.half.as_ref().filter(|_| self.deferred.is_none())
    }

    /// The fp32 values.
    pub fn into_values(self) -> DeviceMatrix<f32> {
        self.values
    }
}

impl From<DeviceMatrix<f32>> for CudaAct {
    fn from(values: DeviceMatrix<f32>) -> Self {
        CudaAct {
            values,
            half: None,
            deferred: None,
        }
    }
}

impl Deref for CudaAct {
    type Target = DeviceMatrix<f32>;

    fn deref(&self) -> &DeviceMatrix<f32> {
        &self.values
    }
}

impl DerefMut for CudaAct {
    /// The values may change through the returned reference, so the fp16
    /// copy is dropped first.
    fn deref_mut(&mut self) -> &mut DeviceMatrix<f32> {
        self.half = None;
        self.deferred = None;
        &mut self.values
    }
}
