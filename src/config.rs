//! Typed configuration for `halfling train` and `halfling bench`, read from TOML.
//!
//! Every key has a default, so an empty file is a complete config (the values of
//! `configs/shakespeare_char.toml`). Unknown sections and keys, wrong types and bad enum values are
//! rejected with a one-line message that names the file (or `--set`), the section, the key and what
//! is allowed. Loading happens in three steps:
//!
//! 1. parse the text into a generic TOML table (syntax errors carry a line and column);
//! 2. check every section and key against the typed structs, one key at a time, so a type error
//!    names exactly the key at fault instead of serde's generic "invalid type" for the section;
//! 3. check value ranges and cross-key rules in [`Config::validate`].
//!
//! `--set section.key=value` overrides go through the same steps 1 and 2 (see
//! [`Config::apply_override`]); [`Config::load_with_overrides`] applies them and then validates once,
//! so a file may be fixed by overrides that only make sense together.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a closed set of string values (an enum spelled as lowercase strings in TOML) with
/// parsing, display and serde support. Deserialization errors list the allowed spellings, which the
/// loader turns into "`section.key = "x"` is not one of: a, b".
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every accepted spelling, in the order the documentation lists them.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The spelling used in config files and output.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text ),+
                }
            }
        }

        impl FromStr for $name {
            type Err = anyhow::Error;

            fn from_str(text: &str) -> Result<Self> {
                match text {
                    $( $text => Ok(Self::$variant), )+
                    _ => Err(anyhow!("{:?} is not one of: {}", text, Self::NAMES.join(", "))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(|_| {
                    D::Error::custom(format!("is not one of: {}", Self::NAMES.join(", ")))
                })
            }
        }
    };
}

string_enum! {
    /// How raw text is turned into tokens.
    TokenizerKind {
        /// One token per distinct character of the training text.
        Char => "char",
        /// Byte-level BPE trained on the training text (`data.bpe_vocab_size` tokens).
        Bpe => "bpe",
    }
}

string_enum! {
    /// Shape of the learning-rate decay after warmup.
    DecayKind {
        /// Half-cosine from `lr` down to `min_lr`.
        Cosine => "cosine",
        /// Straight line from `lr` down to `min_lr`.
        Linear => "linear",
        /// Stay at `lr` after warmup.
        Constant => "constant",
    }
}

string_enum! {
    /// Numeric precision recipe: which formats weights, activations and gradients use.
    /// fp16, fp8 and fp8 with unit scaling are planned and will slot in here.
    RecipeName {
        /// Everything in fp32.
        Fp32 => "fp32",
        /// bf16 compute copies and activations, fp32 master weights and optimizer state.
        Bf16 => "bf16",
        /// fp16 compute copies and activations, fp32 master weights, dynamic loss scaling.
        Fp16 => "fp16",
        /// bf16 as above, with the transformer blocks' GEMMs in FP8 (e4m3 forward, e5m2 grads).
        Fp8 => "fp8",
        /// Unit scaling (Blake et al. 2023): FP8 GEMMs with static scale 1, fp16 elsewhere, no
        /// loss scaling.
        Fp8Unit => "fp8-unit",
    }
}

string_enum! {
    /// How FP8 GEMM operands get their per-tensor scales.
    Fp8ScalingKind {
        /// From the max amax over the last `fp8_amax_history` steps (Transformer Engine's default).
        Delayed => "delayed",
        /// From the operand's own amax, computed just before the cast.
        Current => "current",
    }
}

string_enum! {
    /// Where training runs.
    DeviceKind {
        /// CUDA when a usable GPU and driver are found, otherwise CPU.
        Auto => "auto",
        /// The CPU backend.
        Cpu => "cpu",
        /// An NVIDIA GPU; fails if none is usable.
        Cuda => "cuda",
    }
}

/// `[model]`: the GPT-2-style architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; must divide `n_embd`.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Context length in tokens.
    pub block_size: usize,
    /// Dropout probability in [0, 1).
    pub dropout: f64,
    /// 0 = take the vocabulary size from the tokenizer; otherwise the exact vocabulary size, which
    /// must match the tokenizer when training (checked by [`ModelConfig::resolve_vocab`]) and is
    /// used as-is by `bench`, which feeds synthetic tokens.
    pub vocab_size: usize,
    /// The embedding table is padded to a multiple of this (1 = no padding), for faster GEMMs.
    pub vocab_pad_multiple: usize,
    /// Standard deviation of the normal weight initialisation.
    pub init_std: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            dropout: 0.0,
            vocab_size: 0,
            vocab_pad_multiple: 64,
            init_std: 0.02,
        }
    }
}

