//! A thin layer of our own over cuBLASLt (`cudarc::cublaslt::{result, sys}`).
//!
//! Every GEMM of the CUDA backend goes through [`Lt::matmul`]. We do not use cudarc's safe
//! `CudaBlasLT` wrapper because it creates descriptors, layouts and runs the algorithm heuristic on
//! every call, and it cannot express what training needs:
//!
//! - **Cached plans.** A training step issues the same few dozen GEMM shapes over and over. The
//!   matmul descriptor, the matrix layouts and the heuristic's chosen algorithm are built once per
//!   shape/type/epilogue key and reused; a call then only sets the per-call pointers and launches.
//! - **Measured algorithms.** The heuristic's first answer is often not the fastest (the GELU
//!   epilogues at GPT-2 124M ran at ~450 TFLOP/s where plain GEMMs of the shape reach 700+).
//!   Each plan's first call times the heuristic's candidates on the call's own operands and keeps
//!   the fastest; choices persist on disk per GPU and cuBLASLt version, so later runs take the
//!   same algorithms (same numerics run to run) without timing. `HALFLING_CUDA_GEMM_TUNE=0` takes
//!   the heuristic's first answer (see [`Lt::tune`]).
//! - **Mixed output types.** bf16 (or f16) inputs with an f32 output (and `beta = 1`) let weight-gradient
//!   GEMMs accumulate straight into fp32 gradient buffers.
//! - **Exact fp32.** The compute type is `CUBLAS_COMPUTE_32F` (not the TF32 fast path), so f32 GEMMs
//!   match the CPU reference, and bf16 and f16 GEMMs accumulate in f32.
//! - **Fused epilogues.** Bias, GELU with its input saved (forward) and the GELU derivative
//!   (backward) ([`Epilogue`]) are part of the plan key; their pointers are
//!   per-call attributes. [`Lt::supports`] says whether cuBLASLt has an algorithm for one, so
//!   callers can fall back to separate kernels.
//! - **FP8.** [`Lt::matmul_scaled`] runs e4m3/e5m2 operands with per-tensor dequantization
//!   scales read from device memory ([`Fp8Scales`]), bf16, f16 or f32 output, and the same epilogues
//!   where cuBLASLt has them for FP8 (plans keyed by both operand types and fast accumulation).
//!
//! Pointers are raw `CUdeviceptr`s (`u64`); the caller owns the memory and keeps it alive until the
//! work on the stream is done.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::c_void;
use std::mem::size_of;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// Workspace handed to cuBLASLt: NVIDIA recommends 32 MiB on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// The alignment the heuristic assumes by default (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`
/// default to 256); every operand we pass is a whole `cuMemAlloc` allocation, which satisfies it.
const REQUIRED_ALIGN: u64 = 256;

/// How many of the heuristic's candidates a plan's tuning times.
const TUNE_CANDIDATES: usize = 16;

/// Timed runs per candidate (after one untimed warm-up run); the median counts.
const TUNE_REPS: usize = 5;

/// A candidate replaces the heuristic's first only when its median is below this fraction of
/// the first's: a near tie is noise, and keeping the first then costs nothing.
const TUNE_MARGIN: f32 = 0.97;

/// `cublasOperation_t` values (cudarc's cublaslt bindings do not export the enum; it is a C int).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

/// Storage type of a GEMM operand or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmType {
    F32,
    BF16,
    F16,
    /// FP8 E4M3 (operands of [`Lt::matmul_scaled`] only).
    F8E4M3,
    /// FP8 E5M2 (operands of [`Lt::matmul_scaled`] only).
    F8E5M2,
}

impl GemmType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            GemmType::F32 => sys::cudaDataType::CUDA_R_32F,
            GemmType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            GemmType::F16 => sys::cudaDataType::CUDA_R_16F,
            GemmType::F8E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
            GemmType::F8E5M2 => sys::cudaDataType::CUDA_R_8F_E5M2,
        }
    }

    /// Lower-case name, as in messages (`bf16`, `e4m3`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GemmType::F32 => "f32",
            GemmType::BF16 => "bf16",
            GemmType::F16 => "f16",
            GemmType::F8E4M3 => "e4m3",
            GemmType::F8E5M2 => "e5m2",
        }
    }

    fn is_fp8(self) -> bool {
        matches!(self, GemmType::F8E4M3 | GemmType::F8E5M2)
    }

    /// Bytes per element.
    fn bytes(self) -> usize {
        match self {
            GemmType::F32 => 4,
            GemmType::BF16 | GemmType::F16 => 2,
            GemmType::F8E4M3 | GemmType::F8E5M2 => 1,
        }
    }
}

/// What turns a [`Gemm`] into an FP8 GEMM: the operands' FP8 types (replacing `inputs`) and
/// their dequantization scales, read from device memory when the GEMM runs (so a scale computed
/// on the device by an earlier kernel needs no host round trip). The product becomes
/// `alpha · a_scale · b_scale · op(a) · op(b)` (cuBLASLt's `A_SCALE_POINTER`/`B_SCALE_POINTER`).
///
/// cuBLASLt's FP8 rules (Hopper): both operands K-major ("TN": in our row-major terms `trans_a
/// = false`, `trans_b = true`), not both E5M2, leading dimensions multiples of 16 bytes (we
/// require m, n, k multiples of 16), f32 accumulation (`CUBLAS_COMPUTE_32F`), output bf16, f16
/// or f32 (f32 with `beta = 1` accumulates weight gradients). A bias has the output's type, as
/// cuBLASLt's FP8 kernels take it for bf16 and f16 outputs (the f16 pair ran on the H200);
/// a combination it has no kernel for is refused by the heuristic, and [`Lt::supports_scaled`]
/// says so (callers fall back).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8Scales {
    /// FP8 type of `a`.
    pub a_type: GemmType,
    /// FP8 type of `b`.
    pub b_type: GemmType,
    /// Device address of an f32: the factor that dequantizes `a` (1 / its scale).
    pub a_scale: u64,
    /// Device address of an f32: the factor that dequantizes `b`.
    pub b_scale: u64,
    /// Whether the scale pointers are used. `false`: both must be 0 and cuBLASLt takes the
    /// scales as 1 (the caller folded known scales into `alpha` instead).
    pub device_scales: bool,
    /// `CUBLASLT_MATMUL_DESC_FAST_ACCUM`: let the tensor cores keep partial sums in their own
    /// reduced-precision accumulator instead of promoting them to f32 every few k-steps.
    /// Faster, less exact; Transformer Engine uses it for forward GEMMs only.
    pub fast_accum: bool,
}

