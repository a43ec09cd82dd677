//! CPU reference kernels for GPT-2 training: one function per job, explicit forward and backward.
//!
//! Every kernel is generic over [`Real`] so the same code trains in `f32` and checks gradients (and
//! serves as the reference for GPU self-tests) in `f64`. Tensors are contiguous row-major slices
//! whose sizes are passed explicitly; the caller guarantees the lengths (checked with
//! `debug_assert!`, except around the one `unsafe` GEMM call, where they are always checked).
//!
//! All kernels are deterministic: every output element is produced by one fixed sequence of
//! floating-point operations that does not depend on the number of threads or their timing.
//! Reductions across rows (bias, LayerNorm and embedding gradients) are split over fixed column
//! blocks or fixed groups, never over thread-dependent partial sums.

use num_traits::{Float, FromPrimitive, NumAssignOps};
use rayon::prelude::*;

/// The element type the kernels compute in: implemented for `f32` (training) and `f64` (gradient
/// checks and the reference for GPU self-tests).
pub trait Real:
    Float
    + FromPrimitive
    + NumAssignOps
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::iter::Sum
    + 'static
{
}

impl Real for f32 {}
impl Real for f64 {}

/// Work (in multiply-adds or element visits) below which a kernel stays on the calling thread;
/// below this rayon's fork/join overhead costs more than it saves.
const PAR_MIN_WORK: usize = 32 * 1024;

/// GEMMs with `m·n·k` below this run single-threaded.
const GEMM_PAR_MIN_WORK: usize = 100_000;

/// Column block width for deterministic column reductions (bias, LayerNorm weight gradients).
const COLUMN_BLOCK: usize = 32;

/// Fixed chunk length of [`sum_squares`]; it fixes the summation order independently of threads.
const SUM_CHUNK: usize = 4096;

/// Converts an `f64` constant into `T` (exact for the constants used here).
#[inline]
fn cst<T: Real>(x: f64) -> T {
    T::from_f64(x).unwrap_or_else(T::nan)
}

/// Minimum number of items per rayon task so that each task does at least [`PAR_MIN_WORK`] work.
/// When the whole job is smaller than that, rayon does not split it and runs it inline.
#[inline]
fn min_items(work_per_item: usize) -> usize {
    (PAR_MIN_WORK / work_per_item.max(1)).max(1)
}

/// Runs `f(offset, chunk)` over fixed-size chunks of `out`, in parallel when `out` is large.
fn for_each_chunk<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    const CHUNK: usize = 16 * 1024;
    if out.len() < 2 * CHUNK {
        f(0, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| f(i * CHUNK, chunk));
    }
}

