//! FP8 linear layers on the GPU: the CUDA side of `GemmSpec`s with FP8 operands and amax slots.
//!
//! The semantics are the CPU reference's (`gemm_operand` in `backend/cpu`): an FP8 operand is
//! multiplied as `satfinite(round(x·s))/s`, with `s` from its own amax (`Current`) or given
//! (`Fixed`), and operands with an amax slot max-accumulate `max |x|` into the caller's amax
//! buffer. The tensors are bf16 (the `fp8` recipe) or f16 (`fp8-unit`), and the kernels of
//! `fp8.cu` come in both flavours (`_bf16`, `_f16`, picked by the tensor's dtype). Per operand:
//!
//! - `Current` scaling: `fp8_amax_partial` (per-block maxima), then `fp8_cast`, which reduces
//!   those maxima itself, derives the scale on the device (no host round trip) and writes `1/s`
//!   where cuBLASLt reads the operand's dequantization scale;
//! - `Fixed` scaling: one `fp8_cast` pass that casts and records the amax at once.
//!
//! cuBLASLt's FP8 GEMMs want both operands K-major, so the backward's operands are cast
//! transposed (`dy` once into both layouts when its two GEMMs read it the same way):
//!
//! | GEMM | a (K-major)        | b (K-major)         |
//! |------|--------------------|---------------------|
//! | `y = x·Wᵀ`   | x [n, ic]  | W [oc, ic]          |
//! | `dx = dy·W`  | dy [n, oc] | Wᵀ [ic, oc]         |
//! | `dW += dyᵀ·x`| dyᵀ [oc, n]| xᵀ [ic, n]          |
//!
//! FP8 GEMMs write their output in the tensors' format (bf16 or f16, bias of the same type) or,
//! for weight gradients, f32. A linear op whose GEMMs cuBLASLt cannot run in FP8 (a dimension
//! not a multiple of 16, a format pair it lacks, an epilogue it has no FP8 kernel for) runs the
//! same arithmetic as GEMMs in the tensors' format of the dequantized operands `q/s`, which that
//! format holds exactly (see `fp8_cast_T` in `fp8.cu`): same quantization, same f32
//! accumulation, only slower. `HALFLING_CUDA_FP8=0` forces that path (to compare). A GEMM
//! cuBLASLt planned but then refuses to run takes that path too, with a note on stderr.
//!
//! Scales reach cuBLASLt as device pointers (each in its own 256-byte aligned cell), so current
//! scaling needs no host round trip; `HALFLING_CUDA_FP8_SCALES=host` folds two `Fixed` scales
//! into the GEMM's `alpha` instead (delayed scaling's steady state), a second route to the same
//! product.
//!
//! The casts write into scratch buffers kept per role and grown to the largest shape seen, so a
//! training step allocates nothing after its first. Casts that need no dequantized copy run
//! `fp8_cast_tiled_T`, which writes both layouts from one read at close to copy bandwidth, for
//! bf16 and f16 tensors alike (`HALFLING_CUDA_FP8_F16_TILED=0` sends f16 casts through the
//! per-tensor `fp8_cast_f16` instead and keeps nothing of theirs, to compare).
//!
//! Operands with a [`KeepToken`] are cast once into a copy kept under the token (with its own
//! scale cell) and read from there by every later GEMM presenting the same token: a weight's
//! codes in both layouts (the forward of every micro-batch reads them row-major, the
//! input-gradient GEMM transposed), and an activation's transposed codes, written by the
//! forward's cast alongside the row-major ones it multiplies, for the weight-gradient GEMM. A
//! reused copy records no amax: the token promises the first cast's is still in the buffer. The
//! kept copies cost one byte per element of every block weight (twice) and of every linear
//! input of the pass; `HALFLING_CUDA_FP8_KEEP=0` turns them off.
//!
//! The MLP's backward (`fp8_mlp_backward`) hands the up-projection the gradient of the GELU's
//! output and lets its output-gradient cast apply the GELU derivative ([`DGeluCast`]): the
//! gradient of the pre-activation exists only as FP8 codes, never as a bf16 tensor written by
//! an in-place GELU backward and read back by the cast. `HALFLING_CUDA_FP8_DGELU_CAST=0` runs the
//! separate GELU backward instead.
//!
//! Its forward twin (`fp8_mlp_forward`): the up-projection's GEMM writes only `pre` (bias
//! epilogue, not GELU_AUX) and the down-projection's input cast forms GELU's output from `pre`
//! ([`CastOf::Gelu`]), keeping the transposed codes for the weight gradient under the GELU
//! output's name: that tensor is never written. The backward gets it as `GeluOut::Deferred` and
//! forms it ([`GeluPending`]) only where something would read it as stored (no kept codes, a
//! dequantized fallback, the composed ops). Only with kept copies on;
//! `HALFLING_CUDA_FP8_GELU_CAST=0` runs the GELU_AUX epilogue and a plain cast instead.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr};

use super::cublaslt::{Epilogue, Fp8Scales, Gemm, GemmType};
use super::{gemm_type, int, oom, op_scale, suffix, Arg, CudaBackend, CudaBuf};
use crate::backend::{GeluOut, GemmOperand, GemmSpec, KeepToken, OperandScale};
use crate::numerics::DType;

/// Blocks of `fp8_amax_partial_T` at most (the partials the cast kernel reduces).
const PARTIALS: usize = 1024;

/// Bytes between scale cells: cuBLASLt checks the alignment of every pointer it reads at run
/// time (a 4-byte-aligned scale pointer is a suspect for the `NOT_SUPPORTED` its FP8 GEMMs
/// returned on the H100), so each dequantization scale gets a 256-byte aligned cell of its own.
const CELL_STRIDE: usize = 256;

/// A scratch buffer of the FP8 path; each operand copy of one linear op has its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The forward's input (or the backward's, dequantized).
    X,
    /// The forward's weight.
    W,
    /// The output gradient, row-major.
    Dy,
    /// The output gradient transposed (or, dequantized, a second copy when the two backward
    /// GEMMs scale it differently).
    DyT,
    /// The weight transposed (or dequantized).
    WT,
    /// The input transposed (or dequantized).
    XT,
}

const ROLES: usize = 6;

/// Scratch memory of the FP8 path (see the module doc).
#[derive(Default)]
pub(super) struct Fp8Scratch {
    bufs: [Option<CudaSlice<u8>>; ROLES],
    /// `PARTIALS` f32 amax partials, then one f32 dequantization scale per role, each at the
    /// start of its own `CELL_STRIDE` bytes.
    cells: Option<CudaSlice<u8>>,
    /// Copies kept under [`KeepToken`]s, by token id.
    kept: HashMap<u32, Kept>,
}

/// An FP8 copy kept under a [`KeepToken`], with what it was cast from and how, so that a GEMM
/// presenting the same token can check it before reading it instead of casting again.
struct Kept {
    token: KeepToken,
    /// Address, shape and cast of the source tensor.
    src: u64,
    rows: usize,
    cols: usize,
    format: DType,
    scale: OperandScale,
    /// Where the cast recorded the amax (0: nowhere).
    amax_cell: u64,
    /// Which layouts the copy holds.
    plain: bool,
    transposed: bool,
    /// `[1/s: CELL_STRIDE bytes][transposed codes, padded to 256 bytes][row-major codes]`, one
    /// byte per code (allocated as a counted buffer, so peak memory includes it).
    buf: CudaBuf,
}

impl Kept {
    /// Bytes of a copy of `rows·cols` codes in one or two layouts.
    fn bytes(rows: usize, cols: usize, plain: bool) -> usize {
        let codes = (rows * cols).next_multiple_of(256);
        CELL_STRIDE + codes * if plain { 2 } else { 1 }
    }
}

/// An output gradient cast that applies the GELU derivative first: the tensor read is the
/// gradient of GELU's output, the one cast is `scale · gelu'(pre) ⊙ it` rounded to bf16 (what
/// `gelu_backward` would have stored), so the gradient of GELU's input is never written.
#[derive(Clone, Copy, Debug)]
pub(super) struct DGeluCast {
    /// GELU's input (bf16, the output gradient's shape).
    pre: u64,
    /// The GELU scale (1 outside unit scaling).
    scale: f32,
}

