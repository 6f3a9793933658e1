//! Shared by the tiny-model tests: seeded random checkpoints written to
//! temporary folders, and an independent f64 reference of the Hugging Face
//! Llama forward pass.
#![allow(dead_code)]
#![allow(clippy::needless_range_loop)]

pub use std::collections::BTreeMap;
pub use std::path::Path;

pub use half::{bf16, f16};
pub use lmq_turbomind::backend::cpu::{CpuBackend, CpuKvPool};
pub use lmq_turbomind::model::{LogitsWanted, Model, SeqKv, SoloCache};
pub use lmq_turbomind::quant::kv::{KvDtype, KvMode};
pub use safetensors::tensor::{Dtype, TensorView};
pub use serde_json::{json, Value};
pub use tempfile::TempDir;

/// lmq (f32 activations) against the f64 reference.
pub const REFERENCE_TOL: f64 = 1e-3;
/// Chunked decode against one-shot prefill: the same f32 math, but the CPU
/// linear uses a dot-product kernel for ≤ 16 rows and `gemm` above, so rows
/// computed in different chunk sizes differ by float rounding.
pub const INCREMENTAL_TOL: f64 = 1e-4;
/// Batched against alone where the batch crosses the 16-row skinny/gemm
/// boundary and the alone runs do not: the same rounding-level difference
/// as above (measured ≤ 5e-6 on an AVX2 machine; the margin allows for
/// other gemm microkernels), so a tight tolerance. Batches that stay on the
/// skinny kernel are compared bit for bit.
pub const BATCH_TOL: f64 = 2e-5;

/// Random AutoAWQ tensors of a `k → n` linear: uniform codes and zeros,
/// scales in [0.002, 0.02).
pub fn random_awq(
    rng: &mut Rng,
    k: usize,
    n: usize,
    g: usize,
) -> lmq_turbomind::quant::awq::AwqTensors {
    use lmq_turbomind::quant::awq::pack_int4;
    let codes: Vec<u8> = (0..k * n).map(|_| (rng.next_u64() % 16) as u8).collect();
    let zeros: Vec<u8> = (0..(k / g) * n)
        .map(|_| (rng.next_u64() % 16) as u8)
        .collect();
    let scales: Vec<f16> = (0..(k / g) * n)
        .map(|_| f16::from_f64(rng.uniform(0.002, 0.02)))
        .collect();
    lmq_turbomind::quant::awq::AwqTensors {
        in_features: k,
        out_features: n,
        group_size: g,
        qweight: pack_int4(&codes, k, n),
        qzeros: pack_int4(&zeros, k / g, n),
        scales,
    }
}

// ---------------------------------------------------------------------------
// Deterministic randomness.

/// SplitMix64: tiny, seeded, identical on every platform and crate version.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Tiny model specs and their checkpoints.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WDtype {
    F32,
    F16,
    BF16,
}

impl WDtype {
    /// The value the checkpoint will actually hold.
    pub fn round(self, x: f64) -> f64 {
        match self {
            WDtype::F32 => x as f32 as f64,
            WDtype::F16 => f16::from_f64(x).to_f64(),
            WDtype::BF16 => bf16::from_f64(x).to_f64(),
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            WDtype::F32 => Dtype::F32,
            WDtype::F16 => Dtype::F16,
            WDtype::BF16 => Dtype::BF16,
        }
    }

