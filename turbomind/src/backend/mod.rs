//! The backend boundary: the LLM-level ops the one decoder is written
//! against. The CPU backend (`cpu`) and the CUDA backend (`cuda`) implement
//! the same trait, so the model code never changes per device.
//!
//! Activations are a matrix of `rows × cols`, one row per token of the
//! batch. A batch holds several sequences, each a contiguous run of rows
//! described by a [`SeqSpan`]; every op except attention and the KV write is
//! row-wise and ignores the spans.
//!
//! The KV cache is a pool of fixed-size blocks ([`KvPoolSpec`]) shared by
//! every sequence; a sequence's span carries its block table, and position
//! `p` lives in block `blocks[p / block_len]` at offset `p % block_len`.

pub mod cpu;
pub mod cuda;

use std::ops::Range;

use crate::error::{Error, Result};
use crate::quant::awq::AwqTensors;
use crate::quant::kv::{bytes_per_token_head, KvCacheConfig};
use crate::rope::Rope;
use crate::sampling::SamplingParams;

/// Which rows of the batch belong to one sequence, the position of its
/// first row, and the KV blocks that hold its positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpan {
    pub rows: Range<usize>,
    pub start_pos: usize,
    /// Block table: enough blocks for `start_pos + rows.len()` positions.
    pub blocks: Vec<u32>,
}

