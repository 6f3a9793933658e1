//! `lmq quantize`: a model folder becomes a 4-bit AutoAWQ-gemm checkpoint.
//!
//! Layer by layer: one decoder layer's weights are read from the
//! memory-mapped input, quantized and handed to the shard writer before the
//! next layer is read, so memory holds about one layer plus one output
//! shard. Everything is written into a staged folder that is renamed into
//! place only when complete.

pub mod awq;
pub mod clip;
pub mod groupwise;
pub mod kv_smooth;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lmq_turbomind::checkpoint::Checkpoint;
use lmq_turbomind::config::ModelConfig;
use lmq_turbomind::quant::awq::{AwqConfig, GROUP_SIZES};
use serde_json::Value;

use crate::calib::{read_text, sample_windows, CalibConfig};
use crate::error::{Error, Result};
use crate::output::{ShardWriter, StagedDir, DEFAULT_SHARD_BYTES};
use awq::{
    clip_layer, fold_scales, search_scales, vo_foldable, InputObserver, LayerRunner, ScaleGroup,
    ScaleSettings, SearchInput,
};
use clip::ClipSettings;
use groupwise::GroupSpec;
use lmq_turbomind::backend::cpu::{CpuBackend, Matrix};
use lmq_turbomind::backend::{AttnShape, Backend, HostLinear, HostWeight, SeqSpan};
use lmq_turbomind::layer::HostLayer;
use lmq_turbomind::quant::kv::{
    param_tensor_name, KvCheckpointDefaults, KvDtype, KvMode, PARAM_NAMES, SHIFT_NAME, SMOOTH_NAME,
};
use lmq_turbomind::rope::Rope;
use lmq_turbomind::tokenizer::Tokenizer;
use lmq_turbomind::weights::WeightReader;

/// How the integer weights are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Activation-aware scale and clip search.
    Awq,
    /// Plain round-to-nearest, the baseline.
    Rtn,
}

/// Requested group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// 128 if every quantized layer allows it, else 64, else 32.
    Auto,
    Fixed(usize),
}

#[derive(Debug, Clone)]
pub struct QuantizeConfig {
    pub method: Method,
    pub w_bits: u32,
    pub group_size: GroupSize,
    pub symmetric: bool,
    /// Calibration text (AWQ only).
    pub calib_data: PathBuf,
    pub calib: CalibConfig,
    /// How many calibration sequences score the scale candidates (the
    /// statistics always use all of them).
    pub search_samples: usize,
    /// Record this KV-cache dtype as the default, with calibrated static
    /// parameters.
    pub kv: Option<KvDtype>,
    pub overwrite: bool,
    pub quiet: bool,
}

/// What `quantize` did, for the summary line.
#[derive(Debug)]
pub struct QuantizeSummary {
    pub out_dir: PathBuf,
    pub group_size: usize,
    pub elapsed: Duration,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub quantized_linears: usize,
    /// Layers or groups where AWQ fell back, with the reason.
    pub warnings: Vec<String>,
    /// Mean chosen α per scale group over layers, for the summary.
    pub mean_alpha: Vec<(String, f32)>,
    /// With KV statistics: the int4 `smooth` attention error of the
    /// searched key factors over that of the fixed `max|k|^0.75`, summed
    /// over layers on the calibration subset.
    pub kv_smooth_error_ratio: Option<f64>,
}

