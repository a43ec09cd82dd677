//! The boundary between the model and the hardware: one trait, [`Backend`].
//!
//! A backend owns device buffers (allocate, upload, download) and implements the op set, which is
//! exactly the kernel list of a GPT training step: linear layers (GEMMs with bias), layernorm,
//! GELU, fused causal attention, embeddings, the fused classifier, dropout, AdamW and the grad
//! norm. Model code is generic over `B: Backend`; the CLI picks the backend at run time.
//!
//! Conventions every implementation follows:
//! - Buffers are flat, row-major, and carry a storage [`DType`]. Ops read any dtype, compute in
//!   f32 (or wider), and round results into the dtype of the buffer they write. This is how
//!   "low-precision storage, f32 accumulation" is expressed without a dtype per op.
//! - Sizes are passed explicitly and checked against buffer lengths by the implementation
//!   (`debug_assert` at least); model code is the only caller.
//! - Gradients of parameters are always *accumulated* (`+=`), so micro-batches add up; gradients
//!   of activations are overwritten unless the op says otherwise.
//! - Ops are deterministic: the same inputs give the same bits.
//!
//! [`cuda::CudaBackend`] runs the same ops on an NVIDIA GPU.
//!
//! [`cpu::CpuBackend`] is the reference implementation, generic over its element type: in `f32`
//! it trains, in `f64` it is the reference that gradient checks and `halfling selftest` compare
//! against.

pub mod cpu;
pub mod cuda;

use anyhow::{bail, Result};

use crate::numerics::{DType, TensorStats};

/// The mask seed of the dropout at `site` for a micro-batch seeded `seed` (splitmix64's
/// finalizer of the two, so neighbouring sites and seeds get unrelated masks); the CUDA
/// kernels form the same value on the device.
pub fn dropout_site_seed(seed: u64, site: u64) -> u64 {
    let mut z = seed ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How one GEMM of a linear layer runs; the precision recipe and the model decide (see
/// `precision`).
///
/// The product is `alpha · op(a) · op(b)`, accumulated in f32 or wider and rounded into the output
/// buffer's dtype (a bias, where the op has one, is added after `alpha`). Each operand is first
/// cast to its [`GemmOperand::format`] (usually its storage format, so no cast happens); an FP8
/// operand is scaled per tensor on the way, `q = satfinite(round(x · s))`, and the product is
/// unscaled by `1/(s_a·s_b)`, which is exact because scales are powers of two. This is the shape
/// of a cuBLASLt FP8 matmul: per-tensor scale pointers for A and B, `alpha`, and an amax output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    /// The first operand (in the order the op's doc writes the product).
    pub a: GemmOperand,
    /// The second operand.
    pub b: GemmOperand,
    /// Multiplies the product (unit scaling's op scale); 1 otherwise.
    pub alpha: f32,
}

impl GemmSpec {
    /// Both operands in `dtype`, current scaling if that is FP8, `alpha = 1`.
    pub fn both(dtype: DType) -> Self {
        Self::new(GemmOperand::plain(dtype), GemmOperand::plain(dtype))
    }

    /// Operands `a` and `b`, `alpha = 1`.
    pub fn new(a: GemmOperand, b: GemmOperand) -> Self {
        Self { a, b, alpha: 1.0 }
    }

    /// The same GEMM with the product multiplied by `alpha`.
    pub fn with_alpha(self, alpha: f32) -> Self {
        Self { alpha, ..self }
    }
}

/// One operand of a GEMM: the format it is multiplied in, its FP8 scale, and where its amax goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmOperand {
    /// Format the operand is cast to before multiplying.
    pub format: DType,
    /// How an FP8 operand is scaled (ignored for wider formats, which are rounded unscaled).
    pub scale: OperandScale,
    /// Where to record the operand's amax (max |x| before scaling, max-accumulated) in the
    /// `amax` buffer the linear ops take; `None`: not recorded.
    pub amax_slot: Option<usize>,
    /// Lets a backend keep this operand's cast copy for later GEMMs (see [`KeepToken`]);
    /// `None`: cast it where it is read.
    pub keep: Option<KeepToken>,
}

impl GemmOperand {
    /// `format`, current scaling without margin, amax not recorded, nothing kept.
    pub fn plain(format: DType) -> Self {
        Self {
            format,
            scale: OperandScale::Current { margin: 0 },
            amax_slot: None,
            keep: None,
        }
    }
}

