//! The CUDA backend against the CPU backend and the f64 reference, in the
//! manner of ggml's test-backend-ops: fresh seeded random inputs per case,
//! shapes with odd sizes and several GQA ratios, NaN checks, and a stated
//! error bound per op. Without a GPU every test prints that it was skipped
//! and passes; on a GPU machine run `cargo test --release -p lmq-turbomind
//! --test cuda_backend` (scripts/gpu-check.sh does).
//!
//! Bounds, as `|got − want| / (1 + |want|)`:
//! - whole tiny models (fp16 weights), fp32 KV, against the CPU backend
//!   with each linear's input rounded to fp16 (the GPU's numerics emulated
//!   on the CPU; the plain CPU keeps fp32 inputs): the largest logit
//!   difference over the largest logit at most 2e-3. Rounding alone moves
//!   these models by 1.3e-4–8.7e-4 on that scale (emulation against the
//!   plain CPU, printed by `fp16_input_rounding_noise`); an H200 measured
//!   1.4e-4–4.3e-4 against the emulation. (Per logit, relative to each
//!   value, both reach 3e-2 against the f64 reference: these random models
//!   have logits of ±15, so the few near zero dominate that measure.)
//! - KV write + attention against the CPU backend, same inputs: 1e-4 for
//!   fp32/fp16 KV and 1e-3 for int8/int4 (codes are identical; only
//!   summation order and the fast exponential differ);
//! - W4 linear against the CPU's AWQ linear: 2e-3 (fp16 input rounding).

mod tiny;

use lmq_kernels::GpuDevice;
use lmq_turbomind::backend::cpu::{CpuOptions, Matrix, W4Activations};
use lmq_turbomind::backend::cuda::{CudaAct, CudaBackend};
use lmq_turbomind::backend::{
    split_qkv_rope_apart, AttnShape, Backend, HostLinear, HostWeight, KvPoolSpec, SeqSpan,
};
use lmq_turbomind::config::RopeScaling;
use lmq_turbomind::quant::kv::{KvCacheConfig, KvStaticParams};
use lmq_turbomind::rope::Rope;
use std::sync::Arc;
use tiny::*;

fn gpu() -> Option<CudaBackend> {
    if !GpuDevice::is_available() {
        eprintln!("skipped: no CUDA driver/GPU found");
        return None;
    }
    Some(CudaBackend::new(0).unwrap_or_else(|e| panic!("opening the CUDA backend: {e}")))
}

fn upload(b: &CudaBackend, m: &Matrix) -> CudaAct {
    b.device().upload(&m.data, m.rows, m.cols).unwrap().into()
}

fn random_matrix(rng: &mut Rng, rows: usize, cols: usize, scale: f64) -> Matrix {
    Matrix {
        data: (0..rows * cols)
            .map(|_| rng.uniform(-scale, scale) as f32)
            .collect(),
        rows,
        cols,
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g as f64 - w as f64).abs() / (1.0 + (w as f64).abs())
        })
        .fold(0.0, f64::max)
}

fn spec_hd(heads: usize, kv_heads: usize, hd: usize, layers: usize, seed: u64) -> Spec {
    Spec {
        class: "LlamaForCausalLM",
        model_type: "llama",
        hidden: heads * hd,
        intermediate: 3 * hd + 40,
        layers,
        heads,
        kv_heads,
        head_dim: None,
        vocab: 301,
        qkv_bias: false,
        tie: true,
        rope_theta: 10000.0,
        rope_scaling: None,
        eps: 1e-5,
        max_pos: 600,
        // fp16 weights, which both backends hold exactly (the GPU stores
        // dense weights as fp16), so that the comparison sees activation
        // rounding only.
        dtype: WDtype::F16,
        seed,
    }
}

/// The tiny models: GQA 9/3 (SmolLM2's ratio), 12/1 (more query heads per
/// KV head than one block handles) over 300 tokens (the split-K path), and
/// MHA with Qwen2's biases at head_dim 128.
fn tiny_specs() -> Vec<(Spec, usize)> {
    let mut qwen = spec_hd(2, 2, 128, 2, 5);
    qwen.class = "Qwen2ForCausalLM";
    qwen.model_type = "qwen2";
    qwen.qkv_bias = true;
    qwen.tie = false;
    vec![
        (spec_hd(9, 3, 64, 2, 1), 23),
        (spec_hd(12, 1, 64, 1, 2), 300),
        (qwen, 37),
    ]
}

