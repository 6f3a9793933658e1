//! The AutoAWQ "gemm" checkpoint layout for 4-bit weights, which Hugging
//! Face transformers, vLLM, TGI, LMDeploy and mistral.rs read.
//!
//! For a linear layer with `in` inputs, `out` outputs and group size `g`:
//! - `qweight`: int32 `[in, out/8]`. Nibble `i` (bits `4i..4i+3`) of packed
//!   column `c` holds output column `8c + AWQ_PACK_ORDER[i]`.
//! - `qzeros`: int32 `[in/g, out/8]`, packed the same way.
//! - `scales`: fp16 `[in/g, out]`.
//! - The weight is `w[o][i] = (q[i][o] - z[i/g][o]) · s[i/g][o]`.
//! - `config.json` carries `quantization_config = {"quant_method": "awq",
//!   "version": "gemm", "bits": 4, "group_size": g, "zero_point": true,
//!   "modules_to_not_convert": [...]}`.

use std::path::Path;

use half::f16;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Which output column each nibble of a packed int32 holds, relative to 8c.
pub const AWQ_PACK_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Group sizes the AutoAWQ layout is used with.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// The parsed `quantization_config` of an AWQ checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqConfig {
    pub bits: u32,
    pub group_size: usize,
    pub zero_point: bool,
    pub modules_to_not_convert: Vec<String>,
}

impl AwqConfig {
    /// Reads and validates a `quantization_config` object.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let method = v.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "awq" {
            return Err(Error::config(
                path,
                format!(
                    "quantization_config.quant_method {method:?} is not supported (supported: awq)"
                ),
            ));
        }
        let version = v
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("gemm")
            .to_lowercase();
        if version != "gemm" {
            return Err(Error::config(
                path,
                format!("AWQ version {version:?} is not supported (supported: gemm)"),
            ));
        }
        let bits = v
            .get("bits")
            .or_else(|| v.get("w_bit"))
            .and_then(Value::as_u64)
            .unwrap_or(4) as u32;
        if bits != 4 {
            return Err(Error::config(
                path,
                format!("AWQ bits = {bits}; only 4-bit gemm checkpoints exist"),
            ));
        }
        let group_size = v
            .get("group_size")
            .or_else(|| v.get("q_group_size"))
            .and_then(Value::as_u64)
            .filter(|&g| g > 0 && g % 2 == 0)
            .ok_or_else(|| {
                Error::config(
                    path,
                    "quantization_config.group_size is missing, or not a positive even number",
                )
            })? as usize;
        let modules_to_not_convert = v
            .get("modules_to_not_convert")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok(AwqConfig {
            bits,
            group_size,
            zero_point: v.get("zero_point").and_then(Value::as_bool).unwrap_or(true),
            modules_to_not_convert,
        })
    }

    pub fn to_json(&self) -> Value {
        json!({
            "quant_method": "awq",
            "version": "gemm",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "modules_to_not_convert": self.modules_to_not_convert,
        })
    }
}

/// Packs unsigned 4-bit values `[rows, cols]` (one per byte, < 16) into
/// int32 `[rows, cols/8]` in AutoAWQ's nibble order. `cols % 8 == 0`.
pub fn pack_int4(values: &[u8], rows: usize, cols: usize) -> Vec<i32> {
    debug_assert_eq!(values.len(), rows * cols);
    let packed_cols = cols / 8;
    let mut out = vec![0i32; rows * packed_cols];
    for r in 0..rows {
        for c in 0..packed_cols {
            let mut word = 0u32;
            for (i, &col) in AWQ_PACK_ORDER.iter().enumerate() {
                word |= (values[r * cols + 8 * c + col] as u32 & 0xf) << (4 * i);
            }
            out[r * packed_cols + c] = word as i32;
        }
    }
    out
}

/// Inverse of [`pack_int4`].
pub fn unpack_int4(packed: &[i32], rows: usize, cols: usize) -> Vec<u8> {
    let packed_cols = cols / 8;
    debug_assert_eq!(packed.len(), rows * packed_cols);
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..packed_cols {
            let word = packed[r * packed_cols + c] as u32;
            for (i, &col) in AWQ_PACK_ORDER.iter().enumerate() {
                out[r * cols + 8 * c + col] = ((word >> (4 * i)) & 0xf) as u8;
            }
        }
    }
    out
}

/// One AWQ-quantized linear layer as stored, plus its shape.
#[derive(Debug, Clone)]
pub struct AwqTensors {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    /// `[in, out/8]`.
    pub qweight: Vec<i32>,
    /// `[in/g, out/8]`.
    pub qzeros: Vec<i32>,
    /// `[in/g, out]`.
    pub scales: Vec<f16>,
}

