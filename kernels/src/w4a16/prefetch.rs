//! The next linear's codes asked into L2 by a launch's last blocks
//! (`l2_prefetch_share` in `cu/w4a16.cu`): once they have read their own
//! weights, they issue bulk prefetches of the start of the next linear's
//! codes, so that DRAM keeps streaming while this launch drains and the
//! next one ramps up. A prefetch writes nothing, so results are unchanged
//! (`tests/parity.rs`). On an H100 the stacked Llama-2-7B layer gained
//! 4.4–4.7% at 4 MB without PDL and nothing with it; 8 MB and more lost
//! (docs/BENCHMARKS.md, session 11). Session 10's prefetch on a parallel
//! graph branch, which this replaces, cost about 25 µs a branch.

use std::sync::{Arc, Weak};

use half::f16;

use super::{LaunchSpec, OutElement, W4A16Linear};
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::Result;

/// Which linear's codes a launch prefetches into L2.
#[derive(Clone, Copy)]
pub(super) enum L2Pick<'a> {
    /// The one set by [`W4A16Linear::set_l2_next`], if any.
    Stored,
    /// None (the first slices of a chunked product, whose later slices
    /// re-read this layer's own weights).
    Off,
    /// This linear, this many bytes.
    Next(&'a W4A16Linear, usize),
}

/// The linear a launch prefetches for, held weakly (a model's linears form
/// a ring, which strong references would leak), and how many bytes.
pub(super) type L2Next = Option<(Weak<W4A16Linear>, usize)>;

impl W4A16Linear {
    /// [`Self::forward`], and the launch's last blocks, once they have
    /// read their weights, ask L2 for the first `max_bytes` of `next`'s
    /// codes (classic kernels; the streaming kernel ignores it). Results
    /// are those of [`Self::forward`].
    pub fn forward_prefetching<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        next: &W4A16Linear,
        max_bytes: usize,
    ) -> Result<()> {
        let spec = LaunchSpec {
            l2_next: L2Pick::Next(next, max_bytes),
            ..LaunchSpec::product(self.pdl, None)
        };
        self.launch_to(dev, x, out, spec).map(|_| ())
    }

    /// Makes every later launch of this layer (that names no other; of a
    /// chunked product, the last slice) ask L2 for the first `max_bytes`
    /// of `next`'s codes, as [`Self::forward_prefetching`] does; `None`
    /// stops it. If `next` has been dropped by the time of a launch,
    /// nothing is prefetched. A launch recorded into a CUDA graph keeps the
    /// address it was recorded with: the caller must keep `next` alive as
    /// long as such a graph may be replayed (turbomind's prefetcher holds
    /// every linear of the model for the backend's life).
    pub fn set_l2_next(&self, next: Option<(&Arc<W4A16Linear>, usize)>) {
        let value = next.map(|(l, bytes)| (Arc::downgrade(l), bytes));
        // A poisoned lock only means a panic elsewhere while it was held;
        // the value itself is always whole.
        *self.l2_next.lock().unwrap_or_else(|p| p.into_inner()) = value;
    }

    /// The linear set by [`Self::set_l2_next`], if it is still alive.
    pub(super) fn l2_next_now(&self) -> Option<(Arc<W4A16Linear>, usize)> {
        let guard = self.l2_next.lock().unwrap_or_else(|p| p.into_inner());
        let (weak, bytes) = guard.as_ref()?;
        Some((weak.upgrade()?, *bytes))
    }
}
