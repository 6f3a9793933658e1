//! Random tensors for synthetic checkpoints, drawn from a seeded SplitMix64
//! stream per tensor and per chunk of 16 Ki values, so that chunks fill in
//! parallel and the bytes depend only on the seed and the tensor's name.
//!
//! The distribution keeps a forward pass in fp16 well inside its range:
//! - **4-bit linears:** codes `q` uniform on 0..=15; zero points `z`
//!   uniform on {7, 8} per group and output, so `q - z` has mean 0 (over
//!   groups) and second moment 21.5. A single zero point of 8 would give
//!   every weight a mean of -0.5 scale: a rank-one part that adds the same
//!   value to every channel of the residual stream, which the next norm
//!   turns into an all-equal input that the same part amplifies, layer
//!   after layer (a 7B shape reached a residual RMS of about 17,600, near
//!   fp16's limit and far past its resolution for the updates). Each
//!   group's scale is `j / sqrt(21.5 · in_features)` with `j` uniform in
//!   [0.75, 1.25), so an input with RMS 1 gives outputs with RMS about 1.
//! - **fp16 linears** are exactly the dequantized 4-bit weights of the same
//!   seed, so an fp16 and an AWQ synthetic model compute the same function.
//! - **Embeddings and lm_head:** uniform with standard deviation
//!   `1 / sqrt(hidden_size)`, so logits come out with RMS about 1 (and a
//!   tied head behaves the same as an untied one).
//! - **RMSNorm weights:** uniform in [0.9, 1.1).
//!
//! Checked on the Llama-2-7B shape with an fp32 reference forward of 16
//! random tokens: the residual stream's RMS grows like the square root of
//! depth, to about 6 after 32 layers (largest value about 25), attention
//! scores stay within ±5, MLP activations within ±13, and the logits have
//! RMS 1, all far inside fp16's range and resolution.

use half::f16;
use lmq_turbomind::quant::awq::{pack_int4, unpack_int4, AwqTensors};
use rayon::prelude::*;

use crate::rng::{substream, SplitMix};

/// Values drawn from one sub-stream; fixed, so that the output does not
/// depend on the number of threads.
const CHUNK_ITEMS: usize = 1 << 14;

/// `E[(q - z)²]` for `q` uniform on 0..=15 and `z` uniform on {7, 8}: the
/// variance of `q`, 21.25, plus `E[(7.5 - z)²]`, 0.25.
pub const CODE_SECOND_MOMENT: f32 = 21.5;

/// Zero points are drawn from these two, around the middle of the 4-bit
/// range (7.5), which makes the weights zero-mean.
pub const ZERO_POINTS: [u8; 2] = [7, 8];

/// Fills `out` with values from `draw`, each chunk from its own sub-stream
/// of `seed`, in parallel.
fn fill<T: Send>(out: &mut [T], seed: u64, draw: impl Fn(&mut SplitMix) -> T + Sync) {
    out.par_chunks_mut(CHUNK_ITEMS)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix::new(substream(seed, chunk as u64));
            for v in values {
                *v = draw(&mut rng);
            }
        });
}

/// `len` fp16 values uniform in `[center - half_width, center + half_width)`,
/// as little-endian bytes.
pub fn uniform_f16_bytes(len: usize, center: f32, half_width: f32, seed: u64) -> Vec<u8> {
    // Drawn straight into byte pairs: an embedding can be a gigabyte, and
    // a second copy would double the peak memory.
    let mut values = vec![[0u8; 2]; len];
    fill(&mut values, seed, |rng| {
        f16::from_f32(center + half_width * (2.0 * rng.unit_f32() - 1.0)).to_le_bytes()
    });
    values.into_flattened()
}

/// The half-width of a uniform distribution with standard deviation `std`.
pub fn half_width_for_std(std: f32) -> f32 {
    std * 3f32.sqrt()
}

