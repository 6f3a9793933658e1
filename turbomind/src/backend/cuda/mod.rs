//! The CUDA backend: the same ops as the CPU backend, on one GPU, through
//! the kernels of `lmq-kernels` (compiled at run time by NVRTC, loaded
//! dynamically, so a binary without CUDA still builds and runs; opening the
//! backend on such a machine is a clear "no CUDA driver/GPU found" error).
//!
//! Numerics follow the CPU backend: activations, the residual stream, norms,
//! rotary embedding and attention are fp32; linears round their input to
//! fp16 and accumulate in fp32 (W4A16 kernel or cuBLAS). The KV pool has the
//! CPU's block layout and quantization rules (online per-token parameters,
//! or the checkpoint's static ones). The `smooth` mode runs as the CPU runs
//! it: keys are divided by their calibrated per-channel factors and value
//! heads Walsh-Hadamard rotated before an online write, and attention
//! multiplies the queries by the factors and rotates its output back.
//!
//! The norms and SiLU·mul also write the fp16 copy of their output that the
//! next linear reads ([`CudaAct`]), and a stacked q/k/v output is split and
//! rotated in one launch ([`Backend::split_qkv_rope`]): a decode step
//! spends its launches on work, not on conversions.
//!
//! Row metadata (positions and block tables) is uploaded once per step:
//! the backend keeps the last upload and reuses it while the spans it is
//! given are the same, which they are for every layer of a step.

mod activation;
mod attention;
mod fused_kv;
mod graph;
mod kv_pool;
mod l2_ahead;
mod linear;
mod order;
mod profile;
mod sample;
mod vector;

use std::sync::{Arc, Mutex, MutexGuard};

use lmq_kernels::{act, paged, Blas, DeviceMatrix, GpuDevice, KernelError, RowMeta, RowPlace};

use half::f16;

use super::{
    finish_logits, split_qkv_rope_apart, AttnShape, Backend, HostLinear, KvPoolSpec, SampleRow,
    SeqSpan, StepOutput,
};
use crate::error::{Error, Result};
use crate::rope::Rope;

pub use activation::CudaAct;
pub use kv_pool::CudaKvPool;
pub use linear::CudaLinear;
pub use vector::CudaVector;

/// An on/off switch from the environment: `0`, `off`, `false` or `no`
/// turn it off, `1`, `on`, `true` or `yes` on; unset (or anything else)
/// leaves `default`.
fn env_switch(name: &str, default: bool) -> bool {
    env_choice(name).unwrap_or(default)
}

/// [`env_switch`] without a default: `None` where the variable is unset
/// or neither on nor off (for switches whose default depends on more).
fn env_choice(name: &str) -> Option<bool> {
    match std::env::var(name).as_deref() {
        Ok("0" | "off" | "false" | "no") => Some(false),
        Ok("1" | "on" | "true" | "yes") => Some(true),
        _ => None,
    }
}

/// Whether the norms between 4-bit decode linears are deferred into them
/// ([`CudaBackend::set_deferred_norm`]): on unless `LMQ_DEFERRED_NORM=0`.
/// On an H200 (session 13, docs/BENCHMARKS.md) Llama-2-7B-shaped batch-1
/// decode went from 373.2–373.9 to 380.5–382.7 tok/s, and greedy text of
/// the SmolLM2-shaped 4-bit model was unchanged.
fn deferred_norm_from_env() -> bool {
    env_switch("LMQ_DEFERRED_NORM", true)
}