/// The linears of a decoder layer that are quantized, as (module, out, in).
pub(crate) fn layer_linears(c: &ModelConfig, layer: usize) -> Vec<(String, usize, usize)> {
    let n = &c.arch.names;
    let (h, q, kv, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    [
        (n.q_proj, q, h),
        (n.k_proj, kv, h),
        (n.v_proj, kv, h),
        (n.o_proj, h, q),
        (n.gate_proj, f, h),
        (n.up_proj, f, h),
        (n.down_proj, h, f),
    ]
    .into_iter()
    .map(|(m, out, inp)| (n.layer(layer, m), out, inp))
    .collect()
}

/// Picks the group size, or explains which layer forbids the requested one.
pub fn resolve_group_size(c: &ModelConfig, requested: GroupSize) -> Result<usize> {
    let linears = layer_linears(c, 0);
    let fits = |g: usize| {
        linears
            .iter()
            .all(|(_, out, inp)| inp % g == 0 && out % 8 == 0)
    };
    match requested {
        GroupSize::Auto => GROUP_SIZES
            .iter()
            .rev()
            .copied()
            .find(|&g| fits(g))
            .ok_or_else(|| Error::Invalid {
                message: format!(
                    "no group size in {GROUP_SIZES:?} divides every layer's in_features ({})",
                    describe_in_features(&linears)
                ),
            }),
        GroupSize::Fixed(g) => {
            if let Some((name, out, _)) = linears.iter().find(|(_, out, _)| out % 8 != 0) {
                return Err(Error::Invalid {
                    message: format!(
                        "{name} has {out} outputs; the AutoAWQ layout packs them by 8"
                    ),
                });
            }
            if let Some((name, _, inp)) = linears.iter().find(|(_, _, inp)| inp % g != 0) {
                let working: Vec<usize> =
                    GROUP_SIZES.iter().copied().filter(|&s| fits(s)).collect();
                return Err(Error::Invalid {
                    message: format!(
                        "--group-size {g} does not divide in_features {inp} of {name}; group sizes that work for this model: {working:?}"
                    ),
                });
            }
            Ok(g)
        }
    }
}

fn describe_in_features(linears: &[(String, usize, usize)]) -> String {
    let mut sizes: Vec<usize> = linears.iter().map(|l| l.2).collect();
    sizes.sort();
    sizes.dedup();
    format!("{sizes:?}")
}

/// Bytes of the files directly inside `dir`.
pub(crate) fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The `quantization_config` of every 4-bit checkpoint lmq writes: zero
/// points stored (symmetric groups store 8), every decoder linear
/// converted. `lmq synth-model` writes the same, so the two stay one format.
pub(crate) fn awq_quantization_config(bits: u32, group_size: usize) -> AwqConfig {
    AwqConfig {
        bits,
        group_size,
        zero_point: true,
        modules_to_not_convert: Vec::new(),
    }
}

/// Files copied unchanged from the input folder when present.
const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Quantizes `model_dir` into `out_dir`.
pub fn quantize(model_dir: &Path, out_dir: &Path, cfg: &QuantizeConfig) -> Result<QuantizeSummary> {
    let t0 = Instant::now();
    if cfg.w_bits != 4 {
        return Err(Error::Invalid {
            message: format!(
                "--w-bits {}: only 4-bit weights are supported (the AutoAWQ gemm layout)",
                cfg.w_bits
            ),
        });
    }
    let config = ModelConfig::from_dir(model_dir)?;
    if config.quantization.is_some() {
        return Err(Error::Invalid {
            message: format!(
                "{} is already quantized (config.json has quantization_config); quantize the original fp16/bf16 model",
                model_dir.display()
            ),
        });
    }
    let group_size = resolve_group_size(&config, cfg.group_size)?;
    let spec = GroupSpec {
        bits: cfg.w_bits,
        group_size,
        symmetric: cfg.symmetric,
    };
    let checkpoint = Checkpoint::open(model_dir)?;

    let staged = StagedDir::new(out_dir, cfg.overwrite)?;
    let mut writer = ShardWriter::new(&staged, DEFAULT_SHARD_BYTES);
    let progress = if cfg.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(config.num_layers as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] layer {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    };

    let reader = WeightReader::new(&checkpoint, &config);
    let mut awq_state = if cfg.method == Method::Awq || cfg.kv.is_some() {
        Some(CalibState::new(model_dir, &config, &checkpoint, cfg)?)
    } else {
        None
    };
    let mut written = std::collections::HashSet::new();
    let mut quantized_linears = 0;
    let mut warnings = Vec::new();
    let mut alphas: Vec<(String, f32, usize)> = Vec::new();
    let mut kv_loss = (0f64, 0f64);
    for layer in 0..config.num_layers {
        let mut host = reader.layer(layer)?;
        if let Some(state) = awq_state.as_mut() {
            let report = state.process_layer(layer, &mut host, &spec, &progress)?;
            if let (Some(dtype), Some(stats)) = (cfg.kv, &report.kv_ranges) {
                write_kv_params(&mut writer, &config, layer, stats, dtype, &mut written)?;
                kv_loss.0 += stats.smooth_loss.0;
                kv_loss.1 += stats.smooth_loss.1;
            }
            warnings.extend(report.warnings);
            for (name, alpha) in report.alphas {
                match alphas.iter_mut().find(|a| a.0 == name) {
                    Some(a) => {
                        a.1 += alpha;
                        a.2 += 1;
                    }
                    None => alphas.push((name, alpha, 1)),
                }
            }
        }
        progress.set_message("write");
        quantized_linears += write_layer(&mut writer, &config, layer, &host, &spec, &mut written)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let quantized: std::collections::HashSet<String> = (0..config.num_layers)
        .flat_map(|l| {
            layer_linears(&config, l)
                .into_iter()
                .map(|(m, _, _)| format!("{m}.weight"))
        })
        .collect();

    // Everything else (embeddings, norms, biases, lm_head) stays fp16.
    let mut rest: Vec<String> = checkpoint
        .names()
        .filter(|n| !quantized.contains(*n) && !written.contains(*n))
        .map(String::from)
        .collect();
    rest.sort();
    for name in rest {
        let meta = checkpoint.meta(&name).ok_or_else(|| Error::Invalid {
            message: format!("tensor {name} vanished from the checkpoint"),
        })?;
        let values = checkpoint.f32(&name, &meta.shape)?;
        writer.push_f16(name, meta.shape, &values)?;
    }
    writer.finish()?;

    let config_path = model_dir.join("config.json");
    let mut config_json: Value = lmq_turbomind::error::read_json(&config_path)?;
    config_json["quantization_config"] = awq_quantization_config(cfg.w_bits, group_size).to_json();
    config_json["torch_dtype"] = Value::String("float16".into());
    if let Some(dtype) = cfg.kv {
        // The best measured mode per dtype (docs/QUALITY.md): plain online
        // for int8, smoothed for int4 where the head size allows the
        // smooth mode's Walsh-Hadamard rotation (a power of two).
        let mode = if dtype == KvDtype::Int4 && config.head_dim.is_power_of_two() {
            KvMode::Smooth
        } else {
            KvMode::Online
        };
        config_json["kv_cache_quant"] = KvCheckpointDefaults { dtype, mode }.to_json();
    }
    staged.write_json("config.json", &config_json)?;
    for file in COPIED_FILES {
        let src = model_dir.join(file);
        if src.exists() {
            std::fs::copy(&src, staged.path(file)).map_err(|e| Error::io(&src, e))?;
        }
    }
    let out = staged.commit()?;
    Ok(QuantizeSummary {
        output_bytes: dir_size(&out),
        input_bytes: dir_size(model_dir),
        out_dir: out,
        group_size,
        elapsed: t0.elapsed(),
        quantized_linears,
        warnings,
        mean_alpha: alphas
            .into_iter()
            .map(|(n, sum, count)| (n, sum / count as f32))
            .collect(),
        kv_smooth_error_ratio: (kv_loss.1 > 0.0).then(|| kv_loss.0 / kv_loss.1),
    })
}

/// Writes one layer: norms in fp16, linears as AWQ tensors (biases fp16).
fn write_layer(
    writer: &mut ShardWriter<'_>,
    config: &ModelConfig,
    layer: usize,
    host: &HostLayer,
    spec: &GroupSpec,
    written: &mut std::collections::HashSet<String>,
) -> Result<usize> {
    let names = &config.arch.names;
    for (module, values) in [
        (names.input_norm, &host.input_norm),
        (names.post_attention_norm, &host.post_attention_norm),
    ] {
        let name = format!("{}.weight", names.layer(layer, module));
        writer.push_f16(name.clone(), vec![values.len()], values)?;
        written.insert(name);
    }
    let linears: [(&str, &HostLinear); 7] = [
        (names.q_proj, &host.q),
        (names.k_proj, &host.k),
        (names.v_proj, &host.v),
        (names.o_proj, &host.o),
        (names.gate_proj, &host.gate),
        (names.up_proj, &host.up),
        (names.down_proj, &host.down),
    ];
    for (module, l) in linears {
        let module = names.layer(layer, module);
        let HostWeight::Dense(w) = &l.weight else {
            return Err(Error::Invalid {
                message: format!("{module} is already quantized"),
            });
        };
        if let Some(bad) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid {
                message: format!("{module}.weight holds a non-finite value at index {bad}"),
            });
        }
        let (out, inp, g) = (l.out_features, l.in_features, spec.group_size);
        let t = spec.quantize(w, out, inp);
        let i32_bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        writer.push(
            format!("{module}.qweight"),
            safetensors::Dtype::I32,
            vec![inp, out / 8],
            i32_bytes(&t.qweight),
        )?;
        writer.push(
            format!("{module}.qzeros"),
            safetensors::Dtype::I32,
            vec![inp / g, out / 8],
            i32_bytes(&t.qzeros),
        )?;
        writer.push(
            format!("{module}.scales"),
            safetensors::Dtype::F16,
            vec![inp / g, out],
            t.scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )?;
        if let Some(b) = &l.bias {
            let name = format!("{module}.bias");
            writer.push_f16(name.clone(), vec![b.len()], b)?;
            written.insert(name);
        }
    }
    Ok(7)
}

