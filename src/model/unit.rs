//! Unit scaling of the GPT-2 graph (Blake, Orr & Luschi 2023, "Unit Scaling: Out-of-the-Box
//! Low-Precision Training", arXiv 2303.11257), the `fp8-unit` recipe.
//!
//! Every weight starts at unit variance and every op carries fixed scales chosen so that, for
//! unit-variance inputs, its outputs and gradients have unit variance too. Then FP8 (e4m3
//! forward, e5m2 gradients) with a static scale of 1 and fp16 elsewhere need no loss scaling and
//! no amax tracking. The rules, as the paper gives them:
//!
//! - A scaled op multiplies its output by `α` and each input gradient by its own `β`. Choose
//!   each from the op's own variance for unit inputs (`α = 1/σ_out`, `β = 1/σ_grad`).
//! - Where an op's input is a *non-cut edge* of the graph (removing it leaves the graph
//!   connected, e.g. anything inside a residual branch), the op's `α` and that input's `β` must
//!   agree, or gradients along different paths would be scaled inconsistently; the paper takes
//!   the geometric mean. Gradients of parameters (cut edges) may be scaled freely: with a
//!   per-tensor constant factor an Adam update is unchanged (the paper's Proposition 5.1).
//! - Matmul `y = x·Wᵀ` (`x: [N, fan_in]`): `α = fan_in^-½`, `β_x = fan_out^-½`, `β_W = N^-½`;
//!   with `x` a non-cut edge, `α = β_x = (fan_in·fan_out)^-¼`. The LM head uses the backward
//!   scale `V^-½` for both (as in the paper's code), so logits start small.
//! - Residual layers use weighted adds, `h' = √(1−τ)·h + √τ·f(h)`, with the branch's `√τ`
//!   applied to its gradient where the branch splits off rather than where it rejoins, so the
//!   gradient inside the branch stays unit-scaled (the input gradient is unchanged: the branch is
//!   linear in its output gradient). τ follows the running-mean rule with the embedding
//!   counted as `L` terms (u-μP, Blake et al. 2024, appendix G, the rule the authors' library
//!   uses by default): the k-th add has τ = 1/(L+k), so at the end the embedding, all attention
//!   branches and all MLP branches each carry a third of the stream's variance. The paper's
//!   plainer rule (embedding as one term, τ = 1/(k+1)) lets the deep stream forget its input:
//!   at L = 4 the embedding keeps 1/9 of the variance at the end; a 2000-step run ended 3.7% behind
//!   bf16 with it and 0.5% ahead with this rule (BENCHMARKS.md).
//! - Nonlinearities: GELU scaled by `(σ_out·σ_grad)^-½` for a unit-normal input (the geometric
//!   mean of its output std 0.588 and gradient RMS 0.675; constrained, its input is non-cut).
//!   Attention keeps softmax's `1/√d_head` temperature, which is exactly the unit scale of the
//!   `q·kᵀ` matmul (fan-in d_head; μP's `1/d_head` would change the function and start every
//!   head uniform); its output, a softmax-weighted average over the causal prefix, shrinks by
//!   `√(e·H_T/T)` on average (H_T the harmonic number: position i averages i+1 values; e from
//!   unit-variance log-normal weights, the paper library's `√(s/e)` rule), and one scale on
//!   output and input gradients undoes that (the constraint: α = β).
//! - LayerNorm outputs unit variance already; its parameter gradients get `N^-½`.
//!   The embedding sum `wte[tok] + wpe[pos]` is a weighted add of two unit terms (×2^-½).
//! - Loss: cross-entropy's logit gradient is scaled to unit variance, `V/√(V−1)` instead of the
//!   mean's `1/N` (the forward loss stays the plain mean).
//! - The tied token embedding feeds two ops (the lookup and the head), so it is not a cut edge
//!   either: both gradient contributions carry the same factor relative to the true gradient
//!   (`β/α` equal on both edges), fixing the lookup's gradient scale to `2^-½·N^-½/V^-½`.
//! - Learning rates: weights start at unit scale instead of the standard init std σ
//!   (`model.init_std`) and Adam's steps do not depend on gradient scale, so each matrix's rate
//!   is multiplied by `√(C/fan_in)/σ`. That is u-μP's Adam rule (Blake et al. 2024: a matrix's
//!   rate ∝ fan_in^-½, the embeddings' fan-in being the width C), normalized so a matrix of
//!   fan-in C moves, relative to its size, as the standard model's does at the same `lr`; the
//!   MLP's down-projection (fan-in 4C) moves at half that. Dividing by each matrix's own
//!   standard σ instead, which gives the residual projections √(2L) times more, ended 1.5%
//!   worse on the CPU benchmark and its good range of `lr` ended lower. u-μP's further depth
//!   factor, `(2L)^-½` on the matrices inside the blocks, helped the 4-layer CPU model at twice
//!   the default `lr` but left the 6-layer GPU recipe run 2.1% behind bf16 at its `lr`, so it
//!   is not applied (BENCHMARKS.md).
//!   Decoupled weight decay is divided by the same factor, so `lr·wd` is unchanged. Vectors
//!   keep the base rate.

