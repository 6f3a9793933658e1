//! Token choice on the GPU for the CUDA backend: a step's logits turned
//! into its [`StepOutput`] by the kernels of `lmq_kernels::sampling`, with
//! each row's penalties built from its history.

use lmq_kernels::{sample_rows, DeviceMatrix, GpuDevice, PenaltyEntry, RowSampling};
use rayon::prelude::*;

use super::gpu_error;
use crate::backend::{finish_step, SampleRow, StepOutput};
use crate::error::Result;
use crate::sampling::token_counts;

/// A recorded step's logits made into its output, as
/// [`crate::backend::finish_logits`] does for an act.
pub(super) fn finish_matrix(
    dev: &GpuDevice,
    logits: &mut DeviceMatrix<f32>,
    sampling: Option<&[SampleRow<'_>]>,
) -> Result<StepOutput> {
    finish_step(
        logits,
        sampling,
        |l, rows| sample_matrix(dev, l, rows),
        |l| dev.download(l).map_err(gpu_error),
    )
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
            token_counts(r.history, r.prompt_len)
                .into_iter()
                .map(|(token, generated)| PenaltyEntry {
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
