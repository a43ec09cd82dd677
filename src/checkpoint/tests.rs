//! Tests of the public checkpoint API: round trips, the HF layout on disk, the hub naming, and the
//! error messages for mismatched, incomplete and damaged checkpoints.

use super::*;
use safetensors::{Dtype, SafeTensors};
use std::fs;

fn tiny_shape() -> GptShape {
    GptShape {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        vocab_size: 11,
        padded_vocab_size: 16,
        block_size: 5,
    }
}

/// Deterministic parameters with varied magnitudes and signs; `wte`'s padded rows are zero.
fn params_for(shape: &GptShape, seed: u64) -> Vec<NamedTensor> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let scale = [1e-3f32, 0.02, 1.0, 37.5][(state >> 20) as usize % 4];
        unit * scale
    };
    expected_tensors(shape)
        .into_iter()
        .map(|(name, dims)| {
            let mut data: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| next())
                .collect();
            if name == "wte" {
                data[shape.vocab_size * shape.n_embd..].fill(0.0);
            }
            if name == "ln_f.bias" {
                // Values whose bits must survive exactly: signed zero, a subnormal, extremes.
                data[..4].copy_from_slice(&[-0.0, f32::from_bits(1), f32::MAX, f32::MIN_POSITIVE]);
            }
            NamedTensor {
                name,
                shape: dims,
                data,
            }
        })
        .collect()
}

fn bits(tensors: &[NamedTensor]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                t.data.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

fn saved_tiny(dir: &Path, options: &ModelSaveOptions) -> Vec<NamedTensor> {
    let params = params_for(&tiny_shape(), 7);
    save_model(dir, &tiny_shape(), &params, options).unwrap();
    params
}

fn error_of<T: std::fmt::Debug>(result: Result<T>) -> String {
    let message = result.unwrap_err().to_string();
    assert!(!message.contains('\n'), "error is not one line: {message}");
    message
}

#[test]
fn f32_round_trip_is_bitwise_in_internal_layout() {
    let dir = tempfile::tempdir().unwrap();
    let params = saved_tiny(dir.path(), &ModelSaveOptions::default());
    let loaded = load_model_for(dir.path(), &tiny_shape()).unwrap();
    assert_eq!(bits(&loaded), bits(&params));

    // Without a caller's padding, config.json's halfling.padded_vocab_size applies.
    let plain = load_model(dir.path(), None).unwrap();
    assert_eq!(plain.config, Some(tiny_shape()));
    assert_eq!(plain.vocab_size, 11);
    assert_eq!(plain.tensors[0].shape, vec![16, 8]);
    assert_eq!(bits(&plain.tensors), bits(&params));
}

#[test]
fn padded_vocab_rows_are_not_saved_and_load_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let shape = tiny_shape();
    let mut params = params_for(&shape, 3);
    params[0].data[shape.vocab_size * shape.n_embd..].fill(9.0);
    save_model(dir.path(), &shape, &params, &ModelSaveOptions::default()).unwrap();
    let loaded = load_model_for(dir.path(), &shape).unwrap();
    let real = shape.vocab_size * shape.n_embd;
    assert_eq!(loaded[0].data[..real], params[0].data[..real]);
    assert!(loaded[0].data[real..].iter().all(|&value| value == 0.0));
}

