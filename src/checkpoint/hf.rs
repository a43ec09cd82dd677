//! The Hugging Face GPT-2 conventions: tensor names (with or without the `transformer.` prefix),
//! which weights are `Conv1D` (stored `[in, out]`, transposed from our `[out, in]`), which stored
//! tensors are buffers to skip, and the `config.json` that `GPT2LMHeadModel.from_pretrained` reads.

use super::{GptShape, SaveDType};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The most rows a saved `halfling.padded_vocab_size` may add to the real vocabulary.
const MAX_VOCAB_PADDING: usize = 65_536;

/// Per-layer tensors in canonical order, as (name suffix after `h.{i}.`, shape in units of C:
/// `[rows, cols]` multiples, cols 0 meaning a vector).
const LAYER_TENSORS: [(&str, usize, usize); 12] = [
    ("ln_1.weight", 1, 0),
    ("ln_1.bias", 1, 0),
    ("attn.c_attn.weight", 3, 1),
    ("attn.c_attn.bias", 3, 0),
    ("attn.c_proj.weight", 1, 1),
    ("attn.c_proj.bias", 1, 0),
    ("ln_2.weight", 1, 0),
    ("ln_2.bias", 1, 0),
    ("mlp.c_fc.weight", 4, 1),
    ("mlp.c_fc.bias", 4, 0),
    ("mlp.c_proj.weight", 1, 4),
    ("mlp.c_proj.bias", 1, 0),
];

/// The internal names and shapes of every GPT-2 parameter, in canonical order: `wte`, `wpe`,
/// the layers, `ln_f`.
pub fn expected_tensors(shape: &GptShape) -> Vec<(String, Vec<usize>)> {
    let width = shape.n_embd;
    let mut tensors = vec![
        ("wte".to_string(), vec![shape.padded_vocab_size, width]),
        ("wpe".to_string(), vec![shape.block_size, width]),
    ];
    for layer in 0..shape.n_layer {
        for (suffix, rows, cols) in LAYER_TENSORS {
            let dims = if cols == 0 {
                vec![rows * width]
            } else {
                vec![rows * width, cols * width]
            };
            tensors.push((format!("h.{layer}.{suffix}"), dims));
        }
    }
    tensors.push(("ln_f.weight".to_string(), vec![width]));
    tensors.push(("ln_f.bias".to_string(), vec![width]));
    tensors
}

/// Where an internal tensor sorts in canonical order (unknown names last, by name).
pub fn canonical_rank(name: &str) -> (usize, usize, usize) {
    match name {
        "wte" => (0, 0, 0),
        "wpe" => (1, 0, 0),
        "ln_f.weight" => (3, 0, 0),
        "ln_f.bias" => (3, 0, 1),
        _ => match split_layer(name) {
            Some((layer, suffix)) => {
                let position = LAYER_TENSORS
                    .iter()
                    .position(|(known, _, _)| *known == suffix)
                    .unwrap_or(LAYER_TENSORS.len());
                (2, layer, position)
            }
            None => (4, 0, 0),
        },
    }
}

/// Splits `h.{i}.rest` into `(i, rest)`.
pub fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("h.")?;
    let (index, suffix) = rest.split_once('.')?;
    Some((index.parse().ok()?, suffix))
}

/// Whether an internal weight is one of HF's `Conv1D` weights, stored transposed (`[in, out]`).
pub fn is_conv1d_weight(name: &str) -> bool {
    matches!(
        split_layer(name),
        Some((
            _,
            "attn.c_attn.weight" | "attn.c_proj.weight" | "mlp.c_fc.weight" | "mlp.c_proj.weight"
        ))
    )
}

/// The name `save_pretrained` gives an internal tensor.
pub fn hf_name(internal: &str) -> String {
    match internal {
        "wte" => "transformer.wte.weight".to_string(),
        "wpe" => "transformer.wpe.weight".to_string(),
        other => format!("transformer.{other}"),
    }
}

/// The internal name of a stored HF tensor, from either naming (`transformer.h.0...` as
/// `save_pretrained` writes, or `h.0...` as in the original `gpt2` hub files).
pub fn internal_name(stored: &str) -> String {
    let bare = stored.strip_prefix("transformer.").unwrap_or(stored);
    match bare {
        "wte.weight" => "wte".to_string(),
        "wpe.weight" => "wpe".to_string(),
        other => other.to_string(),
    }
}

/// Stored tensors that are not parameters: the causal-mask buffers older `transformers` saved,
/// and the LM head, which is tied to `wte`.
pub fn is_ignored(stored: &str) -> bool {
    let bare = stored.strip_prefix("transformer.").unwrap_or(stored);
    bare == "lm_head.weight"
        || matches!(
            split_layer(bare),
            Some((_, "attn.bias" | "attn.masked_bias"))
        )
}

/// The `config.json` of a halfling checkpoint: a complete `GPT2Config`, plus a `halfling` object
/// with what HF has no field for.
pub fn config_json(
    shape: &GptShape,
    dtype: SaveDType,
    dropout: f64,
    eot_token: Option<u32>,
) -> Value {
    let torch_dtype = match dtype {
        SaveDType::F32 => "float32",
        SaveDType::BF16 => "bfloat16",
    };
    json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": shape.vocab_size,
        "n_positions": shape.block_size,
        "n_ctx": shape.block_size,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "use_cache": true,
        "tie_word_embeddings": true,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "torch_dtype": torch_dtype,
        "halfling": {
            "padded_vocab_size": shape.padded_vocab_size,
        },
    })
}

