//! `lmq import-gguf`: a GGUF file (llama.cpp's format) becomes a Hugging
//! Face folder the engine loads: fp16 safetensors with Hugging Face names,
//! `config.json`, `generation_config.json`, `tokenizer.json` and
//! `tokenizer_config.json` with the chat template.
//!
//! Tensors are dequantized one at a time with candle's GGUF reader, and
//! written in shards, so memory stays bounded by one shard.

pub mod names;
pub mod tokenizer;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::Device;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::output::{ShardWriter, StagedDir, DEFAULT_SHARD_BYTES};
use lmq_turbomind::arch::{self, Architecture};

/// What was imported.
#[derive(Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    pub parameters: usize,
    pub shards: usize,
}

struct Gguf {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl Gguf {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| gguf_error(path, e))?;
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.content.metadata.get(key)
    }

    fn u64(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().map(|x| x as u64))
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.u64(key)
            .ok_or_else(|| self.err(format!("metadata key {key} is missing")))
    }

    fn f64(&self, key: &str) -> Option<f64> {
        let v = self.get(key)?;
        v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key)?.to_string().ok().cloned()
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.to_bool().ok()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .to_vec()
                .map_err(|e| self.err(format!("{key}: {e}")))?
                .iter()
                .map(|x| {
                    x.to_string()
                        .cloned()
                        .map_err(|e| self.err(format!("{key}: {e}")))
                })
                .collect(),
        }
    }

    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .to_vec()
                .map_err(|e| self.err(format!("{key}: {e}")))?
                .iter()
                .map(|x| x.to_i32().map_err(|e| self.err(format!("{key}: {e}"))))
                .collect(),
        }
    }

    /// Reads and dequantizes one tensor to f32, with its Hugging Face shape.
    fn tensor_f32(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| gguf_error(&self.path, e))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| gguf_error(&self.path, e))?;
        let shape = t.dims().to_vec();
        let data = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| gguf_error(&self.path, e))?;
        Ok((data, shape))
    }
}

fn gguf_error(path: &Path, e: candle_core::Error) -> Error {
    // candle appends a captured backtrace to some messages; the first line
    // is the message.
    let full = e.to_string();
    let text = full.lines().next().unwrap_or_default();
    let message = if let Some(id) = text.strip_prefix("unknown dtype for tensor ") {
        format!(
            "unsupported GGUF tensor type (ggml type id {id}); supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K"
        )
    } else if text.contains("magic") {
        format!("not a GGUF file (wrong magic): {text}")
    } else {
        format!("invalid or truncated GGUF file: {text}")
    };
    Error::Gguf {
        path: path.to_path_buf(),
        message,
    }
}

