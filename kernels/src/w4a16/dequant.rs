//! The W4A16 layout back to dense fp16 `[out][in]` (`cu/w4_dequant.cu`),
//! for prefill: more rows than the decode kernel takes go through one
//! cuBLAS GEMM on the dequantized weight.

use cudarc::driver::PushKernelArg;
use half::f16;

use super::W4A16Linear;
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, Result};
use crate::nvrtc::Module;
use crate::ops::out_shape;

impl W4A16Linear {
    /// Writes the dense fp16 weights `[out][in]` (`(q − z) · s`, the
    /// products the GEMV kernel forms) into `out`, for a cuBLAS GEMM.
    pub fn dequantize_into(&self, dev: &GpuDevice, out: &mut DeviceMatrix<f16>) -> Result<()> {
        const OP: &str = "W4 dequantize";
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
        let mut b = dev.stream().launch_builder(&f);
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
