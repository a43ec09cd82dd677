//! Tests of the CPU kernels: backward passes against central finite differences in f64, forwards
//! against naive references, f32/f64 agreement, and bitwise determinism across thread counts.

use super::*;

/// Tiny seeded PRNG (splitmix64) for test inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.sym()).collect()
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }

    /// Values rounded to f32, so f32 and f64 runs see the same inputs.
    fn vec_f32_exact(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.sym() as f32 as f64).collect()
    }
}

const H: f64 = 1e-6;
const FD_TOL: f64 = 1e-6;

/// ‖got − want‖/‖want‖; infinite when anything is non-finite, so NaN always fails a check.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared vectors differ in length");
    let (mut num, mut den) = (0.0, 0.0);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let err = rel_err(got, want);
    assert!(
        err < tol,
        "{what}: relative error {err:e} not below {tol:e}"
    );
}

/// Central finite-difference gradient of `loss` at `x`.
fn numeric_grad(x: &[f64], mut loss: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + H;
            let plus = loss(&xp);
            xp[i] = orig - H;
            let minus = loss(&xp);
            xp[i] = orig;
            (plus - minus) / (2.0 * H)
        })
        .collect()
}

fn weighted_sum(out: &[f64], r: &[f64]) -> f64 {
    out.iter().zip(r).map(|(a, b)| a * b).sum()
}

fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn to<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x).unwrap()).collect()
}

fn from<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn comparison_helper_fails_on_nan_and_mismatch() {
    assert!(rel_err(&[f64::NAN, 1.0], &[1.0, 1.0]).is_infinite());
    assert!(rel_err(&[1.0, 1.0], &[f64::NAN, 1.0]).is_infinite());
    assert!(rel_err(&[1e-9], &[0.0]).is_infinite());
    assert!(rel_err(&[1.1], &[1.0]) > 0.09);
    assert_eq!(rel_err(&[0.0], &[0.0]), 0.0);
}

// ---------------------------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn naive_matmul(
    a: &[f64],
    b: &[f64],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for p in 0..k {
                let av = if trans_a { a[p * m + i] } else { a[i * k + p] };
                let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                acc += av * bv;
            }
            out[i * n + j] = acc;
        }
    }
    out
}

#[test]
fn matmul_matches_triple_loop_in_all_transpose_combinations() {
    let mut rng = Rng::new(1);
    // The last shape is above the threshold where gemm runs multithreaded.
    for &(m, n, k) in &[(7, 5, 3), (13, 17, 9), (64, 48, 40), (3, 4, 0)] {
        for &(trans_a, trans_b) in &[(false, false), (true, false), (false, true), (true, true)] {
            for &(alpha, beta) in &[(1.0, 0.0), (0.7, -1.3), (-2.0, 1.0)] {
                let a = rng.vec_f32_exact(m * k);
                let b = rng.vec_f32_exact(k * n);
                let c0 = rng.vec_f32_exact(m * n);
                let prod = naive_matmul(&a, &b, m, n, k, trans_a, trans_b);
                let want: Vec<f64> = prod
                    .iter()
                    .zip(&c0)
                    .map(|(p, c)| alpha * p + beta * c)
                    .collect();
                let what =
                    format!("matmul {m}x{n}x{k} ta={trans_a} tb={trans_b} a={alpha} b={beta}");
                let mut out64 = c0.clone();
                matmul(&mut out64, &a, &b, m, n, k, trans_a, trans_b, alpha, beta);
                assert_close(&what, &out64, &want, 1e-13);
                let mut out32 = to::<f32>(&c0);
                let (a32, b32) = (to::<f32>(&a), to::<f32>(&b));
                matmul(
                    &mut out32,
                    &a32,
                    &b32,
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha as f32,
                    beta as f32,
                );
                assert_close(&format!("{what} f32"), &from(&out32), &want, 1e-5);
            }
        }
    }
}

#[test]
fn matmul_with_beta_zero_ignores_nan_in_out() {
    let mut rng = Rng::new(2);
    for &(m, n, k) in &[(5, 6, 7), (64, 48, 40), (4, 3, 0)] {
        let a = rng.vec(m * k);
        let b = rng.vec(k * n);
        let mut out = vec![f64::NAN; m * n];
        matmul(&mut out, &a, &b, m, n, k, false, true, 1.5, 0.0);
        let want: Vec<f64> = naive_matmul(&a, &b, m, n, k, false, true)
            .iter()
            .map(|x| 1.5 * x)
            .collect();
        assert_close(&format!("beta=0 over NaN {m}x{n}x{k}"), &out, &want, 1e-13);
    }
}

