//! The wgmma 4-bit prefill GEMM (`W4A16Linear::forward_wgmma`, sm_90)
//! against two f64 references: the product with the dequantized fp16
//! weights that `dequantize_into` writes (the same weights the kernel
//! feeds the tensor cores, so only fp32 summation separates them: any
//! misplaced tile, chunk, swizzle or token shows as an O(1) error), and
//! the product with the exact `(q − z)·s` weights (the fp16 rounding of
//! the weights on top). Outputs are NaN-poisoned first; every case runs
//! twice and must be bit-identical. Layers the kernel does not take must
//! be refused with an error.
//!
//! All three kernels ([`WgmmaKernel::ALL`]) run every case through
//! `forward_wgmma_with` (unsplit unless `LMQ_W4_WGMMA_SPLIT` says
//! otherwise), and the specialized one also with K split 2, 3 and 8 ways
//! asked (each distinct count the layer makes of them, uneven splits
//! included; `split_plan`): split sums add the same products in another
//! order, so they meet the same bounds and must be as deterministic. The
//! partial tiles are NaN-poisoned before every split launch, so a block
//! that summed one before it was written would show. A split the layer
//! cannot take is refused.
//!
//! Without a CUDA GPU the tests print "skipped: no CUDA device"; on a GPU
//! other than sm_90 they check the refusal only.

mod common;

use common::{device, draw_w4, Rng, W4Draw};
use half::f16;
use lmq_kernels::{DeviceMatrix, Element, GpuDevice, OutElement, W4A16Linear, WgmmaKernel};

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn poisoned<T: Element>(dev: &GpuDevice, rows: usize, cols: usize) -> DeviceMatrix<T> {
    let mut m = dev.zeros::<T>(rows, cols).unwrap();
    dev.fill(&mut m, T::POISON).unwrap();
    m
}

/// `out = x · W` by `kernel`, with K split `splits` ways, or as
/// `forward_wgmma_with` chooses where `splits` is `None`.
fn launch<O: OutElement>(
    lin: &W4A16Linear,
    kernel: WgmmaKernel,
    splits: Option<usize>,
    dev: &GpuDevice,
    x: &DeviceMatrix<f16>,
    out: &mut DeviceMatrix<O>,
) -> lmq_kernels::Result<()> {
    match splits {
        None => lin.forward_wgmma_with(kernel, dev, x, out),
        Some(s) => lin.forward_wgmma_split(kernel, s, dev, x, out),
    }
}

