//! Causal attention over a contiguous per-sequence KV cache, with GQA.

use rayon::prelude::*;

use super::simd::DotFn;
use super::{shape_error, CpuKv, Matrix};
use crate::backend::{AttnShape, SeqSpan};
use crate::error::Result;

pub(super) fn causal(
    dot: DotFn,
    layer: usize,
    q: &Matrix,
    kvs: &[&mut CpuKv],
    spans: &[SeqSpan],
    shape: &AttnShape,
) -> Result<Matrix> {
    let hd = shape.head_dim;
    let q_cols = shape.num_heads * hd;
    if q.cols != q_cols {
        return Err(shape_error(format!(
            "attention: q has {} columns, expected {q_cols}",
            q.cols
        )));
    }
    let group = shape.num_heads / shape.num_kv_heads;
    let kv_dim = shape.kv_dim();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = Matrix::zeros(q.rows, q_cols);
    for (kv, span) in kvs.iter().zip(spans) {
        let stored = kv.layer_len(layer);
        if stored < span.start_pos + span.len() {
            return Err(shape_error(format!(
                "attention: cache holds {stored} positions, rows need {}",
                span.start_pos + span.len()
            )));
        }
        let [keys, values] = kv.materialize(layer, span.start_pos + span.len());
        let (keys, values) = (&keys, &values);
        let out_rows = &mut out.data[span.rows.start * q_cols..span.rows.end * q_cols];
        out_rows
            .par_chunks_mut(q_cols)
            .enumerate()
            .for_each(|(i, out_row)| {
                let pos = span.start_pos + i;
                let q_row = q.row(span.rows.start + i);
                let mut scores = vec![0f32; pos + 1];
                for h in 0..shape.num_heads {
                    let kvh = h / group;
                    let qh = &q_row[h * hd..(h + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for (t, s) in scores.iter_mut().enumerate() {
                        let kt = &keys[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                        *s = dot(qh, kt) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    let oh = &mut out_row[h * hd..(h + 1) * hd];
                    for (t, &p) in scores.iter().enumerate() {
                        let vt = &values[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                        let w = p * inv;
                        for (o, &v) in oh.iter_mut().zip(vt) {
                            *o += w * v;
                        }
                    }
                }
            });
    }
    Ok(out)
}
