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
use lmq_turbomind::backend::SampleRow;
use lmq_turbomind::model::{LogitsWanted, Model, Sampled, SeqInput, SeqKv};
use lmq_turbomind::sampling::SamplingParams;
use tiny::*;

const BLOCK_LEN: usize = 16;
const SEQUENCES: usize = 11;
/// Blocks per sequence: room for the longest prefix and every decode step.
const BLOCKS_EACH: usize = 18;

/// Batch sizes of consecutive decode steps (the first `n` sequences each
/// decode one token), twice over so that every bucket is seen, recorded
/// and replayed: buckets 4, 8, 16, 1 and 2 cover the eight sizes.
const STEPS: [usize; 16] = [3, 5, 6, 7, 11, 9, 1, 2, 3, 5, 6, 7, 11, 9, 1, 2];

/// What one run gives: every decode step's logits per sequence, the
/// final step's greedy tokens when it was sampled (else its logits are the
/// last 5 rows), and the graphs recorded.
struct Run {
    logits: Vec<Vec<f32>>,
    sampled: Vec<u32>,
    recorded: usize,
}

/// The decode steps of [`STEPS`], then a step of 5 sequences, sampled
/// greedily on the device when `sample_last` (a padded replay of bucket 8
/// whose padding rows are sampled and dropped), with graphs and buckets as
/// given. With `long_first`,
/// sequence 0 starts at position 250, so that the steps cross the
/// attention's split boundary (256) and recordings of 2 splits are padded.
fn decode_steps(
    fx: &Fixture,
    graphs: bool,
    buckets: bool,
    long_first: bool,
    sample_last: bool,
) -> Run {
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
        let len = if long_first && i == 0 { 250 } else { 3 + 2 * i };
        let prefix = rng.tokens(len, vocab);
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
    let last: &[usize] = if sample_last { &[] } else { &[5] };
    for &n in STEPS.iter().chain(last) {
        let tokens: Vec<Vec<u32>> = (0..n).map(|_| rng.tokens(1, vocab)).collect();
        let mut batch = decode_batch(&mut seqs[..n], &tokens);
        let out = model
            .forward(&mut pool, &mut batch)
            .unwrap_or_else(|e| panic!("decode step of {n}: {e}"));
        assert_eq!(out.len(), n, "one logits row per sequence");
        logits.extend(out);
    }
    if !sample_last {
        let recorded = model.backend().recorded_graphs();
        return Run {
            logits,
            sampled: Vec::new(),
            recorded,
        };
    }
    let greedy = SamplingParams::default();
    let history: Vec<u32> = Vec::new();
    let rows: Vec<SampleRow<'_>> = (0..5)
        .map(|_| SampleRow {
            params: &greedy,
            uniform: 0.0,
            history: &history,
            prompt_len: 0,
            counts: None,
        })
        .collect();
    let tokens: Vec<Vec<u32>> = (0..5).map(|_| rng.tokens(1, vocab)).collect();
    let mut batch = decode_batch(&mut seqs[..5], &tokens);
    let sampled = model
        .forward_sampled(&mut pool, &mut batch, &rows)
        .unwrap_or_else(|e| panic!("sampled step: {e}"))
        .into_iter()
        .map(|s| match s {
            Some(Sampled::Token(t)) => t,
            Some(Sampled::Logits(l)) => argmax(&l),
            None => panic!("a sequence wanting logits got none"),
        })
        .collect();
    let recorded = model.backend().recorded_graphs();
    Run {
        logits,
        sampled,
        recorded,
    }
}

/// One decode token per sequence, each wanting its logits.
fn decode_batch<'a>(seqs: &'a mut [SeqKv], tokens: &'a [Vec<u32>]) -> Vec<SeqInput<'a>> {
    seqs.iter_mut()
        .zip(tokens)
        .map(|(kv, t)| SeqInput {
            tokens: t,
            kv,
            logits: LogitsWanted::Last,
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The largest difference over the largest value of `want`.
fn scaled_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale.max(f32::MIN_POSITIVE)
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
    // Graphs recorded (by batch size, by bucket). Short: all 8 sizes and 5
    // buckets are seen twice at one split (the sampled step of 5 replays).
    // Long: sequence 0 crosses position 256 at the seventh step, so at 2
    // splits only sizes 1 and 2 and (with the sampled step) 5 recur, while
    // buckets 8 and 16 recur at 1 split and 8, 16, 1 and 2 at 2 splits.
    for (long_first, want_sizes, want_buckets) in [(false, 8, 5), (true, 3, 6)] {
        let eager = decode_steps(&fx, false, false, long_first, false);
        assert_eq!(eager.recorded, 0, "graphs off recorded {}", eager.recorded);
        let exact = decode_steps(&fx, true, false, long_first, true);
        let bucketed = decode_steps(&fx, true, true, long_first, true);
        let (steps, last) = eager.logits.split_at(eager.logits.len() - 5);
        println!(
            "long first {long_first}: graphs recorded: {} by batch size, {} by bucket",
            exact.recorded, bucketed.recorded
        );
        assert_eq!(exact.recorded, want_sizes, "graphs by batch size");
        assert_eq!(bucketed.recorded, want_buckets, "graphs by bucket");
        for (name, run) in [("graphs", &exact), ("bucketed graphs", &bucketed)] {
            assert_eq!(run.logits.len(), steps.len());
            for (i, (got, want)) in run.logits.iter().zip(steps).enumerate() {
                assert_eq!(got.len(), want.len(), "{name}: row {i} width");
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{name}: row {i} not finite"
                );
                let diff = scaled_diff(got, want);
                assert!(
                    diff <= 1e-3,
                    "{name}: row {i} differs from the eager step by {diff:.3e} of its largest logit"
                );
            }
            // Each greedy pick of the sampled step is a largest logit of
            // the eager run's same step (within the bound, for near ties).
            assert_eq!(run.sampled.len(), 5, "{name}: sampled tokens");
            for (i, (&token, want)) in run.sampled.iter().zip(last).enumerate() {
                let best = want.iter().fold(f32::MIN, |m, &v| m.max(v));
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let picked = *want.get(token as usize).unwrap_or_else(|| {
                    panic!("{name}: row {i} picked token {token}, past the vocabulary")
                });
                assert!(
                    picked >= best - 1e-3 * scale,
                    "{name}: sampled row {i} picked {token} (logit {picked}), the best is {best}"
                );
            }
        }
    }
}
