//! Linear layers on the GPU. Dense weights are stored fp16 `[out][in]` and
//! multiplied through cuBLAS; AWQ weights are repacked at load into the
//! W4A16 kernel's layout (see kernels/README.md). Up to
//! [`lmq_kernels::MAX_ROWS`] rows (decode) stream the 4-bit codes through
//! the W4A16 kernel, and up to 64 rows (larger decode batches) the same
//! kernel runs once per 16 rows; more rows (prefill) dequantize the
//! weights into a scratch fp16 matrix and run one cuBLAS GEMM, which at
//! prefill sizes costs less than re-reading the codes once per 16 rows. On
//! sm_90, products whose grid fills the GPU take instead a wgmma GEMM that
//! dequantizes in its main loop, splitting K over more blocks where the
//! output tiles alone would leave SMs idle (`W4A16Linear::wgmma_preferred`
//! and `wgmma_splits`; `LMQ_W4_WGMMA=0` turns it off, `=1` takes it
//! wherever it fits, `LMQ_W4_WGMMA_SPLIT=1` never splits).
//!
//! Inputs are fp32 activations rounded to fp16 once per call (or the fp16
//! copy their producer wrote, the same values); outputs are fp32. A bias
//! is added in fp32, as on the CPU.

use std::sync::{Arc, Mutex};

use half::f16;
use lmq_kernels::{
    act, AddNorm, Blas, DeviceMatrix, GpuDevice, PackedW4, W4A16Linear, W4Kernel, MAX_ROWS,
};

use super::activation::{CudaAct, DeferredNorm};
use super::l2_ahead::L2Ahead;
use super::vector::CudaVector;
use super::{gpu_error, lock};
use crate::backend::{HostLinear, HostWeight};
use crate::error::Result;

enum Weight {
    Dense(DeviceMatrix<f16>),
    /// The kernel's layout, and the linear's id in the decode L2
    /// prefetcher (`l2_ahead.rs`) when it is on.
    W4(Arc<W4A16Linear>, Option<usize>),
}

/// What a linear may use of its backend besides the device: cuBLAS, and
/// the L2 prefetcher when it is on.
#[derive(Clone, Copy)]
pub(super) struct LinearAids<'a> {
    pub blas: &'a Blas,
    pub l2: Option<&'a Mutex<L2Ahead>>,
}

/// A linear layer resident on the GPU.
pub struct CudaLinear {
    weight: Weight,
    bias: Option<DeviceMatrix<f32>>,
    pub in_features: usize,
    pub out_features: usize,
    /// A gate/up projection whose 4-bit tiles alternate gate and up
    /// ([`CudaLinear::upload_gate_up`]): its plain product's columns are in
    /// that order too.
    paired: bool,
}

/// The 4-bit weight of `t` in the kernel's layout (gate and up tiles
/// interleaved if `interleave`), registered with the prefetcher if any.
fn w4_weight(
    dev: &GpuDevice,
    t: crate::quant::awq::AwqTensors,
    interleave: bool,
    aids: &LinearAids<'_>,
) -> Result<Weight> {
    let mut packed = PackedW4::from_awq(
        &t.qweight,
        &t.qzeros,
        &t.scales,
        t.in_features,
        t.out_features,
        t.group_size,
    )
    .map_err(gpu_error)?;
    if interleave {
        packed = packed.interleave_halves().map_err(gpu_error)?;
    }
    let mut linear = W4A16Linear::new(dev, &packed, None).map_err(gpu_error)?;
    // Programmatic dependent launch (sm_90+): the kernel streams its
    // weights while the op before it (which lets it launch early) still
    // runs, and waits only to read x. Session 8 found x loads hoisted above
    // the wait (greedy output varied run to run) and mended the kernels; on
    // an H100 in session 9 kernels/tests/pdl.rs failed 300 of 300 rounds
    // with the old kernels and passed with the new.
    linear.set_pdl(pdl_mode() != PdlMode::Off);
    let linear = Arc::new(linear);
    let l2_id = aids.l2.map(|p| lock(p).register(linear.clone()));
    Ok(Weight::W4(linear, l2_id))
}

