//! A minimal GGUF writer for tests, written from the GGUF specification
//! (ggml/docs/gguf.md), independent of the reader under test.
#![allow(dead_code)]

pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

pub struct GgufTensor {
    pub name: String,
    /// Hugging Face order (outermost first); written reversed as GGUF `ne`.
    pub shape: Vec<usize>,
    /// ggml type id (0 = F32).
    pub ggml_type: u32,
    pub data: Vec<u8>,
    /// Overrides the data offset (to point past the end of the file).
    pub offset_override: Option<u64>,
}

impl GgufTensor {
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        GgufTensor {
            name: name.into(),
            shape: shape.to_vec(),
            ggml_type: 0,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            offset_override: None,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub fn write_gguf(metadata: &[(&str, Meta)], tensors: &[GgufTensor]) -> Vec<u8> {
    const ALIGN: usize = 32;
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(*v as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut out, s);
                }
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(t.offset_override.unwrap_or(offset).to_le_bytes());
        offsets.push(offset);
        offset += t.data.len().div_ceil(ALIGN) as u64 * ALIGN as u64;
    }
    while out.len() % ALIGN != 0 {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while out.len() % ALIGN != 0 {
            out.push(0);
        }
    }
    out
}

/// llama.cpp's Q/K permutation for Llama (its converter's `permute`):
/// reshape rows to [heads, 2, head_dim/2], swap the last two axes.
pub fn llama_cpp_permute(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let src = (h * 2 + s) * half + j;
                let dst = (h * half + j) * 2 + s;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Metadata and tensors of a tiny Llama GGUF with a byte-level vocabulary
/// of single characters. Tensor values are small multiples of 1/64, exact
/// in fp16. Returns the file and the Hugging Face-layout q_proj of layer 0.
pub fn tiny_llama(arch: &str) -> (Vec<(&'static str, Meta)>, Vec<GgufTensor>, Vec<f32>) {
    let (hidden, heads, kv_heads, inter, vocab) = (8usize, 2usize, 1usize, 16usize, 40usize);
    let head_dim = hidden / heads;
    let val = |seed: usize, n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 31 + seed * 17) % 23) as f32 - 11.0) / 64.0)
            .collect()
    };
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    for c in "abcdefghijklmnopqrstuvwxyz .,!?".chars() {
        tokens.push(if c == ' ' { "Ġ".into() } else { c.to_string() });
    }
    tokens.truncate(vocab);
    while tokens.len() < vocab {
        tokens.push(format!("x{}", tokens.len()));
    }
    let mut types = vec![1i32; vocab];
    types[..3].fill(3);
    let metadata = vec![
        ("general.architecture", Meta::Str(arch.into())),
        ("llama.embedding_length", Meta::U32(hidden as u32)),
        ("llama.attention.head_count", Meta::U32(heads as u32)),
        ("llama.attention.head_count_kv", Meta::U32(kv_heads as u32)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.feed_forward_length", Meta::U32(inter as u32)),
        ("llama.context_length", Meta::U32(64)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(vec![])),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.chat_template", Meta::Str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}".into())),
    ];
    let q_hf = val(1, hidden * hidden);
    let k_hf = val(2, head_dim * kv_heads * hidden);
    let tensors = vec![
        GgufTensor::f32(
            "token_embd.weight",
            &[vocab, hidden],
            &val(0, vocab * hidden),
        ),
        GgufTensor::f32("output_norm.weight", &[hidden], &vec![1.0; hidden]),
        GgufTensor::f32("blk.0.attn_norm.weight", &[hidden], &vec![1.0; hidden]),
        GgufTensor::f32("blk.0.ffn_norm.weight", &[hidden], &vec![1.0; hidden]),
        GgufTensor::f32(
            "blk.0.attn_q.weight",
            &[hidden, hidden],
            &llama_cpp_permute(&q_hf, hidden, hidden, heads),
        ),
        GgufTensor::f32(
            "blk.0.attn_k.weight",
            &[head_dim * kv_heads, hidden],
            &llama_cpp_permute(&k_hf, head_dim * kv_heads, hidden, kv_heads),
        ),
        GgufTensor::f32(
            "blk.0.attn_v.weight",
            &[head_dim * kv_heads, hidden],
            &val(3, head_dim * kv_heads * hidden),
        ),
        GgufTensor::f32(
            "blk.0.attn_output.weight",
            &[hidden, hidden],
            &val(4, hidden * hidden),
        ),
        GgufTensor::f32(
            "blk.0.ffn_gate.weight",
            &[inter, hidden],
            &val(5, inter * hidden),
        ),
        GgufTensor::f32(
            "blk.0.ffn_up.weight",
            &[inter, hidden],
            &val(6, inter * hidden),
        ),
        GgufTensor::f32(
            "blk.0.ffn_down.weight",
            &[hidden, inter],
            &val(7, inter * hidden),
        ),
    ];
    (metadata, tensors, q_hf)
}
