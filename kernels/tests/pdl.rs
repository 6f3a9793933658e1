//! Programmatic dependent launch (PDL) against a producer that is still
//! running: a W4A16 linear launched with PDL right after the op that
//! writes its input (`act::to_f16` or RMSNorm, which, like every op that
//! feeds a linear, let their dependant start at once) must read what the
//! producer wrote, never what the buffer held before; eagerly, and in a
//! recorded graph with the programmatic edge spliced in.
//!
//! Session 8 found the opposite on an H100: the classic kernels loaded x
//! with `__ldg`, and ptxas hoisted those loads above `griddepcontrol.wait`,
//! so the engine's greedy output changed from run to run. The op parity
//! tests could not see it, since they upload x with a copy and no producer
//! kernel overlaps the linear.
//!
//! Each round queues a few long linears first, so that the GPU is busy
//! and the next launches wait in its queue as in the engine (a test that
//! launches the linear only after the producer has finished sees no
//! overlap: the first form of this test passed on the racy kernels), then
//! poisons x's fp16 buffer with NaN on the device, runs the producer and
//! then the linear, and requires the output to equal, bit for bit, the
//! same linear launched without PDL. The kernels add their partial sums in a
//! fixed order, so the two runs must agree exactly. On GPUs before sm_90,
//! or without a GPU, the test reports itself skipped.

mod common;

use common::{device, Rng};
use half::f16;
use lmq_kernels::{act, GpuDevice, PackedW4, W4A16Linear, W4Kernel};

/// Producer-then-linear rounds per case: the race showed in most engine
/// runs, each of which has hundreds of such pairs.
const ROUNDS: usize = 300;

/// Long linears queued ahead of each round's producer.
const BUSY_CALLS: usize = 8;

/// GPU 0 where it has programmatic dependent launch (sm_90 and later);
/// `None`, reported as skipped, elsewhere.
fn pdl_device() -> Option<GpuDevice> {
    let dev = device()?;
    if dev.compute_capability() < (9, 0) {
        println!("skipped: programmatic dependent launch needs sm_90 or later");
        return None;
    }
    Some(dev)
}

/// A `k → n` 4-bit weight in groups of `g`: random codes and zeros, scales
/// in [0.002, 0.02).
fn random_packed(rng: &mut Rng, k: usize, n: usize, g: usize) -> PackedW4 {
    let mut words =
        |count: usize| -> Vec<i32> { (0..count).map(|_| rng.next_u64() as i32).collect() };
    let qweight = words(k * n / 8);
    let qzeros = words((k / g) * n / 8);
    let scales = rng.f16s((k / g) * n, 0.002, 0.02);
    PackedW4::from_awq(&qweight, &qzeros, &scales, k, n, g).expect("pack")
}

#[test]
fn pdl_linear_reads_what_its_producer_wrote() {
    let Some(dev) = pdl_device() else { return };
    let cases = [
        (1, 4096, 4096, 128, W4Kernel::Classic),
        (12, 576, 1536, 64, W4Kernel::Classic),
        (16, 11008, 4096, 128, W4Kernel::Classic),
        (1, 4096, 11008, 128, W4Kernel::ClassicEarly { warps: 8 }),
        (
            4,
            4096,
            4104,
            128,
            W4Kernel::Stream {
                warps: 8,
                stages: 4,
                blocks_per_sm: 1,
            },
        ),
    ];
    let mut rng = Rng(0x5eed_0008);
    // The busy work: 16 rows through an 11008 → 4096 linear, a few tens of
    // microseconds a call.
    let (bm, bk, bn, bg) = (16, 11008, 4096, 128);
    let busy = W4A16Linear::new(&dev, &random_packed(&mut rng, bk, bn, bg), None).expect("linear");
    let busy_x = dev
        .upload(&rng.f16s(bm * bk, -1.0, 1.0), bm, bk)
        .expect("upload");
    let mut busy_out = dev.uninit::<f32>(bm, bn).expect("alloc");
    for (m, k, n, g, kernel) in cases {
        let packed = random_packed(&mut rng, k, n, g);
        let mut plain = W4A16Linear::new(&dev, &packed, None).expect("linear");
        plain.set_kernel_kind(kernel).expect("kernel");
        let mut chained = W4A16Linear::new(&dev, &packed, None).expect("linear");
        chained.set_kernel_kind(kernel).expect("kernel");
        assert!(chained.set_pdl(true), "PDL refused on sm_90+");

        let x32 = dev
            .upload(&rng.values(m * k, -1.0, 1.0), m, k)
            .expect("upload");
        let norm_weight = dev.upload(&rng.values(k, 0.5, 1.5), k, 1).expect("upload");
        let mut normed = dev.uninit::<f32>(m, k).expect("alloc");
        let nans = dev.upload(&vec![f32::NAN; m * k], m, k).expect("upload");
        let mut x16 = dev.uninit::<f16>(m, k).expect("alloc");
        for producer in [Producer::ToF16, Producer::RmsNorm] {
            // The producer writes x16; RMSNorm (the engine's usual
            // producer) reduces over the row before it writes, which
            // leaves the early-started linear a wider window.
            let mut produce = |x16: &mut lmq_kernels::DeviceMatrix<f16>| match producer {
                Producer::ToF16 => act::to_f16(&dev, &x32, x16).expect("to_f16"),
                Producer::RmsNorm => {
                    act::rms_norm(&dev, &x32, &norm_weight, 1e-5, &mut normed, Some(x16))
                        .expect("rms_norm")
                }
            };
            produce(&mut x16);
            let mut out = dev.uninit::<f32>(m, n).expect("alloc");
            plain.forward(&dev, &x16, &mut out).expect("plain linear");
            let want = dev.download(&out).expect("download");
            assert!(want.iter().all(|v| v.is_finite()), "reference not finite");

            let mut differing = 0;
            let mut first = None;
            for round in 0..ROUNDS {
                for _ in 0..BUSY_CALLS {
                    busy.forward(&dev, &busy_x, &mut busy_out)
                        .expect("busy linear");
                }
                act::to_f16(&dev, &nans, &mut x16).expect("poison");
                produce(&mut x16);
                chained.forward(&dev, &x16, &mut out).expect("PDL linear");
                let got = dev.download(&out).expect("download");
                if got
                    .iter()
                    .zip(&want)
                    .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    differing += 1;
                    first.get_or_insert(round);
                }
            }
            let what = format!("m{m} k{k} n{n} g{g} {kernel:?} after {producer:?}");
            println!("{what}: {differing} of {ROUNDS} PDL rounds differ");
            assert_eq!(
                differing, 0,
                "{what}: {differing} of {ROUNDS} rounds with PDL differ from the plain launch \
                 (first: round {first:?}); the linear read x before its producer wrote it"
            );
        }
    }
}

