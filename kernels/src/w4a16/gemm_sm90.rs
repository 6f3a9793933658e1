//! The 4-bit prefill GEMM on Hopper's tensor cores (`cu/w4_gemm_sm90.cu`):
//! the codes are dequantized inside the GEMM's main loop, in registers,
//! and fed to wgmma as its register operand, so no fp16 copy of the weight
//! is written and read again (the dequantize-then-cuBLAS path spends
//! 0.18–0.19 of the GEMM's time on that at 2048 rows on an H100).
//! turbomind's CUDA linear takes it where [`W4A16Linear::wgmma_preferred`]
//! holds.
//!
//! Two kernels ([`WgmmaKernel`]): the first (session 12) has its compute
//! warps copy, dequantize and multiply, meeting at a block barrier every 64
//! inputs; the warp-specialized one (`cu/w4_gemm_ws.cu`) has a producer
//! warpgroup bring the activations by TMA (a tensor map encoded per call)
//! and the codes by bulk copies, through mbarrier-tracked stages; by
//! default (`WgmmaKernel::CodesTma`, session 17) the codes come by one TMA
//! box a stage too, since the producer's single thread issuing 16 bulk
//! copies a stage was close to a stage's compute time. Where
//! its output tiles would leave SMs idle (few rows), the specialized one
//! splits K over blocks and the last block of each tile adds the fp32
//! partials in a fixed order ([`W4A16Linear::wgmma_splits`]).

use cudarc::driver::{CudaFunction, DevicePtr, PushKernelArg};
use half::f16;

use super::{OutElement, W4A16Linear};
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::out_shape;

use super::tensor_map::{codes_tensor_map, tensor_maps_available, x_tensor_map, TensorMapParam};

/// Output channels and tokens per block (`W4G_BM`, `W4G_BN`).
pub(super) const BLOCK_CHANNELS: usize = 128;
const BLOCK_TOKENS: usize = 256;
/// Dynamic shared memory (`W4G_SMEM`): alignment slack and four activation
/// stages of 256 rows × 128 bytes (the weights stay in registers).
const SMEM_BYTES: usize = 1024 + 4 * BLOCK_TOKENS * 128;
/// The warp-specialized kernel's (`W4W_SMEM`): alignment slack and three
/// stages of 128 inputs: x (256 rows × 256 bytes), the codes of 16 tiles
/// (16 × 512 bytes), and two groups' scales and zeros (1024 bytes).
const WS_SMEM_BYTES: usize = 1024 + 3 * (2 * BLOCK_TOKENS * 128 + 16 * 512 + 1024);
/// The TMA box of x: 64 inputs (128 bytes, the swizzle's row) × 256 tokens,
/// or × 128 where a pair of CTAs multicasts one half each.
pub(super) const WS_BOX: [u32; 2] = [64, BLOCK_TOKENS as u32];
const WS_PAIR_BOX: [u32; 2] = [64, BLOCK_TOKENS as u32 / 2];
/// Split-K keeps at least this many 128-input stages per split (one more
/// than the kernel's ring of three, so that each split's pipeline fills).
const MIN_STAGES_PER_SPLIT: usize = 4;
/// Most splits of K (each adds a partial tile to write and read back).
const MAX_SPLITS: usize = 8;
/// fp32 words of one block's partial output tile (128 channels × 256 tokens).
const TILE_WORDS: usize = BLOCK_CHANNELS * BLOCK_TOKENS;

