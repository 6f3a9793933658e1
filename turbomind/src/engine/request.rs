//! What goes into the engine (a request) and what comes out of it (a
//! stream of events), independent of HTTP.

use std::time::Duration;

pub use crate::generate::FinishReason;
use crate::sampling::SamplingParams;

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (also capped by the model's context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends generation; it is not part of the output.
    pub stop_strings: Vec<String>,
    /// Token ids that end generation, besides the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Return the log-probability of each generated token and of this many
    /// most likely alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Higher runs first; equal priorities run in arrival order.
    pub priority: i32,
}

impl EngineRequest {
    /// A greedy request for `max_tokens` tokens with default settings.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        EngineRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            priority: 0,
        }
    }
}

/// The log-probability of a sampled token and its top alternatives, from
/// the model's raw distribution (before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache.
    pub cached_tokens: usize,
}

/// What a request's stream yields, in order: tokens, then exactly one
/// `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Token {
        id: u32,
        /// Text this token completes (may be empty: a partial character,
        /// or text held back because it may begin a stop string).
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        reason: FinishReason,
        /// Text held back until the end (no stop string came).
        text: String,
        usage: Usage,
        /// From submission to the first token, and from then to the end.
        time_to_first_token: Duration,
        decode_time: Duration,
    },
    /// The request could not run (the message says why).
    Failed(String),
}

/// The log-softmax of `logits` at `chosen`, plus the `top_n` best.
pub fn token_logprobs(logits: &[f32], chosen: u32, top_n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    let logprob = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - log_sum);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n);
    if top_n > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let n = top_n.min(order.len());
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if n < order.len() {
            order.select_nth_unstable_by(n, by_logit);
        }
        order.truncate(n);
        order.sort_by(by_logit);
        top = order
            .into_iter()
            .map(|t| (t, logits[t as usize] - log_sum))
            .collect();
    }
    TokenLogprobs { logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax() {
        // Probabilities 1/8, 2/8, 5/8 from their logs (shifted by 3).
        let logits = [3.0 + 0.125f32.ln(), 3.0 + 0.25f32.ln(), 3.0 + 0.625f32.ln()];
        let lp = token_logprobs(&logits, 1, 2);
        assert!((lp.logprob - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, 2);
        assert!((lp.top[0].1 - 0.625f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top[1].0, 1);
        let total: f32 = (0..3)
            .map(|t| token_logprobs(&logits, t, 0).logprob.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
