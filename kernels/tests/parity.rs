//! GPU-vs-CPU parity tests in the manner of ggml's test-backend-ops: every
//! case draws fresh seeded random inputs (never zeros), poisons the output
//! with NaN before the launch, rejects NaN/inf, and compares with an
//! independent scalar f64 reference under a stated per-op bound.
//!
//! Without a CUDA GPU every test prints "skipped: no CUDA device" and passes.

mod common;

use common::{device, draw_w4, Rng, W4Draw};
use half::f16;
use lmq_kernels::{
    add_rms_norm, embedding, rms_norm, rope, rope_inv_freq, silu_mul, DeviceMatrix, Element,
    GpuDevice, KernelError, PackedW4, W4A16Linear, W4Kernel, DEFAULT_KERNEL, MAX_ROWS,
};

trait ToF64: Copy {
    fn f(self) -> f64;
}
impl ToF64 for f16 {
    fn f(self) -> f64 {
        self.to_f64()
    }
}
impl ToF64 for f32 {
    fn f(self) -> f64 {
        self as f64
    }
}

/// Checks finiteness, ‖got − want‖/‖want‖ ≤ rel_l2 and
/// max|got − want| ≤ max_rel · max|want|. Returns the relative L2 error.
fn compare<T: ToF64>(what: &str, got: &[T], want: &[f64], rel_l2: f64, max_rel: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den, mut max_err, mut max_ref) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g.f();
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (want {w}): unwritten or overflow"
        );
        num += (g - w) * (g - w);
        den += w * w;
        max_err = max_err.max((g - w).abs());
        max_ref = max_ref.max(w.abs());
    }
    let rel = (num / den.max(1e-300)).sqrt();
    assert!(
        rel <= rel_l2,
        "{what}: relative L2 error {rel:.3e} > {rel_l2:.1e}"
    );
    assert!(
        max_err <= max_rel * max_ref,
        "{what}: max error {max_err:.3e} > {max_rel:.1e} · max|ref| {max_ref:.3e}"
    );
    rel
}

fn poisoned<T: Element>(dev: &GpuDevice, rows: usize, cols: usize) -> DeviceMatrix<T> {
    let mut m = dev.zeros::<T>(rows, cols).unwrap();
    dev.fill(&mut m, T::POISON).unwrap();
    m
}

// ---------------------------------------------------------------- W4A16 --

#[derive(Clone, Copy)]
struct W4Case {
    m: usize,
    k: usize,
    n: usize,
    g: usize,
    bias: bool,
    out_f32: bool,
    splits: Option<usize>,
    /// Launch with programmatic dependent launch (where the GPU has it).
    pdl: bool,
    /// Force the kernel's batch depth (k-blocks loaded together; classic
    /// kernel only).
    batch: Option<usize>,
    /// The kernel to run.
    kernel: W4Kernel,
}

/// Bounds: weights are dequantized in fp16 (one rounding each, as AutoAWQ's
/// kernels do) and accumulated in fp32; fp16 output adds one rounding.
const W4_REL_L2_F32: f64 = 1e-3;
const W4_REL_L2_F16: f64 = 2e-3;
const W4_MAX_REL: f64 = 5e-3;

