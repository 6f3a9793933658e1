//! Engine settings and the sizing of the KV block pool.

use crate::error::{Error, Result};
use crate::model::DEFAULT_BLOCK_LEN;

/// How much memory the KV cache gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheSize {
    /// An absolute size in bytes (`--kv-cache-bytes`).
    Bytes(u64),
    /// A fraction of the memory free after the model loaded
    /// (`--cache-max-entry-count`, as in LMDeploy).
    FractionOfFree(f64),
}

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most (`--max-batch-size`).
    pub max_batch_size: usize,
    /// Prompt tokens computed per step, across sequences
    /// (`--max-prefill-tokens`).
    pub max_prefill_tokens: usize,
    /// Positions per KV block (`--cache-block-seq-len`).
    pub block_len: usize,
    pub kv_cache: KvCacheSize,
    /// Reuse KV blocks of identical prompt prefixes
    /// (`--enable-prefix-caching`).
    pub prefix_caching: bool,
    /// Requests admitted but not finished, at most; more are refused with
    /// [`crate::engine::SubmitError::QueueFull`] (`--max-queued-requests`).
    pub max_queued_requests: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: 64,
            max_prefill_tokens: 2048,
            block_len: DEFAULT_BLOCK_LEN,
            kv_cache: KvCacheSize::FractionOfFree(0.5),
            prefix_caching: false,
            max_queued_requests: 1024,
        }
    }
}

impl EngineConfig {
    /// Rejects settings that cannot work, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidRequest(msg));
        if self.max_batch_size == 0 {
            return bad("--max-batch-size must be at least 1".into());
        }
        if self.max_prefill_tokens == 0 {
            return bad("--max-prefill-tokens must be at least 1".into());
        }
        if self.block_len == 0 || self.block_len > 4096 {
            return bad(format!(
                "--cache-block-seq-len must be in 1..=4096; got {}",
                self.block_len
            ));
        }
        if let KvCacheSize::FractionOfFree(f) = self.kv_cache {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!(
                    "--cache-max-entry-count must be in (0, 1]; got {f}"
                ));
            }
        }
        if self.max_queued_requests == 0 {
            return bad("--max-queued-requests must be at least 1".into());
        }
        Ok(())
    }

    /// Number of KV blocks for `bytes_per_block`, given the free memory
    /// where a fraction was asked for.
    pub fn num_blocks(&self, bytes_per_block: usize, free_bytes: Option<u64>) -> Result<usize> {
        let budget = match self.kv_cache {
            KvCacheSize::Bytes(b) => b,
            KvCacheSize::FractionOfFree(f) => {
                let free = free_bytes.ok_or_else(|| {
                    Error::InvalidRequest(
                        "free memory is unknown on this system; give the KV cache size with --kv-cache-bytes".into(),
                    )
                })?;
                (free as f64 * f) as u64
            }
        };
        let blocks = budget / bytes_per_block.max(1) as u64;
        if blocks == 0 {
            return Err(Error::InvalidRequest(format!(
                "a KV cache of {budget} bytes holds no block; one block of {} positions takes {bytes_per_block} bytes",
                self.block_len
            )));
        }
        Ok(blocks.min(u32::MAX as u64) as usize)
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes, where there is one.
pub fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_is_the_budget_over_the_block_size() {
        let c = EngineConfig {
            kv_cache: KvCacheSize::Bytes(10_000),
            ..Default::default()
        };
        assert_eq!(c.num_blocks(3_000, None).unwrap(), 3);
        let err = c.num_blocks(20_000, None).unwrap_err().to_string();
        assert!(err.contains("10000") && err.contains("20000"), "{err}");
        let c = EngineConfig {
            kv_cache: KvCacheSize::FractionOfFree(0.25),
            ..Default::default()
        };
        assert_eq!(c.num_blocks(100, Some(4_000)).unwrap(), 10);
        assert!(c.num_blocks(100, None).is_err());
        let bad = EngineConfig {
            kv_cache: KvCacheSize::FractionOfFree(1.5),
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--cache-max-entry-count"));
    }
}
