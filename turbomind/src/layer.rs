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

/// Linears that read one input: stacked into one product where their
/// weights allow it ([`HostLinear::stack_outputs`]), otherwise kept apart.
pub enum SharedInput<L> {
    /// One linear whose output columns are the parts', `widths` wide.
    Stacked {
        linear: L,
        widths: Vec<usize>,
    },
    Separate(Vec<L>),
}

impl<L> SharedInput<L> {
    /// `parts` stacked (uploaded by `upload_stacked`) or apart.
    fn upload<B: Backend<Linear = L>>(
        parts: Vec<HostLinear>,
        backend: &B,
        stack: bool,
        upload_stacked: impl FnOnce(&B, HostLinear) -> Result<L>,
    ) -> Result<Self> {
        let refs: Vec<&HostLinear> = parts.iter().collect();
        if stack {
            if let Some(linear) = HostLinear::stack_outputs(&refs) {
                return Ok(SharedInput::Stacked {
                    widths: parts.iter().map(|p| p.out_features).collect(),
                    linear: upload_stacked(backend, linear)?,
                });
            }
        }
        Ok(SharedInput::Separate(
            parts
                .into_iter()
                .map(|p| backend.upload_linear(p))
                .collect::<Result<_>>()?,
        ))
    }

    fn linears(&self) -> Vec<&L> {
        match self {
            SharedInput::Stacked { linear, .. } => vec![linear],
            SharedInput::Separate(v) => v.iter().collect(),
        }
    }
}

/// A decoder layer's weights on a backend. q/k/v and gate/up are stacked
/// into one linear each where their weights allow it (TurboMind's fused
/// QKV and gate/up): one pass over the input and one launch instead of
/// three or two. Each output column is the same dot product either way.
pub struct DecoderLayer<B: Backend> {
    pub input_norm: B::Vector,
    pub post_attention_norm: B::Vector,
    pub qkv: SharedInput<B::Linear>,
    pub o: B::Linear,
    pub gate_up: SharedInput<B::Linear>,
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
    /// Uploads `host`, stacking the linears that share an input where the
    /// backend prefers it ([`Backend::prefers_stacked_linears`]).
    pub fn upload(host: HostLayer, backend: &B) -> Result<Self> {
        let stack = backend.prefers_stacked_linears();
        Self::upload_with(host, backend, stack)
    }

    /// Uploads `host`; `stack` = false keeps every linear apart (for
    /// comparing the two forms).
    pub fn upload_with(host: HostLayer, backend: &B, stack: bool) -> Result<Self> {
        Ok(DecoderLayer {
            input_norm: backend.upload_vector(host.input_norm)?,
            post_attention_norm: backend.upload_vector(host.post_attention_norm)?,
            qkv: SharedInput::upload(
                vec![host.q, host.k, host.v],
                backend,
                stack,
                B::upload_linear,
            )?,
            o: backend.upload_linear(host.o)?,
            gate_up: SharedInput::upload(
                vec![host.gate, host.up],
                backend,
                stack,
                B::upload_gate_up,
            )?,
            down: backend.upload_linear(host.down)?,
        })
    }

    /// Every linear the layer holds (stacked ones once).
    pub fn linears(&self) -> Vec<&B::Linear> {
        let mut all = self.qkv.linears();
        all.push(&self.o);
        all.extend(self.gate_up.linears());
        all.push(&self.down);
        all
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
        let attn = self.attention_heads(b, h, pool, ctx, observer)?;
        b.linear(&attn, &self.o)
    }

    /// [`Self::attention`] up to o_proj: the attention output, o_proj's
    /// input (for a caller that runs o_proj with the residual add and the
    /// next norm, `Backend::linear_add_rms_norm`).
    pub fn attention_heads(
        &self,
        b: &B,
        h: &B::Act,
        pool: &mut B::KvPool,
        ctx: &LayerContext<'_>,
        observer: &mut dyn Observer<B>,
    ) -> Result<B::Act> {
        observer.observe(LinearInput::Qkv, h)?;
        let q = match &self.qkv {
            SharedInput::Stacked { linear, widths } => b.split_qkv_rope_write_kv(
                ctx.kv_layer,
                &b.linear(h, linear)?,
                widths,
                pool,
                ctx.shape,
                ctx.spans,
                ctx.rope,
            )?,
            SharedInput::Separate(v) => {
                let mut parts = v
                    .iter()
                    .map(|l| b.linear(h, l))
                    .collect::<Result<Vec<_>>>()?;
                if let [q, k, _] = parts.as_mut_slice() {
                    b.rope(q, ctx.shape.num_heads, ctx.spans, ctx.rope)?;
                    b.rope(k, ctx.shape.num_kv_heads, ctx.spans, ctx.rope)?;
                }
                let [q, k, v]: [B::Act; 3] = parts.try_into().map_err(|_| {
                    crate::error::Error::InvalidRequest("q/k/v must be three linears".into())
                })?;
                b.write_kv(ctx.kv_layer, &k, &v, pool, ctx.spans)?;
                q
            }
        };
        let attn = b.attention(ctx.kv_layer, &q, pool, ctx.spans, ctx.shape)?;
        observer.observe(LinearInput::O, &attn)?;
        Ok(attn)
    }

    /// The MLP block on normed input `h`: `down(silu(gate(h)) · up(h))`.
    pub fn mlp(&self, b: &B, h: &B::Act, observer: &mut dyn Observer<B>) -> Result<B::Act> {
        let act = self.mlp_activation(b, h, observer)?;
        b.linear(&act, &self.down)
    }