fn run_w4<O: Element + ToF64 + lmq_kernels::OutElement>(dev: &GpuDevice, c: W4Case, seed: u64) {
    let W4Case { m, k, n, g, .. } = c;
    let W4Draw {
        packed,
        x,
        bias,
        want,
    } = draw_w4(&mut Rng(seed), m, k, n, g, c.bias);
    let mut layer = W4A16Linear::new(dev, &packed, bias.as_deref()).unwrap();
    layer.set_kernel_kind(c.kernel).unwrap();
    let pdl = layer.set_pdl(c.pdl);
    assert!(
        layer.set_batch(c.batch),
        "no kernel variant with batch {:?}",
        c.batch
    );
    let xd = dev.upload(&x, m, k).unwrap();
    let mut out = poisoned::<O>(dev, m, n);
    let plan = layer.forward_with(dev, &xd, &mut out, c.splits).unwrap();
    let got = dev.download(&out).unwrap();
    let what = format!(
        "w4a16 m{m} k{k} n{n} g{g} bias={} out={} splits={} pdl={pdl} batch={:?} {:?} ppb={}",
        c.bias,
        O::NAME,
        plan.splits,
        c.batch,
        c.kernel,
        plan.pairs_per_block
    );
    let bound = if c.out_f32 {
        W4_REL_L2_F32
    } else {
        W4_REL_L2_F16
    };
    let rel = compare(&what, &got, &want, bound, W4_MAX_REL);

    // A second launch (re-poisoned) must give bit-identical results: the
    // warps' partial sums are added in a fixed order.
    dev.fill(&mut out, O::POISON).unwrap();
    layer.forward_with(dev, &xd, &mut out, c.splits).unwrap();
    let again = dev.download(&out).unwrap();
    let same = got
        .iter()
        .zip(&again)
        .all(|(a, b)| a.f().to_bits() == b.f().to_bits());
    assert!(same, "{what}: second launch differs from the first");
    println!("{what}: rel L2 {rel:.2e} (bound {bound:.0e})");
}

fn w4(dev: &GpuDevice, c: W4Case, seed: u64) {
    if c.out_f32 {
        run_w4::<f32>(dev, c, seed)
    } else {
        run_w4::<f16>(dev, c, seed)
    }
}

#[test]
fn w4a16_matches_reference() {
    let Some(dev) = device() else { return };
    dev.compile_all().unwrap();
    let case = |m, k, n, g, bias, out_f32, splits| W4Case {
        m,
        k,
        n,
        g,
        bias,
        out_f32,
        splits,
        pdl: false,
        batch: None,
        kernel: W4Kernel::Classic,
    };
    let pdl = |c: W4Case| W4Case { pdl: true, ..c };
    let batch = |u, c: W4Case| W4Case {
        batch: Some(u),
        ..c
    };
    let cases = [
        case(1, 576, 200, 64, true, false, None),
        case(3, 576, 200, 64, false, true, None),
        case(16, 576, 200, 64, true, false, None),
        case(3, 576, 200, 64, true, false, Some(1)),
        case(1, 1536, 256, 128, false, true, Some(1)),
        case(3, 1536, 264, 128, true, false, Some(1)),
        case(16, 1536, 256, 128, true, true, None),
        case(5, 4096, 512, 32, false, false, None),
        case(16, 4096, 1024, 32, true, false, None),
        case(2, 11008, 136, 128, false, true, None),
        case(7, 2048, 4104, 64, true, false, None),
        // The decode shapes' K and M edges: 8 / 9 rows (one and two mma
        // token groups), K = 32·odd (a partial last chunk of 128), the
        // most warps per block, an odd number of 8-column tiles.
        case(1, 4096, 1032, 128, false, true, None),
        case(4, 4096, 1032, 128, true, true, Some(16)),
        case(8, 1120, 520, 32, true, true, None),
        case(9, 1120, 520, 32, false, true, Some(5)),
        case(16, 11008, 264, 128, false, true, None),
        case(1, 96, 24, 32, true, false, None),
        pdl(case(1, 4096, 1024, 128, true, true, None)),
        pdl(case(12, 2048, 520, 64, false, false, Some(3))),
        // Every batch-depth variant the benchmark may pick.
        batch(2, case(1, 4096, 264, 128, true, true, None)),
        batch(2, case(3, 1152, 264, 128, false, true, Some(3))),
        batch(1, case(11, 4096, 264, 128, false, true, None)),
        batch(4, case(2, 2112, 264, 64, false, true, None)),
        batch(1, case(13, 2112, 264, 64, true, true, Some(5))),
        batch(1, case(4, 4064, 264, 32, false, true, None)),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        w4(&dev, c, 1000 + i as u64);
        // The same case on the default (streaming) kernel, where it has no
        // classic-only batch depth.
        if c.batch.is_none() {
            w4(
                &dev,
                W4Case {
                    kernel: DEFAULT_KERNEL,
                    ..c
                },
                2000 + i as u64,
            );
            for kernel in [
                W4Kernel::ClassicEarly { warps: 4 },
                W4Kernel::Stream {
                    warps: 8,
                    stages: 8,
                    blocks_per_sm: 1,
                },
                W4Kernel::Stream {
                    warps: 8,
                    stages: 4,
                    blocks_per_sm: 2,
                },
            ] {
                if kernel != DEFAULT_KERNEL {
                    w4(&dev, W4Case { kernel, ..c }, 4000 + i as u64);
                }
            }
        }
    }
    // Streaming launches: ring depths, warps, blocks per SM, so that blocks
    // walk several pairs (odd tile counts, a short last block, K padding,
    // a last warp with fewer k-blocks), with and without PDL.
    let stream = |warps, stages, blocks_per_sm, c: W4Case| W4Case {
        kernel: W4Kernel::Stream {
            warps,
            stages,
            blocks_per_sm,
        },
        ..c
    };
    let cases = [
        stream(8, 8, 1, case(1, 4096, 4104, 128, true, true, None)),
        stream(8, 4, 1, case(16, 4096, 4104, 128, false, false, None)),
        stream(4, 8, 2, pdl(case(4, 11008, 4096, 128, false, true, None))),
        stream(8, 8, 1, pdl(case(9, 11008, 2056, 128, true, true, None))),
        stream(3, 4, 1, case(5, 1120, 8200, 32, true, true, None)),
        stream(5, 4, 1, case(16, 2112, 4120, 64, false, true, None)),
        stream(8, 8, 1, case(2, 4064, 2600, 32, true, false, None)),
        stream(1, 4, 1, case(3, 576, 3096, 64, false, true, None)),
        stream(8, 8, 1, case(1, 96, 24, 32, true, true, None)),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        w4(&dev, c, 3000 + i as u64);
    }
}

