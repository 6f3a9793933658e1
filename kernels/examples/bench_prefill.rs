//! Prefill linears at M = 2048 (`LMQ_BENCH_PREFILL_M` sets another row
//! count) on Llama-2-7B's layer shapes (and gate|up stacked, as the engine runs them): cuBLAS fp16
//! GEMM over dense fp16 weights (the ceiling, fp32 output as the engine
//! uses it) against the 4-bit path the engine takes above 16 rows (the
//! W4A16 weights dequantized into a scratch fp16 matrix, then the same
//! GEMM). Reports TFLOP/s of each and their ratio.
//!
//! Then the wgmma kernels (`W4A16Linear::forward_wgmma_split`, sm_90
//! only: `WgmmaKernel::Registers`, the warp-specialized
//! `WgmmaKernel::Specialized` with K unsplit and with the split
//! `W4A16Linear::wgmma_auto_splits` picks for these rows (its S printed; 1 where
//! the tiles fill the GPU), its CTA pairs, `WgmmaKernel::Multicast`, and
//! `WgmmaKernel::CodesTma`, which brings the codes by TMA, unsplit and split),
//! which dequantize the codes inside their
//! main loops, and the largest difference between each one's output and
//! the dequantize-then-GEMM path's. (The
//! side-stream pipelining and the weight slices, both measured slower in
//! sessions 9 and 10, are no longer timed here; docs/BENCHMARKS.md keeps
//! their numbers.)
//!
//! Timing: CUDA events around 10 back-to-back calls, median of 7 rounds,
//! after warm-up. `cargo run --release -p lmq-kernels --example bench_prefill`.

use half::f16;
use lmq_kernels::{Blas, KernelError, PackedW4, W4A16Linear, WgmmaKernel};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{open_device, Timing};

const CALLS: usize = 10;
const ROUNDS: usize = 7;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = open_device()? else {
        return Ok(());
    };
    let rows: usize = match std::env::var("LMQ_BENCH_PREFILL_M") {
        Ok(v) => v.trim().parse().ok().filter(|&m| m > 0).ok_or_else(|| {
            format!("LMQ_BENCH_PREFILL_M must be a positive row count, got {v:?}")
        })?,
        Err(_) => 2048,
    };
    println!("M = {rows} rows");
    let blas = Blas::new(&dev)?;
    let timing = Timing::new(&dev, 3, ROUNDS, CALLS)?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    println!(
        "| linear | K x N | cuBLAS fp16 TFLOP/s | W4 dequant+GEMM TFLOP/s | ratio | wgmma registers TFLOP/s | ratio | wgmma specialized TFLOP/s | ratio | split S | specialized split-K TFLOP/s | ratio | wgmma multicast TFLOP/s | ratio | codes-tma TFLOP/s | ratio | codes-tma split-K TFLOP/s | ratio | wgmma vs dequant+GEMM, max |Δ| / max |y| |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, k, n) in [
        ("q/k/v/o", 4096usize, 4096usize),
        ("gate/up", 4096, 11008),
        ("down", 11008, 4096),
        // gate and up stacked, as the engine runs them.
        ("gate|up", 4096, 22016),
    ] {
        let g = 128;
        let qweight: Vec<i32> = (0..k * n / 8).map(|_| next() as i32).collect();
        let qzeros: Vec<i32> = (0..(k / g) * n / 8).map(|_| next() as i32).collect();
        let scales: Vec<f16> = (0..(k / g) * n).map(|_| f16::from_f32(0.01)).collect();
        let packed = PackedW4::from_awq(&qweight, &qzeros, &scales, k, n, g)?;
        let w4 = W4A16Linear::new(&dev, &packed, None)?;
        let x: Vec<f16> = (0..rows * k)
            .map(|i| f16::from_f32(((i % 13) as f32 - 6.0) / 8.0))
            .collect();
        let x = dev.upload(&x, rows, k)?;
        let mut dense = dev.uninit::<f16>(n, k)?;
        w4.dequantize_into(&dev, &mut dense)?;
        let mut scratch = dev.uninit::<f16>(n, k)?;
        let mut out = dev.uninit::<f32>(rows, n)?;
        // Milliseconds per call.
        let time = |f: &mut dyn FnMut() -> Result<(), KernelError>| -> Result<f64, Box<dyn std::error::Error>> {
            Ok(timing.us(f)? * 1e-3)
        };
        let dense_ms = time(&mut || blas.gemm_f16(&dev, &x, &dense, &mut out))?;
        let w4_ms = time(&mut || {
            w4.dequantize_into(&dev, &mut scratch)?;
            blas.gemm_f16(&dev, &x, &scratch, &mut out)
        })?;
        // The wgmma kernels, where they take the shape (sm_90), and how far
        // their outputs are from the dequantize-then-GEMM path's.
        let mut wgmma = Vec::new();
        let mut split = 1;
        if w4.wgmma_supports(&dev) {
            w4.dequantize_into(&dev, &mut scratch)?;
            blas.gemm_f16(&dev, &x, &scratch, &mut out)?;
            let reference = dev.download(&out)?;
            let scale = reference.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            split = w4.wgmma_auto_splits(&dev, rows);
            for (kernel, splits) in [
                (WgmmaKernel::Registers, 1),
                (WgmmaKernel::Specialized, 1),
                (WgmmaKernel::Specialized, split),
                (WgmmaKernel::Multicast, 1),
                (WgmmaKernel::CodesTma, 1),
                (WgmmaKernel::CodesTma, split),
            ] {
                // Poisoned first, so that an output the kernel did not
                // write shows as NaN rather than as the GEMM's values.
                dev.fill(&mut out, f32::NAN)?;
                w4.forward_wgmma_split(kernel, splits, &dev, &x, &mut out)?;
                let got = dev.download(&out)?;
                if got.iter().any(|v| !v.is_finite()) {
                    return Err(format!(
                        "the {} wgmma GEMM left outputs unwritten (NaN)",
                        kernel.name()
                    )
                    .into());
                }
                let ms = time(&mut || w4.forward_wgmma_split(kernel, splits, &dev, &x, &mut out))?;
                let worst = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                wgmma.push((ms, worst / scale));
            }
        }
        dev.context().check_err()?;
        let flops = 2.0 * (rows * k * n) as f64;
        let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
        print!(
            "| {name} | {k}x{n} | {:.0} | {:.0} | {:.2}x |",
            tf(dense_ms),
            tf(w4_ms),
            dense_ms / w4_ms
        );
        if wgmma.is_empty() {
            print!(" n/a | | n/a | | | n/a | | n/a | | n/a | | n/a | | |");
        } else {
            for (i, (ms, _)) in wgmma.iter().enumerate() {
                if i == 2 {
                    print!(" {split} |");
                }
                print!(" {:.0} | {:.2}x |", tf(*ms), dense_ms / ms);
            }
            let diff = wgmma.iter().map(|(_, d)| *d).fold(0.0f32, f32::max);
            print!(" {diff:.1e} |");
        }
        println!();
    }
    Ok(())
}