/// The caller's promise about a cast GEMM operand, so a backend may cast a tensor once and reuse
/// the copy (a weight in every micro-batch's forward and in its input-gradient GEMM, an
/// activation in the forward and in the weight-gradient GEMM) instead of casting it again.
///
/// Every operand that carries an equal token (same `id`, `version` and `amax_epoch`) reads a
/// tensor with the same contents; and while `amax_epoch` is unchanged, an amax recorded under the
/// token is still in the amax buffer (nobody cleared it). A backend that reuses a copy checks the
/// rest itself (same buffer and shape, format, scale and amax slot) and records nothing again.
/// Backends are free to ignore tokens (the CPU does): the product is the same either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeepToken {
    /// Which tensor, among those one caller keeps.
    pub id: u32,
    /// Changes whenever the tensor's contents may have changed.
    pub version: u64,
    /// Changes whenever the amax buffer may have been cleared or replaced.
    pub amax_epoch: u64,
}

/// The per-tensor scale of an FP8 GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OperandScale {
    /// Current scaling: `numerics::scale_from_amax(amax(x), format, margin)` from the operand's
    /// own amax, computed by the backend before the cast.
    Current {
        /// Power-of-two headroom below the format's max.
        margin: i32,
    },
    /// A scale chosen by the caller: delayed scaling's (from the amax history of earlier steps)
    /// or unit scaling's static 1. Must be a finite, positive power of two.
    Fixed(f32),
}

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate for this step (already scheduled).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay of the tensors that decay.
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Multiplier applied to the gradient first (clipping and averaging).
    pub grad_scale: f32,
    /// `Some(seed)`: bf16 compute copies are rounded stochastically, element `i` of the `t`-th
    /// tensor of the update with the bits `cpu::kernels::rounding_bits(rounding_key(seed, step,
    /// t), i)`; `None`: round to nearest even.
    pub rounding_seed: Option<u64>,
}

/// One tensor of an AdamW step: the f32 master weights, their gradient, the two moments, and
/// optionally the low-precision copy the forward pass reads (rounded from the updated weights).
pub struct AdamWTensor<'a, Buf> {
    /// f32 master weights, updated in place.
    pub param: &'a mut Buf,
    /// Their gradient (scaled by [`AdamW::grad_scale`] first).
    pub grad: &'a Buf,
    /// First moment.
    pub m: &'a mut Buf,
    /// Second moment.
    pub v: &'a mut Buf,
    /// Compute copy to refresh from the updated weights.
    pub compute_copy: Option<&'a mut Buf>,
    /// Whether decoupled weight decay applies (not to biases and norms).
    pub decay: bool,
    /// This tensor's learning rate is `lr_scale · lr` and its weight decay `weight_decay /
    /// lr_scale` (so their product stays the same): unit scaling's per-tensor rates; 1 otherwise.
    pub lr_scale: f32,
}

impl<Buf> AdamWTensor<'_, Buf> {
    /// This tensor's decoupled weight decay under `hp`: `hp.weight_decay / lr_scale` if it
    /// decays (so `lr · weight_decay` does not depend on `lr_scale`), else 0.
    pub fn weight_decay(&self, hp: &AdamW) -> f32 {
        if self.decay {
            hp.weight_decay / self.lr_scale
        } else {
            0.0
        }
    }
}

/// Checks the operands of a linear + classifier op ([`Backend::linear_crossentropy_forward_backward`])
/// and returns the rows its logits scratch holds: the chunk it works through the `n` rows with.
/// Its GEMMs must run in the inputs' own format, as the LM head's do (a chunk-wise amax would
/// not be the tensor's).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_crossentropy_chunk<B: Backend + ?Sized>(
    backend: &B,
    logits: &B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    losses: &B::Buf,
    (n, c, vp): (usize, usize, usize),
    gemms: &[GemmSpec],
) -> Result<usize> {
    let t = backend.dtype(x);
    if let Some(g) = gemms.iter().find(|g| g.a.format != t || g.b.format != t) {
        bail!(
            "internal error: the LM head's inputs are {t}, its GEMMs run in {}",
            g.a.format
        );
    }
    let sizes = [
        ("head input", x, t, n * c),
        ("head weight", w, t, vp * c),
        ("classifier losses", losses, DType::F32, n),
    ];
    for (what, buf, dtype, len) in sizes {
        if backend.dtype(buf) != dtype || backend.len(buf) != len {
            bail!(
                "internal error: {what} is {} x {}, the op expects {dtype} x {len}",
                backend.dtype(buf),
                backend.len(buf)
            );
        }
    }
    let len = backend.len(logits);
    if backend.dtype(logits) != t || len < vp || len % vp != 0 {
        bail!(
            "internal error: logits scratch is {} x {len}, not whole {t} rows of {vp}",
            backend.dtype(logits)
        );
    }
    Ok((len / vp).min(n).max(1))
}

