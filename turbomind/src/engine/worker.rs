//! The engine thread: owns the model, the KV pool and the scheduler, and
//! runs the step loop. Each step it takes new commands, drops requests
//! whose stream was closed (freeing their blocks), runs the scheduler's
//! plan as one batched forward pass, samples, and sends events.

use std::collections::HashMap;

use rayon::prelude::*;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::block_manager::BlockManager;
use super::config::EngineConfig;
use super::handle::{Command, EngineHandle, EngineStats, ModelInfo, Shared};
use super::request::{token_logprobs, EngineEvent, EngineRequest, FinishReason, Usage};
use super::scheduler::{NewSequence, Scheduler, SchedulerConfig, SeqId, StepPlan, StepResult};
use crate::backend::{use_device_sampling, Backend, SampleRow};
use crate::error::{Error, Result};
use crate::generate::StopStrings;
use crate::model::{LogitsWanted, Model, Sampled, SeqInput, SeqKv};
use crate::sampling::{
    apply_penalties, apply_penalties_counted, sample_penalized, wants_penalties, PenaltyCounts,
    Sampler, SamplingParams,
};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Starts an engine thread for `model` and returns its handle. The pool is
/// sized and allocated here, so configuration errors surface at once.
pub fn spawn_engine<B: Backend + 'static>(
    model: Model<B>,
    tokenizer: Arc<Tokenizer>,
    config: &EngineConfig,
) -> Result<EngineHandle> {
    config.validate()?;
    let bytes_per_block = model.kv_bytes_per_block(config.block_len);
    let num_blocks = config.num_blocks(bytes_per_block, model.backend().free_memory())?;
    let pool = model.new_kv_pool(num_blocks, config.block_len)?;
    let scheduler = Scheduler::new(
        SchedulerConfig {
            max_batch_size: config.max_batch_size,
            max_prefill_tokens: config.max_prefill_tokens,
        },
        BlockManager::new(num_blocks, config.block_len, config.prefix_caching),
    );
    let info = Arc::new(ModelInfo {
        max_context: model.config.max_position_embeddings,
        block_len: config.block_len,
        num_blocks,
        vocab_size: model.config.vocab_size,
        weight_bytes_per_token: model.weight_bytes_per_token(),
        kv_bytes_per_token: bytes_per_block / config.block_len,
    });
    let shared = Arc::new(Shared::new(config.max_queued_requests));
    let (commands, inbox) = std::sync::mpsc::channel();
    let device_sampling = use_device_sampling(model.backend());
    let worker = Worker {
        device_sampling,
        model,
        tokenizer: tokenizer.clone(),
        pool,
        scheduler,
        requests: HashMap::new(),
        inbox,
        shared: shared.clone(),
        stats: EngineStats {
            kv_blocks_total: num_blocks,
            ..Default::default()
        },
    };
    std::thread::Builder::new()
        .name("lmq-engine".into())
        .spawn(move || worker.run())
        .map_err(|e| Error::InvalidRequest(format!("cannot start the engine thread: {e}")))?;
    Ok(EngineHandle {
        commands,
        shared,
        info,
        tokenizer,
    })
}

/// A request the engine is working on.
struct Active {
    events: UnboundedSender<EngineEvent>,
    sampler: Sampler,
    prompt_len: usize,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    stops: StopStrings,
    decoder: StreamDecoder,
    logprobs: Option<usize>,
    generated: usize,
    cached_tokens: Option<usize>,
    submitted: Instant,
    first_token: Option<Instant>,
    /// The penalties' token counts, kept as tokens are accepted, where the
    /// request's parameters apply penalties.
    counts: Option<PenaltyCounts>,
}

/// One row's host-side token choice (see `Worker::choose_tokens`).
struct HostJob {
    pick: Pick,
    seq: SeqId,
    params: SamplingParams,
    prompt_len: usize,
    keep_raw: bool,
    /// The draw's uniform number for `Pick::Raw` (`Pick::Penalized`
    /// carries its own).
    uniform: f32,
}

/// How a sequence's next token arrives from a step.
enum Pick {
    /// Picked on the device.
    Token(u32),
    /// Left to the host by the device: penalized logits and the draw's
    /// uniform number.
    Penalized(Vec<f32>, f32),
    /// Raw logits: the host sampler does everything.
    Raw(Vec<f32>),
}

struct Worker<B: Backend> {
    model: Model<B>,
    /// Whether steps pick tokens on the device (the backend can, and
    /// `LMQ_DEVICE_SAMPLING` is not 0).
    device_sampling: bool,
    tokenizer: Arc<Tokenizer>,
    pool: B::KvPool,
    scheduler: Scheduler,
    requests: HashMap<SeqId, Active>,
    inbox: Receiver<Command>,
    shared: Arc<Shared>,
    stats: EngineStats,
}

