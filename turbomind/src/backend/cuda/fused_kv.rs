//! The rotary embedding and the KV write of a stacked q/k/v projection in
//! one launch ([`Backend::split_qkv_rope_write_kv`] on the GPU): an H100
//! profile of a 7B decode step (session 9, docs/BENCHMARKS.md) put the
//! split/rope launch and the KV write at 2.6–2.7 µs each, mostly launch
//! latency. On by default since session 10, when its test
//! (`kernels/tests/rope_kv.rs`, bit-identical q and pool bytes against the
//! two launches) passed on an H100 and greedy text was unchanged;
//! `LMQ_FUSED_KV_WRITE=0` keeps the two launches.
//!
//! The smooth KV mode scales the keys and rotates the values before they
//! are stored, so its layers keep the two launches.

use lmq_kernels::paged::{self, RopeTable};

use super::{gpu_error, graph, qkv_in_whole_heads, CudaAct, CudaBackend, CudaKvPool};
use crate::backend::{split_qkv_rope_write_kv_apart, AttnShape, SeqSpan};
use crate::error::Result;
use crate::rope::Rope;

/// Whether the fused launch is used (unless `LMQ_FUSED_KV_WRITE=0`).
fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::env_switch("LMQ_FUSED_KV_WRITE", true))
}

/// What the backend's `split_qkv_rope_write_kv` needs, in one place.
pub(super) struct QkvStep<'a> {
    pub layer: usize,
    pub qkv: &'a CudaAct,
    pub widths: &'a [usize],
    pub shape: &'a AttnShape,
    pub spans: &'a [SeqSpan],
    pub rope: &'a Rope,
}

/// q of the step, with k and v stored in `pool`: one launch where the
/// shapes are the usual ones (whole heads; v as wide as k; the pool's
/// heads and head_dim), else the two ops.
pub(super) fn split_qkv_rope_write_kv(
    b: &CudaBackend,
    step: QkvStep<'_>,
    pool: &mut CudaKvPool,
) -> Result<CudaAct> {
    let QkvStep {
        layer,
        qkv,
        widths,
        shape,
        spans,
        rope,
    } = step;
    let hd = rope.inv_freq.len() * 2;
    let l = pool.pool.layout();
    let smooth = pool.smooth.as_ref().and_then(|s| s.get(layer)).is_some();
    let fits = qkv_in_whole_heads(widths, shape, hd)
        && widths[2] == widths[1]
        && hd == l.head_dim
        && shape.num_kv_heads == l.num_kv_heads;
    if !fused_enabled() || smooth || !fits {
        return split_qkv_rope_write_kv_apart(b, layer, qkv, widths, pool, shape, spans, rope);
    }
    b.check_rows(qkv, spans, "split_qkv_rope_write_kv")?;
    let meta = b.row_meta(spans)?;
    graph::check_engine_blocks(&meta, pool)?;
    let inv_freq = b.inv_freq(rope)?;
    let mut q = b.dev.uninit(qkv.rows(), widths[0]).map_err(gpu_error)?;
    paged::split_rope_kv_write(
        &b.dev,
        qkv,
        &mut q,
        &mut pool.pool,
        layer,
        &meta,
        RopeTable {
            inv_freq: &inv_freq,
            pos_scale: rope.position_scale,
        },
    )
    .map_err(gpu_error)?;
    Ok(q.into())
}
