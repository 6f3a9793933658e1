//! `lmq bench`: offline throughput and latency of the batching engine, in
//! the manner of LMDeploy's `profile_throughput`.
//!
//! Workload. Prompts are seeded random token ids (as vLLM's "random"
//! dataset), so no dataset download is needed and runs are reproducible.
//! Lengths are fixed (`--input-len`, `--output-len`) or drawn from the
//! ShareGPT-like distribution below. Every request sets `ignore_eos`, so it
//! generates exactly its output length.
//!
//! ShareGPT-like lengths: input ~ LogNormal(ln 160, 0.9) clipped to
//! [4, 1024] tokens, output ~ LogNormal(ln 120, 0.9) clipped to [4, 512]
//! tokens. These follow the published shape of the ShareGPT V3 set as
//! vLLM's benchmark filters it (median prompt ~160 tokens, median reply
//! ~120, heavy right tails).
//!
//! Measurement. `--concurrency` client threads each submit a request, read
//! its events to the end, and take the next. Per request: TTFT (submit to
//! first token), ITL (gaps between tokens), TPOT ((e2e − TTFT) / (n − 1))
//! and end-to-end latency.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use lmq_turbomind::engine::{EngineEvent, EngineHandle, EngineRequest};
use lmq_turbomind::sampling::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// Requests in the run.
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Fixed prompt length (with --output-len).
    #[arg(long, requires = "output_len")]
    input_len: Option<usize>,
    /// Fixed generation length (with --input-len).
    #[arg(long, requires = "input_len")]
    output_len: Option<usize>,
    /// Length distribution when no fixed lengths are given.
    #[arg(long, default_value = "sharegpt-like", conflicts_with = "input_len")]
    dataset: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Batch-1 latency instead: prefill and decode tok/s at the fixed
    /// lengths, median of --iterations runs after one warm-up.
    #[arg(long, requires = "input_len")]
    latency: bool,
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// Sampling temperature of every request (0: greedy), to measure
    /// sampled workloads; each request gets its own seed.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus (top-p) sampling of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Also measure this machine's memory read bandwidth (all threads) and
    /// state batch-1 decode as a fraction of the bandwidth bound.
    #[arg(long)]
    measure_bandwidth: bool,
    /// One line of JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: super::EngineArgs,
    #[command(flatten)]
    batch: super::BatchArgs,
}

/// One request's lengths.
#[derive(Debug, Clone, Copy)]
struct Shape {
    input: usize,
    output: usize,
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn lognormal(rng: &mut StdRng, median: f64, sigma: f64, lo: usize, hi: usize) -> usize {
    let x = (median.ln() + sigma * normal(rng)).exp().round() as usize;
    x.clamp(lo, hi)
}

fn shapes(args: &BenchArgs, rng: &mut StdRng) -> Result<Vec<Shape>> {
    if let (Some(input), Some(output)) = (args.input_len, args.output_len) {
        if input == 0 || output == 0 {
            bail!("--input-len and --output-len must be at least 1");
        }
        return Ok(vec![Shape { input, output }; args.num_prompts]);
    }
    if args.dataset != "sharegpt-like" {
        bail!(
            "--dataset {:?} is not known (sharegpt-like, or give --input-len and --output-len)",
            args.dataset
        );
    }
    Ok((0..args.num_prompts)
        .map(|_| Shape {
            input: lognormal(rng, 160.0, 0.9, 4, 1024),
            output: lognormal(rng, 120.0, 0.9, 4, 512),
        })
        .collect())
}

/// Random token ids, avoiding the low ids where vocabularies keep their
/// special tokens.
fn prompt(rng: &mut StdRng, len: usize, vocab: usize) -> Vec<u32> {
    let low = 256.min(vocab / 2) as u32;
    (0..len)
        .map(|_| rng.random_range(low..vocab as u32))
        .collect()
}

fn request(args: &BenchArgs, prompt: Vec<u32>, output: usize, seed: u64) -> EngineRequest {
    EngineRequest {
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed,
            ..SamplingParams::default()
        },
        ..EngineRequest::greedy(prompt, output)
    }
}

