//! Times the CPU W4 linear at decode batch sizes on a SmolLM2-sized
//! gate/up projection (576 → 1536, g = 64), with random 4-bit weights:
//! `cargo run --release -p lmq-turbomind --example w4_speed`.

use std::time::Instant;

use half::f16;
use lmq_turbomind::backend::cpu::{CpuBackend, Matrix};
use lmq_turbomind::backend::{Backend, HostLinear, HostWeight};
use lmq_turbomind::quant::awq::{pack_int4, AwqTensors};

fn main() {
    let (k, n, g) = (576usize, 1536usize, 64usize);
    let mut seed = 1u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let q: Vec<u8> = (0..k * n).map(|_| (next() % 16) as u8).collect();
    let z: Vec<u8> = (0..k / g * n).map(|_| (next() % 16) as u8).collect();
    let tensors = AwqTensors {
        in_features: k,
        out_features: n,
        group_size: g,
        qweight: pack_int4(&q, k, n),
        qzeros: pack_int4(&z, k / g, n),
        scales: (0..k / g * n).map(|_| f16::from_f32(0.01)).collect(),
    };
    let backend = CpuBackend::new();
    let linear = backend
        .upload_linear(HostLinear {
            weight: HostWeight::Awq(tensors),
            out_features: n,
            in_features: k,
            bias: None,
        })
        .expect("upload");
    for m in [1usize, 4, 16] {
        let x = Matrix {
            data: (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect(),
            rows: m,
            cols: k,
        };
        let reps = 2000;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(backend.linear(&x, &linear).expect("linear"));
        }
        let per = t.elapsed().as_secs_f64() / reps as f64;
        let bytes = backend.linear_bytes(&linear) as f64;
        println!(
            "M={m:2}: {:8.1} µs per call, {:6.2} GB/s of weights, {:6.1} GFLOP/s",
            per * 1e6,
            bytes / per / 1e9,
            2.0 * (m * k * n) as f64 / per / 1e9
        );
    }
}
