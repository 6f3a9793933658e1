//! Causal attention over the KV block pool, with GQA and dequantization
//! fused in.
//!
//! Work is split into tasks of (sequence, KV head, up to [`ROWS`] query
//! rows, a run of [`SPLIT_BLOCKS`] blocks). A task walks its blocks in
//! order, dequantizes one block of its head's K and V into a small buffer,
//! and folds it into a running (online) softmax for each of its rows and
//! query heads, as flash attention does; the runs of a row are then merged
//! in order (split-K, so that one long sequence still spreads over every
//! core). Each block is dequantized once per task, never the whole cache,
//! and the runs are fixed by block index, so a row's arithmetic depends
//! only on its own sequence: the result is the same whatever else is in
//! the batch.
//!
//! In smooth mode keys are stored divided by per-channel factors and values
//! Hadamard-rotated; since `q·(k̃⊙s) = (q⊙s)·k̃` and the rotation is linear
//! and its own inverse, the query is scaled and the output rotated once,
//! instead of every cached token.

use rayon::prelude::*;

use super::kv::CpuKvPool;
use super::simd::DotFn;
use super::{shape_error, Matrix};
use crate::backend::{AttnShape, SeqSpan};
use crate::error::Result;
use crate::quant::kv::hadamard;

/// Query rows per task: enough to reuse a dequantized block across a
/// prefill chunk, few enough to spread short batches across cores.
const ROWS: usize = 16;

/// Blocks per split-K run.
const SPLIT_BLOCKS: usize = 2;

struct Task {
    span: usize,
    kv_head: usize,
    rows: std::ops::Range<usize>,
    blocks: std::ops::Range<usize>,
}

/// A task's online-softmax state per (row, query head): running max, sum
/// of exponentials, and the weighted sum of values.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

pub(super) fn paged(
    dot: DotFn,
    layer: usize,
    q: &Matrix,
    pool: &CpuKvPool,
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
    let mut tasks = Vec::new();
    for (si, span) in spans.iter().enumerate() {
        pool.check_span(span)?;
        for kv_head in 0..shape.num_kv_heads {
            let mut r = 0;
            while r < span.len() {
                let end = (r + ROWS).min(span.len());
                // Blocks the chunk's last row attends to.
                let needed = (span.start_pos + end).div_ceil(pool.spec().block_len);
                let mut b = 0;
                while b < needed {
                    let b_end = (b + SPLIT_BLOCKS).min(needed);
                    tasks.push(Task {
                        span: si,
                        kv_head,
                        rows: r..end,
                        blocks: b..b_end,
                    });
                    b = b_end;
                }
                r = end;
            }
        }
    }
    let smoothing = pool.smoothing(layer);
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|t| run_task(dot, layer, q, pool, &spans[t.span], t, shape, smoothing))
        .collect();
    let group = shape.num_heads / shape.num_kv_heads;
    let mut out = Matrix::zeros(q.rows, q_cols);
    // Tasks of one (sequence, head, rows) are consecutive and in block
    // order: merge each such run of partials, then normalize.
    let mut i = 0;
    while i < tasks.len() {
        let t = &tasks[i];
        let mut j = i + 1;
        while j < tasks.len()
            && tasks[j].span == t.span
            && tasks[j].kv_head == t.kv_head
            && tasks[j].rows == t.rows
        {
            j += 1;
        }
        let mut merged = merge(&partials[i..j], hd);
        let span = &spans[t.span];
        for (k, r) in t.rows.clone().enumerate() {
            let row = span.rows.start + r;
            let first_head = t.kv_head * group;
            for g in 0..group {
                let idx = k * group + g;
                let a = &mut merged.acc[idx * hd..(idx + 1) * hd];
                let inv = 1.0 / merged.sum[idx];
                a.iter_mut().for_each(|x| *x *= inv);
                if smoothing.is_some() {
                    hadamard(a);
                }
            }
            out.data[row * q_cols + first_head * hd..row * q_cols + (first_head + group) * hd]
                .copy_from_slice(&merged.acc[k * group * hd..(k + 1) * group * hd]);
        }
        i = j;
    }
    Ok(out)
}

