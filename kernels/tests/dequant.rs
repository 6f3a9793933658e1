//! The prefill path's dequantization and GEMM against a host reference
//! written from the AutoAWQ definition `w = (q − z)·s`:
//!
//! - `dequantize_into` must give, bit for bit, `(q − z)·s` rounded once to
//!   fp16 (the half crate's round-to-nearest-even of the exact fp32
//!   product), for group sizes 32, 64 and 128, K not a multiple of 128,
//!   scales of both signs down to fp16's subnormal range;
//! - cuBLAS over that weight (`Blas::gemm_f16`, the engine's prefill path
//!   without the wgmma GEMM) must match the f64 product `x · Wᵀ` over the
//!   host-dequantized weight in every column (NaN-poisoned before).
//!
//! Without a CUDA GPU the test prints "skipped: no CUDA device" and passes.

mod common;

use common::{awq_pack, device, Rng};
use half::f16;
use lmq_kernels::{Blas, GpuDevice, PackedW4, W4A16Linear};

/// A random 4-bit layer and its dense fp16 weight `[N][K]`.
struct Layer {
    packed: PackedW4,
    dense: Vec<f16>,
}

fn layer(rng: &mut Rng, k: usize, n: usize, g: usize) -> Layer {
    let groups = k / g;
    let q: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
    let z: Vec<u8> = (0..groups * n).map(|_| rng.below(16) as u8).collect();
    // Magnitudes from 1e-7 (products in fp16's subnormal range) to 0.5,
    // both signs.
    let s: Vec<f16> = (0..groups * n)
        .map(|_| {
            let mag = 10f64.powf(rng.uniform(-7.0, -0.3));
            let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
            f16::from_f64(sign * mag)
        })
        .collect();
    let mut dense = vec![f16::ZERO; n * k];
    for kk in 0..k {
        for nn in 0..n {
            let gi = (kk / g) * n + nn;
            let diff = q[kk * n + nn] as f32 - z[gi] as f32;
            dense[nn * k + kk] = f16::from_f32(diff * s[gi].to_f32());
        }
    }
    let packed = PackedW4::from_awq(&awq_pack(&q, k, n), &awq_pack(&z, groups, n), &s, k, n, g)
        .expect("pack");
    Layer { packed, dense }
}

fn poisoned(dev: &GpuDevice, rows: usize, cols: usize) -> lmq_kernels::DeviceMatrix<f16> {
    let mut m = dev.zeros::<f16>(rows, cols).expect("alloc");
    dev.fill(&mut m, f16::NAN).expect("fill");
    m
}

fn same_bits(what: &str, got: &[f16], want: &[f16]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{what}: element {i} is {a} ({:#06x}), the reference {b} ({:#06x})",
            a.to_bits(),
            b.to_bits()
        );
    }
}

const SHAPES: [(usize, usize, usize); 5] = [
    (256, 64, 128),
    (96, 40, 32),
    (320, 24, 64),
    (1024, 136, 128),
    (160, 48, 32),
];

#[test]
fn dequantization_is_exact() {
    let Some(dev) = device() else { return };
    let mut rng = Rng(0x5eed_dec0);
    for (k, n, g) in SHAPES {
        let l = layer(&mut rng, k, n, g);
        let w4 = W4A16Linear::new(&dev, &l.packed, None).expect("upload");
        let mut whole = poisoned(&dev, n, k);
        w4.dequantize_into(&dev, &mut whole).expect("dequantize");
        same_bits(
            &format!("dequantize_into {k}x{n} g{g}"),
            &dev.download(&whole).unwrap(),
            &l.dense,
        );
    }
}

#[test]
fn prefill_gemm_matches_reference() {
    let Some(dev) = device() else { return };
    let blas = Blas::new(&dev).expect("cuBLAS");
    let mut rng = Rng(0x5eed_9e33);
    for (k, n, g) in SHAPES {
        let l = layer(&mut rng, k, n, g);
        let w4 = W4A16Linear::new(&dev, &l.packed, None).expect("upload");
        let m = 37;
        let x = rng.f16s(m * k, -1.0, 1.0);
        let mut want = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                want[r * n + c] = (0..k)
                    .map(|i| x[r * k + i].to_f64() * l.dense[c * k + i].to_f64())
                    .sum();
            }
        }
        let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-30);
        let xd = dev.upload(&x, m, k).unwrap();
        let mut w = poisoned(&dev, n, k);
        w4.dequantize_into(&dev, &mut w).expect("dequantize");
        let mut out = dev.zeros::<f32>(m, n).unwrap();
        dev.fill(&mut out, f32::NAN).unwrap();
        blas.gemm_f16(&dev, &xd, &w, &mut out).expect("GEMM");
        let got = dev.download(&out).unwrap();
        let what = format!("dequantize + gemm_f16 {k}x{n} g{g}");
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{what}: a column was not written"
        );
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt()
            / norm;
        // fp16 products summed in fp32 over at most 1024 terms.
        assert!(err < 1e-5, "{what}: relative L2 error {err:e}");
    }
}
