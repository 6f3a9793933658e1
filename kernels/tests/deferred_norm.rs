//! The deferred RMSNorm of a decode step (`W4Norm` in cu/w4a16.cu): the
//! linear before the norm adds its product to the residual and stores
//! `fp16(r · w)` and per-block sums of `r²` (`W4A16Linear::forward_add_norm`);
//! the linears after it multiply their sums by the norm's factor
//! (`forward_scaled`, and `forward_silu_pairs` with a row scale).
//!
//! Checked against independent references, for group sizes 32 and 128,
//! 1 to 16 rows and with and without PDL:
//! - the updated residual is bit for bit the unfused path's (the product,
//!   then `act::add_rms_norm`: the same fp32 sum);
//! - the fp16 output is `fp16(r · w)` of that residual, computed here;
//! - each row's partial sums add up to `Σ r²` (f64);
//! - the values materialized from them (`act::deferred_norm_values`) are
//!   the f64 RMSNorm within fp16 rounding;
//! - the scaled product and the scaled SiLU·mul pairs match an f64
//!   reference built from the definition (`w = (q − z)·s`, RMSNorm in
//!   f64), as closely as the unfused path does, within fp16 input rounding.
//!
//! Misuse (a streaming kernel, partial sums of the wrong shape, eps ≤ 0) is
//! refused. Without a CUDA GPU the test prints "skipped: no CUDA device"
//! and passes.

mod common;

use common::{device, random_w4_layer, scaled_diff, Rng};
use half::f16;
use lmq_kernels::{act, norm_weight_shift, AddNorm, GpuDevice, RowScale, W4A16Linear, W4Kernel};

/// `h · w` in f64 for `m` rows of `k` inputs.
fn product(h: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for kk in 0..k {
            let x = h[r * k + kk];
            for j in 0..n {
                out[r * n + j] += x * w[kk * n + j];
            }
        }
    }
    out
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// One configuration: group size, the norm's width `d` (the consumer's K),
/// the ranges of the norm's weight and of the residual, and the kernel.
struct Case {
    g: usize,
    d: usize,
    gamma: (f64, f64),
    residual: (f64, f64),
    kernel: W4Kernel,
    seed: u64,
}

