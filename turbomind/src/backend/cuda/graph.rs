//! Decode steps of the CUDA backend as recorded CUDA graphs.
//!
//! A decode step of a small model is launch-bound: about fifteen kernels per
//! layer, each with host-side checks, a `cuLaunchKernel` and stream-ordered
//! allocations, cost more host time than the GPU spends on them. So the
//! backend records a step into a graph the second time it sees its shape
//! (the first run, eager, warms every cache a recording must not fill:
//! rotary rates, cuBLAS's workspace, the kernel handles) and replays it from
//! then on, as vLLM and TurboMind do.
//!
//! A shape is (KV pool, sequences, attention splits): the kernels' launch
//! sizes depend on nothing else in a decode step. Inputs that change from
//! step to step (token ids, positions, block tables) live in buffers
//! allocated outside the graph and rewritten before each replay; tables sit
//! at a fixed stride, wide enough for every position the splits cover. The
//! kernels launched by a replay check nothing on the host, so the replay
//! checks the rewritten metadata against the pool first, exactly as each
//! launch would.
//!
//! Any failure while recording turns graphs off for the backend (with a
//! message on stderr) and the step runs eagerly: a graph is an
//! optimisation, never a requirement. `LMQ_CUDA_GRAPHS=0` turns them off.
//!
//! Batch buckets (opt-in, `LMQ_GRAPH_BUCKETS=1`, until they have run on a
//! GPU): with continuous batching the number of sequences changes from step
//! to step, and each new count would be run eagerly, then recorded. With
//! buckets a step of n sequences replays the graph of the next bucket size
//! (1, 2, 4, 8, then multiples of 8, as vLLM's capture sizes), its extra
//! rows padded: token 0 at position 0 of the pool's padding block, which
//! no sequence owns, so their KV writes touch nothing real; their logits
//! are dropped.

use std::collections::HashMap;
use std::sync::Arc;

use lmq_kernels::paged::{check_rows, SPLIT_LEN};
use lmq_kernels::{DeviceMatrix, GpuDevice, RowMeta, RowPlace, StepGraph};

use super::{gpu_error, CudaKvPool};
use crate::backend::SeqSpan;
use crate::error::{Error, Result};

/// Recorded graphs kept at most; the least recently used goes first.
const MAX_GRAPHS: usize = 64;
/// Sequences a recorded step may hold.
const MAX_GRAPH_ROWS: usize = 256;

/// What distinguishes one recorded step from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct StepKey {
    pool: u64,
    /// Rows the recording holds: the step's sequences, or with buckets the
    /// bucket they round up to.
    rows: usize,
    splits: usize,
}

/// The rows a step of `rows` sequences is recorded with when buckets are
/// on: 1, 2, 4, 8, then the next multiple of 8.
pub(super) fn bucket_rows(rows: usize) -> usize {
    if rows <= 8 {
        rows.next_power_of_two()
    } else {
        rows.div_ceil(8) * 8
    }
}

impl StepKey {
    /// The key of a decode step over `spans` (one row each), or `None`
    /// when the step should not be recorded.
    pub(super) fn of(pool: &CudaKvPool, spans: &[SeqSpan], buckets: bool) -> Option<Self> {
        let rows = spans.len();
        if rows == 0 || rows > MAX_GRAPH_ROWS || spans.iter().any(|s| s.len() != 1) {
            return None;
        }
        let max_pos = spans.iter().map(|s| s.start_pos).max()?;
        Some(StepKey {
            pool: pool.id,
            rows: if buckets { bucket_rows(rows) } else { rows },
            splits: max_pos / SPLIT_LEN + 1,
        })
    }

    /// Positions the step's metadata covers.
    fn capacity(&self) -> usize {
        self.splits * SPLIT_LEN
    }
}

/// One recorded step and the buffers it reads and writes.
pub(super) struct Recorded {
    graph: StepGraph,
    inputs: StepInputs,
    logits: DeviceMatrix<f32>,
    /// Rows of the embedding table (ids are checked against it).
    vocab: usize,
    last_used: u64,
}

/// The buffers a recorded step reads its inputs from. While recording,
/// the backend's ops take these instead of uploading their own.
#[derive(Clone)]
pub(super) struct StepInputs {
    pub ids: Arc<DeviceMatrix<u32>>,
    pub meta: Arc<RowMeta>,
}

