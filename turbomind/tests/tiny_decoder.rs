//! End-to-end checks of the one decoder (`model::Model` on the CPU backend)
//! on tiny, seeded random checkpoints written to a temporary folder.
//!
//! Every check compares lmq against something independent of the code
//! under test:
//! - an f64 reference of the Hugging Face Llama/Qwen2 forward written here,
//!   index by index, from the HF modeling code (not from lmq's backend);
//! - lmq itself along another path (incremental decode vs one-shot
//!   prefill, batched vs alone);
//! - the error a bad checkpoint must produce.
//!
//! Errors are measured as `|got − want| / (1 + |want|)`, i.e. a test with
//! tolerance `tol` accepts `|got − want| ≤ tol + tol·|want|` (absolute and
//! relative tolerance both `tol`). Run with `--nocapture` to see the
//! measured maxima.

// The f64 reference is written index by index on purpose, to read like the
// formulas it implements.
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use lmq_turbomind::backend::cpu::{CpuBackend, CpuKv};
use lmq_turbomind::model::{LogitsWanted, Model, SeqInput};
use lmq_turbomind::quant::kv::{KvDtype, KvMode};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use tempfile::TempDir;

/// lmq (f32 activations) against the f64 reference.
const REFERENCE_TOL: f64 = 1e-3;
/// Chunked decode against one-shot prefill: the same f32 math, but the CPU
/// linear uses a dot-product kernel for ≤ 8 rows and `gemm` above, so rows
/// computed in different chunk sizes differ by float rounding.
const INCREMENTAL_TOL: f64 = 1e-4;
/// Batched against alone where the batch crosses the 8-row skinny/gemm
/// boundary and the alone runs do not: the same rounding-level difference
/// as above (measured ≤ 5e-6 on an AVX2 machine; the margin allows for
/// other gemm microkernels), so a tight tolerance. Batches that stay on the
/// skinny kernel are compared bit for bit.
const BATCH_TOL: f64 = 2e-5;

// ---------------------------------------------------------------------------
// Deterministic randomness.

/// SplitMix64: tiny, seeded, identical on every platform and crate version.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Tiny model specs and their checkpoints.

#[derive(Debug, Clone, Copy, PartialEq)]
enum WDtype {
    F32,
    F16,
    BF16,
}

impl WDtype {
    /// The value the checkpoint will actually hold.
    fn round(self, x: f64) -> f64 {
        match self {
            WDtype::F32 => x as f32 as f64,
            WDtype::F16 => f16::from_f64(x).to_f64(),
            WDtype::BF16 => bf16::from_f64(x).to_f64(),
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            WDtype::F32 => Dtype::F32,
            WDtype::F16 => Dtype::F16,
            WDtype::BF16 => Dtype::BF16,
        }
    }

