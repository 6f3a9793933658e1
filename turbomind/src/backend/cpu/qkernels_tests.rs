//! The tile kernels against f64 references written from the layout's
//! definition, every SIMD variant this CPU has against the portable one
//! (bit for bit for the integer family, within a rounding-error bound for
//! the exact family), and rows alone against rows in company. On aarch64
//! that includes the NEON kernels (`neon-dotprod` where the CPU has
//! `dotprod`).

use super::*;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// A random tile: its chunks, scales, zeros, and the codes as `[o][k]`.
struct RandomTile {
    codes: Vec<Chunk>,
    scales: Vec<f16>,
    zeros: Vec<u8>,
    q: Vec<Vec<u8>>,
    group: usize,
    bits: u32,
}

impl RandomTile {
    fn new(rng: &mut Lcg, k: usize, group: usize, bits: u32) -> Self {
        let max = if bits == 4 { 16 } else { 255 };
        // Eight-bit codes are 1..=255, as the quantizer makes them.
        let q: Vec<Vec<u8>> = (0..TILE)
            .map(|_| {
                (0..k)
                    .map(|_| (rng.next() % max) as u8 + (bits == 8) as u8)
                    .collect()
            })
            .collect();
        let per_chunk = 32 / bits as usize;
        let mut codes = vec![Chunk([0; 64]); k / per_chunk];
        for (c, chunk) in codes.iter_mut().enumerate() {
            for (o, row) in q.iter().enumerate() {
                for j in 0..4 {
                    chunk.0[o * 4 + j] = if bits == 8 {
                        row[c * 4 + j]
                    } else {
                        row[c * 8 + j] | (row[c * 8 + 4 + j] << 4)
                    };
                }
            }
        }
        let groups = k / group;
        let scales = (0..groups * TILE)
            .map(|_| f16::from_f32(0.001 + (rng.next() % 1000) as f32 * 1e-5))
            .collect();
        let zeros = (0..groups * TILE)
            .map(|_| {
                if bits == 8 {
                    128
                } else {
                    (rng.next() % 16) as u8
                }
            })
            .collect();
        RandomTile {
            codes,
            scales,
            zeros,
            q,
            group,
            bits,
        }
    }

    fn tile(&self) -> Tile<'_> {
        Tile {
            codes: &self.codes,
            scales: &self.scales,
            zeros: &self.zeros,
            group: self.group,
            bits: self.bits,
        }
    }

    /// The dequantized weight of output `o`, input `i`, in f64.
    fn w(&self, o: usize, i: usize) -> f64 {
        let at = (i / self.group) * TILE + o;
        (self.q[o][i] as f64 - self.zeros[at] as f64) * self.scales[at].to_f64()
    }
}

fn int_variants() -> Vec<(&'static str, IntTileFn)> {
    let mut v: Vec<(&'static str, IntTileFn)> = vec![("portable", int_portable)];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            v.push(("avx2", int_avx2));
        }
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
        {
            v.push(("vnni", int_vnni));
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        v.push(("neon", neon::int_neon));
        if neon::has_dotprod() {
            v.push(("neon-dotprod", neon::int_dotprod));
        }
    }
    v
}

