//! The 4-bit prefill GEMM on Hopper's tensor cores (`cu/w4_gemm_sm90.cu`):
//! the codes are dequantized inside the GEMM's main loop, in registers,
//! and fed to wgmma as its register operand, so no fp16 copy of the weight
//! is written and read again (the dequantize-then-cuBLAS path spends
//! 0.18–0.19 of the GEMM's time on that at 2048 rows on an H100).
//! Opt-in while it is measured (turbomind's CUDA linear asks
//! [`W4A16Linear::wgmma_supports`] first).

use cudarc::driver::PushKernelArg;
use half::f16;

use super::{OutElement, W4A16Linear};
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::out_shape;

/// Output channels and tokens per block (`W4G_BM`, `W4G_BN`).
const BLOCK_CHANNELS: usize = 128;
const BLOCK_TOKENS: usize = 256;
/// Dynamic shared memory (`W4G_SMEM`): alignment slack and four activation
/// stages of 256 rows × 128 bytes (the weights stay in registers).
const SMEM_BYTES: usize = 1024 + 4 * BLOCK_TOKENS * 128;

impl W4A16Linear {
    /// Whether [`Self::forward_wgmma`] takes this layer on `dev`: an sm_90
    /// GPU (wgmma), inputs a multiple of 128 (whole k-blocks, no padding),
    /// outputs a multiple of 128 (whole blocks) and groups of 64 or 128
    /// inputs (one group per 64-input stage).
    pub fn wgmma_supports(&self, dev: &GpuDevice) -> bool {
        dev.compute_capability() == (9, 0)
            && self.in_features.is_multiple_of(128)
            && self.out_features.is_multiple_of(BLOCK_CHANNELS)
            && matches!(self.group_size, 64 | 128)
    }

    /// `out = x · W` for any number of rows (x `[M, in]` fp16, out
    /// `[M, out]`), by the wgmma kernel: the weights enter the tensor cores
    /// as `(q − z) · s` rounded once to fp16, the values
    /// [`Self::dequantize_into`] writes, with fp32 sums. The layer's bias
    /// is not added (as on the dequantize-then-cuBLAS path, the caller
    /// adds it). An error where [`Self::wgmma_supports`] is false.
    pub fn forward_wgmma<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        const OP: &str = "W4 wgmma GEMM";
        if !self.wgmma_supports(dev) {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "needs an sm_90 GPU, inputs a multiple of 128, outputs a multiple of \
                     {BLOCK_CHANNELS} and groups of 64 or 128; the layer is {} -> {} with \
                     groups of {} on sm_{}{}",
                    self.in_features,
                    self.out_features,
                    self.group_size,
                    dev.compute_capability().0,
                    dev.compute_capability().1
                ),
            ));
        }
        let m = x.rows();
        if m == 0 || x.cols() != self.in_features {
            return Err(KernelError::shape(
                OP,
                format!(
                    "x is {m}×{}, the layer takes {} inputs (and at least one row)",
                    x.cols(),
                    self.in_features
                ),
            ));
        }
        out_shape(OP, out, m, self.out_features)?;
        self.check_device(OP, dev, &[x.is_on(dev), out.is_on(dev)])?;
        let token_blocks = m.div_ceil(BLOCK_TOKENS);
        if token_blocks > 65535 || m > i32::MAX as usize / self.in_features {
            return Err(KernelError::shape(OP, format!("{m} rows are too many")));
        }
        let name = if wgmma_depth()? == 2 {
            format!("w4_gemm_sm90_d2_g{}", self.group_size)
        } else {
            format!("w4_gemm_sm90_g{}", self.group_size)
        };
        let f = dev.function(Module::W4Gemm, &name)?;
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            SMEM_BYTES as i32,
        )
        .during("raising the wgmma GEMM's shared-memory limit")?;
        let (mi, ni, ki, kbi) = (
            m as i32,
            self.out_features as i32,
            self.in_features as i32,
            self.kbs as i32,
        );
        let out_f32 = O::IS_F32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&x.data)
            .arg(&self.qw)
            .arg(&self.scales)
            .arg(&self.zeros)
            .arg(&mut out.data)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&kbi)
            .arg(&out_f32);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (
                (self.out_features / BLOCK_CHANNELS) as u32,
                token_blocks as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: SMEM_BYTES as u32,
        };
        // SAFETY: matches `w4_gemm_sm90_[d2_]g{G}(const half*, const uint2*,
        // const half*, const half*, void*, int × 5)` with G this layer's
        // group size (64 or 128, checked). x holds M·K fp16 (K = in, a
        // multiple of 128, so kbs = K/128 and every k-block the kernel
        // reads is inside qw's N·kbs·16 words); the kernel reads tokens
        // min(tok, M − 1) only; scales/zeros are (K/G)·N halves (validated
        // at construction) and it reads groups below K/G; it writes
        // out[tok][col] for tok < M, col < N (N a multiple of 128 = the
        // grid's x times 128), as f32 or fp16 as out_f32 names, out being
        // M×N of O (checked), with 16-byte stores: out is its own device
        // allocation (256-byte aligned) and its rows are N·4 or N·2 bytes,
        // multiples of 256. x's rows start 16-byte aligned (K a multiple
        // of 128 halves), as its cp.async copies need, and qw is a device
        // allocation (256-byte aligned), as its 8-byte loads need. The
        // shared memory (SMEM_BYTES, which covers the kernel's W4G_SMEM) is
        // below the limit just raised; the entry point traps unless
        // compiled for sm_90a, which it is on this sm_90 device (checked).
        // All buffers belong to this device's stream.
        unsafe { b.launch(cfg) }.during("launching w4_gemm_sm90")?;
        Ok(())
    }
}

/// `LMQ_W4_WGMMA_DEPTH=2`: each warpgroup keeps two wgmmas in flight (two
/// sets of A registers) instead of waiting for each before building the
/// next A (1, the default); read once per process, for timing the two
/// against each other. Any other value is an error.
fn wgmma_depth() -> Result<usize> {
    static DEPTH: std::sync::OnceLock<std::result::Result<usize, String>> =
        std::sync::OnceLock::new();
    DEPTH
        .get_or_init(|| match std::env::var("LMQ_W4_WGMMA_DEPTH") {
            Err(_) => Ok(1),
            Ok(v) => match v.trim() {
                "1" => Ok(1),
                "2" => Ok(2),
                _ => Err(format!("LMQ_W4_WGMMA_DEPTH must be 1 or 2, got {v:?}")),
            },
        })
        .clone()
        .map_err(|detail| KernelError::invalid("W4 wgmma GEMM", detail))
}
