//! Micro-benchmark of the W4A16 decode linear against the device's copy
//! bandwidth.
//!
//! 1. Device-to-device copy of 1 GiB: GB/s counting bytes read + written.
//! 2. W4A16 on Llama-2-7B decode shapes (q/k/v/o 4096→4096, gate/up
//!    4096→11008, down 11008→4096; g = 128) at M = 1, 4, 16, cycling through
//!    32 distinct weight copies so no weight stays in L2. Reports the bytes
//!    of codes + scales/zeros streamed per call over the time, and that as a
//!    fraction of the copy bandwidth.
//!
//! Timing: CUDA events around 32 back-to-back calls (one per copy), after a
//! warm-up; the median of 20 such rounds. Each round is timed two ways: the
//! 32 calls captured once into a CUDA graph and replayed (the GPU's own
//! time, as an engine that captures its decode step sees it), and launched
//! one by one from the host (adds the host's launch cost where it exceeds
//! the kernel's). The graph time is also taken for a few forced K-split
//! counts (warps per block) around the automatic plan, and with
//! programmatic dependent launch on. Without a GPU it prints
//! "skipped: no CUDA device" and exits 0.
//!
//! Run: `cargo run --release -p lmq-kernels --example bench_w4`

use std::sync::Arc;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};
use half::f16;
use lmq_kernels::{GpuDevice, KernelError, PackedW4, W4A16Linear};

const COPIES: usize = 32;
const ROUNDS: usize = 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn timed(
    dev: &GpuDevice,
    start: &CudaEvent,
    end: &CudaEvent,
    stream: &Arc<CudaStream>,
    mut body: impl FnMut() -> Result<(), KernelError>,
) -> Result<f64, Box<dyn std::error::Error>> {
    start.record(stream)?;
    body()?;
    end.record(stream)?;
    let ms = start.elapsed_ms(end)? as f64;
    dev.context().check_err()?;
    Ok(ms)
}

/// Captures the calls `body` makes into a graph (ending the capture even
/// when `body` fails).
fn capture(
    stream: &Arc<CudaStream>,
    body: impl FnOnce() -> Result<(), KernelError>,
) -> Result<CudaGraph, Box<dyn std::error::Error>> {
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let r = body();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0))?;
    r?;
    graph.ok_or_else(|| "the capture recorded nothing".into())
}

