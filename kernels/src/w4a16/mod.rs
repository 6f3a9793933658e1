//! The W4A16 decode linear: `out[M][N] = x[M][K] · W[K][N] (+ bias)` for
//! `M ≤ 16` rows of fp16 activations and 4-bit AWQ weights held in the
//! layout of [`PackedW4`]. The kernels are in `cu/w4a16.cu` (and the
//! streaming one in `cu/w4a16_stream.cu`), whose comments
//! explain the work split: the default register-pipelined kernel
//! (`w4a16_gemv_*`, [`W4Kernel::Classic`]), its early-trigger variant and
//! the experimental cp.async streaming kernel (`w4a16_stream_*`,
//! [`W4Kernel::Stream`]).

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaSlice};
use half::f16;

use crate::awq::PackedW4;
use crate::buffer::{DeviceMatrix, Element};
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;

mod dequant;
mod gemm_sm90;
mod launch;
mod plan;
mod prefetch;
mod tensor_map;
use prefetch::L2Pick;

pub use gemm_sm90::WgmmaKernel;
pub use launch::{norm_weight_shift, AddNorm, RowScale};
use launch::{LaunchSpec, Store};
pub use plan::W4Plan;
use plan::{
    kernel_variants, plan, plan_capped, plan_stream, stream_variants, MAX_STREAM_WARPS,
    STREAM_SMEM_LIMIT,
};

/// Most activation rows one call takes (two mma n8 token groups).
pub const MAX_ROWS: usize = 16;

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

/// Which W4A16 kernel a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W4Kernel {
    /// `w4a16_gemv_*`: one block per 16 output columns, its warps split K
    /// and keep their loads in registers (up to 16 warps per block).
    Classic,
    /// The classic kernel with at most `warps` warps per block (automatic
    /// plan) whose blocks trigger the dependent launch at their start
    /// (`w4a16_gemv_*_e`, group size 128; other group sizes run the
    /// classic entry points). With PDL and few enough warps, the next
    /// linear's blocks share the SMs and load their weights early.
    ClassicEarly { warps: usize },
    /// `w4a16_stream_*`: about `blocks_per_sm` blocks per SM, each walking
    /// several 16-column pairs with `warps` (1..=8) warps that split K and
    /// stream their weights through a cp.async ring of `stages` k-blocks
    /// (8 exists for group size 128, 4 for every group size; a depth that
    /// was not compiled falls back to 4).
    Stream {
        warps: usize,
        stages: usize,
        blocks_per_sm: usize,
    },
}

/// The default kernel. On an H200 (2026-11-28, kernels/README.md) the
/// classic kernel with PDL stayed the fastest at every decode shape and M;
/// the streaming and early-trigger kernels are kept, selectable through
/// [`W4A16Linear::set_kernel_kind`], as the base of further work.
pub const DEFAULT_KERNEL: W4Kernel = W4Kernel::Classic;

