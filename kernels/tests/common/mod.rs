//! What the GPU test crates share: opening the device (or reporting the
//! test as skipped) and a small seeded generator.
#![allow(dead_code)] // each test crate uses a part

use half::f16;
use lmq_kernels::{GpuDevice, KernelError};

/// GPU 0, or `None` (with a "skipped" line) on a machine without CUDA.
pub fn device() -> Option<GpuDevice> {
    match GpuDevice::new(0) {
        Ok(d) => Some(d),
        Err(KernelError::NoDevice(msg)) => {
            println!("skipped: no CUDA device ({msg})");
            None
        }
        Err(e) => panic!("opening GPU 0 failed: {e}"),
    }
}

/// splitmix64: small, seeded, independent of any crate version.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// fp16 values uniform in [lo, hi), never exactly zero.
    pub fn f16s(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f16> {
        (0..n)
            .map(|_| loop {
                let v = f16::from_f64(self.uniform(lo, hi));
                if v.to_f64() != 0.0 {
                    break v;
                }
            })
            .collect()
    }
    /// f32 values uniform in [lo, hi).
    pub fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi) as f32).collect()
    }
}
