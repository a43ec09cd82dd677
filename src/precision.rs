//! Precision recipes: which storage format each tensor role gets, and how each GEMM runs.
//!
//! Layers never hard-code a dtype: they ask the [`Recipe`]. A recipe names the format of the
//! master weights, of the compute copy the forward pass reads, of activations and their
//! gradients, of parameter gradients and of optimizer moments, and for each of a linear layer's
//! three GEMMs (forward, input gradient, weight gradient) the format its operands take. fp16 with
//! loss scaling, FP8 and unit scaling are further recipes of the same shape.

use crate::backend::{GemmOperand, GemmSpec, OperandScale};
use crate::config::{Config, Fp8ScalingKind, PrecisionConfig, RecipeName};
use crate::numerics::DType;

/// The three GEMMs of a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmRole {
    /// `y = x · Wᵀ`.
    Forward,
    /// `dx = dy · W`.
    InputGrad,
    /// `dW += dyᵀ · x`.
    WeightGrad,
}

/// The storage formats of one training run.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    /// The recipe's name as configured.
    pub name: RecipeName,
    /// fp32 master weights, updated by the optimizer.
    pub master: DType,
    /// Format of the weight copy the forward and backward passes read.
    pub compute_weights: DType,
    /// Format of activations and of activation gradients.
    pub activations: DType,
    /// Format of parameter gradients (accumulated over micro-batches).
    pub grads: DType,
    /// Format of AdamW's first and second moments.
    pub optimizer_state: DType,
    /// Whether the loss is scaled dynamically (fp16's narrow exponent range needs it).
    pub loss_scaling: bool,
    /// How FP8 GEMM operands are scaled (used by the `fp8` recipe).
    pub fp8: Fp8Options,
    /// Whether the blocks' GEMMs run in FP8 (e4m3 forward, e5m2 gradients).
    pub fp8_gemms: bool,
    /// Unit scaling (Blake et al. 2023, see `model::unit`): unit-variance weights, fixed op
    /// scales, weighted residuals, a unit-scaled loss gradient, FP8 operands with static scale 1.
    pub unit_scaling: bool,
    /// Unit scaling: the init std of the standard parametrization (`model.init_std`); the
    /// learning rate of each matrix is divided by its standard init std (the paper's rule).
    pub base_init_std: f32,
}

/// Per-tensor scaling of FP8 GEMM operands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8Options {
    /// Delayed (amax history of earlier steps) or current (this tensor's amax).
    pub scaling: Fp8ScalingKind,
    /// Steps of amax history per operand, for delayed scaling (at least 1).
    pub history: usize,
    /// Binades of headroom below the format's max.
    pub margin: i32,
}

impl Default for Fp8Options {
    fn default() -> Self {
        let c = PrecisionConfig::default();
        Self {
            scaling: c.fp8_scaling,
            history: c.fp8_amax_history,
            margin: c.fp8_margin as i32,
        }
    }
}

impl Recipe {
    /// The recipe a config names.
    pub fn new(name: RecipeName) -> Self {
        let low = match name {
            RecipeName::Fp32 => DType::F32,
            RecipeName::Bf16 => DType::BF16,
            RecipeName::Fp16 => DType::F16,
            // FP8 lives inside the GEMMs; tensors between them stay bf16.
            RecipeName::Fp8 => DType::BF16,
            // Unit-scaled tensors sit near 1, well inside fp16's range, so no loss scaling.
            RecipeName::Fp8Unit => DType::F16,
        };
        let unit = name == RecipeName::Fp8Unit;
        Self {
            name,
            master: DType::F32,
            compute_weights: low,
            activations: low,
            grads: DType::F32,
            optimizer_state: DType::F32,
            loss_scaling: name == RecipeName::Fp16,
            fp8: Fp8Options::default(),
            fp8_gemms: matches!(name, RecipeName::Fp8 | RecipeName::Fp8Unit),
            unit_scaling: unit,
            base_init_std: crate::config::ModelConfig::default().init_std as f32,
        }
    }

    /// The recipe a config describes (its `[precision]` section, and `model.init_std` for unit
    /// scaling's learning-rate rule).
    pub fn from_config(cfg: &Config) -> Self {
        let p = &cfg.precision;
        Self {
            fp8: Fp8Options {
                scaling: p.fp8_scaling,
                history: p.fp8_amax_history.max(1),
                margin: p.fp8_margin.min(64) as i32,
            },
            base_init_std: cfg.model.init_std as f32,
            ..Self::new(p.recipe)
        }
    }

