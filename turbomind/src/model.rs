//! The one decoder: a pre-norm transformer with rotary attention (GQA,
//! optional QKV bias) and a SiLU-gated MLP, written once against
//! [`Backend`]. Llama, Mistral and Qwen2 differ only in config fields and
//! weight names (see [`crate::arch`]).

use std::path::Path;

use crate::backend::{AttnShape, Backend, HostLinear, HostWeight, SeqSpan};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::awq::{AwqConfig, AwqTensors};
use crate::rope::Rope;

struct Layer<B: Backend> {
    input_norm: B::Vector,
    post_attention_norm: B::Vector,
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    o: B::Linear,
    gate: B::Linear,
    up: B::Linear,
    down: B::Linear,
}

/// Which logits a sequence needs from a forward step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// Only the last row (generation).
    Last,
    /// Every row (perplexity).
    All,
}

/// One sequence's part of a forward step: new tokens appended after what
/// its cache already holds.
pub struct SeqInput<'a, K> {
    pub tokens: &'a [u32],
    pub kv: &'a mut K,
    pub logits: LogitsWanted,
}

/// A loaded model on one backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Linear,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<B::Linear>,
    final_norm: B::Vector,
    layers: Vec<Layer<B>>,
    rope: Rope,
    shape: AttnShape,
}