/// Names the per-matrix learning-rate rule of unit scaling (`Gpt::lr_scales`). Checkpoints
/// record it with the optimizer state, so a resume under another rule says so.
pub const LR_RULE: &str = "fan-in";

/// Names the residual rule of [`UnitScales::unit`]. Unit-scaled weights saved under another
/// rule compute another function, so checkpoints record it (see `runs::UNIT_MODEL_FILE`).
pub const RESIDUAL_RULE: &str = "embedding-as-L-branches";

/// Std of `gelu(x)` for `x ~ N(0, 1)` (tanh approximation; computed by integration, see tests).
pub const GELU_OUT_STD: f64 = 0.587_918;
/// RMS of `gelu'(x)` for `x ~ N(0, 1)`.
pub const GELU_GRAD_RMS: f64 = 0.675_143;

/// The fixed scales of a unit-scaled GPT-2 for one batch shape (`n = b·t` rows); all 1 for the
/// standard parametrization, so the same model code runs both.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitScales {
    /// Embedding sum: `out = embed·(wte[tok] + wpe[pos])`.
    pub embed: f32,
    /// Gradient scales of the token and position tables.
    pub embed_grads: (f32, f32),
    /// Forward (= input-gradient) alpha of qkv, proj, fc, fcproj.
    pub linear: [f32; 4],
    /// Weight- and bias-gradient alpha of every matmul: `N^-½`.
    pub weight_grad: f32,
    /// LM head forward (= input-gradient) alpha.
    pub head: f32,
    /// Attention output (and input-gradient) scale.
    pub attention: f32,
    /// GELU output (and input-gradient) scale.
    pub gelu: f32,
    /// Per residual add, in order (attention of block 0, MLP of block 0, ...): (skip, branch).
    pub residual: Vec<(f32, f32)>,
    /// LayerNorm weight and bias gradient scale.
    pub norm_grad: f32,
    /// Cross-entropy logit-gradient scale per unit of loss weight (`1/N` is the standard mean's).
    pub loss_grad: f32,
}

impl UnitScales {
    /// All ones (the standard parametrization) for a model of `n_layer` blocks over `n` rows.
    pub fn identity(n_layer: usize, n: usize) -> Self {
        Self {
            embed: 1.0,
            embed_grads: (1.0, 1.0),
            linear: [1.0; 4],
            weight_grad: 1.0,
            head: 1.0,
            attention: 1.0,
            gelu: 1.0,
            residual: vec![(1.0, 1.0); 2 * n_layer],
            norm_grad: 1.0,
            loss_grad: 1.0 / n as f32,
        }
    }