/// Combines online-softmax states over consecutive runs of positions, in
/// order.
fn merge(parts: &[Partial], hd: usize) -> Partial {
    let mut it = parts.iter();
    let Some(first) = it.next() else {
        return Partial {
            max: Vec::new(),
            sum: Vec::new(),
            acc: Vec::new(),
        };
    };
    let mut m = Partial {
        max: first.max.clone(),
        sum: first.sum.clone(),
        acc: first.acc.clone(),
    };
    for p in it {
        for idx in 0..m.max.len() {
            if p.sum[idx] == 0.0 {
                continue; // this run lies past the row's position
            }
            let new_max = m.max[idx].max(p.max[idx]);
            let (ca, cb) = ((m.max[idx] - new_max).exp(), (p.max[idx] - new_max).exp());
            m.sum[idx] = m.sum[idx] * ca + p.sum[idx] * cb;
            let (a, b) = (
                &mut m.acc[idx * hd..(idx + 1) * hd],
                &p.acc[idx * hd..(idx + 1) * hd],
            );
            for (x, &y) in a.iter_mut().zip(b) {
                *x = *x * ca + y * cb;
            }
            m.max[idx] = new_max;
        }
    }
    m
}

#[allow(clippy::too_many_arguments)]
fn run_task(
    dot: DotFn,
    layer: usize,
    q: &Matrix,
    pool: &CpuKvPool,
    span: &SeqSpan,
    task: &Task,
    shape: &AttnShape,
    smoothing: Option<&[f32]>,
) -> Partial {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let block_len = pool.spec().block_len;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_rows = task.rows.len();
    // Queries of this task, pre-scaled (and smoothed): [row][head in group][hd].
    let mut queries = vec![0f32; n_rows * group * hd];
    for (i, r) in task.rows.clone().enumerate() {
        let q_row = q.row(span.rows.start + r);
        for g in 0..group {
            let h = task.kv_head * group + g;
            let dst = &mut queries[(i * group + g) * hd..(i * group + g + 1) * hd];
            for (d, (&x, c)) in dst
                .iter_mut()
                .zip(q_row[h * hd..(h + 1) * hd].iter().zip(0..))
            {
                let s = smoothing.map_or(1.0, |sm| sm[task.kv_head * hd + c]);
                *d = x * scale * s;
            }
        }
    }
    let mut max = vec![f32::NEG_INFINITY; n_rows * group];
    let mut sum = vec![0f32; n_rows * group];
    let mut acc = vec![0f32; n_rows * group * hd];
    let mut keys = vec![0f32; block_len * hd];
    let mut values = vec![0f32; block_len * hd];
    let mut scores = vec![0f32; block_len];
    // Positions the last row of the task attends to.
    let n_tokens = span.start_pos + task.rows.end;
    for bi in task.blocks.clone() {
        let block = span.blocks[bi];
        let t0 = bi * block_len;
        if t0 >= n_tokens {
            break;
        }
        let nt = block_len.min(n_tokens - t0);
        pool.load(layer, 0, block as usize, task.kv_head, nt, &mut keys);
        pool.load(layer, 1, block as usize, task.kv_head, nt, &mut values);
        for (i, r) in task.rows.clone().enumerate() {
            let pos = span.start_pos + r;
            if pos < t0 {
                continue;
            }
            let visible = nt.min(pos - t0 + 1);
            for g in 0..group {
                let idx = i * group + g;
                let qv = &queries[idx * hd..(idx + 1) * hd];
                let mut block_max = f32::NEG_INFINITY;
                for (t, s) in scores[..visible].iter_mut().enumerate() {
                    *s = dot(qv, &keys[t * hd..(t + 1) * hd]);
                    block_max = block_max.max(*s);
                }
                let new_max = max[idx].max(block_max);
                let correction = (max[idx] - new_max).exp();
                max[idx] = new_max;
                let a = &mut acc[idx * hd..(idx + 1) * hd];
                if correction != 1.0 {
                    a.iter_mut().for_each(|x| *x *= correction);
                }
                let mut block_sum = 0f32;
                for (t, &s) in scores[..visible].iter().enumerate() {
                    let p = (s - new_max).exp();
                    block_sum += p;
                    for (o, &v) in a.iter_mut().zip(&values[t * hd..(t + 1) * hd]) {
                        *o += p * v;
                    }
                }
                sum[idx] = sum[idx] * correction + block_sum;
            }
        }
    }
    Partial { max, sum, acc }
}