/// `x` as fp16: `x_half` where its producer wrote it (the same values),
/// else converted into `slot`.
fn fp16_input<'a>(
    dev: &GpuDevice,
    x: &DeviceMatrix<f32>,
    x_half: Option<&'a DeviceMatrix<f16>>,
    slot: &'a mut Option<DeviceMatrix<f16>>,
) -> Result<&'a DeviceMatrix<f16>> {
    match x_half {
        Some(h) if h.rows() == x.rows() && h.cols() == x.cols() => Ok(h),
        _ => {
            let mut h = dev.uninit::<f16>(x.rows(), x.cols()).map_err(gpu_error)?;
            act::to_f16(dev, x, &mut h).map_err(gpu_error)?;
            Ok(slot.insert(h))
        }
    }
}

fn input_width_error(got: usize, want: usize) -> crate::error::Error {
    gpu_error(lmq_kernels::KernelError::Shape {
        op: "linear",
        detail: format!("input has {got} columns, the layer takes {want}"),
    })
}

/// Stacked 4-bit gate/up projections are stored with gate and up tiles
/// interleaved, so that a decode step's W4A16 kernel stores
/// `silu(gate) · up` itself: one launch fewer per layer, the same bits
/// (kernels/tests/silu_pairs.rs and turbomind's cuda_gate_up.rs passed on
/// an H100 in session 10, and greedy text was unchanged). On by default;
/// `LMQ_FUSED_SILU=0` keeps `[gate | up]` and the separate launch.
pub(super) fn fused_silu_from_env() -> bool {
    super::env_switch("LMQ_FUSED_SILU", true)
}

/// Where 4-bit decode linears launch with programmatic dependent launch
/// (sm_90+), from `LMQ_PDL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PdlMode {
    /// `LMQ_PDL=0`: nowhere.
    Off,
    /// The default: eager launches only; a recorded step launches its
    /// linears plainly. On an H100 (session 9) eager 7B decode gained 5%
    /// (298.7 → 315.0 tok/s) while recorded steps with PDL edges spliced
    /// in lost 14% (364.3 → 312.4), so graphs keep ordinary edges.
    Eager,
    /// `LMQ_PDL=1`: eager launches and recorded steps, whose linears get
    /// programmatic edges spliced in (kernels/src/graph_pdl.rs).
    Everywhere,
}

fn pdl_mode() -> PdlMode {
    static MODE: std::sync::OnceLock<PdlMode> = std::sync::OnceLock::new();
    // Before session 9 anything but "1" meant off, so the usual spellings
    // of off still mean off.
    *MODE.get_or_init(|| match std::env::var("LMQ_PDL").as_deref() {
        Ok("0" | "off" | "false" | "no") => PdlMode::Off,
        Ok("1") => PdlMode::Everywhere,
        _ => PdlMode::Eager,
    })
}

impl CudaLinear {
    pub(super) fn upload(dev: &GpuDevice, w: HostLinear, aids: &LinearAids<'_>) -> Result<Self> {
        let weight = match w.weight {
            HostWeight::Dense(values) => {
                let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                Weight::Dense(
                    dev.upload(&halves, w.out_features, w.in_features)
                        .map_err(gpu_error)?,
                )
            }
            HostWeight::Awq(t) => w4_weight(dev, t, false, aids)?,
        };
        let bias = match &w.bias {
            Some(b) => Some(dev.upload(b, b.len(), 1).map_err(gpu_error)?),
            None => None,
        };
        Ok(CudaLinear {
            weight,
            bias,
            in_features: w.in_features,
            out_features: w.out_features,
            paired: false,
        })
    }

