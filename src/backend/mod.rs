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

use anyhow::Result;

use crate::numerics::{DType, TensorStats};

/// How one GEMM of a linear layer runs; the precision recipe decides (see `precision`).
///
/// `a` and `b` are the formats the two operands (in the order the op's doc writes the product)
/// are cast to before multiplying; usually their storage format, so no cast happens. FP8 operands
/// are scaled per tensor first (current scaling: the scale that maps the operand's amax near the
/// format's largest value), and the product is unscaled. Accumulation is always f32 or wider; the
/// output is rounded into its buffer's dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    /// Format of the first operand as the GEMM consumes it.
    pub a: DType,
    /// Format of the second operand.
    pub b: DType,
}

impl GemmSpec {
    /// Both operands in `dtype`.
    pub fn both(dtype: DType) -> Self {
        Self { a: dtype, b: dtype }
    }
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
}

/// A compute device: buffers plus the op set of a GPT training step.
pub trait Backend {
    /// A buffer of floating-point values stored in some [`DType`].
    type Buf;
    /// A buffer of token ids.
    type Tokens;

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

    /// Whether the backend can store and compute with `dtype` buffers.
    fn supports(&self, dtype: DType) -> bool {
        let _ = dtype;
        true
    }

    /// Per-kernel device time since the last call, as a table, when the backend was asked to
    /// profile (`HALFLING_CUDA_PROFILE=1` for CUDA); `None` otherwise.
    fn profile_report(&self) -> Result<Option<String>> {
        Ok(None)
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
    /// `out = a + b` (the residual connection).
    fn residual_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `buf *= factor`.
    fn scale(&self, buf: &mut Self::Buf, factor: f32) -> Result<()>;
    /// `out = gelu(inp)` with the tanh approximation.
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf) -> Result<()>;
    /// `d = gelu'(inp) ⊙ d` in place (`d` holds the output gradient on entry, the input gradient
    /// on return).
    fn gelu_backward(&self, d: &mut Self::Buf, inp: &Self::Buf) -> Result<()>;
    /// Inverted dropout in place with a counter-based mask derived from `seed`.
    fn dropout_forward(&self, x: &mut Self::Buf, p: f32, seed: u64) -> Result<()>;
    /// Backward of [`Backend::dropout_forward`] with the same `p` and `seed`, in place.
    fn dropout_backward(&self, dx: &mut Self::Buf, p: f32, seed: u64) -> Result<()>;

    // ---- layers ----------------------------------------------------------------------------

    /// `out[n, oc] = inp[n, ic] · w[oc, ic]ᵀ + bias[oc]` (`gemm.a` is inp's format, `gemm.b` w's).
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
    ) -> Result<()>;

    /// Backward of [`Backend::linear_forward`]: `dinp = dout · w` (overwritten; skipped when
    /// `None`) run as `dinp_gemm` (a = dout, b = w), `dw += doutᵀ · inp` run as `dw_gemm`
    /// (a = dout, b = inp), `dbias += Σ_rows dout`.
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
    ) -> Result<()>;

    /// The MLP's up-projection and its GELU: `pre = inp · wᵀ + bias` and `out = gelu(pre)`
    /// (both kept: the backward needs `pre`). Backends fuse the GELU into the GEMM's epilogue.
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
    ) -> Result<()> {
        self.linear_forward(pre, inp, w, bias, n, ic, oc, gemm)?;
        self.gelu_forward(out, pre)
    }

    /// Backward of `out = linear(gelu(pre))` (the MLP's down-projection): [`Backend::linear_backward`]
    /// with `inp = gelu_out = gelu(pre)`, except that the input gradient is carried through the
    /// GELU: `dpre = (dout · w) ⊙ gelu'(pre)` (overwritten).
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
        )?;
        self.gelu_backward(dpre, pre)
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

    /// `resid = a + b`, then [`Backend::layernorm_forward`] of `resid` into `out`: the residual
    /// add that closes a block's branch, fused with the LayerNorm that opens the next one.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        resid: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.residual_forward(resid, a, b)?;
        self.layernorm_forward(out, mean, rstd, resid, weight, bias, n, c)
    }

    /// Backward of LayerNorm. `dinp += …` so it adds straight into the residual-stream gradient;
    /// `dweight += …`, `dbias += …`.
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
    ) -> Result<()>;

    /// Fused causal self-attention over `qkv[b, t, 3c]` with `nh` heads; writes `out[b, t, c]`
    /// and the per-row log-sum-exp `lse[b, nh, t]` (f32) that the backward needs.
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
    ) -> Result<()>;

    /// Backward of attention: overwrites `dqkv`.
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
    ) -> Result<()>;

    /// `out[b·t, c] = wte[token] + wpe[position]`.
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
    ) -> Result<()>;

    /// Backward of the embeddings: `dwte += …`, `dwpe += …`.
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
