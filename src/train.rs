//! The training loop: data, micro-batches and gradient accumulation, the optimizer step,
//! evaluation, checkpoints, metrics and the closing sample.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backend::Backend;
use crate::config::{Config, TokenizerKind};
use crate::data::{self, BatchLoader, EvalBatches, PrepareOptions, Shard, Tokenizer};
use crate::generate::{generate, SampleOptions};
use crate::metrics::{self, MetricsWriter, StepMetrics, Summary};
use crate::model::{Activations, Gpt, GptConfig};
use crate::numerics::LossScaler;
use crate::optim::{self, AdamWState};
use crate::precision::Recipe;
use crate::runs::{self, CheckpointParts, TrainerState};

/// What `halfling train` was asked to do beyond the config.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Run directory (default `runs/<config stem>`).
    pub out_dir: PathBuf,
    /// Continue from this run or checkpoint directory.
    pub resume: Option<PathBuf>,
    /// Start from the weights of this checkpoint (halfling or Hugging Face GPT-2) with a fresh
    /// optimizer.
    pub init_from: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many steps in total, as a preempted job would.
    pub stop_at: Option<u64>,
    /// Suppress the progress bar and log lines.
    pub quiet: bool,
}

/// Training and validation data of a run, prepared if needed.
pub struct RunData {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Training tokens.
    pub train: Shard,
    /// Validation tokens.
    pub val: Shard,
}

/// Prepares the data a config points at (only when missing or stale) and opens it.
pub fn load_data(cfg: &Config, quiet: bool) -> Result<RunData> {
    let dir = PathBuf::from(&cfg.data.dir);
    if !cfg.data.text.is_empty() {
        let opts = PrepareOptions {
            input: PathBuf::from(&cfg.data.text),
            out_dir: dir.clone(),
            tokenizer: match cfg.data.tokenizer {
                TokenizerKind::Char => data::prepare::TokenizerKind::Char,
                TokenizerKind::Bpe => data::prepare::TokenizerKind::Bpe {
                    vocab_size: cfg.data.bpe_vocab_size,
                },
            },
            val_fraction: cfg.data.val_fraction,
        };
        if let Some(reason) = data::stale_reason(&opts)? {
            if !quiet {
                eprintln!("preparing {} ({reason})", dir.display());
            }
            let report = data::prepare(&opts)?;
            if !quiet {
                eprintln!(
                    "prepared {}: {} train + {} val tokens, {} tokenizer with {} tokens, {:.1}s",
                    dir.display(),
                    report.train_tokens,
                    report.val_tokens,
                    report.tokenizer_kind,
                    report.vocab_size,
                    report.seconds
                );
            }
        }
    } else if !dir.join("train.bin").is_file() {
        bail!("data.dir = {:?} has no train.bin and data.text is empty: set data.text to a text file to prepare", cfg.data.dir);
    }
    let tokenizer = Tokenizer::load(dir.join(runs::TOKENIZER_FILE))?;
    let train = Shard::open(dir.join("train.bin"))?;
    let val = Shard::open(dir.join("val.bin"))?;
    for (name, shard) in [("train", &train), ("val", &val)] {
        if shard.vocab_size() != tokenizer.vocab_size() {
            bail!(
                "{}/{name}.bin was written for a vocabulary of {} but tokenizer.json has {}: re-run `halfling prepare`",
                dir.display(),
                shard.vocab_size(),
                tokenizer.vocab_size()
            );
        }
    }
    Ok(RunData {
        tokenizer,
        train,
        val,
    })
}

/// The model sizes a config asks for, with the vocabulary taken from the tokenizer.
pub fn gpt_config(cfg: &Config, tokenizer_vocab: usize) -> Result<GptConfig> {
    let vocab = cfg.model.resolve_vocab(tokenizer_vocab)?;
    Ok(GptConfig {
        n_layer: cfg.model.n_layer,
        n_head: cfg.model.n_head,
        n_embd: cfg.model.n_embd,
        block_size: cfg.model.block_size,
        vocab_size: vocab,
        padded_vocab_size: cfg.model.padded_vocab(vocab),
    })
}

