//! Checkpoints: model weights as a Hugging Face GPT-2 `model.safetensors` + `config.json` (so
//! `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads ours and we load theirs), optimizer
//! state as plain f32 safetensors, and crash-safe writes of files and whole checkpoint directories.
//!
//! Internal names and layouts (what the model code holds, row-major f32): `wte` `[Vp, C]`, `wpe`
//! `[maxT, C]`, per layer `h.{i}.ln_1.{weight,bias}` `[C]`, `h.{i}.attn.c_attn.weight` `[3C, C]`,
//! `h.{i}.attn.c_attn.bias` `[3C]`, `h.{i}.attn.c_proj.weight` `[C, C]`, `h.{i}.attn.c_proj.bias`,
//! `h.{i}.ln_2.{weight,bias}` `[C]`, `h.{i}.mlp.c_fc.weight` `[4C, C]`, `h.{i}.mlp.c_fc.bias`
//! `[4C]`, `h.{i}.mlp.c_proj.weight` `[C, 4C]`, `h.{i}.mlp.c_proj.bias` `[C]`, then
//! `ln_f.{weight,bias}` `[C]`. Linear weights are `[out, in]` like `torch.nn.Linear`; the LM head
//! is tied to `wte`. `c_attn`'s output rows are q, k, v (C each), heads contiguous within each,
//! as in HF.
//!
//! On disk (HF layout): names prefixed `transformer.` (`transformer.wte.weight`, ...), the four
//! `Conv1D` weights transposed to `[in, out]`, `wte` cut to the real vocabulary's V rows (the
//! padded rows `V..Vp` are NOT saved: they load back as zeros, so keep them zero in training, as
//! their gradient is zero when they start at zero and get no weight decay), no `lm_head.weight`,
//! metadata `{"format": "pt"}`.

mod atomic;
mod convert;
mod hf;
mod tensor_file;

pub use atomic::{
    missing_checkpoint_hint, write_atomic, write_atomic_with, write_checkpoint_dir_atomically,
};
pub use convert::{bf16_bits_to_f32, f32_to_bf16_bits};
pub use hf::expected_tensors;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tensor_file::{read_tensor_file, write_tensor_file, OutTensor, RECOVERY_HINT};

/// File name of the model weights inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the HF model config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";

/// One parameter (or optimizer moment) by name: row-major f32 values of the given shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Internal name, e.g. `h.0.attn.c_attn.weight` (see the module docs).
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// The sizes that fix every GPT-2 parameter shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptShape {
    /// Number of transformer blocks (L).
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Model width (C).
    pub n_embd: usize,
    /// Real vocabulary size (V): the tokenizer's token count, what HF sees.
    pub vocab_size: usize,
    /// Rows of `wte` in memory (Vp >= V), rounded up for fast kernels.
    pub padded_vocab_size: usize,
    /// Context length (maxT): rows of `wpe`.
    pub block_size: usize,
}

/// Element type of the saved model weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SaveDType {
    /// Exact f32 (resumable bit for bit).
    #[default]
    F32,
    /// bf16, rounded to nearest even (half the size; for export, not exact resume).
    BF16,
}

/// How [`save_model`] writes a checkpoint beyond the tensors themselves.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelSaveOptions {
    /// Element type of `model.safetensors`.
    pub dtype: SaveDType,
    /// Dropout probability written to config.json's `resid_pdrop`, `embd_pdrop`, `attn_pdrop`.
    pub dropout: f64,
    /// End-of-text token id, written as `bos_token_id` and `eos_token_id` (null when `None`).
    pub eot_token: Option<u32>,
}

/// What [`load_model`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    /// The shape from the `config.json` beside the weights; `None` when there is none.
    pub config: Option<GptShape>,
    /// Rows of the token embedding in the file: the real vocabulary size it was trained with.
    pub vocab_size: usize,
    /// The parameters under internal names and layouts, in canonical order (see
    /// [`expected_tensors`]), `wte` padded with zero rows; unknown tensors follow, by name.
    pub tensors: Vec<NamedTensor>,
    /// The weights file that was read.
    pub model_file: PathBuf,
}