/// Which wgmma GEMM [`W4A16Linear::forward_wgmma_with`] launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaKernel {
    /// `w4_gemm_sm90_[d2_]g{G}`: 256 threads that copy, dequantize and
    /// multiply (`LMQ_W4_WGMMA_DEPTH` picks one or two wgmmas in flight).
    Registers,
    /// `w4_gemm_ws_g{G}`: a producer warpgroup (TMA and bulk copies) and
    /// two compute warpgroups, with mbarrier-tracked stages.
    Specialized,
    /// `w4_gemm_wst_g{G}`: [`WgmmaKernel::Specialized`] with each
    /// stage's codes brought by one 3-D TMA box (a tensor map of the
    /// codes) instead of 16 bulk copies of 512 bytes, so that the
    /// producer thread issues 5 copies a stage instead of 20 (7 instead
    /// of 22 with groups of 64).
    CodesTma,
    /// `w4_gemm_ws2_g{G}`: the same in clusters of two CTAs (adjacent
    /// channel blocks), each loading half of every x box for both by TMA
    /// multicast. Layers with an odd number of 128-channel blocks take
    /// [`WgmmaKernel::Specialized`].
    Multicast,
}

impl WgmmaKernel {
    pub const ALL: [WgmmaKernel; 4] = [
        WgmmaKernel::Registers,
        WgmmaKernel::Specialized,
        WgmmaKernel::CodesTma,
        WgmmaKernel::Multicast,
    ];

    /// Whether this kernel can split K ([`W4A16Linear::forward_wgmma_split`]):
    /// the single-CTA warp-specialized ones.
    pub fn splits_k(self) -> bool {
        matches!(self, WgmmaKernel::Specialized | WgmmaKernel::CodesTma)
    }

    /// Whether this kernel runs as itself on this driver: the
    /// warp-specialized ones need tensor maps (CUDA 12 on); without them
    /// [`W4A16Linear::forward_wgmma_with`] runs [`WgmmaKernel::Registers`]
    /// instead (the same bits, slower).
    pub fn available(self) -> bool {
        self == WgmmaKernel::Registers || tensor_maps_available()
    }

    pub fn name(self) -> &'static str {
        match self {
            WgmmaKernel::Registers => "registers",
            WgmmaKernel::Specialized => "specialized",
            WgmmaKernel::CodesTma => "codes-tma",
            WgmmaKernel::Multicast => "multicast",
        }
    }

    /// `LMQ_W4_WGMMA_KERNEL` (`registers`, `specialized`, `codes-tma` or
    /// `multicast`), read once per process; any other value is an error.
    /// Unset, `codes-tma`: on an H100 in session 17 it beat `specialized`
    /// by 4–5% on each of Llama-2-7B's linears at 2048 rows (0.93–1.02×
    /// of cuBLAS fp16 against 0.89–0.98×), and by −1% to +6% from 256 to
    /// 4096 rows; `specialized` had beaten the other two in session 14.
    pub fn from_env() -> Result<WgmmaKernel> {
        static KERNEL: std::sync::OnceLock<std::result::Result<WgmmaKernel, String>> =
            std::sync::OnceLock::new();
        KERNEL
            .get_or_init(|| match std::env::var("LMQ_W4_WGMMA_KERNEL") {
                Err(_) => Ok(WgmmaKernel::CodesTma),
                Ok(v) => WgmmaKernel::ALL
                    .into_iter()
                    .find(|k| k.name() == v.trim())
                    .ok_or_else(|| {
                        format!(
                            "LMQ_W4_WGMMA_KERNEL must be registers, specialized, codes-tma or \
                             multicast, got {v:?}"
                        )
                    }),
            })
            .clone()
            .map_err(|detail| KernelError::invalid("W4 wgmma GEMM", detail))
    }
}

/// The wgmma GEMM entry point `name`, its dynamic shared-memory limit
/// raised to `smem_bytes`.
fn gemm_function(dev: &GpuDevice, name: &str, smem_bytes: usize) -> Result<CudaFunction> {
    let f = dev.function(Module::W4Gemm, name)?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem_bytes as i32,
    )
    .during("raising a wgmma GEMM's shared-memory limit")?;
    Ok(f)
}

/// How the warp-specialized kernel brings each stage's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CodeCopies {
    /// 16 bulk copies of 512 bytes (`w4_gemm_ws`).
    Bulk,
    /// One 3-D TMA box of the codes' tensor map (`w4_gemm_wst`).
    Tma,
    /// Bulk copies, in CTA pairs sharing x by multicast (`w4_gemm_ws2`).
    BulkPairs,
}

