//! Quantized linear weights (4-bit AWQ, or 8-bit output projections) in
//! the tiled layout the kernels of `qkernels.rs` read, and the product of
//! such a weight with an activation matrix.
//!
//! Layout. Outputs are taken 16 at a time (a tile; the last is padded with
//! zero codes and zero scales). A tile is a run of 64-byte chunks along the
//! input dimension; a chunk holds, for each of the 16 outputs, 4 bytes:
//! - 4 bits: 8 inputs `k0..k0+8`, byte `j` holding input `k0+j` in its low
//!   nibble and `k0+4+j` in its high nibble;
//! - 8 bits: 4 inputs `k0..k0+4`, one byte each.
//!
//! One masked (or shifted) chunk is then, for every output lane, 4
//! consecutive codes: exactly the operand of `vpdpbusd` against 4
//! activations broadcast to every lane. No horizontal sums are needed, and
//! one load of activations serves 16 outputs. Beside the codes, per tile and
//! group: 16 fp16 scales (the checkpoint's own, so exact) and 16 unsigned
//! zero points; the weight is `(code − zero) · scale`.
//!
//! Eight-bit weights (the output projection, `--lm-head-dtype int8`) are
//! symmetric per group of 32 inputs: `code = round(w / s) + 128` with
//! `s = max|w| / 127` rounded to fp16, and zero point 128, so they share the
//! 4-bit kernels' arithmetic. Codes lie in 1..=255 (never 0).
//!
//! The product quantizes each activation row to int8 per block of 32
//! inputs (`x ≈ d · xq`, `d = max|x| / 127`, round to nearest even, as
//! llama.cpp's Q8_0) unless the exact fp32 path is asked for. Work is split into (tile range, row block)
//! tasks on the backend's thread pool; every row's arithmetic is the same
//! whatever the batch.

use half::f16;

use super::pool::{pool, SyncPtr};
use super::qkernels::{Chunk, FRows, QKernels, QRows, Tile, ACT_BLOCK, TILE};
use super::{shape_error, Matrix};
use crate::error::Result;
use crate::quant::awq::{unpack_int4, AwqTensors};

/// The input block of 8-bit output projections.
pub const INT8_GROUP: usize = 32;

/// A quantized weight in the tiled layout (see the module docs).
pub struct QWeight {
    bits: u32,
    group: usize,
    k: usize,
    n: usize,
    tiles: usize,
    /// `[tile][k · bits / 32]`.
    codes: Vec<Chunk>,
    /// `[tile][group][TILE]`.
    scales: Vec<f16>,
    /// `[tile][group][TILE]`.
    zeros: Vec<u8>,
}

impl QWeight {
    /// An empty weight of the given shape, codes to be filled in.
    fn empty(bits: u32, group: usize, k: usize, n: usize) -> Result<Self> {
        let per_chunk = 32 / bits as usize;
        if group == 0 || !group.is_multiple_of(ACT_BLOCK) || !k.is_multiple_of(group) {
            return Err(shape_error(format!(
                "a {bits}-bit weight needs a group size that is a multiple of {ACT_BLOCK} and divides in_features {k} (got {group})"
            )));
        }
        let tiles = n.div_ceil(TILE);
        let groups = k / group;
        Ok(QWeight {
            bits,
            group,
            k,
            n,
            tiles,
            codes: vec![Chunk([0; 64]); tiles * k / per_chunk],
            scales: vec![f16::ZERO; tiles * groups * TILE],
            zeros: vec![0; tiles * groups * TILE],
        })
    }

    /// Repacks AutoAWQ gemm tensors (`[in, out/8]` nibbles).
    pub fn from_awq(t: &AwqTensors) -> Result<Self> {
        let (k, n, g) = (t.in_features, t.out_features, t.group_size);
        let mut w = Self::empty(4, g, k, n)?;
        let q = unpack_int4(&t.qweight, k, n);
        let z = unpack_int4(&t.qzeros, k / g, n);
        let groups = k / g;
        let per_tile = k / 8;
        for (c, chunk) in w.codes.iter_mut().enumerate() {
            let (tile, k0) = (c / per_tile, (c % per_tile) * 8);
            for lane in 0..TILE {
                let o = tile * TILE + lane;
                if o >= n {
                    break;
                }
                for j in 0..4 {
                    let lo = q[(k0 + j) * n + o];
                    let hi = q[(k0 + 4 + j) * n + o];
                    chunk.0[lane * 4 + j] = lo | (hi << 4);
                }
            }
        }
        for tile in 0..w.tiles {
            for gi in 0..groups {
                for lane in 0..TILE {
                    let o = tile * TILE + lane;
                    if o < n {
                        let at = (tile * groups + gi) * TILE + lane;
                        w.scales[at] = t.scales[gi * n + o];
                        w.zeros[at] = z[gi * n + o];
                    }
                }
            }
        }
        Ok(w)
    }