#[test]
fn matmul_is_bitwise_deterministic_across_runs_and_thread_counts() {
    let mut rng = Rng::new(3);
    let (m, n, k) = (256, 384, 320);
    let a = to::<f32>(&rng.vec(m * k));
    let b = to::<f32>(&rng.vec(k * n));
    let run = || {
        let mut out = vec![0.0f32; m * n];
        matmul(&mut out, &a, &b, m, n, k, false, true, 1.0, 0.0);
        bits(&out)
    };
    let first = run();
    assert_eq!(first, run(), "two runs on the global pool differ");
    assert_eq!(first, with_threads(1, run), "1-thread result differs");
    assert_eq!(first, with_threads(3, run), "3-thread result differs");
}

/// Prints GEMM throughput; run with `cargo test --release -- --ignored --nocapture gflops`.
#[test]
#[ignore]
fn matmul_gflops() {
    let mut rng = Rng::new(4);
    for &(m, n, k) in &[(768, 384, 128), (768, 128, 512), (4096, 768, 768)] {
        let a = to::<f32>(&rng.vec(m * k));
        let b = to::<f32>(&rng.vec(k * n));
        let mut out = vec![0.0f32; m * n];
        for &(ta, tb, name) in &[
            (false, true, "NT"),
            (false, false, "NN"),
            (true, false, "TN"),
        ] {
            matmul(&mut out, &a, &b, m, n, k, ta, tb, 1.0, 0.0);
            let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(3.0, 200.0) as usize;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                matmul(&mut out, &a, &b, m, n, k, ta, tb, 1.0, 0.0);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            let gflops = 2.0 * (m * n * k) as f64 / secs / 1e9;
            println!("matmul f32 {m}x{n}x{k} {name}: {gflops:.1} GFLOP/s ({reps} reps)");
            assert!(
                out.iter().all(|v| v.is_finite()) && gflops > 1.0,
                "{name}: broken or stalled"
            );
        }
    }
}

/// Prints attention throughput; run with `cargo test --release -- --ignored --nocapture timings`.
#[test]
#[ignore]
fn attention_timings() {
    let mut rng = Rng::new(18);
    for &(b, t, c, nh) in &[(12, 64, 128, 4), (8, 256, 384, 6)] {
        let qkv = to::<f32>(&rng.vec(b * t * 3 * c));
        let dout = to::<f32>(&rng.vec(b * t * c));
        let (mut out, mut lse) = (vec![0.0f32; b * t * c], vec![0.0f32; b * nh * t]);
        let mut dqkv = vec![0.0f32; qkv.len()];
        let reps = 5;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh, 1.0);
        }
        let fwd_ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, b, t, c, nh, 1.0);
        }
        let bwd_ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        assert!(
            out.iter().chain(&dqkv).all(|v| v.is_finite()),
            "non-finite attention output"
        );
        println!("attention f32 B={b} T={t} C={c} NH={nh}: fwd {fwd_ms:.2} ms, bwd {bwd_ms:.2} ms");
    }
}

// ---------------------------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------------------------

fn linear_out(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    n: usize,
    ic: usize,
    oc: usize,
) -> Vec<f64> {
    let mut out = vec![f64::NAN; n * oc];
    linear_forward(&mut out, x, w, bias, n, ic, oc, 1.0);
    out
}

#[test]
fn linear_forward_matches_naive_and_f32() {
    let mut rng = Rng::new(5);
    let (n, ic, oc) = (5, 7, 40);
    let x = rng.vec_f32_exact(n * ic);
    let w = rng.vec_f32_exact(oc * ic);
    let bias = rng.vec_f32_exact(oc);
    let out = linear_out(&x, &w, Some(&bias), n, ic, oc);
    let mut want = naive_matmul(&x, &w, n, oc, ic, false, true);
    for (i, v) in want.iter_mut().enumerate() {
        *v += bias[i % oc];
    }
    assert_close("linear forward", &out, &want, 1e-13);
    let mut out32 = vec![f32::NAN; n * oc];
    linear_forward(
        &mut out32,
        &to(&x),
        &to(&w),
        Some(&to::<f32>(&bias)),
        n,
        ic,
        oc,
        1.0,
    );
    assert_close("linear forward f32 vs f64", &from(&out32), &out, 1e-5);
    let no_bias = linear_out(&x, &w, None, n, ic, oc);
    assert_close(
        "linear forward without bias",
        &no_bias,
        &naive_matmul(&x, &w, n, oc, ic, false, true),
        1e-13,
    );
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = Rng::new(6);
    for &(n, ic, oc) in &[(3, 5, 4), (4, 6, 40)] {
        let x = rng.vec(n * ic);
        let w = rng.vec(oc * ic);
        let bias = rng.vec(oc);
        let r = rng.vec(n * oc);
        let dinp0 = rng.vec(n * ic);
        let dw0 = rng.vec(oc * ic);
        let db0 = rng.vec(oc);
        let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
        linear_backward(
            &mut dinp,
            &mut dw,
            Some(&mut db),
            &r,
            &x,
            &w,
            n,
            ic,
            oc,
            true,
            (1.0, 1.0),
        );
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            weighted_sum(&linear_out(x, w, Some(b), n, ic, oc), &r)
        };
        let g_x = numeric_grad(&x, |xp| loss(xp, &w, &bias));
        let g_w = numeric_grad(&w, |wp| loss(&x, wp, &bias));
        let g_b = numeric_grad(&bias, |bp| loss(&x, &w, bp));
        assert_close(
            "linear dinp (accumulated)",
            &sub(&dinp, &dinp0),
            &g_x,
            FD_TOL,
        );
        assert_close("linear dw", &sub(&dw, &dw0), &g_w, FD_TOL);
        assert_close("linear dbias", &sub(&db, &db0), &g_b, FD_TOL);
        // Overwrite mode must ignore whatever dinp held, NaN included.
        let mut dinp_over = vec![f64::NAN; n * ic];
        let mut dw2 = vec![0.0; oc * ic];
        linear_backward(
            &mut dinp_over,
            &mut dw2,
            None,
            &r,
            &x,
            &w,
            n,
            ic,
            oc,
            false,
            (1.0, 1.0),
        );
        assert_close("linear dinp (overwrite)", &dinp_over, &g_x, FD_TOL);
        assert_close("linear dw without bias", &dw2, &g_w, FD_TOL);
    }
}

