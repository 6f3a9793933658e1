//! Reading a decoder's weights from a checkpoint, with every shape checked
//! against the config and every tensor accounted for.

use std::cell::RefCell;
use std::collections::HashSet;

use crate::backend::{HostLinear, HostWeight};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::layer::HostLayer;
use crate::quant::awq::{AwqConfig, AwqTensors};
use crate::quant::kv::{param_tensor_name, KvStaticParams, PARAM_NAMES, SHIFT_NAME, SMOOTH_NAME};

/// Reads one model's weights and checks every shape against the config.
pub struct WeightReader<'a> {
    checkpoint: &'a Checkpoint,
    config: &'a ModelConfig,
    awq: Option<AwqConfig>,
    /// Every tensor name read so far, to find tensors nobody reads.
    consumed: RefCell<HashSet<String>>,
}

impl<'a> WeightReader<'a> {
    pub fn new(checkpoint: &'a Checkpoint, config: &'a ModelConfig) -> Self {
        WeightReader {
            checkpoint,
            config,
            awq: config.quantization.clone(),
            consumed: Default::default(),
        }
    }

    /// Calibrated static KV parameters, if the checkpoint has them.
    pub fn kv_static_params(&self) -> Result<Option<KvStaticParams>> {
        let c = self.config;
        let prefix = |i: usize| c.arch.names.layer(i, "");
        if !self
            .checkpoint
            .contains(&param_tensor_name(&prefix(0), PARAM_NAMES[0]))
        {
            return Ok(None);
        }
        let mut tables: [Vec<Vec<f32>>; 4] = Default::default();
        for i in 0..c.num_layers {
            for (table, param) in tables.iter_mut().zip(PARAM_NAMES) {
                table.push(self.f32(&param_tensor_name(&prefix(i), param), &[c.num_kv_heads])?);
            }
        }
        let [k_scale, k_zero, v_scale, v_zero] = tables;
        let k_smooth = (0..c.num_layers)
            .map(|i| self.f32(&param_tensor_name(&prefix(i), SMOOTH_NAME), &[c.kv_dim()]))
            .collect::<Result<Vec<_>>>()?;
        // Offsets are optional: checkpoints written before they existed
        // have none, and subtract nothing.
        let k_shift = (0..c.num_layers)
            .map(|i| {
                let name = param_tensor_name(&prefix(i), SHIFT_NAME);
                if self.checkpoint.contains(&name) {
                    self.f32(&name, &[c.kv_dim()])
                } else {
                    Ok(Vec::new())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(KvStaticParams {
            k_scale,
            k_zero,
            v_scale,
            v_zero,
            k_smooth,
            k_shift,
            levels: c
                .kv_cache_quant
                .and_then(|d| d.dtype.levels())
                .unwrap_or(255.0),
        }))
    }

    /// Host weights of decoder layer `i`.
    pub fn layer(&self, i: usize) -> Result<HostLayer> {
        let c = self.config;
        let names = &c.arch.names;
        let m = |module: &str| names.layer(i, module);
        let (hidden, q_dim, kv_dim, inter) = self.dims();
        Ok(HostLayer {
            input_norm: self.vector(&m(names.input_norm), hidden)?,
            post_attention_norm: self.vector(&m(names.post_attention_norm), hidden)?,
            q: self.linear(&m(names.q_proj), q_dim, hidden, c.qkv_bias)?,
            k: self.linear(&m(names.k_proj), kv_dim, hidden, c.qkv_bias)?,
            v: self.linear(&m(names.v_proj), kv_dim, hidden, c.qkv_bias)?,
            o: self.linear(&m(names.o_proj), hidden, q_dim, c.o_bias)?,
            gate: self.linear(&m(names.gate_proj), inter, hidden, c.mlp_bias)?,
            up: self.linear(&m(names.up_proj), inter, hidden, c.mlp_bias)?,
            down: self.linear(&m(names.down_proj), hidden, inter, c.mlp_bias)?,
        })
    }

    pub fn vector(&self, module: &str, len: usize) -> Result<Vec<f32>> {
        self.f32(&format!("{module}.weight"), &[len])
    }

    pub fn mark(&self, name: &str) {
        self.consumed.borrow_mut().insert(name.to_string());
    }

    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.mark(name);
        self.checkpoint.f32(name, shape)
    }

    pub fn i32(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        self.mark(name);
        self.checkpoint.i32(name, shape)
    }

    pub fn f16(&self, name: &str, shape: &[usize]) -> Result<Vec<half::f16>> {
        self.mark(name);
        self.checkpoint.f16(name, shape)
    }

    /// Fails if the checkpoint holds tensors the decoder never read: they
    /// mean the architecture table does not describe this model, and
    /// ignoring them would give wrong outputs silently.
    pub fn check_all_consumed(&self) -> Result<()> {
        let consumed = self.consumed.borrow();
        let mut unused: Vec<&str> = self
            .checkpoint
            .names()
            .filter(|n| !consumed.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let shown = unused
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        Err(Error::config(
            self.checkpoint.path_of(unused[0]),
            format!(
                "{} tensor(s) are not used by the {} decoder (for example {shown}); this checkpoint does not match its config",
                unused.len(),
                self.config.arch.model_type
            ),
        ))
    }

    pub fn linear(
        &self,
        module: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<HostLinear> {
        let qweight_name = format!("{module}.qweight");
        let weight = match &self.awq {
            Some(awq) if self.checkpoint.contains(&qweight_name) => {
                let g = awq.group_size;
                let path = self.checkpoint.path_of(&qweight_name).to_path_buf();
                if !in_features.is_multiple_of(g) || !out_features.is_multiple_of(8) {
                    return Err(Error::config(
                        path,
                        format!("{module}: in_features {in_features} is not a multiple of group_size {g}, or out_features {out_features} of 8"),
                    ));
                }
                let tensors = AwqTensors {
                    in_features,
                    out_features,
                    group_size: g,
                    qweight: self.i32(&qweight_name, &[in_features, out_features / 8])?,
                    qzeros: self.i32(
                        &format!("{module}.qzeros"),
                        &[in_features / g, out_features / 8],
                    )?,
                    scales: self.f16(
                        &format!("{module}.scales"),
                        &[in_features / g, out_features],
                    )?,
                };
                tensors.validate(module, &path)?;
                HostWeight::Awq(tensors)
            }
            _ => HostWeight::Dense(
                self.f32(&format!("{module}.weight"), &[out_features, in_features])?,
            ),
        };
        let bias = if bias {
            Some(self.f32(&format!("{module}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(HostLinear {
            weight,
            out_features,
            in_features,
            bias,
        })
    }

    pub fn dims(&self) -> (usize, usize, usize, usize) {
        let c = self.config;
        (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size)
    }
}
