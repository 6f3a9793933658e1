//! The CUDA backend's activation matrix: fp32 values, as on the CPU, plus
//! the fp16 copy a linear reads where the op that made the matrix wrote
//! one (the norms, SiLU·mul and attention do:
//! their outputs feed linears), so that a linear needs no conversion
//! launch of its own.
//!
//! Invariant: the fp16 copy, when present, is `fp16(values)` element for
//! element. Mutable access to the values drops it.

use std::ops::{Deref, DerefMut};

use half::f16;
use lmq_kernels::DeviceMatrix;

/// A `rows × cols` fp32 activation on the GPU, with an optional fp16 copy.
pub struct CudaAct {
    values: DeviceMatrix<f32>,
    half: Option<DeviceMatrix<f16>>,
}

impl CudaAct {
    /// `values` with their fp16 copy (already written by the same op).
    pub(super) fn with_half(values: DeviceMatrix<f32>, half: DeviceMatrix<f16>) -> Self {
        CudaAct {
            values,
            half: Some(half),
        }
    }

    /// The fp16 copy, if the op that made this matrix wrote one.
    pub fn half(&self) -> Option<&DeviceMatrix<f16>> {
        self.half.as_ref()
    }

    /// The fp32 values.
    pub fn into_values(self) -> DeviceMatrix<f32> {
        self.values
    }
}

impl From<DeviceMatrix<f32>> for CudaAct {
    fn from(values: DeviceMatrix<f32>) -> Self {
        CudaAct { values, half: None }
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
        &mut self.values
    }
}