    /// Quantizes a dense `[n, k]` weight to 8 bits per group of
    /// [`INT8_GROUP`] inputs; `row(o, buf)` fills `buf` with row `o`.
    pub fn int8_from_rows(
        n: usize,
        k: usize,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) -> Result<Self> {
        let g = INT8_GROUP;
        let mut w = Self::empty(8, g, k, n)?;
        let groups = k / g;
        let per_tile = k / 4;
        let codes = SyncPtr(w.codes.as_mut_ptr());
        let scales = SyncPtr(w.scales.as_mut_ptr());
        let zeros = SyncPtr(w.zeros.as_mut_ptr());
        pool().run(w.tiles, |tile| {
            let mut buf = vec![0f32; k];
            for lane in 0..TILE {
                let o = tile * TILE + lane;
                if o >= n {
                    break;
                }
                row(o, &mut buf);
                for gi in 0..groups {
                    let vals = &buf[gi * g..(gi + 1) * g];
                    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let s = f16::from_f32(amax / 127.0);
                    let inv = if s.to_f32() > 0.0 {
                        1.0 / s.to_f32()
                    } else {
                        0.0
                    };
                    let at = (tile * groups + gi) * TILE + lane;
                    // SAFETY: task `tile` alone writes this tile's scales,
                    // zeros and chunks; every index is inside the buffers
                    // sized by `empty` for `tiles` tiles.
                    unsafe {
                        *scales.get().add(at) = s;
                        *zeros.get().add(at) = 128;
                    }
                    for (i, &v) in vals.iter().enumerate() {
                        let kk = gi * g + i;
                        let q = (v * inv).round().clamp(-127.0, 127.0) as i32;
                        let chunk = tile * per_tile + kk / 4;
                        // SAFETY: as above.
                        unsafe {
                            (*codes.get().add(chunk)).0[lane * 4 + kk % 4] = (q + 128) as u8;
                        }
                    }
                }
            }
        });
        Ok(w)
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Bytes of codes, scales and zero points (what a product reads).
    pub fn stored_bytes(&self) -> usize {
        self.codes.len() * 64 + self.scales.len() * 2 + self.zeros.len()
    }

    fn tile(&self, t: usize) -> Tile<'_> {
        let chunks = self.k * self.bits as usize / 32;
        let per = self.k / self.group * TILE;
        Tile {
            codes: &self.codes[t * chunks..(t + 1) * chunks],
            scales: &self.scales[t * per..(t + 1) * per],
            zeros: &self.zeros[t * per..(t + 1) * per],
            group: self.group,
            bits: self.bits,
        }
    }

    /// The weight value `w[o][i]`, dequantized (for tests and references).
    pub fn value(&self, o: usize, i: usize) -> f32 {
        let (tile, lane) = (o / TILE, o % TILE);
        let t = self.tile(tile);
        let per_chunk = 32 / self.bits as usize;
        let chunk = &t.codes[i / per_chunk];
        let j = i % per_chunk;
        let code = if self.bits == 8 {
            chunk.0[lane * 4 + j]
        } else if j < 4 {
            chunk.0[lane * 4 + j] & 0xf
        } else {
            chunk.0[lane * 4 + j - 4] >> 4
        };
        let at = (i / self.group) * TILE + lane;
        (code as f32 - t.zeros[at] as f32) * t.scales[at].to_f32()
    }

