//! Prefill linears at M = 2048 on Llama-2-7B's layer shapes: cuBLAS fp16
//! GEMM over dense fp16 weights (the ceiling, fp32 output as the engine
//! uses it) against the 4-bit path the engine takes above 16 rows (the
//! W4A16 weights dequantized into a scratch fp16 matrix, then the same
//! GEMM). Reports TFLOP/s of each and their ratio.
//!
//! Then the same 4-bit path pipelined as the prefetcher runs it: each
//! call's GEMM reads the weight dequantized during the previous call, while
//! the next weight is dequantized on a side stream, with cuBLAS asked to
//! plan for all SMs but `r` (`cublasSetSmCountTarget`) so that the
//! dequantization has SMs of its own; r = 0 is the prefetcher as first
//! written (session 7), and turbomind's prefetcher keeps
//! `LMQ_PREFILL_PREFETCH_SMS` (default 16).
//!
//! Last, the 4-bit path by slices (`W4A16Linear::prefill_chunked`): the
//! 16-byte-per-thread kernel `w4_dequant_rows` expands `c` weight rows at
//! a time into a `c`-row scratch and cuBLAS multiplies each slice into its
//! columns of the output, so the fp16 slice can stay in L2 between the two;
//! `c` = all rows is that kernel on the whole weight.
//!
//! Timing: CUDA events around 10 back-to-back calls, median of 7 rounds,
//! after warm-up. `cargo run --release -p lmq-kernels --example bench_prefill`.

use half::f16;
use lmq_kernels::{Blas, KernelError, PackedW4, W4A16Linear};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{open_device, Timing};

const M: usize = 2048;
const CALLS: usize = 10;
const ROUNDS: usize = 7;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = open_device()? else {
        return Ok(());
    };
    let blas = Blas::new(&dev)?;
    let timing = Timing::new(&dev, 3, ROUNDS, CALLS)?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let side = dev.side_stream()?;
    let sms = dev.num_sms() as usize;
    let reserves = [0usize, 8, 16, 24, 32];
    print!("| linear | K x N | cuBLAS fp16 TFLOP/s | W4 dequant+GEMM TFLOP/s | ratio |");
    for r in reserves {
        print!(" pipelined, {r} SMs kept |");
    }
    let chunks = [0usize, 4096, 2048, 1024, 512];
    for c in chunks {
        if c == 0 {
            print!(" rows kernel, whole |");
        } else {
            print!(" slices of {c} |");
        }
    }
    println!();
    println!(
        "|---|---|---|---|---|{}",
        "---|".repeat(reserves.len() + chunks.len())
    );
    for (name, k, n) in [
        ("q/k/v/o", 4096usize, 4096usize),
        ("gate/up", 4096, 11008),
        ("down", 11008, 4096),
    ] {
        let g = 128;
        let qweight: Vec<i32> = (0..k * n / 8).map(|_| next() as i32).collect();
        let qzeros: Vec<i32> = (0..(k / g) * n / 8).map(|_| next() as i32).collect();
        let scales: Vec<f16> = (0..(k / g) * n).map(|_| f16::from_f32(0.01)).collect();
        let packed = PackedW4::from_awq(&qweight, &qzeros, &scales, k, n, g)?;
        let w4 = W4A16Linear::new(&dev, &packed, None)?;
        let x: Vec<f16> = (0..M * k)
            .map(|i| f16::from_f32(((i % 13) as f32 - 6.0) / 8.0))
            .collect();
        let x = dev.upload(&x, M, k)?;
        let mut dense = dev.uninit::<f16>(n, k)?;
        w4.dequantize_into(&dev, &mut dense)?;
        let mut scratch = dev.uninit::<f16>(n, k)?;
        let mut out = dev.uninit::<f32>(M, n)?;
        // Milliseconds per call.
        let time = |f: &mut dyn FnMut() -> Result<(), KernelError>| -> Result<f64, Box<dyn std::error::Error>> {
            Ok(timing.us(f)? * 1e-3)
        };
        let dense_ms = time(&mut || blas.gemm_f16(&dev, &x, &dense, &mut out))?;
        let w4_ms = time(&mut || {
            w4.dequantize_into(&dev, &mut scratch)?;
            blas.gemm_f16(&dev, &x, &scratch, &mut out)
        })?;
        let mut ahead = dev.uninit::<f16>(n, k)?;
        w4.dequantize_into(&dev, &mut scratch)?;
        let mut pipelined = Vec::new();
        for r in reserves {
            blas.set_sm_count_target(&dev, if r == 0 { 0 } else { sms.saturating_sub(r) })?;
            let ms = time(&mut || {
                // `ahead` was last read by the previous call's GEMM, which
                // the mark covers.
                let mark = dev.mark()?;
                w4.dequantize_on_side(&dev, &side, &mark, &mut ahead)?;
                blas.gemm_f16(&dev, &x, &scratch, &mut out)?;
                dev.join(&side)?;
                std::mem::swap(&mut scratch, &mut ahead);
                Ok(())
            })?;
            pipelined.push(ms);
        }
        blas.set_sm_count_target(&dev, 0)?;
        let mut sliced = Vec::new();
        for c in chunks {
            let c = if c == 0 { n } else { c.min(n) };
            let mut slice = dev.uninit::<f16>(c, k)?;
            sliced.push(time(&mut || {
                w4.prefill_chunked(&dev, &blas, &x, &mut out, c, &mut slice)
            })?);
        }
        dev.context().check_err()?;
        let flops = 2.0 * (M * k * n) as f64;
        let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
        print!(
            "| {name} | {k}x{n} | {:.0} | {:.0} | {:.2}x |",
            tf(dense_ms),
            tf(w4_ms),
            dense_ms / w4_ms
        );
        for ms in pipelined.into_iter().chain(sliced) {
            print!(" {:.0} ({:.2}x) |", tf(ms), dense_ms / ms);
        }
        println!();
    }
    Ok(())
}