/// The CPU reference: fp32 activations into every linear. The CPU's fast
/// 4-bit path quantizes activations to int8, which the GPU's W4A16 kernel
/// does not, so it is not a reference for the GPU.
fn exact_cpu() -> CpuBackend {
    CpuBackend::with_options(CpuOptions {
        w4_activations: W4Activations::F32,
    })
}

/// The CPU backend with every linear's input rounded to fp16 first
/// (`W4Activations::F16`): what the CUDA backend computes (fp16 × fp16
/// products, fp32 sums), emulated on the CPU, to tell a GPU bug from the
/// cost of rounding activations.
fn fp16_input_cpu() -> CpuBackend {
    CpuBackend::with_options(CpuOptions {
        w4_activations: W4Activations::F16,
    })
}

/// Runs a tiny model (prefill all but 3 tokens, then decode them) and
/// returns every row's logits.
fn run_tiny<B: Backend>(dir: &Path, backend: B, tokens: &[u32]) -> Vec<f32> {
    let mut model = Model::load(dir, backend).unwrap();
    model.set_kv_cache(KvDtype::F32, KvMode::Online).unwrap();
    let mut cache = model.new_solo_cache(tokens.len()).unwrap();
    let split = tokens.len() - 3;
    let mut got = model
        .forward_solo(&mut cache, &tokens[..split], LogitsWanted::All)
        .unwrap();
    for &t in &tokens[split..] {
        got.extend(
            model
                .forward_solo(&mut cache, &[t], LogitsWanted::All)
                .unwrap(),
        );
    }
    got
}

/// Largest absolute difference over the largest magnitude of `want`: these
/// tiny models' logits span about ±15, so an error relative to each logit
/// would be dominated by the few near zero.
fn scale_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "logit counts differ");
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs()));
    let diff = got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
        assert!(g.is_finite(), "non-finite logit {g}");
        m.max((g as f64 - w as f64).abs())
    });
    diff / scale.max(1e-12)
}

/// How far rounding the linears' inputs to fp16 alone moves these tiny
/// models' logits (the CPU emulation against the plain CPU backend): the
/// noise scale the GPU is held to below.
#[test]
fn fp16_input_rounding_noise() {
    for (spec, len) in tiny_specs() {
        let fx = fixture(spec);
        let tokens = Rng(3).tokens(len, 301);
        let emul = run_tiny(fx.dir.path(), fp16_input_cpu(), &tokens);
        let exact = run_tiny(fx.dir.path(), exact_cpu(), &tokens);
        let noise = scale_err(&emul, &exact);
        eprintln!(
            "{}: fp16 input rounding moves logits by {noise:.2e} of their scale",
            fx.spec.model_type
        );
        assert!(
            noise > 0.0 && noise < 5e-3,
            "unexpected rounding noise {noise:.2e}"
        );
    }
}

/// Whole tiny models on the GPU (fp32 KV) against the CPU emulation of its
/// numerics, and, for scale, against the f64 reference.
#[test]
fn whole_model_matches_cpu_emulation() {
    let Some(gpu) = gpu() else { return };
    drop(gpu);
    for (spec, len) in tiny_specs() {
        let fx = fixture(spec);
        let tokens = Rng(3).tokens(len, 301);
        let want = reference_logits(&fx.spec, &fx.weights, None, &tokens).concat();
        let emul = run_tiny(fx.dir.path(), fp16_input_cpu(), &tokens);
        let got = run_tiny(fx.dir.path(), CudaBackend::new(0).unwrap(), &tokens);
        let exact = run_tiny(fx.dir.path(), exact_cpu(), &tokens);
        let vs_emul = scale_err(&got, &emul);
        let noise = scale_err(&emul, &exact);
        let (vs_ref, _) = max_err(&got, &want);
        eprintln!(
            "{} heads {}/{} len {len}: against the emulation {vs_emul:.2e} of the logit scale (rounding noise {noise:.2e}), against the reference {vs_ref:.2e} (scaled per logit)",
            fx.spec.model_type, fx.spec.heads, fx.spec.kv_heads
        );
        assert!(
            vs_emul <= 2e-3,
            "CUDA model differs from the CPU emulation by {vs_emul:.2e} of the logit scale (noise {noise:.2e})"
        );
    }
}

