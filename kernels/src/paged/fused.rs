//! The rotary embedding and the KV write in one launch
//! (`split_rope_kv_write` in cu/paged_attn.cu): a decode step's q/k/v
//! split, rope and pool store cost one kernel instead of two, and K and V
//! never exist as matrices (an H100 profile of a 7B decode step, session 9,
//! put each of the two launches at 2.6–2.7 µs, for microseconds of work).
//! The pool holds the same bytes as after `act::split_rope` and
//! [`super::kv_write`]: the kernel stores each token-head with the same
//! device function as kv_write.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::meta::check_meta;
use super::{check_layer, DeviceKvPool, PoolWriteArgs, RowMeta};
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::{check_i32, on_device};

/// What [`split_rope_kv_write`] rotates by: the inverse frequencies
/// (head_dim/2 of them) and the scale applied to positions first.
#[derive(Debug, Clone, Copy)]
pub struct RopeTable<'a> {
    pub inv_freq: &'a DeviceMatrix<f32>,
    pub pos_scale: f32,
}

/// Splits `qkv` (rows × (q_heads + 2·kv_heads)·head_dim, a stacked q/k/v
/// projection's output) by head: writes q with the rotary embedding into
/// `q` (rows × q_heads·head_dim), and stores k (rotated) and v at each
/// row's position in `layer` of `pool`, quantizing as the pool's storage
/// says. The pool's kv_heads and head_dim define the split.
pub fn split_rope_kv_write(
    dev: &GpuDevice,
    qkv: &DeviceMatrix<f32>,
    q: &mut DeviceMatrix<f32>,
    pool: &mut DeviceKvPool,
    layer: usize,
    meta: &RowMeta,
    rope: RopeTable<'_>,
) -> Result<()> {
    const OP: &str = "split_rope_kv_write";
    let l = pool.layout;
    let hd = l.head_dim;
    if rope.inv_freq.len() * 2 != hd || hd == 0 || hd > 2048 {
        return Err(KernelError::invalid(
            OP,
            format!(
                "{} inverse frequencies for head_dim {hd} (it needs head_dim/2, head_dim up to 2048)",
                rope.inv_freq.len()
            ),
        ));
    }
    let q_heads = q.cols() / hd;
    let heads = q_heads + 2 * l.num_kv_heads;
    if !q.cols().is_multiple_of(hd)
        || q.rows() != meta.rows
        || qkv.rows() != meta.rows
        || qkv.cols() != heads * hd
        || heads > 65535
    {
        return Err(KernelError::shape(
            OP,
            format!(
                "q/k/v {}×{} and q {}×{} do not fit {} rows of {} KV heads of {hd}",
                qkv.rows(),
                qkv.cols(),
                q.rows(),
                q.cols(),
                meta.rows,
                l.num_kv_heads
            ),
        ));
    }
    let layer = check_layer(OP, pool, layer)?;
    check_meta(OP, pool, meta)?;
    on_device(
        OP,
        dev,
        &[
            qkv.is_on(dev),
            q.is_on(dev),
            meta.is_on(dev),
            rope.inv_freq.is_on(dev),
            pool.data.is_on(dev),
        ],
    )?;
    if meta.rows == 0 {
        return Ok(());
    }
    let rows = check_i32(OP, "rows", meta.rows)?;
    let f = dev.function(Module::PagedAttn, OP)?;
    let nq = q_heads as i32;
    let args = PoolWriteArgs::new(OP, pool, layer)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&qkv.data)
        .arg(&mut q.data)
        .arg(&meta.meta.data)
        .arg(&rows)
        .arg(&rope.inv_freq.data)
        .arg(&rope.pos_scale)
        .arg(&nq);
    args.push(&mut b, pool);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, 1),
        block_dim: ((hd / 2).div_ceil(32) as u32 * 32, 1, 1),
        shared_mem_bytes: (hd * 4) as u32,
    };
    // SAFETY: matches `split_rope_kv_write` in cu/paged_attn.cu. qkv is
    // rows × (q_heads + 2·H)·hd and q rows × q_heads·hd f32 (checked
    // above); inv_freq has hd/2 entries and the block hd/2 threads or more
    // (threads past hd/2 only join the barrier and the storing warp);
    // shared memory holds one head of hd floats; `check_meta` checked every
    // block id of `meta` against this pool and each table's length against
    // its row's position; params and statics are as `kv_write` reads them.
    unsafe { b.launch(cfg) }.during("launching split_rope_kv_write")?;
    Ok(())
}
