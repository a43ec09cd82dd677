//! The CPU backend: the reference implementation of [`Backend`].
//!
//! Buffers hold elements of type `T` (`f32` to train, `f64` as the reference for gradient checks
//! and selftests) plus the storage [`DType`] they model. Low-precision formats are *emulated*:
//! every op computes in `T` and then rounds its output through the buffer's format, so the values
//! a bf16 buffer holds are exactly the values real bf16 storage would hold. `F32` buffers are
//! full precision: exact f32 in `CpuBackend<f32>`, and not rounded at all in `CpuBackend<f64>`,
//! which is what makes the f64 backend a clean reference.
//!
//! The arithmetic lives in [`kernels`]: plain functions over slices, one per job.

pub mod kernels;

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, Result};

use super::{
    dropout_site_seed, linear_crossentropy_chunk, AdamW, AdamWTensor, Backend, GemmOperand,
    GemmSpec, OperandScale,
};
use crate::numerics::{self, DType};
use kernels::Real;

/// GPT-2's LayerNorm epsilon.
const LAYERNORM_EPS: f32 = 1e-5;

/// Element types the CPU backend computes in.
pub trait CpuElem: Real {
    /// Rounds every element through `dtype` (a no-op for `F32`, see the module doc).
    fn round_through(dtype: DType, xs: &mut [Self]);
    /// Widens to f32 (for downloads).
    fn narrow_to_f32(self) -> f32;
    /// From f32 (for uploads).
    fn widen_from(x: f32) -> Self;
}

impl CpuElem for f32 {
    fn round_through(dtype: DType, xs: &mut [Self]) {
        if dtype != DType::F32 {
            numerics::round_slice_in_place(dtype, xs);
        }
    }
    fn narrow_to_f32(self) -> f32 {
        self
    }
    fn widen_from(x: f32) -> Self {
        x
    }
}

impl CpuElem for f64 {
    fn round_through(dtype: DType, xs: &mut [Self]) {
        if dtype != DType::F32 {
            for x in xs {
                *x = f64::from(numerics::round_to(dtype, *x as f32));
            }
        }
    }
    fn narrow_to_f32(self) -> f32 {
        self as f32
    }
    fn widen_from(x: f32) -> Self {
        f64::from(x)
    }
}

/// Live and peak bytes held in CPU buffers.
#[derive(Default, Debug)]
struct MemCounter {
    live: AtomicU64,
    peak: AtomicU64,
}