/// Decode steps replayed from recorded CUDA graphs give the same logits,
/// bit for bit, as the same steps run op by op: the graphs launch the same
/// kernels on the same inputs. The 300-token model decodes across the
/// attention's split boundary (position 256), which records a new graph.
#[test]
fn decode_graphs_match_eager_steps_bit_for_bit() {
    if gpu().is_none() {
        return;
    }
    for (spec, len) in tiny_specs() {
        let fx = fixture(spec);
        let tokens = Rng(5).tokens(len, 301);
        let decode = 12.min(len - 1);
        let split = if len > 256 { 250 } else { len - decode };
        let mut runs = Vec::new();
        for graphs in [true, false] {
            let backend = CudaBackend::new(0).unwrap();
            backend.set_graphs(graphs);
            let mut model = Model::load(fx.dir.path(), backend).unwrap();
            model.set_kv_cache(KvDtype::F16, KvMode::Online).unwrap();
            let mut cache = model.new_solo_cache(tokens.len()).unwrap();
            model
                .forward_solo(&mut cache, &tokens[..split], LogitsWanted::None)
                .unwrap();
            let mut got = Vec::new();
            for &t in &tokens[split..] {
                got.extend(
                    model
                        .forward_solo(&mut cache, &[t], LogitsWanted::Last)
                        .unwrap(),
                );
            }
            let recorded = model.backend().recorded_graphs();
            assert_eq!(recorded > 0, graphs, "graphs recorded: {recorded}");
            runs.push(got);
        }
        assert!(runs[0].iter().all(|v| v.is_finite()));
        assert!(
            runs[0] == runs[1],
            "{}: graph replays differ from eager steps",
            fx.spec.model_type
        );
    }
}

/// Spans over a shared pool: sequences in interleaved, reversed blocks;
/// one prefilling 290 rows at once (split-K), others decoding one row at
/// long and short positions.
fn batch_spans(block_len: usize) -> (Vec<SeqSpan>, usize) {
    let plan = [(0usize, 290usize), (517, 1), (3, 1), (40, 7)];
    let mut spans = Vec::new();
    let mut row = 0;
    let mut next_block = 0u32;
    for &(start, len) in &plan {
        let n = (start + len).div_ceil(block_len) as u32;
        // Every other block, backwards: never the logical order.
        let blocks: Vec<u32> = (0..n).rev().map(|i| next_block + 2 * i).collect();
        next_block += 2 * n + 1;
        spans.push(SeqSpan {
            rows: row..row + len,
            start_pos: start,
            blocks,
        });
        row += len;
    }
    (spans, next_block as usize + 1)
}

fn static_params(layers: usize, heads: usize, hd: usize, rng: &mut Rng) -> KvStaticParams {
    let table = |rng: &mut Rng, lo: f64, hi: f64| {
        (0..layers)
            .map(|_| (0..heads).map(|_| rng.uniform(lo, hi) as f32).collect())
            .collect::<Vec<Vec<f32>>>()
    };
    KvStaticParams {
        k_scale: table(rng, 2.0 / 255.0, 3.0 / 255.0),
        k_zero: table(rng, -1.2, -0.9),
        v_scale: table(rng, 2.0 / 255.0, 3.0 / 255.0),
        v_zero: table(rng, -1.2, -0.9),
        // Per-channel key factors spread over a decade, as calibrated ones
        // are (the smooth mode divides keys by them).
        k_smooth: (0..layers)
            .map(|_| {
                (0..heads * hd)
                    .map(|_| rng.uniform(0.3, 3.0) as f32)
                    .collect()
            })
            .collect(),
        // Key offsets on the first layer only, so that both a layer with
        // them and one without (an older checkpoint's) are compared.
        k_shift: (0..layers)
            .map(|l| {
                if l == 0 {
                    (0..heads * hd)
                        .map(|_| rng.uniform(-0.5, 0.5) as f32)
                        .collect()
                } else {
                    Vec::new()
                }
            })
            .collect(),
        levels: 255.0,
    }
}

