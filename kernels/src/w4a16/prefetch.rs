//! Weights fetched into L2 ahead of their linear (`l2_prefetch` in
//! `cu/w4_dequant.cu`), on a parallel branch: while the device stream runs
//! the current op (a small kernel, or another linear draining), the next
//! 4-bit linear's codes, scales and zeros stream from DRAM into L2, so its
//! kernel reads them at L2 speed.

use cudarc::driver::{DevicePtr, PushKernelArg};

use super::W4A16Linear;
use crate::device::GpuDevice;
use crate::error::{DriverContext, Result};
use crate::nvrtc::Module;
use crate::side::SideStream;

/// Bytes one thread of `l2_prefetch` asks for (one bulk prefetch on sm_90).
const CHUNK: u64 = 65536;

impl W4A16Linear {
    /// Queues, on `side` (forked from the device stream:
    /// [`GpuDevice::fork`]), prefetches into L2 of at most `max_bytes` of
    /// this layer's weights: codes from the start of the buffer first,
    /// then scales and zeros. Changes no data; the kernel that later reads
    /// the weights needs no ordering against it.
    pub fn prefetch_l2(&self, dev: &GpuDevice, side: &SideStream, max_bytes: usize) -> Result<()> {
        let stream = side.stream();
        let f = dev.function(Module::W4Dequant, "l2_prefetch")?;
        let mut budget = max_bytes as u64;
        let parts = [
            (self.qw.device_ptr(stream), 4 * self.qw.len() as u64),
            (self.scales.device_ptr(stream), 2 * self.scales.len() as u64),
            (self.zeros.device_ptr(stream), 2 * self.zeros.len() as u64),
        ];
        for ((ptr, _sync), len) in parts {
            let bytes = len.min(budget);
            if bytes < 16 {
                continue;
            }
            budget -= bytes;
            let threads = bytes.div_ceil(CHUNK);
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (threads.div_ceil(128) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&ptr).arg(&bytes);
            // SAFETY: matches `l2_prefetch(const char*, u64)`; ptr is the
            // start of a live device allocation of this context (16-byte
            // aligned) holding at least `bytes` bytes; the kernel only
            // issues prefetches inside [ptr, ptr + bytes) and writes
            // nothing.
            unsafe { b.launch(cfg) }.during("launching l2_prefetch")?;
        }
        Ok(())
    }
}
