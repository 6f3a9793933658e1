//! The persistent-batching scheduler: pure logic over token counts and
//! block tables, never a device.
//!
//! Each sequence holds its tokens (prompt, then generated) and how many of
//! them already have K/V in the cache (`computed`). Every step the
//! scheduler gives each running sequence a chunk of its uncomputed tokens:
//! one token for a decoding sequence, up to the remaining prefill budget for
//! a prefilling one. In order, a step:
//! 1. secures a block for every running sequence's next token, oldest
//!    first, preempting the newest sequences (freeing their blocks, to be
//!    recomputed later) when the pool runs out;
//! 2. continues running prefills within `max_prefill_tokens`;
//! 3. admits waiting sequences (priority, then arrival) while the batch size
//!    and blocks allow, reusing cached prefix blocks;
//!
//! and the engine reports back the sampled tokens and which sequences
//! finished, which are retired at once.

use std::collections::HashMap;
use std::ops::Range;

use super::block_manager::{BlockError, BlockId, BlockManager};

/// A caller-chosen request id.
pub type SeqId = u64;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    /// Prompt tokens computed per step, across sequences (decodes count
    /// one each).
    pub max_prefill_tokens: usize,
}

/// A request entering the scheduler.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    /// Higher runs first; equal priorities run in arrival order.
    pub priority: i32,
}

#[derive(Debug)]
struct Sequence {
    id: SeqId,
    priority: i32,
    arrival: u64,
    tokens: Vec<u32>,
    computed: usize,
    blocks: Vec<BlockId>,
    /// Prefix hashes of the full blocks registered so far.
    hashes: Vec<u64>,
}

/// One sequence's work in a step: compute K/V for `tokens` positions;
/// logits are needed when the chunk reaches the end of the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub seq: SeqId,
    pub positions: Range<usize>,
    pub wants_logits: bool,
}

/// What the engine runs this step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<Chunk>,
    /// Sequences that lost their blocks this step and went back to waiting.
    pub preempted: Vec<SeqId>,
    /// Sequences removed because they outgrew the whole pool: they can
    /// never run again (the engine ends them with finish reason "length").
    pub aborted: Vec<SeqId>,
}

/// Outcome of a step for one sequence, reported by the engine.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub seq: SeqId,
    /// The sampled token, if the chunk produced logits.
    pub token: Option<u32>,
    /// The request ended (stop, length, or cancellation).
    pub finished: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("sequence {0} is unknown")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists")]
    Duplicate(SeqId),
    #[error("sequence {0} has an empty prompt")]
    EmptyPrompt(SeqId),
    #[error("sequence {0}: a chunk that asked for logits was reported without a token")]
    MissingToken(SeqId),
    #[error("a sequence of {tokens} tokens needs {needed} KV blocks, but the pool has {total}")]
    TooLong {
        tokens: usize,
        needed: usize,
        total: usize,
    },
    #[error(transparent)]
    Blocks(#[from] BlockError),
}

