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

use super::attn_simd::AttnKernels;
use super::kv::CpuKvPool;
use super::pool::{pool as thread_pool, SyncPtr};
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
    let kernels = AttnKernels::best(hd);
    let mut partials: Vec<Option<Partial>> = (0..tasks.len()).map(|_| None).collect();
    let slots = SyncPtr(partials.as_mut_ptr());
    thread_pool().run(tasks.len(), |i| {
        let t = &tasks[i];
        let p = run_task(kernels, layer, q, pool, &spans[t.span], t, shape, smoothing);
        // SAFETY: task i alone writes slot i of `partials`.
        unsafe { *slots.get().add(i) = Some(p) };
    });
    let partials: Vec<Partial> = partials.into_iter().flatten().collect();
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
    kernels: AttnKernels,
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
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (keys, values, scores) = scratch.take(block_len * hd, block_len);
        fold_blocks(
            kernels,
            layer,
            pool,
            span,
            task,
            (&queries, group, hd),
            (keys, values, scores),
            (&mut max, &mut sum, &mut acc),
        );
    });
    Partial { max, sum, acc }
}

thread_local! {
    /// Per-thread buffers for a task's dequantized K/V block and scores,
    /// reused across tasks (a decode step runs hundreds of small tasks).
    static SCRATCH: std::cell::RefCell<Scratch> = const { std::cell::RefCell::new(Scratch(Vec::new())) };
}

struct Scratch(Vec<f32>);

impl Scratch {
    /// Keys and values (`kv` values each) and scores (`n` values).
    fn take(&mut self, kv: usize, n: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
        if self.0.len() < 2 * kv + n {
            self.0.resize(2 * kv + n, 0.0);
        }
        let (keys, rest) = self.0.split_at_mut(kv);
        let (values, rest) = rest.split_at_mut(kv);
        (keys, values, &mut rest[..n])
    }
}

