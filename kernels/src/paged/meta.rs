//! Row metadata of a paged-KV launch: each row's position and block table,
//! uploaded once per step, and the host-side check that it names only
//! blocks inside a pool and positions inside the tables.

use crate::buffer::DeviceMatrix;
use crate::device::GpuDevice;
use crate::error::{KernelError, Result};
use crate::ops::check_i32;

use super::prefill::{plan_prefill, prefill_from_env};
use super::DeviceKvPool;

/// Where each row of a batch sits: its position and its sequence's block
/// table, uploaded once per step and shared by every layer (rotary
/// embedding reads the positions, the KV write and attention the tables).
pub struct RowMeta {
    pub(super) rows: usize,
    pub(super) max_pos: usize,
    /// The largest block id any table names.
    max_block: u32,
    /// Per row: (position, table length), to check tables against a pool's
    /// block length before a launch.
    places: Vec<(usize, usize)>,
    /// `[row_pos[rows] | row_table[rows] | tables… | prefill tiles (first
    /// row, rows, last position)… | decode rows…]`, the last two only with
    /// a prefill plan.
    pub(super) meta: DeviceMatrix<i32>,
    /// Where the prefill tiles and the remaining rows sit in `meta`, when
    /// some rows go to the prefill kernel.
    pub(super) prefill: Option<PrefillIndex>,
}

/// The prefill plan's place in the uploaded metadata.
#[derive(Debug, Clone, Copy)]
pub(super) struct PrefillIndex {
    pub tiles_at: usize,
    pub tiles: usize,
    pub rows_at: usize,
    pub decode_rows: usize,
    /// Use the tiles even when they do not fill the GPU (see
    /// `use_prefill_tiles`).
    pub always: bool,
}

/// One row's place, on the host.
#[derive(Debug, Clone, Copy)]
pub struct RowPlace<'a> {
    pub pos: usize,
    /// The block table of the row's sequence.
    pub table: &'a [u32],
}