/// What a tiled bf16 cast casts when it is not the tensor it reads: the gradient of GELU's
/// input ([`DGeluCast`]), or GELU's output `scale·gelu(x)` rounded to bf16 (what `gelu_forward`
/// would have stored) from GELU's input `x`, so that GELU's output is never written.
#[derive(Clone, Copy, Debug)]
pub(super) enum CastOf {
    DGelu(DGeluCast),
    Gelu { scale: f32 },
}

/// A GELU output the MLP's FP8 forward did not write (its codes were cast from `pre`): the bf16
/// tensor at `at` (`len` elements) is to hold `scale·gelu(pre)` before anything reads it as
/// stored ([`CudaBackend::gelu_form`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct GeluPending {
    at: u64,
    pre: u64,
    scale: f32,
    len: usize,
}

/// Which FP8 GEMMs use cuBLASLt's fast accumulation: `HALFLING_CUDA_FP8_FAST_ACCUM` = `fwd`
/// (default: the forward GEMMs, as Transformer Engine does), `all` or `0`. The CPU reference
/// accumulates exactly; fast accumulation keeps fewer bits in the tensor cores' partial sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FastAccum {
    None,
    Forward,
    All,
}

impl FastAccum {
    pub(super) fn from_env() -> Self {
        match std::env::var("HALFLING_CUDA_FP8_FAST_ACCUM").as_deref() {
            Ok("0") | Ok("none") => FastAccum::None,
            Ok("all") => FastAccum::All,
            _ => FastAccum::Forward,
        }
    }
}

/// Whether a linear op's spec needs the FP8 path: an FP8 operand or an amax to record.
pub(super) fn involved(specs: &[GemmSpec]) -> bool {
    specs.iter().any(|s| {
        [s.a, s.b]
            .iter()
            .any(|o| o.format.is_float8() || o.amax_slot.is_some())
    })
}

/// cuBLASLt's FP8 type of an operand format.
fn fp8_type(format: DType) -> Option<GemmType> {
    match format {
        DType::F8E4M3 => Some(GemmType::F8E4M3),
        DType::F8E5M2 => Some(GemmType::F8E5M2),
        _ => None,
    }
}

/// `1/(s_a·s_b)` when both operands have `Fixed` scales and it is a normal f32 (powers of two,
/// so it is exact): what `HALFLING_CUDA_FP8_SCALES=host` folds into the GEMM's `alpha` instead
/// of passing scale pointers.
fn host_factor(spec: &GemmSpec) -> Option<f32> {
    let (OperandScale::Fixed(sa), OperandScale::Fixed(sb)) = (spec.a.scale, spec.b.scale) else {
        return None;
    };
    let factor = (1.0 / (f64::from(sa) * f64::from(sb))) as f32;
    factor.is_normal().then_some(factor)
}

/// Byte offset of role `role`'s scale cell from the partials (256-byte aligned).
fn scale_cell(role: usize) -> u64 {
    (PARTIALS * 4 + role * CELL_STRIDE) as u64
}

/// `format` code of `fp8.cu`.
fn format_code(format: DType) -> Result<i32> {
    match format {
        DType::F8E4M3 => Ok(0),
        DType::F8E5M2 => Ok(1),
        other => bail!("internal error: {other} is not an FP8 format"),
    }
}

/// The suffix of the `fp8.cu` kernels that read a tensor of `dtype` (bf16 or f16).
fn tensor_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 | DType::F16 => suffix(dtype),
        other => bail!(
            "the CUDA backend casts only bf16 and f16 tensors to FP8, not {other} (use the fp8 or fp8-unit recipe)"
        ),
    }
}

/// The format of a linear op's tensors (all the same, bf16 or f16): what the FP8 casts read and
/// what a GEMM of dequantized operands multiplies in.
fn tensors_type(tensors: &[&CudaBuf]) -> Result<GemmType> {
    let dtype = tensors.first().map_or(DType::BF16, |t| t.dtype);
    if let Some(other) = tensors.iter().find(|t| t.dtype != dtype) {
        bail!(
            "the CUDA backend's FP8 linear ops need one format for all tensors, not {dtype} and {}",
            other.dtype
        );
    }
    tensor_suffix(dtype)?;
    gemm_type(dtype)
}

impl CudaBackend {
    /// Device address of `role`'s scratch buffer, grown to at least `bytes`.
    fn fp8_buf(&self, role: Role, bytes: usize) -> Result<u64> {
        let mut scratch = self.fp8.borrow_mut();
        let slot = &mut scratch.bufs[role as usize];
        if slot.as_ref().map_or(true, |b| b.len() < bytes) {
            *slot = None;
            *slot = Some(
                self.stream
                    .alloc_zeros::<u8>(bytes.max(256))
                    .map_err(|e| oom(e, bytes, self.live.get()))?,
            );
        }
        let buf = slot
            .as_ref()
            .ok_or_else(|| anyhow!("internal error: FP8 scratch"))?;
        let (p, _sync) = buf.device_ptr(&self.stream);
        Ok(p)
    }

    /// Device address of the partials; [`scale_cell`] bytes further is a role's scale cell.
    fn fp8_cells(&self) -> Result<u64> {
        let mut scratch = self.fp8.borrow_mut();
        if scratch.cells.is_none() {
            let bytes = scale_cell(ROLES) as usize;
            scratch.cells = Some(
                self.stream
                    .alloc_zeros::<u8>(bytes)
                    .map_err(|e| oom(e, bytes, self.live.get()))?,
            );
        }
        let cells = scratch
            .cells
            .as_ref()
            .ok_or_else(|| anyhow!("internal error: FP8 cells"))?;
        let (p, _sync) = cells.device_ptr(&self.stream);
        Ok(p)
    }

    /// The address of `op`'s amax cell in `amax`, if it records one.
    fn amax_cell(&self, amax: Option<u64>, amax_len: usize, op: &GemmOperand) -> Result<u64> {
        match (op.amax_slot, amax) {
            (None, _) => Ok(0),
            (Some(slot), Some(base)) if slot < amax_len => Ok(base + 4 * slot as u64),
            (Some(slot), Some(_)) => {
                bail!("internal error: amax slot {slot} outside a buffer of {amax_len}")
            }
            // As on the CPU: a slot without a buffer records nothing.
            (Some(_), None) => Ok(0),
        }
    }

    /// Per-block maxima of `|x|` (with `of`: of the tensor that cast casts) into the
    /// partials; returns how many.
    fn fp8_amax_partials(&self, x: &CudaBuf, of: Option<&CastOf>) -> Result<usize> {
        let blocks = x.len.div_ceil(256 * 8).clamp(1, PARTIALS);
        let cells = self.fp8_cells()?;
        let grid = (blocks as u32, 1, 1);
        let (px, n) = (Arg::Ptr(self.ptr(x)?), Arg::U64(x.len as u64));
        match of {
            None => {
                let name = format!("fp8_amax_partial_{}", tensor_suffix(x.dtype)?);
                self.launch(&name, grid, 256, 0, &[Arg::Ptr(cells), px, n])?;
            }
            Some(CastOf::DGelu(g)) => {
                let (pre, scale) = (Arg::Ptr(g.pre), op_scale("GELU", g.scale)?);
                let args = [Arg::Ptr(cells), px, pre, scale, n];
                self.launch("fp8_amax_partial_dgelu_bf16", grid, 256, 0, &args)?;
            }
            Some(CastOf::Gelu { scale }) => {
                let args = [Arg::Ptr(cells), px, op_scale("GELU", *scale)?, n];
                self.launch("fp8_amax_partial_gelu_bf16", grid, 256, 0, &args)?;
            }
        }
        Ok(blocks)
    }

