//! The W4A16 decode linear: `out[M][N] = x[M][K] · W[K][N] (+ bias)` for
//! `M ≤ 16` rows of fp16 activations and 4-bit AWQ weights held in the
//! layout of [`PackedW4`]. The kernels are in `cu/w4a16.cu`, whose comments
//! explain the work split: the default register-pipelined kernel
//! (`w4a16_gemv_*`, [`W4Kernel::Classic`]), its early-trigger variant and
//! the experimental cp.async streaming kernel (`w4a16_stream_*`,
//! [`W4Kernel::Stream`]).

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut};
use half::f16;

use crate::awq::PackedW4;
use crate::buffer::{DeviceMatrix, Element};
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::out_shape;

mod dequant;
mod gemm_sm90;
mod plan;
mod prefetch;
use prefetch::L2Pick;

pub use plan::W4Plan;
use plan::{
    halves, kernel_variants, plan, plan_capped, plan_stream, stream_variants, MAX_STREAM_WARPS,
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

/// What a launch stores.
enum Store<'a> {
    /// Every output: the plain product.
    Product,
    /// `silu(gate) · up` of an interleaved gate/up layer, `out/2` outputs,
    /// and optionally their fp16 copy.
    SiluPairs(Option<&'a mut DeviceMatrix<f16>>),
}

/// How one launch runs.
struct LaunchSpec<'a> {
    /// K splits forced (tests and tuning); None: the plan's.
    splits: Option<usize>,
    /// With programmatic dependent launch.
    pdl: bool,
    store: Store<'a>,
    /// The first row and the row count of a slice of x's rows (and the
    /// output's); None: all of them.
    rows: Option<(usize, usize)>,
    /// What the launch's last blocks ask L2 for (classic kernels; see
    /// `l2_prefetch_share` in cu/w4a16.cu).
    l2_next: L2Pick<'a>,
}

impl LaunchSpec<'_> {
    fn product(pdl: bool, rows: Option<(usize, usize)>) -> Self {
        LaunchSpec {
            splits: None,
            pdl,
            store: Store::Product,
            rows,
            l2_next: L2Pick::Stored,
        }
    }
}

