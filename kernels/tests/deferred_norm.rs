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

use common::{awq_pack, device, scaled_diff, Rng};
use half::f16;
use lmq_kernels::{act, AddNorm, GpuDevice, PackedW4, RowScale, W4A16Linear, W4Kernel};

/// A random 4-bit layer `k → n` in groups of `g`, with its dequantized
/// weight `w[kk][j] = (q − z)·s` in f64.
struct Layer {
    packed: PackedW4,
    w: Vec<f64>,
}

fn layer(rng: &mut Rng, k: usize, n: usize, g: usize) -> Layer {
    let groups = k / g;
    let q: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
    let z: Vec<u8> = (0..groups * n).map(|_| rng.below(16) as u8).collect();
    let s = rng.f16s(groups * n, 0.002, 0.02);
    let w = (0..k * n)
        .map(|i| {
            let (kk, j) = (i / n, i % n);
            let gi = (kk / g) * n + j;
            (q[i] as f64 - z[gi] as f64) * s[gi].to_f64()
        })
        .collect();
    let packed =
        PackedW4::from_awq(&awq_pack(&q, k, n), &awq_pack(&z, groups, n), &s, k, n, g).unwrap();
    Layer { packed, w }
}

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

fn check(dev: &GpuDevice, g: usize, seed: u64) {
    let (k0, d, half) = (256usize, 384usize, 192usize);
    let eps = 1e-5f32;
    let mut rng = Rng(seed);
    let before = layer(&mut rng, k0, d, g);
    let after = layer(&mut rng, d, d, g);
    let gate_up = layer(&mut rng, d, 2 * half, g);
    let paired_packed = gate_up.packed.interleave_halves().expect("interleave");
    let gamma = rng.values(d, 0.5, 1.5);
    let gamma_d = dev.upload(&gamma, d, 1).unwrap();
    let mut o = W4A16Linear::new(dev, &before.packed, None).expect("upload");
    let mut c = W4A16Linear::new(dev, &after.packed, None).expect("upload");
    let mut p = W4A16Linear::new(dev, &paired_packed, None).expect("upload");
    for m in [1usize, 3, 8, 9, 16] {
        let x = dev.upload(&rng.f16s(m * k0, -1.0, 1.0), m, k0).unwrap();
        let residual = rng.values(m * d, -2.0, 2.0);
        for pdl in [false, true] {
            o.set_pdl(pdl);
            c.set_pdl(pdl);
            p.set_pdl(pdl);
            let what = format!("g{g}, M {m}, PDL {pdl}");
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
            o.forward_add_norm(
                dev,
                &x,
                &mut g16,
                AddNorm {
                    residual: &mut res,
                    weight: &gamma_d,
                    parts: &mut parts,
                },
                pdl,
            )
            .expect("add_norm launch");
            let scale = RowScale { parts: &parts, eps };
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
                let want = f16::from_f32(r[i] * gamma[i % d]);
                assert_eq!(v.to_bits(), want.to_bits(), "{what}: fp16(r·w) at {i}");
            }
            // The f64 reference: RMSNorm of the residual, then the layers.
            let parts_h = dev.download(&parts).unwrap();
            let mut h = vec![0.0f64; m * d];
            for row in 0..m {
                let rr = &r[row * d..(row + 1) * d];
                let ss: f64 = rr.iter().map(|&v| v as f64 * v as f64).sum();
                let got: f64 = parts_h[row * o.norm_parts()..(row + 1) * o.norm_parts()]
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
            // The materialized values (for an op that cannot scale):
            // fp16(r·w)·inv, within fp16 rounding of the f64 norm.
            let mut hv = dev.zeros::<f32>(m, d).unwrap();
            let mut hv16 = dev.zeros::<f16>(m, d).unwrap();
            act::deferred_norm_values(dev, &g16, &parts, eps, &mut hv, &mut hv16)
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
            // fp16 inputs carry a relative error of 2^-11; the sums of 384
            // products stay well inside these bounds.
            assert!(e_fused < 2e-3 && es_fused < 2e-3, "{what}: fused path off");
            assert!(
                e_plain < 2e-3 && es_plain < 2e-3,
                "{what}: unfused path off"
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

#[test]
fn deferred_norm_matches_reference() {
    let Some(dev) = device() else { return };
    if !dev.supports_w4a16() {
        println!("skipped: {} has no W4A16 kernel", dev.arch());
        return;
    }
    check(&dev, 128, 41);
    check(&dev, 32, 42);
}

#[test]
fn deferred_norm_misuse_is_refused() {
    let Some(dev) = device() else { return };
    if !dev.supports_w4a16() {
        return;
    }
    let mut rng = Rng(7);
    let l = layer(&mut rng, 128, 128, 128);
    let mut lin = W4A16Linear::new(&dev, &l.packed, None).expect("upload");
    let x = dev.upload(&rng.f16s(2 * 128, -1.0, 1.0), 2, 128).unwrap();
    let gamma = dev.upload(&rng.values(128, 0.5, 1.5), 128, 1).unwrap();
    let mut out16 = dev.zeros::<f16>(2, 128).unwrap();
    let mut res = dev.zeros::<f32>(2, 128).unwrap();
    let short = dev.zeros::<f32>(1, lin.norm_parts()).unwrap();
    let parts = dev.zeros::<f32>(2, lin.norm_parts()).unwrap();
    // The error of a scaled product of x with these partial sums and eps.
    let scaled = |lin: &W4A16Linear, parts, eps| {
        let mut out = dev.zeros::<f32>(2, 128).unwrap();
        let scale = RowScale { parts, eps };
        lin.forward_scaled(&dev, &x, &mut out, scale, false)
            .expect_err("refused")
            .to_string()
    };
    let err = scaled(&lin, &short, 1e-5);
    assert!(
        err.contains("partial sums"),
        "one row of sums for two: {err}"
    );
    let err = scaled(&lin, &parts, 0.0);
    assert!(err.contains("eps"), "eps 0: {err}");
    let mut wrong_parts = dev.zeros::<f32>(2, 3).unwrap();
    let norm = AddNorm {
        residual: &mut res,
        weight: &gamma,
        parts: &mut wrong_parts,
    };
    let err = lin
        .forward_add_norm(&dev, &x, &mut out16, norm, false)
        .expect_err("partial sums of the wrong width");
    assert!(err.to_string().contains("out is 2×3"), "{err}");
    lin.set_kernel_kind(W4Kernel::Stream {
        warps: 4,
        stages: 4,
        blocks_per_sm: 1,
    })
    .expect("streaming kernel");
    let err = scaled(&lin, &parts, 1e-5);
    assert!(err.contains("classic kernel"), "streaming kernel: {err}");
}