    /// Casts `x[rows, cols]` per `op` (an FP8 format): the codes into `plain` and/or transposed
    /// into `transposed`, or (`dequant`) the values `q/s` in `x`'s format into `plain`; `1/s` into the scale
    /// cell of `cell`; the amax into `amax_cell` (0: none). Returns the plain copy's address (or
    /// the transposed one's when there is no plain copy) and the scale cell's.
    #[allow(clippy::too_many_arguments)]
    fn fp8_cast(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        plain: Option<Role>,
        transposed: Option<Role>,
        dequant: bool,
        cell: Role,
        amax_cell: u64,
    ) -> Result<(Option<u64>, Option<u64>, u64)> {
        let kernel = format!("fp8_cast_{}", tensor_suffix(x.dtype)?);
        self.expect("FP8 GEMM operand", x, x.dtype, rows * cols)?;
        let format = format_code(op.format)?;
        let (partials, num_partials, fixed, margin) = self.fp8_scale_args(x, op, None)?;
        let elem = if dequant { 2 } else { 1 };
        let out = match plain {
            Some(r) => Some(self.fp8_buf(r, rows * cols * elem)?),
            None => None,
        };
        let out_t = match transposed {
            Some(r) => Some(self.fp8_buf(r, rows * cols)?),
            None => None,
        };
        let scale_ptr = self.fp8_cells()? + scale_cell(cell as usize);
        if !dequant && self.fp8_tiled(x.dtype) {
            let scale = (partials, num_partials, fixed, margin);
            let (o, t) = (out.unwrap_or(0), out_t.unwrap_or(0));
            let ptrs = (o, t, scale_ptr, amax_cell, 0);
            self.fp8_launch_tiled(x, rows, cols, format, scale, ptrs, None)?;
            return Ok((out, out_t, scale_ptr));
        }
        let grid_y = u32::try_from(rows.div_ceil(32))
            .ok()
            .filter(|&g| g <= 65535)
            .ok_or_else(|| anyhow!("FP8 cast: {rows} rows is too many for one launch"))?;
        self.launch(
            &kernel,
            (cols.div_ceil(64).max(1) as u32, grid_y.max(1), 1),
            256,
            0,
            &[
                Arg::Ptr(out.unwrap_or(0)),
                Arg::Ptr(out_t.unwrap_or(0)),
                Arg::Ptr(self.ptr(x)?),
                Arg::Int(int(rows)?),
                Arg::Int(int(cols)?),
                Arg::Int(format),
                Arg::Int(i32::from(dequant)),
                Arg::Ptr(partials),
                Arg::Int(int(num_partials)?),
                Arg::Float(fixed),
                Arg::Int(margin),
                Arg::Ptr(amax_cell),
                Arg::Ptr(scale_ptr),
            ],
        )?;
        Ok((out, out_t, scale_ptr))
    }

    /// The scale arguments of the cast kernels for `op`: (partials, how many, fixed scale,
    /// margin). Current scaling first reduces `x`'s amax (with `of`: that of the tensor
    /// that cast casts) into the partials.
    fn fp8_scale_args(
        &self,
        x: &CudaBuf,
        op: &GemmOperand,
        of: Option<&CastOf>,
    ) -> Result<(u64, usize, f32, i32)> {
        match op.scale {
            OperandScale::Current { margin } => {
                let num = self.fp8_amax_partials(x, of)?;
                Ok((self.fp8_cells()?, num, 1.0f32, margin))
            }
            OperandScale::Fixed(s) => {
                if !(s.is_finite() && s > 0.0) {
                    bail!("internal error: FP8 operand scale {s} is not a positive finite number");
                }
                Ok((0, 0, s, 0))
            }
        }
    }

    /// `fp8_cast_tiled_T` on `x[rows, cols]` (bf16 or f16), with `ptrs = (out, out_t, scale_ptr,
    /// amax_cell, col_sums)`: codes into `out` and/or transposed into `out_t` (0: not written),
    /// with `scale` from [`CudaBackend::fp8_scale_args`]; with `col_sums` (not 0),
    /// `fp8_cast_tiled_dbias_T`, which also writes there the column sums of each 64-row tile
    /// (`ceil(rows / 64) x cols` f32); with `of` = [`CastOf::DGelu`], the `_dgelu` kernels (bf16
    /// only), which cast (and sum) the gradient of GELU's input formed from `x` and its `pre`;
    /// with [`CastOf::Gelu`] (no column sums, bf16 only), `fp8_cast_tiled_gelu_bf16`, which casts
    /// GELU's output formed from `x`.
    #[allow(clippy::too_many_arguments)]
    fn fp8_launch_tiled(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        format: i32,
        scale: (u64, usize, f32, i32),
        (out, out_t, scale_ptr, amax_cell, col_sums): (u64, u64, u64, u64, u64),
        of: Option<&CastOf>,
    ) -> Result<()> {
        let (partials, num_partials, fixed, margin) = scale;
        let sfx = tensor_suffix(x.dtype)?;
        if of.is_some() && x.dtype != DType::BF16 {
            bail!("internal error: GELU in an FP8 cast needs bf16, not {sfx}");
        }
        let name = match (col_sums != 0, of) {
            (false, None) => format!("fp8_cast_tiled_{sfx}"),
            (true, None) => format!("fp8_cast_tiled_dbias_{sfx}"),
            (false, Some(CastOf::DGelu(_))) => "fp8_cast_tiled_dgelu_bf16".to_string(),
            (true, Some(CastOf::DGelu(_))) => "fp8_cast_tiled_dbias_dgelu_bf16".to_string(),
            (false, Some(CastOf::Gelu { .. })) => "fp8_cast_tiled_gelu_bf16".to_string(),
            (true, Some(CastOf::Gelu { .. })) => bail!("internal error: column sums of GELU"),
        };
        let grid_y = u32::try_from(rows.div_ceil(64))
            .ok()
            .filter(|&g| g <= 65535)
            .ok_or_else(|| anyhow!("FP8 cast: {rows} rows is too many for one launch"))?;
        // Profiles tell the casts apart by shape and layouts.
        let label = self.profile.is_some().then(|| {
            let layouts = match (out != 0, out_t != 0) {
                (true, true) => "both",
                (true, false) => "row-major",
                _ => "transposed",
            };
            format!("{name} {rows}x{cols} {layouts}")
        });
        let mut args = vec![
            Arg::Ptr(out),
            Arg::Ptr(out_t),
            Arg::Ptr(self.ptr(x)?),
            Arg::Int(int(rows)?),
            Arg::Int(int(cols)?),
            Arg::Int(format),
            Arg::Ptr(partials),
            Arg::Int(int(num_partials)?),
            Arg::Float(fixed),
            Arg::Int(margin),
            Arg::Ptr(amax_cell),
            Arg::Ptr(scale_ptr),
        ];
        if col_sums != 0 {
            args.push(Arg::Ptr(col_sums));
        }
        match of {
            Some(CastOf::DGelu(g)) => {
                args.push(Arg::Ptr(g.pre));
                args.push(op_scale("GELU", g.scale)?);
            }
            Some(CastOf::Gelu { scale }) => args.push(op_scale("GELU", *scale)?),
            None => {}
        }
        self.launch_as(
            &name,
            label.as_deref(),
            (cols.div_ceil(128).max(1) as u32, grid_y.max(1), 1),
            256,
            0,
            &args,
        )
    }