    /// Little-endian bytes of already-rounded values (exact conversion).
    pub fn encode(self, values: &[f64]) -> Vec<u8> {
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
pub struct Spec {
    pub class: &'static str,
    pub model_type: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written to config.json only when set.
    pub head_dim: Option<usize>,
    pub vocab: usize,
    /// Whether the checkpoint has q/k/v biases. Not written to config.json:
    /// the architecture's default (Qwen2: yes, Llama: no) must apply.
    pub qkv_bias: bool,
    pub tie: bool,
    pub rope_theta: f64,
    pub rope_scaling: Option<Value>,
    pub eps: f64,
    pub max_pos: usize,
    pub dtype: WDtype,
    pub seed: u64,
}

impl Spec {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    pub fn config_json(&self) -> Value {
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
pub fn llama_gqa() -> Spec {
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
pub fn qwen2_mha() -> Spec {
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
pub fn llama3_rope() -> Spec {
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
pub fn llama3_rope_all_bands() -> Spec {
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
pub fn explicit_head_dim() -> Spec {
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
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub type Weights = BTreeMap<String, Tensor>;

pub fn random_weights(spec: &Spec) -> Weights {
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
pub type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

pub fn encode(weights: &Weights, dtype: WDtype) -> Vec<Entry> {
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

pub fn write_checkpoint(dir: &Path, config: &Value, entries: &[Entry]) {
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

pub struct Fixture {
    pub dir: TempDir,
    pub spec: Spec,
    pub weights: Weights,
}

pub fn fixture(spec: Spec) -> Fixture {
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
pub fn load(dir: &Path) -> Model<CpuBackend> {
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
pub fn reference_inv_freq(head_dim: usize, theta: f64, scaling: Option<&Value>) -> Vec<f64> {
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

pub fn ref_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    (0..x.len()).map(|i| x[i] * inv * w[i]).collect()
}

/// `x · Wᵀ + b` with W in the HF `[out, in]` layout.
pub fn ref_linear(x: &[f64], w: &Tensor, b: Option<&Tensor>) -> Vec<f64> {
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
pub fn ref_rope(x: &mut [f64], heads: usize, hd: usize, pos: usize, inv_freq: &[f64]) {
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
pub fn reference_logits(
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

/// Positions per KV block in these tests: small, so that sequences cross
/// block boundaries.
pub const TEST_BLOCK_LEN: usize = 4;

/// Blocks in a test pool (256 positions).
pub const TEST_POOL_BLOCKS: u32 = 64;

/// A cache for one sequence whose block table runs backwards through the
/// pool, so that a position's block is never its logical index.
pub fn solo(model: &Model<CpuBackend>) -> SoloCache<CpuKvPool> {
    SoloCache {
        pool: model
            .new_kv_pool(TEST_POOL_BLOCKS as usize, TEST_BLOCK_LEN)
            .unwrap(),
        seq: SeqKv {
            blocks: (0..TEST_POOL_BLOCKS).rev().collect(),
            len: 0,
        },
    }
}

pub fn forward_alone(
    model: &Model<CpuBackend>,
    kv: &mut SoloCache<CpuKvPool>,
    tokens: &[u32],
    logits: LogitsWanted,
) -> Vec<f32> {
    model
        .forward_solo(kv, tokens, logits)
        .unwrap_or_else(|e| panic!("forward: {e}"))
}

/// max over elements of `|got − want| / (1 + |want|)`, and the largest
/// absolute difference.
pub fn max_err(got: &[f32], want: &[f64]) -> (f64, f64) {
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

pub fn max_err_f32(got: &[f32], want: &[f32]) -> (f64, f64) {
    let want: Vec<f64> = want.iter().map(|&w| w as f64).collect();
    max_err(got, &want)
}

/// Loads `spec`'s checkpoint and compares all-position logits with the
/// reference on a short (skinny-kernel) and a long (gemm) sequence.
pub fn check_against_reference(spec: Spec, lens: &[usize]) -> Fixture {
    let fx = fixture(spec);
    let spec = &fx.spec;
    let model = load(fx.dir.path());
    assert_eq!(model.config.head_dim, spec.head_dim());
    assert_eq!(model.config.qkv_bias, spec.qkv_bias);
    assert_eq!(model.config.num_kv_heads, spec.kv_heads);
    let mut rng = Rng(spec.seed ^ 0xA5A5);
    for &len in lens {
        let tokens = rng.tokens(len, spec.vocab);
        let mut kv = solo(&model);
        let got = forward_alone(&model, &mut kv, &tokens, LogitsWanted::All);
        assert_eq!(kv.len(), len);
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