/// The KV write and paged attention, every storage and mode, against the
/// CPU backend on identical inputs, for each compiled head_dim and
/// several GQA ratios. The history of every sequence is written first
/// (as earlier steps would have), then this step's rows.
#[test]
fn paged_attention_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = exact_cpu();
    let block_len = 16;
    let (spans, num_blocks) = batch_spans(block_len);
    let mut rng = Rng(11);
    for &(heads, kv_heads, hd) in &[
        (9, 3, 64),
        (8, 8, 64),
        (12, 1, 128),
        (2, 2, 128),
        (4, 2, 256),
    ] {
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            num_layers: 2,
        };
        let statics = Arc::new(static_params(2, kv_heads, hd, &mut rng));
        // With LMQ_PREFILL_ATTN=always the 290-row prompt below goes to the
        // prefill kernel, which rounds q, the softmax weights and (integer
        // storage) the dequantized keys and values to fp16: fp16 storage
        // then gets the integer kernels' bound and integer storage twice it.
        let prefill = std::env::var("LMQ_PREFILL_ATTN").is_ok_and(|v| v == "always");
        let (f16_tol, int_factor) = if prefill { (1e-3, 2.0) } else { (1e-4, 1.0) };
        for (dtype, mode, tol) in [
            (KvDtype::F32, KvMode::Online, 1e-4),
            (KvDtype::F16, KvMode::Online, f16_tol),
            (KvDtype::Int8, KvMode::Online, 1e-3 * int_factor),
            (KvDtype::Int4, KvMode::Online, 1e-3 * int_factor),
            (KvDtype::Int8, KvMode::Static, 1e-3 * int_factor),
            (KvDtype::Int4, KvMode::Static, 1e-3 * int_factor),
            // The smooth mode multiplies queries by the key factors (here
            // up to 3) before the integer kernel rounds them to fp16, so
            // its bound is the integer modes' times 3.
            (KvDtype::Int8, KvMode::Smooth, 3e-3 * int_factor),
            (KvDtype::Int4, KvMode::Smooth, 3e-3 * int_factor),
        ] {
            let spec = KvPoolSpec {
                shape,
                config: KvCacheConfig {
                    dtype,
                    mode,
                    static_params: Some(statics.clone()),
                },
                num_blocks,
                block_len,
            };
            let mut cpu_pool = cpu.new_kv_pool(&spec).unwrap();
            let mut gpu_pool = gpu.new_kv_pool(&spec).unwrap();
            let layer = 1;
            // History: positions 0..start of each sequence, one span each.
            let history: Vec<SeqSpan> = spans
                .iter()
                .filter(|s| s.start_pos > 0)
                .scan(0, |row, s| {
                    let span = SeqSpan {
                        rows: *row..*row + s.start_pos,
                        start_pos: 0,
                        blocks: s.blocks.clone(),
                    };
                    *row += s.start_pos;
                    Some(span)
                })
                .collect();
            let total: usize = spans.iter().map(|s| s.len()).sum();
            for (step, rows) in [
                (&history, history.iter().map(|s| s.len()).sum::<usize>()),
                (&spans, total),
            ] {
                let kd = shape.kv_dim();
                let k = random_matrix(&mut rng, rows, kd, 1.0);
                let v = random_matrix(&mut rng, rows, kd, 1.0);
                cpu.write_kv(layer, &k, &v, &mut cpu_pool, step).unwrap();
                gpu.write_kv(
                    layer,
                    &upload(&gpu, &k),
                    &upload(&gpu, &v),
                    &mut gpu_pool,
                    step,
                )
                .unwrap();
            }
            let q = random_matrix(&mut rng, total, heads * hd, 1.0);
            let want = cpu.attention(layer, &q, &cpu_pool, &spans, &shape).unwrap();
            let got = gpu
                .attention(layer, &upload(&gpu, &q), &gpu_pool, &spans, &shape)
                .unwrap();
            let err = rel_err(&gpu.to_host(&got).unwrap(), &want.data);
            eprintln!(
                "attention {heads}/{kv_heads} hd {hd} {} {}: max err {err:.2e}",
                dtype.as_str(),
                mode.as_str()
            );
            assert!(
                err <= tol,
                "{} {} differs by {err:.2e}",
                dtype.as_str(),
                mode.as_str()
            );
        }
    }
}

/// A bad block table is an error, not an out-of-bounds launch.
#[test]
fn attention_rejects_blocks_outside_the_pool() {
    let Some(gpu) = gpu() else { return };
    let shape = AttnShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 64,
        num_layers: 1,
    };
    let spec = KvPoolSpec {
        shape,
        config: KvCacheConfig::default(),
        num_blocks: 4,
        block_len: 16,
    };
    let mut pool = gpu.new_kv_pool(&spec).unwrap();
    let k: CudaAct = gpu.device().zeros::<f32>(1, 64).unwrap().into();
    for blocks in [vec![4u32], vec![]] {
        let spans = [SeqSpan {
            rows: 0..1,
            start_pos: 0,
            blocks,
        }];
        let err = gpu.write_kv(0, &k, &k, &mut pool, &spans).unwrap_err();
        eprintln!("{err}");
    }
    let spans = [SeqSpan {
        rows: 0..1,
        start_pos: 20,
        blocks: vec![0],
    }];
    assert!(gpu.write_kv(0, &k, &k, &mut pool, &spans).is_err());
}

