//! Token sampling on the GPU against the host sampler (`sampling.rs`),
//! row by row with the same uniform numbers: the penalized logits must be
//! the host's bit for bit; greedy rows must pick the host's token; sampled
//! rows the host's token too, or, where the two differ (they sum in
//! different orders, in f32), a token that the same walk in f64 places
//! within 1e-4 of the draw: rounding at a boundary between two tokens, not
//! a different distribution. Without a GPU the test prints that it was
//! skipped.

use lmq_kernels::GpuDevice;
use lmq_turbomind::backend::cuda::{CudaAct, CudaBackend};
use lmq_turbomind::backend::{Backend, SampleRow};
use lmq_turbomind::sampling::{sample_penalized, PenaltyCounts, Sampler, SamplingParams};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*: enough for test inputs.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Logits shaped like a model's: a few large values over a wide tail,
/// `spread` scaling the tail (small: peaked; large: flat).
fn logits(rng: &mut Rng, vocab: usize, spread: f64) -> Vec<f32> {
    (0..vocab)
        .map(|i| {
            let base = (rng.uniform() * 2.0 - 1.0) * spread;
            let peak = if rng.next_u64() % 97 == 0 { 8.0 } else { 0.0 };
            // A few exact ties, so the index order is exercised.
            if i % 500 == 7 {
                3.0
            } else {
                (base + peak) as f32
            }
        })
        .collect()
}

fn cases() -> Vec<SamplingParams> {
    let p = |temperature, top_k, top_p, min_p, rep, pres, freq| SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty: rep,
        presence_penalty: pres,
        frequency_penalty: freq,
        seed: 0,
    };
    vec![
        p(0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),
        p(0.0, 0, 1.0, 0.0, 1.3, 0.5, 0.2),
        p(0.7, 0, 1.0, 0.0, 1.0, 0.0, 0.0),
        p(1.0, 40, 1.0, 0.0, 1.0, 0.0, 0.0),
        p(0.8, 0, 0.9, 0.0, 1.1, 0.0, 0.0),
        p(1.2, 0, 0.5, 0.0, 1.0, 0.3, 0.1),
        p(1.0, 0, 1.0, 0.05, 1.0, 0.0, 0.0),
        p(0.9, 200, 0.95, 0.02, 1.2, -0.5, 0.4),
        p(1.0, 1024, 1.0, 0.0, 1.0, 0.0, 0.0),
        p(1.0, 3000, 1.0, 0.0, 1.0, 0.0, 0.0),
        p(2.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),
    ]
}

/// Whether `token` is, up to `tol` of probability mass, the one the host
/// sampler's walk picks for `u` when every sum is taken in f64: its
/// cumulative interval in the kept set (value descending, then index)
/// comes within `tol` of `u` times the kept mass.
fn f64_walk_allows(p: &SamplingParams, logits: &[f32], u: f32, token: u32, tol: f64) -> bool {
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / p.temperature))
        .collect();
    c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && p.top_k < c.len() {
        c.truncate(p.top_k);
    }
    let max = c[0].1;
    let e: Vec<f64> = c.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
    let total: f64 = e.iter().sum();
    let probs: Vec<f64> = e.iter().map(|x| x / total).collect();
    // The kept set's end may itself move by rounding: every length whose
    // top-p boundary lies within `tol` is a candidate.
    let mut keeps = vec![probs.len()];
    if p.top_p < 1.0 {
        keeps.clear();
        let mut cum = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 - tol {
                keeps.push(i + 1);
            }
            if cum >= p.top_p as f64 + tol {
                break;
            }
        }
        if keeps.is_empty() {
            keeps.push(probs.len());
        }
    }
    if p.min_p > 0.0 {
        let count = |thr: f64| probs.iter().take_while(|&&x| x >= thr).count().max(1);
        let thr = p.min_p as f64 * probs[0];
        let (lo, hi) = (count(thr * (1.0 + tol)), count(thr * (1.0 - tol)));
        keeps = keeps.iter().flat_map(|&k| [k.min(lo), k.min(hi)]).collect();
    }
    keeps.iter().any(|&keep| {
        let kept: f64 = probs[..keep].iter().sum();
        let r = u as f64 * kept;
        let mut before = 0.0;
        for (i, &(t, _)) in c.iter().take(keep).enumerate() {
            let after = before + probs[i];
            if t == token {
                return before - tol <= r && r <= after + tol;
            }
            before = after;
        }
        false
    })
}