/// Reads the model shape from a GPT-2 `config.json` (ours or a hub model's).
///
/// `padded_vocab_size` is the caller's choice when given, else the `halfling` object's, else the
/// real vocabulary size.
pub fn read_config(path: &Path, padded_vocab_size: Option<usize>) -> Result<GptShape> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: Value = serde_json::from_str(&text).map_err(|error| {
        anyhow!(
            "{} is not valid JSON ({error}); restore it from the run that wrote the checkpoint",
            path.display()
        )
    })?;
    if let Some(model_type) = config.get("model_type").and_then(Value::as_str) {
        if model_type != "gpt2" {
            bail!(
                "{} describes a {model_type} model; halfling loads GPT-2 checkpoints only",
                path.display()
            );
        }
    }
    let field = |keys: &[&str]| -> Result<usize> {
        keys.iter()
            .find_map(|key| config.get(*key).and_then(Value::as_u64))
            .and_then(|value| usize::try_from(value).ok())
            .ok_or_else(|| {
                anyhow!(
                    "{} has no integer {}; it is not a GPT-2 config.json (restore it from the run \
                     that wrote the checkpoint)",
                    path.display(),
                    keys.join(" or ")
                )
            })
    };
    let vocab_size = field(&["vocab_size"])?;
    let saved_padding = config
        .get("halfling")
        .and_then(|halfling| halfling.get("padded_vocab_size"))
        .and_then(Value::as_u64)
        .and_then(|value| usize::try_from(value).ok());
    // The padding becomes zero rows allocated at load: refuse a value no vocabulary rounding
    // gives, so a damaged config cannot ask for terabytes.
    if let Some(padding) = saved_padding {
        if padding < vocab_size || padding > vocab_size + MAX_VOCAB_PADDING {
            bail!(
                "{} has halfling.padded_vocab_size = {padding}, implausible for vocab_size = \
                 {vocab_size}; restore it from the run that wrote the checkpoint",
                path.display()
            );
        }
    }
    Ok(GptShape {
        n_layer: field(&["n_layer"])?,
        n_head: field(&["n_head"])?,
        n_embd: field(&["n_embd"])?,
        vocab_size,
        padded_vocab_size: padded_vocab_size
            .or(saved_padding)
            .unwrap_or(vocab_size)
            .max(vocab_size),
        block_size: field(&["n_positions", "n_ctx"])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for internal in ["wte", "wpe", "h.3.attn.c_attn.weight", "ln_f.bias"] {
            assert_eq!(internal_name(&hf_name(internal)), internal);
        }
        assert_eq!(hf_name("wte"), "transformer.wte.weight");
        assert_eq!(internal_name("wte.weight"), "wte");
        assert_eq!(internal_name("h.0.mlp.c_fc.bias"), "h.0.mlp.c_fc.bias");
        assert!(is_ignored("h.0.attn.bias"));
        assert!(is_ignored("transformer.h.11.attn.masked_bias"));
        assert!(is_ignored("lm_head.weight"));
        assert!(!is_ignored("h.0.attn.c_attn.bias"));
        assert!(!is_ignored("transformer.h.0.attn.c_proj.bias"));
        assert!(is_conv1d_weight("h.2.mlp.c_proj.weight"));
        assert!(!is_conv1d_weight("h.2.mlp.c_proj.bias"));
        assert!(!is_conv1d_weight("wte"));
    }

    #[test]
    fn expected_tensors_match_gpt2_small_parameter_count() {
        let shape = GptShape {
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            vocab_size: 50257,
            padded_vocab_size: 50257,
            block_size: 1024,
        };
        let tensors = expected_tensors(&shape);
        assert_eq!(tensors.len(), 2 + 12 * 12 + 2);
        let count: usize = tensors
            .iter()
            .map(|(_, dims)| dims.iter().product::<usize>())
            .sum();
        assert_eq!(count, 124_439_808);
        let mut sorted = tensors.clone();
        sorted.reverse();
        sorted.sort_by_key(|(name, _)| canonical_rank(name));
        assert_eq!(sorted, tensors);
    }

    #[test]
    fn hub_config_without_halfling_object_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let hub = r#"{"activation_function":"gelu_new","architectures":["GPT2LMHeadModel"],
            "model_type":"gpt2","n_ctx":1024,"n_embd":768,"n_head":12,"n_layer":12,
            "n_positions":1024,"vocab_size":50257}"#;
        std::fs::write(&path, hub).unwrap();
        let shape = read_config(&path, None).unwrap();
        assert_eq!(
            (shape.vocab_size, shape.padded_vocab_size, shape.block_size),
            (50257, 50257, 1024)
        );
        assert_eq!(
            read_config(&path, Some(50304)).unwrap().padded_vocab_size,
            50304
        );

        let huge = r#"{"n_embd":8,"n_head":2,"n_layer":1,"n_positions":4,"vocab_size":5,
            "halfling":{"padded_vocab_size":1000000000000}}"#;
        std::fs::write(&path, huge).unwrap();
        let message = read_config(&path, None).unwrap_err().to_string();
        assert!(message.contains("implausible"), "{message}");

        std::fs::write(&path, r#"{"model_type":"llama","vocab_size":5}"#).unwrap();
        let message = read_config(&path, None).unwrap_err().to_string();
        assert!(message.contains("llama"), "{message}");
        std::fs::write(&path, r#"{"model_type":"gpt2","vocab_size":5}"#).unwrap();
        let message = read_config(&path, None).unwrap_err().to_string();
        assert!(message.contains("n_layer"), "{message}");
        std::fs::write(&path, "{not json").unwrap();
        let message = read_config(&path, None).unwrap_err().to_string();
        assert!(message.contains("not valid JSON"), "{message}");
    }
}