/// One row-major GEMM: `out[m×n] = epilogue(alpha·op(a)·op(b) + beta·out)`. op(a) is m×k (a
/// stored k×m row-major when `trans_a`); op(b) is k×n (b stored n×k when `trans_b`). `inputs` is
/// the type of both a and b; `out_type` the type of out (and of every epilogue vector and
/// matrix). beta == 0 does not read `out`. Supported (inputs, out_type): (F32, F32),
/// (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32); accumulation is f32. Pointers are raw device addresses, 256-byte
/// aligned (whole allocations are).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Output matrix.
    pub out: u64,
    /// Type of `out` and `bias`.
    pub out_type: GemmType,
    /// First operand.
    pub a: u64,
    /// Second operand.
    pub b: u64,
    /// Type of both operands.
    pub inputs: GemmType,
    /// Rows of out.
    pub m: usize,
    /// Columns of out.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// `a` is stored transposed (k×m).
    pub trans_a: bool,
    /// `b` is stored transposed (n×k).
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old `out` (0: overwrite, 1: accumulate).
    pub beta: f32,
    /// What happens to the product before it is stored.
    pub epilogue: Epilogue,
}

impl Gemm {
    /// `out[n, oc] = alpha · inp[n, ic] · w[oc, ic]ᵀ` (a linear layer's forward, no bias), all
    /// of type `t`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        out: u64,
        inp: u64,
        w: u64,
        t: GemmType,
        n: usize,
        ic: usize,
        oc: usize,
        alpha: f32,
    ) -> Gemm {
        Gemm {
            out,
            out_type: t,
            a: inp,
            b: w,
            inputs: t,
            m: n,
            n: oc,
            k: ic,
            trans_a: false,
            trans_b: true,
            alpha,
            beta: 0.0,
            epilogue: Epilogue::None,
        }
    }

    /// `dinp[n, ic] = alpha · dout[n, oc] · w[oc, ic]` (overwritten), all of type `t`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_input_grad(
        dinp: u64,
        dout: u64,
        w: u64,
        t: GemmType,
        n: usize,
        ic: usize,
        oc: usize,
        alpha: f32,
    ) -> Gemm {
        Gemm {
            out: dinp,
            out_type: t,
            a: dout,
            b: w,
            inputs: t,
            m: n,
            n: ic,
            k: oc,
            trans_a: false,
            trans_b: false,
            alpha,
            beta: 0.0,
            epilogue: Epilogue::None,
        }
    }

    /// `dw[oc, ic] += alpha · dout[n, oc]ᵀ · inp[n, ic]` into an f32 gradient, inputs of type `t`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_weight_grad(
        dw: u64,
        dout: u64,
        inp: u64,
        t: GemmType,
        n: usize,
        ic: usize,
        oc: usize,
        alpha: f32,
    ) -> Gemm {
        Gemm {
            out: dw,
            out_type: GemmType::F32,
            a: dout,
            b: inp,
            inputs: t,
            m: oc,
            n: ic,
            k: n,
            trans_a: true,
            trans_b: false,
            alpha,
            beta: 1.0,
            epilogue: Epilogue::None,
        }
    }
}

/// A fused epilogue of a [`Gemm`] (cuBLASLt's `CUBLASLT_EPILOGUE_*`), in row-major terms. Each
/// saves a pass over a matrix that a separate kernel would read and write again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// Store the product as is.
    None,
    /// Add `bias[n]` to every row (`BIAS`).
    Bias { bias: u64 },
    /// `pre = product (+ bias[n])` is stored in `pre` (m×n, like out) and `out = gelu(pre)`
    /// with the tanh approximation (`GELU_AUX` / `GELU_AUX_BIAS`): the MLP's up-projection.
    GeluAux { bias: Option<u64>, pre: u64 },
    /// `out = product ⊙ gelu'(pre)`, `pre` as saved by [`Epilogue::GeluAux`] (`DGELU`): the
    /// input gradient of the MLP's down-projection, carried through the GELU.
    DGelu { pre: u64 },
}

/// The pointer-free part of an [`Epilogue`], which selects a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EpilogueKind {
    None,
    Bias,
    GeluAux,
    GeluAuxBias,
    DGelu,
}

impl Epilogue {
    fn kind(&self) -> EpilogueKind {
        match self {
            Epilogue::None => EpilogueKind::None,
            Epilogue::Bias { .. } => EpilogueKind::Bias,
            Epilogue::GeluAux { bias: None, .. } => EpilogueKind::GeluAux,
            Epilogue::GeluAux { bias: Some(_), .. } => EpilogueKind::GeluAuxBias,
            Epilogue::DGelu { .. } => EpilogueKind::DGelu,
        }
    }

    /// The suffix of a profile line for a GEMM with this epilogue (`gemm 16384x3072x768
    /// BF16->BF16 +dgelu`).
    pub fn profile_tag(&self) -> &'static str {
        match self {
            Epilogue::None => "",
            Epilogue::Bias { .. } => " +bias",
            Epilogue::GeluAux { .. } => " +gelu",
            Epilogue::DGelu { .. } => " +dgelu",
        }
    }

    /// The vector set as `CUBLASLT_MATMUL_DESC_BIAS_POINTER` (the bias) and the matrix set as `CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER`.
    fn pointers(&self) -> (Option<u64>, Option<u64>) {
        match *self {
            Epilogue::None => (None, None),
            Epilogue::Bias { bias } => (Some(bias), None),
            Epilogue::GeluAux { bias, pre } => (bias, Some(pre)),
            Epilogue::DGelu { pre } => (None, Some(pre)),
        }
    }
}

impl EpilogueKind {
    fn cuda(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match self {
            EpilogueKind::None => E::CUBLASLT_EPILOGUE_DEFAULT,
            EpilogueKind::Bias => E::CUBLASLT_EPILOGUE_BIAS,
            EpilogueKind::GeluAux => E::CUBLASLT_EPILOGUE_GELU_AUX,
            EpilogueKind::GeluAuxBias => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            EpilogueKind::DGelu => E::CUBLASLT_EPILOGUE_DGELU,
        }
    }

