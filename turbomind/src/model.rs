//! The one decoder: a pre-norm transformer with rotary attention (GQA,
//! optional QKV bias) and a SiLU-gated MLP, written once against
//! [`Backend`]. Llama, Mistral and Qwen2 differ only in config fields and
//! weight names (see [`crate::arch`]).

use std::path::Path;
use std::sync::Arc;

use crate::backend::{
    finish_logits, AttnShape, Backend, KvPoolSpec, SampleRow, SeqSpan, StepOutput,
};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::layer::{DecoderLayer, LayerContext, NoObserver};
use crate::quant::kv::{KvCacheConfig, KvDtype, KvMode};
use crate::rope::Rope;
use crate::weights::WeightReader;

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

/// The default number of positions per KV block (`--cache-block-seq-len`).
pub const DEFAULT_BLOCK_LEN: usize = 64;

/// A sequence's next token from [`Model::forward_sampled`]: picked on the
/// device, or its penalized logits for the host to sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampled {
    Token(u32),
    Logits(Vec<f32>),
}

/// A sequence's place in a KV pool: its block table, and how many of its
/// positions hold K/V.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqKv {
    pub blocks: Vec<u32>,
    pub len: usize,
}

impl SeqKv {
    /// An empty sequence over blocks `first..first + count` of a pool.
    pub fn contiguous(first: u32, count: u32) -> Self {
        SeqKv {
            blocks: (first..first + count).collect(),
            len: 0,
        }
    }
}

/// One sequence's part of a forward step: new tokens written after the
/// first `kv.len` positions (overwriting any beyond them), which advances
/// `kv.len`.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut SeqKv,
    pub logits: LogitsWanted,
}

/// A KV pool holding one sequence over consecutive blocks: generation and
/// perplexity outside the engine.
pub struct SoloCache<P> {
    pub pool: P,
    pub seq: SeqKv,
}

impl<P> SoloCache<P> {
    /// Positions the cache holds.
    pub fn len(&self) -> usize {
        self.seq.len
    }

    pub fn is_empty(&self) -> bool {
        self.seq.len == 0
    }

    /// Forgets positions from `len` on (they are overwritten next).
    pub fn truncate(&mut self, len: usize) {
        self.seq.len = self.seq.len.min(len);
    }
}