    /// True when the blocks' FP8 GEMM operands use delayed scaling, so the model keeps an amax
    /// history per operand.
    pub fn delayed_fp8(&self) -> bool {
        self.name == RecipeName::Fp8 && self.fp8.scaling == Fp8ScalingKind::Delayed
    }

    /// True when the forward pass reads a separate low-precision copy of the weights.
    pub fn has_compute_copy(&self) -> bool {
        self.compute_weights != self.master
    }

    /// How the given GEMM of a transformer block's linear layers runs. With FP8: e4m3 for
    /// weights and activations, e5m2 (more range, less precision) for the incoming gradient,
    /// each current-scaled with the configured margin (with delayed scaling the model replaces
    /// the scales by those of its amax histories, see `model::Fp8State`), or with the static
    /// scale 1 under unit scaling. The model sets unit scaling's `alpha`s.
    pub fn gemm(&self, role: GemmRole) -> GemmSpec {
        if !self.fp8_gemms {
            return GemmSpec::both(self.activations);
        }
        let scale = if self.unit_scaling {
            OperandScale::Fixed(1.0)
        } else {
            OperandScale::Current {
                margin: self.fp8.margin,
            }
        };
        let op = |format| GemmOperand {
            scale,
            ..GemmOperand::plain(format)
        };
        let (e4m3, e5m2) = (op(DType::F8E4M3), op(DType::F8E5M2));
        match role {
            GemmRole::Forward => GemmSpec::new(e4m3, e4m3),
            GemmRole::InputGrad | GemmRole::WeightGrad => GemmSpec::new(e5m2, e4m3),
        }
    }

    /// How the LM head's GEMMs run: in the activations' format even under FP8, whose error on
    /// the logits costs more than the head's share of the FLOPs saves.
    pub fn head_gemm(&self, _role: GemmRole) -> GemmSpec {
        GemmSpec::both(self.activations)
    }

    /// An error when `backend` cannot run this recipe's formats.
    pub fn check_backend<B: crate::backend::Backend>(&self, backend: &B) -> anyhow::Result<()> {
        self.check_formats(
            backend.kind(),
            |dtype| backend.supports(dtype),
            |tensors, operand| backend.casts_for_gemm(tensors, operand),
        )
    }

    /// [`Recipe::check_backend`] on what a backend named `kind` supports: storage formats, and
    /// casts from a storage format to a GEMM operand format.
    fn check_formats(
        &self,
        kind: &str,
        supports: impl Fn(DType) -> bool,
        casts: impl Fn(DType, DType) -> bool,
    ) -> anyhow::Result<()> {
        let gemms =
            [GemmRole::Forward, GemmRole::InputGrad, GemmRole::WeightGrad].map(|r| self.gemm(r));
        let gemm_formats = gemms.iter().flat_map(|g| [g.a.format, g.b.format]);
        for dtype in [self.compute_weights, self.activations, self.grads]
            .into_iter()
            .chain(gemm_formats)
        {
            if !supports(dtype) {
                anyhow::bail!(
                    "precision.recipe = {} needs {dtype} tensors, which the {kind} backend does not support yet; use --device cpu or another recipe",
                    self.name,
                );
            }
        }
        let operands = gemms.iter().flat_map(|g| [g.a.format, g.b.format]);
        for operand in operands.filter(|&f| f != self.activations && f != self.compute_weights) {
            for tensors in [self.activations, self.compute_weights] {
                if !casts(tensors, operand) {
                    anyhow::bail!(
                        "precision.recipe = {} runs {operand} GEMMs on {tensors} tensors, which the {kind} backend cannot cast yet; use --device cpu or another recipe",
                        self.name,
                    );
                }
            }
        }
        Ok(())
    }