#[test]
fn wgmma_gemm_matches_dequantized_product() {
    let Some(dev) = device() else { return };
    // (m, k, n, g): one token; a partial token block; several blocks both
    // ways (blocks are 128 channels × 256 tokens); groups of 64 and 128; K
    // of 11 k-blocks (11008 = 86 of them is the down projection's); an odd
    // number of channel blocks; a whole token block with no tail.
    let cases = [
        (1usize, 128usize, 256usize, 64usize, 91u64),
        (77, 256, 256, 128, 92),
        (130, 512, 512, 64, 93),
        (257, 1408, 768, 128, 94),
        (600, 384, 384, 64, 95),
        (256, 256, 128, 128, 96),
        // Both halves of a pair's boxes past M (M ≤ 128) over 8 stages.
        (64, 1024, 256, 64, 97),
    ];
    let mut ran = 0;
    for (m, k, n, g, seed) in cases {
        let W4Draw {
            packed,
            x,
            want: exact,
            ..
        } = draw_w4(&mut Rng(seed), m, k, n, g, false);
        let lin = W4A16Linear::new(&dev, &packed, None).unwrap();
        let xd = dev.upload(&x, m, k).unwrap();
        if !lin.wgmma_supports(&dev) {
            let mut out = poisoned::<f32>(&dev, m, n);
            assert!(
                lin.forward_wgmma(&dev, &xd, &mut out).is_err(),
                "m{m} k{k} n{n} g{g}: an unsupported device was not refused"
            );
            continue;
        }
        // The weights the kernel uses: dequantize_into's fp16 [n][k].
        let mut w = dev.zeros::<f16>(n, k).unwrap();
        lin.dequantize_into(&dev, &mut w).unwrap();
        let w = dev.download(&w).unwrap();
        let mut want = vec![0.0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                want[r * n + j] = (0..k)
                    .map(|kk| x[r * k + kk].to_f64() * w[j * k + kk].to_f64())
                    .sum();
            }
        }
        let mut first: Option<Vec<f64>> = None;
        let kbs = k / 128;
        W4A16Linear::poison_split_partials(true);
        // (kernel, splits made; None: forward_wgmma_with's choice).
        let mut variants: Vec<(WgmmaKernel, Option<usize>)> = WgmmaKernel::ALL
            .into_iter()
            .map(|kernel| (kernel, None))
            .collect();
        for kernel in [WgmmaKernel::Specialized, WgmmaKernel::CodesTma] {
            for asked in [2usize, 3, 8].into_iter().filter(|&s| s <= kbs) {
                let made = lin.split_plan(asked).1;
                if made > 1 && !variants.contains(&(kernel, Some(made))) {
                    variants.push((kernel, Some(made)));
                }
            }
        }
        // The specialized kernel's outputs by split, for the codes-by-TMA
        // one, which must give the same bits (only its copies differ).
        let mut specialized: Vec<(Option<usize>, Vec<f64>)> = Vec::new();
        for (kernel, splits) in variants {
            // A kernel that fell back to another would pass unnoticed.
            assert!(kernel.available(), "{}: no tensor maps", kernel.name());
            let what = format!(
                "wgmma {} split {} m{m} k{k} n{n} g{g}",
                kernel.name(),
                splits.map_or("default".to_string(), |s| s.to_string())
            );
            let run = |out: &mut DeviceMatrix<f32>| launch(&lin, kernel, splits, &dev, &xd, out);
            let mut out = poisoned::<f32>(&dev, m, n);
            run(&mut out).unwrap();
            let got: Vec<f64> = dev
                .download(&out)
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{what}: NaN or inf (unwritten?)"
            );
            match kernel {
                WgmmaKernel::Specialized => specialized.push((splits, got.clone())),
                WgmmaKernel::CodesTma => {
                    let (_, same) = specialized
                        .iter()
                        .find(|(s, _)| *s == splits)
                        .expect("the specialized kernel runs each split first");
                    assert!(
                        same.iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: differs from the specialized kernel's bits"
                    );
                }
                _ => {}
            }
            let e_deq = rel_l2(&got, &want);
            let e_exact = rel_l2(&got, &exact);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f64, f64::max);
            let scale = want.iter().map(|v| v.abs()).fold(0.0f64, f64::max);
            println!(
                "{what}: rel L2 {e_deq:.2e} against the dequantized weights, {e_exact:.2e} against \
                 the exact ones; max |Δ| {worst:.2e} of {scale:.2e}"
            );
            // fp32 sums of K fp16 products: ~1e-7 relative; 1e-5 leaves room.
            assert!(
                e_deq <= 1e-5,
                "{what}: {e_deq:.2e} against the dequantized weights"
            );
            assert!(
                worst <= 1e-4 * scale,
                "{what}: max |Δ| {worst:.2e} of {scale:.2e}"
            );
            // The fp16 rounding of the weights, as every W4A16 kernel has it.
            assert!(
                e_exact <= 1e-3,
                "{what}: {e_exact:.2e} against the exact weights"
            );
            let mut again = poisoned::<f32>(&dev, m, n);
            run(&mut again).unwrap();
            let again = dev.download(&again).unwrap();
            assert!(
                again
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| (*a as f64).to_bits() == b.to_bits()),
                "{what}: a second launch differs"
            );
            // fp16 output: the same (deterministic) sums, rounded once.
            let mut half = poisoned::<f16>(&dev, m, n);
            launch(&lin, kernel, splits, &dev, &xd, &mut half).unwrap();
            let half = dev.download(&half).unwrap();
            assert!(
                half.iter()
                    .zip(&got)
                    .all(|(h, f)| h.to_bits() == f16::from_f32(*f as f32).to_bits()),
                "{what}: the fp16 output is not the fp32 output rounded"
            );
            // The two kernels feed the tensor cores the same operands in
            // the same order; a difference is reported, not asserted.
            match &first {
                None => first = Some(got),
                Some(f) => {
                    let d = f
                        .iter()
                        .zip(&got)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    println!("{what}: max |Δ| {d:.2e} against the first kernel");
                }
            }
        }
        // Splits past the k-blocks (or past 8), and splits of another
        // kernel, are refused.
        let mut out = poisoned::<f32>(&dev, m, n);
        for (kernel, splits) in [
            (WgmmaKernel::Specialized, 0),
            (WgmmaKernel::Specialized, kbs.min(8) + 1),
            (WgmmaKernel::CodesTma, kbs.min(8) + 1),
            (WgmmaKernel::Registers, 2),
            (WgmmaKernel::Multicast, 2),
        ] {
            assert!(
                lin.forward_wgmma_split(kernel, splits, &dev, &xd, &mut out)
                    .is_err(),
                "{} split {splits} of k{k} was not refused",
                kernel.name()
            );
        }
        ran += 1;
    }
    println!("wgmma GEMM: {ran} cases on the GPU");
    if dev.compute_capability() == (9, 0) {
        assert_eq!(ran, cases.len(), "wgmma cases skipped on sm_90");
    }
}

#[test]
fn wgmma_gemm_refuses_layers_it_does_not_take() {
    let Some(dev) = device() else { return };
    // 200 and 320 outputs (not multiples of 128), 576 inputs (not of 128),
    // groups of 32.
    for (k, n, g) in [
        (256usize, 200usize, 64usize),
        (256, 320, 64),
        (576, 256, 64),
        (256, 256, 32),
    ] {
        let W4Draw { packed, x, .. } = draw_w4(&mut Rng(95), 3, k, n, g, false);
        let lin = W4A16Linear::new(&dev, &packed, None).unwrap();
        assert!(!lin.wgmma_supports(&dev), "k{k} n{n} g{g} claimed");
        let xd = dev.upload(&x, 3, k).unwrap();
        let mut out = poisoned::<f32>(&dev, 3, n);
        let err = lin.forward_wgmma(&dev, &xd, &mut out).unwrap_err();
        println!("k{k} n{n} g{g}: refused: {err}");
    }
}