    /// The output gradient's cast for a backward GEMM (arguments as [`CudaBackend::fp8_cast`]'s),
    /// taking `dbias` (`(dbias, alpha)`) where the tiled kernel runs: it then also forms the
    /// bias gradient `dbias += alpha·Σ_rows dout` from the same read of `dout`. With `dgelu`
    /// (bf16 only), `dout` is the gradient of GELU's output and the tensor cast, summed and
    /// amax-recorded is the gradient of GELU's input (see [`DGeluCast`]).
    #[allow(clippy::too_many_arguments)]
    fn fp8_cast_dout(
        &self,
        dout: &CudaBuf,
        n: usize,
        oc: usize,
        op: &GemmOperand,
        plain: Option<Role>,
        transposed: Option<Role>,
        cell: Role,
        amax_cell: u64,
        dbias: &mut Option<(&mut CudaBuf, f32)>,
        dgelu: Option<&CastOf>,
    ) -> Result<(Option<u64>, Option<u64>, u64)> {
        if dgelu.is_none() && (!self.fp8_tiled(dout.dtype) || dbias.is_none()) {
            return self.fp8_cast(dout, n, oc, op, plain, transposed, false, cell, amax_cell);
        }
        let t = if dgelu.is_some() {
            DType::BF16
        } else {
            dout.dtype
        };
        self.expect("FP8 GEMM operand", dout, t, n * oc)?;
        let bias = dbias.take();
        if let Some((db, _)) = &bias {
            self.expect("bias gradient", db, DType::F32, oc)?;
        }
        let format = format_code(op.format)?;
        let scale = self.fp8_scale_args(dout, op, dgelu)?;
        let out = plain.map(|r| self.fp8_buf(r, n * oc)).transpose()?;
        let out_t = transposed.map(|r| self.fp8_buf(r, n * oc)).transpose()?;
        let scale_ptr = self.fp8_cells()? + scale_cell(cell as usize);
        let groups = n.div_ceil(64);
        let sums = match bias {
            Some(_) => self.scratch_ptr(groups * oc * 4)?,
            None => 0,
        };
        let ptrs = (
            out.unwrap_or(0),
            out_t.unwrap_or(0),
            scale_ptr,
            amax_cell,
            sums,
        );
        self.fp8_launch_tiled(dout, n, oc, format, scale, ptrs, dgelu)?;
        let Some((db, alpha)) = bias else {
            return Ok((out, out_t, scale_ptr));
        };
        self.bias_backward_reduce(db, sums, groups, oc, alpha)?;
        Ok((out, out_t, scale_ptr))
    }

    /// Whether `op` on `x` may use a kept copy (see the module doc).
    fn keeps(&self, x: &CudaBuf, op: &GemmOperand) -> bool {
        self.fp8_keep && op.keep.is_some() && op.format.is_float8() && self.fp8_tiled(x.dtype)
    }

    /// Whether the MLP's forward applies GELU in the down-projection's FP8 input cast
    /// ([`CudaBackend::fp8_mlp_forward`], bf16 tensors), given that projection's forward GEMM:
    /// only where its input codes are kept for the backward, which would otherwise form GELU's
    /// output again to cast it.
    pub(super) fn fp8_mlp_gelu_cast(&self, fcproj: &[GemmSpec]) -> bool {
        self.fp8_gelu_cast && self.fp8_keep && involved(fcproj)
    }

    /// Whether casts of a `dtype` tensor run the tiled kernels (bf16, and f16 unless
    /// `HALFLING_CUDA_FP8_F16_TILED=0`).
    fn fp8_tiled(&self, dtype: DType) -> bool {
        dtype == DType::BF16 || (dtype == DType::F16 && self.fp8_f16_tiled)
    }

    /// `x[rows, cols]`'s transposed codes and scale cell for a backward GEMM: the kept copy
    /// where `op`'s token has one, else cast now into scratch `role`.
    fn fp8_transposed(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        role: Role,
        amax_cell: u64,
    ) -> Result<(u64, u64)> {
        if let Some((_, t, s)) = self.fp8_kept(x, rows, cols, op, amax_cell, false, true) {
            return Ok((t, s));
        }
        let (_, t, s) =
            self.fp8_cast(x, rows, cols, op, None, Some(role), false, role, amax_cell)?;
        Ok((t.ok_or_else(|| anyhow!("internal error: FP8 copy"))?, s))
    }

    /// The copy kept under `op`'s token, if it is `x[rows, cols]` cast per `op`, its amax went
    /// to `amax_cell` (when one is wanted), and it holds the layouts asked for: the addresses of
    /// its row-major and transposed codes (0 where not asked for) and of its scale cell.
    #[allow(clippy::too_many_arguments)]
    fn fp8_kept(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        amax_cell: u64,
        plain: bool,
        transposed: bool,
    ) -> Option<(u64, u64, u64)> {
        if !self.keeps(x, op) {
            return None;
        }
        let token = op.keep?;
        let src = self.address(x);
        let scratch = self.fp8.borrow();
        let k = scratch.kept.get(&token.id)?;
        let matches = k.token == token
            && (k.src, k.rows, k.cols) == (src, rows, cols)
            && k.format == op.format
            && k.scale == op.scale
            && (amax_cell == 0 || k.amax_cell == amax_cell)
            && (k.plain || !plain)
            && (k.transposed || !transposed);
        if !matches {
            return None;
        }
        let cell = self.address(&k.buf);
        let t = cell + CELL_STRIDE as u64;
        let p = t + (rows * cols).next_multiple_of(256) as u64;
        Some((
            if plain { p } else { 0 },
            if transposed { t } else { 0 },
            cell,
        ))
    }

    /// Casts `x[rows, cols]` per `op` into the copy kept under `op`'s token: the transposed
    /// codes, and the row-major ones too unless `plain_role` names the scratch they go to
    /// instead (used now, not kept). Returns the row-major and transposed codes' addresses and
    /// the scale cell's.
    ///
    /// With `gelu = (pre, scale)`, `x` (GELU's output) is not read, only named: the codes are
    /// cast from `pre` through GELU ([`CastOf::Gelu`]) and kept as `x`'s.
    #[allow(clippy::too_many_arguments)]
    fn fp8_cast_kept(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        amax_cell: u64,
        plain_role: Option<Role>,
        gelu: Option<(&CudaBuf, f32)>,
    ) -> Result<(u64, u64, u64)> {
        let token = op
            .keep
            .ok_or_else(|| anyhow!("internal error: no keep token"))?;
        let keep_plain = plain_role.is_none();
        let bytes = Kept::bytes(rows, cols, keep_plain);
        // Out of the map while it is rewritten: a failed cast leaves nothing to match.
        let old = self.fp8.borrow_mut().kept.remove(&token.id);
        let buf = match old {
            Some(k) if k.buf.len >= bytes => k.buf,
            other => {
                drop(other);
                crate::backend::Backend::alloc(self, DType::F8E4M3, bytes)?
            }
        };
        let cell = self.ptr(&buf)?;
        let t = cell + CELL_STRIDE as u64;
        let p = match plain_role {
            None => t + (rows * cols).next_multiple_of(256) as u64,
            Some(role) => self.fp8_buf(role, rows * cols)?,
        };
        let (src, of) = match gelu {
            Some((pre, scale)) => (pre, Some(CastOf::Gelu { scale })),
            None => (x, None),
        };
        let scale = self.fp8_scale_args(src, op, of.as_ref())?;
        let format = format_code(op.format)?;
        self.fp8_launch_tiled(
            src,
            rows,
            cols,
            format,
            scale,
            (p, t, cell, amax_cell, 0),
            of.as_ref(),
        )?;
        let kept = Kept {
            token,
            src: self.ptr(x)?,
            rows,
            cols,
            format: op.format,
            scale: op.scale,
            amax_cell,
            plain: keep_plain,
            transposed: true,
            buf,
        };
        self.fp8.borrow_mut().kept.insert(token.id, kept);
        Ok((p, t, cell))
    }

    /// A forward GEMM operand's row-major codes and scale cell. With a keep token: a weight's
    /// (`keep_plain`) from its kept copy, else cast with both layouts kept; an activation's cast
    /// with its transposed codes kept for the backward. Without: cast into `role`'s scratch.
    #[allow(clippy::too_many_arguments)]
    fn fp8_forward_operand(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        amax_cell: u64,
        role: Role,
        keep_plain: bool,
    ) -> Result<(u64, u64)> {
        if self.keeps(x, op) {
            if keep_plain {
                if let Some((p, _, s)) = self.fp8_kept(x, rows, cols, op, amax_cell, true, false) {
                    return Ok((p, s));
                }
            }
            let plain_role = (!keep_plain).then_some(role);
            let (p, _, s) = self.fp8_cast_kept(x, rows, cols, op, amax_cell, plain_role, None)?;
            return Ok((p, s));
        }
        let (p, _, s) =
            self.fp8_cast(x, rows, cols, op, Some(role), None, false, role, amax_cell)?;
        Ok((p.ok_or_else(|| anyhow!("internal error: FP8 copy"))?, s))
    }

