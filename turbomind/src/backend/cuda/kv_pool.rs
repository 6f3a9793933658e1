//! The CUDA backend's KV block pool: the device pool of `lmq_kernels`, the
//! padding block a recorded step's extra rows write to, the static
//! quantization table and the `smooth` mode's per-layer factors, checked
//! against the model's shape when the pool is made.

use std::sync::atomic::{AtomicU64, Ordering};

use lmq_kernels::{DeviceKvPool, DeviceMatrix, KernelError, KvLayout, KvStorage};

use super::{gpu_error, CudaBackend};
use crate::backend::KvPoolSpec;
use crate::error::{Error, Result};
use crate::quant::kv::{KvDtype, KvMode};

/// Identifies pools, so that a recorded step is replayed only on the pool
/// it was recorded on.
static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// The KV block pool of the CUDA backend.
pub struct CudaKvPool {
    pub(super) id: u64,
    pub(super) pool: DeviceKvPool,
    /// A block past those the engine hands out, for the KV writes of a
    /// recorded step's padding rows (see `graph.rs`).
    pub(super) pad_block: u32,
    /// The `smooth` mode's factors, per layer.
    pub(super) smooth: Option<Vec<LayerSmoothing>>,
}

/// One layer's `smooth` factors on the device: the keys' (`kv_dim`) and the
/// same expanded to the query heads that share each KV head (`q_dim`).
pub(super) struct LayerSmoothing {
    pub(super) keys: DeviceMatrix<f32>,
    pub(super) queries: DeviceMatrix<f32>,
    /// The keys' offsets, subtracted before the division, where the
    /// checkpoint has them.
    pub(super) key_shift: Option<DeviceMatrix<f32>>,
}

impl CudaKvPool {
    /// Device bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.pool.bytes()
    }
}

impl CudaBackend {
    /// The `smooth` mode's per-layer factors for `spec`, uploaded.
    fn smoothing(&self, spec: &KvPoolSpec) -> Result<Vec<LayerSmoothing>> {
        let shape = &spec.shape;
        let hd = shape.head_dim;
        if !hd.is_power_of_two() || hd > 256 {
            return Err(Error::InvalidRequest(format!(
                "--kv-cache-mode smooth needs a power-of-two head_dim up to 256; this model has {hd}"
            )));
        }
        let p = spec.config.static_params.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "--kv-cache-mode smooth needs calibrated parameters; this checkpoint has none (quantize with --kv)".into(),
            )
        })?;
        let kv_dim = shape.num_kv_heads * hd;
        let shift_fits = |l: usize| {
            p.k_shift
                .get(l)
                .is_none_or(|v| v.is_empty() || v.len() == kv_dim)
        };
        if p.k_smooth.len() < shape.num_layers
            || p.k_smooth.iter().any(|v| v.len() != kv_dim)
            || !(0..shape.num_layers).all(shift_fits)
        {
            return Err(Error::InvalidRequest(
                "the checkpoint's k_smooth/k_shift tensors do not match the model's layers and KV width"
                    .into(),
            ));
        }
        let group = shape.num_heads / shape.num_kv_heads.max(1);
        (0..shape.num_layers)
            .map(|layer| {
                let keys = &p.k_smooth[layer];
                let queries: Vec<f32> = (0..shape.num_heads * hd)
                    .map(|i| keys[(i / hd / group) * hd + i % hd])
                    .collect();
                let key_shift = match p.k_shift.get(layer).filter(|v| !v.is_empty()) {
                    Some(shift) => Some(self.dev.upload(shift, kv_dim, 1).map_err(gpu_error)?),
                    None => None,
                };
                Ok(LayerSmoothing {
                    key_shift,
                    keys: self.dev.upload(keys, kv_dim, 1).map_err(gpu_error)?,
                    queries: self
                        .dev
                        .upload(&queries, queries.len(), 1)
                        .map_err(gpu_error)?,
                })
            })
            .collect()
    }

    /// A pool for `spec` (`Backend::new_kv_pool`).
    pub(super) fn make_kv_pool(&self, spec: &KvPoolSpec) -> Result<CudaKvPool> {
        let storage = match spec.config.dtype {
            KvDtype::F32 => KvStorage::F32,
            KvDtype::F16 => KvStorage::F16,
            KvDtype::Int8 => KvStorage::Int8,
            KvDtype::Int4 => KvStorage::Int4,
        };
        let smooth = if spec.config.mode == KvMode::Smooth && storage.is_integer() {
            Some(self.smoothing(spec)?)
        } else {
            None
        };
        let statics = static_table(spec)?;
        let layout = KvLayout {
            num_layers: spec.shape.num_layers,
            num_kv_heads: spec.shape.num_kv_heads,
            head_dim: spec.shape.head_dim,
            block_len: spec.block_len,
            // One block more than asked: the padding rows' block.
            num_blocks: spec.num_blocks.checked_add(1).ok_or_else(|| {
                Error::InvalidRequest(format!("{} KV blocks are too many", spec.num_blocks))
            })?,
            storage,
        };
        let pool =
            DeviceKvPool::new(&self.dev, layout, statics.as_deref()).map_err(|e| match e {
                KernelError::Invalid { .. } => Error::InvalidRequest(e.to_string()),
                other => gpu_error(other),
            })?;
        let pad_block = u32::try_from(spec.num_blocks).map_err(|_| {
            Error::InvalidRequest(format!("{} KV blocks are too many", spec.num_blocks))
        })?;
        Ok(CudaKvPool {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            pool,
            pad_block,
            smooth,
        })
    }
}

/// The static (scale, zero) table `[layer][K, V][head][2]` for the pool,
/// scales in units of the running dtype's levels.
fn static_table(spec: &KvPoolSpec) -> Result<Option<Vec<f32>>> {
    let config = &spec.config;
    let Some(levels) = config.dtype.levels() else {
        return Ok(None);
    };
    if config.mode != KvMode::Static {
        return Ok(None);
    }
    let p = config.static_params.as_ref().ok_or_else(|| {
        Error::InvalidRequest(
            "static KV quantization needs calibrated parameters; this checkpoint has none (quantize with --kv)".into(),
        )
    })?;
    let shape = &spec.shape;
    if p.k_scale.len() < shape.num_layers
        || [&p.k_scale, &p.k_zero, &p.v_scale, &p.v_zero]
            .iter()
            .any(|t| t.len() < shape.num_layers || t.iter().any(|h| h.len() != shape.num_kv_heads))
    {
        return Err(Error::InvalidRequest(
            "static KV parameters do not match the model's layers and KV heads".into(),
        ));
    }
    let rescale = p.levels / levels;
    let mut out = Vec::with_capacity(shape.num_layers * 2 * shape.num_kv_heads * 2);
    for layer in 0..shape.num_layers {
        for (scale, zero) in [(&p.k_scale, &p.k_zero), (&p.v_scale, &p.v_zero)] {
            for h in 0..shape.num_kv_heads {
                out.push(scale[layer][h] * rescale);
                out.push(zero[layer][h]);
            }
        }
    }
    Ok(Some(out))
}
