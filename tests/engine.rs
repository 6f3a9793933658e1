//! The batching engine on SmolLM2, through its handle only: greedy output
//! equals the single-sequence path (`generate`, which runs no scheduler and
//! one contiguous cache), batched or alone, with preemption, with prefix
//! reuse; cancellation and every finished request free their KV blocks.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{model_dir, smollm2};
use lmq_turbomind::backend::cpu::CpuBackend;
use lmq_turbomind::engine::{
    spawn_engine, EngineConfig, EngineEvent, EngineHandle, EngineRequest, KvCacheSize, SubmitError,
    Usage,
};
use lmq_turbomind::generate::{generate, FinishReason, GenerateRequest};
use lmq_turbomind::model::Model;
use lmq_turbomind::sampling::SamplingParams;
use lmq_turbomind::tokenizer::Tokenizer;

fn engine(config: EngineConfig) -> EngineHandle {
    let dir = model_dir();
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir).unwrap());
    let model = Model::load(&dir, CpuBackend::new()).unwrap();
    spawn_engine(model, tokenizer, &config).unwrap()
}

fn small_config() -> EngineConfig {
    EngineConfig {
        kv_cache: KvCacheSize::Bytes(64 << 20),
        ..Default::default()
    }
}

struct Outcome {
    tokens: Vec<u32>,
    text: String,
    reason: FinishReason,
    usage: Usage,
    logprobs: Vec<lmq_turbomind::engine::TokenLogprobs>,
}

/// Reads a stream to its end.
fn collect(mut stream: lmq_turbomind::engine::RequestStream) -> Outcome {
    let mut out = Outcome {
        tokens: Vec::new(),
        text: String::new(),
        reason: FinishReason::Length,
        usage: Usage::default(),
        logprobs: Vec::new(),
    };
    loop {
        match stream.blocking_next() {
            Some(EngineEvent::Token { id, text, logprobs }) => {
                out.tokens.push(id);
                out.text.push_str(&text);
                out.logprobs.extend(logprobs);
            }
            Some(EngineEvent::Finished {
                reason,
                text,
                usage,
                ..
            }) => {
                out.text.push_str(&text);
                out.reason = reason;
                out.usage = usage;
                return out;
            }
            Some(EngineEvent::Failed(e)) => panic!("request failed: {e}"),
            None => panic!("stream ended without a final event"),
        }
    }
}

/// Submits every request before reading any, so that they batch.
fn run_batched(handle: &EngineHandle, requests: Vec<EngineRequest>) -> Vec<Outcome> {
    let streams: Vec<_> = requests
        .into_iter()
        .map(|r| handle.submit(r).unwrap())
        .collect();
    streams.into_iter().map(collect).collect()
}

/// Greedy tokens from the single-sequence path.
fn reference_tokens(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    reference_tokens_with(prompt, max_tokens, SamplingParams::default())
}

/// Tokens from the single-sequence path with `sampling`.
fn reference_tokens_with(prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> Vec<u32> {
    let (model, tokenizer) = smollm2();
    let out = generate(
        model,
        tokenizer,
        &GenerateRequest {
            prompt_ids: prompt.to_vec(),
            max_tokens,
            sampling,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: true,
        },
        |_| {},
    )
    .unwrap();
    out.token_ids
}

/// Sixteen prompts of different lengths (17 to 62 tokens) from real text.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    let (_, tokenizer) = smollm2();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ppl_text.txt"),
    )
    .unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    (0..n)
        .map(|i| {
            let start = i * 37;
            ids[start..start + 17 + (i * 3) % 46].to_vec()
        })
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        ignore_eos: true,
        ..EngineRequest::greedy(prompt, max_tokens)
    }
}