    /// A stacked gate/up projection for [`Self::forward_gate_up_silu`]:
    /// with `pair` (the default; `LMQ_FUSED_SILU=0`,
    /// `CudaBackend::set_fused_silu`), a
    /// 4-bit one without bias whose halves are whole tile pairs is stored
    /// with gate and up tiles interleaved (`PackedW4::interleave_halves`);
    /// anything else as [`Self::upload`].
    pub(super) fn upload_gate_up(
        dev: &GpuDevice,
        w: HostLinear,
        pair: bool,
        aids: &LinearAids<'_>,
    ) -> Result<Self> {
        let pairable = pair
            && w.bias.is_none()
            && w.out_features.is_multiple_of(16)
            && matches!(w.weight, HostWeight::Awq(_));
        match w.weight {
            HostWeight::Awq(t) if pairable => Ok(CudaLinear {
                weight: w4_weight(dev, t, true, aids)?,
                bias: None,
                in_features: w.in_features,
                out_features: w.out_features,
                paired: true,
            }),
            weight => Self::upload(dev, HostLinear { weight, ..w }, aids),
        }
    }

    /// `silu(gate) · up` of this stacked gate/up projection on `x`, with its
    /// fp16 copy. Interleaved 4-bit decode (1..=MAX_ROWS rows) is one
    /// launch that stores the pairs; interleaved prefill takes the product
    /// and pairs its tiles (`act::silu_mul_pairs`); a layer stored
    /// `[gate | up]` takes the product and `act::silu_mul_halves`. The
    /// values are the same bits every way. After a deferred norm
    /// (`CudaAct::deferred`) a 4-bit decode layer scales gate and up by the
    /// norm's factor in its launch; anything else materializes the values
    /// first.
    pub(super) fn forward_gate_up_silu(
        &self,
        dev: &GpuDevice,
        x: &CudaAct,
        aids: &LinearAids<'_>,
    ) -> Result<(DeviceMatrix<f32>, DeviceMatrix<f16>)> {
        // A deferred norm's output has one row of partial sums per row.
        let m = x.rows();
        let deferred = x.deferred_norm();
        if let Some(dn) = &deferred {
            if !matches!(&self.weight, Weight::W4(l, _) if takes_deferred_norm(l, m)) {
                return self.forward_gate_up_silu(dev, &materialize(dev, dn)?, aids);
            }
        }
        let half_n = self.out_features / 2;
        match &self.weight {
            Weight::W4(l, l2_id) if self.paired && (1..=MAX_ROWS).contains(&m) => {
                let in_cols = deferred
                    .as_ref()
                    .map_or(x.cols(), |dn| dn.scaled_input.cols());
                if in_cols != self.in_features {
                    return Err(input_width_error(in_cols, self.in_features));
                }
                prefetch_next(aids, *l2_id);
                // The fp16 input, and after a deferred norm its factor.
                let mut slot = None;
                let (xh, row_scale) = match &deferred {
                    Some(dn) => (dn.scaled_input, Some(dn.row_scale())),
                    None => (fp16_input(dev, x, x.half(), &mut slot)?, None),
                };
                let mut out = dev.uninit::<f32>(m, half_n).map_err(gpu_error)?;
                let mut half = dev.uninit::<f16>(m, half_n).map_err(gpu_error)?;
                // PDL on eager launches, plain ones while a step is
                // recorded (`PdlMode::Eager`; under `LMQ_PDL=1` this launch
                // is not spliced, unlike `forward`'s).
                l.forward_silu_pairs(
                    dev,
                    xh,
                    &mut out,
                    Some(&mut half),
                    !dev.is_recording(),
                    row_scale,
                )
                .map_err(gpu_error)?;
                Ok((out, half))
            }
            _ => {
                // The product first: its launch must follow its producer
                // directly for a PDL splice (an allocation between them
                // would end it).
                let gate_up = match &deferred {
                    Some(dn) => self.forward_after_norm(dev, dn, aids)?,
                    None => self.forward(dev, x, x.half(), aids)?,
                };
                let mut out = dev.uninit::<f32>(m, half_n).map_err(gpu_error)?;
                let mut half = dev.uninit::<f16>(m, half_n).map_err(gpu_error)?;
                if m > 0 {
                    if self.paired {
                        act::silu_mul_pairs(dev, &gate_up, &mut out, Some(&mut half))
                    } else {
                        act::silu_mul_halves(dev, &gate_up, &mut out, Some(&mut half))
                    }
                    .map_err(gpu_error)?;
                }
                Ok((out, half))
            }
        }
    }

