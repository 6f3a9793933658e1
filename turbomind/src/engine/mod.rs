//! The batching engine. The scheduler and the block manager are pure
//! logic: they never touch a device, so they are tested without a model.
//! The worker runs them with a model on the engine's own thread; callers
//! see only the [`EngineHandle`]: submit a request, read its stream of
//! events, drop the stream to cancel.

pub mod block_manager;
pub mod config;
pub mod handle;
pub mod request;
pub mod scheduler;
mod worker;

pub use config::{EngineConfig, KvCacheSize};
pub use handle::{EngineHandle, EngineStats, ModelInfo, RequestStream, SubmitError};
pub use request::{EngineEvent, EngineRequest, TokenLogprobs, Usage};
pub use worker::spawn_engine;
