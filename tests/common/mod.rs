//! Shared helpers for the end-to-end tests.
#![allow(dead_code)]

pub mod cluster;
pub mod gguf;
pub mod http;
pub mod python;
pub mod stub;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use lmq_turbomind::backend::cpu::CpuBackend;
use lmq_turbomind::model::Model;
use lmq_turbomind::tokenizer::Tokenizer;

/// The imported SmolLM2-135M folder: `$LMQ_TEST_MODEL`, or the cache that
/// `scripts/fetch-model.sh` fills. Missing means the setup step was
/// skipped, which is a failure, not a skip.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("LMQ_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/lmq/models/smollm2-135m")
        });
    assert!(
        dir.join("config.json").exists(),
        "test model not found at {}: run scripts/fetch-model.sh smollm2-135m (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// The model and tokenizer, loaded once per test binary.
pub fn smollm2() -> &'static (Model<CpuBackend>, Tokenizer) {
    static MODEL: OnceLock<(Model<CpuBackend>, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = model_dir();
        let tokenizer = Tokenizer::from_dir(&dir).expect("tokenizer loads");
        let model = Model::load(&dir, CpuBackend::new()).expect("model loads");
        (model, tokenizer)
    })
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("float list")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

/// Runs the `lmq` binary built for these tests.
pub fn lmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmq"))
        .args(args)
        .output()
        .expect("lmq runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Writes a line to the real stderr, past the test harness's capture, so
/// measured numbers show in CI logs even when the test passes.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
