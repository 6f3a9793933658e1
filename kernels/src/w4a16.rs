//! The W4A16 decode linear: `out[M][N] = x[M][K] · W[K][N] (+ bias)` for
//! `M ≤ 16` rows of fp16 activations and 4-bit AWQ weights held in the
//! layout of [`PackedW4`]. The kernel is `cu/w4a16.cu`; its header comment
//! explains the work split.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use crate::awq::{PackedW4, K_BLOCK};
use crate::buffer::{DeviceMatrix, Element};
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;

/// Most activation rows one call takes (one mma tile of 16 rows).
pub const MAX_ROWS: usize = 16;
/// Output columns one thread block owns (8 warps × 2 tiles × 8).
const BLOCK_COLS: usize = 128;
const BLOCK_THREADS: u32 = 256;
/// Dynamic shared memory used for the activation chunk; the default limit,
/// so no function attribute has to be raised.
const SMEM_LIMIT: usize = 48 * 1024;

/// Output element types of the linear.
pub trait OutElement: Element {
    #[doc(hidden)]
    const IS_F32: i32;
}
impl OutElement for f16 {
    const IS_F32: i32 = 0;
}
impl OutElement for f32 {
    const IS_F32: i32 = 1;
}

/// How one launch divides the work: `n_blocks` column blocks × `splits`
/// K-chunks of `kc` k-blocks (128 inputs) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W4Plan {
    pub n_blocks: usize,
    pub splits: usize,
    pub kc: usize,
    pub smem_bytes: usize,
}

/// Chooses the split of K: enough blocks to give every SM about two, with
/// each block's activation chunk inside the shared-memory limit.
fn plan(m: usize, kbs: usize, n: usize, num_sms: usize, splits: Option<usize>) -> Result<W4Plan> {
    let n_blocks = n.div_ceil(BLOCK_COLS);
    let max_kc = ((SMEM_LIMIT / (2 * m)).saturating_sub(8) / K_BLOCK).max(1);
    let kc = match splits {
        None => {
            let want = (2 * num_sms).div_ceil(n_blocks).clamp(1, kbs);
            kbs.div_ceil(want).min(max_kc)
        }
        Some(s) => {
            let kc = kbs.div_ceil(s.clamp(1, kbs));
            if kc > max_kc {
                return Err(KernelError::invalid(
                    "W4A16 linear",
                    format!("{s} split(s) leave {kc} k-blocks per block; at M = {m} at most {max_kc} fit in shared memory"),
                ));
            }
            kc
        }
    };
    Ok(W4Plan {
        n_blocks,
        splits: kbs.div_ceil(kc),
        kc,
        smem_bytes: 2 * m * (kc * K_BLOCK + 8),
    })
}

/// A 4-bit linear layer resident on one GPU, with its split-K workspace.
pub struct W4A16Linear {
    in_features: usize,
    out_features: usize,
    group_size: usize,
    kbs: usize,
    qw: CudaSlice<u32>,
    scales: CudaSlice<f16>,
    zeros: CudaSlice<f16>,
    bias: Option<CudaSlice<f16>>,
    /// Stands in for the bias pointer when there is none; never read.
    no_bias: CudaSlice<f16>,
    ws: CudaSlice<f32>,
    /// One arrival counter per column block; zero between launches (the
    /// last block of each range resets its own).
    counters: CudaSlice<u32>,
    weight_bytes: usize,
    num_sms: usize,
    func: CudaFunction,
}

impl std::fmt::Debug for W4A16Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "W4A16Linear[{} -> {}, g{}{}]",
            self.in_features,
            self.out_features,
            self.group_size,
            if self.bias.is_some() { ", bias" } else { "" }
        )
    }
}