    /// Little-endian bytes of already-rounded values (exact conversion).
    fn encode(self, values: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &v in values {
            match self {
                WDtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
                WDtype::F16 => out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
                WDtype::BF16 => out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct Spec {
    class: &'static str,
    model_type: &'static str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    /// Written to config.json only when set.
    head_dim: Option<usize>,
    vocab: usize,
    /// Whether the checkpoint has q/k/v biases. Not written to config.json:
    /// the architecture's default (Qwen2: yes, Llama: no) must apply.
    qkv_bias: bool,
    tie: bool,
    rope_theta: f64,
    rope_scaling: Option<Value>,
    eps: f64,
    max_pos: usize,
    dtype: WDtype,
    seed: u64,
}

impl Spec {
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    fn config_json(&self) -> Value {
        let mut c = json!({
            "architectures": [self.class],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_pos,
            "tie_word_embeddings": self.tie,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        if let Some(hd) = self.head_dim {
            c["head_dim"] = json!(hd);
        }
        if let Some(rs) = &self.rope_scaling {
            c["rope_scaling"] = rs.clone();
        }
        c
    }
}

/// (a) Llama with GQA (6 heads over 2 KV heads) and tied embeddings.
fn llama_gqa() -> Spec {
    Spec {
        class: "LlamaForCausalLM",
        model_type: "llama",
        hidden: 48,
        intermediate: 80,
        layers: 2,
        heads: 6,
        kv_heads: 2,
        head_dim: None,
        vocab: 97,
        qkv_bias: false,
        tie: true,
        rope_theta: 10000.0,
        rope_scaling: None,
        eps: 1e-5,
        max_pos: 64,
        dtype: WDtype::F32,
        seed: 1,
    }
}

/// (b) Qwen2: q/k/v biases (architecture default), untied lm_head, MHA.
fn qwen2_mha() -> Spec {
    Spec {
        class: "Qwen2ForCausalLM",
        model_type: "qwen2",
        hidden: 40,
        intermediate: 72,
        layers: 2,
        heads: 5,
        kv_heads: 5,
        head_dim: None,
        vocab: 89,
        qkv_bias: true,
        tie: false,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        eps: 1e-6,
        max_pos: 64,
        dtype: WDtype::F32,
        seed: 2,
    }
}

/// (c) Llama-3 frequency-dependent RoPE scaling, `original_max_position_embeddings`
/// 16, run on sequences longer than that. head_dim 16 gives one "medium"
/// frequency (smoothed) and seven "low" ones (divided by `factor`).
fn llama3_rope() -> Spec {
    Spec {
        class: "LlamaForCausalLM",
        model_type: "llama",
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: None,
        vocab: 101,
        qkv_bias: false,
        tie: false,
        rope_theta: 500_000.0,
        rope_scaling: Some(json!({
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        })),
        eps: 1e-5,
        max_pos: 128,
        dtype: WDtype::F32,
        seed: 3,
    }
}

/// (c') Llama-3 scaling with all three frequency bands present: with
/// `original_max_position_embeddings` 64 and `high_freq_factor` 8, the
/// highest frequency (wavelength 2π < 8) stays unchanged, the next one is
/// smoothed and the rest are divided by `factor`.
fn llama3_rope_all_bands() -> Spec {
    Spec {
        rope_scaling: Some(json!({
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 64,
        })),
        seed: 33,
        ..llama3_rope()
    }
}

/// (d) An explicit head_dim that is not hidden/heads (32/4 = 8, but 16).
fn explicit_head_dim() -> Spec {
    Spec {
        class: "LlamaForCausalLM",
        model_type: "llama",
        hidden: 32,
        intermediate: 56,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: Some(16),
        vocab: 61,
        qkv_bias: false,
        tie: true,
        rope_theta: 10000.0,
        rope_scaling: None,
        eps: 1e-5,
        max_pos: 64,
        dtype: WDtype::F32,
        seed: 4,
    }
}

/// A tensor as the checkpoint holds it, values already rounded to the
/// checkpoint's dtype.
#[derive(Debug, Clone)]
struct Tensor {
    shape: Vec<usize>,
    data: Vec<f64>,
}

type Weights = BTreeMap<String, Tensor>;

fn random_weights(spec: &Spec) -> Weights {
    let mut rng = Rng(spec.seed);
    let mut w = Weights::new();
    let dt = spec.dtype;
    let mut put = |name: String, shape: Vec<usize>, lo: f64, hi: f64| {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| dt.round(rng.uniform(lo, hi))).collect();
        w.insert(name, Tensor { shape, data });
    };
    let (h, hd, inter, vocab) = (spec.hidden, spec.head_dim(), spec.intermediate, spec.vocab);
    let (q_dim, kv_dim) = (spec.heads * hd, spec.kv_heads * hd);
    // A linear with gain g maps unit-RMS inputs to outputs of RMS ≈ g.
    let lin = |gain: f64, fan_in: usize| gain * (3.0 / fan_in as f64).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        -1.0,
        1.0,
    );
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}.");
        put(format!("{p}input_layernorm.weight"), vec![h], 0.7, 1.3);
        // q and k get a larger gain so that attention is far from uniform.
        let a = lin(1.6, h);
        put(format!("{p}self_attn.q_proj.weight"), vec![q_dim, h], -a, a);
        put(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv_dim, h],
            -a,
            a,
        );
        let a = lin(1.0, h);
        put(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv_dim, h],
            -a,
            a,
        );
        if spec.qkv_bias {
            put(format!("{p}self_attn.q_proj.bias"), vec![q_dim], -0.5, 0.5);
            put(format!("{p}self_attn.k_proj.bias"), vec![kv_dim], -0.5, 0.5);
            put(format!("{p}self_attn.v_proj.bias"), vec![kv_dim], -0.5, 0.5);
        }
        let a = lin(1.0, q_dim);
        put(format!("{p}self_attn.o_proj.weight"), vec![h, q_dim], -a, a);
        put(
            format!("{p}post_attention_layernorm.weight"),
            vec![h],
            0.7,
            1.3,
        );
        let a = lin(1.0, h);
        put(format!("{p}mlp.gate_proj.weight"), vec![inter, h], -a, a);
        put(format!("{p}mlp.up_proj.weight"), vec![inter, h], -a, a);
        let a = lin(1.0, inter);
        put(format!("{p}mlp.down_proj.weight"), vec![h, inter], -a, a);
    }
    put("model.norm.weight".into(), vec![h], 0.7, 1.3);
    if !spec.tie {
        let a = lin(2.0, h);
        put("lm_head.weight".into(), vec![vocab, h], -a, a);
    }
    w
}

/// One safetensors entry: name, dtype, shape, little-endian bytes.
type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn encode(weights: &Weights, dtype: WDtype) -> Vec<Entry> {
    weights
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                dtype.safetensors(),
                t.shape.clone(),
                dtype.encode(&t.data),
            )
        })
        .collect()
}

fn write_checkpoint(dir: &Path, config: &Value, entries: &[Entry]) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