/// With a forward scale `alpha` the input gradient scaled by the same `alpha` is the exact
/// derivative; the weight and bias gradients scaled by `beta` are `beta/alpha` times it.
#[test]
fn scaled_linear_matches_finite_differences() {
    let mut rng = Rng::new(16);
    let (n, ic, oc) = (4, 6, 5);
    let (alpha, beta) = (0.3, 1.7);
    let x = rng.vec(n * ic);
    let w = rng.vec(oc * ic);
    let bias = rng.vec(oc);
    let r = rng.vec(n * oc);
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut out = vec![f64::NAN; n * oc];
        linear_forward(&mut out, x, w, Some(b), n, ic, oc, alpha);
        weighted_sum(&out, &r)
    };
    let (mut dinp, mut dw, mut db) = (vec![0.0; n * ic], vec![0.0; oc * ic], vec![0.0; oc]);
    linear_backward(
        &mut dinp,
        &mut dw,
        Some(&mut db),
        &r,
        &x,
        &w,
        n,
        ic,
        oc,
        false,
        (alpha, beta),
    );
    let g_x = numeric_grad(&x, |xp| loss(xp, &w, &bias));
    let g_w = numeric_grad(&w, |wp| loss(&x, wp, &bias));
    let g_b = numeric_grad(&bias, |bp| loss(&x, &w, bp));
    let times = |v: &[f64], k: f64| v.iter().map(|x| x * k).collect::<Vec<_>>();
    assert_close("scaled linear dinp", &dinp, &g_x, FD_TOL);
    assert_close("scaled linear dw", &dw, &times(&g_w, beta / alpha), FD_TOL);
    assert_close("scaled linear dbias", &db, &times(&g_b, beta), FD_TOL);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------

fn layernorm_out<T: Real>(
    x: &[T],
    w: &[T],
    b: &[T],
    n: usize,
    c: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut out = vec![T::nan(); n * c];
    let (mut mean, mut rstd) = (vec![T::nan(); n], vec![T::nan(); n]);
    let eps = T::from_f64(1e-5).unwrap();
    layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, n, c, eps);
    (out, mean, rstd)
}

#[test]
fn layernorm_forward_matches_naive_and_f32() {
    let mut rng = Rng::new(7);
    let (n, c) = (4, 40);
    let x: Vec<f64> = rng
        .vec_f32_exact(n * c)
        .iter()
        .map(|v| 3.0 * v + 0.5)
        .collect();
    let w = rng.vec_f32_exact(c);
    let b = rng.vec_f32_exact(c);
    let (out, mean, rstd) = layernorm_out(&x, &w, &b, n, c);
    let mut want = vec![0.0; n * c];
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let mu = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / c as f64;
        assert!(
            (mean[i] - mu).abs() < 1e-14 && (rstd[i] - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-12
        );
        for j in 0..c {
            want[i * c + j] = (row[j] - mu) / (var + 1e-5).sqrt() * w[j] + b[j];
        }
    }
    assert_close("layernorm forward", &out, &want, 1e-13);
    let (out32, _, _) = layernorm_out::<f32>(&to(&x), &to(&w), &to(&b), n, c);
    assert_close("layernorm forward f32 vs f64", &from(&out32), &out, 1e-5);
}