pub fn f16_bytes(values: &[f16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A random 4-bit linear `[out, in]` in the AutoAWQ gemm layout.
pub fn awq_linear(
    in_features: usize,
    out_features: usize,
    group_size: usize,
    seed: u64,
) -> AwqTensors {
    let (k, n, g) = (in_features, out_features, group_size);
    // Eight independent uniform nibbles are one uniform 32-bit word in any
    // nibble order, so random words are already the packed form of uniform
    // codes and need no packing pass.
    let mut qweight = vec![0i32; k * n / 8];
    fill(&mut qweight, substream(seed, 0), |rng| {
        (rng.next() >> 32) as u32 as i32
    });
    let mut zeros = vec![0u8; k / g * n];
    fill(&mut zeros, substream(seed, 2), |rng| {
        ZERO_POINTS[(rng.next() >> 63) as usize]
    });
    let qzeros = pack_int4(&zeros, k / g, n);
    let base = 1.0 / (CODE_SECOND_MOMENT * k as f32).sqrt();
    let mut scales = vec![f16::ZERO; k / g * n];
    fill(&mut scales, substream(seed, 1), |rng| {
        f16::from_f32(base * (0.75 + 0.5 * rng.unit_f32()))
    });
    AwqTensors {
        in_features: k,
        out_features: n,
        group_size: g,
        qweight,
        qzeros,
        scales,
    }
}

/// Output rows dequantized together: their writes share cache lines while
/// the codes are read row by row.
const DEQUANT_ROWS: usize = 64;

/// The weight of `t` as fp16 `[out, in]` bytes: the same values as
/// [`AwqTensors::dequantize`] (computed in f32, then rounded), transposed
/// in blocks of rows and in parallel, since a 7B model has billions.
pub fn dequantized_f16_bytes(t: &AwqTensors) -> Vec<u8> {
    let (k, n, g) = (t.in_features, t.out_features, t.group_size);
    let q = unpack_int4(&t.qweight, k, n);
    let z = unpack_int4(&t.qzeros, k / g, n);
    let mut out = vec![0u8; n * k * 2];
    out.par_chunks_mut(DEQUANT_ROWS * k * 2)
        .enumerate()
        .for_each(|(block, rows)| {
            let first = block * DEQUANT_ROWS;
            let count = rows.len() / (2 * k);
            for i in 0..k {
                let group = (i / g) * n;
                for r in 0..count {
                    let o = first + r;
                    let w =
                        (q[i * n + o] as f32 - z[group + o] as f32) * t.scales[group + o].to_f32();
                    let at = 2 * (r * k + i);
                    rows[at..at + 2].copy_from_slice(&f16::from_f32(w).to_le_bytes());
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn awq_linear_is_valid_and_has_the_documented_distribution() {
        let (k, n, g) = (512, 256, 128);
        let t = awq_linear(k, n, g, 42);
        t.validate("test", Path::new("synthetic"))
            .expect("valid layout");
        let zeros = unpack_int4(&t.qzeros, k / g, n);
        assert!(zeros.iter().all(|z| ZERO_POINTS.contains(z)));
        let sevens = zeros.iter().filter(|&&z| z == 7).count();
        assert!(
            sevens.abs_diff(zeros.len() / 2) < zeros.len() / 10,
            "{sevens} sevens of {}",
            zeros.len()
        );
        let codes = unpack_int4(&t.qweight, k, n);
        let mut counts = [0usize; 16];
        for &c in &codes {
            counts[c as usize] += 1;
        }
        // Every code appears about 1/16 of the time (8192 expected each).
        let expected = codes.len() / 16;
        assert!(
            counts.iter().all(|&c| c.abs_diff(expected) < expected / 10),
            "{counts:?}"
        );
        // Zero-mean weights, and an input of RMS 1 gives outputs of RMS
        // about 1.
        let w = t.dequantize();
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        let std =
            (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!(mean.abs() < 0.02 * std, "mean {mean}, std {std}");
        let second_moment = w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64;
        let output_rms = (second_moment * k as f64).sqrt();
        assert!((0.9..1.1).contains(&output_rms), "output RMS {output_rms}");
    }

    #[test]
    fn dense_weights_are_the_dequantized_awq_weights() {
        let (k, n, g) = (192, 136, 64);
        let t = awq_linear(k, n, g, 7);
        let expected: Vec<u8> = t
            .dequantize()
            .iter()
            .flat_map(|&w| f16::from_f32(w).to_le_bytes())
            .collect();
        assert_eq!(dequantized_f16_bytes(&t), expected);
    }

    #[test]
    fn draws_depend_only_on_the_seed() {
        let a = awq_linear(256, 64, 32, 1);
        let b = awq_linear(256, 64, 32, 1);
        let c = awq_linear(256, 64, 32, 2);
        assert_eq!((&a.qweight, &a.scales), (&b.qweight, &b.scales));
        assert_ne!(a.qweight, c.qweight);
        // Sizes over several chunks are reproducible too.
        let big = CHUNK_ITEMS * 3 + 5;
        assert_eq!(
            uniform_f16_bytes(big, 1.0, 0.1, 9),
            uniform_f16_bytes(big, 1.0, 0.1, 9)
        );
    }

    #[test]
    fn uniform_values_stay_in_range() {
        let bytes = uniform_f16_bytes(10_000, 1.0, 0.1, 3);
        let values: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert!(values.iter().all(|v| (0.899..=1.101).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    }
}
