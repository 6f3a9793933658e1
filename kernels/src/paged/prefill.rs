//! Prefill tiles: which rows of a batch the prefill attention kernel
//! (`cu/paged_attn_prefill.cu`) takes, 64 consecutive rows of one block
//! table at a time, and which stay with the per-row (decode) kernels.
//!
//! The plan is made on the host with the row metadata and uploaded with it;
//! it is pure logic, tested here without a GPU. Correctness never depends
//! on it: every row is attended exactly once, by one kernel or the other,
//! and the prefill kernel masks each row at its own position.

use crate::device::GpuDevice;

use super::{KvLayout, KvStorage};

/// Rows one prefill tile (one block of the kernel) holds: 4 warps of 16.
pub const PREFILL_TILE_ROWS: usize = 64;

/// The shortest run of rows sharing a block table that goes to the prefill
/// kernel when it is on: shorter runs gain little from sharing key tiles
/// and keep the decode kernels' finer parallelism. Not yet tuned on a GPU.
pub const PREFILL_MIN_RUN: usize = 16;

/// Whether [`super::RowMeta::new`] plans prefill tiles, and whether they
/// are used even when they do not fill the GPU. By default they are planned
/// and used where `tiles × query heads` reaches the SM count;
/// `LMQ_PREFILL_ATTN=always` also uses them below that (for tests on small
/// shapes) and `LMQ_PREFILL_ATTN=0` leaves every row to the decode kernels.
/// On an H100 the tiles took a 2048-token Llama-2-7B prompt from 9.1k to
/// 30.5k tok/s end to end (docs/BENCHMARKS.md).
pub(super) fn prefill_from_env() -> Option<(usize, bool)> {
    static ON: std::sync::OnceLock<Option<(usize, bool)>> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("LMQ_PREFILL_ATTN").as_deref() {
        Ok("0") => None,
        Ok("always") => Some((PREFILL_MIN_RUN, true)),
        _ => Some((PREFILL_MIN_RUN, false)),
    })
}

/// Whether a launch uses its prefill tiles: always when asked, else when
/// they alone give every SM a block. The prefill kernel does not split
/// positions (its partial states would grow with the square of the
/// prompt), so a few tiles over a long history (a short chunk late in a
/// long prompt) would leave most SMs idle; such rows stay decode rows,
/// which split. The threshold is a guess until `bench_attn_prefill` has
/// run.
pub(super) fn use_prefill_tiles(always: bool, tiles: usize, heads: usize, sms: usize) -> bool {
    always || tiles.saturating_mul(heads) >= sms
}

/// One tile: `rows` consecutive rows from `first`, sharing a block table;
/// `last_pos` is the largest of their positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillTile {
    pub first: usize,
    pub rows: usize,
    pub last_pos: usize,
}

/// The split of a batch between the two kernels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefillPlan {
    pub tiles: Vec<PrefillTile>,
    /// The rows no tile holds, in order.
    pub decode_rows: Vec<usize>,
}

/// Plans tiles over `rows`, each `(position, table key)`: every maximal run
/// of consecutive rows with the same table key and at least `min_run` rows
/// is cut into tiles of [`PREFILL_TILE_ROWS`]; all other rows are decode
/// rows. Table keys are compared for equality only (the caller passes an
/// identity of the table's contents). `min_run` 0 plans no tiles.
pub fn plan_prefill<K: PartialEq>(rows: &[(usize, K)], min_run: usize) -> PrefillPlan {
    let mut plan = PrefillPlan::default();
    let mut start = 0;
    while start < rows.len() {
        let mut end = start + 1;
        while end < rows.len() && rows[end].1 == rows[start].1 {
            end += 1;
        }
        if min_run > 0 && end - start >= min_run {
            for first in (start..end).step_by(PREFILL_TILE_ROWS) {
                let n = PREFILL_TILE_ROWS.min(end - first);
                let last_pos = rows[first..first + n]
                    .iter()
                    .map(|r| r.0)
                    .max()
                    .unwrap_or(0);
                plan.tiles.push(PrefillTile {
                    first,
                    rows: n,
                    last_pos,
                });
            }
        } else {
            plan.decode_rows.extend(start..end);
        }
        start = end;
    }
    plan
}

/// Whether the prefill kernel is compiled for this pool on this device:
/// head_dim 64 or 128, fp16, int8 or int4 storage, ldmatrix and cp.async
/// (sm_80+). Elsewhere every row takes the decode kernels.
pub(super) fn prefill_supported(dev: &GpuDevice, l: &KvLayout) -> bool {
    matches!(l.head_dim, 64 | 128)
        && matches!(
            l.storage,
            KvStorage::F16 | KvStorage::Int8 | KvStorage::Int4
        )
        && dev.compute_capability() >= (8, 0)
}

/// Whether integer storage takes the prefill kernel whose raw codes are
/// copied a tile ahead (`paged_attn_prefill_h{hd}_{i8,i4}_pipe`): the
/// default since an H100 ran its checks and measured it 1.4–2.1× faster
/// than the plain integer kernel (1.9× on a 2048-token prompt with 32 KV
/// heads), which looks up, loads and dequantizes
/// each tile while no copy is in flight (docs/BENCHMARKS.md, session 11).
/// `LMQ_PREFILL_INT_PIPE=0` takes the plain kernel.
pub(super) fn int_pipe_from_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("LMQ_PREFILL_INT_PIPE").as_deref(),
            Ok("0" | "off" | "false" | "no")
        )
    })
}