#[test]
fn file_has_hf_gpt2_names_and_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let options = ModelSaveOptions {
        dtype: SaveDType::F32,
        dropout: 0.1,
        eot_token: Some(10),
    };
    let params = saved_tiny(dir.path(), &options);
    let shape = tiny_shape();
    let c = shape.n_embd;
    let bytes = fs::read(dir.path().join(MODEL_FILE)).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let format = header
        .metadata()
        .as_ref()
        .and_then(|meta| meta.get("format").cloned());
    assert_eq!(format.as_deref(), Some("pt"));
    let file = SafeTensors::deserialize(&bytes).unwrap();

    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    let mut wanted: Vec<String> = expected_tensors(&shape)
        .iter()
        .map(|(n, _)| hf::hf_name(n))
        .collect();
    wanted.sort();
    assert_eq!(names, wanted);
    assert!(names.contains(&"transformer.h.1.mlp.c_fc.weight".to_string()));
    assert!(!names.iter().any(|name| name.starts_with("lm_head")));

    let read = |name: &str| {
        let view = file.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32);
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (view.shape().to_vec(), values)
    };
    let internal = |name: &str| params.iter().find(|t| t.name == name).unwrap();

    let (c_attn_shape, c_attn) = read("transformer.h.1.attn.c_attn.weight");
    assert_eq!(c_attn_shape, vec![c, 3 * c]);
    let source = &internal("h.1.attn.c_attn.weight").data; // [3C, C]
    for i in 0..c {
        for j in 0..3 * c {
            assert_eq!(c_attn[i * 3 * c + j].to_bits(), source[j * c + i].to_bits());
        }
    }
    assert_eq!(read("transformer.h.0.mlp.c_fc.weight").0, vec![c, 4 * c]);
    assert_eq!(read("transformer.h.0.mlp.c_proj.weight").0, vec![4 * c, c]);
    let (proj_shape, proj) = read("transformer.h.0.mlp.c_proj.weight");
    assert_eq!(proj_shape, vec![4 * c, c]);
    assert_eq!(proj[c], internal("h.0.mlp.c_proj.weight").data[1]); // [1][0] == internal [0][1]
    let (bias_shape, bias) = read("transformer.h.0.attn.c_attn.bias");
    assert_eq!(
        (bias_shape, bias),
        (vec![3 * c], internal("h.0.attn.c_attn.bias").data.clone())
    );
    let (wte_shape, wte) = read("transformer.wte.weight");
    assert_eq!(wte_shape, vec![shape.vocab_size, c]);
    assert_eq!(wte[..], internal("wte").data[..shape.vocab_size * c]);
    assert_eq!(read("transformer.wpe.weight").0, vec![shape.block_size, c]);

    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(config["vocab_size"], 11);
    assert_eq!(config["n_positions"], 5);
    assert_eq!(
        (
            config["n_embd"].clone(),
            config["n_layer"].clone(),
            config["n_head"].clone()
        ),
        (8.into(), 2.into(), 2.into())
    );
    assert_eq!(config["activation_function"], "gelu_new");
    assert_eq!(config["layer_norm_epsilon"], 1e-5);
    assert_eq!(config["resid_pdrop"], 0.1);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["eos_token_id"], 10);
    assert_eq!(config["torch_dtype"], "float32");
    assert!(config["n_inner"].is_null());
    assert_eq!(config["halfling"]["padded_vocab_size"], 16);
}

#[test]
fn bf16_save_rounds_to_nearest_even() {
    let dir = tempfile::tempdir().unwrap();
    let shape = tiny_shape();
    let mut params = params_for(&shape, 5);
    // ln_1.weight of layer 0: ties and near-ties with known bf16 results.
    let known = [
        (0x3F80_8000u32, 0x3F80u16),
        (0x3F81_8000, 0x3F82),
        (0x3F80_8001, 0x3F81),
        (0xBF81_7FFF, 0xBF81),
    ];
    for (slot, (input, _)) in known.iter().enumerate() {
        params[2].data[slot] = f32::from_bits(*input);
    }
    assert_eq!(params[2].name, "h.0.ln_1.weight");
    let options = ModelSaveOptions {
        dtype: SaveDType::BF16,
        ..ModelSaveOptions::default()
    };
    save_model(dir.path(), &shape, &params, &options).unwrap();

    let bytes = fs::read(dir.path().join(MODEL_FILE)).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("transformer.h.0.ln_1.weight").unwrap();
    assert_eq!(view.dtype(), Dtype::BF16);
    for (slot, (_, output)) in known.iter().enumerate() {
        let stored = u16::from_le_bytes([view.data()[2 * slot], view.data()[2 * slot + 1]]);
        assert_eq!(stored, *output, "slot {slot}");
    }
    let loaded = load_model_for(dir.path(), &shape).unwrap();
    for (got, original) in loaded.iter().zip(&params) {
        let rounded: Vec<f32> = original
            .data
            .iter()
            .map(|&v| bf16_bits_to_f32(f32_to_bf16_bits(v)))
            .collect();
        let real = if got.name == "wte" {
            shape.vocab_size * shape.n_embd
        } else {
            got.data.len()
        };
        assert_eq!(got.data[..real], rounded[..real], "{}", got.name);
    }
    let config = fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
    assert!(config.contains("\"torch_dtype\": \"bfloat16\""), "{config}");
}

