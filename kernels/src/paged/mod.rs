//! The paged KV cache on the GPU (`cu/paged_attn.cu`): a block pool in the
//! CPU backend's layout, the KV write with fp16 / int8 / int4 storage
//! (online per token-head parameters, or static calibrated ones), and causal
//! attention over each row's blocks with GQA and split-K.
//!
//! Invariants: every launch is preceded by a host-side check that the row
//! metadata only names blocks inside the pool and positions inside the
//! tables (so the kernels never index out of bounds), and results never
//! depend on batch composition (fixed split length, fixed merge order).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;

use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::{check_i32, on_device};

mod fused;
mod meta;
mod prefill;

pub use fused::{split_rope_kv_write, RopeTable};
use meta::check_meta;
pub use meta::{check_rows, RowMeta, RowPlace};
use prefill::{
    int_pipe_from_env, prefill_entry, prefill_smem_bytes, prefill_supported, use_prefill_tiles,
};
pub use prefill::{plan_prefill, PrefillPlan, PrefillTile, PREFILL_MIN_RUN, PREFILL_TILE_ROWS};

/// How the pool stores each value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStorage {
    F32,
    F16,
    Int8,
    Int4,
}

impl KvStorage {
    fn code(self) -> i32 {
        match self {
            KvStorage::F32 => 0,
            KvStorage::F16 => 1,
            KvStorage::Int8 => 2,
            KvStorage::Int4 => 3,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            KvStorage::F32 => "f32",
            KvStorage::F16 => "f16",
            KvStorage::Int8 => "i8",
            KvStorage::Int4 => "i4",
        }
    }

    /// Bytes of one token-head's values.
    pub fn bytes_per_token_head(self, head_dim: usize) -> usize {
        match self {
            KvStorage::F32 => 4 * head_dim,
            KvStorage::F16 => 2 * head_dim,
            KvStorage::Int8 => head_dim,
            KvStorage::Int4 => head_dim / 2,
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(self, KvStorage::Int8 | KvStorage::Int4)
    }
}

/// Head dimensions the attention kernel is compiled for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Positions per split of the attention kernel. Fixed, so that a row's
/// result does not depend on what else is in the batch.
pub const SPLIT_LEN: usize = 256;

/// Query heads one block handles per KV head (`MAX_G` in the kernel): the
/// compiled widths. A group wider than the last is split over blocks.
const GROUP_WIDTHS: [usize; 3] = [1, 4, 8];
/// The integer-storage kernel's width (`IG`): its MMAs take 8 query heads.
const INT_GROUP_WIDTH: usize = 8;
const WARPS: usize = 4;

/// Shared memory of the integer-storage kernel (`IntSmem` in the kernel):
/// per warp, NTW stages of 16 keys (padded K and V code rows and 32 decoded
/// parameter pairs), reused afterwards for the warps' output states.
fn int_smem_bytes(storage: KvStorage, head_dim: usize) -> usize {
    let bpt = storage.bytes_per_token_head(head_dim);
    let sk = bpt + if bpt / 4 >= 32 { 16 } else { 0 };
    let sv = bpt + 16;
    let stage = 16 * (sk + sv) + 32 * 8;
    let ntw = (256 / bpt).clamp(1, 4);
    let state = 2 * INT_GROUP_WIDTH + INT_GROUP_WIDTH * (head_dim + 4);
    (WARPS * ntw * stage).max(WARPS * state * 4)
}

/// Which integer-storage attention kernel runs, and over how many positions
/// per split. Benchmarks compare variants; [`paged_attention`] uses
/// [`IntAttnConfig::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntAttnConfig {
    /// The streaming kernel (`paged_attn_int2.cu`) as (tile stages per
    /// warp, blocks per SM its registers must allow), one of
    /// [`int2_variants`]; `None` for the tile kernel (`paged_attn_int.cu`).
    /// Pools whose blocks are not a multiple of 16 positions, and GPUs
    /// before sm_80, always use the tile kernel.
    pub stream: Option<(usize, usize)>,
    /// Positions per split (a multiple of 16, at most [`MAX_INT2_SPLIT`] for
    /// the streaming kernel).
    pub split_len: usize,
    /// The streaming kernel with keys centred before the MMA (compiled for
    /// the first of [`int2_variants`] only): one subtraction per key
    /// register, for scores that keep their precision with large queries.
    /// Selectable, not yet used: it has not run on a GPU. It is meant for
    /// turbomind's `smooth` mode, which keeps the tile kernel until this
    /// passes `paged_attention_matches_cpu` there (docs/BENCHMARKS.md,
    /// "CUDA, session 6").
    pub centre_keys: bool,
}