fn checked_params<'a>(
    shape: &GptShape,
    params: &'a [NamedTensor],
) -> Result<HashMap<&'a str, &'a NamedTensor>> {
    if shape.padded_vocab_size < shape.vocab_size {
        bail!(
            "cannot save: padded_vocab_size {} is smaller than vocab_size {}",
            shape.padded_vocab_size,
            shape.vocab_size
        );
    }
    let mut by_name = HashMap::new();
    for param in params {
        if by_name.insert(param.name.as_str(), param).is_some() {
            bail!("cannot save: parameter {} appears twice", param.name);
        }
        let elements: usize = param.shape.iter().product();
        if elements != param.data.len() {
            bail!(
                "cannot save: parameter {} has {} values but its shape {:?} needs {elements}",
                param.name,
                param.data.len(),
                param.shape
            );
        }
    }
    let expected = expected_tensors(shape);
    for (name, dims) in &expected {
        match by_name.get(name.as_str()) {
            None => bail!("cannot save: parameter {name} is missing"),
            Some(param) if param.shape != *dims => bail!(
                "cannot save: parameter {name} has shape {:?} but the model shape wants {dims:?}",
                param.shape
            ),
            Some(_) => {}
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
    if let Some(extra) = params
        .iter()
        .find(|param| !known.contains(param.name.as_str()))
    {
        bail!(
            "cannot save: parameter {} is not part of a GPT-2 model",
            extra.name
        );
    }
    Ok(by_name)
}

/// Writes `dir/model.safetensors` (HF GPT-2 names and layouts) and `dir/config.json` (an HF
/// `GPT2Config`), each crash-safely; creates `dir` if needed.
///
/// `params` must hold exactly the tensors of [`expected_tensors`]`(shape)`. Rows `V..Vp` of `wte`
/// are not saved (see the module docs).
pub fn save_model(
    dir: &Path,
    shape: &GptShape,
    params: &[NamedTensor],
    options: &ModelSaveOptions,
) -> Result<()> {
    let by_name = checked_params(shape, params)?;
    let bf16 = options.dtype == SaveDType::BF16;
    let mut out = Vec::new();
    for (name, dims) in expected_tensors(shape) {
        let Some(param) = by_name.get(name.as_str()) else {
            continue; // checked_params guarantees presence
        };
        let (values, file_shape, transpose_from) = if name == "wte" {
            let kept = shape.vocab_size * shape.n_embd;
            (
                &param.data[..kept],
                vec![shape.vocab_size, shape.n_embd],
                None,
            )
        } else if hf::is_conv1d_weight(&name) {
            (
                &param.data[..],
                vec![dims[1], dims[0]],
                Some((dims[0], dims[1])),
            )
        } else {
            (&param.data[..], dims, None)
        };
        out.push(OutTensor {
            name: hf::hf_name(&name),
            values,
            transpose_from,
            file_shape,
            bf16,
        });
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_tensor_file(&dir.join(MODEL_FILE), out, &metadata)?;
    let config = hf::config_json(shape, options.dtype, options.dropout, options.eot_token);
    let mut text = serde_json::to_string_pretty(&config)?;
    text.push('\n');
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Finds the weights file and the config.json beside it, or says why there is none.
fn locate(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if !path.exists() {
        let hint = missing_checkpoint_hint(path).unwrap_or_else(|| {
            "check the path (a checkpoint is a directory holding model.safetensors and config.json)"
                .to_string()
        });
        bail!("checkpoint {} does not exist; {hint}", path.display());
    }
    let (model_file, dir) = if path.is_dir() {
        (path.join(MODEL_FILE), path.to_path_buf())
    } else {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (path.to_path_buf(), dir)
    };
    if !model_file.exists() {
        let why = if dir.join("model.safetensors.index.json").exists() {
            "its weights are sharded (model.safetensors.index.json), which halfling does not read; \
             re-save them as one file with save_pretrained(dir, max_shard_size=\"100GB\")"
        } else if dir.join("pytorch_model.bin").exists() {
            "it has only pytorch_model.bin; halfling reads safetensors only: re-save it with \
             save_pretrained(dir, safe_serialization=True)"
        } else {
            "the save was interrupted or this is not a checkpoint directory; point at a directory \
             written by halfling or by save_pretrained"
        };
        bail!("checkpoint {} has no {MODEL_FILE}: {why}", path.display());
    }
    let config = dir.join(CONFIG_FILE);
    Ok((model_file, config.is_file().then_some(config)))
}

/// Reads a GPT-2 checkpoint (a directory or its `.safetensors` file) written by halfling, by
/// `save_pretrained`, or from the hub (names with or without `transformer.`), in F32, BF16 or
/// F16, into internal names and layouts.
///
/// `wte` is padded with zero rows to `padded_vocab_size` when given, else to config.json's
/// `halfling.padded_vocab_size`, else left at V rows. Causal-mask buffers and `lm_head.weight`
/// are skipped. Checks nothing about shapes; see [`load_model_for`].
pub fn load_model(path: &Path, padded_vocab_size: Option<usize>) -> Result<LoadedModel> {
    let (model_file, config_file) = locate(path)?;
    let config = match &config_file {
        Some(file) => Some(hf::read_config(file, padded_vocab_size)?),
        None => None,
    };
    let (stored, _) = read_tensor_file(&model_file, |name| !hf::is_ignored(name))?;
    let mut stored_name_of: HashMap<String, String> = HashMap::new();
    let mut tensors = Vec::with_capacity(stored.len());
    for mut tensor in stored {
        let internal = hf::internal_name(&tensor.name);
        if let Some(first) = stored_name_of.insert(internal.clone(), tensor.name.clone()) {
            bail!(
                "{} holds both {first} and {}, which are the same parameter; {RECOVERY_HINT}",
                model_file.display(),
                tensor.name
            );
        }
        if let (&[rows, cols], true) = (&tensor.shape[..], hf::is_conv1d_weight(&internal)) {
            tensor.data = convert::transpose(&tensor.data, rows, cols);
            tensor.shape = vec![cols, rows];
        }
        tensor.name = internal;
        tensors.push(tensor);
    }
    tensors.sort_by(|left, right| {
        hf::canonical_rank(&left.name)
            .cmp(&hf::canonical_rank(&right.name))
            .then_with(|| left.name.cmp(&right.name))
    });

    let Some(wte) = tensors.iter_mut().find(|tensor| tensor.name == "wte") else {
        bail!(
            "{} has no token embedding (transformer.wte.weight or wte.weight): it is not a GPT-2 \
             checkpoint; point at one written by halfling or save_pretrained",
            model_file.display()
        );
    };
    let [vocab_size, width] = wte.shape[..] else {
        bail!(
            "{}: the token embedding has shape {:?}, not [vocab, width]; {RECOVERY_HINT}",
            model_file.display(),
            wte.shape
        );
    };
    let padded_rows = padded_vocab_size
        .or(config.map(|shape| shape.padded_vocab_size))
        .unwrap_or(vocab_size);
    if padded_rows > vocab_size {
        wte.data.resize(padded_rows * width, 0.0);
        wte.shape = vec![padded_rows, width];
    }
    Ok(LoadedModel {
        config,
        vocab_size,
        tensors,
        model_file,
    })
}

/// Formats up to three names and how many more there are.
fn list_names(names: &[&str]) -> String {
    let shown = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    match names.len() {
        0..=3 => shown,
        count => format!("{shown} and {} more", count - 3),
    }
}

/// Loads a checkpoint for a model of shape `expected` (see [`load_model`]) and checks that it
/// holds exactly the expected tensors with the expected shapes, with `wte` padded to
/// `expected.padded_vocab_size`; errors name the first offending tensor and the config key to
/// look at.
pub fn load_model_for(path: &Path, expected: &GptShape) -> Result<Vec<NamedTensor>> {
    let loaded = load_model(path, Some(expected.padded_vocab_size))?;
    let what = format!("checkpoint {}", path.display());
    if loaded.vocab_size != expected.vocab_size {
        bail!(
            "{what} has a vocabulary of {} tokens but the tokenizer has {} (model.vocab_size = {}): \
             it was trained with another tokenizer; use the tokenizer.json saved beside it",
            loaded.vocab_size,
            expected.vocab_size,
            expected.vocab_size
        );
    }
    if let Some(config) = loaded.config {
        if config.n_head != expected.n_head {
            bail!(
                "{what} was trained with {} attention heads but the config wants {} (model.n_head \
                 = {}): the checkpoint was trained with a different model config",
                config.n_head,
                expected.n_head,
                expected.n_head
            );
        }
    }
    let stored_layers = loaded
        .tensors
        .iter()
        .filter_map(|tensor| hf::split_layer(&tensor.name).map(|(layer, _)| layer + 1))
        .max()
        .unwrap_or(0);
    if stored_layers != expected.n_layer {
        bail!(
            "{what} has {stored_layers} layers but the config wants {} (model.n_layer = {}): the \
             checkpoint was trained with a different model config",
            expected.n_layer,
            expected.n_layer
        );
    }

    let wanted = expected_tensors(expected);
    let wanted_names: HashSet<&str> = wanted.iter().map(|(name, _)| name.as_str()).collect();
    let mut by_name: HashMap<String, NamedTensor> = loaded
        .tensors
        .into_iter()
        .map(|tensor| (tensor.name.clone(), tensor))
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| !by_name.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{what} lacks tensor{} {}: the file is incomplete or holds another kind of model; {RECOVERY_HINT}",
            if missing.len() == 1 { "" } else { "s" },
            list_names(&missing)
        );
    }
    let mut unexpected: Vec<&str> = by_name
        .keys()
        .map(String::as_str)
        .filter(|name| !wanted_names.contains(name))
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort_unstable();
        bail!(
            "{what} holds unexpected tensor{} {}: it is not a plain GPT-2 checkpoint",
            if unexpected.len() == 1 { "" } else { "s" },
            list_names(&unexpected)
        );
    }
    let mismatched: Vec<(&str, &Vec<usize>)> = wanted
        .iter()
        .filter(|(name, dims)| {
            by_name
                .get(name.as_str())
                .is_some_and(|tensor| tensor.shape != *dims)
        })
        .map(|(name, dims)| (name.as_str(), dims))
        .collect();
    if let Some(&(name, dims)) = mismatched.first() {
        let found = by_name
            .get(name)
            .map(|tensor| tensor.shape.clone())
            .unwrap_or_default();
        let key = if name == "wpe" && found.first() != dims.first() {
            format!("model.block_size = {}", expected.block_size)
        } else {
            format!("model.n_embd = {}", expected.n_embd)
        };
        let more = match mismatched.len() {
            1 => String::new(),
            count => format!(", and {} more tensors differ", count - 1),
        };
        bail!(
            "{what}: tensor {name} has shape {found:?} but the config wants {dims:?} ({key}){more}: \
             the checkpoint was trained with a different model config"
        );
    }
    Ok(wanted
        .iter()
        .filter_map(|(name, _)| by_name.remove(name))
        .collect())
}

/// Writes f32 tensors under their own names to a safetensors file (e.g. `optimizer.safetensors`
/// with `m.wte`, `v.wte`, ...), crash-safely, with `metadata` as the file's `__metadata__`.
pub fn save_tensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let out = tensors
        .iter()
        .map(|tensor| OutTensor {
            name: tensor.name.clone(),
            values: &tensor.data,
            transpose_from: None,
            file_shape: tensor.shape.clone(),
            bf16: false,
        })
        .collect();
    write_tensor_file(path, out, metadata)
}

/// Reads every tensor of a safetensors file as f32 (F32, BF16, F16 or F64 stored), sorted by
/// name, with the file's `__metadata__`.
pub fn load_tensors(path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    read_tensor_file(path, |_| true)
}

#[cfg(test)]
mod tests;
