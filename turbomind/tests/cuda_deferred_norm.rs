//! The CUDA backend's deferred norm (`CudaBackend::set_deferred_norm`):
//! `Backend::linear_add_rms_norm` with the norm carried by the 4-bit
//! linears around it, against the same op run as a product and
//! `add_rms_norm` (the default), and both against the CPU backend with
//! fp16-rounded linear inputs (the GPU's numerics). Through the ops the
//! model calls after a norm:
//! - the residual is identical bit for bit (the same fp32 add);
//! - a 4-bit linear (q/k/v shape, with and without a bias) and the
//!   interleaved gate/up with `silu(gate) · up`, which take the norm's
//!   factor in their launch, and a dense linear, which materializes the
//!   norm's values first, stay within 2e-3 of the unfused path and of the
//!   CPU (the rounding moves from `fp16(r · inv · w)` to `fp16(r · w)`);
//! - gate/up stored `[gate | up]` (`set_fused_silu(false)`) gives the
//!   interleaved launch's bits;
//! - the normed values read back (`to_host`, which materializes a
//!   deferred norm's output) match too;
//! - the norm is deferred on decode rows and only there: rows beyond one
//!   decode launch (24) take the two ops, bit for bit. The norm's weights
//!   exceed 1, so its output carries the power-of-two scale (k = 1).
//!
//! Without a GPU the test prints that it was skipped and passes.

mod tiny;

use lmq_kernels::GpuDevice;
use lmq_turbomind::backend::cpu::{CpuBackend, CpuOptions, Matrix, W4Activations};
use lmq_turbomind::backend::cuda::{CudaAct, CudaBackend};
use lmq_turbomind::backend::{Backend, HostLinear, HostWeight};
use tiny::{random_awq, Rng};

fn awq_linear(rng: &mut Rng, k: usize, n: usize, g: usize, bias: bool) -> HostLinear {
    HostLinear {
        weight: HostWeight::Awq(random_awq(rng, k, n, g)),
        out_features: n,
        in_features: k,
        bias: bias.then(|| (0..n).map(|_| rng.uniform(-0.5, 0.5) as f32).collect()),
    }
}

fn dense_linear(rng: &mut Rng, k: usize, n: usize) -> HostLinear {
    HostLinear {
        weight: HostWeight::Dense((0..k * n).map(|_| rng.uniform(-0.1, 0.1) as f32).collect()),
        out_features: n,
        in_features: k,
        bias: None,
    }
}

/// Largest difference over the largest magnitude of `want` (at least 1).
fn scale_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f64, |m, &w| m.max((w as f64).abs()));
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
        assert!(g.is_finite(), "non-finite value {g}");
        m.max((g as f64 - w as f64).abs())
    }) / scale
}

/// The layers after a norm, uploaded to one backend.
struct After<B: Backend> {
    o: B::Linear,
    qkv: B::Linear,
    qkv_bias: B::Linear,
    gate_up: B::Linear,
    dense: B::Linear,
    norm: B::Vector,
}

struct Hosts {
    o: HostLinear,
    qkv: HostLinear,
    qkv_bias: HostLinear,
    gate_up: HostLinear,
    dense: HostLinear,
    norm: Vec<f32>,
}

fn upload<B: Backend>(b: &B, h: &Hosts) -> After<B> {
    After {
        o: b.upload_linear(h.o.clone()).unwrap(),
        qkv: b.upload_linear(h.qkv.clone()).unwrap(),
        qkv_bias: b.upload_linear(h.qkv_bias.clone()).unwrap(),
        gate_up: b.upload_gate_up(h.gate_up.clone()).unwrap(),
        dense: b.upload_linear(h.dense.clone()).unwrap(),
        norm: b.upload_vector(h.norm.clone()).unwrap(),
    }
}

/// The residual after the add, and the outputs of the four consumers.
fn run<B: Backend>(b: &B, l: &After<B>, x: B::Act, mut residual: B::Act) -> Vec<Vec<f32>> {
    let h = b
        .linear_add_rms_norm(&x, &l.o, &mut residual, &l.norm, 1e-5)
        .unwrap();
    vec![
        b.to_host(&residual).unwrap(),
        b.to_host(&b.linear(&h, &l.qkv).unwrap()).unwrap(),
        b.to_host(&b.linear(&h, &l.qkv_bias).unwrap()).unwrap(),
        b.to_host(&b.gate_up_silu(&h, &l.gate_up).unwrap()).unwrap(),
        b.to_host(&b.linear(&h, &l.dense).unwrap()).unwrap(),
        b.to_host(&h).unwrap(),
    ]
}