impl ModelConfig {
    /// The vocabulary size to build the model with, given the tokenizer's vocabulary size:
    /// `vocab_size` when set (it must then equal the tokenizer's), else the tokenizer's.
    pub fn resolve_vocab(&self, tokenizer_vocab: usize) -> Result<usize> {
        if self.vocab_size == 0 || self.vocab_size == tokenizer_vocab {
            Ok(tokenizer_vocab)
        } else {
            bail!(
                "model.vocab_size = {} but the tokenizer has {} tokens; set model.vocab_size = 0 \
                 to take the size from the tokenizer, or bring a tokenizer.json with {} tokens",
                self.vocab_size,
                tokenizer_vocab,
                self.vocab_size
            )
        }
    }

    /// `vocab` rounded up to a multiple of `vocab_pad_multiple` (a multiple of 0 counts as 1).
    pub fn padded_vocab(&self, vocab: usize) -> usize {
        let multiple = self.vocab_pad_multiple.max(1);
        vocab.div_ceil(multiple) * multiple
    }
}

/// `[data]`: where the text and token shards live and how to tokenize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Raw training text; shards are (re)built from it when missing or stale. May be empty when
    /// `dir` already holds the shards.
    pub text: String,
    /// Directory holding `train.bin`, `val.bin` and `tokenizer.json`.
    pub dir: String,
    /// Tokenizer kind.
    pub tokenizer: TokenizerKind,
    /// Vocabulary size of the trained BPE tokenizer (bpe only).
    pub bpe_vocab_size: usize,
    /// Fraction of the text held out for validation, in (0, 0.5].
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            text: "data/shakespeare.txt".to_string(),
            dir: "data/shakespeare_char".to_string(),
            tokenizer: TokenizerKind::Char,
            bpe_vocab_size: 2048,
            val_fraction: 0.1,
        }
    }
}

/// `[train]`: the training loop, evaluation, checkpoints and samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps to train for.
    pub max_steps: usize,
    /// Seed for initialisation, data order and dropout.
    pub seed: u64,
    /// Evaluate on the validation split every this many steps (and at the end).
    pub eval_interval: usize,
    /// Validation batches per evaluation (0 = the full validation split).
    pub eval_batches: usize,
    /// Log a metrics line every this many steps.
    pub log_interval: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_interval: usize,
    /// Tokens to sample at the end of training (0 = no sample).
    pub sample_tokens: usize,
    /// Prompt the samples start from.
    pub sample_prompt: String,
    /// Sampling temperature (> 0).
    pub sample_temperature: f64,
    /// Sample only from the k most likely tokens (0 = off).
    pub sample_top_k: usize,
    /// Recompute the MLP's GELU in the backward pass instead of keeping it (saves memory).
    pub recompute_gelu: bool,
    /// Largest logits buffer of a training step in MiB where the backend can run the LM head
    /// and classifier a chunk of rows at a time (CUDA); 0 keeps all `batch · context · vocab`
    /// logits.
    pub logits_chunk_mib: usize,
}

impl TrainConfig {
    /// `logits_chunk_mib` in bytes.
    pub fn logits_chunk_bytes(&self) -> usize {
        self.logits_chunk_mib.saturating_mul(1 << 20)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 12,
            grad_accum: 1,
            max_steps: 2500,
            seed: 1337,
            eval_interval: 250,
            eval_batches: 20,
            log_interval: 10,
            checkpoint_interval: 0,
            sample_tokens: 200,
            sample_prompt: "\n".to_string(),
            sample_temperature: 1.0,
            sample_top_k: 0,
            recompute_gelu: false,
            logits_chunk_mib: 512,
        }
    }
}

/// `[optim]`: AdamW, the learning-rate schedule and gradient clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning-rate floor the decay ends at.
    pub min_lr: f64,
    /// Steps of linear warmup from 0 to `lr`.
    pub warmup_steps: usize,
    /// Decay shape after warmup.
    pub decay: DecayKind,
    /// Step at which the decay reaches `min_lr` (0 = `train.max_steps`).
    pub decay_steps: usize,
    /// Decoupled weight decay (applied to matrices, not to biases or norms).
    pub weight_decay: f64,
    /// Adam first-moment decay, in [0, 1).
    pub beta1: f64,
    /// Adam second-moment decay, in [0, 1).
    pub beta2: f64,
    /// Adam denominator epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Round the bf16 compute copy of the weights stochastically after each update (unbiased)
    /// instead of to nearest even.
    pub stochastic_rounding: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1.5e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay: DecayKind::Cosine,
            decay_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            stochastic_rounding: false,
        }
    }
}

impl OptimConfig {
    /// The step at which decay ends: `decay_steps`, or `max_steps` when that is 0.
    pub fn effective_decay_steps(&self, max_steps: usize) -> usize {
        if self.decay_steps == 0 {
            max_steps
        } else {
            self.decay_steps
        }
    }
}

