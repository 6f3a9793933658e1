//! The fused rotary embedding and KV write (`split_rope_kv_write`) against
//! the two launches it replaces (`act::split_rope`, then `paged::kv_write`,
//! which turbomind's cuda_backend tests check against the CPU backend): q
//! and every byte of the pool (codes and online parameters, both layers)
//! must be identical, for fp32, fp16, int8 and int4 storage, online and
//! static parameters, head_dim 64, 128 and 256, GQA groups of 1, 3 and 4,
//! a batch mixing decode rows with a prompt that crosses blocks, and a
//! position scale other than 1.
//!
//! Without a CUDA GPU the test prints "skipped: no CUDA device" and passes.

mod common;

use common::{device, Rng};
use lmq_kernels::paged::{kv_write, split_rope_kv_write, RopeTable};
use lmq_kernels::{act, DeviceKvPool, GpuDevice, KvLayout, KvStorage, RowMeta, RowPlace};

struct Case {
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    block_len: usize,
    storage: KvStorage,
    static_mode: bool,
    pos_scale: f32,
}

fn run(dev: &GpuDevice, c: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let hd = c.head_dim;
    // Three sequences, tables in scrambled order: a decode row at 37, a
    // prompt of 30 rows from 0, a decode row at 5.
    let tables: [Vec<u32>; 3] = [vec![7, 2, 9], vec![4, 0, 8], vec![6, 1]];
    let mut rows: Vec<RowPlace> = vec![RowPlace {
        pos: 37,
        table: &tables[0],
    }];
    rows.extend((0..30).map(|p| RowPlace {
        pos: p,
        table: &tables[1],
    }));
    rows.push(RowPlace {
        pos: 5,
        table: &tables[2],
    });
    let meta = RowMeta::new(dev, &rows).expect("meta");
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: c.kv_heads,
        head_dim: hd,
        block_len: c.block_len,
        num_blocks: 10,
        storage: c.storage,
    };
    let levels = if c.storage == KvStorage::Int8 {
        255.0
    } else {
        15.0
    };
    let statics: Option<Vec<f32>> = c.static_mode.then(|| {
        (0..2 * 2 * c.kv_heads)
            .flat_map(|_| {
                [
                    (rng.uniform(4.0, 6.0) / levels) as f32,
                    rng.uniform(-2.4, -1.8) as f32,
                ]
            })
            .collect()
    });
    let mut split_pool = DeviceKvPool::new(dev, layout, statics.as_deref()).expect("pool");
    let mut fused_pool = DeviceKvPool::new(dev, layout, statics.as_deref()).expect("pool");

    let n = rows.len();
    let (qd, kd) = (c.heads * hd, c.kv_heads * hd);
    let qkv = dev
        .upload(&rng.values(n * (qd + 2 * kd), -2.0, 2.0), n, qd + 2 * kd)
        .expect("qkv");
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f64.powf(-2.0 * i as f64 / hd as f64) as f32)
        .collect();
    let inv_freq = dev.upload(&inv_freq, hd / 2, 1).expect("inv_freq");

    let mut q = dev.uninit::<f32>(n, qd).expect("q");
    let mut k = dev.uninit::<f32>(n, kd).expect("k");
    let mut v = dev.uninit::<f32>(n, kd).expect("v");
    act::split_rope(
        dev,
        &qkv,
        [&mut q, &mut k, &mut v],
        &meta,
        &inv_freq,
        c.pos_scale,
    )
    .expect("split_rope");
    kv_write(dev, &mut split_pool, 1, &k, &v, &meta).expect("kv_write");

    let mut fused_q = dev.uninit::<f32>(n, qd).expect("q");
    dev.fill(&mut fused_q, f32::NAN).expect("poison");
    let rope = RopeTable {
        inv_freq: &inv_freq,
        pos_scale: c.pos_scale,
    };
    split_rope_kv_write(dev, &qkv, &mut fused_q, &mut fused_pool, 1, &meta, rope)
        .expect("split_rope_kv_write");

    let what = format!(
        "hd {hd} {}/{} block {} {:?}{} scale {}",
        c.heads,
        c.kv_heads,
        c.block_len,
        c.storage,
        if c.static_mode { " static" } else { "" },
        c.pos_scale
    );
    let (want_q, got_q) = (
        dev.download(&q).expect("q"),
        dev.download(&fused_q).expect("q"),
    );
    let same_q = want_q
        .iter()
        .zip(&got_q)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same_q, "{what}: q differs");
    let (want_data, want_params) = split_pool.download_bytes(dev).expect("pool");
    let (got_data, got_params) = fused_pool.download_bytes(dev).expect("pool");
    assert!(
        want_data.iter().any(|&b| b != 0),
        "{what}: nothing was written"
    );
    let first = want_data.iter().zip(&got_data).position(|(a, b)| a != b);
    assert_eq!(
        first, None,
        "{what}: pool codes differ first at byte {first:?}"
    );
    assert_eq!(want_params, got_params, "{what}: online parameters differ");
    println!("{what}: q and {} pool bytes identical", want_data.len());
}

#[test]
fn fused_rope_kv_write_matches_two_launches() {
    let Some(dev) = device() else { return };
    let mut seed = 1;
    for (head_dim, heads, kv_heads, block_len) in [
        (64, 9, 3, 16),
        (128, 8, 2, 24),
        (128, 4, 4, 64),
        (256, 4, 1, 16),
    ] {
        for storage in [
            KvStorage::F32,
            KvStorage::F16,
            KvStorage::Int8,
            KvStorage::Int4,
        ] {
            for static_mode in [false, true] {
                if static_mode && !storage.is_integer() {
                    continue;
                }
                let pos_scale = if seed % 3 == 0 { 0.25 } else { 1.0 };
                let c = Case {
                    head_dim,
                    heads,
                    kv_heads,
                    block_len,
                    storage,
                    static_mode,
                    pos_scale,
                };
                run(&dev, &c, seed);
                seed += 1;
            }
        }
    }
}

/// Shapes that do not split as the pool says are refused before a launch.
#[test]
fn fused_rope_kv_write_refuses_bad_shapes() {
    let Some(dev) = device() else { return };
    let tables = [vec![0u32]];
    let rows = [RowPlace {
        pos: 0,
        table: &tables[0],
    }];
    let meta = RowMeta::new(&dev, &rows).expect("meta");
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 2,
        head_dim: 64,
        block_len: 16,
        num_blocks: 1,
        storage: KvStorage::F16,
    };
    let mut pool = DeviceKvPool::new(&dev, layout, None).expect("pool");
    let inv_freq = dev.zeros::<f32>(32, 1).expect("inv_freq");
    let rope = RopeTable {
        inv_freq: &inv_freq,
        pos_scale: 1.0,
    };
    // q/k/v one head short.
    let qkv = dev.zeros::<f32>(1, 64 * 5).expect("qkv");
    let mut q = dev.zeros::<f32>(1, 64 * 2).expect("q");
    let err = split_rope_kv_write(&dev, &qkv, &mut q, &mut pool, 0, &meta, rope)
        .expect_err("a short q/k/v must be refused");
    assert!(err.to_string().contains("KV heads"), "{err}");
    // A layer past the pool's.
    let qkv = dev.zeros::<f32>(1, 64 * 6).expect("qkv");
    let err = split_rope_kv_write(&dev, &qkv, &mut q, &mut pool, 1, &meta, rope)
        .expect_err("layer 1 of a one-layer pool must be refused");
    assert!(err.to_string().contains("layer 1"), "{err}");
}