/// Bytes one block asks L2 for in an in-kernel prefetch of the next
/// linear's codes: one bulk prefetch on sm_90.
const L2_NEXT_CHUNK: u32 = 32 * 1024;

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
    /// ([`Self::set_pdl`]).
    pub fn forward_silu_pairs<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        out_h: Option<&mut DeviceMatrix<f16>>,
        pdl: bool,
    ) -> Result<()> {
        let spec = LaunchSpec {
            splits: None,
            pdl: pdl && self.pdl,
            store: Store::SiluPairs(out_h),
            rows: None,
            l2_next: L2Pick::Stored,
        };
        self.launch_to(dev, x, out, spec).map(|_| ())
    }

    /// An error unless this layer and every operand (`operands_on`: each
    /// one's `is_on(dev)`) belong to `dev`.
    fn check_device(&self, op: &'static str, dev: &GpuDevice, operands_on: &[bool]) -> Result<()> {
        if !std::sync::Arc::ptr_eq(self.qw.stream(), dev.stream())
            || operands_on.iter().any(|on| !on)
        {
            return Err(KernelError::invalid(
                op,
                "operands belong to another GpuDevice",
            ));
        }
        Ok(())
    }

    fn launch_to<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        spec: LaunchSpec<'_>,
    ) -> Result<W4Plan> {
        const OP: &str = "W4A16 linear";
        let LaunchSpec {
            splits,
            pdl,
            store,
            rows,
            l2_next,
        } = spec;
        // The layer's own link unless the launch names one or none (held
        // for the launch: the Arc keeps the next layer's codes alive).
        let stored = match l2_next {
            L2Pick::Stored => self.l2_next_now(),
            _ => None,
        };
        let l2_next = match l2_next {
            L2Pick::Next(l, bytes) => Some((l, bytes)),
            L2Pick::Off => None,
            L2Pick::Stored => stored.as_ref().map(|(l, bytes)| (l.as_ref(), *bytes)),
        };
        let total = x.rows();
        let (row0, m) = rows.unwrap_or((0, total));
        if row0 + m > total {
            return Err(KernelError::shape(
                OP,
                format!("rows {row0}..{} of x, which has {total}", row0 + m),
            ));
        }
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
        let (silu_pairs, out_h) = match store {
            Store::Product => {
                out_shape(OP, out, total, self.out_features)?;
                (0i32, None)
            }
            Store::SiluPairs(h) => {
                if !self.out_features.is_multiple_of(16)
                    || matches!(self.kernel, W4Kernel::Stream { .. })
                {
                    return Err(KernelError::invalid(
                        OP,
                        format!(
                            "silu(gate)·up needs a classic kernel and whole tile pairs \
                             ({} outputs, kernel {:?})",
                            self.out_features, self.kernel
                        ),
                    ));
                }
                out_shape(OP, out, total, self.out_features / 2)?;
                if let Some(h) = &h {
                    out_shape(OP, h, total, self.out_features / 2)?;
                    if !h.is_on(dev) {
                        return Err(KernelError::invalid(
                            OP,
                            "operands belong to another GpuDevice",
                        ));
                    }
                }
                (1i32, h)
            }
        };
        self.check_device(OP, dev, &[x.is_on(dev), out.is_on(dev)])?;
        let p = self.plan_with(m, splits)?;
        let streaming = p.stages > 0;
        let (mi, ni, ki) = (m as i32, self.out_features as i32, self.in_features as i32);
        let (kbi, kci, ppbi) = (self.kbs as i32, p.kc as i32, p.pairs_per_block as i32);
        let has_bias = i32::from(self.bias.is_some());
        let out_f32 = O::IS_F32;
        let stream = dev.stream();
        let r = halves(m);
        let stream_func = self
            .stream_funcs
            .iter()
            .find(|((fr, ns), _)| (*fr, *ns) == (r, p.stages))
            .map(|(_, f)| f);
        let early_func = self
            .early_funcs
            .iter()
            .find(|(fr, _)| *fr == r)
            .map(|(_, f)| f)
            .filter(|_| {
                matches!(self.kernel, W4Kernel::ClassicEarly { .. }) && self.batch.is_none()
            });
        if streaming && stream_func.is_none() {
            // The classic kernels take another argument list.
            return Err(KernelError::invalid(
                OP,
                format!("no streaming kernel with {} stages is compiled", p.stages),
            ));
        }
        let func = stream_func
            .filter(|_| streaming)
            .or(early_func)
            .or_else(|| self.forced.as_ref().filter(|_| r == 1))
            .or_else(|| {
                self.batch
                    .and_then(|u| self.funcs.iter().find(|((fr, fu), _)| (*fr, *fu) == (r, u)))
                    .map(|(_, f)| f)
            })
            .or_else(|| {
                self.funcs
                    .iter()
                    .find(|((fr, _), _)| *fr == r)
                    .map(|(_, f)| f)
            })
            .ok_or_else(|| KernelError::invalid(OP, "no kernel variant for this row count"))?;
        let bias = self.bias.as_ref().unwrap_or(&self.no_bias);
        // A slice of rows starts `row0` rows into x and the output (and
        // the fp16 copy), all row-major.
        let out_cols = if silu_pairs == 1 {
            self.out_features / 2
        } else {
            self.out_features
        };
        let (x_base, _x_sync) = x.data.device_ptr(stream);
        let x_ptr = x_base + (row0 * self.in_features * 2) as u64;
        let (qw_ptr, _qw_sync) = self.qw.device_ptr(stream);
        let (sc_ptr, _sc_sync) = self.scales.device_ptr(stream);
        let (zb_ptr, _zb_sync) = self.zeros.device_ptr(stream);
        let (bias_ptr, _bias_sync) = bias.device_ptr(stream);
        let (out_base, _out_sync) = out.data.device_ptr_mut(stream);
        let out_ptr = out_base + (row0 * out_cols * std::mem::size_of::<O>()) as u64;
        // The streaming kernels take the pairs per block after KC.
        let mut args: Vec<*mut std::ffi::c_void> = vec![
            &x_ptr as *const _ as *mut _,
            &qw_ptr as *const _ as *mut _,
            &sc_ptr as *const _ as *mut _,
            &zb_ptr as *const _ as *mut _,
            &bias_ptr as *const _ as *mut _,
            &out_ptr as *const _ as *mut _,
            &mi as *const _ as *mut _,
            &ni as *const _ as *mut _,
            &ki as *const _ as *mut _,
            &kbi as *const _ as *mut _,
            &kci as *const _ as *mut _,
        ];
        if streaming {
            args.push(&ppbi as *const _ as *mut _);
        }
        args.push(&has_bias as *const _ as *mut _);
        args.push(&out_f32 as *const _ as *mut _);
        // The classic kernels then take the epilogue: silu_pairs and the
        // fp16 copy's pointer (null: none).
        let (out_h_ptr, _out_h_sync) = match out_h {
            Some(h) => {
                let (ptr, sync) = h.data.device_ptr_mut(stream);
                (ptr + (row0 * out_cols * 2) as u64, Some(sync))
            }
            None => (0, None),
        };
        // Then the L2 prefetch of the next linear's codes: its start, its
        // length (0: none) and the bytes per block's bulk prefetch.
        let (pf_ptr, pf_bytes, _pf_sync) = match l2_next {
            Some((next, max_bytes)) if max_bytes >= 16 => {
                if !std::sync::Arc::ptr_eq(next.qw.stream(), stream) {
                    return Err(KernelError::invalid(
                        OP,
                        "the linear to prefetch belongs to another GpuDevice",
                    ));
                }
                let (ptr, sync) = next.qw.device_ptr(stream);
                let bytes = (4 * next.qw.len()).min(max_bytes) as u64 & !15;
                (ptr, bytes, Some(sync))
            }
            _ => (0, 0u64, None),
        };
        let pf_chunk = L2_NEXT_CHUNK;
        if !streaming {
            args.push(&silu_pairs as *const _ as *mut _);
            args.push(&out_h_ptr as *const _ as *mut _);
            args.push(&pf_ptr as *const _ as *mut _);
            args.push(&pf_bytes as *const _ as *mut _);
            args.push(&pf_chunk as *const _ as *mut _);
        }
        // SAFETY: the value of a programmatic-serialization attribute is the
        // int `programmaticStreamSerializationAllowed`; the rest of the
        // union is padding.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: p.n_blocks as u32,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: (32 * p.splits) as u32,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: p.smem_bytes as u32,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl),
        };
        dev.context()
            .bind_to_thread()
            .during("binding the context")?;
        // With `pdl` this launch may start while the kernel before it still
        // runs: sound only because every W4A16 kernel touches nothing but
        // its own weights, scales and zeros (and asks L2 for another
        // layer's immutable codes, reading nothing) before `griddepcontrol.wait`
        // (x through `ld_produced_v4`, `out` written after the wait;
        // tests/pdl.rs). A kernel launched with the attribute must keep that
        // rule.
        // SAFETY: `args` matches `w4a16_gemv_g{G}_r{R}_u{U}`'s signature in
        // cu/w4a16.cu (six device pointers, eight ints, the fp16 copy's
        // pointer: null, or m·N/2 halves with silu_pairs, whose out then
        // holds m·N/2 elements, checked above; then the prefetch's start,
        // u64 length and u32 chunk: a live allocation of this stream of at
        // least pf_bytes bytes, or length 0, and a prefetch writes
        // nothing), or with `streaming`
        // `w4a16_stream_g{G}_r{R}_s{NS}`'s (six pointers, eight ints, PPB
        // after KC; NS = p.stages, which sizes smem_bytes), G being this
        // layer's group size; every pointed-to value lives until after the
        // call, which copies them. The streaming plan gives every warp at
        // least one k-block and every block at least one pair, which the
        // kernel's block barriers rely on, and its shared memory is below
        // the limit raised at construction. Shapes were checked above: from
        // the (row-offset) pointers, x holds m·K fp16 (K a multiple of 32;
        // row0 + m ≤ x's rows), out m·N elements of the type `out_f32`
        // names (out has x's rows), qw/scales/zeros were validated against (K, N, G) at
        // construction, bias holds N fp16 when has_bias; the block has
        // 32·splits ≤ 512 threads and smem_bytes covers splits·32·4·halves
        // floats. All buffers belong to this device's stream (checked
        // above), and the sync guards record the launch on them when they
        // drop.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                func.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .during("launching w4a16_gemv")?;
        Ok(p)
    }
}