/// The engine architecture for a GGUF `general.architecture`.
fn architecture(name: &str) -> Option<(&'static Architecture, &'static str)> {
    let (model_type, class) = match name {
        "llama" => ("llama", "LlamaForCausalLM"),
        "mistral" => ("mistral", "MistralForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        _ => return None,
    };
    arch::lookup(&[class.to_string()], Some(model_type)).map(|a| (a, class))
}

/// Converts `gguf_path` into a model folder at `out_dir`.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, overwrite: bool) -> Result<ImportSummary> {
    let mut g = Gguf::open(gguf_path)?;
    let arch_name = g
        .string("general.architecture")
        .ok_or_else(|| g.err("metadata key general.architecture is missing"))?;
    let (arch, class) = architecture(&arch_name).ok_or_else(|| {
        g.err(format!(
            "unsupported architecture {arch_name:?} (supported: llama, mistral, qwen2)"
        ))
    })?;
    if g.content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(g.err(
            "this GGUF carries per-frequency rope factors (rope_freqs, Llama 3.1 style), which import-gguf does not convert yet",
        ));
    }
    let key = |k: &str| format!("{arch_name}.{k}");
    let hidden = g.req_u64(&key("embedding_length"))? as usize;
    let heads = g.req_u64(&key("attention.head_count"))? as usize;
    let kv_heads = g
        .u64(&key("attention.head_count_kv"))
        .unwrap_or(heads as u64) as usize;
    let layers = g.req_u64(&key("block_count"))? as usize;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(g.err(format!(
            "attention.head_count {heads} and head_count_kv {kv_heads} must be positive, the first a multiple of the second"
        )));
    }
    let head_dim = g
        .u64(&key("attention.key_length"))
        .or_else(|| g.u64(&key("rope.dimension_count")))
        .unwrap_or((hidden / heads.max(1)) as u64) as usize;

    let vocab = tokenizer::GgufVocab {
        model: g
            .string("tokenizer.ggml.model")
            .unwrap_or_else(|| "gpt2".into()),
        pre: g.string("tokenizer.ggml.pre"),
        tokens: g.strings("tokenizer.ggml.tokens")?,
        token_types: g.ints("tokenizer.ggml.token_type")?,
        merges: g.strings("tokenizer.ggml.merges")?,
        bos_id: g.u64("tokenizer.ggml.bos_token_id").map(|x| x as u32),
        add_bos: g.bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
    };
    if vocab.tokens.is_empty() {
        return Err(g.err("the file has no tokenizer (tokenizer.ggml.tokens is missing)"));
    }
    let tokenizer_json = tokenizer::tokenizer_json(&vocab).map_err(|m| g.err(m))?;
    let eos_id = g.u64("tokenizer.ggml.eos_token_id").map(|x| x as u32);
    let vocab_size = g
        .u64(&key("vocab_size"))
        .map(|v| v as usize)
        .unwrap_or(vocab.tokens.len());
    let tied = !g.content.tensor_infos.contains_key("output.weight");

    let config = json!({
        "architectures": [class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": g.req_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": g.f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": g.f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": g.u64(&key("context_length")).unwrap_or(2048),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    });
    let token_text = |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize).cloned());
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": false,
        "bos_token": token_text(vocab.bos_id),
        "eos_token": token_text(eos_id),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = g.string("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = Value::String(t);
    }
    let generation_config = json!({"bos_token_id": vocab.bos_id, "eos_token_id": eos_id});

    let staged = StagedDir::new(out_dir, overwrite)?;
    staged.write_json("config.json", &config)?;
    staged.write_json("generation_config.json", &generation_config)?;
    staged.write_json("tokenizer.json", &tokenizer_json)?;
    staged.write_json("tokenizer_config.json", &tokenizer_config)?;

    // Tensors in a stable order (by HF name) so output is reproducible.
    let mut pending: Vec<(String, String)> = g
        .content
        .tensor_infos
        .keys()
        .filter_map(|n| names::hf_name(n, &arch.names).map(|hf| (hf, n.clone())))
        .collect();
    pending.sort();
    let unpermute = arch_name == "llama";
    let q_name = |suffix: &str| format!("{}.{suffix}", arch.names.q_proj);
    let k_name = |suffix: &str| format!("{}.{suffix}", arch.names.k_proj);

    let mut writer = ShardWriter::new(&staged, DEFAULT_SHARD_BYTES);
    let mut parameters = 0usize;
    let tensors = pending.len();
    for (hf, gguf_name) in pending {
        let (mut data, shape) = g.tensor_f32(&gguf_name)?;
        if let Some(bad) = data.iter().position(|x| !x.is_finite()) {
            return Err(g.err(format!(
                "tensor {gguf_name} holds a non-finite value at index {bad}"
            )));
        }
        if unpermute && shape.len() == 2 {
            let heads_for = if hf.ends_with(&q_name("weight")) {
                Some(heads)
            } else if hf.ends_with(&k_name("weight")) {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(h) = heads_for {
                if shape[0] % h != 0 || (shape[0] / h) % 2 != 0 {
                    return Err(g.err(format!(
                        "tensor {gguf_name} has {} rows, not an even number per head for {h} heads",
                        shape[0]
                    )));
                }
                data = names::unpermute_rows(&data, shape[0], shape[1], h);
            }
        }
        parameters += data.len();
        writer.push_f16(hf, shape, &data)?;
    }
    let shards = writer.finish()?;
    let out = staged.commit()?;
    Ok(ImportSummary {
        out_dir: out,
        architecture: class.to_string(),
        tensors,
        parameters,
        shards,
    })
}
