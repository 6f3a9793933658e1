//! A second stream of a [`GpuDevice`]'s context, for work that overlaps
//! the device stream's (the dequantization of the next prefill weight
//! during the current GEMM). cudarc's cross-stream event tracking is off
//! for these devices, so the ordering between the two streams is the
//! caller's, through the marks and joins here. None of it may happen while
//! the device stream is being recorded into a CUDA graph (an event from
//! outside a capture invalidates it, and a side stream drawn into one never
//! runs its work): each call refuses then. (Session 10's fork onto a
//! parallel graph branch, for an L2 prefetch, is gone: that prefetch now
//! happens inside the W4A16 kernel.)

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};

fn not_recording(dev: &GpuDevice, what: &'static str) -> Result<()> {
    if dev.is_recording() {
        return Err(KernelError::invalid(
            what,
            "the side stream cannot be ordered against a stream being recorded",
        ));
    }
    Ok(())
}

/// A side stream of one device.
pub struct SideStream {
    stream: Arc<CudaStream>,
}

/// A point in a stream's queue: the work queued on it so far.
pub struct StreamMark(CudaEvent);

impl GpuDevice {
    /// A new side stream in this device's context.
    pub fn side_stream(&self) -> Result<SideStream> {
        let stream = self
            .context()
            .new_stream()
            .during("creating a side stream")?;
        Ok(SideStream { stream })
    }

    /// Marks the work queued on the device stream so far.
    pub fn mark(&self) -> Result<StreamMark> {
        not_recording(self, "mark")?;
        let e = self
            .stream()
            .record_event(None)
            .during("marking the device stream")?;
        Ok(StreamMark(e))
    }

    /// Makes the device stream wait for everything queued on `side` so far.
    pub fn join(&self, side: &SideStream) -> Result<()> {
        not_recording(self, "join")?;
        self.stream()
            .join(&side.stream)
            .during("joining the side stream")
    }
}

impl SideStream {
    /// Makes this stream wait for the work `mark` covers.
    pub fn wait(&self, mark: &StreamMark) -> Result<()> {
        self.stream.wait(&mark.0).during("waiting on a mark")
    }

    /// Blocks the host until this stream's queued work is done.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .during("synchronizing the side stream")
    }

    /// The cudarc stream, for launches queued on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