/// Timings of one finished request.
#[derive(Debug, Clone, Default)]
struct Trace {
    ttft: f64,
    e2e: f64,
    itl: Vec<f64>,
    input: usize,
    output: usize,
}

/// Runs one request to its end, timing every token.
fn traced(handle: &EngineHandle, req: EngineRequest) -> Result<Trace> {
    let input = req.prompt.len();
    let t0 = Instant::now();
    let mut stream = handle.submit(req)?;
    let mut last = t0;
    let mut trace = Trace {
        input,
        ..Default::default()
    };
    loop {
        match stream.blocking_next() {
            Some(EngineEvent::Token { .. }) => {
                let now = Instant::now();
                if trace.output == 0 {
                    trace.ttft = (now - t0).as_secs_f64();
                } else {
                    trace.itl.push((now - last).as_secs_f64());
                }
                trace.output += 1;
                last = now;
            }
            Some(EngineEvent::Finished { usage, .. }) => {
                trace.e2e = t0.elapsed().as_secs_f64();
                trace.output = usage.completion_tokens;
                return Ok(trace);
            }
            Some(EngineEvent::Failed(e)) => bail!("a request failed: {e}"),
            None => bail!("the engine stopped mid-request"),
        }
    }
}

/// mean, p50, p90, p99 in milliseconds.
fn summary(values: &mut [f64]) -> serde_json::Value {
    if values.is_empty() {
        return json!({"mean": null, "p50": null, "p90": null, "p99": null});
    }
    values.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
        values[i] * 1e3
    };
    let mean = values.iter().sum::<f64>() / values.len() as f64 * 1e3;
    json!({"mean": mean, "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0)})
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.num_prompts == 0 || args.concurrency == 0 {
        bail!("--num-prompts and --concurrency must be at least 1");
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let shapes = shapes(&args, &mut rng)?;
    let handle = super::start_engine(&args.model, &args.engine, &args.batch)?;
    let vocab = handle.info().vocab_size;
    let prompts: Vec<Vec<u32>> = shapes
        .iter()
        .map(|s| prompt(&mut rng, s.input, vocab))
        .collect();
    // One short request first, so that one-time costs stay out of the run.
    traced(&handle, request(&args, prompt(&mut rng, 16, vocab), 4, 0))?;
    if args.latency {
        return latency(&args, &handle, &prompts[0], shapes[0]);
    }
    let next = AtomicUsize::new(0);
    let traces = Mutex::new(Vec::with_capacity(shapes.len()));
    let t0 = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..args.concurrency.min(shapes.len()))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(shape) = shapes.get(i) else {
                            return Ok(());
                        };
                        let t = traced(
                            &handle,
                            request(&args, prompts[i].clone(), shape.output, i as u64),
                        )?;
                        traces
                            .lock()
                            .map_err(|_| anyhow!("a bench thread panicked"))?
                            .push(t);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("a bench thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = t0.elapsed().as_secs_f64();
    let traces = traces
        .into_inner()
        .map_err(|_| anyhow!("a bench thread panicked"))?;
    let stats = handle.stats();
    let input: usize = traces.iter().map(|t| t.input).sum();
    let output: usize = traces.iter().map(|t| t.output).sum();
    let mut ttft: Vec<f64> = traces.iter().map(|t| t.ttft).collect();
    let mut e2e: Vec<f64> = traces.iter().map(|t| t.e2e).collect();
    let mut tpot: Vec<f64> = traces
        .iter()
        .filter(|t| t.output > 1)
        .map(|t| (t.e2e - t.ttft) / (t.output - 1) as f64)
        .collect();
    let mut itl: Vec<f64> = traces.iter().flat_map(|t| t.itl.iter().copied()).collect();
    let report = json!({
        "request_per_s": traces.len() as f64 / elapsed,
        "input_tok_per_s": input as f64 / elapsed,
        "output_tok_per_s": output as f64 / elapsed,
        "ttft_ms": summary(&mut ttft),
        "tpot_ms": summary(&mut tpot),
        "itl_ms": summary(&mut itl),
        "e2e_ms": summary(&mut e2e),
        "peak_kv_blocks": stats.kv_blocks_peak,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{} requests, concurrency {}, {:.2} s: {} input and {} output tokens; KV pool {} blocks of {}, peak {} used, {} preemptions",
        traces.len(),
        args.concurrency,
        elapsed,
        input,
        output,
        stats.kv_blocks_total,
        handle.info().block_len,
        stats.kv_blocks_peak,
        stats.preemptions
    );
    println!(
        "throughput: {:.2} req/s, {:.1} input tok/s, {:.1} output tok/s",
        report["request_per_s"].as_f64().unwrap_or(0.0),
        report["input_tok_per_s"].as_f64().unwrap_or(0.0),
        report["output_tok_per_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10}",
        "ms", "mean", "p50", "p90", "p99"
    );
    for key in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        let v = &report[key];
        let f = |k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
        println!(
            "{:<8} {:>10} {:>10} {:>10} {:>10}",
            key.trim_end_matches("_ms"),
            f("mean"),
            f("p50"),
            f("p90"),
            f("p99")
        );
    }
    Ok(())
}

/// Batch-1 prefill and decode speed at fixed lengths.
fn latency(args: &BenchArgs, handle: &EngineHandle, prompt: &[u32], shape: Shape) -> Result<()> {
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for i in 0..=args.iterations.max(1) {
        let t = traced(handle, request(args, prompt.to_vec(), shape.output, 0))?;
        if i == 0 {
            continue; // warm-up at the measured size
        }
        prefill.push(shape.input as f64 / t.ttft.max(1e-9));
        if t.output > 1 {
            decode.push((t.output - 1) as f64 / (t.e2e - t.ttft).max(1e-9));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let (p, d) = (median(&mut prefill), median(&mut decode));
    // Bytes one decode token reads: the weights, plus the KV of the mean
    // context over the generation.
    let info = handle.info();
    let context = shape.input + shape.output / 2;
    let bytes = info.weight_bytes_per_token + info.kv_bytes_per_token * context;
    let bandwidth = args.measure_bandwidth.then(read_bandwidth);
    let bound = bandwidth.map(|bw| bw / bytes as f64);
    let fraction = bound.zip(d).map(|(b, d)| d / b);
    if args.json {
        println!(
            "{}",
            json!({"input_len": shape.input, "output_len": shape.output,
                   "prefill_tok_per_s": p, "decode_tok_per_s": d,
                   "iterations": prefill.len(),
                   "decode_bytes_per_token": bytes,
                   "read_bandwidth_gb_per_s": bandwidth.map(|b| b / 1e9),
                   "decode_bound_tok_per_s": bound,
                   "decode_fraction_of_bound": fraction})
        );
    } else {
        if let (Some(bw), Some(bound)) = (bandwidth, bound) {
            println!(
                "read bandwidth {:.1} GB/s; decode reads {:.1} MB/token, so the bound is {:.1} tok/s; decode reaches {:.1}% of it",
                bw / 1e9,
                bytes as f64 / 1e6,
                bound,
                fraction.unwrap_or(0.0) * 100.0
            );
        }
        println!(
            "batch 1, input {} output {}: prefill {:.1} tok/s, decode {:.1} tok/s (median of {})",
            shape.input,
            shape.output,
            p.unwrap_or(0.0),
            d.unwrap_or(0.0),
            prefill.len()
        );
    }
    Ok(())
}

/// Memory read bandwidth over all threads, in bytes/s: the best of five
/// parallel passes summing 1 GiB (integer adds, which vectorize).
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 30) / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = data
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}