/// The scheduler state.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: Vec<Sequence>,
    running: Vec<Sequence>,
    arrivals: u64,
    /// Chunks handed out and not yet reported, by sequence.
    in_flight: HashMap<SeqId, Range<usize>>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            config,
            blocks,
            waiting: Vec::new(),
            running: Vec::new(),
            arrivals: 0,
            in_flight: HashMap::new(),
        }
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The block table of a running sequence.
    pub fn block_table(&self, id: SeqId) -> Option<&[BlockId]> {
        self.running
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.blocks.as_slice())
    }

    /// The tokens (prompt, then generated) of a running sequence.
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.running
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.tokens.as_slice())
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.blocks.block_size())
    }

    /// Queues a request. A prompt that could never fit the pool is refused
    /// now rather than waiting forever.
    pub fn add(&mut self, new: NewSequence) -> Result<(), ScheduleError> {
        if self.find(new.id).is_some() {
            return Err(ScheduleError::Duplicate(new.id));
        }
        if new.prompt.is_empty() {
            return Err(ScheduleError::EmptyPrompt(new.id));
        }
        let needed = self.blocks_for(new.prompt.len() + 1);
        if needed > self.blocks.num_blocks() {
            return Err(ScheduleError::TooLong {
                tokens: new.prompt.len(),
                needed,
                total: self.blocks.num_blocks(),
            });
        }
        self.arrivals += 1;
        self.waiting.push(Sequence {
            id: new.id,
            priority: new.priority,
            arrival: self.arrivals,
            tokens: new.prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
        });
        Ok(())
    }

    fn find(&self, id: SeqId) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
    }

    fn free_blocks(&mut self, seq: &mut Sequence) -> Result<(), ScheduleError> {
        for b in seq.blocks.drain(..) {
            self.blocks.release(b)?;
        }
        seq.hashes.clear();
        seq.computed = 0;
        Ok(())
    }

    /// Ends a request wherever it is, freeing its blocks.
    pub fn cancel(&mut self, id: SeqId) -> Result<(), ScheduleError> {
        self.in_flight.remove(&id);
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut seq = self.running.remove(i);
            return self.free_blocks(&mut seq);
        }
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let mut seq = self.waiting.remove(i);
            return self.free_blocks(&mut seq);
        }
        Err(ScheduleError::UnknownSequence(id))
    }

    /// Makes sure `seq` has blocks for its first `upto` tokens.
    fn grow(blocks: &mut BlockManager, seq: &mut Sequence, upto: usize) -> bool {
        let needed = upto.div_ceil(blocks.block_size());
        while seq.blocks.len() < needed {
            match blocks.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Result<StepPlan, ScheduleError> {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_prefill_tokens.max(1);
        // Oldest first, so preemption takes the newest.
        self.running.sort_by_key(|s| s.arrival);
        let mut planned: Vec<Chunk> = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let seq = &self.running[i];
            let remaining = seq.tokens.len() - seq.computed;
            let chunk = if remaining <= 1 {
                remaining
            } else {
                remaining.min(budget)
            };
            if chunk == 0 {
                i += 1;
                continue;
            }
            let upto = seq.computed + chunk;
            if Self::grow(&mut self.blocks, &mut self.running[i], upto) {
                let seq = &self.running[i];
                planned.push(Chunk {
                    seq: seq.id,
                    positions: seq.computed..upto,
                    wants_logits: upto == seq.tokens.len(),
                });
                budget = budget.saturating_sub(chunk);
                i += 1;
                continue;
            }
            // Out of blocks. A sequence that needs more blocks than the pool
            // has can never run: end it. Otherwise preempt the newest
            // running sequence (possibly this one; never one already
            // planned, which are older) and retry.
            if self.blocks_for(upto) > self.blocks.num_blocks() {
                let mut seq = self.running.remove(i);
                self.free_blocks(&mut seq)?;
                plan.aborted.push(seq.id);
                continue;
            }
            let Some(mut victim) = self.running.pop() else {
                break;
            };
            self.free_blocks(&mut victim)?;
            plan.preempted.push(victim.id);
            self.waiting.push(victim);
        }
        plan.chunks = planned;
        // Admit waiting sequences while nothing was preempted this step.
        if plan.preempted.is_empty() {
            self.waiting.sort_by_key(|s| (-s.priority, s.arrival));
            while self.running.len() < self.config.max_batch_size
                && budget > 0
                && !self.waiting.is_empty()
            {
                let mut seq = self.waiting.remove(0);
                let matched = self.blocks.match_prefix(&seq.tokens);
                seq.blocks = matched.iter().map(|m| m.0).collect();
                seq.hashes = matched.iter().map(|m| m.1).collect();
                seq.computed = seq.blocks.len() * self.blocks.block_size();
                // At least the last token is computed, to get logits: give
                // back a fully matched last block and recompute it.
                if seq.computed >= seq.tokens.len() {
                    if let Some(b) = seq.blocks.pop() {
                        self.blocks.release(b)?;
                        seq.hashes.pop();
                    }
                    seq.computed = seq.blocks.len() * self.blocks.block_size();
                }
                let chunk = (seq.tokens.len() - seq.computed).min(budget);
                let upto = seq.computed + chunk;
                if !Self::grow(&mut self.blocks, &mut seq, upto) {
                    self.free_blocks(&mut seq)?;
                    self.waiting.insert(0, seq);
                    break;
                }
                budget -= chunk;
                plan.chunks.push(Chunk {
                    seq: seq.id,
                    positions: seq.computed..upto,
                    wants_logits: upto == seq.tokens.len(),
                });
                self.running.push(seq);
            }
        }
        for c in &plan.chunks {
            self.in_flight.insert(c.seq, c.positions.clone());
        }
        Ok(plan)
    }

    /// Applies a step's results: chunks are now computed, full blocks are
    /// registered for prefix reuse, sampled tokens appended, finished
    /// sequences retired (their blocks freed or cached).
    pub fn complete(&mut self, results: &[StepResult]) -> Result<(), ScheduleError> {
        for r in results {
            let range = self.in_flight.remove(&r.seq);
            let Some(i) = self.running.iter().position(|s| s.id == r.seq) else {
                // Cancelled, preempted or aborted meanwhile; a finished
                // report still ends a waiting sequence.
                if r.finished && self.waiting.iter().any(|s| s.id == r.seq) {
                    self.cancel(r.seq)?;
                }
                continue;
            };
            if let Some(range) = range {
                self.apply_chunk(i, range, r)?;
            }
            if r.finished {
                let mut seq = self.running.remove(i);
                self.free_blocks(&mut seq)?;
            }
        }
        Ok(())
    }

    /// Marks a reported chunk computed, registers its full blocks for
    /// prefix reuse, and appends the sampled token.
    fn apply_chunk(
        &mut self,
        i: usize,
        range: Range<usize>,
        r: &StepResult,
    ) -> Result<(), ScheduleError> {
        let bs = self.blocks.block_size();
        let seq = &mut self.running[i];
        if range.end == seq.tokens.len() && r.token.is_none() && !r.finished {
            return Err(ScheduleError::MissingToken(r.seq));
        }
        seq.computed = range.end;
        for b in seq.hashes.len()..seq.computed / bs {
            let prev = seq.hashes.last().copied();
            let h = self.blocks.register_full(
                seq.blocks[b],
                prev,
                &seq.tokens[b * bs..(b + 1) * bs],
            )?;
            seq.hashes.push(h);
        }
        if let Some(t) = r.token {
            seq.tokens.push(t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sched(blocks: usize, bs: usize, batch: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_batch_size: batch,
                max_prefill_tokens: budget,
            },
            BlockManager::new(blocks, bs, true),
        )
    }

    fn results(plan: &StepPlan, token: u32, finished: &[SeqId]) -> Vec<StepResult> {
        plan.chunks
            .iter()
            .map(|c| StepResult {
                seq: c.seq,
                token: c.wants_logits.then_some(token),
                finished: finished.contains(&c.seq),
            })
            .collect()
    }

    #[test]
    fn chunked_prefill_then_decode_joins_the_running_batch() {
        let mut s = sched(16, 4, 8, 6);
        s.add(NewSequence {
            id: 1,
            prompt: (0..10).collect(),
            priority: 0,
        })
        .unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(
            p.chunks,
            vec![Chunk {
                seq: 1,
                positions: 0..6,
                wants_logits: false
            }]
        );
        s.complete(&results(&p, 0, &[])).unwrap();
        // A new request arrives while the first is mid-prefill.
        s.add(NewSequence {
            id: 2,
            prompt: vec![7, 7, 7],
            priority: 0,
        })
        .unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(
            p.chunks,
            vec![
                Chunk {
                    seq: 1,
                    positions: 6..10,
                    wants_logits: true
                },
                Chunk {
                    seq: 2,
                    positions: 0..2,
                    wants_logits: false
                },
            ]
        );
        s.complete(&results(&p, 42, &[])).unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(
            p.chunks,
            vec![
                Chunk {
                    seq: 1,
                    positions: 10..11,
                    wants_logits: true
                },
                Chunk {
                    seq: 2,
                    positions: 2..3,
                    wants_logits: true
                },
            ]
        );
        s.complete(&results(&p, 5, &[1, 2])).unwrap();
        assert_eq!(s.num_running(), 0);
        assert_eq!(s.blocks().num_active(), 0);
    }

    #[test]
    fn priority_then_fifo_and_batch_limit() {
        let mut s = sched(64, 4, 2, 100);
        for (id, priority) in [(1, 0), (2, 5), (3, 0), (4, 5)] {
            s.add(NewSequence {
                id,
                prompt: vec![id as u32; 3],
                priority,
            })
            .unwrap();
        }
        let p = s.schedule().unwrap();
        let ids: Vec<SeqId> = p.chunks.iter().map(|c| c.seq).collect();
        assert_eq!(ids, vec![2, 4]);
        s.complete(&results(&p, 0, &[2])).unwrap();
        let p = s.schedule().unwrap();
        let ids: Vec<SeqId> = p.chunks.iter().map(|c| c.seq).collect();
        assert_eq!(ids, vec![4, 1]);
    }

    #[test]
    fn preemption_frees_the_newest_and_recomputes_it_later() {
        // 4 blocks of 2 tokens; two sequences of 3 tokens take 2 blocks each.
        let mut s = sched(4, 2, 8, 100);
        s.add(NewSequence {
            id: 1,
            prompt: vec![1, 2, 3],
            priority: 0,
        })
        .unwrap();
        s.add(NewSequence {
            id: 2,
            prompt: vec![4, 5, 6],
            priority: 0,
        })
        .unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(p.chunks.len(), 2);
        s.complete(&results(&p, 9, &[])).unwrap();
        // Both now need a third block; there is none: 2 is preempted.
        let p = s.schedule().unwrap();
        s.complete(&results(&p, 9, &[])).unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1]);
        s.complete(&results(&p, 9, &[1])).unwrap();
        // 2 comes back and recomputes its 5 tokens (prompt + 2 generated).
        let p = s.schedule().unwrap();
        assert_eq!(
            p.chunks,
            vec![Chunk {
                seq: 2,
                positions: 0..5,
                wants_logits: true
            }]
        );
    }

    #[test]
    fn prefix_blocks_are_reused_and_a_full_hit_recomputes_the_last_block() {
        let mut s = sched(16, 2, 8, 100);
        s.add(NewSequence {
            id: 1,
            prompt: vec![1, 2, 3, 4, 5],
            priority: 0,
        })
        .unwrap();
        let p = s.schedule().unwrap();
        s.complete(&results(&p, 0, &[1])).unwrap();
        s.add(NewSequence {
            id: 2,
            prompt: vec![1, 2, 3, 4, 8],
            priority: 0,
        })
        .unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(
            p.chunks,
            vec![Chunk {
                seq: 2,
                positions: 4..5,
                wants_logits: true
            }]
        );
        s.complete(&results(&p, 0, &[2])).unwrap();
        s.add(NewSequence {
            id: 3,
            prompt: vec![1, 2, 3, 4],
            priority: 0,
        })
        .unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(
            p.chunks,
            vec![Chunk {
                seq: 3,
                positions: 2..4,
                wants_logits: true
            }]
        );
    }

    #[test]
    fn a_sequence_that_outgrows_the_pool_is_aborted_not_stuck() {
        let mut s = sched(2, 2, 8, 100);
        s.add(NewSequence {
            id: 1,
            prompt: vec![1, 2, 3],
            priority: 0,
        })
        .unwrap();
        s.add(NewSequence {
            id: 2,
            prompt: vec![4],
            priority: 0,
        })
        .unwrap();
        let mut aborted = Vec::new();
        for _ in 0..10 {
            let p = s.schedule().unwrap();
            aborted.extend(p.aborted.iter().copied());
            s.complete(&results(&p, 9, &[2])).unwrap();
        }
        assert_eq!(aborted, vec![1]);
        assert_eq!(s.num_running() + s.num_waiting(), 0);
        assert_eq!(s.blocks().available(), 2);
        assert_eq!(
            s.add(NewSequence {
                id: 3,
                prompt: vec![],
                priority: 0
            }),
            Err(ScheduleError::EmptyPrompt(3))
        );
    }

    #[test]
    fn impossible_requests_and_bad_ids_are_errors() {
        let mut s = sched(2, 2, 8, 100);
        assert!(matches!(
            s.add(NewSequence {
                id: 1,
                prompt: vec![0; 10],
                priority: 0
            }),
            Err(ScheduleError::TooLong { .. })
        ));
        s.add(NewSequence {
            id: 1,
            prompt: vec![0; 2],
            priority: 0,
        })
        .unwrap();
        assert_eq!(
            s.add(NewSequence {
                id: 1,
                prompt: vec![0],
                priority: 0
            }),
            Err(ScheduleError::Duplicate(1))
        );
        assert_eq!(s.cancel(7), Err(ScheduleError::UnknownSequence(7)));
    }

    proptest! {
        /// Random arrivals, cancellations and finishes: block accounting
        /// holds every step, and at the end every block is free or cached.
        #[test]
        fn random_streams_keep_blocks_consistent(
            ops in proptest::collection::vec((0u8..5, 1usize..12, 0u64..6), 1..150),
            blocks in 3usize..20,
            bs in 1usize..4,
            batch in 1usize..5,
            budget in 1usize..10,
        ) {
            let mut s = sched(blocks, bs, batch, budget);
            let mut next_id = 0u64;
            let mut live: Vec<SeqId> = Vec::new();
            for (op, len, pick) in ops {
                match op {
                    0 | 1 => {
                        next_id += 1;
                        let prompt: Vec<u32> = (0..len as u32).map(|t| t % 3).collect();
                        if s.add(NewSequence { id: next_id, prompt, priority: (pick % 2) as i32 }).is_ok() {
                            live.push(next_id);
                        }
                    }
                    2 if !live.is_empty() => {
                        let id = live.swap_remove(pick as usize % live.len());
                        s.cancel(id).unwrap();
                    }
                    _ => {
                        let plan = s.schedule().unwrap();
                        for c in &plan.chunks {
                            // Every chunk is covered by the block table.
                            let table = s.block_table(c.seq).unwrap();
                            prop_assert!(table.len() * bs >= c.positions.end);
                        }
                        live.retain(|id| !plan.aborted.contains(id));
                        let done: Vec<SeqId> = plan.chunks.iter().filter(|c| c.wants_logits && pick == 0).map(|c| c.seq).collect();
                        live.retain(|id| !done.contains(id));
                        s.complete(&results(&plan, 1, &done)).unwrap();
                    }
                }
                prop_assert_eq!(s.blocks().check_invariants(), Ok(()));
                prop_assert!(s.num_running() <= batch);
            }
            for id in live {
                s.cancel(id).unwrap();
            }
            prop_assert_eq!(s.blocks().num_active(), 0);
            prop_assert_eq!(s.blocks().available(), blocks);
        }
    }
}
