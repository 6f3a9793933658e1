//! The CUDA backend's per-column vectors (the norms' weights): the values
//! on the GPU, and the power of two a deferred norm scales them by
//! (`lmq_kernels::norm_weight_shift`), found from the host values at upload
//! since the GPU copy is never read back.

use std::ops::Deref;

use lmq_kernels::DeviceMatrix;

/// A vector (`len × 1`) on the GPU.
pub struct CudaVector {
    values: DeviceMatrix<f32>,
    /// `k` with `2^k` at least the largest magnitude (0 within ±1).
    deferred_shift: i32,
}

impl CudaVector {
    /// `values`, uploaded from `host`.
    pub(super) fn new(values: DeviceMatrix<f32>, host: &[f32]) -> Self {
        let max_abs = host.iter().fold(0f32, |m, v| m.max(v.abs()));
        CudaVector {
            values,
            deferred_shift: lmq_kernels::norm_weight_shift(max_abs),
        }
    }

    /// The `2^-k` a deferred norm multiplies `r · w` by before rounding it
    /// to fp16 (`AddNorm::scale`); its factor is multiplied by `2^k`.
    pub(super) fn deferred_scale(&self) -> f32 {
        2f32.powi(-self.deferred_shift)
    }
}

impl Deref for CudaVector {
    type Target = DeviceMatrix<f32>;

    fn deref(&self) -> &DeviceMatrix<f32> {
        &self.values
    }
}