    /// The unit scales of a GPT-2 of width `c`, `n_layer` blocks, context `block_size`,
    /// vocabulary `vocab` (real tokens), for batches of `b` sequences of `n / b` tokens.
    pub fn unit(
        c: usize,
        n_layer: usize,
        block_size: usize,
        vocab: usize,
        b: usize,
        n: usize,
    ) -> Self {
        let c = c as f64;
        let v = vocab.max(2) as f64;
        let n_rows = n.max(1) as f64;
        // Constrained matmul scale (fan_in·fan_out)^-¼.
        let gmean = |fan_in: f64, fan_out: f64| (fan_in * fan_out).powf(-0.25) as f32;
        let embed = std::f64::consts::FRAC_1_SQRT_2;
        let weight_grad = n_rows.powf(-0.5);
        let head = v.powf(-0.5);
        let t = block_size.max(1) as f64;
        let harmonic: f64 = (1..=block_size.max(1)).map(|i| 1.0 / i as f64).sum();
        let residual = (1..=2 * n_layer)
            .map(|k| {
                // The embedding weighs as L terms, then k-1 branches: τ = 1/(L+k).
                let tau = 1.0 / ((n_layer + k) as f64);
                ((1.0 - tau).sqrt() as f32, tau.sqrt() as f32)
            })
            .collect();
        Self {
            embed: embed as f32,
            embed_grads: (
                (embed * weight_grad / head) as f32,
                (b.max(1) as f64).powf(-0.5) as f32,
            ),
            linear: [
                gmean(c, 3.0 * c),
                gmean(c, c),
                gmean(c, 4.0 * c),
                gmean(4.0 * c, c),
            ],
            weight_grad: weight_grad as f32,
            head: head as f32,
            attention: (t / (std::f64::consts::E * harmonic)).sqrt() as f32,
            gelu: (GELU_OUT_STD * GELU_GRAD_RMS).powf(-0.5) as f32,
            residual,
            norm_grad: weight_grad as f32,
            loss_grad: (v / (v - 1.0).sqrt()) as f32,
        }
    }
}

/// Per parameter (in `Gpt::param_specs` order), the factor that turns unit-parametrized
/// weights into a standard GPT-2 computing the same function, so checkpoints stay loadable by
/// Hugging Face `transformers` (and by halfling's other recipes).
///
/// Write the standard model's residual stream as `h' = c·h`. With `c₀ = √2` the embedding
/// tables carry over unchanged (the sum's 2^-½ is absorbed); the k-th weighted add
/// `h = s·h + r·f(h)` becomes the plain `h' = h' + f'(h')` with `c_{k+1} = c_k/s`, and since
/// every branch starts with a LayerNorm (scale-invariant up to its epsilon) `f'` is `f` times
/// `c_{k+1}·r`, folded into the branch's last linear layer (weight and bias). Each linear's
/// `α`, attention's output scale and GELU's scale fold into the next weight matrix, and the
/// head's `α` into `ln_f`'s gain and bias (the head is tied to `wte`, which stays as it is).
pub fn fold_factors(c: usize, n_layer: usize, block_size: usize, vocab: usize) -> Vec<f64> {
    // Batch-dependent scales only touch gradients; any batch gives the same forward scales.
    let us = UnitScales::unit(c, n_layer, block_size, vocab, 1, 1);
    let f = |x: f32| f64::from(x);
    let mut out = vec![1.0, 1.0]; // wte, wpe
    let mut stream = std::f64::consts::SQRT_2; // c₀
    for l in 0..n_layer {
        let mut branch_out = |k: usize| {
            let (skip, branch) = us.residual[k];
            stream /= f(skip);
            stream * f(branch)
        };
        let attn = branch_out(2 * l);
        let mlp = branch_out(2 * l + 1);
        out.extend([
            1.0,                                      // ln_1.weight
            1.0,                                      // ln_1.bias
            f(us.linear[0]),                          // attn.c_attn.weight
            1.0,                                      // attn.c_attn.bias
            attn * f(us.linear[1]) * f(us.attention), // attn.c_proj.weight
            attn,                                     // attn.c_proj.bias
            1.0,                                      // ln_2.weight
            1.0,                                      // ln_2.bias
            f(us.linear[2]),                          // mlp.c_fc.weight
            1.0,                                      // mlp.c_fc.bias
            mlp * f(us.linear[3]) * f(us.gelu),       // mlp.c_proj.weight
            mlp,                                      // mlp.c_proj.bias
        ]);
    }
    out.extend([f(us.head), f(us.head)]); // ln_f gain and bias
    out
}