struct Fixture {
    dir: TempDir,
    spec: Spec,
    weights: Weights,
}

fn fixture(spec: Spec) -> Fixture {
    let dir = TempDir::new().unwrap();
    let weights = random_weights(&spec);
    write_checkpoint(
        dir.path(),
        &spec.config_json(),
        &encode(&weights, spec.dtype),
    );
    Fixture { dir, spec, weights }
}

/// Loads with an fp32 KV cache: these tests check the decoder's math
/// against an f64 reference, not KV-cache precision (tested separately).
fn load(dir: &Path) -> Model<CpuBackend> {
    let mut model = Model::load(dir, CpuBackend::new())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    model
        .set_kv_cache(KvDtype::F32, KvMode::Online)
        .expect("fp32 KV");
    model
}

// ---------------------------------------------------------------------------
// The independent f64 reference (Hugging Face LlamaForCausalLM semantics).

/// `LlamaRotaryEmbedding` inverse frequencies, with `_compute_llama3_parameters`
/// applied when `rope_scaling` asks for it.
fn reference_inv_freq(head_dim: usize, theta: f64, scaling: Option<&Value>) -> Vec<f64> {
    let mut inv_freq: Vec<f64> = (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect();
    if let Some(s) = scaling {
        assert_eq!(
            s["rope_type"], "llama3",
            "the reference only knows llama3 scaling"
        );
        let factor = s["factor"].as_f64().unwrap();
        let low = s["low_freq_factor"].as_f64().unwrap();
        let high = s["high_freq_factor"].as_f64().unwrap();
        let old_ctx = s["original_max_position_embeddings"].as_f64().unwrap();
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            *f = if wavelen > old_ctx / low {
                *f / factor
            } else if wavelen < old_ctx / high {
                *f
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * *f / factor + smooth * *f
            };
        }
    }
    inv_freq
}

fn ref_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    (0..x.len()).map(|i| x[i] * inv * w[i]).collect()
}

/// `x · Wᵀ + b` with W in the HF `[out, in]` layout.
fn ref_linear(x: &[f64], w: &Tensor, b: Option<&Tensor>) -> Vec<f64> {
    let (out_f, in_f) = (w.shape[0], w.shape[1]);
    assert_eq!(x.len(), in_f);
    let mut y = vec![0.0; out_f];
    for o in 0..out_f {
        let mut acc = 0.0;
        for i in 0..in_f {
            acc += w.data[o * in_f + i] * x[i];
        }
        y[o] = acc + b.map_or(0.0, |b| b.data[o]);
    }
    y
}

/// `q·cos + rotate_half(q)·sin` per head: channel i pairs with i + d/2.
fn ref_rope(x: &mut [f64], heads: usize, hd: usize, pos: usize, inv_freq: &[f64]) {
    let half = hd / 2;
    for h in 0..heads {
        let v = &mut x[h * hd..(h + 1) * hd];
        for i in 0..half {
            let angle = pos as f64 * inv_freq[i];
            let (cos, sin) = (angle.cos(), angle.sin());
            let (x1, x2) = (v[i], v[i + half]);
            v[i] = x1 * cos - x2 * sin;
            v[i + half] = x2 * cos + x1 * sin;
        }
    }
}