/// What calibration did to one layer.
struct LayerReport {
    warnings: Vec<String>,
    alphas: Vec<(String, f32)>,
    /// Per KV head, (min, max) of post-RoPE K and of V over all tokens.
    kv_ranges: Option<KvRanges>,
}

/// Per KV head value ranges of K (after RoPE) and V.
struct KvRanges {
    k: Vec<(f32, f32)>,
    v: Vec<(f32, f32)>,
    /// The `smooth` mode's per key channel factors, searched on the
    /// calibration subset (see [`kv_smooth`]).
    k_smooth: Vec<f32>,
    /// The `smooth` mode's per key channel offsets (zeros where none).
    k_shift: Vec<f32>,
    /// The attention error of those factors and of the fixed ones.
    smooth_loss: (f64, f64),
}

fn channel_absmax(x: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; x.cols];
    for r in 0..x.rows {
        for (m, &v) in out.iter_mut().zip(x.row(r)) {
            *m = m.max(v.abs());
        }
    }
    out
}

/// (min, max) of each column.
fn channel_ranges(x: &Matrix) -> Vec<(f32, f32)> {
    let mut out = vec![(f32::INFINITY, f32::NEG_INFINITY); x.cols];
    for r in 0..x.rows {
        for (m, &v) in out.iter_mut().zip(x.row(r)) {
            m.0 = m.0.min(v);
            m.1 = m.1.max(v);
        }
    }
    out
}

