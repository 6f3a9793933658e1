//! Architectures as data: which Hugging Face classes map onto the one decoder,
//! and what their weights are called.
//!
//! Adding an architecture that is the same pre-norm decoder (RMSNorm, rotary
//! attention with optional QKV bias, SiLU-gated MLP) means adding one entry
//! to [`ARCHITECTURES`]; no model code changes.

/// Weight names of one architecture. `{i}` in a layer name stands for the
/// layer index.
#[derive(Debug, Clone, Copy)]
pub struct WeightNames {
    pub embed_tokens: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    pub layer_prefix: &'static str,
    pub input_norm: &'static str,
    pub post_attention_norm: &'static str,
    pub q_proj: &'static str,
    pub k_proj: &'static str,
    pub v_proj: &'static str,
    pub o_proj: &'static str,
    pub gate_proj: &'static str,
    pub up_proj: &'static str,
    pub down_proj: &'static str,
}

impl WeightNames {
    /// The full name of a per-layer module, without the `.weight` suffix.
    pub fn layer(&self, layer: usize, module: &str) -> String {
        format!(
            "{}{module}",
            self.layer_prefix.replace("{i}", &layer.to_string())
        )
    }
}

/// One supported architecture.
#[derive(Debug, Clone, Copy)]
pub struct Architecture {
    /// The `model_type` field of `config.json`.
    pub model_type: &'static str,
    /// The `architectures` entries of `config.json` that select it.
    pub hf_classes: &'static [&'static str],
    /// Whether q/k/v carry a bias when `config.json` does not say
    /// (`attention_bias`). Qwen2 always has one.
    pub default_qkv_bias: bool,
    /// Whether `attention_bias: true` also gives `o_proj` a bias (Llama
    /// and Mistral, as in Hugging Face's `LlamaAttention`).
    pub attention_bias_covers_o: bool,
    pub names: WeightNames,
}

const HF_LLAMA_NAMES: WeightNames = WeightNames {
    embed_tokens: "model.embed_tokens",
    final_norm: "model.norm",
    lm_head: "lm_head",
    layer_prefix: "model.layers.{i}.",
    input_norm: "input_layernorm",
    post_attention_norm: "post_attention_layernorm",
    q_proj: "self_attn.q_proj",
    k_proj: "self_attn.k_proj",
    v_proj: "self_attn.v_proj",
    o_proj: "self_attn.o_proj",
    gate_proj: "mlp.gate_proj",
    up_proj: "mlp.up_proj",
    down_proj: "mlp.down_proj",
};

/// Every architecture the decoder runs.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        model_type: "llama",
        hf_classes: &["LlamaForCausalLM"],
        default_qkv_bias: false,
        attention_bias_covers_o: true,
        names: HF_LLAMA_NAMES,
    },
    Architecture {
        model_type: "mistral",
        hf_classes: &["MistralForCausalLM"],
        default_qkv_bias: false,
        attention_bias_covers_o: true,
        names: HF_LLAMA_NAMES,
    },
    Architecture {
        model_type: "qwen2",
        hf_classes: &["Qwen2ForCausalLM"],
        default_qkv_bias: true,
        attention_bias_covers_o: false,
        names: HF_LLAMA_NAMES,
    },
];

/// Finds the architecture for a `config.json`'s `architectures` list or,
/// failing that, its `model_type`.
pub fn lookup(classes: &[String], model_type: Option<&str>) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| classes.iter().any(|c| a.hf_classes.contains(&c.as_str())))
        .or_else(|| {
            let model_type = model_type?;
            ARCHITECTURES.iter().find(|a| a.model_type == model_type)
        })
}

/// A comma-separated list of supported classes, for error messages.
pub fn supported_list() -> String {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.hf_classes.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}