    fn name(self) -> Option<&'static str> {
        match self {
            EpilogueKind::None => None,
            EpilogueKind::Bias => Some("bias"),
            EpilogueKind::GeluAux => Some("gelu"),
            EpilogueKind::GeluAuxBias => Some("bias+gelu"),
            EpilogueKind::DGelu => Some("dgelu"),
        }
    }

    /// Whether the plan has an auxiliary matrix (the GELU input).
    fn has_aux(self) -> bool {
        matches!(
            self,
            EpilogueKind::GeluAux | EpilogueKind::GeluAuxBias | EpilogueKind::DGelu
        )
    }

    /// Whether the plan has a bias vector.
    fn has_vector(self) -> bool {
        matches!(self, EpilogueKind::Bias | EpilogueKind::GeluAuxBias)
    }
}

/// Everything that selects a plan. Pointers are not part of it: they are set per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    /// Type of `a`.
    inputs: GemmType,
    /// Type of `b` (differs from `inputs` only in FP8 GEMMs).
    b_type: GemmType,
    out_type: GemmType,
    epilogue: EpilogueKind,
    /// FP8 GEMM.
    scaled: bool,
    /// FP8 GEMM with scale pointers.
    device_scales: bool,
    fast_accum: bool,
}

impl PlanKey {
    fn new(g: &Gemm, fp8: Option<&Fp8Scales>) -> Self {
        PlanKey {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            inputs: fp8.map_or(g.inputs, |f| f.a_type),
            b_type: fp8.map_or(g.inputs, |f| f.b_type),
            out_type: g.out_type,
            epilogue: g.epilogue.kind(),
            scaled: fp8.is_some(),
            device_scales: fp8.is_some_and(|f| f.device_scales),
            fast_accum: fp8.is_some_and(|f| f.fast_accum),
        }
    }
}

impl std::fmt::Display for PlanKey {
    /// e.g. `16384x2304x768 (bf16 -> bf16, trans_b, bias)`: m x n x k in row-major terms.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{} ({}",
            self.m,
            self.n,
            self.k,
            self.inputs.name()
        )?;
        if self.b_type != self.inputs {
            write!(f, " x {}", self.b_type.name())?;
        }
        write!(f, " -> {}", self.out_type.name())?;
        if self.fast_accum {
            f.write_str(", fast accum")?;
        }
        if self.scaled && !self.device_scales {
            f.write_str(", scales in alpha")?;
        }
        if self.trans_a {
            f.write_str(", trans_a")?;
        }
        if self.trans_b {
            f.write_str(", trans_b")?;
        }
        if let Some(name) = self.epilogue.name() {
            write!(f, ", {name}")?;
        }
        f.write_str(")")
    }
}

/// A cached GEMM plan: descriptor, layouts (in cuBLASLt's column-major operand order, i.e. the
/// row-major `b` is cuBLASLt's A and the row-major `a` is cuBLASLt's B) and the chosen algorithm.
/// C and D share `d_layout`. Null handles (a plan only partly built) are skipped on drop.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// Layout of cuBLASLt's A = our `b`.
    lt_a_layout: sys::cublasLtMatrixLayout_t,
    /// Layout of cuBLASLt's B = our `a`.
    lt_b_layout: sys::cublasLtMatrixLayout_t,
    /// Layout of C and D = our `out`.
    d_layout: sys::cublasLtMatrixLayout_t,
    /// The algorithm every call runs.
    algo: sys::cublasLtMatmulAlgo_t,
    /// The heuristic's candidates in its order (`algo` starts as the first), when tuning is on.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    /// Whether `algo` is final: tuned, read from the disk cache, or tuning is off.
    settled: bool,
}

impl Plan {
    fn empty() -> Self {
        Plan {
            desc: std::ptr::null_mut(),
            lt_a_layout: std::ptr::null_mut(),
            lt_b_layout: std::ptr::null_mut(),
            d_layout: std::ptr::null_mut(),
            // SAFETY: cublasLtMatmulAlgo_t is a plain C struct of integers (opaque data words);
            // all-zero is a valid bit pattern, and it is overwritten by the heuristic before use.
            algo: unsafe { std::mem::zeroed() },
            candidates: Vec::new(),
            settled: false,
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // Errors on teardown are ignored: there is nothing useful to do with them in drop.
        // SAFETY: each handle was created by cuBLASLt, is owned by this plan only, and is
        // destroyed exactly once here.
        unsafe {
            for layout in [self.lt_a_layout, self.lt_b_layout, self.d_layout] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// A cuBLASLt handle, its workspace, and the plan cache.
///
/// The workspace is shared by every call: calls must be ordered with respect to each other (issue
/// them on one stream, or on streams ordered by events). Not `Sync`; `matmul` takes `&mut self`.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    /// Heuristic preference (max workspace = the workspace size), shared by all plans.
    pref: sys::cublasLtMatmulPreference_t,
    /// Kept alive for `workspace_ptr`; freed (stream-ordered) when `Lt` drops.
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    plans: HashMap<PlanKey, Plan>,
    /// Keys the heuristic found no algorithm for (see [`Lt::supports`]).
    refused: HashSet<PlanKey>,
    /// Algorithm choice by measurement (see [`Lt::tune`]).
    tuning: Tuning,
    /// Plans made, settled or refused so far (see [`Lt::plan_changes`]).
    changes: u64,
}

/// The state of [`Lt::tune`].
struct Tuning {
    /// `HALFLING_CUDA_GEMM_TUNE` is not `0`.
    enabled: bool,
    /// `HALFLING_CUDA_GEMM_TUNE_LOG=1`: one line per plan on stderr (candidates' times, choice),
    /// and one per plan cuBLASLt refused (why).
    log: bool,
    /// The file of choices on disk (none without a cache directory).
    file: Option<PathBuf>,
    /// Choices by plan (`PlanKey`'s `Debug` form): the file's entries and this run's.
    saved: BTreeMap<String, [u64; 8]>,
    /// Plans timed so far and the wall time it took (host side, synchronisation included).
    plans_timed: usize,
    seconds: f64,
}

impl Tuning {
    /// From the environment: the switch, and the choices saved for this GPU and cuBLASLt.
    fn from_env(gpu: &str) -> Tuning {
        let enabled = super::env_on("HALFLING_CUDA_GEMM_TUNE");
        let log = super::env_opt_in("HALFLING_CUDA_GEMM_TUNE_LOG");
        // SAFETY: the library is loaded (checked by `Lt::new` before this).
        let version = unsafe { sys::cublasLtGetVersion() };
        // Next to the NVRTC kernel cache.
        let file = enabled
            .then(|| super::cache_dir("gemm"))
            .flatten()
            .map(|d| d.join(choice_file_name(gpu, version)));
        let saved = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|text| parse_choices(&text))
            .unwrap_or_default();
        Tuning {
            enabled,
            log,
            file,
            saved,
            plans_timed: 0,
            seconds: 0.0,
        }
    }

    /// Records `key`'s choice and rewrites the file (entries other runs added since are kept).
    fn save(&mut self, key: &PlanKey, algo: &sys::cublasLtMatmulAlgo_t) {
        self.saved.insert(format!("{key:?}"), algo.data);
        let Some(path) = &self.file else { return };
        let mut all = std::fs::read_to_string(path)
            .map(|t| parse_choices(&t))
            .unwrap_or_default();
        all.extend(self.saved.iter().map(|(k, v)| (k.clone(), *v)));
        // The file is an optimisation: failing to write it is not an error.
        if let Some(dir) = path.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = crate::checkpoint::write_atomic(path, format_choices(&all).as_bytes());
            }
        }
    }
}

