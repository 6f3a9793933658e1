//! End-to-end tests of `lmq synth-model`: the random-weight checkpoints it
//! writes load in the engine, run `generate` and `eval ppl` with finite
//! results, are reproducible from their seed, and bad arguments fail
//! cleanly without leaving a folder behind.

mod common;

use std::path::{Path, PathBuf};

use common::{lmq, stderr, stdout};
use lmq_turbomind::backend::cpu::CpuBackend;
use lmq_turbomind::checkpoint::Checkpoint;
use lmq_turbomind::config::ModelConfig;
use lmq_turbomind::model::{LogitsWanted, Model};
use lmq_turbomind::quant::awq::AwqTensors;
use lmq_turbomind::tokenizer::Tokenizer;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Writes a tiny synthetic model and returns its folder.
fn synth(parent: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let dir = parent.join(name);
    let mut args = vec!["synth-model", "--out", path_str(&dir), "--quiet"];
    args.extend_from_slice(extra);
    let out = lmq(&args);
    assert!(out.status.success(), "synth-model failed: {}", stderr(&out));
    assert!(stderr(&out).contains("synthesized"), "{}", stderr(&out));
    dir
}

/// Last-position logits for a prompt, on the CPU backend.
fn logits(dir: &Path, prompt: &str) -> Vec<f32> {
    let model = Model::load(dir, CpuBackend::new()).expect("the synthetic model loads");
    let tokenizer = Tokenizer::from_dir(dir).expect("the tokenizer loads");
    let ids = tokenizer.encode_prompt(prompt).expect("encodes");
    let mut cache = model.new_solo_cache(ids.len()).expect("cache");
    model
        .forward_solo(&mut cache, &ids, LogitsWanted::Last)
        .expect("forward")
}

#[test]
fn awq_and_fp16_models_generate_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(20),
    )
    .unwrap();
    for weights in ["awq", "fp16"] {
        let dir = synth(tmp.path(), weights, &["--weights", weights]);
        let out = lmq(&[
            "generate",
            "--model",
            path_str(&dir),
            "--prompt",
            "Hello, world",
            "--max-tokens",
            "4",
            // All 4 tokens, whatever the random model samples.
            "--ignore-eos",
        ]);
        assert!(out.status.success(), "{weights}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("finish: length"),
            "{weights}: {}",
            stderr(&out)
        );
        let out = lmq(&[
            "eval",
            "ppl",
            "--model",
            path_str(&dir),
            "--text",
            path_str(&text),
            "--ctx",
            "64",
            "--json",
        ]);
        assert!(out.status.success(), "{weights}: {}", stderr(&out));
        let result: serde_json::Value =
            serde_json::from_str(stdout(&out).trim()).expect("one JSON line");
        let ppl = result["ppl"].as_f64().expect("ppl");
        // A random model is a poor but finite predictor: worse than a
        // perfect one, and nowhere near overflow.
        assert!(
            ppl.is_finite() && ppl > 1.0 && ppl < 1e6,
            "{weights}: ppl {ppl}"
        );
    }
}

#[test]
fn awq_tensors_validate_load_and_match_the_fp16_model() {
    let tmp = tempfile::tempdir().unwrap();
    let awq = synth(tmp.path(), "awq", &["--group-size", "64", "--seed", "5"]);
    let fp16 = synth(
        tmp.path(),
        "fp16",
        &["--group-size", "64", "--seed", "5", "--weights", "fp16"],
    );
    let config = ModelConfig::from_dir(&awq).expect("config parses");
    let quant = config.quantization.clone().expect("quantization_config");
    assert_eq!(
        (quant.bits, quant.group_size, quant.zero_point),
        (4, 64, true)
    );
    // Every decoder linear is stored in the AutoAWQ layout and validates.
    let checkpoint = Checkpoint::open(&awq).expect("opens");
    let (h, f) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (config.q_dim(), config.kv_dim());
    let names = &config.arch.names;
    for layer in 0..config.num_layers {
        for (module, n, k) in [
            (names.q_proj, q, h),
            (names.k_proj, kv, h),
            (names.v_proj, kv, h),
            (names.o_proj, h, q),
            (names.gate_proj, f, h),
            (names.up_proj, f, h),
            (names.down_proj, h, f),
        ] {
            let m = names.layer(layer, module);
            assert!(!checkpoint.contains(&format!("{m}.weight")), "{m} is dense");
            let t = AwqTensors {
                in_features: k,
                out_features: n,
                group_size: 64,
                qweight: checkpoint
                    .i32(&format!("{m}.qweight"), &[k, n / 8])
                    .unwrap(),
                qzeros: checkpoint
                    .i32(&format!("{m}.qzeros"), &[k / 64, n / 8])
                    .unwrap(),
                scales: checkpoint
                    .f16(&format!("{m}.scales"), &[k / 64, n])
                    .unwrap(),
            };
            t.validate(&m, &awq).expect("valid AWQ tensors");
        }
    }
    // Embeddings and lm_head stay fp16.
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let meta = checkpoint.meta(name).expect(name);
        assert_eq!(format!("{:?}", meta.dtype), "F16", "{name}");
    }
    // Both load through the engine, give finite, varied logits, and compute
    // the same function (the fp16 weights are the dequantized 4-bit ones).
    let prompt = "Synthetic weights, real shapes.";
    let (a, b) = (logits(&awq, prompt), logits(&fp16, prompt));
    assert_eq!(a.len(), config.vocab_size);
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (sum, n) = v.fold((0f64, 0usize), |(s, n), x| (s + (x * x) as f64, n + 1));
        (sum / n as f64).sqrt()
    };
    for l in [&a, &b] {
        assert!(l.iter().all(|x| x.is_finite()), "non-finite logits");
        let r = rms(&mut l.iter().copied());
        assert!((0.1..10.0).contains(&r), "logit RMS {r}");
    }
    // Relative, not exact: the CPU backend may quantize activations for
    // 4-bit linears. Two unrelated models would differ by about 140%.
    let diff = rms(&mut a.iter().zip(&b).map(|(x, y)| x - y));
    let scale = rms(&mut a.iter().copied());
    assert!(
        diff < 0.05 * scale,
        "AWQ and fp16 logits differ: RMS {diff} of {scale}"
    );
}

