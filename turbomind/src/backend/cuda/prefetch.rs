//! Dequantization ahead of the prefill GEMMs (opt-in: `LMQ_PREFILL_PREFETCH=1`,
//! written without a GPU in session 7; see kernels/README.md).
//!
//! A 4-bit linear with more rows than the decode kernel takes dequantizes
//! its weight into a scratch fp16 matrix, then multiplies through cuBLAS.
//! The dequantization is bound by memory bandwidth and the GEMM by the
//! tensor cores, and at 2048 rows the first costs about a fifth of the
//! second (docs/BENCHMARKS.md, prefill linears), so they overlap well: the
//! prefetcher learns which 4-bit linear follows which in prefill (a model
//! calls them in a fixed order) and, while one GEMM runs, dequantizes the
//! next weight on a side stream into a second scratch matrix.
//!
//! Ordering (by hand: cudarc's event tracking is off for this device):
//! - The next weight's scratch is allocated on the main stream, and an
//!   event recorded right after the allocation, before the current GEMM is
//!   queued, is all the side stream waits for: the dequantization overlaps
//!   the GEMM and never waits for it.
//! - The main stream joins the side stream before it uses a prefetched
//!   matrix, and before it drops one it will not use: a scratch matrix is
//!   freed in main-stream order, so the side's writes must be done first.
//! - Only one prefetch is in flight, so joining the side stream waits for
//!   nothing else.
//!
//! A wrong guess (another order of linears) costs one unused
//! dequantization, never a wrong result: the matrix is used only by the
//! linear it was made for.
//!
//! On an H100 (session 8) the overlap as first written gained nothing. The
//! guess was that Hopper's cuBLAS GEMMs occupy every SM until they end, so
//! cuBLAS can be asked to leave `LMQ_PREFILL_PREFETCH_SMS` SMs to the
//! dequantization. `bench_prefill` timed that in session 9 (H100): with 0
//! SMs kept the pipeline ran at 0.79–0.84× of cuBLAS fp16 (the serial
//! dequantize-then-GEMM: 0.81–0.83×); every reservation from 8 to 32 SMs
//! was slower (0.66–0.77×). So the default keeps none, and the prefetcher
//! stays opt-in.

use std::sync::Arc;

use half::f16;
use lmq_kernels::{Blas, DeviceMatrix, GpuDevice, SideStream, W4A16Linear};

use super::gpu_error;
use super::order::CallOrder;
use crate::error::{Error, Result};

/// The prefetcher's state, one per backend (the engine's thread uses it).
pub(super) struct Prefetch {
    side: SideStream,
    /// Every 4-bit linear of the model, by the id it was registered under.
    linears: Vec<Arc<W4A16Linear>>,
    /// The order prefill calls the linears in.
    order: CallOrder,
    /// The weight dequantized ahead, and for which linear.
    ready: Option<(usize, DeviceMatrix<f16>)>,
    /// SMs a prefetching GEMM leaves free (see `reserved_sms`).
    reserve: usize,
}

/// Whether prefill dequantizes ahead: `LMQ_PREFILL_PREFETCH=1`, until the
/// prefetcher has run on a GPU (the whole-model tests with it on, and
/// `lmq bench` prefill against it off).
pub(super) fn prefetch_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMQ_PREFILL_PREFETCH").is_ok_and(|v| v == "1"))
}

/// SMs a prefetching GEMM leaves to the dequantization on the side
/// stream: `LMQ_PREFILL_PREFETCH_SMS` (default 0: cuBLAS takes them all;
/// any reservation measured slower, see the header). A value that is not a
/// count is an error.
fn reserved_sms() -> Result<usize> {
    match std::env::var("LMQ_PREFILL_PREFETCH_SMS") {
        Err(_) => Ok(0),
        Ok(v) => v.trim().parse().map_err(|_| {
            Error::InvalidRequest(format!(
                "LMQ_PREFILL_PREFETCH_SMS must be a number of SMs, got {v:?}"
            ))
        }),
    }
}

