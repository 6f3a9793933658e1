//! Repacking against the AutoAWQ definition, and products against f64
//! references built from the original tensors.

use half::f16;

use super::*;
use crate::quant::awq::pack_int4;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn unit(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
}

fn random_awq(rng: &mut Lcg, k: usize, n: usize, g: usize) -> AwqTensors {
    let q: Vec<u8> = (0..k * n).map(|_| (rng.next() % 16) as u8).collect();
    let z: Vec<u8> = (0..k / g * n).map(|_| (rng.next() % 16) as u8).collect();
    AwqTensors {
        in_features: k,
        out_features: n,
        group_size: g,
        qweight: pack_int4(&q, k, n),
        qzeros: pack_int4(&z, k / g, n),
        scales: (0..k / g * n)
            .map(|_| f16::from_f32(0.001 + (rng.next() % 100) as f32 * 1e-4))
            .collect(),
    }
}

fn matrix(rng: &mut Lcg, rows: usize, cols: usize) -> Matrix {
    Matrix {
        data: (0..rows * cols).map(|_| rng.unit()).collect(),
        rows,
        cols,
    }
}

/// Every row of a batch equals that row computed alone, bit for bit.
fn assert_batch_invariant(w: &QWeight, x: &Matrix, out: &Matrix, exact: bool) {
    let kernels = QKernels::best();
    for r in 0..x.rows {
        let alone = Matrix {
            data: x.row(r).to_vec(),
            rows: 1,
            cols: x.cols,
        };
        let one = w.forward(&alone, &kernels, exact).expect("forward");
        assert_eq!(one.data, out.row(r), "row {r} of {}", x.rows);
    }
}

#[test]
fn awq_repacking_keeps_every_weight() {
    let mut rng = Lcg(1);
    for (k, n, g) in [(64usize, 40usize, 32usize), (256, 16, 64), (256, 24, 128)] {
        let t = random_awq(&mut rng, k, n, g);
        let w = QWeight::from_awq(&t).expect("repack");
        let dense = t.dequantize();
        for o in 0..n {
            for i in 0..k {
                assert_eq!(
                    w.value(o, i),
                    dense[o * k + i],
                    "k {k} n {n} g {g} ({o}, {i})"
                );
            }
        }
    }
}

#[test]
fn products_match_f64_references_and_are_batch_invariant() {
    let mut rng = Lcg(7);
    let kernels = QKernels::best();
    for (k, n, g) in [
        (256usize, 40usize, 32usize),
        (256, 40, 64),
        (256, 40, 128),
        (576, 48, 64),
    ] {
        let t = random_awq(&mut rng, k, n, g);
        let w = QWeight::from_awq(&t).expect("repack");
        let dense = t.dequantize();
        for m in [1usize, 3, 8, 9, 16, 70] {
            let x = matrix(&mut rng, m, k);
            let exact = w.forward(&x, &kernels, true).expect("forward");
            let int8 = w.forward(&x, &kernels, false).expect("forward");
            for r in 0..m {
                let row = x.row(r);
                for o in 0..n {
                    let wrow = &dense[o * k..(o + 1) * k];
                    let want: f64 = wrow
                        .iter()
                        .zip(row)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let got = exact.data[r * n + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "exact g {g} m {m} ({r}, {o}): {got} vs {want}"
                    );
                    // Int8 activations: each value is off by at most half a
                    // step d of its block of 32, so the error is bounded by
                    // Σ |w|·d/2.
                    let bound: f64 = (0..k / 32)
                        .map(|b| {
                            let xs = &row[b * 32..(b + 1) * 32];
                            let d = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                            wrow[b * 32..(b + 1) * 32]
                                .iter()
                                .map(|v| v.abs() as f64)
                                .sum::<f64>()
                                * d
                                / 2.0
                        })
                        .sum();
                    let got = int8.data[r * n + o] as f64;
                    assert!(
                        (got - want).abs() <= bound * 1.01 + 1e-5,
                        "int8 g {g} m {m} ({r}, {o}): {got} vs {want}, bound {bound}"
                    );
                }
            }
            assert_batch_invariant(&w, &x, &exact, true);
            assert_batch_invariant(&w, &x, &int8, false);
        }
    }
}

#[test]
fn int8_output_projection_rounds_each_weight_to_half_a_step() {
    let mut rng = Lcg(9);
    let (n, k) = (37usize, 96usize);
    let mut dense: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.05).collect();
    dense[5] = 0.9; // an outlier widens its group's step only
    dense[k..2 * k].iter_mut().for_each(|v| *v = 0.0); // an all-zero row
    let w = QWeight::int8_from_rows(n, k, &|o, buf| {
        buf.copy_from_slice(&dense[o * k..(o + 1) * k])
    })
    .expect("quantize");
    assert_eq!(w.bits(), 8);
    for o in 0..n {
        for gi in 0..k / INT8_GROUP {
            let span = gi * INT8_GROUP..(gi + 1) * INT8_GROUP;
            let amax = dense[o * k..(o + 1) * k][span.clone()]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            let step = f16::from_f32(amax / 127.0).to_f32();
            for i in span {
                let err = (w.value(o, i) - dense[o * k + i]).abs();
                assert!(
                    err <= step * 0.5001 + 1e-9,
                    "({o}, {i}): error {err}, step {step}"
                );
            }
        }
    }
    // Its product, against the f64 product of the quantized weights (the
    // rounding of the weights is bounded above).
    let kernels = QKernels::best();
    for m in [1usize, 5, 20] {
        let x = matrix(&mut rng, m, k);
        for exact in [true, false] {
            let out = w.forward(&x, &kernels, exact).expect("forward");
            for r in 0..m {
                let row = x.row(r);
                for o in 0..n {
                    let want: f64 = (0..k).map(|i| w.value(o, i) as f64 * row[i] as f64).sum();
                    let bound: f64 = if exact {
                        1e-4 * (1.0 + want.abs())
                    } else {
                        (0..k)
                            .map(|i| {
                                let g = &row[i / INT8_GROUP * INT8_GROUP..][..INT8_GROUP];
                                let d = g.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                                w.value(o, i).abs() as f64 * d / 2.0
                            })
                            .sum::<f64>()
                            * 1.01
                            + 1e-5
                    };
                    let got = out.data[r * n + o] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "exact {exact} ({r}, {o}): {got} vs {want}, bound {bound}"
                    );
                }
            }
            assert_batch_invariant(&w, &x, &out, exact);
        }
    }
}

#[test]
fn shapes_the_layout_cannot_hold_are_errors() {
    assert!(QWeight::int8_from_rows(4, 40, &|_, _| {}).is_err()); // 40 % 32 != 0
    let mut rng = Lcg(2);
    let w = QWeight::from_awq(&random_awq(&mut rng, 64, 16, 32)).expect("repack");
    let x = matrix(&mut rng, 2, 63);
    assert!(w.forward(&x, &QKernels::best(), false).is_err());
}
