//! One launch of the classic or streaming W4A16 kernel: what it stores
//! ([`Store`]), how it runs ([`LaunchSpec`]), the checks of its operands
//! and the argument list of its entry point. Besides the plain product
//! and the SiLU·mul pairs, a classic launch can carry one half of a
//! deferred RMSNorm (`W4Norm` in cu/w4a16.cu): [`AddNorm`] on the linear
//! before the norm, [`RowScale`] on each linear after it.

use cudarc::driver::sys;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::f16;

use super::plan::{halves, W4Plan};
use super::prefetch::L2Pick;
use super::{OutElement, W4A16Linear, W4Kernel};
use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::ops::out_shape;

/// The linear before a deferred RMSNorm (o_proj or down_proj of a decode
/// step): its product `v` is added to `residual` in place (`r = residual +
/// v`, in fp32 as `act::add_rms_norm`), its fp16 output is `fp16(r · w ·
/// scale)` (the next linears' input before the norm's factor), and each
/// block of 16 columns stores its sum of `r²` per row in `parts`
/// (`[rows, W4A16Linear::norm_parts()]`), from which those linears take
/// the factor ([`RowScale`]).
pub struct AddNorm<'a> {
    pub residual: &'a mut DeviceMatrix<f32>,
    /// The norm's weight, one per output column.
    pub weight: &'a DeviceMatrix<f32>,
    pub parts: &'a mut DeviceMatrix<f32>,
    /// `2^-k` with `2^k` at least the weight's largest magnitude
    /// ([`norm_weight_shift`]), so that `|r · w · scale| ≤ |r|` fits fp16
    /// wherever the residual does; exact, so the rounding is that of `k =
    /// 0`.
    pub scale: f32,
}

/// A linear after a deferred RMSNorm: each output row is multiplied by
/// `scale / sqrt(Σ parts[row] / in_features + eps)` (before the kernel's
/// bias and SiLU·mul), the norm's factor for the row whose `fp16(r · w ·
/// 2^-k)` is the input when `scale` is the matching `2^k`.
#[derive(Clone, Copy)]
pub struct RowScale<'a> {
    pub parts: &'a DeviceMatrix<f32>,
    pub eps: f32,
    pub scale: f32,
}

/// The `k` of a deferred norm's `2^-k` ([`AddNorm::scale`]) for a weight
/// whose largest magnitude is `max_abs`: the least `k ≥ 0` with `2^k ≥
/// max_abs` (0 for a weight within ±1, a non-finite or an absurd one; at
/// most 64).
pub fn norm_weight_shift(max_abs: f32) -> i32 {
    if !(max_abs.is_finite() && max_abs > 1.0) {
        return 0;
    }
    let mut k = 0;
    while k < 64 && 2f32.powi(k) < max_abs {
        k += 1;
    }
    k
}

/// A deferred norm's scale is a finite positive power of two (so that
/// applying it is exact).
fn check_norm_scale(op: &'static str, scale: f32) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0 && scale.to_bits() & 0x007f_ffff == 0) {
        return Err(KernelError::invalid(
            op,
            format!("a deferred norm's scale must be a power of two, got {scale}"),
        ));
    }
    Ok(())
}

/// The `norm_mode` argument of the classic entry points (cu/w4a16.cu).
const NORM_OFF: i32 = 0;
const NORM_ADD: i32 = 1;
const NORM_SCALE: i32 = 2;