/// Decode batches of more than MAX_ROWS rows run the kernel once per slice
/// of rows (`forward_chunked`, `forward_rows`): each slice must equal, bit
/// for bit, a launch on those rows uploaded alone, the whole against the
/// f64 reference, and a slice must leave the other rows as they were.
#[test]
fn w4a16_row_slices_match_whole_launches() {
    let Some(dev) = device() else { return };
    for (m, k, n, g, seed) in [
        (40usize, 320usize, 96usize, 32usize, 71u64),
        (64, 576, 200, 64, 72),
    ] {
        let W4Draw {
            packed,
            x,
            bias,
            want,
        } = draw_w4(&mut Rng(seed), m, k, n, g, true);
        let layer = W4A16Linear::new(&dev, &packed, bias.as_deref()).unwrap();
        let xd = dev.upload(&x, m, k).unwrap();
        for pdl in [false, true] {
            let what = format!("w4a16 row slices m{m} k{k} n{n} g{g} pdl={pdl}");
            let mut out = poisoned::<f32>(&dev, m, n);
            layer.forward_chunked(&dev, &xd, &mut out, pdl).unwrap();
            let got = dev.download(&out).unwrap();
            compare(&what, &got, &want, W4_REL_L2_F32, W4_MAX_REL);
            for row0 in (0..m).step_by(MAX_ROWS) {
                let rows = MAX_ROWS.min(m - row0);
                let alone = dev
                    .upload(&x[row0 * k..(row0 + rows) * k], rows, k)
                    .unwrap();
                let mut o = poisoned::<f32>(&dev, rows, n);
                layer.forward(&dev, &alone, &mut o).unwrap();
                let o = dev.download(&o).unwrap();
                let same = o
                    .iter()
                    .zip(&got[row0 * n..(row0 + rows) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{what}: rows {row0}.. differ from a launch on them alone"
                );
            }
            let mut part = poisoned::<f32>(&dev, m, n);
            layer.forward_rows(&dev, &xd, &mut part, 5, 4, pdl).unwrap();
            let part = dev.download(&part).unwrap();
            assert!(
                part[..5 * n]
                    .iter()
                    .chain(&part[9 * n..])
                    .all(|v| v.is_nan()),
                "{what}: rows outside 5..9 were written"
            );
            compare(
                &what,
                &part[5 * n..9 * n],
                &want[5 * n..9 * n],
                W4_REL_L2_F32,
                W4_MAX_REL,
            );
            assert!(
                layer
                    .forward_rows(&dev, &xd, &mut poisoned::<f32>(&dev, m, n), m - 3, 4, pdl)
                    .is_err(),
                "{what}: a slice past the last row was accepted"
            );
            println!("{what}: slices identical to launches alone");
        }
    }
}

/// A launch that asks L2 for the next linear's codes (every length: none,
/// one chunk, more chunks than blocks, the whole weight and past it)
/// writes the same bits as a plain launch, and the prefetched layer's own
/// results are unchanged.
#[test]
fn w4a16_l2_prefetch_changes_no_result() {
    let Some(dev) = device() else { return };
    let (m, k, n, g) = (3usize, 1536usize, 264usize, 128usize);
    let a = draw_w4(&mut Rng(81), m, k, n, g, false);
    let b = draw_w4(&mut Rng(82), m, k, 4104, 64, true);
    let la = W4A16Linear::new(&dev, &a.packed, None).unwrap();
    let lb = W4A16Linear::new(&dev, &b.packed, b.bias.as_deref()).unwrap();
    let xa = dev.upload(&a.x, m, k).unwrap();
    let xb = dev.upload(&b.x, m, k).unwrap();
    let mut plain = poisoned::<f32>(&dev, m, n);
    la.forward(&dev, &xa, &mut plain).unwrap();
    let plain = dev.download(&plain).unwrap();
    compare(
        "w4a16 before prefetch",
        &plain,
        &a.want,
        W4_REL_L2_F32,
        W4_MAX_REL,
    );
    // A launch into a poisoned output must write the plain launch's bits.
    let same_as_plain = |what: &str, launch: &dyn Fn(&mut DeviceMatrix<f32>)| {
        let mut out = poisoned::<f32>(&dev, m, n);
        launch(&mut out);
        let got = dev.download(&out).unwrap();
        assert!(
            got.iter()
                .zip(&plain)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: differs from the plain launch"
        );
    };
    for bytes in [0usize, 16, 40_000, 400_000, usize::MAX] {
        let what = format!("w4a16 with {bytes} bytes of the next layer prefetched");
        same_as_plain(&what, &|out| {
            la.forward_prefetching(&dev, &xa, out, &lb, bytes).unwrap()
        });
        let mut next = poisoned::<f32>(&dev, m, 4104);
        lb.forward(&dev, &xb, &mut next).unwrap();
        compare(
            &what,
            &dev.download(&next).unwrap(),
            &b.want,
            W4_REL_L2_F32,
            W4_MAX_REL,
        );
    }
    // The stored link (`set_l2_next`): plain and chunked launches keep
    // their bits, and a dropped next layer turns the prefetch off.
    let la = std::sync::Arc::new(la);
    let lb = std::sync::Arc::new(lb);
    la.set_l2_next(Some((&lb, 1 << 20)));
    same_as_plain("w4a16 with a stored next layer", &|out| {
        la.forward(&dev, &xa, out).unwrap()
    });
    drop(lb);
    same_as_plain("w4a16 after the stored next layer was dropped", &|out| {
        la.forward_chunked(&dev, &xa, out, false).unwrap()
    });
    println!("w4a16 l2 prefetch: identical to plain launches");
}

#[test]
fn w4a16_rejects_bad_shapes() {
    let Some(dev) = device() else { return };
    let (k, n, g) = (256, 64, 128);
    let packed = PackedW4::from_awq(
        &vec![0x1234_5678; k * n / 8],
        &vec![0x0808_0808; 2 * n / 8],
        &vec![f16::ONE; 2 * n],
        k,
        n,
        g,
    )
    .unwrap();
    let layer = W4A16Linear::new(&dev, &packed, None).unwrap();
    let x = dev.zeros::<f16>(2, k + 8).unwrap();
    let mut out = dev.zeros::<f16>(2, n).unwrap();
    assert!(matches!(
        layer.forward(&dev, &x, &mut out),
        Err(KernelError::Shape { .. })
    ));
    let x = dev.zeros::<f16>(17, k).unwrap();
    let mut out = dev.zeros::<f16>(17, n).unwrap();
    assert!(matches!(
        layer.forward(&dev, &x, &mut out),
        Err(KernelError::Shape { .. })
    ));
    let x = dev.zeros::<f16>(2, k).unwrap();
    let mut out = dev.zeros::<f32>(2, n - 8).unwrap();
    assert!(matches!(
        layer.forward(&dev, &x, &mut out),
        Err(KernelError::Shape { .. })
    ));
    assert!(W4A16Linear::new(&dev, &packed, Some(&[f16::ONE; 3])).is_err());
}

// ------------------------------------------------------------- RMSNorm --

/// fp16 output: one rounding of a value computed in fp32.
const NORM_REL_L2: f64 = 1e-3;
const NORM_MAX_REL: f64 = 2e-3;

#[test]
fn rms_norm_matches_reference() {
    let Some(dev) = device() else { return };
    for (i, &(rows, d)) in [(3usize, 1000usize), (2, 4096), (1, 33)].iter().enumerate() {
        let mut rng = Rng(2000 + i as u64);
        let eps = 1e-5f32;
        let res = rng.f16s(rows * d, -2.0, 2.0);
        let delta = rng.f16s(rows * d, -1.0, 1.0);
        let w = rng.f16s(d, 0.5, 1.5);

        // Fused form: residual += delta (stored as fp16), then the norm of it.
        let new_res: Vec<f16> = res
            .iter()
            .zip(&delta)
            .map(|(a, b)| f16::from_f64(a.to_f64() + b.to_f64()))
            .collect();
        let norm_ref = |v: &[f16]| -> Vec<f64> {
            let mut out = vec![0.0; rows * d];
            for r in 0..rows {
                let row = &v[r * d..(r + 1) * d];
                let ms = row.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for j in 0..d {
                    out[r * d + j] = row[j].to_f64() * inv * w[j].to_f64();
                }
            }
            out
        };
        let wd = dev.upload(&w, 1, d).unwrap();
        let mut rd = dev.upload(&res, rows, d).unwrap();
        let dd = dev.upload(&delta, rows, d).unwrap();
        let mut out = poisoned::<f16>(&dev, rows, d);
        add_rms_norm(&dev, &mut rd, &dd, &wd, eps, &mut out).unwrap();
        let got_res = dev.download(&rd).unwrap();
        for (j, (g, want)) in got_res.iter().zip(&new_res).enumerate() {
            let ulp = f16::from_bits(want.to_bits() + 1).to_f64() - want.to_f64();
            assert!(
                (g.to_f64() - want.to_f64()).abs() <= ulp.abs(),
                "residual {j}: {g} vs {want}"
            );
        }
        let what = format!("add_rms_norm {rows}x{d}");
        compare(
            &what,
            &dev.download(&out).unwrap(),
            &norm_ref(&new_res),
            NORM_REL_L2,
            NORM_MAX_REL,
        );

        // Plain form leaves its input alone.
        let xd = dev.upload(&res, rows, d).unwrap();
        let mut out = poisoned::<f16>(&dev, rows, d);
        rms_norm(&dev, &xd, &wd, eps, &mut out).unwrap();
        compare(
            &format!("rms_norm {rows}x{d}"),
            &dev.download(&out).unwrap(),
            &norm_ref(&res),
            NORM_REL_L2,
            NORM_MAX_REL,
        );
        assert_eq!(dev.download(&xd).unwrap(), res);
    }
    let x = dev.zeros::<f16>(2, 8).unwrap();
    let w = dev.zeros::<f16>(1, 9).unwrap();
    let mut out = dev.zeros::<f16>(2, 8).unwrap();
    assert!(rms_norm(&dev, &x, &w, 1e-5, &mut out).is_err());
}

// ------------------------------------------------------------ SiLU·mul --

#[test]
fn silu_mul_matches_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng(3000);
    let (rows, n) = (3usize, 1001usize);
    let gate = rng.f16s(rows * n, -6.0, 6.0);
    let up = rng.f16s(rows * n, -2.0, 2.0);
    let want: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(g, u)| {
            let g = g.to_f64();
            g / (1.0 + (-g).exp()) * u.to_f64()
        })
        .collect();
    let gd = dev.upload(&gate, rows, n).unwrap();
    let ud = dev.upload(&up, rows, n).unwrap();
    let mut out = poisoned::<f16>(&dev, rows, n);
    silu_mul(&dev, &gd, &ud, &mut out).unwrap();
    // fp16 output: one rounding.
    compare("silu_mul", &dev.download(&out).unwrap(), &want, 1e-3, 2e-3);
    let mut bad = dev.zeros::<f16>(rows, n - 1).unwrap();
    assert!(silu_mul(&dev, &gd, &ud, &mut bad).is_err());
}