/// Mean loss over `batches` random validation batches drawn with a fixed seed (the same
/// windows at every evaluation), or over the whole split when `batches` is 0.
pub fn evaluate<B: Backend>(
    backend: &B,
    model: &Gpt<B>,
    acts: &mut Activations<B>,
    val: &Shard,
    batches: usize,
    seed: u64,
) -> Result<f64> {
    let (b, t) = (acts.batch(), acts.seq_len());
    let mut inputs = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let mut total = 0.0f64;
    let mut count = 0usize;
    if batches == 0 {
        let mut it = EvalBatches::new(val.clone(), b, t)?;
        while let Some(valid) = it.next_batch(&mut inputs, &mut targets) {
            // Partial last batch: the unused rows repeat valid data and are not counted.
            model.forward(backend, acts, &inputs, None)?;
            let losses = model.token_losses(backend, acts, &targets)?;
            total += losses[..valid * t]
                .iter()
                .map(|&x| f64::from(x))
                .sum::<f64>();
            count += valid * t;
        }
    } else {
        let mut loader = BatchLoader::new(val.clone(), b, t, seed)?;
        for _ in 0..batches {
            loader.next_batch(&mut inputs, &mut targets);
            model.forward(backend, acts, &inputs, None)?;
            total += f64::from(model.loss(backend, acts, &targets)?) * (b * t) as f64;
            count += b * t;
        }
    }
    Ok(total / count.max(1) as f64)
}

/// The first model size where a checkpoint and the config disagree, said in config keys.
fn size_mismatch(checkpoint: &GptConfig, config: &GptConfig) -> Option<String> {
    let pairs = [
        ("model.n_layer", checkpoint.n_layer, config.n_layer),
        ("model.n_head", checkpoint.n_head, config.n_head),
        ("model.n_embd", checkpoint.n_embd, config.n_embd),
        ("model.block_size", checkpoint.block_size, config.block_size),
        (
            "the vocabulary size",
            checkpoint.vocab_size,
            config.vocab_size,
        ),
        (
            "model.vocab_pad_multiple (padded vocabulary)",
            checkpoint.padded_vocab_size,
            config.padded_vocab_size,
        ),
    ];
    pairs.iter().find(|(_, c, w)| c != w).map(|(key, c, w)| {
        let hint = if *key == "model.block_size" && w > c {
            " (a context longer than the checkpoint's has no learned positions)"
        } else {
            ""
        };
        format!("{key} is {w} in the config but {c} in the checkpoint{hint}; use the checkpoint's own halfling.toml")
    })
}

/// The loss scaler's fields for `metrics.jsonl` (fp16 runs).
fn scaler_metrics(scaler: Option<&LossScaler>) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    if let Some(s) = scaler {
        extra.insert("loss_scale".into(), s.scale.into());
        extra.insert("skipped_steps".into(), s.skipped_steps.into());
    }
    extra
}

/// A loss scaler for the recipes that need one.
pub fn loss_scaler(cfg: &Config, recipe: &Recipe) -> Option<LossScaler> {
    let p = &cfg.precision;
    recipe.loss_scaling.then(|| {
        LossScaler::new(
            p.loss_scale_init,
            p.loss_scale_growth,
            p.loss_scale_backoff,
            p.loss_scale_growth_interval as u64,
        )
    })
}

/// Seed of the validation windows, fixed per run so evaluations compare.
fn eval_seed(cfg: &Config) -> u64 {
    cfg.train.seed ^ 0x005E_ED0F_E7A1
}

/// Seed of the dropout masks of one micro-batch.
fn dropout_seed(cfg: &Config, step: u64, micro: usize) -> u64 {
    cfg.train.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step << 16) ^ micro as u64
}