/// Logits (rows × vocab) of the HF forward over `tokens` from position 0.
fn reference_logits(
    spec: &Spec,
    w: &Weights,
    rope_scaling: Option<&Value>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let t = |name: &str| {
        w.get(name)
            .unwrap_or_else(|| panic!("reference: no tensor {name}"))
    };
    let (hidden, hd, heads, kv_heads) = (spec.hidden, spec.head_dim(), spec.heads, spec.kv_heads);
    let group = heads / kv_heads;
    let inv_freq = reference_inv_freq(hd, spec.rope_theta, rope_scaling);
    let scale = 1.0 / (hd as f64).sqrt();
    let n = tokens.len();

    let embed = t("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| embed.data[id as usize * hidden..(id as usize + 1) * hidden].to_vec())
        .collect();
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}.");
        let bias = |m: &str| {
            if spec.qkv_bias {
                Some(t(&format!("{p}self_attn.{m}.bias")))
            } else {
                None
            }
        };
        let wq = t(&format!("{p}self_attn.q_proj.weight"));
        let wk = t(&format!("{p}self_attn.k_proj.weight"));
        let wv = t(&format!("{p}self_attn.v_proj.weight"));
        let wo = t(&format!("{p}self_attn.o_proj.weight"));
        let mut q = Vec::with_capacity(n);
        let mut k = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for (pos, row) in x.iter().enumerate() {
            let h = ref_rms_norm(
                row,
                &t(&format!("{p}input_layernorm.weight")).data,
                spec.eps,
            );
            let mut qi = ref_linear(&h, wq, bias("q_proj"));
            let mut ki = ref_linear(&h, wk, bias("k_proj"));
            ref_rope(&mut qi, heads, hd, pos, &inv_freq);
            ref_rope(&mut ki, kv_heads, hd, pos, &inv_freq);
            q.push(qi);
            k.push(ki);
            v.push(ref_linear(&h, wv, bias("v_proj")));
        }
        for i in 0..n {
            // Causal softmax attention; query head h reads KV head h / group.
            let mut attn = vec![0.0; heads * hd];
            for h in 0..heads {
                let kvh = h / group;
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let mut s = 0.0;
                        for c in 0..hd {
                            s += q[i][h * hd + c] * k[j][kvh * hd + c];
                        }
                        s * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for j in 0..=i {
                    for c in 0..hd {
                        attn[h * hd + c] += exps[j] / sum * v[j][kvh * hd + c];
                    }
                }
            }
            let o = ref_linear(&attn, wo, None);
            for c in 0..hidden {
                x[i][c] += o[c];
            }
            let h = ref_rms_norm(
                &x[i],
                &t(&format!("{p}post_attention_layernorm.weight")).data,
                spec.eps,
            );
            let gate = ref_linear(&h, t(&format!("{p}mlp.gate_proj.weight")), None);
            let up = ref_linear(&h, t(&format!("{p}mlp.up_proj.weight")), None);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = ref_linear(&act, t(&format!("{p}mlp.down_proj.weight")), None);
            for c in 0..hidden {
                x[i][c] += down[c];
            }
        }
    }
    let head = if spec.tie { embed } else { t("lm_head.weight") };
    x.iter()
        .map(|row| {
            ref_linear(
                &ref_rms_norm(row, &t("model.norm.weight").data, spec.eps),
                head,
                None,
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Running lmq and comparing.

fn forward_alone(
    model: &Model<CpuBackend>,
    kv: &mut CpuKv,
    tokens: &[u32],
    logits: LogitsWanted,
) -> Vec<f32> {
    let mut out = model
        .forward(&mut [SeqInput { tokens, kv, logits }])
        .unwrap_or_else(|e| panic!("forward: {e}"));
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

/// max over elements of `|got − want| / (1 + |want|)`, and the largest
/// absolute difference.
fn max_err(got: &[f32], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "logit counts differ");
    let mut scaled: f64 = 0.0;
    let mut abs: f64 = 0.0;
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite logit {g}");
        let d = (g as f64 - w).abs();
        abs = abs.max(d);
        scaled = scaled.max(d / (1.0 + w.abs()));
    }
    (scaled, abs)
}

fn max_err_f32(got: &[f32], want: &[f32]) -> (f64, f64) {
    let want: Vec<f64> = want.iter().map(|&w| w as f64).collect();
    max_err(got, &want)
}

/// Loads `spec`'s checkpoint and compares all-position logits with the
/// reference on a short (skinny-kernel) and a long (gemm) sequence.
fn check_against_reference(spec: Spec, lens: &[usize]) -> Fixture {
    let fx = fixture(spec);
    let spec = &fx.spec;
    let model = load(fx.dir.path());
    assert_eq!(model.config.head_dim, spec.head_dim());
    assert_eq!(model.config.qkv_bias, spec.qkv_bias);
    assert_eq!(model.config.num_kv_heads, spec.kv_heads);
    let mut rng = Rng(spec.seed ^ 0xA5A5);
    for &len in lens {
        let tokens = rng.tokens(len, spec.vocab);
        let mut kv = model.new_kv().unwrap();
        let got = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        assert_eq!(model.kv_len(&kv), len);
        let want: Vec<f64> =
            reference_logits(spec, &fx.weights, spec.rope_scaling.as_ref(), &tokens).concat();
        let (scaled, abs) = max_err(&got, &want);
        let spread = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        eprintln!(
            "{} {:?} hd={} len={len}: max scaled err {scaled:.2e}, max abs err {abs:.2e} (max |logit| {spread:.2})",
            spec.model_type,
            spec.dtype,
            spec.head_dim()
        );
        assert!(
            scaled <= REFERENCE_TOL,
            "{} len {len}: lmq differs from the f64 reference by {scaled:e} (abs {abs:e})",
            spec.model_type
        );
    }
    fx
}

// ---------------------------------------------------------------------------
// 1. lmq against the f64 reference.

#[test]
fn reference_llama_gqa_tied() {
    check_against_reference(llama_gqa(), &[6, 23]);
}

#[test]
fn reference_qwen2_bias_untied_mha() {
    check_against_reference(qwen2_mha(), &[5, 19]);
}

#[test]
fn reference_llama3_rope_scaling() {
    for spec in [llama3_rope(), llama3_rope_all_bands()] {
        let old_ctx = spec.rope_scaling.as_ref().unwrap()["original_max_position_embeddings"]
            .as_u64()
            .unwrap() as usize;
        let long = old_ctx.max(16) + 9;
        let fx = check_against_reference(spec, &[7, long]);
        // The check above must be able to see the scaling: the reference
        // without it is far from lmq.
        let spec = &fx.spec;
        let model = load(fx.dir.path());
        let tokens = Rng(7).tokens(long, spec.vocab);
        let mut kv = model.new_kv().unwrap();
        let got = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        let unscaled = reference_logits(spec, &fx.weights, None, &tokens).concat();
        let (scaled, _) = max_err(&got, &unscaled);
        eprintln!("llama3 sensitivity: reference without scaling differs by {scaled:.2e}");
        assert!(
            scaled > 100.0 * REFERENCE_TOL,
            "llama3 scaling made no visible difference"
        );
    }
}

#[test]
fn reference_explicit_head_dim() {
    let fx = check_against_reference(explicit_head_dim(), &[4, 17]);
    assert_ne!(fx.spec.head_dim(), fx.spec.hidden / fx.spec.heads);
}

#[test]
fn reference_half_precision_weights() {
    // The reference reads the same rounded values the checkpoint holds.
    check_against_reference(
        Spec {
            dtype: WDtype::BF16,
            seed: 11,
            ..llama_gqa()
        },
        &[3, 21],
    );
    check_against_reference(
        Spec {
            dtype: WDtype::F16,
            seed: 12,
            ..qwen2_mha()
        },
        &[8, 9],
    );
    check_against_reference(
        Spec {
            dtype: WDtype::BF16,
            seed: 13,
            ..llama3_rope()
        },
        &[20],
    );
}

// ---------------------------------------------------------------------------
// 2. Incremental decode equals one-shot prefill.

#[test]
fn incremental_decode_matches_prefill() {
    for spec in [llama3_rope(), qwen2_mha(), explicit_head_dim()] {
        let fx = fixture(spec);
        let model = load(fx.dir.path());
        let vocab = fx.spec.vocab;
        // Chunks on both sides of the 8-row skinny/gemm boundary.
        let chunks = [5usize, 1, 1, 3, 10, 1, 2];
        let total: usize = chunks.iter().sum();
        let tokens = Rng(fx.spec.seed ^ 0x1234).tokens(total, vocab);

        let mut kv = model.new_kv().unwrap();
        let one_shot = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        assert_eq!(one_shot.len(), total * vocab);

        let mut kv = model.new_kv().unwrap();
        let mut chunked = Vec::new();
        let mut start = 0;
        for (i, &n) in chunks.iter().enumerate() {
            let piece = &tokens[start..start + n];
            // Ask for different logits per chunk; the cache must fill the same.
            let wanted = match i % 3 {
                0 => LogitsWanted::All,
                1 => LogitsWanted::Last,
                _ => LogitsWanted::None,
            };
            let out = forward_alone(&model, &mut kv, piece, wanted);
            let (rows, first_row) = match wanted {
                LogitsWanted::All => (n, start),
                LogitsWanted::Last => (1, start + n - 1),
                LogitsWanted::None => (0, start),
            };
            assert_eq!(out.len(), rows * vocab, "chunk {i}: wrong number of logits");
            let want = &one_shot[first_row * vocab..(first_row + rows) * vocab];
            let (scaled, abs) = max_err_f32(&out, want);
            chunked.push((scaled, abs));
            start += n;
            assert_eq!(model.kv_len(&kv), start);
        }
        let scaled = chunked.iter().fold(0f64, |m, e| m.max(e.0));
        let abs = chunked.iter().fold(0f64, |m, e| m.max(e.1));
        eprintln!(
            "incremental {}: max scaled err {scaled:.2e}, max abs err {abs:.2e}",
            fx.spec.model_type
        );
        assert!(
            scaled <= INCREMENTAL_TOL,
            "chunked decode differs by {scaled:e}"
        );

        // A single decode step after a chunked prefill, against the
        // reference too (the cache must hold positions, not just values).
        let next = Rng(99).tokens(1, vocab);
        let got = forward_alone(&model, &mut kv, &next, LogitsWanted::Last);
        let mut all = tokens.clone();
        all.extend_from_slice(&next);
        let want = reference_logits(&fx.spec, &fx.weights, fx.spec.rope_scaling.as_ref(), &all);
        let (scaled, _) = max_err(&got, want.last().unwrap());
        assert!(
            scaled <= REFERENCE_TOL,
            "decode after chunks differs from reference by {scaled:e}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. A batch gives each sequence what it gets alone.

/// Caches holding each sequence's prefix, prefilled alone.
fn prefilled(model: &Model<CpuBackend>, prefixes: &[Vec<u32>]) -> Vec<CpuKv> {
    prefixes
        .iter()
        .map(|p| {
            let mut kv = model.new_kv().unwrap();
            if !p.is_empty() {
                let out = forward_alone(model, &mut kv, p, LogitsWanted::None);
                assert!(out.is_empty(), "LogitsWanted::None returned logits");
            }
            kv
        })
        .collect()
}

fn forward_batch(
    model: &Model<CpuBackend>,
    kvs: &mut [CpuKv],
    tokens: &[Vec<u32>],
    wanted: &[LogitsWanted],
) -> Vec<Vec<f32>> {
    let mut batch: Vec<SeqInput<'_, CpuKv>> = kvs
        .iter_mut()
        .zip(tokens)
        .zip(wanted)
        .map(|((kv, t), &logits)| SeqInput {
            tokens: t,
            kv,
            logits,
        })
        .collect();
    model
        .forward(&mut batch)
        .unwrap_or_else(|e| panic!("batched forward: {e}"))
}

#[test]
fn batch_matches_alone() {
    for spec in [llama_gqa(), qwen2_mha()] {
        let fx = fixture(spec);
        let model = load(fx.dir.path());
        let vocab = fx.spec.vocab;
        let mut rng = Rng(fx.spec.seed ^ 0xBA7C);
        // Different existing cache lengths: 0, 4 and 9 positions.
        let prefixes: Vec<Vec<u32>> = [0, 4, 9].iter().map(|&n| rng.tokens(n, vocab)).collect();
        let base = prefilled(&model, &prefixes);
        let all = [LogitsWanted::All; 3];

        // (i) 2 + 1 + 3 = 6 rows: batched and alone both stay on the skinny
        // kernel, whose per-row arithmetic does not depend on the batch, so
        // the logits must be identical bit for bit.
        let new: Vec<Vec<u32>> = [2, 1, 3].iter().map(|&n| rng.tokens(n, vocab)).collect();
        let mut batch_kv = base.clone();
        let batched = forward_batch(&model, &mut batch_kv, &new, &all);
        for (i, t) in new.iter().enumerate() {
            let mut kv = base[i].clone();
            let alone = forward_alone(&model, &mut kv, t, LogitsWanted::All);
            assert_eq!(batched[i].len(), t.len() * vocab);
            assert!(
                batched[i] == alone,
                "sequence {i}: ≤8-row batch is not bitwise equal to alone"
            );
            assert_eq!(model.kv_len(&batch_kv[i]), prefixes[i].len() + t.len());
        }

        // (ii) 3 + 1 + 6 = 10 rows: the batch goes through gemm, each
        // sequence alone through the skinny kernel; equal up to rounding.
        let new: Vec<Vec<u32>> = [3, 1, 6].iter().map(|&n| rng.tokens(n, vocab)).collect();
        let mut batch_kv = base.clone();
        let mut alone_kv = base.clone();
        let batched = forward_batch(&model, &mut batch_kv, &new, &all);
        let mut worst = (0f64, 0f64);
        for (i, t) in new.iter().enumerate() {
            let alone = forward_alone(&model, &mut alone_kv[i], t, LogitsWanted::All);
            let e = max_err_f32(&batched[i], &alone);
            worst = (worst.0.max(e.0), worst.1.max(e.1));
            assert_eq!(model.kv_len(&batch_kv[i]), prefixes[i].len() + t.len());
        }

        // (iii) Then one decode step each from those caches, with different
        // logits wanted per sequence.
        let next: Vec<Vec<u32>> = (0..3).map(|_| rng.tokens(1, vocab)).collect();
        let wanted = [LogitsWanted::Last, LogitsWanted::None, LogitsWanted::All];
        let batched = forward_batch(&model, &mut batch_kv, &next, &wanted);
        assert_eq!(batched.len(), 3);
        assert!(batched[1].is_empty(), "LogitsWanted::None returned logits");
        for i in [0, 2] {
            let alone = forward_alone(&model, &mut alone_kv[i], &next[i], LogitsWanted::All);
            assert_eq!(batched[i].len(), vocab);
            let e = max_err_f32(&batched[i], &alone);
            worst = (worst.0.max(e.0), worst.1.max(e.1));
        }
        eprintln!(
            "batch {}: max scaled err {:.2e}, max abs err {:.2e}",
            fx.spec.model_type, worst.0, worst.1
        );
        assert!(
            worst.0 <= BATCH_TOL,
            "batched logits differ from alone by {:e}",
            worst.0
        );

        // And the batched sequence still agrees with the reference.
        let mut seq2 = prefixes[2].clone();
        seq2.extend_from_slice(&new[2]);
        seq2.extend_from_slice(&next[2]);
        let want = reference_logits(&fx.spec, &fx.weights, None, &seq2);
        let (scaled, _) = max_err(&batched[2], want.last().unwrap());
        assert!(
            scaled <= REFERENCE_TOL,
            "batched decode differs from reference by {scaled:e}"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Bad checkpoints and requests give errors that say what is wrong.

fn load_err(dir: &Path) -> String {
    match Model::load(dir, CpuBackend::new()) {
        Ok(_) => panic!("a bad checkpoint in {} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn bad_checkpoint(
    spec: &Spec,
    config: &Value,
    edit: impl FnOnce(&mut Vec<Entry>),
) -> (TempDir, String) {
    let dir = TempDir::new().unwrap();
    let mut entries = encode(&random_weights(spec), spec.dtype);
    edit(&mut entries);
    write_checkpoint(dir.path(), config, &entries);
    let msg = load_err(dir.path());
    (dir, msg)
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let spec = llama_gqa();
    let name = "model.layers.1.self_attn.k_proj.weight";
    // Transposed: the right number of values, the wrong shape.
    let (_dir, msg) = bad_checkpoint(&spec, &spec.config_json(), |entries| {
        let e = entries.iter_mut().find(|e| e.0 == name).unwrap();
        assert_eq!(e.2, vec![16, 48]);
        e.2 = vec![48, 16];
    });
    for needle in [name, "[16, 48]", "[48, 16]", "model.safetensors"] {
        assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        );
    }

    // A 1-D norm weight of the wrong length.
    let name = "model.norm.weight";
    let (_dir, msg) = bad_checkpoint(&spec, &spec.config_json(), |entries| {
        let e = entries.iter_mut().find(|e| e.0 == name).unwrap();
        e.2 = vec![47];
        e.3.truncate(47 * 4);
    });
    for needle in [name, "[48]", "[47]"] {
        assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn missing_tensor_is_named() {
    for (spec, name) in [
        (llama_gqa(), "model.layers.1.mlp.down_proj.weight"),
        (qwen2_mha(), "lm_head.weight"),
        (qwen2_mha(), "model.layers.0.self_attn.v_proj.bias"),
        (llama_gqa(), "model.embed_tokens.weight"),
    ] {
        let (_dir, msg) = bad_checkpoint(&spec, &spec.config_json(), |entries| {
            let before = entries.len();
            entries.retain(|e| e.0 != name);
            assert_eq!(entries.len(), before - 1);
        });
        for needle in [name, "missing", "model.safetensors"] {
            assert!(
                msg.contains(needle),
                "error {msg:?} does not mention {needle:?}"
            );
        }
    }
}

#[test]
fn truncated_safetensors_names_file() {
    let fx = fixture(llama_gqa());
    let file = fx.dir.path().join("model.safetensors");
    let full = std::fs::metadata(&file).unwrap().len();
    // Half the file (cuts the data), then inside the header, then inside
    // the 8-byte header length.
    for len in [full / 2, 40, 5] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len)
            .unwrap();
        let msg = load_err(fx.dir.path());
        assert!(
            msg.contains("model.safetensors"),
            "truncated to {len} bytes: error {msg:?} does not name the file"
        );
    }
}

#[test]
fn indivisible_kv_heads_is_a_config_error() {
    let spec = llama_gqa();
    let mut config = spec.config_json();
    config["num_key_value_heads"] = json!(4); // 6 heads over 4 KV heads
    let (_dir, msg) = bad_checkpoint(&spec, &config, |_| {});
    for needle in ["config.json", "num_key_value_heads", "6", "4"] {
        assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let spec = llama_gqa();
    let mut config = spec.config_json();
    config["architectures"] = json!(["GPTNeoXForCausalLM"]);
    config["model_type"] = json!("gpt_neox");
    let (_dir, msg) = bad_checkpoint(&spec, &config, |_| {});
    for needle in ["GPTNeoXForCausalLM", "config.json", "LlamaForCausalLM"] {
        assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn other_bad_inputs_are_errors() {
    let spec = llama_gqa();
    // An integer tensor where a float weight belongs.
    let name = "model.layers.0.input_layernorm.weight";
    let (_dir, msg) = bad_checkpoint(&spec, &spec.config_json(), |entries| {
        let e = entries.iter_mut().find(|e| e.0 == name).unwrap();
        e.1 = Dtype::I32;
    });
    for needle in [name, "I32"] {
        assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        );
    }

    // No model.safetensors at all.
    let fx = fixture(llama_gqa());
    std::fs::remove_file(fx.dir.path().join("model.safetensors")).unwrap();
    let msg = load_err(fx.dir.path());
    assert!(
        msg.contains("model.safetensors"),
        "error {msg:?} does not name the file"
    );

    // Bad requests to a good model.
    let fx = fixture(llama_gqa());
    let model = load(fx.dir.path());
    let mut kv = model.new_kv().unwrap();
    let mut run = |tokens: &[u32]| {
        model
            .forward(&mut [SeqInput {
                tokens,
                kv: &mut kv,
                logits: LogitsWanted::All,
            }])
            .err()
            .map(|e| e.to_string())
    };
    let msg = run(&[1, 97]).expect("an out-of-vocabulary token was accepted");
    assert!(msg.contains("97"), "{msg:?}");
    run(&[]).expect("an empty step was accepted");
    let too_long = vec![1u32; fx.spec.max_pos + 1];
    let msg = run(&too_long).expect("a step past max_position_embeddings was accepted");
    assert!(msg.contains(&fx.spec.max_pos.to_string()), "{msg:?}");
    // Nothing was written to the cache by the failed steps.
    assert_eq!(model.kv_len(&kv), 0);
}

/// Tensors the decoder would not read are an error, not silently ignored;
/// and Llama's `attention_bias` covers o_proj as in Hugging Face.
#[test]
fn unread_tensors_are_an_error_and_llama_attention_bias_covers_o_proj() {
    let spec = llama_gqa();
    let name = "model.layers.0.self_attn.o_proj.bias";
    let (_dir, msg) = bad_checkpoint(&spec, &spec.config_json(), |entries| {
        entries.push((name.into(), Dtype::F32, vec![48], vec![0u8; 48 * 4]));
    });
    for needle in [name, "not used"] {
        assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        );
    }

    // With attention_bias, every q/k/v/o bias is read, and o_proj's matters.
    let run_with_o_bias = |value: f32| {
        let dir = TempDir::new().unwrap();
        let mut config = spec.config_json();
        config["attention_bias"] = json!(true);
        let mut entries = encode(&random_weights(&spec), spec.dtype);
        for l in 0..spec.layers {
            for (m, len) in [
                ("q_proj", 48),
                ("k_proj", 16),
                ("v_proj", 16),
                ("o_proj", 48),
            ] {
                let fill = if m == "o_proj" { value } else { 0.0 };
                let bytes = (0..len).flat_map(|_| fill.to_le_bytes()).collect();
                entries.push((
                    format!("model.layers.{l}.self_attn.{m}.bias"),
                    Dtype::F32,
                    vec![len],
                    bytes,
                ));
            }
        }
        write_checkpoint(dir.path(), &config, &entries);
        let model = load(dir.path());
        let mut kv = model.new_kv().unwrap();
        model
            .forward(&mut [SeqInput {
                tokens: &[3, 5, 7],
                kv: &mut kv,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .pop()
            .unwrap()
    };
    assert_ne!(run_with_o_bias(0.0), run_with_o_bias(1.0));
}

/// Quantized KV caches stay close to the f64 reference, int8 closer than
/// int4, and fp16 closer still; static mode without parameters is refused.
#[test]
fn quantized_kv_cache_tracks_the_reference() {
    let fx = fixture(llama_gqa());
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 97).collect();
    let want = reference_logits(
        &fx.spec,
        &fx.weights,
        fx.spec.rope_scaling.as_ref(),
        &tokens,
    );
    let mut errors = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8, KvDtype::Int4] {
        let mut model = load(fx.dir.path());
        model.set_kv_cache(dtype, KvMode::Online).unwrap();
        let mut kv = model.new_kv().unwrap();
        let got = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        let flat: Vec<f64> = want.iter().flatten().copied().collect();
        errors.push(max_err(&got, &flat).1);
    }
    eprintln!("max |Δlogit| fp32/fp16/int8/int4: {errors:?}");
    // Random weights give unstructured activations, so only loose absolute
    // bounds hold here; the real model's costs are measured as perplexity
    // (docs/QUALITY.md). Each coarser dtype must cost more.
    assert!(
        errors[0] < 1e-4 && errors[1] < 2e-2 && errors[2] < 0.25,
        "{errors:?}"
    );
    assert!(
        errors[0] < errors[1] && errors[1] < errors[2] && errors[2] < errors[3],
        "{errors:?}"
    );
    let mut model = load(fx.dir.path());
    let err = model
        .set_kv_cache(KvDtype::Int8, KvMode::Static)
        .unwrap_err();
    assert!(err.to_string().contains("static"), "{err}");
}

/// A checkpoint split into shards with `model.safetensors.index.json`
/// loads to the same logits as the single file.
#[test]
fn sharded_checkpoint_matches_single_file() {
    let fx = fixture(qwen2_mha());
    let tokens: Vec<u32> = vec![5, 9, 2, 44, 17];
    let single = load(fx.dir.path());
    let mut kv = single.new_kv().unwrap();
    let want = forward_alone(&single, &mut kv, &tokens, LogitsWanted::All);

    let sharded = TempDir::new().unwrap();
    let entries = encode(&fx.weights, fx.spec.dtype);
    let (first, second) = entries.split_at(entries.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView<'_>)> = part
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                weight_map.insert(name.clone(), json!(file));
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &sharded.path().join(&file)).unwrap();
    }
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        serde_json::to_string(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    std::fs::write(
        sharded.path().join("config.json"),
        serde_json::to_string(&fx.spec.config_json()).unwrap(),
    )
    .unwrap();
    let model = load(sharded.path());
    let mut kv = model.new_kv().unwrap();
    assert_eq!(
        forward_alone(&model, &mut kv, &tokens, LogitsWanted::All),
        want
    );
}
