//! How a W4A16 launch divides its work ([`W4Plan`]): the split of K over
//! the warps of a block for the classic kernels, and the blocks, pairs
//! per block and ring depth of the streaming kernel; plus the compiled
//! variants the planner may pick from.

use crate::error::{KernelError, Result};

/// Output columns one thread block owns (two 8-column tiles).
const BLOCK_COLS: usize = 16;
/// Most warps (K splits) in one block (the classic kernels' launch bound is 512).
const MAX_SPLITS: usize = 16;
/// Most warps in one block of the streaming kernel (its launch bound is
/// 256 threads, two blocks per SM).
pub(super) const MAX_STREAM_WARPS: usize = 8;
/// Dynamic shared memory the streaming kernels may use (H100/H200 allow
/// 227 KiB per block; two blocks per SM need at most half of 228 KiB each).
pub(super) const STREAM_SMEM_LIMIT: usize = 112 * 1024;
/// Most warps the automatic plan gives a block (H200: 8 beat 15 on
/// 11008→4096 and matched 4 on 4096→11008).
const AUTO_SPLITS: usize = 8;
/// k-blocks a warp aims to own under the automatic plan (one batch of loads).
const KB_PER_WARP: usize = 4;
/// Single-row (decode of one sequence) split counts that beat the rule
/// above, by (k-blocks, output features): the Llama-2-7B shape's fused
/// q/k/v (4096 -> 12288) and fused gate/up (4096 -> 22016) layers.
/// Measured with `LMQ_BENCH_M=1 LMQ_BENCH_SWEEP=1 bench_w4` on an H100 SXM
/// in sessions 11 and 12 (three runs): the stacked layer took 45.5 µs with
/// these against 47.7 µs with 8 splits for both (docs/BENCHMARKS.md). The
/// other linears of that layer (4096 -> 4096, 11008 -> 4096) measured best
/// with the rule's 8 splits.
const TUNED_SINGLE_ROW_SPLITS: &[(usize, usize, usize)] = &[(32, 12288, 2), (32, 22016, 4)];

/// How one launch divides the work: `n_blocks` blocks, each of `splits`
/// warps that split K into chunks of `kc` k-blocks (128 inputs); the warps'
/// partial sums meet in shared memory (`smem_bytes` in all, with the
/// streaming kernel's ring). A classic block owns one pair of 8-column
/// tiles (`pairs_per_block` 1, `stages` 0); a streaming block walks
/// `pairs_per_block` pairs through a ring of `stages` k-blocks per warp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W4Plan {
    pub n_blocks: usize,
    pub splits: usize,
    pub kc: usize,
    pub smem_bytes: usize,
    pub pairs_per_block: usize,
    pub stages: usize,
}

/// The compiled (token halves, ring stages) streaming variants for group
/// size `g` (cu/w4a16_stream.cu's W4S_ENTRY list).
pub(super) fn stream_variants(g: usize) -> &'static [(usize, usize)] {
    if g == 128 {
        &[(1, 4), (2, 4), (1, 8), (2, 8)]
    } else {
        &[(1, 4), (2, 4)]
    }
}

/// The compiled (token halves, batch depth) variants for group size `g`
/// (cu/w4a16.cu's entry list); the first of each token-half count is the
/// default.
pub(super) fn kernel_variants(g: usize) -> &'static [(usize, usize)] {
    if g == 32 {
        &[(1, 1), (1, 2), (2, 1)]
    } else {
        &[(1, 2), (1, 4), (2, 1), (2, 2)]
    }
}

/// Token halves (mma n8 groups) the kernel runs for `m` rows.
pub(super) fn halves(m: usize) -> usize {
    if m > 8 {
        2
    } else {
        1
    }
}

/// Chooses the split of K over the warps of a block: about
/// [`KB_PER_WARP`] k-blocks per warp, at most [`AUTO_SPLITS`] warps, except
/// for the single-row shapes of [`TUNED_SINGLE_ROW_SPLITS`].
pub(super) fn plan(m: usize, kbs: usize, n: usize, splits: Option<usize>) -> Result<W4Plan> {
    plan_capped(m, kbs, n, splits, AUTO_SPLITS)
}

/// [`plan`] with at most `cap` warps in the automatic split.
pub(super) fn plan_capped(
    m: usize,
    kbs: usize,
    n: usize,
    splits: Option<usize>,
    cap: usize,
) -> Result<W4Plan> {
    let n_blocks = n.div_ceil(BLOCK_COLS);
    let cap = cap.clamp(1, MAX_SPLITS);
    let want = match splits {
        None => TUNED_SINGLE_ROW_SPLITS
            .iter()
            .find(|&&(tk, tn, _)| m == 1 && tk == kbs && tn == n)
            .map_or(kbs.div_ceil(KB_PER_WARP), |&(_, _, s)| s)
            .clamp(1, cap),
        Some(s) if (1..=MAX_SPLITS).contains(&s) => s.min(kbs),
        Some(s) => {
            return Err(KernelError::invalid(
                "W4A16 linear",
                format!("{s} K splits asked for; 1..={MAX_SPLITS} are possible"),
            ))
        }
    };
    let kc = kbs.div_ceil(want);
    // Drop warps that would own no k-block.
    let splits = kbs.div_ceil(kc);
    Ok(W4Plan {
        n_blocks,
        splits,
        kc,
        smem_bytes: splits * 32 * 4 * halves(m) * 4,
        pairs_per_block: 1,
        stages: 0,
    })
}