/// Rewrites the saved HF file with `edit` applied to its (HF-named, HF-layout) tensors.
fn rewrite_model_file(from: &Path, to: &Path, edit: impl FnOnce(&mut Vec<NamedTensor>)) {
    let (mut tensors, metadata) = load_tensors(from).unwrap();
    edit(&mut tensors);
    save_tensors(to, &tensors, &metadata).unwrap();
}

#[test]
fn hub_naming_without_prefix_loads_and_buffers_are_skipped() {
    let saved = tempfile::tempdir().unwrap();
    let params = saved_tiny(saved.path(), &ModelSaveOptions::default());
    let hub = tempfile::tempdir().unwrap();
    let hub_file = hub.path().join("model.safetensors");
    let t = tiny_shape().block_size;
    rewrite_model_file(&saved.path().join(MODEL_FILE), &hub_file, |tensors| {
        for tensor in tensors.iter_mut() {
            tensor.name = tensor.name.trim_start_matches("transformer.").to_string();
        }
        let wte = tensors
            .iter()
            .find(|t| t.name == "wte.weight")
            .unwrap()
            .clone();
        tensors.push(NamedTensor {
            name: "lm_head.weight".into(),
            ..wte
        });
        for layer in 0..2 {
            let mask = NamedTensor {
                name: format!("h.{layer}.attn.bias"),
                shape: vec![1, 1, t, t],
                data: vec![1.0; t * t],
            };
            tensors.push(mask);
            tensors.push(NamedTensor {
                name: format!("h.{layer}.attn.masked_bias"),
                shape: vec![],
                data: vec![-1e4],
            });
        }
    });
    let bytes = fs::read(&hub_file).unwrap();
    assert!(SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensor("h.0.attn.c_attn.weight")
        .is_ok());

    // No config.json beside it: the caller's shape supplies the padding.
    let plain = load_model(&hub_file, None).unwrap();
    assert_eq!(
        (
            plain.config,
            plain.vocab_size,
            plain.tensors[0].shape.clone()
        ),
        (None, 11, vec![11, 8])
    );
    let loaded = load_model_for(hub.path(), &tiny_shape()).unwrap();
    assert_eq!(bits(&loaded), bits(&params));
}

#[test]
fn both_namings_of_one_tensor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path(), &ModelSaveOptions::default());
    let file = dir.path().join(MODEL_FILE);
    rewrite_model_file(&file, &file, |tensors| {
        let copy = tensors
            .iter()
            .find(|t| t.name == "transformer.ln_f.bias")
            .unwrap()
            .clone();
        tensors.push(NamedTensor {
            name: "ln_f.bias".into(),
            ..copy
        });
    });
    let message = error_of(load_model(dir.path(), None));
    assert!(
        message.contains("ln_f.bias") && message.contains("transformer.ln_f.bias"),
        "{message}"
    );
}

