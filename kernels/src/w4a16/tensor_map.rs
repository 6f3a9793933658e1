//! The TMA tensor maps of the warp-specialized wgmma GEMM
//! (`cu/w4_gemm_ws.cu`): the activations' (encoded per call, since x moves)
//! and the codes' (`PackedW4`'s layout), both encoded on the host by
//! `cuTensorMapEncodeTiled` and passed by value as `__grid_constant__`
//! kernel parameters.
//!
//! Invariant: a map is only encoded over a 16-byte aligned device
//! allocation that spans every element it describes (the callers check
//! the shapes), so TMA never reads outside it; elements past the sizes
//! read as zeros.

use crate::error::{KernelError, Result};

use super::gemm_sm90::{BLOCK_CHANNELS, WS_BOX};

/// Whether the driver can encode tensor maps (`cuTensorMapEncodeTiled`,
/// CUDA 12 on): probed once by encoding a map of a made-up address, which
/// the driver records without reading.
pub(super) fn tensor_maps_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| x_tensor_map(1 << 20, 1, 128, WS_BOX).is_ok())
}

/// A `CUtensorMap` as a kernel parameter (the kernels take it by value,
/// `__grid_constant__`, and TMA reads it from parameter space).
#[repr(transparent)]
pub(super) struct TensorMapParam(cudarc::driver::sys::CUtensorMap);

// SAFETY: a plain 128-byte, 128-byte aligned struct of integers with no
// pointers into host memory; the driver copies its bytes into the kernel's
// parameter space, which is what a DeviceRepr promises.
unsafe impl cudarc::driver::DeviceRepr for TensorMapParam {}

impl TensorMapParam {
    /// All zeros: the buffer the driver encodes into, and the argument of
    /// an entry point that never reads its map.
    pub(super) fn zeroed() -> TensorMapParam {
        TensorMapParam(cudarc::driver::sys::CUtensorMap { opaque: [0; 16] })
    }
}

/// The layout of one tensor map: element type, sizes (innermost first),
/// byte strides of the outer dimensions, the box TMA copies, and its
/// shared-memory swizzle.
struct TensorMapSpec<'a> {
    what: &'a str,
    data_type: cudarc::driver::sys::CUtensorMapDataType,
    dims: &'a [u64],
    strides: &'a [u64],
    box_dims: &'a [u32],
    swizzle: cudarc::driver::sys::CUtensorMapSwizzle,
}

/// `spec` encoded over the device address `ptr` (16-byte aligned, and a
/// device allocation that spans the layout: the callers check both),
/// every element stride 1, no interleave, L2 promotion to 256 bytes, and
/// elements past the sizes read as zeros.
fn encode_tensor_map(ptr: u64, spec: &TensorMapSpec) -> Result<TensorMapParam> {
    use cudarc::driver::sys::{
        cuTensorMapEncodeTiled, CUresult, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
        CUtensorMapL2promotion,
    };
    let rank = spec.dims.len();
    if !(1..=5).contains(&rank)
        || spec.strides.len() + 1 != rank
        || spec.box_dims.len() != rank
        || !ptr.is_multiple_of(16)
    {
        return Err(KernelError::invalid(
            "W4 wgmma GEMM",
            format!(
                "the tensor map of {} is malformed: rank {rank}, {} strides, a box of {}, \
                 start {ptr:#x}",
                spec.what,
                spec.strides.len(),
                spec.box_dims.len()
            ),
        ));
    }
    let mut map = TensorMapParam::zeroed();
    let element_strides = [1u32; 5];
    // A driver without the function (before CUDA 12) makes cudarc's
    // loader panic; that becomes an error (and `tensor_maps_available`
    // keeps the launch from getting here).
    // SAFETY: `map` is a writable CUtensorMap; dims, box and element
    // strides hold at least `rank` entries and strides rank − 1 (checked
    // above), all alive for the call; `ptr` is a device address that the
    // driver only records (it is dereferenced by the launch that uses the
    // map, while the buffer is borrowed by it).
    let rc = crate::device::no_panic("cuTensorMapEncodeTiled", || unsafe {
        cuTensorMapEncodeTiled(
            &mut map.0,
            spec.data_type,
            rank as u32,
            ptr as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.box_dims.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            spec.swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    })?;
    if rc != CUresult::CUDA_SUCCESS {
        return Err(KernelError::invalid(
            "W4 wgmma GEMM",
            format!("encoding the tensor map of {} failed: {rc:?}", spec.what),
        ));
    }
    Ok(map)
}

/// The tensor map of the codes at device address `ptr` (`PackedW4`'s
/// layout: `n / 8` tiles of 8 channels, each `kbs` blocks of 512 bytes,
/// one per 128 inputs) as u32 words `[tile][k-block][128]`, in boxes of
/// 16 tiles × one k-block: one 128-channel block's codes for one stage,
/// landing as the 16 tiles' blocks side by side, as the bulk copies place
/// them.
pub(super) fn codes_tensor_map(ptr: u64, kbs: usize, n: usize) -> Result<TensorMapParam> {
    use cudarc::driver::sys::{CUtensorMapDataType, CUtensorMapSwizzle};
    if !n.is_multiple_of(BLOCK_CHANNELS) || kbs == 0 {
        return Err(KernelError::invalid(
            "W4 wgmma GEMM",
            format!(
                "the codes' tensor map needs outputs a multiple of {BLOCK_CHANNELS} and at \
                 least one k-block; got {n} outputs, {kbs} k-blocks"
            ),
        ));
    }
    let what = format!("the codes ({n} outputs, {kbs} k-blocks)");
    encode_tensor_map(
        ptr,
        &TensorMapSpec {
            what: &what,
            data_type: CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
            dims: &[128, kbs as u64, (n / 8) as u64],
            strides: &[512, 512 * kbs as u64],
            box_dims: &[128, 1, 16],
            swizzle: CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
        },
    )
}

/// The tensor map of x `[m][k]` fp16 at device address `ptr` for the
/// warp-specialized kernels: boxes of `box_dims` (inputs, tokens) with the
/// 128-byte swizzle, rows past `m` read as zeros.
pub(super) fn x_tensor_map(
    ptr: u64,
    m: usize,
    k: usize,
    box_dims: [u32; 2],
) -> Result<TensorMapParam> {
    use cudarc::driver::sys::{CUtensorMapDataType, CUtensorMapSwizzle};
    // TMA needs a 16-byte aligned start and row pitch (K is a multiple of
    // 128, checked by the caller; device allocations are 256-byte aligned).
    if !ptr.is_multiple_of(16) || !(2 * k).is_multiple_of(16) {
        return Err(KernelError::invalid(
            "W4 wgmma GEMM",
            "x must start 16-byte aligned, with rows a multiple of 16 bytes",
        ));
    }
    let what = format!("x ({m}×{k} fp16)");
    encode_tensor_map(
        ptr,
        &TensorMapSpec {
            what: &what,
            data_type: CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            dims: &[k as u64, m as u64],
            strides: &[2 * k as u64],
            box_dims: &box_dims,
            swizzle: CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        },
    )
}
