//! The gate/up layer with its tiles interleaved (`PackedW4::interleave_halves`)
//! and `silu(gate) · up` stored by the W4A16 kernel itself
//! (`W4A16Linear::forward_silu_pairs`), against the two launches it
//! replaces: the stacked `[gate | up]` layer's product, then
//! `act::silu_mul_halves`. Both the fp32 result and its fp16 copy must be
//! identical bit for bit (same sums in the same order, same expression),
//! for group sizes 32, 64 and 128, 1 to 16 rows (one and two token halves),
//! K with a padded k-block, with and without a bias (permuted the same
//! way) and with and without PDL. The interleaved layer's plain product
//! followed by `act::silu_mul_pairs` (the prefill path) must match too.
//! A streaming kernel, which does not store pairs, is refused.
//!
//! Without a CUDA GPU the test prints "skipped: no CUDA device" and passes.

mod common;

use common::{awq_pack, device, Rng};
use half::f16;
use lmq_kernels::{act, GpuDevice, PackedW4, W4A16Linear, W4Kernel};

fn packed(rng: &mut Rng, k: usize, n: usize, g: usize) -> PackedW4 {
    let groups = k / g;
    let q: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
    let z: Vec<u8> = (0..groups * n).map(|_| rng.below(16) as u8).collect();
    let s = rng.f16s(groups * n, 0.002, 0.03);
    PackedW4::from_awq(&awq_pack(&q, k, n), &awq_pack(&z, groups, n), &s, k, n, g).expect("pack")
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits16(v: &[f16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check(dev: &GpuDevice, k: usize, half: usize, g: usize, with_bias: bool, seed: u64) {
    let mut rng = Rng(seed);
    let n = 2 * half;
    let stacked = packed(&mut rng, k, n, g);
    let paired = stacked.interleave_halves().expect("interleave");
    let bias = with_bias.then(|| rng.f16s(n, -0.5, 0.5));
    let paired_bias = bias.as_ref().map(|b| {
        let mut p = vec![f16::ZERO; n];
        for (c, &v) in b.iter().enumerate() {
            p[PackedW4::interleaved_column(n, c)] = v;
        }
        p
    });
    let mut reference = W4A16Linear::new(dev, &stacked, bias.as_deref()).expect("upload");
    let mut fused = W4A16Linear::new(dev, &paired, paired_bias.as_deref()).expect("upload");
    for m in [1usize, 3, 8, 9, 16] {
        let x = dev.upload(&rng.f16s(m * k, -1.0, 1.0), m, k).unwrap();
        for pdl in [false, true] {
            reference.set_pdl(pdl);
            fused.set_pdl(pdl);
            let what = format!("K {k}, gate/up {half}, g{g}, bias {with_bias}, M {m}, PDL {pdl}");
            // The two launches.
            let mut gu = dev.zeros::<f32>(m, n).unwrap();
            reference
                .forward(dev, &x, &mut gu)
                .expect("stacked product");
            let mut want = dev.zeros::<f32>(m, half).unwrap();
            let mut want_h = dev.zeros::<f16>(m, half).unwrap();
            act::silu_mul_halves(dev, &gu, &mut want, Some(&mut want_h)).expect("silu_mul");
            let (want, want_h) = (dev.download(&want).unwrap(), dev.download(&want_h).unwrap());
            assert!(
                want.iter().all(|v| v.is_finite()),
                "{what}: reference not finite"
            );
            // One launch, outputs poisoned first.
            let mut got = dev.zeros::<f32>(m, half).unwrap();
            dev.fill(&mut got, f32::NAN).unwrap();
            let mut got_h = dev.zeros::<f16>(m, half).unwrap();
            dev.fill(&mut got_h, f16::NAN).unwrap();
            fused
                .forward_silu_pairs(dev, &x, &mut got, Some(&mut got_h), true, None)
                .expect("fused launch");
            assert_eq!(
                bits32(&dev.download(&got).unwrap()),
                bits32(&want),
                "{what}: fp32"
            );
            assert_eq!(
                bits16(&dev.download(&got_h).unwrap()),
                bits16(&want_h),
                "{what}: fp16"
            );
            // The interleaved product, then the pair-aware SiLU·mul.
            let mut gu_paired = dev.zeros::<f32>(m, n).unwrap();
            fused
                .forward(dev, &x, &mut gu_paired)
                .expect("interleaved product");
            let mut alt = dev.zeros::<f32>(m, half).unwrap();
            act::silu_mul_pairs(dev, &gu_paired, &mut alt, None).expect("silu_mul_pairs");
            assert_eq!(
                bits32(&dev.download(&alt).unwrap()),
                bits32(&want),
                "{what}: interleaved product + silu_mul_pairs"
            );
        }
        println!("K {k}, gate/up {half}, g{g}, bias {with_bias}, M {m}: identical");
    }
}

#[test]
fn fused_silu_pairs_match_two_launches() {
    let Some(dev) = device() else { return };
    let mut seed = 0x0511_u64;
    for (k, half, g) in [
        (256usize, 64usize, 128usize),
        (576, 1536, 64),
        (320, 40, 32),
        (4096, 11008, 128),
    ] {
        for with_bias in [false, true] {
            seed += 1;
            check(&dev, k, half, g, with_bias, seed);
        }
    }
}

#[test]
fn streaming_kernel_is_refused() {
    let Some(dev) = device() else { return };
    let mut rng = Rng(7);
    let paired = packed(&mut rng, 256, 64, 128).interleave_halves().unwrap();
    let mut l = W4A16Linear::new(&dev, &paired, None).unwrap();
    l.set_kernel_kind(W4Kernel::Stream {
        warps: 8,
        stages: 4,
        blocks_per_sm: 2,
    })
    .unwrap();
    let x = dev.upload(&rng.f16s(256, -1.0, 1.0), 1, 256).unwrap();
    let mut out = dev.zeros::<f32>(1, 32).unwrap();
    assert!(l
        .forward_silu_pairs(&dev, &x, &mut out, None, false, None)
        .is_err());
    // And a plain-product-sized output is a shape error for the pair store.
    let mut wide = dev.zeros::<f32>(1, 64).unwrap();
    l.set_kernel_kind(W4Kernel::Classic).unwrap();
    assert!(l
        .forward_silu_pairs(&dev, &x, &mut wide, None, false, None)
        .is_err());
}