/// What a launch stores.
pub(super) enum Store<'a> {
    /// Every output: the plain product.
    Product,
    /// `silu(gate) · up` of an interleaved gate/up layer, `out/2` outputs,
    /// and optionally their fp16 copy.
    SiluPairs(Option<&'a mut DeviceMatrix<f16>>),
    /// The linear before a deferred RMSNorm: out (fp16) gets `fp16(r · w)`
    /// of the updated residual `r` ([`AddNorm`]).
    AddNorm(AddNorm<'a>),
}

/// How one launch runs.
pub(super) struct LaunchSpec<'a> {
    /// K splits forced (tests and tuning); None: the plan's.
    pub(super) splits: Option<usize>,
    /// With programmatic dependent launch.
    pub(super) pdl: bool,
    pub(super) store: Store<'a>,
    /// The first row and the row count of a slice of x's rows (and the
    /// output's); None: all of them.
    pub(super) rows: Option<(usize, usize)>,
    /// What the launch's last blocks ask L2 for (classic kernels; see
    /// `l2_prefetch_share` in cu/w4a16.cu).
    pub(super) l2_next: L2Pick<'a>,
    /// A linear after a deferred RMSNorm: its outputs times the norm's
    /// per-row factor ([`RowScale`]).
    pub(super) row_scale: Option<RowScale<'a>>,
}

impl LaunchSpec<'_> {
    pub(super) fn product(pdl: bool, rows: Option<(usize, usize)>) -> Self {
        LaunchSpec {
            splits: None,
            pdl,
            store: Store::Product,
            rows,
            l2_next: L2Pick::Stored,
            row_scale: None,
        }
    }
}

/// Bytes one block asks L2 for in an in-kernel prefetch of the next
/// linear's codes: one bulk prefetch on sm_90.
pub(super) const L2_NEXT_CHUNK: u32 = 32 * 1024;

impl W4A16Linear {
    /// An error unless this layer and every operand (`operands_on`: each
    /// one's `is_on(dev)`) belong to `dev`.
    pub(super) fn check_device(
        &self,
        op: &'static str,
        dev: &GpuDevice,
        operands_on: &[bool],
    ) -> Result<()> {
        if !std::sync::Arc::ptr_eq(self.qw.stream(), dev.stream())
            || operands_on.iter().any(|on| !on)
        {
            return Err(KernelError::invalid(
                op,
                "operands belong to another GpuDevice",
            ));
        }
        Ok(())
    }