    /// The format matmul throughput is quoted in, for MFU.
    pub fn compute_dtype(&self) -> DType {
        self.compute_weights
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA backend's casts (FP8 from bf16 and f16 tensors) run every recipe; a backend
    /// whose FP8 casts read bf16 only refuses `fp8-unit` (f16 tensors) up front, naming both
    /// formats; a backend without f16 storage refuses `fp16`.
    #[test]
    fn recipes_are_refused_for_formats_or_casts_a_backend_lacks() {
        let all = |_: DType| true;
        let names = [
            RecipeName::Fp32,
            RecipeName::Bf16,
            RecipeName::Fp16,
            RecipeName::Fp8,
            RecipeName::Fp8Unit,
        ];
        for name in names {
            Recipe::new(name)
                .check_formats("cuda", all, crate::backend::cuda::can_cast_for_gemm)
                .unwrap();
        }
        let from_bf16 =
            |tensors: DType, operand: DType| !operand.is_float8() || tensors == DType::BF16;
        for name in &names[..4] {
            Recipe::new(*name)
                .check_formats("test", all, from_bf16)
                .unwrap();
        }
        let err = Recipe::new(RecipeName::Fp8Unit)
            .check_formats("test", all, from_bf16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f16 tensors") && err.contains("test backend"),
            "{err}"
        );
        let no_f16 = |d: DType| d != DType::F16;
        let err = Recipe::new(RecipeName::Fp16)
            .check_formats("test", no_f16, from_bf16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs f16 tensors"), "{err}");
    }

    #[test]
    fn bf16_keeps_fp32_master_and_optimizer_state() {
        let r = Recipe::new(RecipeName::Bf16);
        assert_eq!(r.master, DType::F32);
        assert_eq!(r.optimizer_state, DType::F32);
        assert_eq!(r.grads, DType::F32);
        assert_eq!(r.activations, DType::BF16);
        assert!(r.has_compute_copy());
        assert_eq!(r.gemm(GemmRole::WeightGrad), GemmSpec::both(DType::BF16));
    }

    #[test]
    fn fp16_scales_the_loss_and_keeps_fp32_master() {
        let r = Recipe::new(RecipeName::Fp16);
        assert!(r.loss_scaling);
        assert_eq!(
            (r.master, r.activations, r.grads),
            (DType::F32, DType::F16, DType::F32)
        );
        assert!(!Recipe::new(RecipeName::Bf16).loss_scaling);
    }

    #[test]
    fn fp8_runs_block_gemms_in_e4m3_forward_and_e5m2_gradients() {
        let r = Recipe::new(RecipeName::Fp8);
        let formats = |g: GemmSpec| (g.a.format, g.b.format);
        assert_eq!(
            formats(r.gemm(GemmRole::Forward)),
            (DType::F8E4M3, DType::F8E4M3)
        );
        assert_eq!(r.gemm(GemmRole::InputGrad).a.format, DType::F8E5M2);
        assert_eq!(
            formats(r.gemm(GemmRole::WeightGrad)),
            (DType::F8E5M2, DType::F8E4M3)
        );
        assert_eq!(r.head_gemm(GemmRole::Forward), GemmSpec::both(DType::BF16));
        assert_eq!(r.activations, DType::BF16);
        // Delayed scaling is the default, as in Transformer Engine; the margin reaches the scales.
        assert!(r.delayed_fp8());
        let cfg = Config {
            precision: PrecisionConfig {
                recipe: RecipeName::Fp8,
                fp8_scaling: Fp8ScalingKind::Current,
                fp8_margin: 2,
                ..PrecisionConfig::default()
            },
            ..Config::default()
        };
        let r = Recipe::from_config(&cfg);
        assert!(!r.delayed_fp8());
        assert_eq!(
            r.gemm(GemmRole::Forward).a.scale,
            OperandScale::Current { margin: 2 }
        );
        assert!(!Recipe::new(RecipeName::Bf16).delayed_fp8());
    }

    #[test]
    fn fp8_unit_uses_static_scale_one_and_fp16_without_loss_scaling() {
        let r = Recipe::new(RecipeName::Fp8Unit);
        assert!(r.unit_scaling && !r.loss_scaling && !r.delayed_fp8());
        assert_eq!((r.activations, r.compute_weights), (DType::F16, DType::F16));
        for role in [GemmRole::Forward, GemmRole::InputGrad, GemmRole::WeightGrad] {
            let g = r.gemm(role);
            assert_eq!(g.a.scale, OperandScale::Fixed(1.0));
            assert_eq!(g.b.scale, OperandScale::Fixed(1.0));
            assert_eq!(g.a.amax_slot, None, "no amax tracking");
        }
        assert_eq!(r.gemm(GemmRole::InputGrad).a.format, DType::F8E5M2);
        assert_eq!(r.head_gemm(GemmRole::Forward), GemmSpec::both(DType::F16));
    }

    #[test]
    fn fp32_has_no_compute_copy() {
        let r = Recipe::new(RecipeName::Fp32);
        assert!(!r.has_compute_copy());
        assert_eq!(r.gemm(GemmRole::Forward), GemmSpec::both(DType::F32));
    }
}
