//! GPT-2: token + learned position embeddings, pre-LayerNorm blocks of causal multi-head
//! attention and a GELU MLP, a final LayerNorm and an LM head tied to the token embedding.
//!
//! Parameters live in three parallel lists indexed by [`ParamSpec`] position: fp32 master
//! weights, the compute copy the passes read (only when the recipe stores weights in a narrower
//! format), and fp32 gradients. Activations for one batch shape live in [`Activations`], so
//! training, evaluation and sampling can each keep a set of their own.
//!
//! Dropout applies to the embeddings' sum and to the output of every residual branch (attention
//! and MLP), with masks derived from a per-pass seed so the backward regenerates them; attention
//! probabilities are not dropped (the fused attention never materialises them).

use anyhow::{anyhow, bail, Result};

use super::fp8::{self, Fp8State};
use super::step_graph::{GraphKey, Plan, StepGraphs};
use super::unit::UnitScales;
use crate::backend::{Backend, GeluOut, GemmSpec, KeepToken};
use crate::data::Rng;
use crate::numerics::DType;
use crate::precision::{GemmRole, Recipe};

/// Sizes of a GPT-2 model.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GptConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Model width.
    pub n_embd: usize,
    /// Longest context the position embedding covers.
    pub block_size: usize,
    /// Real vocabulary size (the tokenizer's).
    pub vocab_size: usize,
    /// Vocabulary rounded up for aligned matmuls; the extra rows are never predicted.
    pub padded_vocab_size: usize,
}

impl GptConfig {
    /// Number of parameters (the tied head counted once, padded vocabulary rows included).
    pub fn num_params(&self) -> usize {
        Gpt::<crate::backend::cpu::CpuBackend<f32>>::param_specs(self)
            .iter()
            .map(|s| s.numel())
            .sum()
    }

    /// Model FLOPs per trained token: `6·(N − T·d) + 12·L·T·d` (matmuls forward and backward,
    /// position embedding excluded, plus attention's two T×T products). Same formula as the peer
    /// benchmark, so tokens/s and MFU compare directly.
    pub fn flops_per_token(&self, t: usize) -> f64 {
        let n = self.num_params() as f64;
        let (l, d, t) = (self.n_layer as f64, self.n_embd as f64, t as f64);
        6.0 * (n - self.block_size as f64 * d) + 12.0 * l * t * d
    }

    fn check(&self) -> Result<()> {
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            bail!(
                "model.n_embd = {} must be a multiple of model.n_head = {}",
                self.n_embd,
                self.n_head
            );
        }
        if self.padded_vocab_size < self.vocab_size || self.vocab_size == 0 {
            bail!(
                "internal error: padded vocab {} < vocab {}",
                self.padded_vocab_size,
                self.vocab_size
            );
        }
        Ok(())
    }
}

/// Name, shape and optimizer treatment of one parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Internal name (Hugging Face GPT-2 naming without the `transformer.` prefix).
    pub name: String,
    /// Row-major shape; linear weights are `[out, in]`.
    pub shape: Vec<usize>,
    /// Whether AdamW's weight decay applies (matrices yes; biases and norms no).
    pub decay: bool,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

// Offsets of a block's tensors inside its run of `PER_LAYER` params.
const LN1_W: usize = 0;
const LN1_B: usize = 1;
const QKV_W: usize = 2;
const QKV_B: usize = 3;
const PROJ_W: usize = 4;
const PROJ_B: usize = 5;
const LN2_W: usize = 6;
const LN2_B: usize = 7;
const FC_W: usize = 8;
const FC_B: usize = 9;
const FCPROJ_W: usize = 10;
const FCPROJ_B: usize = 11;
const PER_LAYER: usize = 12;
const WTE: usize = 0;
const WPE: usize = 1;

fn layer_param(l: usize, k: usize) -> usize {
    2 + l * PER_LAYER + k
}

/// Activations of one layer saved for the backward pass.
struct LayerActs<B: Backend> {
    ln1: B::Buf,
    ln1_mean: B::Buf,
    ln1_rstd: B::Buf,
    qkv: B::Buf,
    atty: B::Buf,
    lse: B::Buf,
    resid2: B::Buf,
    ln2: B::Buf,
    ln2_mean: B::Buf,
    ln2_rstd: B::Buf,
    fch: B::Buf,
    /// Saved GELU output; `None` when it is recomputed in the backward (or never needed).
    fch_gelu: Option<B::Buf>,
    /// Whether the last forward wrote `fch_gelu` ([`Backend::mlp_forward`] may leave it to the
    /// backward, see [`GeluOut`]).
    gelu_stored: bool,
    resid_out: B::Buf,
}

/// Gradient scratch shared by all layers (only for training).
struct GradScratch<B: Backend> {
    dresid: B::Buf,
    dbranch: B::Buf,
    dln: B::Buf,
    datty: B::Buf,
    dqkv: B::Buf,
    dfch: B::Buf,
}

/// Every buffer one forward (and backward) pass over a `b × t` batch needs, allocated once.
pub struct Activations<B: Backend> {
    b: usize,
    t: usize,
    tokens: B::Tokens,
    targets: B::Tokens,
    encoded: B::Buf,
    branch: B::Buf,
    layers: Vec<LayerActs<B>>,
    lnf: B::Buf,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    /// Logits of `head_rows` rows: all `b·t` rows, or a chunk's worth where the LM head and the
    /// classifier run a chunk at a time ([`Backend::linear_crossentropy_forward_backward`]).
    logits: B::Buf,
    head_rows: usize,
    losses: B::Buf,
    /// One GELU output buffer shared by all layers, when they do not keep their own.
    gelu_shared: Option<B::Buf>,
    grads: Option<GradScratch<B>>,
    /// Whether the pass in these buffers applied dropout (so its backward applies it too).
    dropout: bool,
    /// The micro-batch's dropout seed, where the backend's ops read it.
    seed: B::Seed,
    /// This step's amax per FP8 operand (delayed scaling, training only), max-accumulated by the
    /// linear ops over the step's micro-batches.
    amax: Option<B::Buf>,
    /// Version of this training pass's activations for [`KeepToken`]s (`None` outside one).
    pass_version: Option<u64>,
    /// Renewed whenever `amax` is cleared ([`KeepToken::amax_epoch`]).
    amax_epoch: u64,
    /// Training micro-batches recorded as device work ([`Gpt::train_micro_batch`]).
    graphs: StepGraphs<B::Graph>,
}

impl<B: Backend> Activations<B> {
    /// Batch size these buffers are for.
    pub fn batch(&self) -> usize {
        self.b
    }
    /// Sequence length these buffers are for.
    pub fn seq_len(&self) -> usize {
        self.t
    }
}

/// A tensor handed to the numerics monitor by [`Gpt::probe_tensors`].
pub struct ProbedTensor<'a, B: Backend> {
    /// Parameter name, or `h.{layer}.{activation}`.
    pub name: String,
    /// `weight`, `grad` or `activation`.
    pub role: &'static str,
    /// Transformer block, if inside one.
    pub layer: Option<usize>,
    /// The buffer.
    pub buf: &'a B::Buf,
}

/// The parameter buffers the optimizer updates, borrowed together from a [`Gpt`].
pub struct ParamBufs<'a, B: Backend> {
    /// fp32 master weights, in spec order.
    pub master: &'a mut [B::Buf],
    /// Gradients, in spec order.
    pub grads: &'a [B::Buf],
    /// Low-precision compute copies (empty when the recipe has none).
    pub compute: &'a mut [B::Buf],
    /// Per-parameter learning-rate multipliers (see [`Gpt::lr_scales`]).
    pub lr_scales: &'a [f32],
}

/// A GPT-2 model on backend `B`.
pub struct Gpt<B: Backend> {
    cfg: GptConfig,
    recipe: Recipe,
    dropout: f32,
    specs: Vec<ParamSpec>,
    master: Vec<B::Buf>,
    compute: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    recompute_gelu: bool,
    /// Largest logits scratch of a training pass in bytes, on backends that can work through
    /// the LM head in chunks of rows; 0 keeps all logits.
    logits_chunk_bytes: usize,
    /// Amax histories of the blocks' FP8 operands (delayed scaling only).
    fp8: Option<Fp8State>,
    /// Version of the weights for [`KeepToken`]s, renewed wherever they may change.
    weights_version: u64,
    /// Learning-rate multiplier per parameter (unit scaling; else all 1).
    lr_scales: Vec<f32>,
}

/// Linear layers of a block, in FP8 slot order.
const QKV: usize = 0;
const PROJ: usize = 1;
const FC: usize = 2;
const FCPROJ: usize = 3;

/// The versions behind a pass's [`KeepToken`]s: the activations' (a training pass only) and
/// the amax buffer's.
#[derive(Clone, Copy, Default)]
struct KeepVersions {
    acts: Option<u64>,
    amax: u64,
}

/// The three GEMMs of one linear layer.
#[derive(Clone, Copy)]
struct LinearGemms {
    fwd: GemmSpec,
    dx: GemmSpec,
    dw: GemmSpec,
}

