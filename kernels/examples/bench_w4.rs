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
//! 3. The 7 linears of one Llama-2-7B layer (q, k, v, o, gate, up, down)
//!    launched back to back in one CUDA graph, 32 layers of distinct weight
//!    copies per replay: total weight bytes over total time, which is how
//!    the ≥ 80%-of-copy target is defined.
//! 4. The same layer as the engine launches it, q/k/v and gate/up stacked
//!    into one linear each (4 launches per layer), with 0, 2, 4, 8 and 16
//!    MB of the next linear's codes prefetched into L2
//!    (`LMQ_BENCH_PREFETCH_MB=3,4,5` times other sizes).
//! 5. With `LMQ_BENCH_SWEEP=1`, that layer again with each linear's launch
//!    plan (K splits, batch depth) varied in turn, PDL on.
//! 6. With `LMQ_BENCH_ALLOC=1`, the stacked layer (PDL off, no prefetch)
//!    with each output allocated inside the captured graph and freed after
//!    the next launch, as the engine's recorded decode steps allocate
//!    theirs (stream-ordered allocation nodes between the kernels), against
//!    the same launches into preallocated outputs: what the allocation
//!    nodes of a recorded step cost.
//! 7. The context's largest L2 fetch from DRAM
//!    (`CU_LIMIT_MAX_L2_FETCH_GRANULARITY`) is printed first: 128 bytes
//!    as `GpuDevice::new` sets it, or what `LMQ_L2_FETCH` names (64 is the
//!    driver's own default). Session 15's runs set it with this bench's
//!    own `LMQ_BENCH_L2_FETCH`, since replaced by `LMQ_L2_FETCH`.
//!
//! Timing: CUDA events around a CUDA-graph replay of 32 back-to-back calls
//! (one per copy; one per layer in 3.), after a warm-up; the median of 20
//! replays. Every launch configuration (the classic kernel and several
//! streaming ones, see `kernel_configs`) is timed with and without
//! programmatic dependent launch (PDL). Activations are fp16, outputs fp32
//! (what the engine's linears use). Without a GPU it prints
//! "skipped: no CUDA device" and exits 0.
//!
//! Run: `cargo run --release -p lmq-kernels --example bench_w4`

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};
use half::f16;
use lmq_kernels::{
    DeviceMatrix, GpuDevice, KernelError, PackedW4, W4A16Linear, W4Kernel, DEFAULT_KERNEL,
};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{median, open_device, timing_events};

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

/// The kernel launches the benchmark compares: the classic kernel and a
/// few streaming configurations (warps per block, ring stages, blocks per
/// SM); the first streaming one is the default.
fn kernel_configs() -> Vec<(String, W4Kernel)> {
    let mut v = vec![("classic".to_string(), W4Kernel::Classic)];
    for warps in [4, 6, 8] {
        let k = W4Kernel::ClassicEarly { warps };
        let d = if k == DEFAULT_KERNEL {
            " (default)"
        } else {
            ""
        };
        v.push((format!("classic-early w{warps}{d}"), k));
    }
    for (warps, stages, blocks_per_sm) in [(8, 8, 2), (8, 4, 2), (4, 4, 4), (8, 8, 1)] {
        let k = W4Kernel::Stream {
            warps,
            stages,
            blocks_per_sm,
        };
        let name = if k == DEFAULT_KERNEL {
            format!("stream w{warps} s{stages} b{blocks_per_sm} (default)")
        } else {
            format!("stream w{warps} s{stages} b{blocks_per_sm}")
        };
        v.push((name, k));
    }
    v
}

/// The stacked layer's inputs at `m` rows ([m][4096] and [m][11008], all
/// 0.01) and one output per linear of `shapes` (in, out).
type StackedIo = (DeviceMatrix<f16>, DeviceMatrix<f16>, Vec<DeviceMatrix<f32>>);
fn stacked_io(
    dev: &GpuDevice,
    m: usize,
    shapes: &[(usize, usize)],
) -> Result<StackedIo, KernelError> {
    let x4 = dev.upload(&vec![f16::from_f32(0.01); m * 4096], m, 4096)?;
    let x11 = dev.upload(&vec![f16::from_f32(0.01); m * 11008], m, 11008)?;
    let outs = shapes
        .iter()
        .map(|&(_, n)| dev.zeros::<f32>(m, n))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((x4, x11, outs))
}