impl W4A16Linear {
    /// Whether [`Self::forward_wgmma`] takes this layer on `dev`: an sm_90
    /// GPU (wgmma), inputs a multiple of 128 (whole k-blocks, no padding),
    /// outputs a multiple of 128 (whole blocks, below 2³¹) and groups of
    /// 64 or 128 inputs (whole groups per stage of 64 or 128 inputs).
    pub fn wgmma_supports(&self, dev: &GpuDevice) -> bool {
        dev.compute_capability() == (9, 0)
            && self.in_features > 0
            && (1..=i32::MAX as usize).contains(&self.out_features)
            && self.in_features.is_multiple_of(128)
            && self.out_features.is_multiple_of(BLOCK_CHANNELS)
            && matches!(self.group_size, 64 | 128)
    }

    /// The output tiles of the wgmma GEMM on `m` rows, and whether they
    /// leave SMs idle (fill less than 5/8 of them), where split-K applies.
    fn wgmma_tiles(&self, dev: &GpuDevice, m: usize) -> (usize, bool) {
        let tiles = (self.out_features / BLOCK_CHANNELS) * m.div_ceil(BLOCK_TOKENS);
        (tiles, tiles > 0 && 8 * tiles < 5 * dev.num_sms() as usize)
    }

    /// The split of K that suits the single-CTA specialized kernels
    /// ([`WgmmaKernel::splits_k`]) on `m` rows (1:
    /// none): where its output tiles alone leave SMs idle, as many splits
    /// as keep the grid within one wave, at most [`MAX_SPLITS`] and at most
    /// one per [`MIN_STAGES_PER_SPLIT`] k-blocks; the count the launch
    /// makes of that ([`Self::split_plan`]).
    pub fn wgmma_auto_splits(&self, dev: &GpuDevice, m: usize) -> usize {
        let (tiles, idle) = self.wgmma_tiles(dev, m);
        if idle {
            auto_splits(self.kbs, tiles, dev.num_sms() as usize)
        } else {
            1
        }
    }

    /// How a request for `splits` ways divides this layer's k-blocks:
    /// `(k-blocks per split, splits made)`, every split non-empty, so that
    /// fewer may be made than asked (11 k-blocks asked 8 ways: splits of
    /// ⌈11 / 8⌉ = 2, so 6 of them).
    pub fn split_plan(&self, splits: usize) -> (usize, usize) {
        split_plan(self.kbs, splits)
    }

    /// How many ways [`Self::forward_wgmma_with`] splits K for the
    /// single-CTA specialized kernels on `m` rows: [`Self::wgmma_auto_splits`] where
    /// [`SPLIT_BY_DEFAULT`], else 1. `LMQ_W4_WGMMA_SPLIT` overrides it:
    /// `auto`, or a count, applied only where the tiles leave SMs idle
    /// (elsewhere a split only adds partial tiles to write: for gate|up at
    /// 2048 rows, 8 ways would need 1.3 GiB of them); 1 turns split-K off.
    pub fn wgmma_splits(&self, dev: &GpuDevice, m: usize) -> Result<usize> {
        Ok(match split_override()? {
            SplitChoice::Default if SPLIT_BY_DEFAULT => self.wgmma_auto_splits(dev, m),
            SplitChoice::Default => 1,
            SplitChoice::Auto => self.wgmma_auto_splits(dev, m),
            SplitChoice::Ways(n) if self.wgmma_tiles(dev, m).1 => {
                self.split_plan(n.min(self.kbs)).1
            }
            SplitChoice::Ways(_) => 1,
        })
    }

