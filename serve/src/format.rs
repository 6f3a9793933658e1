//! OpenAI's response shapes for the two endpoints: whole responses,
//! stream chunks, usage and log-probabilities.

use std::sync::Arc;

use lmq_turbomind::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

use crate::run::{Collected, TokenOut};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Chat,
    Completion,
}

/// Token counts of a whole request.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UsageSum {
    pub prompt: usize,
    pub completion: usize,
    pub cached: usize,
}

impl UsageSum {
    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// Shapes the output of one request.
pub(crate) struct Formatter {
    pub api: Api,
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    logprobs: bool,
}

impl Formatter {
    pub fn new(api: Api, model: &str, tokenizer: Arc<Tokenizer>, logprobs: bool) -> Self {
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        };
        Formatter {
            api,
            id: format!("{prefix}-{:016x}", crate::app::random_u64()),
            created: crate::app::unix_time(),
            model: model.to_string(),
            tokenizer,
            logprobs,
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.api, streaming) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, streaming: bool, choices: Vec<Value>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(streaming)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("choices".into(), Value::Array(choices));
        m
    }

    /// The whole non-streaming response.
    pub fn response(&self, choices: &[Collected], usage: UsageSum) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = self.logprobs_json(&c.tokens, 0);
                match self.api {
                    Api::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs,
                        "finish_reason": c.reason,
                    }),
                    Api::Completion => json!({
                        "index": index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.reason,
                    }),
                }
            })
            .collect();
        let mut m = self.envelope(false, choices);
        m.insert("usage".into(), usage.json());
        Value::Object(m)
    }

    /// A chat stream's first chunk for a choice: the assistant role.
    pub fn role_chunk(&self, index: usize, include_usage: bool) -> Value {
        let choice = json!({
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        });
        self.chunk_envelope(vec![choice], include_usage)
    }

    /// A stream chunk: new text of choice `index` (its text so far ended at
    /// `offset`), and its finish reason on the last one.
    pub fn chunk(
        &self,
        index: usize,
        text: &str,
        tokens: &[TokenOut],
        finish: Option<&str>,
        offset: &mut usize,
        include_usage: bool,
    ) -> Value {
        // A last chunk with no new token carries no log-probabilities.
        let logprobs = if tokens.is_empty() {
            Value::Null
        } else {
            self.logprobs_json(tokens, *offset)
        };
        let choice = match self.api {
            Api::Chat => {
                // The last chunk has an empty delta unless held-back text remains.
                let delta = if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Api::Completion => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        *offset += text.len();
        self.chunk_envelope(vec![choice], include_usage)
    }

    /// The extra last chunk of `stream_options.include_usage`.
    pub fn usage_chunk(&self, usage: UsageSum) -> Value {
        let mut m = self.envelope(true, Vec::new());
        m.insert("usage".into(), usage.json());
        Value::Object(m)
    }

    fn chunk_envelope(&self, choices: Vec<Value>, include_usage: bool) -> Value {
        let mut m = self.envelope(true, choices);
        // With include_usage, OpenAI sends `usage: null` on every chunk but
        // the last.
        if include_usage {
            m.insert("usage".into(), Value::Null);
        }
        Value::Object(m)
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Log-probabilities in the endpoint's shape, or `null` when not asked.
    /// `offset` is where the text of these tokens starts (completions).
    fn logprobs_json(&self, tokens: &[TokenOut], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.api {
            Api::Chat => {
                let entry = |id: u32, logprob: f32| {
                    let token = self.token_text(id);
                    json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.id, t.logprob);
                        let top: Vec<Value> = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                        e["top_logprobs"] = Value::Array(top);
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Api::Completion => {
                let mut texts = Vec::with_capacity(tokens.len());
                let mut offsets = Vec::with_capacity(tokens.len());
                let mut at = offset;
                for t in tokens {
                    let text = self.token_text(t.id);
                    offsets.push(at);
                    at += text.len();
                    texts.push(text);
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let m: Map<String, Value> = t
                            .top
                            .iter()
                            .map(|&(id, lp)| (self.token_text(id), json!(lp)))
                            .collect();
                        Value::Object(m)
                    })
                    .collect();
                let logprobs: Vec<f32> = tokens.iter().map(|t| t.logprob).collect();
                json!({
                    "tokens": texts,
                    "token_logprobs": logprobs,
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }
}