/// Dot product with eight independent accumulators (vectorizes; the order is fixed).
#[inline]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [T::zero(); 8];
    let a_chunks = a.chunks_exact(8);
    let b_chunks = b.chunks_exact(8);
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for j in 0..8 {
            lanes[j] += ca[j] * cb[j];
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        tail += x * y;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

/// `y += a·x`.
#[inline]
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    debug_assert_eq!(y.len(), x.len());
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix multiplication and linear layers
// ---------------------------------------------------------------------------------------------

/// `out[m×n] = alpha·op(a)·op(b) + beta·out`, where `op(a)` is `m×k` (stored `k×m` when
/// `trans_a`) and `op(b)` is `k×n` (stored `n×k` when `trans_b`). With `beta == 0` the old
/// contents of `out` are never read, so NaN or garbage there does not leak into the result.
///
/// Runs on all rayon threads when `m·n·k` is large. gemm splits only the output among threads and
/// accumulates over `k` in a fixed blocked order, so results are bitwise reproducible.
///
/// # Panics
/// If a slice length does not match the sizes (checked always: the GEMM reads through pointers).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    out: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: T,
    beta: T,
) {
    assert_eq!(out.len(), m * n, "matmul: out must be m×n");
    assert_eq!(a.len(), m * k, "matmul: a must hold m×k elements");
    assert_eq!(b.len(), k * n, "matmul: b must hold k×n elements");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty product: only the beta term remains.
        if beta == T::zero() {
            fill(out, T::zero());
        } else {
            scale_inplace(out, beta);
        }
        return;
    }
    // Strides of op(a)[i, p] and op(b)[p, j] as (column stride, row stride).
    let (a_cs, a_rs) = if trans_a { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if trans_b { (k, 1) } else { (1, n) };
    let parallelism = if m.saturating_mul(n).saturating_mul(k) > GEMM_PAR_MIN_WORK {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let read_dst = beta != T::zero();
    // SAFETY: the asserts above guarantee that every element addressed through these strides,
    // for i < m, j < n, p < k, lies inside the corresponding slice; `out` does not alias the
    // inputs because it is borrowed mutably. gemm's `alpha` scales dst and its `beta` scales
    // the product (the reverse of the BLAS naming used by this function).
    unsafe {
        gemm::gemm::<T>(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Linear layer forward: `out[n, oc] = alpha · inp[n, ic] · w[oc, ic]ᵀ + bias[oc]` (weight
/// stored like `torch.nn.Linear`).
#[allow(clippy::too_many_arguments)]
pub fn linear_forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    w: &[T],
    bias: Option<&[T]>,
    n: usize,
    ic: usize,
    oc: usize,
    alpha: T,
) {
    debug_assert_eq!(out.len(), n * oc);
    debug_assert_eq!(inp.len(), n * ic);
    debug_assert_eq!(w.len(), oc * ic);
    let beta = match bias {
        Some(bias) => {
            debug_assert_eq!(bias.len(), oc);
            // Start every row from the bias and let the GEMM accumulate onto it.
            out.par_chunks_mut(oc.max(1))
                .with_min_len(min_items(oc))
                .for_each(|row| row.copy_from_slice(bias));
            T::one()
        }
        None => T::zero(),
    };
    matmul(out, inp, w, n, oc, ic, false, true, alpha, beta);
}

/// Linear layer backward for `out = alpha · inp · wᵀ + bias`, with each gradient scaled on its
/// own: `dinp = alphas.0 · dout · w` (added to `dinp` when `accumulate_dinp`, else overwriting
/// it), `dw += alphas.1 · doutᵀ · inp`, `dbias += alphas.1 · Σ_rows dout` (deterministic column
/// sums). `alphas.0 == alpha` gives the exact input gradient; unit scaling may pick another.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    dinp: &mut [T],
    dw: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    w: &[T],
    n: usize,
    ic: usize,
    oc: usize,
    accumulate_dinp: bool,
    alphas: (T, T),
) {
    debug_assert_eq!(dinp.len(), n * ic);
    debug_assert_eq!(dw.len(), oc * ic);
    debug_assert_eq!(dout.len(), n * oc);
    debug_assert_eq!(inp.len(), n * ic);
    debug_assert_eq!(w.len(), oc * ic);
    let dinp_beta = if accumulate_dinp { T::one() } else { T::zero() };
    matmul(dinp, dout, w, n, ic, oc, false, false, alphas.0, dinp_beta);
    matmul(dw, dout, inp, oc, ic, n, true, false, alphas.1, T::one());
    if let Some(dbias) = dbias {
        debug_assert_eq!(dbias.len(), oc);
        bias_backward(dbias, dout, n, oc, alphas.1);
    }
}

/// `dst[j] += scale · Σ_i src[i, j]` over `rows` rows of width `cols`, summing rows in order
/// within fixed column blocks (parallel over blocks, so the result does not depend on threads).
/// With `scale == 1` the rows are added straight into `dst`; otherwise they are summed first and
/// the sum is scaled once.
pub fn bias_backward<T: Real>(dst: &mut [T], src: &[T], rows: usize, cols: usize, scale: T) {
    debug_assert_eq!(dst.len(), cols);
    debug_assert_eq!(src.len(), rows * cols);
    dst.par_chunks_mut(COLUMN_BLOCK)
        .enumerate()
        .with_min_len(min_items(rows * COLUMN_BLOCK))
        .for_each(|(block, dst_block)| {
            let c0 = block * COLUMN_BLOCK;
            let mut sums = vec![
                T::zero();
                if scale == T::one() {
                    0
                } else {
                    dst_block.len()
                }
            ];
            let acc: &mut [T] = if sums.is_empty() {
                &mut *dst_block
            } else {
                &mut sums
            };
            for r in 0..rows {
                let src_row = &src[r * cols + c0..][..acc.len()];
                for (d, &s) in acc.iter_mut().zip(src_row) {
                    *d += s;
                }
            }
            if !sums.is_empty() {
                for (d, &s) in dst_block.iter_mut().zip(&sums) {
                    *d += scale * s;
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------

/// LayerNorm forward over rows of width `c`: `out = (inp − mean)·rstd·w + b` with the biased
/// variance and `rstd = 1/√(var + eps)`. Saves `mean[n]` and `rstd[n]` for the backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    w: &[T],
    b: &[T],
    n: usize,
    c: usize,
    eps: T,
) {
    debug_assert_eq!(out.len(), n * c);
    debug_assert_eq!(mean.len(), n);
    debug_assert_eq!(rstd.len(), n);
    debug_assert_eq!(inp.len(), n * c);
    debug_assert_eq!(w.len(), c);
    debug_assert_eq!(b.len(), c);
    if c == 0 {
        return;
    }
    let inv_c = T::one() / cst::<T>(c as f64);
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut())
        .zip(rstd.par_iter_mut())
        .enumerate()
        .with_min_len(min_items(3 * c))
        .for_each(|(i, ((out_row, mean_i), rstd_i))| {
            let x = &inp[i * c..][..c];
            let mu = x.iter().copied().fold(T::zero(), |acc, v| acc + v) * inv_c;
            let var = x
                .iter()
                .fold(T::zero(), |acc, &v| acc + (v - mu) * (v - mu))
                * inv_c;
            let rs = T::one() / (var + eps).sqrt();
            for (((o, &xv), &wv), &bv) in out_row.iter_mut().zip(x).zip(w).zip(b) {
                *o = (xv - mu) * rs * wv + bv;
            }
            *mean_i = mu;
            *rstd_i = rs;
        });
}

/// LayerNorm backward: `dinp += dinp_scale · ∂L/∂inp` (accumulates into the residual-stream
/// gradient), `dw += param_scale · Σ_rows dout·x̂`, `db += param_scale · Σ_rows dout`, from the
/// `mean`/`rstd` saved by the forward. Both scales are 1 outside unit scaling.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Real>(
    dinp: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    dout: &[T],
    inp: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
    n: usize,
    c: usize,
    (dinp_scale, param_scale): (T, T),
) {
    debug_assert_eq!(dinp.len(), n * c);
    debug_assert_eq!(dw.len(), c);
    debug_assert_eq!(db.len(), c);
    debug_assert_eq!(dout.len(), n * c);
    debug_assert_eq!(inp.len(), n * c);
    debug_assert_eq!(w.len(), c);
    debug_assert_eq!(mean.len(), n);
    debug_assert_eq!(rstd.len(), n);
    if c == 0 {
        return;
    }
    let inv_c = T::one() / cst::<T>(c as f64);
    // Input gradient: rows are independent.
    dinp.par_chunks_mut(c)
        .enumerate()
        .with_min_len(min_items(4 * c))
        .for_each(|(i, dinp_row)| {
            let x = &inp[i * c..][..c];
            let g = &dout[i * c..][..c];
            let (mu, rs) = (mean[i], rstd[i]);
            // dx̂ = dout·w; dinp = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)).
            let mut sum_dxhat = T::zero();
            let mut sum_dxhat_xhat = T::zero();
            for ((&xv, &gv), &wv) in x.iter().zip(g).zip(w) {
                let dxhat = gv * wv;
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * ((xv - mu) * rs);
            }
            let mean_dxhat = sum_dxhat * inv_c;
            let mean_dxhat_xhat = sum_dxhat_xhat * inv_c;
            let rs_scaled = rs * dinp_scale;
            for (((d, &xv), &gv), &wv) in dinp_row.iter_mut().zip(x).zip(g).zip(w) {
                let xhat = (xv - mu) * rs;
                *d += (gv * wv - mean_dxhat - xhat * mean_dxhat_xhat) * rs_scaled;
            }
        });
    // Parameter gradients: fixed column blocks, rows summed in order.
    dw.par_chunks_mut(COLUMN_BLOCK)
        .zip(db.par_chunks_mut(COLUMN_BLOCK))
        .enumerate()
        .with_min_len(min_items(2 * n * COLUMN_BLOCK))
        .for_each(|(block, (dw_block, db_block))| {
            let c0 = block * COLUMN_BLOCK;
            let width = dw_block.len();
            // With a scale, the column sums are formed first and scaled once.
            let scaled = param_scale != T::one();
            let mut sums = vec![T::zero(); if scaled { 2 * width } else { 0 }];
            let (sw, sb) = sums.split_at_mut(if scaled { width } else { 0 });
            let (acc_w, acc_b): (&mut [T], &mut [T]) = if scaled {
                (sw, sb)
            } else {
                (&mut *dw_block, &mut *db_block)
            };
            for i in 0..n {
                let (mu, rs) = (mean[i], rstd[i]);
                let x = &inp[i * c + c0..][..width];
                let g = &dout[i * c + c0..][..width];
                for (((dwj, dbj), &xv), &gv) in acc_w.iter_mut().zip(acc_b.iter_mut()).zip(x).zip(g)
                {
                    *dwj += gv * ((xv - mu) * rs);
                    *dbj += gv;
                }
            }
            if scaled {
                let (sw, sb) = sums.split_at(width);
                for (d, &v) in dw_block.iter_mut().zip(sw) {
                    *d += param_scale * v;
                }
                for (d, &v) in db_block.iter_mut().zip(sb) {
                    *d += param_scale * v;
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

/// `out = sa·a + sb·b`, elementwise (the residual connection; unit scaling weights its two
/// terms, otherwise both scales are 1 and this is a plain sum).
pub fn residual_forward<T: Real>(out: &mut [T], a: &[T], b: &[T], (sa, sb): (T, T)) {
    debug_assert_eq!(out.len(), a.len());
    debug_assert_eq!(out.len(), b.len());
    let plain = sa == T::one() && sb == T::one();
    for_each_chunk(out, |off, chunk| {
        let (a, b) = (&a[off..][..chunk.len()], &b[off..][..chunk.len()]);
        for ((o, &x), &y) in chunk.iter_mut().zip(a).zip(b) {
            *o = if plain { x + y } else { sa * x + sb * y };
        }
    });
}

/// `dst += src`, elementwise.
pub fn add_inplace<T: Real>(dst: &mut [T], src: &[T]) {
    debug_assert_eq!(dst.len(), src.len());
    for_each_chunk(dst, |off, chunk| {
        let src = &src[off..][..chunk.len()];
        for (d, &s) in chunk.iter_mut().zip(src) {
            *d += s;
        }
    });
}

/// `x *= s`, elementwise.
pub fn scale_inplace<T: Real>(x: &mut [T], s: T) {
    for_each_chunk(x, |_, chunk| chunk.iter_mut().for_each(|v| *v *= s));
}

/// Sets every element of `x` to `v`.
pub fn fill<T: Real>(x: &mut [T], v: T) {
    for_each_chunk(x, |_, chunk| chunk.fill(v));
}

/// √(2/π), the GELU tanh-approximation constant.
const GELU_SCALE: f64 = 0.797_884_560_802_865_4;
/// Cubic coefficient of the GELU tanh approximation.
const GELU_CUBIC: f64 = 0.044_715;

/// `½(1 + tanh u)`, computed as the logistic `1/(1 + e^(−2u))`: one `exp` instead of a `tanh`
/// (which costs about twice as much), and exact at both tails (→ 0 and → 1, never NaN).
fn sigmoid_2x<T: Real>(u: T) -> T {
    T::one() / (T::one() + (-(u + u)).exp())
}

/// GELU forward with the tanh approximation, times `scale` (1 outside unit scaling):
/// `scale·0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_forward<T: Real>(out: &mut [T], inp: &[T], scale: T) {
    debug_assert_eq!(out.len(), inp.len());
    let (s, k) = (cst::<T>(GELU_SCALE), cst::<T>(GELU_CUBIC));
    let one = scale == T::one();
    for_each_chunk(out, |off, chunk| {
        let inp = &inp[off..][..chunk.len()];
        for (o, &x) in chunk.iter_mut().zip(inp) {
            let u = s * (x + k * x * x * x);
            let g = x * sigmoid_2x(u);
            *o = if one { g } else { scale * g };
        }
    });
}

/// GELU backward in place: `d = scale·gelu'(inp)·d` (`d` holds the output gradient on entry and
/// the input gradient on return): the exact derivative of [`gelu_forward`] with the same `scale`.
pub fn gelu_backward<T: Real>(d: &mut [T], inp: &[T], scale: T) {
    debug_assert_eq!(d.len(), inp.len());
    let (s, k, two) = (cst::<T>(GELU_SCALE), cst::<T>(GELU_CUBIC), cst::<T>(2.0));
    let three_k = cst::<T>(3.0 * GELU_CUBIC);
    let one = scale == T::one();
    for_each_chunk(d, |off, chunk| {
        let x = &inp[off..][..chunk.len()];
        for (dv, &xv) in chunk.iter_mut().zip(x) {
            // With σ = ½(1 + tanh u): gelu = x·σ and dσ/du = ½(1 − tanh²u) = 2σ(1 − σ).
            let sig = sigmoid_2x(s * (xv + k * xv * xv * xv));
            let du_dx = s * (T::one() + three_k * xv * xv);
            let local = sig + two * xv * sig * (T::one() - sig) * du_dx;
            *dv = if one {
                local * *dv
            } else {
                scale * local * *dv
            };
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention
// ---------------------------------------------------------------------------------------------

/// Copies one head's `hs` columns starting at `col` out of `rows` rows of stride `stride` into a
/// contiguous `[rows, hs]` buffer, so the inner loops read contiguous memory.
fn gather_head<T: Real>(src: &[T], rows: usize, stride: usize, col: usize, hs: usize) -> Vec<T> {
    let mut dst = Vec::with_capacity(rows * hs);
    for r in 0..rows {
        dst.extend_from_slice(&src[r * stride + col..][..hs]);
    }
    dst
}

/// Fused causal multi-head self-attention forward (flash-style: at most one row of scores per
/// task). For batch `b`, head `h` (`hs = c/nh`) and query `t`, attends over keys `s ≤ t` with
/// scores `q_t·k_s/√hs`, where q, k, v are the three `c`-wide thirds of `qkv[b, t, 3c]`.
/// Writes `out[b, t, h·hs..]` (times `out_scale`, 1 outside unit scaling) and the log-sum-exp
/// of the scores `lse[b, h, t]` for the backward.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    qkv: &[T],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    out_scale: T,
) {
    debug_assert_eq!(out.len(), b * t * c);
    debug_assert_eq!(lse.len(), b * nh * t);
    debug_assert_eq!(qkv.len(), b * t * 3 * c);
    debug_assert!(nh > 0 && c % nh == 0);
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    let hs = c / nh;
    let scale = T::one() / cst::<T>(hs as f64).sqrt();
    let work_per_head = t * t * hs;
    // One task per (batch, head): lse rows are contiguous in that order; each task returns its
    // head's output as a contiguous [t, hs] block, scattered into `out` afterwards.
    let head_outs: Vec<Vec<T>> = lse
        .par_chunks_mut(t)
        .enumerate()
        .with_min_len(min_items(work_per_head))
        .map(|(bh, lse_row)| {
            let (bi, h) = (bh / nh, bh % nh);
            let qkv_b = &qkv[bi * t * 3 * c..][..t * 3 * c];
            let q = gather_head(qkv_b, t, 3 * c, h * hs, hs);
            let k = gather_head(qkv_b, t, 3 * c, c + h * hs, hs);
            let v = gather_head(qkv_b, t, 3 * c, 2 * c + h * hs, hs);
            let mut out_h = vec![T::zero(); t * hs];
            let mut scores = vec![T::zero(); t];
            for ti in 0..t {
                let qt = &q[ti * hs..][..hs];
                let row = &mut scores[..=ti];
                let mut max = T::neg_infinity();
                for (s, score) in row.iter_mut().enumerate() {
                    *score = dot(qt, &k[s * hs..][..hs]) * scale;
                    max = max.max(*score);
                }
                let mut sum = T::zero();
                for score in row.iter_mut() {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                let inv_sum = out_scale / sum;
                let o = &mut out_h[ti * hs..][..hs];
                for (s, &e) in row.iter().enumerate() {
                    axpy(o, e * inv_sum, &v[s * hs..][..hs]);
                }
                lse_row[ti] = max + sum.ln();
            }
            out_h
        })
        .collect();
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(min_items(c))
        .for_each(|(row, out_row)| {
            let (bi, ti) = (row / t, row % t);
            for h in 0..nh {
                out_row[h * hs..][..hs].copy_from_slice(&head_outs[bi * nh + h][ti * hs..][..hs]);
            }
        });
}

/// Causal self-attention backward (overwrites `dqkv[b, t, 3c]`). Recomputes the probabilities
/// `p_ts = exp(q_t·k_s/√hs − lse_t)` from the saved log-sum-exp instead of storing them, with
/// `D_t = dout_t·out_t` and `dS_ts = p_ts·(dout_t·v_s − D_t)`:
/// `dq_t = Σ_s dS_ts·k_s/√hs`, `dk_s = Σ_t dS_ts·q_t/√hs`, `dv_s = Σ_t p_ts·dout_t`.
/// With an `out_scale` s (the forward's, which `out` includes) this is the exact derivative of
/// the scaled forward: `dout` is read as `s·dout`, and `D_t = dout_t·out_t` is unchanged.
/// Parallel over (batch, head), serial inside, so the sums have a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    out: &[T],
    lse: &[T],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    out_scale: T,
) {
    debug_assert_eq!(dqkv.len(), b * t * 3 * c);
    debug_assert_eq!(dout.len(), b * t * c);
    debug_assert_eq!(qkv.len(), b * t * 3 * c);
    debug_assert_eq!(out.len(), b * t * c);
    debug_assert_eq!(lse.len(), b * nh * t);
    debug_assert!(nh > 0 && c % nh == 0);
    if b == 0 || t == 0 || c == 0 {
        return;
    }
    let hs = c / nh;
    let scale = T::one() / cst::<T>(hs as f64).sqrt();
    let work_per_head = t * t * hs;
    // Each task returns [dq; dk; dv] of its head as three contiguous [t, hs] blocks.
    let head_grads: Vec<Vec<T>> = (0..b * nh)
        .into_par_iter()
        .with_min_len(min_items(work_per_head))
        .map(|bh| {
            let (bi, h) = (bh / nh, bh % nh);
            let qkv_b = &qkv[bi * t * 3 * c..][..t * 3 * c];
            let q = gather_head(qkv_b, t, 3 * c, h * hs, hs);
            let k = gather_head(qkv_b, t, 3 * c, c + h * hs, hs);
            let v = gather_head(qkv_b, t, 3 * c, 2 * c + h * hs, hs);
            let mut dout_h = gather_head(&dout[bi * t * c..][..t * c], t, c, h * hs, hs);
            let out_h = gather_head(&out[bi * t * c..][..t * c], t, c, h * hs, hs);
            // D_t = dout_t·out_t before dout is scaled (out already carries the scale).
            let d: Vec<T> = (0..t)
                .map(|ti| dot(&dout_h[ti * hs..][..hs], &out_h[ti * hs..][..hs]))
                .collect();
            if out_scale != T::one() {
                dout_h.iter_mut().for_each(|g| *g *= out_scale);
            }
            let lse_row = &lse[bh * t..][..t];
            let mut grads = vec![T::zero(); 3 * t * hs];
            let (dq, dkv) = grads.split_at_mut(t * hs);
            let (dk, dv) = dkv.split_at_mut(t * hs);
            for ti in 0..t {
                let qt = &q[ti * hs..][..hs];
                let dot_t = &dout_h[ti * hs..][..hs];
                let d_t = d[ti];
                let dq_t = &mut dq[ti * hs..][..hs];
                for s in 0..=ti {
                    let ks = &k[s * hs..][..hs];
                    let vs = &v[s * hs..][..hs];
                    let p = (dot(qt, ks) * scale - lse_row[ti]).exp();
                    let ds = p * (dot(dot_t, vs) - d_t);
                    axpy(dq_t, ds, ks);
                    axpy(&mut dk[s * hs..][..hs], ds * scale, qt);
                    axpy(&mut dv[s * hs..][..hs], p, dot_t);
                }
                dq_t.iter_mut().for_each(|g| *g *= scale);
            }
            grads
        })
        .collect();
    dqkv.par_chunks_mut(3 * c)
        .enumerate()
        .with_min_len(min_items(3 * c))
        .for_each(|(row, dst)| {
            let (bi, ti) = (row / t, row % t);
            for h in 0..nh {
                let g = &head_grads[bi * nh + h];
                for part in 0..3 {
                    dst[part * c + h * hs..][..hs]
                        .copy_from_slice(&g[part * t * hs + ti * hs..][..hs]);
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------------

/// Token + position embedding: `out[b·t + i] = scale·(wte[tokens[b·t + i]] + wpe[i])` for rows
/// of width `c` (`scale` is 1 outside unit scaling); `wte` is `[vocab, c]`, `wpe` is
/// `[max_t, c]` with `t ≤ max_t`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward<T: Real>(
    out: &mut [T],
    tokens: &[u32],
    wte: &[T],
    wpe: &[T],
    b: usize,
    t: usize,
    c: usize,
    scale: T,
) {
    debug_assert_eq!(out.len(), b * t * c);
    debug_assert_eq!(tokens.len(), b * t);
    debug_assert!(c > 0 && wte.len() % c == 0 && wpe.len() % c == 0);
    debug_assert!(t * c <= wpe.len());
    if c == 0 || t == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(min_items(c))
        .for_each(|(row, out_row)| {
            let tok = tokens[row] as usize;
            debug_assert!(
                (tok + 1) * c <= wte.len(),
                "token {tok} outside the vocabulary"
            );
            let (te, pe) = (&wte[tok * c..][..c], &wpe[(row % t) * c..][..c]);
            for ((o, &x), &y) in out_row.iter_mut().zip(te).zip(pe) {
                *o = if scale == T::one() {
                    x + y
                } else {
                    scale * (x + y)
                };
            }
        });
}

/// Embedding backward: `dwte[tok] += wte_scale·Σ dout[row]` over the rows holding `tok`, and
/// `dwpe[i] += wpe_scale·Σ_b dout[b, i]` (scales 1 outside unit scaling, where they are the
/// forward scale times each table's gradient scale). Rows of `dwte` are accumulated in position
/// order, grouped per token, so repeated tokens give the same bits on every run.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward<T: Real>(
    dwte: &mut [T],
    dwpe: &mut [T],
    dout: &[T],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
    (wte_scale, wpe_scale): (T, T),
) {
    debug_assert_eq!(dout.len(), b * t * c);
    debug_assert_eq!(tokens.len(), b * t);
    debug_assert!(c > 0 && dwte.len() % c == 0 && dwpe.len() % c == 0);
    debug_assert!(t * c <= dwpe.len());
    if c == 0 || t == 0 {
        return;
    }
    let vocab = dwte.len() / c;
    // Group row indices by token (counting sort keeps rows in increasing order per token).
    let mut starts = vec![0usize; vocab + 1];
    for &tok in tokens {
        debug_assert!((tok as usize) < vocab, "token {tok} outside the vocabulary");
        starts[tok as usize + 1] += 1;
    }
    for v in 0..vocab {
        starts[v + 1] += starts[v];
    }
    let mut next = starts.clone();
    let mut rows_by_token = vec![0usize; tokens.len()];
    for (row, &tok) in tokens.iter().enumerate() {
        rows_by_token[next[tok as usize]] = row;
        next[tok as usize] += 1;
    }
    dwte.par_chunks_mut(c)
        .enumerate()
        .with_min_len(min_items(c * tokens.len() / vocab.max(1) + 1))
        .for_each(|(tok, grad_row)| {
            let rows = &rows_by_token[starts[tok]..starts[tok + 1]];
            scaled_sum_into(
                grad_row,
                wte_scale,
                rows.iter().map(|&r| &dout[r * c..][..c]),
            );
        });
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .with_min_len(min_items(b * c))
        .for_each(|(pos, grad_row)| {
            let rows = (0..b).map(|bi| &dout[(bi * t + pos) * c..][..c]);
            scaled_sum_into(grad_row, wpe_scale, rows);
        });
}

/// `dst += scale · Σ rows`, summing in order; with `scale == 1` straight into `dst`.
fn scaled_sum_into<'a, T: Real>(dst: &mut [T], scale: T, rows: impl Iterator<Item = &'a [T]>) {
    if scale == T::one() {
        rows.for_each(|r| add_slice(dst, r));
        return;
    }
    let mut sum = vec![T::zero(); dst.len()];
    rows.for_each(|r| add_slice(&mut sum, r));
    for (d, &v) in dst.iter_mut().zip(&sum) {
        *d += scale * v;
    }
}

/// `dst += src` on the calling thread.
#[inline]
fn add_slice<T: Real>(dst: &mut [T], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

// ---------------------------------------------------------------------------------------------
// Classifier
// ---------------------------------------------------------------------------------------------

/// Stable `log Σ_j exp(row[j])`.
fn logsumexp<T: Real>(row: &[T]) -> T {
    let max = row.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
    let sum = row.iter().fold(T::zero(), |acc, &x| acc + (x - max).exp());
    max + sum.ln()
}

/// Fused softmax cross-entropy forward and backward over `n` rows of `vp` logits of which only the
/// first `v_real` are real classes (padding columns never enter the softmax). Writes
/// `losses[i] = logsumexp(logits[i, ..v_real]) − logits[i, target_i]` and overwrites the logits
/// in place with `dlogits = (softmax − onehot(target))·dloss`, zero on padding columns.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_forward_backward<T: Real>(
    losses: &mut [T],
    logits: &mut [T],
    targets: &[u32],
    n: usize,
    v_real: usize,
    vp: usize,
    dloss: T,
) {
    debug_assert_eq!(losses.len(), n);
    debug_assert_eq!(logits.len(), n * vp);
    debug_assert_eq!(targets.len(), n);
    debug_assert!(0 < v_real && v_real <= vp);
    if vp == 0 {
        return;
    }
    logits
        .par_chunks_mut(vp)
        .zip(losses.par_iter_mut())
        .enumerate()
        .with_min_len(min_items(3 * vp))
        .for_each(|(i, (row, loss))| {
            let target = targets[i] as usize;
            debug_assert!(
                target < v_real,
                "target {target} outside the real vocabulary"
            );
            let (real, pad) = row.split_at_mut(v_real);
            let lse = logsumexp(real);
            *loss = lse - real[target];
            for x in real.iter_mut() {
                *x = (*x - lse).exp() * dloss;
            }
            real[target] -= dloss;
            pad.fill(T::zero());
        });
}

/// Softmax cross-entropy loss only (evaluation): like [`crossentropy_forward_backward`] but leaves
/// the logits untouched.
pub fn crossentropy_forward<T: Real>(
    losses: &mut [T],
    logits: &[T],
    targets: &[u32],
    n: usize,
    v_real: usize,
    vp: usize,
) {
    debug_assert_eq!(losses.len(), n);
    debug_assert_eq!(logits.len(), n * vp);
    debug_assert_eq!(targets.len(), n);
    debug_assert!(0 < v_real && v_real <= vp);
    losses
        .par_iter_mut()
        .enumerate()
        .with_min_len(min_items(2 * vp))
        .for_each(|(i, loss)| {
            let real = &logits[i * vp..][..v_real];
            let target = targets[i] as usize;
            debug_assert!(
                target < v_real,
                "target {target} outside the real vocabulary"
            );
            *loss = logsumexp(real) - real[target];
        });
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

/// The splitmix64 output finalizer: a bijective 64-bit mix with full avalanche.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The counter-based hash behind dropout masks and stochastic rounding: element `i` of the
/// stream `key` is `mix64(key + (i + 1)·0x9E3779B97F4A7C15)` (wrapping). GPU kernels match it
/// bit for bit.
#[inline]
fn counter_hash(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// The part of [`rounding_key`] shared by all tensors of one optimizer step.
pub fn rounding_step_key(seed: u64, step: u64) -> u64 {
    mix64(seed ^ 0xD1B5_4A32_D192_ED03) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The key of the stochastic rounding of tensor `tensor`'s compute copy at optimizer step `step`
/// under `seed` (a different stream of bits per tensor and step):
/// `mix64(rounding_step_key(seed, step) ^ tensor·0xC2B2AE3D27D4EB4F)` (wrapping).
pub fn rounding_key(seed: u64, step: u64, tensor: u64) -> u64 {
    mix64(rounding_step_key(seed, step) ^ tensor.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
}

/// The 16 random bits that round element `i` under `key` ([`rounding_key`]): the top 16 bits
/// of `counter_hash(key, i)`.
#[inline]
pub fn rounding_bits(key: u64, i: u64) -> u16 {
    (counter_hash(key, i) >> 48) as u16
}

/// The uniform number in `[0, 1)` that decides whether dropout keeps element `i` under `seed`:
/// `key = mix64(seed ^ 0x5851F42D4C957F2D)`, `h = counter_hash(key, i)`, result =
/// `(h >> 40)·2⁻²⁴`, exact in `f32`. Exposed so GPU kernels can be checked against it bit for
/// bit.
#[inline]
pub fn mask_uniform(seed: u64, i: u64) -> f32 {
    let key = mix64(seed ^ 0x5851_F42D_4C95_7F2D);
    (counter_hash(key, i) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Applies the dropout mask of `seed` to `x` in place: element `i` is kept iff
/// `mask_uniform(seed, i) ≥ p` and scaled by `1/(1 − p)`, else zeroed. Same for both passes.
fn apply_dropout_mask<T: Real>(x: &mut [T], p: f32, seed: u64) {
    if p <= 0.0 {
        return;
    }
    if p >= 1.0 {
        fill(x, T::zero());
        return;
    }
    let keep_scale = T::one() / (T::one() - T::from_f32(p).unwrap_or_else(T::nan));
    for_each_chunk(x, |off, chunk| {
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = if mask_uniform(seed, (off + j) as u64) >= p {
                *v * keep_scale
            } else {
                T::zero()
            };
        }
    });
}

/// Dropout forward in place with a counter-based mask (nothing stored): element `i` survives iff
/// `mask_uniform(seed, i) ≥ p`, survivors are scaled by `1/(1 − p)`. `p = 0` is a no-op.
pub fn dropout_forward<T: Real>(x: &mut [T], p: f32, seed: u64) {
    apply_dropout_mask(x, p, seed);
}

/// Dropout backward in place: regenerates the forward's mask from `seed` and applies it to `dx`.
pub fn dropout_backward<T: Real>(dx: &mut [T], p: f32, seed: u64) {
    apply_dropout_mask(dx, p, seed);
}

// ---------------------------------------------------------------------------------------------
// Optimizer and reductions
// ---------------------------------------------------------------------------------------------

/// AdamW hyperparameters (decoupled weight decay, as in `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to √v̂ in the denominator.
    pub eps: f64,
    /// Decoupled weight decay coefficient (0 for parameters without decay).
    pub weight_decay: f64,
}

/// One AdamW step, elementwise: `g = grad·grad_scale`, `m = β1·m + (1−β1)·g`,
/// `v = β2·v + (1−β2)·g²`, `param −= lr·(m̂/(√v̂ + eps) + weight_decay·param)` with the bias
/// corrections `m̂ = m/(1−β1^step)`, `v̂ = v/(1−β2^step)`; `step` is 1-based.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<T: Real>(
    param: &mut [T],
    grad: &[T],
    m: &mut [T],
    v: &mut [T],
    hyper: &AdamWHyper,
    step: u64,
    grad_scale: f64,
) {
    debug_assert_eq!(param.len(), grad.len());
    debug_assert_eq!(param.len(), m.len());
    debug_assert_eq!(param.len(), v.len());
    debug_assert!(step >= 1, "AdamW steps are 1-based");
    let exponent = step.min(i32::MAX as u64) as i32;
    let bias_correction1 = 1.0 - hyper.beta1.powi(exponent);
    let bias_correction2 = 1.0 - hyper.beta2.powi(exponent);
    let lr = cst::<T>(hyper.lr);
    let beta1 = cst::<T>(hyper.beta1);
    let beta2 = cst::<T>(hyper.beta2);
    let one_minus_beta1 = cst::<T>(1.0 - hyper.beta1);
    let one_minus_beta2 = cst::<T>(1.0 - hyper.beta2);
    let inv_bc1 = cst::<T>(1.0 / bias_correction1);
    let inv_bc2 = cst::<T>(1.0 / bias_correction2);
    let eps = cst::<T>(hyper.eps);
    let wd = cst::<T>(hyper.weight_decay);
    let gs = cst::<T>(grad_scale);
    param
        .par_chunks_mut(8192)
        .zip(m.par_chunks_mut(8192))
        .zip(v.par_chunks_mut(8192))
        .zip(grad.par_chunks(8192))
        .with_min_len(min_items(8192 * 8))
        .for_each(|(((p_chunk, m_chunk), v_chunk), g_chunk)| {
            for (((p, mi), vi), &gi) in p_chunk
                .iter_mut()
                .zip(m_chunk.iter_mut())
                .zip(v_chunk.iter_mut())
                .zip(g_chunk)
            {
                let g = gi * gs;
                *mi = beta1 * *mi + one_minus_beta1 * g;
                *vi = beta2 * *vi + one_minus_beta2 * g * g;
                let m_hat = *mi * inv_bc1;
                let v_hat = *vi * inv_bc2;
                *p -= lr * (m_hat / (v_hat.sqrt() + eps) + wd * *p);
            }
        });
}

/// `Σ x²` accumulated in `f64`: fixed chunks of 4096 elements summed in order, then the chunk sums
/// added in order, so the result is the same on any number of threads.
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(SUM_CHUNK)
        .with_min_len(min_items(SUM_CHUNK))
        .map(|chunk| {
            chunk.iter().fold(0.0f64, |acc, &v| {
                let v = v.to_f64().unwrap_or(f64::NAN);
                acc + v * v
            })
        })
        .collect();
    partials.iter().sum()
}

/// Largest absolute value in `x` (0 for an empty slice); NaN if any element is NaN, so callers
/// that derive a scale from it notice.
pub fn amax<T: Real>(x: &[T]) -> T {
    let chunk_amax = |chunk: &[T]| {
        chunk.iter().fold(T::zero(), |acc, &v| {
            if v.is_nan() || acc.is_nan() {
                T::nan()
            } else {
                acc.max(v.abs())
            }
        })
    };
    x.par_chunks(SUM_CHUNK)
        .with_min_len(min_items(SUM_CHUNK))
        .map(chunk_amax)
        .reduce(T::zero, |a, b| {
            if a.is_nan() || b.is_nan() {
                T::nan()
            } else {
                a.max(b)
            }
        })
}

#[cfg(test)]
#[path = "kernels_tests.rs"]
mod tests;
