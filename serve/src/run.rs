//! Running a [`Plan`] on an engine: one engine request per choice, their
//! events merged into one stream of [`Piece`]s, which a response either
//! collects or streams.
//!
//! Cancellation is ownership: each [`ChoiceRun`] owns its
//! `RequestStream`, so when the client goes away and the response (or the
//! handler future) is dropped, every engine request of it is cancelled and
//! its KV blocks are freed at the engine's next step.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use lmq_turbomind::engine::{EngineEvent, RequestStream, Usage};

use crate::app::App;
use crate::error::ApiError;
use crate::metrics::Outcome;
use crate::params::Plan;

/// One generated token and, when asked for, its log-probabilities.
#[derive(Debug, Clone)]
pub(crate) struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a choice yields, in order: deltas, then one `Finish` or `Error`.
pub(crate) enum Piece {
    Delta {
        index: usize,
        text: String,
        tokens: Vec<TokenOut>,
    },
    Finish {
        index: usize,
        /// Text the engine held back until the end.
        text: String,
        tokens: Vec<TokenOut>,
        reason: &'static str,
        usage: Usage,
    },
    Error {
        index: usize,
        message: String,
    },
}

/// One choice in flight. Dropping it before the end cancels the engine
/// request and counts the choice as cancelled.
pub(crate) struct ChoiceRun {
    index: usize,
    stream: RequestStream,
    app: Arc<App>,
    model: usize,
    received: Instant,
    /// Log-probabilities of tokens whose text is still held back.
    pending: Vec<TokenOut>,
    done: bool,
}

impl Drop for ChoiceRun {
    fn drop(&mut self) {
        if !self.done {
            self.app.models[self.model]
                .metrics
                .count(Outcome::Cancelled);
        }
    }
}

impl ChoiceRun {
    /// The next piece of this choice; `None` after its end.
    async fn next_piece(&mut self) -> Option<Piece> {
        if self.done {
            return None;
        }
        loop {
            let event = self.stream.next().await;
            let index = self.index;
            match event {
                Some(EngineEvent::Token { id, text, logprobs }) => {
                    if let Some(lp) = logprobs {
                        self.pending.push(TokenOut {
                            id,
                            logprob: lp.logprob,
                            top: lp.top,
                        });
                    }
                    // Text may be empty (a partial character, or text that may
                    // begin a stop string); its token waits for the next delta.
                    if !text.is_empty() {
                        let tokens = std::mem::take(&mut self.pending);
                        return Some(Piece::Delta {
                            index,
                            text,
                            tokens,
                        });
                    }
                }
                Some(EngineEvent::Finished {
                    reason,
                    text,
                    usage,
                    time_to_first_token,
                    decode_time,
                }) => {
                    self.done = true;
                    let metrics = &self.app.models[self.model].metrics;
                    metrics.ttft.observe(time_to_first_token);
                    if usage.completion_tokens > 1 {
                        metrics
                            .tpot
                            .observe(decode_time / (usage.completion_tokens as u32 - 1));
                    }
                    metrics.e2e.observe(self.received.elapsed());
                    metrics.count(match reason.as_str() {
                        "stop" => Outcome::Stop,
                        _ => Outcome::Length,
                    });
                    let tokens = std::mem::take(&mut self.pending);
                    return Some(Piece::Finish {
                        index,
                        text,
                        tokens,
                        reason: reason.as_str(),
                        usage,
                    });
                }
                Some(EngineEvent::Failed(message)) => {
                    self.done = true;
                    self.app.models[self.model].metrics.count(Outcome::Failed);
                    return Some(Piece::Error { index, message });
                }
                None => {
                    self.done = true;
                    self.app.models[self.model].metrics.count(Outcome::Failed);
                    return Some(Piece::Error {
                        index,
                        message: "the engine ended the request without finishing it".into(),
                    });
                }
            }
        }
    }
}

/// Submits every choice of `plan` to model `model`. If one is refused, the
/// ones already submitted are cancelled (dropped) and the refusal returned.
pub(crate) fn submit(
    app: &Arc<App>,
    model: usize,
    plan: &Plan,
    received: Instant,
) -> Result<Vec<ChoiceRun>, ApiError> {
    let engine = &app.models[model].engine;
    let max_context = engine.info().max_context;
    let mut runs = Vec::with_capacity(plan.choices());
    for (p, prompt) in plan.prompts.iter().enumerate() {
        if let Some(param) = plan.max_tokens_param {
            if prompt.len() < max_context && prompt.len() + plan.request.max_tokens > max_context {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "This model's context is {max_context} tokens; the prompt has {} tokens and `{param}` asks for {} more ({} in all)",
                        prompt.len(),
                        plan.request.max_tokens,
                        prompt.len() + plan.request.max_tokens
                    ),
                ));
            }
        }
        for i in 0..plan.n {
            let index = p * plan.n + i;
            let mut request = plan.request.clone();
            request.prompt = prompt.clone();
            request.sampling.seed = plan.seed.wrapping_add(index as u64);
            let stream = engine
                .submit(request)
                .map_err(|e| ApiError::from_submit(e, plan.prompt_param))?;
            runs.push(ChoiceRun {
                index,
                stream,
                app: app.clone(),
                model,
                received,
                pending: Vec::new(),
                done: false,
            });
        }
    }
    Ok(runs)
}

pub(crate) type PieceStream = Pin<Box<dyn Stream<Item = Piece> + Send>>;

/// The pieces of all choices, in the order they are produced.
pub(crate) fn merge(runs: Vec<ChoiceRun>) -> SelectAll<PieceStream> {
    stream::select_all(runs.into_iter().map(|run| {
        let s: PieceStream = Box::pin(stream::unfold(run, |mut run| async move {
            let piece = run.next_piece().await?;
            Some((piece, run))
        }));
        s
    }))
}

/// A finished choice, for a non-streaming response.
#[derive(Default)]
pub(crate) struct Collected {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub reason: &'static str,
    pub usage: Usage,
}

/// Reads every choice to its end. A failed choice fails the request.
pub(crate) async fn collect(runs: Vec<ChoiceRun>) -> Result<Vec<Collected>, ApiError> {
    let mut out: Vec<Collected> = (0..runs.len()).map(|_| Collected::default()).collect();
    let mut pieces = merge(runs);
    while let Some(piece) = pieces.next().await {
        match piece {
            Piece::Delta {
                index,
                text,
                tokens,
            } => {
                out[index].text.push_str(&text);
                out[index].tokens.extend(tokens);
            }
            Piece::Finish {
                index,
                text,
                tokens,
                reason,
                usage,
            } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                c.tokens.extend(tokens);
                c.reason = reason;
                c.usage = usage;
            }
            Piece::Error { message, .. } => return Err(ApiError::server(message)),
        }
    }
    Ok(out)
}