impl<B: Backend> Gpt<B> {
    /// Parameter names, shapes and decay flags in storage order.
    pub fn param_specs(cfg: &GptConfig) -> Vec<ParamSpec> {
        let (c, vp, t) = (cfg.n_embd, cfg.padded_vocab_size, cfg.block_size);
        let spec = |name: String, shape: Vec<usize>| {
            let decay = shape.len() == 2;
            ParamSpec { name, shape, decay }
        };
        let mut specs = vec![
            spec("wte".into(), vec![vp, c]),
            spec("wpe".into(), vec![t, c]),
        ];
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("h.{l}.{s}");
            specs.extend([
                spec(p("ln_1.weight"), vec![c]),
                spec(p("ln_1.bias"), vec![c]),
                spec(p("attn.c_attn.weight"), vec![3 * c, c]),
                spec(p("attn.c_attn.bias"), vec![3 * c]),
                spec(p("attn.c_proj.weight"), vec![c, c]),
                spec(p("attn.c_proj.bias"), vec![c]),
                spec(p("ln_2.weight"), vec![c]),
                spec(p("ln_2.bias"), vec![c]),
                spec(p("mlp.c_fc.weight"), vec![4 * c, c]),
                spec(p("mlp.c_fc.bias"), vec![4 * c]),
                spec(p("mlp.c_proj.weight"), vec![c, 4 * c]),
                spec(p("mlp.c_proj.bias"), vec![c]),
            ]);
        }
        specs.push(spec("ln_f.weight".into(), vec![c]));
        specs.push(spec("ln_f.bias".into(), vec![c]));
        specs
    }

    /// A model with GPT-2's initialisation: N(0, 0.02) weights, residual projections scaled by
    /// 1/√(2L), zero biases, unit LayerNorm gains, zero padded vocabulary rows; under unit
    /// scaling every weight matrix is N(0, 1) instead.
    pub fn new(
        backend: &B,
        cfg: GptConfig,
        recipe: Recipe,
        dropout: f32,
        init_std: f32,
        seed: u64,
    ) -> Result<Self> {
        cfg.check()?;
        let specs = Self::param_specs(&cfg);
        let mut rng = Rng::new(seed);
        let resid_std = init_std / (2.0 * cfg.n_layer as f32).sqrt();
        let values: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| {
                let n = s.numel();
                if s.name.ends_with("ln_1.weight")
                    || s.name.ends_with("ln_2.weight")
                    || s.name == "ln_f.weight"
                {
                    vec![1.0; n]
                } else if s.shape.len() == 1 {
                    vec![0.0; n]
                } else {
                    // Unit scaling starts every weight at unit variance.
                    let std = if recipe.unit_scaling {
                        1.0
                    } else if s.name.ends_with("c_proj.weight") {
                        resid_std
                    } else {
                        init_std
                    };
                    let mut v: Vec<f32> = (0..n).map(|_| rng.normal_f32() * std).collect();
                    if s.name == "wte" {
                        v[cfg.vocab_size * cfg.n_embd..].fill(0.0);
                    }
                    v
                }
            })
            .collect();
        Self::from_values(backend, cfg, recipe, dropout, &values)
    }

    /// A model whose parameters are `values` (one vector per [`ParamSpec`], in order).
    pub fn from_values(
        backend: &B,
        cfg: GptConfig,
        recipe: Recipe,
        dropout: f32,
        values: &[Vec<f32>],
    ) -> Result<Self> {
        cfg.check()?;
        backend.check_attention_shape(cfg.n_embd, cfg.n_head)?;
        let specs = Self::param_specs(&cfg);
        if values.len() != specs.len() {
            bail!(
                "internal error: {} parameter tensors given, the model has {}",
                values.len(),
                specs.len()
            );
        }
        let mut master = Vec::with_capacity(specs.len());
        let mut compute = Vec::new();
        let mut grads = Vec::with_capacity(specs.len());
        for (spec, vals) in specs.iter().zip(values) {
            if vals.len() != spec.numel() {
                bail!(
                    "parameter {} has {} values, expected {} for shape {:?}",
                    spec.name,
                    vals.len(),
                    spec.numel(),
                    spec.shape
                );
            }
            let mut buf = backend.alloc(recipe.master, spec.numel())?;
            backend.upload(&mut buf, vals)?;
            if recipe.has_compute_copy() {
                let mut copy = backend.alloc(recipe.compute_weights, spec.numel())?;
                backend.copy(&mut copy, &buf)?;
                compute.push(copy);
            }
            master.push(buf);
            grads.push(backend.alloc(recipe.grads, spec.numel())?);
        }
        Ok(Self {
            dropout,
            specs,
            master,
            compute,
            grads,
            recompute_gelu: false,
            logits_chunk_bytes: 0,
            fp8: recipe
                .delayed_fp8()
                .then(|| Fp8State::new(cfg.n_layer, recipe.fp8.history, recipe.fp8.margin)),
            weights_version: fp8::fresh_epoch(),
            lr_scales: Vec::new(),
            cfg,
            recipe,
        }
        .with_lr_scales())
    }

    fn with_lr_scales(mut self) -> Self {
        self.lr_scales = self.lr_scales();
        self
    }

    /// How each GEMM of each block's linear layers runs, indexed `layer · 4 + linear`: the
    /// recipe's formats, with the amax histories' scales under delayed FP8 scaling. FP8 operands
    /// carry [`KeepToken`]s so a backend may cast each weight once per step and each input
    /// activation once per pass: the weights' in every GEMM that reads them, the activations'
    /// in a training pass (where the backward reads what the forward did), except a GELU output
    /// the backward recomputes (not always to the same bits as the forward's fused epilogue).
    fn block_gemms(&self, us: &UnitScales, keep: KeepVersions) -> Vec<LinearGemms> {
        let mut out = Vec::with_capacity(self.cfg.n_layer * fp8::LINEARS);
        for l in 0..self.cfg.n_layer {
            for k in 0..fp8::LINEARS {
                // Unit scaling: the input-gradient alpha equals the forward's (non-cut edge).
                let mut g = LinearGemms {
                    fwd: self.recipe.gemm(GemmRole::Forward).with_alpha(us.linear[k]),
                    dx: self
                        .recipe
                        .gemm(GemmRole::InputGrad)
                        .with_alpha(us.linear[k]),
                    dw: self
                        .recipe
                        .gemm(GemmRole::WeightGrad)
                        .with_alpha(us.weight_grad),
                };
                if let Some(f) = &self.fp8 {
                    let op = |o| f.operand(fp8::slot(l, k, o));
                    (g.fwd.a, g.fwd.b) = (op(fp8::X), op(fp8::W));
                    (g.dx.a, g.dx.b) = (op(fp8::DY), op(fp8::W));
                    (g.dw.a, g.dw.b) = (op(fp8::DY), op(fp8::X));
                }
                if self.recipe.fp8_gemms {
                    let token = |operand, version| KeepToken {
                        id: fp8::slot(l, k, operand) as u32,
                        version,
                        amax_epoch: keep.amax,
                    };
                    let w = Some(token(fp8::W, self.weights_version));
                    (g.fwd.b.keep, g.dx.b.keep) = (w, w);
                    let same_x = k != FCPROJ || !self.recompute_gelu;
                    if let Some(v) = keep.acts.filter(|_| same_x) {
                        let x = Some(token(fp8::X, v));
                        (g.fwd.a.keep, g.dw.b.keep) = (x, x);
                    }
                }
                out.push(g);
            }
        }
        out
    }

    /// The fixed op scales for batches of `b` sequences of `t` tokens: unit scaling's, or all
    /// ones.
    pub fn unit_scales(&self, b: usize, t: usize) -> UnitScales {
        let c = &self.cfg;
        if self.recipe.unit_scaling {
            UnitScales::unit(c.n_embd, c.n_layer, c.block_size, c.vocab_size, b, b * t)
        } else {
            UnitScales::identity(c.n_layer, b * t)
        }
    }

    /// Per-parameter learning-rate multipliers: 1, or under unit scaling `√(C/fan_in)/σ` for each
    /// matrix, σ the standard init std (see `model::unit`).
    pub fn lr_scales(&self) -> Vec<f32> {
        let base = self.recipe.base_init_std;
        let width = self.cfg.n_embd as f32;
        self.specs
            .iter()
            .map(|s| match (self.recipe.unit_scaling, s.shape.as_slice()) {
                // Matrices are [fan_out, fan_in]; the embeddings' fan-in is the width.
                (true, &[_, fan_in]) => (width / fan_in as f32).sqrt() / base,
                _ => 1.0,
            })
            .collect()
    }

    /// The FP8 amax histories (delayed scaling), if the recipe keeps them.
    pub fn fp8_state(&self) -> Option<&Fp8State> {
        self.fp8.as_ref()
    }

    /// Mutable FP8 amax histories, to restore them from a checkpoint.
    pub fn fp8_state_mut(&mut self) -> Option<&mut Fp8State> {
        self.weights_version = fp8::fresh_epoch();
        self.fp8.as_mut()
    }

    /// End of an optimizer step under delayed FP8 scaling: pushes the step's amaxes (recorded
    /// in `acts` by every micro-batch) into the histories and clears them for the next step, so
    /// the next step's scales include this one. A no-op for other recipes.
    pub fn finish_step(&mut self, backend: &B, acts: &mut Activations<B>) -> Result<()> {
        // The weights were updated and the amaxes are cleared: cast copies are stale.
        self.weights_version = fp8::fresh_epoch();
        acts.amax_epoch = fp8::fresh_epoch();
        acts.pass_version = None;
        let (Some(state), Some(amax)) = (self.fp8.as_mut(), acts.amax.as_mut()) else {
            return Ok(());
        };
        state.record(&backend.download(amax)?)?;
        backend.fill(amax, 0.0)
    }

    /// Recompute the MLP's GELU output in the backward instead of saving it per layer: saves
    /// `4·b·t·C` activations per layer for one extra GELU per layer.
    pub fn with_recompute_gelu(mut self, on: bool) -> Self {
        self.recompute_gelu = on;
        self
    }

    /// Let a training pass's logits scratch hold at most `bytes` (0: all logits) on backends
    /// that can work through the LM head and classifier a chunk of rows at a time: the full
    /// logits (`b·t·vp` values) are the largest activation of a small GPT.
    pub fn with_logits_chunk_bytes(mut self, bytes: usize) -> Self {
        self.logits_chunk_bytes = bytes;
        self
    }

    /// The model's sizes.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }
    /// The precision recipe.
    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }
    /// Parameter specs in storage order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    /// fp32 master weights, in spec order.
    pub fn master(&self) -> &[B::Buf] {
        &self.master
    }
    /// Gradients, in spec order.
    pub fn grads(&self) -> &[B::Buf] {
        &self.grads
    }
    /// Master weights, gradients and compute copies together, for the optimizer.
    pub fn params_mut(&mut self) -> ParamBufs<'_, B> {
        self.weights_version = fp8::fresh_epoch();
        ParamBufs {
            master: &mut self.master,
            grads: &self.grads,
            compute: &mut self.compute,
            lr_scales: &self.lr_scales,
        }
    }

    /// Downloads every parameter as f32, in spec order.
    pub fn download_params(&self, backend: &B) -> Result<Vec<Vec<f32>>> {
        self.master.iter().map(|b| backend.download(b)).collect()
    }

    /// Sets all gradients to zero (start of an optimizer step).
    pub fn zero_grads(&mut self, backend: &B) -> Result<()> {
        backend.zero(&mut self.grads)
    }

    /// Buffers for batches of `b` sequences of `t` tokens; `training` adds gradient scratch.
    pub fn activations(
        &self,
        backend: &B,
        b: usize,
        t: usize,
        training: bool,
    ) -> Result<Activations<B>> {
        if t > self.cfg.block_size || t == 0 {
            bail!(
                "sequence length {t} is outside the model's context of 1..={} (model.block_size)",
                self.cfg.block_size
            );
        }
        let (c, nh, vp) = (self.cfg.n_embd, self.cfg.n_head, self.cfg.padded_vocab_size);
        let bt = b * t;
        let act = self.recipe.activations;
        // The GELU output is saved per layer only when a backward will read it and the forward
        // writes it (a backend may apply GELU where the down-projection reads it instead).
        let gemms = self.block_gemms(&self.unit_scales(b, t), KeepVersions::default());
        let keep_gelu: Vec<bool> = (0..self.cfg.n_layer)
            .map(|l| {
                let (fc, fcproj) = (&gemms[l * 4 + FC], &gemms[l * 4 + FCPROJ]);
                training
                    && !self.recompute_gelu
                    && backend.mlp_forward_writes_gelu(act, [fc.fwd, fcproj.fwd])
            })
            .collect();
        // Training passes may compute the logits a chunk of rows at a time (never the logits of
        // inference, which sampling reads); chunks are multiples of 128 rows, which keeps every
        // chunk's first row 256-byte aligned for the GEMMs.
        let head_rows =
            if training && self.logits_chunk_bytes > 0 && backend.chunks_linear_crossentropy() {
                let chunks = (bt * vp * act.size_bytes()).div_ceil(self.logits_chunk_bytes);
                bt.div_ceil(chunks).next_multiple_of(128).min(bt)
            } else {
                bt
            };
        let f32 = DType::F32;
        let layers = (0..self.cfg.n_layer)
            .map(|l| {
                Ok(LayerActs {
                    ln1: backend.alloc(act, bt * c)?,
                    ln1_mean: backend.alloc(f32, bt)?,
                    ln1_rstd: backend.alloc(f32, bt)?,
                    qkv: backend.alloc(act, bt * 3 * c)?,
                    atty: backend.alloc(act, bt * c)?,
                    lse: backend.alloc(f32, b * nh * t)?,
                    resid2: backend.alloc(act, bt * c)?,
                    ln2: backend.alloc(act, bt * c)?,
                    ln2_mean: backend.alloc(f32, bt)?,
                    ln2_rstd: backend.alloc(f32, bt)?,
                    fch: backend.alloc(act, bt * 4 * c)?,
                    fch_gelu: if keep_gelu[l] {
                        Some(backend.alloc(act, bt * 4 * c)?)
                    } else {
                        None
                    },
                    gelu_stored: false,
                    resid_out: backend.alloc(act, bt * c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let grads = if training {
            Some(GradScratch {
                dresid: backend.alloc(act, bt * c)?,
                dbranch: backend.alloc(act, bt * c)?,
                dln: backend.alloc(act, bt * c)?,
                datty: backend.alloc(act, bt * c)?,
                dqkv: backend.alloc(act, bt * 3 * c)?,
                dfch: backend.alloc(act, bt * 4 * c)?,
            })
        } else {
            None
        };
        Ok(Activations {
            b,
            t,
            tokens: backend.alloc_tokens(bt)?,
            targets: backend.alloc_tokens(bt)?,
            encoded: backend.alloc(act, bt * c)?,
            branch: backend.alloc(act, bt * c)?,
            layers,
            lnf: backend.alloc(act, bt * c)?,
            lnf_mean: backend.alloc(f32, bt)?,
            lnf_rstd: backend.alloc(f32, bt)?,
            logits: backend.alloc(act, head_rows * vp)?,
            head_rows,
            losses: backend.alloc(f32, bt)?,
            gelu_shared: if keep_gelu.iter().all(|&k| k) {
                None
            } else {
                Some(backend.alloc(act, bt * 4 * c)?)
            },
            grads,
            dropout: false,
            seed: backend.alloc_seed()?,
            amax: match &self.fp8 {
                Some(f) if training => Some(backend.alloc(DType::F32, f.slots())?),
                _ => None,
            },
            pass_version: None,
            amax_epoch: fp8::fresh_epoch(),
            graphs: StepGraphs::default(),
        })
    }

    fn check_tokens(&self, tokens: &[u32], what: &str) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!(
                "{what} contain token id {bad}, outside the model's vocabulary of {} (the data and the model were made with different tokenizers?)",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }

    /// Forward pass to logits over `inputs` (`b·t` ids). With `dropout_seed` the configured
    /// dropout is applied (training); without it the pass is deterministic (eval, sampling).
    /// Activations that keep a chunk of logits only (training ones, see
    /// [`Gpt::with_logits_chunk_bytes`]) get no logits here: [`Gpt::token_losses`] computes
    /// them a chunk at a time.
    pub fn forward(
        &self,
        backend: &B,
        acts: &mut Activations<B>,
        inputs: &[u32],
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        self.load_inputs(backend, acts, inputs)?;
        if let Some(seed) = dropout_seed {
            backend.upload_seed(&mut acts.seed, seed)?;
        }
        self.forward_blocks(backend, acts, dropout_seed.is_some())?;
        let bt = acts.b * acts.t;
        if acts.head_rows < bt {
            return Ok(());
        }
        let us = self.unit_scales(acts.b, acts.t);
        let head = self.recipe.head_gemm(GemmRole::Forward).with_alpha(us.head);
        let wte = self.compute.get(WTE).unwrap_or(&self.master[WTE]);
        let (c, vp) = (self.cfg.n_embd, self.cfg.padded_vocab_size);
        backend.linear_forward(
            &mut acts.logits,
            &acts.lnf,
            wte,
            None,
            bt,
            c,
            vp,
            head,
            None,
        )
    }

    /// The forward pass up to the final LayerNorm (`acts.lnf`) over the loaded inputs. A
    /// `training` pass applies the configured dropout (with the seed loaded in `acts`) and
    /// records the FP8 operands' amaxes; evaluation does neither.
    fn forward_blocks(&self, backend: &B, acts: &mut Activations<B>, training: bool) -> Result<()> {
        let (b, t) = (acts.b, acts.t);
        let (c, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let bt = b * t;
        let p = self.dropout;
        let drop = training && p > 0.0;
        acts.dropout = drop;
        let w = |i: usize| {
            if self.compute.is_empty() {
                &self.master[i]
            } else {
                &self.compute[i]
            }
        };
        let us = self.unit_scales(b, t);
        acts.pass_version = training.then(fp8::fresh_epoch);
        let keep = KeepVersions {
            acts: acts.pass_version,
            amax: acts.amax_epoch,
        };
        let gemms = self.block_gemms(&us, keep);
        let mut amax = acts.amax.as_mut().filter(|_| training);

        backend.embedding_forward(
            &mut acts.encoded,
            &acts.tokens,
            w(WTE),
            w(WPE),
            b,
            t,
            c,
            us.embed,
        )?;
        if drop {
            backend.dropout_forward(&mut acts.encoded, p, &acts.seed, dropout_site(0, 0))?;
        }
        let nl = self.cfg.n_layer;
        // Each residual add is fused with the LayerNorm that follows it: ln2 inside the block,
        // and the next block's ln1 (or the final LayerNorm) at its end. Only the first ln1 and,
        // without blocks, the final LayerNorm stand alone.
        let (lnf_w, lnf_b) = (w(layer_param(nl, 0)), w(layer_param(nl, 1)));
        match acts.layers.first_mut() {
            Some(first) => backend.layernorm_forward(
                &mut first.ln1,
                &mut first.ln1_mean,
                &mut first.ln1_rstd,
                &acts.encoded,
                w(layer_param(0, LN1_W)),
                w(layer_param(0, LN1_B)),
                bt,
                c,
            )?,
            None => backend.layernorm_forward(
                &mut acts.lnf,
                &mut acts.lnf_mean,
                &mut acts.lnf_rstd,
                &acts.encoded,
                lnf_w,
                lnf_b,
                bt,
                c,
            )?,
        }
        for l in 0..nl {
            let (done, rest) = acts.layers.split_at_mut(l);
            let input = if l == 0 {
                &acts.encoded
            } else {
                &done[l - 1].resid_out
            };
            let (current, later) = rest.split_at_mut(1);
            let la = &mut current[0];
            let lp = |k| w(layer_param(l, k));
            backend.linear_forward(
                &mut la.qkv,
                &la.ln1,
                lp(QKV_W),
                Some(lp(QKV_B)),
                bt,
                c,
                3 * c,
                gemms[l * 4 + QKV].fwd,
                amax.as_deref_mut(),
            )?;
            backend.attention_forward(
                &mut la.atty,
                &mut la.lse,
                &la.qkv,
                b,
                t,
                c,
                nh,
                us.attention,
            )?;
            backend.linear_forward(
                &mut acts.branch,
                &la.atty,
                lp(PROJ_W),
                Some(lp(PROJ_B)),
                bt,
                c,
                c,
                gemms[l * 4 + PROJ].fwd,
                amax.as_deref_mut(),
            )?;
            if drop {
                backend.dropout_forward(&mut acts.branch, p, &acts.seed, dropout_site(l + 1, 0))?;
            }
            backend.residual_layernorm_forward(
                &mut la.resid2,
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                input,
                &acts.branch,
                us.residual[2 * l],
                lp(LN2_W),
                lp(LN2_B),
                bt,
                c,
            )?;
            let own_buffer = la.fch_gelu.is_some();
            let gelu_out = match la.fch_gelu.as_mut() {
                Some(saved) => saved,
                None => acts
                    .gelu_shared
                    .as_mut()
                    .ok_or_else(|| anyhow!("internal error: no GELU buffer"))?,
            };
            // Both MLP linears in one op: a backend may apply GELU where the down-projection's
            // GEMM reads it and leave `gelu_out` unwritten (the backward then gets it deferred,
            // as it does a shared buffer, which later layers overwrite).
            let written = backend.mlp_forward(
                &mut acts.branch,
                &mut la.fch,
                gelu_out,
                &la.ln2,
                (lp(FC_W), Some(lp(FC_B))),
                (lp(FCPROJ_W), Some(lp(FCPROJ_B))),
                (bt, c, 4 * c),
                [gemms[l * 4 + FC].fwd, gemms[l * 4 + FCPROJ].fwd],
                amax.as_deref_mut(),
                us.gelu,
            )?;
            la.gelu_stored = own_buffer && written;
            if drop {
                backend.dropout_forward(&mut acts.branch, p, &acts.seed, dropout_site(l + 1, 1))?;
            }
            let (ln, mean, rstd, ln_w, ln_b) = match later.first_mut() {
                Some(next) => (
                    &mut next.ln1,
                    &mut next.ln1_mean,
                    &mut next.ln1_rstd,
                    w(layer_param(l + 1, LN1_W)),
                    w(layer_param(l + 1, LN1_B)),
                ),
                None => (
                    &mut acts.lnf,
                    &mut acts.lnf_mean,
                    &mut acts.lnf_rstd,
                    lnf_w,
                    lnf_b,
                ),
            };
            backend.residual_layernorm_forward(
                &mut la.resid_out,
                ln,
                mean,
                rstd,
                &la.resid2,
                &acts.branch,
                us.residual[2 * l + 1],
                ln_w,
                ln_b,
                bt,
                c,
            )?;
        }
        Ok(())
    }

    /// Mean cross-entropy of the last forward pass against `targets` (logits kept, when the
    /// activations hold them all).
    pub fn loss(&self, backend: &B, acts: &mut Activations<B>, targets: &[u32]) -> Result<f32> {
        Ok(mean(&self.token_losses(backend, acts, targets)?))
    }

    /// Per-token cross-entropy of the last forward pass against `targets` (logits kept, when
    /// the activations hold them all).
    pub fn token_losses(
        &self,
        backend: &B,
        acts: &mut Activations<B>,
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        let bt = acts.b * acts.t;
        let (c, v, vp) = (
            self.cfg.n_embd,
            self.cfg.vocab_size,
            self.cfg.padded_vocab_size,
        );
        self.check_tokens(targets, "targets")?;
        backend.upload_tokens(&mut acts.targets, targets)?;
        if acts.head_rows == bt {
            backend.crossentropy_forward(
                &mut acts.losses,
                &acts.logits,
                &acts.targets,
                bt,
                v,
                vp,
            )?;
        } else {
            let us = self.unit_scales(acts.b, acts.t);
            let head = self.recipe.head_gemm(GemmRole::Forward).with_alpha(us.head);
            let wte = self.compute.get(WTE).unwrap_or(&self.master[WTE]);
            backend.linear_crossentropy_forward(
                &mut acts.losses,
                &mut acts.logits,
                &acts.lnf,
                wte,
                &acts.targets,
                bt,
                c,
                v,
                vp,
                head,
            )?;
        }
        backend.download(&acts.losses)
    }

    /// Every tensor the numerics monitor looks at after a forward and backward pass: each
    /// parameter's compute copy (`weight`) and gradient (`grad`), and each layer's saved
    /// activations (`activation`), with its name and layer (`None` outside the blocks).
    pub fn probe_tensors<'a>(&'a self, acts: &'a Activations<B>) -> Vec<ProbedTensor<'a, B>> {
        let mut out = Vec::new();
        let layer_of = |name: &str| {
            name.strip_prefix("h.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse().ok())
        };
        for (i, spec) in self.specs.iter().enumerate() {
            let weights = if self.compute.is_empty() {
                &self.master[i]
            } else {
                &self.compute[i]
            };
            let layer = layer_of(&spec.name);
            out.push(ProbedTensor {
                name: spec.name.clone(),
                role: "weight",
                layer,
                buf: weights,
            });
            out.push(ProbedTensor {
                name: spec.name.clone(),
                role: "grad",
                layer,
                buf: &self.grads[i],
            });
        }
        out.push(ProbedTensor {
            name: "embeddings".into(),
            role: "activation",
            layer: None,
            buf: &acts.encoded,
        });
        for (l, la) in acts.layers.iter().enumerate() {
            let named: [(&str, &B::Buf); 7] = [
                ("ln_1", &la.ln1),
                ("attn.qkv", &la.qkv),
                ("attn.out", &la.atty),
                ("resid_mid", &la.resid2),
                ("ln_2", &la.ln2),
                ("mlp.fc", &la.fch),
                ("resid_out", &la.resid_out),
            ];
            for (name, buf) in named {
                out.push(ProbedTensor {
                    name: format!("h.{l}.{name}"),
                    role: "activation",
                    layer: Some(l),
                    buf,
                });
            }
        }
        out.push(ProbedTensor {
            name: "ln_f".into(),
            role: "activation",
            layer: None,
            buf: &acts.lnf,
        });
        out
    }

    /// Logits of row `row` (a position in the flattened batch) of the last forward pass.
    pub fn logits_row(&self, backend: &B, acts: &Activations<B>, row: usize) -> Result<Vec<f32>> {
        let vp = self.cfg.padded_vocab_size;
        if acts.head_rows < acts.b * acts.t {
            bail!("internal error: logits of a training pass are not kept (sample with inference activations)");
        }
        backend.download_range(&acts.logits, row * vp, self.cfg.vocab_size)
    }

    /// Checks the `b·t` input ids and uploads them for the next forward pass.
    fn load_inputs(&self, backend: &B, acts: &mut Activations<B>, inputs: &[u32]) -> Result<()> {
        let (b, t) = (acts.b, acts.t);
        if inputs.len() != b * t {
            bail!(
                "internal error: {} input tokens for a {b}x{t} batch",
                inputs.len()
            );
        }
        self.check_tokens(inputs, "inputs")?;
        backend.upload_tokens(&mut acts.tokens, inputs)
    }

    /// Forward, loss and backward for one micro-batch; adds `loss_weight · ∂mean_loss/∂θ` into
    /// the parameter gradients and returns the micro-batch's mean loss. `loss_weight` is
    /// `1/grad_accum` so that micro-batches average exactly like one large batch.
    pub fn forward_backward(
        &mut self,
        backend: &B,
        acts: &mut Activations<B>,
        inputs: &[u32],
        targets: &[u32],
        loss_weight: f32,
        dropout_seed: u64,
    ) -> Result<f32> {
        self.load_batch(backend, acts, inputs, targets, dropout_seed)?;
        self.queue_forward_backward(backend, acts, loss_weight)?;
        Self::batch_loss(backend, acts)
    }

    /// One training micro-batch as [`Gpt::forward_backward`], the gradients zeroed first when
    /// `zero_grads` (the step's first micro-batch). Where the backend records graphs and the
    /// step's device work takes no per-step arguments (token ids and the dropout seed are read
    /// from device buffers; FP8's scales and kept casts change per step, so FP8 steps are not
    /// recorded), that work is recorded once and replayed (see `model::step_graph`): the same
    /// results, fewer launches.
    #[allow(clippy::too_many_arguments)]
    pub fn train_micro_batch(
        &mut self,
        backend: &B,
        acts: &mut Activations<B>,
        inputs: &[u32],
        targets: &[u32],
        loss_weight: f32,
        dropout_seed: u64,
        zero_grads: bool,
    ) -> Result<f32> {
        self.load_batch(backend, acts, inputs, targets, dropout_seed)?;
        let recordable = backend.records_graphs() && !self.recipe.fp8_gemms;
        let key = GraphKey {
            zero_grads,
            loss_weight: loss_weight.to_bits(),
        };
        let epoch = backend.graph_epoch();
        let plan = if recordable {
            acts.graphs.plan(key, epoch)
        } else {
            Plan::Eager
        };
        match plan {
            Plan::Replay(graph) => backend.replay_graph(graph)?,
            Plan::Record => {
                let graph = backend.record_graph(&mut || {
                    if zero_grads {
                        self.zero_grads(backend)?;
                    }
                    self.queue_forward_backward(backend, acts, loss_weight)
                })?;
                if backend.graph_epoch() != epoch {
                    bail!("internal error: recording the training step changed the backend's graph epoch");
                }
                backend.replay_graph(&graph)?;
                acts.graphs.recorded(key, graph, epoch);
            }
            Plan::Eager => {
                if zero_grads {
                    self.zero_grads(backend)?;
                }
                self.queue_forward_backward(backend, acts, loss_weight)?;
                if recordable {
                    acts.graphs.ran_eagerly(key, epoch, backend.graph_epoch());
                }
            }
        }
        Self::batch_loss(backend, acts)
    }

    /// Checks and uploads a micro-batch's input and target ids, and its dropout seed.
    fn load_batch(
        &self,
        backend: &B,
        acts: &mut Activations<B>,
        inputs: &[u32],
        targets: &[u32],
        dropout_seed: u64,
    ) -> Result<()> {
        self.load_inputs(backend, acts, inputs)?;
        self.check_tokens(targets, "targets")?;
        backend.upload_tokens(&mut acts.targets, targets)?;
        if self.dropout > 0.0 {
            backend.upload_seed(&mut acts.seed, dropout_seed)?;
        }
        Ok(())
    }

    /// The mean loss of the micro-batch [`Gpt::queue_forward_backward`] queued (waits for it).
    fn batch_loss(backend: &B, acts: &Activations<B>) -> Result<f32> {
        // Read only after the backward is queued: on a GPU the wait then does not leave the
        // device idle mid-step.
        Ok(mean(&backend.download(&acts.losses)?))
    }

    /// Queues forward, classifier and backward over the loaded batch ([`Gpt::load_batch`]),
    /// reading nothing back: the device work of [`Gpt::forward_backward`].
    fn queue_forward_backward(
        &mut self,
        backend: &B,
        acts: &mut Activations<B>,
        loss_weight: f32,
    ) -> Result<()> {
        self.forward_blocks(backend, acts, true)?;
        let (b, t) = (acts.b, acts.t);
        let (c, nh, v, vp) = (
            self.cfg.n_embd,
            self.cfg.n_head,
            self.cfg.vocab_size,
            self.cfg.padded_vocab_size,
        );
        let bt = b * t;
        let us = self.unit_scales(b, t);
        // Unit scaling gives the logit gradient unit variance instead of the mean's 1/N.
        let dloss = if self.recipe.unit_scaling {
            loss_weight * us.loss_grad
        } else {
            loss_weight / bt as f32
        };
        let Some(gs) = acts.grads.as_mut() else {
            bail!("internal error: backward on activations allocated without gradients");
        };
        let keep = KeepVersions {
            acts: acts.pass_version,
            amax: acts.amax_epoch,
        };
        let gemms = self.block_gemms(&us, keep);
        let (master, compute, grads) = (&self.master, &self.compute, &mut self.grads);
        let w = |i: usize| {
            if compute.is_empty() {
                &master[i]
            } else {
                &compute[i]
            }
        };

        let p = self.dropout;
        // The dropout seed and site of a branch's mask, if this pass applied dropout.
        let seed = &acts.seed;
        let drop = |layer: usize, k: usize| acts.dropout.then(|| (seed, dropout_site(layer, k)));
        let nl = self.cfg.n_layer;

        // LM head (tied) and classifier: logits = lnf · wteᵀ, the loss and dlogits, dlnf =
        // dlogits · wte, dwte += dlogitsᵀ · lnf (a chunk of rows at a time where the backend
        // can, so the full logits never exist).
        let head = |role| self.recipe.head_gemm(role);
        backend.linear_crossentropy_forward_backward(
            &mut acts.losses,
            &mut acts.logits,
            &mut gs.dln,
            &mut grads[WTE],
            &acts.lnf,
            w(WTE),
            &acts.targets,
            bt,
            c,
            v,
            vp,
            [
                head(GemmRole::Forward).with_alpha(us.head),
                head(GemmRole::InputGrad).with_alpha(us.head),
                head(GemmRole::WeightGrad).with_alpha(us.weight_grad),
            ],
            dloss,
        )?;
        // Without dropout, the output gradient of each block's two C-wide projections (the
        // attention projection, the MLP's down-projection) is `gs.dresid` exactly as the
        // LayerNorm backward before it leaves it (nothing runs in between: `branch_grad` passes
        // it through), so that op also forms their bias gradients, with the weight gradient's
        // alpha as `linear_backward` would, and the linears get no bias to form.
        let fuse_bias = !acts.dropout;
        // The projection bias (parameter index and weight-gradient GEMM) a LayerNorm backward
        // forms: attention's of layer `l` after LN2 (`k = PROJ`), the MLP's of layer `l` after
        // the next LayerNorm (`k = FCPROJ`).
        let res_bias = |l: usize, k: usize| {
            let param = if k == PROJ { PROJ_B } else { FCPROJ_B };
            fuse_bias.then(|| (layer_param(l, param), gemms[l * 4 + k].dw.alpha))
        };
        // The QKV linear's output gradient is `gs.dqkv` exactly as the attention backward writes
        // it (nothing runs in between, with dropout or without), so where the backend says so
        // that op forms the QKV bias gradient, with the weight gradient's alpha as
        // `linear_backward` would, and the linear gets no bias to form.
        let attn_qkv_bias = backend.attention_forms_qkv_bias(self.recipe.activations);
        backend.fill(&mut gs.dresid, 0.0)?;
        let last = acts.layers.last().map_or(&acts.encoded, |la| &la.resid_out);
        let lnf_w = layer_param(nl, 0);
        let fused = nl.checked_sub(1).and_then(|l| res_bias(l, FCPROJ));
        let (dlnf_w, dlnf_b, db) = ln_grads_mut(grads, lnf_w, fused);
        backend.layernorm_backward(
            &mut gs.dresid,
            dlnf_w,
            dlnf_b,
            &gs.dln,
            last,
            w(lnf_w),
            &acts.lnf_mean,
            &acts.lnf_rstd,
            bt,
            c,
            (1.0, us.norm_grad),
            db,
        )?;

        for l in (0..nl).rev() {
            let (done, rest) = acts.layers.split_at_mut(l);
            let input = if l == 0 {
                &acts.encoded
            } else {
                &done[l - 1].resid_out
            };
            let la = &mut rest[0];
            let lp = |k| layer_param(l, k);

            // MLP branch: resid_out = resid2 + dropout(fcproj(gelu(fc(ln2(resid2))))).
            let dbranch = branch_grad(backend, &gs.dresid, &mut gs.dbranch, p, drop(l + 1, 1))?;
            // A GELU output the forward did not store (or a recomputing model never kept) goes
            // in deferred: the backend forms it where it needs its values.
            let stored = la.gelu_stored;
            let gelu_out = match la.fch_gelu.as_mut() {
                Some(saved) if stored => GeluOut::Stored(&*saved),
                Some(saved) => GeluOut::Deferred(saved),
                None => GeluOut::Deferred(
                    acts.gelu_shared
                        .as_mut()
                        .ok_or_else(|| anyhow!("internal error: no GELU buffer"))?,
                ),
            };
            // Both MLP linears in one op: a backend may apply the GELU derivative where the
            // up-projection's GEMMs read the hidden gradient (`gs.dfch` is scratch there).
            const _: () = assert!(FC_B == FC_W + 1 && FCPROJ_W == FC_W + 2 && FCPROJ_B == FC_W + 3);
            let [dfc_w, dfc_b, dfcproj_w, dfcproj_b] = &mut grads[lp(FC_W)..lp(FC_W) + 4] else {
                bail!("internal error: MLP gradients");
            };
            let (fc, fcproj) = (&gemms[l * 4 + FC], &gemms[l * 4 + FCPROJ]);
            // (The down-projection's bias was formed by the LayerNorm backward above.)
            let dfcproj_b = (!fuse_bias).then_some(dfcproj_b);
            backend.mlp_backward(
                &mut gs.dln,
                &mut gs.dfch,
                (dfc_w, Some(dfc_b)),
                (dfcproj_w, dfcproj_b),
                dbranch,
                (&la.ln2, &la.fch, gelu_out),
                (w(lp(FC_W)), w(lp(FCPROJ_W))),
                (bt, c, 4 * c),
                [fcproj.dx, fcproj.dw, fc.dx, fc.dw],
                acts.amax.as_mut(),
                us.gelu,
            )?;
            // Weighted residual: the skip's gradient is scaled by its weight, the branch's by
            // its weight where it splits off (delayed from the add, see `model::unit`).
            let (skip, branch) = us.residual[2 * l + 1];
            if skip != 1.0 {
                backend.scale(&mut gs.dresid, skip)?;
            }
            let (dw, db, dproj_b) = ln_grads_mut(grads, lp(LN2_W), res_bias(l, PROJ));
            backend.layernorm_backward(
                &mut gs.dresid,
                dw,
                db,
                &gs.dln,
                &la.resid2,
                w(lp(LN2_W)),
                &la.ln2_mean,
                &la.ln2_rstd,
                bt,
                c,
                (branch, us.norm_grad),
                dproj_b,
            )?;

            // Attention branch: resid2 = input + dropout(proj(attn(qkv(ln1(input))))).
            let dbranch = branch_grad(backend, &gs.dresid, &mut gs.dbranch, p, drop(l + 1, 0))?;
            let (dw, db) = pair_mut(grads, lp(PROJ_W), lp(PROJ_B));
            backend.linear_backward(
                Some(&mut gs.datty),
                dw,
                (!fuse_bias).then_some(db),
                dbranch,
                &la.atty,
                w(lp(PROJ_W)),
                bt,
                c,
                c,
                gemms[l * 4 + PROJ].dx,
                gemms[l * 4 + PROJ].dw,
                acts.amax.as_mut(),
            )?;
            let (dw, db) = pair_mut(grads, lp(QKV_W), lp(QKV_B));
            let qkv_alpha = gemms[l * 4 + QKV].dw.alpha;
            backend.attention_backward(
                &mut gs.dqkv,
                &gs.datty,
                &la.qkv,
                &la.atty,
                &la.lse,
                b,
                t,
                c,
                nh,
                us.attention,
                attn_qkv_bias.then_some((&mut *db, qkv_alpha)),
            )?;
            backend.linear_backward(
                Some(&mut gs.dln),
                dw,
                (!attn_qkv_bias).then_some(db),
                &gs.dqkv,
                &la.ln1,
                w(lp(QKV_W)),
                bt,
                c,
                3 * c,
                gemms[l * 4 + QKV].dx,
                gemms[l * 4 + QKV].dw,
                acts.amax.as_mut(),
            )?;
            let (skip, branch) = us.residual[2 * l];
            if skip != 1.0 {
                backend.scale(&mut gs.dresid, skip)?;
            }
            // The previous layer's MLP output gradient is this dresid.
            let fused = l.checked_sub(1).and_then(|l| res_bias(l, FCPROJ));
            let (dw, db, dfcproj_b) = ln_grads_mut(grads, lp(LN1_W), fused);
            backend.layernorm_backward(
                &mut gs.dresid,
                dw,
                db,
                &gs.dln,
                input,
                w(lp(LN1_W)),
                &la.ln1_mean,
                &la.ln1_rstd,
                bt,
                c,
                (branch, us.norm_grad),
                dfcproj_b,
            )?;
        }

        let dencoded = branch_grad(backend, &gs.dresid, &mut gs.dbranch, p, drop(0, 0))?;
        let (dwte, dwpe) = pair_mut(grads, WTE, WPE);
        backend.embedding_backward(dwte, dwpe, dencoded, &acts.tokens, b, t, c, us.embed_grads)
    }
}

/// Gradient flowing into a residual branch: the residual gradient itself, or, with dropout, a
/// copy with the branch's dropout mask applied.
fn branch_grad<'a, B: Backend>(
    backend: &B,
    dresid: &'a B::Buf,
    scratch: &'a mut B::Buf,
    p: f32,
    mask: Option<(&B::Seed, u64)>,
) -> Result<&'a B::Buf> {
    match mask {
        Some((seed, site)) => {
            backend.dropout_backward(scratch, dresid, p, seed, site)?;
            Ok(scratch)
        }
        None => Ok(dresid),
    }
}

/// A LayerNorm's weight and bias gradients (`xs[w]`, `xs[w + 1]`) and, from `fused = (i,
/// alpha)` with `i < w`, the bias gradient `xs[i]` its backward also forms, with its scale.
#[allow(clippy::type_complexity)]
fn ln_grads_mut<T>(
    xs: &mut [T],
    w: usize,
    fused: Option<(usize, f32)>,
) -> (&mut T, &mut T, Option<(&mut T, f32)>) {
    let (lo, hi) = xs.split_at_mut(w);
    let [dw, db, ..] = hi else {
        panic!("ln_grads_mut: no LayerNorm gradients at {w}");
    };
    let extra = fused.map(|(i, alpha)| {
        assert!(
            i < w,
            "ln_grads_mut wants the fused bias before the LayerNorm"
        );
        (&mut lo[i], alpha)
    });
    (dw, db, extra)
}

/// Two distinct elements of a slice, mutably.
fn pair_mut<T>(xs: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert!(i < j, "pair_mut wants i < j");
    let (lo, hi) = xs.split_at_mut(j);
    (&mut lo[i], &mut hi[0])
}

/// The site id of a dropout (`layer` 0 for the embeddings, else the block after, `k` the branch):
/// with the micro-batch's seed it keys the mask ([`crate::backend::dropout_site_seed`]).
fn dropout_site(layer: usize, k: usize) -> u64 {
    (layer as u64) << 32 | k as u64
}

/// Mean of per-token losses, summed in f64 on the host.
fn mean(losses: &[f32]) -> f32 {
    let sum: f64 = losses.iter().map(|&x| f64::from(x)).sum();
    (sum / losses.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuBackend, CpuBuf};
    use crate::config::RecipeName;

    fn tiny() -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 4,
            vocab_size: 7,
            padded_vocab_size: 8,
        }
    }

    fn random_values(cfg: &GptConfig, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        Gpt::<CpuBackend<f64>>::param_specs(cfg)
            .iter()
            .map(|s| {
                let mut v: Vec<f32> = (0..s.numel()).map(|_| rng.normal_f32() * 0.3).collect();
                if s.name.ends_with("ln_1.weight")
                    || s.name.ends_with("ln_2.weight")
                    || s.name == "ln_f.weight"
                {
                    v.iter_mut().for_each(|x| *x += 1.0);
                }
                if s.name == "wte" {
                    v[cfg.vocab_size * cfg.n_embd..].fill(0.0);
                }
                v
            })
            .collect()
    }

    #[test]
    fn unit_scaling_learning_rates_follow_fan_in() {
        let be = CpuBackend::<f32>::new();
        let m = Gpt::new(&be, tiny(), Recipe::new(RecipeName::Fp8Unit), 0.0, 0.02, 1).unwrap();
        let sigma = m.recipe().base_init_std;
        for (spec, &scale) in m.specs().iter().zip(&m.lr_scales()) {
            let want = match spec
                .name
                .rsplit_once('.')
                .map_or(spec.name.as_str(), |(_, k)| k)
            {
                "bias" => 1.0,
                _ if spec.name.contains("ln_") => 1.0,
                // fan-in 4C: half the rate of the fan-in-C matrices.
                _ if spec.name.ends_with("mlp.c_proj.weight") => 0.5 / sigma,
                _ => 1.0 / sigma,
            };
            assert!(
                (scale - want).abs() <= 1e-6 * want,
                "{}: {scale} vs {want}",
                spec.name
            );
        }
        let standard = Gpt::new(&be, tiny(), Recipe::new(RecipeName::Bf16), 0.0, 0.02, 1).unwrap();
        assert!(standard.lr_scales().iter().all(|&s| s == 1.0));
    }

    /// Every parameter gradient of the whole model against central finite differences in f64.
    fn check_model_gradients(dropout: f32) {
        check_model_gradients_of(Recipe::new(RecipeName::Fp32), dropout);
    }

    /// With `recipe`'s op scales; under unit scaling each parameter's gradient is a known
    /// constant multiple of the true one ([`Gpt::unit_grad_ratios`]), divided out here.
    fn check_model_gradients_of(recipe: Recipe, dropout: f32) {
        let be = CpuBackend::<f64>::new();
        let cfg = tiny();
        let values = random_values(&cfg, 11);
        let inputs = [1u32, 5, 2, 6, 0, 3, 3, 4];
        let targets = [5u32, 2, 6, 0, 3, 3, 4, 1];
        let seed = 99;
        let mut model =
            Gpt::from_values(&be, cfg.clone(), recipe.clone(), dropout, &values).unwrap();
        let mut acts = model.activations(&be, 2, 4, true).unwrap();
        model.zero_grads(&be).unwrap();
        model
            .forward_backward(&be, &mut acts, &inputs, &targets, 1.0, seed)
            .unwrap();
        let ratios = model.unit_grad_ratios(2, 4);
        let analytic: Vec<Vec<f64>> = model
            .grads()
            .iter()
            .zip(&ratios)
            .map(|(g, r)| g.as_slice().iter().map(|x| x / r).collect())
            .collect();

        // The loss as a function of the parameters, in f64 throughout.
        let loss_at = |values: &[Vec<f64>]| -> f64 {
            let model = model_f64(&be, &cfg, &recipe, dropout, values);
            let mut acts = model.activations(&be, 2, 4, false).unwrap();
            model.forward(&be, &mut acts, &inputs, Some(seed)).unwrap();
            model.loss_f64(&be, &mut acts, &targets)
        };
        let base: Vec<Vec<f64>> = values
            .iter()
            .map(|v| v.iter().map(|&x| f64::from(x)).collect())
            .collect();
        let h = 1e-6;
        let (mut num, mut den) = (0.0, 0.0);
        for (i, tensor) in base.iter().enumerate() {
            for j in 0..tensor.len() {
                let mut plus = base.clone();
                plus[i][j] += h;
                let mut minus = base.clone();
                minus[i][j] -= h;
                let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h);
                let d = analytic[i][j] - numeric;
                num += d * d;
                den += numeric * numeric;
            }
        }
        let rel = (num / den).sqrt();
        assert!(
            rel < 1e-6,
            "model gradient rel err {rel} (dropout {dropout})"
        );
    }

    /// A model on the f64 backend with exact f64 parameter values (no f32 upload rounding).
    fn model_f64(
        be: &CpuBackend<f64>,
        cfg: &GptConfig,
        recipe: &Recipe,
        dropout: f32,
        values: &[Vec<f64>],
    ) -> Gpt<CpuBackend<f64>> {
        let specs = Gpt::<CpuBackend<f64>>::param_specs(cfg);
        let zeros: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; s.numel()]).collect();
        let mut model = Gpt::from_values(be, cfg.clone(), recipe.clone(), dropout, &zeros).unwrap();
        for (buf, v) in model.master.iter_mut().zip(values) {
            *buf = be.buf_from(DType::F32, v);
        }
        model
    }

    impl Gpt<CpuBackend<f64>> {
        /// Per parameter, the factor between the gradient the backward computes and the true
        /// gradient of the mean loss (all 1 outside unit scaling); see `model::unit`.
        fn unit_grad_ratios(&self, b: usize, t: usize) -> Vec<f64> {
            let us = self.unit_scales(b, t);
            if !self.recipe.unit_scaling {
                return vec![1.0; self.specs.len()];
            }
            let f = |x: f32| f64::from(x);
            // The logit gradient: V/√(V−1) per token instead of the mean's 1/N.
            let c = f(us.loss_grad) * (b * t) as f64;
            let wg = f(us.weight_grad);
            let mut r = vec![0.0; self.specs.len()];
            r[WTE] = c * wg / f(us.head);
            // The tied table's two edges carry the same factor (the constraint).
            assert!((r[WTE] - c * f(us.embed_grads.0) / f(us.embed)).abs() < 1e-6 * r[WTE]);
            r[WPE] = c * f(us.embed_grads.1) / f(us.embed);
            for l in 0..self.cfg.n_layer {
                // Inside a branch the gradient is the stream's over the branch weight.
                let attn = c / f(us.residual[2 * l].1);
                let mlp = c / f(us.residual[2 * l + 1].1);
                let lp = |k| layer_param(l, k);
                let ng = f(us.norm_grad);
                for (k, v) in [
                    (LN1_W, attn * ng),
                    (LN1_B, attn * ng),
                    (QKV_W, attn * wg / f(us.linear[QKV])),
                    (QKV_B, attn * wg),
                    (PROJ_W, attn * wg / f(us.linear[PROJ])),
                    (PROJ_B, attn * wg),
                    (LN2_W, mlp * ng),
                    (LN2_B, mlp * ng),
                    (FC_W, mlp * wg / f(us.linear[FC])),
                    (FC_B, mlp * wg),
                    (FCPROJ_W, mlp * wg / f(us.linear[FCPROJ])),
                    (FCPROJ_B, mlp * wg),
                ] {
                    r[lp(k)] = v;
                }
            }
            let nl = self.cfg.n_layer;
            r[layer_param(nl, 0)] = c * f(us.norm_grad);
            r[layer_param(nl, 1)] = c * f(us.norm_grad);
            r
        }

        fn loss_f64(
            &self,
            be: &CpuBackend<f64>,
            acts: &mut Activations<CpuBackend<f64>>,
            targets: &[u32],
        ) -> f64 {
            be.upload_tokens(&mut acts.targets, targets).unwrap();
            let bt = acts.b * acts.t;
            be.crossentropy_forward(
                &mut acts.losses,
                &acts.logits,
                &acts.targets,
                bt,
                self.cfg.vocab_size,
                self.cfg.padded_vocab_size,
            )
            .unwrap();
            acts.losses.as_slice().iter().sum::<f64>() / bt as f64
        }
    }

    #[test]
    fn whole_model_gradients_match_finite_differences() {
        check_model_gradients(0.0);
    }

    #[test]
    fn whole_model_gradients_match_finite_differences_with_dropout() {
        check_model_gradients(0.25);
    }

    /// The unit-scaled graph (in f64, without its FP8/fp16 rounding) computes gradients that
    /// are per-tensor constant multiples of the true gradients of its own forward, which is
    /// what makes it train like an unscaled model under Adam (the paper's Theorem 5.2).
    #[test]
    fn unit_scaled_gradients_are_scaled_true_gradients() {
        let mut recipe = Recipe::new(RecipeName::Fp8Unit);
        (recipe.activations, recipe.compute_weights) = (DType::F32, DType::F32);
        recipe.fp8_gemms = false;
        check_model_gradients_of(recipe, 0.0);
    }

    #[test]
    fn recomputing_gelu_gives_identical_gradients() {
        let be = CpuBackend::<f32>::new();
        let cfg = tiny();
        let values = random_values(&cfg, 5);
        let inputs = [1u32, 5, 2, 6, 0, 3, 3, 4];
        let targets = [5u32, 2, 6, 0, 3, 3, 4, 1];
        let grads = |recompute| {
            let mut m = Gpt::from_values(
                &be,
                cfg.clone(),
                Recipe::new(RecipeName::Bf16),
                0.1,
                &values,
            )
            .unwrap()
            .with_recompute_gelu(recompute);
            let mut a = m.activations(&be, 2, 4, true).unwrap();
            m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 7)
                .unwrap();
            m.grads()
                .iter()
                .map(|g| be.download(g).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(grads(false), grads(true));
    }

    /// `train_micro_batch` (what the trainer calls) is `zero_grads` + `forward_backward` for a
    /// step's first micro-batch and `forward_backward` for the rest, dropout masks (seeded per
    /// micro-batch, through the backend's seed holder) included: the same losses and gradients.
    #[test]
    fn train_micro_batches_match_zero_then_forward_backward() {
        let be = CpuBackend::<f64>::new();
        let cfg = tiny();
        let values = random_values(&cfg, 5);
        let mut rng = Rng::new(6);
        let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..4)
            .map(|_| {
                let mut ids = || (0..2 * 4).map(|_| rng.below(7) as u32).collect::<Vec<_>>();
                (ids(), ids())
            })
            .collect();
        let run = |through_trainer_entry: bool| {
            let recipe = Recipe::new(RecipeName::Fp32);
            let mut m = Gpt::from_values(&be, cfg.clone(), recipe, 0.2, &values).unwrap();
            let mut a = m.activations(&be, 2, 4, true).unwrap();
            let mut out = Vec::new();
            // Two steps of two micro-batches, each with its own dropout seed.
            for (i, (inputs, targets)) in batches.iter().enumerate() {
                let (first, seed) = (i % 2 == 0, 100 + i as u64);
                let loss = if through_trainer_entry {
                    m.train_micro_batch(&be, &mut a, inputs, targets, 0.5, seed, first)
                } else {
                    if first {
                        m.zero_grads(&be).unwrap();
                    }
                    m.forward_backward(&be, &mut a, inputs, targets, 0.5, seed)
                };
                out.push(vec![f64::from(loss.unwrap())]);
                if !first {
                    out.extend(
                        m.grads()
                            .iter()
                            .map(|g| be.download(g).unwrap())
                            .map(|g| g.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>()),
                    );
                }
            }
            out
        };
        assert_eq!(run(true), run(false));
        // Each micro-batch's seed reaches the masks: one batch under two seeds, two losses.
        let recipe = Recipe::new(RecipeName::Fp32);
        let mut m = Gpt::from_values(&be, cfg.clone(), recipe, 0.2, &values).unwrap();
        let mut a = m.activations(&be, 2, 4, true).unwrap();
        let (inputs, targets) = &batches[0];
        let mut loss = |seed| {
            m.train_micro_batch(&be, &mut a, inputs, targets, 1.0, seed, true)
                .unwrap()
        };
        assert_ne!(loss(1), loss(2));
    }

    /// A training pass whose LM head runs in chunks of rows (three here: 128, 128, 64) gives the
    /// losses and gradients of one that keeps all logits, and evaluates on its own activations.
    #[test]
    fn chunked_logits_match_whole_logits() {
        let be = CpuBackend::<f64>::new();
        let cfg = GptConfig {
            block_size: 64,
            ..tiny()
        };
        let values = random_values(&cfg, 3);
        let (b, t) = (5, 64);
        let mut rng = Rng::new(4);
        let mut tokens = || (0..b * t).map(|_| rng.below(7) as u32).collect::<Vec<_>>();
        let (inputs, targets) = (tokens(), tokens());
        let run = |chunk_bytes: usize| {
            let recipe = Recipe::new(RecipeName::Fp32);
            let mut m = Gpt::from_values(&be, cfg.clone(), recipe, 0.0, &values)
                .unwrap()
                .with_logits_chunk_bytes(chunk_bytes);
            let mut a = m.activations(&be, b, t, true).unwrap();
            let loss = m
                .forward_backward(&be, &mut a, &inputs, &targets, 1.0, 7)
                .unwrap();
            m.forward(&be, &mut a, &inputs, None).unwrap();
            let eval = m.token_losses(&be, &mut a, &targets).unwrap();
            let grads: Vec<f32> = m
                .grads()
                .iter()
                .flat_map(|g| be.download(g).unwrap())
                .collect();
            (
                a.head_rows,
                loss,
                eval,
                grads,
                m.logits_row(&be, &a, 0).is_ok(),
            )
        };
        let whole = run(0);
        // 128 rows of 8 logits stored as f32 (the recipe's activations); 320 rows make three.
        let chunked = run(128 * 8 * 4);
        assert_eq!((whole.0, chunked.0), (b * t, 128));
        assert!((whole.1 - chunked.1).abs() < 1e-6 * whole.1);
        assert!(crate::selftest::rel_err(&chunked.2, &whole.2) < 1e-6);
        assert!(crate::selftest::rel_err(&chunked.3, &whole.3) < 1e-6);
        assert!(whole.4 && !chunked.4, "only whole logits can be read back");
    }

    #[test]
    fn low_precision_recipes_round_and_stay_close_to_fp32() {
        let be = CpuBackend::<f32>::new();
        let cfg = tiny();
        let values = random_values(&cfg, 3);
        let inputs = [1u32, 5, 2, 6, 0, 3, 3, 4];
        let targets = [5u32, 2, 6, 0, 3, 3, 4, 1];
        let loss = |recipe| {
            let mut m =
                Gpt::from_values(&be, cfg.clone(), Recipe::new(recipe), 0.0, &values).unwrap();
            let mut a = m.activations(&be, 2, 4, true).unwrap();
            m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 0)
                .unwrap()
        };
        let l32 = loss(RecipeName::Fp32);
        for (recipe, tol) in [
            (RecipeName::Bf16, 1e-2),
            (RecipeName::Fp16, 2e-3),
            (RecipeName::Fp8, 3e-2),
        ] {
            let low = loss(recipe);
            assert!(low != l32, "{recipe} must actually round");
            assert!(
                (low - l32).abs() / l32 < tol,
                "fp32 {l32} vs {recipe} {low}"
            );
        }
    }

    const NO_KEEP: KeepVersions = KeepVersions {
        acts: None,
        amax: 0,
    };

    /// Keep tokens name one tensor's contents: an activation's are equal in a pass's forward and
    /// backward GEMMs and renewed by the next pass, a weight's last until an optimizer step, and
    /// a GELU output the backward recomputes gets none.
    #[test]
    fn keep_tokens_change_with_the_tensors() {
        let be = CpuBackend::<f32>::new();
        let cfg = tiny();
        let values = random_values(&cfg, 4);
        let mut m = Gpt::from_values(&be, cfg, Recipe::new(RecipeName::Fp8), 0.0, &values).unwrap();
        let mut a = m.activations(&be, 2, 4, true).unwrap();
        let (inputs, targets) = ([1u32, 5, 2, 6, 0, 3, 3, 4], [5u32, 2, 6, 0, 3, 3, 4, 1]);
        let gemms = |m: &Gpt<CpuBackend<f32>>, a: &Activations<CpuBackend<f32>>| {
            let keep = KeepVersions {
                acts: a.pass_version,
                amax: a.amax_epoch,
            };
            m.block_gemms(&m.unit_scales(2, 4), keep)
        };
        let before = gemms(&m, &a);
        assert!(before[QKV].fwd.a.keep.is_none(), "no pass yet");
        m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 0)
            .unwrap();
        let pass = gemms(&m, &a);
        for g in &pass {
            assert!(g.fwd.a.keep.is_some() && g.fwd.b.keep.is_some());
            assert_eq!(g.fwd.a.keep, g.dw.b.keep, "x in the forward and dw GEMMs");
            assert_eq!(g.fwd.b.keep, g.dx.b.keep, "w in the forward and dx GEMMs");
            assert!(
                g.dx.a.keep.is_none() && g.dw.a.keep.is_none(),
                "dy is not kept"
            );
        }
        assert_eq!(pass[QKV].fwd.b.keep, before[QKV].fwd.b.keep);
        assert_ne!(pass[QKV].fwd.a.keep, pass[PROJ].fwd.a.keep);
        m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 0)
            .unwrap();
        let again = gemms(&m, &a);
        assert_ne!(again[QKV].fwd.a.keep, pass[QKV].fwd.a.keep, "a new pass");
        assert_eq!(again[QKV].fwd.b.keep, pass[QKV].fwd.b.keep, "same weights");
        m.finish_step(&be, &mut a).unwrap();
        let stepped = gemms(&m, &a);
        let (w0, w1) = (
            again[QKV].fwd.b.keep.unwrap(),
            stepped[QKV].fwd.b.keep.unwrap(),
        );
        assert_ne!(w0.version, w1.version);
        assert_ne!(w0.amax_epoch, w1.amax_epoch);
        let _ = m.params_mut();
        assert_ne!(gemms(&m, &a)[QKV].fwd.b.keep, stepped[QKV].fwd.b.keep);
        let mut m = m.with_recompute_gelu(true);
        let mut a = m.activations(&be, 2, 4, true).unwrap();
        m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 0)
            .unwrap();
        let g = gemms(&m, &a);
        assert!(g[FCPROJ].fwd.a.keep.is_none() && g[FC].fwd.a.keep.is_some());
        let bf16 =
            Gpt::from_values(&be, tiny(), Recipe::new(RecipeName::Bf16), 0.0, &values).unwrap();
        assert!(
            gemms(&bf16, &a)[QKV].fwd.b.keep.is_none(),
            "no FP8, no tokens"
        );
    }

    #[test]
    fn delayed_fp8_scales_lag_the_amax_by_exactly_one_step() {
        use crate::backend::OperandScale;
        use crate::numerics::scale_from_amax;
        let be = CpuBackend::<f32>::new();
        let cfg = tiny();
        let values = random_values(&cfg, 4);
        let mut recipe = Recipe::new(RecipeName::Fp8);
        recipe.fp8.history = 1;
        let mut m = Gpt::from_values(&be, cfg.clone(), recipe, 0.0, &values).unwrap();
        let mut a = m.activations(&be, 2, 4, true).unwrap();
        let (x, dy) = (fp8::slot(0, QKV, fp8::X), fp8::slot(0, QKV, fp8::DY));
        let amax = |buf: &CpuBuf<f32>| buf.as_slice().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let batches = [
            ([1u32, 5, 2, 6, 0, 3, 3, 4], [5u32, 2, 6, 0, 3, 3, 4, 1]),
            ([6, 6, 1, 0, 2, 2, 5, 4], [6, 1, 0, 2, 2, 5, 4, 0]),
            ([3, 1, 4, 1, 5, 2, 6, 5], [1, 4, 1, 5, 2, 6, 5, 3]),
        ];
        let mut previous: Option<(f32, f32)> = None;
        for (inputs, targets) in batches {
            let g = m.block_gemms(&m.unit_scales(2, 4), NO_KEEP)[QKV];
            let want = |slot: usize, amax: Option<f32>| match amax {
                None => OperandScale::Current { margin: 0 },
                Some(a) => OperandScale::Fixed(scale_from_amax(a, Fp8State::format(slot), 0)),
            };
            // This step's scales come from the previous step's amaxes only.
            assert_eq!(g.fwd.a.scale, want(x, previous.map(|p| p.0)));
            assert_eq!(
                g.dw.b.scale, g.fwd.a.scale,
                "x has one scale in both its GEMMs"
            );
            assert_eq!(g.dx.a.scale, want(dy, previous.map(|p| p.1)));
            m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 0)
                .unwrap();
            let now = (
                amax(&a.layers[0].ln1),
                amax(&a.grads.as_ref().unwrap().dqkv),
            );
            // Nothing is recorded into the histories until the step ends.
            assert_eq!(
                g.fwd.a.scale,
                m.block_gemms(&m.unit_scales(2, 4), NO_KEEP)[QKV]
                    .fwd
                    .a
                    .scale
            );
            m.finish_step(&be, &mut a).unwrap();
            let (shape, hist) = m.fp8_state().unwrap().to_tensor();
            assert_eq!(shape[1], 1);
            assert_eq!((hist[x], hist[dy]), now, "the step's own amax is recorded");
            assert!(
                previous != Some(now),
                "batches must differ for the test to mean anything"
            );
            previous = Some(now);
        }
    }

    fn std_of(values: &[f32]) -> f64 {
        let n = values.len() as f64;
        let mean = values.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        var.sqrt()
    }

    /// Unit scaling's promise, op by op at the default model's shapes (width 128, 4 heads,
    /// context 64, batch 12, 65 characters): with unit-normal inputs and output gradients, each
    /// scaled op's output and gradients have a standard deviation near 1. Where an op's forward
    /// and backward scales are tied by the cut-edge rule the geometric mean sits between them,
    /// so the two can each be off by up to (fan_out/fan_in)^¼ = 1.41 for the 4× MLP.
    #[test]
    fn unit_scaled_ops_have_unit_std_at_model_shapes() {
        use crate::backend::GemmSpec;
        let be = CpuBackend::<f32>::new();
        let (b, t, c, nh, v, vp) = (12, 64, 128, 4, 65, 128);
        let n = b * t;
        let us = super::UnitScales::unit(c, 4, t, v, b, n);
        let mut rng = Rng::new(7);
        let mut normal = |len: usize| {
            let vals: Vec<f32> = (0..len).map(|_| rng.normal_f32()).collect();
            be.buf_from(DType::F32, &vals)
        };
        let mut seen = Vec::new();
        let mut check = |what: String, buf: &CpuBuf<f32>| {
            let s = std_of(buf.as_slice());
            seen.push(format!("{what} {s:.3}"));
            assert!((0.6..1.6).contains(&s), "{what}: std {s}");
        };
        let f32b = |len| be.alloc(DType::F32, len).unwrap();
        let linears = [
            ("qkv", QKV, c, 3 * c),
            ("proj", PROJ, c, c),
            ("fc", FC, c, 4 * c),
            ("fcproj", FCPROJ, 4 * c, c),
        ];
        for (name, k, ic, oc) in linears {
            let (x, w, dy) = (normal(n * ic), normal(oc * ic), normal(n * oc));
            let fwd = GemmSpec::both(DType::F32).with_alpha(us.linear[k]);
            let dw_spec = GemmSpec::both(DType::F32).with_alpha(us.weight_grad);
            let mut y = f32b(n * oc);
            be.linear_forward(&mut y, &x, &w, None, n, ic, oc, fwd, None)
                .unwrap();
            let (mut dx, mut dw, mut db) = (f32b(n * ic), f32b(oc * ic), f32b(oc));
            be.linear_backward(
                Some(&mut dx),
                &mut dw,
                Some(&mut db),
                &dy,
                &x,
                &w,
                n,
                ic,
                oc,
                fwd,
                dw_spec,
                None,
            )
            .unwrap();
            for (what, buf) in [("out", &y), ("dx", &dx), ("dw", &dw), ("dbias", &db)] {
                check(format!("{name} {what}"), buf);
            }
        }
        // LM head (tied, no bias): forward and input gradient share V^-½.
        let (hx, hw, dy) = (normal(n * c), normal(vp * c), normal(n * vp));
        let head = GemmSpec::both(DType::F32).with_alpha(us.head);
        let (mut dx, mut dw) = (f32b(n * c), f32b(vp * c));
        let dw_spec = GemmSpec::both(DType::F32).with_alpha(us.weight_grad);
        be.linear_backward(
            Some(&mut dx),
            &mut dw,
            None,
            &dy,
            &hx,
            &hw,
            n,
            c,
            vp,
            head,
            dw_spec,
            None,
        )
        .unwrap();
        check("head dx".into(), &dx);
        check("head dw".into(), &dw);
        // GELU.
        let (x, mut dx) = (normal(n * 4 * c), normal(n * 4 * c));
        let mut y = f32b(n * 4 * c);
        be.gelu_forward(&mut y, &x, us.gelu).unwrap();
        be.gelu_backward(&mut dx, &x, us.gelu).unwrap();
        check("gelu out".into(), &y);
        check("gelu dx".into(), &dx);
        // Attention.
        let (qkv, dy) = (normal(n * 3 * c), normal(n * c));
        let (mut out, mut lse, mut dqkv) = (f32b(n * c), f32b(b * nh * t), f32b(n * 3 * c));
        be.attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh, us.attention)
            .unwrap();
        be.attention_backward(
            &mut dqkv,
            &dy,
            &qkv,
            &out,
            &lse,
            b,
            t,
            c,
            nh,
            us.attention,
            None,
        )
        .unwrap();
        check("attention out".into(), &out);
        check("attention dqkv".into(), &dqkv);
        // Weighted residual adds.
        for (k, &scales) in us.residual.iter().enumerate() {
            let (skip, branch) = (normal(n * c), normal(n * c));
            let mut out = f32b(n * c);
            be.residual_forward(&mut out, &skip, &branch, scales)
                .unwrap();
            check(format!("residual {k} out"), &out);
        }
        // Embeddings.
        let (wte, wpe) = (normal(vp * c), normal(t * c));
        let tokens: Vec<u32> = (0..n as u32).map(|i| i * 7 % v as u32).collect();
        let mut out = f32b(n * c);
        be.embedding_forward(&mut out, &tokens, &wte, &wpe, b, t, c, us.embed)
            .unwrap();
        check("embedding out".into(), &out);
        let (mut dwte, mut dwpe) = (f32b(vp * c), f32b(t * c));
        be.embedding_backward(&mut dwte, &mut dwpe, &dy, &tokens, b, t, c, us.embed_grads)
            .unwrap();
        let used = &dwte.as_slice()[..v * c];
        let s = std_of(used);
        assert!((0.6..1.6).contains(&s), "embedding dwte std {s}");
        check("embedding dwpe".into(), &dwpe);
        // The loss gradient at the head's unit-scaled initial logits.
        let mut logits = f32b(n * vp);
        be.linear_forward(&mut logits, &hx, &hw, None, n, c, vp, head, None)
            .unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 5 % v as u32).collect();
        let mut losses = f32b(n);
        be.crossentropy_forward_backward(
            &mut losses,
            &mut logits,
            &targets,
            n,
            v,
            vp,
            us.loss_grad,
        )
        .unwrap();
        let real: Vec<f32> = logits
            .as_slice()
            .chunks(vp)
            .flat_map(|row| row[..v].to_vec())
            .collect();
        let s = std_of(&real);
        assert!((0.6..1.6).contains(&s), "dlogits std {s}");
        eprintln!("{}", seen.join(", "));
    }

    /// The whole fp8-unit model at initialisation (FP8 GEMMs, fp16 tensors): every saved
    /// activation, the residual-stream and branch gradients, and the weight gradients sit near
    /// unit scale, so FP8 with scale 1 and fp16 without loss scaling have headroom both ways.
    #[test]
    fn fp8_unit_model_is_unit_scaled_at_init() {
        let be = CpuBackend::<f32>::new();
        let cfg = GptConfig {
            n_layer: 2,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            vocab_size: 65,
            padded_vocab_size: 128,
        };
        let recipe = Recipe::new(RecipeName::Fp8Unit);
        let mut m = Gpt::new(&be, cfg, recipe, 0.0, 0.02, 3).unwrap();
        let (b, t) = (4, 64);
        let mut rng = Rng::new(9);
        let mut tokens = || -> Vec<u32> { (0..b * t).map(|_| rng.below(65) as u32).collect() };
        let (inputs, targets) = (tokens(), tokens());
        let mut a = m.activations(&be, b, t, true).unwrap();
        m.forward_backward(&be, &mut a, &inputs, &targets, 1.0, 0)
            .unwrap();
        let mut seen = Vec::new();
        for p in m.probe_tensors(&a) {
            let s = std_of(p.buf.as_slice());
            seen.push(format!("{} {} {s:.2}", p.name, p.role));
            match p.role {
                "activation" => assert!((0.5..2.0).contains(&s), "{} std {s}", p.name),
                "grad" if p.name.ends_with("weight") && !p.name.contains("ln_") => {
                    assert!((0.3..3.0).contains(&s), "{} grad std {s}", p.name)
                }
                _ => {}
            }
        }
        // `dfch` is `mlp_backward`'s scratch; the CPU's (the composed ops) leaves dpre there.
        let gs = a.grads.as_ref().unwrap();
        for (name, buf) in [
            ("d embeddings", &gs.dresid),
            ("d qkv", &gs.dqkv),
            ("d attn out", &gs.datty),
            ("d fc", &gs.dfch),
        ] {
            let s = std_of(buf.as_slice());
            seen.push(format!("{name} {s:.2}"));
            assert!((0.3..3.0).contains(&s), "{name} std {s}");
        }
        eprintln!("{}", seen.join(", "));
    }

    /// Folding the unit scales into the weights gives a standard GPT-2 with the same logits
    /// (to LayerNorm-epsilon effects), which is what checkpoints export for Hugging Face.
    #[test]
    fn folded_unit_weights_are_the_same_standard_gpt2() {
        let be = CpuBackend::<f64>::new();
        let cfg = tiny();
        let mut unit = Recipe::new(RecipeName::Fp8Unit);
        (unit.activations, unit.compute_weights) = (DType::F32, DType::F32);
        unit.fp8_gemms = false;
        let values = random_values(&cfg, 21);
        let factors = super::super::unit::fold_factors(
            cfg.n_embd,
            cfg.n_layer,
            cfg.block_size,
            cfg.vocab_size,
        );
        let folded = super::super::unit::fold(&values, &factors);
        let back = super::super::unit::unfold(&folded, &factors);
        for (a, b) in back.iter().zip(&values) {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                    "unfold {x} vs {y}"
                );
            }
        }
        let inputs = [1u32, 5, 2, 6, 0, 3, 3, 4];
        let logits = |recipe: Recipe, values: &[Vec<f32>]| {
            let m = Gpt::from_values(&be, cfg.clone(), recipe, 0.0, values).unwrap();
            let mut a = m.activations(&be, 2, 4, false).unwrap();
            m.forward(&be, &mut a, &inputs, None).unwrap();
            (0..8)
                .flat_map(|r| m.logits_row(&be, &a, r).unwrap())
                .collect::<Vec<f32>>()
        };
        let want = logits(unit, &values);
        let got = logits(Recipe::new(RecipeName::Fp32), &folded);
        let err = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-4, "folded logits differ by {err}");
        assert!(
            factors.iter().any(|&k| (k - 1.0).abs() > 0.1),
            "folding must do something"
        );
    }

    #[test]
    fn init_is_seeded_and_padded_rows_are_zero() {
        let be = CpuBackend::<f32>::new();
        let cfg = tiny();
        let a = Gpt::new(
            &be,
            cfg.clone(),
            Recipe::new(RecipeName::Fp32),
            0.0,
            0.02,
            1,
        )
        .unwrap()
        .download_params(&be)
        .unwrap();
        let b = Gpt::new(
            &be,
            cfg.clone(),
            Recipe::new(RecipeName::Fp32),
            0.0,
            0.02,
            1,
        )
        .unwrap()
        .download_params(&be)
        .unwrap();
        let c = Gpt::new(
            &be,
            cfg.clone(),
            Recipe::new(RecipeName::Fp32),
            0.0,
            0.02,
            2,
        )
        .unwrap()
        .download_params(&be)
        .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a[WTE][cfg.vocab_size * cfg.n_embd..]
            .iter()
            .all(|&x| x == 0.0));
    }
}