/// Bytes of one ring stage of the streaming kernel: the codes of one
/// k-block of two tiles, then 64 bytes of scales and zeros per group.
fn stream_stage_bytes(g: usize) -> usize {
    1024 + 128 / g * 64
}

/// The streaming kernel's plan: `warps` warps split K (fewer if K has
/// fewer k-blocks), and the pairs are dealt in equal contiguous runs to at
/// most `num_sms · blocks_per_sm` blocks (the last block may get fewer).
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_stream(
    m: usize,
    kbs: usize,
    n: usize,
    g: usize,
    warps: usize,
    stages: usize,
    blocks_per_sm: usize,
    num_sms: usize,
) -> Result<W4Plan> {
    if !(1..=MAX_STREAM_WARPS).contains(&warps) || blocks_per_sm == 0 || stages < 2 {
        return Err(KernelError::invalid(
            "W4A16 linear",
            format!(
                "streaming kernel: {warps} warps (1..={MAX_STREAM_WARPS}), {stages} stages, \
                 {blocks_per_sm} blocks per SM is not a valid launch"
            ),
        ));
    }
    let want = warps.min(kbs);
    let kc = kbs.div_ceil(want);
    // Drop warps that would own no k-block (the kernel needs >= 1 each).
    let splits = kbs.div_ceil(kc);
    let pairs = n.div_ceil(BLOCK_COLS);
    let ppb = pairs.div_ceil(num_sms.max(1) * blocks_per_sm);
    let smem_bytes = splits * stages * stream_stage_bytes(g) + 2 * splits * 32 * 4 * halves(m) * 4;
    if smem_bytes > STREAM_SMEM_LIMIT {
        return Err(KernelError::invalid(
            "W4A16 linear",
            format!("streaming kernel needs {smem_bytes} bytes of shared memory"),
        ));
    }
    Ok(W4Plan {
        n_blocks: pairs.div_ceil(ppb),
        splits,
        kc,
        smem_bytes,
        pairs_per_block: ppb,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::super::MAX_ROWS;
    use super::*;

    #[test]
    fn plans_cover_k() {
        for &(k, n) in &[
            (4096usize, 4096usize),
            (4096, 11008),
            (11008, 4096),
            (576, 200),
            (1536, 256),
        ] {
            let kbs = k.div_ceil(128);
            for m in 1..=MAX_ROWS {
                for s in [None, Some(1), Some(3), Some(16)] {
                    let p = plan(m, kbs, n, s).unwrap();
                    assert!(p.splits <= MAX_SPLITS && p.smem_bytes <= 48 * 1024, "{p:?}");
                    assert!(
                        p.splits * p.kc >= kbs && (p.splits - 1) * p.kc < kbs,
                        "{k}x{n} m{m}: {p:?}"
                    );
                    assert!(p.n_blocks * BLOCK_COLS >= n);
                }
            }
        }
        for &(k, n, g) in &[
            (4096usize, 4096usize, 128usize),
            (4096, 11008, 128),
            (11008, 4096, 128),
            (576, 200, 64),
            (96, 24, 32),
        ] {
            let kbs = k.div_ceil(128);
            for m in [1, 8, 9, 16] {
                for (w, ns, bps) in [(8, 8, 1), (8, 4, 1), (4, 8, 2), (3, 4, 1), (1, 4, 1)] {
                    let p = plan_stream(m, kbs, n, g, w, ns, bps, 132).unwrap();
                    assert!(
                        p.splits * p.kc >= kbs && (p.splits - 1) * p.kc < kbs,
                        "{p:?}"
                    );
                    // Every block owns at least one pair and all pairs are owned.
                    let pairs = n.div_ceil(BLOCK_COLS);
                    assert!(p.n_blocks * p.pairs_per_block >= pairs, "{p:?}");
                    assert!((p.n_blocks - 1) * p.pairs_per_block < pairs, "{p:?}");
                    assert!(
                        p.n_blocks <= 132 * bps && p.smem_bytes <= STREAM_SMEM_LIMIT,
                        "{p:?}"
                    );
                }
            }
        }
        assert!(plan_stream(1, 32, 4096, 128, 9, 4, 1, 132).is_err());
        assert!(plan(16, 86, 4096, Some(17)).is_err());
        assert!(plan(16, 86, 4096, Some(0)).is_err());
        assert_eq!(plan(1, 12, 256, Some(1)).unwrap().splits, 1);
        assert_eq!(plan(1, 32, 4096, None).unwrap().splits, 8);
    }

    #[test]
    fn tuned_single_row_splits_apply_to_one_row_only() {
        // The measured shapes take their tuned split at one row, the rule's
        // elsewhere; a forced split and a lower cap still win.
        assert_eq!(plan(1, 32, 12288, None).unwrap().splits, 2);
        assert_eq!(plan(1, 32, 22016, None).unwrap().splits, 4);
        assert_eq!(plan(2, 32, 12288, None).unwrap().splits, 8);
        assert_eq!(plan(1, 32, 12288, Some(8)).unwrap().splits, 8);
        assert_eq!(plan_capped(1, 32, 22016, None, 3).unwrap().splits, 3);
        assert_eq!(plan(1, 86, 12288, None).unwrap().splits, 8);
    }
}
