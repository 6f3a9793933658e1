//! Where the time of a forward step goes, per backend op, on the CPU:
//! `[LM_HEAD=int8] cargo run --release -p lmq-turbomind --example op_profile
//! -- MODEL_DIR [PROMPT_LEN] [DECODE_TOKENS] [BATCH]`. `LMQ_STACK=1`
//! stacks q/k/v and gate/up as the GPU does (the CPU keeps them apart).
//!
//! It wraps the CPU backend in a backend that times every call, runs one
//! prefill of `PROMPT_LEN` random tokens (per sequence) and then
//! `DECODE_TOKENS` decode steps of `BATCH` sequences, and prints the time
//! per op for each phase. Linears are split by their output width, which
//! tells q/o (hidden), k/v (kv width), gate/up (intermediate), down
//! (hidden, but a wider input) and the output projection (vocabulary)
//! apart.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lmq_turbomind::backend::cpu::{CpuBackend, CpuKvPool, CpuLinear, Matrix};
use lmq_turbomind::backend::{AttnShape, Backend, HostLinear, KvPoolSpec, SeqSpan};
use lmq_turbomind::model::{LogitsWanted, Model, SeqInput, SeqKv};
use lmq_turbomind::rope::Rope;
use lmq_turbomind::Result;

thread_local! {
    static TIMES: RefCell<BTreeMap<String, (Duration, usize)>> = const { RefCell::new(BTreeMap::new()) };
}

fn timed<T>(name: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    let dt = t.elapsed();
    TIMES.with(|m| {
        let mut m = m.borrow_mut();
        let e = m.entry(name()).or_default();
        e.0 += dt;
        e.1 += 1;
    });
    out
}

fn take_times() -> BTreeMap<String, (Duration, usize)> {
    TIMES.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

struct Timing(CpuBackend);

impl Backend for Timing {
    type Act = Matrix;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type KvPool = CpuKvPool;

    fn name(&self) -> &'static str {
        "timing-cpu"
    }
    fn upload_linear(&self, w: HostLinear) -> Result<CpuLinear> {
        self.0.upload_linear(w)
    }
    fn linear_bytes(&self, w: &CpuLinear) -> usize {
        self.0.linear_bytes(w)
    }
    fn upload_vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        self.0.upload_vector(v)
    }
    fn new_kv_pool(&self, spec: &KvPoolSpec) -> Result<CpuKvPool> {
        self.0.new_kv_pool(spec)
    }
    fn free_memory(&self) -> Option<u64> {
        self.0.free_memory()
    }
    fn embedding(&self, table: &CpuLinear, ids: &[u32]) -> Result<Matrix> {
        timed(|| "embedding".into(), || self.0.embedding(table, ids))
    }
    fn rms_norm(&self, x: &Matrix, w: &Vec<f32>, eps: f32) -> Result<Matrix> {
        timed(|| "rms_norm".into(), || self.0.rms_norm(x, w, eps))
    }
    fn add_rms_norm(
        &self,
        residual: &mut Matrix,
        delta: &Matrix,
        w: &Vec<f32>,
        eps: f32,
    ) -> Result<Matrix> {
        timed(
            || "add_rms_norm".into(),
            || self.0.add_rms_norm(residual, delta, w, eps),
        )
    }
    fn add_in_place(&self, residual: &mut Matrix, delta: &Matrix) -> Result<()> {
        timed(|| "add".into(), || self.0.add_in_place(residual, delta))
    }
    fn linear(&self, x: &Matrix, w: &CpuLinear) -> Result<Matrix> {
        timed(
            || format!("linear {}->{}", w.in_features, w.out_features),
            || self.0.linear(x, w),
        )
    }
    fn rope(&self, x: &mut Matrix, heads: usize, spans: &[SeqSpan], rope: &Rope) -> Result<()> {
        timed(|| "rope".into(), || self.0.rope(x, heads, spans, rope))
    }
    fn write_kv(
        &self,
        layer: usize,
        k: &Matrix,
        v: &Matrix,
        pool: &mut CpuKvPool,
        spans: &[SeqSpan],
    ) -> Result<()> {
        timed(
            || "write_kv".into(),
            || self.0.write_kv(layer, k, v, pool, spans),
        )
    }
    fn attention(
        &self,
        layer: usize,
        q: &Matrix,
        pool: &CpuKvPool,
        spans: &[SeqSpan],
        shape: &AttnShape,
    ) -> Result<Matrix> {
        timed(
            || "attention".into(),
            || self.0.attention(layer, q, pool, spans, shape),
        )
    }
    fn silu_mul(&self, gate: &Matrix, up: &Matrix) -> Result<Matrix> {
        timed(|| "silu_mul".into(), || self.0.silu_mul(gate, up))
    }
    fn prefers_stacked_linears(&self) -> bool {
        std::env::var_os("LMQ_STACK").is_some() || self.0.prefers_stacked_linears()
    }
    fn silu_mul_halves(&self, gate_up: &Matrix) -> Result<Matrix> {
        timed(|| "silu_mul".into(), || self.0.silu_mul_halves(gate_up))
    }
    fn split_cols(&self, x: &Matrix, widths: &[usize]) -> Result<Vec<Matrix>> {
        timed(|| "split_cols".into(), || self.0.split_cols(x, widths))
    }
    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Result<Matrix> {
        timed(|| "gather_rows".into(), || self.0.gather_rows(x, rows))
    }
    fn to_host(&self, x: &Matrix) -> Result<Vec<f32>> {
        timed(|| "to_host".into(), || self.0.to_host(x))
    }
}

