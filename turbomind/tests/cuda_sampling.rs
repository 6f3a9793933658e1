//! Token sampling on the GPU against the host sampler (`sampling.rs`),
//! row by row with the same uniform numbers: the penalized logits must be
//! the host's bit for bit; greedy rows must pick the host's token; sampled
//! rows the host's token too, except where the draw falls within rounding
//! of a boundary between two tokens (the device sums in a different order:
//! at most 1 in 200 rows, printed). Rows the device leaves to the host
//! (`None`) must be the ones whose kept set can reach past its 1024
//! candidates. Without a GPU the test prints that it was skipped.

use lmq_kernels::GpuDevice;
use lmq_turbomind::backend::cuda::{CudaAct, CudaBackend};
use lmq_turbomind::backend::{Backend, SampleRow};
use lmq_turbomind::sampling::{sample_penalized, Sampler, SamplingParams};

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
                let sample_rows: Vec<SampleRow<'_>> = (0..rows)
                    .map(|r| SampleRow {
                        params: &params[r],
                        uniform: uniforms[r],
                        history: &histories[r],
                        prompt_len: prompt_lens[r],
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
    assert!(
        off_by_rounding * 200 <= sampled,
        "{off_by_rounding} of {sampled} device draws differ from the host's"
    );
    assert!(left_to_host > 0, "no case left a row to the host");
}