impl AwqTensors {
    /// The tensors of one layer whose outputs are `parts`' outputs side by
    /// side (all of one `in_features` and group size, which the caller
    /// checks). Every tensor is `[rows, out…]` row-major with the output
    /// axis last, so each row is the parts' rows one after another; the
    /// packing (8 outputs per int32) never straddles parts because each
    /// part's `out_features` is a multiple of 8.
    pub fn stack_outputs(parts: &[&AwqTensors]) -> AwqTensors {
        fn rows_side_by_side<T: Copy>(parts: &[(&[T], usize)], rows: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(parts.iter().map(|(d, _)| d.len()).sum());
            for r in 0..rows {
                for &(data, width) in parts {
                    out.extend_from_slice(&data[r * width..(r + 1) * width]);
                }
            }
            out
        }
        let first = parts[0];
        let (k, g) = (first.in_features, first.group_size);
        let packed = |f: fn(&AwqTensors) -> &[i32]| -> Vec<(&[i32], usize)> {
            parts.iter().map(|p| (f(p), p.out_features / 8)).collect()
        };
        let qweight = rows_side_by_side(&packed(|p| &p.qweight), k);
        let qzeros = rows_side_by_side(&packed(|p| &p.qzeros), k / g);
        let scales: Vec<(&[f16], usize)> = parts
            .iter()
            .map(|p| (p.scales.as_slice(), p.out_features))
            .collect();
        AwqTensors {
            in_features: k,
            out_features: parts.iter().map(|p| p.out_features).sum(),
            group_size: g,
            qweight,
            qzeros,
            scales: rows_side_by_side(&scales, k / g),
        }
    }

    /// Checks that the sizes agree with the shape.
    pub fn validate(&self, name: &str, path: &Path) -> Result<()> {
        let (k, n, g) = (self.in_features, self.out_features, self.group_size);
        let mismatch = |what: &str, expected: Vec<usize>, len: usize| Error::ShapeMismatch {
            path: path.to_path_buf(),
            name: format!("{name}.{what}"),
            expected,
            actual: vec![len],
        };
        if !n.is_multiple_of(8) || !k.is_multiple_of(g) {
            return Err(Error::config(
                path,
                format!("{name}: in_features {k} must be a multiple of group_size {g}, out_features {n} of 8"),
            ));
        }
        if self.qweight.len() != k * n / 8 {
            return Err(mismatch("qweight", vec![k, n / 8], self.qweight.len()));
        }
        if self.qzeros.len() != k / g * n / 8 {
            return Err(mismatch("qzeros", vec![k / g, n / 8], self.qzeros.len()));
        }
        if self.scales.len() != k / g * n {
            return Err(mismatch("scales", vec![k / g, n], self.scales.len()));
        }
        Ok(())
    }

    /// The weight in Hugging Face `[out, in]` layout, as f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, n, g) = (self.in_features, self.out_features, self.group_size);
        let q = unpack_int4(&self.qweight, k, n);
        let z = unpack_int4(&self.qzeros, k / g, n);
        let mut w = vec![0f32; n * k];
        for i in 0..k {
            for o in 0..n {
                let s = self.scales[(i / g) * n + o].to_f32();
                let zero = z[(i / g) * n + o] as f32;
                w[o * k + i] = (q[i * n + o] as f32 - zero) * s;
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {

    /// Stacked tensors dequantize to the parts' weights one after another
    /// (rows of the `[out, in]` layout), for parts of different widths.
    #[test]
    fn stacked_outputs_dequantize_to_the_parts_in_order() {
        let (k, g) = (64, 32);
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed
        };
        let parts: Vec<AwqTensors> = [16usize, 8, 24]
            .iter()
            .map(|&n| AwqTensors {
                in_features: k,
                out_features: n,
                group_size: g,
                qweight: (0..k * n / 8).map(|_| next() as i32).collect(),
                qzeros: (0..k / g * n / 8).map(|_| next() as i32).collect(),
                scales: (0..k / g * n)
                    .map(|_| f16::from_f32((next() % 1000) as f32 / 997.0 + 0.01))
                    .collect(),
            })
            .collect();
        let refs: Vec<&AwqTensors> = parts.iter().collect();
        let stacked = AwqTensors::stack_outputs(&refs);
        assert_eq!(stacked.out_features, 48);
        let want: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
        assert_eq!(stacked.dequantize(), want);
    }

    use super::*;
    use proptest::prelude::*;

    /// The CUDA kernels cannot depend on this crate, so they carry their
    /// own copy of the nibble order; this keeps the two the same format.
    #[test]
    fn cuda_kernels_use_the_same_nibble_order() {
        assert_eq!(lmq_kernels::awq::AWQ_ORDER, AWQ_PACK_ORDER);
    }

    proptest! {
        #[test]
        fn pack_then_unpack_is_identity(rows in 1usize..12, packed_cols in 1usize..6, seed in any::<u64>()) {
            let cols = packed_cols * 8;
            let mut state = seed;
            let values: Vec<u8> = (0..rows * cols)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 60) as u8
                })
                .collect();
            let packed = pack_int4(&values, rows, cols);
            prop_assert_eq!(unpack_int4(&packed, rows, cols), values);
        }
    }

    #[test]
    fn nibble_order_is_autoawq() {
        // Column j holds value j: nibble i must hold 0,2,4,6,1,3,5,7.
        let values: Vec<u8> = (0..8).collect();
        let word = pack_int4(&values, 1, 8)[0] as u32;
        let nibbles: Vec<u32> = (0..8).map(|i| (word >> (4 * i)) & 0xf).collect();
        assert_eq!(nibbles, vec![0, 2, 4, 6, 1, 3, 5, 7]);
    }
}