fn report(phase: &str, total: Duration, steps: usize) {
    let times = take_times();
    let ops: Duration = times.values().map(|v| v.0).sum();
    println!(
        "{phase}: {:.2} ms per step over {steps} steps ({:.2} ms in ops)",
        total.as_secs_f64() * 1e3 / steps as f64,
        ops.as_secs_f64() * 1e3 / steps as f64
    );
    let mut rows: Vec<_> = times.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    for (name, (t, n)) in rows {
        println!(
            "  {name:24} {:8.3} ms/step {:5.1}%  {:8.2} µs/call",
            t.as_secs_f64() * 1e3 / steps as f64,
            100.0 * t.as_secs_f64() / total.as_secs_f64(),
            t.as_secs_f64() * 1e6 / n as f64
        );
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: op_profile MODEL_DIR [PROMPT] [DECODE] [BATCH]"),
    );
    let prompt: usize = args
        .next()
        .map_or(512, |s| s.parse().expect("prompt length"));
    let decode: usize = args
        .next()
        .map_or(64, |s| s.parse().expect("decode tokens"));
    let batch: usize = args.next().map_or(1, |s| s.parse().expect("batch"));
    let mut model = Model::load(&dir, Timing(CpuBackend::new()))?;
    // `LM_HEAD=int8` times the 8-bit output projection, as `lmq` uses it
    // by default for 4-bit checkpoints.
    if std::env::var("LM_HEAD").is_ok_and(|v| v == "int8") {
        let head = model.backend().0.int8_linear(model.output_projection())?;
        model.set_output_projection(head);
    }
    let block_len = 64;
    let per_seq = (prompt + decode + 1).div_ceil(block_len);
    let mut pool = model.new_kv_pool(per_seq * batch, block_len)?;
    let mut seqs: Vec<SeqKv> = (0..batch)
        .map(|s| SeqKv::contiguous((s * per_seq) as u32, per_seq as u32))
        .collect();
    let vocab = model.config.vocab_size as u32;
    let mut seed = 5u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32 % vocab
    };
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..prompt).map(|_| next()).collect())
        .collect();
    // A warm-up step on a throwaway pool so that page faults and first-touch
    // costs stay out of the figures.
    {
        let mut warm_pool = model.new_kv_pool(per_seq, block_len)?;
        let mut kv = SeqKv::contiguous(0, per_seq as u32);
        model.forward(
            &mut warm_pool,
            &mut [SeqInput {
                tokens: &prompts[0][..prompt.min(64)],
                kv: &mut kv,
                logits: LogitsWanted::Last,
            }],
        )?;
        take_times();
    }
    let t = Instant::now();
    for (s, kv) in seqs.iter_mut().enumerate() {
        model.forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &prompts[s],
                kv,
                logits: LogitsWanted::Last,
            }],
        )?;
    }
    let prefill = t.elapsed();
    println!(
        "prefill {prompt} tokens × {batch}: {:.1} tok/s",
        (prompt * batch) as f64 / prefill.as_secs_f64()
    );
    report("prefill", prefill, batch);
    let t = Instant::now();
    for _ in 0..decode {
        let tokens: Vec<[u32; 1]> = (0..batch).map(|_| [next()]).collect();
        let mut inputs: Vec<SeqInput<'_>> = seqs
            .iter_mut()
            .zip(&tokens)
            .map(|(kv, tok)| SeqInput {
                tokens: tok,
                kv,
                logits: LogitsWanted::Last,
            })
            .collect();
        model.forward(&mut pool, &mut inputs)?;
    }
    let dt = t.elapsed();
    println!(
        "decode batch {batch}: {:.1} steps/s, {:.1} tok/s",
        decode as f64 / dt.as_secs_f64(),
        (decode * batch) as f64 / dt.as_secs_f64()
    );
    report("decode", dt, decode);
    Ok(())
}
