//! Times the CPU quantized linears at decode and prefill batch sizes, on
//! SmolLM2's shapes with random weights: the gate/up projection (576 →
//! 1536, 4-bit, g = 64) with int8 and with fp32 activations, and the output
//! projection (576 → 49152) in fp16 and in int8:
//! `cargo run --release -p lmq-turbomind --example w4_speed`.

use std::time::Instant;

use half::f16;
use lmq_turbomind::backend::cpu::{CpuBackend, CpuLinear, CpuOptions, Matrix, W4Activations};
use lmq_turbomind::backend::{Backend, HostLinear, HostWeight};
use lmq_turbomind::quant::awq::{pack_int4, AwqTensors};

fn lcg(seed: &mut u64) -> u32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u32
}

/// Best of five runs of `reps` calls, in seconds per call.
fn time(backend: &CpuBackend, x: &Matrix, w: &CpuLinear, reps: usize) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(backend.linear(x, w).expect("linear"));
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn report(name: &str, backend: &CpuBackend, w: &CpuLinear, k: usize, n: usize) {
    // `W4_SPEED_ROWS=512` (say) times one batch size only, e.g. under perf.
    let only: Option<usize> = std::env::var("W4_SPEED_ROWS")
        .ok()
        .and_then(|v| v.parse().ok());
    for m in [1usize, 4, 16, 512] {
        if only.is_some_and(|o| o != m) {
            continue;
        }
        let x = Matrix {
            data: (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect(),
            rows: m,
            cols: k,
        };
        let reps = (200_000_000 / (m * k * n)).clamp(2, 2000);
        let per = time(backend, &x, w, reps);
        let bytes = backend.linear_bytes(w) as f64;
        println!(
            "{name:28} M={m:3}: {:9.1} µs per call, {:6.2} GB/s of weights, {:6.1} GFLOP/s",
            per * 1e6,
            bytes / per / 1e9,
            2.0 * (m * k * n) as f64 / per / 1e9
        );
    }
}

/// One thread, one tile (16 outputs × 576 inputs, g = 64) against 8 rows,
/// all in L1: the integer kernel's compute ceiling.
fn kernel_peak() {
    use lmq_turbomind::backend::cpu::qkernels::{Chunk, QKernels, QRows, Tile, TILE};
    let (k, g, rows) = (576usize, 64usize, 8usize);
    let codes = vec![Chunk([0x5a; 64]); k / 8];
    let scales = vec![f16::from_f32(0.01); k / g * TILE];
    let zeros = vec![8u8; k / g * TILE];
    let xq = vec![3i8; rows * k];
    let d = vec![0.01f32; rows * k / 32];
    let isum = vec![3 * 32; rows * k / 32];
    let tile = Tile {
        codes: &codes,
        scales: &scales,
        zeros: &zeros,
        group: g,
        bits: 4,
    };
    let a = QRows {
        xq: &xq,
        d: &d,
        isum: &isum,
        k,
    };
    let kernels = QKernels::best();
    let mut out = vec![[0f32; TILE]; rows];
    (kernels.int)(&tile, &a, 0..rows, &mut out);
    assert!(out[0][0].is_finite(), "the kernel refused the call");
    let reps = 200_000;
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                (kernels.int)(&tile, &a, 0..rows, &mut out);
                std::hint::black_box(&mut out);
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "kernel peak, 1 thread, 16x576 tile x 8 rows: {:.0} ns per call, {:.1} int8 MAC/ns",
        best * 1e9,
        (TILE * k * rows) as f64 / best / 1e9
    );
}

fn main() {
    kernel_peak();
    if std::env::var("W4_SPEED_PEAK_ONLY").is_ok() {
        return;
    }
    let mut seed = 1u64;
    let (k, n, g) = (576usize, 1536usize, 64usize);
    let q: Vec<u8> = (0..k * n).map(|_| (lcg(&mut seed) % 16) as u8).collect();
    let z: Vec<u8> = (0..k / g * n)
        .map(|_| (lcg(&mut seed) % 16) as u8)
        .collect();
    let tensors = AwqTensors {
        in_features: k,
        out_features: n,
        group_size: g,
        qweight: pack_int4(&q, k, n),
        qzeros: pack_int4(&z, k / g, n),
        scales: (0..k / g * n).map(|_| f16::from_f32(0.01)).collect(),
    };
    let fast = CpuBackend::new();
    let exact = CpuBackend::with_options(CpuOptions {
        w4_activations: W4Activations::F32,
    });
    println!("integer kernel: {}", fast.quant_kernel_name());
    let w4 = fast
        .upload_linear(HostLinear {
            weight: HostWeight::Awq(tensors.clone()),
            out_features: n,
            in_features: k,
            bias: None,
        })
        .expect("upload");
    // From DRAM, as in a decode step: 100 different weights (48 MB, more
    // than the L3) used in turn.
    let cold: Vec<CpuLinear> = (0..100)
        .map(|i| {
            let mut t = tensors.clone();
            t.scales[0] = f16::from_f32(0.01 + i as f32 * 1e-4);
            fast.upload_linear(HostLinear {
                weight: HostWeight::Awq(t),
                out_features: n,
                in_features: k,
                bias: None,
            })
            .expect("upload")
        })
        .collect();
    let x1 = Matrix {
        data: (0..k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect(),
        rows: 1,
        cols: k,
    };
    let per = (0..5)
        .map(|_| {
            let t = Instant::now();
            for w in &cold {
                std::hint::black_box(fast.linear(&x1, w).expect("linear"));
            }
            t.elapsed().as_secs_f64() / cold.len() as f64
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "{:28} M=  1: {:9.1} µs per call, {:6.2} GB/s of weights (from DRAM)",
        "576x1536 g64, int8 act",
        per * 1e6,
        fast.linear_bytes(&cold[0]) as f64 / per / 1e9
    );
    report("576x1536 g64, int8 act", &fast, &w4, k, n);
    report("576x1536 g64, fp32 act", &exact, &w4, k, n);
    if std::env::var("W4_SPEED_NO_HEAD").is_ok() {
        return;
    }

    let vocab = 49152;
    let dense: Vec<f32> = (0..vocab * k)
        .map(|_| f16::from_f32((lcg(&mut seed) % 2001) as f32 / 1e5 - 0.01).to_f32())
        .collect();
    let head = fast
        .upload_linear(HostLinear {
            weight: HostWeight::Dense(dense),
            out_features: vocab,
            in_features: k,
            bias: None,
        })
        .expect("upload");
    let head8 = fast.int8_linear(&head).expect("int8");
    report("lm_head 576x49152 fp16", &fast, &head, k, vocab);
    report("lm_head 576x49152 int8", &fast, &head8, k, vocab);
}