/// `[precision]`: the numeric recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionConfig {
    /// The recipe.
    pub recipe: RecipeName,
    /// fp16: loss scale at the start of training.
    pub loss_scale_init: f64,
    /// fp16: grow the scale after this many steps in a row without overflow.
    pub loss_scale_growth_interval: usize,
    /// fp16: factor the scale grows by.
    pub loss_scale_growth: f64,
    /// fp16: factor the scale shrinks by after an overflow (the step is skipped).
    pub loss_scale_backoff: f64,
    /// Record tensor statistics to numerics.jsonl every this many steps (0 = off).
    pub monitor_interval: usize,
    /// fp8: delayed or current per-tensor scaling of the GEMM operands.
    pub fp8_scaling: Fp8ScalingKind,
    /// fp8: steps of amax history delayed scaling takes the max over (>= 1).
    pub fp8_amax_history: usize,
    /// fp8: binades of headroom below the format's max: scale = 2^(floor(log2(max/amax)) - margin).
    pub fp8_margin: usize,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self {
            recipe: RecipeName::Fp32,
            loss_scale_init: 65536.0,
            loss_scale_growth_interval: 2000,
            loss_scale_growth: 2.0,
            loss_scale_backoff: 0.5,
            monitor_interval: 0,
            fp8_scaling: Fp8ScalingKind::Delayed,
            fp8_amax_history: 16,
            fp8_margin: 0,
        }
    }
}

/// `[device]`: where to run and with how many CPU threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device choice.
    pub device: DeviceKind,
    /// CPU worker threads (0 = all cores).
    pub threads: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            device: DeviceKind::Auto,
            threads: 0,
        }
    }
}

/// The whole configuration of a run. `Config::default()` equals `configs/shakespeare_char.toml`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[model]`
    pub model: ModelConfig,
    /// `[data]`
    pub data: DataConfig,
    /// `[train]`
    pub train: TrainConfig,
    /// `[optim]`
    pub optim: OptimConfig,
    /// `[precision]`
    pub precision: PrecisionConfig,
    /// `[device]`
    pub device: DeviceConfig,
}

/// Names a section's keys in declaration order, for error messages. A test checks each list
/// against the keys the struct actually serializes, so the two cannot drift apart.
trait Section: Serialize + DeserializeOwned + Default {
    const KEYS: &'static [&'static str];
}

impl Section for ModelConfig {
    const KEYS: &'static [&'static str] = &[
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "dropout",
        "vocab_size",
        "vocab_pad_multiple",
        "init_std",
    ];
}

impl Section for DataConfig {
    const KEYS: &'static [&'static str] =
        &["text", "dir", "tokenizer", "bpe_vocab_size", "val_fraction"];
}

impl Section for TrainConfig {
    const KEYS: &'static [&'static str] = &[
        "batch_size",
        "grad_accum",
        "max_steps",
        "seed",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "checkpoint_interval",
        "sample_tokens",
        "sample_prompt",
        "sample_temperature",
        "sample_top_k",
        "recompute_gelu",
        "logits_chunk_mib",
    ];
}

impl Section for OptimConfig {
    const KEYS: &'static [&'static str] = &[
        "lr",
        "min_lr",
        "warmup_steps",
        "decay",
        "decay_steps",
        "weight_decay",
        "beta1",
        "beta2",
        "eps",
        "grad_clip",
        "stochastic_rounding",
    ];
}

impl Section for PrecisionConfig {
    const KEYS: &'static [&'static str] = &[
        "recipe",
        "loss_scale_init",
        "loss_scale_growth_interval",
        "loss_scale_growth",
        "loss_scale_backoff",
        "monitor_interval",
        "fp8_scaling",
        "fp8_amax_history",
        "fp8_margin",
    ];
}

impl Section for DeviceConfig {
    const KEYS: &'static [&'static str] = &["device", "threads"];
}

