//! AWQ's activation-aware scale search, one decoder layer at a time.
//!
//! For each group of linears that share an input, the per-input-channel
//! scale `s = mean|x|^α / mean|ŵ|^(1−α)` (ŵ: weights normalised by their
//! group maximum) is searched over a grid of α. Each candidate multiplies
//! the linears' input columns by `s`, fake-quantizes them, divides by `s`
//! again, and is scored by the MSE of the block's output (attention block,
//! MLP, or the linear itself) against the fp32 layer on a subset of the
//! calibration sequences. The winner is folded into the preceding op so the
//! fp32 function is unchanged, then the clip search runs.

use std::collections::HashMap;

use lmq_turbomind::backend::cpu::{CpuBackend, CpuKvPool, Matrix};
use lmq_turbomind::backend::{AttnShape, Backend, HostLinear, HostWeight, KvPoolSpec, SeqSpan};
use lmq_turbomind::layer::{DecoderLayer, HostLayer, LayerContext, LinearInput, Observer};
use lmq_turbomind::quant::kv::{KvCacheConfig, KvDtype, KvMode};
use lmq_turbomind::rope::Rope;

use super::clip::{clip_search, ClipSettings};
use super::groupwise::GroupSpec;
use crate::error::{Error, Result};

/// Positions per KV block of calibration spans (see [`SeqSpan::packed`]).
pub const CALIB_BLOCK_LEN: usize = 64;

/// Everything the search needs that does not change between layers.
pub struct LayerRunner<'a> {
    pub backend: &'a CpuBackend,
    pub rope: &'a Rope,
    /// The model's head layout with `num_layers = 1` (one layer's caches).
    pub shape: AttnShape,
    pub eps: f32,
}

/// Collects, per linear input, the mean |x| of every channel over all
/// tokens, and the rows of the first `subset_rows` tokens.
pub struct InputObserver {
    subset_rows: usize,
    pub mean_abs: HashMap<LinearInput, Vec<f32>>,
    pub subset: HashMap<LinearInput, Matrix>,
}

impl InputObserver {
    pub fn new(subset_rows: usize) -> Self {
        InputObserver {
            subset_rows,
            mean_abs: HashMap::new(),
            subset: HashMap::new(),
        }
    }
}

impl Observer<CpuBackend> for InputObserver {
    fn observe(&mut self, input: LinearInput, x: &Matrix) -> lmq_turbomind::Result<()> {
        let mut sums = vec![0f64; x.cols];
        for r in 0..x.rows {
            for (s, &v) in sums.iter_mut().zip(x.row(r)) {
                *s += v.abs() as f64;
            }
        }
        let rows = x.rows.max(1) as f64;
        self.mean_abs
            .insert(input, sums.into_iter().map(|s| (s / rows) as f32).collect());
        let keep = self.subset_rows.min(x.rows);
        self.subset.insert(
            input,
            Matrix {
                data: x.data[..keep * x.cols].to_vec(),
                rows: keep,
                cols: x.cols,
            },
        );
        Ok(())
    }
}

impl LayerRunner<'_> {
    /// A fresh fp32 pool for the spans' blocks: calibration runs the layer
    /// in full precision, KV included.
    fn pool(&self, spans: &[SeqSpan]) -> Result<CpuKvPool> {
        let num_blocks = spans
            .iter()
            .flat_map(|s| s.blocks.iter())
            .max()
            .map_or(1, |&b| b as usize + 1);
        let spec = KvPoolSpec {
            shape: self.shape,
            config: KvCacheConfig {
                dtype: KvDtype::F32,
                mode: KvMode::Online,
                static_params: None,
            },
            num_blocks,
            block_len: CALIB_BLOCK_LEN,
        };
        Ok(self.backend.new_kv_pool(&spec)?)
    }

    /// The attention block's output for normed input `h`.
    pub fn attention(
        &self,
        layer: &DecoderLayer<CpuBackend>,
        h: &Matrix,
        spans: &[SeqSpan],
    ) -> Result<Matrix> {
        self.observed_attention(layer, h, spans, &mut lmq_turbomind::layer::NoObserver)
    }

    /// The attention block over fresh fp32 caches, one per sequence.
    fn observed_attention(
        &self,
        layer: &DecoderLayer<CpuBackend>,
        h: &Matrix,
        spans: &[SeqSpan],
        observer: &mut dyn Observer<CpuBackend>,
    ) -> Result<Matrix> {
        let mut pool = self.pool(spans)?;
        let ctx = LayerContext {
            kv_layer: 0,
            spans,
            rope: self.rope,
            shape: &self.shape,
        };
        Ok(layer.attention(self.backend, h, &mut pool, &ctx, observer)?)
    }

    /// Runs the whole layer on residual input `x`, returning its residual
    /// output, with `observer` seeing every linear input.
    pub fn forward(
        &self,
        layer: &DecoderLayer<CpuBackend>,
        x: &Matrix,
        spans: &[SeqSpan],
        observer: &mut dyn Observer<CpuBackend>,
    ) -> Result<Matrix> {
        let b = self.backend;
        let h = b.rms_norm(x, &layer.input_norm, self.eps)?;
        let o = self.observed_attention(layer, &h, spans, observer)?;
        let mut residual = x.clone();
        let h2 = b.add_rms_norm(&mut residual, &o, &layer.post_attention_norm, self.eps)?;
        let down = layer.mlp(b, &h2, observer)?;
        b.add_in_place(&mut residual, &down)?;
        Ok(residual)
    }
}