/// GELU's output as [`Backend::mlp_backward`] gets it: `Stored` by the forward
/// ([`Backend::mlp_forward`] returned `true`), or `Deferred`: a buffer of its shape whose
/// contents are not GELU's output (the forward did not write it, or a recomputing model never
/// kept it), which the backend fills with `gelu_scale · gelu(pre)` before anything reads it.
pub enum GeluOut<'a, Buf> {
    Stored(&'a Buf),
    Deferred(&'a mut Buf),
}

/// [`Backend::mlp_forward`] as two ops: [`Backend::linear_gelu_forward`] of linear₁ into `pre`
/// and `gelu_out`, then [`Backend::linear_forward`] of linear₂ reading `gelu_out`. Returns
/// `true` (`gelu_out` written). Backends that override the op fall back to this where they
/// cannot fuse.
#[allow(clippy::too_many_arguments)]
pub fn mlp_forward_composed<B: Backend + ?Sized>(
    backend: &B,
    out: &mut B::Buf,
    pre: &mut B::Buf,
    gelu_out: &mut B::Buf,
    inp: &B::Buf,
    (w1, b1): (&B::Buf, Option<&B::Buf>),
    (w2, b2): (&B::Buf, Option<&B::Buf>),
    (n, c, h): (usize, usize, usize),
    [fc, fcproj]: [GemmSpec; 2],
    mut amax: Option<&mut B::Buf>,
    gelu_scale: f32,
) -> Result<bool> {
    backend.linear_gelu_forward(
        gelu_out,
        pre,
        inp,
        w1,
        b1,
        n,
        c,
        h,
        fc,
        amax.as_deref_mut(),
        gelu_scale,
    )?;
    backend.linear_forward(out, gelu_out, w2, b2, n, h, c, fcproj, amax)?;
    Ok(true)
}

/// [`Backend::mlp_backward`] as two ops: [`Backend::linear_gelu_backward`] of linear₂ into
/// `dhidden` (which then holds `dpre`), and [`Backend::linear_backward`] of linear₁ reading it.
/// Backends that override the op fall back to this where they cannot fuse.
#[allow(clippy::too_many_arguments)]
pub fn mlp_backward_composed<B: Backend + ?Sized>(
    backend: &B,
    dinp: &mut B::Buf,
    dhidden: &mut B::Buf,
    (dw1, db1): (&mut B::Buf, Option<&mut B::Buf>),
    (dw2, db2): (&mut B::Buf, Option<&mut B::Buf>),
    dout: &B::Buf,
    (inp, pre, gelu_out): (&B::Buf, &B::Buf, GeluOut<'_, B::Buf>),
    (w1, w2): (&B::Buf, &B::Buf),
    (n, c, h): (usize, usize, usize),
    gemms: [GemmSpec; 4],
    mut amax: Option<&mut B::Buf>,
    gelu_scale: f32,
) -> Result<()> {
    let [dx2, dw2_gemm, dx1, dw1_gemm] = gemms;
    let gelu_out: &B::Buf = match gelu_out {
        GeluOut::Stored(g) => g,
        GeluOut::Deferred(g) => {
            backend.gelu_forward(g, pre, gelu_scale)?;
            g
        }
    };
    backend.linear_gelu_backward(
        dhidden,
        dw2,
        db2,
        dout,
        gelu_out,
        pre,
        w2,
        n,
        h,
        c,
        dx2,
        dw2_gemm,
        amax.as_deref_mut(),
        gelu_scale,
    )?;
    backend.linear_backward(
        Some(dinp),
        dw1,
        db1,
        dhidden,
        inp,
        w1,
        n,
        c,
        h,
        dx1,
        dw1_gemm,
        amax,
    )
}

/// A compute device: buffers plus the op set of a GPT training step.
pub trait Backend {
    /// A buffer of floating-point values stored in some [`DType`].
    type Buf;
    /// A buffer of token ids.
    type Tokens;
    /// Device work recorded once and replayed (a CUDA graph); `()` where there is none.
    type Graph;
    /// A micro-batch's random seed where the kernels read it (device memory on a GPU), so
    /// that recorded work replays with each micro-batch's own seed.
    type Seed;

    /// Human-readable device description, e.g. `cpu (2 threads)`.
    fn describe(&self) -> String;
    /// Short backend name: `cpu` or `cuda`.
    fn kind(&self) -> &'static str;

    // ---- memory ----------------------------------------------------------------------------

    /// A zero-filled buffer of `len` elements stored as `dtype`.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buf>;
    /// A zero-filled token buffer of `len` ids.
    fn alloc_tokens(&self, len: usize) -> Result<Self::Tokens>;
    /// Number of elements in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Storage format of `buf`.
    fn dtype(&self, buf: &Self::Buf) -> DType;
    /// Copies `src` into `dst` (same length), rounding into `dst`'s dtype.
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    /// Copies `src` into a token buffer of the same length.
    fn upload_tokens(&self, dst: &mut Self::Tokens, src: &[u32]) -> Result<()>;
    /// A seed holder, initially 0.
    fn alloc_seed(&self) -> Result<Self::Seed>;
    /// Sets the seed the next queued ops read from `dst`.
    fn upload_seed(&self, dst: &mut Self::Seed, seed: u64) -> Result<()>;
    /// Reads `len` elements starting at `offset`, widened to f32.
    fn download_range(&self, src: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// Reads the whole buffer, widened to f32.
    fn download(&self, src: &Self::Buf) -> Result<Vec<f32>> {
        self.download_range(src, 0, self.len(src))
    }
    /// Waits until all queued work is done.
    fn synchronize(&self) -> Result<()>;
    /// Highest number of bytes held in buffers at once so far.
    fn peak_mem_bytes(&self) -> u64;
    /// Statistics of each buffer's values in its storage format (the numerics monitor). Backends
    /// override it to reduce on the device and read back a few numbers instead of every value.
    fn tensor_stats(&self, bufs: &[&Self::Buf]) -> Result<Vec<TensorStats>> {
        bufs.iter()
            .map(|b| Ok(TensorStats::of(&self.download(b)?, self.dtype(b))))
            .collect()
    }

    /// An error, saying what to change, when the attention ops cannot run `n_head` heads over a
    /// width of `n_embd` (checked when a model is built, before any data reaches it).
    fn check_attention_shape(&self, n_embd: usize, n_head: usize) -> Result<()> {
        let _ = (n_embd, n_head);
        Ok(())
    }

    /// Whether the backend can store and compute with `dtype` buffers.
    fn supports(&self, dtype: DType) -> bool {
        let _ = dtype;
        true
    }

    /// Whether the backend can cast `tensors` (a storage format it supports) to the narrower
    /// GEMM operand format `operand` (FP8) inside the linear ops.
    fn casts_for_gemm(&self, tensors: DType, operand: DType) -> bool {
        let _ = (tensors, operand);
        true
    }

    /// Per-kernel device time since the last call, as a table, when the backend was asked to
    /// profile (`HALFLING_CUDA_PROFILE=1` for CUDA); `None` otherwise.
    fn profile_report(&self) -> Result<Option<String>> {
        Ok(None)
    }

    // ---- recorded work (CUDA graphs) -------------------------------------------------------

    /// Whether [`Backend::record_graph`] is available (and not switched off).
    fn records_graphs(&self) -> bool {
        false
    }
    /// Records the device work `body` queues, without running it, for
    /// [`Backend::replay_graph`]. `body`'s host-side effects happen once, now, and it must read
    /// nothing back from the device; buffers it addresses must outlive the recording.
    fn record_graph(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph> {
        let _ = body;
        bail!(
            "internal error: the {} backend records no graphs",
            self.kind()
        )
    }
    /// Queues the recorded work again (after all work queued before).
    fn replay_graph(&self, graph: &Self::Graph) -> Result<()> {
        let _ = graph;
        bail!(
            "internal error: the {} backend records no graphs",
            self.kind()
        )
    }
    /// A counter that changes whenever the backend replaces memory or state a recording may
    /// address (scratch grown, a kernel table re-uploaded, a GEMM plan made or tuned): a graph
    /// recorded at another value must not be replayed, and work that changed it is not yet
    /// settled enough to record.
    fn graph_epoch(&self) -> u64 {
        0
    }
    /// Dense matrix-multiply peak of this device in FLOP/s for `dtype` inputs, used for MFU.
    fn peak_flops(&self, dtype: DType) -> f64;

    // ---- elementwise -----------------------------------------------------------------------

    /// Sets every element to `value`.
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// Sets every element of every buffer to zero (GPUs: one launch for all of them).
    fn zero(&self, bufs: &mut [Self::Buf]) -> Result<()> {
        for buf in bufs {
            self.fill(buf, 0.0)?;
        }
        Ok(())
    }
    /// `dst = src`, rounding into `dst`'s dtype (same length).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `out = sa·a + sb·b` with `scales = (sa, sb)`: the residual connection, a weighted add
    /// under unit scaling and a plain sum (`(1, 1)`) otherwise.
    fn residual_forward(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        scales: (f32, f32),
    ) -> Result<()>;
    /// `buf *= factor`.
    fn scale(&self, buf: &mut Self::Buf, factor: f32) -> Result<()>;
    /// `out = scale · gelu(inp)` with the tanh approximation (`scale` is 1 outside unit scaling).
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf, scale: f32) -> Result<()>;
    /// `d = scale · gelu'(inp) ⊙ d` in place (`d` holds the output gradient on entry, the input
    /// gradient on return): the exact derivative of the forward with the same `scale`.
    fn gelu_backward(&self, d: &mut Self::Buf, inp: &Self::Buf, scale: f32) -> Result<()>;
    /// Inverted dropout in place with a counter-based mask keyed by
    /// [`dropout_site_seed`]`(seed, site)`: the micro-batch's seed, read where the op runs, and
    /// the fixed `site` of this dropout in the model.
    fn dropout_forward(
        &self,
        x: &mut Self::Buf,
        p: f32,
        seed: &Self::Seed,
        site: u64,
    ) -> Result<()>;
    /// Backward of [`Backend::dropout_forward`] with the same `p`, `seed` and `site`: `dx` =
    /// `dy` with the mask applied (same length; one pass, no copy of `dy` first).
    fn dropout_backward(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        p: f32,
        seed: &Self::Seed,
        site: u64,
    ) -> Result<()>;

    // ---- layers ----------------------------------------------------------------------------

    /// `out[n, oc] = alpha · inp[n, ic] · w[oc, ic]ᵀ + bias[oc]` run as `gemm` (a = inp, b = w).
    /// Operands with an `amax_slot` record their amax into `amax` (an f32 buffer):
    /// `amax[slot] = max(amax[slot], max|x|)`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: GemmSpec,
        amax: Option<&mut Self::Buf>,
    ) -> Result<()>;

    /// Backward of [`Backend::linear_forward`]: `dinp = alpha · dout · w` (overwritten; skipped
    /// when `None`) run as `dinp_gemm` (a = dout, b = w), `dw += alpha · doutᵀ · inp` run as
    /// `dw_gemm` (a = dout, b = inp), `dbias += dw_gemm.alpha · Σ_rows dout` (the bias is a
    /// weight column fed by ones). Amax slots as in the forward.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dinp: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
        dinp_gemm: GemmSpec,
        dw_gemm: GemmSpec,
        amax: Option<&mut Self::Buf>,
    ) -> Result<()>;

    /// The MLP's up-projection and its GELU: [`Backend::linear_forward`] into `pre`, then
    /// `out = gelu_scale · gelu(pre)` (both kept: the backward needs `pre`). Backends fuse the
    /// GELU into the GEMM's epilogue.
    #[allow(clippy::too_many_arguments)]
    fn linear_gelu_forward(
        &self,
        out: &mut Self::Buf,
        pre: &mut Self::Buf,
        inp: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: GemmSpec,
        amax: Option<&mut Self::Buf>,
        gelu_scale: f32,
    ) -> Result<()> {
        self.linear_forward(pre, inp, w, bias, n, ic, oc, gemm, amax)?;
        self.gelu_forward(out, pre, gelu_scale)
    }

    /// Backward of `out = linear(gelu(pre))` (the MLP's down-projection): [`Backend::linear_backward`]
    /// with `inp = gelu_out = gelu(pre)`, except that the input gradient is carried through the
    /// GELU of [`Backend::linear_gelu_forward`]: `dpre = gelu_scale · gelu'(pre) ⊙ (alpha ·
    /// dout · w)` (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn linear_gelu_backward(
        &self,
        dpre: &mut Self::Buf,
        dw: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        gelu_out: &Self::Buf,
        pre: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
        dinp_gemm: GemmSpec,
        dw_gemm: GemmSpec,
        amax: Option<&mut Self::Buf>,
        gelu_scale: f32,
    ) -> Result<()> {
        self.linear_backward(
            Some(dpre),
            dw,
            dbias,
            dout,
            gelu_out,
            w,
            n,
            ic,
            oc,
            dinp_gemm,
            dw_gemm,
            amax,
        )?;
        self.gelu_backward(dpre, pre, gelu_scale)
    }

    /// Whether [`Backend::mlp_forward`] with these forward GEMMs on `act` tensors is meant to
    /// write GELU's output (the default, true). A backend that applies GELU where linear₂ reads
    /// it says false, and a model then keeps no GELU buffer per layer for the backward: one
    /// shared buffer serves where the backend must form the values after all.
    fn mlp_forward_writes_gelu(&self, act: DType, gemms: [GemmSpec; 2]) -> bool {
        let _ = (act, gemms);
        true
    }

    /// The MLP `out = linear₂(gelu(linear₁(inp)))` (`inp` [n, c], linear₁ `c` → `h` with
    /// `w1`, `b1`, linear₂ `h` → `c` with `w2`, `b2`; `gemms` their forward GEMMs): `pre =
    /// linear₁(inp)` [n, h] and `out` [n, c] overwritten. Returns whether `gelu_out` [n, h] now
    /// holds `gelu_scale · gelu(pre)`: the default ([`mlp_forward_composed`]) always writes it; a
    /// backend may instead apply GELU where linear₂'s GEMM reads it (CUDA's FP8 input cast, whose
    /// kept codes the backward's weight gradient reads) and return `false`, leaving `gelu_out`'s
    /// contents unspecified: the caller then hands it to [`Backend::mlp_backward`] as
    /// [`GeluOut::Deferred`].
    #[allow(clippy::too_many_arguments)]
    fn mlp_forward(
        &self,
        out: &mut Self::Buf,
        pre: &mut Self::Buf,
        gelu_out: &mut Self::Buf,
        inp: &Self::Buf,
        w1: (&Self::Buf, Option<&Self::Buf>),
        w2: (&Self::Buf, Option<&Self::Buf>),
        sizes: (usize, usize, usize),
        gemms: [GemmSpec; 2],
        amax: Option<&mut Self::Buf>,
        gelu_scale: f32,
    ) -> Result<bool> {
        mlp_forward_composed(
            self, out, pre, gelu_out, inp, w1, w2, sizes, gemms, amax, gelu_scale,
        )
    }

    /// Backward of the MLP `out = linear₂(gelu(linear₁(inp)))` as [`Backend::mlp_forward`]
    /// ran it (`pre = linear₁(inp)`, and `gelu_out` as [`GeluOut`] says): from `dout` [n, c] to
    /// `dinp` [n, c] (overwritten), `dw1 += …` and `db1 += …` of linear₁ (`c` → `h`), `dw2 +=
    /// …` and `db2 += …` of linear₂ (`h` → `c`). `gemms` are linear₂'s input- and weight-gradient GEMMs,
    /// then linear₁'s. `dhidden` [n, h] is scratch: its contents on return are unspecified
    /// (the gradient of `pre` or of `gelu_out`), so no caller may read it. The default is
    /// [`mlp_backward_composed`]; a backend may instead apply the GELU derivative where linear₁'s
    /// GEMMs read the hidden gradient (CUDA's FP8 casts), which saves writing `dpre` and reading
    /// it again. A [`GeluOut::Deferred`] buffer's contents on return are unspecified too.
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        dinp: &mut Self::Buf,
        dhidden: &mut Self::Buf,
        (dw1, db1): (&mut Self::Buf, Option<&mut Self::Buf>),
        (dw2, db2): (&mut Self::Buf, Option<&mut Self::Buf>),
        dout: &Self::Buf,
        (inp, pre, gelu_out): (&Self::Buf, &Self::Buf, GeluOut<'_, Self::Buf>),
        (w1, w2): (&Self::Buf, &Self::Buf),
        (n, c, h): (usize, usize, usize),
        gemms: [GemmSpec; 4],
        amax: Option<&mut Self::Buf>,
        gelu_scale: f32,
    ) -> Result<()> {
        mlp_backward_composed(
            self,
            dinp,
            dhidden,
            (dw1, db1),
            (dw2, db2),
            dout,
            (inp, pre, gelu_out),
            (w1, w2),
            (n, c, h),
            gemms,
            amax,
            gelu_scale,
        )
    }

    /// LayerNorm over rows of `c`; saves per-row `mean` and `rstd` (f32) for the backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// `resid = sa·a + sb·b` with `scales = (sa, sb)` (see [`Backend::residual_forward`]), then
    /// [`Backend::layernorm_forward`] of `resid` into `out`: the residual add that closes a
    /// block's branch, fused with the LayerNorm that opens the next one.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        resid: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        scales: (f32, f32),
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.residual_forward(resid, a, b, scales)?;
        self.layernorm_forward(out, mean, rstd, resid, weight, bias, n, c)
    }

    /// Backward of LayerNorm. `dinp += sx · …` so it adds straight into the residual-stream
    /// gradient; `dweight += sp · …`, `dbias += sp · …`, with `scales = (sx, sp)`: `(1, 1)` gives
    /// the exact gradients, unit scaling passes its residual-branch and parameter-gradient scales.
    ///
    /// With `res_bias = Some((db, s))`, also `db[j] += s · Σ_rows dinp[·, j]` of the *updated*
    /// `dinp` as stored (rounded to its dtype): the bias gradient that
    /// [`Backend::linear_backward`] adds for a linear whose output gradient `dout` is this
    /// `dinp`, with `s` that linear's `dw_gemm.alpha`, so the caller passes `None` there. A
    /// backend may form it in the same pass over the rows (CUDA) or after it (CPU).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
        scales: (f32, f32),
        res_bias: Option<(&mut Self::Buf, f32)>,
    ) -> Result<()>;

    /// Fused causal self-attention over `qkv[b, t, 3c]` with `nh` heads (scores scaled by
    /// `1/√(c/nh)`); writes `out[b, t, c]` times `out_scale` (1 outside unit scaling) and the
    /// per-row log-sum-exp `lse[b, nh, t]` (f32) that the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
    ) -> Result<()>;

    /// Backward of attention, the exact derivative of the forward with the same `out_scale`
    /// (which the saved `out` includes): overwrites `dqkv`.
    ///
    /// With `qkv_bias = Some((db, s))`, also `db[j] += s · Σ_rows dqkv[·, j]` (`db` of `3c`)
    /// of `dqkv` as stored (rounded to its dtype): the bias gradient that
    /// [`Backend::linear_backward`] adds for the QKV linear, whose output gradient `dout` is this
    /// `dqkv`, with `s` that linear's `dw_gemm.alpha`, so the caller passes `None` there. A
    /// backend may form it as the kernels write `dqkv` (CUDA, opt-in) or after them (CPU).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
        qkv_bias: Option<(&mut Self::Buf, f32)>,
    ) -> Result<()>;

    /// Whether a model should hand the QKV linear's bias gradient to
    /// [`Backend::attention_backward`] (true, the default: the same column sums of the same
    /// stored values) rather than to that linear's [`Backend::linear_backward`], for `act`
    /// tensors. A backend whose linear forms it more cheaply where its attention cannot (CUDA:
    /// the FP8 output-gradient casts sum as they read) says false.
    fn attention_forms_qkv_bias(&self, act: DType) -> bool {
        let _ = act;
        true
    }

    /// `out[b·t, c] = scale · (wte[token] + wpe[position])` (`scale` 1 outside unit scaling).
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &Self::Tokens,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        scale: f32,
    ) -> Result<()>;

    /// Backward of the embeddings: `dwte += s_te · Σ dout`, `dwpe += s_pe · Σ dout` with
    /// `scales = (s_te, s_pe)` (the forward scale times each table's gradient scale; `(1, 1)`
    /// outside unit scaling).
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
        dout: &Self::Buf,
        tokens: &Self::Tokens,
        b: usize,
        t: usize,
        c: usize,
        scales: (f32, f32),
    ) -> Result<()>;

    /// Fused classifier: per-row cross-entropy `losses[n]` (f32) of `logits[n, vp]` against
    /// `targets`, softmax over the first `v` columns only; `logits` is overwritten in place with
    /// `dloss · (softmax − onehot)` (padded columns get 0), so no probabilities are kept.
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_forward_backward(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        targets: &Self::Tokens,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
    ) -> Result<()>;

    /// Per-row cross-entropy without touching `logits` (evaluation).
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_forward(
        &self,
        losses: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Tokens,
        n: usize,
        v: usize,
        vp: usize,
    ) -> Result<()>;

    /// Whether [`Backend::linear_crossentropy_forward_backward`] and
    /// [`Backend::linear_crossentropy_forward`] take their `logits` scratch a chunk of rows at a
    /// time, so that it may hold fewer than `n` rows. Backends that do not need all `n · vp`.
    fn chunks_linear_crossentropy(&self) -> bool {
        false
    }

    /// The LM head and its classifier for training, in one op: `logits = x · wᵀ` run as `fwd`
    /// ([`Backend::linear_forward`] without bias, `x: [n, c]`, `w: [vp, c]`), then
    /// [`Backend::crossentropy_forward_backward`] with `dloss`, then `dx = dlogits · w`
    /// (overwritten) and `dw += dlogitsᵀ · x` run as `dinp_gemm` and `dw_gemm`
    /// ([`Backend::linear_backward`]). `logits` is scratch: a backend that
    /// [`Backend::chunks_linear_crossentropy`] works through the rows `len(logits) / vp` at a
    /// time (the full logits are a GPT's largest activation); others need all `n · vp`.
    #[allow(clippy::too_many_arguments)]
    fn linear_crossentropy_forward_backward(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        targets: &Self::Tokens,
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        gemms: [GemmSpec; 3],
        dloss: f32,
    ) -> Result<()> {
        let [fwd, dinp_gemm, dw_gemm] = gemms;
        self.linear_forward(logits, x, w, None, n, c, vp, fwd, None)?;
        self.crossentropy_forward_backward(losses, logits, targets, n, v, vp, dloss)?;
        self.linear_backward(
            Some(dx),
            dw,
            None,
            logits,
            x,
            w,
            n,
            c,
            vp,
            dinp_gemm,
            dw_gemm,
            None,
        )
    }

    /// The forward half of [`Backend::linear_crossentropy_forward_backward`] (evaluation):
    /// per-row cross-entropy `losses` of `x · wᵀ` run as `fwd`, with `logits` as scratch under
    /// the same rule.
    #[allow(clippy::too_many_arguments)]
    fn linear_crossentropy_forward(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        targets: &Self::Tokens,
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        fwd: GemmSpec,
    ) -> Result<()> {
        self.linear_forward(logits, x, w, None, n, c, vp, fwd, None)?;
        self.crossentropy_forward(losses, logits, targets, n, v, vp)
    }

    // ---- optimizer -------------------------------------------------------------------------

    /// One AdamW step over every tensor in `tensors` (GPUs do it in one launch). A tensor with
    /// `decay` gets `hp.weight_decay`, the others none.
    fn adamw_update(&self, tensors: &mut [AdamWTensor<'_, Self::Buf>], hp: &AdamW) -> Result<()>;

    /// Σ x² over the buffer, in f64.
    fn sum_squares(&self, buf: &Self::Buf) -> Result<f64>;

    /// Σ x² over all `bufs`, in f64 (the square of the global gradient norm). Backends override
    /// it to read the result back once instead of once per buffer.
    fn global_sum_squares(&self, bufs: &[Self::Buf]) -> Result<f64> {
        let mut total = 0.0;
        for buf in bufs {
            total += self.sum_squares(buf)?;
        }
        Ok(total)
    }
}
