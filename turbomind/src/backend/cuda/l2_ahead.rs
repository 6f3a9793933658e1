//! The next 4-bit linear's codes fetched into L2 while the current one
//! drains (4 MB by default on Hopper GPUs with a large L2, see
//! [`l2_prefetch_bytes`]; `LMQ_L2_PREFETCH=<MB>` sets the size, 0 turns it
//! off).
//!
//! Decode streams every weight once per step, and each W4A16 launch ramps
//! up and drains; without PDL (the engine's recorded steps) DRAM idles in
//! between. Each 4-bit decode product is told which linear is expected
//! next (`W4A16Linear::set_l2_next`), and its last blocks ask L2 for the
//! start of that linear's codes from inside the kernel, so no graph node
//! or stream is added. (Session 10 forked a parallel graph branch per
//! linear instead, which cost about 25 µs a branch.)
//!
//! The order is learned: a model calls its linears in a fixed order, and
//! the linear that followed each one last time is expected again. Before
//! anything is learned, the guess is the next linear registered (layers
//! upload their linears in the order they run them), so a step recorded
//! into a graph at the first decode already holds its prefetches. A wrong
//! guess costs one useless prefetch, never a wrong result: a prefetch
//! changes no data.

use std::sync::Arc;

use lmq_kernels::W4A16Linear;

use super::order::CallOrder;
use crate::error::{Error, Result};

/// The prefetcher's state, one per backend (the engine's thread uses it).
pub(super) struct L2Ahead {
    /// Every 4-bit linear of the model, by the id it was registered under.
    linears: Vec<Arc<W4A16Linear>>,
    /// The order decode calls the linears in.
    order: CallOrder,
    /// The linear each one's launches are pointed at now, by id, so that
    /// a step that guesses as the last one did touches no linear.
    pointed: Vec<Option<usize>>,
    max_bytes: usize,
}

/// The prefetch size used when `LMQ_L2_PREFETCH` is unset: 4 MB, on
/// Hopper and newer GPUs with at least [`DEFAULT_MIN_L2`] of L2. On an
/// H100 it sped the Llama-2-7B shape's decode up 1.4% (324.8 -> 329.6
/// tok/s, two rounds, session 12), and `bench_w4`'s stacked layer 4.5%
/// without PDL; larger sizes lost. Older GPUs prefetch with per-line
/// instructions instead of bulk copies, which have not been timed, and a
/// small L2 would lose the current linear's lines to the prefetch.
const DEFAULT_BYTES: usize = 4 << 20;
/// Least L2 for the default prefetch (the H100 and H200 have 50 MB).
const DEFAULT_MIN_L2: usize = 40 << 20;

/// The prefetch without `LMQ_L2_PREFETCH`: [`DEFAULT_BYTES`] on compute
/// capability 9 or more with at least [`DEFAULT_MIN_L2`] of L2, else none.
fn default_bytes(major: i32, l2_bytes: usize) -> Option<usize> {
    (major >= 9 && l2_bytes >= DEFAULT_MIN_L2).then_some(DEFAULT_BYTES)
}

/// Bytes of the next linear's codes to prefetch, from `LMQ_L2_PREFETCH`
/// (in MB; 0: off), or the default for a GPU of compute capability
/// `major` with `l2_bytes` of L2 when unset. A value that is not a number
/// is an error.
pub(super) fn l2_prefetch_bytes(major: i32, l2_bytes: usize) -> Result<Option<usize>> {
    match std::env::var("LMQ_L2_PREFETCH") {
        Err(_) => Ok(default_bytes(major, l2_bytes)),
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
    pub fn new(max_bytes: usize) -> Self {
        Self {
            linears: Vec::new(),
            order: CallOrder::default(),
            pointed: Vec::new(),
            max_bytes,
        }
    }

    /// Registers a 4-bit linear; its id is what [`L2Ahead::before`] takes.
    pub fn register(&mut self, linear: Arc<W4A16Linear>) -> usize {
        self.linears.push(linear);
        self.pointed.push(None);
        self.linears.len() - 1
    }

    /// Called right before linear `id` queues a decode product: learns the
    /// order and points the linear's launches at the linear expected next.
    pub fn before(&mut self, id: usize) {
        let learned = self.order.call(id);
        let guess = learned.unwrap_or((id + 1) % self.linears.len().max(1));
        if self.pointed.get(id) == Some(&Some(guess)) {
            return;
        }
        if let (Some(this), Some(next)) = (self.linears.get(id), self.linears.get(guess)) {
            this.set_l2_next(Some((next, self.max_bytes)));
            self.pointed[id] = Some(guess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefetch_only_where_measured() {
        const MB: usize = 1 << 20;
        // H100 and H200 (sm_90, 50 MB of L2): on, 4 MB.
        assert_eq!(default_bytes(9, 50 * MB), Some(4 * MB));
        // A100 (sm_80, 40 MB), L4 and RTX 4090 (sm_89, 48 and 72 MB): the
        // per-line prefetch path, not timed: off.
        assert_eq!(default_bytes(8, 40 * MB), None);
        assert_eq!(default_bytes(8, 72 * MB), None);
        // A Hopper-class part with a small L2: off.
        assert_eq!(default_bytes(9, 30 * MB), None);
    }
}