    pub(super) fn launch_to<O: OutElement>(
        &self,
        dev: &GpuDevice,
        x: &DeviceMatrix<f16>,
        out: &mut DeviceMatrix<O>,
        spec: LaunchSpec<'_>,
    ) -> Result<W4Plan> {
        const OP: &str = "W4A16 linear";
        let LaunchSpec {
            splits,
            pdl,
            store,
            rows,
            l2_next,
            row_scale,
        } = spec;
        // The layer's own link unless the launch names one or none (held
        // for the launch: the Arc keeps the next layer's codes alive).
        let stored = match l2_next {
            L2Pick::Stored => self.l2_next_now(),
            _ => None,
        };
        let l2_next = match l2_next {
            L2Pick::Next(l, bytes) => Some((l, bytes)),
            L2Pick::Off => None,
            L2Pick::Stored => stored.as_ref().map(|(l, bytes)| (l.as_ref(), *bytes)),
        };
        let total = x.rows();
        let (row0, m) = rows.unwrap_or((0, total));
        if row0 + m > total {
            return Err(KernelError::shape(
                OP,
                format!("rows {row0}..{} of x, which has {total}", row0 + m),
            ));
        }
        self.check_rows(m)?;
        if x.cols() != self.in_features {
            return Err(KernelError::shape(
                OP,
                format!(
                    "x is {m}×{}, the layer takes {} inputs",
                    x.cols(),
                    self.in_features
                ),
            ));
        }
        let norm_needs_classic = |what: &str| -> Result<()> {
            if matches!(self.kernel, W4Kernel::Stream { .. }) || rows.is_some() {
                return Err(KernelError::invalid(
                    OP,
                    format!(
                        "{what} needs a classic kernel over all rows (kernel {:?})",
                        self.kernel
                    ),
                ));
            }
            Ok(())
        };
        let mut add_norm = None;
        let (silu_pairs, out_h) = match store {
            Store::Product => {
                out_shape(OP, out, total, self.out_features)?;
                (0i32, None)
            }
            Store::AddNorm(n) => {
                norm_needs_classic("the residual add of a deferred norm")?;
                if O::IS_F32 != 0 {
                    return Err(KernelError::invalid(
                        OP,
                        "the linear before a deferred norm stores fp16",
                    ));
                }
                out_shape(OP, out, total, self.out_features)?;
                out_shape(OP, &*n.residual, total, self.out_features)?;
                out_shape(OP, &*n.parts, total, self.norm_parts())?;
                out_shape(OP, n.weight, self.out_features, 1)?;
                check_norm_scale(OP, n.scale)?;
                if !(n.residual.is_on(dev) && n.weight.is_on(dev) && n.parts.is_on(dev)) {
                    return Err(KernelError::invalid(
                        OP,
                        "operands belong to another GpuDevice",
                    ));
                }
                add_norm = Some(n);
                (0i32, None)
            }
            Store::SiluPairs(h) => {
                if !self.out_features.is_multiple_of(16)
                    || matches!(self.kernel, W4Kernel::Stream { .. })
                {
                    return Err(KernelError::invalid(
                        OP,
                        format!(
                            "silu(gate)·up needs a classic kernel and whole tile pairs \
                             ({} outputs, kernel {:?})",
                            self.out_features, self.kernel
                        ),
                    ));
                }
                out_shape(OP, out, total, self.out_features / 2)?;
                if let Some(h) = &h {
                    out_shape(OP, h, total, self.out_features / 2)?;
                    if !h.is_on(dev) {
                        return Err(KernelError::invalid(
                            OP,
                            "operands belong to another GpuDevice",
                        ));
                    }
                }
                (1i32, h)
            }
        };
        if let Some(rs) = &row_scale {
            norm_needs_classic("a deferred norm's row factor")?;
            if add_norm.is_some() {
                return Err(KernelError::invalid(
                    OP,
                    "one launch is either before a deferred norm or after it",
                ));
            }
            // The producer of width in_features wrote one sum per 16
            // columns; others would give a wrong factor.
            let want_cols = self.in_features.div_ceil(16);
            if rs.parts.rows() != total || rs.parts.cols() != want_cols || !rs.parts.is_on(dev) {
                return Err(KernelError::shape(
                    OP,
                    format!(
                        "the norm's partial sums are {}×{}, expected {total}×{want_cols}",
                        rs.parts.rows(),
                        rs.parts.cols()
                    ),
                ));
            }
            check_norm_scale(OP, rs.scale)?;
            if !(rs.eps.is_finite() && rs.eps > 0.0) {
                return Err(KernelError::invalid(
                    OP,
                    format!("eps must be positive, got {}", rs.eps),
                ));
            }
        }
        self.check_device(OP, dev, &[x.is_on(dev), out.is_on(dev)])?;
        let p = self.plan_with(m, splits)?;
        let streaming = p.stages > 0;
        let (mi, ni, ki) = (m as i32, self.out_features as i32, self.in_features as i32);
        let (kbi, kci, ppbi) = (self.kbs as i32, p.kc as i32, p.pairs_per_block as i32);
        let has_bias = i32::from(self.bias.is_some());
        let out_f32 = O::IS_F32;
        let stream = dev.stream();
        let r = halves(m);
        let stream_func = self
            .stream_funcs
            .iter()
            .find(|((fr, ns), _)| (*fr, *ns) == (r, p.stages))
            .map(|(_, f)| f);
        let early_func = self
            .early_funcs
            .iter()
            .find(|(fr, _)| *fr == r)
            .map(|(_, f)| f)
            .filter(|_| {
                matches!(self.kernel, W4Kernel::ClassicEarly { .. }) && self.batch.is_none()
            });
        if streaming && stream_func.is_none() {
            // The classic kernels take another argument list.
            return Err(KernelError::invalid(
                OP,
                format!("no streaming kernel with {} stages is compiled", p.stages),
            ));
        }
        let func = stream_func
            .filter(|_| streaming)
            .or(early_func)
            .or_else(|| self.forced.as_ref().filter(|_| r == 1))
            .or_else(|| {
                self.batch
                    .and_then(|u| self.funcs.iter().find(|((fr, fu), _)| (*fr, *fu) == (r, u)))
                    .map(|(_, f)| f)
            })
            .or_else(|| {
                self.funcs
                    .iter()
                    .find(|((fr, _), _)| *fr == r)
                    .map(|(_, f)| f)
            })
            .ok_or_else(|| KernelError::invalid(OP, "no kernel variant for this row count"))?;
        let bias = self.bias.as_ref().unwrap_or(&self.no_bias);
        // A slice of rows starts `row0` rows into x and the output (and
        // the fp16 copy), all row-major.
        let out_cols = if silu_pairs == 1 {
            self.out_features / 2
        } else {
            self.out_features
        };
        let (x_base, _x_sync) = x.data.device_ptr(stream);
        let x_ptr = x_base + (row0 * self.in_features * 2) as u64;
        let (qw_ptr, _qw_sync) = self.qw.device_ptr(stream);
        let (sc_ptr, _sc_sync) = self.scales.device_ptr(stream);
        let (zb_ptr, _zb_sync) = self.zeros.device_ptr(stream);
        let (bias_ptr, _bias_sync) = bias.device_ptr(stream);
        let (out_base, _out_sync) = out.data.device_ptr_mut(stream);
        let out_ptr = out_base + (row0 * out_cols * std::mem::size_of::<O>()) as u64;
        // The streaming kernels take the pairs per block after KC.
        let mut args: Vec<*mut std::ffi::c_void> = vec![
            &x_ptr as *const _ as *mut _,
            &qw_ptr as *const _ as *mut _,
            &sc_ptr as *const _ as *mut _,
            &zb_ptr as *const _ as *mut _,
            &bias_ptr as *const _ as *mut _,
            &out_ptr as *const _ as *mut _,
            &mi as *const _ as *mut _,
            &ni as *const _ as *mut _,
            &ki as *const _ as *mut _,
            &kbi as *const _ as *mut _,
            &kci as *const _ as *mut _,
        ];
        if streaming {
            args.push(&ppbi as *const _ as *mut _);
        }
        args.push(&has_bias as *const _ as *mut _);
        args.push(&out_f32 as *const _ as *mut _);
        // The classic kernels then take the epilogue: silu_pairs and the
        // fp16 copy's pointer (null: none).
        let (out_h_ptr, _out_h_sync) = match out_h {
            Some(h) => {
                let (ptr, sync) = h.data.device_ptr_mut(stream);
                (ptr + (row0 * out_cols * 2) as u64, Some(sync))
            }
            None => (0, None),
        };
        // Then the L2 prefetch of the next linear's codes: its start, its
        // length (0: none) and the bytes per block's bulk prefetch.
        let (pf_ptr, pf_bytes, _pf_sync) = match l2_next {
            Some((next, max_bytes)) if max_bytes >= 16 => {
                if !std::sync::Arc::ptr_eq(next.qw.stream(), stream) {
                    return Err(KernelError::invalid(
                        OP,
                        "the linear to prefetch belongs to another GpuDevice",
                    ));
                }
                let (ptr, sync) = next.qw.device_ptr(stream);
                let bytes = (4 * next.qw.len()).min(max_bytes) as u64 & !15;
                (ptr, bytes, Some(sync))
            }
            _ => (0, 0u64, None),
        };
        let pf_chunk = L2_NEXT_CHUNK;
        // Then the deferred norm (W4Norm): the residual, the norm's weight,
        // the partial sums, the mode, their count, eps and the scale.
        let (mut norm_res, mut norm_w, mut norm_part) = (0u64, 0u64, 0u64);
        let (mut norm_mode, mut norm_parts, mut norm_eps) = (NORM_OFF, 0i32, 0f32);
        let mut norm_scale = 1f32;
        // The sync guards of the norm's buffers, held until the launch is
        // queued.
        let (mut _res_sync, mut _part_sync, mut _w_sync, mut _scale_part_sync) =
            (None, None, None, None);
        if let Some(n) = add_norm {
            let (ptr, sync) = n.residual.data.device_ptr_mut(stream);
            (norm_res, _res_sync) = (ptr, Some(sync));
            let (ptr, sync) = n.parts.data.device_ptr_mut(stream);
            (norm_part, _part_sync) = (ptr, Some(sync));
            let (ptr, sync) = n.weight.data.device_ptr(stream);
            (norm_w, _w_sync) = (ptr, Some(sync));
            (norm_mode, norm_scale) = (NORM_ADD, n.scale);
        }
        if let Some(rs) = row_scale {
            let (ptr, sync) = rs.parts.data.device_ptr(stream);
            (norm_part, _scale_part_sync) = (ptr, Some(sync));
            (norm_mode, norm_parts) = (NORM_SCALE, rs.parts.cols() as i32);
            (norm_eps, norm_scale) = (rs.eps, rs.scale);
        }
        if !streaming {
            args.push(&silu_pairs as *const _ as *mut _);
            args.push(&out_h_ptr as *const _ as *mut _);
            args.push(&pf_ptr as *const _ as *mut _);
            args.push(&pf_bytes as *const _ as *mut _);
            args.push(&pf_chunk as *const _ as *mut _);
            args.push(&norm_res as *const _ as *mut _);
            args.push(&norm_w as *const _ as *mut _);
            args.push(&norm_part as *const _ as *mut _);
            args.push(&norm_mode as *const _ as *mut _);
            args.push(&norm_parts as *const _ as *mut _);
            args.push(&norm_eps as *const _ as *mut _);
            args.push(&norm_scale as *const _ as *mut _);
        }
        // SAFETY: the value of a programmatic-serialization attribute is the
        // int `programmaticStreamSerializationAllowed`; the rest of the
        // union is padding.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: p.n_blocks as u32,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: (32 * p.splits) as u32,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: p.smem_bytes as u32,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl),
        };
        dev.context()
            .bind_to_thread()
            .during("binding the context")?;
        // With `pdl` this launch may start while the kernel before it still
        // runs: sound only because every W4A16 kernel touches nothing but
        // its own weights, scales and zeros (and asks L2 for another
        // layer's immutable codes, reading nothing) before `griddepcontrol.wait`
        // (x through `ld_produced_v4`, `out` written after the wait;
        // tests/pdl.rs). A kernel launched with the attribute must keep that
        // rule.
        // SAFETY: `args` matches `w4a16_gemv_g{G}_r{R}_u{U}`'s signature in
        // cu/w4a16.cu (six device pointers, eight ints, the fp16 copy's
        // pointer: null, or m·N/2 halves with silu_pairs, whose out then
        // holds m·N/2 elements, checked above; then the prefetch's start,
        // u64 length and u32 chunk: a live allocation of this stream of at
        // least pf_bytes bytes, or length 0, and a prefetch writes
        // nothing; then the deferred norm's three pointers, two ints and two
        // floats: with NORM_ADD a residual of m·N f32, a weight of N f32 and
        // m·norm_parts() f32 of partial sums, out then fp16; with
        // NORM_SCALE m·norm_parts f32 of partial sums; all checked above,
        // and null pointers the kernel never reads with NORM_OFF), or with
        // `streaming`
        // `w4a16_stream_g{G}_r{R}_s{NS}`'s (six pointers, eight ints, PPB
        // after KC; NS = p.stages, which sizes smem_bytes), G being this
        // layer's group size; every pointed-to value lives until after the
        // call, which copies them. The streaming plan gives every warp at
        // least one k-block and every block at least one pair, which the
        // kernel's block barriers rely on, and its shared memory is below
        // the limit raised at construction. Shapes were checked above: from
        // the (row-offset) pointers, x holds m·K fp16 (K a multiple of 32;
        // row0 + m ≤ x's rows), out m·N elements of the type `out_f32`
        // names (out has x's rows), qw/scales/zeros were validated against (K, N, G) at
        // construction, bias holds N fp16 when has_bias; the block has
        // 32·splits ≤ 512 threads and smem_bytes covers splits·32·4·halves
        // floats. All buffers belong to this device's stream (checked
        // above), and the sync guards record the launch on them when they
        // drop.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                func.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .during("launching w4a16_gemv")?;
        Ok(p)
    }
}