    /// [`CudaBackend::fp8_forward_operand`] of an activation `gelu_out[rows, cols]` that was
    /// not written: cast from `pre` through GELU with `scale` ([`CastOf::Gelu`], both bf16), its
    /// transposed codes kept under `gelu_out`'s name where `op` keeps.
    #[allow(clippy::too_many_arguments)]
    fn fp8_forward_gelu_operand(
        &self,
        gelu_out: &CudaBuf,
        pre: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        amax_cell: u64,
        scale: f32,
    ) -> Result<(u64, u64)> {
        self.expect("GELU output", gelu_out, DType::BF16, rows * cols)?;
        self.expect("GELU input", pre, DType::BF16, rows * cols)?;
        if self.keeps(gelu_out, op) {
            let gelu = Some((pre, scale));
            let (p, _, s) =
                self.fp8_cast_kept(gelu_out, rows, cols, op, amax_cell, Some(Role::X), gelu)?;
            return Ok((p, s));
        }
        let of = CastOf::Gelu { scale };
        let sc = self.fp8_scale_args(pre, op, Some(&of))?;
        let p = self.fp8_buf(Role::X, rows * cols)?;
        let cell = self.fp8_cells()? + scale_cell(Role::X as usize);
        let format = format_code(op.format)?;
        let ptrs = (p, 0, cell, amax_cell, 0);
        self.fp8_launch_tiled(pre, rows, cols, format, sc, ptrs, Some(&of))?;
        Ok((p, cell))
    }

    /// Forms a GELU output the forward did not write (`gelu_forward_bf16`, the kernel the unfused
    /// path runs, whose values the [`CastOf::Gelu`] casts reproduce).
    fn gelu_form(&self, g: GeluPending) -> Result<()> {
        self.elementwise(
            "gelu_forward_bf16",
            g.len,
            &[
                Arg::Ptr(g.at),
                Arg::Ptr(g.pre),
                op_scale("GELU", g.scale)?,
                Arg::Int(int(g.len)?),
            ],
        )
    }

    /// Records `max |x|` into `amax_cell` for an operand that is not cast.
    fn fp8_record(&self, x: &CudaBuf, amax_cell: u64) -> Result<()> {
        let num = self.fp8_amax_partials(x, None)?;
        self.launch(
            "fp8_amax_record",
            (1, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(amax_cell),
                Arg::Ptr(self.fp8_cells()?),
                Arg::Int(int(num)?),
            ],
        )
    }

    /// An operand for a GEMM that is not an FP8 GEMM: FP8 formats dequantized into `role`'s
    /// scratch (in `x`'s format), anything else as stored, amax recorded either way. The caller
    /// checked that the GEMM's tensors share one format ([`tensors_type`]).
    fn fp8_fallback_operand(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        op: &GemmOperand,
        role: Role,
        amax: (Option<u64>, usize),
    ) -> Result<u64> {
        let cell = self.amax_cell(amax.0, amax.1, op)?;
        if op.format.is_float8() {
            let (p, _, _) = self.fp8_cast(x, rows, cols, op, Some(role), None, true, role, cell)?;
            return p.ok_or_else(|| anyhow!("internal error: FP8 dequantized copy"));
        }
        if op.format != x.dtype && op.format != DType::F32 {
            bail!(
                "the CUDA backend has no {} x {} GEMM operands (a tensor stored as {} multiplied as {})",
                op.format,
                x.dtype,
                x.dtype,
                op.format
            );
        }
        self.expect("GEMM operand", x, x.dtype, rows * cols)?;
        if cell != 0 {
            self.fp8_record(x, cell)?;
        }
        self.ptr(x)
    }

    /// The [`Fp8Scales`] of a GEMM of `spec` if both its operands are FP8 (scale pointers are
    /// filled in later by [`CudaBackend::fp8_bind_scales`]).
    fn fp8_scales(&self, spec: &GemmSpec, forward: bool) -> Option<Fp8Scales> {
        let fast_accum = match self.fp8_fast_accum {
            FastAccum::None => false,
            FastAccum::Forward => forward,
            FastAccum::All => true,
        };
        Some(Fp8Scales {
            a_type: fp8_type(spec.a.format)?,
            b_type: fp8_type(spec.b.format)?,
            a_scale: 0,
            b_scale: 0,
            device_scales: !(self.fp8_host_scales && host_factor(spec).is_some()),
            fast_accum,
        })
    }

    /// Gives `g` and `f` the operands' dequantization: the scale cells `(sa, sb)` the casts
    /// wrote, or, with host scales, `1/(s_a·s_b)` folded into `alpha`.
    fn fp8_bind_scales(&self, g: &mut Gemm, f: &mut Fp8Scales, spec: &GemmSpec, sa: u64, sb: u64) {
        if f.device_scales {
            (f.a_scale, f.b_scale) = (sa, sb);
        } else if let Some(factor) = host_factor(spec) {
            g.alpha *= factor;
        }
    }

    /// Whether `g` can run as an FP8 GEMM with `f` (FP8 not turned off, cuBLASLt has a kernel).
    fn fp8_direct(&self, g: &Gemm, f: Option<&Fp8Scales>) -> bool {
        let Some(f) = f else { return false };
        let epilogue_ok = match g.epilogue {
            Epilogue::GeluAux { .. } | Epilogue::DGelu { .. } => {
                self.fused_epilogues
                    && g.n % 8 == 0
                    && (g.alpha == 1.0 || matches!(g.epilogue, Epilogue::GeluAux { .. }))
            }
            _ => true,
        };
        self.fp8_enabled && epilogue_ok && self.lt.borrow_mut().supports_scaled(g, Some(f))
    }

    /// A cuBLASLt FP8 product on our stream (profiled like [`CudaBackend::gemm`]). `false`
    /// when cuBLASLt refused to run it although it had planned it (it is refused from then on,
    /// with a note on stderr, and the caller takes the dequantized path).
    fn gemm_fp8(&self, g: Gemm, f: Fp8Scales) -> Result<bool> {
        let ran = self.tune_gemm(&g, Some(&f));
        let start = self.profile_event()?;
        let ran = ran.and_then(|()| {
            self.lt
                .borrow_mut()
                .matmul_scaled(&self.stream, &g, Some(&f))
        });
        if let Err(e) = ran {
            eprintln!(
                "note: {e:#}; this GEMM runs in {} on dequantized FP8 operands instead",
                g.inputs.name()
            );
            self.lt.borrow_mut().refuse(&g, Some(&f));
            return Ok(false);
        }
        if start.is_some() {
            let tag = g.epilogue.profile_tag();
            let fast = if f.fast_accum { " fast" } else { "" };
            let label = format!(
                "gemm {}x{}x{} {:?}x{:?}->{:?}{tag}{fast}",
                g.m, g.n, g.k, f.a_type, f.b_type, g.out_type
            );
            self.profile_record(&label, start)?;
        }
        if self.sync_each_launch {
            self.stream.synchronize().map_err(|e| {
                anyhow!("cuBLASLt FP8 matmul {}x{}x{} failed: {e:?}", g.m, g.n, g.k)
            })?;
        }
        Ok(true)
    }

    /// The amax buffer's base address and length (0 and 0 without one).
    fn amax_base(&self, amax: Option<&mut CudaBuf>) -> Result<(Option<u64>, usize)> {
        match amax {
            None => Ok((None, 0)),
            Some(buf) => {
                if buf.dtype != DType::F32 {
                    bail!("internal error: the amax buffer is {}, not f32", buf.dtype);
                }
                let len = buf.len;
                Ok((Some(self.ptr_mut(buf)?), len))
            }
        }
    }