    /// The linear before a norm, with the norm deferred into the linears
    /// that read its output (`AddNorm` in lmq_kernels): `residual += x ·
    /// Wᵀ` and a deferred norm's output (`CudaAct::deferred`) in one
    /// launch. `None` where this linear cannot (dense weights, a bias, rows
    /// outside 1..=MAX_ROWS, a streaming kernel, interleaved gate/up
    /// columns): the caller then runs the product and the norm.
    pub(super) fn forward_add_norm(
        &self,
        dev: &GpuDevice,
        x: &CudaAct,
        residual: &mut DeviceMatrix<f32>,
        norm_weight: &CudaVector,
        eps: f32,
        aids: &LinearAids<'_>,
    ) -> Result<Option<CudaAct>> {
        let m = x.rows();
        let Weight::W4(l, l2_id) = &self.weight else {
            return Ok(None);
        };
        if self.bias.is_some()
            || self.paired
            || !takes_deferred_norm(l, m)
            || x.deferred_norm().is_some()
        {
            return Ok(None);
        }
        if x.cols() != self.in_features {
            return Err(input_width_error(x.cols(), self.in_features));
        }
        prefetch_next(aids, *l2_id);
        let mut slot = None;
        let xh = fp16_input(dev, x, x.half(), &mut slot)?;
        let mut scaled = dev.uninit::<f16>(m, self.out_features).map_err(gpu_error)?;
        let mut parts = dev.uninit::<f32>(m, l.norm_parts()).map_err(gpu_error)?;
        let scale = norm_weight.deferred_scale();
        let norm = AddNorm {
            residual,
            weight: norm_weight,
            parts: &mut parts,
            scale,
        };
        l.forward_add_norm(dev, xh, &mut scaled, norm, !dev.is_recording())
            .map_err(gpu_error)?;
        Ok(Some(CudaAct::deferred(parts, scaled, eps, 1.0 / scale)))
    }

    /// `x · Wᵀ + b` for a deferred norm's output: a 4-bit decode layer
    /// multiplies its sums by the norm's factor (`RowScale`); anything else
    /// materializes the values first.
    pub(super) fn forward_after_norm(
        &self,
        dev: &GpuDevice,
        x: &DeferredNorm<'_>,
        aids: &LinearAids<'_>,
    ) -> Result<DeviceMatrix<f32>> {
        let m = x.scaled_input.rows();
        match &self.weight {
            Weight::W4(l, l2_id) if takes_deferred_norm(l, m) => {
                if x.scaled_input.cols() != self.in_features {
                    return Err(input_width_error(x.scaled_input.cols(), self.in_features));
                }
                prefetch_next(aids, *l2_id);
                let mut out = dev.uninit::<f32>(m, self.out_features).map_err(gpu_error)?;
                l.forward_scaled(
                    dev,
                    x.scaled_input,
                    &mut out,
                    x.row_scale(),
                    !dev.is_recording(),
                )
                .map_err(gpu_error)?;
                if let Some(b) = &self.bias {
                    act::add_bias(dev, &mut out, b).map_err(gpu_error)?;
                }
                Ok(out)
            }
            _ => {
                let values = materialize(dev, x)?;
                self.forward(dev, &values, values.half(), aids)
            }
        }
    }