/// Section names in file order.
const SECTIONS: &[&str] = &["model", "data", "train", "optim", "precision", "device"];

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        Self::load_with_overrides(path, &[] as &[&str])
    }

    /// Reads and parses a config file, applies `--set section.key=value` overrides in order, then
    /// validates the result once (so overrides may fix each other's intermediate states).
    pub fn load_with_overrides<S: AsRef<str>>(
        path: impl AsRef<Path>,
        overrides: &[S],
    ) -> Result<Config> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow!("cannot read config file {source}: {e}; check the path given to --config")
        })?;
        let mut config = Self::parse(&text, &source)?;
        for assignment in overrides {
            config.apply_override(assignment.as_ref())?;
        }
        config
            .validate()
            .map_err(|e| anyhow!("{source}: {e}"))
            .map(|()| config)
    }

    /// Parses and validates config text; errors name the source as `<config>`.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let config = Self::parse(text, "<config>")?;
        config.validate().map_err(|e| anyhow!("<config>: {e}"))?;
        Ok(config)
    }

    /// Parses config text without range validation; `source` names the text in errors.
    fn parse(text: &str, source: &str) -> Result<Config> {
        let root: toml::Table = toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|span| line_and_column(text, span.start))
                .map(|(line, column)| format!(":{line}:{column}"))
                .unwrap_or_default();
            anyhow!(
                "{source}{location}: invalid TOML: {}",
                one_line(e.message())
            )
        })?;
        Self::from_table(root, source)
    }

    /// Builds a config from a generic TOML table, checking sections, keys and types.
    fn from_table(root: toml::Table, source: &str) -> Result<Config> {
        for (name, value) in &root {
            if SECTIONS.contains(&name.as_str()) {
                continue;
            }
            if value.is_table() {
                bail!(
                    "{source}: unknown section [{name}]{} (known sections: {})",
                    did_you_mean(name, SECTIONS),
                    SECTIONS.join(", ")
                );
            }
            bail!(
                "{source}: key `{name}` is outside any section; put it under one of [{}]",
                SECTIONS.join("], [")
            );
        }
        Ok(Config {
            model: typed_section(&root, "model", source)?,
            data: typed_section(&root, "data", source)?,
            train: typed_section(&root, "train", source)?,
            optim: typed_section(&root, "optim", source)?,
            precision: typed_section(&root, "precision", source)?,
            device: typed_section(&root, "device", source)?,
        })
    }

    /// Applies one `--set section.key=value` override. The value is parsed as a TOML value (so
    /// `500`, `1e-4`, `true`, `"text"` work); if that fails, or the key holds a string, it is taken
    /// as a plain string. Unknown keys and wrong types fail like they do in a file. Range checks
    /// are left to [`Config::validate`], which callers run after all overrides.
    pub fn apply_override(&mut self, assignment: &str) -> Result<()> {
        let source = format!("--set {assignment}");
        let Some((path, raw_value)) = assignment.split_once('=') else {
            bail!("{source}: expected section.key=value, e.g. --set train.max_steps=500");
        };
        let Some((section, key)) = path.trim().split_once('.') else {
            bail!(
                "{source}: `{}` is not of the form section.key, e.g. --set train.max_steps=500",
                path.trim()
            );
        };
        let mut root = self.to_table()?;
        let Some(section_table) = root.get_mut(section).and_then(toml::Value::as_table_mut) else {
            bail!(
                "{source}: unknown section [{section}]{} (known sections: {})",
                did_you_mean(section, SECTIONS),
                SECTIONS.join(", ")
            );
        };
        let key_holds_string = section_table.get(key).is_some_and(toml::Value::is_str);
        let value = match parse_toml_value(raw_value.trim()) {
            Some(value) if value.is_str() || !key_holds_string => value,
            _ => toml::Value::String(raw_value.to_string()),
        };
        section_table.insert(key.to_string(), value);
        *self = Self::from_table(root, &source)?;
        Ok(())
    }

    /// Checks value ranges and cross-key rules. Returns one error listing every problem found.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        let m = &self.model;
        check(m.n_layer > 0, "model.n_layer must be at least 1".into());
        check(m.n_head > 0, "model.n_head must be at least 1".into());
        check(m.n_embd > 0, "model.n_embd must be at least 1".into());
        check(
            m.n_head == 0 || m.n_embd.checked_rem(m.n_head) == Some(0),
            format!(
                "model.n_embd = {} is not divisible by model.n_head = {}; pick n_embd as a multiple of n_head",
                m.n_embd, m.n_head
            ),
        );
        check(
            m.block_size > 0,
            "model.block_size must be at least 1".into(),
        );
        check(
            (0.0..1.0).contains(&m.dropout),
            format!("model.dropout = {} must be in [0, 1)", m.dropout),
        );
        check(
            m.vocab_pad_multiple > 0,
            "model.vocab_pad_multiple must be at least 1 (1 = no padding)".into(),
        );
        check(
            m.init_std.is_finite() && m.init_std > 0.0,
            format!("model.init_std = {} must be a positive number", m.init_std),
        );

        let d = &self.data;
        check(
            !d.dir.is_empty(),
            "data.dir must name the directory for train.bin/val.bin/tokenizer.json".into(),
        );
        check(
            d.tokenizer != TokenizerKind::Bpe || d.bpe_vocab_size >= 256,
            format!(
                "data.bpe_vocab_size = {} must be at least 256 (one token per byte)",
                d.bpe_vocab_size
            ),
        );
        check(
            d.val_fraction > 0.0 && d.val_fraction <= 0.5,
            format!("data.val_fraction = {} must be in (0, 0.5]", d.val_fraction),
        );

        let t = &self.train;
        check(
            t.batch_size > 0,
            "train.batch_size must be at least 1".into(),
        );
        check(
            t.grad_accum > 0,
            "train.grad_accum must be at least 1".into(),
        );
        check(t.max_steps > 0, "train.max_steps must be at least 1".into());
        check(
            t.eval_interval > 0,
            "train.eval_interval must be at least 1".into(),
        );
        check(
            t.log_interval > 0,
            "train.log_interval must be at least 1".into(),
        );
        check(
            t.sample_temperature.is_finite() && t.sample_temperature > 0.0,
            format!(
                "train.sample_temperature = {} must be a positive number",
                t.sample_temperature
            ),
        );

        let o = &self.optim;
        check(
            o.lr.is_finite() && o.lr > 0.0,
            format!("optim.lr = {} must be a positive number", o.lr),
        );
        check(
            o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr,
            format!(
                "optim.min_lr = {} must be in [0, optim.lr = {}]",
                o.min_lr, o.lr
            ),
        );
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            format!("optim.weight_decay = {} must be >= 0", o.weight_decay),
        );
        check(
            (0.0..1.0).contains(&o.beta1),
            format!("optim.beta1 = {} must be in [0, 1)", o.beta1),
        );
        check(
            (0.0..1.0).contains(&o.beta2),
            format!("optim.beta2 = {} must be in [0, 1)", o.beta2),
        );
        check(
            o.eps.is_finite() && o.eps > 0.0,
            format!("optim.eps = {} must be a positive number", o.eps),
        );
        check(
            o.grad_clip.is_finite() && o.grad_clip >= 0.0,
            format!("optim.grad_clip = {} must be >= 0 (0 = off)", o.grad_clip),
        );
        let p = &self.precision;
        check(
            !o.stochastic_rounding
                || matches!(p.recipe, RecipeName::Bf16 | RecipeName::Fp8),
            format!(
                "optim.stochastic_rounding = true rounds the bf16 copy of the weights, which \
                 precision.recipe = {} does not have; use recipe \"bf16\" or \"fp8\", or set it to false",
                p.recipe
            ),
        );
        check(
            p.loss_scale_init.is_finite() && p.loss_scale_init > 0.0,
            format!(
                "precision.loss_scale_init = {} must be a positive number",
                p.loss_scale_init
            ),
        );
        check(
            p.loss_scale_growth_interval > 0,
            "precision.loss_scale_growth_interval must be at least 1".into(),
        );
        check(
            p.loss_scale_growth.is_finite() && p.loss_scale_growth >= 1.0,
            format!(
                "precision.loss_scale_growth = {} must be >= 1",
                p.loss_scale_growth
            ),
        );
        check(
            p.loss_scale_backoff > 0.0 && p.loss_scale_backoff < 1.0,
            format!(
                "precision.loss_scale_backoff = {} must be in (0, 1)",
                p.loss_scale_backoff
            ),
        );
        check(
            p.fp8_amax_history >= 1,
            "precision.fp8_amax_history must be at least 1 (1 = the previous step's amax)".into(),
        );
        check(
            p.fp8_margin <= 64,
            format!(
                "precision.fp8_margin = {} must be in 0..=64 (binades of headroom below the FP8 max)",
                p.fp8_margin
            ),
        );

        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }

    /// The effective config as TOML, with a header comment; written into the run directory as
    /// `halfling.toml` so the run can be reproduced or resumed with `--config`.
    pub fn to_toml_string(&self) -> Result<String> {
        let body =
            toml::to_string(self).map_err(|e| anyhow!("cannot write the config as TOML: {e}"))?;
        Ok(format!(
            "# Effective halfling config of this run (file values plus --set overrides).\n\
             # Reproduce with: halfling train --config halfling.toml\n\n{body}"
        ))
    }

    /// The config as a generic TOML table, every key present.
    fn to_table(&self) -> Result<toml::Table> {
        toml::Table::try_from(self).context("cannot convert the config to a TOML table")
    }
}

