//! The CUDA backend's attention op: the paged kernels over the pool, with
//! the `smooth` KV mode's query scaling and value rotation around them, and
//! the fp16 copy of the output that o_proj reads written by the kernels
//! themselves: the conversion launch it replaces took 2.3 µs per layer of
//! a 7B decode step on an H100 (session 9). On by default since session
//! 10, when greedy text with it was unchanged on an H100 (fp16 and int8
//! KV, graphs on and off); `LMQ_ATTN_HALF=0` keeps the conversion.

use lmq_kernels::act;
use lmq_kernels::paged::{self, IntAttnConfig};

use super::{gpu_error, graph, CudaAct, CudaBackend, CudaKvPool};
use crate::backend::{AttnShape, SeqSpan};
use crate::error::Result;

/// Whether the attention kernels write o_proj's fp16 input themselves
/// instead of a conversion launch (unless `LMQ_ATTN_HALF=0`).
fn attention_half() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::env_switch("LMQ_ATTN_HALF", true))
}

/// Whether the `smooth` KV mode takes the streaming kernel with centred keys
/// (`LMQ_SMOOTH_CENTRED=1`) instead of the tile kernel: a trial switch; on
/// an H100 it failed its int4 bound (docs/BENCHMARKS.md, sessions 8 and 9).
fn smooth_centred() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMQ_SMOOTH_CENTRED").is_ok_and(|v| v == "1"))
}

/// Causal attention of each row of `q` over its sequence's positions in
/// `layer` of the pool.
pub(super) fn attention(
    b: &CudaBackend,
    layer: usize,
    q: &CudaAct,
    pool: &CudaKvPool,
    spans: &[SeqSpan],
    shape: &AttnShape,
) -> Result<CudaAct> {
    b.check_rows(q, spans, "attention")?;
    let meta = b.row_meta(spans)?;
    graph::check_engine_blocks(&meta, pool)?;
    match pool.smooth.as_ref().and_then(|s| s.get(layer)) {
        Some(sm) => {
            let qs = act::scale_cols(&b.dev, q, &sm.queries, None, false).map_err(gpu_error)?;
            // The tile kernel: with smooth-mode inputs (queries scaled
            // by the key factors, keys divided by them) the streaming
            // kernel, the default elsewhere, left int4 up to 3.2e-3 from
            // the CPU on an H100 (head_dim 256), past the 3e-3 bound the
            // tile kernel meets (2.1e-3); docs/BENCHMARKS.md, session 6.
            // The streaming kernel with centred keys, written for this,
            // is tried with `LMQ_SMOOTH_CENTRED=1` until it has passed
            // `paged_attention_matches_cpu` on a GPU.
            let tile = if smooth_centred() {
                IntAttnConfig {
                    centre_keys: true,
                    ..IntAttnConfig::default()
                }
            } else {
                IntAttnConfig {
                    stream: None,
                    split_len: paged::SPLIT_LEN,
                    centre_keys: false,
                }
            };
            let rotated = paged::paged_attention_with(
                &b.dev,
                &pool.pool,
                layer,
                &qs,
                shape.num_heads,
                &meta,
                tile,
            )
            .map_err(gpu_error)?;
            act::hadamard(&b.dev, &rotated, shape.head_dim)
                .map(CudaAct::from)
                .map_err(gpu_error)
        }
        None if !attention_half() => {
            paged::paged_attention(&b.dev, &pool.pool, layer, q, shape.num_heads, &meta)
                .map(CudaAct::from)
                .map_err(gpu_error)
        }
        // The kernels also write the fp16 copy o_proj reads, which
        // spares o_proj its conversion launch.
        None => paged::paged_attention_half(
            &b.dev,
            &pool.pool,
            layer,
            q,
            shape.num_heads,
            &meta,
            IntAttnConfig::default(),
        )
        .map(|(out, half)| CudaAct::with_half(out, half))
        .map_err(gpu_error),
    }
}
