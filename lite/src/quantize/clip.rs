//! AWQ's clip search (AutoAWQ's `auto_clip`): for every output channel and
//! input group of a linear, find the clipping range that minimises the
//! error of that group's partial output after fake quantization, then clamp
//! the weights to it.

use lmq_turbomind::backend::cpu::simd::best_dot;
use lmq_turbomind::backend::cpu::Matrix;
use rayon::prelude::*;

use super::groupwise::GroupSpec;

/// How the clip search runs.
#[derive(Debug, Clone, Copy)]
pub struct ClipSettings {
    /// Grid resolution: ratios 1, 1 - 1/grid, ...
    pub grid: usize,
    /// Never shrink by more than this fraction.
    pub max_shrink: f32,
}

impl Default for ClipSettings {
    fn default() -> Self {
        ClipSettings {
            grid: 20,
            max_shrink: 0.5,
        }
    }
}

/// Clamps `w` (`[out, in]`) in place to the best range per (row, group)
/// for the inputs `x` (`tokens × in`). Returns the mean ratio chosen.
pub fn clip_search(
    w: &mut [f32],
    in_features: usize,
    x: &Matrix,
    spec: &GroupSpec,
    settings: ClipSettings,
) -> f32 {
    let g = spec.group_size;
    let groups = in_features / g;
    let tokens = x.rows;
    // Inputs regrouped as [group][token][g] so each partial dot product
    // reads contiguous memory.
    let mut grouped = vec![0f32; groups * tokens * g];
    for t in 0..tokens {
        let row = x.row(t);
        for gi in 0..groups {
            grouped[(gi * tokens + t) * g..(gi * tokens + t + 1) * g]
                .copy_from_slice(&row[gi * g..(gi + 1) * g]);
        }
    }
    let dot = best_dot();
    let steps = ((settings.max_shrink * settings.grid as f32) as usize).max(1);
    let ratio_sum: f32 = w
        .par_chunks_mut(in_features)
        .map(|row| {
            let mut org_out = vec![0f32; tokens];
            let mut candidate = vec![0f32; g];
            let mut ratios = 0f32;
            for gi in 0..groups {
                let seg = &mut row[gi * g..(gi + 1) * g];
                let xs = &grouped[gi * tokens * g..(gi + 1) * tokens * g];
                for (t, o) in org_out.iter_mut().enumerate() {
                    *o = dot(&xs[t * g..(t + 1) * g], seg);
                }
                let org_max = seg.iter().fold(0f32, |m, &v| m.max(v.abs()));
                let (mut best_err, mut best_ratio) = (f64::INFINITY, 1f32);
                for step in 0..steps {
                    let ratio = 1.0 - step as f32 / settings.grid as f32;
                    let limit = org_max * ratio;
                    candidate
                        .iter_mut()
                        .zip(seg.iter())
                        .for_each(|(c, &v)| *c = v.clamp(-limit, limit));
                    spec.fake_quantize(&mut candidate, g);
                    let err: f64 = org_out
                        .iter()
                        .enumerate()
                        .map(|(t, &o)| {
                            let d = (dot(&xs[t * g..(t + 1) * g], &candidate) - o) as f64;
                            d * d
                        })
                        .sum();
                    if err < best_err {
                        best_err = err;
                        best_ratio = ratio;
                    }
                }
                let limit = org_max * best_ratio;
                seg.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
                ratios += best_ratio;
            }
            ratios
        })
        .sum();
    ratio_sum / (w.len() / in_features * groups).max(1) as f32
}
