//! Row-wise ops on fp32 activations (`cu/act_f32.cu`), for the engine's
//! CUDA backend: the residual stream, norms, rotary embedding, SiLU·mul,
//! embedding gather and row selection stay in fp32 as on the CPU backend;
//! [`to_f16`] rounds a linear's input for the fp16 tensor-core paths. The
//! ops whose output feeds a linear (the norms, SiLU·mul) can write that
//! fp16 copy too (`out_half`), bit for bit what [`to_f16`] would store, so
//! that a decode step spends no launch on the conversion.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;

use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::{check_i32, on_device, same_shape, vector_len};
use crate::paged::RowMeta;

/// The fp16 copy an op may also write: checked against the fp32 output's
/// shape and device. Returns the launch flag (`has_half`).
fn check_half(
    op: &'static str,
    dev: &GpuDevice,
    out: &DeviceMatrix<f32>,
    half: Option<&DeviceMatrix<f16>>,
) -> Result<i32> {
    match half {
        Some(h) => {
            same_shape(op, ("out", out), ("out_half", h))?;
            on_device(op, dev, &[h.is_on(dev)])?;
            Ok(1)
        }
        None => Ok(0),
    }
}

/// Grid for a grid-stride loop over `n` elements.
fn stride_cfg(dev: &GpuDevice, n: usize) -> LaunchConfig {
    let blocks = (n.div_ceil(256) as u64).clamp(1, dev.num_sms() as u64 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `out = fp16(x)`, element-wise.
pub fn to_f16(dev: &GpuDevice, x: &DeviceMatrix<f32>, out: &mut DeviceMatrix<f16>) -> Result<()> {
    const OP: &str = "to_f16";
    same_shape(OP, ("x", x), ("out", &*out))?;
    on_device(OP, dev, &[x.is_on(dev), out.is_on(dev)])?;
    if x.is_empty() {
        return Ok(());
    }
    let n = x.len() as u64;
    let f = dev.function(Module::ActF32, "f32_to_f16")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&x.data).arg(&mut out.data).arg(&n);
    // SAFETY: matches `f32_to_f16(const float*, half*, u64)`; both hold n
    // elements (checked above); grid-stride loop.
    unsafe { b.launch(stride_cfg(dev, x.len())) }.during("launching f32_to_f16")?;
    Ok(())
}

/// `a += b`, element-wise.
pub fn add(dev: &GpuDevice, a: &mut DeviceMatrix<f32>, b_: &DeviceMatrix<f32>) -> Result<()> {
    const OP: &str = "add";
    same_shape(OP, ("a", &*a), ("b", b_))?;
    on_device(OP, dev, &[a.is_on(dev), b_.is_on(dev)])?;
    if a.is_empty() {
        return Ok(());
    }
    let n = a.len() as u64;
    let f = dev.function(Module::ActF32, "add_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut a.data).arg(&b_.data).arg(&n);
    // SAFETY: matches `add_f32(float*, const float*, u64)`; both hold n
    // elements (checked above).
    unsafe { b.launch(stride_cfg(dev, n as usize)) }.during("launching add_f32")?;
    Ok(())
}

/// `out[r] += bias` for every row.
pub fn add_bias(
    dev: &GpuDevice,
    out: &mut DeviceMatrix<f32>,
    bias: &DeviceMatrix<f32>,
) -> Result<()> {
    const OP: &str = "add_bias";
    vector_len(OP, "bias", bias, out.cols())?;
    on_device(OP, dev, &[out.is_on(dev), bias.is_on(dev)])?;
    if out.is_empty() {
        return Ok(());
    }
    let n = out.len() as u64;
    let cols = check_i32(OP, "cols", out.cols())?;
    let f = dev.function(Module::ActF32, "add_bias_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.data).arg(&bias.data).arg(&n).arg(&cols);
    // SAFETY: matches `add_bias_f32(float*, const float*, u64, int)`; out
    // holds n = rows·cols elements and bias cols (checked above).
    unsafe { b.launch(stride_cfg(dev, n as usize)) }.during("launching add_bias_f32")?;
    Ok(())
}

/// `out = silu(gate) · up`, element-wise.
/// `out_half`, if given, gets the fp16 copy.
pub fn silu_mul(
    dev: &GpuDevice,
    gate: &DeviceMatrix<f32>,
    up: &DeviceMatrix<f32>,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
) -> Result<()> {
    const OP: &str = "silu_mul_f32";
    same_shape(OP, ("gate", gate), ("up", up))?;
    same_shape(OP, ("gate", gate), ("out", &*out))?;
    on_device(OP, dev, &[gate.is_on(dev), up.is_on(dev), out.is_on(dev)])?;
    let has_half = check_half(OP, dev, out, out_half.as_deref())?;
    if gate.is_empty() {
        return Ok(());
    }
    let n = gate.len() as u64;
    let null: u64 = 0;
    let f = dev.function(Module::ActF32, "silu_mul_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&gate.data).arg(&up.data).arg(&mut out.data);
    match out_half {
        Some(h) => b.arg(&mut h.data),
        None => b.arg(&null),
    };
    b.arg(&n).arg(&has_half);
    // SAFETY: matches `silu_mul_f32(const float*, const float*, float*,
    // half*, u64, int)`; gate, up, out (and out_half when has_half is 1)
    // hold n elements (checked above); a null out_half is never written.
    unsafe { b.launch(stride_cfg(dev, n as usize)) }.during("launching silu_mul_f32")?;
    Ok(())
}

/// `out = silu(gate) · up` where each row of `gate_up` is `[gate | up]`
/// (`out` has half its columns); `out_half`, if given, gets the fp16 copy.
pub fn silu_mul_halves(
    dev: &GpuDevice,
    gate_up: &DeviceMatrix<f32>,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
) -> Result<()> {
    silu_mul_stacked(dev, gate_up, out, out_half, false)
}

/// [`silu_mul_halves`] for a gate/up output whose columns alternate by
/// tiles of 8 (gate `8b ..` at `16b`, up at `16b + 8`: the product of a
/// layer interleaved by `PackedW4::interleave_halves`).
pub fn silu_mul_pairs(
    dev: &GpuDevice,
    gate_up: &DeviceMatrix<f32>,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
) -> Result<()> {
    if !out.cols().is_multiple_of(8) {
        return Err(KernelError::shape(
            "silu_mul_pairs",
            format!("{} outputs are not whole tiles of 8", out.cols()),
        ));
    }
    silu_mul_stacked(dev, gate_up, out, out_half, true)
}

fn silu_mul_stacked(
    dev: &GpuDevice,
    gate_up: &DeviceMatrix<f32>,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
    tiles: bool,
) -> Result<()> {
    const OP: &str = "silu_mul_halves_f32";
    if gate_up.rows() != out.rows() || gate_up.cols() != 2 * out.cols() {
        return Err(KernelError::shape(
            OP,
            format!(
                "gate_up is {}x{}, out is {}x{}: out needs the rows and half the columns",
                gate_up.rows(),
                gate_up.cols(),
                out.rows(),
                out.cols()
            ),
        ));
    }
    on_device(OP, dev, &[gate_up.is_on(dev), out.is_on(dev)])?;
    let has_half = check_half(OP, dev, out, out_half.as_deref())?;
    if out.is_empty() {
        return Ok(());
    }
    let (rows, n) = (out.rows() as u64, out.cols() as u64);
    let null: u64 = 0;
    let cfg = stride_cfg(dev, out.len());
    let f = dev.function(Module::ActF32, OP)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&gate_up.data).arg(&mut out.data);
    match out_half {
        Some(h) => b.arg(&mut h.data),
        None => b.arg(&null),
    };
    let tiles = i32::from(tiles);
    b.arg(&rows).arg(&n).arg(&has_half).arg(&tiles);
    // SAFETY: matches `silu_mul_halves_f32(const float*, float*, half*,
    // u64, u64, int, int)`; gate_up holds rows × 2n and out (and out_half
    // when has_half is 1) rows × n elements (checked above; with `tiles`
    // n is a multiple of 8, so column 16(c/8) + c%8 + 8 < 2n); a null
    // out_half is never written.
    unsafe { b.launch(cfg) }.during("launching silu_mul_halves_f32")?;
    Ok(())
}

/// Splits the columns of `src` into `outs` (two or three matrices with
/// `src`'s rows, whose widths add up to its columns), left to right.
pub fn split_cols(
    dev: &GpuDevice,
    src: &DeviceMatrix<f32>,
    outs: &mut [DeviceMatrix<f32>],
) -> Result<()> {
    const OP: &str = "split_cols3_f32";
    if !(2..=3).contains(&outs.len()) {
        return Err(KernelError::invalid(
            OP,
            format!("splits into 2 or 3 matrices, not {}", outs.len()),
        ));
    }
    let widths: Vec<usize> = outs.iter().map(|o| o.cols()).collect();
    if outs.iter().any(|o| o.rows() != src.rows()) || widths.iter().sum::<usize>() != src.cols() {
        return Err(KernelError::shape(
            OP,
            format!(
                "{}x{} does not split into widths {widths:?} with the same rows",
                src.rows(),
                src.cols()
            ),
        ));
    }
    let mut flags = vec![src.is_on(dev)];
    flags.extend(outs.iter().map(|o| o.is_on(dev)));
    on_device(OP, dev, &flags)?;
    if src.is_empty() {
        return Ok(());
    }
    let rows = src.rows() as u64;
    let w = |i: usize| widths.get(i).copied().unwrap_or(0) as u64;
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let f = dev.function(Module::ActF32, OP)?;
    let mut b = dev.stream().launch_builder(&f);
    // With two outputs the third pointer is never written (w2 = 0): null.
    let null: u64 = 0;
    b.arg(&src.data);
    let two = outs.len() == 2;
    for o in outs.iter_mut() {
        b.arg(&mut o.data);
    }
    if two {
        b.arg(&null);
    }
    b.arg(&rows).arg(&w0).arg(&w1).arg(&w2);
    // SAFETY: matches `split_cols3_f32(const float*, float*, float*, float*,
    // u64 x4)`; src holds rows × (w0 + w1 + w2) elements and output i holds
    // rows × w_i (checked above); the kernel writes output i only at
    // columns below its width.
    unsafe { b.launch(stride_cfg(dev, src.len())) }.during("launching split_cols3_f32")?;
    Ok(())
}

fn rms_launch(
    dev: &GpuDevice,
    residual: &DeviceMatrix<f32>,
    delta: Option<&DeviceMatrix<f32>>,
    weight: &DeviceMatrix<f32>,
    eps: f32,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
) -> Result<()> {
    const OP: &str = "rms_norm_f32";
    same_shape(OP, ("input", residual), ("out", &*out))?;
    if let Some(d) = delta {
        same_shape(OP, ("residual", residual), ("delta", d))?;
    }
    vector_len(OP, "weight", weight, residual.cols())?;
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
    let has_half = check_half(OP, dev, out, out_half.as_deref())?;
    if residual.is_empty() {
        return Ok(());
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(KernelError::invalid(
            OP,
            format!("eps must be positive, got {eps}"),
        ));
    }
    let d = check_i32(OP, "row length", residual.cols())?;
    let has_delta = i32::from(delta.is_some());
    let delta = delta.unwrap_or(residual);
    let null: u64 = 0;
    // Rows of whole float4s up to 4 per thread of 1024 take the vector
    // kernel, one thread per float4 (whole warps). On an H100 it lifted
    // Llama-2-7B batch-1 decode from 260 to 308 tok/s (docs/BENCHMARKS.md)
    // with greedy output unchanged.
    let n4 = residual.cols() / 4;
    let vector = residual.cols().is_multiple_of(4) && n4 <= 4 * 1024;
    let threads = if vector {
        (n4.div_ceil(32) * 32).clamp(32, 1024) as u32
    } else {
        256
    };
    let name = if vector {
        "rms_norm_f32_v"
    } else {
        "rms_norm_f32"
    };
    let f = dev.function(Module::ActF32, name)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&residual.data)
        .arg(&delta.data)
        .arg(&weight.data)
        .arg(&mut out.data);
    match out_half {
        Some(h) => b.arg(&mut h.data),
        None => b.arg(&null),
    };
    b.arg(&d).arg(&eps).arg(&has_delta).arg(&has_half);
    let cfg = LaunchConfig {
        grid_dim: (check_i32(OP, "rows", residual.rows())? as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `rms_norm_f32` / `rms_norm_f32_v(float*, const
    // float*, const float*, float*, half*, int, float, int, int)`; the
    // vector kernel only for d a multiple of 4 (rows of whole, 16-byte
    // aligned float4s in these whole allocations) with at most 4 float4s
    // per thread of the block launched; residual, delta, out (and
    // out_half when has_half is 1; a null one is never written) are rows×d
    // and the weight has d elements (checked above). The kernel writes
    // `residual` only when has_delta is 1, i.e. through `add_rms_norm`,
    // whose caller holds it mutably.
    unsafe { b.launch(cfg) }.during("launching rms_norm_f32")?;
    Ok(())
}

/// `out = x / sqrt(mean(x²) + eps) · weight`, row by row; `out_half`, if
/// given, gets the fp16 copy.
pub fn rms_norm(
    dev: &GpuDevice,
    x: &DeviceMatrix<f32>,
    weight: &DeviceMatrix<f32>,
    eps: f32,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
) -> Result<()> {
    rms_launch(dev, x, None, weight, eps, out, out_half)
}

/// `residual += delta`, then `out = rms_norm(residual) · weight`;
/// `out_half` as in [`rms_norm`].
pub fn add_rms_norm(
    dev: &GpuDevice,
    residual: &mut DeviceMatrix<f32>,
    delta: &DeviceMatrix<f32>,
    weight: &DeviceMatrix<f32>,
    eps: f32,
    out: &mut DeviceMatrix<f32>,
    out_half: Option<&mut DeviceMatrix<f16>>,
) -> Result<()> {
    rms_launch(dev, residual, Some(delta), weight, eps, out, out_half)
}

/// The values of a deferred norm's output (`W4A16Linear::forward_add_norm`)
/// for an op that cannot apply the norm's factor itself: `out[r] = h[r] ·
/// inv(r)` with `inv(r) = scale / sqrt(Σ parts[r] / d + eps)` formed as
/// the linears after the norm form it (`RowScale`), and `out_half =
/// fp16(out)`. `h` is the `fp16(residual · w · 2^-k)` that linear stored
/// (`rows × d`), `parts` its partial sums of squares (`rows × ⌈d/16⌉`),
/// `scale` the matching `2^k`.
pub fn deferred_norm_values(
    dev: &GpuDevice,
    h: &DeviceMatrix<f16>,
    parts: &DeviceMatrix<f32>,
    eps: f32,
    scale: f32,
    out: &mut DeviceMatrix<f32>,
    out_half: &mut DeviceMatrix<f16>,
) -> Result<()> {
    const OP: &str = "deferred_norm_values_f32";
    same_shape(OP, ("h", h), ("out", &*out))?;
    same_shape(OP, ("out", &*out), ("out_half", &*out_half))?;
    if parts.rows() != h.rows() || parts.cols() != h.cols().div_ceil(16) {
        return Err(KernelError::shape(
            OP,
            format!(
                "partial sums are {}×{}, h is {}×{} (one sum per 16 columns)",
                parts.rows(),
                parts.cols(),
                h.rows(),
                h.cols()
            ),
        ));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(KernelError::invalid(
            OP,
            format!("scale must be positive, got {scale}"),
        ));
    }
    on_device(
        OP,
        dev,
        &[
            h.is_on(dev),
            parts.is_on(dev),
            out.is_on(dev),
            out_half.is_on(dev),
        ],
    )?;
    if h.is_empty() {
        return Ok(());
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(KernelError::invalid(
            OP,
            format!("eps must be positive, got {eps}"),
        ));
    }
    let d = check_i32(OP, "row length", h.cols())?;
    let p = check_i32(OP, "partial sums per row", parts.cols())?;
    let f = dev.function(Module::ActF32, OP)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&h.data)
        .arg(&parts.data)
        .arg(&mut out.data)
        .arg(&mut out_half.data)
        .arg(&d)
        .arg(&p)
        .arg(&eps)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (check_i32(OP, "rows", h.rows())? as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `deferred_norm_values_f32(const half*, const float*,
    // float*, half*, int, int, float, float)`; h, out and out_half are rows×d and
    // parts rows×p (checked above), one block per row.
    unsafe { b.launch(cfg) }.during("launching deferred_norm_values_f32")?;
    Ok(())
}

/// Rotary embedding (half-split form) of `x` (`rows × heads·head_dim`) in
/// place, each row at its position in `meta`; positions are multiplied by
/// `pos_scale` (linear scaling) before the `inv_freq` (`head_dim/2`) rates.
pub fn rope(
    dev: &GpuDevice,
    x: &mut DeviceMatrix<f32>,
    heads: usize,
    meta: &RowMeta,
    inv_freq: &DeviceMatrix<f32>,
    pos_scale: f32,
) -> Result<()> {
    const OP: &str = "rope_f32";
    let head_dim = inv_freq.len() * 2;
    if head_dim == 0 || head_dim > 2048 {
        return Err(KernelError::invalid(
            OP,
            format!("head_dim {head_dim} must be 2..=2048"),
        ));
    }
    if heads == 0 || heads > 65535 || x.cols() != heads * head_dim || x.rows() != meta.rows() {
        return Err(KernelError::shape(
            OP,
            format!(
                "x is {}×{}, expected {}×({heads} heads × {head_dim})",
                x.rows(),
                x.cols(),
                meta.rows()
            ),
        ));
    }
    on_device(
        OP,
        dev,
        &[x.is_on(dev), meta.is_on(dev), inv_freq.is_on(dev)],
    )?;
    if x.is_empty() {
        return Ok(());
    }
    let (hi, hdi) = (heads as i32, head_dim as i32);
    let rows = check_i32(OP, "rows", x.rows())? as u32;
    let positions = meta.positions();
    let f = dev.function(Module::ActF32, "rope_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.data)
        .arg(&positions)
        .arg(&inv_freq.data)
        .arg(&pos_scale)
        .arg(&hi)
        .arg(&hdi);
    let cfg = LaunchConfig {
        grid_dim: (rows, heads as u32, 1),
        block_dim: ((head_dim / 2).div_ceil(32) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `rope_f32(float*, const int*, const float*, float,
    // int, int)`; x is rows × heads·head_dim, positions has rows entries
    // and inv_freq head_dim/2 (checked above); threads past head_dim/2
    // return at once.
    unsafe { b.launch(cfg) }.during("launching rope_f32")?;
    Ok(())
}

/// A fused q/k/v projection's output `src` (`rows × (q + k + v)` columns)
/// split into `q`, `k` and `v` (each `rows ×` a multiple of head_dim
/// columns) with the rotary embedding of [`rope`] applied to `q` and `k`:
/// one launch instead of three, and the same values.
pub fn split_rope(
    dev: &GpuDevice,
    src: &DeviceMatrix<f32>,
    outs: [&mut DeviceMatrix<f32>; 3],
    meta: &RowMeta,
    inv_freq: &DeviceMatrix<f32>,
    pos_scale: f32,
) -> Result<()> {
    const OP: &str = "split_rope_f32";
    let head_dim = inv_freq.len() * 2;
    let [q, k, v] = outs;
    if head_dim == 0 || head_dim > 2048 {
        return Err(KernelError::invalid(
            OP,
            format!("head_dim {head_dim} must be 2..=2048"),
        ));
    }
    let widths = [q.cols(), k.cols(), v.cols()];
    let rows_ok = [q.rows(), k.rows(), v.rows()]
        .iter()
        .all(|&r| r == src.rows() && r == meta.rows());
    let heads: Vec<usize> = widths.iter().map(|w| w / head_dim).collect();
    if !rows_ok
        || widths.iter().any(|w| w % head_dim != 0)
        || widths.iter().sum::<usize>() != src.cols()
        || heads.iter().sum::<usize>() > 65535
    {
        return Err(KernelError::shape(
            OP,
            format!(
                "{}x{} does not split into {} rows of widths {widths:?}, each whole heads of {head_dim}",
                src.rows(),
                src.cols(),
                meta.rows()
            ),
        ));
    }
    on_device(
        OP,
        dev,
        &[
            src.is_on(dev),
            q.is_on(dev),
            k.is_on(dev),
            v.is_on(dev),
            meta.is_on(dev),
            inv_freq.is_on(dev),
        ],
    )?;
    if src.is_empty() {
        return Ok(());
    }
    let rows = check_i32(OP, "rows", src.rows())? as u32;
    let (nq, nk, nv) = (heads[0] as i32, heads[1] as i32, heads[2] as i32);
    let hdi = head_dim as i32;
    let positions = meta.positions();
    let f = dev.function(Module::ActF32, OP)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&src.data)
        .arg(&mut q.data)
        .arg(&mut k.data)
        .arg(&mut v.data)
        .arg(&positions)
        .arg(&inv_freq.data)
        .arg(&pos_scale)
        .arg(&nq)
        .arg(&nk)
        .arg(&nv)
        .arg(&hdi);
    let cfg = LaunchConfig {
        grid_dim: (rows, (nq + nk + nv) as u32, 1),
        block_dim: ((head_dim / 2).div_ceil(32) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `split_rope_f32(const float*, float*, float*, float*,
    // const int*, const float*, float, int, int, int, int)`; src is rows ×
    // (nq + nk + nv)·head_dim, q/k/v rows × n·head_dim, positions has rows
    // entries and inv_freq head_dim/2 (checked above); threads past
    // head_dim/2 return at once.
    unsafe { b.launch(cfg) }.during("launching split_rope_f32")?;
    Ok(())
}

/// `out[r] = fp32(table[ids[r]])`; ids are checked against the table.
pub fn embedding(
    dev: &GpuDevice,
    table: &DeviceMatrix<f16>,
    ids: &[u32],
) -> Result<DeviceMatrix<f32>> {
    const OP: &str = "embedding_f32";
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table.rows()) {
        return Err(KernelError::invalid(
            OP,
            format!(
                "token id {bad} is out of range for a vocabulary of {}",
                table.rows()
            ),
        ));
    }
    on_device(OP, dev, &[table.is_on(dev)])?;
    if ids.is_empty() {
        return dev.uninit::<f32>(0, table.cols());
    }
    let ids_dev = dev.upload(ids, ids.len(), 1)?;
    embedding_from_device(dev, table, &ids_dev)
}

/// [`embedding`] with the ids (`rows × 1`) already on the device, as a
/// recorded graph reads them: the host cannot check them at launch, so an
/// id outside the table gives a row of zeros.
pub fn embedding_from_device(
    dev: &GpuDevice,
    table: &DeviceMatrix<f16>,
    ids: &DeviceMatrix<u32>,
) -> Result<DeviceMatrix<f32>> {
    const OP: &str = "embedding_f32";
    on_device(OP, dev, &[table.is_on(dev), ids.is_on(dev)])?;
    let mut out = dev.uninit::<f32>(ids.len(), table.cols())?;
    if ids.is_empty() {
        return Ok(out);
    }
    let d = check_i32(OP, "row length", table.cols())?;
    let rows = check_i32(OP, "rows", ids.len())? as u32;
    let vocab = u32::try_from(table.rows())
        .map_err(|_| KernelError::shape(OP, "the table has too many rows"))?;
    let f = dev.function(Module::ActF32, "embedding_f16_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&table.data)
        .arg(&ids.data)
        .arg(&mut out.data)
        .arg(&d)
        .arg(&vocab);
    let cfg = LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `embedding_f16_f32(const half*, const u32*, float*,
    // int, u32)`; ids holds `rows` entries, out is rows × d, and the kernel
    // reads the table only at ids below `vocab` = table.rows().
    unsafe { b.launch(cfg) }.during("launching embedding_f16_f32")?;
    Ok(out)
}

/// `x` with each row divided (`divide`) or multiplied element-wise by `v`
/// (one value per column); when dividing, `shift` (one value per column)
/// is subtracted first.
pub fn scale_cols(
    dev: &GpuDevice,
    x: &DeviceMatrix<f32>,
    v: &DeviceMatrix<f32>,
    shift: Option<&DeviceMatrix<f32>>,
    divide: bool,
) -> Result<DeviceMatrix<f32>> {
    const OP: &str = "scale_cols_f32";
    vector_len(OP, "factors", v, x.cols())?;
    if let Some(s) = shift {
        vector_len(OP, "shift", s, x.cols())?;
        on_device(OP, dev, &[s.is_on(dev)])?;
    }
    on_device(OP, dev, &[x.is_on(dev), v.is_on(dev)])?;
    let mut out = dev.uninit::<f32>(x.rows(), x.cols())?;
    if x.is_empty() {
        return Ok(out);
    }
    let (rows, cols, div) = (x.rows() as u64, x.cols() as u64, i32::from(divide));
    let has_shift = i32::from(shift.is_some() && divide);
    // Without a shift the kernel never reads its pointer; `v` stands in.
    let shift = shift.unwrap_or(v);
    let cfg = stride_cfg(dev, x.len());
    let f = dev.function(Module::ActF32, OP)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&x.data)
        .arg(&v.data)
        .arg(&shift.data)
        .arg(&mut out.data)
        .arg(&rows)
        .arg(&cols)
        .arg(&div)
        .arg(&has_shift);
    // SAFETY: matches `scale_cols_f32(const float*, const float*, const
    // float*, float*, u64, u64, int, int)`; x and out hold rows × cols
    // values, v and shift hold cols each (checked above).
    unsafe { b.launch(cfg) }.during("launching scale_cols_f32")?;
    Ok(out)
}

/// The normalized Walsh-Hadamard transform of every `n`-value segment of
/// `x`'s rows (`n` a power of two up to 256 that divides the columns),
/// bit-identical to turbomind's `quant::kv::hadamard`.
pub fn hadamard(dev: &GpuDevice, x: &DeviceMatrix<f32>, n: usize) -> Result<DeviceMatrix<f32>> {
    const OP: &str = "hadamard_f32";
    if !n.is_power_of_two() || n > 256 || !x.cols().is_multiple_of(n) {
        return Err(KernelError::invalid(
            OP,
            format!(
                "segments of {n} (a power of two up to 256) must divide {} columns",
                x.cols()
            ),
        ));
    }
    on_device(OP, dev, &[x.is_on(dev)])?;
    let mut out = dev.uninit::<f32>(x.rows(), x.cols())?;
    if x.is_empty() {
        return Ok(out);
    }
    let segments = check_i32(OP, "segments", x.len() / n)? as u32;
    let ni = n as i32;
    // As the CPU computes it: 1 / sqrt(n) in f32.
    let norm = 1.0f32 / (n as f32).sqrt();
    let cfg = LaunchConfig {
        grid_dim: (segments, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = dev.function(Module::ActF32, OP)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&x.data).arg(&mut out.data).arg(&ni).arg(&norm);
    // SAFETY: matches `hadamard_f32(const float*, float*, int, float)`; x
    // and out hold `segments` × n values (n divides the columns, checked
    // above), and n ≤ 256 fits the kernel's shared segment.
    unsafe { b.launch(cfg) }.during("launching hadamard_f32")?;
    Ok(out)
}

/// A new matrix made of the given rows of `x`.
pub fn gather_rows(
    dev: &GpuDevice,
    x: &DeviceMatrix<f32>,
    rows: &[usize],
) -> Result<DeviceMatrix<f32>> {
    const OP: &str = "gather_rows";
    if let Some(&bad) = rows.iter().find(|&&r| r >= x.rows()) {
        return Err(KernelError::invalid(
            OP,
            format!("row {bad} of a {}-row matrix", x.rows()),
        ));
    }
    on_device(OP, dev, &[x.is_on(dev)])?;
    let mut out = dev.uninit::<f32>(rows.len(), x.cols())?;
    if rows.is_empty() || x.cols() == 0 {
        return Ok(out);
    }
    let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    let idx_dev = dev.upload(&idx, idx.len(), 1)?;
    let cols = check_i32(OP, "cols", x.cols())?;
    let f = dev.function(Module::ActF32, "gather_rows_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&x.data)
        .arg(&idx_dev.data)
        .arg(&mut out.data)
        .arg(&cols);
    let cfg = LaunchConfig {
        grid_dim: (check_i32(OP, "rows", rows.len())? as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `gather_rows_f32(const float*, const int*, float*,
    // int)`; every index is below x.rows() (checked above), out is
    // rows.len() × cols.
    unsafe { b.launch(cfg) }.during("launching gather_rows_f32")?;
    Ok(out)
}
