//! One decoder layer: its weights on the host and on a device, and its two
//! blocks (attention, MLP) as functions of the backend ops. The model runs
//! them layer after layer; AWQ calibration in `lite` runs them one layer at
//! a time, with an observer on the inputs of the linears.

use crate::backend::{AttnShape, Backend, HostLinear, SeqSpan};
use crate::error::Result;
use crate::rope::Rope;

/// Which linear inputs an observer sees. Linears that share an input are
/// observed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// The normed input of q/k/v.
    Qkv,
    /// The attention output, input of o_proj.
    O,
    /// The normed input of gate/up.
    GateUp,
    /// `silu(gate) · up`, input of down_proj.
    Down,
}

/// Sees the input of each group of linears as the layer runs.
pub trait Observer<B: Backend> {
    fn observe(&mut self, input: LinearInput, x: &B::Act) -> Result<()>;
}

/// An observer that does nothing (the serving path).
pub struct NoObserver;

impl<B: Backend> Observer<B> for NoObserver {
    fn observe(&mut self, _: LinearInput, _: &B::Act) -> Result<()> {
        Ok(())
    }
}

/// A decoder layer's weights on the host, as read from a checkpoint.
#[derive(Debug, Clone)]
pub struct HostLayer {
    pub input_norm: Vec<f32>,
    pub post_attention_norm: Vec<f32>,
    pub q: HostLinear,
    pub k: HostLinear,
    pub v: HostLinear,
    pub o: HostLinear,
    pub gate: HostLinear,
    pub up: HostLinear,
    pub down: HostLinear,
}

/// A decoder layer's weights on a backend.
pub struct DecoderLayer<B: Backend> {
    pub input_norm: B::Vector,
    pub post_attention_norm: B::Vector,
    pub q: B::Linear,
    pub k: B::Linear,
    pub v: B::Linear,
    pub o: B::Linear,
    pub gate: B::Linear,
    pub up: B::Linear,
    pub down: B::Linear,
}

/// What the attention block needs besides weights and activations.
pub struct LayerContext<'a> {
    /// Which layer of the KV pool this layer reads and writes.
    pub kv_layer: usize,
    pub spans: &'a [SeqSpan],
    pub rope: &'a Rope,
    pub shape: &'a AttnShape,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn upload(host: HostLayer, backend: &B) -> Result<Self> {
        Ok(DecoderLayer {
            input_norm: backend.upload_vector(host.input_norm)?,
            post_attention_norm: backend.upload_vector(host.post_attention_norm)?,
            q: backend.upload_linear(host.q)?,
            k: backend.upload_linear(host.k)?,
            v: backend.upload_linear(host.v)?,
            o: backend.upload_linear(host.o)?,
            gate: backend.upload_linear(host.gate)?,
            up: backend.upload_linear(host.up)?,
            down: backend.upload_linear(host.down)?,
        })
    }

    /// The attention block on normed input `h`: q/k/v, rotary embedding,
    /// KV write, causal attention, o_proj. Returns o_proj's output (the
    /// residual add is the caller's).
    pub fn attention(
        &self,
        b: &B,
        h: &B::Act,
        pool: &mut B::KvPool,
        ctx: &LayerContext<'_>,
        observer: &mut dyn Observer<B>,
    ) -> Result<B::Act> {
        observer.observe(LinearInput::Qkv, h)?;
        let mut q = b.linear(h, &self.q)?;
        let mut k = b.linear(h, &self.k)?;
        let v = b.linear(h, &self.v)?;
        b.rope(&mut q, ctx.shape.num_heads, ctx.spans, ctx.rope)?;
        b.rope(&mut k, ctx.shape.num_kv_heads, ctx.spans, ctx.rope)?;
        b.write_kv(ctx.kv_layer, &k, &v, pool, ctx.spans)?;
        let attn = b.attention(ctx.kv_layer, &q, pool, ctx.spans, ctx.shape)?;
        observer.observe(LinearInput::O, &attn)?;
        b.linear(&attn, &self.o)
    }

    /// The MLP block on normed input `h`: `down(silu(gate(h)) · up(h))`.
    pub fn mlp(&self, b: &B, h: &B::Act, observer: &mut dyn Observer<B>) -> Result<B::Act> {
        observer.observe(LinearInput::GateUp, h)?;
        let gate = b.linear(h, &self.gate)?;
        let up = b.linear(h, &self.up)?;
        let act = b.silu_mul(&gate, &up)?;
        observer.observe(LinearInput::Down, &act)?;
        b.linear(&act, &self.down)
    }
}
