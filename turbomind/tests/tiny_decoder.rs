//! End-to-end checks of the one decoder (`model::Model` on the CPU backend)
//! on tiny, seeded random checkpoints written to a temporary folder.
//!
//! Every check compares lmq against something independent of the code
//! under test:
//! - an f64 reference of the Hugging Face Llama/Qwen2 forward written here,
//!   index by index, from the HF modeling code (not from lmq's backend);
//! - lmq itself along another path (incremental decode vs one-shot
//!   prefill, batched vs alone).
//!
//! (Bad checkpoints are in `tiny_decoder_errors.rs`.)
//!
//! Errors are measured as `|got − want| / (1 + |want|)`, i.e. a test with
//! tolerance `tol` accepts `|got − want| ≤ tol + tol·|want|` (absolute and
//! relative tolerance both `tol`). Run with `--nocapture` to see the
//! measured maxima.

mod tiny;

use lmq_turbomind::model::SeqInput;
use tiny::*;

// ---------------------------------------------------------------------------
// 1. lmq against the f64 reference.

#[test]
fn reference_llama_gqa_tied() {
    check_against_reference(llama_gqa(), &[6, 23]);
}

#[test]
fn reference_qwen2_bias_untied_mha() {
    check_against_reference(qwen2_mha(), &[5, 19]);
}

#[test]
fn reference_llama3_rope_scaling() {
    for spec in [llama3_rope(), llama3_rope_all_bands()] {
        let old_ctx = spec.rope_scaling.as_ref().unwrap()["original_max_position_embeddings"]
            .as_u64()
            .unwrap() as usize;
        let long = old_ctx.max(16) + 9;
        let fx = check_against_reference(spec, &[7, long]);
        // The check above must be able to see the scaling: the reference
        // without it is far from lmq.
        let spec = &fx.spec;
        let model = load(fx.dir.path());
        let tokens = Rng(7).tokens(long, spec.vocab);
        let mut kv = solo(&model);
        let got = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        let unscaled = reference_logits(spec, &fx.weights, None, &tokens).concat();
        let (scaled, _) = max_err(&got, &unscaled);
        eprintln!("llama3 sensitivity: reference without scaling differs by {scaled:.2e}");
        assert!(
            scaled > 100.0 * REFERENCE_TOL,
            "llama3 scaling made no visible difference"
        );
    }
}

#[test]
fn reference_explicit_head_dim() {
    let fx = check_against_reference(explicit_head_dim(), &[4, 17]);
    assert_ne!(fx.spec.head_dim(), fx.spec.hidden / fx.spec.heads);
}

#[test]
fn reference_half_precision_weights() {
    // The reference reads the same rounded values the checkpoint holds.
    check_against_reference(
        Spec {
            dtype: WDtype::BF16,
            seed: 11,
            ..llama_gqa()
        },
        &[3, 21],
    );
    check_against_reference(
        Spec {
            dtype: WDtype::F16,
            seed: 12,
            ..qwen2_mha()
        },
        &[8, 9],
    );
    check_against_reference(
        Spec {
            dtype: WDtype::BF16,
            seed: 13,
            ..llama3_rope()
        },
        &[20],
    );
}

// ---------------------------------------------------------------------------
// 2. Incremental decode equals one-shot prefill.