/// Positions per split of the streaming kernel by default: at batch 64 ×
/// 2048 positions (H100, 2026-12-06) 512 ran within 1% of 1024 and 2-10%
/// ahead of 256, and it keeps twice 1024's parallelism for short batches.
pub const INT2_SPLIT_LEN: usize = 512;

impl Default for IntAttnConfig {
    /// The streaming kernel (its first variant compiled for the shape),
    /// [`INT2_SPLIT_LEN`] positions per split: it passed its parity test
    /// against the tile kernel and the CPU and ran 1.86× (int8) and 3.30×
    /// (int4) faster than fp16 KV where the tile kernel ran 1.71× and 2.10×
    /// (docs/BENCHMARKS.md, "CUDA, session 6"). Shapes it does not cover
    /// fall back to the tile kernel, at [`SPLIT_LEN`]. (turbomind's
    /// `smooth` KV mode asks for the tile kernel: see its CUDA backend.)
    fn default() -> Self {
        Self {
            stream: Some((0, 0)),
            split_len: INT2_SPLIT_LEN,
            centre_keys: false,
        }
    }
}

/// The longest split of the streaming kernel: 32 tiles of 16 positions per
/// warp (each lane looks up one tile's block).
pub const MAX_INT2_SPLIT: usize = 32 * 16 * WARPS;

/// The streaming kernel's compiled variants (`ATTN_INT2_ENTRY` in
/// cu/paged_attn_entry.cu) as (stages, blocks per SM), the default first.
pub fn int2_variants(storage: KvStorage, head_dim: usize) -> &'static [(usize, usize)] {
    match (storage, head_dim) {
        (KvStorage::Int8, 64) => &[(3, 4)],
        (KvStorage::Int4, 64) => &[(4, 4)],
        (KvStorage::Int8, 128) => &[(3, 4), (2, 4), (2, 5)],
        (KvStorage::Int4, 128) => &[(4, 4), (3, 4), (4, 5), (3, 5)],
        (KvStorage::Int8, 256) => &[(2, 2)],
        (KvStorage::Int4, 256) => &[(3, 2)],
        _ => &[],
    }
}

/// Shared memory of the streaming kernel (`Int2Cfg::bytes` in the kernel):
/// per warp, `stages` tile stages (padded K and V rows, the raw parameters)
/// and 16 decoded parameter quadruples, reused afterwards for the warps'
/// output states.
fn int2_smem_bytes(storage: KvStorage, head_dim: usize, stages: usize) -> usize {
    let bpt = storage.bytes_per_token_head(head_dim);
    let zb = if storage == KvStorage::Int8 { 1 } else { 2 };
    let rsk = if bpt / 4 == 32 { bpt + 16 } else { bpt };
    let rsv = bpt + 16;
    let stage = 15 * rsk + bpt + 15 * rsv + bpt + 2 * (32 + 16 * zb);
    let state = 2 * INT_GROUP_WIDTH + INT_GROUP_WIDTH * (head_dim + 4);
    (WARPS * (stages * stage + 256)).max(WARPS * state * 4)
}

/// The shape of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_len: usize,
    pub num_blocks: usize,
    pub storage: KvStorage,
}

impl KvLayout {
    fn token_heads(&self) -> Option<usize> {
        self.num_blocks
            .checked_mul(self.num_layers)?
            .checked_mul(2 * self.num_kv_heads)?
            .checked_mul(self.block_len)
    }
}

/// Bytes of online parameters one segment of `block_len` token-heads owns:
/// an fp16 scale each, then a one-byte zero-point each (int8) or an fp16
/// zero each (int4), padded to an even size (`param_segment_bytes` in
/// cu/paged_attn.cu).
pub fn param_segment_bytes(storage: KvStorage, block_len: usize) -> usize {
    let zero_bytes = if storage == KvStorage::Int8 { 1 } else { 2 };
    2 * block_len + (zero_bytes * block_len).next_multiple_of(2)
}