/// A 4-bit linear layer resident on one GPU.
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
    weight_bytes: usize,
    /// Kernels by (token halves, batch depth U): M ≤ 8 is 1 half, M > 8 two.
    funcs: Vec<((usize, usize), CudaFunction)>,
    /// Early-trigger classic kernels by token halves (group size 128).
    early_funcs: Vec<(usize, CudaFunction)>,
    /// Streaming kernels by (token halves, ring stages).
    stream_funcs: Vec<((usize, usize), CudaFunction)>,
    /// Which kernel calls run ([`Self::set_kernel_kind`]).
    kernel: W4Kernel,
    num_sms: usize,
    /// Batch depth forced by [`Self::set_batch`] (tuning), else the default.
    batch: Option<usize>,
    /// Kernel forced for M ≤ 8 by [`Self::set_kernel`] (tuning only).
    forced: Option<CudaFunction>,
    /// Launch with programmatic dependent launch (sm_90+ only).
    pdl: bool,
    pdl_ok: bool,
    /// The linear whose codes launches ask L2 for ([`Self::set_l2_next`]).
    l2_next: std::sync::Mutex<prefetch::L2Next>,
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
            || !k.is_multiple_of(32)
            || !n.is_multiple_of(8)
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
        let g = packed.group_size;
        let pdl_ok = dev.compute_capability() >= (9, 0);
        let stream_funcs = stream_variants(g)
            .iter()
            .map(|&(r, ns)| {
                let f = dev.function(Module::W4A16, &format!("w4a16_stream_g{g}_r{r}_s{ns}"))?;
                // More than 48 KiB of dynamic shared memory must be asked
                // for; the largest carveout lets the blocks of two
                // consecutive launches share an SM (a smaller one chosen
                // for the first launch would keep the second off the SM
                // until it drains).
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    STREAM_SMEM_LIMIT as i32,
                )
                .during("raising the W4A16 shared-memory limit")?;
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )
                .during("setting the W4A16 shared-memory carveout")?;
                Ok(((r, ns), f))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            in_features: k,
            out_features: n,
            group_size: g,
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
            weight_bytes: packed.weight_bytes(),
            funcs: kernel_variants(g)
                .iter()
                .map(|&(r, u)| {
                    dev.function(Module::W4A16, &format!("w4a16_gemv_g{g}_r{r}_u{u}"))
                        .map(|f| ((r, u), f))
                })
                .collect::<Result<Vec<_>>>()?,
            stream_funcs,
            early_funcs: if g == 128 {
                [
                    (1usize, "w4a16_gemv_g128_r1_u2_e"),
                    (2, "w4a16_gemv_g128_r2_u1_e"),
                ]
                .iter()
                .map(|&(r, name)| dev.function(Module::W4A16, name).map(|f| (r, f)))
                .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            },
            kernel: DEFAULT_KERNEL,
            num_sms: dev.num_sms() as usize,
            batch: None,
            forced: None,
            pdl: false,
            pdl_ok,
            l2_next: std::sync::Mutex::new(None),
        })
    }

    /// Chooses the kernel later calls run (the default is
    /// [`DEFAULT_KERNEL`]); fails for a streaming launch that cannot exist
    /// (warps outside 1..=8, no blocks).
    pub fn set_kernel_kind(&mut self, kernel: W4Kernel) -> Result<()> {
        if let W4Kernel::Stream {
            warps,
            stages,
            blocks_per_sm,
        } = kernel
        {
            self.stream_plan(1, warps, stages, blocks_per_sm)?;
        }
        self.kernel = kernel;
        Ok(())
    }

    /// The kernel calls run.
    pub fn kernel_kind(&self) -> W4Kernel {
        self.kernel
    }

    /// The compiled ring depth used for a requested one.
    fn stream_stages(&self, want: usize) -> usize {
        if self.stream_funcs.iter().any(|((_, ns), _)| *ns == want) {
            want
        } else {
            4
        }
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
    /// Partial sums of squares per row that a launch before a deferred
    /// norm stores ([`AddNorm`]): one per block of 16 output columns.
    pub fn norm_parts(&self) -> usize {
        self.out_features.div_ceil(16)
    }

    /// Bytes of codes, scales and zeros one call streams from memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Whether launches use programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Launch with programmatic dependent launch (sm_90 and newer; ignored
    /// before): the kernel then loads its weights while the previous kernel
    /// on the stream is still finishing, and waits for it before it reads
    /// `x`. Returns whether it is now on.
    pub fn set_pdl(&mut self, on: bool) -> bool {
        self.pdl = on && self.pdl_ok;
        self.pdl
    }

    /// Forces the kernel's batch depth (k-blocks whose loads a warp has in
    /// flight together) where that variant exists; `None` restores the
    /// default. For tuning; returns whether the variant exists.
    #[doc(hidden)]
    pub fn set_batch(&mut self, u: Option<usize>) -> bool {
        self.batch = u;
        u.is_none_or(|u| self.funcs.iter().any(|((_, fu), _)| *fu == u))
    }

    /// Forces the M ≤ 8 kernel to the entry point `w4a16_gemv_{name}` of
    /// cu/w4a16.cu (e.g. the memory probes, whose results are wrong);
    /// `None` restores the default. Bench only.
    #[doc(hidden)]
    pub fn set_kernel(&mut self, dev: &GpuDevice, name: Option<&str>) -> Result<()> {
        self.forced = name
            .map(|n| dev.function(Module::W4A16, &format!("w4a16_gemv_{n}")))
            .transpose()?;
        Ok(())
    }

    /// The launch plan a call with `m` rows would use.
    pub fn plan(&self, m: usize) -> Result<W4Plan> {
        self.check_rows(m)?;
        self.plan_with(m, None)
    }

    fn plan_with(&self, m: usize, splits: Option<usize>) -> Result<W4Plan> {
        match self.kernel {
            W4Kernel::Classic => plan(m, self.kbs, self.out_features, splits),
            W4Kernel::ClassicEarly { warps } => {
                plan_capped(m, self.kbs, self.out_features, splits, warps)
            }
            W4Kernel::Stream {
                warps,
                stages,
                blocks_per_sm,
            } => {
                // A forced split count beyond the streaming kernel's 8
                // warps runs 8.
                let warps = match splits {
                    Some(0) => {
                        return Err(KernelError::invalid("W4A16 linear", "0 K splits asked for"))
                    }
                    Some(s) => s.min(MAX_STREAM_WARPS),
                    None => warps,
                };
                self.stream_plan(m, warps, stages, blocks_per_sm)
            }
        }
    }

    /// This layer's streaming-kernel plan for `m` rows.
    fn stream_plan(
        &self,
        m: usize,
        warps: usize,
        stages: usize,
        blocks_per_sm: usize,
    ) -> Result<W4Plan> {
        plan_stream(
            m,
            self.kbs,
            self.out_features,
            self.group_size,
            warps,
            self.stream_stages(stages),
            blocks_per_sm,
            self.num_sms,
        )
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
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        self.forward_with(dev, x, out, None).map(|_| ())
    }

    /// [`Self::forward`] with the number of K splits forced (tests and
    /// tuning); returns the plan used.
    pub fn forward_with<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        splits: Option<usize>,
    ) -> Result<W4Plan> {
        self.launch_to(
            dev,
            x,
            out,
            LaunchSpec {
                splits,
                ..LaunchSpec::product(self.pdl, None)
            },
        )
    }

    /// [`Self::forward`] without the programmatic-serialization attribute:
    /// for a launch whose programmatic edge the recording already holds
    /// (`GpuDevice::link_pdl_splice`; in a graph the edge is what makes the
    /// dependency programmatic), or one that should get an ordinary edge.
    pub fn forward_plain<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        self.launch_to(dev, x, out, LaunchSpec::product(false, None))
            .map(|_| ())
    }

    /// The linear before a deferred RMSNorm ([`AddNorm`]): `norm.residual
    /// += x · W (+ bias)`, `out = fp16(residual · norm.weight)` (`[M, out]`)
    /// and the partial sums of squares into `norm.parts`, in one launch of
    /// the classic kernel. `pdl` as in [`Self::forward_silu_pairs`].
    pub fn forward_add_norm(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<f16>,
        norm: AddNorm<'_>,
        pdl: bool,
    ) -> Result<()> {
        let spec = LaunchSpec {
            store: Store::AddNorm(norm),
            ..LaunchSpec::product(pdl && self.pdl, None)
        };
        self.launch_to(dev, x, out, spec).map(|_| ())
    }

    /// A linear after a deferred RMSNorm: [`Self::forward`] with each row
    /// times the norm's factor from `scale` (before the bias), `x` being
    /// the `fp16(r · w)` that [`Self::forward_add_norm`] stored. `pdl` as
    /// in [`Self::forward_silu_pairs`].
    pub fn forward_scaled<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        scale: RowScale<'_>,
        pdl: bool,
    ) -> Result<()> {
        let spec = LaunchSpec {
            row_scale: Some(scale),
            ..LaunchSpec::product(pdl && self.pdl, None)
        };
        self.launch_to(dev, x, out, spec).map(|_| ())
    }

    /// Rows `row0 .. row0 + rows` of `x` (`[M, in]`, any M; at most
    /// [`MAX_ROWS`] rows) into the same rows of `out` (`[M, out]`), the
    /// other rows untouched: decode batches of more than [`MAX_ROWS`]
    /// sequences run the decode kernel once per slice of rows
    /// ([`Self::forward_chunked`]). `pdl` as in
    /// [`Self::forward_silu_pairs`].
    pub fn forward_rows<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        row0: usize,
        rows: usize,
        pdl: bool,
    ) -> Result<()> {
        let spec = LaunchSpec::product(pdl && self.pdl, Some((row0, rows)));
        self.launch_to(dev, x, out, spec).map(|_| ())
    }

    /// `out = x · W` for any number of rows, by the decode kernel on
    /// slices of at most [`MAX_ROWS`] rows: each slice streams the whole
    /// weight again, which for a few slices costs less than dequantizing
    /// the weight for a GEMM (see turbomind's CUDA linear).
    pub fn forward_chunked<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        pdl: bool,
    ) -> Result<()> {
        let m = x.rows();
        let mut row0 = 0;
        while row0 < m {
            let rows = MAX_ROWS.min(m - row0);
            // Only the last slice prefetches the next linear: the earlier
            // ones would push out the weights the later ones re-read.
            let last = row0 + rows == m;
            let spec = LaunchSpec {
                l2_next: if last { L2Pick::Stored } else { L2Pick::Off },
                ..LaunchSpec::product(pdl && self.pdl, Some((row0, rows)))
            };
            self.launch_to(dev, x, out, spec)?;
            row0 += rows;
        }
        Ok(())
    }

    /// `silu(gate) · up` of a stacked gate/up layer whose tiles were
    /// interleaved by [`PackedW4::interleave_halves`] (and whose bias, if
    /// any, was permuted the same way), in one launch: out is `[M, out/2]`
    /// (and `out_h`, if given, its fp16 copy), with the bits of
    /// [`Self::forward`] on the stacked layer followed by
    /// `act::silu_mul_halves`. Classic kernels only. `pdl` launches with
    /// programmatic dependent launch if this layer has it on
    /// ([`Self::set_pdl`]). With `row_scale` (a linear after a deferred
    /// norm, as [`Self::forward_scaled`]) gate and up are scaled first.
    pub fn forward_silu_pairs<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        out_h: Option<&mut DeviceMatrix<f16>>,
        pdl: bool,
        row_scale: Option<RowScale<'_>>,
    ) -> Result<()> {
        let spec = LaunchSpec {
            splits: None,
            pdl: pdl && self.pdl,
            store: Store::SiluPairs(out_h),
            rows: None,
            l2_next: L2Pick::Stored,
            row_scale,
        };
        self.launch_to(dev, x, out, spec).map(|_| ())
    }
}
