//! Micro-benchmark of prefill attention over the paged KV cache: the
//! prefill kernel (`cu/paged_attn_prefill.cu`, tiles of 64 rows) against
//! the per-row decode kernels on the same rows, for fp16, int8 and int4 KV
//! (online parameters), Llama-2-7B heads (32 query and KV heads, head_dim
//! 128; and 32 over 8 KV heads), blocks of 64 positions. Batches: one
//! 2048-token prompt; four 512-token prompts; a 512-row chunk after 3584
//! positions of history (chunked prefill).
//!
//! Reports µs per call for both, the ratio, the prefill kernel's rate in
//! TFLOP/s (causal: 4·head_dim·heads FLOPs per attended pair), and the
//! largest difference between the two relative to the largest output.
//!
//! Timing: CUDA events around 10 back-to-back calls, median of 5 rounds,
//! after 2 warm-up calls. Run: `cargo run --release -p lmq-kernels
//! --example bench_attn_prefill` on a GPU machine.

use lmq_kernels::paged::{kv_write, paged_attention, PREFILL_MIN_RUN};
use lmq_kernels::{DeviceKvPool, KvLayout, KvStorage, RowMeta, RowPlace};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{open_device, Timing};

const HD: usize = 128;
const HEADS: usize = 32;
const BLOCK: usize = 64;
const CALLS: usize = 10;
const ROUNDS: usize = 5;

struct Xorshift(u64);
impl Xorshift {
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = open_device()? else {
        return Ok(());
    };
    let timing = Timing::new(&dev, 2, ROUNDS, CALLS)?;
    let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);

    // (name, sequences as (history, new rows)).
    let batches: [(&str, Vec<(usize, usize)>); 3] = [
        ("1 x 2048 prompt", vec![(0, 2048)]),
        ("4 x 512 prompts", vec![(0, 512); 4]),
        ("512 after 3584", vec![(3584, 512)]),
    ];
    println!("| batch | heads/kv | KV | per-row µs | prefill µs | speedup | prefill TFLOP/s | max diff |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, seqs) in &batches {
        let blocks: Vec<usize> = seqs.iter().map(|&(h, n)| (h + n).div_ceil(BLOCK)).collect();
        let num_blocks: usize = blocks.iter().sum();
        let mut next = 0u32;
        let tables: Vec<Vec<u32>> = blocks
            .iter()
            .map(|&n| {
                let t = (next..next + n as u32).collect();
                next += n as u32;
                t
            })
            .collect();
        let fill: Vec<RowPlace> = seqs
            .iter()
            .zip(&tables)
            .flat_map(|(&(h, n), t)| (0..h + n).map(move |p| RowPlace { pos: p, table: t }))
            .collect();
        let rows: Vec<RowPlace> = seqs
            .iter()
            .zip(&tables)
            .flat_map(|(&(h, n), t)| (h..h + n).map(move |p| RowPlace { pos: p, table: t }))
            .collect();
        let pairs: f64 = rows.iter().map(|r| (r.pos + 1) as f64).sum();
        let fill_meta = RowMeta::with_prefill(&dev, &fill, 0)?;
        let per_row = RowMeta::with_prefill(&dev, &rows, 0)?;
        let tiled = RowMeta::with_prefill(&dev, &rows, PREFILL_MIN_RUN)?;
        for kv_heads in [HEADS, 8] {
            let kd = kv_heads * HD;
            let k = dev.upload(&rng.values(fill.len() * kd), fill.len(), kd)?;
            let v = dev.upload(&rng.values(fill.len() * kd), fill.len(), kd)?;
            let q = dev.upload(&rng.values(rows.len() * HEADS * HD), rows.len(), HEADS * HD)?;
            for storage in [KvStorage::F16, KvStorage::Int8, KvStorage::Int4] {
                let layout = KvLayout {
                    num_layers: 1,
                    num_kv_heads: kv_heads,
                    head_dim: HD,
                    block_len: BLOCK,
                    num_blocks,
                    storage,
                };
                let mut pool = DeviceKvPool::new(&dev, layout, None)?;
                kv_write(&dev, &mut pool, 0, &k, &v, &fill_meta)?;
                let time = |meta: &RowMeta| -> Result<(f64, Vec<f32>), Box<dyn std::error::Error>> {
                    let run = || paged_attention(&dev, &pool, 0, &q, HEADS, meta);
                    let out = dev.download(&run()?)?;
                    Ok((timing.us(run)?, out))
                };
                let (row_us, want) = time(&per_row)?;
                let (tile_us, got) = time(&tiled)?;
                let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
                    / scale;
                let tflops = 4.0 * (HD * HEADS) as f64 * pairs / (tile_us * 1e-6) / 1e12;
                println!(
                    "| {name} | {HEADS}/{kv_heads} | {storage:?} | {row_us:.1} | {tile_us:.1} | {:.2}x | {tflops:.1} | {diff:.1e} |",
                    row_us / tile_us
                );
            }
        }
    }
    Ok(())
}