/// Deserializes section `name` of `root` into `T`, one key at a time so that errors name the key.
fn typed_section<T: Section>(root: &toml::Table, name: &str, source: &str) -> Result<T> {
    let Some(value) = root.get(name) else {
        return Ok(T::default());
    };
    let toml::Value::Table(user) = value else {
        bail!(
            "{source}: `{name}` must be a section ([{name}]), found {}",
            kind_phrase(value)
        );
    };
    let defaults = toml::Table::try_from(T::default())
        .with_context(|| format!("cannot convert the default [{name}] to TOML"))?;
    for (key, user_value) in user {
        let Some(default_value) = defaults.get(key) else {
            bail!(
                "{source}: unknown key `{key}` in [{name}]{} (known keys: {})",
                did_you_mean(key, T::KEYS),
                T::KEYS.join(", ")
            );
        };
        // Probe this key alone on top of the defaults: an error is then this key's fault.
        let mut probe = defaults.clone();
        probe.insert(key.clone(), user_value.clone());
        if let Err(e) = probe.try_into::<T>() {
            let message = describe_key_error::<T>(
                name,
                key,
                user_value,
                default_value,
                &defaults,
                e.message(),
            );
            bail!("{source}: {message}");
        }
    }
    user.clone()
        .try_into::<T>()
        .map_err(|e| anyhow!("{source}: [{name}]: {}", one_line(e.message())))
}