/// Median µs of one replay of `graph` over `ROUNDS` rounds.
fn replay_us(
    dev: &GpuDevice,
    start: &CudaEvent,
    end: &CudaEvent,
    stream: &Arc<CudaStream>,
    graph: &CudaGraph,
) -> Result<f64, Box<dyn std::error::Error>> {
    graph.launch()?;
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        times.push(timed(dev, start, end, stream, || {
            graph.launch().map_err(|e| KernelError::Driver {
                context: "graph",
                source: e,
            })
        })?);
    }
    Ok(median(times) * 1e3)
}

fn set_all(layers: &mut [W4A16Linear], kernel: W4Kernel, pdl: bool) -> Result<(), KernelError> {
    for l in layers {
        l.set_kernel_kind(kernel)?;
        l.set_pdl(pdl);
    }
    Ok(())
}

/// Prints the context's L2 fetch granularity (`LMQ_L2_FETCH` sets it).
fn print_l2_fetch_granularity(dev: &GpuDevice) -> Result<(), Box<dyn std::error::Error>> {
    use cudarc::driver::sys::{cuCtxGetLimit, CUlimit, CUresult};
    dev.context().bind_to_thread()?;
    let mut now = 0usize;
    // SAFETY: the context is current on this thread (bound above) and
    // `now` is a valid place for the driver to write.
    let r = unsafe { cuCtxGetLimit(&mut now, CUlimit::CU_LIMIT_MAX_L2_FETCH_GRANULARITY) };
    if r != CUresult::CUDA_SUCCESS {
        return Err(format!("cuCtxGetLimit(L2 fetch granularity): {r:?}").into());
    }
    println!("L2 fetch granularity: {now} bytes");
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = open_device()? else {
        return Ok(());
    };
    dev.compile_all()?;
    print_l2_fetch_granularity(&dev)?;
    let stream = dev.stream().clone();
    let (start, end) = timing_events(&dev)?;
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
    let pct = |wbytes: f64, us: f64| 100.0 * wbytes / (us * 1e-6) / 1e9 / copy_gbs;

    // 2. W4A16 GEMV, per linear. All 32 copies of each shape stay resident:
    //    the layer graph below uses them too.
    let g = 128;
    let shapes: [(&str, usize, usize); 3] = [
        ("q/k/v/o", 4096, 4096),
        ("gate/up", 4096, 11008),
        ("down", 11008, 4096),
    ];
    let ms_list: Vec<usize> = match std::env::var("LMQ_BENCH_M")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(m) => vec![m],
        None => vec![1, 4, 16],
    };
    let configs = kernel_configs();
    let mut sets: Vec<Vec<W4A16Linear>> = Vec::new();
    for &(_, k, n) in &shapes {
        let packed = random_packed(&mut rng, k, n, g);
        sets.push(
            (0..COPIES)
                .map(|_| W4A16Linear::new(&dev, &packed, None))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    let mut rows_out = Vec::new();
    for (si, &(name, k, n)) in shapes.iter().enumerate() {
        let layers = &mut sets[si];
        let wbytes = layers[0].weight_bytes() as f64;
        for &m in &ms_list {
            let x: Vec<f16> = (0..m * k)
                .map(|_| f16::from_f32((rng.next() % 2001) as f32 / 1000.0 - 1.0 + 1e-4))
                .collect();
            let xd = dev.upload(&x, m, k)?;
            let mut out = dev.zeros::<f32>(m, n)?;
            // (config, PDL) → µs per call.
            let mut cells = Vec::new();
            for (cname, kernel) in &configs {
                for pdl in [false, true] {
                    set_all(layers, *kernel, pdl)?;
                    for l in layers.iter() {
                        l.forward(&dev, &xd, &mut out)?;
                    }
                    let graph = capture(&stream, || {
                        for l in layers.iter() {
                            l.forward(&dev, &xd, &mut out)?;
                        }
                        Ok(())
                    })?;
                    let us = replay_us(&dev, &start, &end, &stream, &graph)? / COPIES as f64;
                    cells.push((cname.clone(), pdl, us));
                }
            }
            let plan = {
                set_all(layers, DEFAULT_KERNEL, false)?;
                layers[0].plan(m)?
            };
            let get = |c: &str, p: bool| {
                cells
                    .iter()
                    .find(|(n, pp, _)| n.starts_with(c) && *pp == p)
                    .map_or(f64::NAN, |e| e.2)
            };
            let (classic, classic_pdl) = (get("classic", false), get("classic", true));
            let dname = configs
                .iter()
                .find(|(_, k)| *k == DEFAULT_KERNEL)
                .map_or("", |c| c.0.as_str());
            let (def, def_pdl) = (get(dname, false), get(dname, true));
            let best = cells
                .iter()
                .filter(|c| c.1)
                .min_by(|a, b| a.2.total_cmp(&b.2))
                .unwrap();
            rows_out.push(format!(
                "| {name:8} | {k:5}x{n:5} | {m:2} | {classic:6.2} ({:4.1}%) | {classic_pdl:6.2} ({:4.1}%) | {def:6.2} ({:4.1}%) | {def_pdl:6.2} ({:4.1}%) | {:6.0} | {}x{} ppb {} | {:.2} {} |",
                pct(wbytes, classic),
                pct(wbytes, classic_pdl),
                pct(wbytes, def),
                pct(wbytes, def_pdl),
                wbytes / (def_pdl * 1e-6) / 1e9,
                plan.n_blocks,
                plan.splits,
                plan.pairs_per_block,
                best.2,
                best.0,
            ));
            let all: Vec<String> = cells
                .iter()
                .map(|(c, p, us)| format!("{c}{}: {us:.2}", if *p { "+pdl" } else { "" }))
                .collect();
            println!("{name} M={m}: {}", all.join(" | "));
        }
    }

    // 3. The 7 linears of one Llama-2-7B layer (q, k, v, o, gate, up, down)
    //    back to back in one graph, 32 layers per replay, each layer with
    //    distinct weight copies, activations [M][4096] and [M][11008].
    let mut layer_rows = Vec::new();
    for &m in &ms_list {
        let x4: Vec<f16> = (0..m * 4096)
            .map(|_| f16::from_f32((rng.next() % 2001) as f32 / 1000.0 - 1.0 + 1e-4))
            .collect();
        let x11: Vec<f16> = (0..m * 11008)
            .map(|_| f16::from_f32((rng.next() % 2001) as f32 / 1000.0 - 1.0 + 1e-4))
            .collect();
        let (x4d, x11d) = (dev.upload(&x4, m, 4096)?, dev.upload(&x11, m, 11008)?);
        let mut o4 = dev.zeros::<f32>(m, 4096)?;
        let mut o11 = dev.zeros::<f32>(m, 11008)?;
        let layer_bytes = 4.0 * sets[0][0].weight_bytes() as f64
            + 2.0 * sets[1][0].weight_bytes() as f64
            + sets[2][0].weight_bytes() as f64;
        for (cname, kernel) in &configs {
            for pdl in [false, true] {
                for set in sets.iter_mut() {
                    set_all(set, *kernel, pdl)?;
                }
                let (qkvo, rest) = sets.split_at(1);
                let (gu, dn) = rest.split_at(1);
                let mut run = || -> Result<(), KernelError> {
                    for c in 0..COPIES {
                        for j in 0..4 {
                            qkvo[0][(4 * c + j) % COPIES].forward(&dev, &x4d, &mut o4)?;
                        }
                        for j in 0..2 {
                            gu[0][(2 * c + j) % COPIES].forward(&dev, &x4d, &mut o11)?;
                        }
                        dn[0][c].forward(&dev, &x11d, &mut o4)?;
                    }
                    Ok(())
                };
                run()?;
                let graph = capture(&stream, run)?;
                let us = replay_us(&dev, &start, &end, &stream, &graph)? / COPIES as f64;
                layer_rows.push(format!(
                    "| {m:2} | {cname:28} | {:3} | {us:7.2} | {:6.0} | {:5.1}% |",
                    if pdl { "on" } else { "off" },
                    layer_bytes / (us * 1e-6) / 1e9,
                    pct(layer_bytes, us)
                ));
            }
        }
    }

    // 4. The same layer as the engine runs it: q/k/v stacked into one
    //    4096 -> 12288 linear and gate/up into one 4096 -> 22016 (as vLLM's
    //    and TurboMind's merged linears), so 4 launches per layer, the
    //    default kernel only.
    let stacked_shapes = [
        (4096usize, 12288usize),
        (4096, 4096),
        (4096, 22016),
        (11008, 4096),
    ];
    let mut stacked: Vec<Vec<W4A16Linear>> = Vec::new();
    for &(k, n) in &stacked_shapes {
        let packed = random_packed(&mut rng, k, n, g);
        stacked.push(
            (0..COPIES)
                .map(|_| W4A16Linear::new(&dev, &packed, None))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    let stacked_bytes: f64 = stacked.iter().map(|s| s[0].weight_bytes() as f64).sum();
    // MB of the next linear's codes asked into L2 by each launch's last
    // blocks: LMQ_BENCH_PREFETCH_MB (a comma-separated list) or these.
    let prefetch_list: Vec<usize> = match std::env::var("LMQ_BENCH_PREFETCH_MB") {
        Err(_) => vec![0, 2, 4, 8, 16],
        Ok(v) => v
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                format!("LMQ_BENCH_PREFETCH_MB must be a comma-separated list of MB, got {v:?}")
            })?,
    };
    let mut stacked_rows = Vec::new();
    for &m in &ms_list {
        let (x4, x11, mut outs) = stacked_io(&dev, m, &stacked_shapes)?;
        for &prefetch_mb in &prefetch_list {
            for pdl in [false, true] {
                for set in stacked.iter_mut() {
                    set_all(set, DEFAULT_KERNEL, pdl)?;
                }
                let mut run = || -> Result<(), KernelError> {
                    // With a prefetch, each launch's last blocks ask L2
                    // for the start of the next linear's codes.
                    let order: Vec<(usize, usize)> = (0..COPIES)
                        .flat_map(|c| (0..stacked.len()).map(move |i| (c, i)))
                        .collect();
                    for (j, &(c, i)) in order.iter().enumerate() {
                        let x = if i == 3 { &x11 } else { &x4 };
                        if prefetch_mb > 0 {
                            let (nc, ni) = order[(j + 1) % order.len()];
                            let next = &stacked[ni][nc];
                            stacked[i][c].forward_prefetching(
                                &dev,
                                x,
                                &mut outs[i],
                                next,
                                prefetch_mb << 20,
                            )?;
                        } else {
                            stacked[i][c].forward(&dev, x, &mut outs[i])?;
                        }
                    }
                    Ok(())
                };
                run()?;
                let graph = capture(&stream, run)?;
                let us = replay_us(&dev, &start, &end, &stream, &graph)? / COPIES as f64;
                stacked_rows.push(format!(
                    "| {m:2} | {:3} | {:>11} | {us:7.2} | {:6.0} | {:5.1}% |",
                    if pdl { "on" } else { "off" },
                    if prefetch_mb == 0 {
                        "none".to_string()
                    } else {
                        format!("{prefetch_mb} MB")
                    },
                    stacked_bytes / (us * 1e-6) / 1e9,
                    pct(stacked_bytes, us)
                ));
            }
        }
    }

    // 5. LMQ_BENCH_SWEEP=1: the stacked layer at each M with PDL on, one
    //    linear's launch plan varied at a time (K splits per block, batch
    //    depth U) while the others keep the automatic plan; then every
    //    linear on its best plan together. This is how a plan heuristic
    //    is chosen, on the card at hand.
    let mut sweep_rows = Vec::new();
    if std::env::var("LMQ_BENCH_SWEEP").is_ok_and(|v| v == "1") {
        for set in stacked.iter_mut() {
            set_all(set, DEFAULT_KERNEL, true)?;
        }
        for &m in &ms_list {
            let (x4, x11, mut outs) = stacked_io(&dev, m, &stacked_shapes)?;
            // (splits, batch) per linear; None = the automatic choice.
            let mut time_plans = |plans: &[(Option<usize>, Option<usize>)],
                                  stacked: &mut [Vec<W4A16Linear>]|
             -> Result<f64, Box<dyn std::error::Error>> {
                for (set, &(_, u)) in stacked.iter_mut().zip(plans) {
                    for l in set.iter_mut() {
                        if !l.set_batch(u) {
                            return Err(format!("batch {u:?} is not compiled").into());
                        }
                    }
                }
                let mut run = || -> Result<(), KernelError> {
                    for c in 0..COPIES {
                        for (i, set) in stacked.iter().enumerate() {
                            let x = if i == 3 { &x11 } else { &x4 };
                            set[c].forward_with(&dev, x, &mut outs[i], plans[i].0)?;
                        }
                    }
                    Ok(())
                };
                run()?;
                let graph = capture(&stream, run)?;
                Ok(replay_us(&dev, &start, &end, &stream, &graph)? / COPIES as f64)
            };
            let auto = [(None, None); 4];
            let base = time_plans(&auto, &mut stacked)?;
            sweep_rows.push(format!(
                "| {m:2} | all automatic | {base:7.2} | {:5.1}% |",
                pct(stacked_bytes, base)
            ));
            let mut best = auto;
            for (i, &(k, n)) in stacked_shapes.iter().enumerate() {
                let mut best_us = base;
                for splits in [2usize, 4, 6, 8, 12, 16] {
                    for u in [2usize, 4] {
                        let mut plans = auto;
                        plans[i] = (Some(splits), Some(u));
                        let us = match time_plans(&plans, &mut stacked) {
                            Ok(us) => us,
                            Err(e) => {
                                println!("sweep {k}x{n} splits {splits} U {u}: {e}");
                                continue;
                            }
                        };
                        println!("sweep M={m} {k}x{n} splits {splits} U {u}: {us:.2} us/layer");
                        if us < best_us {
                            best_us = us;
                            best[i] = plans[i];
                        }
                    }
                }
                sweep_rows.push(format!(
                    "| {m:2} | {k}x{n}: splits {:?}, U {:?} | {best_us:7.2} | {:5.1}% |",
                    best[i].0,
                    best[i].1,
                    pct(stacked_bytes, best_us)
                ));
            }
            let all = time_plans(&best, &mut stacked)?;
            sweep_rows.push(format!(
                "| {m:2} | every best together | {all:7.2} | {:5.1}% |",
                pct(stacked_bytes, all)
            ));
            time_plans(&auto, &mut stacked)?;
        }
    }

    // 6. LMQ_BENCH_ALLOC=1: allocation nodes between the kernels.
    let mut alloc_rows = Vec::new();
    if std::env::var("LMQ_BENCH_ALLOC").is_ok_and(|v| v == "1") {
        for set in stacked.iter_mut() {
            set_all(set, DEFAULT_KERNEL, false)?;
        }
        for &m in &ms_list {
            let (x4, x11, mut outs) = stacked_io(&dev, m, &stacked_shapes)?;
            for allocating in [false, true] {
                let mut run = || -> Result<(), KernelError> {
                    // The previous launch's output, freed after this launch
                    // (the engine frees an activation once its consumer is
                    // queued).
                    let mut previous = None;
                    for c in 0..COPIES {
                        for (i, set) in stacked.iter().enumerate() {
                            let x = if i == 3 { &x11 } else { &x4 };
                            if allocating {
                                let mut out = dev.uninit::<f32>(m, stacked_shapes[i].1)?;
                                set[c].forward(&dev, x, &mut out)?;
                                previous = Some(out);
                            } else {
                                set[c].forward(&dev, x, &mut outs[i])?;
                            }
                        }
                    }
                    drop(previous);
                    Ok(())
                };
                run()?;
                let graph = capture(&stream, run)?;
                let us = replay_us(&dev, &start, &end, &stream, &graph)? / COPIES as f64;
                alloc_rows.push(format!(
                    "| {m:2} | {:>27} | {us:7.2} | {:5.1}% |",
                    if allocating {
                        "allocated in the graph"
                    } else {
                        "preallocated"
                    },
                    pct(stacked_bytes, us)
                ));
            }
        }
    }

    println!();
    println!("W4A16 GEMV, g = {g}, {COPIES} weight copies, fp16 x, fp32 out, median of {ROUNDS} graph replays of {COPIES} calls;");
    println!("bytes = codes + fp16 scales + fp16 zeros; % = of the copy bandwidth above ({copy_gbs:.0} GB/s)");
    println!("| linear   | in x out    |  M | classic us | classic+PDL | default us | default+PDL | GB/s | default grid | best (PDL) |");
    println!("|----------|-------------|----|------------|-------------|-----------|------------|------|-------------|------------|");
    for r in rows_out {
        println!("{r}");
    }
    println!();
    println!("Llama-2-7B layer: q, k, v, o, gate, up, down back to back in one graph (32 layers of distinct weights per replay), per layer:");
    println!("|  M | kernel                       | PDL | us/layer |  GB/s  | of copy |");
    println!("|----|------------------------------|-----|----------|--------|---------|");
    for r in layer_rows {
        println!("{r}");
    }
    println!();
    println!("The same layer as the engine launches it: q/k/v and gate/up stacked (4 launches), default kernel, per layer;");
    println!("L2 prefetch: each launch's last blocks ask L2 for that much of the next linear's codes (in-kernel):");
    println!("|  M | PDL | L2 prefetch | us/layer |  GB/s  | of copy |");
    println!("|----|-----|-------------|----------|--------|---------|");
    for r in stacked_rows {
        println!("{r}");
    }
    if !alloc_rows.is_empty() {
        println!();
        println!("Allocation nodes (LMQ_BENCH_ALLOC=1), stacked layer, PDL off, no prefetch:");
        println!("|  M | outputs                     | us/layer | of copy |");
        println!("|----|-----------------------------|----------|---------|");
        for r in alloc_rows {
            println!("{r}");
        }
    }
    if !sweep_rows.is_empty() {
        println!();
        println!("Plan sweep (LMQ_BENCH_SWEEP=1), stacked layer, PDL on; each row varies one linear, the last all:");
        println!("|  M | plan | us/layer | of copy |");
        println!("|----|------|----------|---------|");
        for r in sweep_rows {
            println!("{r}");
        }
    }
    Ok(())
}