/// Marks the engine dead when the thread ends, by return or by panic.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0
            .alive
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl<B: Backend> Worker<B> {
    fn run(mut self) {
        let _alive = AliveGuard(self.shared.clone());
        loop {
            if self.requests.is_empty() {
                // Idle: wait for work; every handle gone means shut down.
                match self.inbox.recv() {
                    Ok(cmd) => self.apply(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match self.inbox.try_recv() {
                    Ok(cmd) => self.apply(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.requests.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            let closed: Vec<SeqId> = self
                .requests
                .iter()
                .filter(|(_, a)| a.events.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in closed {
                self.cancel(id);
            }
            if !self.requests.is_empty() {
                self.step();
            }
            self.publish_stats();
        }
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                id,
                request,
                events,
            } => self.admit(id, request, events),
            Command::Cancel(id) => self.cancel(id),
        }
    }

    fn admit(&mut self, id: SeqId, r: EngineRequest, events: UnboundedSender<EngineEvent>) {
        let sampler = match Sampler::new(r.sampling) {
            Ok(s) => s,
            Err(e) => {
                let _ = events.send(EngineEvent::Failed(e.to_string()));
                self.shared.request_ended();
                return;
            }
        };
        let max_context = self.model.config.max_position_embeddings;
        let counts = wants_penalties(sampler.params()).then(|| PenaltyCounts::new(&r.prompt));
        let mut stop_ids = r.stop_token_ids;
        if !r.ignore_eos {
            stop_ids.extend(&self.model.config.eos_token_ids);
        }
        let active = Active {
            events,
            sampler,
            prompt_len: r.prompt.len(),
            max_tokens: r.max_tokens.min(max_context.saturating_sub(r.prompt.len())),
            stop_ids,
            stops: StopStrings::new(r.stop_strings),
            decoder: StreamDecoder::new(),
            logprobs: r.logprobs,
            generated: 0,
            cached_tokens: None,
            submitted: Instant::now(),
            first_token: None,
            counts,
        };
        self.stats.prompt_tokens += r.prompt.len() as u64;
        if let Err(e) = self.scheduler.add(NewSequence {
            id,
            prompt: r.prompt,
            priority: r.priority,
        }) {
            let _ = active.events.send(EngineEvent::Failed(e.to_string()));
            self.shared.request_ended();
            return;
        }
        self.requests.insert(id, active);
    }

    /// Ends a request without events (its reader is gone or asked so).
    fn cancel(&mut self, id: SeqId) {
        if self.requests.remove(&id).is_some() {
            // The scheduler may have retired it already in this step.
            let _ = self.scheduler.cancel(id);
            self.shared.request_ended();
        }
    }

    /// Ends a request with a final event; the scheduler retires it.
    fn finish(&mut self, id: SeqId, reason: FinishReason, hit_stop_string: bool) {
        let Some(mut a) = self.requests.remove(&id) else {
            return;
        };
        let text = if hit_stop_string {
            String::new()
        } else {
            a.stops.flush()
        };
        let now = Instant::now();
        let first = a.first_token.unwrap_or(now);
        // A client that sees its request end must also see its tokens
        // counted in the metrics, so the counters go out first.
        self.publish_stats();
        let _ = a.events.send(EngineEvent::Finished {
            reason,
            text,
            usage: Usage {
                prompt_tokens: a.prompt_len,
                completion_tokens: a.generated,
                cached_tokens: a.cached_tokens.unwrap_or(0),
            },
            time_to_first_token: first - a.submitted,
            decode_time: now - first,
        });
        self.shared.request_ended();
    }

    fn fail_all(&mut self, ids: &[SeqId], message: &str) {
        for &id in ids {
            if let Some(a) = self.requests.remove(&id) {
                let _ = a.events.send(EngineEvent::Failed(message.to_string()));
                let _ = self.scheduler.cancel(id);
                self.shared.request_ended();
            }
        }
    }

    fn step(&mut self) {
        let plan = match self.scheduler.schedule() {
            Ok(p) => p,
            Err(e) => {
                let ids: Vec<SeqId> = self.requests.keys().copied().collect();
                self.fail_all(&ids, &format!("scheduler error: {e}"));
                return;
            }
        };
        self.stats.steps += 1;
        self.stats.preemptions += plan.preempted.len() as u64;
        for &id in &plan.aborted {
            self.finish(id, FinishReason::Length, false);
        }
        if plan.chunks.is_empty() {
            return;
        }
        let results = match self.run_plan(&plan) {
            Ok(r) => r,
            Err(e) => {
                let ids: Vec<SeqId> = plan.chunks.iter().map(|c| c.seq).collect();
                self.fail_all(&ids, &e.to_string());
                return;
            }
        };
        if let Err(e) = self.scheduler.complete(&results) {
            let ids: Vec<SeqId> = self.requests.keys().copied().collect();
            self.fail_all(&ids, &format!("scheduler error: {e}"));
        }
    }

    /// Runs a plan's chunks as one forward pass and samples where logits
    /// came back.
    fn run_plan(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        let mut inputs: Vec<(Vec<u32>, SeqKv, bool)> = Vec::with_capacity(plan.chunks.len());
        for c in &plan.chunks {
            let missing = || Error::InvalidRequest(format!("sequence {} vanished", c.seq));
            let tokens = self.scheduler.tokens(c.seq).ok_or_else(missing)?;
            let blocks = self.scheduler.block_table(c.seq).ok_or_else(missing)?;
            inputs.push((
                tokens[c.positions.clone()].to_vec(),
                SeqKv {
                    blocks: blocks.to_vec(),
                    len: c.positions.start,
                },
                c.wants_logits,
            ));
            if let Some(a) = self.requests.get_mut(&c.seq) {
                // The first chunk of a request starts after its reused prefix.
                if a.cached_tokens.is_none() {
                    a.cached_tokens = Some(c.positions.start);
                    self.stats.prefix_cached_tokens += c.positions.start as u64;
                }
            }
        }
        let mut batch: Vec<SeqInput<'_>> = inputs
            .iter_mut()
            .map(|(tokens, kv, wants)| SeqInput {
                tokens,
                kv,
                logits: if *wants {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            })
            .collect();
        // Tokens are picked on the device where the backend can, unless a
        // request wants log-probabilities (of the raw logits, on the host).
        let on_device = self.device_sampling
            && plan.chunks.iter().all(|c| {
                !c.wants_logits
                    || self
                        .requests
                        .get(&c.seq)
                        .is_none_or(|a| a.logprobs.is_none())
            });
        let mut picks: Vec<Option<Pick>> = if on_device {
            // Each sampled row draws its uniform number now, as the host
            // sampler would at this token.
            let mut uniforms = Vec::new();
            for c in plan.chunks.iter().filter(|c| c.wants_logits) {
                let u = self
                    .requests
                    .get_mut(&c.seq)
                    .map(|a| a.sampler.next_uniform());
                uniforms.push(u.unwrap_or(0.0));
            }
            let greedy = SamplingParams::default();
            let rows: Vec<SampleRow<'_>> = plan
                .chunks
                .iter()
                .filter(|c| c.wants_logits)
                .zip(&uniforms)
                .map(|(c, &uniform)| {
                    let a = self.requests.get(&c.seq);
                    let history = self.scheduler.tokens(c.seq).unwrap_or(&[]);
                    SampleRow {
                        params: a.map_or(&greedy, |a| a.sampler.params()),
                        uniform,
                        history,
                        prompt_len: a.map_or(0, |a| a.prompt_len),
                        counts: a
                            .and_then(|a| a.counts.as_ref())
                            .and_then(|k| k.for_history(history.len())),
                    }
                })
                .collect();
            let sampled = self
                .model
                .forward_sampled(&mut self.pool, &mut batch, &rows)?;
            let mut uniform = uniforms.into_iter();
            sampled
                .into_iter()
                .map(|s| {
                    let s = s?;
                    let u = uniform.next().unwrap_or(0.0);
                    Some(match s {
                        Sampled::Token(t) => Pick::Token(t),
                        Sampled::Logits(l) => Pick::Penalized(l, u),
                    })
                })
                .collect()
        } else {
            self.model
                .forward(&mut self.pool, &mut batch)?
                .into_iter()
                .map(|l| Some(Pick::Raw(l)))
                .collect()
        };
        let chosen = self.choose_tokens(plan, &mut picks);
        let mut results = Vec::with_capacity(plan.chunks.len());
        for (c, choice) in plan.chunks.iter().zip(chosen) {
            let Some((token, raw)) = choice else {
                results.push(StepResult {
                    seq: c.seq,
                    token: None,
                    finished: false,
                });
                continue;
            };
            let (token, finished) = self.accept(c.seq, token, raw)?;
            results.push(StepResult {
                seq: c.seq,
                token: Some(token),
                finished,
            });
        }
        Ok(results)
    }

    /// Each chunk's next token (with its raw logits where the request wants
    /// logprobs), `None` for chunks that want none. Uniform numbers are
    /// drawn here in chunk order, as one row at a time would draw them;
    /// the host sampling itself (penalties, selections over the
    /// vocabulary) then runs on rayon's threads, one row each.
    fn choose_tokens(
        &mut self,
        plan: &StepPlan,
        picks: &mut [Option<Pick>],
    ) -> Vec<Option<(u32, Option<Vec<f32>>)>> {
        let greedy = SamplingParams::default();
        let mut jobs = Vec::with_capacity(picks.len());
        for (c, pick) in plan.chunks.iter().zip(picks.iter_mut()) {
            let job = match pick.take() {
                Some(p) if c.wants_logits => {
                    // Raw logits draw now; device picks drew before the step.
                    let uniform = match (&p, self.requests.get_mut(&c.seq)) {
                        (Pick::Raw(_), Some(a)) => a.sampler.next_uniform(),
                        _ => 0.0,
                    };
                    let a = self.requests.get(&c.seq);
                    Some(HostJob {
                        pick: p,
                        seq: c.seq,
                        params: a.map_or(greedy.clone(), |a| a.sampler.params().clone()),
                        prompt_len: a.map_or(0, |a| a.prompt_len),
                        keep_raw: a.is_some_and(|a| a.logprobs.is_some()),
                        uniform,
                    })
                }
                _ => None,
            };
            jobs.push(job);
        }
        let scheduler = &self.scheduler;
        let requests = &self.requests;
        jobs.into_par_iter()
            .map(|job| {
                let job = job?;
                Some(match job.pick {
                    Pick::Token(t) => (t, None),
                    Pick::Penalized(logits, u) => (sample_penalized(&job.params, &logits, u), None),
                    Pick::Raw(mut logits) => {
                        let raw = job.keep_raw.then(|| logits.clone());
                        let history = scheduler.tokens(job.seq).unwrap_or(&[]);
                        let kept = requests
                            .get(&job.seq)
                            .and_then(|a| a.counts.as_ref())
                            .and_then(|k| k.for_history(history.len()));
                        match kept {
                            Some(counts) => {
                                apply_penalties_counted(&job.params, &mut logits, counts)
                            }
                            None => {
                                apply_penalties(&job.params, &mut logits, history, job.prompt_len)
                            }
                        }
                        let token = sample_penalized(&job.params, &logits, job.uniform);
                        (token, raw)
                    }
                })
            })
            .collect()
    }

    /// Takes one sequence's next token (`raw`: its logits before
    /// penalties, where it wants logprobs), sends its event, and says
    /// whether the request ended.
    fn accept(&mut self, id: SeqId, token: u32, raw: Option<Vec<f32>>) -> Result<(u32, bool)> {
        let Some(a) = self.requests.get_mut(&id) else {
            // Cancelled meanwhile: the scheduler retires it.
            return Ok((0, true));
        };
        a.generated += 1;
        // The scheduler appends every token this returns to the sequence's
        // history; the counts follow it.
        if let Some(c) = a.counts.as_mut() {
            c.push_generated(token);
        }
        self.stats.generation_tokens += 1;
        a.first_token.get_or_insert_with(Instant::now);
        if a.stop_ids.contains(&token) {
            self.finish(id, FinishReason::Stop, false);
            return Ok((token, true));
        }
        let piece = a.decoder.push(&self.tokenizer, token)?;
        let (text, hit) = a.stops.push(&piece);
        let logprobs = raw
            .as_deref()
            .zip(a.logprobs)
            .map(|(l, n)| token_logprobs(l, token, n));
        let _ = a.events.send(EngineEvent::Token {
            id: token,
            text,
            logprobs,
        });
        if hit {
            self.finish(id, FinishReason::Stop, true);
            return Ok((token, true));
        }
        if a.generated >= a.max_tokens {
            self.finish(id, FinishReason::Length, false);
            return Ok((token, true));
        }
        Ok((token, false))
    }

    fn publish_stats(&mut self) {
        let blocks = self.scheduler.blocks();
        self.stats.running = self.scheduler.num_running();
        self.stats.waiting = self.scheduler.num_waiting();
        self.stats.kv_blocks_used = blocks.num_active();
        self.stats.kv_blocks_cached = blocks.num_cached();
        self.stats.kv_blocks_peak = self.stats.kv_blocks_peak.max(self.stats.kv_blocks_used);
        let snapshot = self.stats.clone();
        match self.shared.stats.lock() {
            Ok(mut s) => *s = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }
}