/// A count from the environment; unset, unparsable or 0: `None`.
fn env_count(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// Whether a stacked q/k/v output of `widths` is q, k and v in whole heads
/// of `hd` (q `num_heads` of them, k `num_kv_heads`): the shape the fused
/// split/rope launches take.
fn qkv_in_whole_heads(widths: &[usize], shape: &AttnShape, hd: usize) -> bool {
    widths.len() == 3
        && hd > 0
        && widths[0] == shape.num_heads * hd
        && widths[1] == shape.num_kv_heads * hd
        && widths[2].is_multiple_of(hd)
}

/// Turns a kernel error into the engine's error type.
pub(crate) fn gpu_error(e: KernelError) -> Error {
    Error::Backend {
        backend: "cuda",
        message: e.to_string(),
    }
}

/// The last row metadata uploaded, with the spans it was made from.
struct MetaCache {
    spans: Vec<SeqSpan>,
    meta: Arc<RowMeta>,
}

/// Rotary rates as last uploaded: the host copy (the cache key) and the
/// device copy.
type InvFreqCache = Option<(Vec<f32>, Arc<DeviceMatrix<f32>>)>;

/// What the ops read instead of uploading while a step is recorded.
struct Recording {
    inputs: graph::StepInputs,
    /// Rows of the embedding table the step looked up.
    vocab: Option<usize>,
}

/// The CUDA implementation of [`Backend`] on one GPU.
pub struct CudaBackend {
    /// Which 4-bit linear each decode product prefetches into L2, when on
    /// (`l2_ahead.rs`).
    l2: Option<Mutex<l2_ahead::L2Ahead>>,
    dev: GpuDevice,
    blas: Blas,
    meta: Mutex<Option<MetaCache>>,
    /// Rotary rates uploaded per head_dim (one model: one entry).
    inv_freq: Mutex<InvFreqCache>,
    graphs: Mutex<graph::StepGraphs>,
    recording: Mutex<Option<Recording>>,
    profile: Mutex<Option<profile::StepProfile>>,
    /// Whether 4-bit gate/up projections uploaded from now on store
    /// `silu(gate) · up` from their decode kernel (on unless
    /// `LMQ_FUSED_SILU=0`).
    fused_silu: std::sync::atomic::AtomicBool,
    /// Whether decode steps defer each norm between two 4-bit linears into
    /// them (`linear_add_rms_norm`; on unless `LMQ_DEFERRED_NORM=0`).
    deferred_norm: std::sync::atomic::AtomicBool,
}

/// Locks `m`; a poisoned lock only means a panic elsewhere, and every
/// value guarded here is whole between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CudaBackend {
    /// Opens GPU `ordinal`, loads cuBLAS and compiles the kernels (so that
    /// a broken toolkit fails here, not mid-request).
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = GpuDevice::new(ordinal).map_err(gpu_error)?;
        dev.compile_all().map_err(gpu_error)?;
        let blas = Blas::new(&dev).map_err(gpu_error)?;
        let l2 = l2_ahead::l2_prefetch_bytes(dev.compute_capability().0, dev.l2_bytes())?
            .map(|bytes| Mutex::new(l2_ahead::L2Ahead::new(bytes)));
        Ok(CudaBackend {
            l2,
            profile: Mutex::new(profile::StepProfile::from_env(&dev)),
            dev,
            blas,
            meta: Mutex::new(None),
            inv_freq: Mutex::new(None),
            graphs: Mutex::new(graph::StepGraphs::new()),
            recording: Mutex::new(None),
            fused_silu: linear::fused_silu_from_env().into(),
            deferred_norm: deferred_norm_from_env().into(),
        })
    }

    /// Defers each norm between two 4-bit decode linears into them (see
    /// `linear_add_rms_norm`): one launch fewer per norm, the rounding of
    /// the norm's output moved from `fp16(r · inv · w)` to `fp16(r · w)`
    /// times `inv` after the sums. Steps recorded before are dropped, so
    /// that every later step runs the new way.
    pub fn set_deferred_norm(&self, on: bool) {
        self.deferred_norm
            .store(on, std::sync::atomic::Ordering::Relaxed);
        let mut graphs = lock(&self.graphs);
        if graphs.enabled() {
            graphs.set_enabled(false);
            graphs.set_enabled(true);
        }
    }

    /// Makes 4-bit gate/up projections uploaded from now on interleave
    /// their gate and up tiles, so that decode stores `silu(gate) · up`
    /// from the W4A16 kernel itself (one launch fewer per layer, the same
    /// bits); on by default, off with `LMQ_FUSED_SILU=0`.
    pub fn set_fused_silu(&self, on: bool) {
        self.fused_silu
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }

    /// Turns recorded decode steps (CUDA graphs) on or off; on by default
    /// unless `LMQ_CUDA_GRAPHS=0`.
    pub fn set_graphs(&self, on: bool) {
        lock(&self.graphs).set_enabled(on);
    }

    /// Rounds recorded steps' row counts up to buckets (padding the extra
    /// rows); off by default unless `LMQ_GRAPH_BUCKETS=1`.
    pub fn set_graph_buckets(&self, on: bool) {
        lock(&self.graphs).set_buckets(on);
    }

    /// How many recorded decode steps the backend holds.
    pub fn recorded_graphs(&self) -> usize {
        lock(&self.graphs).len()
    }

    /// The row metadata for `spans`, uploading it unless the last upload
    /// was for the same spans.
    fn row_meta(&self, spans: &[SeqSpan]) -> Result<Arc<RowMeta>> {
        if let Some(r) = lock(&self.recording).as_ref() {
            let meta = r.inputs.meta.clone();
            // A bucket's recording has rows past the step's sequences.
            if meta.rows() < spans.len() || spans.iter().any(|s| s.len() != 1) {
                return Err(shape_error(
                    "a recorded step's spans changed while recording".into(),
                ));
            }
            return Ok(meta);
        }
        let mut cache = lock(&self.meta);
        if let Some(c) = cache.as_ref() {
            if c.spans == spans {
                return Ok(c.meta.clone());
            }
        }
        let rows: usize = spans.iter().map(SeqSpan::len).sum();
        let mut places = Vec::with_capacity(rows);
        for span in spans {
            if places.len() != span.rows.start {
                return Err(shape_error(format!(
                    "sequence rows {:?} do not follow the previous sequence's",
                    span.rows
                )));
            }
            for i in 0..span.len() {
                places.push(RowPlace {
                    pos: span.start_pos + i,
                    table: &span.blocks,
                });
            }
        }
        let meta = Arc::new(RowMeta::new(&self.dev, &places).map_err(gpu_error)?);
        *cache = Some(MetaCache {
            spans: spans.to_vec(),
            meta: meta.clone(),
        });
        Ok(meta)
    }

    fn inv_freq(&self, rope: &Rope) -> Result<Arc<DeviceMatrix<f32>>> {
        let mut cache = lock(&self.inv_freq);
        if let Some((host, dev)) = cache.as_ref() {
            if *host == rope.inv_freq {
                return Ok(dev.clone());
            }
        }
        let n = rope.inv_freq.len();
        let dev = Arc::new(self.dev.upload(&rope.inv_freq, n, 1).map_err(gpu_error)?);
        *cache = Some((rope.inv_freq.clone(), dev.clone()));
        Ok(dev)
    }

    /// Records one decode step (`body`, whose logits are `cols` wide) into
    /// a graph that reads fresh input buffers.
    fn record_step(
        &self,
        key: &graph::StepKey,
        cols: usize,
        pool: &mut CudaKvPool,
        body: &mut dyn FnMut(&mut CudaKvPool) -> Result<CudaAct>,
    ) -> Result<graph::Recorded> {
        let block_len = pool.pool.layout().block_len;
        let inputs = graph::new_inputs(&self.dev, key, block_len)?;
        let mut logits = self
            .dev
            .uninit::<f32>(inputs.ids.rows(), cols)
            .map_err(gpu_error)?;
        *lock(&self.recording) = Some(Recording {
            inputs: inputs.clone(),
            vocab: None,
        });
        let mut failure = None;
        let spliced = self.dev.pdl_splices();
        let recorded = self.dev.record(|| -> lmq_kernels::Result<()> {
            match body(pool) {
                // The logits leave the graph through a buffer allocated
                // outside it; `out`, a graph allocation, is freed inside.
                Ok(out) => self.dev.copy(&mut logits, &out),
                Err(e) => {
                    failure = Some(e);
                    Err(KernelError::Invalid {
                        op: "graph recording",
                        detail: "the step failed".into(),
                    })
                }
            }
        });
        let vocab = lock(&self.recording).take().and_then(|r| r.vocab);
        if let Some(e) = failure {
            return Err(e);
        }
        let (graph, ()) = recorded.map_err(gpu_error)?;
        graph::note_programmatic_edges(self.dev.pdl_splices() - spliced);
        let vocab =
            vocab.ok_or_else(|| shape_error("the recorded step looked up no tokens".into()))?;
        Ok(graph::Recorded::new(graph, inputs, logits, vocab))
    }

    /// What the linears may use besides the device.
    /// `x`, or, for a deferred norm's output, its values (materialized
    /// into `slot`): for the ops that read an activation's values, which
    /// only the linears can do without.
    fn values_of<'a>(&self, x: &'a CudaAct, slot: &'a mut Option<CudaAct>) -> Result<&'a CudaAct> {
        match x.deferred_norm() {
            Some(dn) => Ok(slot.insert(linear::materialize(&self.dev, &dn)?)),
            None => Ok(x),
        }
    }

    fn aids(&self) -> linear::LinearAids<'_> {
        linear::LinearAids {
            blas: &self.blas,
            l2: self.l2.as_ref(),
        }
    }

    /// A new fp32 matrix and its fp16 copy, for an op that writes both.
    fn act_pair(&self, rows: usize, cols: usize) -> Result<(DeviceMatrix<f32>, DeviceMatrix<f16>)> {
        let values = self.dev.uninit(rows, cols).map_err(gpu_error)?;
        let half = self.dev.uninit(rows, cols).map_err(gpu_error)?;
        Ok((values, half))
    }

    fn check_rows(&self, x: &DeviceMatrix<f32>, spans: &[SeqSpan], op: &str) -> Result<()> {
        // While recording, the rows are the recording's (a bucket's padding
        // included); `row_meta` checks the spans against them.
        let rows: usize = match lock(&self.recording).as_ref() {
            Some(r) => r.inputs.ids.rows(),
            None => spans.iter().map(SeqSpan::len).sum(),
        };
        if rows != x.rows() {
            return Err(shape_error(format!(
                "{op}: the spans cover {rows} rows, the batch has {}",
                x.rows()
            )));
        }
        Ok(())
    }
}