    /// Whether the wgmma GEMM is expected to beat dequantize-then-cuBLAS
    /// on `m` rows: it takes the layer, and its grid (128 channels × 256
    /// tokens a block, one block per SM, times the splits of K of
    /// [`Self::wgmma_splits`]) fills at least 5/8 of the SMs.
    /// On an H200 (docs/BENCHMARKS.md, session 14) the specialized kernel
    /// won from 86 blocks on (the 4096×11008 layer at 64 rows and more,
    /// the 4096-wide ones from 1024 rows: 0.86–1.02× of cuBLAS fp16
    /// against 0.71–0.94× for dequantize-then-cuBLAS) and lost with 32 or
    /// 64 blocks (the 4096-wide layers at 256 and 512 rows); split four or
    /// two ways, those won on an H100 in session 15 (1.11–2.08× the
    /// dequantize-then-cuBLAS speed from 128 to 512 rows).
    /// Only the single-CTA warp-specialized kernels (`codes-tma`, the
    /// default, and `specialized`) were measured to win, so another one
    /// named by `LMQ_W4_WGMMA_KERNEL`, or a driver without tensor maps
    /// (which would run the first kernel), is never preferred.
    pub fn wgmma_preferred(&self, dev: &GpuDevice, m: usize) -> bool {
        let blocks = self.wgmma_tiles(dev, m).0 * self.wgmma_splits(dev, m).unwrap_or(1);
        matches!(WgmmaKernel::from_env(), Ok(k) if k.splits_k() && k.available())
            && self.wgmma_supports(dev)
            && 8 * blocks >= 5 * dev.num_sms() as usize
    }