/// A pool of KV blocks resident on one GPU.
pub struct DeviceKvPool {
    layout: KvLayout,
    data: DeviceMatrix<u8>,
    /// Online integer modes: per segment of `block_len` token-heads, their
    /// fp16 scales then their zeros ([`param_segment_bytes`] bytes); one
    /// unused byte otherwise.
    params: DeviceMatrix<u8>,
    /// `[layer][K, V][head][scale, zero]` in static mode; one unused
    /// element otherwise.
    statics: DeviceMatrix<f32>,
    static_mode: bool,
}

impl std::fmt::Debug for DeviceKvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKvPool[{:?}]", self.layout)
    }
}

impl DeviceKvPool {
    /// Allocates a zeroed pool. `statics` (static mode of an integer
    /// storage) holds `[layer][K, V][head][scale, zero]`, scales already in
    /// units of this storage's levels.
    pub fn new(dev: &GpuDevice, layout: KvLayout, statics: Option<&[f32]>) -> Result<Self> {
        const OP: &str = "KV pool";
        if !HEAD_DIMS.contains(&layout.head_dim) {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "head_dim {} is not supported by the CUDA attention kernel (supported: {HEAD_DIMS:?})",
                    layout.head_dim
                ),
            ));
        }
        if layout.block_len == 0 || layout.num_blocks == 0 || layout.num_kv_heads == 0 {
            return Err(KernelError::invalid(
                OP,
                format!("a pool needs blocks, positions and heads: {layout:?}"),
            ));
        }
        let token_heads = layout
            .token_heads()
            .ok_or_else(|| KernelError::shape(OP, "the pool size overflows"))?;
        let bytes = token_heads
            .checked_mul(layout.storage.bytes_per_token_head(layout.head_dim))
            .ok_or_else(|| KernelError::shape(OP, "the pool size overflows"))?;
        let static_mode = statics.is_some();
        if static_mode && !layout.storage.is_integer() {
            return Err(KernelError::invalid(
                OP,
                "static parameters only apply to int8 and int4 storage",
            ));
        }
        let statics = match statics {
            Some(s) => {
                let want = layout.num_layers * 2 * layout.num_kv_heads * 2;
                if s.len() != want || s.iter().any(|v| !v.is_finite()) {
                    return Err(KernelError::shape(
                        OP,
                        format!(
                            "static parameters need {want} finite values, got {}",
                            s.len()
                        ),
                    ));
                }
                dev.upload(s, s.len(), 1)?
            }
            None => dev.zeros(1, 1)?,
        };
        let params = if layout.storage.is_integer() && !static_mode {
            let bytes = (token_heads / layout.block_len)
                .checked_mul(param_segment_bytes(layout.storage, layout.block_len))
                .ok_or_else(|| KernelError::shape(OP, "the pool size overflows"))?;
            dev.zeros(bytes, 1)?
        } else {
            dev.zeros(1, 1)?
        };
        Ok(Self {
            layout,
            data: dev.zeros(bytes, 1)?,
            params,
            statics,
            static_mode,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Device bytes the pool holds (codes plus parameters).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.params.len() + 4 * self.statics.len()
    }

    /// The pool's codes and online parameters as stored (waits for the
    /// stream): for tests that compare two ways of writing it.
    pub fn download_bytes(&self, dev: &GpuDevice) -> Result<(Vec<u8>, Vec<u8>)> {
        Ok((dev.download(&self.data)?, dev.download(&self.params)?))
    }
}

fn check_kv_input(
    op: &'static str,
    pool: &DeviceKvPool,
    meta: &RowMeta,
    x: &DeviceMatrix<f32>,
    heads: usize,
    what: &str,
) -> Result<()> {
    let want = heads * pool.layout.head_dim;
    if x.rows() != meta.rows || x.cols() != want {
        return Err(KernelError::shape(
            op,
            format!(
                "{what} is {}×{}, expected {}×{want}",
                x.rows(),
                x.cols(),
                meta.rows
            ),
        ));
    }
    Ok(())
}

