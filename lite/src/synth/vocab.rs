//! The tokenizer of a synthetic checkpoint: a byte-level BPE vocabulary of
//! exactly `vocab_size` tokens, so that any text encodes, every id the
//! model can sample decodes to bytes, and no id exceeds the embedding.
//!
//! Ids 0, 1 and 2 are `<unk>`, `<s>` (BOS) and `</s>` (EOS), as in Llama 2;
//! ids 3..259 are the 256 bytes in byte order (where Llama 2 keeps its
//! `<0xNN>` fallback tokens); the rest are merges, generated in a fixed
//! order: first every pair of bytes, common English characters first
//! (space, lowercase, uppercase, digits, punctuation, then the rest), then
//! a pair followed by a byte. The document itself is written by the GGUF
//! importer's byte-level BPE builder, so the two share one format.

use std::collections::HashSet;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gguf::tokenizer::{tokenizer_json, GgufVocab};

/// The special tokens, by id.
pub const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// The smallest vocabulary: the special tokens and the 256 bytes.
pub const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

/// The largest vocabulary the merge schedule can fill (pairs, then a pair
/// followed by a byte).
pub const MAX_VOCAB: usize = MIN_VOCAB + 256 * 256 + 256 * 256 * 256;

/// llama.cpp's token type for control tokens, which the GGUF builder turns
/// into special added tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_NORMAL: i32 = 1;

/// A Zephyr-style chat template over plain text markers, so that `--chat`
/// and the chat endpoint work; EOS ends each turn.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// GPT-2's byte-to-character map, which byte-level BPE vocabularies are
/// written in: printable bytes stand for themselves, the others for
/// characters from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        out[b as usize] = if printable(b) {
            b as char
        } else {
            let c = char::from_u32(next).unwrap_or('\u{fffd}');
            next += 1;
            c
        };
    }
    out
}

/// Bytes from most to least common in English text, so that the first
/// merges are the pairs real text uses.
fn ranked_bytes() -> Vec<u8> {
    let mut order: Vec<u8> = vec![b' '];
    order.extend(b'a'..=b'z');
    order.extend(b'A'..=b'Z');
    order.extend(b'0'..=b'9');
    order.extend((b'!'..=b'~').filter(|b| !b.is_ascii_alphanumeric()));
    order.push(b'\n');
    let seen: HashSet<u8> = order.iter().copied().collect();
    order.extend((0..=255u8).filter(|b| !seen.contains(b)));
    order
}

/// Pairs of ranks `(left, right)` over `n` symbols in shells: every pair
/// among the first `m` symbols comes before any pair involving symbol `m`.
fn shell_pairs(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).flat_map(|m| {
        (0..m)
            .flat_map(move |i| [(i, m), (m, i)])
            .chain(std::iter::once((m, m)))
    })
}

/// The token strings and merges of a vocabulary of `vocab_size` tokens.
fn tokens_and_merges(vocab_size: usize) -> (Vec<String>, Vec<String>) {
    let chars = byte_chars();
    let ranked: Vec<String> = ranked_bytes()
        .into_iter()
        .map(|b| chars[b as usize].to_string())
        .collect();
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    // A merged string could spell a special token ("<s" + ">"); skipping it
    // keeps every vocabulary entry unique.
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::with_capacity(vocab_size.saturating_sub(tokens.len()));
    let pairs: Vec<(String, String)> = shell_pairs(256)
        .map(|(a, b)| (ranked[a].clone(), ranked[b].clone()))
        .collect();
    let triples = pairs.iter().flat_map(|(a, b)| {
        let pair = format!("{a}{b}");
        ranked.iter().map(move |c| (pair.clone(), c.clone()))
    });
    for (left, right) in pairs.iter().cloned().chain(triples) {
        if tokens.len() >= vocab_size {
            break;
        }
        let merged = format!("{left}{right}");
        if seen.insert(merged.clone()) {
            merges.push(format!("{left} {right}"));
            tokens.push(merged);
        }
    }
    (tokens, merges)
}

/// Checks that a vocabulary of this size can be built.
pub fn check_vocab_size(vocab_size: usize) -> Result<()> {
    if !(MIN_VOCAB..=MAX_VOCAB).contains(&vocab_size) {
        return Err(Error::Invalid {
            message: format!(
                "--vocab-size {vocab_size}: a synthetic byte-level vocabulary needs {MIN_VOCAB} to {MAX_VOCAB} tokens (3 special tokens and 256 bytes at least)"
            ),
        });
    }
    Ok(())
}

/// `tokenizer.json` for a vocabulary of exactly `vocab_size` tokens.
pub fn tokenizer_json_for(vocab_size: usize) -> Result<Value> {
    check_vocab_size(vocab_size)?;
    let (tokens, merges) = tokens_and_merges(vocab_size);
    let token_types = (0..tokens.len())
        .map(|id| {
            if id < SPECIAL_TOKENS.len() {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_NORMAL
            }
        })
        .collect();
    let vocab = GgufVocab {
        model: "gpt2".into(),
        pre: None,
        tokens,
        token_types,
        merges,
        bos_id: Some(BOS_ID),
        add_bos: true,
    };
    tokenizer_json(&vocab).map_err(|message| Error::Invalid { message })
}

/// `tokenizer_config.json`: the special tokens and the chat template.
pub fn tokenizer_config_json(max_position_embeddings: usize) -> Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": SPECIAL_TOKENS[BOS_ID as usize],
        "eos_token": SPECIAL_TOKENS[EOS_ID as usize],
        "unk_token": SPECIAL_TOKENS[0],
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHAT_TEMPLATE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vocab_size: usize) -> tokenizers::Tokenizer {
        let json = tokenizer_json_for(vocab_size).expect("builds");
        let text = serde_json::to_string(&json).expect("serializes");
        tokenizers::Tokenizer::from_bytes(text.as_bytes()).expect("tokenizers reads it")
    }

    #[test]
    fn vocabulary_has_exactly_the_requested_size() {
        for size in [MIN_VOCAB, 512, 32000, 70000] {
            let t = load(size);
            assert_eq!(t.get_vocab_size(true), size, "vocab {size}");
            // Every id decodes, none to nothing but the specials.
            for id in [3u32, size as u32 - 1] {
                assert!(t.id_to_token(id).is_some(), "id {id} of {size}");
            }
        }
    }

    #[test]
    fn text_round_trips_and_merges_apply() {
        let t = load(32000);
        let text = "The quick brown fox, ünïcödé and\ttabs.\n";
        let enc = t.encode(text, false).expect("encodes");
        assert!(enc.get_ids().iter().all(|&id| (id as usize) < 32000));
        // Pairs merge, so there are fewer tokens than bytes.
        assert!(enc.get_ids().len() < text.len());
        assert_eq!(t.decode(enc.get_ids(), true).expect("decodes"), text);
        // The post-processor adds BOS; literal specials map to their ids.
        let with_bos = t.encode("hi", true).expect("encodes");
        assert_eq!(with_bos.get_ids()[0], BOS_ID);
        assert_eq!(
            t.encode("</s>", false).expect("encodes").get_ids(),
            [EOS_ID]
        );
    }

    #[test]
    fn out_of_range_sizes_are_refused() {
        assert!(tokenizer_json_for(MIN_VOCAB - 1).is_err());
        assert!(tokenizer_json_for(MAX_VOCAB + 1).is_err());
    }
}