    /// `out = x · W` by the kernel `LMQ_W4_WGMMA_KERNEL` names (see
    /// [`Self::forward_wgmma_with`]).
    pub fn forward_wgmma<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        self.forward_wgmma_with(WgmmaKernel::from_env()?, dev, x, out)
    }

    /// `out = x · W` for any number of rows (x `[M, in]` fp16, out
    /// `[M, out]`), by the wgmma kernel `kernel` (the single-CTA
    /// specialized ones with [`Self::wgmma_splits`]' split of K): the weights enter the
    /// tensor cores as `(q − z) · s` rounded once to fp16, the values
    /// [`Self::dequantize_into`] writes, with fp32 sums. The layer's bias
    /// is not added (as on the dequantize-then-cuBLAS path, the caller
    /// adds it). An error where [`Self::wgmma_supports`] is false.
    pub fn forward_wgmma_with<O: OutElement>(
        &self,
        kernel: WgmmaKernel,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        let splits = match kernel {
            k if k.splits_k() => self.wgmma_splits(dev, x.rows())?,
            _ => 1,
        };
        self.forward_wgmma_split(kernel, splits, dev, x, out)
    }

    /// [`Self::forward_wgmma_with`] with K split `splits` ways (1: not
    /// split; more only for the kernels where [`WgmmaKernel::splits_k`]
    /// holds, at most one split per 128 inputs). A split sum adds the same products in
    /// another order, so its bits may differ from the unsplit kernel's.
    pub fn forward_wgmma_split<O: OutElement>(
        &self,
        kernel: WgmmaKernel,
        splits: usize,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
    ) -> Result<()> {
        const OP: &str = "W4 wgmma GEMM";
        if splits == 0 || splits > self.kbs.min(MAX_SPLITS) || (splits > 1 && !kernel.splits_k()) {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "{splits} splits of K asked of the {} kernel; only the single-CTA \
                     specialized ones split, 1 to {} ways for this layer",
                    kernel.name(),
                    self.kbs.min(MAX_SPLITS)
                ),
            ));
        }
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
        let grid = (
            (self.out_features / BLOCK_CHANNELS) as u32,
            token_blocks as u32,
            1,
        );
        // The warp-specialized kernels need tensor maps; a driver without
        // them gets the first kernel, whose results are the same bits.
        let kernel = if kernel.available() {
            kernel
        } else {
            WgmmaKernel::Registers
        };
        match kernel {
            WgmmaKernel::Registers => self.launch_registers(dev, x, out, grid),
            WgmmaKernel::Specialized => {
                self.launch_specialized(dev, x, out, grid, CodeCopies::Bulk, splits)
            }
            WgmmaKernel::CodesTma => {
                self.launch_specialized(dev, x, out, grid, CodeCopies::Tma, splits)
            }
            WgmmaKernel::Multicast if grid.0.is_multiple_of(2) => {
                self.launch_specialized(dev, x, out, grid, CodeCopies::BulkPairs, 1)
            }
            WgmmaKernel::Multicast => {
                self.launch_specialized(dev, x, out, grid, CodeCopies::Bulk, 1)
            }
        }
    }

    /// The first kernel, shapes checked by [`Self::forward_wgmma_with`].
    fn launch_registers<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        grid: (u32, u32, u32),
    ) -> Result<()> {
        let m = x.rows();
        let name = if wgmma_depth()? == 2 {
            format!("w4_gemm_sm90_d2_g{}", self.group_size)
        } else {
            format!("w4_gemm_sm90_g{}", self.group_size)
        };
        let f = gemm_function(dev, &name, SMEM_BYTES)?;
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
            grid_dim: grid,
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

    /// The warp-specialized kernel, bringing the codes as `codes` says (in
    /// CTA pairs that multicast x with [`CodeCopies::BulkPairs`], for an
    /// even number of channel blocks), with K split about `splits` ways
    /// (single CTAs only: 1 with pairs), shapes checked by
    /// [`Self::forward_wgmma_split`].
    fn launch_specialized<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        grid: (u32, u32, u32),
        codes: CodeCopies,
        splits: usize,
    ) -> Result<()> {
        let stream = dev.stream();
        let m = x.rows();
        // Split-K: k-blocks per split, then the number of non-empty splits
        // (the grid's z), the partial tiles and a zeroed counter per tile.
        let (kb_split, splits) = self.split_plan(splits);
        let grid = (grid.0, grid.1, splits as u32);
        let tiles = grid.0 as usize * grid.1 as usize;
        let (part, count) = if splits > 1 {
            let mut part = dev.uninit::<f32>(splits * tiles, TILE_WORDS)?;
            if POISON_SPLIT_PARTIALS.load(std::sync::atomic::Ordering::Relaxed) {
                dev.fill(&mut part, f32::NAN)?;
            }
            (Some(part), Some(dev.zeros::<u32>(1, tiles)?))
        } else {
            (None, None)
        };
        let (entry, box_dims) = match codes {
            CodeCopies::Bulk => ("w4_gemm_ws", WS_BOX),
            CodeCopies::Tma => ("w4_gemm_wst", WS_BOX),
            CodeCopies::BulkPairs => ("w4_gemm_ws2", WS_PAIR_BOX),
        };
        let f = gemm_function(dev, &format!("{entry}_g{}", self.group_size), WS_SMEM_BYTES)?;
        // The map records x's address; the guard keeps x's stream order
        // until the launch is queued.
        let (x_ptr, _x_sync) = x.data.device_ptr(stream);
        let map = x_tensor_map(x_ptr, m, self.in_features, box_dims)?;
        // Only the codes-by-TMA entry reads its second map; the others get
        // zeros (a parameter they never touch). The codes' stream order is
        // kept by passing them as an argument below, so their guard may
        // end once the map has their address.
        let codes_map = if codes == CodeCopies::Tma {
            let (qw_ptr, _qw_sync) = self.qw.device_ptr(stream);
            codes_tensor_map(qw_ptr, self.kbs, self.out_features)?
        } else {
            TensorMapParam::zeroed()
        };
        let (mi, ni, kbi) = (m as i32, self.out_features as i32, self.kbs as i32);
        let out_f32 = O::IS_F32;
        let kb_split_i = kb_split as i32;
        let null = 0u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&map)
            .arg(&codes_map)
            .arg(&self.qw)
            .arg(&self.scales)
            .arg(&self.zeros)
            .arg(&mut out.data);
        b.arg(&mi).arg(&ni).arg(&kbi).arg(&out_f32);
        match (&part, &count) {
            (Some(p), Some(c)) => b.arg(&p.data).arg(&c.data),
            _ => b.arg(&null).arg(&null),
        };
        b.arg(&kb_split_i);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: grid,
            block_dim: (384, 1, 1),
            shared_mem_bytes: WS_SMEM_BYTES as u32,
        };
        // SAFETY: matches `w4_gemm_ws[t|2]_g{G}(W4wTensorMap, W4wTensorMap,
        // const unsigned char*, const half*, const half*, void*, int × 4,
        // float*, unsigned*, int)` with G this
        // layer's group size (64 or 128, checked); the pair kernels are
        // compiled with clusters of 2 along x, and `CodeCopies::BulkPairs`
        // comes only with an even grid x (`forward_wgmma_split`). Their
        // map's box is half the tokens, each CTA loading its half for
        // both. The tensor map describes x as M rows of K fp16 (its own
        // allocation, M·K checked below 2³¹), so TMA reads only inside
        // it (tokens past M are filled with zeros, not read). The kernel reads, per block x and stage s below
        // kbs = K/128, the 512-byte code blocks of tiles 16·x .. 16·x + 15
        // at ((tile·kbs + s)·512) bytes of qw (N/8 tiles × kbs blocks ×
        // 512 bytes: inside it, N a multiple of 128), by bulk copies or,
        // in `w4_gemm_wst`, by the codes' tensor map, which describes qw
        // as exactly those N/8 × kbs × 512 bytes (TMA stays inside it;
        // the other entries never read the zeroed map), and 128 scales and
        // zeros from group rows below K/G (validated at construction),
        // columns 128·x .. 128·x + 127 < N, by bulk copies of 256 bytes
        // from 256-byte aligned offsets (N a multiple of 128 halves). It
        // writes out[tok][col] for tok < M, col < N, as f32 or fp16 as
        // out_f32 names (out is M×N of O, checked), with 16-byte stores
        // into rows of N·4 or N·2 bytes (multiples of 256). The shared
        // memory (WS_SMEM_BYTES, the kernel's W4W_SMEM) is below the limit
        // just raised; the entry point traps unless compiled for sm_90a,
        // which it is on this sm_90 device (checked). With grid z > 1 (never
        // for the pair kernels) block z reads k-blocks z·kb_split .. below
        // kbs (every split non-empty: z < ⌈kbs / kb_split⌉), writes its
        // partial tile at word ((z·tiles + tile)·TILE_WORDS) of `part`
        // (splits·tiles·TILE_WORDS fp32, allocated above) and counts on
        // `count[tile]` (tiles zeroed u32s); both stay alive until after
        // the launch is queued and are freed in stream order. Without a
        // split the kernel never touches the two null pointers. All
        // buffers belong to this device's stream.
        unsafe { b.launch(cfg) }.during("launching w4_gemm_ws")?;
        Ok(())
    }
}

