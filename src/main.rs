//! `lmq`: the command-line front end. Each subcommand parses its flags and
//! hands off to the library crates; errors print as one `error:` line with
//! the cause chain and exit with status 1.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lmq",
    version,
    about = "Compress large language models and serve them fast"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a GGUF file into a Hugging Face-style model folder (fp16).
    ImportGguf(commands::import::ImportArgs),
    /// Quantize a model to 4-bit weights (AutoAWQ gemm layout).
    Quantize(commands::quantize::QuantizeArgs),
    /// Write a random-weight model of any Llama-like shape (for benchmarks).
    SynthModel(commands::synth::SynthArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(commands::generate::GenerateArgs),
    /// Measure the batching engine's throughput and latency.
    Bench(commands::bench::BenchArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Serve models over an OpenAI-compatible HTTP API.
    Serve(commands::serve::ServeArgs),
    /// Route OpenAI requests by model across several `lmq serve` nodes.
    Proxy(commands::proxy::ProxyArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ImportGguf(args) => commands::import::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::SynthModel(args) => commands::synth::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Eval(cmd) => commands::eval::run(cmd),
        Command::Serve(args) => commands::serve::run(args),
        Command::Proxy(args) => commands::proxy::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message already includes (our errors embed their source's text).
fn describe(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
}
