//! Bad tiny checkpoints and requests: each must give an error (never a
//! panic) that says what is wrong, and tensors the decoder would not read
//! are refused rather than silently ignored.

mod tiny;

use tiny::*;

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
    let mut kv = solo(&model);
    let mut run = |tokens: &[u32]| {
        model
            .forward_solo(&mut kv, tokens, LogitsWanted::All)
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
    assert_eq!(kv.len(), 0);
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
        let mut kv = solo(&model);
        model
            .forward_solo(&mut kv, &[3, 5, 7], LogitsWanted::Last)
            .unwrap()
    };
    assert_ne!(run_with_o_bias(0.0), run_with_o_bias(1.0));
}