/// Words for why `section.key = value` was rejected, given the key's default value.
fn describe_key_error<T: Section>(
    section: &str,
    key: &str,
    value: &toml::Value,
    default_value: &toml::Value,
    defaults: &toml::Table,
    serde_message: &str,
) -> String {
    let shown = one_line(&value.to_string());
    match (default_value, value) {
        // A string of the right type that was still refused: an enum with a bad spelling.
        (toml::Value::String(_), toml::Value::String(_)) => {
            format!("{section}.{key} = {shown} {}", one_line(serde_message))
        }
        (toml::Value::Integer(_), toml::Value::Integer(_)) => {
            format!("{section}.{key} = {shown} is out of range: expected a non-negative integer")
        }
        _ => {
            let expected = match default_value {
                toml::Value::Integer(_) => "a non-negative integer".to_string(),
                toml::Value::Float(_) => "a number".to_string(),
                toml::Value::Boolean(_) => "true or false".to_string(),
                toml::Value::String(_) => match enum_values::<T>(key, defaults) {
                    Some(allowed) => format!("a string (one of: {allowed})"),
                    None => "a string".to_string(),
                },
                other => format!("a {}", other.type_str()),
            };
            format!(
                "{section}.{key} = {shown} has the wrong type: expected {expected}, found {}",
                kind_phrase(value)
            )
        }
    }
}

/// For a string key that is an enum, its allowed values (found by probing with an impossible
/// spelling and reading the "is not one of" message the enum's deserializer produces).
fn enum_values<T: Section>(key: &str, defaults: &toml::Table) -> Option<String> {
    let mut probe = defaults.clone();
    probe.insert(key.to_string(), toml::Value::String("\u{1}".to_string()));
    let error = probe.try_into::<T>().err()?;
    error
        .message()
        .strip_prefix("is not one of: ")
        .map(str::to_string)
}

