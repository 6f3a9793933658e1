//! Perplexity with a fixed, documented protocol, so that numbers from
//! different models and quantizations compare:
//!
//! 1. tokenize the whole text with no special tokens added;
//! 2. cut it into consecutive windows of `ctx` tokens, dropping the
//!    remainder; keep the first `max_windows` if given;
//! 3. in each window, run the model on the window alone (fresh cache) and
//!    predict tokens 1..ctx-1 from their prefix;
//! 4. ppl = exp(mean NLL over all predictions), with the standard error of
//!    the per-window mean NLL across windows.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{LogitsWanted, Model};

#[derive(Debug, Clone, Copy)]
pub struct PplConfig {
    pub ctx: usize,
    pub max_windows: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub ppl: f64,
    pub nll: f64,
    /// Standard error of the mean NLL, from the spread across windows.
    pub nll_stderr: f64,
    /// The same error carried to ppl (delta method: ppl · se(nll)).
    pub ppl_stderr: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
    pub windows: usize,
    pub per_window_nll: Vec<f64>,
}

/// Negative log-likelihood of `target` under one row of logits, in f64.
pub fn nll_of(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    log_z - logits[target as usize] as f64
}

/// Runs the protocol over already-tokenized text. `on_window` is called
/// after each window with (done, total).
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    ids: &[u32],
    config: PplConfig,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PplResult> {
    if config.ctx < 2 {
        return Err(Error::InvalidRequest(format!(
            "--ctx must be at least 2; got {}",
            config.ctx
        )));
    }
    if config.ctx > model.config.max_position_embeddings {
        return Err(Error::PromptTooLong {
            prompt_tokens: config.ctx,
            max_context: model.config.max_position_embeddings,
        });
    }
    if config.max_windows == Some(0) {
        return Err(Error::InvalidRequest(
            "--max-windows must be at least 1".into(),
        ));
    }
    let mut windows = ids.len() / config.ctx;
    if let Some(max) = config.max_windows {
        windows = windows.min(max);
    }
    if windows == 0 {
        return Err(Error::InvalidRequest(format!(
            "the text has {} tokens, fewer than one window of --ctx {}",
            ids.len(),
            config.ctx
        )));
    }
    let vocab = model.config.vocab_size;
    let mut per_window = Vec::with_capacity(windows);
    for w in 0..windows {
        let window = &ids[w * config.ctx..(w + 1) * config.ctx];
        let mut cache = model.new_solo_cache(config.ctx)?;
        let logits = model.forward_solo(&mut cache, window, LogitsWanted::All)?;
        let total: f64 = (0..config.ctx - 1)
            .map(|i| nll_of(&logits[i * vocab..(i + 1) * vocab], window[i + 1]))
            .sum();
        per_window.push(total / (config.ctx - 1) as f64);
        on_window(w + 1, windows);
    }
    let nll = per_window.iter().sum::<f64>() / windows as f64;
    let nll_stderr = if windows > 1 {
        let var = per_window.iter().map(|x| (x - nll).powi(2)).sum::<f64>() / (windows - 1) as f64;
        (var / windows as f64).sqrt()
    } else {
        0.0
    };
    let ppl = nll.exp();
    Ok(PplResult {
        ppl,
        nll,
        nll_stderr,
        ppl_stderr: ppl * nll_stderr,
        tokens: windows * (config.ctx - 1),
        windows,
        per_window_nll: per_window,
    })
}

#[cfg(test)]
mod tests {
    use super::nll_of;

    #[test]
    fn nll_is_minus_log_softmax() {
        // softmax([ln 1, ln 3]) = [0.25, 0.75]
        let l = [0.0f32, (3.0f32).ln()];
        assert!((nll_of(&l, 1) - (-(0.75f64).ln())).abs() < 1e-6);
        assert!((nll_of(&l, 0) - (-(0.25f64).ln())).abs() < 1e-6);
    }
}