impl W4A16Linear {
    /// Uploads `packed` (and an optional fp16 bias of `out_features`).
    pub fn new(dev: &GpuDevice, packed: &PackedW4, bias: Option<&[f16]>) -> Result<Self> {
        if !dev.supports_w4a16() {
            return Err(KernelError::invalid(
                "W4A16 linear",
                format!(
                    "{} is {}; the kernel needs sm_80 or newer",
                    dev.name(),
                    dev.arch()
                ),
            ));
        }
        let (k, n) = (packed.in_features, packed.out_features);
        let kbs = packed.k_blocks();
        let gn = k / packed.group_size * n;
        if packed.qw.len() != n / 8 * kbs * 128
            || packed.scales.len() != gn
            || packed.zeros.len() != gn
        {
            return Err(KernelError::shape(
                "W4A16 linear",
                "packed weights do not match their stated shape".to_string(),
            ));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(KernelError::shape(
                    "W4A16 linear",
                    format!("bias has {} elements, out_features is {n}", b.len()),
                ));
            }
        }
        let stream = dev.stream();
        let num_sms = dev.num_sms() as usize;
        let ws_len = (1..=MAX_ROWS)
            .map(|m| {
                plan(m, kbs, n, num_sms, None)
                    .map(|p| if p.splits > 1 { p.splits * m * n } else { 0 })
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0)
            .max(1);
        Ok(Self {
            in_features: k,
            out_features: n,
            group_size: packed.group_size,
            kbs,
            qw: stream.clone_htod(&packed.qw).during("uploading W4 codes")?,
            scales: stream
                .clone_htod(&packed.scales)
                .during("uploading W4 scales")?,
            zeros: stream
                .clone_htod(&packed.zeros)
                .during("uploading W4 zeros")?,
            bias: bias
                .map(|b| stream.clone_htod(b))
                .transpose()
                .during("uploading a bias")?,
            no_bias: stream.alloc_zeros::<f16>(1).during("allocating")?,
            ws: stream
                .alloc_zeros::<f32>(ws_len)
                .during("allocating the split-K workspace")?,
            counters: stream
                .alloc_zeros::<u32>(n.div_ceil(BLOCK_COLS))
                .during("allocating split-K counters")?,
            weight_bytes: packed.weight_bytes(),
            num_sms,
            func: dev.function(Module::W4A16, &format!("w4a16_gemm_g{}", packed.group_size))?,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    /// Bytes of codes, scales and zeros one call streams from memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The launch plan a call with `m` rows would use.
    pub fn plan(&self, m: usize) -> Result<W4Plan> {
        self.check_rows(m)?;
        plan(m, self.kbs, self.out_features, self.num_sms, None)
    }

    fn check_rows(&self, m: usize) -> Result<()> {
        if m == 0 || m > MAX_ROWS {
            return Err(KernelError::shape(
                "W4A16 linear",
                format!("takes 1..={MAX_ROWS} activation rows, got {m}"),
            ));
        }
        Ok(())
    }

    /// `out = x · W (+ bias)`: x is `[M, in]` fp16, out `[M, out]` fp16 or f32.
    pub fn forward<O: OutElement>(
        &mut self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        self.forward_with(dev, x, out, None).map(|_| ())
    }

    /// [`Self::forward`] with the number of K splits forced (tests and
    /// tuning); returns the plan used.
    pub fn forward_with<O: OutElement>(
        &mut self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        splits: Option<usize>,
    ) -> Result<W4Plan> {
        const OP: &str = "W4A16 linear";
        let m = x.rows();
        self.check_rows(m)?;
        if x.cols() != self.in_features {
            return Err(KernelError::shape(
                OP,
                format!(
                    "x is {m}×{}, the layer takes {} inputs",
                    x.cols(),
                    self.in_features
                ),
            ));
        }
        if out.rows() != m || out.cols() != self.out_features {
            return Err(KernelError::shape(
                OP,
                format!(
                    "out is {}×{}, expected {m}×{}",
                    out.rows(),
                    out.cols(),
                    self.out_features
                ),
            ));
        }
        if !std::sync::Arc::ptr_eq(self.qw.stream(), dev.stream())
            || !x.is_on(dev)
            || !out.is_on(dev)
        {
            return Err(KernelError::invalid(
                OP,
                "operands belong to another GpuDevice",
            ));
        }
        let p = plan(m, self.kbs, self.out_features, self.num_sms, splits)?;
        let need = if p.splits > 1 {
            p.splits * m * self.out_features
        } else {
            1
        };
        if need > self.ws.len() {
            self.ws = dev
                .stream()
                .alloc_zeros::<f32>(need)
                .during("growing the split-K workspace")?;
        }
        let (mi, ni, ki) = (m as i32, self.out_features as i32, self.in_features as i32);
        let (kbi, kci) = (self.kbs as i32, p.kc as i32);
        let has_bias = i32::from(self.bias.is_some());
        let out_f32 = O::IS_F32;
        let bias = self.bias.as_ref().unwrap_or(&self.no_bias);
        let cfg = LaunchConfig {
            grid_dim: (p.n_blocks as u32, p.splits as u32, 1),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: p.smem_bytes as u32,
        };
        let stream = dev.stream();
        let mut b = stream.launch_builder(&self.func);
        b.arg(&x.data)
            .arg(&self.qw)
            .arg(&self.scales)
            .arg(&self.zeros)
            .arg(bias)
            .arg(&mut out.data)
            .arg(&mut self.ws)
            .arg(&mut self.counters)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&kbi)
            .arg(&kci)
            .arg(&has_bias)
            .arg(&out_f32);
        // SAFETY: the argument list matches `w4a16_gemm_g{G}`'s signature in
        // cu/w4a16.cu, G being this layer's group size. Shapes were checked above: x holds m·K fp16, out m·N
        // elements of the type `out_f32` names, qw/scales/zeros were validated against
        // (K, N, G) at construction, the workspace holds splits·m·N floats,
        // counters one word per column block (zero between launches), and
        // the shared memory covers m rows of kc·128 + 8 halves. All buffers
        // belong to this device's stream (checked above).
        unsafe { b.launch(cfg) }.during("launching w4a16_gemm")?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fit_shared_memory_and_cover_k() {
        for &(k, n) in &[
            (4096usize, 4096usize),
            (4096, 11008),
            (11008, 4096),
            (576, 200),
            (1536, 256),
        ] {
            let kbs = k.div_ceil(K_BLOCK);
            for m in 1..=MAX_ROWS {
                let p = plan(m, kbs, n, 132, None).unwrap();
                assert!(p.smem_bytes <= SMEM_LIMIT, "{k}x{n} m{m}: {p:?}");
                assert!(
                    p.splits * p.kc >= kbs && (p.splits - 1) * p.kc < kbs,
                    "{p:?}"
                );
            }
        }
        assert!(plan(16, 86, 4096, 132, Some(1)).is_err());
        assert_eq!(plan(1, 12, 256, 132, Some(1)).unwrap().splits, 1);
    }
}