fn check(dev: &GpuDevice, case: &Case) {
    let (k0, d, half, g) = (256usize, case.d, 192usize, case.g);
    let eps = 1e-5f32;
    let mut rng = Rng(case.seed);
    let before = random_w4_layer(&mut rng, k0, d, g);
    let after = random_w4_layer(&mut rng, d, d, g);
    let gate_up = random_w4_layer(&mut rng, d, 2 * half, g);
    let paired_packed = gate_up.packed.interleave_halves().expect("interleave");
    let gamma = rng.values(d, case.gamma.0, case.gamma.1);
    let gamma_d = dev.upload(&gamma, d, 1).unwrap();
    // The power of two that keeps fp16(r·w·2^-k) within the residual's range.
    let shift = norm_weight_shift(gamma.iter().fold(0f32, |m, v| m.max(v.abs())));
    let (w_scale, factor_scale) = (2f32.powi(-shift), 2f32.powi(shift));
    let mut o = W4A16Linear::new(dev, &before.packed, None).expect("upload");
    let mut c = W4A16Linear::new(dev, &after.packed, None).expect("upload");
    let mut p = W4A16Linear::new(dev, &paired_packed, None).expect("upload");
    for l in [&mut o, &mut c, &mut p] {
        l.set_kernel_kind(case.kernel).expect("kernel");
    }
    for m in [1usize, 3, 8, 9, 16] {
        let x = dev.upload(&rng.f16s(m * k0, -1.0, 1.0), m, k0).unwrap();
        let residual = rng.values(m * d, case.residual.0, case.residual.1);
        for pdl in [false, true] {
            o.set_pdl(pdl);
            c.set_pdl(pdl);
            p.set_pdl(pdl);
            let what = format!(
                "g{g}, d {d}, {:?}, k {shift}, M {m}, PDL {pdl}",
                case.kernel
            );
            // The unfused path: product, add_rms_norm, then the linears.
            let mut delta = dev.zeros::<f32>(m, d).unwrap();
            o.forward(dev, &x, &mut delta).expect("product");
            let mut res_ref = dev.upload(&residual, m, d).unwrap();
            let mut h32 = dev.zeros::<f32>(m, d).unwrap();
            let mut h16 = dev.zeros::<f16>(m, d).unwrap();
            act::add_rms_norm(
                dev,
                &mut res_ref,
                &delta,
                &gamma_d,
                eps,
                &mut h32,
                Some(&mut h16),
            )
            .expect("add_rms_norm");
            let mut y_unfused = dev.zeros::<f32>(m, d).unwrap();
            c.forward(dev, &h16, &mut y_unfused)
                .expect("plain consumer");
            let mut s_unfused = dev.zeros::<f32>(m, half).unwrap();
            p.forward_silu_pairs(dev, &h16, &mut s_unfused, None, pdl, None)
                .expect("plain pairs");

            // The fused path, outputs poisoned first.
            let mut res = dev.upload(&residual, m, d).unwrap();
            let mut g16 = dev.zeros::<f16>(m, d).unwrap();
            dev.fill(&mut g16, f16::NAN).unwrap();
            let mut parts = dev.zeros::<f32>(m, o.norm_parts()).unwrap();
            dev.fill(&mut parts, f32::NAN).unwrap();
            let norm = AddNorm {
                residual: &mut res,
                weight: &gamma_d,
                parts: &mut parts,
                scale: w_scale,
            };
            o.forward_add_norm(dev, &x, &mut g16, norm, pdl)
                .expect("add_norm launch");
            let scale = RowScale {
                parts: &parts,
                eps,
                scale: factor_scale,
            };
            let mut y = dev.zeros::<f32>(m, d).unwrap();
            dev.fill(&mut y, f32::NAN).unwrap();
            c.forward_scaled(dev, &g16, &mut y, scale, pdl)
                .expect("scaled consumer");
            let mut s = dev.zeros::<f32>(m, half).unwrap();
            dev.fill(&mut s, f32::NAN).unwrap();
            let mut s16 = dev.zeros::<f16>(m, half).unwrap();
            p.forward_silu_pairs(dev, &g16, &mut s, Some(&mut s16), pdl, Some(scale))
                .expect("scaled pairs");

            let r = dev.download(&res).unwrap();
            let r_ref = dev.download(&res_ref).unwrap();
            assert!(
                r.iter()
                    .zip(&r_ref)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: residual differs from the unfused add"
            );
            let g16h = dev.download(&g16).unwrap();
            for (i, v) in g16h.iter().enumerate() {
                let want = f16::from_f32(r[i] * gamma[i % d] * w_scale);
                assert!(want.is_finite(), "{what}: fp16(r·w·2^-k) overflows at {i}");
                assert_eq!(v.to_bits(), want.to_bits(), "{what}: fp16(r·w·2^-k) at {i}");
            }
            // The f64 reference: RMSNorm of the residual, then the layers.
            let parts_h = dev.download(&parts).unwrap();
            let h = reference_norm(&r, &parts_h, &gamma, m, eps, &what);
            // The materialized values (for an op that cannot scale):
            // fp16(r·w·2^-k)·2^k·inv, within fp16 rounding of the f64 norm.
            let mut hv = dev.zeros::<f32>(m, d).unwrap();
            let mut hv16 = dev.zeros::<f16>(m, d).unwrap();
            act::deferred_norm_values(dev, &g16, &parts, eps, factor_scale, &mut hv, &mut hv16)
                .expect("materialize");
            let (hv, hv16) = (dev.download(&hv).unwrap(), dev.download(&hv16).unwrap());
            for i in 0..m * d {
                let err = (hv[i] as f64 - h[i]).abs();
                assert!(
                    err <= 1e-3 * h[i].abs() + 1e-7,
                    "{what}: value {i}: {} vs {}",
                    hv[i],
                    h[i]
                );
                assert_eq!(
                    f16::from_f32(hv[i]).to_bits(),
                    hv16[i].to_bits(),
                    "{what}: copy {i}"
                );
            }
            let y64 = to_f32(&product(&h, &after.w, m, d, d));
            let gu = product(&h, &gate_up.w, m, d, 2 * half);
            let s64: Vec<f32> = (0..m * half)
                .map(|i| {
                    let (row, j) = (i / half, i % half);
                    let (gv, uv) = (gu[row * 2 * half + j], gu[row * 2 * half + half + j]);
                    (gv / (1.0 + (-gv).exp()) * uv) as f32
                })
                .collect();
            let (y, yu) = (dev.download(&y).unwrap(), dev.download(&y_unfused).unwrap());
            let (s, su) = (dev.download(&s).unwrap(), dev.download(&s_unfused).unwrap());
            let (e_fused, e_plain) = (scaled_diff(&y64, &y), scaled_diff(&y64, &yu));
            let (es_fused, es_plain) = (scaled_diff(&s64, &s), scaled_diff(&s64, &su));
            println!(
                "{what}: product error {e_fused:.2e} (unfused {e_plain:.2e}), \
                 pairs {es_fused:.2e} (unfused {es_plain:.2e})"
            );
            // fp16 inputs carry a relative error of 2^-11; the sums of a
            // few hundred products stay well inside 2e-3, and rounding
            // r·w instead of r·inv·w costs about as much as it saves (on an
            // H200 and an H100, session 13: 0.8–1.4× the unfused error).
            assert!(e_fused < 2e-3 && es_fused < 2e-3, "{what}: fused path off");
            assert!(
                e_plain < 2e-3 && es_plain < 2e-3,
                "{what}: unfused path off"
            );
            assert!(
                e_fused <= 3.0 * e_plain + 1e-4 && es_fused <= 3.0 * es_plain + 1e-4,
                "{what}: the fused path is much further from the reference than the unfused"
            );
            let s16h = dev.download(&s16).unwrap();
            for (a, b) in s.iter().zip(&s16h) {
                assert_eq!(
                    f16::from_f32(*a).to_bits(),
                    b.to_bits(),
                    "{what}: fp16 copy"
                );
            }
        }
    }
}