    /// `out = alpha · inp · wᵀ` run per an FP8-involving `gemm`, with `epilogue` (bias or
    /// GELU; `Epilogue::GeluAux` only when `fp8_forward_fusable` said so). Sizes checked by the
    /// caller.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_linear_forward(
        &self,
        out: u64,
        out_type: DType,
        inp: &CudaBuf,
        w: &CudaBuf,
        epilogue: Epilogue,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: GemmSpec,
        amax: Option<&mut CudaBuf>,
    ) -> Result<()> {
        let amax = self.amax_base(amax)?;
        let mut g = Gemm {
            out,
            out_type: gemm_type(out_type)?,
            a: 0,
            b: 0,
            inputs: tensors_type(&[inp, w])?,
            m: n,
            n: oc,
            k: ic,
            trans_a: false,
            trans_b: true,
            alpha: gemm.alpha,
            beta: 0.0,
            epilogue,
        };
        let scales = self.fp8_scales(&gemm, true);
        if let (true, Some(mut f)) = (self.fp8_direct(&g, scales.as_ref()), scales) {
            let cell_x = self.amax_cell(amax.0, amax.1, &gemm.a)?;
            let cell_w = self.amax_cell(amax.0, amax.1, &gemm.b)?;
            let (px, sx) = self.fp8_forward_operand(inp, n, ic, &gemm.a, cell_x, Role::X, false)?;
            let (pw, sw) = self.fp8_forward_operand(w, oc, ic, &gemm.b, cell_w, Role::W, true)?;
            (g.a, g.b) = (px, pw);
            self.fp8_bind_scales(&mut g, &mut f, &gemm, sx, sw);
            if self.gemm_fp8(g, f)? {
                return Ok(());
            }
        }
        if matches!(epilogue, Epilogue::GeluAux { .. }) && !self.fusable(&g) {
            bail!(
                "cuBLASLt runs this linear+GELU ({n}x{oc}x{ic}) neither in FP8 nor in {}",
                g.inputs.name()
            );
        }
        g.a = self.fp8_fallback_operand(inp, n, ic, &gemm.a, Role::X, amax)?;
        g.b = self.fp8_fallback_operand(w, oc, ic, &gemm.b, Role::W, amax)?;
        self.gemm(g)
    }

    /// Whether [`CudaBackend::fp8_linear_forward`] can fuse `epilogue` (a GELU) for these sizes.
    pub(super) fn fp8_forward_fusable(
        &self,
        epilogue: Epilogue,
        out_type: DType,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: &GemmSpec,
    ) -> Result<bool> {
        let g = Gemm {
            out: 0,
            out_type: gemm_type(out_type)?,
            a: 0,
            b: 0,
            inputs: GemmType::BF16,
            m: n,
            n: oc,
            k: ic,
            trans_a: false,
            trans_b: true,
            alpha: gemm.alpha,
            beta: 0.0,
            epilogue,
        };
        Ok(self.fp8_direct(&g, self.fp8_scales(gemm, true).as_ref()))
    }

    /// Backward of [`CudaBackend::fp8_linear_forward`]: `dinp = alpha · dout · w` into
    /// `dinp.0` (of dtype `dinp.1`), through the GELU derivative when `dgelu_pre` is given and
    /// cuBLASLt can fuse it; `dw += alpha · doutᵀ · inp` (f32, or any type the GEMM layer
    /// takes); `dbias += alpha · Σ_rows dout` with the weight gradient's alpha, when given (from
    /// the read of `dout`'s cast where it can). Returns whether the GELU derivative was applied
    /// to `dinp` (the caller runs it otherwise).
    ///
    /// With `dout_dgelu`, `dout` holds the gradient of a GELU's output and the layer's output
    /// gradient is `scale · gelu'(pre) ⊙ dout` ([`DGeluCast`]), formed inside `dout`'s one cast
    /// (both layouts, bias gradient, amax). `dout_dgelu.1` is `dout`'s address, taken mutably by
    /// the caller: where a GEMM then falls back to the dequantized path after all, the derivative
    /// is applied to `dout` in place first. Returns `None`, having done nothing, where that cast
    /// cannot serve both GEMMs (the caller applies the derivative and calls again without it).
    ///
    /// With `inp_gelu`, `inp` is a GELU output the forward did not write ([`GeluPending`]): the
    /// weight-gradient GEMM reads its kept transposed codes, and where there are none (or that
    /// GEMM falls back to the dequantized path) `inp` is formed first.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_linear_backward(
        &self,
        dinp: Option<(u64, DType)>,
        dgelu_pre: Option<u64>,
        dw: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
        dinp_gemm: GemmSpec,
        dw_gemm: GemmSpec,
        amax: Option<&mut CudaBuf>,
        dout_dgelu: Option<(DGeluCast, u64)>,
        inp_gelu: Option<GeluPending>,
    ) -> Result<Option<bool>> {
        let amax = self.amax_base(amax)?;
        let inputs = tensors_type(&[dout, inp, w])?;
        if dw.len != oc * ic {
            bail!(
                "internal error: weight grad has {} elements, expected {}",
                dw.len,
                oc * ic
            );
        }
        // The address (and whether dw's zeros were deferred) is taken where the GEMM runs: an
        // early return before it must leave dw as it was.
        let mut g_dw = Gemm {
            out: 0,
            out_type: gemm_type(dw.dtype)?,
            a: 0,
            b: 0,
            inputs,
            m: oc,
            n: ic,
            k: n,
            trans_a: false,
            trans_b: true,
            alpha: dw_gemm.alpha,
            beta: 1.0,
            epilogue: Epilogue::None,
        };
        let f_dw = self.fp8_scales(&dw_gemm, false);
        let dw_direct = self.fp8_direct(&g_dw, f_dw.as_ref());
        let mut g_dx = match dinp {
            Some((p, t)) => {
                let plain = Gemm {
                    out: p,
                    out_type: gemm_type(t)?,
                    a: 0,
                    b: 0,
                    inputs,
                    m: n,
                    n: ic,
                    k: oc,
                    trans_a: false,
                    trans_b: true,
                    alpha: dinp_gemm.alpha,
                    beta: 0.0,
                    epilogue: Epilogue::None,
                };
                Some(plain)
            }
            None => None,
        };
        let f_dx = self.fp8_scales(&dinp_gemm, false);
        // (direct, fused GELU derivative) of the input-gradient GEMM.
        let (dx_direct, mut fused) = (
            g_dx.is_some_and(|g| self.fp8_direct(&g, f_dx.as_ref())),
            false,
        );
        if let (Some(g), Some(pre), true) = (g_dx.as_mut(), dgelu_pre, dx_direct) {
            let with = Gemm {
                epilogue: Epilogue::DGelu { pre },
                ..*g
            };
            if self.fp8_direct(&with, f_dx.as_ref()) {
                *g = with;
                fused = true;
            }
        }
        let cell = |op: &GemmOperand| self.amax_cell(amax.0, amax.1, op);
        let mut bias = dbias.map(|b| (b, dw_gemm.alpha));
        let shared_dy = g_dx.is_some() && dinp_gemm.a == dw_gemm.a;
        // The GELU derivative in dout's cast needs one cast that both FP8 GEMMs read.
        if dout_dgelu.is_some()
            && !(dx_direct && dw_direct && shared_dy && dout.dtype == DType::BF16)
        {
            return Ok(None);
        }
        let dgelu = dout_dgelu.map(|(g, _)| CastOf::DGelu(g));
        // Applies the derivative to dout in place before anything reads dout as stored.
        let mut pending = dout_dgelu;
        let mut materialize = || -> Result<()> {
            match pending.take() {
                Some((g, pd)) => self.dgelu_in_place(pd, g, dout.len),
                None => Ok(()),
            }
        };
        // Forms inp before anything reads it as stored.
        let mut inp_pending = inp_gelu;
        let mut form_inp = || -> Result<()> {
            match inp_pending.take() {
                Some(g) => self.gelu_form(g),
                None => Ok(()),
            }
        };
        // dout's transposed codes and scale cell, when the dx cast wrote them for the dw GEMM.
        let mut dyt_ready: Option<(u64, u64)> = None;

        // ---- dx = dout · w ----
        if let Some(mut g) = g_dx {
            let mut done = false;
            if let (true, Some(mut f)) = (dx_direct, f_dx) {
                let both = shared_dy && dw_direct;
                let (pd, pdt, sd) = self.fp8_cast_dout(
                    dout,
                    n,
                    oc,
                    &dinp_gemm.a,
                    Some(Role::Dy),
                    both.then_some(Role::DyT),
                    Role::Dy,
                    cell(&dinp_gemm.a)?,
                    &mut bias,
                    dgelu.as_ref(),
                )?;
                if let (true, Some(p)) = (both, pdt) {
                    dyt_ready = Some((p, sd));
                }
                let cell_w = cell(&dinp_gemm.b)?;
                let (pwt, swt) = self.fp8_transposed(w, oc, ic, &dinp_gemm.b, Role::WT, cell_w)?;
                g.a = pd.ok_or_else(|| anyhow!("internal error: FP8 copy"))?;
                g.b = pwt;
                self.fp8_bind_scales(&mut g, &mut f, &dinp_gemm, sd, swt);
                done = self.gemm_fp8(g, f)?;
            }
            if !done {
                // As a GEMM of the dequantized operands (b = w as stored: not transposed).
                materialize()?;
                fused = false;
                g.epilogue = Epilogue::None;
                g.a = self.fp8_fallback_operand(dout, n, oc, &dinp_gemm.a, Role::Dy, amax)?;
                g.b = self.fp8_fallback_operand(w, oc, ic, &dinp_gemm.b, Role::WT, amax)?;
                g.trans_b = false;
                if let Some(pre) = dgelu_pre {
                    let with = Gemm {
                        epilogue: Epilogue::DGelu { pre },
                        ..g
                    };
                    if self.fusable(&with) {
                        g = with;
                        fused = true;
                    }
                }
                self.gemm(g)?;
            }
        }

        // ---- dw += doutᵀ · inp (= where dw's zeros were deferred) ----
        let (pdw, overwrite) = self.ptr_first_write(dw);
        g_dw.out = pdw;
        if overwrite {
            g_dw.beta = 0.0;
        }
        let mut done = false;
        if let (true, Some(mut f)) = (dw_direct, f_dw) {
            let (pdt, sd) = match dyt_ready {
                Some(ready) => ready,
                None => {
                    let (_, pdt, sd) = self.fp8_cast_dout(
                        dout,
                        n,
                        oc,
                        &dw_gemm.a,
                        None,
                        Some(Role::DyT),
                        Role::DyT,
                        cell(&dw_gemm.a)?,
                        &mut bias,
                        dgelu.as_ref(),
                    )?;
                    (pdt.ok_or_else(|| anyhow!("internal error: FP8 copy"))?, sd)
                }
            };
            let cell_x = cell(&dw_gemm.b)?;
            if self
                .fp8_kept(inp, n, ic, &dw_gemm.b, cell_x, false, true)
                .is_none()
            {
                form_inp()?;
            }
            let (pxt, sxt) = self.fp8_transposed(inp, n, ic, &dw_gemm.b, Role::XT, cell_x)?;
            let mut g = g_dw;
            g.a = pdt;
            g.b = pxt;
            self.fp8_bind_scales(&mut g, &mut f, &dw_gemm, sd, sxt);
            done = self.gemm_fp8(g, f)?;
        }
        if !done {
            // As a GEMM of the dequantized operands, as stored: dout read transposed.
            materialize()?;
            form_inp()?;
            g_dw.a = self.fp8_fallback_operand(dout, n, oc, &dw_gemm.a, Role::DyT, amax)?;
            g_dw.b = self.fp8_fallback_operand(inp, n, ic, &dw_gemm.b, Role::XT, amax)?;
            g_dw.trans_a = true;
            g_dw.trans_b = false;
            self.gemm(g_dw)?;
        }
        if let Some((db, alpha)) = bias {
            materialize()?;
            self.bias_backward(db, dout, n, oc, alpha)?;
        }
        Ok(Some(fused))
    }

    /// `d = scale · gelu'(pre) ⊙ d` in place on the bf16 tensor at `d` (`len` elements): the
    /// `gelu_backward` that a [`DGeluCast`] otherwise saves.
    fn dgelu_in_place(&self, d: u64, g: DGeluCast, len: usize) -> Result<()> {
        self.elementwise(
            "gelu_backward_bf16",
            len,
            &[
                Arg::Ptr(d),
                Arg::Ptr(g.pre),
                Arg::Ptr(d),
                op_scale("GELU", g.scale)?,
                Arg::Int(int(len)?),
            ],
        )
    }
}