#[test]
fn width_and_context_mismatches_name_tensor_shapes_and_config_key() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path(), &ModelSaveOptions::default());
    let wider = GptShape {
        n_embd: 16,
        ..tiny_shape()
    };
    let message = error_of(load_model_for(dir.path(), &wider));
    assert!(
        message.contains(&format!("checkpoint {}", dir.path().display())),
        "{message}"
    );
    assert!(
        message.contains("tensor wte has shape [16, 8] but the config wants [16, 16]"),
        "{message}"
    );
    assert!(
        message.contains("model.n_embd = 16") && message.contains("more tensors differ"),
        "{message}"
    );

    let longer = GptShape {
        block_size: 7,
        ..tiny_shape()
    };
    let message = error_of(load_model_for(dir.path(), &longer));
    assert!(
        message.contains(
            "tensor wpe has shape [5, 8] but the config wants [7, 8] (model.block_size = 7)"
        ),
        "{message}"
    );

    // A c_attn of the wrong shape alone (internal layout in the message).
    let file = dir.path().join(MODEL_FILE);
    rewrite_model_file(&file, &file, |tensors| {
        let c_attn = tensors
            .iter_mut()
            .find(|t| t.name == "transformer.h.0.attn.c_attn.weight")
            .unwrap();
        c_attn.shape = vec![4, 48];
    });
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(
        message.contains(
            "tensor h.0.attn.c_attn.weight has shape [48, 4] but the config wants [24, 8]"
        ),
        "{message}"
    );
}

#[test]
fn layer_and_head_count_mismatches_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path(), &ModelSaveOptions::default());
    let deeper = GptShape {
        n_layer: 3,
        ..tiny_shape()
    };
    let message = error_of(load_model_for(dir.path(), &deeper));
    assert!(
        message.contains("has 2 layers but the config wants 3 (model.n_layer = 3)"),
        "{message}"
    );
    let more_heads = GptShape {
        n_head: 4,
        ..tiny_shape()
    };
    let message = error_of(load_model_for(dir.path(), &more_heads));
    assert!(
        message.contains("2 attention heads") && message.contains("model.n_head = 4"),
        "{message}"
    );
}

#[test]
fn vocabulary_mismatch_has_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path(), &ModelSaveOptions::default());
    let other_tokenizer = GptShape {
        vocab_size: 13,
        ..tiny_shape()
    };
    let message = error_of(load_model_for(dir.path(), &other_tokenizer));
    assert!(
        message.contains("vocabulary of 11 tokens but the tokenizer has 13"),
        "{message}"
    );
    assert!(message.contains("tokenizer.json"), "{message}");
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path(), &ModelSaveOptions::default());
    let file = dir.path().join(MODEL_FILE);
    let pristine = fs::read(&file).unwrap();
    rewrite_model_file(&file, &file, |tensors| {
        tensors.retain(|t| t.name != "transformer.h.1.ln_2.bias")
    });
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(message.contains("lacks tensor h.1.ln_2.bias"), "{message}");

    fs::write(&file, pristine).unwrap();
    rewrite_model_file(&file, &file, |tensors| {
        tensors.push(NamedTensor {
            name: "transformer.h.0.attn.rotary".into(),
            shape: vec![2],
            data: vec![0.0; 2],
        });
    });
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(
        message.contains("unexpected tensor h.0.attn.rotary"),
        "{message}"
    );
}

#[test]
fn damaged_model_files_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path(), &ModelSaveOptions::default());
    let file = dir.path().join(MODEL_FILE);
    let bytes = fs::read(&file).unwrap();

    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    let expected = format!(
        "{} is truncated (expected {} bytes, found {})",
        file.display(),
        bytes.len(),
        bytes.len() / 2
    );
    assert!(message.contains(&expected), "{message}");

    fs::write(&file, &bytes[..5]).unwrap();
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(
        message.contains("truncated or not a safetensors file"),
        "{message}"
    );

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(&file, garbage).unwrap();
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(
        message.contains("model.safetensors is not a safetensors file"),
        "{message}"
    );

    let mut text = b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json".to_vec();
    text.extend_from_slice(&[0; 8]);
    fs::write(&file, text).unwrap();
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(message.contains("not a safetensors file"), "{message}");

    fs::write(&file, b"").unwrap();
    let message = error_of(load_model_for(dir.path(), &tiny_shape()));
    assert!(
        message.contains("model.safetensors is empty (0 bytes)"),
        "{message}"
    );
}