/// The groups of linears that share an input, with the op their scales
/// fold into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleGroup {
    /// input_layernorm → q, k, v; scored on the attention block.
    Qkv,
    /// v_proj → o_proj (only when v's outputs are o's inputs one to one).
    VO,
    /// post_attention_layernorm → gate, up; scored on the MLP.
    GateUp,
    /// up_proj → down_proj; scored on down_proj.
    UpDown,
}

impl ScaleGroup {
    pub fn input(self) -> LinearInput {
        match self {
            ScaleGroup::Qkv => LinearInput::Qkv,
            ScaleGroup::VO => LinearInput::O,
            ScaleGroup::GateUp => LinearInput::GateUp,
            ScaleGroup::UpDown => LinearInput::Down,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScaleGroup::Qkv => "q/k/v",
            ScaleGroup::VO => "o_proj",
            ScaleGroup::GateUp => "gate/up",
            ScaleGroup::UpDown => "down_proj",
        }
    }

    fn linears(self, layer: &mut HostLayer) -> Vec<&mut HostLinear> {
        match self {
            ScaleGroup::Qkv => vec![&mut layer.q, &mut layer.k, &mut layer.v],
            ScaleGroup::VO => vec![&mut layer.o],
            ScaleGroup::GateUp => vec![&mut layer.gate, &mut layer.up],
            ScaleGroup::UpDown => vec![&mut layer.down],
        }
    }
}

fn dense_mut(l: &mut HostLinear) -> Result<&mut Vec<f32>> {
    match &mut l.weight {
        HostWeight::Dense(w) => Ok(w),
        HostWeight::Awq(_) => Err(Error::Invalid {
            message: "the input model is already quantized".into(),
        }),
    }
}

fn dense(l: &HostLinear) -> Result<&Vec<f32>> {
    match &l.weight {
        HostWeight::Dense(w) => Ok(w),
        HostWeight::Awq(_) => Err(Error::Invalid {
            message: "the input model is already quantized".into(),
        }),
    }
}

/// Multiplies input column `c` of a linear by `s[c]`.
fn scale_columns(l: &mut HostLinear, s: &[f32]) -> Result<()> {
    let cols = l.in_features;
    for row in dense_mut(l)?.chunks_exact_mut(cols) {
        for (w, &f) in row.iter_mut().zip(s) {
            *w *= f;
        }
    }
    Ok(())
}

/// Divides output row `r` (and its bias) of a linear by `s[r]`.
fn unscale_rows(l: &mut HostLinear, s: &[f32]) -> Result<()> {
    let cols = l.in_features;
    for (row, &f) in dense_mut(l)?.chunks_exact_mut(cols).zip(s) {
        row.iter_mut().for_each(|w| *w /= f);
    }
    if let Some(b) = &mut l.bias {
        b.iter_mut().zip(s).for_each(|(v, &f)| *v /= f);
    }
    Ok(())
}

/// Folds scales `s` of a group into the layer: the group's linears get
/// their input columns multiplied by `s`, the preceding op gets divided, so
/// the fp32 function is unchanged.
pub fn fold_scales(layer: &mut HostLayer, group: ScaleGroup, s: &[f32]) -> Result<()> {
    for l in group.linears(layer) {
        scale_columns(l, s)?;
    }
    match group {
        ScaleGroup::Qkv => layer
            .input_norm
            .iter_mut()
            .zip(s)
            .for_each(|(w, &f)| *w /= f),
        ScaleGroup::GateUp => layer
            .post_attention_norm
            .iter_mut()
            .zip(s)
            .for_each(|(w, &f)| *w /= f),
        ScaleGroup::VO => unscale_rows(&mut layer.v, s)?,
        ScaleGroup::UpDown => unscale_rows(&mut layer.up, s)?,
    }
    Ok(())
}