/// The choices file of one GPU model and cuBLASLt version (the algorithm words are only
/// meaningful to the library version that produced them; the workspace bounds the candidates).
fn choice_file_name(gpu: &str, version: usize) -> String {
    let gpu: String = gpu
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{gpu}-cublaslt{version}-ws{}m.txt", WORKSPACE_BYTES >> 20)
}

/// Lines `plan key<TAB>eight hex words`; malformed lines are skipped (the file is a cache).
fn parse_choices(text: &str) -> BTreeMap<String, [u64; 8]> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((key, words)) = line.split_once('\t') else {
            continue;
        };
        let parsed: Result<Vec<u64>, _> = words
            .split(' ')
            .map(|w| u64::from_str_radix(w, 16))
            .collect();
        if let Some(data) = parsed.ok().and_then(|p| <[u64; 8]>::try_from(p).ok()) {
            out.insert(key.to_string(), data);
        }
    }
    out
}

fn format_choices(choices: &BTreeMap<String, [u64; 8]>) -> String {
    let mut text = String::from("# halfling: cuBLASLt algorithms chosen by timing, per plan\n");
    for (key, data) in choices {
        let words: Vec<String> = data.iter().map(|w| format!("{w:x}")).collect();
        text.push_str(&format!("{key}\t{}\n", words.join(" ")));
    }
    text
}

/// Which candidate to keep: the fastest, unless it does not beat the first (index 0) by the
/// margin. `times[i]` is `None` where candidate i failed to run.
fn choose(times: &[Option<f32>]) -> Option<usize> {
    let best = times
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    match times.first().copied().flatten() {
        Some(first) if best.1 >= first * TUNE_MARGIN => Some(0),
        _ => Some(best.0),
    }
}