/// The arguments every KV-writing kernel ends with (`kv_write`,
/// `split_rope_kv_write`): the pool's codes, parameters and statics, then
/// its mode and shape as ints.
struct PoolWriteArgs {
    dt: i32,
    static_mode: i32,
    layer: i32,
    num_layers: i32,
    kv_heads: i32,
    head_dim: i32,
    block_len: i32,
}

impl PoolWriteArgs {
    fn new(op: &'static str, pool: &DeviceKvPool, layer: i32) -> Result<Self> {
        let l = pool.layout;
        Ok(Self {
            dt: l.storage.code(),
            static_mode: i32::from(pool.static_mode),
            layer,
            num_layers: check_i32(op, "layers", l.num_layers)?,
            kv_heads: check_i32(op, "KV heads", l.num_kv_heads)?,
            head_dim: check_i32(op, "head_dim", l.head_dim)?,
            block_len: check_i32(op, "block_len", l.block_len)?,
        })
    }

    /// Pushes the pool and these ints, in the kernels' order.
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>, pool: &'a mut DeviceKvPool) {
        b.arg(&mut pool.data.data)
            .arg(&mut pool.params.data)
            .arg(&pool.statics.data)
            .arg(&self.dt)
            .arg(&self.static_mode)
            .arg(&self.layer)
            .arg(&self.num_layers)
            .arg(&self.kv_heads)
            .arg(&self.head_dim)
            .arg(&self.block_len);
    }
}

fn check_layer(op: &'static str, pool: &DeviceKvPool, layer: usize) -> Result<i32> {
    if layer >= pool.layout.num_layers {
        return Err(KernelError::invalid(
            op,
            format!("layer {layer} of a {}-layer pool", pool.layout.num_layers),
        ));
    }
    Ok(layer as i32)
}

/// Stores the K and V rows (`rows × kv_heads·head_dim` each) of one layer
/// at each row's position, quantizing as the pool's storage says.
pub fn kv_write(
    dev: &GpuDevice,
    pool: &mut DeviceKvPool,
    layer: usize,
    k: &DeviceMatrix<f32>,
    v: &DeviceMatrix<f32>,
    meta: &RowMeta,
) -> Result<()> {
    const OP: &str = "kv_write";
    let l = pool.layout;
    check_kv_input(OP, pool, meta, k, l.num_kv_heads, "K")?;
    check_kv_input(OP, pool, meta, v, l.num_kv_heads, "V")?;
    let layer = check_layer(OP, pool, layer)?;
    check_meta(OP, pool, meta)?;
    on_device(
        OP,
        dev,
        &[
            k.is_on(dev),
            v.is_on(dev),
            meta.is_on(dev),
            pool.data.is_on(dev),
        ],
    )?;
    if meta.rows == 0 {
        return Ok(());
    }
    let rows = check_i32(OP, "rows", meta.rows)?;
    let f = dev.function(Module::PagedAttn, "kv_write")?;
    let args = PoolWriteArgs::new(OP, pool, layer)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&k.data).arg(&v.data).arg(&meta.meta.data).arg(&rows);
    args.push(&mut b, pool);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 2 * l.num_kv_heads as u32, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `kv_write` in cu/paged_attn.cu. K and V are rows ×
    // H·hd f32 (checked above); `check_meta` checked every block id of
    // `meta` against this pool's size and each table's length against its
    // row's position; params holds `param_segment_bytes` per segment of
    // block_len token-heads in online integer modes, which is the only case
    // the kernel writes it; statics holds L·2·H·2 floats
    // in static mode, the only case it is read.
    unsafe { b.launch(cfg) }.during("launching kv_write")?;
    Ok(())
}

/// Causal attention of each row (`q`: rows × num_heads·head_dim, fp32) over
/// positions `0..=pos` of its blocks; returns rows × num_heads·head_dim.
pub fn paged_attention(
    dev: &GpuDevice,
    pool: &DeviceKvPool,
    layer: usize,
    q: &DeviceMatrix<f32>,
    num_heads: usize,
    meta: &RowMeta,
) -> Result<DeviceMatrix<f32>> {
    paged_attention_with(
        dev,
        pool,
        layer,
        q,
        num_heads,
        meta,
        IntAttnConfig::default(),
    )
}

