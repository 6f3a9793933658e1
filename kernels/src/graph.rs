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
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::graph_edges::add_programmatic_edges;

/// A recorded, instantiated graph of one device's stream.
pub struct StepGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Programmatic edges added after recording (see `graph_edges.rs`).
    programmatic_edges: usize,
}

// SAFETY: a graph and its instance are raw driver handles that must not be
// used from two threads at once. `StepGraph` uses them only in
// `launch(&mut self)` and drop, so Rust's borrow rules serialize every use;
// moving the handles to another thread is allowed by the driver (they are
// not thread-bound).
unsafe impl Send for StepGraph {}
// SAFETY: the only `&self` method reads a plain count, so a shared
// reference gives no access to the handles.
unsafe impl Sync for StepGraph {}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepGraph")
    }
}

impl StepGraph {
    /// Queues one replay on the device's stream.
    pub fn launch(&mut self) -> Result<()> {
        self.ctx.bind_to_thread().during("binding the context")?;
        // SAFETY: `exec` was instantiated from `graph` in this context and
        // lives until drop; the stream is the device's, alive through the
        // Arc.
        unsafe { result::graph::launch(self.exec, self.stream.cu_stream()) }
            .during("launching a CUDA graph")
    }

    /// Programmatic edges the recording gained for PDL launches.
    pub fn programmatic_edges(&self) -> usize {
        self.programmatic_edges
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: both handles are owned by this value and destroyed once,
        // the instance before the graph it came from.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
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
        // leaves capture mode even when the body failed.
        let ended = self
            .context()
            .bind_to_thread()
            .during("binding the context")
            .and_then(|()| {
                // SAFETY: the stream is this device's, in capture mode since
                // `begin_capture` above.
                unsafe { result::stream::end_capture(self.stream().cu_stream()) }
                    .during("ending a graph recording")
            });
        self.recording.store(false, Ordering::Release);
        let out = match out {
            Ok(v) => v,
            Err(e) => {
                if let Some(graph) = ended.ok().filter(|g| !g.is_null()) {
                    // SAFETY: the graph was just made by the capture and is
                    // owned here; nothing else holds it.
                    let _ = unsafe { result::graph::destroy(graph) };
                }
                return Err(e);
            }
        };
        let graph = ended?;
        if graph.is_null() {
            return Err(
                KernelError::invalid("graph recording", "the recording captured nothing").into(),
            );
        }
        let pdl = self
            .pdl_functions
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        // SAFETY: `graph` is the capture's, not yet instantiated, and used
        // by this thread only. Graph allocations are freed by the graph
        // itself (every buffer the body made was dropped inside it), so no
        // instantiate flag is needed.
        let made = unsafe { add_programmatic_edges(graph, &pdl) }.and_then(|edges| {
            // SAFETY: as above; the instance is owned by the StepGraph.
            unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
                .during("instantiating a CUDA graph")
                .map(|exec| (edges, exec))
        });
        let (edges, exec) = match made {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: as above; no instance was made from it.
                let _ = unsafe { result::graph::destroy(graph) };
                return Err(e.into());
            }
        };
        let step = StepGraph {
            graph,
            exec,
            ctx: self.context().clone(),
            stream: self.stream().clone(),
            programmatic_edges: edges,
        };
        // SAFETY: the instance and stream are valid (owned by `step`).
        unsafe { result::graph::upload(step.exec, step.stream.cu_stream()) }
            .during("uploading a CUDA graph")?;
        Ok((step, out))
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