/// Whether v_proj's outputs feed o_proj's inputs one to one (no GQA).
pub fn vo_foldable(layer: &HostLayer) -> bool {
    layer.v.out_features == layer.o.in_features
}

/// The grid of candidate scales and their scoring.
#[derive(Debug, Clone, Copy)]
pub struct ScaleSettings {
    pub grid: usize,
}

impl Default for ScaleSettings {
    fn default() -> Self {
        ScaleSettings { grid: 20 }
    }
}

/// Per-channel mean of |w| / (group max |w|) over all rows of the group's
/// linears (AutoAWQ's `w_mean`).
fn weight_mean(linears: &[&HostLinear], g: usize) -> Result<Vec<f32>> {
    let cols = linears[0].in_features;
    let mut sums = vec![0f64; cols];
    let mut rows = 0usize;
    for l in linears {
        for row in dense(l)?.chunks_exact(cols) {
            for (gi, seg) in row.chunks_exact(g).enumerate() {
                let max = seg.iter().fold(0f32, |m, &v| m.max(v.abs())) + 1e-6;
                for (j, &v) in seg.iter().enumerate() {
                    sums[gi * g + j] += (v.abs() / max) as f64;
                }
            }
            rows += 1;
        }
    }
    Ok(sums
        .into_iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect())
}