#[test]
fn incremental_decode_matches_prefill() {
    for spec in [llama3_rope(), qwen2_mha(), explicit_head_dim()] {
        let fx = fixture(spec);
        let model = load(fx.dir.path());
        let vocab = fx.spec.vocab;
        // Chunks on both sides of the 16-row skinny/gemm boundary.
        let chunks = [5usize, 1, 1, 3, 20, 1, 2];
        let total: usize = chunks.iter().sum();
        let tokens = Rng(fx.spec.seed ^ 0x1234).tokens(total, vocab);

        let mut kv = solo(&model);
        let one_shot = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        assert_eq!(one_shot.len(), total * vocab);

        let mut kv = solo(&model);
        let mut chunked = Vec::new();
        let mut start = 0;
        for (i, &n) in chunks.iter().enumerate() {
            let piece = &tokens[start..start + n];
            // Ask for different logits per chunk; the cache must fill the same.
            let wanted = match i % 3 {
                0 => LogitsWanted::All,
                1 => LogitsWanted::Last,
                _ => LogitsWanted::None,
            };
            let out = forward_alone(&model, &mut kv, piece, wanted);
            let (rows, first_row) = match wanted {
                LogitsWanted::All => (n, start),
                LogitsWanted::Last => (1, start + n - 1),
                LogitsWanted::None => (0, start),
            };
            assert_eq!(out.len(), rows * vocab, "chunk {i}: wrong number of logits");
            let want = &one_shot[first_row * vocab..(first_row + rows) * vocab];
            let (scaled, abs) = max_err_f32(&out, want);
            chunked.push((scaled, abs));
            start += n;
            assert_eq!(kv.len(), start);
        }
        let scaled = chunked.iter().fold(0f64, |m, e| m.max(e.0));
        let abs = chunked.iter().fold(0f64, |m, e| m.max(e.1));
        eprintln!(
            "incremental {}: max scaled err {scaled:.2e}, max abs err {abs:.2e}",
            fx.spec.model_type
        );
        assert!(
            scaled <= INCREMENTAL_TOL,
            "chunked decode differs by {scaled:e}"
        );

        // A single decode step after a chunked prefill, against the
        // reference too (the cache must hold positions, not just values).
        let next = Rng(99).tokens(1, vocab);
        let got = forward_alone(&model, &mut kv, &next, LogitsWanted::Last);
        let mut all = tokens.clone();
        all.extend_from_slice(&next);
        let want = reference_logits(&fx.spec, &fx.weights, fx.spec.rope_scaling.as_ref(), &all);
        let (scaled, _) = max_err(&got, want.last().unwrap());
        assert!(
            scaled <= REFERENCE_TOL,
            "decode after chunks differs from reference by {scaled:e}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. A batch gives each sequence what it gets alone.

/// One pool holding each sequence's prefix, prefilled alone; sequence `i`
/// of `n` owns blocks `i, i + n, i + 2n, …`, so that the sequences' blocks
/// interleave.
fn prefilled(model: &Model<CpuBackend>, prefixes: &[Vec<u32>]) -> (CpuKvPool, Vec<SeqKv>) {
    let n = prefixes.len() as u32;
    let mut pool = model
        .new_kv_pool(TEST_POOL_BLOCKS as usize, TEST_BLOCK_LEN)
        .unwrap();
    let mut seqs = Vec::new();
    for (i, p) in prefixes.iter().enumerate() {
        let mut seq = SeqKv {
            blocks: (i as u32..TEST_POOL_BLOCKS).step_by(n as usize).collect(),
            len: 0,
        };
        if !p.is_empty() {
            let out = model
                .forward(
                    &mut pool,
                    &mut [SeqInput {
                        tokens: p,
                        kv: &mut seq,
                        logits: LogitsWanted::None,
                    }],
                )
                .unwrap();
            assert!(out[0].is_empty(), "LogitsWanted::None returned logits");
        }
        seqs.push(seq);
    }
    (pool, seqs)
}

fn forward_batch(
    model: &Model<CpuBackend>,
    pool: &mut CpuKvPool,
    seqs: &mut [SeqKv],
    tokens: &[Vec<u32>],
    wanted: &[LogitsWanted],
) -> Vec<Vec<f32>> {
    let mut batch: Vec<SeqInput<'_>> = seqs
        .iter_mut()
        .zip(tokens)
        .zip(wanted)
        .map(|((kv, t), &logits)| SeqInput {
            tokens: t,
            kv,
            logits,
        })
        .collect();
    model
        .forward(pool, &mut batch)
        .unwrap_or_else(|e| panic!("batched forward: {e}"))
}

/// One sequence of a shared pool run alone.
fn forward_one(
    model: &Model<CpuBackend>,
    pool: &mut CpuKvPool,
    seq: &mut SeqKv,
    tokens: &[u32],
) -> Vec<f32> {
    forward_batch(
        model,
        pool,
        std::slice::from_mut(seq),
        &[tokens.to_vec()],
        &[LogitsWanted::All],
    )
    .pop()
    .unwrap()
}

#[test]
fn batch_matches_alone() {
    for spec in [llama_gqa(), qwen2_mha()] {
        let fx = fixture(spec);
        let model = load(fx.dir.path());
        let vocab = fx.spec.vocab;
        let mut rng = Rng(fx.spec.seed ^ 0xBA7C);
        // Different existing cache lengths: 0, 4 and 9 positions.
        let prefixes: Vec<Vec<u32>> = [0, 4, 9].iter().map(|&n| rng.tokens(n, vocab)).collect();
        let (base_pool, base) = prefilled(&model, &prefixes);
        let all = [LogitsWanted::All; 3];

        // (i) 2 + 1 + 3 = 6 rows: batched and alone both stay on the skinny
        // kernel, whose per-row arithmetic does not depend on the batch, so
        // the logits must be identical bit for bit.
        let new: Vec<Vec<u32>> = [2, 1, 3].iter().map(|&n| rng.tokens(n, vocab)).collect();
        let (mut batch_pool, mut batch_kv) = (base_pool.clone(), base.clone());
        let batched = forward_batch(&model, &mut batch_pool, &mut batch_kv, &new, &all);
        for (i, t) in new.iter().enumerate() {
            let (mut pool, mut kv) = (base_pool.clone(), base[i].clone());
            let alone = forward_one(&model, &mut pool, &mut kv, t);
            assert_eq!(batched[i].len(), t.len() * vocab);
            assert!(
                batched[i] == alone,
                "sequence {i}: ≤16-row batch is not bitwise equal to alone"
            );
            assert_eq!(batch_kv[i].len, prefixes[i].len() + t.len());
        }

        // (ii) 3 + 1 + 14 = 18 rows: the batch goes through gemm, each
        // sequence alone through the skinny kernel; equal up to rounding.
        let new: Vec<Vec<u32>> = [3, 1, 14].iter().map(|&n| rng.tokens(n, vocab)).collect();
        let (mut batch_pool, mut batch_kv) = (base_pool.clone(), base.clone());
        let (mut alone_pool, mut alone_kv) = (base_pool.clone(), base.clone());
        let batched = forward_batch(&model, &mut batch_pool, &mut batch_kv, &new, &all);
        let mut worst = (0f64, 0f64);
        for (i, t) in new.iter().enumerate() {
            let alone = forward_one(&model, &mut alone_pool, &mut alone_kv[i], t);
            let e = max_err_f32(&batched[i], &alone);
            worst = (worst.0.max(e.0), worst.1.max(e.1));
            assert_eq!(batch_kv[i].len, prefixes[i].len() + t.len());
        }

        // (iii) Then one decode step each from those caches, with different
        // logits wanted per sequence.
        let next: Vec<Vec<u32>> = (0..3).map(|_| rng.tokens(1, vocab)).collect();
        let wanted = [LogitsWanted::Last, LogitsWanted::None, LogitsWanted::All];
        let batched = forward_batch(&model, &mut batch_pool, &mut batch_kv, &next, &wanted);
        assert_eq!(batched.len(), 3);
        assert!(batched[1].is_empty(), "LogitsWanted::None returned logits");
        for i in [0, 2] {
            let alone = forward_one(&model, &mut alone_pool, &mut alone_kv[i], &next[i]);
            assert_eq!(batched[i].len(), vocab);
            let e = max_err_f32(&batched[i], &alone);
            worst = (worst.0.max(e.0), worst.1.max(e.1));
        }
        eprintln!(
            "batch {}: max scaled err {:.2e}, max abs err {:.2e}",
            fx.spec.model_type, worst.0, worst.1
        );
        assert!(
            worst.0 <= BATCH_TOL,
            "batched logits differ from alone by {:e}",
            worst.0
        );

        // And the batched sequence still agrees with the reference.
        let mut seq2 = prefixes[2].clone();
        seq2.extend_from_slice(&new[2]);
        seq2.extend_from_slice(&next[2]);
        let want = reference_logits(&fx.spec, &fx.weights, None, &seq2);
        let (scaled, _) = max_err(&batched[2], want.last().unwrap());
        assert!(
            scaled <= REFERENCE_TOL,
            "batched decode differs from reference by {scaled:e}"
        );
    }
}

/// Quantized KV caches stay close to the f64 reference, int8 closer than
/// int4, and fp16 closer still; static mode without parameters is refused.
#[test]
fn quantized_kv_cache_tracks_the_reference() {
    let fx = fixture(llama_gqa());
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 97).collect();
    let want = reference_logits(
        &fx.spec,
        &fx.weights,
        fx.spec.rope_scaling.as_ref(),
        &tokens,
    );
    let mut errors = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8, KvDtype::Int4] {
        let mut model = load(fx.dir.path());
        model.set_kv_cache(dtype, KvMode::Online).unwrap();
        let mut kv = solo(&model);
        let got = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        let flat: Vec<f64> = want.iter().flatten().copied().collect();
        errors.push(max_err(&got, &flat).1);
    }
    eprintln!("max |Δlogit| fp32/fp16/int8/int4: {errors:?}");
    // Random weights give unstructured activations, so only loose absolute
    // bounds hold here; the real model's costs are measured as perplexity
    // (docs/QUALITY.md). Each coarser dtype must cost more.
    assert!(
        errors[0] < 1e-4 && errors[1] < 2e-2 && errors[2] < 0.25,
        "{errors:?}"
    );
    assert!(
        errors[0] < errors[1] && errors[1] < errors[2] && errors[2] < errors[3],
        "{errors:?}"
    );
    let mut model = load(fx.dir.path());
    let err = model
        .set_kv_cache(KvDtype::Int8, KvMode::Static)
        .unwrap_err();
    assert!(err.to_string().contains("static"), "{err}");
}

/// A checkpoint split into shards with `model.safetensors.index.json`
/// loads to the same logits as the single file.
#[test]
fn sharded_checkpoint_matches_single_file() {
    let fx = fixture(qwen2_mha());
    let tokens: Vec<u32> = vec![5, 9, 2, 44, 17];
    let single = load(fx.dir.path());
    let mut kv = solo(&single);
    let want = forward_alone(&single, &mut kv, &tokens, LogitsWanted::All);

    let sharded = TempDir::new().unwrap();
    let entries = encode(&fx.weights, fx.spec.dtype);
    let (first, second) = entries.split_at(entries.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView<'_>)> = part
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                weight_map.insert(name.clone(), json!(file));
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &sharded.path().join(&file)).unwrap();
    }
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        serde_json::to_string(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    std::fs::write(
        sharded.path().join("config.json"),
        serde_json::to_string(&fx.spec.config_json()).unwrap(),
    )
    .unwrap();
    let model = load(sharded.path());
    let mut kv = solo(&model);
    assert_eq!(
        forward_alone(&model, &mut kv, &tokens, LogitsWanted::All),
        want
    );
}