/// `values` (unit-parametrized, one vector per parameter) as a standard GPT-2.
pub fn fold(values: &[Vec<f32>], factors: &[f64]) -> Vec<Vec<f32>> {
    values
        .iter()
        .zip(factors)
        .map(|(v, &k)| v.iter().map(|&x| (f64::from(x) * k) as f32).collect())
        .collect()
}

/// The inverse of [`fold`]: standard GPT-2 weights as the unit-scaled model's.
pub fn unfold(values: &[Vec<f32>], factors: &[f64]) -> Vec<Vec<f32>> {
    values
        .iter()
        .zip(factors)
        .map(|(v, &k)| v.iter().map(|&x| (f64::from(x) / k) as f32).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GELU constants are the moments of the (tanh-approximated) GELU under N(0, 1).
    #[test]
    fn gelu_constants_are_the_unit_normal_moments() {
        let gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let (a, b, steps) = (-12.0f64, 12.0f64, 200_000);
        let dx = (b - a) / steps as f64;
        let (mut m, mut s2, mut g2) = (0.0, 0.0, 0.0);
        for i in 0..=steps {
            let x = a + i as f64 * dx;
            let w = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * dx;
            let d = (gelu(x + 1e-5) - gelu(x - 1e-5)) / 2e-5;
            m += gelu(x) * w;
            s2 += gelu(x) * gelu(x) * w;
            g2 += d * d * w;
        }
        assert!(((s2 - m * m).sqrt() - GELU_OUT_STD).abs() < 1e-5);
        assert!((g2.sqrt() - GELU_GRAD_RMS).abs() < 1e-5);
    }

    #[test]
    fn residuals_weight_the_embedding_as_all_branches_of_one_kind() {
        let n_layer = 4;
        let s = UnitScales::unit(128, n_layer, 64, 65, 12, 768);
        // Squared weights of the embedding and of each branch in the stream. After k adds the
        // stream is (√L·embedding + k branches)/√(L+k): every branch has variance share
        // 1/(L+k), the embedding L/(L+k), and the shares sum to 1.
        let l = n_layer as f64;
        let mut shares = vec![1.0f64];
        for &(skip, branch) in &s.residual {
            let (skip, branch) = (f64::from(skip), f64::from(branch));
            assert!((skip * skip + branch * branch - 1.0).abs() < 1e-6);
            shares.iter_mut().for_each(|w| *w *= skip * skip);
            shares.push(branch * branch);
            let total = l + (shares.len() - 1) as f64;
            assert!((shares[0] - l / total).abs() < 1e-6);
            assert!(shares[1..].iter().all(|w| (w - 1.0 / total).abs() < 1e-6));
        }
        // At the end embedding, attention and MLP branches each hold a third.
        let attn: f64 = shares[1..].iter().step_by(2).sum();
        let mlp: f64 = shares[2..].iter().step_by(2).sum();
        for part in [shares[0], attn, mlp] {
            assert!((part - 1.0 / 3.0).abs() < 1e-6, "{shares:?}");
        }
        assert_eq!(s.residual.len(), 8);
        assert!((s.linear[0] - (128.0f32 * 384.0).powf(-0.25)).abs() < 1e-7);
        assert!((s.head - 65f32.powf(-0.5)).abs() < 1e-7);
        assert!((s.loss_grad - 65.0 / 64f32.sqrt()).abs() < 1e-5);
        let id = UnitScales::identity(4, 768);
        assert_eq!(id.loss_grad, 1.0 / 768.0);
    }
}