// ---------------------------------------------------------------- RoPE --

#[test]
fn rope_matches_reference() {
    let Some(dev) = device() else { return };
    for (i, &(rows, heads, hd, theta)) in [
        (4usize, 3usize, 128usize, 10000.0f64),
        (3, 5, 64, 500000.0),
        (1, 2, 96, 10000.0),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng(4000 + i as u64);
        let x = rng.f16s(rows * heads * hd, -1.0, 1.0);
        let pos: Vec<i32> = (0..rows).map(|_| rng.below(8192) as i32).collect();
        // HF Llama's rotate_half form, with frequencies from theta in f64.
        let mut want = vec![0.0f64; x.len()];
        for (r, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let base = (r * heads + h) * hd;
                for j in 0..hd / 2 {
                    let ang = p as f64 * theta.powf(-2.0 * j as f64 / hd as f64);
                    let (x0, x1) = (x[base + j].to_f64(), x[base + j + hd / 2].to_f64());
                    want[base + j] = x0 * ang.cos() - x1 * ang.sin();
                    want[base + j + hd / 2] = x1 * ang.cos() + x0 * ang.sin();
                }
            }
        }
        let mut xd = dev.upload(&x, rows, heads * hd).unwrap();
        let pd = dev.upload(&pos, rows, 1).unwrap();
        let fd = dev.upload(&rope_inv_freq(theta, hd), 1, hd / 2).unwrap();
        rope(&dev, &mut xd, heads, hd, &pd, &fd).unwrap();
        // fp32 angles up to 8192 rad carry ~5e-4 rad of error; fp16 output.
        compare(
            &format!("rope {rows}x{heads}x{hd}"),
            &dev.download(&xd).unwrap(),
            &want,
            2e-3,
            4e-3,
        );
        assert!(rope(&dev, &mut xd, heads + 1, hd, &pd, &fd).is_err());
    }
}

