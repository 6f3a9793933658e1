//! Token choice on the GPU for the CUDA backend: a step's logits turned
//! into its [`StepOutput`] by the kernels of `lmq_kernels::sampling`, with
//! each row's penalties built from its history.

use lmq_kernels::{sample_rows, DeviceMatrix, GpuDevice, PenaltyEntry, RowSampling};
use rayon::prelude::*;

use super::gpu_error;
use crate::backend::{finish_step, SampleRow, StepOutput};
use crate::error::Result;
use crate::sampling::{token_counts, SamplingParams};

/// A recorded step's logits made into its output, as
/// [`crate::backend::finish_logits`] does for an act. Only the first
/// `rows` rows are the step's: the rest pad a bucket (see `graph.rs`), are
/// picked greedily where the step samples (the kernel takes whole
/// matrices), and are dropped.
pub(super) fn finish_matrix(
    dev: &GpuDevice,
    logits: &mut DeviceMatrix<f32>,
    sampling: Option<&[SampleRow<'_>]>,
    rows: usize,
) -> Result<StepOutput> {
    let padding = logits.rows().saturating_sub(rows);
    if padding == 0 {
        return finish_step(
            logits,
            sampling,
            |l, rows| sample_matrix(dev, l, rows),
            |l| dev.download(l).map_err(gpu_error),
        );
    }
    let greedy = SamplingParams::default();
    let padded: Option<Vec<SampleRow<'_>>> = sampling.map(|real| {
        real.iter()
            .cloned()
            .chain((0..padding).map(|_| SampleRow {
                params: &greedy,
                uniform: 0.0,
                history: &[],
                prompt_len: 0,
                counts: None,
            }))
            .collect()
    });
    let mut out = finish_step(
        logits,
        padded.as_deref(),
        |l, rows| sample_matrix(dev, l, rows),
        |l| dev.download(l).map_err(gpu_error),
    )?;
    if let Some(tokens) = out.tokens.as_mut() {
        tokens.truncate(rows);
    }
    out.logits.truncate(rows * logits.cols());
    if out
        .tokens
        .as_ref()
        .is_some_and(|t| t.iter().all(Option::is_some))
    {
        // Only a padding row wanted the host: the step's rows did not.
        out.logits = Vec::new();
    }
    Ok(out)
}

/// Penalties and token choice on the device for `rows` of `logits`
/// (`lmq_kernels::sample_rows`): each row's history becomes one penalty
/// entry per distinct token (seen anywhere, counted in the output).
pub(super) fn sample_matrix(
    dev: &GpuDevice,
    logits: &mut DeviceMatrix<f32>,
    rows: &[SampleRow<'_>],
) -> Result<Vec<Option<u32>>> {
    let params: Vec<RowSampling> = rows
        .iter()
        .map(|r| {
            let p = r.params;
            RowSampling {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                min_p: p.min_p,
                uniform: r.uniform,
                repetition_penalty: p.repetition_penalty,
                presence_penalty: p.presence_penalty,
                frequency_penalty: p.frequency_penalty,
            }
        })
        .collect();
    // Rows count their histories on rayon's threads (a sort each; long
    // histories × many rows would otherwise hold the step on this thread),
    // and their entries join in row order.
    let per_row: Vec<Vec<PenaltyEntry>> = rows
        .par_iter()
        .enumerate()
        .map(|(row, r)| {
            let p = r.params;
            let wants_repetition = p.repetition_penalty != 1.0;
            let wants_output = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
            if !wants_repetition && !wants_output {
                return Vec::new();
            }
            let counted;
            let counts = match r.counts {
                Some(c) => c,
                None => {
                    counted = token_counts(r.history, r.prompt_len);
                    &counted
                }
            };
            counts
                .iter()
                .map(|&(token, generated)| PenaltyEntry {
                    row,
                    token,
                    generated,
                    seen: wants_repetition,
                })
                .collect()
        })
        .collect();
    let penalties: Vec<PenaltyEntry> = per_row.into_iter().flatten().collect();
    sample_rows(dev, logits, &params, &penalties).map_err(gpu_error)
}
