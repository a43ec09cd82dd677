//! The run directory: where `train` writes and what `sample`, `eval` and `--resume` read.
//!
//! ```text
//! runs/<name>/
//!   halfling.toml      effective config of the run
//!   metrics.jsonl      one JSON object per logged step
//!   summary.json       written at the end
//!   loss.svg           train and val loss curves
//!   checkpoint/        model.safetensors + config.json (Hugging Face GPT-2), optimizer.safetensors,
//!                      trainer_state.json, tokenizer.json, halfling.toml
//! ```
//!
//! A checkpoint directory is written whole into a temporary sibling and swapped in, so a crash
//! leaves either the previous checkpoint or the new one, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::checkpoint::{self, GptShape, ModelSaveOptions, NamedTensor};
use crate::config::Config;
use crate::data::{LoaderState, Tokenizer};
use crate::model::{unit, Gpt, GptConfig, ParamSpec};
use crate::numerics::LossScaler;
use crate::optim::AdamWState;
use crate::precision::Recipe;

/// Name of the checkpoint directory inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The effective config, in the run directory and in each checkpoint.
pub const CONFIG_TOML: &str = "halfling.toml";
/// Trainer progress inside a checkpoint.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// AdamW moments inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The tokenizer, inside a checkpoint and a prepared data directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Unit-scaled runs only: the weights as the unit-scaled model holds them (internal names and
/// layouts), with the residual rule they were trained under in the metadata key
/// [`UNIT_RULE_KEY`]. `model.safetensors` then holds them folded into a standard GPT-2.
pub const UNIT_MODEL_FILE: &str = "unit_model.safetensors";
/// Metadata key of [`UNIT_MODEL_FILE`] naming [`unit::RESIDUAL_RULE`].
pub const UNIT_RULE_KEY: &str = "residual_rule";
/// Metadata key of [`OPTIMIZER_FILE`] naming [`unit::LR_RULE`] (unit-scaled runs only).
pub const UNIT_LR_RULE_KEY: &str = "unit_lr_rule";

/// Where training stood when a checkpoint was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// The training batch loader's position.
    pub loader: LoaderState,
    /// Best validation loss seen so far.
    pub best_val_loss: Option<f64>,
    /// The fp16 loss scaler's state (None for recipes without loss scaling).
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
    /// Wall seconds spent training so far, over all sessions of the run.
    pub elapsed_s: f64,
    /// halfling version that wrote the checkpoint.
    pub halfling_version: String,
}

/// The checkpoint directory for a user-given path: a run directory or a checkpoint directory.
pub fn checkpoint_dir(path: &Path) -> PathBuf {
    let inner = path.join(CHECKPOINT_DIR);
    if inner.is_dir() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// The checkpoint layer's description of a model's shape.
pub fn gpt_shape(cfg: &GptConfig) -> GptShape {
    GptShape {
        n_layer: cfg.n_layer,
        n_head: cfg.n_head,
        n_embd: cfg.n_embd,
        vocab_size: cfg.vocab_size,
        padded_vocab_size: cfg.padded_vocab_size,
        block_size: cfg.block_size,
    }
}

fn named(specs: &[ParamSpec], prefix: &str, values: Vec<Vec<f32>>) -> Vec<NamedTensor> {
    specs
        .iter()
        .zip(values)
        .map(|(s, data)| NamedTensor {
            name: format!("{prefix}{}", s.name),
            shape: s.shape.clone(),
            data,
        })
        .collect()
}

/// Everything a checkpoint holds besides the model.
pub struct CheckpointParts<'a> {
    /// The run's effective config.
    pub config: &'a Config,
    /// The tokenizer the model was trained with.
    pub tokenizer: &'a Tokenizer,
    /// Trainer progress.
    pub state: &'a TrainerState,
}

