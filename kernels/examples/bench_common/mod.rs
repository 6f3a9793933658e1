//! What the benchmark examples share: GPU 0 opened (or the run reported as
//! skipped), a pair of timing events, and the median of repeated timings.
#![allow(dead_code)] // each example uses a part

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use lmq_kernels::{GpuDevice, KernelError};

/// GPU 0, its name, architecture and SM count printed; `None` after
/// printing "skipped: no CUDA device (…)" where there is none.
pub fn open_device() -> Result<Option<GpuDevice>, KernelError> {
    match GpuDevice::new(0) {
        Ok(dev) => {
            println!(
                "device: {} ({}, {} SMs)",
                dev.name(),
                dev.arch(),
                dev.num_sms()
            );
            Ok(Some(dev))
        }
        Err(KernelError::NoDevice(msg)) => {
            println!("skipped: no CUDA device ({msg})");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Start and end events that record timestamps.
pub fn timing_events(
    dev: &GpuDevice,
) -> Result<(CudaEvent, CudaEvent), Box<dyn std::error::Error>> {
    let new = || {
        dev.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
    };
    Ok((new()?, new()?))
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How a benchmark times one call: `warmup` calls, then `rounds` rounds of
/// `calls` back-to-back calls between the two events.
pub struct Timing<'a> {
    pub dev: &'a GpuDevice,
    pub start: CudaEvent,
    pub end: CudaEvent,
    pub warmup: usize,
    pub rounds: usize,
    pub calls: usize,
}

impl<'a> Timing<'a> {
    pub fn new(
        dev: &'a GpuDevice,
        warmup: usize,
        rounds: usize,
        calls: usize,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let (start, end) = timing_events(dev)?;
        Ok(Self {
            dev,
            start,
            end,
            warmup,
            rounds,
            calls,
        })
    }

    /// Microseconds per call: the median round over its calls.
    pub fn us<R, E: Into<Box<dyn std::error::Error>>>(
        &self,
        mut call: impl FnMut() -> Result<R, E>,
    ) -> Result<f64, Box<dyn std::error::Error>> {
        let stream = self.dev.stream();
        for _ in 0..self.warmup {
            call().map_err(Into::into)?;
        }
        let mut times = Vec::with_capacity(self.rounds);
        for _ in 0..self.rounds {
            self.start.record(stream)?;
            for _ in 0..self.calls {
                call().map_err(Into::into)?;
            }
            self.end.record(stream)?;
            times.push(self.start.elapsed_ms(&self.end)? as f64 * 1e3 / self.calls as f64);
        }
        self.dev.context().check_err()?;
        Ok(median(times))
    }
}
