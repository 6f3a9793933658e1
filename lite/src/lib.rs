//! lmq's offline tools (the `lite` pipeline): turning other formats into the
//! checkpoint format the engine reads, AWQ quantization, and random-weight
//! checkpoints of any shape for benchmarks (`synth`).
//!
//! Invariants:
//! - Tensor names and checkpoint layout come from `lmq_turbomind`; this
//!   crate writes them, it never defines its own.
//! - Outputs are written into a temporary folder beside the target and
//!   renamed into place, so a failure never leaves a half-written model.

pub mod calib;
pub mod error;
pub mod gguf;
pub mod output;
pub mod quantize;
mod rng;
pub mod synth;

pub use error::{Error, Result};