/// The W4 linear (decode kernel at 1..=16 rows, once per 16 rows up to 64,
/// dequantize + cuBLAS above) and a dense fp16 linear, against the CPU
/// backend, with odd row counts.
#[test]
fn linears_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = exact_cpu();
    let mut rng = Rng(21);
    for &(k, n, g) in &[
        (576usize, 1536usize, 64usize),
        (1536, 576, 64),
        (256, 200, 128),
        (320, 96, 32),
        // Whole wgmma blocks (LMQ_W4_WGMMA=1 on sm_90 takes the 67 rows;
        // 17 go to the decode kernel in slices).
        (256, 512, 128),
    ] {
        let awq = random_awq(&mut rng, k, n, g);
        let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-0.5, 0.5) as f32).collect();
        let dense: Vec<f32> = (0..n * k)
            .map(|_| rng.uniform(-0.05, 0.05) as f32)
            .collect();
        for weight in [HostWeight::Awq(awq), HostWeight::Dense(dense)] {
            let host = HostLinear {
                weight,
                out_features: n,
                in_features: k,
                bias: Some(bias.clone()),
            };
            let cpu_w = cpu.upload_linear(host.clone()).unwrap();
            let gpu_w = gpu.upload_linear(host).unwrap();
            for m in [1usize, 3, 16, 17, 67] {
                let x = random_matrix(&mut rng, m, k, 1.0);
                let want = cpu.linear(&x, &cpu_w).unwrap();
                let got = gpu
                    .to_host(&gpu.linear(&upload(&gpu, &x), &gpu_w).unwrap())
                    .unwrap();
                let err = rel_err(&got, &want.data);
                eprintln!("linear {k}->{n} g{g} m {m}: max err {err:.2e}");
                assert!(err <= 2e-3, "linear {k}->{n} m {m} differs by {err:.2e}");
            }
        }
    }
}

/// The fused producers against the ops they replace, on the GPU, bit for
/// bit: `split_qkv_rope` (one launch) against the split and two rotary
/// launches, and each fp16 copy a norm or SiLU·mul writes against the
/// linear's own conversion of the fp32 values (a linear on the act with
/// its copy, and on the same values without it). The split and rotary
/// values are also checked against the CPU backend (1e-5: the same
/// formula, fp32, with the angle's sine and cosine in double).
#[test]
fn fused_producers_match_unfused_ops() {
    let Some(gpu) = gpu() else { return };
    let cpu = exact_cpu();
    let mut rng = Rng(33);
    let bits = |m: &[f32]| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let (spans, _) = batch_spans(16);
    let rows = spans.last().map_or(0, |s| s.rows.end);
    for (heads, kv_heads, hd) in [(9usize, 3usize, 64usize), (4, 4, 128), (6, 1, 96)] {
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            num_layers: 1,
        };
        let rope = Rope::new(hd, 10000.0, &RopeScaling::None);
        let widths = [heads * hd, kv_heads * hd, kv_heads * hd];
        let x = random_matrix(&mut rng, rows, widths.iter().sum(), 2.0);
        let fused = gpu
            .split_qkv_rope(&upload(&gpu, &x), &widths, &shape, &spans, &rope)
            .unwrap();
        let apart =
            split_qkv_rope_apart(&gpu, &upload(&gpu, &x), &widths, &shape, &spans, &rope).unwrap();
        let on_cpu = cpu
            .split_qkv_rope(&x, &widths, &shape, &spans, &rope)
            .unwrap();
        for ((f, a), c) in fused.iter().zip(&apart).zip(&on_cpu) {
            let f = gpu.to_host(f).unwrap();
            assert_eq!(bits(&f), bits(&gpu.to_host(a).unwrap()), "hd {hd}");
            let err = rel_err(&f, &c.data);
            eprintln!("split_qkv_rope {heads}/{kv_heads} hd {hd}: err vs CPU {err:.2e}");
            assert!(
                err <= 1e-5,
                "split_qkv_rope differs from the CPU by {err:.2e}"
            );
        }
    }

    // Each producer's fp16 copy against the linear's own conversion.
    let (k, n) = (192usize, 80usize);
    let dense: Vec<f32> = (0..n * k).map(|_| rng.uniform(-0.1, 0.1) as f32).collect();
    let w = gpu
        .upload_linear(HostLinear {
            weight: HostWeight::Dense(dense),
            out_features: n,
            in_features: k,
            bias: None,
        })
        .unwrap();
    let norm = gpu
        .upload_vector((0..k).map(|_| rng.uniform(0.5, 1.5) as f32).collect())
        .unwrap();
    for m in [1usize, 5, 33] {
        let x = upload(&gpu, &random_matrix(&mut rng, m, k, 3.0));
        let gate_up = upload(&gpu, &random_matrix(&mut rng, m, 2 * k, 3.0));
        let up = upload(&gpu, &random_matrix(&mut rng, m, k, 3.0));
        let mut residual = upload(&gpu, &random_matrix(&mut rng, m, k, 3.0));
        let products = [
            ("rms_norm", gpu.rms_norm(&x, &norm, 1e-5).unwrap()),
            (
                "add_rms_norm",
                gpu.add_rms_norm(&mut residual, &x, &norm, 1e-5).unwrap(),
            ),
            ("silu_mul", gpu.silu_mul(&x, &up).unwrap()),
            ("silu_mul_halves", gpu.silu_mul_halves(&gate_up).unwrap()),
        ];
        for (name, act) in products {
            assert!(act.half().is_some(), "{name} wrote no fp16 copy");
            let with_copy = gpu.to_host(&gpu.linear(&act, &w).unwrap()).unwrap();
            let plain: CudaAct = act.into_values().into();
            let converted = gpu.to_host(&gpu.linear(&plain, &w).unwrap()).unwrap();
            assert!(
                with_copy.iter().all(|v| v.is_finite()),
                "{name}: non-finite"
            );
            assert_eq!(bits(&with_copy), bits(&converted), "{name}, {m} rows");
        }
    }
    // Writing through the values drops the copy.
    let mut act = gpu
        .rms_norm(
            &upload(&gpu, &random_matrix(&mut rng, 1, k, 1.0)),
            &norm,
            1e-5,
        )
        .unwrap();
    gpu.add_in_place(&mut act, &upload(&gpu, &random_matrix(&mut rng, 1, k, 1.0)))
        .unwrap();
    assert!(act.half().is_none());
}