/// A loaded model on one backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Linear,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<B::Linear>,
    final_norm: B::Vector,
    layers: Vec<DecoderLayer<B>>,
    rope: Rope,
    shape: AttnShape,
    /// The KV cache in use; its `static_params` always carry the
    /// checkpoint's calibrated parameters, if any, whatever the mode.
    kv_config: KvCacheConfig,
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
        let reader = WeightReader::new(checkpoint, &config);
        let names = &config.arch.names;
        let hidden = config.hidden_size;
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
            layers.push(DecoderLayer::upload(reader.layer(i)?, &backend)?);
        }
        let kv_static = reader.kv_static_params()?.map(Arc::new);
        reader.check_all_consumed()?;
        let defaults = KvCacheConfig::default();
        let kv_config = KvCacheConfig {
            dtype: config.kv_cache_quant.map_or(defaults.dtype, |d| d.dtype),
            mode: config.kv_cache_quant.map_or(defaults.mode, |d| d.mode),
            static_params: kv_static,
        };
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
            kv_config,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The output projection (the embedding table when tied).
    pub fn output_projection(&self) -> &B::Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Replaces the output projection, e.g. with a backend's 8-bit copy of
    /// it (`--lm-head-dtype int8`); the embedding lookup keeps its table.
    pub fn set_output_projection(&mut self, head: B::Linear) {
        self.lm_head = Some(head);
    }

    /// Weight bytes one decode step reads for one token: every layer's
    /// linears and the output projection (the embedding lookup reads one
    /// row). The numerator of the decode roofline.
    pub fn weight_bytes_per_token(&self) -> usize {
        let b = &self.backend;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.linears()
                    .into_iter()
                    .map(|w| b.linear_bytes(w))
                    .sum::<usize>()
            })
            .sum();
        layers + b.linear_bytes(self.lm_head.as_ref().unwrap_or(&self.embed))
    }

    /// Head layout of attention and the KV cache.
    pub fn attn_shape(&self) -> AttnShape {
        self.shape
    }

    /// Bytes one KV block of `block_len` positions takes with the current
    /// KV-cache settings.
    pub fn kv_bytes_per_block(&self, block_len: usize) -> usize {
        KvPoolSpec::bytes_per_block(&self.shape, &self.kv_config, block_len)
    }

    /// A KV block pool with the current KV-cache settings.
    pub fn new_kv_pool(&self, num_blocks: usize, block_len: usize) -> Result<B::KvPool> {
        self.backend.new_kv_pool(&KvPoolSpec {
            shape: self.shape,
            config: self.kv_config.clone(),
            num_blocks,
            block_len,
        })
    }

    /// A KV cache for one sequence of up to `capacity` positions.
    pub fn new_solo_cache(&self, capacity: usize) -> Result<SoloCache<B::KvPool>> {
        let blocks = capacity.max(1).div_ceil(DEFAULT_BLOCK_LEN);
        Ok(SoloCache {
            pool: self.new_kv_pool(blocks, DEFAULT_BLOCK_LEN)?,
            seq: SeqKv::contiguous(0, blocks as u32),
        })
    }

    /// Runs one sequence alone: appends `tokens` to its cache and returns
    /// the requested logits.
    pub fn forward_solo(
        &self,
        cache: &mut SoloCache<B::KvPool>,
        tokens: &[u32],
        logits: LogitsWanted,
    ) -> Result<Vec<f32>> {
        let mut out = self.forward(
            &mut cache.pool,
            &mut [SeqInput {
                tokens,
                kv: &mut cache.seq,
                logits,
            }],
        )?;
        Ok(out.pop().unwrap_or_default())
    }

    pub fn kv_cache_config(&self) -> &KvCacheConfig {
        &self.kv_config
    }

    /// Chooses the KV-cache dtype and mode (the default is the checkpoint's,
    /// else fp16). Static mode needs the checkpoint's calibrated parameters.
    pub fn set_kv_cache(&mut self, dtype: KvDtype, mode: KvMode) -> Result<()> {
        if mode.needs_calibration()
            && dtype.levels().is_some()
            && self.kv_config.static_params.is_none()
        {
            return Err(Error::InvalidRequest(format!(
                "--kv-cache-mode {} needs calibrated KV parameters, which this checkpoint lacks (quantize it with --kv int8 or --kv int4)",
                mode.as_str()
            )));
        }
        self.kv_config.dtype = dtype;
        self.kv_config.mode = mode;
        Ok(())
    }

    /// The final normed hidden states of a step's rows (writing their K
    /// and V into `pool`).
    fn hidden(&self, pool: &mut B::KvPool, ids: &[u32], spans: &[SeqSpan]) -> Result<B::Act> {
        let b = &self.backend;
        let c = &self.config;
        let mut residual = b.embedding(&self.embed, ids)?;
        let Some(first) = self.layers.first() else {
            return Err(Error::InvalidRequest("the model has no layers".into()));
        };
        let mut h = b.rms_norm(&residual, &first.input_norm, c.rms_norm_eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let ctx = LayerContext {
                kv_layer: i,
                spans,
                rope: &self.rope,
                shape: &self.shape,
            };
            // o_proj and down_proj run with the residual add and the next
            // norm (`linear_add_rms_norm`: one op, which the CUDA backend
            // may defer into the linears that read the norm).
            let attn = layer.attention_heads(b, &h, pool, &ctx, &mut NoObserver)?;
            h = b.linear_add_rms_norm(
                &attn,
                &layer.o,
                &mut residual,
                &layer.post_attention_norm,
                c.rms_norm_eps,
            )?;
            let act = layer.mlp_activation(b, &h, &mut NoObserver)?;
            h = match self.layers.get(i + 1) {
                Some(next) => b.linear_add_rms_norm(
                    &act,
                    &layer.down,
                    &mut residual,
                    &next.input_norm,
                    c.rms_norm_eps,
                )?,
                // The final norm feeds the LM head, whose rows may be
                // gathered first: the norm's values are needed.
                None => {
                    let down = b.linear(&act, &layer.down)?;
                    b.add_rms_norm(&mut residual, &down, &self.final_norm, c.rms_norm_eps)?
                }
            };
        }
        Ok(h)
    }

    /// The logits of `wanted` rows of a step, on the device. When every
    /// row is wanted in order (a decode step) the rows are not gathered.
    fn logits(
        &self,
        pool: &mut B::KvPool,
        ids: &[u32],
        spans: &[SeqSpan],
        wanted: &[usize],
    ) -> Result<B::Act> {
        let b = &self.backend;
        let h = self.hidden(pool, ids, spans)?;
        let head = self.output_projection();
        if wanted.len() == ids.len() && wanted.iter().enumerate().all(|(i, &r)| i == r) {
            b.linear(&h, head)
        } else {
            b.linear(&b.gather_rows(&h, wanted)?, head)
        }
    }

    /// Runs one step over a batch of sequences and returns, per sequence,
    /// the requested logits as `rows × vocab` row-major values. On success
    /// each sequence's `kv.len` has advanced by its tokens.
    pub fn forward(
        &self,
        pool: &mut B::KvPool,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let (out, rows) = self.run(pool, batch, None)?;
        let vocab = self.config.vocab_size;
        let mut offset = 0;
        Ok(rows
            .iter()
            .map(|&n| {
                let part = out.logits[offset * vocab..(offset + n) * vocab].to_vec();
                offset += n;
                part
            })
            .collect())
    }

    /// Runs one step like [`Model::forward`] and picks the next token of
    /// every sequence that wants its last logits (`sampling` has one row
    /// per such sequence, in batch order): on the device where the backend
    /// samples there, otherwise (or for a row the device leaves to the
    /// host) the sequence gets its penalized logits back. `None` for
    /// sequences that want no logits.
    pub fn forward_sampled(
        &self,
        pool: &mut B::KvPool,
        batch: &mut [SeqInput<'_>],
        sampling: &[SampleRow<'_>],
    ) -> Result<Vec<Option<Sampled>>> {
        let wanting = batch
            .iter()
            .filter(|s| s.logits != LogitsWanted::None)
            .count();
        if batch.iter().any(|s| s.logits == LogitsWanted::All) || wanting != sampling.len() {
            return Err(Error::InvalidRequest(format!(
                "sampling needs one row per sequence that wants its last logits: {} rows for {wanting} sequences",
                sampling.len()
            )));
        }
        let (out, rows) = self.run(pool, batch, Some(sampling))?;
        let vocab = self.config.vocab_size;
        let mut next = 0;
        Ok(rows
            .iter()
            .map(|&n| {
                if n == 0 {
                    return None;
                }
                let i = next;
                next += 1;
                match out.tokens.as_ref().and_then(|t| t[i]) {
                    Some(token) => Some(Sampled::Token(token)),
                    None => Some(Sampled::Logits(
                        out.logits[i * vocab..(i + 1) * vocab].to_vec(),
                    )),
                }
            })
            .collect())
    }

    /// One step: the step's output and, per sequence, how many logits rows
    /// it holds.
    fn run(
        &self,
        pool: &mut B::KvPool,
        batch: &mut [SeqInput<'_>],
        sampling: Option<&[SampleRow<'_>]>,
    ) -> Result<(StepOutput, Vec<usize>)> {
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
            let start_pos = seq.kv.len;
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
                blocks: seq.kv.blocks.clone(),
            });
            ids.extend_from_slice(seq.tokens);
        }

        let mut wanted_rows = Vec::new();
        for (seq, span) in batch.iter().zip(&spans) {
            match seq.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => wanted_rows.push(span.rows.end - 1),
                LogitsWanted::All => wanted_rows.extend(span.rows.clone()),
            }
        }
        // A decode step (one new token per sequence, each wanting its
        // logits) goes through the backend's step hook, which may replay a
        // recording of it.
        let decode = batch
            .iter()
            .all(|s| s.tokens.len() == 1 && s.logits == LogitsWanted::Last);
        let out = if decode {
            let mut body = |pool: &mut B::KvPool| self.logits(pool, &ids, &spans, &wanted_rows);
            b.decode_step(&ids, &spans, pool, &mut body, sampling)?
        } else {
            let h = self.hidden(pool, &ids, &spans)?;
            if wanted_rows.is_empty() {
                StepOutput::default()
            } else {
                let selected = b.gather_rows(&h, &wanted_rows)?;
                let mut logits = b.linear(&selected, self.output_projection())?;
                finish_logits(b, &mut logits, sampling)?
            }
        };
        for seq in batch.iter_mut() {
            seq.kv.len += seq.tokens.len();
        }
        let rows = batch
            .iter()
            .zip(&spans)
            .map(|(seq, span)| match seq.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => span.len(),
            })
            .collect();
        Ok((out, rows))
    }
}