/// Writes `dir` (a checkpoint directory) crash-safely.
pub fn save_checkpoint<B: Backend>(
    backend: &B,
    dir: &Path,
    model: &Gpt<B>,
    optimizer: &AdamWState<B>,
    parts: &CheckpointParts<'_>,
) -> Result<()> {
    let specs = model.specs();
    let values = model.download_params(backend)?;
    // A unit-scaled model is saved twice: folded into a standard GPT-2 (Hugging Face and the
    // other recipes load that) and as it is (for exact resume, sampling and evaluation).
    let (params, unit_params) = if model.recipe().unit_scaling {
        let factors = unit_fold_factors(model.config());
        let folded = unit::fold(&values, &factors);
        (named(specs, "", folded), Some(named(specs, "", values)))
    } else {
        (named(specs, "", values), None)
    };
    let download = |bufs: &[B::Buf]| {
        bufs.iter()
            .map(|b| backend.download(b))
            .collect::<Result<Vec<_>>>()
    };
    let mut moments = named(specs, "m.", download(&optimizer.m)?);
    moments.extend(named(specs, "v.", download(&optimizer.v)?));
    if let Some(fp8) = model.fp8_state() {
        let (shape, data) = fp8.to_tensor();
        moments.push(NamedTensor {
            name: FP8_HISTORY.to_string(),
            shape,
            data,
        });
    }
    let mut meta = BTreeMap::new();
    meta.insert("step".to_string(), optimizer.step.to_string());
    if model.recipe().unit_scaling {
        meta.insert(UNIT_LR_RULE_KEY.to_string(), unit::LR_RULE.to_string());
    }
    let options = ModelSaveOptions {
        dtype: checkpoint::SaveDType::F32,
        dropout: parts.config.model.dropout,
        eot_token: parts.tokenizer.eot_token(),
    };
    let state_json = serde_json::to_string_pretty(parts.state)?;
    let config_toml = parts.config.to_toml_string()?;
    checkpoint::write_checkpoint_dir_atomically(dir, |tmp| {
        checkpoint::save_model(tmp, &gpt_shape(model.config()), &params, &options)?;
        if let Some(raw) = &unit_params {
            let rule = BTreeMap::from([(UNIT_RULE_KEY.to_string(), unit::RESIDUAL_RULE.into())]);
            checkpoint::save_tensors(&tmp.join(UNIT_MODEL_FILE), raw, &rule)?;
        }
        checkpoint::save_tensors(&tmp.join(OPTIMIZER_FILE), &moments, &meta)?;
        checkpoint::write_atomic(&tmp.join(TRAINER_STATE), state_json.as_bytes())?;
        checkpoint::write_atomic(&tmp.join(CONFIG_TOML), config_toml.as_bytes())?;
        parts.tokenizer.save(tmp.join(TOKENIZER_FILE))
    })
    .with_context(|| format!("writing checkpoint {}", dir.display()))
}

/// A model checkpoint read back: the config it was trained with, its tokenizer and weights.
pub struct LoadedCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The run's config (`halfling.toml`), or defaults with the model sizes of `config.json`
    /// for a Hugging Face checkpoint.
    pub config: Config,
    /// The model's sizes.
    pub gpt: GptConfig,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Parameter values in [`Gpt::param_specs`] order, as a standard GPT-2.
    pub params: Vec<Vec<f32>>,
    /// The unit-scaled weights of a `fp8-unit` run, when the checkpoint has them.
    pub unit_params: Option<Vec<Vec<f32>>>,
}

impl LoadedCheckpoint {
    /// The weights for a model running `recipe`: the unit-scaled ones (saved, or unfolded from
    /// the standard ones) under unit scaling, else the standard ones.
    pub fn params_for(&self, recipe: &Recipe) -> Vec<Vec<f32>> {
        match (recipe.unit_scaling, &self.unit_params) {
            (true, Some(raw)) => raw.clone(),
            (true, None) => unit::unfold(&self.params, &unit_fold_factors(&self.gpt)),
            (false, _) => self.params.clone(),
        }
    }
}

/// Unit scaling's fold factors for a model of these sizes.
fn unit_fold_factors(cfg: &GptConfig) -> Vec<f64> {
    unit::fold_factors(cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.vocab_size)
}

/// Loads the model of a halfling run or checkpoint directory, or of a Hugging Face GPT-2
/// directory (`model.safetensors` + `config.json` + `tokenizer.json`).
pub fn load_checkpoint(path: &Path) -> Result<LoadedCheckpoint> {
    if !path.exists() {
        bail!(
            "{} does not exist: give a run directory (runs/<name>) or a checkpoint directory",
            path.display()
        );
    }
    let dir = checkpoint_dir(path);
    let tok_path = dir.join(TOKENIZER_FILE);
    if !tok_path.is_file() {
        bail!(
            "{} has no {TOKENIZER_FILE}: a checkpoint needs the tokenizer it was trained with",
            dir.display()
        );
    }
    let tokenizer = Tokenizer::load(&tok_path)?;
    let config_path = dir.join(CONFIG_TOML);
    let has_config = config_path.is_file();
    let mut config = if has_config {
        Config::load(&config_path)?
    } else {
        Config::default()
    };
    let loaded = checkpoint::load_model(&dir, None)?;
    let Some(shape) = loaded.config else {
        bail!(
            "{} has no config.json describing the model's sizes",
            dir.display()
        );
    };
    if !has_config {
        config.model.n_layer = shape.n_layer;
        config.model.n_head = shape.n_head;
        config.model.n_embd = shape.n_embd;
        config.model.block_size = shape.block_size;
        config.model.dropout = 0.0;
    }
    if shape.vocab_size != tokenizer.vocab_size() {
        bail!(
            "{}: the model has a vocabulary of {} tokens but its tokenizer.json has {}; they do not belong together",
            dir.display(),
            shape.vocab_size,
            tokenizer.vocab_size()
        );
    }
    let gpt = GptConfig {
        n_layer: shape.n_layer,
        n_head: shape.n_head,
        n_embd: shape.n_embd,
        block_size: shape.block_size,
        vocab_size: shape.vocab_size,
        padded_vocab_size: shape
            .padded_vocab_size
            .max(config.model.padded_vocab(shape.vocab_size)),
    };
    let tensors = checkpoint::load_model_for(&dir, &gpt_shape(&gpt))?;
    let params: Vec<Vec<f32>> = tensors.into_iter().map(|t| t.data).collect();
    let unit_path = dir.join(UNIT_MODEL_FILE);
    let unit_params = if unit_path.is_file() {
        let (tensors, meta) = checkpoint::load_tensors(&unit_path)?;
        let rule = meta.get(UNIT_RULE_KEY).map(String::as_str);
        if rule != Some(unit::RESIDUAL_RULE) {
            // Weights trained under an older residual rule compute another function here;
            // the folded standard weights compute the trained one, so rebuild from those.
            eprintln!(
                "note: {} was saved under an older unit-scaling residual rule ({}); \
                 rebuilding the unit-scaled weights from model.safetensors, which hold the same \
                 model (optimizer moments of rescaled weights then resume approximately)",
                unit_path.display(),
                rule.unwrap_or("untagged")
            );
            None
        } else {
            Some(read_unit_params(&unit_path, tensors, &gpt)?)
        }
    } else {
        None
    };
    Ok(LoadedCheckpoint {
        dir,
        config,
        gpt,
        tokenizer,
        params,
        unit_params,
    })
}

