//! Micro-benchmark of paged decode attention (issue 6's shape): batch 64,
//! context 2048, 32 query and 32 KV heads, head_dim 128, blocks of 64, for
//! fp16, int8 and int4 KV (online parameters). Reports the time per call,
//! the KV bytes read per call (codes plus per-token parameters) over that
//! time, that rate as a fraction of the device-to-device copy bandwidth
//! (read + write, 1 GiB, measured in the same run), and the speedup over
//! fp16.
//!
//! Integer storage runs every kernel variant (the tile kernel, then the
//! streaming kernel at each compiled ring depth and several split lengths)
//! and reports each one's largest difference from the tile kernel,
//! relative to the largest output.
//!
//! Timing: CUDA events around 20 back-to-back calls, median of 7 rounds,
//! after 3 warm-up calls. The pool is filled through `kv_write` with
//! random values first. Run: `cargo run --release -p lmq-kernels --example
//! bench_attn` on a GPU machine; `LMQ_BENCH_COPY_ONLY=1` prints the copy
//! bandwidth alone.

use lmq_kernels::paged::{int2_variants, kv_write, paged_attention_with, IntAttnConfig, SPLIT_LEN};
use lmq_kernels::{DeviceKvPool, KvLayout, KvStorage, RowMeta, RowPlace};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{median, open_device, Timing};

const BATCH: usize = 64;
const CTX: usize = 2048;
const HEADS: usize = 32;
const HD: usize = 128;
const BLOCK: usize = 64;
const CALLS: usize = 20;
const ROUNDS: usize = 7;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = open_device()? else {
        return Ok(());
    };
    let stream = dev.stream().clone();
    let timing = Timing::new(&dev, 3, ROUNDS, CALLS)?;

    // Copy bandwidth, the ceiling.
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let mut times = Vec::new();
    for i in 0..ROUNDS + 2 {
        timing.start.record(&stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        timing.end.record(&stream)?;
        let ms = timing.start.elapsed_ms(&timing.end)? as f64;
        if i >= 2 {
            times.push(ms);
        }
    }
    let copy_gbs = 2.0 * bytes as f64 / (median(times) * 1e-3) / 1e9;
    println!("copy: {copy_gbs:.0} GB/s (1 GiB D2D, read + write)");
    if std::env::var_os("LMQ_BENCH_COPY_ONLY").is_some() {
        // Scripts that only need the ceiling (gpu-7b-bench.sh) stop here.
        return Ok(());
    }
    drop((src, dst));

    let blocks_per_seq = CTX / BLOCK;
    let num_blocks = BATCH * blocks_per_seq;
    // Each sequence's table interleaves with the others' (block b of
    // sequence s is s + b·BATCH), as a long-running pool would be.
    let tables: Vec<Vec<u32>> = (0..BATCH)
        .map(|s| {
            (0..blocks_per_seq)
                .map(|b| (s + b * BATCH) as u32)
                .collect()
        })
        .collect();
    // Fill rows: every position of every sequence.
    let fill_places: Vec<RowPlace> = tables
        .iter()
        .flat_map(|t| (0..CTX).map(move |p| RowPlace { pos: p, table: t }))
        .collect();
    let decode_places: Vec<RowPlace> = tables
        .iter()
        .map(|t| RowPlace {
            pos: CTX - 1,
            table: t,
        })
        .collect();
    let fill_meta = RowMeta::new(&dev, &fill_places)?;
    let meta = RowMeta::new(&dev, &decode_places)?;
    let kv_dim = HEADS * HD;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    };
    let chunk = fill_places.len();
    let k = dev.upload(&random(chunk * kv_dim), chunk, kv_dim)?;
    let v = dev.upload(&random(chunk * kv_dim), chunk, kv_dim)?;
    let q = dev.upload(&random(BATCH * kv_dim), BATCH, kv_dim)?;

    println!("| KV | kernel | us/call | KV GB read | GB/s | of copy | vs fp16 | max diff |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut fp16_us = 0.0;
    for storage in [KvStorage::F16, KvStorage::Int8, KvStorage::Int4] {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: HEADS,
            head_dim: HD,
            block_len: BLOCK,
            num_blocks,
            storage,
        };
        let mut pool = DeviceKvPool::new(&dev, layout, None)?;
        kv_write(&dev, &mut pool, 0, &k, &v, &fill_meta)?;
        // The tile kernel at the default split first (the reference for
        // the max difference), then every streaming variant.
        let mut configs = vec![IntAttnConfig {
            stream: None,
            split_len: SPLIT_LEN,
            centre_keys: false,
        }];
        if storage.is_integer() {
            for &v in int2_variants(storage, HD) {
                for split_len in [256, 512, 1024] {
                    configs.push(IntAttnConfig {
                        stream: Some(v),
                        split_len,
                        centre_keys: false,
                    });
                }
            }
            // The default variant with centred keys (the `smooth` mode's).
            if let Some(&v) = int2_variants(storage, HD).first() {
                configs.push(IntAttnConfig {
                    stream: Some(v),
                    split_len: 512,
                    centre_keys: true,
                });
            }
        }
        let mut reference: Option<Vec<f32>> = None;
        for cfg in configs {
            let run = || paged_attention_with(&dev, &pool, 0, &q, HEADS, &meta, cfg);
            let got = dev.download(&run()?)?;
            let diff = match &reference {
                None => {
                    reference = Some(got);
                    0.0
                }
                Some(r) => {
                    let scale = r.iter().fold(1.0f32, |m, x| m.max(x.abs()));
                    r.iter()
                        .zip(&got)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
                        / scale
                }
            };
            let us = timing.us(run)?;
            // Per-token parameters: an fp16 scale plus a one-byte zero-point
            // (int8) or an fp16 zero (int4).
            let params = match storage {
                KvStorage::Int8 => 3,
                KvStorage::Int4 => 4,
                _ => 0,
            };
            let read =
                (BATCH * CTX * 2 * HEADS * (storage.bytes_per_token_head(HD) + params)) as f64;
            let gbs = read / (us * 1e-6) / 1e9;
            if storage == KvStorage::F16 {
                fp16_us = us;
            }
            let kernel = if !storage.is_integer() {
                "float".to_string()
            } else if let Some((ns, minb)) = cfg.stream {
                let kc = if cfg.centre_keys { " centred" } else { "" };
                format!("stream s{ns} b{minb}{kc}, split {}", cfg.split_len)
            } else {
                format!("tiles, split {}", cfg.split_len)
            };
            println!(
                "| {storage:?} | {kernel} | {us:.1} | {:.3} | {gbs:.0} | {:.0}% | {:.2}x | {diff:.1e} |",
                read / 1e9,
                100.0 * gbs / copy_gbs,
                fp16_us / us
            );
        }
    }
    Ok(())
}
