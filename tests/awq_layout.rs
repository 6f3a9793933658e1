//! Cross-checks the AutoAWQ gemm layout that `lmq quantize` writes against
//! an independent reader: `scripts/check_awq_layout.py` (numpy only) unpacks
//! qweight/qzeros/scales from the spec and must reproduce, bit for bit, the
//! f32 weights that `lmq_turbomind::quant::awq::AwqTensors::dequantize`
//! gives. Negative cases prove the script can fail.
//!
//! Needs `python3` with numpy (`pip install numpy`; `.ci/run` installs it).
//! A missing numpy is a failure, not a skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{lmq, model_dir, stderr, stdout};
use lmq_turbomind::checkpoint::Checkpoint;
use lmq_turbomind::quant::awq::{pack_int4, unpack_int4, AwqTensors, AWQ_PACK_ORDER};
use serde_json::Value;

/// The quantized linears of one decoder layer, in checkpoint naming.
const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn require_numpy() {
    match Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import numpy, which scripts/check_awq_layout.py needs: \
             run `pip install numpy` (CI's .ci/run installs it). python3 said: {}",
            stderr(&o).trim()
        ),
        Err(e) => panic!(
            "cannot run python3 ({e}): install python3, then `pip install numpy` \
             (scripts/check_awq_layout.py needs both)"
        ),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `lmq quantize --method rtn` into `tmp/q` and checks the group size
/// recorded in its config.json.
fn quantize(tmp: &Path, group_size: usize, symmetric: bool) -> PathBuf {
    let model = model_dir();
    let out = tmp.join("q");
    let g = group_size.to_string();
    let mut args = vec![
        "quantize",
        "--model",
        path_str(&model),
        "--out",
        path_str(&out),
        "--method",
        "rtn",
        "--group-size",
        &g,
        "--quiet",
    ];
    if symmetric {
        args.push("--w-sym");
    }
    let o = lmq(&args);
    assert!(
        o.status.success(),
        "lmq {} failed: {}",
        args.join(" "),
        stderr(&o)
    );
    let config = read_json(&out.join("config.json"));
    assert_eq!(
        config["quantization_config"]["group_size"].as_u64(),
        Some(group_size as u64),
        "config.json: {}",
        config["quantization_config"]
    );
    out
}

/// Modules of the first and last decoder layer, with their `(out, in)`
/// shapes from the model's config.json.
fn checked_modules(qdir: &Path) -> Vec<(String, usize, usize)> {
    let c = read_json(&qdir.join("config.json"));
    let get = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.json: {k}")) as usize;
    let (h, f, layers) = (
        get("hidden_size"),
        get("intermediate_size"),
        get("num_hidden_layers"),
    );
    let heads = get("num_attention_heads");
    let head_dim = c["head_dim"].as_u64().map_or(h / heads, |d| d as usize);
    let (q, kv) = (heads * head_dim, get("num_key_value_heads") * head_dim);
    let shapes = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)];
    [0, layers - 1]
        .into_iter()
        .flat_map(|layer| {
            LINEARS
                .iter()
                .zip(shapes)
                .map(move |(m, (out, inp))| (format!("model.layers.{layer}.{m}"), out, inp))
        })
        .collect()
}

/// Reads one linear's stored AWQ tensors through the library.
fn load_awq(ck: &Checkpoint, module: &str, out: usize, inp: usize, g: usize) -> AwqTensors {
    let t = AwqTensors {
        in_features: inp,
        out_features: out,
        group_size: g,
        qweight: ck
            .i32(&format!("{module}.qweight"), &[inp, out / 8])
            .unwrap(),
        qzeros: ck
            .i32(&format!("{module}.qzeros"), &[inp / g, out / 8])
            .unwrap(),
        scales: ck
            .f16(&format!("{module}.scales"), &[inp / g, out])
            .unwrap(),
    };
    t.validate(module, ck.path_of(&format!("{module}.qweight")))
        .unwrap();
    t
}