/// Reads one model's weights and checks every shape against the config.
struct WeightReader<'a> {
    checkpoint: &'a Checkpoint,
    config: &'a ModelConfig,
    awq: Option<AwqConfig>,
    /// Every tensor name read so far, to find tensors nobody reads.
    consumed: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl WeightReader<'_> {
    fn vector(&self, module: &str, len: usize) -> Result<Vec<f32>> {
        self.f32(&format!("{module}.weight"), &[len])
    }

    fn mark(&self, name: &str) {
        self.consumed.borrow_mut().insert(name.to_string());
    }

    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.mark(name);
        self.checkpoint.f32(name, shape)
    }

    fn i32(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        self.mark(name);
        self.checkpoint.i32(name, shape)
    }

    fn f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        self.mark(name);
        self.checkpoint.f16(name, shape)
    }

    /// Fails if the checkpoint holds tensors the decoder never read: they
    /// mean the architecture table does not describe this model, and
    /// ignoring them would give wrong outputs silently.
    fn check_all_consumed(&self) -> Result<()> {
        let consumed = self.consumed.borrow();
        let mut unused: Vec<&str> = self
            .checkpoint
            .names()
            .filter(|n| !consumed.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let shown = unused
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        Err(Error::config(
            self.checkpoint.path_of(unused[0]),
            format!(
                "{} tensor(s) are not used by the {} decoder (for example {shown}); this checkpoint does not match its config",
                unused.len(),
                self.config.arch.model_type
            ),
        ))
    }

    fn linear(
        &self,
        module: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<HostLinear> {
        let qweight_name = format!("{module}.qweight");
        let weight = match &self.awq {
            Some(awq) if self.checkpoint.contains(&qweight_name) => {
                let g = awq.group_size;
                let path = self.checkpoint.path_of(&qweight_name).to_path_buf();
                if !in_features.is_multiple_of(g) || !out_features.is_multiple_of(8) {
                    return Err(Error::config(
                        path,
                        format!("{module}: in_features {in_features} is not a multiple of group_size {g}, or out_features {out_features} of 8"),
                    ));
                }
                let tensors = AwqTensors {
                    in_features,
                    out_features,
                    group_size: g,
                    qweight: self.i32(&qweight_name, &[in_features, out_features / 8])?,
                    qzeros: self.i32(
                        &format!("{module}.qzeros"),
                        &[in_features / g, out_features / 8],
                    )?,
                    scales: self.f16(
                        &format!("{module}.scales"),
                        &[in_features / g, out_features],
                    )?,
                };
                tensors.validate(module, &path)?;
                HostWeight::Awq(tensors)
            }
            _ => HostWeight::Dense(
                self.f32(&format!("{module}.weight"), &[out_features, in_features])?,
            ),
        };
        let bias = if bias {
            Some(self.f32(&format!("{module}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(HostLinear {
            weight,
            out_features,
            in_features,
            bias,
        })
    }

    fn dims(&self) -> (usize, usize, usize, usize) {
        let c = self.config;
        (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size)
    }
}

impl<B: Backend> Model<B> {
    /// Loads a Hugging Face checkpoint folder onto `backend`.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &checkpoint, backend)
    }

    pub fn from_checkpoint(
        config: ModelConfig,
        checkpoint: &Checkpoint,
        backend: B,
    ) -> Result<Self> {
        let awq = config.quantization.clone();
        let reader = WeightReader {
            checkpoint,
            config: &config,
            awq,
            consumed: Default::default(),
        };
        let names = &config.arch.names;
        let (hidden, q_dim, kv_dim, inter) = reader.dims();
        let embed = backend.upload_linear(reader.linear(
            names.embed_tokens,
            config.vocab_size,
            hidden,
            false,
        )?)?;
        let lm_head_name = format!("{}.weight", names.lm_head);
        // Tied models use the embedding as the output projection, as Hugging
        // Face does, even when the file also carries a copy of it.
        let lm_head = if config.tie_word_embeddings {
            reader.mark(&lm_head_name);
            None
        } else {
            Some(backend.upload_linear(reader.linear(
                names.lm_head,
                config.vocab_size,
                hidden,
                false,
            )?)?)
        };
        let final_norm = backend.upload_vector(reader.vector(names.final_norm, hidden)?)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let m = |module: &str| names.layer(i, module);
            let bias = config.qkv_bias;
            let (o_bias, mlp_bias) = (config.o_bias, config.mlp_bias);
            layers.push(Layer {
                input_norm: backend.upload_vector(reader.vector(&m(names.input_norm), hidden)?)?,
                post_attention_norm: backend
                    .upload_vector(reader.vector(&m(names.post_attention_norm), hidden)?)?,
                q: backend.upload_linear(reader.linear(
                    &m(names.q_proj),
                    q_dim,
                    hidden,
                    bias,
                )?)?,
                k: backend.upload_linear(reader.linear(
                    &m(names.k_proj),
                    kv_dim,
                    hidden,
                    bias,
                )?)?,
                v: backend.upload_linear(reader.linear(
                    &m(names.v_proj),
                    kv_dim,
                    hidden,
                    bias,
                )?)?,
                o: backend.upload_linear(reader.linear(
                    &m(names.o_proj),
                    hidden,
                    q_dim,
                    o_bias,
                )?)?,
                gate: backend.upload_linear(reader.linear(
                    &m(names.gate_proj),
                    inter,
                    hidden,
                    mlp_bias,
                )?)?,
                up: backend.upload_linear(reader.linear(
                    &m(names.up_proj),
                    inter,
                    hidden,
                    mlp_bias,
                )?)?,
                down: backend.upload_linear(reader.linear(
                    &m(names.down_proj),
                    hidden,
                    inter,
                    mlp_bias,
                )?)?,
            });
        }
        reader.check_all_consumed()?;
        let rope = Rope::new(config.head_dim, config.rope_theta, &config.rope_scaling);
        let shape = AttnShape {
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            num_layers: config.num_layers,
        };
        Ok(Model {
            config,
            backend,
            embed,
            lm_head,
            final_norm,
            layers,
            rope,
            shape,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// An empty KV cache for one sequence.
    pub fn new_kv(&self) -> Result<B::Kv> {
        self.backend.new_kv(&self.shape)
    }

    /// Number of positions a cache holds.
    pub fn kv_len(&self, kv: &B::Kv) -> usize {
        self.backend.kv_len(kv)
    }

    /// Runs one step over a batch of sequences and returns, per sequence,
    /// the requested logits as `rows × vocab` row-major values.
    pub fn forward(&self, batch: &mut [SeqInput<'_, B::Kv>]) -> Result<Vec<Vec<f32>>> {
        let b = &self.backend;
        let c = &self.config;
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for seq in batch.iter() {
            if seq.tokens.is_empty() {
                return Err(Error::InvalidRequest(
                    "a forward step got a sequence with no tokens".into(),
                ));
            }
            let start_pos = b.kv_len(seq.kv);
            let end = start_pos + seq.tokens.len();
            if end > c.max_position_embeddings {
                return Err(Error::PromptTooLong {
                    prompt_tokens: end,
                    max_context: c.max_position_embeddings,
                });
            }
            spans.push(SeqSpan {
                rows: ids.len()..ids.len() + seq.tokens.len(),
                start_pos,
            });
            ids.extend_from_slice(seq.tokens);
        }
        let mut kvs: Vec<&mut B::Kv> = batch.iter_mut().map(|s| &mut *s.kv).collect();

        let mut residual = b.embedding(&self.embed, &ids)?;
        let Some(first) = self.layers.first() else {
            return Err(Error::InvalidRequest("the model has no layers".into()));
        };
        let mut h = b.rms_norm(&residual, &first.input_norm, c.rms_norm_eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut q = b.linear(&h, &layer.q)?;
            let mut k = b.linear(&h, &layer.k)?;
            let v = b.linear(&h, &layer.v)?;
            b.rope(&mut q, c.num_heads, &spans, &self.rope)?;
            b.rope(&mut k, c.num_kv_heads, &spans, &self.rope)?;
            b.write_kv(i, &k, &v, &mut kvs, &spans)?;
            let attn = b.attention(i, &q, &kvs, &spans, &self.shape)?;
            let o = b.linear(&attn, &layer.o)?;
            h = b.add_rms_norm(
                &mut residual,
                &o,
                &layer.post_attention_norm,
                c.rms_norm_eps,
            )?;
            let gate = b.linear(&h, &layer.gate)?;
            let up = b.linear(&h, &layer.up)?;
            let down = b.linear(&b.silu_mul(&gate, &up)?, &layer.down)?;
            let next_norm = match self.layers.get(i + 1) {
                Some(next) => &next.input_norm,
                None => &self.final_norm,
            };
            h = b.add_rms_norm(&mut residual, &down, next_norm, c.rms_norm_eps)?;
        }

        let mut wanted_rows = Vec::new();
        for (seq, span) in batch.iter().zip(&spans) {
            match seq.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => wanted_rows.push(span.rows.end - 1),
                LogitsWanted::All => wanted_rows.extend(span.rows.clone()),
            }
        }
        if wanted_rows.is_empty() {
            return Ok(vec![Vec::new(); batch.len()]);
        }
        let selected = b.gather_rows(&h, &wanted_rows)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = b.to_host(&b.linear(&selected, head)?)?;
        let vocab = c.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for (seq, span) in batch.iter().zip(&spans) {
            let rows = match seq.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => span.len(),
            };
            out.push(logits[offset * vocab..(offset + rows) * vocab].to_vec());
            offset += rows;
        }
        Ok(out)
    }
}