fn head_ranges(x: &Matrix, heads: usize) -> Vec<(f32, f32)> {
    let hd = x.cols / heads;
    let mut out = vec![(f32::INFINITY, f32::NEG_INFINITY); heads];
    for r in 0..x.rows {
        for (h, seg) in x.row(r).chunks_exact(hd).enumerate() {
            for &v in seg {
                out[h].0 = out[h].0.min(v);
                out[h].1 = out[h].1.max(v);
            }
        }
    }
    out
}

/// Writes one layer's static KV parameters (scale, zero) per head.
fn write_kv_params(
    writer: &mut ShardWriter<'_>,
    config: &ModelConfig,
    layer: usize,
    ranges: &KvRanges,
    dtype: KvDtype,
    written: &mut std::collections::HashSet<String>,
) -> Result<()> {
    let levels = dtype.levels().unwrap_or(255.0);
    let prefix = config.arch.names.layer(layer, "");
    let params = |r: &[(f32, f32)]| -> (Vec<f32>, Vec<f32>) {
        r.iter()
            .map(|&(lo, hi)| (((hi - lo) / levels).max(1e-8), lo))
            .unzip()
    };
    let (k_scale, k_zero) = params(&ranges.k);
    let (v_scale, v_zero) = params(&ranges.v);
    let per_head = PARAM_NAMES.iter().zip([k_scale, k_zero, v_scale, v_zero]);
    let per_channel = [
        (&SMOOTH_NAME, ranges.k_smooth.clone()),
        (&SHIFT_NAME, ranges.k_shift.clone()),
    ];
    for (param, values) in per_head.chain(per_channel) {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid {
                message: format!("layer {layer}: non-finite KV statistics for {param}"),
            });
        }
        let name = param_tensor_name(&prefix, param);
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        writer.push(
            name.clone(),
            safetensors::Dtype::F32,
            vec![values.len()],
            bytes,
        )?;
        written.insert(name);
    }
    Ok(())
}