    /// `x · Wᵀ`: int8 activations unless `exact`.
    pub fn forward(&self, x: &Matrix, kernels: &QKernels, exact: bool) -> Result<Matrix> {
        if x.cols != self.k {
            return Err(shape_error(format!(
                "linear: input has {} columns, weight expects {}",
                x.cols, self.k
            )));
        }
        let (m, n) = (x.rows, self.n);
        if m == 0 || n == 0 {
            return Ok(Matrix::zeros(m, n));
        }
        // The output is written in full by the tasks below, so it is not
        // zeroed first (for a prefill that was megabytes of memset per
        // linear); its length is set once every task has written.
        let mut data: Vec<f32> = Vec::with_capacity(m * n);
        let threads = pool().threads();
        // Decode: one row block, tiles spread thin enough for every thread
        // to get several tasks. Wider batches: blocks of rows, and tile
        // ranges small enough that their codes stay in L1 while every row
        // of the block passes over them.
        let (row_block, tiles_per_task) = if m <= 8 {
            (m, (self.tiles / (threads * 6)).max(1))
        } else {
            let tile_bytes = self.k * self.bits as usize / 8 * TILE;
            (64, (16384 / tile_bytes).clamp(1, 8))
        };
        let row_tasks = m.div_ceil(row_block);
        let tile_tasks = self.tiles.div_ceil(tiles_per_task);
        let dst = SyncPtr(data.as_mut_ptr());
        let run = |kernel: &TileKernel<'_>| {
            pool().run(row_tasks * tile_tasks, |task| {
                let (tt, rt) = (task / row_tasks, task % row_tasks);
                let rows = rt * row_block..((rt + 1) * row_block).min(m);
                // A decode task's few rows fit on the stack; zeroing 64 rows
                // per task was a visible share of a decode step.
                let mut small = [[0f32; TILE]; 8];
                let mut large = Vec::new();
                let buf: &mut [[f32; TILE]] = if rows.len() <= small.len() {
                    &mut small[..rows.len()]
                } else {
                    large.resize(rows.len(), [0f32; TILE]);
                    &mut large
                };
                for tile in tt * tiles_per_task..((tt + 1) * tiles_per_task).min(self.tiles) {
                    kernel(&self.tile(tile), rows.clone(), buf);
                    let cols = TILE.min(n - tile * TILE);
                    for (i, r) in rows.clone().enumerate() {
                        // SAFETY: this task alone writes columns
                        // `tile·16..tile·16+cols` of rows `rows`, all inside
                        // the m × n output.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                buf[i].as_ptr(),
                                dst.get().add(r * n + tile * TILE),
                                cols,
                            );
                        }
                    }
                }
            });
        };
        if exact {
            let gsum = group_sums(x, self.group);
            let rows = FRows {
                x: &x.data,
                gsum: &gsum,
                k: self.k,
            };
            run(&|t, r, o| (kernels.exact)(t, &rows, r, o));
        } else {
            let q = QuantizedRows::new(x);
            let rows = q.rows();
            run(&|t, r, o| (kernels.int)(t, &rows, r, o));
        }
        // SAFETY: the tasks covered every (row, column) of the m × n
        // output: row blocks cover 0..m, tiles cover 0..n (the last one
        // `cols` wide), and every kernel writes all its rows (NaN for a
        // call it refuses). The capacity is m·n.
        unsafe { data.set_len(m * n) };
        Ok(Matrix {
            data,
            rows: m,
            cols: n,
        })
    }
}

/// A tile kernel with its activations bound: `(tile, rows, out)`.
type TileKernel<'a> = dyn Fn(&Tile<'_>, std::ops::Range<usize>, &mut [[f32; TILE]]) + Sync + 'a;

/// `Σ x` per row and group, summed in order.
fn group_sums(x: &Matrix, g: usize) -> Vec<f32> {
    x.data
        .chunks_exact(g)
        .map(|c| c.iter().fold(0f32, |a, &v| a + v))
        .collect()
}

/// Activation rows quantized to int8 per block of [`ACT_BLOCK`] values.
pub struct QuantizedRows {
    xq: Vec<i8>,
    d: Vec<f32>,
    isum: Vec<i32>,
    k: usize,
}

impl QuantizedRows {
    pub fn new(x: &Matrix) -> Self {
        let (m, k) = (x.rows, x.cols);
        let group = ACT_BLOCK;
        let groups = k / group;
        let mut q = QuantizedRows {
            xq: vec![0; m * k],
            d: vec![0.0; m * groups],
            isum: vec![0; m * groups],
            k,
        };
        let quantize = super::simd::best_quantize_group();
        let work = |r: usize, xq: &mut [i8], d: &mut [f32], isum: &mut [i32]| {
            let row = x.row(r);
            for gi in 0..groups {
                let span = gi * group..(gi + 1) * group;
                (d[gi], isum[gi]) = quantize(&row[span.clone()], &mut xq[span]);
            }
        };
        if m <= 16 {
            for r in 0..m {
                work(
                    r,
                    &mut q.xq[r * k..(r + 1) * k],
                    &mut q.d[r * groups..(r + 1) * groups],
                    &mut q.isum[r * groups..(r + 1) * groups],
                );
            }
        } else {
            let (xq, d, isum) = (
                SyncPtr(q.xq.as_mut_ptr()),
                SyncPtr(q.d.as_mut_ptr()),
                SyncPtr(q.isum.as_mut_ptr()),
            );
            pool().run(m.div_ceil(16), |b| {
                for r in b * 16..((b + 1) * 16).min(m) {
                    // SAFETY: task `b` alone touches rows `16b..16b+16`,
                    // and each slice lies inside its m-row buffer.
                    unsafe {
                        work(
                            r,
                            std::slice::from_raw_parts_mut(xq.get().add(r * k), k),
                            std::slice::from_raw_parts_mut(d.get().add(r * groups), groups),
                            std::slice::from_raw_parts_mut(isum.get().add(r * groups), groups),
                        );
                    }
                }
            });
        }
        q
    }

    pub fn rows(&self) -> QRows<'_> {
        QRows {
            xq: &self.xq,
            d: &self.d,
            isum: &self.isum,
            k: self.k,
        }
    }
}

#[cfg(test)]
#[path = "qweight_tests.rs"]
mod tests;
