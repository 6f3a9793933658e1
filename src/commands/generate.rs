use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use lmq_turbomind::backend::Backend;
use lmq_turbomind::generate::{generate, GenerateRequest};
use lmq_turbomind::model::Model;
use lmq_turbomind::sampling::SamplingParams;
use lmq_turbomind::tokenizer::{ChatMessage, Tokenizer};

#[derive(Args)]
pub struct GenerateArgs {
    /// Model folder (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string is generated (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Stop when this token id is generated (repeatable).
    #[arg(long = "stop-token-id")]
    stop_token_ids: Vec<u32>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    engine: super::EngineArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let model_dir = args.model.clone();
    let engine = args.engine.clone();
    super::with_model(&model_dir, &engine, Generate(args))
}

struct Generate(GenerateArgs);

impl super::WithModel for Generate {
    type Output = ();
    fn run<B: Backend + 'static>(self, model: Model<B>, tokenizer: Tokenizer) -> Result<()> {
        generate_on(&model, &tokenizer, self.0)
    }
}

fn generate_on<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    args: GenerateArgs,
) -> Result<()> {
    let text = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        tokenizer.apply_chat_template(&messages, true)?
    } else {
        args.prompt.clone()
    };
    // Chat templates write their own special tokens; plain prompts get the
    // ones the tokenizer's post-processor adds (e.g. BOS).
    let prompt_ids = if args.chat {
        tokenizer.encode(&text)?
    } else {
        tokenizer.encode_prompt(&text)?
    };
    let request = GenerateRequest {
        prompt_ids,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
        },
        stop_token_ids: args.stop_token_ids,
        stop_strings: args.stop,
        ignore_eos: args.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let out = generate(model, tokenizer, &request, |piece| {
        // A closed stdout (e.g. piped into `head`) just ends the stream.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let prompt_s = out.prefill_time.as_secs_f64();
    let gen_s = out.decode_time.as_secs_f64();
    // The first generated token comes out of the prefill step; the rest are
    // decode steps.
    let decode_tokens = out.token_ids.len().saturating_sub(1);
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tok/s); generation: {} tokens in {:.3}s ({:.1} tok/s); finish: {}",
        out.prompt_tokens,
        prompt_s,
        out.prompt_tokens as f64 / prompt_s.max(1e-9),
        decode_tokens,
        gen_s,
        decode_tokens as f64 / gen_s.max(1e-9),
        out.finish_reason.as_str()
    );
    Ok(())
}