/// With `(dinp_scale, param_scale) = (a, p)` the gradients are `a` and `p` times the exact ones.
#[test]
fn layernorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(8);
    for &(n, c, (a, p)) in &[
        (3, 5, (1.0, 1.0)),
        (4, 8, (1.0, 1.0)),
        (2, 40, (1.0, 1.0)),
        (4, 8, (0.6, 2.5)),
    ] {
        let x: Vec<f64> = rng.vec(n * c).iter().map(|v| 2.0 * v).collect();
        let w = rng.vec(c);
        let b = rng.vec(c);
        let r = rng.vec(n * c);
        let (_, mean, rstd) = layernorm_out(&x, &w, &b, n, c);
        let (dinp0, dw0, db0) = (rng.vec(n * c), rng.vec(c), rng.vec(c));
        let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
        layernorm_backward(
            &mut dinp,
            &mut dw,
            &mut db,
            &r,
            &x,
            &w,
            &mean,
            &rstd,
            n,
            c,
            (a, p),
        );
        let loss =
            |x: &[f64], w: &[f64], b: &[f64]| weighted_sum(&layernorm_out(x, w, b, n, c).0, &r);
        let times = |v: Vec<f64>, k: f64| v.into_iter().map(|x| x * k).collect::<Vec<_>>();
        assert_close(
            &format!("layernorm dinp {n}x{c} scale {a}"),
            &sub(&dinp, &dinp0),
            &times(numeric_grad(&x, |xp| loss(xp, &w, &b)), a),
            FD_TOL,
        );
        assert_close(
            &format!("layernorm dw {n}x{c} scale {p}"),
            &sub(&dw, &dw0),
            &times(numeric_grad(&w, |wp| loss(&x, wp, &b)), p),
            FD_TOL,
        );
        assert_close(
            &format!("layernorm db {n}x{c} scale {p}"),
            &sub(&db, &db0),
            &times(numeric_grad(&b, |bp| loss(&x, &w, bp)), p),
            FD_TOL,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

#[test]
fn gelu_matches_formula_and_finite_differences() {
    let mut rng = Rng::new(9);
    let x: Vec<f64> = rng.vec_f32_exact(37).iter().map(|v| 4.0 * v).collect();
    for scale in [1.0, 1.7] {
        let mut out = vec![f64::NAN; x.len()];
        gelu_forward(&mut out, &x, scale);
        let want: Vec<f64> = x
            .iter()
            .map(|&v| {
                scale
                    * 0.5
                    * v
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
            })
            .collect();
        assert_close("gelu forward", &out, &want, 1e-15);
        let mut out32 = vec![f32::NAN; x.len()];
        gelu_forward(&mut out32, &to::<f32>(&x), scale as f32);
        assert_close("gelu forward f32 vs f64", &from(&out32), &out, 1e-6);

        // The scaled backward is the exact derivative of the scaled forward.
        let r = rng.vec(x.len());
        let mut dinp = r.clone();
        gelu_backward(&mut dinp, &x, scale);
        let g = numeric_grad(&x, |xp| {
            let mut o = vec![0.0; xp.len()];
            gelu_forward(&mut o, xp, scale);
            weighted_sum(&o, &r)
        });
        assert_close(&format!("gelu backward scale {scale}"), &dinp, &g, FD_TOL);
    }
}

#[test]
fn residual_and_inplace_helpers() {
    let mut rng = Rng::new(10);
    // Long enough to take the parallel chunked path.
    let len = 100_003;
    let a = rng.vec_f32_exact(len);
    let b = rng.vec_f32_exact(len);
    let mut out = vec![f64::NAN; len];
    residual_forward(&mut out, &a, &b, (1.0, 1.0));
    assert!(out.iter().enumerate().all(|(i, &o)| o == a[i] + b[i]));
    let mut weighted = vec![f64::NAN; len];
    residual_forward(&mut weighted, &a, &b, (0.8, 0.6));
    assert!(weighted
        .iter()
        .enumerate()
        .all(|(i, &o)| o == 0.8 * a[i] + 0.6 * b[i]));
    let mut out32 = vec![f32::NAN; len];
    residual_forward(&mut out32, &to::<f32>(&a), &to::<f32>(&b), (1.0, 1.0));
    assert_close("residual f32 vs f64", &from(&out32), &out, 1e-6);
    let mut acc = a.clone();
    add_inplace(&mut acc, &b);
    assert_eq!(acc, out);
    scale_inplace(&mut acc, 0.5);
    assert!(acc.iter().enumerate().all(|(i, &v)| v == 0.5 * out[i]));
    fill(&mut acc, 3.0);
    assert!(acc.iter().all(|&v| v == 3.0));
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Straightforward attention with a materialised softmax; returns (out, lse).
fn naive_attention(qkv: &[f64], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f64>, Vec<f64>) {
    let hs = c / nh;
    let mut out = vec![0.0; b * t * c];
    let mut lse = vec![0.0; b * nh * t];
    for bi in 0..b {
        for h in 0..nh {
            for ti in 0..t {
                let q = |row: usize, d: usize| qkv[(bi * t + row) * 3 * c + h * hs + d];
                let k = |row: usize, d: usize| qkv[(bi * t + row) * 3 * c + c + h * hs + d];
                let v = |row: usize, d: usize| qkv[(bi * t + row) * 3 * c + 2 * c + h * hs + d];
                let scores: Vec<f64> = (0..=ti)
                    .map(|s| (0..hs).map(|d| q(ti, d) * k(s, d)).sum::<f64>() / (hs as f64).sqrt())
                    .collect();
                let z: f64 = scores.iter().map(|s| s.exp()).sum();
                lse[(bi * nh + h) * t + ti] = z.ln();
                for d in 0..hs {
                    out[(bi * t + ti) * c + h * hs + d] =
                        (0..=ti).map(|s| scores[s].exp() / z * v(s, d)).sum();
                }
            }
        }
    }
    (out, lse)
}

fn attention_out<T: Real>(qkv: &[T], b: usize, t: usize, c: usize, nh: usize) -> (Vec<T>, Vec<T>) {
    attention_out_scaled(qkv, b, t, c, nh, T::one())
}

fn attention_out_scaled<T: Real>(
    qkv: &[T],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let mut out = vec![T::nan(); b * t * c];
    let mut lse = vec![T::nan(); b * nh * t];
    attention_forward(&mut out, &mut lse, qkv, b, t, c, nh, scale);
    (out, lse)
}

/// (b, t, c, nh): head sizes 4 (dot tail only), 20 (lanes + tail) and 16 (lanes only).
const ATTENTION_SHAPES: [(usize, usize, usize, usize); 3] =
    [(2, 5, 8, 2), (1, 6, 40, 2), (2, 4, 48, 3)];

#[test]
fn attention_forward_matches_naive_and_f32() {
    let mut rng = Rng::new(11);
    for &(b, t, c, nh) in &ATTENTION_SHAPES {
        let qkv: Vec<f64> = rng
            .vec_f32_exact(b * t * 3 * c)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let (out, lse) = attention_out(&qkv, b, t, c, nh);
        let (want_out, want_lse) = naive_attention(&qkv, b, t, c, nh);
        assert_close(
            &format!("attention out {b},{t},{c},{nh}"),
            &out,
            &want_out,
            1e-13,
        );
        assert_close(
            &format!("attention lse {b},{t},{c},{nh}"),
            &lse,
            &want_lse,
            1e-13,
        );
        let (out32, lse32) = attention_out::<f32>(&to(&qkv), b, t, c, nh);
        assert_close("attention out f32 vs f64", &from(&out32), &out, 1e-5);
        assert_close("attention lse f32 vs f64", &from(&lse32), &lse, 1e-5);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(12);
    // The last case scales the output (unit scaling): the backward stays the exact derivative.
    let cases = ATTENTION_SHAPES
        .iter()
        .map(|&shape| (shape, 1.0))
        .chain([(ATTENTION_SHAPES[1], 2.3)]);
    for ((b, t, c, nh), scale) in cases {
        let qkv: Vec<f64> = rng.vec(b * t * 3 * c).iter().map(|v| 1.5 * v).collect();
        let r = rng.vec(b * t * c);
        let (out, lse) = attention_out_scaled(&qkv, b, t, c, nh, scale);
        if scale != 1.0 {
            let plain = attention_out(&qkv, b, t, c, nh).0;
            let want: Vec<f64> = plain.iter().map(|v| v * scale).collect();
            assert_close("scaled attention forward", &out, &want, 1e-14);
        }
        let mut dqkv = vec![f64::NAN; qkv.len()];
        attention_backward(&mut dqkv, &r, &qkv, &out, &lse, b, t, c, nh, scale);
        let g = numeric_grad(&qkv, |xp| {
            weighted_sum(&attention_out_scaled(xp, b, t, c, nh, scale).0, &r)
        });
        // Check q, k and v parts separately so a bug in one cannot hide behind the others.
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let pick = |v: &[f64]| -> Vec<f64> {
                v.chunks(3 * c)
                    .flat_map(|row| row[part * c..(part + 1) * c].to_vec())
                    .collect()
            };
            assert_close(
                &format!("attention {name} {b},{t},{c},{nh} scale {scale}"),
                &pick(&dqkv),
                &pick(&g),
                FD_TOL,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_matches_naive_and_finite_differences() {
    let mut rng = Rng::new(13);
    let (b, t, c, vocab, max_t) = (2, 3, 4, 5, 4);
    let tokens = [1u32, 3, 1, 1, 0, 3];
    let wte = rng.vec_f32_exact(vocab * c);
    let wpe = rng.vec_f32_exact(max_t * c);
    // (forward scale, dwte scale, dwpe scale): the gradients are the exact ones times
    // (dwte scale / forward scale) and (dwpe scale / forward scale).
    for (s, s_te, s_pe) in [(1.0, 1.0, 1.0), (0.5, 0.25, 2.0)] {
        let fwd = |wte: &[f64], wpe: &[f64]| {
            let mut out = vec![f64::NAN; b * t * c];
            embedding_forward(&mut out, &tokens, wte, wpe, b, t, c, s);
            out
        };
        let out = fwd(&wte, &wpe);
        for row in 0..b * t {
            for j in 0..c {
                let want = s * (wte[tokens[row] as usize * c + j] + wpe[(row % t) * c + j]);
                assert_eq!(
                    out[row * c + j],
                    want,
                    "embedding forward row {row} col {j}"
                );
            }
        }
        let mut out32 = vec![f32::NAN; b * t * c];
        embedding_forward(
            &mut out32,
            &tokens,
            &to::<f32>(&wte),
            &to::<f32>(&wpe),
            b,
            t,
            c,
            s as f32,
        );
        assert_close("embedding forward f32 vs f64", &from(&out32), &out, 1e-6);

        let r = rng.vec(b * t * c);
        let (dwte0, dwpe0) = (rng.vec(vocab * c), rng.vec(max_t * c));
        let (mut dwte, mut dwpe) = (dwte0.clone(), dwpe0.clone());
        embedding_backward(&mut dwte, &mut dwpe, &r, &tokens, b, t, c, (s_te, s_pe));
        let times = |v: Vec<f64>, k: f64| v.into_iter().map(|x| x * k).collect::<Vec<_>>();
        let g_wte = numeric_grad(&wte, |wp| weighted_sum(&fwd(wp, &wpe), &r));
        let g_wpe = numeric_grad(&wpe, |wp| weighted_sum(&fwd(&wte, wp), &r));
        assert_close(
            "embedding dwte",
            &sub(&dwte, &dwte0),
            &times(g_wte, s_te / s),
            FD_TOL,
        );
        assert_close(
            "embedding dwpe",
            &sub(&dwpe, &dwpe0),
            &times(g_wpe, s_pe / s),
            FD_TOL,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Classifier
// ---------------------------------------------------------------------------------------------

#[test]
fn crossentropy_matches_naive_log_softmax_and_finite_differences() {
    let mut rng = Rng::new(14);
    let (n, v_real, vp) = (4, 7, 8);
    let mut logits: Vec<f64> = rng.vec_f32_exact(n * vp).iter().map(|v| 3.0 * v).collect();
    // Padding columns must never enter the softmax, whatever they hold.
    for i in 0..n {
        logits[i * vp + v_real] = if i % 2 == 0 { f64::NAN } else { 1e30 };
    }
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v_real as u32)).collect();
    let naive: Vec<f64> = (0..n)
        .map(|i| {
            let row = &logits[i * vp..i * vp + v_real];
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            -(row[targets[i] as usize].exp() / z).ln()
        })
        .collect();
    let mut losses = vec![f64::NAN; n];
    crossentropy_forward(&mut losses, &logits, &targets, n, v_real, vp);
    assert_close("crossentropy forward", &losses, &naive, 1e-13);

    let dloss = 0.37;
    let mut dlogits = logits.clone();
    let mut losses_fb = vec![f64::NAN; n];
    crossentropy_forward_backward(&mut losses_fb, &mut dlogits, &targets, n, v_real, vp, dloss);
    assert_eq!(losses_fb, losses, "fused and forward-only losses differ");
    for i in 0..n {
        assert_eq!(
            dlogits[i * vp + v_real],
            0.0,
            "padded dlogit of row {i} not zero"
        );
    }
    let real_cols =
        |v: &[f64]| -> Vec<f64> { v.chunks(vp).flat_map(|r| r[..v_real].to_vec()).collect() };
    let real_logits = real_cols(&logits);
    let g = numeric_grad(&real_logits, |xp| {
        let mut padded = logits.clone();
        for i in 0..n {
            padded[i * vp..i * vp + v_real].copy_from_slice(&xp[i * v_real..(i + 1) * v_real]);
        }
        let mut l = vec![0.0; n];
        crossentropy_forward(&mut l, &padded, &targets, n, v_real, vp);
        dloss * l.iter().sum::<f64>()
    });
    assert_close("crossentropy dlogits", &real_cols(&dlogits), &g, FD_TOL);

    let mut losses32 = vec![f32::NAN; n];
    crossentropy_forward(&mut losses32, &to::<f32>(&logits), &targets, n, v_real, vp);
    assert_close("crossentropy f32 vs f64", &from(&losses32), &losses, 1e-5);
}

#[test]
fn crossentropy_is_stable_for_large_logits_in_f32() {
    let (n, v_real, vp) = (2, 4, 4);
    let logits = [1000.0f32, 0.0, -5.0, 3.0, 1000.0, 0.0, -5.0, 3.0];
    let targets = [0u32, 1];
    let mut losses = [f32::NAN; 2];
    let mut d = logits;
    crossentropy_forward_backward(&mut losses, &mut d, &targets, n, v_real, vp, 1.0);
    assert!(
        losses[0].abs() < 1e-6,
        "confident correct row loss {}",
        losses[0]
    );
    assert!(
        (losses[1] - 1000.0).abs() < 1e-3,
        "confident wrong row loss {}",
        losses[1]
    );
    assert!(d.iter().all(|x| x.is_finite()));
    assert!((d[5] + 1.0).abs() < 1e-6 && (d[4] - 1.0).abs() < 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

#[test]
fn dropout_keeps_the_expected_fraction_and_preserves_the_mean() {
    let len = 100_000;
    let p = 0.25f32;
    let mut x = vec![1.0f32; len];
    dropout_forward(&mut x, p, 42);
    let kept = x.iter().filter(|&&v| v != 0.0).count() as f64 / len as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
    assert!(x.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
    // Every element follows the published mask function (checks chunk offsets too).
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(v != 0.0, mask_uniform(42, i as u64) >= p, "element {i}");
    }
    // Another seed gives another mask.
    let mut y = vec![1.0f32; len];
    dropout_forward(&mut y, p, 43);
    assert_ne!(x, y);
}

#[test]
fn dropout_backward_regenerates_the_forward_mask() {
    let mut rng = Rng::new(15);
    let len = 70_001;
    let x = to::<f32>(&rng.vec(len));
    let mut y = x.clone();
    dropout_forward(&mut y, 0.1, 7);
    let mut g = vec![1.0f32; len];
    dropout_backward(&mut g, 0.1, 7);
    for i in 0..len {
        // Compared as values: a dropped negative element is +0 forward and −0 as x·g.
        assert_eq!(y[i], x[i] * g[i], "element {i}");
    }
    let mut same = x.clone();
    dropout_forward(&mut same, 0.0, 7);
    assert_eq!(bits(&same), bits(&x), "p = 0 must be a no-op");
    dropout_forward(&mut same, 1.0, 7);
    assert!(same.iter().all(|&v| v == 0.0));
}

#[test]
fn mask_uniform_is_in_unit_interval_and_uniform() {
    let mut buckets = [0usize; 10];
    for i in 0..100_000u64 {
        let u = mask_uniform(1234, i);
        assert!((0.0..1.0).contains(&u));
        buckets[(u * 10.0) as usize] += 1;
    }
    assert!(
        buckets.iter().all(|&b| (9_500..10_500).contains(&b)),
        "{buckets:?}"
    );
    assert_ne!(mask_uniform(0, 0), mask_uniform(1, 0));
}

// ---------------------------------------------------------------------------------------------
// AdamW and reductions
// ---------------------------------------------------------------------------------------------

#[test]
fn adamw_step_matches_hand_computation() {
    let hyper = AdamWHyper {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.5,
    };
    let mut param = vec![1.0f64, -2.0];
    let grad = [4.0, 0.0];
    let mut m = vec![0.2, 0.0];
    let mut v = vec![0.05, 0.0];
    adamw_step(&mut param, &grad, &mut m, &mut v, &hyper, 2, 0.5);
    // Element 0: g = 2; m = 0.9·0.2 + 0.1·2 = 0.38; v = 0.99·0.05 + 0.01·4 = 0.0895;
    // m̂ = 0.38/0.19 = 2; v̂ = 0.0895/0.0199; param = 1 − 0.1·(2/(√v̂ + 1e-8) + 0.5·1).
    let v_hat = 0.0895 / (1.0 - 0.99f64 * 0.99);
    let want0 = 1.0 - 0.1 * (2.0 / (v_hat.sqrt() + 1e-8) + 0.5);
    assert!((m[0] - 0.38).abs() < 1e-15 && (v[0] - 0.0895).abs() < 1e-15);
    assert!((param[0] - want0).abs() < 1e-14, "{} vs {want0}", param[0]);
    // Element 1: zero gradient and moments: only the decoupled decay acts, −2·(1 − 0.1·0.5).
    assert!((param[1] + 1.9).abs() < 1e-15, "{}", param[1]);
    // f32 agrees.
    let mut p32 = vec![1.0f32, -2.0];
    let (mut m32, mut v32) = (vec![0.2f32, 0.0], vec![0.05f32, 0.0]);
    adamw_step(&mut p32, &[4.0f32, 0.0], &mut m32, &mut v32, &hyper, 2, 0.5);
    assert_close("adamw f32 vs f64", &from(&p32), &param, 1e-6);
}

#[test]
fn sum_squares_and_amax() {
    let mut rng = Rng::new(16);
    let x = rng.vec_f32_exact(50_001);
    let naive: f64 = x.iter().map(|v| v * v).sum();
    assert!((sum_squares(&x) - naive).abs() < 1e-9 * naive);
    assert!((sum_squares(&to::<f32>(&x)) - naive).abs() < 1e-9 * naive);
    let mut y = x.clone();
    y[31_337] = -7.5;
    assert_eq!(amax(&y), 7.5);
    assert_eq!(amax::<f32>(&[]), 0.0);
    y[49_999] = f64::NAN;
    assert!(amax(&y).is_nan());
    assert!(sum_squares(&y).is_nan());
}

// ---------------------------------------------------------------------------------------------
// Determinism with threads
// ---------------------------------------------------------------------------------------------

/// Runs every kernel with threads at sizes where they split work, returning all outputs' bits.
fn run_all_kernels() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(17);
    let mut results = Vec::new();
    // Linear.
    let (n, ic, oc) = (256, 192, 320);
    let x = to::<f32>(&rng.vec(n * ic));
    let w = to::<f32>(&rng.vec(oc * ic));
    let bias = to::<f32>(&rng.vec(oc));
    let dout = to::<f32>(&rng.vec(n * oc));
    let mut out = vec![0.0f32; n * oc];
    linear_forward(&mut out, &x, &w, Some(&bias), n, ic, oc, 1.0);
    let (mut dinp, mut dw, mut db) = (
        vec![0.0f32; n * ic],
        vec![0.0f32; oc * ic],
        vec![0.0f32; oc],
    );
    linear_backward(
        &mut dinp,
        &mut dw,
        Some(&mut db),
        &dout,
        &x,
        &w,
        n,
        ic,
        oc,
        false,
        (1.0, 1.0),
    );
    results.extend([bits(&out), bits(&dinp), bits(&dw), bits(&db)]);
    // LayerNorm.
    let (n, c) = (512, 384);
    let x = to::<f32>(&rng.vec(n * c));
    let (lw, lb) = (to::<f32>(&rng.vec(c)), to::<f32>(&rng.vec(c)));
    let (out, mean, rstd) = layernorm_out(&x, &lw, &lb, n, c);
    let dout = to::<f32>(&rng.vec(n * c));
    let (mut dinp, mut dw, mut db) = (vec![0.0f32; n * c], vec![0.0f32; c], vec![0.0f32; c]);
    layernorm_backward(
        &mut dinp,
        &mut dw,
        &mut db,
        &dout,
        &x,
        &lw,
        &mean,
        &rstd,
        n,
        c,
        (1.0, 1.0),
    );
    results.extend([bits(&out), bits(&dinp), bits(&dw), bits(&db)]);
    // The scaled parameter-gradient path (unit scaling) sums per block too.
    let (mut dw2, mut db2) = (vec![0.0f32; c], vec![0.0f32; c]);
    layernorm_backward(
        &mut dinp,
        &mut dw2,
        &mut db2,
        &dout,
        &x,
        &lw,
        &mean,
        &rstd,
        n,
        c,
        (0.5, 0.25),
    );
    results.extend([bits(&dw2), bits(&db2)]);
    // GELU.
    let mut g = vec![0.0f32; n * c];
    gelu_forward(&mut g, &x, 1.0);
    let mut dg = dout.clone();
    gelu_backward(&mut dg, &x, 1.0);
    results.extend([bits(&g), bits(&dg)]);
    // Attention.
    let (b, t, c, nh) = (2, 96, 128, 4);
    let qkv = to::<f32>(&rng.vec(b * t * 3 * c));
    let (out, lse) = attention_out(&qkv, b, t, c, nh);
    let dout = to::<f32>(&rng.vec(b * t * c));
    let mut dqkv = vec![0.0f32; qkv.len()];
    attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, b, t, c, nh, 1.0);
    results.extend([bits(&out), bits(&lse), bits(&dqkv)]);
    // Embedding with many repeated tokens.
    let (b, t, c, vocab) = (8, 64, 128, 50);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u32)).collect();
    let dout = to::<f32>(&rng.vec(b * t * c));
    let (mut dwte, mut dwpe) = (vec![0.0f32; vocab * c], vec![0.0f32; t * c]);
    embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c, (1.0, 1.0));
    results.extend([bits(&dwte), bits(&dwpe)]);
    let (mut dwte, mut dwpe) = (vec![0.0f32; vocab * c], vec![0.0f32; t * c]);
    embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c, (0.1, 3.0));
    results.extend([bits(&dwte), bits(&dwpe)]);
    // Classifier.
    let (n, v_real, vp) = (64, 1000, 1024);
    let mut logits = to::<f32>(&rng.vec(n * vp));
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v_real as u32)).collect();
    let mut losses = vec![0.0f32; n];
    crossentropy_forward_backward(
        &mut losses,
        &mut logits,
        &targets,
        n,
        v_real,
        vp,
        1.0 / n as f32,
    );
    results.extend([bits(&losses), bits(&logits)]);
    // Reductions.
    let big = to::<f32>(&rng.vec(300_000));
    results.push(vec![
        sum_squares(&big).to_bits() as u32,
        (sum_squares(&big).to_bits() >> 32) as u32,
    ]);
    results.push(vec![amax(&big).to_bits()]);
    results
}

#[test]
fn kernels_are_bitwise_deterministic_across_runs_and_thread_counts() {
    let first = run_all_kernels();
    assert_eq!(
        first,
        run_all_kernels(),
        "two runs on the global pool differ"
    );
    let one = with_threads(1, run_all_kernels);
    let four = with_threads(4, run_all_kernels);
    for (i, ((a, b), c)) in first.iter().zip(&one).zip(&four).enumerate() {
        assert_eq!(
            a, b,
            "output {i} differs between the global pool and 1 thread"
        );
        assert_eq!(
            a, c,
            "output {i} differs between the global pool and 4 threads"
        );
    }
}