/// The backend's recorded steps.
pub(super) struct StepGraphs {
    enabled: bool,
    /// Whether steps round their row count up to a bucket.
    buckets: bool,
    graphs: HashMap<StepKey, Recorded>,
    /// Shapes run eagerly once, with their logits' width.
    seen: HashMap<StepKey, usize>,
    clock: u64,
}

impl StepGraphs {
    pub(super) fn new() -> Self {
        let enabled = std::env::var("LMQ_CUDA_GRAPHS").map_or(true, |v| v != "0");
        let buckets = std::env::var("LMQ_GRAPH_BUCKETS").is_ok_and(|v| v == "1");
        StepGraphs {
            enabled,
            buckets,
            graphs: HashMap::new(),
            seen: HashMap::new(),
            clock: 0,
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(super) fn buckets(&self) -> bool {
        self.buckets
    }

    /// Turns batch buckets on or off (tests; dropping nothing: keys of
    /// either kind stay valid).
    pub(super) fn set_buckets(&mut self, on: bool) {
        self.buckets = on;
    }

    /// Turns graphs on or off (off drops every recorded step).
    pub(super) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.graphs.clear();
        }
    }

    /// Recorded steps held.
    pub(super) fn len(&self) -> usize {
        self.graphs.len()
    }

    /// Turns graphs off after a failed recording.
    pub(super) fn disable(&mut self, why: &Error) {
        if self.enabled {
            eprintln!("lmq: CUDA graphs turned off, decode steps run eagerly: {why}");
        }
        self.enabled = false;
        self.graphs.clear();
    }

    /// The recorded step for `key`, marking it used.
    pub(super) fn get(&mut self, key: &StepKey) -> Option<&mut Recorded> {
        self.clock += 1;
        let now = self.clock;
        let r = self.graphs.get_mut(key)?;
        r.last_used = now;
        Some(r)
    }

    /// Notes an eager run of `key` whose logits were `cols` wide; returns
    /// the width if the shape had been run before (time to record it).
    pub(super) fn seen_before(&mut self, key: StepKey, cols: Option<usize>) -> Option<usize> {
        match cols {
            Some(c) => {
                self.seen.insert(key, c);
                None
            }
            None => self.seen.get(&key).copied(),
        }
    }

    pub(super) fn insert(&mut self, key: StepKey, mut r: Recorded) {
        if self.graphs.len() >= MAX_GRAPHS {
            if let Some(old) = self
                .graphs
                .iter()
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| *k)
            {
                self.graphs.remove(&old);
            }
        }
        self.clock += 1;
        r.last_used = self.clock;
        self.graphs.insert(key, r);
    }
}

/// The pool's last block pads recorded steps (see `graph.rs`): the kernels
/// accept it, so the engine's tables are held to the blocks before it. (A
/// recording's metadata names block 0 only; a replay checks its spans in
/// `graph::write_inputs`.)
pub(super) fn check_engine_blocks(meta: &RowMeta, pool: &CudaKvPool) -> Result<()> {
    if meta.rows() > 0 && meta.max_block() >= pool.pad_block {
        return Err(Error::Backend {
            backend: "cuda",
            message: format!(
                "block {} is outside the pool of {}",
                meta.max_block(),
                pool.pad_block
            ),
        });
    }
    Ok(())
}

/// Says once on stderr how many programmatic edges (PDL) a recorded step
/// gained, so that a run with `LMQ_PDL=1` shows whether they form.
pub(super) fn note_programmatic_edges(edges: usize) {
    static SAID: std::sync::Once = std::sync::Once::new();
    if edges > 0 {
        SAID.call_once(|| {
            eprintln!(
                "lmq: CUDA graphs: {edges} programmatic edges (PDL) spliced into a recorded step"
            );
        });
    }
}

/// Fresh input buffers for a step of `key`'s shape.
pub(super) fn new_inputs(dev: &GpuDevice, key: &StepKey, block_len: usize) -> Result<StepInputs> {
    let width = key.capacity().div_ceil(block_len.max(1));
    Ok(StepInputs {
        ids: Arc::new(dev.zeros::<u32>(key.rows, 1).map_err(gpu_error)?),
        meta: Arc::new(RowMeta::padded(dev, key.rows, key.capacity(), width).map_err(gpu_error)?),
    })
}

