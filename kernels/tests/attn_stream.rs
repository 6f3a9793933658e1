//! The streaming integer attention kernel (`cu/paged_attn_int2.cu`) against
//! the tile kernel (`cu/paged_attn_int.cu`, itself checked against the CPU
//! backend by turbomind's cuda_backend tests) on the same pool: every
//! compiled variant and head_dim, int8 and int4, online and static
//! parameters, GQA groups below, at and above the kernels' width of 8,
//! blocks of 16 and 64 positions, split lengths of 256 to 1024, and rows
//! whose last tile is partial. Both round q and the weights to fp16, in
//! different places, so they agree to about 1e-4 of the output scale.
//!
//! Without a CUDA GPU the test prints "skipped: no CUDA device" and passes.

mod common;

use common::{device, filled_pool, scaled_diff, AttnCase, FilledPool, Rng};
use lmq_kernels::paged::{int2_variants, paged_attention_with, IntAttnConfig, SPLIT_LEN};
use lmq_kernels::{GpuDevice, KvStorage, RowMeta, RowPlace};

fn run(dev: &GpuDevice, c: &AttnCase, seed: u64) {
    let mut rng = Rng(seed);
    // Rows at these positions, each its own sequence: one tile, a partial
    // tile, several splits with a partial last tile, exactly two splits.
    let positions = [0usize, 5, 17, 300, 700, 1023, 1100];
    let lens: Vec<usize> = positions.iter().map(|p| p + 1).collect();
    let FilledPool { pool, tables } = filled_pool(dev, c, &lens, &mut rng);
    let layer = 1;
    let rows: Vec<RowPlace> = positions
        .iter()
        .zip(&tables)
        .map(|(&p, t)| RowPlace { pos: p, table: t })
        .collect();
    let meta = RowMeta::new(dev, &rows).expect("meta");
    let qd = c.heads * c.head_dim;
    let q = dev
        .upload(&rng.values(rows.len() * qd, -1.0, 1.0), rows.len(), qd)
        .expect("q");
    let tiles = IntAttnConfig {
        stream: None,
        split_len: SPLIT_LEN,
        centre_keys: false,
    };
    let want = dev
        .download(
            &paged_attention_with(dev, &pool, layer, &q, c.heads, &meta, tiles).expect("tiles"),
        )
        .expect("download");
    let variants = int2_variants(c.storage, c.head_dim);
    // Every variant, then the first with centred keys.
    let centred = variants.first().map(|&v| (v, true));
    for (variant, centre_keys) in variants.iter().map(|&v| (v, false)).chain(centred) {
        for split_len in [256, 512, 1024] {
            let cfg = IntAttnConfig {
                stream: Some(variant),
                split_len,
                centre_keys,
            };
            let got = dev
                .download(
                    &paged_attention_with(dev, &pool, layer, &q, c.heads, &meta, cfg)
                        .expect("stream"),
                )
                .expect("download");
            let diff = scaled_diff(&want, &got);
            println!(
                "hd {} {}/{} block {} {:?}{} stream {variant:?}{} split {split_len}: {diff:.2e}",
                c.head_dim,
                c.heads,
                c.kv_heads,
                c.block_len,
                c.storage,
                if c.static_mode { " static" } else { "" },
                if centre_keys { " centred" } else { "" },
            );
            assert!(diff <= 1e-3, "streaming kernel differs by {diff:.2e}");
        }
    }
}

#[test]
fn streaming_int_attention_matches_tile_kernel() {
    let Some(dev) = device() else { return };
    let mut seed = 1;
    for head_dim in [64, 128, 256] {
        for (kv_heads, heads) in [(2, 2), (3, 9), (1, 12)] {
            for block_len in [16, 64] {
                for storage in [KvStorage::Int8, KvStorage::Int4] {
                    for static_mode in [false, true] {
                        let c = AttnCase {
                            head_dim,
                            kv_heads,
                            heads,
                            block_len,
                            storage,
                            static_mode,
                        };
                        run(&dev, &c, seed);
                        seed += 1;
                    }
                }
            }
        }
    }
}