/// The f64 RMSNorm of each row of the residual `r` (`m` rows of `gamma`'s
/// width), after checking that the row's partial sums add up to `Σ r²`.
fn reference_norm(
    r: &[f32],
    parts: &[f32],
    gamma: &[f32],
    m: usize,
    eps: f32,
    what: &str,
) -> Vec<f64> {
    let d = gamma.len();
    let per_row = parts.len() / m;
    let mut h = vec![0.0f64; m * d];
    for row in 0..m {
        let rr = &r[row * d..(row + 1) * d];
        let ss: f64 = rr.iter().map(|&v| v as f64 * v as f64).sum();
        let got: f64 = parts[row * per_row..(row + 1) * per_row]
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert!(
            (got - ss).abs() <= 1e-5 * ss,
            "{what}: row {row} squares {got} vs {ss}"
        );
        let inv = 1.0 / (ss / d as f64 + eps as f64).sqrt();
        for j in 0..d {
            h[row * d + j] = rr[j] as f64 * inv * gamma[j] as f64;
        }
    }
    h
}

#[test]
fn deferred_norm_matches_reference() {
    let Some(dev) = device() else { return };
    if !dev.supports_w4a16() {
        println!("skipped: {} has no W4A16 kernel", dev.arch());
        return;
    }
    let classic = W4Kernel::Classic;
    for case in [
        // Weights above 1: k = 1.
        Case {
            g: 128,
            d: 384,
            gamma: (0.5, 1.5),
            residual: (-2.0, 2.0),
            kernel: classic,
            seed: 41,
        },
        // Weights within ±1 (k = 0), K = 416 (a k-block past K's end).
        Case {
            g: 32,
            d: 416,
            gamma: (-1.0, 1.0),
            residual: (-2.0, 2.0),
            kernel: classic,
            seed: 42,
        },
        // A residual of ±3000 and weights up to 40: r·w reaches 1.2e5,
        // past fp16's 65504, which k = 6 brings back.
        Case {
            g: 64,
            d: 384,
            gamma: (-40.0, 40.0),
            residual: (-3000.0, 3000.0),
            kernel: classic,
            seed: 43,
        },
        // The early-trigger kernel.
        Case {
            g: 128,
            d: 384,
            gamma: (0.5, 1.5),
            residual: (-2.0, 2.0),
            kernel: W4Kernel::ClassicEarly { warps: 4 },
            seed: 44,
        },
    ] {
        check(&dev, &case);
    }
}

/// The linear before the norm alone at a width whose last block has one
/// 8-column tile (392 = 24·16 + 8): the residual, `fp16(r·w)` and the
/// partial sums (the missing tile's columns add nothing).
#[test]
fn deferred_norm_add_with_a_half_block() {
    let Some(dev) = device() else { return };
    if !dev.supports_w4a16() {
        return;
    }
    let (k0, n, m, eps) = (256usize, 392usize, 5usize, 1e-5f32);
    let mut rng = Rng(45);
    let before = random_w4_layer(&mut rng, k0, n, 64);
    let o = W4A16Linear::new(&dev, &before.packed, None).expect("upload");
    assert_eq!(o.norm_parts(), 25);
    let gamma = rng.values(n, 0.25, 0.75);
    let gamma_d = dev.upload(&gamma, n, 1).unwrap();
    let x = dev.upload(&rng.f16s(m * k0, -1.0, 1.0), m, k0).unwrap();
    let residual = rng.values(m * n, -2.0, 2.0);
    let mut delta = dev.zeros::<f32>(m, n).unwrap();
    o.forward(&dev, &x, &mut delta).expect("product");
    let delta = dev.download(&delta).unwrap();
    let mut res = dev.upload(&residual, m, n).unwrap();
    let mut g16 = dev.zeros::<f16>(m, n).unwrap();
    let mut parts = dev.zeros::<f32>(m, 25).unwrap();
    dev.fill(&mut parts, f32::NAN).unwrap();
    let norm = AddNorm {
        residual: &mut res,
        weight: &gamma_d,
        parts: &mut parts,
        scale: 1.0,
    };
    o.forward_add_norm(&dev, &x, &mut g16, norm, false)
        .expect("add_norm launch");
    let r = dev.download(&res).unwrap();
    for i in 0..m * n {
        assert_eq!(
            r[i].to_bits(),
            (residual[i] + delta[i]).to_bits(),
            "residual {i}"
        );
    }
    let g16 = dev.download(&g16).unwrap();
    for i in 0..m * n {
        assert_eq!(
            g16[i].to_bits(),
            f16::from_f32(r[i] * gamma[i % n]).to_bits(),
            "fp16(r·w) {i}"
        );
    }
    reference_norm(
        &r,
        &dev.download(&parts).unwrap(),
        &gamma,
        m,
        eps,
        "half block",
    );
}