/// One tensor to write: name, safetensors dtype, shape, little-endian bytes.
type RawTensor = (String, &'static str, Vec<usize>, Vec<u8>);

/// Writes a safetensors file by hand (8-byte LE header length, JSON header
/// padded to 8 bytes, data), so the test needs no extra dependency.
fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut file = Vec::with_capacity(8 + json.len() + offset);
    file.extend_from_slice(&(json.len() as u64).to_le_bytes());
    file.extend_from_slice(&json);
    for (_, _, _, bytes) in tensors {
        file.extend_from_slice(bytes);
    }
    std::fs::write(path, file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `dir/model.safetensors` with the f32 `[out, in]` weights, reads it
/// back through the library's strict loader (so the hand-written file is
/// known to be valid safetensors), and returns its path.
fn write_reference(dir: &Path, weights: &[(String, usize, usize, Vec<f32>)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("model.safetensors");
    let tensors: Vec<RawTensor> = weights
        .iter()
        .map(|(name, out, inp, w)| (name.clone(), "F32", vec![*out, *inp], f32_bytes(w)))
        .collect();
    write_safetensors(&path, &tensors);
    let ck = Checkpoint::open(dir).unwrap();
    assert_eq!(ck.names().count(), weights.len());
    for (name, out, inp, w) in weights {
        let back = ck.f32(name, &[*out, *inp]).unwrap();
        assert!(
            back.iter()
                .map(|x| x.to_bits())
                .eq(w.iter().map(|x| x.to_bits())),
            "{name} did not round-trip through the reference file"
        );
    }
    path
}

/// The library's dequantization of every checked module, as reference rows.
fn library_reference(qdir: &Path, g: usize) -> Vec<(String, usize, usize, Vec<f32>)> {
    let ck = Checkpoint::open(qdir).unwrap();
    checked_modules(qdir)
        .into_iter()
        .map(|(module, out, inp)| {
            let w = load_awq(&ck, &module, out, inp, g).dequantize();
            assert_eq!(w.len(), out * inp);
            (format!("{module}.weight"), out, inp, w)
        })
        .collect()
}

fn run_checker(qdir: &Path, reference: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_awq_layout.py");
    Command::new("python3")
        .arg(&script)
        .arg(qdir)
        .arg(reference)
        .output()
        .expect("python3 runs")
}

fn assert_checker_passes(qdir: &Path, reference: &Path, tensors: usize) -> String {
    let o = run_checker(qdir, reference);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        o.status.success(),
        "check_awq_layout.py failed ({:?})\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    assert!(
        out.contains(&format!("OK: {tensors} tensors dequantize bitwise-equal")),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        tensors,
        "one ok line per tensor expected:\n{out}"
    );
    out
}

/// Asserts that the checker rejects the reference, naming exactly `bad`.
fn assert_checker_fails(qdir: &Path, reference: &Path, bad: &str, total: usize) -> String {
    let o = run_checker(qdir, reference);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(
        o.status.code(),
        Some(1),
        "check_awq_layout.py should report a mismatch\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        err.contains(&format!("FAIL: 1 of {total} tensors")) && err.contains(bad),
        "stderr should name {bad}:\n{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("MISMATCH") && l.contains(bad)),
        "stdout should flag {bad}:\n{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        total - 1,
        "every other tensor still matches:\n{out}"
    );
    out
}

/// Re-encodes packed nibbles so that dequantizing them yields what a reader
/// with a sequential nibble order (nibble i = column 8c+i) would see.
fn as_read_in_plain_order(packed: &[i32], rows: usize, cols: usize) -> Vec<i32> {
    let true_values = unpack_int4(packed, rows, cols);
    let mut misread = vec![0u8; true_values.len()];
    for r in 0..rows {
        for c in 0..cols / 8 {
            for (nibble, &col) in AWQ_PACK_ORDER.iter().enumerate() {
                misread[r * cols + 8 * c + nibble] = true_values[r * cols + 8 * c + col];
            }
        }
    }
    pack_int4(&misread, rows, cols)
}

#[test]
fn group_64_layout_matches_independent_numpy_reader() {
    require_numpy();
    let tmp = tempfile::tempdir().unwrap();
    let qdir = quantize(tmp.path(), 64, false);
    let weights = library_reference(&qdir, 64);
    let n = weights.len();
    assert_eq!(n, 14);
    let reference = write_reference(&tmp.path().join("ref"), &weights);
    let out = assert_checker_passes(&qdir, &reference, n);
    assert!(
        !out.contains("zeros {"),
        "asymmetric quantization should give varied zeros per tensor:\n{out}"
    );

    // Negative 1: the first tensor as a reader with plain nibble order
    // [0, 1, ..., 7] would dequantize it (qweight and qzeros misread, scales
    // unpacked so untouched). The script must reject it.
    let ck = Checkpoint::open(&qdir).unwrap();
    let (module, o, i) = checked_modules(&qdir).remove(0);
    let mut t = load_awq(&ck, &module, o, i, 64);
    let right = t.dequantize();
    t.qweight = as_read_in_plain_order(&t.qweight, i, o);
    t.qzeros = as_read_in_plain_order(&t.qzeros, i / 64, o);
    let wrong = t.dequantize();
    assert_ne!(
        right, wrong,
        "the plain-order misreading must change values"
    );
    let mut bad = weights.clone();
    assert_eq!(bad[0].0, format!("{module}.weight"));
    bad[0].3 = wrong;
    let reference = write_reference(&tmp.path().join("ref-plain-order"), &bad);
    let out = assert_checker_fails(&qdir, &reference, &bad[0].0, n);
    assert!(
        out.contains("matches a sequential nibble order"),
        "the script should diagnose the sequential order:\n{out}"
    );

    // Negative 2: one value of the last tensor off by one ulp. The check is
    // bitwise, so this must fail too.
    let mut bad = weights;
    let last = bad.last_mut().unwrap();
    let k = last.3.len() / 2 + 3;
    last.3[k] = f32::from_bits(last.3[k].to_bits() ^ 1);
    let bad_name = last.0.clone();
    let reference = write_reference(&tmp.path().join("ref-one-ulp"), &bad);
    assert_checker_fails(&qdir, &reference, &bad_name, n);
}

#[test]
fn group_32_layout_matches_independent_numpy_reader_also_sharded() {
    require_numpy();
    let tmp = tempfile::tempdir().unwrap();
    let qdir = quantize(tmp.path(), 32, false);
    let weights = library_reference(&qdir, 32);
    let reference = write_reference(&tmp.path().join("ref"), &weights);
    assert_checker_passes(&qdir, &reference, weights.len());

    // The same tensors split over two shards with an index, as large
    // checkpoints are stored: first layer in one shard, last in the other.
    let ck = Checkpoint::open(&qdir).unwrap();
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(qdir.join("config.json"), sharded.join("config.json")).unwrap();
    let modules = checked_modules(&qdir);
    let mut weight_map = serde_json::Map::new();
    for (shard, half) in modules.chunks(LINEARS.len()).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
        let mut tensors = Vec::new();
        for (module, _, _) in half {
            for (part, dtype) in [("qweight", "I32"), ("qzeros", "I32"), ("scales", "F16")] {
                let name = format!("{module}.{part}");
                let (meta, bytes) = ck.raw(&name).unwrap();
                tensors.push((name.clone(), dtype, meta.shape, bytes.to_vec()));
                weight_map.insert(name, Value::String(file.clone()));
            }
        }
        write_safetensors(&sharded.join(&file), &tensors);
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    assert_checker_passes(&sharded, &reference, weights.len());
}

#[test]
fn symmetric_group_64_layout_matches_independent_numpy_reader() {
    require_numpy();
    let tmp = tempfile::tempdir().unwrap();
    let qdir = quantize(tmp.path(), 64, true);
    // Symmetric quantization stores every zero as 8.
    let ck = Checkpoint::open(&qdir).unwrap();
    for (module, o, i) in checked_modules(&qdir) {
        let t = load_awq(&ck, &module, o, i, 64);
        let zeros = unpack_int4(&t.qzeros, i / 64, o);
        assert!(
            zeros.iter().all(|&z| z == 8),
            "{module}: zeros other than 8"
        );
    }
    let weights = library_reference(&qdir, 64);
    let reference = write_reference(&tmp.path().join("ref"), &weights);
    let out = assert_checker_passes(&qdir, &reference, weights.len());
    assert_eq!(
        out.lines().filter(|l| l.contains("zeros {8}")).count(),
        weights.len(),
        "{out}"
    );
}