/// Trains per `cfg` on `backend`; returns the summary also written to `summary.json`.
pub fn train<B: Backend>(backend: &B, cfg: Config, opts: &TrainOptions) -> Result<Summary> {
    let wall = Instant::now();
    let data = load_data(&cfg, opts.quiet)?;
    let gcfg = gpt_config(&cfg, data.tokenizer.vocab_size())?;
    let recipe = Recipe::from_config(&cfg);
    recipe.check_backend(backend)?;
    let (b, t, accum) = (
        cfg.train.batch_size,
        cfg.model.block_size,
        cfg.train.grad_accum,
    );
    let dropout = cfg.model.dropout as f32;
    let run_dir = opts.out_dir.clone();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;

    // Model and optimizer: fresh, from a checkpoint's weights, or resumed exactly.
    let mut loader = BatchLoader::new(data.train.clone(), b, t, cfg.train.seed)?;
    let mut state = TrainerState {
        step: 0,
        tokens: 0,
        loader: loader.state(),
        best_val_loss: None,
        loss_scaler: loss_scaler(&cfg, &recipe),
        elapsed_s: 0.0,
        halfling_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (mut model, mut optimizer) =
        if let Some(path) = opts.resume.as_ref().or(opts.init_from.as_ref()) {
            let ck = runs::load_checkpoint(path)?;
            if let Some(problem) = size_mismatch(&ck.gpt, &gcfg) {
                bail!(
                    "checkpoint {} does not fit the config: {problem}",
                    ck.dir.display()
                );
            }
            if ck.tokenizer.vocab_size() != data.tokenizer.vocab_size() {
                bail!(
                    "checkpoint {} was trained with a different tokenizer than data.dir = {:?}",
                    ck.dir.display(),
                    cfg.data.dir
                );
            }
            let mut model = Gpt::from_values(
                backend,
                gcfg.clone(),
                recipe.clone(),
                dropout,
                &ck.params_for(&recipe),
            )?
            .with_recompute_gelu(cfg.train.recompute_gelu)
            .with_logits_chunk_bytes(cfg.train.logits_chunk_bytes());
            let mut optimizer = AdamWState::new(backend, model.specs(), recipe.optimizer_state)?
                .with_rounding_seed(cfg.optim.stochastic_rounding.then_some(cfg.train.seed));
            if opts.resume.is_some() {
                state = runs::load_training_state(backend, &ck.dir, &mut model, &mut optimizer)?;
                loader.restore(state.loader.clone())?;
            }
            (model, optimizer)
        } else {
            let model = Gpt::new(
                backend,
                gcfg.clone(),
                recipe.clone(),
                dropout,
                cfg.model.init_std as f32,
                cfg.train.seed,
            )?
            .with_recompute_gelu(cfg.train.recompute_gelu)
            .with_logits_chunk_bytes(cfg.train.logits_chunk_bytes());
            let optimizer = AdamWState::new(backend, model.specs(), recipe.optimizer_state)?
                .with_rounding_seed(cfg.optim.stochastic_rounding.then_some(cfg.train.seed));
            (model, optimizer)
        };
    let max_steps = cfg.train.max_steps as u64;
    let stop = opts.stop_at.unwrap_or(max_steps).min(max_steps);

    // The run directory: effective config, metrics continued from where the checkpoint was.
    std::fs::write(run_dir.join(runs::CONFIG_TOML), cfg.to_toml_string()?)
        .with_context(|| format!("cannot write {}", run_dir.join(runs::CONFIG_TOML).display()))?;
    let metrics_path = run_dir.join(metrics::METRICS_FILE);
    let numerics_path = run_dir.join(crate::monitor::NUMERICS_FILE);
    if state.step == 0 {
        let _ = std::fs::remove_file(&metrics_path);
        let _ = std::fs::remove_file(&numerics_path);
    } else {
        metrics::truncate_after(&metrics_path, state.step)?;
        metrics::truncate_after(&numerics_path, state.step)?;
    }
    let mut writer = MetricsWriter::open(&run_dir)?;

    // Evaluation reuses the training activations (no second copy of them on the device).
    let mut acts = model.activations(backend, b, t, true)?;
    let mut inputs = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let tokens_per_step = (b * t * accum) as u64;
    let peak = backend.peak_flops(recipe.compute_dtype());

    let bar = progress_bar(opts.quiet, max_steps, state.step);
    if !opts.quiet {
        log_line(
            &bar,
            format!(
            "training {} params ({} layers, {} wide, context {t}) on {}, {} recipe, {} tokens/step",
            gcfg.num_params(),
            gcfg.n_layer,
            gcfg.n_embd,
            backend.describe(),
            cfg.precision.recipe,
            tokens_per_step
        ),
        );
    }
    let session_start = Instant::now();
    let session_start_step = state.step;
    let prior_elapsed_s = state.elapsed_s;
    // Time spent in training steps only (evaluation and checkpoints excluded), for tokens/s.
    let mut train_s = 0.0f64;
    // Time spent by the numerics monitor (inside train_s), reported in summary.json.
    let mut monitor_s = 0.0f64;
    let mut last_val = None;
    let mut last_train = f64::NAN;
    while state.step < stop {
        let step = state.step;
        let step_start = Instant::now();
        let lr = optim::lr_at(&cfg.optim, step, max_steps);
        // With fp16 the loss (so every gradient) is multiplied by the loss scale; apply_step
        // divides it out again.
        let loss_weight = state.loss_scaler.as_ref().map_or(1.0, |s| s.scale) as f32 / accum as f32;
        let mut loss = 0.0f64;
        for micro in 0..accum {
            loader.next_batch(&mut inputs, &mut targets);
            let l = model.train_micro_batch(
                backend,
                &mut acts,
                &inputs,
                &targets,
                loss_weight,
                dropout_seed(&cfg, step, micro),
                micro == 0,
            )?;
            loss += f64::from(l) / accum as f64;
        }
        let monitor = cfg.precision.monitor_interval as u64;
        if monitor > 0 && (step + 1) % monitor == 0 {
            let t0 = Instant::now();
            crate::monitor::record(backend, &model, &acts, step + 1, &run_dir)?;
            monitor_s += t0.elapsed().as_secs_f64();
        }
        let outcome = optim::apply_step(
            backend,
            &mut model,
            &mut optimizer,
            &cfg.optim,
            lr,
            state.loss_scaler.as_mut(),
        )?;
        model.finish_step(backend, &mut acts)?;
        let norm = outcome.grad_norm;
        let scaler_gave_up = state.loss_scaler.as_ref().is_some_and(|s| s.exhausted());
        if !outcome.applied && (state.loss_scaler.is_none() || scaler_gave_up) {
            bail!(
                "training diverged at step {}: loss = {loss}, gradient norm = {norm}; lower optim.lr (now {}) or raise optim.warmup_steps; the last checkpoint is intact",
                step + 1,
                cfg.optim.lr
            );
        }
        if loss.is_finite() {
            last_train = loss;
        }
        // No wait for the optimizer update here: the next batch is read and uploaded while the
        // device runs it (the loss and gradient-norm reads already wait once per step, so step
        // times still add up to the device's time).
        state.step += 1;
        state.tokens += tokens_per_step;
        let step_s = step_start.elapsed().as_secs_f64();
        train_s += step_s;

        let is_last = state.step == max_steps;
        let val_loss = if state.step % cfg.train.eval_interval as u64 == 0 || is_last {
            // The final evaluation covers the whole validation split.
            let batches = if is_last { 0 } else { cfg.train.eval_batches };
            let v = evaluate(
                backend,
                &model,
                &mut acts,
                &data.val,
                batches,
                eval_seed(&cfg),
            )?;
            state.best_val_loss = Some(state.best_val_loss.map_or(v, |best: f64| best.min(v)));
            last_val = Some(v);
            if !opts.quiet {
                log_line(
                    &bar,
                    format!(
                        "step {:>6}: train loss {loss:.4}, val loss {v:.4}",
                        state.step
                    ),
                );
            }
            Some(v)
        } else {
            None
        };
        let tokens_per_s =
            (state.step - session_start_step) as f64 * tokens_per_step as f64 / train_s;
        if state.step % cfg.train.log_interval as u64 == 0
            || val_loss.is_some()
            || state.step == stop
        {
            writer.write(&StepMetrics {
                step: state.step,
                tokens: state.tokens,
                lr: f64::from(lr),
                train_loss: loss,
                grad_norm: norm,
                tokens_per_s,
                ms_per_step: step_s * 1e3,
                val_loss,
                extra: scaler_metrics(state.loss_scaler.as_ref()),
            })?;
        }
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss:.4} | {:.0} tok/s", tokens_per_s));

        let ckpt_due = cfg.train.checkpoint_interval > 0
            && state.step % cfg.train.checkpoint_interval as u64 == 0;
        if ckpt_due || state.step == stop {
            state.loader = loader.state();
            state.elapsed_s = prior_elapsed_s + session_start.elapsed().as_secs_f64();
            save(
                backend,
                &run_dir,
                &model,
                &optimizer,
                &cfg,
                &data.tokenizer,
                &state,
            )?;
        }
    }
    bar.finish_and_clear();
    let steps_done = state.step - session_start_step;
    let tokens_per_s = if train_s > 0.0 {
        steps_done as f64 * tokens_per_step as f64 / train_s
    } else {
        0.0
    };

    // The closing sample.
    if cfg.train.sample_tokens > 0 && !opts.quiet {
        let sample = generate(
            backend,
            &model,
            &data.tokenizer,
            &SampleOptions {
                prompt: cfg.train.sample_prompt.clone(),
                tokens: cfg.train.sample_tokens,
                temperature: cfg.train.sample_temperature as f32,
                top_k: cfg.train.sample_top_k,
                seed: cfg.train.seed,
            },
        )?;
        println!("--- sample ---\n{sample}\n--------------");
    }

    let history = metrics::read_metrics(&metrics_path)?;
    let plot_path = run_dir.join("loss.svg");
    metrics::plot_losses(&history, &plot_path)?;
    let summary = Summary {
        final_step: state.step,
        tokens: state.tokens,
        final_train_loss: last_train,
        final_val_loss: last_val,
        best_val_loss: state.best_val_loss,
        wall_s: wall.elapsed().as_secs_f64(),
        tokens_per_s,
        mfu: Some(tokens_per_s * gcfg.flops_per_token(t) / peak),
        peak_mem_bytes: Some(backend.peak_mem_bytes()),
        device: backend.describe(),
        precision: cfg.precision.recipe.to_string(),
        params: gcfg.num_params() as u64,
        extra: if cfg.precision.monitor_interval > 0 {
            let mut m = serde_json::Map::new();
            m.insert("monitor_s".into(), monitor_s.into());
            m
        } else {
            Default::default()
        },
    };
    summary.write(run_dir.join(metrics::SUMMARY_FILE))?;
    if !opts.quiet {
        println!(
            "done: {} steps, val loss {}, {:.0} tokens/s, {:.1}s; run directory {}",
            state.step,
            last_val.map_or("-".to_string(), |v| format!("{v:.4}")),
            tokens_per_s,
            summary.wall_s,
            run_dir.display()
        );
    }
    Ok(summary)
}

fn save<B: Backend>(
    backend: &B,
    run_dir: &Path,
    model: &Gpt<B>,
    optimizer: &AdamWState<B>,
    cfg: &Config,
    tokenizer: &Tokenizer,
    state: &TrainerState,
) -> Result<()> {
    let parts = CheckpointParts {
        config: cfg,
        tokenizer,
        state,
    };
    runs::save_checkpoint(
        backend,
        &run_dir.join(runs::CHECKPOINT_DIR),
        model,
        optimizer,
        &parts,
    )
}

/// Prints a log line above the progress bar, or on stderr when there is no terminal to draw on
/// (indicatif drops `println` for hidden bars, and logs in CI must still show progress).
fn log_line(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn progress_bar(quiet: bool, total: u64, start: u64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} | {msg} | ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(start);
    bar
}