/// Folds each block of a task into its rows' online-softmax states.
#[allow(clippy::too_many_arguments)]
fn fold_blocks(
    kernels: AttnKernels,
    layer: usize,
    pool: &CpuKvPool,
    span: &SeqSpan,
    task: &Task,
    (queries, group, hd): (&[f32], usize, usize),
    (keys, values, scores): (&mut [f32], &mut [f32], &mut [f32]),
    (max, sum, acc): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let block_len = pool.spec().block_len;
    // Positions the last row of the task attends to.
    let n_tokens = span.start_pos + task.rows.end;
    for bi in task.blocks.clone() {
        let block = span.blocks[bi];
        let t0 = bi * block_len;
        if t0 >= n_tokens {
            break;
        }
        let nt = block_len.min(n_tokens - t0);
        // An fp16 cache is read in place by the fp16 kernels (the same
        // bits as widening it first); other dtypes are dequantized into
        // the scratch buffers once per block.
        let in_place = kernels.f16.and_then(|f| {
            let k = pool.f16_segment(layer, 0, block as usize, task.kv_head)?;
            let v = pool.f16_segment(layer, 1, block as usize, task.kv_head)?;
            Some((f, k, v))
        });
        if in_place.is_none() {
            pool.load(layer, 0, block as usize, task.kv_head, nt, keys);
            pool.load(layer, 1, block as usize, task.kv_head, nt, values);
        }
        for (i, r) in task.rows.clone().enumerate() {
            let pos = span.start_pos + r;
            if pos < t0 {
                continue;
            }
            let visible = nt.min(pos - t0 + 1);
            for g in 0..group {
                let idx = i * group + g;
                let qv = &queries[idx * hd..(idx + 1) * hd];
                let s = &mut scores[..visible];
                let (m, l, a) = (
                    &mut max[idx],
                    &mut sum[idx],
                    &mut acc[idx * hd..(idx + 1) * hd],
                );
                match in_place {
                    Some(((scores16, online16), k, v)) => {
                        scores16(qv, &k[..visible * hd], s);
                        online16(s, &v[..visible * hd], m, l, a);
                    }
                    None => {
                        (kernels.scores)(qv, &keys[..visible * hd], s);
                        (kernels.online)(s, &values[..visible * hd], m, l, a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvPoolSpec;
    use crate::quant::kv::{KvCacheConfig, KvDtype, KvMode};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) % 2001) as f32 / 1000.0 - 1.0
    }

    /// A sequence's attention output rows are the same bits whether its
    /// positions are computed in one prefill, one at a time, or next to
    /// other sequences; and they match a plain f64 softmax attention.
    #[test]
    fn rows_do_not_depend_on_the_batch_and_match_an_f64_reference() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            check_rows(dtype);
        }
    }

    fn check_rows(dtype: KvDtype) {
        let shape = AttnShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 64,
            num_layers: 1,
        };
        let (hd, kv_dim, q_dim) = (64, 128, 384);
        let block_len = 16;
        let spec = KvPoolSpec {
            shape,
            config: KvCacheConfig {
                dtype,
                mode: KvMode::Online,
                static_params: None,
            },
            num_blocks: 16,
            block_len,
        };
        let mut seed = 3u64;
        let len = 45; // three blocks, the last one partly filled
        let rand = |n: usize, seed: &mut u64| -> Vec<f32> { (0..n).map(|_| lcg(seed)).collect() };
        // fp16-exact keys and values, so that one reference serves both
        // dtypes.
        let h = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect()
        };
        let (q, k, v) = (
            rand(len * q_dim, &mut seed),
            h(rand(len * kv_dim, &mut seed)),
            h(rand(len * kv_dim, &mut seed)),
        );
        let mat = |data: Vec<f32>, cols: usize| Matrix {
            rows: data.len() / cols,
            data,
            cols,
        };
        let run = |pool: &CpuKvPool, rows: std::ops::Range<usize>, others: usize| -> Vec<f32> {
            // The sequence's rows `rows` after `others` rows of another
            // sequence (blocks 8.., positions 0..others) in the batch.
            let mut qm = rand(others * q_dim, &mut 99u64.clone());
            qm.extend_from_slice(&q[rows.start * q_dim..rows.end * q_dim]);
            let spans = vec![
                SeqSpan {
                    rows: 0..others,
                    start_pos: 0,
                    blocks: (8..16).collect(),
                },
                SeqSpan {
                    rows: others..others + rows.len(),
                    start_pos: rows.start,
                    blocks: (0..8).collect(),
                },
            ];
            let spans = if others == 0 {
                spans[1..].to_vec()
            } else {
                spans
            };
            let out = paged(0, &mat(qm, q_dim), pool, &spans, &shape).expect("attention");
            out.data[others * q_dim..].to_vec()
        };
        let mut pool = CpuKvPool::new(&spec).expect("pool");
        let all = SeqSpan {
            rows: 0..len,
            start_pos: 0,
            blocks: (0..8).collect(),
        };
        pool.write(0, &k, &v, &all).expect("write");
        let other = SeqSpan {
            rows: 0..30,
            start_pos: 0,
            blocks: (8..16).collect(),
        };
        let ko = rand(30 * kv_dim, &mut seed);
        let vo = rand(30 * kv_dim, &mut seed);
        pool.write(0, &ko, &vo, &other).expect("write");

        let prefill = run(&pool, 0..len, 0);
        let with_others = run(&pool, 0..len, 30);
        assert_eq!(prefill, with_others);
        for p in [0usize, 1, 15, 16, 17, 44] {
            for others in [0usize, 7] {
                let one = run(&pool, p..p + 1, others);
                assert_eq!(
                    one,
                    prefill[p * q_dim..(p + 1) * q_dim],
                    "position {p}, {others} others"
                );
            }
        }
        let scale = 1.0 / (hd as f64).sqrt();
        for p in 0..len {
            for h in 0..6 {
                let kh = h / 3;
                let qv = &q[p * q_dim + h * hd..p * q_dim + (h + 1) * hd];
                let s: Vec<f64> = (0..=p)
                    .map(|t| {
                        (0..hd)
                            .map(|d| qv[d] as f64 * k[t * kv_dim + kh * hd + d] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let total: f64 = w.iter().sum();
                for d in 0..hd {
                    let want: f64 = (0..=p)
                        .map(|t| w[t] * v[t * kv_dim + kh * hd + d] as f64)
                        .sum::<f64>()
                        / total;
                    let got = prefill[p * q_dim + h * hd + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "pos {p} head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
