//! Where a decode step's time goes, when `LMQ_STEP_PROFILE=1`: per step,
//! the host time until the step's work is queued (ops' checks, launches
//! and allocations, or a graph's input writes and launch), the host time
//! until its logits are on the host, and the GPU time between the first
//! and the last queued work (CUDA events). A line on stderr every
//! [`REPORT_EVERY`] steps gives the means since the last line.

use std::time::Instant;

use lmq_kernels::{GpuDevice, GpuTimer};

/// Steps per report line.
const REPORT_EVERY: u32 = 128;

#[derive(Default)]
struct Sums {
    steps: u32,
    graph_steps: u32,
    queue_us: f64,
    total_us: f64,
    gpu_us: f64,
}

/// The profile of one backend's decode steps.
pub(super) struct StepProfile {
    timer: GpuTimer,
    sums: Sums,
}

/// One step being measured.
pub(super) struct StepMark {
    t0: Instant,
    queued: Option<Instant>,
}

impl StepProfile {
    /// A profile if `LMQ_STEP_PROFILE=1` and the events can be made.
    pub(super) fn from_env(dev: &GpuDevice) -> Option<Self> {
        if std::env::var("LMQ_STEP_PROFILE").ok()? != "1" {
            return None;
        }
        Some(StepProfile {
            timer: GpuTimer::new(dev).ok()?,
            sums: Sums::default(),
        })
    }

    /// Marks the start of a step (before anything is queued).
    pub(super) fn begin(&self) -> StepMark {
        let _ = self.timer.start();
        StepMark {
            t0: Instant::now(),
            queued: None,
        }
    }

    /// Marks that all of the step's work is queued.
    pub(super) fn queued(&self, mark: &mut StepMark) {
        let _ = self.timer.stop();
        mark.queued = Some(Instant::now());
    }

    /// Ends a step whose results are on the host.
    pub(super) fn end(&mut self, mark: StepMark, graph: bool) {
        let now = Instant::now();
        let queued = mark.queued.unwrap_or(now);
        let s = &mut self.sums;
        s.steps += 1;
        s.graph_steps += u32::from(graph);
        s.queue_us += (queued - mark.t0).as_secs_f64() * 1e6;
        s.total_us += (now - mark.t0).as_secs_f64() * 1e6;
        s.gpu_us += f64::from(self.timer.elapsed_ms().unwrap_or(f32::NAN)) * 1e3;
        if s.steps >= REPORT_EVERY {
            let n = f64::from(s.steps);
            eprintln!(
                "lmq step profile: {} decode steps ({} replayed graphs): host until queued {:.1} µs, until logits on host {:.1} µs, GPU {:.1} µs per step",
                s.steps,
                s.graph_steps,
                s.queue_us / n,
                s.total_us / n,
                s.gpu_us / n
            );
            self.sums = Sums::default();
        }
    }
}
