//! lmq's engine crate (TurboMind-like): the model runtime.
//!
//! It owns the checkpoint format as the engine reads it (Hugging Face
//! folders: `config.json`, safetensors, tokenizer files), the architecture
//! table, the one decoder implementation, the backend boundary that the
//! decoder is written against, tokenization and chat templates, sampling,
//! generation and the perplexity protocol.
//!
//! Invariants:
//! - There is one decoder ([`model::Model`]); architectures are data
//!   ([`arch::ARCHITECTURES`]).
//! - The decoder touches a device only through [`backend::Backend`].
//! - Every shape read from disk is checked against the config before use;
//!   bad input becomes an [`Error`] that names the file, never a panic.

pub mod arch;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod layer;
pub mod model;
pub mod ppl;
pub mod quant;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
