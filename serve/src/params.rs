//! Request fields and their validation: an OpenAI request body becomes a
//! [`Plan`] (tokenized prompts, choices per prompt, one engine request
//! template) or a 400 that names the offending parameter.
//!
//! Unknown fields are ignored, as OpenAI clients send fields a server may
//! not know; fields whose meaning we cannot honour (`tools`, `logit_bias`,
//! `echo`, …) are refused rather than silently dropped.

use lmq_turbomind::engine::{EngineRequest, ModelInfo};
use lmq_turbomind::sampling::SamplingParams;
use lmq_turbomind::tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Choices per prompt at most (`n`).
pub const MAX_N: u64 = 64;
/// Stop strings per request at most.
pub const MAX_STOP: usize = 16;
/// Alternatives per token at most (`top_logprobs`, completions' `logprobs`).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// `max_tokens` of a completion when the request gives none (OpenAI's).
const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// Fields shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Deserialize)]
pub(crate) struct CommonFields {
    pub model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u64>,
    stop: Option<Value>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    #[allow(dead_code)]
    user: Option<String>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    stop_token_ids: Option<Vec<u32>>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    best_of: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct CompletionFields {
    prompt: Option<Value>,
    logprobs: Option<u64>,
    echo: Option<bool>,
    suffix: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct ChatFields {
    messages: Option<Vec<MessageIn>>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    content: Option<Value>,
}

/// What validation needs to know about the model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_context: usize,
    pub vocab_size: usize,
}

impl From<&ModelInfo> for Limits {
    fn from(info: &ModelInfo) -> Self {
        Limits {
            max_context: info.max_context,
            vocab_size: info.vocab_size,
        }
    }
}

/// A validated request, ready to submit.
pub(crate) struct Plan {
    /// Tokenized prompts; each gets `n` choices, numbered prompt-major.
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    /// Everything but the prompt and seed, which vary per choice.
    pub request: EngineRequest,
    /// The parameter that set `max_tokens`, when the client set it.
    pub max_tokens_param: Option<&'static str>,
    /// Choice `k` samples with `seed + k`.
    pub seed: u64,
    pub stream: bool,
    pub include_usage: bool,
    /// `prompt` or `messages`, for errors about the prompt.
    pub prompt_param: &'static str,
}

impl Plan {
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }
}

fn check(ok: bool, param: &str, rule: &str, value: impl std::fmt::Display) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be {rule}; got {value}"),
        ))
    }
}