    /// Bytes of weights one product reads.
    pub fn stored_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => 2 * w.len(),
            Weight::W4(l, _) => l.weight_bytes(),
        }
    }

    /// The dense fp16 table, for embedding lookups.
    pub(super) fn dense(&self) -> Option<&DeviceMatrix<f16>> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::W4(..) => None,
        }
    }

    /// `x · Wᵀ + b` for fp32 `x` (`rows × in`); `x_half`, where the op
    /// that made `x` wrote it, is `fp16(x)` and spares the conversion.
    /// 4-bit decode first points the layer's L2 prefetch at the next
    /// linear, when the backend has it on (`aids`).
    pub(super) fn forward(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f32>,
        x_half: Option<&DeviceMatrix<f16>>,
        aids: &LinearAids<'_>,
    ) -> Result<DeviceMatrix<f32>> {
        if x.cols() != self.in_features {
            return Err(input_width_error(x.cols(), self.in_features));
        }
        let m = x.rows();
        let blas = aids.blas;
        // Before anything of this product is queued (the splice below
        // must stay next to the launch).
        if let Weight::W4(_, l2_id) = &self.weight {
            if (1..=MAX_ROWS).contains(&m) {
                prefetch_next(aids, *l2_id);
            }
        }
        // A recorded 4-bit decode linear with PDL and its input's fp16 copy
        // at hand: its output is allocated off the chain from the producer,
        // so the graph keeps the overlap (kernels/src/graph_pdl.rs).
        let splice = match &self.weight {
            Weight::W4(l, _)
                if l.pdl()
                    && pdl_mode() == PdlMode::Everywhere
                    && (1..=MAX_ROWS).contains(&m)
                    && x_half.is_some_and(|h| h.rows() == m && h.cols() == self.in_features) =>
            {
                dev.begin_pdl_splice().map_err(gpu_error)?
            }
            _ => None,
        };
        let mut out = dev.uninit::<f32>(m, self.out_features).map_err(gpu_error)?;
        if m == 0 {
            return Ok(out);
        }
        let mut slot = None;
        let xh = fp16_input(dev, x, x_half, &mut slot)?;
        match &self.weight {
            Weight::Dense(w) => blas.gemm_f16(dev, xh, w, &mut out).map_err(gpu_error)?,
            Weight::W4(l, _) if m <= MAX_ROWS => match splice {
                // Linked right before the launch, so that nothing else
                // (an fp16 conversion) takes the programmatic edge.
                Some(mut s) => {
                    dev.link_pdl_splice(&mut s).map_err(gpu_error)?;
                    l.forward_plain(dev, xh, &mut out).map_err(gpu_error)?;
                    dev.end_pdl_splice(s).map_err(gpu_error)?;
                }
                // Recorded without a splice: a plain launch, so that the
                // graph keeps ordinary edges (see `PdlMode::Eager`).
                None if dev.is_recording() => {
                    l.forward_plain(dev, xh, &mut out).map_err(gpu_error)?
                }
                None => l.forward(dev, xh, &mut out).map_err(gpu_error)?,
            },
            // A decode batch of a few slices of MAX_ROWS rows: the decode
            // kernel once per slice (PDL as above: eager launches only).
            Weight::W4(l, _) if m <= decode_rows_limit() => l
                .forward_chunked(dev, xh, &mut out, !dev.is_recording())
                .map_err(gpu_error)?,
            // The wgmma GEMM (sm_90), which dequantizes inside its main
            // loop: no scratch weight.
            Weight::W4(l, _) if wgmma_prefill(l, dev, m) => {
                l.forward_wgmma(dev, xh, &mut out).map_err(gpu_error)?
            }
            // Prefill: the whole weight dequantized into a scratch fp16
            // matrix, then one cuBLAS GEMM.
            Weight::W4(l, _) => {
                let mut w = dev
                    .uninit::<f16>(self.out_features, self.in_features)
                    .map_err(gpu_error)?;
                l.dequantize_into(dev, &mut w).map_err(gpu_error)?;
                blas.gemm_f16(dev, xh, &w, &mut out).map_err(gpu_error)?;
            }
        }
        if let Some(b) = &self.bias {
            act::add_bias(dev, &mut out, b).map_err(gpu_error)?;
        }
        Ok(out)
    }
}

