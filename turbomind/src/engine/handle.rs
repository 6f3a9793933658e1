//! The engine's only surface: [`EngineHandle::submit`] a request, read its
//! [`RequestStream`] of events, drop the stream to cancel it.
//!
//! The handle is cheap to clone and safe to use from any thread or async
//! task; the engine itself runs on its own thread (see `worker`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedReceiver;

use super::request::{EngineEvent, EngineRequest};
use super::scheduler::SeqId;
use crate::tokenizer::Tokenizer;

/// Why a request was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "the prompt has {prompt_tokens} tokens, but the model's context is {max_context} tokens"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        max_context: usize,
    },
    #[error("the engine already holds {limit} requests (--max-queued-requests); retry later")]
    QueueFull { limit: usize },
    #[error("the engine has stopped")]
    Stopped,
}

/// What the engine thread receives.
pub(super) enum Command {
    Submit {
        id: SeqId,
        request: EngineRequest,
        events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
    },
    Cancel(SeqId),
}

/// A snapshot of the engine's state, refreshed after every step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    /// Blocks held by sequences.
    pub kv_blocks_used: usize,
    /// Unreferenced blocks kept for prefix reuse (evictable).
    pub kv_blocks_cached: usize,
    /// The most blocks held by sequences at once since start.
    pub kv_blocks_peak: usize,
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cached_tokens: u64,
    pub generation_tokens: u64,
    pub steps: u64,
    pub preemptions: u64,
}

/// Facts about the served model that callers need before submitting.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub max_context: usize,
    pub block_len: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
    /// See [`crate::model::Model::weight_bytes_per_token`].
    pub weight_bytes_per_token: usize,
    /// KV bytes one position takes (all layers, K and V).
    pub kv_bytes_per_token: usize,
}

pub(super) struct Shared {
    pub stats: Mutex<EngineStats>,
    /// Requests submitted and not yet ended.
    pub outstanding: AtomicUsize,
    pub max_outstanding: usize,
    next_id: AtomicU64,
    /// Cleared when the engine thread exits, however it exits.
    pub alive: AtomicBool,
}

impl Shared {
    pub fn new(max_outstanding: usize) -> Self {
        Shared {
            stats: Mutex::new(EngineStats::default()),
            outstanding: AtomicUsize::new(0),
            max_outstanding,
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
        }
    }

    pub fn request_ended(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A handle on a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) commands: Sender<Command>,
    pub(super) shared: Arc<Shared>,
    pub(super) info: Arc<ModelInfo>,
    pub(super) tokenizer: Arc<Tokenizer>,
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn stats(&self) -> EngineStats {
        match self.shared.stats.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the engine thread is still running (for health checks).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Requests submitted and not yet ended.
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    /// Queues a request; its events arrive on the returned stream.
    pub fn submit(&self, request: EngineRequest) -> Result<RequestStream, SubmitError> {
        self.check(&request)?;
        let previous = self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        if previous >= self.shared.max_outstanding {
            self.shared.request_ended();
            return Err(SubmitError::QueueFull {
                limit: self.shared.max_outstanding,
            });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        if self
            .commands
            .send(Command::Submit {
                id,
                request,
                events,
            })
            .is_err()
        {
            self.shared.request_ended();
            return Err(SubmitError::Stopped);
        }
        Ok(RequestStream {
            id,
            events: rx,
            commands: self.commands.clone(),
        })
    }

    fn check(&self, r: &EngineRequest) -> Result<(), SubmitError> {
        let info = &self.info;
        if r.prompt.is_empty() {
            return Err(SubmitError::InvalidRequest("the prompt is empty".into()));
        }
        if r.prompt.len() >= info.max_context {
            return Err(SubmitError::PromptTooLong {
                prompt_tokens: r.prompt.len(),
                max_context: info.max_context,
            });
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(SubmitError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                info.vocab_size
            )));
        }
        if r.max_tokens == 0 {
            return Err(SubmitError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        let needed = (r.prompt.len() + 1).div_ceil(info.block_len);
        if needed > info.num_blocks {
            return Err(SubmitError::InvalidRequest(format!(
                "the prompt has {} tokens and needs {needed} KV blocks, but the KV cache holds {} blocks of {} tokens; raise --kv-cache-bytes",
                r.prompt.len(),
                info.num_blocks,
                info.block_len
            )));
        }
        r.sampling
            .validate()
            .map_err(|e| SubmitError::InvalidRequest(e.to_string()))
    }
}

/// The events of one request. Dropping it cancels the request, and the
/// engine frees its KV blocks at the next step.
pub struct RequestStream {
    id: SeqId,
    events: UnboundedReceiver<EngineEvent>,
    commands: Sender<Command>,
}

impl RequestStream {
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The next event; `None` once the request has ended and every event
    /// was read.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }

    /// [`Self::next`] for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        self.events.blocking_recv()
    }

    /// An event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<EngineEvent> {
        self.events.try_recv().ok()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // The engine ignores cancels of requests that already ended, and a
        // stopped engine has nothing to cancel.
        let _ = self.commands.send(Command::Cancel(self.id));
    }
}
