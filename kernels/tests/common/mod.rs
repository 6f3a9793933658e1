//! What the GPU test crates share: opening the device (or reporting the
//! test as skipped) and a small seeded generator.
#![allow(dead_code)] // each test crate uses a part

use half::f16;
use lmq_kernels::{GpuDevice, KernelError, PackedW4};

/// GPU 0, or `None` (with a "skipped" line) on a machine without CUDA.
pub fn device() -> Option<GpuDevice> {
    match GpuDevice::new(0) {
        Ok(d) => Some(d),
        Err(KernelError::NoDevice(msg)) => {
            println!("skipped: no CUDA device ({msg})");
            None
        }
        Err(e) => panic!("opening GPU 0 failed: {e}"),
    }
}

/// splitmix64: small, seeded, independent of any crate version.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// fp16 values uniform in [lo, hi), never exactly zero.
    pub fn f16s(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f16> {
        (0..n)
            .map(|_| loop {
                let v = f16::from_f64(self.uniform(lo, hi));
                if v.to_f64() != 0.0 {
                    break v;
                }
            })
            .collect()
    }
    /// f32 values uniform in [lo, hi).
    pub fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi) as f32).collect()
    }
}

/// AutoAWQ gemm packing, written here from the format's definition:
/// nibble i of packed column c holds column 8c + [0,2,4,6,1,3,5,7][i].
pub fn awq_pack(vals: &[u8], rows: usize, cols: usize) -> Vec<i32> {
    const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
    let pc = cols / 8;
    let mut out = vec![0i32; rows * pc];
    for r in 0..rows {
        for c in 0..pc {
            let mut w = 0u32;
            for (i, &o) in ORDER.iter().enumerate() {
                w |= (vals[r * cols + 8 * c + o] as u32 & 0xf) << (4 * i);
            }
            out[r * pc + c] = w as i32;
        }
    }
    out
}

/// The shape and storage of a paged-attention test case.
pub struct AttnCase {
    pub head_dim: usize,
    pub kv_heads: usize,
    pub heads: usize,
    pub block_len: usize,
    pub storage: lmq_kernels::KvStorage,
    pub static_mode: bool,
}

/// A two-layer pool whose sequence i holds positions `0..lens[i]` of random
/// K and V in [-1, 1) at layer 1, written by `kv_write`; `tables[i]` is
/// sequence i's block table, in reversed, interleaved order (never the
/// logical one). Static parameters (scale 2/255 to 3/255 in int8 units,
/// zero −1.2 to −0.9) are drawn whatever the mode, so the draws that
/// follow do not depend on it.
pub struct FilledPool {
    pub pool: lmq_kernels::DeviceKvPool,
    pub tables: Vec<Vec<u32>>,
}

pub fn filled_pool(dev: &GpuDevice, c: &AttnCase, lens: &[usize], rng: &mut Rng) -> FilledPool {
    use lmq_kernels::paged::kv_write;
    use lmq_kernels::{DeviceKvPool, KvLayout, KvStorage, RowMeta, RowPlace};
    let blocks_per_seq: Vec<usize> = lens.iter().map(|n| n.div_ceil(c.block_len)).collect();
    let num_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 3;
    let mut next = num_blocks as u32;
    let tables: Vec<Vec<u32>> = blocks_per_seq
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    next -= 1;
                    next
                })
                .collect()
        })
        .collect();
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        block_len: c.block_len,
        num_blocks,
        storage: c.storage,
    };
    let statics: Vec<f32> = (0..2 * 2 * c.kv_heads)
        .flat_map(|_| {
            [
                rng.uniform(2.0 / 255.0, 3.0 / 255.0) as f32,
                rng.uniform(-1.2, -0.9) as f32,
            ]
        })
        .collect();
    let statics = c.static_mode.then(|| {
        let levels = if c.storage == KvStorage::Int8 {
            255.0
        } else {
            15.0
        };
        statics
            .chunks(2)
            .flat_map(|p| [p[0] * 255.0 / levels, p[1]])
            .collect::<Vec<f32>>()
    });
    let mut pool = DeviceKvPool::new(dev, layout, statics.as_deref()).expect("pool");
    let fill: Vec<RowPlace> = lens
        .iter()
        .zip(&tables)
        .flat_map(|(&n, t)| (0..n).map(move |q| RowPlace { pos: q, table: t }))
        .collect();
    let fill_meta = RowMeta::with_prefill(dev, &fill, 0).expect("fill meta");
    let kd = c.kv_heads * c.head_dim;
    let k = dev
        .upload(&rng.values(fill.len() * kd, -1.0, 1.0), fill.len(), kd)
        .expect("k");
    let v = dev
        .upload(&rng.values(fill.len() * kd, -1.0, 1.0), fill.len(), kd)
        .expect("v");
    kv_write(dev, &mut pool, 1, &k, &v, &fill_meta).expect("kv_write");
    FilledPool { pool, tables }
}

/// The largest |a − b| over max(1, max|a|); NaN anywhere fails.
pub fn scaled_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        assert!(x.is_finite() && y.is_finite(), "non-finite output: {x} {y}");
        m.max((x - y).abs())
    }) / scale
}

/// A random 4-bit layer `k → n` in groups of `g` (scales 0.002–0.02),
/// with its dequantized weight `w[kk][j] = (q − z)·s` in f64, straight
/// from the definition.
pub struct W4Layer {
    pub packed: PackedW4,
    pub w: Vec<f64>,
}

pub fn random_w4_layer(rng: &mut Rng, k: usize, n: usize, g: usize) -> W4Layer {
    let groups = k / g;
    let q: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
    let z: Vec<u8> = (0..groups * n).map(|_| rng.below(16) as u8).collect();
    let s = rng.f16s(groups * n, 0.002, 0.02);
    let w = (0..k * n)
        .map(|i| {
            let (kk, j) = (i / n, i % n);
            let gi = (kk / g) * n + j;
            (q[i] as f64 - z[gi] as f64) * s[gi].to_f64()
        })
        .collect();
    let packed =
        PackedW4::from_awq(&awq_pack(&q, k, n), &awq_pack(&z, groups, n), &s, k, n, g).unwrap();
    W4Layer { packed, w }
}

/// A random 4-bit layer `k → n` in groups of `g` ([`random_w4_layer`]),
/// `m` rows of input, an optional bias, and the f64 reference `x · W + b`.
pub struct W4Draw {
    pub packed: PackedW4,
    pub x: Vec<f16>,
    pub bias: Option<Vec<f16>>,
    pub want: Vec<f64>,
}

pub fn draw_w4(rng: &mut Rng, m: usize, k: usize, n: usize, g: usize, bias: bool) -> W4Draw {
    let W4Layer { packed, w } = random_w4_layer(rng, k, n, g);
    let x = rng.f16s(m * k, -1.0, 1.0);
    let bias = bias.then(|| rng.f16s(n, -0.5, 0.5));
    let mut want = vec![0.0f64; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for kk in 0..k {
                acc += x[r * k + kk].to_f64() * w[kk * n + j];
            }
            want[r * n + j] = acc + bias.as_ref().map_or(0.0, |b| b[j].to_f64());
        }
    }
    W4Draw {
        packed,
        x,
        bias,
        want,
    }
}