// ----------------------------------------------------------- embedding --

#[test]
fn embedding_gathers_rows() {
    let Some(dev) = device() else { return };
    let mut rng = Rng(5000);
    let (vocab, d) = (50usize, 300usize);
    let table = rng.f16s(vocab * d, -1.0, 1.0);
    let ids: Vec<u32> = vec![0, 49, rng.below(50) as u32, 7, 7];
    let td = dev.upload(&table, vocab, d).unwrap();
    let mut out = poisoned::<f16>(&dev, ids.len(), d);
    embedding(&dev, &td, &ids, &mut out).unwrap();
    let got = dev.download(&out).unwrap();
    for (r, &id) in ids.iter().enumerate() {
        assert_eq!(
            &got[r * d..(r + 1) * d],
            &table[id as usize * d..(id as usize + 1) * d],
            "row {r}"
        );
    }
    let err = embedding(&dev, &td, &[3, 50], &mut dev.zeros::<f16>(2, d).unwrap()).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

// -------------------------------------------------------- no GPU at all --

#[test]
fn missing_gpu_is_an_error_not_a_panic() {
    match GpuDevice::new(1 << 20) {
        Ok(_) => panic!("GPU 1048576 cannot exist"),
        Err(e) => assert!(e.to_string().starts_with("no CUDA driver/GPU found"), "{e}"),
    }
}
