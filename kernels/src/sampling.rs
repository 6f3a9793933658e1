//! Token sampling on the GPU (`cu/sampling.cu`): penalties, then greedy
//! argmax or temperature / top-k / top-p / min-p sampling, one block per
//! row, following the CPU sampler's algorithm step for step so that a
//! seeded request draws the same tokens on either backend. The random
//! number of each draw comes from the host (the request's own generator),
//! so a row's stream of draws does not depend on where it is sampled.
//!
//! The kernel sorts at most 1024 candidates per row. A row whose kept set
//! may reach past them (a flat distribution without top-k, top-p or min-p
//! cutting it short; top-k above 1024), or whose logits hold a NaN, comes
//! back as `None`: the caller samples it on the host from the penalized
//! logits, which this leaves in place.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::Module;
use crate::ops::{check_i32, on_device};

/// Floats per row in the kernel's parameter table (see `cu/sampling.cu`).
const PARAMS_PER_ROW: usize = 8;

/// One row's sampling parameters, as the kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// The draw's uniform number in [0, 1) (unused when greedy).
    pub uniform: f32,
    /// 1 disables it.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

/// A token of one row's history that the penalties touch: `seen` (in the
/// prompt or the output) for the repetition penalty, `generated` (times
/// in the output) for the presence and frequency penalties. The caller
/// gives at most one entry per (row, token) (it counts the history, so its
/// entries are unique by construction; a repeated one would penalize twice
/// but stays inside the logits: the kernel skips tokens past the
/// vocabulary, and rows are checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PenaltyEntry {
    pub row: usize,
    pub token: u32,
    pub generated: u32,
    pub seen: bool,
}

impl RowSampling {
    /// The row of the kernel's parameter table, in `cu/sampling.cu`'s
    /// order, checked: finite values, temperature ≥ 0, u in [0, 1). top_k
    /// travels as a float: exact, since it is clamped to the vocabulary
    /// (< 2^24 tokens).
    fn table_row(&self, op: &'static str, vocab: usize) -> Result<[f32; PARAMS_PER_ROW]> {
        let row = [
            self.temperature,
            self.top_k.min(vocab) as f32,
            self.top_p,
            self.min_p,
            self.uniform,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
        ];
        if !row.iter().all(|v| v.is_finite())
            || self.temperature < 0.0
            || !(0.0..1.0).contains(&self.uniform)
        {
            return Err(KernelError::invalid(
                op,
                format!("sampling parameters out of range: {self:?}"),
            ));
        }
        Ok(row)
    }
}

/// Applies the penalties to `logits` (`rows × vocab`) in place and picks a
/// token per row: `Some(token)`, or `None` where the host must sample the
/// row (see the module header).
pub fn sample_rows(
    dev: &GpuDevice,
    logits: &mut DeviceMatrix<f32>,
    rows: &[RowSampling],
    penalties: &[PenaltyEntry],
) -> Result<Vec<Option<u32>>> {
    const OP: &str = "sample_rows";
    if rows.len() != logits.rows() {
        return Err(KernelError::shape(
            OP,
            format!(
                "{} rows of parameters for {} rows of logits",
                rows.len(),
                logits.rows()
            ),
        ));
    }
    on_device(OP, dev, &[logits.is_on(dev)])?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = check_i32(OP, "vocabulary", logits.cols())?;
    if vocab == 0 {
        return Err(KernelError::invalid(OP, "the vocabulary is empty"));
    }
    let mut table = Vec::with_capacity(rows.len() * PARAMS_PER_ROW);
    for r in rows {
        table.extend_from_slice(&r.table_row(OP, logits.cols())?);
    }
    let params = dev.upload(&table, rows.len(), PARAMS_PER_ROW)?;
    if !penalties.is_empty() {
        let mut entries = Vec::with_capacity(4 * penalties.len());
        for e in penalties {
            if e.row >= rows.len() {
                return Err(KernelError::invalid(
                    OP,
                    format!("penalty entry {e:?}: row out of range"),
                ));
            }
            entries.extend_from_slice(&[
                e.row as i32,
                i32::try_from(e.token).unwrap_or(-1),
                i32::try_from(e.generated).unwrap_or(i32::MAX),
                i32::from(e.seen),
            ]);
        }
        let n = check_i32(OP, "penalty entries", penalties.len())?;
        let entries = dev.upload(&entries, penalties.len(), 4)?;
        let f = dev.function(Module::Sampling, "apply_penalties")?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&mut logits.data)
            .arg(&entries.data)
            .arg(&n)
            .arg(&params.data)
            .arg(&vocab);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `apply_penalties(float*, const int*, int, const
        // float*, int)`; entries holds 4·n ints whose rows index the
        // params table (checked above) and whose tokens the kernel checks
        // against the vocabulary; logits is rows × vocab.
        unsafe { b.launch(cfg) }.during("launching apply_penalties")?;
    }
    let mut out = dev.uninit::<i32>(rows.len(), 1)?;
    let f = dev.function(Module::Sampling, "sample_rows")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&logits.data)
        .arg(&params.data)
        .arg(&mut out.data)
        .arg(&vocab);
    let cfg = LaunchConfig {
        grid_dim: (check_i32(OP, "rows", rows.len())? as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `sample_rows(const float*, const float*, int*, int)`;
    // logits is rows × vocab, params rows × 8 and out rows (checked above);
    // the kernel needs exactly 1024 threads per block, as launched.
    unsafe { b.launch(cfg) }.during("launching sample_rows")?;
    let tokens = dev.download(&out)?;
    Ok(tokens
        .into_iter()
        .map(|t| {
            u32::try_from(t)
                .ok()
                .filter(|&t| (t as usize) < logits.cols())
        })
        .collect())
}
