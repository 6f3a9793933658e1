//! The next 4-bit linear's weights fetched into L2 while the current one
//! runs (opt-in: `LMQ_L2_PREFETCH=<MB>`, written without a GPU in session
//! 10; see kernels/README.md).
//!
//! Decode streams every weight once per step, and each W4A16 launch
//! streams at only part of the copy bandwidth: it ramps up, drains at its
//! end, and the small kernels between two linears (norms, rotary, KV
//! write, attention) leave DRAM almost idle. Before each 4-bit decode
//! product, this forks a parallel branch from the device stream that asks
//! L2 for up to the configured number of bytes of the linear expected next
//! (`W4A16Linear::prefetch_l2`), so DRAM keeps streaming weights through
//! those gaps and the next launch reads part of its weights from L2.
//!
//! The order is learned: a model calls its linears in a fixed order, and
//! the linear that followed each one last time is expected again. Before
//! anything is learned, the guess is the next linear registered (layers
//! upload their linears in the order they run them), so a step recorded
//! into a graph at the first decode already holds its prefetches. A wrong
//! guess costs one useless prefetch, never a wrong result: a prefetch
//! changes no data, and no kernel waits for it.
//!
//! Only recorded decode steps (CUDA graphs, the default) prefetch; their
//! branches are joined back before the recording ends ([`L2Ahead::join`]),
//! as a recording requires.

use std::sync::Arc;

use lmq_kernels::{GpuDevice, SideStream, W4A16Linear};

use super::gpu_error;
use super::order::CallOrder;
use crate::error::{Error, Result};

/// The prefetcher's state, one per backend (the engine's thread uses it).
pub(super) struct L2Ahead {
    side: SideStream,
    /// Every 4-bit linear of the model, by the id it was registered under.
    linears: Vec<Arc<W4A16Linear>>,
    /// The order decode calls the linears in.
    order: CallOrder,
    /// Whether the side stream has work not yet joined.
    forked: bool,
    max_bytes: usize,
}

/// Bytes of the next linear's weights to prefetch, from `LMQ_L2_PREFETCH`
/// (in MB; unset or 0: off). A value that is not a number is an error.
pub(super) fn l2_prefetch_bytes() -> Result<Option<usize>> {
    match std::env::var("LMQ_L2_PREFETCH") {
        Err(_) => Ok(None),
        Ok(v) => {
            let mb: usize = v.trim().parse().map_err(|_| {
                Error::InvalidRequest(format!(
                    "LMQ_L2_PREFETCH must be a number of megabytes, got {v:?}"
                ))
            })?;
            Ok((mb > 0).then_some(mb << 20))
        }
    }
}

impl L2Ahead {
    pub fn new(dev: &GpuDevice, max_bytes: usize) -> Result<Self> {
        Ok(Self {
            side: dev.side_stream().map_err(gpu_error)?,
            linears: Vec::new(),
            order: CallOrder::default(),
            forked: false,
            max_bytes,
        })
    }

    /// Registers a 4-bit linear; its id is what [`L2Ahead::before`] takes.
    pub fn register(&mut self, linear: Arc<W4A16Linear>) -> usize {
        self.linears.push(linear);
        self.linears.len() - 1
    }

    /// Called right before linear `id` queues a decode product: learns the
    /// order, and, in a step being recorded, forks a branch that prefetches
    /// the linear expected next. Eager steps only learn: there, the fork's
    /// event between the producer and a PDL launch may cost the early
    /// start PDL gives, and each fork costs host time at every step.
    pub fn before(&mut self, dev: &GpuDevice, id: usize) -> Result<()> {
        let learned = self.order.call(id);
        if !dev.is_recording() {
            return Ok(());
        }
        let guess = learned.unwrap_or((id + 1) % self.linears.len().max(1));
        let Some(linear) = self.linears.get(guess) else {
            return Ok(());
        };
        dev.fork(&self.side).map_err(gpu_error)?;
        self.forked = true;
        linear
            .prefetch_l2(dev, &self.side, self.max_bytes)
            .map_err(gpu_error)
    }

    /// Joins the branches forked since the last join (before a recording
    /// ends; harmless otherwise).
    pub fn join(&mut self, dev: &GpuDevice) -> Result<()> {
        // Cleared only once joined, so that a failed join is tried again
        // (the recording's error path joins once more).
        if self.forked {
            dev.join_fork(&self.side).map_err(gpu_error)?;
            self.forked = false;
        }
        Ok(())
    }
}

impl Drop for L2Ahead {
    fn drop(&mut self) {
        // The prefetch kernel's module must not be unloaded while it runs
        // (the backend drops this before the device).
        let _ = self.side.synchronize();
    }
}