/// "a string", "an integer", ... for a TOML value.
fn kind_phrase(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Parses `text` as a single TOML value (`500`, `1e-4`, `"x"`, `[1, 2]`), or `None`.
fn parse_toml_value(text: &str) -> Option<toml::Value> {
    let mut table: toml::Table = toml::from_str(&format!("value = {text}")).ok()?;
    if table.len() != 1 {
        return None;
    }
    table.remove("value")
}

/// " (did you mean `x`?)" when a known name is within a small edit distance of `name`.
fn did_you_mean(name: &str, known: &[&str]) -> String {
    known
        .iter()
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 2 && *distance * 2 < candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| format!(" (did you mean `{candidate}`?)"))
        .unwrap_or_default()
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// 1-based line and column of byte offset `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Collapses a possibly multi-line message into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAKESPEARE: &str = include_str!("../configs/shakespeare_char.toml");
    const GPT2_124M: &str = include_str!("../configs/gpt2_124m.toml");
    const BENCH_0P9B: &str = include_str!("../configs/bench_0p9b.toml");
    const SHAKESPEARE_GPU: &str = include_str!("../configs/shakespeare_char_gpu.toml");

    fn error_of(text: &str) -> String {
        match Config::from_toml_str(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_is_the_default_and_equals_shakespeare_config() {
        let empty = Config::from_toml_str("").unwrap();
        assert_eq!(empty, Config::default());
        let shipped = Config::from_toml_str(SHAKESPEARE).unwrap();
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        let gpt2 = Config::from_toml_str(GPT2_124M).unwrap();
        assert_eq!(
            (gpt2.model.n_layer, gpt2.model.n_head, gpt2.model.n_embd),
            (12, 12, 768)
        );
        assert_eq!(gpt2.model.padded_vocab(gpt2.model.vocab_size), 50304);
        assert_eq!(gpt2.precision.recipe, RecipeName::Bf16);
        let gpu = Config::from_toml_str(SHAKESPEARE_GPU).unwrap();
        assert_eq!(
            (gpu.model.n_layer, gpu.model.n_embd, gpu.train.batch_size),
            (6, 384, 64)
        );
        let big = Config::from_toml_str(BENCH_0P9B).unwrap();
        assert_eq!((big.model.n_layer, big.model.n_embd), (16, 2048));
        assert_eq!(big.train.batch_size, 8);
        assert_eq!(big.optim, gpt2.optim);
    }

    #[test]
    fn shakespeare_config_documents_every_key() {
        let root: toml::Table = toml::from_str(SHAKESPEARE).unwrap();
        let full = Config::default().to_table().unwrap();
        for (section, keys) in &full {
            let written = root
                .get(section)
                .and_then(toml::Value::as_table)
                .unwrap_or_else(|| panic!("section [{section}] missing"));
            for key in keys.as_table().unwrap().keys() {
                assert!(written.contains_key(key), "{section}.{key} missing");
            }
        }
    }

    #[test]
    fn section_key_lists_match_the_structs() {
        fn keys_of<T: Section>() -> Vec<String> {
            let mut serialized: Vec<String> = toml::Table::try_from(T::default())
                .unwrap()
                .keys()
                .cloned()
                .collect();
            serialized.sort();
            serialized
        }
        fn sorted(keys: &[&str]) -> Vec<String> {
            let mut keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            keys.sort();
            keys
        }
        assert_eq!(keys_of::<ModelConfig>(), sorted(ModelConfig::KEYS));
        assert_eq!(keys_of::<DataConfig>(), sorted(DataConfig::KEYS));
        assert_eq!(keys_of::<TrainConfig>(), sorted(TrainConfig::KEYS));
        assert_eq!(keys_of::<OptimConfig>(), sorted(OptimConfig::KEYS));
        assert_eq!(keys_of::<PrecisionConfig>(), sorted(PrecisionConfig::KEYS));
        assert_eq!(keys_of::<DeviceConfig>(), sorted(DeviceConfig::KEYS));
        let sections: Vec<String> = Config::default()
            .to_table()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(sections.len(), SECTIONS.len());
    }

    #[test]
    fn unknown_key_names_key_section_file_and_known_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[model]\nn_layers = 6\n").unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("bad.toml"), "{message}");
        assert!(
            message.contains("unknown key `n_layers` in [model]"),
            "{message}"
        );
        assert!(message.contains("did you mean `n_layer`?"), "{message}");
        assert!(
            message.contains("(known keys: n_layer, n_head, n_embd, block_size"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn bad_enum_value_lists_allowed_values() {
        let message = error_of("[precision]\nrecipe = \"fp9\"\n");
        assert!(
            message.contains("precision.recipe = \"fp9\" is not one of: fp32, bf16"),
            "{message}"
        );
        let message = error_of("[optim]\ndecay = \"step\"\n");
        assert!(
            message.contains("optim.decay = \"step\" is not one of: cosine, linear, constant"),
            "{message}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_expected_type() {
        let message = error_of("[train]\nbatch_size = \"twelve\"\n");
        assert!(
            message.contains("train.batch_size = \"twelve\" has the wrong type: expected a non-negative integer, found a string"),
            "{message}"
        );
        let message = error_of("[optim]\nlr = \"fast\"\n");
        assert!(message.contains("optim.lr"), "{message}");
        assert!(message.contains("expected a number"), "{message}");
        let message = error_of("[precision]\nrecipe = 16\n");
        assert!(
            message.contains(
                "expected a string (one of: fp32, bf16, fp16, fp8, fp8-unit), found an integer"
            ),
            "{message}"
        );
        let message = error_of("[train]\nmax_steps = -5\n");
        assert!(
            message.contains("train.max_steps = -5 is out of range"),
            "{message}"
        );
        // Integers are accepted where numbers are expected.
        assert_eq!(
            Config::from_toml_str("[optim]\nlr = 1\n").unwrap().optim.lr,
            1.0
        );
    }

    #[test]
    fn unknown_section_and_stray_keys_are_rejected() {
        let message = error_of("[modle]\nn_layer = 2\n");
        assert!(message.contains("unknown section [modle]"), "{message}");
        assert!(message.contains("did you mean `model`?"), "{message}");
        assert!(
            message.contains("known sections: model, data, train, optim, precision, device"),
            "{message}"
        );
        let message = error_of("max_steps = 3\n");
        assert!(
            message.contains("key `max_steps` is outside any section"),
            "{message}"
        );
        let message = error_of("model = 3\n");
        assert!(message.contains("`model` must be a section"), "{message}");
    }

    #[test]
    fn syntax_errors_carry_line_numbers() {
        let message = error_of("[model]\nn_layer = 4\nn_head = = 2\n");
        assert!(message.contains("<config>:3:"), "{message}");
        assert!(message.contains("invalid TOML"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn validate_reports_range_errors() {
        let message = error_of("[model]\nn_embd = 130\nn_head = 4\n");
        assert!(
            message.contains("not divisible by model.n_head"),
            "{message}"
        );
        let message = error_of("[optim]\nlr = 1e-4\nmin_lr = 1e-3\nbeta2 = 1.0\n");
        assert!(message.contains("optim.min_lr"), "{message}");
        assert!(
            message.contains("optim.beta2 = 1 must be in [0, 1)"),
            "{message}"
        );
        let message = error_of("[data]\nval_fraction = 0.0\n");
        assert!(message.contains("data.val_fraction"), "{message}");
        let message = error_of("[model]\ndropout = 1.0\n");
        assert!(message.contains("model.dropout"), "{message}");
        let message = error_of("[train]\nbatch_size = 0\neval_interval = 0\n");
        assert!(message.contains("train.batch_size"), "{message}");
        assert!(message.contains("train.eval_interval"), "{message}");
    }

    #[test]
    fn override_changes_values_of_every_type() {
        let mut config = Config::default();
        config.apply_override("train.max_steps=500").unwrap();
        config.apply_override("optim.lr = 3e-4").unwrap();
        config.apply_override("precision.recipe=bf16").unwrap();
        config.apply_override("data.dir=data/other").unwrap();
        config.apply_override("data.text=2024").unwrap();
        config
            .apply_override("train.sample_prompt=\"ROMEO:\"")
            .unwrap();
        assert_eq!(config.train.max_steps, 500);
        assert_eq!(config.optim.lr, 3e-4);
        assert_eq!(config.precision.recipe, RecipeName::Bf16);
        assert_eq!(config.data.dir, "data/other");
        assert_eq!(config.data.text, "2024");
        assert_eq!(config.train.sample_prompt, "ROMEO:");
        // Untouched keys keep their values.
        assert_eq!(config.model, ModelConfig::default());
    }

    #[test]
    fn override_errors_match_file_errors() {
        let mut config = Config::default();
        let message = config
            .apply_override("train.max_step=5")
            .unwrap_err()
            .to_string();
        assert!(message.contains("--set train.max_step=5"), "{message}");
        assert!(
            message.contains("unknown key `max_step` in [train]"),
            "{message}"
        );
        let message = config
            .apply_override("trian.max_steps=5")
            .unwrap_err()
            .to_string();
        assert!(message.contains("unknown section [trian]"), "{message}");
        let message = config
            .apply_override("train.max_steps=lots")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("train.max_steps = \"lots\" has the wrong type"),
            "{message}"
        );
        let message = config
            .apply_override("precision.recipe=fp9")
            .unwrap_err()
            .to_string();
        assert!(message.contains("is not one of: fp32, bf16"), "{message}");
        let message = config
            .apply_override("max_steps=5")
            .unwrap_err()
            .to_string();
        assert!(message.contains("section.key"), "{message}");
        let message = config
            .apply_override("train.max_steps")
            .unwrap_err()
            .to_string();
        assert!(message.contains("section.key=value"), "{message}");
        // Failed overrides leave the config unchanged.
        assert_eq!(config, Config::default());
    }

    #[test]
    fn load_with_overrides_validates_after_all_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "[optim]\nlr = 1e-3\n").unwrap();
        // min_lr above lr is only an intermediate state: the second override fixes it.
        let config =
            Config::load_with_overrides(&path, &["optim.min_lr=5e-3", "optim.lr=1e-2"]).unwrap();
        assert_eq!((config.optim.lr, config.optim.min_lr), (1e-2, 5e-3));
        let message = format!(
            "{:?}",
            Config::load_with_overrides(&path, &["optim.min_lr=5e-3"]).unwrap_err()
        );
        assert!(message.contains("run.toml: optim.min_lr"), "{message}");
        let message = Config::load(dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("cannot read config file"), "{message}");
    }

    #[test]
    fn to_toml_string_round_trips() {
        let default_text = Config::default().to_toml_string().unwrap();
        assert_eq!(
            Config::from_toml_str(&default_text).unwrap(),
            Config::default()
        );
        let mut config = Config::from_toml_str(GPT2_124M).unwrap();
        config.train.sample_prompt = "a \"quoted\"\nprompt".to_string();
        config.optim.decay = DecayKind::Linear;
        let text = config.to_toml_string().unwrap();
        assert!(text.starts_with('#'));
        assert_eq!(Config::from_toml_str(&text).unwrap(), config);
    }

    #[test]
    fn vocab_helpers() {
        let mut model = ModelConfig::default();
        assert_eq!(model.padded_vocab(65), 128);
        model.vocab_pad_multiple = 1;
        assert_eq!(model.padded_vocab(65), 65);
        assert_eq!(model.resolve_vocab(65).unwrap(), 65);
        model.vocab_size = 50257;
        assert_eq!(model.resolve_vocab(50257).unwrap(), 50257);
        let message = model.resolve_vocab(8192).unwrap_err().to_string();
        assert!(message.contains("model.vocab_size = 50257"), "{message}");
        assert_eq!(OptimConfig::default().effective_decay_steps(2000), 2000);
    }

    #[test]
    fn fp8_scaling_keys_are_checked() {
        let c = Config::default().precision;
        assert_eq!(
            (c.fp8_scaling, c.fp8_amax_history, c.fp8_margin),
            (Fp8ScalingKind::Delayed, 16, 0)
        );
        let message = error_of("[precision]\nfp8_scaling = \"late\"\n");
        assert!(
            message.contains("precision.fp8_scaling = \"late\" is not one of: delayed, current"),
            "{message}"
        );
        let message = error_of("[precision]\nfp8_amax_history = 0\n");
        assert!(message.contains("precision.fp8_amax_history"), "{message}");
        let message = error_of("[precision]\nfp8_margin = -1\n");
        assert!(
            message.contains("precision.fp8_margin = -1 is out of range"),
            "{message}"
        );
        let message = error_of("[precision]\nfp8_margin = 100\n");
        assert!(message.contains("precision.fp8_margin = 100"), "{message}");
        let mut config = Config::default();
        config
            .apply_override("precision.fp8_scaling=current")
            .unwrap();
        assert_eq!(config.precision.fp8_scaling, Fp8ScalingKind::Current);
    }

    #[test]
    fn enums_parse_and_print() {
        for name in RecipeName::NAMES {
            assert_eq!(name.parse::<RecipeName>().unwrap().as_str(), *name);
        }
        assert!("fp9".parse::<RecipeName>().is_err());
        assert_eq!(DeviceKind::Cuda.to_string(), "cuda");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