/// RMSNorm and the fused residual add, on row lengths that take the vector
/// kernel (multiples of 4 up to 16384) and the loop kernel (the others),
/// against the CPU backend: values within 1e-5 (fp32, other summation
/// order), the residual updated the same, the fp16 copy the rounding of
/// the values.
#[test]
fn rms_norms_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = exact_cpu();
    let mut rng = Rng(47);
    for &d in &[33usize, 576, 1000, 4096, 8192, 16388] {
        for rows in [1usize, 3] {
            let x = random_matrix(&mut rng, rows, d, 2.0);
            let delta = random_matrix(&mut rng, rows, d, 1.0);
            let w: Vec<f32> = (0..d).map(|_| rng.uniform(0.5, 1.5) as f32).collect();
            let (cw, gw) = (
                cpu.upload_vector(w.clone()).unwrap(),
                gpu.upload_vector(w).unwrap(),
            );
            let want = cpu.rms_norm(&x, &cw, 1e-5).unwrap();
            let got = gpu.rms_norm(&upload(&gpu, &x), &gw, 1e-5).unwrap();
            let err = rel_err(&gpu.to_host(&got).unwrap(), &want.data);
            assert!(err <= 1e-5, "rms_norm d {d} rows {rows}: {err:.2e}");
            let mut cpu_res = x.clone();
            let want = cpu.add_rms_norm(&mut cpu_res, &delta, &cw, 1e-5).unwrap();
            let mut gpu_res = upload(&gpu, &x);
            let got = gpu
                .add_rms_norm(&mut gpu_res, &upload(&gpu, &delta), &gw, 1e-5)
                .unwrap();
            let values = gpu.to_host(&got).unwrap();
            let err = rel_err(&values, &want.data);
            let res_err = rel_err(&gpu.to_host(&gpu_res).unwrap(), &cpu_res.data);
            eprintln!("rms norms d {d} rows {rows}: {err:.2e}, residual {res_err:.2e}");
            assert!(err <= 1e-5, "add_rms_norm d {d} rows {rows}: {err:.2e}");
            assert!(res_err == 0.0, "residual d {d} rows {rows}: {res_err:.2e}");
            let half = gpu
                .device()
                .download(got.half().expect("a norm writes the fp16 copy"))
                .unwrap();
            assert!(values
                .iter()
                .zip(&half)
                .all(|(v, h)| half::f16::from_f32(*v).to_bits() == h.to_bits()));
        }
    }
}