#[test]
fn missing_checkpoints_get_one_line_errors() {
    let runs = tempfile::tempdir().unwrap();
    let message = error_of(load_model(&runs.path().join("nowhere"), None));
    assert!(message.contains("nowhere does not exist"), "{message}");

    let message = error_of(load_model(runs.path(), None));
    assert!(message.contains("has no model.safetensors"), "{message}");

    fs::write(runs.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let message = error_of(load_model(runs.path(), None));
    assert!(message.contains("safe_serialization=True"), "{message}");

    // Interrupted swap: only checkpoint.old is left.
    let old = runs.path().join("checkpoint.old");
    saved_tiny(&old, &ModelSaveOptions::default());
    let message = error_of(load_model(&runs.path().join("checkpoint"), None));
    assert!(message.contains("checkpoint.old"), "{message}");
}

#[test]
fn save_model_checks_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let shape = tiny_shape();
    let mut params = params_for(&shape, 1);
    let removed = params.remove(5);
    let message = error_of(save_model(
        dir.path(),
        &shape,
        &params,
        &ModelSaveOptions::default(),
    ));
    assert!(
        message.contains(&removed.name) && message.contains("missing"),
        "{message}"
    );

    let mut params = params_for(&shape, 1);
    params[3].shape = vec![8, 3];
    let message = error_of(save_model(
        dir.path(),
        &shape,
        &params,
        &ModelSaveOptions::default(),
    ));
    assert!(message.contains("[8, 3]"), "{message}");
    assert!(!dir.path().join(MODEL_FILE).exists());
}

#[test]
fn tensor_files_round_trip_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let tensors = vec![
        NamedTensor {
            name: "m.wte".into(),
            shape: vec![2, 3],
            data: vec![1.0, -0.0, f32::from_bits(1), 3.5, f32::INFINITY, -7.25],
        },
        NamedTensor {
            name: "v.wte".into(),
            shape: vec![2, 3],
            data: vec![f32::from_bits(0x7FC0_1234); 6],
        },
        NamedTensor {
            name: "step".into(),
            shape: vec![],
            data: vec![42.0],
        },
    ];
    let metadata = BTreeMap::from([
        ("step".to_string(), "42".to_string()),
        ("beta1".to_string(), "0.9".to_string()),
    ]);
    save_tensors(&path, &tensors, &metadata).unwrap();
    let (loaded, loaded_metadata) = load_tensors(&path).unwrap();
    assert_eq!(loaded_metadata, metadata);
    let mut sorted = tensors.clone();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(bits(&loaded), bits(&sorted));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    let duplicate = vec![tensors[0].clone(), tensors[0].clone()];
    let message = error_of(save_tensors(&path, &duplicate, &BTreeMap::new()));
    assert!(message.contains("appears twice"), "{message}");
}

#[test]
fn checkpoint_dir_swap_holds_a_loadable_model() {
    let runs = tempfile::tempdir().unwrap();
    let final_dir = runs.path().join("checkpoint");
    let shape = tiny_shape();
    for seed in [1, 2] {
        let params = params_for(&shape, seed);
        write_checkpoint_dir_atomically(&final_dir, |dir| {
            save_model(dir, &shape, &params, &ModelSaveOptions::default())?;
            save_tensors(
                &dir.join("optimizer.safetensors"),
                &params,
                &BTreeMap::new(),
            )?;
            write_atomic(&dir.join("trainer_state.json"), b"{\"step\": 1}")
        })
        .unwrap();
        assert_eq!(
            bits(&load_model_for(&final_dir, &shape).unwrap()),
            bits(&params)
        );
    }
    let mut names: Vec<String> = fs::read_dir(&final_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json"
        ]
    );
    assert_eq!(fs::read_dir(runs.path()).unwrap().count(), 1);
}
