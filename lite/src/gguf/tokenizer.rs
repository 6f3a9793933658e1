//! Builds a Hugging Face `tokenizer.json` from GGUF tokenizer metadata.
//!
//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are
//! supported with the pre-tokenizers llama.cpp names in
//! `tokenizer.ggml.pre`; each maps to the pre-tokenizer of the original
//! Hugging Face tokenizer.

use serde_json::{json, Value};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's pre-tokenization regex, which `ByteLevel(use_regex=true)` uses.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer fields of a GGUF file.
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_isolated(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// Pre-tokenizer and normalizer for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Result<(Value, Value), String> {
    let seq = |items: Vec<Value>| json!({"type": "Sequence", "pretokenizers": items});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (byte_level(true), Value::Null),
        "smollm" | "starcoder" => (
            seq(vec![json!({"type": "Digits", "individual_digits": true}), byte_level(true)]),
            Value::Null,
        ),
        "llama-bpe" | "llama3" | "smaug-bpe" => (seq(vec![split_isolated(LLAMA3_REGEX), byte_level(false)]), Value::Null),
        "qwen2" => (
            seq(vec![split_isolated(QWEN2_REGEX), byte_level(false)]),
            json!({"type": "NFC"}),
        ),
        other => {
            return Err(format!(
                "tokenizer pre-tokenizer {other:?} is not supported (supported: gpt2, smollm, starcoder, llama-bpe, qwen2)"
            ))
        }
    })
}

/// The `tokenizer.json` document for a GGUF vocabulary.
pub fn tokenizer_json(v: &GgufVocab) -> Result<Value, String> {
    if v.model != "gpt2" {
        return Err(format!(
            "tokenizer model {:?} is not supported by import-gguf (supported: gpt2 byte-level BPE)",
            v.model
        ));
    }
    if !v.token_types.is_empty() && v.token_types.len() != v.tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            v.token_types.len(),
            v.tokens.len()
        ));
    }
    let (pre, normalizer) = pre_tokenizer(v.pre.as_deref().unwrap_or("default"))?;
    let mut vocab = serde_json::Map::with_capacity(v.tokens.len());
    for (id, tok) in v.tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
    }
    let added: Vec<Value> = v
        .tokens
        .iter()
        .enumerate()
        .filter_map(|(id, tok)| {
            let ty = v.token_types.get(id).copied().unwrap_or(1);
            (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED).then(|| {
                json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
                })
            })
        })
        .collect();
    if let Some(bos) = v.bos_id.filter(|&b| b as usize >= v.tokens.len()) {
        return Err(format!(
            "tokenizer.ggml.bos_token_id {bos} is outside the vocabulary of {} tokens",
            v.tokens.len()
        ));
    }
    let post_processor = match (v.add_bos, v.bos_id) {
        (true, Some(bos)) => {
            let bos_tok = v.tokens.get(bos as usize).cloned().unwrap_or_default();
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok.clone(): {"id": bos_tok, "ids": [bos], "tokens": [v.tokens[bos as usize]]}},
            })
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            // Llama 3's tokenizer looks whole pre-tokens up in the vocabulary
            // before merging; the others always merge.
            "ignore_merges": matches!(v.pre.as_deref(), Some("llama-bpe" | "llama3" | "smaug-bpe")),
            "vocab": vocab, "merges": v.merges,
        },
    }))
}
