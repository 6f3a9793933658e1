//! CUDA kernels for lmq, compiled at run time by NVRTC.
//!
//! This crate owns everything that touches a CUDA GPU directly: finding the
//! driver and NVRTC (loaded dynamically, so a binary built here runs on a
//! machine without CUDA), compiling the `.cu` sources in `src/cu/` for the
//! GPU's own architecture, typed device buffers, and one safe function per
//! kernel. The engine's CUDA backend is built on top of it.
//!
//! Invariants it keeps:
//! - Nothing panics on a missing driver, library or GPU: [`GpuDevice::new`]
//!   returns [`KernelError::NoDevice`] ("no CUDA driver/GPU found: …").
//! - Every launch checks operand shapes first and returns an error instead
//!   of launching on mismatched buffers; every `unsafe` block says why it
//!   is sound.
//! - A [`GpuDevice`] has one stream; all its ops are ordered on it.
//!   Each kernel module is compiled at most once per device object (and
//!   cached on disk by source hash and architecture, see [`nvrtc`]).
//! - The 4-bit weight layout the kernel reads is produced only by
//!   [`PackedW4::from_awq`] and documented there and in kernels/README.md.
//! - Results do not depend on timing: the W4A16 warps' K-split partial
//!   sums are added in a fixed order.

pub mod act;
pub mod awq;
pub mod buffer;
pub mod device;
pub mod error;
pub mod gemm;
pub mod graph;
pub mod graph_pdl;
pub mod nvrtc;
pub mod ops;
pub mod paged;
pub mod sampling;
pub mod timer;
pub mod w4a16;

pub use awq::{PackedW4, AWQ_ORDER, GROUP_SIZES};
pub use buffer::{DeviceMatrix, Element};
pub use device::GpuDevice;
pub use error::{KernelError, Result};
pub use gemm::Blas;
pub use graph::StepGraph;
pub use graph_pdl::PdlSplice;
pub use ops::{add_rms_norm, embedding, rms_norm, rope, rope_inv_freq, silu_mul};
pub use paged::{DeviceKvPool, KvLayout, KvStorage, RowMeta, RowPlace};
pub use sampling::{sample_rows, PenaltyEntry, RowSampling};
pub use timer::GpuTimer;
pub use w4a16::{
    norm_weight_shift, AddNorm, OutElement, RowScale, W4A16Linear, W4Kernel, W4Plan, WgmmaKernel,
    DEFAULT_KERNEL, MAX_ROWS,
};
