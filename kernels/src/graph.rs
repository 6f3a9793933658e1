//! Recording a device's stream into a CUDA graph and replaying it.
//!
//! A decode step of a small model is hundreds of short launches whose
//! host-side cost (argument checks, `cuLaunchKernel`, stream-ordered
//! allocations) exceeds their device time. Recorded once into a graph, the
//! step is replayed with one `cuGraphLaunch`.
//!
//! While a [`GpuDevice`] records, buffers allocated on its stream become
//! allocation nodes of the graph: their addresses are fixed for the graph's
//! lifetime, so what one replay writes the next finds at the same place.
//! Host transfers are refused while recording ([`GpuDevice::upload`] and
//! friends return [`KernelError::Invalid`]): a recorded copy from host
//! memory would re-read that memory at every replay, long after it was
//! freed. Inputs that change between replays live in buffers allocated
//! before recording and are rewritten before each replay.

use std::sync::atomic::Ordering;

use cudarc::driver::sys;
use cudarc::driver::CudaGraph;

use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};

/// A recorded, instantiated graph of one device's stream.
pub struct StepGraph {
    graph: CudaGraph,
}

// SAFETY: a `CudaGraph` holds raw driver handles that must not be used from
// two threads at once. `StepGraph` exposes only `launch(&mut self)`, so
// Rust's borrow rules serialize every use; moving the handles to another
// thread is allowed by the driver (they are not thread-bound).
unsafe impl Send for StepGraph {}
// SAFETY: no method takes `&self`, so a shared reference gives no access to
// the handles.
unsafe impl Sync for StepGraph {}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepGraph")
    }
}

impl StepGraph {
    /// Queues one replay on the device's stream.
    pub fn launch(&mut self) -> Result<()> {
        self.graph.launch().during("launching a CUDA graph")
    }
}

impl GpuDevice {
    /// Whether the stream is being recorded (host transfers are refused).
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// Records everything `body` queues on this device's stream into a
    /// graph instead of running it. Nothing `body` queues runs now: the
    /// caller launches the graph. On any error (from `body` or the driver)
    /// the recording is discarded and the stream is usable again.
    pub fn record<T, E: From<KernelError>>(
        &self,
        body: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(StepGraph, T), E> {
        if self.recording.swap(true, Ordering::AcqRel) {
            return Err(KernelError::invalid(
                "graph recording",
                "the stream is already being recorded",
            )
            .into());
        }
        // Thread-local mode: only calls from this thread that are unsafe
        // during capture (synchronous allocations, synchronizations) are
        // refused; other threads' work on other streams is unaffected.
        let begun = self
            .stream()
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .during("starting a graph recording");
        if let Err(e) = begun {
            self.recording.store(false, Ordering::Release);
            return Err(e.into());
        }
        let out = body();
        // Ending the capture is needed on every path, so that the stream
        // leaves capture mode even when the body failed. Graph allocations
        // are freed by the graph itself (every buffer the body made was
        // dropped inside it), so no instantiate flag is needed.
        let ended = self
            .stream()
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .during("ending a graph recording");
        self.recording.store(false, Ordering::Release);
        let out = out?;
        let graph = ended?.ok_or_else(|| {
            KernelError::invalid("graph recording", "the recording captured nothing")
        })?;
        graph.upload().during("uploading a CUDA graph")?;
        Ok((StepGraph { graph }, out))
    }

    /// Refuses a host transfer while the stream is recorded.
    pub(crate) fn check_not_recording(&self, op: &'static str) -> Result<()> {
        if self.is_recording() {
            return Err(KernelError::invalid(
                op,
                "host transfers cannot be recorded into a graph (the host memory would be read at every replay)",
            ));
        }
        Ok(())
    }
}