#[test]
fn norm_weight_shift_bounds_the_weight() {
    for (max_abs, k) in [
        (0.0f32, 0),
        (0.5, 0),
        (1.0, 0),
        (1.5, 1),
        (2.0, 1),
        (2.1, 2),
        (40.0, 6),
    ] {
        assert_eq!(norm_weight_shift(max_abs), k, "{max_abs}");
    }
    assert_eq!(norm_weight_shift(f32::NAN), 0);
    assert_eq!(norm_weight_shift(f32::INFINITY), 0);
    assert_eq!(norm_weight_shift(1e30), 64);
}

#[test]
fn deferred_norm_misuse_is_refused() {
    let Some(dev) = device() else { return };
    if !dev.supports_w4a16() {
        return;
    }
    let mut rng = Rng(7);
    let l = random_w4_layer(&mut rng, 128, 128, 128);
    let mut lin = W4A16Linear::new(&dev, &l.packed, None).expect("upload");
    let x = dev.upload(&rng.f16s(2 * 128, -1.0, 1.0), 2, 128).unwrap();
    let gamma = dev.upload(&rng.values(128, 0.5, 1.5), 128, 1).unwrap();
    let mut res = dev.zeros::<f32>(2, 128).unwrap();
    let short = dev.zeros::<f32>(1, lin.norm_parts()).unwrap();
    let wide = dev.zeros::<f32>(2, lin.norm_parts() + 1).unwrap();
    let parts = dev.zeros::<f32>(2, lin.norm_parts()).unwrap();
    // The error of a scaled product of x with these partial sums, eps and
    // scale.
    let scaled = |lin: &W4A16Linear, parts, eps, scale| {
        let mut out = dev.zeros::<f32>(2, 128).unwrap();
        let row_scale = RowScale { parts, eps, scale };
        lin.forward_scaled(&dev, &x, &mut out, row_scale, false)
            .expect_err("refused")
            .to_string()
    };
    // The error of the residual add with these partial sums and scale.
    let mut add = |lin: &W4A16Linear, parts: &mut _, scale| {
        let mut out16 = dev.zeros::<f16>(2, 128).unwrap();
        let norm = AddNorm {
            residual: &mut res,
            weight: &gamma,
            parts,
            scale,
        };
        lin.forward_add_norm(&dev, &x, &mut out16, norm, false)
            .expect_err("refused")
            .to_string()
    };
    for (err, what) in [
        (scaled(&lin, &short, 1e-5, 1.0), "one row of sums for two"),
        (scaled(&lin, &wide, 1e-5, 1.0), "sums of another width"),
    ] {
        assert!(err.contains("partial sums"), "{what}: {err}");
    }
    let err = scaled(&lin, &parts, 0.0, 1.0);
    assert!(err.contains("eps"), "eps 0: {err}");
    let err = scaled(&lin, &parts, 1e-5, 3.0);
    assert!(err.contains("power of two"), "scale 3: {err}");
    let err = add(&lin, &mut dev.zeros::<f32>(2, 3).unwrap(), 1.0);
    assert!(
        err.contains("out is 2×3"),
        "partial sums of the wrong width: {err}"
    );
    let err = add(
        &lin,
        &mut dev.zeros::<f32>(2, lin.norm_parts()).unwrap(),
        0.3,
    );
    assert!(err.contains("power of two"), "scale 0.3: {err}");
    lin.set_kernel_kind(W4Kernel::Stream {
        warps: 4,
        stages: 4,
        blocks_per_sm: 1,
    })
    .expect("streaming kernel");
    let err = scaled(&lin, &parts, 1e-5, 1.0);
    assert!(err.contains("classic kernel"), "streaming kernel: {err}");
    let err = add(
        &lin,
        &mut dev.zeros::<f32>(2, lin.norm_parts()).unwrap(),
        1.0,
    );
    assert!(err.contains("classic kernel"), "streaming kernel: {err}");
}