#[test]
fn deferred_norm_matches_two_ops_and_cpu() {
    if !GpuDevice::is_available() {
        eprintln!("skipped: no CUDA driver/GPU found");
        return;
    }
    let plain = CudaBackend::new(0).expect("CUDA backend");
    plain.set_deferred_norm(false);
    let deferred = CudaBackend::new(0).expect("CUDA backend");
    deferred.set_deferred_norm(true);
    // Gate and up stored apart (`LMQ_FUSED_SILU=0`): the scaled product,
    // then SiLU·mul, which must give the paired launch's bits.
    let unpaired = CudaBackend::new(0).expect("CUDA backend");
    unpaired.set_deferred_norm(true);
    unpaired.set_fused_silu(false);
    let cpu = CpuBackend::with_options(CpuOptions {
        w4_activations: W4Activations::F16,
    });
    let names = [
        "residual",
        "q/k/v",
        "q/k/v + bias",
        "silu(gate)·up",
        "dense",
        "normed values",
    ];
    let mut rng = Rng(0xdef0);
    for (q_dim, d, inter, g) in [
        (256usize, 320usize, 448usize, 64usize),
        (512, 256, 384, 128),
    ] {
        let hosts = Hosts {
            o: awq_linear(&mut rng, q_dim, d, g, false),
            qkv: awq_linear(&mut rng, d, 2 * q_dim, g, false),
            qkv_bias: awq_linear(&mut rng, d, q_dim + 64, g, true),
            gate_up: HostLinear::stack_outputs(&[
                &awq_linear(&mut rng, d, inter, g, false),
                &awq_linear(&mut rng, d, inter, g, false),
            ])
            .expect("stackable"),
            dense: dense_linear(&mut rng, d, 96),
            norm: (0..d).map(|_| rng.uniform(0.5, 1.5) as f32).collect(),
        };
        let (lp, ld, lu, lc) = (
            upload(&plain, &hosts),
            upload(&deferred, &hosts),
            upload(&unpaired, &hosts),
            upload(&cpu, &hosts),
        );
        for m in [1usize, 7, 16, 24] {
            let x: Vec<f32> = (0..m * q_dim)
                .map(|_| rng.uniform(-1.0, 1.0) as f32)
                .collect();
            let r: Vec<f32> = (0..m * d).map(|_| rng.uniform(-3.0, 3.0) as f32).collect();
            let on_gpu = |b: &CudaBackend, l| {
                let dev = b.device();
                let xa = dev.upload(&x, m, q_dim).unwrap().into();
                let ra = dev.upload(&r, m, d).unwrap().into();
                run(b, l, xa, ra)
            };
            let a = on_gpu(&plain, &lp);
            let b = on_gpu(&deferred, &ld);
            let u = on_gpu(&unpaired, &lu);
            // The norm was deferred on decode rows (else every comparison
            // here would hold trivially), and only there.
            let deferred_here = |b: &CudaBackend, l: &After<CudaBackend>| {
                let dev = b.device();
                let xa: CudaAct = dev.upload(&x, m, q_dim).unwrap().into();
                let mut ra: CudaAct = dev.upload(&r, m, d).unwrap().into();
                b.linear_add_rms_norm(&xa, &l.o, &mut ra, &l.norm, 1e-5)
                    .unwrap()
                    .deferred_norm()
                    .is_some()
            };
            assert_eq!(deferred_here(&deferred, &ld), m <= 16, "{m} rows deferred?");
            assert!(!deferred_here(&plain, &lp), "{m} rows deferred with it off");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            if m <= 16 {
                assert_eq!(
                    bits(&u[3]),
                    bits(&b[3]),
                    "{m} rows: [gate | up] differs from pairs"
                );
            }
            let c = run(
                &cpu,
                &lc,
                Matrix {
                    data: x.clone(),
                    rows: m,
                    cols: q_dim,
                },
                Matrix {
                    data: r.clone(),
                    rows: m,
                    cols: d,
                },
            );
            for (i, name) in names.iter().enumerate() {
                let what = format!("{q_dim}->{d} g{g}, {m} rows, {name}");
                if i == 0 || m > 16 {
                    assert_eq!(bits(&a[i]), bits(&b[i]), "{what}: differs from the two ops");
                }
                let (vs_plain, vs_cpu) = (scale_err(&b[i], &a[i]), scale_err(&b[i], &c[i]));
                let plain_vs_cpu = scale_err(&a[i], &c[i]);
                eprintln!(
                    "{what}: {vs_plain:.2e} from the two ops, {vs_cpu:.2e} from the CPU \
                     (two ops: {plain_vs_cpu:.2e})"
                );
                assert!(
                    vs_plain <= 2e-3 && vs_cpu <= 2e-3,
                    "{what}: deferred norm off"
                );
            }
        }
    }
}