/// Random weights in the kernel layout (any bit pattern is a valid code).
fn random_packed(rng: &mut Rng, k: usize, n: usize, g: usize) -> PackedW4 {
    let kbs = k.div_ceil(128);
    let qw = (0..n / 8 * kbs * 128).map(|_| rng.next() as u32).collect();
    let scales = (0..k / g * n)
        .map(|_| f16::from_f32(0.002 + (rng.next() % 1000) as f32 * 2e-5))
        .collect();
    let zeros = (0..k / g * n)
        .map(|_| f16::from_f32(1024.0 + (rng.next() % 16) as f32))
        .collect();
    PackedW4 {
        in_features: k,
        out_features: n,
        group_size: g,
        qw,
        scales,
        zeros,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = match GpuDevice::new(0) {
        Ok(d) => d,
        Err(KernelError::NoDevice(msg)) => {
            println!("skipped: no CUDA device ({msg})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "device: {} ({}, {} SMs)",
        dev.name(),
        dev.arch(),
        dev.num_sms()
    );
    dev.compile_all()?;
    let stream = dev.stream().clone();
    let start = dev
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = dev
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // 1. Copy bandwidth.
    let bytes = 1usize << 30;
    let host: Vec<u32> = (0..bytes / 4).map(|_| rng.next() as u32).collect();
    let src = stream.clone_htod(&host)?;
    drop(host);
    let mut dst = stream.alloc_zeros::<u32>(bytes / 4)?;
    for _ in 0..3 {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        times.push(timed(&dev, &start, &end, &stream, || {
            stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| KernelError::Driver {
                    context: "copy",
                    source: e,
                })
        })?);
    }
    let copy_ms = median(times);
    let copy_gbs = 2.0 * bytes as f64 / (copy_ms * 1e-3) / 1e9;
    println!(
        "copy: 1 GiB D2D in {copy_ms:.3} ms median of {ROUNDS} = {copy_gbs:.0} GB/s (read + write)"
    );
    drop(src);
    drop(dst);

    // 2. W4A16 GEMV.
    let g = 128;
    // LMQ_BENCH_SHAPE (a substring of the linear's name) and LMQ_BENCH_M
    // (one row count) narrow the run, e.g. for a profiler.
    let only_shape = std::env::var("LMQ_BENCH_SHAPE").ok();
    let shapes: Vec<(&str, usize, usize)> = [
        ("q/k/v/o", 4096usize, 4096usize),
        ("gate/up", 4096, 11008),
        ("down", 11008, 4096),
    ]
    .into_iter()
    .filter(|(name, _, _)| only_shape.as_deref().is_none_or(|s| name.contains(s)))
    .collect();
    let ms_list: Vec<usize> = match std::env::var("LMQ_BENCH_M")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(m) => vec![m],
        None => vec![1, 4, 16],
    };
    let mut rows_out = Vec::new();
    let mut per_m = vec![0.0f64; ms_list.len()];
    let mut per_m_pdl = vec![0.0f64; ms_list.len()];
    for &(name, k, n) in &shapes {
        let packed = random_packed(&mut rng, k, n, g);
        let mut layers = (0..COPIES)
            .map(|_| W4A16Linear::new(&dev, &packed, None))
            .collect::<Result<Vec<_>, _>>()?;
        let wbytes = layers[0].weight_bytes();
        for (mi, &m) in ms_list.iter().enumerate() {
            let x: Vec<f16> = (0..m * k)
                .map(|_| f16::from_f32((rng.next() % 2001) as f32 / 1000.0 - 1.0 + 1e-4))
                .collect();
            let xd = dev.upload(&x, m, k)?;
            let mut out = dev.zeros::<f16>(m, n)?;
            let auto = layers[0].plan(m)?;
            // Split counts to try: the automatic one first.
            // (K splits, PDL, batch depth U): the automatic plan first.
            let mut variants = vec![(None, false, None)];
            for s in [auto.splits / 2, auto.splits * 2, 16] {
                if s >= 1 && s != auto.splits && s <= k.div_ceil(128) {
                    variants.push((Some(s), false, None));
                }
            }
            for u in [1, 2, 4] {
                for s in [None, Some(auto.splits * 2)] {
                    variants.push((s, false, Some(u)));
                }
            }
            variants.push((None, true, None));
            let mut graph_us = Vec::new();
            let mut pdl_us = f64::NAN;
            for &(splits, pdl, batch) in &variants {
                let mut exists = true;
                for l in layers.iter_mut() {
                    l.set_pdl(pdl);
                    exists &= l.set_batch(batch);
                }
                if !exists || splits.is_some_and(|s| s > 16) {
                    continue;
                }
                // Warm up outside the capture.
                let mut ok = true;
                for l in layers.iter_mut() {
                    if l.forward_with(&dev, &xd, &mut out, splits).is_err() {
                        ok = false;
                        break;
                    }
                }
                if !ok {
                    continue; // that split does not fit shared memory at this M
                }
                let mut plan = auto;
                let graph = capture(&stream, || {
                    for l in layers.iter_mut() {
                        plan = l.forward_with(&dev, &xd, &mut out, splits)?;
                    }
                    Ok(())
                })?;
                graph.launch()?;
                let mut times = Vec::new();
                for _ in 0..ROUNDS {
                    times.push(timed(&dev, &start, &end, &stream, || {
                        graph.launch().map_err(|e| KernelError::Driver {
                            context: "graph",
                            source: e,
                        })
                    })?);
                }
                let us = median(times) * 1e3 / COPIES as f64;
                if pdl {
                    pdl_us = us;
                } else {
                    graph_us.push((us, plan, batch));
                }
            }
            for l in layers.iter_mut() {
                l.set_pdl(false);
                l.set_batch(None);
            }
            let mut times = Vec::new();
            for _ in 0..ROUNDS {
                times.push(timed(&dev, &start, &end, &stream, || {
                    for l in layers.iter_mut() {
                        l.forward(&dev, &xd, &mut out)?;
                    }
                    Ok(())
                })?);
            }
            let direct_us = median(times) * 1e3 / COPIES as f64;
            let (us, plan, _) = graph_us[0];
            let (best_us, best, best_u) = graph_us
                .iter()
                .copied()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap_or(graph_us[0]);
            let gbs = wbytes as f64 / (us * 1e-6) / 1e9;
            let count = if name == "q/k/v/o" {
                4.0
            } else if name == "gate/up" {
                2.0
            } else {
                1.0
            };
            per_m[mi] += count * us;
            per_m_pdl[mi] += count * pdl_us;
            rows_out.push(format!(
                "| {name:8} | {k:5}x{n:5} | {m:2} | {us:7.2} | {gbs:6.0} | {:5.1}% | {pdl_us:7.2} | {:5.1}% | {direct_us:7.2} | {}x{}, kc {} | {best_us:7.2} @ S={}{} |",
                100.0 * gbs / copy_gbs,
                100.0 * wbytes as f64 / (pdl_us * 1e-6) / 1e9 / copy_gbs,
                plan.n_blocks,
                plan.splits,
                plan.kc,
                best.splits,
                best_u.map_or(String::new(), |u| format!(" U={u}"))
            ));
        }
    }
    // Batch depths U = 2 and 4 against their memory-only probes (same
    // loads, no math): M = 1, automatic split, graph replay.
    let mut probe_rows = Vec::new();
    if std::env::var("LMQ_BENCH_PROBE").map_or(true, |v| v != "0") {
        for &(name, k, n) in &shapes {
            let packed = random_packed(&mut rng, k, n, g);
            let mut layers = (0..COPIES)
                .map(|_| W4A16Linear::new(&dev, &packed, None))
                .collect::<Result<Vec<_>, _>>()?;
            let wbytes = layers[0].weight_bytes();
            let x: Vec<f16> = (0..k)
                .map(|_| f16::from_f32((rng.next() % 2001) as f32 / 1000.0 - 1.0 + 1e-4))
                .collect();
            let xd = dev.upload(&x, 1, k)?;
            let mut out = dev.zeros::<f16>(1, n)?;
            let mut cells = Vec::new();
            for v in [
                "g128_r1_u2",
                "g128_r1_u2_probe",
                "g128_r1_u4",
                "g128_r1_u4_probe",
            ] {
                for l in layers.iter_mut() {
                    l.set_kernel(&dev, Some(v))?;
                    l.forward(&dev, &xd, &mut out)?;
                }
                let graph = capture(&stream, || {
                    for l in layers.iter_mut() {
                        l.forward(&dev, &xd, &mut out)?;
                    }
                    Ok(())
                })?;
                graph.launch()?;
                let mut times = Vec::new();
                for _ in 0..ROUNDS {
                    times.push(timed(&dev, &start, &end, &stream, || {
                        graph.launch().map_err(|e| KernelError::Driver {
                            context: "graph",
                            source: e,
                        })
                    })?);
                }
                let us = median(times) * 1e3 / COPIES as f64;
                let pct = 100.0 * wbytes as f64 / (us * 1e-6) / 1e9 / copy_gbs;
                cells.push(format!("{v}: {us:.2} us {pct:.0}%"));
            }
            probe_rows.push(format!("{name:8} M=1 | {}", cells.join(" | ")));
        }
    }

    println!();
    for r in probe_rows {
        println!("{r}");
    }
    println!();
    println!("W4A16 GEMV, g = {g}, {COPIES} weight copies, median of {ROUNDS} rounds; weight bytes = codes + fp16 scales + fp16 zeros");
    println!("us/call and GB/s from graph replay; 'launched' = the same calls launched one by one from the host;");
    println!("'PDL' = graph replay with programmatic dependent launch (weights load while the previous call finishes);");
    println!("'best split' = fastest graph time (no PDL) over forced K-split counts (S = warps per block) around the automatic plan");
    println!("| linear   | in x out    |  M | us/call |  GB/s  | of copy | PDL us  | of copy | launched | grid (blocks x S) | best split |");
    println!("|----------|-------------|----|---------|--------|---------|---------|---------|----------|-------------------|------------|");
    for r in rows_out {
        println!("{r}");
    }
    for (mi, &m) in ms_list.iter().enumerate() {
        println!(
            "M = {m:2}: the 7 linears of one Llama-2-7B layer take {:.1} us (graph), {:.1} us (graph + PDL)",
            per_m[mi], per_m_pdl[mi]
        );
    }
    Ok(())
}