/// The linear ops of [`crate::backend::Backend`] when their specs involve FP8 or amax recording
/// (`CudaBackend`'s ops hand over to these).
impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_op_linear_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: GemmSpec,
        amax: Option<&mut CudaBuf>,
    ) -> Result<()> {
        let t = out.dtype;
        self.expect("linear output", out, t, n * oc)?;
        if let Some(b) = bias {
            self.expect("linear bias", b, t, oc)?;
        }
        let epilogue = match bias {
            Some(b) => Epilogue::Bias { bias: self.ptr(b)? },
            None => Epilogue::None,
        };
        let po = self.ptr_mut(out)?;
        self.fp8_linear_forward(po, t, inp, w, epilogue, n, ic, oc, gemm, amax)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_op_linear_gelu_forward(
        &self,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: GemmSpec,
        amax: Option<&mut CudaBuf>,
        gelu_scale: f32,
    ) -> Result<()> {
        let t = out.dtype;
        self.expect("linear+GELU output", out, t, n * oc)?;
        self.expect("linear+GELU pre-activation", pre, t, n * oc)?;
        if let Some(b) = bias {
            self.expect("linear bias", b, t, oc)?;
        }
        let epilogue = Epilogue::GeluAux {
            bias: bias.map(|b| self.ptr(b)).transpose()?,
            pre: self.ptr_mut(pre)?,
        };
        if gelu_scale == 1.0 && self.fp8_forward_fusable(epilogue, t, n, ic, oc, &gemm)? {
            let po = self.ptr_mut(out)?;
            return self.fp8_linear_forward(po, t, inp, w, epilogue, n, ic, oc, gemm, amax);
        }
        self.fp8_op_linear_forward(pre, inp, w, bias, n, ic, oc, gemm, amax)?;
        crate::backend::Backend::gelu_forward(self, out, pre, gelu_scale)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_op_linear_backward(
        &self,
        dinp: Option<&mut CudaBuf>,
        dw: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
        dinp_gemm: GemmSpec,
        dw_gemm: GemmSpec,
        amax: Option<&mut CudaBuf>,
    ) -> Result<()> {
        let dinp = match dinp {
            Some(d) => {
                let t = d.dtype;
                self.expect("linear input grad", d, t, n * ic)?;
                Some((self.ptr_mut(d)?, t))
            }
            None => None,
        };
        self.fp8_linear_backward(
            dinp, None, dw, dbias, dout, inp, w, n, ic, oc, dinp_gemm, dw_gemm, amax, None, None,
        )?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_op_linear_gelu_backward(
        &self,
        dpre: &mut CudaBuf,
        dw: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        gelu_out: &CudaBuf,
        pre: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
        dinp_gemm: GemmSpec,
        dw_gemm: GemmSpec,
        amax: Option<&mut CudaBuf>,
        gelu_scale: f32,
    ) -> Result<()> {
        let t = dpre.dtype;
        self.expect("GELU input grad", dpre, t, n * ic)?;
        self.expect("GELU input", pre, t, n * ic)?;
        // No DGELU epilogue on FP8 GEMMs: on the H100 cuBLASLt's e5m2 x e4m3 DGELU kernel took
        // 0.81 ms at 0.91B's 8192x8192x2048 against 0.25 ms for the GELU_AUX forward of the same
        // size; the plain FP8 GEMM plus the separate in-place GELU backward is much cheaper.
        let pre_ptr = None;
        let dinp = Some((self.ptr_mut(dpre)?, t));
        let fused = self.fp8_linear_backward(
            dinp, pre_ptr, dw, dbias, dout, gelu_out, w, n, ic, oc, dinp_gemm, dw_gemm, amax, None,
            None,
        )?;
        if fused != Some(true) {
            crate::backend::Backend::gelu_backward(self, dpre, pre, gelu_scale)?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// [`crate::backend::Backend::mlp_forward`] when the down-projection runs as an FP8 GEMM on
    /// bf16 tensors: the up-projection writes only `pre` (its bias epilogue, no GELU_AUX), and
    /// the down-projection's input cast reads `pre` and casts `gelu_scale·gelu(pre)` rounded to
    /// bf16 ([`CastOf::Gelu`]: the values `gelu_forward` stores), keeping the transposed codes
    /// for the weight gradient under `gelu_out`'s name. `gelu_out` is then not written (one
    /// `n x h` bf16 write saved): `Some(false)`. `None`, having done nothing, where the
    /// down-projection could not run in FP8 (the caller composes the ops); `Some(true)` where
    /// cuBLASLt refused it at run time and `gelu_out` was formed for the dequantized GEMM.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_mlp_forward(
        &self,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        gelu_out: &mut CudaBuf,
        inp: &CudaBuf,
        (w1, b1): (&CudaBuf, Option<&CudaBuf>),
        (w2, b2): (&CudaBuf, Option<&CudaBuf>),
        (n, c, h): (usize, usize, usize),
        [fc, fcproj]: [GemmSpec; 2],
        mut amax: Option<&mut CudaBuf>,
        gelu_scale: f32,
    ) -> Result<Option<bool>> {
        let t = DType::BF16;
        if out.dtype != t || pre.dtype != t || gelu_out.dtype != t || w2.dtype != t {
            return Ok(None);
        }
        self.expect("linear output", out, t, n * c)?;
        self.expect("GELU input", pre, t, n * h)?;
        self.expect("GELU output", gelu_out, t, n * h)?;
        if let Some(b) = b2 {
            self.expect("linear bias", b, t, c)?;
        }
        let mut g = Gemm {
            out: self.ptr_mut(out)?,
            out_type: gemm_type(t)?,
            a: 0,
            b: 0,
            inputs: tensors_type(&[gelu_out, w2])?,
            m: n,
            n: c,
            k: h,
            trans_a: false,
            trans_b: true,
            alpha: fcproj.alpha,
            beta: 0.0,
            epilogue: match b2 {
                Some(b) => Epilogue::Bias { bias: self.ptr(b)? },
                None => Epilogue::None,
            },
        };
        let scales = self.fp8_scales(&fcproj, true);
        let Some(mut f) = scales.filter(|f| self.fp8_direct(&g, Some(f))) else {
            return Ok(None);
        };
        crate::backend::Backend::linear_forward(
            self,
            pre,
            inp,
            w1,
            b1,
            n,
            c,
            h,
            fc,
            amax.as_deref_mut(),
        )?;
        let amax = self.amax_base(amax)?;
        let cell_x = self.amax_cell(amax.0, amax.1, &fcproj.a)?;
        let cell_w = self.amax_cell(amax.0, amax.1, &fcproj.b)?;
        let (px, sx) =
            self.fp8_forward_gelu_operand(gelu_out, pre, n, h, &fcproj.a, cell_x, gelu_scale)?;
        let (pw, sw) = self.fp8_forward_operand(w2, c, h, &fcproj.b, cell_w, Role::W, true)?;
        (g.a, g.b) = (px, pw);
        self.fp8_bind_scales(&mut g, &mut f, &fcproj, sx, sw);
        if self.gemm_fp8(g, f)? {
            return Ok(Some(false));
        }
        // Refused at run time: GELU's output as the unfused path stores it, then the GEMM of the
        // dequantized operands (whose cast records the same amax again: a no-op).
        crate::backend::Backend::gelu_forward(self, gelu_out, pre, gelu_scale)?;
        g.a = self.fp8_fallback_operand(gelu_out, n, h, &fcproj.a, Role::X, amax)?;
        g.b = self.fp8_fallback_operand(w2, c, h, &fcproj.b, Role::W, amax)?;
        self.gemm(g)?;
        Ok(Some(true))
    }

    /// [`crate::backend::Backend::mlp_backward`] when both linears' specs involve FP8: the
    /// down-projection's backward writes the gradient of the GELU output into `dhidden` (an FP8
    /// GEMM, as in `fp8_op_linear_gelu_backward`), and the up-projection's backward applies the
    /// GELU derivative inside that gradient's cast ([`DGeluCast`]), so the gradient of the
    /// pre-activation is never written and read back (two passes over `n x h` bf16 saved). Where
    /// that cast cannot serve (f16 tensors, sizes cuBLASLt has no FP8 kernel for, FP8 turned
    /// off), the composed ops run.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_mlp_backward(
        &self,
        dinp: &mut CudaBuf,
        dhidden: &mut CudaBuf,
        (dw1, mut db1): (&mut CudaBuf, Option<&mut CudaBuf>),
        (dw2, db2): (&mut CudaBuf, Option<&mut CudaBuf>),
        dout: &CudaBuf,
        (inp, pre, gelu_out): (&CudaBuf, &CudaBuf, GeluOut<'_, CudaBuf>),
        (w1, w2): (&CudaBuf, &CudaBuf),
        (n, c, h): (usize, usize, usize),
        gemms: [GemmSpec; 4],
        mut amax: Option<&mut CudaBuf>,
        gelu_scale: f32,
    ) -> Result<()> {
        let [dx2, dw2_gemm, dx1, dw1_gemm] = gemms;
        let t = dhidden.dtype;
        if t != DType::BF16 || pre.dtype != t {
            return crate::backend::mlp_backward_composed(
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
            );
        }
        self.expect("GELU input", pre, t, n * h)?;
        // A GELU output the forward did not write is formed only where its kept codes are not
        // what the down-projection's weight gradient reads.
        let (gelu_out, pending): (&CudaBuf, _) = match gelu_out {
            GeluOut::Stored(g) => (g, None),
            GeluOut::Deferred(g) => {
                self.expect("GELU output", g, t, n * h)?;
                let at = self.ptr_mut(g)?;
                let pending = GeluPending {
                    at,
                    pre: self.ptr(pre)?,
                    scale: gelu_scale,
                    len: n * h,
                };
                (g, Some(pending))
            }
        };
        self.expect("linear input grad", dhidden, t, n * h)?;
        let dh = Some((self.ptr_mut(dhidden)?, t));
        self.fp8_linear_backward(
            dh,
            None,
            dw2,
            db2,
            dout,
            gelu_out,
            w2,
            n,
            h,
            c,
            dx2,
            dw2_gemm,
            amax.as_deref_mut(),
            None,
            pending,
        )?;
        self.expect("linear input grad", dinp, dinp.dtype, n * c)?;
        let d = Some((self.ptr_mut(dinp)?, dinp.dtype));
        let g = DGeluCast {
            pre: self.ptr(pre)?,
            scale: gelu_scale,
        };
        let pd = self.ptr_mut(dhidden)?;
        let ran = self.fp8_linear_backward(
            d,
            None,
            dw1,
            db1.as_deref_mut(),
            dhidden,
            inp,
            w1,
            n,
            c,
            h,
            dx1,
            dw1_gemm,
            amax.as_deref_mut(),
            Some((g, pd)),
            None,
        )?;
        if ran.is_none() {
            crate::backend::Backend::gelu_backward(self, dhidden, pre, gelu_scale)?;
            self.fp8_op_linear_backward(
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
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_cells_are_aligned_and_past_the_partials() {
        for role in 0..=ROLES {
            let at = scale_cell(role);
            assert_eq!(at % 256, 0);
            assert!(at >= (PARTIALS * 4) as u64);
        }
    }

    #[test]
    fn host_factor_folds_two_fixed_scales_exactly() {
        let op = |scale| GemmOperand {
            scale,
            ..GemmOperand::plain(DType::F8E4M3)
        };
        let fixed = |a, b| GemmSpec::new(op(OperandScale::Fixed(a)), op(OperandScale::Fixed(b)));
        assert_eq!(host_factor(&fixed(32.0, 1024.0)), Some(2f32.powi(-15)));
        // 2^252 is no f32: the scale pointers stay.
        let tiny = 2f32.powi(-126);
        assert_eq!(host_factor(&fixed(tiny, tiny)), None);
        let current = GemmSpec::new(
            op(OperandScale::Current { margin: 0 }),
            op(OperandScale::Fixed(1.0)),
        );
        assert_eq!(host_factor(&current), None);
        assert!(involved(&[current]));
        assert!(!involved(&[GemmSpec::both(DType::BF16)]));
    }
}
