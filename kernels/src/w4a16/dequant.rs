//! The W4A16 layout back to dense fp16 `[out][in]` (`cu/w4_dequant.cu`),
//! for prefill: more rows than the decode kernel takes go through one
//! cuBLAS GEMM on the dequantized weight, on the device stream or on a side
//! stream while the previous GEMM runs.

use cudarc::driver::PushKernelArg;
use half::f16;

use super::W4A16Linear;
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::out_shape;

impl W4A16Linear {
    /// Writes the dense fp16 weights `[out][in]` (`(q − z) · s`, the
    /// products the GEMV kernel forms) into `out`, for a cuBLAS GEMM.
    pub fn dequantize_into(&self, dev: &GpuDevice, out: &mut DeviceMatrix<f16>) -> Result<()> {
        self.dequantize_on(dev, dev.stream(), out)
    }

    /// [`W4A16Linear::dequantize_into`] queued on `side`, a side stream of
    /// `dev` (weights and `out` still belong to `dev`), after the device
    /// stream's work up to `after`: a [`GpuDevice::mark`] taken once `out`
    /// was allocated. The caller must make every later use or free of
    /// `out` wait for this write ([`GpuDevice::join`]).
    pub fn dequantize_on_side(
        &self,
        dev: &GpuDevice,
        side: &crate::SideStream,
        after: &crate::StreamMark,
        out: &mut DeviceMatrix<f16>,
    ) -> Result<()> {
        if dev.is_recording() {
            return Err(KernelError::invalid(
                "W4 dequantize",
                "no side-stream work while the device stream is recorded",
            ));
        }
        side.wait(after)?;
        self.dequantize_on(dev, side.stream(), out)
    }

    /// The weight rows `[n0, n0 + rows)` (outputs; both multiples of 8, or
    /// the slice ends at the last output) as dense fp16 into the first
    /// `rows` rows of `out` (`[≥ rows][in]`), by the 16-byte-per-thread
    /// kernel `w4_dequant_rows`; the values are the bits
    /// [`Self::dequantize_into`] writes.
    pub fn dequantize_rows_into(
        &self,
        dev: &GpuDevice,
        n0: usize,
        rows: usize,
        out: &mut DeviceMatrix<f16>,
    ) -> Result<()> {
        const OP: &str = "W4 dequantize rows";
        let n = self.out_features;
        if !n0.is_multiple_of(8)
            || (!rows.is_multiple_of(8) && n0 + rows != n)
            || n0 + rows > n
            || rows == 0
        {
            return Err(KernelError::shape(
                OP,
                format!(
                    "rows {n0}..{} of {n}: the slice must be non-empty, inside the \
                     weight and made of whole 8-output tiles",
                    n0 + rows
                ),
            ));
        }
        if out.rows() < rows || out.cols() != self.in_features {
            return Err(KernelError::shape(
                OP,
                format!(
                    "out is {}×{}, needs at least {rows} rows of {}",
                    out.rows(),
                    out.cols(),
                    self.in_features
                ),
            ));
        }
        self.check_device(OP, dev, &[out.is_on(dev)])?;
        // Whole tiles: the output count is a multiple of 8 (AWQ packs 8
        // outputs per word), so rounding the slice up stays inside it.
        let tiles = rows.div_ceil(8);
        let threads = tiles * self.kbs * 32;
        if threads > i32::MAX as usize {
            return Err(KernelError::shape(
                OP,
                format!("{threads} threads exceed the kernel's 32-bit index"),
            ));
        }
        let (ni, ki, kbi, gi, n0i, ri) = (
            n as i32,
            self.in_features as i32,
            self.kbs as i32,
            self.group_size as i32,
            n0 as i32,
            (tiles * 8) as i32,
        );
        let f = dev.function(Module::W4Dequant, "w4_dequant_rows")?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&self.qw)
            .arg(&self.scales)
            .arg(&self.zeros)
            .arg(&mut out.data)
            .arg(&ni)
            .arg(&ki)
            .arg(&kbi)
            .arg(&gi)
            .arg(&n0i)
            .arg(&ri);
        let blocks = (threads.div_ceil(256) as u64).clamp(1, dev.num_sms() as u64 * 16) as u32;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `w4_dequant_rows(const uint4*, const half*, const
        // half*, half*, int × 6)`; qw is N·kbs·16 words (16-byte aligned
        // device allocation) and the kernel reads uint4 ((nt·kbs + kb)·32 +
        // lane) for tiles nt < (n0 + rows)/8 ≤ N/8; scales/zeros are
        // (K/g)·N halves (validated at construction); it writes rows
        // [0, tiles·8) of out, each K halves, and tiles·8 = rows ≤
        // out.rows() (rows is a multiple of 8, or n0 + rows = N with N a
        // multiple of 8); the thread count fits i32 (checked above).
        unsafe { b.launch(cfg) }.during("launching w4_dequant_rows")?;
        Ok(())
    }

