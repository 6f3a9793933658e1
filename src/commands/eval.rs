use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lmq_turbomind::backend::Backend;
use lmq_turbomind::model::Model;
use lmq_turbomind::ppl::{perplexity, PplConfig};
use lmq_turbomind::tokenizer::Tokenizer;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity on a text file (protocol in docs/QUALITY.md).
    Ppl(PplArgs),
}

#[derive(Args)]
pub struct PplArgs {
    #[arg(long)]
    model: PathBuf,
    /// Plain text file to evaluate on.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Print one JSON line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: super::EngineArgs,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(args) => ppl(args),
    }
}

fn ppl(args: PplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the text file is empty", args.text.display());
    }
    let model_dir = args.model.clone();
    let engine = args.engine.clone();
    super::with_model(&model_dir, &engine, Ppl { args, text })
}

struct Ppl {
    args: PplArgs,
    text: String,
}

impl super::WithModel for Ppl {
    type Output = ();
    fn run<B: Backend + 'static>(self, model: Model<B>, tokenizer: Tokenizer) -> Result<()> {
        let Ppl { args, text } = self;
        ppl_on(&model, &tokenizer, &args, &text)
    }
}

fn ppl_on<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    args: &PplArgs,
    text: &str,
) -> Result<()> {
    let ids = tokenizer.encode(text)?;
    let t0 = std::time::Instant::now();
    let result = perplexity(
        model,
        &ids,
        PplConfig {
            ctx: args.ctx,
            max_windows: args.max_windows,
        },
        |done, total| {
            if !args.json {
                eprint!("\rwindow {done}/{total}");
            }
        },
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ppl": result.ppl,
                "nll": result.nll,
                "nll_stderr": result.nll_stderr,
                "ppl_stderr": result.ppl_stderr,
                "tokens": result.tokens,
                "windows": result.windows,
                "ctx": args.ctx,
                "kv_cache_dtype": model.kv_cache_config().dtype.as_str(),
                "kv_cache_mode": model.kv_cache_config().mode.as_str(),
                "device": model.backend().name(),
            })
        );
    } else {
        eprintln!();
        println!(
            "ppl {:.4} ± {:.4} (nll {:.5} ± {:.5}) over {} windows of {} tokens ({} predictions) in {:.1}s",
            result.ppl,
            result.ppl_stderr,
            result.nll,
            result.nll_stderr,
            result.windows,
            args.ctx,
            result.tokens,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