impl Prefetch {
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        let side = dev.side_stream().map_err(gpu_error)?;
        let reserve = reserved_sms()?.min(dev.num_sms() as usize / 2);
        Ok(Self {
            side,
            reserve,
            linears: Vec::new(),
            order: CallOrder::default(),
            ready: None,
        })
    }

    /// Registers a 4-bit linear; its id is what [`Prefetch::gemm`] takes.
    pub fn register(&mut self, linear: Arc<W4A16Linear>) -> usize {
        self.linears.push(linear);
        self.linears.len() - 1
    }

    /// `out = x · Wᵀ` for the linear registered as `id`, through a dense
    /// fp16 copy of its weight: the one dequantized ahead if it is this
    /// linear's, else one made now; then the next linear's copy is started
    /// on the side stream.
    pub fn gemm(
        &mut self,
        dev: &GpuDevice,
        blas: &Blas,
        id: usize,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<f32>,
    ) -> Result<()> {
        let linear = self
            .linears
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Backend {
                backend: "cuda",
                message: format!("no prefetch entry for linear {id}"),
            })?;
        let expected = self.order.call(id);
        let weight = match self.ready.take() {
            Some((for_id, w)) if for_id == id => self.join_or_wait(dev, w)?,
            other => {
                if let Some((_, stale)) = other {
                    // The side may still be writing it: wait before its
                    // free is queued on the main stream.
                    drop(self.join_or_wait(dev, stale)?);
                }
                let mut w = dev
                    .uninit::<f16>(linear.out_features(), linear.in_features())
                    .map_err(gpu_error)?;
                linear.dequantize_into(dev, &mut w).map_err(gpu_error)?;
                w
            }
        };
        // The next weight's scratch, allocated before this GEMM is queued.
        // Prefetching is an optimisation: where the scratch or its mark
        // cannot be had (memory is short), the GEMM goes on without it.
        let ahead = match expected {
            Some(n) => {
                let nl = &self.linears[n];
                dev.uninit::<f16>(nl.out_features(), nl.in_features())
                    .ok()
                    .and_then(|m| dev.mark().ok().map(|allocated| (n, m, allocated)))
            }
            _ => None,
        };
        let reserve = self.reserve;
        let narrowed = ahead.is_some()
            && reserve > 0
            && blas
                .set_sm_count_target(dev, dev.num_sms() as usize - reserve)
                .is_ok();
        let done = blas.gemm_f16(dev, x, &weight, out).map_err(gpu_error);
        let restored = if narrowed {
            blas.set_sm_count_target(dev, 0).map_err(gpu_error)
        } else {
            Ok(())
        };
        // The GEMM's own error first; a failed reset is reported after.
        done?;
        restored?;
        // Freed in main-stream order, after the GEMM.
        drop(weight);
        if let Some((n, mut m, allocated)) = ahead {
            self.linears[n]
                .dequantize_on_side(dev, &self.side, &allocated, &mut m)
                .map_err(gpu_error)?;
            self.ready = Some((n, m));
        }
        Ok(())
    }
}

impl Prefetch {
    /// `w`, written on the side stream, once the main stream has joined
    /// it; where the join cannot be queued, the host waits for the side
    /// stream instead, so that `w` is never freed (in main-stream order)
    /// while the side may still write it.
    fn join_or_wait(&self, dev: &GpuDevice, w: DeviceMatrix<f16>) -> Result<DeviceMatrix<f16>> {
        match dev.join(&self.side) {
            Ok(()) => Ok(w),
            Err(e) => {
                let _ = self.side.synchronize();
                drop(w);
                Err(gpu_error(e))
            }
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // A matrix still being written on the side stream must not be
        // freed before the write ends, nor the dequantization kernel's
        // module unloaded while it runs (the backend drops this first).
        let _ = self.side.synchronize();
    }
}