/// The calibration activations flowing through the model, layer by layer.
struct CalibState {
    backend: CpuBackend,
    rope: Rope,
    shape: AttnShape,
    eps: f32,
    /// Residual-stream input of the current layer, all calibration tokens.
    x: Matrix,
    spans: Vec<SeqSpan>,
    subset_spans: Vec<SeqSpan>,
    /// Run AWQ's scale and clip search (else only statistics).
    search: bool,
    /// Collect KV ranges for static KV parameters.
    kv_stats: bool,
}

impl CalibState {
    fn new(
        model_dir: &Path,
        config: &ModelConfig,
        checkpoint: &Checkpoint,
        cfg: &QuantizeConfig,
    ) -> Result<Self> {
        let text = read_text(&cfg.calib_data)?;
        let tokenizer = Tokenizer::from_dir(model_dir)?;
        let windows = sample_windows(&text, &tokenizer, &cfg.calib, &cfg.calib_data)?;
        if cfg.calib.seqlen > config.max_position_embeddings {
            return Err(Error::Invalid {
                message: format!(
                    "--calib-seqlen {} exceeds the model's context of {}",
                    cfg.calib.seqlen, config.max_position_embeddings
                ),
            });
        }
        let backend = CpuBackend::new();
        let reader = WeightReader::new(checkpoint, config);
        let embed = backend.upload_linear(reader.linear(
            config.arch.names.embed_tokens,
            config.vocab_size,
            config.hidden_size,
            false,
        )?)?;
        let ids: Vec<u32> = windows.concat();
        let x = backend.embedding(&embed, &ids)?;
        let seqlen = cfg.calib.seqlen;
        let (spans, _) = SeqSpan::packed(&vec![seqlen; windows.len()], awq::CALIB_BLOCK_LEN);
        let subset_spans = spans[..cfg.search_samples.clamp(1, spans.len())].to_vec();
        Ok(CalibState {
            backend,
            rope: Rope::new(config.head_dim, config.rope_theta, &config.rope_scaling),
            shape: AttnShape {
                num_heads: config.num_heads,
                num_kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
                num_layers: 1,
            },
            eps: config.rms_norm_eps,
            x,
            spans,
            subset_spans,
            search: cfg.method == Method::Awq,
            kv_stats: cfg.kv.is_some(),
        })
    }

    /// Searches and folds scales, clips, and advances the activations to
    /// the next layer (computed with the original weights, as AutoAWQ does).
    fn process_layer(
        &mut self,
        layer: usize,
        host: &mut HostLayer,
        spec: &GroupSpec,
        progress: &ProgressBar,
    ) -> Result<LayerReport> {
        let runner = LayerRunner {
            backend: &self.backend,
            rope: &self.rope,
            shape: self.shape,
            eps: self.eps,
        };
        progress.set_message("calibrate");
        let original = host.clone();
        let dev = lmq_turbomind::layer::DecoderLayer::upload(original.clone(), &self.backend)?;
        let subset_rows = self.subset_spans.last().map(|s| s.rows.end).unwrap_or(0);
        let mut observer = InputObserver::new(subset_rows);
        let next = runner.forward(&dev, &self.x, &self.spans, &mut observer)?;
        drop(dev);
        let mut report = LayerReport {
            warnings: Vec::new(),
            alphas: Vec::new(),
            kv_ranges: None,
        };
        if !self.search {
            report.kv_ranges = self.kv_ranges(host)?;
            self.x = next;
            return Ok(report);
        }

        let mut groups = vec![ScaleGroup::Qkv, ScaleGroup::GateUp, ScaleGroup::UpDown];
        if vo_foldable(host) {
            groups.insert(1, ScaleGroup::VO);
        }
        let mut scales = std::collections::HashMap::new();
        for group in groups {
            progress.set_message(format!("search {}", group.name()));
            let key = group.input();
            let (Some(x_mean), Some(input)) =
                (observer.mean_abs.get(&key), observer.subset.get(&key))
            else {
                continue;
            };
            let result = search_scales(
                &runner,
                group,
                &original,
                &SearchInput {
                    x_mean,
                    input,
                    spans: &self.subset_spans,
                },
                spec,
                ScaleSettings::default(),
            )?;
            if let Some(reason) = &result.fallback {
                report.warnings.push(format!(
                    "layer {layer} {}: {reason}; kept unscaled (plain round-to-nearest for this group)",
                    group.name()
                ));
            } else {
                report
                    .alphas
                    .push((group.name().to_string(), result.best_alpha));
            }
            fold_scales(host, group, &result.scales)?;
            scales.insert(key, result.scales);
        }
        progress.set_message("clip");
        clip_layer(
            host,
            &observer.subset,
            &scales,
            spec,
            512,
            ClipSettings::default(),
        )?;
        if !layer_is_finite(host) {
            report.warnings.push(format!(
                "layer {layer}: AWQ produced non-finite weights; fell back to round-to-nearest for the whole layer"
            ));
            *host = original;
        }
        // KV statistics come from the layer as written (scales folded into
        // v_proj change what the cache holds).
        report.kv_ranges = self.kv_ranges(host)?;
        if next.data.iter().any(|v| !v.is_finite()) {
            report.warnings.push(format!(
                "layer {layer}: non-finite activations in the calibration run; later layers may fall back"
            ));
        }
        self.x = next;
        Ok(report)
    }
}