/// The prefill kernel's entry point for a storage type and head_dim, with
/// the integer tiles pipelined or not (fp16 tiles always are).
pub(super) fn prefill_entry(storage: KvStorage, head_dim: usize, int_pipe: bool) -> String {
    let pipe = if int_pipe && storage != KvStorage::F16 {
        "_pipe"
    } else {
        ""
    };
    format!("paged_attn_prefill_h{head_dim}_{}{pipe}", storage.suffix())
}

/// Dynamic shared memory of the prefill kernel (`PrefillSmem` in the
/// kernel): K and V tiles of 64 rows of head_dim + 8 halves, two stages for
/// fp16 storage (copied asynchronously), one for integer storage; with the
/// integer tiles pipelined, two stages of their raw codes; then the tile's
/// 128 token-heads (`PrefillKey`, 16 bytes each), twice when pipelined.
pub(super) fn prefill_smem_bytes(storage: KvStorage, head_dim: usize, int_pipe: bool) -> usize {
    let stages = if storage == KvStorage::F16 { 2 } else { 1 };
    let fp16_tiles = stages * 2 * 64 * (head_dim + 8) * 2;
    let keys = 2 * 64 * 16;
    let raw_row = match storage {
        KvStorage::Int8 => head_dim,
        KvStorage::Int4 => head_dim / 2,
        _ => 0,
    };
    if int_pipe && raw_row > 0 {
        fp16_tiles + 2 * (2 * 64 * raw_row) + 2 * keys
    } else {
        fp16_tiles + keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row is in exactly one tile or in the decode list; tiles hold
    /// consecutive rows of one key, at most 64, and their largest position.
    fn check(rows: &[(usize, u32)], min_run: usize, plan: &PrefillPlan) {
        let mut seen = vec![0; rows.len()];
        for t in &plan.tiles {
            assert!(t.rows >= 1 && t.rows <= PREFILL_TILE_ROWS, "{t:?}");
            let run = &rows[t.first..t.first + t.rows];
            assert!(run.iter().all(|r| r.1 == run[0].1), "{t:?} mixes tables");
            assert_eq!(t.last_pos, run.iter().map(|r| r.0).max().unwrap());
            for s in &mut seen[t.first..t.first + t.rows] {
                *s += 1;
            }
        }
        for &r in &plan.decode_rows {
            seen[r] += 1;
        }
        assert!(seen.iter().all(|&s| s == 1), "{seen:?}");
        // Runs of at least min_run rows go to tiles, shorter ones do not.
        for &r in &plan.decode_rows {
            let key = rows[r].1;
            let (mut a, mut b) = (r, r + 1);
            while a > 0 && rows[a - 1].1 == key {
                a -= 1;
            }
            while b < rows.len() && rows[b].1 == key {
                b += 1;
            }
            assert!(
                b - a < min_run || min_run == 0,
                "row {r} in a run of {}",
                b - a
            );
        }
    }

    #[test]
    fn runs_become_tiles_and_the_rest_decode_rows() {
        // A decode row, a 150-row prompt at positions 10.., a 5-row chunk,
        // two decode rows, a 64-row prompt, a 16-row prompt.
        let mut rows: Vec<(usize, u32)> = vec![(700, 0)];
        rows.extend((0..150).map(|i| (10 + i, 1)));
        rows.extend((0..5).map(|i| (i, 2)));
        rows.extend([(3, 3), (9, 4)]);
        rows.extend((0..64).map(|i| (i, 5)));
        rows.extend((0..16).map(|i| (100 + i, 6)));
        let plan = plan_prefill(&rows, 16);
        check(&rows, 16, &plan);
        let sizes: Vec<(usize, usize, usize)> = plan
            .tiles
            .iter()
            .map(|t| (t.first, t.rows, t.last_pos))
            .collect();
        assert_eq!(
            sizes,
            [
                (1, 64, 73),
                (65, 64, 137),
                (129, 22, 159),
                (158, 64, 63),
                (222, 16, 115)
            ]
        );
        assert_eq!(plan.decode_rows, [0, 151, 152, 153, 154, 155, 156, 157]);
    }

    #[test]
    fn tiles_are_used_when_they_fill_the_gpu() {
        // A 2048-token prompt of a 32-head model on 132 SMs: 32 × 32 blocks.
        assert!(use_prefill_tiles(false, 32, 32, 132));
        // One 64-row chunk of a 32-head model: 32 blocks, decode rows.
        assert!(!use_prefill_tiles(false, 1, 32, 132));
        assert!(use_prefill_tiles(true, 1, 32, 132));
        assert!(use_prefill_tiles(false, 15, 9, 132));
        assert!(!use_prefill_tiles(false, 14, 9, 132));
    }

    #[test]
    fn plans_cover_every_row_once() {
        // Pseudo-random batches of runs of 1 to 200 rows.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..200 {
            let mut rows = Vec::new();
            for key in 0..next(12) as u32 {
                let len = 1 + next(200) as usize;
                let start = next(1000) as usize;
                rows.extend((0..len).map(|i| (start + i, key)));
            }
            for min_run in [0, 1, 2, 16, 64] {
                check(&rows, min_run, &plan_prefill(&rows, min_run));
            }
        }
        assert_eq!(plan_prefill::<u32>(&[], 16), PrefillPlan::default());
        // min_run 0 means no tiles at all.
        let rows: Vec<(usize, u32)> = (0..100).map(|i| (i, 0)).collect();
        assert!(plan_prefill(&rows, 0).tiles.is_empty());
    }
}