impl RowMeta {
    /// Uploads the metadata of `rows`. Consecutive rows with the same
    /// table (one sequence's prefill rows) share one copy of it. Runs of such
    /// rows also go to the prefill attention kernel where its tiles fill
    /// the GPU (unless `LMQ_PREFILL_ATTN=0`; see [`RowMeta::with_prefill`]).
    pub fn new(dev: &GpuDevice, rows: &[RowPlace<'_>]) -> Result<Self> {
        let (min_run, always) = prefill_from_env().unwrap_or((0, false));
        Self::planned(dev, rows, min_run, always)
    }

    /// [`RowMeta::new`] with runs of at least `min_run` consecutive rows
    /// sharing a table given to the prefill attention kernel, in tiles of
    /// [`super::PREFILL_TILE_ROWS`], wherever the pool and device support it
    /// (`min_run` 0: none). For tests and benchmarks: unlike
    /// [`RowMeta::new`], the tiles are used even when few.
    pub fn with_prefill(dev: &GpuDevice, rows: &[RowPlace<'_>], min_run: usize) -> Result<Self> {
        Self::planned(dev, rows, min_run, true)
    }

    fn planned(
        dev: &GpuDevice,
        rows: &[RowPlace<'_>],
        min_run: usize,
        always: bool,
    ) -> Result<Self> {
        const OP: &str = "row metadata";
        let n = rows.len();
        let mut host: Vec<i32> = Vec::with_capacity(2 * n + n.min(64) * 4);
        for r in rows {
            host.push(check_i32(OP, "position", r.pos)?);
        }
        host.resize(2 * n, 0);
        let (mut max_pos, mut max_block) = (0, 0u32);
        let mut last: Option<(*const u32, usize, usize)> = None;
        for (i, r) in rows.iter().enumerate() {
            let key = (r.table.as_ptr(), r.table.len());
            let offset = match last {
                Some((p, len, off)) if (p, len) == key => off,
                _ => {
                    let off = host.len() - 2 * n;
                    for &b in r.table {
                        host.push(check_i32(OP, "block id", b as usize)?);
                        max_block = max_block.max(b);
                    }
                    last = Some((key.0, key.1, off));
                    off
                }
            };
            host[n + i] = check_i32(OP, "table offset", offset)?;
            max_pos = max_pos.max(r.pos);
        }
        let keyed: Vec<(usize, (*const u32, usize))> = rows
            .iter()
            .map(|r| (r.pos, (r.table.as_ptr(), r.table.len())))
            .collect();
        let plan = plan_prefill(&keyed, min_run);
        let prefill = if plan.tiles.is_empty() {
            None
        } else {
            let tiles_at = host.len();
            for t in &plan.tiles {
                host.push(check_i32(OP, "tile row", t.first)?);
                host.push(check_i32(OP, "tile rows", t.rows)?);
                host.push(check_i32(OP, "tile position", t.last_pos)?);
            }
            let rows_at = host.len();
            for &r in &plan.decode_rows {
                host.push(check_i32(OP, "row", r)?);
            }
            check_i32(OP, "metadata length", host.len())?;
            Some(PrefillIndex {
                tiles_at,
                tiles: plan.tiles.len(),
                rows_at,
                decode_rows: plan.decode_rows.len(),
                always,
            })
        };
        let len = host.len();
        Ok(Self {
            rows: n,
            max_pos,
            max_block,
            places: rows.iter().map(|r| (r.pos, r.table.len())).collect(),
            meta: dev.upload(&host, len, 1)?,
            prefill,
        })
    }

    /// Metadata for `rows` rows at positions below `capacity`, each with a
    /// block table of up to `width` entries at a fixed place, so that
    /// [`RowMeta::rewrite`] can refill it in place for another step of the
    /// same shape (a recorded graph reads it at a fixed address). Until
    /// rewritten, every row sits at position 0 of block 0.
    pub fn padded(dev: &GpuDevice, rows: usize, capacity: usize, width: usize) -> Result<Self> {
        const OP: &str = "row metadata";
        if rows == 0 || capacity == 0 || width == 0 {
            return Err(KernelError::invalid(
                OP,
                "padded metadata needs rows, positions and table entries",
            ));
        }
        check_i32(OP, "position", capacity - 1)?;
        let len = rows
            .checked_mul(width + 2)
            .ok_or_else(|| KernelError::shape(OP, "the metadata size overflows"))?;
        check_i32(OP, "table offset", len)?;
        let mut host = vec![0i32; len];
        for i in 0..rows {
            host[rows + i] = (i * width) as i32;
        }
        Ok(Self {
            rows,
            max_pos: capacity - 1,
            max_block: 0,
            places: vec![(0, width); rows],
            meta: dev.upload(&host, len, 1)?,
            prefill: None,
        })
    }

    /// Refills metadata made by [`RowMeta::padded`] with `rows` (exactly
    /// as many as it was made for, positions below its capacity, tables of
    /// at most its width; longer tables are cut to the width, which covers
    /// every position below the capacity when `width · block_len ≥
    /// capacity`). `max_pos` keeps the capacity, so kernels launched with
    /// this metadata are sized as when it was recorded.
    pub fn rewrite(&mut self, dev: &GpuDevice, rows: &[RowPlace<'_>]) -> Result<()> {
        const OP: &str = "row metadata";
        let n = self.rows;
        let width = (self.meta.len() / n).saturating_sub(2);
        if rows.len() != n {
            return Err(KernelError::shape(
                OP,
                format!("{} rows for metadata of {n}", rows.len()),
            ));
        }
        let mut host = vec![0i32; self.meta.len()];
        let mut max_block = 0u32;
        for (i, r) in rows.iter().enumerate() {
            if r.pos > self.max_pos {
                return Err(KernelError::shape(
                    OP,
                    format!(
                        "position {} beyond the capacity {}",
                        r.pos,
                        self.max_pos + 1
                    ),
                ));
            }
            host[i] = r.pos as i32;
            host[n + i] = (i * width) as i32;
            let used = r.table.len().min(width);
            for (j, &b) in r.table[..used].iter().enumerate() {
                host[2 * n + i * width + j] = check_i32(OP, "block id", b as usize)?;
                max_block = max_block.max(b);
            }
            self.places[i] = (r.pos, used);
        }
        self.max_block = max_block;
        // The padded layout has no room for a prefill plan.
        self.prefill = None;
        dev.write(&mut self.meta, &host)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The largest block id any row's table names.
    pub fn max_block(&self) -> u32 {
        self.max_block
    }

    /// The largest position a launch with this metadata is sized for.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// The per-row positions (the first `rows` entries), for rotary embedding.
    pub(crate) fn positions(&self) -> cudarc::driver::CudaView<'_, i32> {
        self.meta.data.slice(..self.rows)
    }

    pub(crate) fn is_on(&self, dev: &GpuDevice) -> bool {
        self.meta.is_on(dev)
    }
}

/// Checks `meta` against `pool` as every KV write and attention launch
/// does: for a recorded graph, whose launches check nothing, before each
/// replay.
pub fn check_rows(pool: &DeviceKvPool, meta: &RowMeta) -> Result<()> {
    check_meta("row metadata", pool, meta)
}

/// Every block a table names must lie in the pool, and each row's table
/// must reach its position: then no kernel indexes outside the pool.
pub(super) fn check_meta(op: &'static str, pool: &DeviceKvPool, meta: &RowMeta) -> Result<()> {
    let l = &pool.layout;
    if meta.rows > 0 && meta.max_block as usize >= l.num_blocks {
        return Err(KernelError::shape(
            op,
            format!(
                "block {} is outside the pool of {}",
                meta.max_block, l.num_blocks
            ),
        ));
    }
    if let Some((i, &(pos, len))) = meta
        .places
        .iter()
        .enumerate()
        .find(|(_, &(pos, len))| pos / l.block_len >= len)
    {
        return Err(KernelError::shape(
            op,
            format!(
                "row {i} at position {pos} needs {} blocks of {}, its table has {len}",
                pos / l.block_len + 1,
                l.block_len
            ),
        ));
    }
    Ok(())
}