impl MemCounter {
    fn add(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
    fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A CPU buffer: elements of `T` holding values representable in `dtype`.
#[derive(Debug)]
pub struct CpuBuf<T> {
    dtype: DType,
    data: Vec<T>,
    mem: Arc<MemCounter>,
}

impl<T> CpuBuf<T> {
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    /// The storage format this buffer models.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl<T> Drop for CpuBuf<T> {
    fn drop(&mut self) {
        self.mem
            .sub((self.data.len() * std::mem::size_of::<T>()) as u64);
    }
}

/// The CPU backend over element type `T`.
#[derive(Debug, Default)]
pub struct CpuBackend<T> {
    mem: Arc<MemCounter>,
    _elem: PhantomData<T>,
}

impl<T: CpuElem> CpuBackend<T> {
    /// A backend using the global rayon thread pool.
    pub fn new() -> Self {
        Self {
            mem: Arc::new(MemCounter::default()),
            _elem: PhantomData,
        }
    }

    /// A buffer filled from `values` (rounded into `dtype`), for tests and tools.
    pub fn buf_from(&self, dtype: DType, values: &[T]) -> CpuBuf<T> {
        let mut data = values.to_vec();
        T::round_through(dtype, &mut data);
        self.mem.add((data.len() * std::mem::size_of::<T>()) as u64);
        CpuBuf {
            dtype,
            data,
            mem: self.mem.clone(),
        }
    }

    fn round(buf: &mut CpuBuf<T>) {
        T::round_through(buf.dtype, &mut buf.data);
    }
}

/// An operand as a GEMM consumes it, and its amax (max |x| as stored, before any scaling).
///
/// As stored when `format` is its storage format (or f32); else rounded through `format`. FP8
/// is scaled per tensor by `s` (from the operand's own amax with current scaling, or as given),
/// i.e. the GEMM multiplies `satfinite(round(x·s))/s`, which is what a scaled FP8 GEMM computes
/// (the `1/s` is exact: `s` is a power of two). Values beyond the format's max saturate.
fn gemm_operand<T: CpuElem>(buf: &CpuBuf<T>, op: GemmOperand) -> Result<(Cow<'_, [T]>, f32)> {
    let amax = || {
        buf.data
            .iter()
            .fold(0.0f32, |m, x| m.max(x.narrow_to_f32().abs()))
    };
    if op.format == buf.dtype || op.format == DType::F32 {
        let a = if op.amax_slot.is_some() { amax() } else { 0.0 };
        return Ok((Cow::Borrowed(&buf.data), a));
    }
    let mut values = buf.data.clone();
    let a = amax();
    if op.format.is_float8() {
        let scale = match op.scale {
            OperandScale::Current { margin } => numerics::scale_from_amax(a, op.format, margin),
            OperandScale::Fixed(s) => s,
        };
        if !(scale.is_finite() && scale > 0.0) {
            bail!("internal error: FP8 operand scale {scale} is not a positive finite number");
        }
        let (s, inv) = (T::widen_from(scale), T::widen_from(1.0 / scale));
        values.iter_mut().for_each(|x| *x *= s);
        T::round_through(op.format, &mut values);
        values.iter_mut().for_each(|x| *x *= inv);
    } else {
        T::round_through(op.format, &mut values);
    }
    Ok((Cow::Owned(values), a))
}

/// Records operand amaxes into the caller's amax buffer: `amax[slot] = max(amax[slot], a)`.
fn record_amax<T: CpuElem>(
    amax: &mut Option<&mut CpuBuf<T>>,
    recs: &[(GemmOperand, f32)],
) -> Result<()> {
    for (op, a) in recs {
        let (Some(slot), Some(buf)) = (op.amax_slot, amax.as_deref_mut()) else {
            continue;
        };
        let Some(cell) = buf.data.get_mut(slot) else {
            bail!(
                "internal error: amax slot {slot} outside a buffer of {}",
                buf.data.len()
            );
        };
        // NaN propagates (an overflowed step shows up in the history, which skips it).
        let old = cell.narrow_to_f32();
        let new = if a.is_nan() || old.is_nan() {
            f32::NAN
        } else {
            old.max(*a)
        };
        *cell = T::widen_from(new);
    }
    Ok(())
}

fn check_len<T>(what: &str, buf: &CpuBuf<T>, want: usize) -> Result<()> {
    if buf.data.len() != want {
        bail!(
            "internal error: {what} has {} elements, the op expects {want}",
            buf.data.len()
        );
    }
    Ok(())
}

/// f32 GEMM throughput of this machine, measured once on a 1024³ product.
fn measured_cpu_peak_flops() -> f64 {
    static PEAK: OnceLock<f64> = OnceLock::new();
    *PEAK.get_or_init(|| {
        let n = 1024;
        let a = vec![1.0f32; n * n];
        let b = vec![0.5f32; n * n];
        let mut c = vec![0.0f32; n * n];
        kernels::matmul(&mut c, &a, &b, n, n, n, false, false, 1.0, 0.0);
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            kernels::matmul(&mut c, &a, &b, n, n, n, false, false, 1.0, 0.0);
        }
        2.0 * (n * n * n * reps) as f64 / start.elapsed().as_secs_f64()
    })
}

impl<T: CpuElem> Backend for CpuBackend<T> {
    type Buf = CpuBuf<T>;
    type Tokens = Vec<u32>;
    type Graph = ();
    type Seed = u64;

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {})",
            rayon::current_num_threads(),
            std::any::type_name::<T>()
        )
    }

    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuf<T>> {
        let mut data = Vec::new();
        if data.try_reserve_exact(len).is_err() {
            bail!(
                "out of memory: could not allocate {} MiB on the CPU; use a smaller model or batch",
                (len * std::mem::size_of::<T>()) >> 20
            );
        }
        data.resize(len, T::zero());
        self.mem.add((len * std::mem::size_of::<T>()) as u64);
        Ok(CpuBuf {
            dtype,
            data,
            mem: self.mem.clone(),
        })
    }

    fn alloc_tokens(&self, len: usize) -> Result<Vec<u32>> {
        Ok(vec![0; len])
    }

    fn alloc_seed(&self) -> Result<u64> {
        Ok(0)
    }

    fn upload_seed(&self, dst: &mut u64, seed: u64) -> Result<()> {
        *dst = seed;
        Ok(())
    }

    fn len(&self, buf: &CpuBuf<T>) -> usize {
        buf.data.len()
    }

    fn dtype(&self, buf: &CpuBuf<T>) -> DType {
        buf.dtype
    }

    fn upload(&self, dst: &mut CpuBuf<T>, src: &[f32]) -> Result<()> {
        check_len("upload destination", dst, src.len())?;
        for (d, &s) in dst.data.iter_mut().zip(src) {
            *d = T::widen_from(s);
        }
        Self::round(dst);
        Ok(())
    }

    fn upload_tokens(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
        if dst.len() != src.len() {
            bail!(
                "internal error: token upload of {} ids into {}",
                src.len(),
                dst.len()
            );
        }
        dst.copy_from_slice(src);
        Ok(())
    }

    fn download_range(&self, src: &CpuBuf<T>, offset: usize, len: usize) -> Result<Vec<f32>> {
        match src.data.get(offset..offset + len) {
            Some(s) => Ok(s.iter().map(|&x| x.narrow_to_f32()).collect()),
            None => bail!(
                "internal error: download of {offset}+{len} from {}",
                src.data.len()
            ),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn peak_mem_bytes(&self) -> u64 {
        self.mem.peak.load(Ordering::Relaxed)
    }

    fn peak_flops(&self, _dtype: DType) -> f64 {
        // Low-precision formats are emulated on the CPU: everything runs at f32 speed.
        measured_cpu_peak_flops()
    }

    fn fill(&self, buf: &mut CpuBuf<T>, value: f32) -> Result<()> {
        kernels::fill(&mut buf.data, T::widen_from(value));
        Self::round(buf);
        Ok(())
    }

    fn copy(&self, dst: &mut CpuBuf<T>, src: &CpuBuf<T>) -> Result<()> {
        check_len("copy destination", dst, src.data.len())?;
        dst.data.copy_from_slice(&src.data);
        if dst.dtype != src.dtype {
            Self::round(dst);
        }
        Ok(())
    }

    fn residual_forward(
        &self,
        out: &mut CpuBuf<T>,
        a: &CpuBuf<T>,
        b: &CpuBuf<T>,
        (sa, sb): (f32, f32),
    ) -> Result<()> {
        check_len("residual a", a, out.data.len())?;
        check_len("residual b", b, out.data.len())?;
        let scales = (T::widen_from(sa), T::widen_from(sb));
        kernels::residual_forward(&mut out.data, &a.data, &b.data, scales);
        Self::round(out);
        Ok(())
    }

    fn scale(&self, buf: &mut CpuBuf<T>, factor: f32) -> Result<()> {
        kernels::scale_inplace(&mut buf.data, T::widen_from(factor));
        Self::round(buf);
        Ok(())
    }

    fn gelu_forward(&self, out: &mut CpuBuf<T>, inp: &CpuBuf<T>, scale: f32) -> Result<()> {
        check_len("gelu input", inp, out.data.len())?;
        kernels::gelu_forward(&mut out.data, &inp.data, T::widen_from(scale));
        Self::round(out);
        Ok(())
    }

    fn gelu_backward(&self, d: &mut CpuBuf<T>, inp: &CpuBuf<T>, scale: f32) -> Result<()> {
        check_len("gelu input", inp, d.data.len())?;
        kernels::gelu_backward(&mut d.data, &inp.data, T::widen_from(scale));
        Self::round(d);
        Ok(())
    }

    fn dropout_forward(&self, x: &mut CpuBuf<T>, p: f32, seed: &u64, site: u64) -> Result<()> {
        kernels::dropout_forward(&mut x.data, p, dropout_site_seed(*seed, site));
        Self::round(x);
        Ok(())
    }

    fn dropout_backward(
        &self,
        dx: &mut CpuBuf<T>,
        dy: &CpuBuf<T>,
        p: f32,
        seed: &u64,
        site: u64,
    ) -> Result<()> {
        check_len("dropout output gradient", dy, dx.data.len())?;
        dx.data.copy_from_slice(&dy.data);
        kernels::dropout_backward(&mut dx.data, p, dropout_site_seed(*seed, site));
        Self::round(dx);
        Ok(())
    }

    fn linear_forward(
        &self,
        out: &mut CpuBuf<T>,
        inp: &CpuBuf<T>,
        w: &CpuBuf<T>,
        bias: Option<&CpuBuf<T>>,
        n: usize,
        ic: usize,
        oc: usize,
        gemm: GemmSpec,
        mut amax: Option<&mut CpuBuf<T>>,
    ) -> Result<()> {
        check_len("linear output", out, n * oc)?;
        check_len("linear input", inp, n * ic)?;
        check_len("linear weight", w, oc * ic)?;
        if let Some(b) = bias {
            check_len("linear bias", b, oc)?;
        }
        let (inp_op, inp_amax) = gemm_operand(inp, gemm.a)?;
        let (w_op, w_amax) = gemm_operand(w, gemm.b)?;
        kernels::linear_forward(
            &mut out.data,
            &inp_op,
            &w_op,
            bias.map(|b| &b.data[..]),
            n,
            ic,
            oc,
            T::widen_from(gemm.alpha),
        );
        Self::round(out);
        record_amax(&mut amax, &[(gemm.a, inp_amax), (gemm.b, w_amax)])
    }

    fn linear_backward(
        &self,
        dinp: Option<&mut CpuBuf<T>>,
        dw: &mut CpuBuf<T>,
        dbias: Option<&mut CpuBuf<T>>,
        dout: &CpuBuf<T>,
        inp: &CpuBuf<T>,
        w: &CpuBuf<T>,
        n: usize,
        ic: usize,
        oc: usize,
        dinp_gemm: GemmSpec,
        dw_gemm: GemmSpec,
        mut amax: Option<&mut CpuBuf<T>>,
    ) -> Result<()> {
        check_len("linear dout", dout, n * oc)?;
        check_len("linear input", inp, n * ic)?;
        check_len("linear weight", w, oc * ic)?;
        check_len("linear weight grad", dw, oc * ic)?;
        if let Some(dinp) = dinp {
            check_len("linear input grad", dinp, n * ic)?;
            let (dout_op, dout_amax) = gemm_operand(dout, dinp_gemm.a)?;
            let (w_op, w_amax) = gemm_operand(w, dinp_gemm.b)?;
            kernels::matmul(
                &mut dinp.data,
                &dout_op,
                &w_op,
                n,
                ic,
                oc,
                false,
                false,
                T::widen_from(dinp_gemm.alpha),
                T::zero(),
            );
            Self::round(dinp);
            record_amax(
                &mut amax,
                &[(dinp_gemm.a, dout_amax), (dinp_gemm.b, w_amax)],
            )?;
        }
        let (dout_op, dout_amax) = gemm_operand(dout, dw_gemm.a)?;
        let (inp_op, inp_amax) = gemm_operand(inp, dw_gemm.b)?;
        kernels::matmul(
            &mut dw.data,
            &dout_op,
            &inp_op,
            oc,
            ic,
            n,
            true,
            false,
            T::widen_from(dw_gemm.alpha),
            T::one(),
        );
        Self::round(dw);
        record_amax(&mut amax, &[(dw_gemm.a, dout_amax), (dw_gemm.b, inp_amax)])?;
        if let Some(db) = dbias {
            check_len("linear bias grad", db, oc)?;
            kernels::bias_backward(
                &mut db.data,
                &dout.data,
                n,
                oc,
                T::widen_from(dw_gemm.alpha),
            );
            Self::round(db);
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut CpuBuf<T>,
        mean: &mut CpuBuf<T>,
        rstd: &mut CpuBuf<T>,
        inp: &CpuBuf<T>,
        weight: &CpuBuf<T>,
        bias: &CpuBuf<T>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        check_len("layernorm output", out, n * c)?;
        check_len("layernorm input", inp, n * c)?;
        check_len("layernorm mean", mean, n)?;
        check_len("layernorm rstd", rstd, n)?;
        kernels::layernorm_forward(
            &mut out.data,
            &mut mean.data,
            &mut rstd.data,
            &inp.data,
            &weight.data,
            &bias.data,
            n,
            c,
            T::widen_from(LAYERNORM_EPS),
        );
        Self::round(out);
        Self::round(mean);
        Self::round(rstd);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CpuBuf<T>,
        dweight: &mut CpuBuf<T>,
        dbias: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        inp: &CpuBuf<T>,
        weight: &CpuBuf<T>,
        mean: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        n: usize,
        c: usize,
        (sx, sp): (f32, f32),
        res_bias: Option<(&mut CpuBuf<T>, f32)>,
    ) -> Result<()> {
        check_len("layernorm input grad", dinp, n * c)?;
        check_len("layernorm dout", dout, n * c)?;
        check_len("layernorm weight grad", dweight, c)?;
        kernels::layernorm_backward(
            &mut dinp.data,
            &mut dweight.data,
            &mut dbias.data,
            &dout.data,
            &inp.data,
            &weight.data,
            &mean.data,
            &rstd.data,
            n,
            c,
            (T::widen_from(sx), T::widen_from(sp)),
        );
        Self::round(dinp);
        Self::round(dweight);
        Self::round(dbias);
        // The same column sums, over the same rounded values, as `linear_backward`'s bias
        // gradient of this `dinp` would be: the CPU's results do not move with the fusion.
        if let Some((db, scale)) = res_bias {
            check_len("residual bias grad", db, c)?;
            kernels::bias_backward(&mut db.data, &dinp.data, n, c, T::widen_from(scale));
            Self::round(db);
        }
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
        qkv: &CpuBuf<T>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
    ) -> Result<()> {
        check_len("attention output", out, b * t * c)?;
        check_len("attention lse", lse, b * nh * t)?;
        check_len("attention qkv", qkv, b * t * 3 * c)?;
        let s = T::widen_from(out_scale);
        kernels::attention_forward(&mut out.data, &mut lse.data, &qkv.data, b, t, c, nh, s);
        Self::round(out);
        Self::round(lse);
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        qkv: &CpuBuf<T>,
        out: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
        qkv_bias: Option<(&mut CpuBuf<T>, f32)>,
    ) -> Result<()> {
        check_len("attention qkv grad", dqkv, b * t * 3 * c)?;
        check_len("attention dout", dout, b * t * c)?;
        kernels::attention_backward(
            &mut dqkv.data,
            &dout.data,
            &qkv.data,
            &out.data,
            &lse.data,
            b,
            t,
            c,
            nh,
            T::widen_from(out_scale),
        );
        Self::round(dqkv);
        // The same column sums, over the same rounded values, as the QKV linear's
        // `linear_backward` would form: the CPU's results do not move with the fusion.
        if let Some((db, scale)) = qkv_bias {
            check_len("qkv bias grad", db, 3 * c)?;
            kernels::bias_backward(&mut db.data, &dqkv.data, b * t, 3 * c, T::widen_from(scale));
            Self::round(db);
        }
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut CpuBuf<T>,
        tokens: &Vec<u32>,
        wte: &CpuBuf<T>,
        wpe: &CpuBuf<T>,
        b: usize,
        t: usize,
        c: usize,
        scale: f32,
    ) -> Result<()> {
        check_len("embedding output", out, b * t * c)?;
        if tokens.len() != b * t {
            bail!(
                "internal error: {} tokens for a {b}x{t} batch",
                tokens.len()
            );
        }
        let vocab = wte.data.len() / c;
        if let Some(&bad) = tokens.iter().find(|&&tok| tok as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let s = T::widen_from(scale);
        kernels::embedding_forward(&mut out.data, tokens, &wte.data, &wpe.data, b, t, c, s);
        Self::round(out);
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &mut CpuBuf<T>,
        dwpe: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        tokens: &Vec<u32>,
        b: usize,
        t: usize,
        c: usize,
        (s_te, s_pe): (f32, f32),
    ) -> Result<()> {
        check_len("embedding dout", dout, b * t * c)?;
        let scales = (T::widen_from(s_te), T::widen_from(s_pe));
        kernels::embedding_backward(
            &mut dwte.data,
            &mut dwpe.data,
            &dout.data,
            tokens,
            b,
            t,
            c,
            scales,
        );
        Self::round(dwte);
        Self::round(dwpe);
        Ok(())
    }

    fn crossentropy_forward_backward(
        &self,
        losses: &mut CpuBuf<T>,
        logits: &mut CpuBuf<T>,
        targets: &Vec<u32>,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
    ) -> Result<()> {
        check_len("classifier logits", logits, n * vp)?;
        check_len("classifier losses", losses, n)?;
        kernels::crossentropy_forward_backward(
            &mut losses.data,
            &mut logits.data,
            targets,
            n,
            v,
            vp,
            T::widen_from(dloss),
        );
        Self::round(losses);
        Self::round(logits);
        Ok(())
    }

    fn crossentropy_forward(
        &self,
        losses: &mut CpuBuf<T>,
        logits: &CpuBuf<T>,
        targets: &Vec<u32>,
        n: usize,
        v: usize,
        vp: usize,
    ) -> Result<()> {
        check_len("classifier logits", logits, n * vp)?;
        check_len("classifier losses", losses, n)?;
        kernels::crossentropy_forward(&mut losses.data, &logits.data, targets, n, v, vp);
        Self::round(losses);
        Ok(())
    }

    fn chunks_linear_crossentropy(&self) -> bool {
        true
    }

    fn linear_crossentropy_forward_backward(
        &self,
        losses: &mut CpuBuf<T>,
        logits: &mut CpuBuf<T>,
        dx: &mut CpuBuf<T>,
        dw: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        targets: &Vec<u32>,
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        gemms: [GemmSpec; 3],
        dloss: f32,
    ) -> Result<()> {
        let [fwd, dinp_gemm, dw_gemm] = gemms.map(|g| T::widen_from(g.alpha));
        let rows = linear_crossentropy_chunk(self, logits, x, w, losses, (n, c, vp), &gemms)?;
        check_len("head input grad", dx, n * c)?;
        check_len("head weight grad", dw, vp * c)?;
        for start in (0..n).step_by(rows) {
            let r = rows.min(n - start);
            let (x_rows, lg) = (&x.data[start * c..][..r * c], &mut logits.data[..r * vp]);
            kernels::linear_forward(lg, x_rows, &w.data, None, r, c, vp, fwd);
            T::round_through(logits.dtype, lg);
            let chunk_losses = &mut losses.data[start..start + r];
            let chunk_targets = &targets[start..start + r];
            let dl = T::widen_from(dloss);
            kernels::crossentropy_forward_backward(chunk_losses, lg, chunk_targets, r, v, vp, dl);
            T::round_through(losses.dtype, chunk_losses);
            T::round_through(logits.dtype, lg);
            let dx_rows = &mut dx.data[start * c..][..r * c];
            let zero = T::zero();
            kernels::matmul(
                dx_rows, lg, &w.data, r, c, vp, false, false, dinp_gemm, zero,
            );
            T::round_through(dx.dtype, dx_rows);
            kernels::matmul(
                &mut dw.data,
                lg,
                x_rows,
                vp,
                c,
                r,
                true,
                false,
                dw_gemm,
                T::one(),
            );
            Self::round(dw);
        }
        Ok(())
    }

    fn linear_crossentropy_forward(
        &self,
        losses: &mut CpuBuf<T>,
        logits: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        targets: &Vec<u32>,
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        fwd: GemmSpec,
    ) -> Result<()> {
        let rows = linear_crossentropy_chunk(self, logits, x, w, losses, (n, c, vp), &[fwd])?;
        for start in (0..n).step_by(rows) {
            let r = rows.min(n - start);
            let (x_rows, lg) = (&x.data[start * c..][..r * c], &mut logits.data[..r * vp]);
            let alpha = T::widen_from(fwd.alpha);
            kernels::linear_forward(lg, x_rows, &w.data, None, r, c, vp, alpha);
            T::round_through(logits.dtype, lg);
            let chunk_losses = &mut losses.data[start..start + r];
            kernels::crossentropy_forward(chunk_losses, lg, &targets[start..start + r], r, v, vp);
            T::round_through(losses.dtype, chunk_losses);
        }
        Ok(())
    }

    fn adamw_update(&self, tensors: &mut [AdamWTensor<'_, CpuBuf<T>>], hp: &AdamW) -> Result<()> {
        for (index, t) in tensors.iter_mut().enumerate() {
            let len = t.param.data.len();
            check_len("adamw grad", t.grad, len)?;
            check_len("adamw m", t.m, len)?;
            check_len("adamw v", t.v, len)?;
            let hyper = kernels::AdamWHyper {
                lr: f64::from(hp.lr * t.lr_scale),
                beta1: f64::from(hp.beta1),
                beta2: f64::from(hp.beta2),
                eps: f64::from(hp.eps),
                weight_decay: f64::from(t.weight_decay(hp)),
            };
            kernels::adamw_step(
                &mut t.param.data,
                &t.grad.data,
                &mut t.m.data,
                &mut t.v.data,
                &hyper,
                hp.step,
                f64::from(hp.grad_scale),
            );
            Self::round(t.param);
            Self::round(t.m);
            Self::round(t.v);
            let Some(copy) = t.compute_copy.as_deref_mut() else {
                continue;
            };
            match hp.rounding_seed {
                Some(seed) if copy.dtype == DType::BF16 => {
                    check_len("adamw compute copy", copy, len)?;
                    let key = kernels::rounding_key(seed, hp.step, index as u64);
                    for (i, (c, &p)) in copy.data.iter_mut().zip(&t.param.data).enumerate() {
                        let r = kernels::rounding_bits(key, i as u64);
                        let bits = numerics::f32_to_bf16_bits_stochastic(p.narrow_to_f32(), r);
                        *c = T::widen_from(numerics::bf16_bits_to_f32(bits));
                    }
                }
                _ => self.copy(copy, t.param)?,
            }
        }
        Ok(())
    }

    fn sum_squares(&self, buf: &CpuBuf<T>) -> Result<f64> {
        Ok(kernels::sum_squares(&buf.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_operands_are_scaled_rounded_and_unscaled() {
        let be = CpuBackend::<f32>::new();
        let buf = be.buf_from(DType::BF16, &[0.001, -3.0, 1.1, 1e-6, 0.0, 2.2]);
        // amax 3 → scale 2^floor(log2(448/3)) = 128 for e4m3, 2^floor(log2(57344/3)) = 16384 for e5m2.
        for (format, scale) in [(DType::F8E4M3, 128.0f32), (DType::F8E5M2, 16384.0)] {
            let (op, amax) = gemm_operand(&buf, GemmOperand::plain(format)).unwrap();
            assert_eq!(amax, 3.0);
            for (&got, &x) in op.iter().zip(buf.as_slice()) {
                assert_eq!(
                    got,
                    numerics::round_to(format, x * scale) / scale,
                    "{format} {x}"
                );
            }
            // A margin of 2 binades divides the scale by 4.
            let margin = GemmOperand {
                scale: OperandScale::Current { margin: 2 },
                ..GemmOperand::plain(format)
            };
            let (op, _) = gemm_operand(&buf, margin).unwrap();
            let s = scale / 4.0;
            for (&got, &x) in op.iter().zip(buf.as_slice()) {
                assert_eq!(got, numerics::round_to(format, x * s) / s, "{format} {x}");
            }
        }
        // A fixed scale is used as given; what lands beyond the max saturates (satfinite).
        let fixed = GemmOperand {
            scale: OperandScale::Fixed(256.0),
            ..GemmOperand::plain(DType::F8E4M3)
        };
        let (op, _) = gemm_operand(&buf, fixed).unwrap();
        assert_eq!(op[1], -448.0 / 256.0, "-3·256 = -768 saturates to -448");
        assert_eq!(
            op[2],
            numerics::round_to(DType::F8E4M3, 1.1 * 256.0) / 256.0
        );
        let bad = GemmOperand {
            scale: OperandScale::Fixed(0.0),
            ..fixed
        };
        assert!(gemm_operand(&buf, bad).is_err());
        // An operand already in the GEMM's format is used as stored.
        let (op, _) = gemm_operand(&buf, GemmOperand::plain(DType::BF16)).unwrap();
        assert!(matches!(op, Cow::Borrowed(_)));
    }

    #[test]
    fn linear_ops_record_operand_amax_and_scale_by_alpha() {
        let be = CpuBackend::<f32>::new();
        let (n, ic, oc) = (2, 3, 2);
        let x = be.buf_from(DType::BF16, &[1.0, -2.0, 0.5, 0.25, 4.0, -1.0]);
        let w = be.buf_from(DType::BF16, &[0.5, 1.0, -1.5, 2.0, 0.0, 1.0]);
        let dy = be.buf_from(DType::BF16, &[0.1, -0.3, 0.2, 0.05]);
        let slot = |format, slot| GemmOperand {
            amax_slot: Some(slot),
            ..GemmOperand::plain(format)
        };
        let mut amax = be.buf_from(DType::F32, &[0.0, 0.0, 7.0]);
        let fwd = GemmSpec::new(slot(DType::F8E4M3, 0), slot(DType::F8E4M3, 1));
        let mut y = be.alloc(DType::F32, n * oc).unwrap();
        be.linear_forward(&mut y, &x, &w, None, n, ic, oc, fwd, Some(&mut amax))
            .unwrap();
        assert_eq!(amax.as_slice(), &[4.0, 2.0, 7.0]);
        let mut y2 = be.alloc(DType::F32, n * oc).unwrap();
        be.linear_forward(&mut y2, &x, &w, None, n, ic, oc, fwd.with_alpha(0.25), None)
            .unwrap();
        for (a, b) in y.as_slice().iter().zip(y2.as_slice()) {
            assert_eq!(a * 0.25, *b);
        }
        // The gradient's slot keeps the max over the step (7 stays; a NaN would stick).
        let dx_spec = GemmSpec::new(slot(DType::F8E5M2, 2), slot(DType::F8E4M3, 1));
        let dw_spec = GemmSpec::new(slot(DType::F8E5M2, 2), slot(DType::F8E4M3, 0)).with_alpha(0.5);
        let mut dx = be.alloc(DType::F32, n * ic).unwrap();
        let mut dw = be.alloc(DType::F32, oc * ic).unwrap();
        let mut db = be.alloc(DType::F32, oc).unwrap();
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
            dx_spec,
            dw_spec,
            Some(&mut amax),
        )
        .unwrap();
        assert_eq!(amax.as_slice(), &[4.0, 2.0, 7.0]);
        // dbias is scaled by the weight gradient's alpha.
        assert_eq!(
            db.as_slice()[0],
            0.5 * (0.1f32.to_bf16_f32() + 0.2f32.to_bf16_f32())
        );
    }

    /// The residual bias option adds `scale ·` the column sums of the updated (bf16-rounded)
    /// input gradient, bit for bit what `linear_backward` adds for that output gradient, and
    /// leaves the LayerNorm's own outputs as they are without it.
    #[test]
    fn layernorm_backward_forms_the_residual_bias_gradient() {
        let be = CpuBackend::<f32>::new();
        let (n, c) = (5, 7);
        let inp = be.buf_from(DType::BF16, &vals(1, n * c));
        let dout = be.buf_from(DType::BF16, &vals(2, n * c));
        let w = be.buf_from(DType::BF16, &vals(3, c));
        let b = be.buf_from(DType::BF16, &vals(4, c));
        let mut out = be.alloc(DType::BF16, n * c).unwrap();
        let mut mean = be.alloc(DType::F32, n).unwrap();
        let mut rstd = be.alloc(DType::F32, n).unwrap();
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c)
            .unwrap();
        let run = |res: Option<f32>| {
            let mut dinp = be.buf_from(DType::BF16, &vals(5, n * c));
            let mut dw = be.buf_from(DType::F32, &vals(6, c));
            let mut db = be.buf_from(DType::F32, &vals(7, c));
            let mut dres = be.buf_from(DType::F32, &vals(8, c));
            be.layernorm_backward(
                &mut dinp,
                &mut dw,
                &mut db,
                &dout,
                &inp,
                &w,
                &mean,
                &rstd,
                n,
                c,
                (0.7, 1.3),
                res.map(|s| (&mut dres, s)),
            )
            .unwrap();
            (dinp, dw, db, dres)
        };
        let (dinp0, dw0, db0, dres0) = run(None);
        assert_eq!(
            dres0.as_slice(),
            &vals(8, c)[..],
            "untouched without the option"
        );
        for scale in [1.0, 0.45] {
            let (dinp, dw, db, dres) = run(Some(scale));
            assert_eq!(dinp.as_slice(), dinp0.as_slice());
            assert_eq!(dw.as_slice(), dw0.as_slice());
            assert_eq!(db.as_slice(), db0.as_slice());
            let want = linear_bias_grad(&be, &dinp, n, c, &vals(8, c), scale);
            assert_eq!(dres.as_slice(), want.as_slice(), "scale {scale}");
            assert_ne!(dres.as_slice(), &vals(8, c)[..]);
        }
    }

    /// The QKV bias option adds `scale ·` the column sums of `dqkv` as stored (bf16-rounded),
    /// bit for bit what `linear_backward` adds for that output gradient, and leaves `dqkv` as
    /// it is without it.
    #[test]
    fn attention_backward_forms_the_qkv_bias_gradient() {
        let be = CpuBackend::<f32>::new();
        let (b, t, c, nh) = (2, 5, 8, 2);
        let (n, c3) = (b * t, 3 * c);
        let qkv = be.buf_from(DType::BF16, &vals(1, n * c3));
        let dout = be.buf_from(DType::BF16, &vals(2, n * c));
        let mut out = be.alloc(DType::BF16, n * c).unwrap();
        let mut lse = be.alloc(DType::F32, b * nh * t).unwrap();
        be.attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh, 0.8)
            .unwrap();
        let run = |bias: Option<f32>| {
            let mut dqkv = be.alloc(DType::BF16, n * c3).unwrap();
            let mut db = be.buf_from(DType::F32, &vals(3, c3));
            be.attention_backward(
                &mut dqkv,
                &dout,
                &qkv,
                &out,
                &lse,
                b,
                t,
                c,
                nh,
                0.8,
                bias.map(|s| (&mut db, s)),
            )
            .unwrap();
            (dqkv, db)
        };
        let (dqkv0, db0) = run(None);
        assert_eq!(
            db0.as_slice(),
            &vals(3, c3)[..],
            "untouched without the option"
        );
        for scale in [1.0, 0.45] {
            let (dqkv, db) = run(Some(scale));
            assert_eq!(dqkv.as_slice(), dqkv0.as_slice());
            let want = linear_bias_grad(&be, &dqkv, n, c3, &vals(3, c3), scale);
            assert_eq!(db.as_slice(), want.as_slice(), "scale {scale}");
            assert_ne!(db.as_slice(), &vals(3, c3)[..]);
        }
    }

    /// `m` deterministic values in [-1, 1.08], a different pattern for each `k`.
    fn vals(k: usize, m: usize) -> Vec<f32> {
        (0..m)
            .map(|i| ((i * 37 + k * 11) % 17) as f32 * 0.13 - 1.0)
            .collect()
    }

    /// The bias gradient `linear_backward` leaves, starting from `start`, for output gradient
    /// `dout` [n, oc] under a weight-gradient alpha of `scale` (the input and weight are
    /// arbitrary: they do not enter the bias gradient).
    fn linear_bias_grad(
        be: &CpuBackend<f32>,
        dout: &CpuBuf<f32>,
        n: usize,
        oc: usize,
        start: &[f32],
        scale: f32,
    ) -> CpuBuf<f32> {
        let mut db = be.buf_from(DType::F32, start);
        let x = be.buf_from(DType::BF16, &vec![0.5; n * 2]);
        let w = be.buf_from(DType::BF16, &vec![0.25; oc * 2]);
        let mut dw = be.alloc(DType::F32, oc * 2).unwrap();
        let spec = GemmSpec::new(
            GemmOperand::plain(DType::BF16),
            GemmOperand::plain(DType::BF16),
        )
        .with_alpha(scale);
        be.linear_backward(
            None,
            &mut dw,
            Some(&mut db),
            dout,
            &x,
            &w,
            n,
            2,
            oc,
            spec,
            spec,
            None,
        )
        .unwrap();
        db
    }

    trait Bf16 {
        fn to_bf16_f32(self) -> f32;
    }
    impl Bf16 for f32 {
        fn to_bf16_f32(self) -> f32 {
            numerics::round_to(DType::BF16, self)
        }
    }
}