/// [`paged_attention`] with a chosen integer-storage kernel (ignored for
/// float storage, which always splits by [`SPLIT_LEN`]).
pub fn paged_attention_with(
    dev: &GpuDevice,
    pool: &DeviceKvPool,
    layer: usize,
    q: &DeviceMatrix<f32>,
    num_heads: usize,
    meta: &RowMeta,
    cfg: IntAttnConfig,
) -> Result<DeviceMatrix<f32>> {
    attend(dev, pool, layer, q, num_heads, meta, cfg, false).map(|(out, _)| out)
}

/// [`paged_attention_with`], also returning the output's fp16 copy
/// (`fp16(out)` element for element), written by the same kernels, for a
/// linear that reads fp16 next.
pub fn paged_attention_half(
    dev: &GpuDevice,
    pool: &DeviceKvPool,
    layer: usize,
    q: &DeviceMatrix<f32>,
    num_heads: usize,
    meta: &RowMeta,
    cfg: IntAttnConfig,
) -> Result<(DeviceMatrix<f32>, DeviceMatrix<f16>)> {
    let (out, half) = attend(dev, pool, layer, q, num_heads, meta, cfg, true)?;
    let half = half.ok_or_else(|| KernelError::invalid("paged_attention", "no fp16 copy"))?;
    Ok((out, half))
}

