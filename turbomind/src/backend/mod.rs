//! The backend boundary: the LLM-level ops the one decoder is written
//! against. The CPU backend implements them here; the CUDA backend will
//! implement the same trait, so the model code never changes per device.
//!
//! Activations are a matrix of `rows × cols`, one row per token of the
//! batch. A batch holds several sequences, each a contiguous run of rows
//! described by a [`SeqSpan`]; every op except attention and the KV write is
//! row-wise and ignores the spans.

pub mod cpu;

use std::ops::Range;

use crate::error::Result;
use crate::quant::awq::AwqTensors;
use crate::quant::kv::KvCacheConfig;
use crate::rope::Rope;

/// Which rows of the batch belong to one sequence, and the position of its
/// first row.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    pub rows: Range<usize>,
    pub start_pos: usize,
}

impl SeqSpan {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Head layout for attention and the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_layers: usize,
}

impl AttnShape {
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// A linear layer's weights as they come from a checkpoint.
#[derive(Debug, Clone)]
pub struct HostLinear {
    pub weight: HostWeight,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: Option<Vec<f32>>,
}

/// The stored form of a linear weight.
#[derive(Debug, Clone)]
pub enum HostWeight {
    /// Hugging Face `[out_features, in_features]`, row-major.
    Dense(Vec<f32>),
    /// 4-bit AutoAWQ gemm tensors (see [`crate::quant::awq`]).
    Awq(AwqTensors),
}

/// The ops of a decoder-only transformer on one device.
pub trait Backend: Send + Sync {
    /// A `rows × cols` activation matrix on the device.
    type Act: Send;
    /// A linear layer (dense now; quantized variants live behind the same type).
    type Linear: Send + Sync;
    /// A per-channel vector such as a norm weight.
    type Vector: Send + Sync;
    /// The KV cache of one sequence, all layers.
    type Kv: Send;

    fn name(&self) -> &'static str;

    fn upload_linear(&self, w: HostLinear) -> Result<Self::Linear>;
    fn upload_vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    fn new_kv(&self, shape: &AttnShape, config: &KvCacheConfig) -> Result<Self::Kv>;
    /// Number of positions stored in a KV cache.
    fn kv_len(&self, kv: &Self::Kv) -> usize;

    /// Rows of `table` (a `[vocab, dim]` linear weight) for each id.
    fn embedding(&self, table: &Self::Linear, ids: &[u32]) -> Result<Self::Act>;
    /// `x / rms(x) * w`, row-wise.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32) -> Result<Self::Act>;
    /// Fused residual add and norm: `residual += delta`, then returns
    /// `rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Act,
        delta: &Self::Act,
        w: &Self::Vector,
        eps: f32,
    ) -> Result<Self::Act>;
    /// `residual += delta`.
    fn add_in_place(&self, residual: &mut Self::Act, delta: &Self::Act) -> Result<()>;
    /// `x · Wᵀ + b`.
    fn linear(&self, x: &Self::Act, w: &Self::Linear) -> Result<Self::Act>;
    /// Rotates each head of `x` (rows × heads·head_dim) in place, by the
    /// position of each row.
    fn rope(&self, x: &mut Self::Act, heads: usize, spans: &[SeqSpan], rope: &Rope) -> Result<()>;
    /// Stores the new K and V rows of each sequence at their positions.
    fn write_kv(
        &self,
        layer: usize,
        k: &Self::Act,
        v: &Self::Act,
        kvs: &mut [&mut Self::Kv],
        spans: &[SeqSpan],
    ) -> Result<()>;
    /// Causal attention of each sequence's query rows over its cache.
    fn attention(
        &self,
        layer: usize,
        q: &Self::Act,
        kvs: &[&mut Self::Kv],
        spans: &[SeqSpan],
        shape: &AttnShape,
    ) -> Result<Self::Act>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act>;
    /// A new matrix made of the given rows.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act>;
    /// Copies a matrix to the host, row-major.
    fn to_host(&self, x: &Self::Act) -> Result<Vec<f32>>;
}
