//! The KV-cache block pool: fixed-size blocks that sequences reference
//! through block tables, with reference counts, prefix reuse and LRU
//! eviction (TurboMind's free → active → cached life cycle).
//!
//! Who owns what: the manager owns every block's state; a sequence owns one
//! reference to each block in its table. A block is in exactly one state:
//! - **free**: nobody references it and it holds nothing reusable;
//! - **active**: one or more sequences reference it;
//! - **cached**: nobody references it, but it holds a full block of tokens
//!   whose prefix hash is registered, so a new sequence with the same prefix
//!   can take it back; the least recently used cached block is evicted first
//!   when the free list runs out.
//!
//! A full block's hash chains the previous block's hash with its own tokens,
//! so equal hashes mean equal whole prefixes (up to hash collisions of a
//! 64-bit hash).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Index of a block in the pool.
pub type BlockId = u32;

/// Errors of block accounting: each is a bug in the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block {0} released while nobody references it (double free)")]
    DoubleFree(BlockId),
    #[error("block {0} does not exist")]
    UnknownBlock(BlockId),
}

/// The hash of a full block given the previous block's hash.
pub fn chain_hash(prev: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The pool of KV blocks.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    ref_counts: Vec<u32>,
    /// The registered prefix hash of a full block.
    hashes: Vec<Option<u64>>,
    /// What a registered block holds: the previous block's hash and its own
    /// tokens, compared on every hit so a hash collision can never hand
    /// one request another's KV.
    contents: Vec<Option<(Option<u64>, Vec<u32>)>>,
    /// Last use, for LRU among cached blocks.
    last_use: Vec<u64>,
    free: Vec<BlockId>,
    /// Cached blocks by last use.
    cached: BTreeMap<u64, BlockId>,
    by_hash: HashMap<u64, BlockId>,
    tick: u64,
    /// Prefix lookups and how many blocks they reused, for metrics.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens (at least 1).
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockManager {
            block_size: block_size.max(1),
            prefix_caching,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            contents: vec![None; num_blocks],
            last_use: vec![0; num_blocks],
            // Pop from the end: low ids first.
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: BTreeMap::new(),
            by_hash: HashMap::new(),
            tick: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that an allocation can take: free plus evictable cached.
    pub fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    pub fn num_active(&self) -> usize {
        self.ref_counts.iter().filter(|&&r| r > 0).count()
    }

    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    fn touch(&mut self, block: BlockId) {
        self.tick += 1;
        self.last_use[block as usize] = self.tick;
    }

    /// Takes a block for new content: a free one, else the least recently
    /// used cached one (forgetting its prefix). `None` when the pool is
    /// exhausted.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.cached.iter().next()?;
                self.cached.remove(&tick);
                self.contents[b as usize] = None;
                if let Some(h) = self.hashes[b as usize].take() {
                    if self.by_hash.get(&h) == Some(&b) {
                        self.by_hash.remove(&h);
                    }
                }
                b
            }
        };
        self.ref_counts[block as usize] = 1;
        self.touch(block);
        Some(block)
    }

    /// Takes a reference to the longest run of cached or active blocks
    /// whose chained hashes match the full blocks of `tokens`. Returns the
    /// blocks and their hashes, in order.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> Vec<(BlockId, u64)> {
        if !self.prefix_caching {
            return Vec::new();
        }
        self.prefix_queries += 1;
        let mut out = Vec::new();
        let mut prev = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let h = chain_hash(prev, chunk);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let same = self.contents[b as usize]
                .as_ref()
                .is_some_and(|(p, t)| *p == prev && t.as_slice() == chunk);
            if !same {
                break;
            }
            if self.ref_counts[b as usize] == 0 {
                let tick = self.last_use[b as usize];
                self.cached.remove(&tick);
            }
            self.ref_counts[b as usize] += 1;
            self.touch(b);
            out.push((b, h));
            prev = Some(h);
        }
        self.prefix_hits += out.len() as u64;
        out
    }

    /// Records that `block` now holds a full block of `tokens` after a
    /// prefix whose last block hash is `prev`, so later sequences can reuse
    /// it; returns the block's chained hash. If another block
    /// already holds that prefix, the existing one stays the canonical one.
    pub fn register_full(
        &mut self,
        block: BlockId,
        prev: Option<u64>,
        tokens: &[u32],
    ) -> Result<u64, BlockError> {
        self.check(block)?;
        let hash = chain_hash(prev, tokens);
        if !self.prefix_caching {
            return Ok(hash);
        }
        if self.hashes[block as usize].is_none() {
            self.hashes[block as usize] = Some(hash);
            self.contents[block as usize] = Some((prev, tokens.to_vec()));
            self.by_hash.entry(hash).or_insert(block);
        }
        Ok(hash)
    }

    fn check(&self, block: BlockId) -> Result<(), BlockError> {
        if (block as usize) < self.ref_counts.len() {
            Ok(())
        } else {
            Err(BlockError::UnknownBlock(block))
        }
    }

    /// Drops one reference. A block nobody references becomes cached if it
    /// is the canonical holder of a registered prefix, else free.
    pub fn release(&mut self, block: BlockId) -> Result<(), BlockError> {
        self.check(block)?;
        let i = block as usize;
        if self.ref_counts[i] == 0 {
            return Err(BlockError::DoubleFree(block));
        }
        self.ref_counts[i] -= 1;
        if self.ref_counts[i] > 0 {
            return Ok(());
        }
        // A block whose prefix lost its canonical holder (evicted) takes
        // over, so the prefix stays reusable.
        let canonical = match self.hashes[i] {
            Some(h) => *self.by_hash.entry(h).or_insert(block) == block,
            None => false,
        };
        if canonical {
            self.touch(block);
            self.cached.insert(self.last_use[i], block);
        } else {
            self.hashes[i] = None;
            self.contents[i] = None;
            self.free.push(block);
        }
        Ok(())
    }

    /// Checks that every block is in exactly one state and that the
    /// indexes agree; returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.num_blocks();
        let mut state = vec![0u8; n];
        for &b in &self.free {
            state[b as usize] += 1;
            if self.ref_counts[b as usize] != 0 {
                return Err(format!("free block {b} has references"));
            }
        }
        for (&tick, &b) in &self.cached {
            state[b as usize] += 1;
            if self.ref_counts[b as usize] != 0 || self.last_use[b as usize] != tick {
                return Err(format!("cached block {b} has references or a stale tick"));
            }
            if self.hashes[b as usize].is_none() {
                return Err(format!("cached block {b} has no prefix hash"));
            }
        }
        for (b, &r) in self.ref_counts.iter().enumerate() {
            if r > 0 {
                state[b] += 1;
            }
        }
        if let Some(b) = state.iter().position(|&s| s != 1) {
            return Err(format!("block {b} is in {} states", state[b]));
        }
        for (&h, &b) in &self.by_hash {
            if self.hashes[b as usize] != Some(h) {
                return Err(format!(
                    "hash index points at block {b}, which holds another prefix"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sequence as the scheduler would hold it: tokens and a block table.
    struct Seq {
        tokens: Vec<u32>,
        blocks: Vec<BlockId>,
        hashes: Vec<u64>,
    }

    /// Gives a new sequence its blocks: reused prefix, then fresh ones.
    /// Returns `None` (and releases what it took) when the pool is short.
    fn admit(m: &mut BlockManager, tokens: Vec<u32>) -> Option<Seq> {
        let bs = m.block_size();
        let matched = m.match_prefix(&tokens);
        let mut seq = Seq {
            blocks: matched.iter().map(|x| x.0).collect(),
            hashes: matched.iter().map(|x| x.1).collect(),
            tokens,
        };
        let needed = seq.tokens.len().div_ceil(bs);
        while seq.blocks.len() < needed {
            match m.allocate() {
                Some(b) => seq.blocks.push(b),
                None => {
                    finish(m, seq);
                    return None;
                }
            }
        }
        register(m, &mut seq);
        Some(seq)
    }

    fn register(m: &mut BlockManager, seq: &mut Seq) {
        let bs = m.block_size();
        for i in seq.hashes.len()..seq.tokens.len() / bs {
            let h = m
                .register_full(
                    seq.blocks[i],
                    seq.hashes.last().copied(),
                    &seq.tokens[i * bs..(i + 1) * bs],
                )
                .unwrap();
            seq.hashes.push(h);
        }
    }

    fn finish(m: &mut BlockManager, seq: Seq) {
        for b in seq.blocks {
            m.release(b).unwrap();
        }
    }

    #[test]
    fn shared_prefix_reuses_blocks_and_lru_evicts_oldest() {
        let mut m = BlockManager::new(4, 2, true);
        let a = admit(&mut m, vec![1, 2, 3, 4, 5]).unwrap();
        assert_eq!(a.blocks.len(), 3);
        let b = admit(&mut m, vec![1, 2, 3, 4, 9]).unwrap();
        // Two full blocks shared, one new.
        assert_eq!(&b.blocks[..2], &a.blocks[..2]);
        assert_ne!(b.blocks[2], a.blocks[2]);
        assert_eq!(m.available(), 0);
        finish(&mut m, a);
        finish(&mut m, b);
        m.check_invariants().unwrap();
        assert_eq!(m.num_cached(), 2);
        // A different prefix evicts the cached blocks, least recent first.
        let c = admit(&mut m, vec![7, 7, 7, 7, 7, 7, 7, 7]).unwrap();
        assert_eq!(c.blocks.len(), 4);
        assert_eq!(m.num_cached(), 0);
        m.check_invariants().unwrap();
        assert_eq!(m.release(99), Err(BlockError::UnknownBlock(99)));
        finish(&mut m, c);
        let b0 = 0;
        assert_eq!(m.release(b0), Err(BlockError::DoubleFree(b0)));
    }

    proptest! {
        /// Random request streams: every step keeps the invariants, and
        /// when all requests have ended every block is free or cached.
        #[test]
        fn accounting_survives_random_request_streams(
            ops in proptest::collection::vec((0u8..4, 0usize..6, 1usize..20, 0usize..8), 1..120),
            blocks in 4usize..24,
            block_size in 1usize..5,
            caching in any::<bool>(),
        ) {
            let mut m = BlockManager::new(blocks, block_size, caching);
            let prefixes: Vec<Vec<u32>> = (0..6).map(|p| (0..20).map(|i| (p * 3 + i % 3) as u32).collect()).collect();
            let mut running: Vec<Seq> = Vec::new();
            for (op, prefix, len, pick) in ops {
                match op {
                    // Admit a request sharing one of a few prefixes.
                    0 | 1 => {
                        let mut tokens = prefixes[prefix][..len.min(20)].to_vec();
                        tokens.push(1000 + pick as u32);
                        if let Some(s) = admit(&mut m, tokens) {
                            running.push(s);
                        }
                    }
                    // Grow a running sequence by one token.
                    2 if !running.is_empty() => {
                        let i = pick % running.len();
                        let bs = m.block_size();
                        let seq = &mut running[i];
                        seq.tokens.push(2000 + pick as u32);
                        if seq.tokens.len() > seq.blocks.len() * bs {
                            match m.allocate() {
                                Some(b) => seq.blocks.push(b),
                                None => {
                                    // Preempt: free it entirely.
                                    let s = running.swap_remove(i);
                                    finish(&mut m, s);
                                    continue;
                                }
                            }
                        }
                        register(&mut m, &mut running[i]);
                    }
                    // Finish or cancel a sequence.
                    _ if !running.is_empty() => {
                        let s = running.swap_remove(pick % running.len());
                        finish(&mut m, s);
                    }
                    _ => {}
                }
                prop_assert_eq!(m.check_invariants(), Ok(()));
                let held: usize = running.iter().map(|s| s.blocks.len()).sum();
                prop_assert!(m.num_active() <= held);
            }
            for s in running.drain(..) {
                finish(&mut m, s);
            }
            prop_assert_eq!(m.check_invariants(), Ok(()));
            prop_assert_eq!(m.num_active(), 0);
            prop_assert_eq!(m.available(), blocks);
            if !caching {
                prop_assert_eq!(m.num_cached(), 0);
            }
        }
    }
}