/// The tensors of [`UNIT_MODEL_FILE`] in [`Gpt::param_specs`] order.
fn read_unit_params(
    unit_path: &Path,
    tensors: Vec<NamedTensor>,
    gpt: &GptConfig,
) -> Result<Vec<Vec<f32>>> {
    let mut by_name: BTreeMap<String, NamedTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    let specs = Gpt::<crate::backend::cpu::CpuBackend<f32>>::param_specs(gpt);
    let mut raw = Vec::with_capacity(specs.len());
    for spec in &specs {
        match by_name.remove(&spec.name) {
            Some(t) if t.shape == spec.shape => raw.push(t.data),
            _ => bail!(
                "{} lacks tensor {} of shape {:?}; the checkpoint is damaged",
                unit_path.display(),
                spec.name,
                spec.shape
            ),
        }
    }
    Ok(raw)
}

/// Name of the delayed-scaling amax histories (`[operands, steps]`) in `optimizer.safetensors`.
pub const FP8_HISTORY: &str = "fp8.amax_history";

/// Loads the optimizer moments, FP8 amax histories and trainer state of a halfling checkpoint
/// into `optimizer` and `model`.
pub fn load_training_state<B: Backend>(
    backend: &B,
    dir: &Path,
    model: &mut Gpt<B>,
    optimizer: &mut AdamWState<B>,
) -> Result<TrainerState> {
    let specs = model.specs().to_vec();
    let state_path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "cannot resume: {} is missing or unreadable (is this a halfling checkpoint?)",
            state_path.display()
        )
    })?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("cannot resume: {} is corrupt", state_path.display()))?;
    let (tensors, meta) = checkpoint::load_tensors(&dir.join(OPTIMIZER_FILE))?;
    let mut by_name: BTreeMap<String, NamedTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    if let Some(fp8) = model.fp8_state_mut() {
        // A checkpoint from a run without delayed scaling has none: start with empty histories.
        if let Some(t) = by_name.remove(FP8_HISTORY) {
            fp8.restore(&t.shape, &t.data).with_context(|| {
                format!("cannot resume from {}", dir.join(OPTIMIZER_FILE).display())
            })?;
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        for (prefix, bufs) in [("m.", &mut optimizer.m), ("v.", &mut optimizer.v)] {
            let name = format!("{prefix}{}", spec.name);
            let Some(t) = by_name.remove(&name) else {
                bail!(
                    "cannot resume: {} lacks tensor {name}",
                    dir.join(OPTIMIZER_FILE).display()
                );
            };
            if t.shape != spec.shape {
                bail!(
                    "cannot resume: optimizer tensor {name} has shape {:?}, the model wants {:?}",
                    t.shape,
                    spec.shape
                );
            }
            backend.upload(&mut bufs[i], &t.data)?;
        }
    }
    let step: u64 = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(state.step);
    if step != state.step {
        bail!(
            "cannot resume: {} says step {} but the optimizer state is at step {step}",
            state_path.display(),
            state.step
        );
    }
    if model.recipe().unit_scaling {
        let rule = meta.get(UNIT_LR_RULE_KEY).map(String::as_str);
        if rule != Some(unit::LR_RULE) {
            // Resuming is still sound (Adam's moments do not depend on the rates), but the
            // continuation differs from the one the original rates would have given.
            eprintln!(
                "note: {} was written under an older unit-scaling learning-rate rule ({}); the \
                 run continues with the current per-matrix rates ({}), not exactly as it would \
                 have",
                dir.join(OPTIMIZER_FILE).display(),
                rule.unwrap_or("untagged"),
                unit::LR_RULE
            );
        }
    }
    optimizer.step = state.step;
    Ok(state)
}
