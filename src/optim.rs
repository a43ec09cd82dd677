//! The optimizer: AdamW with decoupled weight decay, the learning-rate schedule, and global-norm
//! gradient clipping.

use anyhow::{bail, Result};

use crate::backend::{AdamW, AdamWTensor, Backend};
use crate::config::{DecayKind as Decay, OptimConfig};
use crate::model::{Gpt, ParamBufs, ParamSpec};
use crate::numerics::DType;
use crate::numerics::LossScaler;

/// Learning rate at 0-based `step`: linear warmup to `lr` over `warmup_steps`, then cosine or
/// linear decay to `min_lr` over the following steps up to `decay_steps` (or `total_steps`),
/// then `min_lr`.
pub fn lr_at(cfg: &OptimConfig, step: u64, total_steps: u64) -> f32 {
    let (lr, min_lr) = (cfg.lr, cfg.min_lr);
    let warmup = cfg.warmup_steps as u64;
    if step < warmup {
        return (lr * (step + 1) as f64 / warmup as f64) as f32;
    }
    let end = if cfg.decay_steps > 0 {
        cfg.decay_steps as u64
    } else {
        total_steps
    };
    if step >= end || end <= warmup {
        return match cfg.decay {
            Decay::Constant => lr as f32,
            _ => min_lr as f32,
        };
    }
    let progress = (step - warmup) as f64 / (end - warmup) as f64;
    let rate = match cfg.decay {
        Decay::Constant => lr,
        Decay::Linear => min_lr + (lr - min_lr) * (1.0 - progress),
        Decay::Cosine => {
            min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    rate as f32
}

/// √(Σ‖g‖²) over all gradient tensors.
pub fn global_grad_norm<B: Backend>(backend: &B, grads: &[B::Buf]) -> Result<f64> {
    Ok(backend.global_sum_squares(grads)?.sqrt())
}

/// Factor that brings the gradient norm down to `max_norm` (1 when it is already below, or when
/// clipping is off with `max_norm == 0`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        (max_norm / norm) as f32
    } else {
        1.0
    }
}

/// What [`apply_step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Global norm of the (unscaled) gradients; inf or NaN when they overflowed.
    pub grad_norm: f64,
    /// False when the step was skipped because the gradients were not finite.
    pub applied: bool,
}

/// The optimizer step after a backward pass: measures the gradient norm, undoes the loss scale,
/// clips, and updates the weights, or, with a loss scaler, skips the step when the gradients
/// overflowed (the scaler then backs off). Without a scaler non-finite gradients are returned
/// unapplied and the caller decides (training stops with an error).
pub fn apply_step<B: Backend>(
    backend: &B,
    model: &mut Gpt<B>,
    optimizer: &mut AdamWState<B>,
    cfg: &OptimConfig,
    lr: f32,
    scaler: Option<&mut LossScaler>,
) -> Result<StepOutcome> {
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let grad_norm = global_grad_norm(backend, model.grads())? / scale;
    let finite = grad_norm.is_finite();
    let applied = match scaler {
        Some(scaler) => scaler.update(finite),
        None => finite,
    };
    if applied {
        let factor = clip_factor(grad_norm, cfg.grad_clip) as f64 / scale;
        optimizer.update(backend, cfg, model.params_mut(), lr, factor as f32)?;
    }
    Ok(StepOutcome { grad_norm, applied })
}

/// AdamW state: first and second moments per parameter tensor, and the step count.
pub struct AdamWState<B: Backend> {
    /// First moments, one buffer per parameter, in spec order.
    pub m: Vec<B::Buf>,
    /// Second moments.
    pub v: Vec<B::Buf>,
    /// Number of updates taken so far.
    pub step: u64,
    decay: Vec<bool>,
    rounding_seed: Option<u64>,
}

impl<B: Backend> AdamWState<B> {
    /// Zero moments for parameters `specs`, stored as `dtype`.
    pub fn new(backend: &B, specs: &[ParamSpec], dtype: DType) -> Result<Self> {
        let alloc = || {
            specs
                .iter()
                .map(|s| backend.alloc(dtype, s.numel()))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            m: alloc()?,
            v: alloc()?,
            step: 0,
            decay: specs.iter().map(|s| s.decay).collect(),
            rounding_seed: None,
        })
    }

    /// Round the bf16 compute copies stochastically, with bits derived from `seed`, the step
    /// and the tensor (`optim.stochastic_rounding`); `None` rounds to nearest even.
    pub fn with_rounding_seed(mut self, seed: Option<u64>) -> Self {
        self.rounding_seed = seed;
        self
    }

    /// One update of every parameter, refreshing the low-precision compute copies if any.
    pub fn update(
        &mut self,
        backend: &B,
        cfg: &OptimConfig,
        params: ParamBufs<'_, B>,
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        let ParamBufs {
            master,
            grads,
            compute,
            lr_scales,
        } = params;
        if master.len() != self.m.len() || grads.len() != self.m.len() {
            bail!(
                "internal error: optimizer holds {} tensors, model {}",
                self.m.len(),
                master.len()
            );
        }
        self.step += 1;
        let hp = AdamW {
            lr,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            weight_decay: cfg.weight_decay as f32,
            step: self.step,
            grad_scale,
            rounding_seed: self.rounding_seed,
        };
        let mut compute = compute.iter_mut();
        let mut tensors: Vec<AdamWTensor<'_, B::Buf>> = master
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(&self.decay)
            .enumerate()
            .map(|(i, (((param, grad), (m, v)), &decay))| AdamWTensor {
                param,
                grad,
                m,
                v,
                compute_copy: compute.next(),
                decay,
                // Unit scaling's per-tensor rate (1 otherwise).
                lr_scale: lr_scales.get(i).copied().unwrap_or(1.0),
            })
            .collect();
        backend.adamw_update(&mut tensors, &hp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptimConfig;

    fn cfg(decay: Decay) -> OptimConfig {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            decay,
            decay_steps: 0,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn warmup_is_linear_and_reaches_lr() {
        let c = cfg(Decay::Cosine);
        assert!((lr_at(&c, 0, 110) - 1e-4).abs() < 1e-9);
        assert!((lr_at(&c, 4, 110) - 5e-4).abs() < 1e-9);
        assert!((lr_at(&c, 9, 110) - 1e-3).abs() < 1e-9);
    }

    #[test]
    fn cosine_decays_to_floor() {
        let c = cfg(Decay::Cosine);
        assert!((lr_at(&c, 10, 110) - 1e-3).abs() < 1e-9);
        // Halfway through the decay the cosine is at the midpoint.
        assert!((lr_at(&c, 60, 110) - 5.5e-4).abs() < 1e-8);
        assert!((lr_at(&c, 110, 110) - 1e-4).abs() < 1e-9);
        assert!((lr_at(&c, 500, 110) - 1e-4).abs() < 1e-9);
        let mut last = f32::MAX;
        for s in 10..110 {
            let lr = lr_at(&c, s, 110);
            assert!(lr <= last);
            last = lr;
        }
    }

    #[test]
    fn linear_and_constant_decay() {
        let c = cfg(Decay::Linear);
        assert!((lr_at(&c, 60, 110) - 5.5e-4).abs() < 1e-8);
        let c = cfg(Decay::Constant);
        assert!((lr_at(&c, 100, 110) - 1e-3).abs() < 1e-9);
    }

    #[test]
    fn clip_factor_only_shrinks() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-7);
        assert_eq!(clip_factor(100.0, 0.0), 1.0);
    }
}