/// Whether a 4-bit launch of `m` rows can carry half of a deferred norm:
/// the classic kernels over all rows of one decode launch.
fn takes_deferred_norm(l: &W4A16Linear, m: usize) -> bool {
    (1..=MAX_ROWS).contains(&m) && !matches!(l.kernel_kind(), W4Kernel::Stream { .. })
}

/// The values of a deferred norm's output, with their fp16 copy, for an
/// op that cannot apply the factor itself.
pub(super) fn materialize(dev: &GpuDevice, x: &DeferredNorm<'_>) -> Result<CudaAct> {
    let (m, d) = (x.scaled_input.rows(), x.scaled_input.cols());
    let mut values = dev.uninit::<f32>(m, d).map_err(gpu_error)?;
    let mut half = dev.uninit::<f16>(m, d).map_err(gpu_error)?;
    act::deferred_norm_values(
        dev,
        x.scaled_input,
        x.parts,
        x.eps,
        x.factor_scale,
        &mut values,
        &mut half,
    )
    .map_err(gpu_error)?;
    Ok(CudaAct::with_half(values, half))
}

/// 4-bit products of up to this many rows (more than `MAX_ROWS`) run the
/// decode kernel once per slice of `MAX_ROWS` rows instead of
/// dequantizing the weight for a cuBLAS GEMM: each slice streams the
/// weight again, but the dequantization writes and re-reads four times the
/// codes' bytes. On an H100 (docs/BENCHMARKS.md, session 11) this took
/// Llama-2-7B-shaped decode batches of 32 from 2125–2128 to 4236–4237
/// tok/s and of 48 from 2893–2900 to 4281–4292.
const DEFAULT_DECODE_ROWS: usize = 64;

/// `LMQ_W4_DECODE_ROWS=<rows>` overrides [`DEFAULT_DECODE_ROWS`];
/// `LMQ_W4_DECODE_ROWS=16` turns the slices off.
fn decode_rows_limit() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        super::env_count("LMQ_W4_DECODE_ROWS")
            .unwrap_or(DEFAULT_DECODE_ROWS)
            .max(MAX_ROWS)
    })
}

/// Whether a 4-bit product of `m` rows (more than the decode kernel's)
/// runs the wgmma GEMM (`W4A16Linear::forward_wgmma`, the kernel
/// `LMQ_W4_WGMMA_KERNEL` names, the warp-specialized one with its codes
/// brought by TMA by default)
/// instead of dequantizing the weight for cuBLAS. By default where
/// `W4A16Linear::wgmma_preferred` expects it to win: on an H200 in session
/// 14 (docs/BENCHMARKS.md) the specialized kernel ran at 0.88–0.95× of
/// cuBLAS fp16 on Llama-2-7B's linears at 2048 rows against 0.81–0.84× for
/// dequantize-then-cuBLAS, and the 7B-shaped prefill went from 33028–33088
/// to 35241–35337 tok/s. With split-K (session 15, H100) it also wins on
/// the 4096-wide layers from 128 to 512 rows: decode batches of 128 went
/// from 6744–6810 to 7297–7331 tok/s. Bringing the codes by TMA (session
/// 17, H100) took the linears at 2048 rows to 0.93–1.02× of cuBLAS.
/// `LMQ_W4_WGMMA=0` never takes it; `=1` takes it
/// wherever it fits the layer (the tests' way to reach it at any size).
fn wgmma_prefill(l: &W4A16Linear, dev: &GpuDevice, m: usize) -> bool {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let forced = *MODE.get_or_init(|| super::env_choice("LMQ_W4_WGMMA"));
    match forced {
        Some(true) => l.wgmma_supports(dev),
        Some(false) => false,
        None => l.wgmma_preferred(dev, m),
    }
}

/// Points this 4-bit linear's launches at the linear expected after it,
/// for their in-kernel L2 prefetch, when the backend has the prefetcher on
/// (`l2_ahead.rs`).
fn prefetch_next(aids: &LinearAids<'_>, l2_id: Option<usize>) {
    if let (Some(l2), Some(id)) = (aids.l2, l2_id) {
        lock(l2).before(id);
    }
}
