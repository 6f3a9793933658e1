//! GGUF tensor names (llama.cpp's) mapped onto the Hugging Face names of
//! the engine's architecture table.

use lmq_turbomind::arch::WeightNames;

/// The Hugging Face name of a GGUF tensor, or `None` for tensors the
/// checkpoint does not carry (such as precomputed rope tables).
pub fn hf_name(gguf: &str, names: &WeightNames) -> Option<String> {
    let (module, suffix) = gguf.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let global = match module {
        "token_embd" => Some(names.embed_tokens),
        "output_norm" => Some(names.final_norm),
        "output" => Some(names.lm_head),
        _ => None,
    };
    if let Some(g) = global {
        return Some(format!("{g}.{suffix}"));
    }
    let rest = module.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf_module = match part {
        "attn_norm" => names.input_norm,
        "ffn_norm" => names.post_attention_norm,
        "attn_q" => names.q_proj,
        "attn_k" => names.k_proj,
        "attn_v" => names.v_proj,
        "attn_output" => names.o_proj,
        "ffn_gate" => names.gate_proj,
        "ffn_up" => names.up_proj,
        "ffn_down" => names.down_proj,
        _ => return None,
    };
    Some(format!("{}.{suffix}", names.layer(layer, hf_module)))
}

/// Undoes llama.cpp's permutation of Q/K rows for Llama models.
///
/// llama.cpp stores each head's rows interleaved (pairs of rotary channels
/// adjacent, for its "normal" rope); Hugging Face stores the first halves
/// then the second halves. Row `2j + s` of a GGUF head is row
/// `s·(head_dim/2) + j` of the Hugging Face head.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let src = h * head_dim + 2 * j + s;
                let dst = h * head_dim + s * half + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute` from its converter, written out independently
    /// (reshape to [heads, 2, half, cols], swap axes 1 and 2).
    fn permute_like_llama_cpp(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let half = rows / heads / 2;
        let mut out = vec![0f32; data.len()];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..half {
                    let src = (h * 2 + s) * half + j; // [h, s, j]
                    let dst = (h * half + j) * 2 + s; // [h, j, s]
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&data[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        for (rows, cols, heads) in [(8, 3, 1), (24, 5, 3), (64, 2, 4)] {
            let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let permuted = permute_like_llama_cpp(&data, rows, cols, heads);
            assert_ne!(permuted, data);
            assert_eq!(unpermute_rows(&permuted, rows, cols, heads), data);
        }
    }

    #[test]
    fn names_map_to_hf() {
        let n = &lmq_turbomind::arch::ARCHITECTURES[0].names;
        assert_eq!(
            hf_name("token_embd.weight", n).unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            hf_name("blk.12.attn_q.bias", n).unwrap(),
            "model.layers.12.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight", n).unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight", n), None);
    }
}
