//! `halfling bench`: training-step throughput on synthetic tokens, comparable with the peer
//! benchmark (same FLOP formula, same shapes).

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::Backend;
use crate::config::Config;
use crate::data::Rng;
use crate::model::Gpt;
use crate::optim::{self, AdamWState};
use crate::precision::Recipe;
use crate::train;

/// What one benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Device description.
    pub device: String,
    /// Precision recipe.
    pub precision: String,
    /// Parameter count.
    pub params: u64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Mean milliseconds per optimizer step (forward, backward, AdamW).
    pub ms_per_step: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Achieved model TFLOP/s (6·(N − T·d) + 12·L·T·d per token).
    pub model_tflops: f64,
    /// Model FLOP utilisation against the device's dense peak for the recipe's format.
    pub mfu: f64,
    /// Peak bytes held in device buffers.
    pub peak_mem_bytes: u64,
}

/// Runs `warmup` untimed and `steps` timed training steps of `cfg`'s model on random tokens.
pub fn bench<B: Backend>(
    backend: &B,
    cfg: &Config,
    steps: usize,
    warmup: usize,
) -> Result<BenchResult> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let vocab = if cfg.model.vocab_size > 0 {
        cfg.model.vocab_size
    } else {
        train::load_data(cfg, true)?.tokenizer.vocab_size()
    };
    let gcfg = train::gpt_config(cfg, vocab)?;
    let recipe = Recipe::from_config(cfg);
    recipe.check_backend(backend)?;
    let (b, t, accum) = (
        cfg.train.batch_size,
        cfg.model.block_size,
        cfg.train.grad_accum,
    );
    let mut model = Gpt::new(
        backend,
        gcfg.clone(),
        recipe.clone(),
        cfg.model.dropout as f32,
        cfg.model.init_std as f32,
        cfg.train.seed,
    )?
    .with_recompute_gelu(cfg.train.recompute_gelu)
    .with_logits_chunk_bytes(cfg.train.logits_chunk_bytes());
    let mut optimizer = AdamWState::new(backend, model.specs(), recipe.optimizer_state)?
        .with_rounding_seed(cfg.optim.stochastic_rounding.then_some(cfg.train.seed));
    let mut acts = model.activations(backend, b, t, true)?;
    let mut rng = Rng::new(cfg.train.seed);
    let mut batch = || -> Vec<u32> { (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect() };
    let mut scaler = train::loss_scaler(cfg, &recipe);
    let mut start = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            backend.synchronize()?;
            // Discard what the warm-up steps profiled.
            backend.profile_report()?;
            start = Instant::now();
        }
        let loss_weight = scaler.as_ref().map_or(1.0, |s| s.scale) as f32 / accum as f32;
        for micro in 0..accum {
            let (inputs, targets) = (batch(), batch());
            model.train_micro_batch(
                backend,
                &mut acts,
                &inputs,
                &targets,
                loss_weight,
                (step * accum + micro) as u64,
                micro == 0,
            )?;
        }
        optim::apply_step(
            backend,
            &mut model,
            &mut optimizer,
            &cfg.optim,
            cfg.optim.lr as f32,
            scaler.as_mut(),
        )?;
        model.finish_step(backend, &mut acts)?;
    }
    backend.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    if let Some(report) = backend.profile_report()? {
        eprintln!("device time by kernel over {steps} steps:\n{report}");
    }
    let tokens = (steps * b * t * accum) as f64;
    let tokens_per_s = tokens / secs;
    let flops = gcfg.flops_per_token(t) * tokens_per_s;
    Ok(BenchResult {
        device: backend.describe(),
        precision: cfg.precision.recipe.to_string(),
        params: gcfg.num_params() as u64,
        batch_size: b,
        seq_len: t,
        steps,
        ms_per_step: secs * 1e3 / steps as f64,
        tokens_per_s,
        model_tflops: flops / 1e12,
        mfu: flops / backend.peak_flops(recipe.compute_dtype()),
        peak_mem_bytes: backend.peak_mem_bytes(),
    })
}