/// `id, tile, split-k, stages` of an algorithm (cuBLASLt's config attributes), for the log.
fn describe_algo(algo: &sys::cublasLtMatmulAlgo_t) -> String {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
    let get = |attr: C| -> String {
        // Each of these attributes is a 32-bit integer.
        let mut value = 0u32;
        let mut written = 0usize;
        // SAFETY: `algo` is a live algorithm struct; the buffer is 4 bytes, as passed.
        let ok = unsafe {
            sys::cublasLtMatmulAlgoConfigGetAttribute(
                algo,
                attr,
                &mut value as *mut u32 as *mut c_void,
                size_of::<u32>(),
                &mut written,
            )
        }
        .result()
        .is_ok();
        if ok {
            value.to_string()
        } else {
            "?".to_string()
        }
    };
    format!(
        "id {}, tile {}, split-k {}, stages {}",
        get(C::CUBLASLT_ALGO_CONFIG_ID),
        get(C::CUBLASLT_ALGO_CONFIG_TILE_ID),
        get(C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        get(C::CUBLASLT_ALGO_CONFIG_STAGES_ID)
    )
}

/// Whether the byte ranges `[a, a + a_len)` and `[b, b + b_len)` overlap.
fn overlaps(a: u64, a_len: usize, b: u64, b_len: usize) -> bool {
    a < b + b_len as u64 && b < a + a_len as u64
}

// SAFETY: the cuBLASLt handle, preference and descriptors are plain heap objects that may be used
// from any thread as long as they are not used concurrently; `Lt` is only used through `&mut self`
// (no `Sync`), so moving it between threads is sound.
unsafe impl Send for Lt {}

fn status(e: result::CublasError) -> String {
    format!("{:?}", e.0)
}

impl Lt {
    /// Creates the cuBLASLt handle and a 32 MiB workspace on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "cuBLASLt library (libcublasLt) not found: install the CUDA toolkit's cuBLAS \
                 or add its lib directory to LD_LIBRARY_PATH"
            );
        }
        stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context for cuBLASLt")?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .with_context(|| format!("allocating the {WORKSPACE_BYTES}-byte cuBLASLt workspace"))?;
        let workspace_ptr = {
            let (ptr, _sync) = workspace.device_ptr(stream);
            ptr
        };
        let handle =
            result::create_handle().map_err(|e| anyhow!("cublasLtCreate failed: {}", status(e)))?;
        let pref = match result::create_matmul_pref() {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: handle was just created and is not used elsewhere.
                let _ = unsafe { result::destroy_handle(handle) };
                bail!("cublasLtMatmulPreferenceCreate failed: {}", status(e));
            }
        };
        // From here on, `lt`'s Drop releases the handle and preference on error.
        let lt = Lt {
            handle,
            pref,
            _workspace: workspace,
            workspace_ptr,
            plans: HashMap::new(),
            refused: HashSet::new(),
            tuning: Tuning::from_env(&stream.context().name().unwrap_or_default()),
            changes: 0,
        };
        let max_ws = WORKSPACE_BYTES as u64;
        // SAFETY: pref is live; the attribute is a u64 read during the call.
        unsafe {
            result::set_matmul_pref_attribute(
                lt.pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &max_ws as *const u64 as *const c_void,
                size_of::<u64>(),
            )
        }
        .map_err(|e| {
            anyhow!(
                "cuBLASLt: setting the max workspace preference failed: {}",
                status(e)
            )
        })?;
        Ok(lt)
    }

    /// Runs `g` on `stream` (see [`Gemm`] for the product and the supported types).
    pub fn matmul(&mut self, stream: &CudaStream, g: &Gemm) -> Result<()> {
        self.matmul_scaled(stream, g, None)
    }

    /// The checks an FP8 GEMM must pass (see [`Fp8Scales`]); `Err` says which rule fails.
    fn check_fp8(key: &PlanKey) -> Result<()> {
        let (a, b) = (key.inputs, key.b_type);
        if !(a.is_fp8() && b.is_fp8()) || (a == GemmType::F8E5M2 && b == GemmType::F8E5M2) {
            bail!("cuBLASLt FP8 matmul {key}: operands must be FP8, not both e5m2");
        }
        if !matches!(key.out_type, GemmType::BF16 | GemmType::F16 | GemmType::F32) {
            bail!("cuBLASLt FP8 matmul {key}: the output must be bf16, f16 or f32");
        }
        if key.trans_a || !key.trans_b {
            bail!("cuBLASLt FP8 matmul {key}: both operands must be K-major (trans_a = false, trans_b = true)");
        }
        if key.m % 16 != 0 || key.n % 16 != 0 || key.k % 16 != 0 {
            bail!("cuBLASLt FP8 matmul {key}: m, n and k must be multiples of 16");
        }
        Ok(())
    }

    /// Runs `g` on `stream`, as an FP8 GEMM when `fp8` is given (its types replace `g.inputs`;
    /// see [`Fp8Scales`] for the rules, which are checked).
    pub fn matmul_scaled(
        &mut self,
        stream: &CudaStream,
        g: &Gemm,
        fp8: Option<&Fp8Scales>,
    ) -> Result<()> {
        let Some(key) = self.prepare(stream, g, fp8)? else {
            return Ok(());
        };
        let plan = self
            .plans
            .get(&key)
            .ok_or_else(|| anyhow!("cuBLASLt matmul {key}: plan cache lookup failed"))?;
        self.launch(stream, plan, &plan.algo, g)
            .map_err(|e| anyhow!("cuBLASLt matmul {key} failed: {}", status(e)))
    }

    /// Checks `g`, builds its plan if it has none, and sets the call's pointers on the plan's
    /// descriptor. `None`: an empty product (m or n is 0), nothing to run.
    fn prepare(
        &mut self,
        stream: &CudaStream,
        g: &Gemm,
        fp8: Option<&Fp8Scales>,
    ) -> Result<Option<PlanKey>> {
        let Gemm {
            out,
            out_type,
            a,
            b,
            m,
            n,
            k,
            epilogue,
            ..
        } = *g;
        let key = PlanKey::new(g, fp8);
        if fp8.is_some() {
            Self::check_fp8(&key)?;
        } else {
            match (key.inputs, out_type) {
                (GemmType::F32, GemmType::F32)
                | (GemmType::BF16, GemmType::BF16)
                | (GemmType::BF16, GemmType::F32)
                | (GemmType::F16, GemmType::F16)
                | (GemmType::F16, GemmType::F32) => {}
                _ => bail!(
                    "cuBLASLt matmul {key}: unsupported type combination (supported: f32 -> f32, \
                     bf16 -> bf16, bf16 -> f32, f16 -> f16, f16 -> f32; FP8 through matmul_scaled)"
                ),
            }
        }
        if m == 0 || n == 0 {
            return Ok(None);
        }
        if k == 0 {
            bail!("cuBLASLt matmul {key}: k = 0 is not supported");
        }
        let (vector, aux) = epilogue.pointers();
        for (name, ptr) in [
            ("out", Some(out)),
            ("a", Some(a)),
            ("b", Some(b)),
            ("epilogue vector", vector),
            ("epilogue matrix", aux),
        ] {
            if let Some(p) = ptr {
                if p == 0 || p % REQUIRED_ALIGN != 0 {
                    bail!(
                        "cuBLASLt matmul {key}: pointer `{name}` = {p:#x} is null or not \
                         {REQUIRED_ALIGN}-byte aligned"
                    );
                }
            }
        }

        if let Some(f) = fp8 {
            let (a, b) = (f.a_scale != 0, f.b_scale != 0);
            if (f.device_scales && !(a && b)) || (!f.device_scales && (a || b)) {
                bail!("cuBLASLt FP8 matmul {key}: scale pointers do not match device_scales");
            }
        }
        stream
            .context()
            .bind_to_thread()
            .with_context(|| format!("cuBLASLt matmul {key}: binding the CUDA context"))?;

        if !self.plans.contains_key(&key) {
            let plan = self.build_plan(&key)?;
            self.plans.insert(key, plan);
            self.changes += 1;
        }
        let plan = self
            .plans
            .get(&key)
            .ok_or_else(|| anyhow!("cuBLASLt matmul {key}: plan cache lookup failed"))?;
        type Attr = sys::cublasLtMatmulDescAttributes_t;
        // cuBLASLt's A is our b: its scale is b's.
        let device = fp8.filter(|f| f.device_scales);
        let (lt_a_scale, lt_b_scale) = (device.map(|f| f.b_scale), device.map(|f| f.a_scale));
        for (attr, ptr, what) in [
            (Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, vector, "vector"),
            (
                Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                aux,
                "matrix",
            ),
            (
                Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                lt_a_scale,
                "b scale",
            ),
            (
                Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                lt_b_scale,
                "a scale",
            ),
        ] {
            let Some(ptr) = ptr else { continue };
            // SAFETY: desc is live; the attribute (a u64 device pointer) is copied during the call.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &ptr as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            }
            .map_err(|e| {
                anyhow!(
                    "cuBLASLt matmul {key}: setting the {what} pointer failed: {}",
                    status(e)
                )
            })?;
        }
        Ok(Some(key))
    }

    /// Launches `g` with `plan` (prepared for `g` by [`Lt::prepare`]) and `algo`.
    fn launch(
        &self,
        stream: &CudaStream,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        g: &Gemm,
    ) -> std::result::Result<(), result::CublasError> {
        // Operands swapped: cuBLASLt's A is our b, cuBLASLt's B is our a (see `build_plan`).
        // SAFETY: all descriptors are live; alpha/beta are host f32 (scale type f32, default host
        // pointer mode) that outlive the call; device pointers are owned by the caller and valid
        // for the shapes given; the workspace is ours and WORKSPACE_BYTES long; `algo` is one
        // the heuristic returned for this plan.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                &g.alpha as *const f32 as *const c_void,
                &g.beta as *const f32 as *const c_void,
                g.b as *const c_void,
                plan.lt_a_layout,
                g.a as *const c_void,
                plan.lt_b_layout,
                g.out as *const c_void,
                plan.d_layout,
                g.out as *mut c_void,
                plan.d_layout,
                algo,
                self.workspace_ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }

    /// How many times a plan was made, settled (tuned) or refused: while it changes, GEMMs
    /// are still being planned or timed (which waits on the stream), so a training step is not
    /// yet ready to be recorded as a CUDA graph.
    pub fn plan_changes(&self) -> u64 {
        self.changes
    }

    /// What [`Lt::tune`] needs before `g`'s call: `None` when there is nothing to time (tuning
    /// off, the plan already settled or refused, an empty product, or a GELU input matrix that
    /// overlaps an operand); otherwise the bytes of a scratch output the timing runs must write
    /// instead of `g.out` (0: they may write `g.out`). Rerunning `g` in place changes its result
    /// when it accumulates (`beta != 0`, weight gradients) or when `out` overlaps an operand it
    /// reads (an in-place product): those time on a scratch output.
    pub fn tune_need(
        &mut self,
        stream: &CudaStream,
        g: &Gemm,
        fp8: Option<&Fp8Scales>,
    ) -> Option<usize> {
        if !self.tuning.enabled || g.m == 0 || g.n == 0 {
            return None;
        }
        let key = PlanKey::new(g, fp8);
        if self.refused.contains(&key) {
            return None;
        }
        // The plan is built here, not in `tune`: one whose choice is on disk is settled then,
        // and needs no scratch. A GEMM that cannot be planned is left to `matmul_scaled`, which
        // says why.
        if !self.plans.contains_key(&key) && !matches!(self.prepare(stream, g, fp8), Ok(Some(_))) {
            return None;
        }
        if self.plans.get(&key).is_some_and(|p| p.settled) {
            return None;
        }
        let (m, n, k) = (g.m, g.n, g.k);
        let out_bytes = m * n * key.out_type.bytes();
        let mut inputs = vec![
            (g.a, m * k * key.inputs.bytes()),
            (g.b, k * n * key.b_type.bytes()),
        ];
        match g.epilogue {
            Epilogue::None => {}
            Epilogue::Bias { bias } => inputs.push((bias, n * key.out_type.bytes())),
            Epilogue::GeluAux { bias, pre } => {
                if let Some(bias) = bias {
                    inputs.push((bias, n * key.out_type.bytes()));
                }
                // `pre` is written in place by every timing run; it must not be an operand.
                if inputs
                    .iter()
                    .any(|&(p, len)| overlaps(pre, out_bytes, p, len))
                {
                    return None;
                }
            }
            Epilogue::DGelu { pre } => inputs.push((pre, out_bytes)),
        }
        let in_place = inputs
            .iter()
            .any(|&(p, len)| overlaps(g.out, out_bytes, p, len));
        Some(if g.beta != 0.0 || in_place {
            out_bytes
        } else {
            0
        })
    }

    /// Chooses `g`'s algorithm by timing, once per plan (a no-op for a settled plan): each of
    /// the heuristic's candidates (up to [`TUNE_CANDIDATES`], all within the workspace) runs
    /// once untimed and [`TUNE_REPS`] times between CUDA events on `g`'s operands, and the
    /// fastest median is kept (see [`choose`]); a candidate that fails to launch is skipped.
    /// With `scratch` the runs write there instead of `g.out` (see [`Lt::tune_need`]; it must
    /// hold `g`'s output and stay alive until the stream has run the work, which this call
    /// waits for). The choice is saved to disk. Blocks on the stream.
    pub fn tune(
        &mut self,
        stream: &CudaStream,
        g: &Gemm,
        fp8: Option<&Fp8Scales>,
        scratch: Option<u64>,
    ) -> Result<()> {
        let run = Gemm {
            out: scratch.unwrap_or(g.out),
            ..*g
        };
        let Some(key) = self.prepare(stream, &run, fp8)? else {
            return Ok(());
        };
        let plan = self
            .plans
            .get(&key)
            .ok_or_else(|| anyhow!("cuBLASLt matmul {key}: plan cache lookup failed"))?;
        if plan.settled {
            return Ok(());
        }
        let started = Instant::now();
        let times: Vec<Option<f32>> = plan
            .candidates
            .iter()
            .map(|algo| self.time_algo(stream, plan, algo, &run).ok())
            .collect();
        // Waits for the timing runs, which may write `scratch`, before the caller frees it.
        stream
            .synchronize()
            .map_err(|e| anyhow!("cuBLASLt matmul {key}: tuning failed: {e:?}"))?;
        let seconds = started.elapsed().as_secs_f64();
        self.tuning.plans_timed += 1;
        self.tuning.seconds += seconds;
        let plan = self
            .plans
            .get_mut(&key)
            .ok_or_else(|| anyhow!("cuBLASLt matmul {key}: plan cache lookup failed"))?;
        plan.settled = true;
        self.changes += 1;
        let choice = choose(&times);
        if let Some(i) = choice {
            plan.algo = plan.candidates[i];
        }
        let algo = plan.algo;
        if choice.is_some() {
            self.tuning.save(&key, &algo);
        }
        if self.tuning.log {
            let ms = |t: Option<f32>| t.map_or("fail".to_string(), |t| format!("{t:.4}"));
            let best = times
                .iter()
                .enumerate()
                .filter_map(|(i, t)| t.map(|t| (i, t)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let all: Vec<String> = times.iter().map(|&t| ms(t)).collect();
            eprintln!(
                "gemm-tune {key}: first {} ms, best {} ms (#{}), chose #{} ({}), {} candidates \
                 [{}], {:.1} ms tuning ({} plans, {:.3} s so far)",
                ms(times.first().copied().flatten()),
                ms(best.map(|b| b.1)),
                best.map_or(0, |b| b.0),
                choice.unwrap_or(0),
                describe_algo(&algo),
                times.len(),
                all.join(" "),
                seconds * 1e3,
                self.tuning.plans_timed,
                self.tuning.seconds,
            );
        }
        Ok(())
    }

    /// Settles `g`'s plan on the heuristic's first answer without timing (where
    /// [`Lt::tune`] cannot run: no memory for its scratch output).
    pub fn settle(&mut self, stream: &CudaStream, g: &Gemm, fp8: Option<&Fp8Scales>) -> Result<()> {
        if let Some(key) = self.prepare(stream, g, fp8)? {
            if let Some(plan) = self.plans.get_mut(&key) {
                plan.settled = true;
                self.changes += 1;
            }
        }
        Ok(())
    }

    /// The median time in ms of [`TUNE_REPS`] runs of `g` with `algo`, after one warm-up run.
    fn time_algo(
        &self,
        stream: &CudaStream,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        g: &Gemm,
    ) -> Result<f32> {
        let event = || {
            stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| anyhow!("cannot record a CUDA event: {e:?}"))
        };
        self.launch(stream, plan, algo, g)
            .map_err(|e| anyhow!("{}", status(e)))?;
        let mut events = vec![event()?];
        for _ in 0..TUNE_REPS {
            self.launch(stream, plan, algo, g)
                .map_err(|e| anyhow!("{}", status(e)))?;
            events.push(event()?);
        }
        let mut times = events
            .windows(2)
            .map(|w| w[0].elapsed_ms(&w[1]))
            .collect::<std::result::Result<Vec<f32>, _>>()
            .map_err(|e| anyhow!("timing a GEMM failed: {e:?}"))?;
        times.sort_by(f32::total_cmp);
        Ok(times[TUNE_REPS / 2])
    }

    /// Whether cuBLASLt has an algorithm for `g`'s shape, types and epilogue (the plan is built
    /// and cached on the way; a refusal is remembered too). Fused epilogues are not available
    /// for every shape, so callers ask before choosing them over separate kernels.
    pub fn supports(&mut self, g: &Gemm) -> bool {
        self.supports_scaled(g, None)
    }

    /// [`Lt::supports`] for `g` run as an FP8 GEMM with `fp8` (false also when it breaks
    /// cuBLASLt's FP8 rules, see [`Fp8Scales`]).
    pub fn supports_scaled(&mut self, g: &Gemm, fp8: Option<&Fp8Scales>) -> bool {
        let key = PlanKey::new(g, fp8);
        if fp8.is_some() && Self::check_fp8(&key).is_err() {
            return false;
        }
        if self.plans.contains_key(&key) {
            return true;
        }
        if self.refused.contains(&key) {
            return false;
        }
        match self.build_plan(&key) {
            Ok(plan) => {
                self.plans.insert(key, plan);
                self.changes += 1;
                true
            }
            Err(e) => {
                if self.tuning.log {
                    eprintln!("gemm tune: no plan for {key}: {e:#}");
                }
                self.refused.insert(key);
                self.changes += 1;
                false
            }
        }
    }

    /// Forgets `g`'s plan (as an FP8 GEMM with `fp8`) and refuses it from now on: for a GEMM
    /// that cuBLASLt planned but then would not run, so callers take their fallback instead.
    pub fn refuse(&mut self, g: &Gemm, fp8: Option<&Fp8Scales>) {
        let key = PlanKey::new(g, fp8);
        self.plans.remove(&key);
        self.refused.insert(key);
        self.changes += 1;
    }

    /// Builds the descriptor, layouts and algorithm for `key`.
    ///
    /// Row-major → column-major mapping. A row-major r×c matrix X with leading dimension c is,
    /// read column-major, the c×r matrix Xᵀ with ld = c. So the row-major product
    /// `C[m×n] = op(A)[m×k] · op(B)[k×n]`
    /// is, read column-major, Cᵀ[n×m] = op(B)ᵀ[n×k] · op(A)ᵀ[k×m]: cuBLASLt computes it with
    /// operands swapped (our b first, our a second) and problem size (n, m, k):
    /// - cuBLASLt A = our b. Not trans_b: b stored k×n (ld n) reads as bᵀ = op(B)ᵀ, n×k: OP_N,
    ///   layout rows n, cols k, ld n. trans_b: b stored n×k (ld k) reads as bᵀ (k×n), and
    ///   op(B)ᵀ = b = (bᵀ)ᵀ: OP_T, layout rows k, cols n, ld k.
    /// - cuBLASLt B = our a. Not trans_a: a stored m×k reads as aᵀ = op(A)ᵀ, k×m: OP_N, layout
    ///   rows k, cols m, ld k. trans_a: a stored k×m reads as aᵀ (m×k), op(A)ᵀ = a: OP_T,
    ///   layout rows m, cols k, ld m.
    /// - C = D = our out: stored m×n (ld n) reads as n×m, ld n.
    ///
    /// In short: each layout is the stored row-major shape reversed, ld = stored column count,
    /// and the transposes carry over (cuBLASLt TRANSA = trans_b, TRANSB = trans_a).
    /// The BIAS epilogue adds a vector of length rows(D) = n to every column of D, i.e. bias[n]
    /// to every row of the row-major out; the GELU auxiliary matrix has D's layout (ld n).
    /// to every row of the row-major out.
    fn build_plan(&self, key: &PlanKey) -> Result<Plan> {
        let err = |what: &str, e: result::CublasError| {
            anyhow!("cuBLASLt matmul {key}: {what} failed: {}", status(e))
        };
        let dim = |x: usize| -> Result<u64> {
            u64::try_from(x).map_err(|_| anyhow!("cuBLASLt matmul {key}: dimension too large"))
        };
        let ld = |x: usize| -> Result<i64> {
            i64::try_from(x)
                .map_err(|_| anyhow!("cuBLASLt matmul {key}: leading dimension too large"))
        };
        let (m, n, k) = (key.m, key.n, key.k);

        // Stored row-major shapes (rows, cols) of a, b, out.
        let (a_rows, a_cols) = if key.trans_a { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if key.trans_b { (n, k) } else { (k, n) };

        let mut plan = Plan::empty();
        plan.desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err("cublasLtMatmulDescCreate", e))?;

        let trans_lt_a = if key.trans_b {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        };
        let trans_lt_b = if key.trans_a {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        };
        let epilogue = key.epilogue.cuda();
        let bias_type = key.out_type.cuda();
        type Attr = sys::cublasLtMatmulDescAttributes_t;
        // SAFETY: desc is live; each attribute value is a local of the size passed, copied by
        // cuBLASLt during the call.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                Attr::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans_lt_a as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(|e| err("setting TRANSA", e))?;
            result::set_matmul_desc_attribute(
                plan.desc,
                Attr::CUBLASLT_MATMUL_DESC_TRANSB,
                &trans_lt_b as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(|e| err("setting TRANSB", e))?;
            result::set_matmul_desc_attribute(
                plan.desc,
                Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const sys::cublasLtEpilogue_t as *const c_void,
                size_of::<sys::cublasLtEpilogue_t>(),
            )
            .map_err(|e| err("setting the epilogue", e))?;
            if key.epilogue.has_vector() {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    Attr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &bias_type as *const sys::cudaDataType as *const c_void,
                    size_of::<sys::cudaDataType>(),
                )
                .map_err(|e| err("setting the bias data type", e))?;
            }
            if key.device_scales {
                // The heuristic must see a scaled FP8 problem (a null scale pointer means
                // "unscaled", which may select kernels that take no scales): any device address
                // stands in until each call sets the real ones.
                for attr in [
                    Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                    Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                ] {
                    result::set_matmul_desc_attribute(
                        plan.desc,
                        attr,
                        &self.workspace_ptr as *const u64 as *const c_void,
                        size_of::<u64>(),
                    )
                    .map_err(|e| err("setting a placeholder scale pointer", e))?;
                }
            }
            if key.scaled {
                let fast_accum = i8::from(key.fast_accum);
                result::set_matmul_desc_attribute(
                    plan.desc,
                    Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                    &fast_accum as *const i8 as *const c_void,
                    size_of::<i8>(),
                )
                .map_err(|e| err("setting FAST_ACCUM", e))?;
                if key.epilogue.has_aux() {
                    let aux_type = key.out_type.cuda();
                    result::set_matmul_desc_attribute(
                        plan.desc,
                        Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE,
                        &aux_type as *const sys::cudaDataType as *const c_void,
                        size_of::<sys::cudaDataType>(),
                    )
                    .map_err(|e| err("setting the epilogue matrix's data type", e))?;
                }
            }
            if key.epilogue.has_aux() {
                let aux_ld = ld(n)?;
                result::set_matmul_desc_attribute(
                    plan.desc,
                    Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &aux_ld as *const i64 as *const c_void,
                    size_of::<i64>(),
                )
                .map_err(|e| err("setting the epilogue matrix's leading dimension", e))?;
            }
        }

        // Column-major layouts: stored row-major (rows, cols) reversed, ld = stored cols.
        plan.lt_a_layout = result::create_matrix_layout(
            key.b_type.cuda(),
            dim(b_cols)?,
            dim(b_rows)?,
            ld(b_cols)?,
        )
        .map_err(|e| err("creating the layout of b", e))?;
        plan.lt_b_layout = result::create_matrix_layout(
            key.inputs.cuda(),
            dim(a_cols)?,
            dim(a_rows)?,
            ld(a_cols)?,
        )
        .map_err(|e| err("creating the layout of a", e))?;
        plan.d_layout = result::create_matrix_layout(key.out_type.cuda(), dim(n)?, dim(m)?, ld(n)?)
            .map_err(|e| err("creating the layout of out", e))?;

        // Heuristic: its candidates, best first, that fit in the workspace (only the first
        // without tuning).
        let requested = if self.tuning.enabled {
            TUNE_CANDIDATES
        } else {
            1
        };
        // SAFETY: `cublasLtMatmulHeuristicResult_t` is plain C data (zeroes are valid), written
        // by cuBLASLt; all handles are live; the array holds `requested` results.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = (0..requested)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let mut count: i32 = 0;
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc,
                plan.lt_a_layout,
                plan.lt_b_layout,
                plan.d_layout,
                plan.d_layout,
                self.pref,
                requested as i32,
                results.as_mut_ptr(),
                &mut count,
            )
        }
        .result()
        .map_err(|e| err("cublasLtMatmulAlgoGetHeuristic", e))?;
        let returned = &results[..(count.max(0) as usize).min(requested)];
        let first = returned.first().ok_or_else(|| {
            anyhow!(
                "cuBLASLt matmul {key}: no algorithm found by the heuristic \
                 (workspace limit {WORKSPACE_BYTES} bytes)"
            )
        })?;
        first
            .state
            .result()
            .map_err(|e| err("the heuristic's algorithm", e))?;
        plan.algo = first.algo;
        plan.candidates = returned
            .iter()
            .filter(|r| r.state.result().is_ok() && r.workspaceSize <= WORKSPACE_BYTES)
            .map(|r| r.algo)
            .collect();
        // Settled unless a timing is due: tuning off, or this plan's choice saved on disk and
        // still among the candidates (a different cuBLASLt or heuristic retunes it).
        plan.settled = !self.tuning.enabled;
        if let Some(saved) = self.tuning.saved.get(&format!("{key:?}")) {
            if let Some(algo) = plan.candidates.iter().find(|a| &a.data == saved) {
                plan.algo = *algo;
                plan.settled = true;
            }
        }
        Ok(plan)
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // Plans first (their descriptors), then the preference and the handle. The workspace
        // (a CudaSlice) is freed afterwards, stream-ordered, by its own Drop.
        self.plans.clear();
        // SAFETY: pref and handle were created in `new`, are owned by `self` only, and are
        // destroyed exactly once here. Errors are ignored in drop.
        unsafe {
            if !self.pref.is_null() {
                let _ = result::destroy_matmul_pref(self.pref);
            }
            if !self.handle.is_null() {
                let _ = result::destroy_handle(self.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_keeps_the_first_unless_a_candidate_beats_it_by_the_margin() {
        assert_eq!(choose(&[]), None);
        assert_eq!(choose(&[None, None]), None);
        assert_eq!(choose(&[Some(1.0), Some(0.99), Some(0.98)]), Some(0));
        assert_eq!(choose(&[Some(1.0), Some(0.9), Some(0.8), None]), Some(2));
        // A first that failed loses to any candidate that ran.
        assert_eq!(choose(&[None, Some(2.0), Some(1.5)]), Some(2));
    }

    #[test]
    fn choices_round_trip_through_their_file_and_skip_malformed_lines() {
        let mut choices = BTreeMap::new();
        choices.insert(
            "PlanKey { m: 1 }".to_string(),
            [1, 2, 3, 4, 5, 6, 7, u64::MAX],
        );
        choices.insert("PlanKey { m: 2 }".to_string(), [0; 8]);
        let text = format_choices(&choices);
        assert_eq!(parse_choices(&text), choices);
        let damaged = format!(
            "{text}no tab here\nPlanKey {{ m: 3 }}\t1 2 3\nPlanKey {{ m: 4 }}\t1 2 3 4 5 6 7 zz\n\
             PlanKey {{ m: 5 }}\t1 2 3 4 5 6 7 8 9\n"
        );
        assert_eq!(parse_choices(&damaged), choices);
    }

    #[test]
    fn choice_file_names_are_plain() {
        assert_eq!(
            choice_file_name("NVIDIA H100 80GB HBM3", 130100),
            "NVIDIA_H100_80GB_HBM3-cublaslt130100-ws32m.txt"
        );
    }

    #[test]
    fn byte_ranges_overlap_only_when_they_share_a_byte() {
        assert!(overlaps(0, 10, 9, 1));
        assert!(!overlaps(0, 10, 10, 5));
        assert!(!overlaps(10, 5, 0, 10));
        assert!(overlaps(256, 512, 0, 1024));
    }
}
