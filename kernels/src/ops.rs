//! The small row-wise fp16 ops of a decoder step: RMSNorm (with the fused
//! residual add), SiLU·mul, rotary embedding and embedding gather. Each
//! checks shapes, then launches one kernel on the device's stream.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;

use crate::buffer::{DeviceMatrix, Element};
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;

pub(crate) fn same_shape<A: Element, B: Element>(
    op: &'static str,
    a: (&str, &DeviceMatrix<A>),
    b: (&str, &DeviceMatrix<B>),
) -> Result<()> {
    if a.1.rows() != b.1.rows() || a.1.cols() != b.1.cols() {
        return Err(KernelError::shape(
            op,
            format!(
                "{} is {}×{} but {} is {}×{}",
                a.0,
                a.1.rows(),
                a.1.cols(),
                b.0,
                b.1.rows(),
                b.1.cols()
            ),
        ));
    }
    Ok(())
}

/// `out` must be `rows × cols`.
pub(crate) fn out_shape<T: Element>(
    op: &'static str,
    out: &DeviceMatrix<T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if out.rows() != rows || out.cols() != cols {
        return Err(KernelError::shape(
            op,
            format!(
                "out is {}×{}, expected {rows}×{cols}",
                out.rows(),
                out.cols()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn on_device(op: &'static str, dev: &GpuDevice, ok: &[bool]) -> Result<()> {
    if ok.iter().all(|&b| b) {
        Ok(())
    } else {
        Err(KernelError::invalid(
            op,
            format!(
                "an operand belongs to another GpuDevice than {}",
                dev.name()
            ),
        ))
    }
}

pub(crate) fn check_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::shape(op, format!("{what} {v} exceeds i32")))
}

pub(crate) fn vector_len<T: Element>(
    op: &'static str,
    what: &str,
    v: &DeviceMatrix<T>,
    want: usize,
) -> Result<()> {
    if v.len() != want {
        return Err(KernelError::shape(
            op,
            format!("{what} has {} elements, expected {want}", v.len()),
        ));
    }
    Ok(())
}

fn rms_launch(
    dev: &GpuDevice,
    residual: &DeviceMatrix<f16>,
    delta: Option<&DeviceMatrix<f16>>,
    weight: &DeviceMatrix<f16>,
    eps: f32,
    out: &mut DeviceMatrix<f16>,
) -> Result<()> {
    const OP: &str = "rms_norm";
    same_shape(OP, ("input", residual), ("out", out))?;
    if let Some(d) = delta {
        same_shape(OP, ("residual", residual), ("delta", d))?;
    }
    let d = residual.cols();
    vector_len(OP, "weight", weight, d)?;
    on_device(
        OP,
        dev,
        &[
            residual.is_on(dev),
            weight.is_on(dev),
            out.is_on(dev),
            delta.is_none_or(|d| d.is_on(dev)),
        ],
    )?;
    if residual.rows() == 0 {
        return Ok(());
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(KernelError::invalid(
            OP,
            format!("eps must be a positive number, got {eps}"),
        ));
    }
    let di = check_i32(OP, "row length", d)?;
    let has_delta = i32::from(delta.is_some());
    let delta = delta.unwrap_or(residual);
    let f = dev.function(Module::Norm, "rms_norm_f16")?;
    let cfg = LaunchConfig {
        grid_dim: (check_i32(OP, "rows", residual.rows())? as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&residual.data)
        .arg(&delta.data)
        .arg(&weight.data)
        .arg(&mut out.data)
        .arg(&di)
        .arg(&eps)
        .arg(&has_delta);
    // SAFETY: matches `rms_norm_f16(half*, const half*, const half*, half*,
    // int, float, int)`; residual, delta and out are rows×d, weight has d
    // elements (checked above). The kernel writes `residual` only when
    // has_delta is 1, which happens only through `add_rms_norm`, whose
    // caller holds it mutably.
    unsafe { b.launch(cfg) }.during("launching rms_norm_f16")?;
    Ok(())
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, row by row.
pub fn rms_norm(
    dev: &GpuDevice,
    x: &DeviceMatrix<f16>,
    weight: &DeviceMatrix<f16>,
    eps: f32,
    out: &mut DeviceMatrix<f16>,
) -> Result<()> {
    rms_launch(dev, x, None, weight, eps, out)
}

/// `residual = fp16(residual + delta)`, then `out = rms_norm(residual) · weight`.
pub fn add_rms_norm(
    dev: &GpuDevice,
    residual: &mut DeviceMatrix<f16>,
    delta: &DeviceMatrix<f16>,
    weight: &DeviceMatrix<f16>,
    eps: f32,
    out: &mut DeviceMatrix<f16>,
) -> Result<()> {
    rms_launch(dev, residual, Some(delta), weight, eps, out)
}

/// `out = silu(gate) · up`, element-wise.
pub fn silu_mul(
    dev: &GpuDevice,
    gate: &DeviceMatrix<f16>,
    up: &DeviceMatrix<f16>,
    out: &mut DeviceMatrix<f16>,
) -> Result<()> {
    const OP: &str = "silu_mul";
    same_shape(OP, ("gate", gate), ("up", up))?;
    same_shape(OP, ("gate", gate), ("out", out))?;
    on_device(OP, dev, &[gate.is_on(dev), up.is_on(dev), out.is_on(dev)])?;
    let n = gate.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let blocks = (n.div_ceil(256)).min(dev.num_sms() as u64 * 16) as u32;
    let f = dev.function(Module::Elementwise, "silu_mul_f16")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&gate.data).arg(&up.data).arg(&mut out.data).arg(&n);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `silu_mul_f16(const half*, const half*, half*, u64)`;
    // all three buffers hold n elements (checked above); grid-stride loop.
    unsafe { b.launch(cfg) }.during("launching silu_mul_f16")?;
    Ok(())
}

/// Inverse frequencies of the default rotary embedding:
/// `inv_freq[i] = theta^(−2i/head_dim)` for `i < head_dim/2`.
pub fn rope_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

/// Rotates `x` (`[rows, heads·head_dim]`) in place, the half-split ("neox")
/// form of Hugging Face Llama: pair `(i, i + head_dim/2)` turns by
/// `positions[row] · inv_freq[i]`. `positions` has one entry per row,
/// `inv_freq` `head_dim/2` entries (see [`rope_inv_freq`]).
pub fn rope(
    dev: &GpuDevice,
    x: &mut DeviceMatrix<f16>,
    heads: usize,
    head_dim: usize,
    positions: &DeviceMatrix<i32>,
    inv_freq: &DeviceMatrix<f32>,
) -> Result<()> {
    const OP: &str = "rope";
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > 2048 {
        return Err(KernelError::invalid(
            OP,
            format!("head_dim {head_dim} must be even and at most 2048"),
        ));
    }
    if heads == 0 || heads > 65535 || x.cols() != heads * head_dim {
        return Err(KernelError::shape(
            OP,
            format!(
                "x has {} columns, expected heads {heads} × head_dim {head_dim}",
                x.cols()
            ),
        ));
    }
    vector_len(OP, "positions", positions, x.rows())?;
    vector_len(OP, "inv_freq", inv_freq, head_dim / 2)?;
    on_device(
        OP,
        dev,
        &[x.is_on(dev), positions.is_on(dev), inv_freq.is_on(dev)],
    )?;
    if x.rows() == 0 {
        return Ok(());
    }
    let rows = check_i32(OP, "rows", x.rows())? as u32;
    let (hi, hdi) = (heads as i32, head_dim as i32);
    let f = dev.function(Module::Elementwise, "rope_neox_f16")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.data)
        .arg(&positions.data)
        .arg(&inv_freq.data)
        .arg(&hi)
        .arg(&hdi);
    let cfg = LaunchConfig {
        grid_dim: (rows, heads as u32, 1),
        block_dim: ((head_dim / 2).div_ceil(32) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `rope_neox_f16(half*, const int*, const float*, int,
    // int)`; x is rows×heads·head_dim, positions has rows entries, inv_freq
    // head_dim/2 (checked above); threads past head_dim/2 return at once.
    unsafe { b.launch(cfg) }.during("launching rope_neox_f16")?;
    Ok(())
}

/// `out[r] = table[ids[r]]`. Ids are checked against the table on the host.
pub fn embedding(
    dev: &GpuDevice,
    table: &DeviceMatrix<f16>,
    ids: &[u32],
    out: &mut DeviceMatrix<f16>,
) -> Result<()> {
    const OP: &str = "embedding";
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table.rows()) {
        return Err(KernelError::invalid(
            OP,
            format!(
                "token id {bad} is out of range for a vocabulary of {}",
                table.rows()
            ),
        ));
    }
    out_shape(OP, out, ids.len(), table.cols())?;
    on_device(OP, dev, &[table.is_on(dev), out.is_on(dev)])?;
    if ids.is_empty() {
        return Ok(());
    }
    let d = check_i32(OP, "row length", table.cols())?;
    let rows = check_i32(OP, "rows", ids.len())? as u32;
    let ids_dev = dev.upload(ids, ids.len(), 1)?;
    let f = dev.function(Module::Elementwise, "embedding_f16")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&table.data)
        .arg(&ids_dev.data)
        .arg(&mut out.data)
        .arg(&d);
    let cfg = LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `embedding_f16(const half*, const u32*, half*, int)`;
    // every id is below table.rows() (checked above) and out is ids×d.
    unsafe { b.launch(cfg) }.during("launching embedding_f16")?;
    Ok(())
}
