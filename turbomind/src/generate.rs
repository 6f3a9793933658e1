//! Single-sequence generation: prefill, then decode token by token,
//! streaming text and honouring stop tokens, stop strings and the context
//! limit. The batched engine replaces the loop; the stop logic is shared.

use std::time::{Duration, Instant};

use crate::backend::{use_device_sampling, Backend, SampleRow};
use crate::error::{Error, Result};
use crate::model::{LogitsWanted, Model, Sampled, SeqInput};
use crate::sampling::{sample_penalized, Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (the model's EOS ids are added unless
    /// `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
}

/// The result of a generation, with timings.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Holds back streamed text that might be the start of a stop string, and
/// finds the first stop string in the generated text.
#[derive(Debug)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Appends generated text. Returns the text now safe to emit and whether
    /// a stop string was hit (the text is then cut before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        // A stop string cannot start before `emitted`: any text that might
        // begin one is held back. (This index is also a char boundary.)
        let search_from = self.emitted;
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| p + search_from)
            })
            .min();
        if let Some(end) = hit {
            self.text.truncate(end);
            let out = self.text[self.emitted.min(end)..].to_string();
            self.emitted = end;
            return (out, true);
        }
        let safe = self.text.len() - self.held_back();
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Emits whatever was held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length of the longest suffix of the text that begins a stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && self.text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}

/// Generates text for one request on a model, streaming pieces to `on_text`.
pub fn generate<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    request: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    if request.prompt_ids.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    let max_context = model.config.max_position_embeddings;
    if request.prompt_ids.len() >= max_context {
        return Err(Error::PromptTooLong {
            prompt_tokens: request.prompt_ids.len(),
            max_context,
        });
    }
    let mut stop_ids = request.stop_token_ids.clone();
    if !request.ignore_eos {
        stop_ids.extend(&model.config.eos_token_ids);
    }
    let mut sampler = Sampler::new(request.sampling.clone())?;
    let budget = request
        .max_tokens
        .min(max_context - request.prompt_ids.len());
    let mut cache = model.new_solo_cache(request.prompt_ids.len() + budget)?;
    let mut history = request.prompt_ids.clone();
    let mut stops = StopStrings::new(request.stop_strings.clone());
    let mut decoder = StreamDecoder::new();
    let mut generated = Vec::new();

    let t0 = Instant::now();
    let mut next_input = request.prompt_ids.clone();
    let mut prefill_time = Duration::ZERO;
    let mut finish_reason = FinishReason::Length;
    let mut hit_stop_string = false;
    let on_device = use_device_sampling(model.backend());
    while generated.len() < budget {
        let token = if on_device {
            // The draw's number first, as the host sampler takes it.
            let uniform = sampler.next_uniform();
            let row = SampleRow {
                params: sampler.params(),
                uniform,
                history: &history,
                prompt_len: request.prompt_ids.len(),
                counts: None,
            };
            let mut batch = [SeqInput {
                tokens: &next_input,
                kv: &mut cache.seq,
                logits: LogitsWanted::Last,
            }];
            match model
                .forward_sampled(&mut cache.pool, &mut batch, &[row])?
                .pop()
            {
                Some(Some(Sampled::Token(t))) => t,
                Some(Some(Sampled::Logits(l))) => {
                    sample_penalized(sampler.params(), &l, row.uniform)
                }
                _ => return Err(Error::InvalidRequest("the step returned no token".into())),
            }
        } else {
            let mut logits = model.forward_solo(&mut cache, &next_input, LogitsWanted::Last)?;
            sampler.sample(&mut logits, &history, request.prompt_ids.len())
        };
        if generated.is_empty() {
            prefill_time = t0.elapsed();
        }
        history.push(token);
        if stop_ids.contains(&token) {
            finish_reason = FinishReason::Stop;
            break;
        }
        generated.push(token);
        let piece = decoder.push(tokenizer, token)?;
        let (emit, hit) = stops.push(&piece);
        if !emit.is_empty() {
            on_text(&emit);
        }
        if hit {
            finish_reason = FinishReason::Stop;
            hit_stop_string = true;
            break;
        }
        next_input = vec![token];
    }
    if !hit_stop_string {
        let rest = stops.flush();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    let total = t0.elapsed();
    Ok(GenerateOutput {
        token_ids: generated,
        text: stops.text().to_string(),
        finish_reason,
        prompt_tokens: request.prompt_ids.len(),
        prefill_time,
        decode_time: total.saturating_sub(prefill_time),
    })
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stop_string_split_across_pieces_is_cut_and_never_emitted() {
        let mut s = StopStrings::new(vec!["</end>".into()]);
        let mut out = String::new();
        let mut hit = false;
        for piece in ["Hello", " wor", "ld</", "en", "d> tail"] {
            let (emit, h) = s.push(piece);
            out.push_str(&emit);
            if h {
                hit = true;
                break;
            }
        }
        assert!(hit);
        assert_eq!(out, "Hello world");
        assert_eq!(s.text(), "Hello world");
    }

    #[test]
    fn multibyte_text_with_a_short_stop_string_does_not_panic() {
        let mut s = StopStrings::new(vec!["\n".into(), "。".into()]);
        assert_eq!(s.push("中"), ("中".to_string(), false));
        assert_eq!(s.push("文"), ("文".to_string(), false));
        assert_eq!(s.push("字。后"), ("字".to_string(), true));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_diverges() {
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("abc ST"), ("abc ".to_string(), false));
        assert_eq!(s.push("ART"), ("START".to_string(), false));
        assert_eq!(s.flush(), "");
    }
}