    /// [`Self::mlp`] up to down_proj: `silu(gate(h)) · up(h)`, down_proj's
    /// input.
    pub fn mlp_activation(
        &self,
        b: &B,
        h: &B::Act,
        observer: &mut dyn Observer<B>,
    ) -> Result<B::Act> {
        observer.observe(LinearInput::GateUp, h)?;
        let act = match &self.gate_up {
            SharedInput::Stacked { linear, .. } => b.gate_up_silu(h, linear)?,
            SharedInput::Separate(v) => match v.as_slice() {
                [gate, up] => b.silu_mul(&b.linear(h, gate)?, &b.linear(h, up)?)?,
                _ => {
                    return Err(crate::error::Error::InvalidRequest(
                        "gate/up must be two linears".into(),
                    ))
                }
            },
        };
        observer.observe(LinearInput::Down, &act)?;
        Ok(act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuBackend, Matrix};
    use crate::backend::{HostWeight, KvPoolSpec};
    use crate::config::RopeScaling;
    use crate::quant::awq::AwqTensors;
    use crate::quant::kv::KvCacheConfig;
    use half::f16;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (self.0 >> 33) as u32
        }
        fn uniform(&mut self) -> f32 {
            (self.next() % 2001) as f32 / 1000.0 - 1.0
        }
    }

    fn linear(rng: &mut Lcg, out: usize, inp: usize, awq: bool, bias: bool) -> HostLinear {
        let weight = if awq {
            let g = 32;
            HostWeight::Awq(AwqTensors {
                in_features: inp,
                out_features: out,
                group_size: g,
                qweight: (0..inp * out / 8).map(|_| rng.next() as i32).collect(),
                qzeros: (0..inp / g * out / 8).map(|_| rng.next() as i32).collect(),
                scales: (0..inp / g * out)
                    .map(|_| f16::from_f32(0.01 + 0.02 * rng.uniform().abs()))
                    .collect(),
            })
        } else {
            HostWeight::Dense((0..out * inp).map(|_| 0.1 * rng.uniform()).collect())
        };
        HostLinear {
            weight,
            out_features: out,
            in_features: inp,
            bias: bias.then(|| (0..out).map(|_| rng.uniform()).collect()),
        }
    }

    /// Stacked q/k/v and gate/up compute the same attention and MLP outputs
    /// as separate linears, bit for bit, for dense and 4-bit weights and
    /// with a bias on only some of the parts (a stacked part without one
    /// gets zeros).
    #[test]
    fn stacked_linears_match_separate_ones_bit_for_bit() {
        let (hidden, heads, kv_heads, hd, inter) = (64, 4, 2, 16, 96);
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            num_layers: 1,
        };
        let rope = Rope::new(hd, 10000.0, &RopeScaling::None);
        let b = CpuBackend::new();
        for awq in [false, true] {
            let mut rng = Lcg(11 + awq as u64);
            let host = HostLayer {
                input_norm: (0..hidden).map(|_| 1.0 + 0.1 * rng.uniform()).collect(),
                post_attention_norm: (0..hidden).map(|_| 1.0 + 0.1 * rng.uniform()).collect(),
                q: linear(&mut rng, heads * hd, hidden, awq, true),
                k: linear(&mut rng, kv_heads * hd, hidden, awq, false),
                v: linear(&mut rng, kv_heads * hd, hidden, awq, true),
                o: linear(&mut rng, hidden, heads * hd, awq, false),
                gate: linear(&mut rng, inter, hidden, awq, false),
                up: linear(&mut rng, inter, hidden, awq, false),
                down: linear(&mut rng, hidden, inter, awq, false),
            };
            let rows = 7;
            let x = Matrix {
                data: (0..rows * hidden).map(|_| rng.uniform()).collect(),
                rows,
                cols: hidden,
            };
            let (spans, _) = SeqSpan::packed(&[4, 3], 4);
            let spec = KvPoolSpec {
                shape,
                config: KvCacheConfig::default(),
                num_blocks: 4,
                block_len: 4,
            };
            let mut outputs = Vec::new();
            for stack in [true, false] {
                let layer = DecoderLayer::upload_with(host.clone(), &b, stack).expect("upload");
                assert_eq!(
                    matches!(layer.qkv, SharedInput::Stacked { .. }),
                    stack,
                    "stacking is possible for these weights"
                );
                let mut pool = b.new_kv_pool(&spec).expect("pool");
                let ctx = LayerContext {
                    kv_layer: 0,
                    spans: &spans,
                    rope: &rope,
                    shape: &shape,
                };
                let attn = layer
                    .attention(&b, &x, &mut pool, &ctx, &mut NoObserver)
                    .expect("attention");
                let mlp = layer.mlp(&b, &x, &mut NoObserver).expect("mlp");
                outputs.push((attn.data, mlp.data));
            }
            assert!(outputs[0].0.iter().all(|v| v.is_finite()));
            assert_eq!(outputs[0], outputs[1], "awq = {awq}");
        }
    }

    /// Linears that cannot share one weight stay apart.
    #[test]
    fn mixed_weights_are_not_stacked() {
        let mut rng = Lcg(5);
        let dense = linear(&mut rng, 32, 64, false, false);
        let awq = linear(&mut rng, 32, 64, true, false);
        let other_input = linear(&mut rng, 32, 96, false, false);
        assert!(HostLinear::stack_outputs(&[&dense, &awq]).is_none());
        assert!(HostLinear::stack_outputs(&[&dense, &other_input]).is_none());
        let both = HostLinear::stack_outputs(&[&dense, &dense]).expect("two dense parts");
        assert_eq!((both.out_features, both.in_features), (64, 64));
    }
}