/// Writes a step's ids and row metadata into `inputs` and checks the
/// metadata against the pool, as every KV launch would.
pub(super) fn write_inputs(
    dev: &GpuDevice,
    inputs: &mut StepInputs,
    ids: &[u32],
    spans: &[SeqSpan],
    pool: &CudaKvPool,
) -> Result<()> {
    let rows = inputs.ids.rows();
    if spans.len() > rows || ids.len() != spans.len() {
        return Err(Error::Backend {
            backend: "cuda",
            message: format!(
                "a step of {} sequences ({} ids) replayed on a recording of {rows} rows",
                spans.len(),
                ids.len()
            ),
        });
    }
    // The padding block is the recording's alone: no sequence may name it
    // (the kernels' own check, against the pool's size, would let it by).
    if let Some(b) = spans
        .iter()
        .flat_map(|s| s.blocks.iter())
        .find(|&&b| b >= pool.pad_block)
    {
        return Err(Error::Backend {
            backend: "cuda",
            message: format!("block {b} is outside the pool of {}", pool.pad_block),
        });
    }
    // Rows past the step's sequences (a bucket's padding) attend their own
    // token at position 0 of the padding block.
    let pad_table = [pool.pad_block];
    let places: Vec<RowPlace<'_>> = spans
        .iter()
        .map(|s| RowPlace {
            pos: s.start_pos,
            table: &s.blocks,
        })
        .chain(std::iter::repeat_n(
            RowPlace {
                pos: 0,
                table: &pad_table,
            },
            rows - spans.len(),
        ))
        .collect();
    let padded_ids: std::borrow::Cow<'_, [u32]> = if ids.len() == rows {
        ids.into()
    } else {
        let mut v = ids.to_vec();
        v.resize(rows, 0);
        v.into()
    };
    let busy = || Error::Backend {
        backend: "cuda",
        message: "a recorded step's inputs are still borrowed".into(),
    };
    let meta = Arc::get_mut(&mut inputs.meta).ok_or_else(busy)?;
    meta.rewrite(dev, &places).map_err(gpu_error)?;
    check_rows(&pool.pool, meta).map_err(gpu_error)?;
    let id_buf = Arc::get_mut(&mut inputs.ids).ok_or_else(busy)?;
    dev.write(id_buf, &padded_ids).map_err(gpu_error)
}

impl Recorded {
    pub(super) fn new(
        graph: StepGraph,
        inputs: StepInputs,
        logits: DeviceMatrix<f32>,
        vocab: usize,
    ) -> Self {
        Recorded {
            graph,
            inputs,
            logits,
            vocab,
            last_used: 0,
        }
    }

    /// The logits buffer, for sampling in place after a replay (the next
    /// replay overwrites it).
    pub(super) fn logits_mut(&mut self) -> &mut DeviceMatrix<f32> {
        &mut self.logits
    }

    /// Queues the recorded step on new inputs; the logits are in
    /// [`Recorded::logits_mut`] once the stream gets there.
    pub(super) fn replay(
        &mut self,
        dev: &GpuDevice,
        ids: &[u32],
        spans: &[SeqSpan],
        pool: &CudaKvPool,
    ) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::InvalidRequest(format!(
                "embedding_f32: token id {bad} is out of range for a vocabulary of {}",
                self.vocab
            )));
        }
        write_inputs(dev, &mut self.inputs, ids, spans, pool)?;
        self.graph.launch().map_err(gpu_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_to_powers_of_two_then_multiples_of_eight() {
        let got: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25, 255, 256]
            .iter()
            .map(|&n| bucket_rows(n))
            .collect();
        assert_eq!(got, [1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 32, 256, 256]);
        // Every size up to the largest recorded step fits its bucket, and
        // no bucket exceeds that largest step.
        for n in 1..=MAX_GRAPH_ROWS {
            let b = bucket_rows(n);
            assert!(
                b >= n && b <= MAX_GRAPH_ROWS && (b <= 8 || b.is_multiple_of(8)),
                "{n} -> {b}"
            );
        }
    }
}
