//! Group-wise integer quantization of linear weights (round-to-nearest),
//! as AutoAWQ's `pseudo_quantize_tensor` defines it, producing the AutoAWQ
//! gemm tensors. Scales are rounded to fp16 before the integers are
//! computed, so what is stored reproduces the fake-quantized weight exactly.

use half::f16;
use lmq_turbomind::quant::awq::{pack_int4, AwqTensors};

/// How one group maps to integers.
#[derive(Debug, Clone, Copy)]
pub struct GroupQuant {
    pub scale: f32,
    pub zero: f32,
}

/// Parameters of group-wise quantization.
#[derive(Debug, Clone, Copy)]
pub struct GroupSpec {
    pub bits: u32,
    pub group_size: usize,
    pub symmetric: bool,
}

impl GroupSpec {
    fn max_int(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// Scale and zero for one group of values.
    pub fn params(&self, group: &[f32]) -> GroupQuant {
        let max_int = self.max_int();
        if self.symmetric {
            // Signed levels -2^(b-1)+1 ..= 2^(b-1)-1 stored with the zero at 2^(b-1).
            let half_levels = ((1u32 << (self.bits - 1)) - 1) as f32;
            let amax = group.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-5);
            let scale = f16::from_f32(amax / half_levels)
                .to_f32()
                .max(f16::MIN_POSITIVE.to_f32());
            GroupQuant {
                scale,
                zero: (1u32 << (self.bits - 1)) as f32,
            }
        } else {
            let (min, max) = group
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
            let scale = f16::from_f32(((max - min).max(1e-5)) / max_int)
                .to_f32()
                .max(f16::MIN_POSITIVE.to_f32());
            let zero = (-(min / scale).round()).clamp(0.0, max_int);
            GroupQuant { scale, zero }
        }
    }

    /// The integer level of one value.
    pub fn level(&self, x: f32, p: GroupQuant) -> f32 {
        ((x / p.scale).round() + p.zero).clamp(0.0, self.max_int())
    }

    /// Quantize-dequantize `[out, in]` weights in place (fake quantization).
    pub fn fake_quantize(&self, w: &mut [f32], in_features: usize) {
        for row in w.chunks_exact_mut(in_features) {
            for group in row.chunks_exact_mut(self.group_size) {
                let p = self.params(group);
                for x in group.iter_mut() {
                    *x = (self.level(*x, p) - p.zero) * p.scale;
                }
            }
        }
    }

    /// Quantizes `[out, in]` weights into AutoAWQ gemm tensors.
    pub fn quantize(&self, w: &[f32], out_features: usize, in_features: usize) -> AwqTensors {
        let g = self.group_size;
        let groups = in_features / g;
        let mut q = vec![0u8; in_features * out_features];
        let mut zeros = vec![0u8; groups * out_features];
        let mut scales = vec![f16::ZERO; groups * out_features];
        for o in 0..out_features {
            let row = &w[o * in_features..(o + 1) * in_features];
            for gi in 0..groups {
                let group = &row[gi * g..(gi + 1) * g];
                let p = self.params(group);
                zeros[gi * out_features + o] = p.zero as u8;
                scales[gi * out_features + o] = f16::from_f32(p.scale);
                for (t, &x) in group.iter().enumerate() {
                    q[(gi * g + t) * out_features + o] = self.level(x, p) as u8;
                }
            }
        }
        AwqTensors {
            in_features,
            out_features,
            group_size: g,
            qweight: pack_int4(&q, in_features, out_features),
            qzeros: pack_int4(&zeros, groups, out_features),
            scales,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(out: usize, inp: usize) -> Vec<f32> {
        (0..out * inp)
            .map(|i| (((i * 7919) % 1000) as f32 / 1000.0 - 0.5) * (1.0 + (i % 13) as f32 / 4.0))
            .collect()
    }

    #[test]
    fn stored_tensors_dequantize_to_the_fake_quantized_weight() {
        for symmetric in [false, true] {
            let spec = GroupSpec {
                bits: 4,
                group_size: 32,
                symmetric,
            };
            let (out, inp) = (16, 64);
            let w = weights(out, inp);
            let stored = spec.quantize(&w, out, inp);
            let mut fake = w.clone();
            spec.fake_quantize(&mut fake, inp);
            assert_eq!(stored.dequantize(), fake);
        }
    }

    /// Rounding error is half a step, plus what rounding the scale to fp16
    /// (relative error ≤ 2⁻¹¹) adds over at most 15 levels.
    #[test]
    fn error_is_at_most_half_a_step() {
        let spec = GroupSpec {
            bits: 4,
            group_size: 64,
            symmetric: false,
        };
        let w = weights(8, 128);
        let mut fake = w.clone();
        spec.fake_quantize(&mut fake, 128);
        for (row_w, row_f) in w.chunks(64).zip(fake.chunks(64)) {
            let p = spec.params(row_w);
            for (a, b) in row_w.iter().zip(row_f) {
                assert!(
                    (a - b).abs() <= p.scale * 0.5 + 1e-6,
                    "{a} vs {b}, scale {}",
                    p.scale
                );
            }
        }
    }
}