/// The candidate scales for one α, normalised as AutoAWQ does.
fn candidate_scales(x_mean: &[f32], w_mean: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = x_mean
        .iter()
        .zip(w_mean)
        .map(|(&x, &w)| (x.powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).max(1e-4))
        .collect();
    let (min, max) = s
        .iter()
        .fold((f32::INFINITY, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (min * max).sqrt();
    s.iter_mut().for_each(|v| *v /= norm);
    s
}

fn mse(a: &Matrix, b: &Matrix) -> f64 {
    let n = a.data.len().max(1) as f64;
    a.data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum::<f64>()
        / n
}

/// The output that scores a group: its block, run on the subset.
fn score_output(
    runner: &LayerRunner<'_>,
    group: ScaleGroup,
    layer: &HostLayer,
    input: &Matrix,
    spans: &[SeqSpan],
) -> Result<Matrix> {
    let b = runner.backend;
    Ok(match group {
        ScaleGroup::Qkv => {
            let dev = DecoderLayer::upload(layer.clone(), b)?;
            runner.attention(&dev, input, spans)?
        }
        ScaleGroup::GateUp => {
            let gate = b.upload_linear(layer.gate.clone())?;
            let up = b.upload_linear(layer.up.clone())?;
            let down = b.upload_linear(layer.down.clone())?;
            let act = b.silu_mul(&b.linear(input, &gate)?, &b.linear(input, &up)?)?;
            b.linear(&act, &down)?
        }
        ScaleGroup::VO => b.linear(input, &b.upload_linear(layer.o.clone())?)?,
        ScaleGroup::UpDown => b.linear(input, &b.upload_linear(layer.down.clone())?)?,
    })
}

/// A copy of `layer` whose `group` linears are scaled by `s`, fake
/// quantized, and unscaled: what the checkpoint will compute.
fn fake_quantized(
    layer: &HostLayer,
    group: ScaleGroup,
    s: &[f32],
    spec: &GroupSpec,
) -> Result<HostLayer> {
    let mut candidate = layer.clone();
    let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
    for l in group.linears(&mut candidate) {
        scale_columns(l, s)?;
        let inf = l.in_features;
        spec.fake_quantize(dense_mut(l)?, inf);
        scale_columns(l, &inv)?;
    }
    Ok(candidate)
}

/// Outcome of one group's search.
#[derive(Debug, Clone)]
pub struct GroupResult {
    pub group: ScaleGroup,
    /// NaN when plain round-to-nearest (identity scales) won.
    pub best_alpha: f32,
    pub best_loss: f64,
    /// The loss of plain round-to-nearest.
    pub identity_loss: f64,
    /// Set when the search fell back to no scaling, with the reason.
    pub fallback: Option<String>,
    pub scales: Vec<f32>,
}

/// The calibration data one group's search scores against.
pub struct SearchInput<'a> {
    /// Mean |x| per input channel over all calibration tokens.
    pub x_mean: &'a [f32],
    /// The group's input on the scoring subset.
    pub input: &'a Matrix,
    /// The sequences of the scoring subset.
    pub spans: &'a [SeqSpan],
}

/// Searches the best scales for `group` of `layer`.
pub fn search_scales(
    runner: &LayerRunner<'_>,
    group: ScaleGroup,
    layer: &HostLayer,
    data: &SearchInput<'_>,
    spec: &GroupSpec,
    settings: ScaleSettings,
) -> Result<GroupResult> {
    let SearchInput {
        x_mean,
        input,
        spans,
    } = *data;
    let reference = score_output(runner, group, layer, input, spans)?;
    let mut probe = layer.clone();
    let w_mean = weight_mean(
        &group
            .linears(&mut probe)
            .iter()
            .map(|l| &**l)
            .collect::<Vec<_>>(),
        spec.group_size,
    )?;
    let identity = vec![1f32; x_mean.len()];
    let fallback = |reason: String| GroupResult {
        group,
        best_alpha: 0.0,
        best_loss: f64::NAN,
        identity_loss: f64::NAN,
        fallback: Some(reason),
        scales: identity.clone(),
    };
    if let Some(bad) = x_mean.iter().position(|v| !v.is_finite()) {
        return Ok(fallback(format!(
            "non-finite activation statistic at channel {bad}"
        )));
    }
    if reference.data.iter().any(|v| !v.is_finite()) {
        return Ok(fallback("non-finite block output".into()));
    }
    // Plain round-to-nearest (identity scales) is scored first, so the
    // search can only improve on it.
    let identity_loss = mse(
        &score_output(
            runner,
            group,
            &fake_quantized(layer, group, &identity, spec)?,
            input,
            spans,
        )?,
        &reference,
    );
    let mut best: Option<(f64, f32, Vec<f32>)> = identity_loss
        .is_finite()
        .then(|| (identity_loss, f32::NAN, identity.clone()));
    for step in 0..settings.grid {
        let alpha = step as f32 / settings.grid as f32;
        let s = candidate_scales(x_mean, &w_mean, alpha);
        if s.iter().any(|v| !v.is_finite() || *v <= 0.0) {
            continue;
        }
        let candidate = fake_quantized(layer, group, &s, spec)?;
        let out = score_output(runner, group, &candidate, input, spans)?;
        let loss = mse(&out, &reference);
        if loss.is_finite() && best.as_ref().is_none_or(|b| loss < b.0) {
            best = Some((loss, alpha, s));
        }
    }
    Ok(match best {
        Some((loss, alpha, scales)) => GroupResult {
            group,
            best_alpha: alpha,
            best_loss: loss,
            identity_loss,
            fallback: None,
            scales,
        },
        None => fallback("every candidate gave a non-finite loss".into()),
    })
}

/// The clip search for the linears AutoAWQ clips (all but q and k, whose
/// outputs meet in the attention scores), with inputs divided by the
/// folded scales.
pub fn clip_layer(
    layer: &mut HostLayer,
    inputs: &HashMap<LinearInput, Matrix>,
    scales: &HashMap<LinearInput, Vec<f32>>,
    spec: &GroupSpec,
    max_tokens: usize,
    settings: ClipSettings,
) -> Result<()> {
    let sample = |key: LinearInput| -> Result<Matrix> {
        let x = inputs.get(&key).ok_or_else(|| Error::Invalid {
            message: format!("no calibration inputs for {key:?}"),
        })?;
        let step = (x.rows / max_tokens.max(1)).max(1);
        let rows: Vec<usize> = (0..x.rows).step_by(step).take(max_tokens).collect();
        let mut out = Matrix::zeros(rows.len(), x.cols);
        let s = scales.get(&key);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols).zip(&rows) {
            dst.copy_from_slice(x.row(r));
            if let Some(s) = s {
                dst.iter_mut().zip(s).for_each(|(v, &f)| *v /= f);
            }
        }
        Ok(out)
    };
    let x_qkv = sample(LinearInput::Qkv)?;
    let x_o = sample(LinearInput::O)?;
    let x_gu = sample(LinearInput::GateUp)?;
    let x_down = sample(LinearInput::Down)?;
    for (l, x) in [
        (&mut layer.v, &x_qkv),
        (&mut layer.o, &x_o),
        (&mut layer.gate, &x_gu),
        (&mut layer.up, &x_gu),
        (&mut layer.down, &x_down),
    ] {
        let inf = l.in_features;
        clip_search(dense_mut(l)?, inf, x, spec, settings);
    }
    Ok(())
}

#[cfg(test)]
#[path = "awq_tests.rs"]
mod tests;