/// Sampling, stopping and counts common to both endpoints.
fn common_plan(
    c: &CommonFields,
    default_max_tokens: Option<usize>,
    info: Limits,
) -> Result<Plan, ApiError> {
    let n = c.n.unwrap_or(1);
    check(
        (1..=MAX_N).contains(&n),
        "n",
        &format!("between 1 and {MAX_N}"),
        n,
    )?;
    if let Some(b) = c.best_of {
        check(
            b == n,
            "best_of",
            "equal to `n` (ranking choices is not supported)",
            b,
        )?;
    }
    let (max_tokens_param, max_tokens) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => (Some("max_completion_tokens"), Some(m)),
        (None, Some(m)) => (Some("max_tokens"), Some(m)),
        (None, None) => (None, None),
    };
    if let (Some(param), Some(m)) = (max_tokens_param, max_tokens) {
        check(m >= 1, param, "at least 1", m)?;
    }
    // With no limit given, the engine stops at the end of the context.
    let max_tokens = max_tokens
        .map(|m| m.min(usize::MAX as u64) as usize)
        .or(default_max_tokens)
        .unwrap_or(info.max_context);

    let temperature = c.temperature.unwrap_or(1.0);
    check(
        (0.0..=2.0).contains(&temperature),
        "temperature",
        "between 0 and 2",
        temperature,
    )?;
    let top_p = c.top_p.unwrap_or(1.0);
    check(top_p > 0.0 && top_p <= 1.0, "top_p", "in (0, 1]", top_p)?;
    let min_p = c.min_p.unwrap_or(0.0);
    check((0.0..=1.0).contains(&min_p), "min_p", "in [0, 1]", min_p)?;
    let top_k = c.top_k.unwrap_or(0);
    check(
        top_k >= -1,
        "top_k",
        "-1 or 0 (disabled) or a positive count",
        top_k,
    )?;
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    check(
        repetition_penalty > 0.0 && repetition_penalty.is_finite(),
        "repetition_penalty",
        "greater than 0",
        repetition_penalty,
    )?;
    let presence_penalty = c.presence_penalty.unwrap_or(0.0);
    check(
        (-2.0..=2.0).contains(&presence_penalty),
        "presence_penalty",
        "between -2 and 2",
        presence_penalty,
    )?;
    let frequency_penalty = c.frequency_penalty.unwrap_or(0.0);
    check(
        (-2.0..=2.0).contains(&frequency_penalty),
        "frequency_penalty",
        "between -2 and 2",
        frequency_penalty,
    )?;
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "`logit_bias` is not supported",
        ));
    }
    let stop_strings = stop_list(c.stop.as_ref())?;
    let stop_token_ids = c.stop_token_ids.clone().unwrap_or_default();
    if let Some(&bad) = stop_token_ids
        .iter()
        .find(|&&t| t as usize >= info.vocab_size)
    {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                info.vocab_size
            ),
        ));
    }
    let stream = c.stream.unwrap_or(false);
    let include_usage = c
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let seed = match c.seed {
        // A negative seed is still a seed: keep its bits.
        Some(s) => s as u64,
        None => crate::app::random_u64(),
    };
    Ok(Plan {
        prompts: Vec::new(),
        n: n as usize,
        request: EngineRequest {
            prompt: Vec::new(),
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k: top_k.max(0) as usize,
                top_p,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                seed,
            },
            stop_strings,
            stop_token_ids,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            logprobs: None,
            priority: 0,
        },
        max_tokens_param,
        seed,
        stream,
        include_usage,
        prompt_param: "prompt",
    })
}

/// `stop`: a string or a list of strings.
fn stop_list(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = |msg: &str| Err(ApiError::invalid("stop", msg.to_string()));
    let list = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => list.push(s.clone()),
                    _ => return bad("`stop` must be a string or a list of strings"),
                }
            }
            list
        }
        Some(_) => return bad("`stop` must be a string or a list of strings"),
    };
    if list.len() > MAX_STOP {
        return bad(&format!(
            "`stop` may hold at most {MAX_STOP} strings; got {}",
            list.len()
        ));
    }
    if list.iter().any(String::is_empty) {
        return bad("`stop` strings must not be empty");
    }
    Ok(list)
}

/// `/v1/completions`: the prompt is text, token ids, or a list of either.
pub(crate) fn completion_plan(
    c: &CommonFields,
    f: &CompletionFields,
    tokenizer: &Tokenizer,
    info: Limits,
) -> Result<Plan, ApiError> {
    if f.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if f.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let mut plan = common_plan(c, Some(COMPLETION_DEFAULT_MAX_TOKENS), info)?;
    if let Some(k) = f.logprobs {
        check(
            k <= MAX_TOP_LOGPROBS,
            "logprobs",
            &format!("between 0 and {MAX_TOP_LOGPROBS}"),
            k,
        )?;
        plan.request.logprobs = Some(k as usize);
    }
    let encode = |text: &str| {
        tokenizer
            .encode_prompt(text)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize `prompt`: {e}")))
    };
    let shape = "`prompt` must be a string, a list of strings, a list of token ids, or a list of such lists";
    plan.prompts = match &f.prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required"))
        }
        Some(Value::String(s)) => vec![encode(s)?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must not be an empty list",
            ))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => vec![token_ids(items)?],
        Some(Value::Array(items)) => {
            let mut prompts = Vec::with_capacity(items.len());
            for item in items {
                prompts.push(match item {
                    Value::String(s) => encode(s)?,
                    Value::Array(ids) => token_ids(ids)?,
                    _ => return Err(ApiError::invalid("prompt", shape)),
                });
            }
            prompts
        }
        Some(_) => return Err(ApiError::invalid("prompt", shape)),
    };
    Ok(plan)
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        format!("`prompt` token ids must be integers in 0..2^32; got {v}"),
                    )
                })
        })
        .collect()
}