    /// `out = x · Wᵀ` for more rows than the decode kernel takes: the
    /// weight is dequantized `chunk` output rows at a time into `scratch`
    /// (`[≥ chunk][in]` fp16) and each slice multiplied by cuBLAS into its
    /// columns of `out`, so the fp16 slice can still sit in L2 when the
    /// GEMM reads it, and the scratch is a slice, not the whole weight.
    /// `chunk` is rounded down to a multiple of 8 (at least 8).
    pub fn prefill_chunked(
        &self,
        dev: &GpuDevice,
        blas: &crate::Blas,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<f32>,
        chunk: usize,
        scratch: &mut DeviceMatrix<f16>,
    ) -> Result<()> {
        if x.cols() != self.in_features || out.rows() != x.rows() || out.cols() != self.out_features
        {
            return Err(KernelError::shape(
                "W4 prefill",
                format!(
                    "x {}×{} into out {}×{}; the layer is {} -> {}",
                    x.rows(),
                    x.cols(),
                    out.rows(),
                    out.cols(),
                    self.in_features,
                    self.out_features
                ),
            ));
        }
        let chunk = (chunk / 8 * 8).clamp(8, self.out_features.div_ceil(8) * 8);
        if scratch.rows() < chunk.min(self.out_features) {
            return Err(KernelError::shape(
                "W4 prefill",
                format!(
                    "scratch has {} rows, a slice needs {}",
                    scratch.rows(),
                    chunk.min(self.out_features)
                ),
            ));
        }
        let mut n0 = 0;
        while n0 < self.out_features {
            let rows = chunk.min(self.out_features - n0);
            self.dequantize_rows_into(dev, n0, rows, scratch)?;
            blas.gemm_f16_rows(dev, x, scratch, rows, out, n0)?;
            n0 += rows;
        }
        Ok(())
    }

    fn dequantize_on(
        &self,
        dev: &GpuDevice,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        out: &mut DeviceMatrix<f16>,
    ) -> Result<()> {
        const OP: &str = "W4 dequantize";
        if stream.context() != dev.context() {
            return Err(KernelError::invalid(
                OP,
                "the stream belongs to another CUDA context",
            ));
        }
        out_shape(OP, out, self.out_features, self.in_features)?;
        self.check_device(OP, dev, &[out.is_on(dev)])?;
        let words = self.out_features * self.kbs * 16;
        let (ni, ki, kbi, gi) = (
            self.out_features as i32,
            self.in_features as i32,
            self.kbs as i32,
            self.group_size as i32,
        );
        let f = dev.function(Module::W4Dequant, "w4_dequant_f16")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&self.qw)
            .arg(&self.scales)
            .arg(&self.zeros)
            .arg(&mut out.data)
            .arg(&ni)
            .arg(&ki)
            .arg(&kbi)
            .arg(&gi);
        let blocks = (words.div_ceil(256) as u64).clamp(1, dev.num_sms() as u64 * 32) as u32;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `w4_dequant_f16(const u32*, const half*, const
        // half*, half*, int, int, int, int)`; qw holds N·kbs·16 words (the
        // kernel reads word (((n/8)·kbs + kb)·32 + lane)·4 + i < that) and
        // scales/zeros (K/g)·N halves (validated at construction); out is
        // N×K (checked above), inputs past K are skipped, and 16-byte
        // stores are used only when K is a multiple of 8 (rows stay
        // 16-byte aligned).
        unsafe { b.launch(cfg) }.during("launching w4_dequant_f16")?;
        Ok(())
    }
}