fn shape_error(message: String) -> Error {
    Error::Backend {
        backend: "cuda",
        message,
    }
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Linear = CudaLinear;
    type Vector = CudaVector;
    type KvPool = CudaKvPool;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload_linear(&self, w: HostLinear) -> Result<CudaLinear> {
        CudaLinear::upload(&self.dev, w, &self.aids())
    }

    fn linear_bytes(&self, w: &CudaLinear) -> usize {
        w.stored_bytes()
    }

    fn upload_vector(&self, v: Vec<f32>) -> Result<CudaVector> {
        let n = v.len();
        let values = self.dev.upload(&v, n, 1).map_err(gpu_error)?;
        Ok(CudaVector::new(values, &v))
    }

    fn new_kv_pool(&self, spec: &KvPoolSpec) -> Result<CudaKvPool> {
        self.make_kv_pool(spec)
    }

    fn free_memory(&self) -> Option<u64> {
        self.dev
            .memory_info()
            .ok()
            .map(|(free, _total)| free as u64)
    }

    fn embedding(&self, table: &CudaLinear, ids: &[u32]) -> Result<CudaAct> {
        let dense = table
            .dense()
            .ok_or_else(|| shape_error("embedding tables must be dense, not quantized".into()))?;
        if let Some(r) = lock(&self.recording).as_mut() {
            if r.inputs.ids.len() < ids.len() {
                return Err(shape_error(
                    "a recorded step's ids changed while recording".into(),
                ));
            }
            r.vocab = Some(dense.rows());
            return act::embedding_from_device(&self.dev, dense, &r.inputs.ids)
                .map(CudaAct::from)
                .map_err(gpu_error);
        }
        act::embedding(&self.dev, dense, ids)
            .map(CudaAct::from)
            .map_err(|e| match e {
                KernelError::Invalid { .. } => Error::InvalidRequest(e.to_string()),
                other => gpu_error(other),
            })
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaVector, eps: f32) -> Result<CudaAct> {
        let mut slot = None;
        let x = self.values_of(x, &mut slot)?;
        let (mut out, mut half) = self.act_pair(x.rows(), x.cols())?;
        act::rms_norm(&self.dev, x, w, eps, &mut out, Some(&mut half)).map_err(gpu_error)?;
        Ok(CudaAct::with_half(out, half))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaAct,
        delta: &CudaAct,
        w: &CudaVector,
        eps: f32,
    ) -> Result<CudaAct> {
        let mut slot = None;
        let delta = self.values_of(delta, &mut slot)?;
        let (mut out, mut half) = self.act_pair(residual.rows(), residual.cols())?;
        act::add_rms_norm(
            &self.dev,
            residual,
            delta,
            w,
            eps,
            &mut out,
            Some(&mut half),
        )
        .map_err(gpu_error)?;
        Ok(CudaAct::with_half(out, half))
    }

    fn add_in_place(&self, residual: &mut CudaAct, delta: &CudaAct) -> Result<()> {
        let mut slot = None;
        let delta = self.values_of(delta, &mut slot)?;
        act::add(&self.dev, residual, delta).map_err(gpu_error)
    }

    fn linear(&self, x: &CudaAct, w: &CudaLinear) -> Result<CudaAct> {
        if let Some(dn) = x.deferred_norm() {
            return w
                .forward_after_norm(&self.dev, &dn, &self.aids())
                .map(CudaAct::from);
        }
        w.forward(&self.dev, x, x.half(), &self.aids())
            .map(CudaAct::from)
    }

    fn linear_add_rms_norm(
        &self,
        x: &CudaAct,
        w: &CudaLinear,
        residual: &mut CudaAct,
        norm: &CudaVector,
        eps: f32,
    ) -> Result<CudaAct> {
        if self
            .deferred_norm
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            if let Some(h) = w.forward_add_norm(&self.dev, x, residual, norm, eps, &self.aids())? {
                return Ok(h);
            }
        }
        let delta = self.linear(x, w)?;
        self.add_rms_norm(residual, &delta, norm, eps)
    }

    fn rope(&self, x: &mut CudaAct, heads: usize, spans: &[SeqSpan], rope: &Rope) -> Result<()> {
        self.check_rows(x, spans, "rope")?;
        let meta = self.row_meta(spans)?;
        let inv_freq = self.inv_freq(rope)?;
        act::rope(&self.dev, x, heads, &meta, &inv_freq, rope.position_scale).map_err(gpu_error)
    }

    fn write_kv(
        &self,
        layer: usize,
        k: &CudaAct,
        v: &CudaAct,
        pool: &mut CudaKvPool,
        spans: &[SeqSpan],
    ) -> Result<()> {
        self.check_rows(k, spans, "write_kv")?;
        let meta = self.row_meta(spans)?;
        graph::check_engine_blocks(&meta, pool)?;
        match pool.smooth.as_ref().and_then(|s| s.get(layer)) {
            Some(sm) => {
                let hd = pool.pool.layout().head_dim;
                let ks = act::scale_cols(&self.dev, k, &sm.keys, sm.key_shift.as_ref(), true)
                    .map_err(gpu_error)?;
                let vr = act::hadamard(&self.dev, v, hd).map_err(gpu_error)?;
                paged::kv_write(&self.dev, &mut pool.pool, layer, &ks, &vr, &meta)
            }
            None => paged::kv_write(&self.dev, &mut pool.pool, layer, k, v, &meta),
        }
        .map_err(gpu_error)
    }

    fn attention(
        &self,
        layer: usize,
        q: &CudaAct,
        pool: &CudaKvPool,
        spans: &[SeqSpan],
        shape: &AttnShape,
    ) -> Result<CudaAct> {
        attention::attention(self, layer, q, pool, spans, shape)
    }

    fn silu_mul(&self, gate: &CudaAct, up: &CudaAct) -> Result<CudaAct> {
        let (mut gate_slot, mut up_slot) = (None, None);
        let gate = self.values_of(gate, &mut gate_slot)?;
        let up = self.values_of(up, &mut up_slot)?;
        let (mut out, mut half) = self.act_pair(gate.rows(), gate.cols())?;
        act::silu_mul(&self.dev, gate, up, &mut out, Some(&mut half)).map_err(gpu_error)?;
        Ok(CudaAct::with_half(out, half))
    }

    fn silu_mul_halves(&self, gate_up: &CudaAct) -> Result<CudaAct> {
        let mut slot = None;
        let gate_up = self.values_of(gate_up, &mut slot)?;
        let (mut out, mut half) = self.act_pair(gate_up.rows(), gate_up.cols() / 2)?;
        act::silu_mul_halves(&self.dev, gate_up, &mut out, Some(&mut half)).map_err(gpu_error)?;
        Ok(CudaAct::with_half(out, half))
    }

    fn upload_gate_up(&self, w: HostLinear) -> Result<CudaLinear> {
        let pair = self.fused_silu.load(std::sync::atomic::Ordering::Relaxed);
        CudaLinear::upload_gate_up(&self.dev, w, pair, &self.aids())
    }

    fn gate_up_silu(&self, x: &CudaAct, w: &CudaLinear) -> Result<CudaAct> {
        let (out, half) = w.forward_gate_up_silu(&self.dev, x, &self.aids())?;
        Ok(CudaAct::with_half(out, half))
    }

    fn split_cols(&self, x: &CudaAct, widths: &[usize]) -> Result<Vec<CudaAct>> {
        let mut slot = None;
        let x = self.values_of(x, &mut slot)?;
        let mut outs = widths
            .iter()
            .map(|&w| self.dev.uninit(x.rows(), w))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(gpu_error)?;
        act::split_cols(&self.dev, x, &mut outs).map_err(gpu_error)?;
        Ok(outs.into_iter().map(CudaAct::from).collect())
    }

    /// One launch (`split_rope_f32`) where the default takes three, for
    /// the usual shape: three parts of whole heads.
    fn split_qkv_rope(
        &self,
        qkv: &CudaAct,
        widths: &[usize],
        shape: &AttnShape,
        spans: &[SeqSpan],
        rope: &Rope,
    ) -> Result<Vec<CudaAct>> {
        let hd = rope.inv_freq.len() * 2;
        if !qkv_in_whole_heads(widths, shape, hd) {
            return split_qkv_rope_apart(self, qkv, widths, shape, spans, rope);
        }
        self.check_rows(qkv, spans, "split_qkv_rope")?;
        let meta = self.row_meta(spans)?;
        let inv_freq = self.inv_freq(rope)?;
        let rows = qkv.rows();
        let mut q = self.dev.uninit(rows, widths[0]).map_err(gpu_error)?;
        let mut k = self.dev.uninit(rows, widths[1]).map_err(gpu_error)?;
        let mut v = self.dev.uninit(rows, widths[2]).map_err(gpu_error)?;
        act::split_rope(
            &self.dev,
            qkv,
            [&mut q, &mut k, &mut v],
            &meta,
            &inv_freq,
            rope.position_scale,
        )
        .map_err(gpu_error)?;
        Ok(vec![q.into(), k.into(), v.into()])
    }

    /// One launch (`split_rope_kv_write`) where the default takes two
    /// (see `fused_kv.rs`).
    fn split_qkv_rope_write_kv(
        &self,
        layer: usize,
        qkv: &CudaAct,
        widths: &[usize],
        pool: &mut CudaKvPool,
        shape: &AttnShape,
        spans: &[SeqSpan],
        rope: &Rope,
    ) -> Result<CudaAct> {
        let step = fused_kv::QkvStep {
            layer,
            qkv,
            widths,
            shape,
            spans,
            rope,
        };
        fused_kv::split_qkv_rope_write_kv(self, step, pool)
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<CudaAct> {
        let mut slot = None;
        let x = self.values_of(x, &mut slot)?;
        act::gather_rows(&self.dev, x, rows)
            .map(CudaAct::from)
            .map_err(gpu_error)
    }

    fn to_host(&self, x: &CudaAct) -> Result<Vec<f32>> {
        let mut slot = None;
        let x = self.values_of(x, &mut slot)?;
        self.dev.download(x).map_err(gpu_error)
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn sample(&self, logits: &mut CudaAct, rows: &[SampleRow<'_>]) -> Result<Vec<Option<u32>>> {
        sample::sample_matrix(&self.dev, logits, rows)
    }

    /// Replays a recorded graph of the step's shape, records one the
    /// second time a shape comes (see `graph.rs`), or runs `body`.
    fn decode_step(
        &self,
        ids: &[u32],
        spans: &[SeqSpan],
        pool: &mut CudaKvPool,
        body: &mut dyn FnMut(&mut CudaKvPool) -> Result<CudaAct>,
        sampling: Option<&[SampleRow<'_>]>,
    ) -> Result<StepOutput> {
        let mut profile = lock(&self.profile);
        let mut mark = profile.as_ref().map(|p| p.begin());
        let mut queued = |p: &Option<profile::StepProfile>| {
            if let (Some(p), Some(m)) = (p.as_ref(), mark.as_mut()) {
                p.queued(m);
            }
        };
        let mut graphs = lock(&self.graphs);
        let key = graph::StepKey::of(pool, spans, graphs.buckets()).filter(|_| graphs.enabled());
        let mut replayed = false;
        let logits = match key {
            Some(key) if graphs.get(&key).is_some() => {
                let recorded = graphs
                    .get(&key)
                    .ok_or_else(|| shape_error("graph vanished".into()))?;
                recorded.replay(&self.dev, ids, spans, pool)?;
                queued(&profile);
                replayed = true;
                sample::finish_matrix(&self.dev, recorded.logits_mut(), sampling, spans.len())?
            }
            Some(key) => {
                let mut done = None;
                if let Some(cols) = graphs.seen_before(key, None) {
                    match self.record_step(&key, cols, pool, body) {
                        Ok(mut recorded) => {
                            recorded.replay(&self.dev, ids, spans, pool)?;
                            queued(&profile);
                            replayed = true;
                            done = Some(sample::finish_matrix(
                                &self.dev,
                                recorded.logits_mut(),
                                sampling,
                                spans.len(),
                            )?);
                            graphs.insert(key, recorded);
                        }
                        Err(e) => graphs.disable(&e),
                    }
                }
                match done {
                    Some(l) => l,
                    None => {
                        let mut out = body(pool)?;
                        queued(&profile);
                        graphs.seen_before(key, Some(out.cols()));
                        finish_logits(self, &mut out, sampling)?
                    }
                }
            }
            None => {
                drop(graphs);
                let mut out = body(pool)?;
                queued(&profile);
                finish_logits(self, &mut out, sampling)?
            }
        };
        if let (Some(p), Some(m)) = (profile.as_mut(), mark) {
            p.end(m, replayed);
        }
        Ok(logits)
    }
}