/// [`W4A16Linear::split_plan`] for `kbs` k-blocks.
fn split_plan(kbs: usize, splits: usize) -> (usize, usize) {
    let kb_split = kbs.div_ceil(splits.max(1));
    (kb_split, kbs.div_ceil(kb_split))
}

/// [`W4A16Linear::wgmma_auto_splits`] for `kbs` k-blocks and `tiles`
/// output tiles (that leave some of the `sms` SMs idle).
fn auto_splits(kbs: usize, tiles: usize, sms: usize) -> usize {
    let most = (kbs / MIN_STAGES_PER_SPLIT).clamp(1, MAX_SPLITS);
    let want = (sms / tiles.max(1)).clamp(1, most);
    split_plan(kbs, want).1
}

/// Set by tests ([`W4A16Linear::poison_split_partials`]) so that a split
/// launch's partial tiles start as NaN: the pool hands a repeated launch
/// the memory of the one before, whose partials would hide a block that
/// read one before it was written.
static POISON_SPLIT_PARTIALS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl W4A16Linear {
    /// For tests: every later split-K launch of the process first fills
    /// its partial tiles with NaN (an upload each, so never while a CUDA
    /// graph records), so that an output summed from a partial not yet
    /// written shows as NaN.
    pub fn poison_split_partials(on: bool) {
        POISON_SPLIT_PARTIALS.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether the specialized kernel splits K on its own where its tiles
/// leave SMs idle ([`W4A16Linear::wgmma_auto_splits`]). On an H100
/// (docs/BENCHMARKS.md, session 15) split-K beat dequantize-then-cuBLAS
/// on every 4096-wide layer from 128 to 512 rows (1.11–2.08×), and in the
/// engine it took Llama-2-7B-shaped decode batches of 128 from 6744–6810
/// to 7297–7331 tok/s and a 512-token prefill from 21.2–21.4 to 16.7 ms.
const SPLIT_BY_DEFAULT: bool = true;

/// What `LMQ_W4_WGMMA_SPLIT` asks for.
#[derive(Clone, Copy, Debug)]
enum SplitChoice {
    /// Unset: [`SPLIT_BY_DEFAULT`] decides.
    Default,
    /// `auto`: [`W4A16Linear::wgmma_auto_splits`].
    Auto,
    /// A count: K split that many ways (at most [`MAX_SPLITS`]).
    Ways(usize),
}

/// `LMQ_W4_WGMMA_SPLIT` (`auto` or a positive count), read once per
/// process. Anything else is an error.
fn split_override() -> Result<SplitChoice> {
    static SPLIT: std::sync::OnceLock<std::result::Result<SplitChoice, String>> =
        std::sync::OnceLock::new();
    SPLIT
        .get_or_init(|| match std::env::var("LMQ_W4_WGMMA_SPLIT") {
            Err(_) => Ok(SplitChoice::Default),
            Ok(v) if v.trim() == "auto" => Ok(SplitChoice::Auto),
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(SplitChoice::Ways(n.min(MAX_SPLITS))),
                _ => Err(format!(
                    "LMQ_W4_WGMMA_SPLIT must be auto or a positive number of splits, got {v:?}"
                )),
            },
        })
        .clone()
        .map_err(|detail| KernelError::invalid("W4 wgmma GEMM", detail))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_plans_cover_k_with_non_empty_splits() {
        for kbs in 1..=300usize {
            for asked in 1..=MAX_SPLITS {
                let (kb_split, made) = split_plan(kbs, asked);
                assert!(
                    made >= 1 && made <= asked.min(kbs),
                    "{kbs} by {asked}: {made}"
                );
                // Every k-block in exactly one split, the last non-empty.
                assert!(kb_split * made >= kbs && (made - 1) * kb_split < kbs);
            }
        }
        assert_eq!(split_plan(11, 8), (2, 6));
        assert_eq!(split_plan(32, 3), (11, 3));
    }

    #[test]
    fn auto_splits_fill_one_wave_of_a_132_sm_gpu() {
        // Llama-2-7B's 4096-wide layers (32 and 86 k-blocks, 32 tiles of
        // 128 channels per 256 rows) on an H100's 132 SMs: 4 ways up to
        // 256 rows, 2 up to 512 (64 tiles).
        assert_eq!(auto_splits(32, 32, 132), 4);
        assert_eq!(auto_splits(86, 32, 132), 4);
        assert_eq!(auto_splits(32, 64, 132), 2);
        // Few k-blocks cap the split: one per MIN_STAGES_PER_SPLIT.
        assert_eq!(auto_splits(8, 2, 132), 2);
        assert_eq!(auto_splits(3, 2, 132), 1);
        // Never more than MAX_SPLITS, and the grid stays within a wave.
        assert_eq!(auto_splits(256, 1, 132), MAX_SPLITS);
        for tiles in 1..=82usize {
            let s = auto_splits(86, tiles, 132);
            assert!(s * tiles <= 132 || s == 1, "{tiles} tiles: {s}");
        }
    }
}
