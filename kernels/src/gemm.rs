//! Dense fp16 GEMM through cuBLAS (loaded dynamically, like the driver):
//! `out[M][N] (fp32) = x[M][K] (fp16) · W[N][K]ᵀ (fp16)`, accumulating in
//! fp32 on the tensor cores. The engine's CUDA backend uses it for
//! unquantized linears and, over weights that [`crate::W4A16Linear`]
//! dequantizes into a scratch matrix, for 4-bit linears at prefill sizes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::f16;

use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{KernelError, Result};
use crate::ops::{check_i32, on_device};

/// A cuBLAS handle bound to one device's stream.
pub struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blas")
    }
}

impl Blas {
    /// Loads cuBLAS and makes a handle on `dev`'s stream. A missing
    /// library is an error that says so, never a panic.
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        // SAFETY: only tries `dlopen` on cudarc's candidate names.
        let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(KernelError::NoDevice(
                "libcublas.so could not be loaded; install the CUDA toolkit's cuBLAS (or pip's \
                 nvidia-cublas) and add its lib folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let handle = catch_unwind(AssertUnwindSafe(|| CudaBlas::new(dev.stream().clone())))
            .map_err(|_| KernelError::NoDevice("creating a cuBLAS handle panicked".into()))?
            .map_err(|e| KernelError::Blas {
                context: "creating a handle",
                message: e.to_string(),
            })?;
        Ok(Self {
            handle,
            stream: dev.stream().clone(),
        })
    }

    /// `out = x · wᵀ`: x is `[M, K]`, w `[N, K]` (a linear's weight in
    /// Hugging Face order), out `[M, N]` fp32.
    pub fn gemm_f16(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        w: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<f32>,
    ) -> Result<()> {
        const OP: &str = "gemm_f16";
        let (m, k, n) = (x.rows(), x.cols(), w.rows());
        if w.cols() != k || out.rows() != m || out.cols() != n {
            return Err(KernelError::shape(
                OP,
                format!(
                    "x {m}×{k} · wᵀ with w {}×{} into out {}×{}",
                    w.rows(),
                    w.cols(),
                    out.rows(),
                    out.cols()
                ),
            ));
        }
        on_device(OP, dev, &[x.is_on(dev), w.is_on(dev), out.is_on(dev)])?;
        if !Arc::ptr_eq(&self.stream, dev.stream()) {
            return Err(KernelError::invalid(
                OP,
                "the cuBLAS handle belongs to another GpuDevice",
            ));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (mi, ki, ni) = (
            check_i32(OP, "M", m)?,
            check_i32(OP, "K", k)?,
            check_i32(OP, "N", n)?,
        );
        bind_context(dev)?;
        let stream = dev.stream();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (x_ptr, _xs) = x.data.device_ptr(stream);
        let (w_ptr, _ws) = w.data.device_ptr(stream);
        let (o_ptr, _os) = out.data.device_ptr_mut(stream);
        // Row-major out[M][N] is column-major outᵀ (N × M), and outᵀ = W ·
        // xᵀ where W's row-major [N][K] is column-major K × N (so op T) and
        // x's row-major [M][K] is column-major K × M (op N).
        // SAFETY: the pointers are live device buffers of this stream with
        // the sizes checked above (x M·K halves, w N·K halves, out M·N
        // floats, its leading dimension N);
        // alpha and beta are host floats, the handle's default pointer mode;
        // the sync guards keep the buffers' stream order until they drop.
        unsafe {
            blas::gemm_ex(
                *self.handle.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                w_ptr as *const _,
                sys::cudaDataType::CUDA_R_16F,
                ki,
                x_ptr as *const _,
                sys::cudaDataType::CUDA_R_16F,
                ki,
                (&beta as *const f32).cast(),
                o_ptr as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Blas {
            context: "cublasGemmEx",
            message: e.to_string(),
        })
    }
}

/// cuBLAS works in the calling thread's current context, and the engine
/// calls from its own thread: make it `dev`'s.
fn bind_context(dev: &GpuDevice) -> Result<()> {
    dev.context()
        .bind_to_thread()
        .map_err(|e| KernelError::Blas {
            context: "binding the context",
            message: e.to_string(),
        })
}