/// Waits for the engine's published stats to satisfy `ok`.
fn wait_for_stats(handle: &EngineHandle, ok: impl Fn(&lmq_turbomind::engine::EngineStats) -> bool) {
    let t0 = Instant::now();
    while !ok(&handle.stats()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "engine stats never settled: {:?}",
            handle.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sixteen_batched_greedy_requests_match_each_alone() {
    let handle = engine(small_config());
    let prompts = prompts(16);
    const N: usize = 20;
    let batched = run_batched(
        &handle,
        prompts.iter().map(|p| greedy(p.clone(), N)).collect(),
    );
    for (i, (p, out)) in prompts.iter().zip(&batched).enumerate() {
        let alone = collect(handle.submit(greedy(p.clone(), N)).unwrap());
        assert_eq!(
            out.tokens, alone.tokens,
            "request {i}: batched differs from alone"
        );
        assert_eq!(
            out.tokens,
            reference_tokens(p, N),
            "request {i}: engine differs from the single-sequence path"
        );
        assert_eq!(out.reason, FinishReason::Length);
        assert_eq!(out.usage.completion_tokens, N);
        assert_eq!(out.usage.prompt_tokens, p.len());
    }
    wait_for_stats(&handle, |s| s.kv_blocks_used == 0 && s.running == 0);
    assert!(handle.stats().kv_blocks_peak > 16);
}

/// Penalties in the engine come from counts it keeps per request as
/// tokens are accepted; the single-sequence path counts the whole history
/// every token. Both must pick the same tokens (greedy, so that only the
/// penalties decide), batched. Two settings: strong penalties of every
/// kind (new tokens' first counts decide), and a mild frequency penalty
/// alone (tokens repeat, so that their running counts decide).
#[test]
fn penalized_batched_requests_match_the_single_sequence_path() {
    let handle = engine(small_config());
    let prompts = prompts(4);
    const N: usize = 24;
    let settings = [
        SamplingParams {
            repetition_penalty: 1.2,
            presence_penalty: 0.8,
            frequency_penalty: 1.2,
            ..SamplingParams::default()
        },
        SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::default()
        },
    ];
    for params in settings {
        let batched = run_batched(
            &handle,
            prompts
                .iter()
                .map(|p| EngineRequest {
                    sampling: params.clone(),
                    ..greedy(p.clone(), N)
                })
                .collect(),
        );
        let mut changed = 0;
        for (i, (p, out)) in prompts.iter().zip(&batched).enumerate() {
            assert_eq!(
                out.tokens,
                reference_tokens_with(p, N, params.clone()),
                "{params:?}, request {i}: engine tokens differ from the single-sequence path"
            );
            changed += usize::from(out.tokens != reference_tokens(p, N));
        }
        assert!(
            changed > 0,
            "{params:?}: the penalties changed no request's tokens"
        );
    }
}

#[test]
fn preempted_requests_are_recomputed_to_the_same_tokens() {
    // 12 blocks of 16 positions: four requests of 57 positions each need
    // 16 blocks together, so the newest get preempted and recomputed.
    let config = EngineConfig {
        block_len: 16,
        ..small_config()
    };
    let dir = model_dir();
    let model = Model::load(&dir, CpuBackend::new()).unwrap();
    let per_block = model.kv_bytes_per_block(16) as u64;
    let handle = spawn_engine(
        model,
        Arc::new(Tokenizer::from_dir(&dir).unwrap()),
        &EngineConfig {
            kv_cache: KvCacheSize::Bytes(12 * per_block),
            ..config
        },
    )
    .unwrap();
    assert_eq!(handle.info().num_blocks, 12);
    let prompts: Vec<Vec<u32>> = prompts(4).into_iter().map(|p| p[..17].to_vec()).collect();
    let out = run_batched(
        &handle,
        prompts.iter().map(|p| greedy(p.clone(), 40)).collect(),
    );
    for (p, o) in prompts.iter().zip(&out) {
        assert_eq!(o.tokens, reference_tokens(p, 40));
    }
    let stats = handle.stats();
    assert!(stats.preemptions > 0, "the pool was big enough: {stats:?}");
    wait_for_stats(&handle, |s| s.kv_blocks_used == 0);
}

#[test]
fn a_reused_prefix_gives_the_same_tokens() {
    let handle = engine(EngineConfig {
        block_len: 16,
        prefix_caching: true,
        ..small_config()
    });
    let p = prompts(16).pop().unwrap(); // 62 tokens: 3 full blocks.
    let first = collect(handle.submit(greedy(p.clone(), 12)).unwrap());
    let second = collect(handle.submit(greedy(p.clone(), 12)).unwrap());
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(second.usage.cached_tokens, 48);
    assert_eq!(first.tokens, second.tokens);
    assert_eq!(first.tokens, reference_tokens(&p, 12));
    let stats = handle.stats();
    assert_eq!(stats.prefix_cached_tokens, 48);
    wait_for_stats(&handle, |s| s.kv_blocks_used == 0 && s.kv_blocks_cached > 0);
}

#[test]
fn cancelling_a_stream_frees_its_blocks() {
    let handle = engine(small_config());
    let mut streams: Vec<_> = prompts(3)
        .into_iter()
        .map(|p| handle.submit(greedy(p, 400)).unwrap())
        .collect();
    // Let the first produce a token, then drop it mid-generation.
    let mut first = streams.remove(0);
    assert!(matches!(
        first.blocking_next(),
        Some(EngineEvent::Token { .. })
    ));
    drop(first);
    wait_for_stats(&handle, |s| s.running == 2);
    drop(streams);
    wait_for_stats(&handle, |s| s.running == 0 && s.kv_blocks_used == 0);
    assert_eq!(handle.outstanding(), 0);
}

#[test]
fn stop_strings_limits_and_logprobs() {
    let handle = engine(small_config());
    let p = prompts(1).pop().unwrap();
    let free = collect(handle.submit(greedy(p.clone(), 16)).unwrap());
    // Stop at the text of the third generated token onwards.
    let (_, tokenizer) = smollm2();
    let head = tokenizer.decode(&free.tokens[..2], true).unwrap();
    let stop = tokenizer.decode(&free.tokens[2..4], true).unwrap();
    assert!(!stop.trim().is_empty());
    let stopped = collect(
        handle
            .submit(EngineRequest {
                stop_strings: vec![stop.clone()],
                ..greedy(p.clone(), 16)
            })
            .unwrap(),
    );
    assert_eq!(stopped.reason, FinishReason::Stop);
    // Everything before the stop string's first occurrence, nothing after.
    let cut = free.text.find(&stop).unwrap();
    assert_eq!(stopped.text, free.text[..cut]);
    assert!(cut <= head.len() + 1, "{cut} vs {head:?}");

    let with_lp = collect(
        handle
            .submit(EngineRequest {
                logprobs: Some(3),
                ..greedy(p.clone(), 4)
            })
            .unwrap(),
    );
    assert_eq!(with_lp.tokens, free.tokens[..4]);
    assert_eq!(with_lp.logprobs.len(), 4);
    for (lp, &t) in with_lp.logprobs.iter().zip(&with_lp.tokens) {
        // Greedy picks the most likely token, so it leads the top list.
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, t);
        assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
        assert!(lp.logprob <= 0.0 && lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mass: f32 = lp.top.iter().map(|x| x.1.exp()).sum();
        assert!(mass <= 1.0 + 1e-5);
    }
}

#[test]
fn bad_requests_and_a_full_queue_are_refused() {
    let handle = engine(EngineConfig {
        max_queued_requests: 2,
        ..small_config()
    });
    let p = prompts(1).pop().unwrap();
    let err = |r: EngineRequest| handle.submit(r).err().expect("accepted");
    assert!(matches!(
        err(greedy(Vec::new(), 4)),
        SubmitError::InvalidRequest(_)
    ));
    let long = vec![1u32; handle.info().max_context];
    assert!(matches!(
        err(greedy(long, 4)),
        SubmitError::PromptTooLong { .. }
    ));
    let bad_top_p = EngineRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.0,
            ..Default::default()
        },
        ..greedy(p.clone(), 4)
    };
    assert!(err(bad_top_p).to_string().contains("top_p"));
    assert!(err(greedy(vec![u32::MAX], 4))
        .to_string()
        .contains("vocabulary"));
    let a = handle.submit(greedy(p.clone(), 50)).unwrap();
    let b = handle.submit(greedy(p.clone(), 50)).unwrap();
    assert!(matches!(
        err(greedy(p.clone(), 4)),
        SubmitError::QueueFull { limit: 2 }
    ));
    drop((a, b));
    let t0 = Instant::now();
    while handle.outstanding() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "cancels never landed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_stats(&handle, |s| s.running == 0 && s.waiting == 0);
    collect(handle.submit(greedy(p, 2)).unwrap());
}