#[test]
fn device_sampling_matches_host_sampler() {
    if !GpuDevice::is_available() {
        eprintln!("skipped: no CUDA driver/GPU found");
        return;
    }
    let gpu = CudaBackend::new(0).expect("opening the CUDA backend");
    assert!(gpu.samples_on_device());
    let mut rng = Rng(0x5eed);
    let (mut sampled, mut off_by_rounding, mut left_to_host) = (0usize, 0usize, 0usize);
    for &vocab in &[301usize, 5000, 49152] {
        for spread in [1.0, 4.0, 12.0] {
            for _round in 0..4 {
                let params = cases();
                let rows = params.len();
                let host_logits: Vec<Vec<f32>> =
                    (0..rows).map(|_| logits(&mut rng, vocab, spread)).collect();
                let histories: Vec<Vec<u32>> = (0..rows)
                    .map(|_| {
                        let n = 1 + (rng.next_u64() % 60) as usize;
                        (0..n)
                            .map(|_| (rng.next_u64() % (vocab as u64 + 5)) as u32)
                            .collect()
                    })
                    .collect();
                let prompt_lens: Vec<usize> = histories.iter().map(|h| h.len() / 2).collect();
                let uniforms: Vec<f32> = (0..rows).map(|_| rng.uniform() as f32).collect();
                let flat: Vec<f32> = host_logits.concat();
                let mut act: CudaAct = gpu.device().upload(&flat, rows, vocab).unwrap().into();
                // Odd rows hand over their counts kept incrementally, as
                // the engine does; even rows have them counted.
                let kept: Vec<PenaltyCounts> = (0..rows)
                    .map(|r| {
                        let (prompt, output) = histories[r].split_at(prompt_lens[r]);
                        let mut c = PenaltyCounts::new(prompt);
                        output.iter().for_each(|&t| c.push_generated(t));
                        c
                    })
                    .collect();
                let sample_rows: Vec<SampleRow<'_>> = (0..rows)
                    .map(|r| SampleRow {
                        params: &params[r],
                        uniform: uniforms[r],
                        history: &histories[r],
                        prompt_len: prompt_lens[r],
                        counts: (r % 2 == 1)
                            .then(|| kept[r].for_history(histories[r].len()))
                            .flatten(),
                    })
                    .collect();
                let tokens = gpu.sample(&mut act, &sample_rows).unwrap();
                let penalized = gpu.to_host(&act).unwrap();
                for r in 0..rows {
                    let p = &params[r];
                    let sampler = Sampler::new(p.clone()).unwrap();
                    let mut want_logits = host_logits[r].clone();
                    sampler.apply_penalties(&mut want_logits, &histories[r], prompt_lens[r]);
                    let got_logits = &penalized[r * vocab..(r + 1) * vocab];
                    assert!(
                        want_logits
                            .iter()
                            .zip(got_logits)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "penalized logits differ: row {r}, {p:?}"
                    );
                    let want = sample_penalized(p, &want_logits, uniforms[r]);
                    match tokens[r] {
                        None => {
                            assert!(!p.is_greedy(), "a greedy row was left to the host");
                            left_to_host += 1;
                        }
                        Some(got) if p.is_greedy() => {
                            assert_eq!(got, want, "greedy row {r}, vocab {vocab}, {p:?}")
                        }
                        Some(got) => {
                            sampled += 1;
                            assert!(
                                f64_walk_allows(p, &want_logits, uniforms[r], got, 1e-4),
                                "device token {got} (host {want}) is not within rounding of the draw u {}, vocab {vocab}, {p:?}",
                                uniforms[r]
                            );
                            if got != want {
                                off_by_rounding += 1;
                                eprintln!(
                                    "vocab {vocab} spread {spread}: device {got}, host {want}, u {}, {p:?}",
                                    uniforms[r]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "sampled rows on the device: {sampled}, differing from the host: {off_by_rounding}; left to the host: {left_to_host}"
    );
    assert!(sampled >= 200, "too few rows sampled on the device");
    assert!(left_to_host > 0, "no case left a row to the host");
}

/// The f64 reference itself, on the CPU: it accepts every draw of the host
/// sampler (whose sums are f32) and rejects tokens far from the draw.
#[test]
fn f64_walk_accepts_host_draws() {
    let mut rng = Rng(0xf64);
    let mut rejected_far = 0;
    for vocab in [301usize, 5000] {
        for spread in [1.0, 4.0, 12.0] {
            for p in cases().iter().filter(|p| !p.is_greedy()) {
                let l = logits(&mut rng, vocab, spread);
                let u = rng.uniform() as f32;
                let want = sample_penalized(p, &l, u);
                assert!(
                    f64_walk_allows(p, &l, u, want, 1e-4),
                    "host token {want} rejected: vocab {vocab}, u {u}, {p:?}"
                );
                // A token at the other end of the unit interval is not
                // within rounding of this draw unless the kept set is tiny.
                let far = sample_penalized(p, &l, if u < 0.5 { 0.999 } else { 0.0 });
                if far != want && !f64_walk_allows(p, &l, u, far, 1e-4) {
                    rejected_far += 1;
                }
            }
        }
    }
    assert!(
        rejected_far > 20,
        "the reference rejected only {rejected_far} far tokens"
    );
}