fn exact_variants() -> Vec<(&'static str, F32TileFn)> {
    let mut v: Vec<(&'static str, F32TileFn)> = vec![("portable", exact_portable)];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            v.push(("avx2", exact_avx2));
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    v.push(("neon", neon::exact_neon));
    v
}

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
#[test]
fn best_chooses_neon_with_dotprod_where_the_cpu_has_it() {
    let want = if neon::has_dotprod() {
        "neon-dotprod"
    } else {
        "neon"
    };
    assert_eq!(QKernels::best().int_name, want);
}

#[test]
fn integer_kernels_agree_bit_for_bit_and_match_an_f64_reference() {
    let mut rng = Lcg(11);
    for (bits, group, k) in [
        (4u32, 32usize, 96usize),
        (4, 64, 576),
        (4, 128, 256),
        (4, 576, 576),
        (8, 32, 576),
        (8, 64, 64),
    ] {
        let t = RandomTile::new(&mut rng, k, group, bits);
        let blocks = k / ACT_BLOCK;
        let m = 13;
        let xq: Vec<i8> = (0..m * k).map(|_| (rng.next() % 255) as i8).collect();
        let xq: Vec<i8> = xq.iter().map(|&v| v.max(-127)).collect();
        let d: Vec<f32> = (0..m * blocks)
            .map(|_| (rng.next() % 100 + 1) as f32 * 1e-3)
            .collect();
        let isum: Vec<i32> = (0..m * blocks)
            .map(|i| {
                let (r, b) = (i / blocks, i % blocks);
                xq[r * k + b * ACT_BLOCK..r * k + (b + 1) * ACT_BLOCK]
                    .iter()
                    .map(|&v| v as i32)
                    .sum()
            })
            .collect();
        let rows = QRows {
            xq: &xq,
            d: &d,
            isum: &isum,
            k,
        };
        let mut want = vec![[0f32; TILE]; m];
        int_portable(&t.tile(), &rows, 0..m, &mut want);
        for r in 0..m {
            for (o, &got) in want[r].iter().enumerate() {
                let reference: f64 = (0..k)
                    .map(|i| {
                        t.w(o, i) * d[r * blocks + i / ACT_BLOCK] as f64 * xq[r * k + i] as f64
                    })
                    .sum();
                assert!(
                    (got as f64 - reference).abs() <= 1e-5 * (1.0 + reference.abs()),
                    "bits {bits} g {group} row {r} out {o}: {got} vs {reference}"
                );
            }
        }
        for (name, f) in int_variants() {
            // All rows at once, and each row alone: the same bits.
            let mut all = vec![[0f32; TILE]; m];
            f(&t.tile(), &rows, 0..m, &mut all);
            for r in 0..m {
                let mut one = [[0f32; TILE]; 1];
                f(&t.tile(), &rows, r..r + 1, &mut one);
                for o in 0..TILE {
                    assert_eq!(
                        (all[r][o].to_bits(), one[0][o].to_bits()),
                        (want[r][o].to_bits(), want[r][o].to_bits()),
                        "{name}: bits {bits} g {group} row {r} out {o}"
                    );
                }
            }
        }
    }
}

#[test]
fn exact_kernels_match_an_f64_reference_and_are_batch_invariant() {
    let mut rng = Lcg(5);
    for (bits, group, k) in [
        (4u32, 32usize, 96usize),
        (4, 64, 576),
        (4, 128, 256),
        (8, 32, 64),
    ] {
        let t = RandomTile::new(&mut rng, k, group, bits);
        let groups = k / group;
        let m = 11;
        let x: Vec<f32> = (0..m * k)
            .map(|_| (rng.next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let gsum: Vec<f32> = x.chunks_exact(group).map(|c| c.iter().sum()).collect();
        assert_eq!(gsum.len(), m * groups);
        let rows = FRows {
            x: &x,
            gsum: &gsum,
            k,
        };
        let mut portable = vec![[0f32; TILE]; m];
        exact_portable(&t.tile(), &rows, 0..m, &mut portable);
        for (name, f) in exact_variants() {
            let mut all = vec![[0f32; TILE]; m];
            f(&t.tile(), &rows, 0..m, &mut all);
            for r in 0..m {
                let mut one = [[0f32; TILE]; 1];
                f(&t.tile(), &rows, r..r + 1, &mut one);
                for o in 0..TILE {
                    let reference: f64 = (0..k).map(|i| t.w(o, i) * x[r * k + i] as f64).sum();
                    let got = all[r][o] as f64;
                    assert!(
                        (got - reference).abs() <= 1e-4 * (1.0 + reference.abs()),
                        "{name}: bits {bits} g {group} row {r} out {o}: {got} vs {reference}"
                    );
                    assert_eq!(all[r][o].to_bits(), one[0][o].to_bits(), "{name}: row {r}");
                    // Against the portable kernel: each sums the same k
                    // terms in another order, so each is within k·ε of
                    // T = Σ s·(q + z)·|x| (the size of the terms before
                    // the zero point cancels), and the two within 2·k·ε·T.
                    let terms: f64 = (0..k)
                        .map(|i| {
                            let at = (i / group) * TILE + o;
                            let s = t.scales[at].to_f64();
                            s * (t.q[o][i] as f64 + t.zeros[at] as f64)
                                * (x[r * k + i] as f64).abs()
                        })
                        .sum();
                    let tol = 2.0 * k as f64 * f32::EPSILON as f64 * terms;
                    let diff = (all[r][o] as f64 - portable[r][o] as f64).abs();
                    assert!(
                        diff <= tol,
                        "{name} vs portable: bits {bits} g {group} row {r} out {o}: {diff} > {tol}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_call_that_breaks_the_length_contract_gives_nan_not_a_read_out_of_bounds() {
    let mut rng = Lcg(3);
    let t = RandomTile::new(&mut rng, 64, 32, 4);
    let xq = vec![1i8; 32]; // half a row
    let rows = QRows {
        xq: &xq,
        d: &[1.0, 1.0],
        isum: &[32, 32],
        k: 64,
    };
    for (_, f) in int_variants() {
        let mut out = [[0f32; TILE]; 1];
        f(&t.tile(), &rows, 0..1, &mut out);
        assert!(out[0].iter().all(|v| v.is_nan()));
    }
}