/// The kernel that writes the linear's input; both let their dependant
/// launch at their start.
#[derive(Debug, Clone, Copy)]
enum Producer {
    ToF16,
    RmsNorm,
}

/// The graph form (`graph_pdl.rs`): a recording of RMSNorm (the producer),
/// a dropped buffer (a free node between the two) and a 4-bit linear whose
/// output is allocated after it, spliced so that the linear depends on the
/// norm programmatically. The splice must take (one programmatic edge,
/// checked by `end_pdl_splice` itself), and every replay must give the
/// eager output bit for bit. Each replay first fills x's fp16 buffer with
/// NaN inside the graph (graph memory keeps its contents between replays,
/// so without that a linear reading early would find the last replay's
/// correct values).
#[test]
fn spliced_graph_matches_eager_launches() {
    let Some(dev) = pdl_device() else { return };
    let (m, k, n, g) = (1, 4096, 11008, 128);
    let mut rng = Rng(0x5eed_0009);
    let mut linear =
        W4A16Linear::new(&dev, &random_packed(&mut rng, k, n, g), None).expect("linear");
    assert!(linear.set_pdl(true), "PDL refused on sm_90+");
    let x32 = dev
        .upload(&rng.values(m * k, -1.0, 1.0), m, k)
        .expect("upload");
    let weight = dev.upload(&rng.values(k, 0.5, 1.5), k, 1).expect("upload");
    let nans = dev.upload(&vec![f32::NAN; m * k], m, k).expect("upload");

    // Eager: the norm, then the linear.
    let mut normed = dev.uninit::<f32>(m, k).expect("alloc");
    let mut x16 = dev.uninit::<f16>(m, k).expect("alloc");
    act::rms_norm(&dev, &x32, &weight, 1e-5, &mut normed, Some(&mut x16)).expect("norm");
    let mut out = dev.uninit::<f32>(m, n).expect("alloc");
    linear.forward(&dev, &x16, &mut out).expect("linear");
    let want = dev.download(&out).expect("download");
    assert!(
        want.iter().all(|v| v.is_finite()),
        "eager output not finite"
    );

    let before = dev.pdl_splices();
    let mut result = dev.zeros::<f32>(m, n).expect("alloc");
    let (mut graph, ()) = dev
        .record(|| -> Result<(), lmq_kernels::KernelError> {
            let mut normed = dev.uninit::<f32>(m, k)?;
            let mut x16 = dev.uninit::<f16>(m, k)?;
            act::to_f16(&dev, &nans, &mut x16)?;
            act::rms_norm(&dev, &x32, &weight, 1e-5, &mut normed, Some(&mut x16))?;
            drop(normed);
            let mut splice = dev.begin_pdl_splice()?.expect("the splice applies");
            let mut out = dev.uninit::<f32>(m, n)?;
            dev.link_pdl_splice(&mut splice)?;
            linear.forward_plain(&dev, &x16, &mut out)?;
            dev.end_pdl_splice(splice)?;
            dev.copy(&mut result, &out)
        })
        .expect("recording");
    assert_eq!(
        dev.pdl_splices(),
        before + 1,
        "one programmatic edge spliced"
    );
    let mut differing = 0;
    for _ in 0..ROUNDS / 3 {
        for _ in 0..BUSY_CALLS {
            linear.forward(&dev, &x16, &mut out).expect("busy linear");
        }
        dev.fill(&mut result, f32::NAN).expect("poison");
        graph.launch().expect("replay");
        let got = dev.download(&result).expect("download");
        if got
            .iter()
            .zip(&want)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            differing += 1;
        }
    }
    println!(
        "spliced graph: {differing} of {} replays differ",
        ROUNDS / 3
    );
    assert_eq!(
        differing, 0,
        "replays of the spliced graph differ from eager launches"
    );
}