#[allow(clippy::too_many_arguments)]
fn attend(
    dev: &GpuDevice,
    pool: &DeviceKvPool,
    layer: usize,
    q: &DeviceMatrix<f32>,
    num_heads: usize,
    meta: &RowMeta,
    cfg: IntAttnConfig,
    with_half: bool,
) -> Result<(DeviceMatrix<f32>, Option<DeviceMatrix<f16>>)> {
    const OP: &str = "paged_attention";
    let l = pool.layout;
    if num_heads == 0 || !num_heads.is_multiple_of(l.num_kv_heads) {
        return Err(KernelError::invalid(
            OP,
            format!(
                "{num_heads} query heads do not group over {} KV heads",
                l.num_kv_heads
            ),
        ));
    }
    check_kv_input(OP, pool, meta, q, num_heads, "q")?;
    let layer = check_layer(OP, pool, layer)?;
    check_meta(OP, pool, meta)?;
    on_device(
        OP,
        dev,
        &[q.is_on(dev), meta.is_on(dev), pool.data.is_on(dev)],
    )?;
    let hd = l.head_dim;
    let mut out = dev.uninit::<f32>(meta.rows, num_heads * hd)?;
    let mut half = if with_half {
        Some(dev.uninit::<f16>(meta.rows, num_heads * hd)?)
    } else {
        None
    };
    if meta.rows == 0 {
        return Ok((out, half));
    }
    // The kernels write the fp16 copy where this pointer is not null.
    let null_half: u64 = 0;
    // The streaming integer kernel needs tiles of 16 positions inside one
    // block, cp.async and ldmatrix (sm_80+), and a ring depth compiled for
    // this shape.
    let variant = match cfg.stream {
        Some(v)
            if l.storage.is_integer()
                && l.block_len.is_multiple_of(16)
                && dev.compute_capability() >= (8, 0) =>
        {
            let compiled = int2_variants(l.storage, l.head_dim);
            if v == (0, 0) || (cfg.centre_keys && compiled.first() == Some(&v)) {
                compiled.first().copied()
            } else if cfg.centre_keys {
                return Err(KernelError::invalid(
                    OP,
                    format!("centred keys are compiled for {:?} only", compiled.first()),
                ));
            } else if compiled.contains(&v) {
                Some(v)
            } else {
                return Err(KernelError::invalid(
                    OP,
                    format!("no streaming kernel {v:?} for this head_dim and storage"),
                ));
            }
        }
        _ => None,
    };
    let stages = variant.map_or(0, |v| v.0);
    // A streaming kernel asked for but not available for this pool falls
    // back to the tile kernel at the tile kernel's own split.
    let split_len = if l.storage.is_integer() && (stages > 0 || cfg.stream.is_none()) {
        cfg.split_len
    } else {
        SPLIT_LEN
    };
    if split_len == 0 || !split_len.is_multiple_of(16) || (stages > 0 && split_len > MAX_INT2_SPLIT)
    {
        return Err(KernelError::invalid(
            OP,
            format!("split length {split_len} is not a multiple of 16 up to {MAX_INT2_SPLIT}"),
        ));
    }
    let splits = meta.max_pos / split_len + 1;
    let group = num_heads / l.num_kv_heads;
    let width = if l.storage.is_integer() {
        INT_GROUP_WIDTH
    } else {
        GROUP_WIDTHS
            .iter()
            .copied()
            .find(|&w| w >= group)
            .unwrap_or(GROUP_WIDTHS[GROUP_WIDTHS.len() - 1])
    };
    let chunks = group.div_ceil(width);
    // Rows the prefill kernel takes (a plan, a pool it is compiled for, and
    // enough tiles) leave the decode launch, which then runs over the list
    // of the others.
    let prefill = meta.prefill.filter(|p| {
        prefill_supported(dev, &l)
            && use_prefill_tiles(p.always, p.tiles, num_heads, dev.num_sms() as usize)
    });
    let (decode_rows, rows_at) = match prefill {
        Some(p) => (p.decode_rows, check_i32(OP, "row list", p.rows_at)?),
        None => (meta.rows, -1),
    };
    // Partial states of the decode launch's split rows, by launch slot:
    // (m, l) and the unnormalized output.
    let (mut part_ml, mut part_acc) = if splits > 1 && decode_rows > 0 {
        (
            dev.uninit::<f32>(decode_rows * num_heads * splits, 2)?,
            dev.uninit::<f32>(decode_rows * num_heads * splits, hd)?,
        )
    } else {
        (dev.uninit::<f32>(1, 1)?, dev.uninit::<f32>(1, 1)?)
    };
    let name = if let Some((ns, minb)) = variant {
        let kc = if cfg.centre_keys { "_kc" } else { "" };
        format!("paged_attn2_h{hd}_{}_s{ns}_b{minb}{kc}", l.storage.suffix())
    } else if l.storage.is_integer() {
        format!("paged_attn_h{hd}_{}", l.storage.suffix())
    } else {
        format!("paged_attn_h{hd}_{}_g{width}", l.storage.suffix())
    };
    let module = if variant.is_some() {
        Module::AttnStream
    } else if l.storage.is_integer() {
        Module::AttnInt
    } else {
        Module::PagedAttn
    };
    let f = dev.function(module, &name)?;
    let rows = check_i32(OP, "rows", meta.rows)?;
    let (sm, li, hi, nhi, bli) = (
        i32::from(pool.static_mode),
        l.num_layers as i32,
        l.num_kv_heads as i32,
        check_i32(OP, "heads", num_heads)?,
        l.block_len as i32,
    );
    let (split_len, splits_i) = (
        check_i32(OP, "split length", split_len)?,
        check_i32(OP, "splits", splits)?,
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let smem = if stages > 0 {
        let bytes = int2_smem_bytes(l.storage, hd, stages);
        // More than 48 KiB of dynamic shared memory must be asked for.
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            check_i32(OP, "shared memory", bytes)?,
        )
        .during("raising the attention shared-memory limit")?;
        bytes
    } else if l.storage.is_integer() {
        int_smem_bytes(l.storage, hd)
    } else {
        // Per sub-group of TPK = hd / 8 lanes: m, l and the row of each head.
        let nsg = (32 / (hd / 8)) * WARPS;
        nsg * width * (2 + hd) * 4
    };
    // Every entry, decode or prefill, takes these arguments and then two
    // more: `rows_at` or `tiles_at`, and the fp16 copy (or null).
    let launch = |f: &cudarc::driver::CudaFunction,
                  cfg: LaunchConfig,
                  at: i32,
                  out: &mut DeviceMatrix<f32>,
                  half: &mut Option<DeviceMatrix<f16>>,
                  part_ml: &mut DeviceMatrix<f32>,
                  part_acc: &mut DeviceMatrix<f32>|
     -> Result<()> {
        let mut b = dev.stream().launch_builder(f);
        b.arg(&q.data)
            .arg(&meta.meta.data)
            .arg(&rows)
            .arg(&pool.data.data)
            .arg(&pool.params.data)
            .arg(&pool.statics.data)
            .arg(&sm)
            .arg(&layer)
            .arg(&li)
            .arg(&hi)
            .arg(&nhi)
            .arg(&bli)
            .arg(&split_len)
            .arg(&splits_i)
            .arg(&scale)
            .arg(&mut out.data)
            .arg(&mut part_ml.data)
            .arg(&mut part_acc.data)
            .arg(&at);
        match half {
            Some(h) => b.arg(&mut h.data),
            None => b.arg(&null_half),
        };
        // SAFETY: matches `paged_attn_h{hd}_{dtype}_*`,
        // `paged_attn2_h{hd}_*` and `paged_attn_prefill_h{hd}_{dtype}` in
        // cu/paged_attn_entry.cu (every entry takes these arguments); hd is
        // one of the compiled head dims (checked at pool creation); q and
        // out (and the fp16 copy, when not null) are rows × NH·hd; meta was checked (blocks inside a pool of
        // this size, tables long enough for each row's position, by
        // `check_meta`), and its row list and tile list (at `at`, written
        // by `RowMeta::planned` from the same rows) name rows below `rows`
        // only; the partial buffers hold (launched rows)·NH·splits states
        // when splits > 1, the only case the decode kernels write them
        // (indexed by launch slot; the prefill kernel never does); smem covers
        // each kernel's stages and state (the caller raised the limit where
        // it passes 48 KiB). The streaming and prefill kernels' further
        // needs were checked by the caller: blocks of a multiple of 16
        // positions, split_len a multiple of 16 up to MAX_INT2_SPLIT, sm_80+
        // (streaming); head_dim 64 or 128, fp16/int8/int4 storage, sm_80+
        // (prefill).
        unsafe { b.launch(cfg) }.during("launching paged_attn")?;
        Ok(())
    };
    if decode_rows > 0 {
        let grid_y = u32::try_from(l.num_kv_heads * chunks)
            .map_err(|_| KernelError::shape(OP, "too many heads"))?;
        let cfg = LaunchConfig {
            grid_dim: (decode_rows as u32, grid_y, splits as u32),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        launch(
            &f,
            cfg,
            rows_at,
            &mut out,
            &mut half,
            &mut part_ml,
            &mut part_acc,
        )?;
    }
    if let Some(p) = prefill {
        let pipe = int_pipe_from_env();
        let f = dev.function(Module::AttnPrefill, &prefill_entry(l.storage, hd, pipe))?;
        let bytes = prefill_smem_bytes(l.storage, hd, pipe);
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            check_i32(OP, "shared memory", bytes)?,
        )
        .during("raising the prefill attention shared-memory limit")?;
        let cfg = LaunchConfig {
            grid_dim: (
                check_i32(OP, "prefill tiles", p.tiles)? as u32,
                num_heads as u32,
                1,
            ),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        let tiles_at = check_i32(OP, "tile list", p.tiles_at)?;
        launch(
            &f,
            cfg,
            tiles_at,
            &mut out,
            &mut half,
            &mut part_ml,
            &mut part_acc,
        )?;
    }
    if splits > 1 && decode_rows > 0 {
        let f = dev.function(Module::PagedAttn, "attn_merge")?;
        let hdi = hd as i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&meta.meta.data)
            .arg(&rows)
            .arg(&nhi)
            .arg(&hdi)
            .arg(&split_len)
            .arg(&splits_i)
            .arg(&part_ml.data)
            .arg(&part_acc.data)
            .arg(&mut out.data)
            .arg(&rows_at);
        match &mut half {
            Some(h) => b.arg(&mut h.data),
            None => b.arg(&null_half),
        };
        let cfg = LaunchConfig {
            grid_dim: (decode_rows as u32, num_heads as u32, 1),
            block_dim: (hd.div_ceil(32) as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `attn_merge`; it runs over the decode launch's
        // slots (the same row list), each slot's used splits
        // (ceil((pos+1)/split_len) ≤ splits) were all written by that
        // launch, and out (and the fp16 copy, when not null) is rows × NH·hd.
        unsafe { b.launch(cfg) }.during("launching attn_merge")?;
    }
    Ok((out, half))
}