impl CalibState {
    /// Per-head ranges of post-RoPE K and of V on all calibration tokens,
    /// if static KV parameters were asked for.
    fn kv_ranges(&self, host: &HostLayer) -> Result<Option<KvRanges>> {
        if !self.kv_stats {
            return Ok(None);
        }
        let b = &self.backend;
        let norm = b.upload_vector(host.input_norm.clone())?;
        let h = b.rms_norm(&self.x, &norm, self.eps)?;
        let mut k = b.linear(&h, &b.upload_linear(host.k.clone())?)?;
        b.rope(&mut k, self.shape.num_kv_heads, &self.spans, &self.rope)?;
        let v = b.linear(&h, &b.upload_linear(host.v.clone())?)?;
        let mut q = b.linear(&h, &b.upload_linear(host.q.clone())?)?;
        b.rope(&mut q, self.shape.num_heads, &self.spans, &self.rope)?;
        let rows = self.subset_spans.last().map_or(0, |s| s.rows.end);
        let first_rows = |m: &Matrix| Matrix {
            data: m.data[..rows * m.cols].to_vec(),
            rows,
            cols: m.cols,
        };
        let (k_absmax, q_absmax) = (channel_absmax(&k), channel_absmax(&q));
        let k_range = channel_ranges(&k);
        let (q_sub, k_sub, v_sub) = (first_rows(&q), first_rows(&k), first_rows(&v));
        let choice = kv_smooth::search_key_factors(
            b,
            self.shape,
            &kv_smooth::KvSearchInput {
                q: &q_sub,
                k: &k_sub,
                v: &v_sub,
                spans: &self.subset_spans,
                k_absmax: &k_absmax,
                k_range: &k_range,
                q_absmax: &q_absmax,
            },
        )?;
        Ok(Some(KvRanges {
            k: head_ranges(&k, self.shape.num_kv_heads),
            v: head_ranges(&v, self.shape.num_kv_heads),
            k_smooth: choice.factors,
            k_shift: choice.shift,
            smooth_loss: (
                choice.loss.iter().filter(|l| l.is_finite()).sum(),
                choice.loss_fixed.iter().filter(|l| l.is_finite()).sum(),
            ),
        }))
    }
}

fn layer_is_finite(host: &HostLayer) -> bool {
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    let linear_ok = |l: &HostLinear| {
        matches!(&l.weight, HostWeight::Dense(w) if finite(w))
            && l.bias.as_deref().is_none_or(finite)
    };
    finite(&host.input_norm)
        && finite(&host.post_attention_norm)
        && [
            &host.q, &host.k, &host.v, &host.o, &host.gate, &host.up, &host.down,
        ]
        .into_iter()
        .all(linear_ok)
}