/// `/v1/chat/completions`: messages rendered with the checkpoint's chat
/// template.
pub(crate) fn chat_plan(
    c: &CommonFields,
    f: &ChatFields,
    model_name: &str,
    tokenizer: &Tokenizer,
    info: Limits,
) -> Result<Plan, ApiError> {
    if f.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "`tools` is not supported"));
    }
    if let Some(format) = &f.response_format {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "only `{\"type\": \"text\"}` is supported",
            ));
        }
    }
    let mut plan = common_plan(c, None, info)?;
    plan.prompt_param = "messages";
    match (f.logprobs.unwrap_or(false), f.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ))
        }
        (true, top) => {
            let k = top.unwrap_or(0);
            check(
                k <= MAX_TOP_LOGPROBS,
                "top_logprobs",
                &format!("between 0 and {MAX_TOP_LOGPROBS}"),
                k,
            )?;
            plan.request.logprobs = Some(k as usize);
        }
        (false, None) => {}
    }
    let messages = match &f.messages {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(m) if m.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must contain at least one message",
            ))
        }
        Some(m) => m,
    };
    let mut chat = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if m.role.is_empty() {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                "a message's `role` must not be empty",
            ));
        }
        chat.push(ChatMessage {
            // Templates know `system`; OpenAI's newer name for it is `developer`.
            role: if m.role == "developer" {
                "system".into()
            } else {
                m.role.clone()
            },
            content: message_text(m.content.as_ref(), i)?,
        });
    }
    if !tokenizer.has_chat_template() {
        return Err(ApiError::invalid(
            "messages",
            format!("model `{model_name}` has no chat template; use /v1/completions"),
        ));
    }
    let text = tokenizer.apply_chat_template(&chat, true).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the chat template rejected `messages`: {e}"),
        )
    })?;
    // The template writes the special tokens itself (BOS included).
    let prompt = tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize `messages`: {e}")))?;
    plan.prompts = vec![prompt];
    Ok(plan)
}

/// A message's `content`: a string, or a list of text parts joined.
fn message_text(content: Option<&Value>, i: usize) -> Result<String, ApiError> {
    let param = || format!("messages[{i}].content");
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some(kind), _) if kind != "text" => {
                        return Err(ApiError::invalid(
                            param(),
                            format!(
                                "content parts of type `{kind}` are not supported; only `text`"
                            ),
                        ))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            param(),
                            "a content part must be `{\"type\": \"text\", \"text\": \"...\"}`",
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(ApiError::invalid(
            param(),
            "`content` must be a string or a list of text parts",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::field_set;
    use serde_json::json;

    fn info() -> Limits {
        Limits {
            max_context: 100,
            vocab_size: 50,
        }
    }

    fn common(body: Value) -> Result<Plan, ApiError> {
        let c: CommonFields = field_set(&body)?;
        common_plan(&c, None, info())
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        for (body, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_completion_tokens": 0, "max_tokens": 5}),
                "max_completion_tokens",
            ),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"stop": [1]}), "stop"),
            (json!({"stop": ""}), "stop"),
            (json!({"stop_token_ids": [50]}), "stop_token_ids"),
            (json!({"logit_bias": {"1": 5}}), "logit_bias"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"seed": "x"}), "seed"),
        ] {
            let e = common(body.clone())
                .err()
                .unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn defaults_follow_openai() {
        let p = common(json!({"stop": "x", "seed": 3, "n": 2})).unwrap();
        assert_eq!(p.request.sampling.temperature, 1.0);
        assert_eq!(p.request.max_tokens, 100);
        assert_eq!(p.request.stop_strings, vec!["x".to_string()]);
        assert_eq!((p.seed, p.n), (3, 2));
        assert!(!p.stream);
    }

    #[test]
    fn message_content_may_be_text_parts() {
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(message_text(Some(&parts), 0).unwrap(), "ab");
        let image = json!([{"type": "image_url", "image_url": {"url": "x"}}]);
        let e = message_text(Some(&image), 2).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[2].content"));
    }
}
