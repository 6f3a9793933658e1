//! CUDA-graph batch buckets (`CudaBackend::set_graph_buckets`): decode
//! steps whose batch size changes from step to step replay the graph of
//! the next bucket size with padding rows, and must give each sequence the
//! logits that eager steps give it. Without a GPU the test prints that it
//! was skipped and passes.
//!
//! Bound: the largest logit difference over the largest logit at most
//! 1e-3. The padded steps run the same kernels on the same rows, but a
//! linear over more rows may take another kernel or K split (cuBLAS and the
//! W4A16 plan choose by row count), which changes the rounding, not the
//! values.

mod tiny;

use lmq_kernels::GpuDevice;
use lmq_turbomind::backend::cuda::CudaBackend;
use lmq_turbomind::model::{LogitsWanted, Model, SeqInput, SeqKv};
use tiny::*;

const BLOCK_LEN: usize = 16;
const SEQUENCES: usize = 11;
/// Blocks per sequence: room for its prefix and every decode step.
const BLOCKS_EACH: usize = 4;

/// Batch sizes of consecutive decode steps (the first `n` sequences each
/// decode one token), twice over so that every bucket is seen, recorded
/// and replayed: buckets 4, 8, 16, 1 and 2 cover the eight sizes.
const STEPS: [usize; 16] = [3, 5, 6, 7, 11, 9, 1, 2, 3, 5, 6, 7, 11, 9, 1, 2];

/// Each step's logits, per sequence, with graphs and buckets as given.
fn decode_steps(fx: &Fixture, graphs: bool, buckets: bool) -> (Vec<Vec<f32>>, usize) {
    let backend = CudaBackend::new(0).unwrap_or_else(|e| panic!("opening the CUDA backend: {e}"));
    backend.set_graphs(graphs);
    backend.set_graph_buckets(buckets);
    let model = Model::load(fx.dir.path(), backend).unwrap();
    let mut pool = model
        .new_kv_pool(SEQUENCES * BLOCKS_EACH, BLOCK_LEN)
        .unwrap();
    let mut rng = Rng(11);
    let vocab = fx.spec.vocab;
    // Sequence i owns blocks i, i + 11, …: interleaved, never contiguous;
    // prefixes of different lengths so that positions differ per row.
    let mut seqs: Vec<SeqKv> = (0..SEQUENCES)
        .map(|i| SeqKv {
            blocks: (0..BLOCKS_EACH)
                .map(|j| (i + j * SEQUENCES) as u32)
                .collect(),
            len: 0,
        })
        .collect();
    for (i, seq) in seqs.iter_mut().enumerate() {
        let prefix = rng.tokens(3 + 2 * i, vocab);
        model
            .forward(
                &mut pool,
                &mut [SeqInput {
                    tokens: &prefix,
                    kv: seq,
                    logits: LogitsWanted::None,
                }],
            )
            .unwrap();
    }
    let mut logits = Vec::new();
    for &n in &STEPS {
        let tokens: Vec<Vec<u32>> = (0..n).map(|_| rng.tokens(1, vocab)).collect();
        let mut batch: Vec<SeqInput<'_>> = seqs[..n]
            .iter_mut()
            .zip(&tokens)
            .map(|(kv, t)| SeqInput {
                tokens: t,
                kv,
                logits: LogitsWanted::Last,
            })
            .collect();
        let out = model
            .forward(&mut pool, &mut batch)
            .unwrap_or_else(|e| panic!("decode step of {n}: {e}"));
        assert_eq!(out.len(), n, "one logits row per sequence");
        logits.extend(out);
    }
    let recorded = model.backend().recorded_graphs();
    (logits, recorded)
}

#[test]
fn bucketed_graph_replays_match_eager_steps() {
    if !GpuDevice::is_available() {
        eprintln!("skipped: no CUDA driver/GPU found");
        return;
    }
    // Llama with GQA 6/2 at head_dim 64 (the GPU's attention takes 64,
    // 128 and 256), fp16 weights.
    let mut spec = llama_gqa();
    spec.hidden = 6 * 64;
    spec.intermediate = 232;
    spec.vocab = 301;
    spec.max_pos = 600;
    spec.dtype = WDtype::F16;
    let fx = fixture(spec);
    let (eager, none) = decode_steps(&fx, false, false);
    assert_eq!(none, 0, "graphs off recorded {none}");
    let (exact, per_size) = decode_steps(&fx, true, false);
    let (bucketed, per_bucket) = decode_steps(&fx, true, true);
    println!("graphs recorded: {per_size} by batch size, {per_bucket} by bucket");
    assert_eq!(per_size, 8, "one graph per batch size");
    assert_eq!(per_bucket, 5, "one graph per bucket (1, 2, 4, 8, 16)");
    for (name, run) in [("graphs", &exact), ("bucketed graphs", &bucketed)] {
        assert_eq!(run.len(), eager.len());
        for (i, (got, want)) in run.iter().zip(&eager).enumerate() {
            assert_eq!(got.len(), want.len(), "{name}: row {i} width");
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{name}: row {i} not finite"
            );
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-3 * scale,
                "{name}: row {i} differs from the eager step by {diff:.3e} (largest logit {scale:.3e})"
            );
        }
    }
}
