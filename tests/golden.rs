//! lmq against Hugging Face transformers on the same GGUF (fixtures written
//! by scripts/make_golden.py; see tests/fixtures/golden_meta.json for the
//! versions). The reference ran in fp32 on the GGUF's dequantized weights;
//! lmq runs fp32 on the same weights rounded to fp16 by import-gguf, which
//! is what the tolerances below allow for.

mod common;

use common::{fixture, floats, ids, smollm2};
use lmq_turbomind::generate::{generate, GenerateRequest};
use lmq_turbomind::model::LogitsWanted;
use lmq_turbomind::ppl::{perplexity, PplConfig};
use lmq_turbomind::sampling::SamplingParams;
use lmq_turbomind::tokenizer::ChatMessage;

/// Logits differ from the reference by at most this much (absolute). The
/// fp16 rounding of the weights gives a measured worst case of 0.024 over
/// the four prompts (2026-11-27); logits spread over about ±20.
const LOGIT_TOLERANCE: f32 = 0.06;

fn all_logits(prompt: &[u32]) -> Vec<f32> {
    let (model, _) = smollm2();
    let mut cache = model.new_solo_cache(prompt.len()).unwrap();
    model
        .forward_solo(&mut cache, prompt, LogitsWanted::All)
        .unwrap()
}

#[test]
fn tokenizer_ids_match_transformers() {
    let (_, tokenizer) = smollm2();
    let golden = fixture("golden_tokenizer.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tokenizer.encode(text).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        // Decoding is the inverse of encoding for these strings.
        assert_eq!(tokenizer.decode(&got, false).unwrap(), text);
    }
    assert!(
        failures.is_empty(),
        "tokenizer mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn chat_template_matches_transformers() {
    let (_, tokenizer) = smollm2();
    let golden = fixture("golden_tokenizer.json");
    let chat = &golden["chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    let rendered = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    assert_eq!(tokenizer.encode(&rendered).unwrap(), ids(&chat["ids"]));
}

#[test]
fn logits_match_transformers() {
    let (model, _) = smollm2();
    let vocab = model.config.vocab_size;
    let golden = fixture("golden_logits.json");
    let prompts = golden["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 3);
    for p in prompts {
        let prompt = ids(&p["ids"]);
        let logits = all_logits(&prompt);
        let n = prompt.len();
        let last = &logits[(n - 1) * vocab..n * vocab];
        let want_last = floats(&p["last_logits"]);
        assert_eq!(want_last.len(), vocab);
        let max_diff = last
            .iter()
            .zip(&want_last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{}: last-position max abs logit diff {max_diff}", p["text"]);
        assert!(
            max_diff < LOGIT_TOLERANCE,
            "{}: last-position max |Δlogit| = {max_diff}",
            p["text"]
        );
        for pos in p["positions"].as_array().unwrap() {
            let at = pos["pos"].as_u64().unwrap() as usize;
            let row = &logits[at * vocab..(at + 1) * vocab];
            let top_ids = ids(&pos["top20_ids"]);
            let top_logits = floats(&pos["top20_logits"]);
            for (&id, &want) in top_ids.iter().zip(&top_logits) {
                let got = row[id as usize];
                assert!(
                    (got - want).abs() < LOGIT_TOLERANCE,
                    "position {at}, token {id}: {got} vs {want}"
                );
            }
            // Our top-20 is the reference's, in order, except where two
            // reference logits are closer than the tolerance.
            let mut ours: Vec<u32> = (0..vocab as u32).collect();
            ours.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            for (rank, (&mine, &theirs)) in ours.iter().zip(&top_ids).enumerate() {
                if mine != theirs {
                    let gap = (row[mine as usize] - row[theirs as usize]).abs();
                    assert!(
                        gap < 2.0 * LOGIT_TOLERANCE,
                        "position {at}, rank {rank}: {mine} vs {theirs}"
                    );
                }
            }
        }
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    let (model, tokenizer) = smollm2();
    let golden = fixture("golden_greedy.json");
    for case in golden["cases"].as_array().unwrap() {
        let want = ids(&case["generated_ids"]);
        let request = GenerateRequest {
            prompt_ids: ids(&case["prompt_ids"]),
            max_tokens: want.len(),
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
            stop_strings: vec![],
            ignore_eos: true,
        };
        let out = generate(model, tokenizer, &request, |_| {}).unwrap();
        assert_eq!(out.token_ids, want, "prompt {:?}", case["prompt_text"]);
    }
}

#[test]
fn perplexity_matches_transformers() {
    let (model, tokenizer) = smollm2();
    let golden = fixture("golden_ppl.json");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ppl_text.txt"
    ))
    .unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    for run in golden["runs"].as_array().unwrap() {
        let config = PplConfig {
            ctx: run["ctx"].as_u64().unwrap() as usize,
            max_windows: Some(run["windows"].as_u64().unwrap() as usize),
        };
        let result = perplexity(model, &ids, config, |_, _| {}).unwrap();
        let want = run["ppl"].as_f64().unwrap();
        assert_eq!(result.tokens as u64, run["tokens"].as_u64().unwrap());
        let rel = (result.ppl - want).abs() / want;
        assert!(
            rel < 0.005,
            "ctx {}: ppl {} vs {want} ({:.3}%)",
            config.ctx,
            result.ppl,
            rel * 100.0
        );
    }
}