impl SeqSpan {
    /// Spans for sequences of the given lengths, all starting at position
    /// 0, in consecutive rows and over consecutive blocks of a pool; also
    /// returns how many blocks they use.
    pub fn packed(lens: &[usize], block_len: usize) -> (Vec<SeqSpan>, usize) {
        let mut spans = Vec::with_capacity(lens.len());
        let (mut row, mut block) = (0usize, 0u32);
        for &len in lens {
            let n = len.div_ceil(block_len) as u32;
            spans.push(SeqSpan {
                rows: row..row + len,
                start_pos: 0,
                blocks: (block..block + n).collect(),
            });
            row += len;
            block += n;
        }
        (spans, block as usize)
    }

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

/// The layout of a KV block pool: `num_blocks` blocks, each holding every
/// layer's K and V for `block_len` consecutive positions of one sequence.
#[derive(Debug, Clone)]
pub struct KvPoolSpec {
    pub shape: AttnShape,
    pub config: KvCacheConfig,
    pub num_blocks: usize,
    pub block_len: usize,
}

impl KvPoolSpec {
    /// Bytes of KV data one block takes, the same on every backend (the
    /// engine sizes pools with it).
    pub fn bytes_per_block(shape: &AttnShape, config: &KvCacheConfig, block_len: usize) -> usize {
        shape.num_layers
            * 2
            * shape.num_kv_heads
            * block_len
            * bytes_per_token_head(shape.head_dim, config)
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

impl HostLinear {
    /// One linear whose outputs are `parts`' outputs side by side (q | k |
    /// v, or gate | up), so that a layer runs one product where it ran
    /// several on the same input, as TurboMind fuses them. `None` where the
    /// parts cannot share one weight: different inputs, dense beside 4-bit,
    /// or different group sizes. A part without a bias gets zeros where
    /// another has one.
    pub fn stack_outputs(parts: &[&HostLinear]) -> Option<HostLinear> {
        let first = parts.first()?;
        let in_features = first.in_features;
        if parts.iter().any(|p| p.in_features != in_features) {
            return None;
        }
        let out_features = parts.iter().map(|p| p.out_features).sum();
        let weight = match &first.weight {
            HostWeight::Dense(_) => {
                let mut w = Vec::with_capacity(out_features * in_features);
                for p in parts {
                    let HostWeight::Dense(d) = &p.weight else {
                        return None;
                    };
                    w.extend_from_slice(d);
                }
                HostWeight::Dense(w)
            }
            HostWeight::Awq(a) => {
                let g = a.group_size;
                let mut awq = Vec::with_capacity(parts.len());
                for p in parts {
                    match &p.weight {
                        HostWeight::Awq(t) if t.group_size == g => awq.push(t),
                        _ => return None,
                    }
                }
                HostWeight::Awq(crate::quant::awq::AwqTensors::stack_outputs(&awq))
            }
        };
        let bias = parts.iter().any(|p| p.bias.is_some()).then(|| {
            parts
                .iter()
                .flat_map(|p| match &p.bias {
                    Some(b) => b.clone(),
                    None => vec![0.0; p.out_features],
                })
                .collect()
        });
        Some(HostLinear {
            weight,
            out_features,
            in_features,
            bias,
        })
    }
}

/// The stored form of a linear weight.
#[derive(Debug, Clone)]
pub enum HostWeight {
    /// Hugging Face `[out_features, in_features]`, row-major.
    Dense(Vec<f32>),
    /// 4-bit AutoAWQ gemm tensors (see [`crate::quant::awq`]).
    Awq(AwqTensors),
}

/// One row's token choice for [`Backend::sample`]: its parameters, the
/// uniform number of its draw ([`crate::sampling::Sampler::next_uniform`])
/// and its tokens so far (the generated ones from `prompt_len`), for the
/// penalties.
#[derive(Debug, Clone, Copy)]
pub struct SampleRow<'a> {
    pub params: &'a SamplingParams,
    pub uniform: f32,
    pub history: &'a [u32],
    pub prompt_len: usize,
    /// `token_counts(history, prompt_len)` where the caller keeps them
    /// ([`crate::sampling::PenaltyCounts`]); `None`: counted from
    /// `history`.
    pub counts: Option<&'a [(u32, u32)]>,
}

/// What a step hands back for its logits: each row's token where the
/// backend sampled on the device, and the logits on the host (row-major)
/// when they are needed: no device sampling, or a row the device left to
/// the host (`None`). Where sampling ran, the host logits are penalized.
#[derive(Debug, Default)]
pub struct StepOutput {
    pub tokens: Option<Vec<Option<u32>>>,
    pub logits: Vec<f32>,
}

/// Whether steps should pick tokens on `b`'s device: it can, and the
/// environment does not say `LMQ_DEVICE_SAMPLING=0` (the host sampler
/// then does all of it, for comparison).
pub fn use_device_sampling<B: Backend>(b: &B) -> bool {
    b.samples_on_device() && std::env::var("LMQ_DEVICE_SAMPLING").map_or(true, |v| v != "0")
}

/// The logits of a step made into its [`StepOutput`]: sampled on the
/// device when `sampling` is given and the backend can, downloaded where
/// a row still needs the host.
pub fn finish_logits<B: Backend>(
    b: &B,
    logits: &mut B::Act,
    sampling: Option<&[SampleRow<'_>]>,
) -> Result<StepOutput> {
    let sampling = sampling.filter(|_| b.samples_on_device());
    finish_step(
        logits,
        sampling,
        |l: &mut B::Act, rows| b.sample(l, rows),
        |l| b.to_host(l),
    )
}

/// The shape of every step's output: `sample` picks the rows' tokens on
/// the device where `sampling` is given, and `download` fetches the logits
/// only where some row (or all, without sampling) needs the host.
pub fn finish_step<L>(
    logits: &mut L,
    sampling: Option<&[SampleRow<'_>]>,
    sample: impl FnOnce(&mut L, &[SampleRow<'_>]) -> Result<Vec<Option<u32>>>,
    download: impl FnOnce(&L) -> Result<Vec<f32>>,
) -> Result<StepOutput> {
    let Some(rows) = sampling else {
        return Ok(StepOutput {
            tokens: None,
            logits: download(logits)?,
        });
    };
    let tokens = sample(logits, rows)?;
    let logits = if tokens.iter().any(Option::is_none) {
        download(logits)?
    } else {
        Vec::new()
    };
    Ok(StepOutput {
        tokens: Some(tokens),
        logits,
    })
}

/// [`Backend::split_qkv_rope_write_kv`] as two ops:
/// [`Backend::split_qkv_rope`], then [`Backend::write_kv`].
#[allow(clippy::too_many_arguments)]
pub fn split_qkv_rope_write_kv_apart<B: Backend>(
    b: &B,
    layer: usize,
    qkv: &B::Act,
    widths: &[usize],
    pool: &mut B::KvPool,
    shape: &AttnShape,
    spans: &[SeqSpan],
    rope: &Rope,
) -> Result<B::Act> {
    let parts = b.split_qkv_rope(qkv, widths, shape, spans, rope)?;
    let [q, k, v]: [B::Act; 3] = parts
        .try_into()
        .map_err(|_| Error::InvalidRequest("q/k/v must be three linears".into()))?;
    b.write_kv(layer, &k, &v, pool, spans)?;
    Ok(q)
}

/// [`Backend::split_qkv_rope`] as three ops: the split, then the rotary
/// embedding of q and of k.
pub fn split_qkv_rope_apart<B: Backend>(
    b: &B,
    qkv: &B::Act,
    widths: &[usize],
    shape: &AttnShape,
    spans: &[SeqSpan],
    rope: &Rope,
) -> Result<Vec<B::Act>> {
    let mut parts = b.split_cols(qkv, widths)?;
    if let [q, k, _] = parts.as_mut_slice() {
        b.rope(q, shape.num_heads, spans, rope)?;
        b.rope(k, shape.num_kv_heads, spans, rope)?;
        Ok(parts)
    } else {
        Err(Error::InvalidRequest(format!(
            "q/k/v must be three parts, not {}",
            parts.len()
        )))
    }
}

/// The ops of a decoder-only transformer on one device.
pub trait Backend: Send + Sync {
    /// A `rows × cols` activation matrix on the device.
    type Act: Send;
    /// A linear layer (dense now; quantized variants live behind the same type).
    type Linear: Send + Sync;
    /// A per-channel vector such as a norm weight.
    type Vector: Send + Sync;
    /// A pool of KV blocks (see [`KvPoolSpec`]).
    type KvPool: Send + Sync;

    fn name(&self) -> &'static str;

    fn upload_linear(&self, w: HostLinear) -> Result<Self::Linear>;
    /// Bytes a product with this linear reads: its weight as stored on the
    /// device (for roofline figures).
    fn linear_bytes(&self, w: &Self::Linear) -> usize;
    fn upload_vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    fn new_kv_pool(&self, spec: &KvPoolSpec) -> Result<Self::KvPool>;
    /// Memory free for a KV pool on this device, in bytes, if known.
    fn free_memory(&self) -> Option<u64>;

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
    /// `residual += x · Wᵀ + b`, then returns `rms_norm(residual) · norm`:
    /// the linear before a norm (o_proj, down_proj) and the norm. The
    /// result may be consumable only by [`Self::linear`] and
    /// [`Self::gate_up_silu`] (the CUDA backend defers the norm into the
    /// linears that read it); the default is the two ops.
    fn linear_add_rms_norm(
        &self,
        x: &Self::Act,
        w: &Self::Linear,
        residual: &mut Self::Act,
        norm: &Self::Vector,
        eps: f32,
    ) -> Result<Self::Act> {
        let delta = self.linear(x, w)?;
        self.add_rms_norm(residual, &delta, norm, eps)
    }
    /// `residual += delta`.
    fn add_in_place(&self, residual: &mut Self::Act, delta: &Self::Act) -> Result<()>;
    /// `x · Wᵀ + b`.
    fn linear(&self, x: &Self::Act, w: &Self::Linear) -> Result<Self::Act>;
    /// Rotates each head of `x` (rows × heads·head_dim) in place, by the
    /// position of each row.
    fn rope(&self, x: &mut Self::Act, heads: usize, spans: &[SeqSpan], rope: &Rope) -> Result<()>;
    /// Stores the new K and V rows of each sequence at their positions,
    /// in the blocks of its table (quantizing on write).
    fn write_kv(
        &self,
        layer: usize,
        k: &Self::Act,
        v: &Self::Act,
        pool: &mut Self::KvPool,
        spans: &[SeqSpan],
    ) -> Result<()>;
    /// Causal attention of each sequence's query rows over positions
    /// `0..=row position` of its blocks (dequantizing on read).
    fn attention(
        &self,
        layer: usize,
        q: &Self::Act,
        pool: &Self::KvPool,
        spans: &[SeqSpan],
        shape: &AttnShape,
    ) -> Result<Self::Act>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act>;
    /// Whether layers should stack q/k/v and gate/up into one linear each
    /// on this backend (see [`crate::layer::DecoderLayer`]): where launches
    /// dominate a decode step (a GPU) it pays; on the CPU it has measured
    /// slower prefill (docs/BENCHMARKS.md).
    fn prefers_stacked_linears(&self) -> bool {
        true
    }
    /// `silu(gate) · up` where each row of `gate_up` is `[gate | up]` (a
    /// fused gate/up projection's output).
    fn silu_mul_halves(&self, gate_up: &Self::Act) -> Result<Self::Act>;
    /// Uploads a stacked gate/up projection (`[gate | up]` outputs) for
    /// [`Backend::gate_up_silu`], which is the only op that reads it. A
    /// backend may store it in another output order; the default is
    /// [`Backend::upload_linear`].
    fn upload_gate_up(&self, w: HostLinear) -> Result<Self::Linear> {
        self.upload_linear(w)
    }
    /// `silu(gate) · up` of the stacked gate/up projection `w` (uploaded by
    /// [`Backend::upload_gate_up`]) applied to `x`. A backend may fuse it
    /// into one launch (the values must be the same); the default runs
    /// [`Backend::linear`] and [`Backend::silu_mul_halves`].
    fn gate_up_silu(&self, x: &Self::Act, w: &Self::Linear) -> Result<Self::Act> {
        self.silu_mul_halves(&self.linear(x, w)?)
    }
    /// The columns of `x` split into matrices of `widths` columns, left to
    /// right (two or three; the widths add up to `x`'s columns).
    fn split_cols(&self, x: &Self::Act, widths: &[usize]) -> Result<Vec<Self::Act>>;
    /// A stacked q/k/v projection's output split into its parts (`widths`:
    /// q, k, v) with the rotary embedding applied to q (`shape.num_heads`
    /// heads) and k (`shape.num_kv_heads`). A backend may fuse the three
    /// steps; the default runs [`Backend::split_cols`] and
    /// [`Backend::rope`] twice.
    fn split_qkv_rope(
        &self,
        qkv: &Self::Act,
        widths: &[usize],
        shape: &AttnShape,
        spans: &[SeqSpan],
        rope: &Rope,
    ) -> Result<Vec<Self::Act>>
    where
        Self: Sized,
    {
        split_qkv_rope_apart(self, qkv, widths, shape, spans, rope)
    }
    /// The stacked q/k/v projection's output taken apart as
    /// [`Backend::split_qkv_rope`] does, with k and v then stored as
    /// [`Backend::write_kv`] does; returns q. A backend may fuse it all
    /// into one launch (the pool's bytes must be the same); the default
    /// runs the two ops.
    #[allow(clippy::too_many_arguments)]
    fn split_qkv_rope_write_kv(
        &self,
        layer: usize,
        qkv: &Self::Act,
        widths: &[usize],
        pool: &mut Self::KvPool,
        shape: &AttnShape,
        spans: &[SeqSpan],
        rope: &Rope,
    ) -> Result<Self::Act>
    where
        Self: Sized,
    {
        split_qkv_rope_write_kv_apart(self, layer, qkv, widths, pool, shape, spans, rope)
    }
    /// A new matrix made of the given rows.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act>;
    /// Copies a matrix to the host, row-major.
    fn to_host(&self, x: &Self::Act) -> Result<Vec<f32>>;

    /// Whether [`Backend::sample`] picks tokens on the device.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Applies each row's penalties to `logits` in place and picks its
    /// token on the device: `Some(token)`, or `None` where the host must
    /// sample the row from the penalized logits. Backends without device
    /// sampling ([`Backend::samples_on_device`] false) refuse.
    fn sample(&self, logits: &mut Self::Act, rows: &[SampleRow<'_>]) -> Result<Vec<Option<u32>>> {
        let _ = (logits, rows);
        Err(Error::InvalidRequest(format!(
            "the {} backend samples on the host",
            self.name()
        )))
    }

    /// Runs one decode step, a batch of one new token per sequence:
    /// `body` computes, with this backend's ops, the logits of every row
    /// (`ids.len() × vocab`) from `ids` and `spans`, writing the new
    /// tokens' K and V into `pool`; this returns them as
    /// [`finish_logits`] does (sampled on the device when `sampling` is
    /// given and the backend can). A backend may record `body` once per
    /// step shape and replay the recording for later steps of that shape
    /// with their own `ids` and `spans` (the CUDA backend's graphs), so
    /// `body` must use no inputs other than those; the default runs it
    /// every time.
    fn decode_step(
        &self,
        ids: &[u32],
        spans: &[SeqSpan],
        pool: &mut Self::KvPool,
        body: &mut dyn FnMut(&mut Self::KvPool) -> Result<Self::Act>,
        sampling: Option<&[SampleRow<'_>]>,
    ) -> Result<StepOutput>
    where
        Self: Sized,
    {
        let _ = (ids, spans);
        let mut logits = body(pool)?;
        finish_logits(self, &mut logits, sampling)
    }
}