/// Every file of a folder, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_seed_alone_decides_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = synth(tmp.path(), "a", &["--seed", "11"]);
    let b = synth(tmp.path(), "b", &["--seed", "11"]);
    let c = synth(tmp.path(), "c", &["--seed", "12"]);
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert!(fa.iter().any(|(n, _)| n == "model.safetensors"));
    assert_eq!(fa, fb, "same seed, different files");
    let weights = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .find(|(n, _)| n == "model.safetensors")
            .map(|(_, bytes)| bytes.clone())
    };
    assert_ne!(weights(&fa), weights(&fc), "different seeds, same weights");
}

/// Runs `synth-model` expecting failure; checks the message and that no
/// folder (nor staging folder) was left next to `--out`.
fn synth_fails(extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let mut args = vec!["synth-model", "--out", path_str(&out_dir), "--quiet"];
    args.extend_from_slice(extra);
    let out = lmq(&args);
    let err = stderr(&out);
    assert!(!out.status.success(), "expected failure for {extra:?}");
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "partial output left behind: {left:?}");
}

#[test]
fn bad_shapes_and_group_sizes_fail_cleanly() {
    synth_fails(
        &["--hidden-size", "96", "--group-size", "128"],
        &["--group-size 128", "96", "[32]"],
    );
    synth_fails(&["--group-size", "48"], &["--group-size", "48"]);
    synth_fails(
        &["--num-heads", "3"],
        &["--num-heads 3", "--hidden-size 128"],
    );
    synth_fails(
        &["--num-kv-heads", "3"],
        &["--num-kv-heads 3", "--num-heads 4"],
    );
    synth_fails(&["--num-layers", "0"], &["--num-layers", "positive"]);
    synth_fails(&["--vocab-size", "100"], &["--vocab-size 100", "259"]);
    synth_fails(&["--preset", "llama9"], &["llama9", "llama2-7b"]);
}

#[test]
fn an_existing_folder_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let out = lmq(&["synth-model", "--out", path_str(&dir), "--quiet"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(
        dir.join("keep.txt").exists(),
        "the existing folder was touched"
    );
    let entries = std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(entries, 1, "a staging folder was left behind");
    synth(tmp.path(), "out", &["--force"]);
    assert!(!dir.join("keep.txt").exists());
    assert!(dir.join("model.safetensors").exists());
}

/// `quantize --kv int4` records the `smooth` mode as the int4 default only
/// where the model's head size allows it (a power of two, for the value
/// rotation): a head_dim of 48 gets `online`, which the engine then runs,
/// and a head_dim of 32 gets `smooth` with searched key factors and
/// offsets that load and run.
#[test]
fn int4_kv_default_follows_the_head_size() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(40),
    )
    .unwrap();
    for (head_dim, mode) in [("48", "online"), ("32", "smooth")] {
        let fp16 = synth(
            tmp.path(),
            &format!("hd{head_dim}"),
            &["--weights", "fp16", "--head-dim", head_dim],
        );
        let q = tmp.path().join(format!("q{head_dim}"));
        let out = lmq(&[
            "quantize",
            "--model",
            path_str(&fp16),
            "--out",
            path_str(&q),
            "--method",
            "rtn",
            "--group-size",
            "32",
            "--kv",
            "int4",
            "--calib-data",
            path_str(&text),
            "--calib-samples",
            "2",
            "--calib-seqlen",
            "64",
            "--quiet",
        ]);
        assert!(
            out.status.success(),
            "head_dim {head_dim}: {}",
            stderr(&out)
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            config["kv_cache_quant"]["mode"], mode,
            "head_dim {head_dim}"
        );
        let run = lmq(&[
            "eval",
            "ppl",
            "--model",
            path_str(&q),
            "--text",
            path_str(&text),
            "--ctx",
            "64",
            "--max-windows",
            "2",
            "--json",
        ]);
        assert!(
            run.status.success(),
            "head_dim {head_dim}: {}",
            stderr(&run)
        );
        let v: serde_json::Value = serde_json::from_str(stdout(&run).trim()).unwrap();
        assert_eq!(v["kv_cache_dtype"], "int4", "head_dim {head_dim}");
        assert!(v["ppl"].as_f64().is_some_and(f64::is_finite));
    }
}
