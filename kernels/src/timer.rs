//! Device-side timing of stream work with CUDA events, for profiles that
//! split a step's time into host and GPU parts.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use crate::device::GpuDevice;
use crate::error::{DriverContext, Result};

/// A pair of timing events on one device's stream.
pub struct GpuTimer {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<cudarc::driver::CudaStream>,
}

impl std::fmt::Debug for GpuTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTimer")
    }
}

impl GpuTimer {
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        let ctx = dev.context();
        Ok(GpuTimer {
            start: ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .during("creating a timing event")?,
            end: ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .during("creating a timing event")?,
            stream: dev.stream().clone(),
        })
    }

    /// Marks the start of the timed work on the stream.
    pub fn start(&self) -> Result<()> {
        self.start
            .record(&self.stream)
            .during("recording a timing event")
    }

    /// Marks the end of the timed work on the stream.
    pub fn stop(&self) -> Result<()> {
        self.end
            .record(&self.stream)
            .during("recording a timing event")
    }

    /// Milliseconds between the marks (waits for the end mark).
    pub fn elapsed_ms(&self) -> Result<f32> {
        self.start
            .elapsed_ms(&self.end)
            .during("reading a timing event")
    }
}
