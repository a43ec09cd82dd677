//! The CUDA backend: [`Backend`] on an NVIDIA GPU.
//!
//! - Libraries are loaded at run time (cudarc with dynamic loading), so the same binary runs on
//!   machines without CUDA; [`CudaBackend::new`] checks for the driver, NVRTC and cuBLASLt before
//!   cudarc could panic, and says what is missing.
//! - Matrix products go through our cuBLASLt layer ([`cublaslt`]) with cached plans.
//! - FP8 linear layers (`fp8.rs`): FP8 casts with amax (`fp8.cu`) feeding cuBLASLt FP8 GEMMs.
//! - Every other op is a CUDA C kernel (`kernels.cu`, `attention.cu`) compiled by NVRTC for the
//!   device's architecture at first use and cached on disk, keyed by a hash of source, options and
//!   driver version. On Hopper the attention forward is `attention_wgmma.cu` and the backward
//!   `attention_wgmma_bwd.cu` (sm_90a, wgmma). Helpers shared by two sources live once in a
//!   `.cuh` that the `const`s below prepend to each (`elementwise_common.cuh`: kernels.cu and
//!   fp8.cu; `wgmma_common.cuh`: the two wgmma files).
//! - Buffers are raw device allocations tagged with their storage [`DType`]; kernels come in
//!   `_f32`, `_bf16` and `_f16` flavours, picked by the activations' dtype. Parameter gradients,
//!   optimizer state, LayerNorm statistics, log-sum-exps and losses are always f32.
//! - Unit scaling's op scales (weighted residual adds, GELU, attention and embedding scales,
//!   LayerNorm and bias gradient scales, GEMM `alpha`) are kernel arguments; the fused GELU
//!   epilogues run only where they compute the same thing (scale 1), the separate kernels
//!   otherwise. The FP8 casts read bf16 (the `fp8` recipe) and f16 (`fp8-unit`) tensors.
//! - Everything runs on one stream. No kernel uses floating-point atomics, so results are
//!   bitwise reproducible run to run.

mod cublaslt;
mod fp8;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::{linear_crossentropy_chunk, AdamW, AdamWTensor, Backend, GeluOut, GemmSpec};
use crate::numerics::{self, DType, TensorStats};
use cublaslt::{Epilogue, Gemm, GemmType, Lt};

/// Every source is prefixed with the helpers all share (`device_common.cuh`); kernels.cu and
/// fp8.cu also with those both use (`elementwise_common.cuh`).
const KERNELS_CU: &str = concat!(
    include_str!("device_common.cuh"),
    include_str!("elementwise_common.cuh"),
    include_str!("kernels.cu")
);
const ATTENTION_CU: &str = concat!(
    include_str!("device_common.cuh"),
    include_str!("attention.cu")
);
const FP8_CU: &str = concat!(
    include_str!("device_common.cuh"),
    include_str!("elementwise_common.cuh"),
    include_str!("fp8.cu")
);
/// Hopper-only (sm_90a, wgmma) attention forward and backward, compiled only on compute
/// capability 9.0; each is prefixed with the device helpers both use (`wgmma_common.cuh`).
const ATTENTION_WGMMA_CU: &str = concat!(
    include_str!("device_common.cuh"),
    include_str!("wgmma_common.cuh"),
    include_str!("attention_wgmma.cu")
);
const ATTENTION_WGMMA_BWD_CU: &str = concat!(
    include_str!("device_common.cuh"),
    include_str!("wgmma_common.cuh"),
    include_str!("attention_wgmma_bwd.cu")
);
/// The modules every GPU loads (name, source); the sm_90a ones above are optional.
const BASE_MODULES: [(&str, &str); 3] = [
    ("kernels", KERNELS_CU),
    ("attention", ATTENTION_CU),
    ("fp8", FP8_CU),
];

/// Dense peak FLOP/s of an H100 SXM (datasheet, without sparsity), used for MFU.
const H100_BF16_PEAK: f64 = 989.4e12;
const H100_F32_PEAK: f64 = 66.9e12;

/// Threads per block of the elementwise kernels (see the kernel ABI in kernels.cu).
const BLOCK: u32 = 256;

/// A device buffer: raw bytes holding `len` elements of `dtype`.
pub struct CudaBuf {
    dtype: DType,
    len: usize,
    mem: CudaSlice<u8>,
    live: Rc<Cell<u64>>,
    /// Zeros not yet written: [`Backend::zero`] only marks its buffers, and each buffer's first
    /// op either writes the zeros first ([`CudaBackend::ptr`]) or, writing every element,
    /// overwrites instead of accumulating ([`CudaBackend::ptr_first_write`]): the gradient
    /// memset of every step, saved.
    unzeroed: Cell<bool>,
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        self.live.set(self.live.get() - self.mem.len() as u64);
    }
}

/// A multi-tensor kernel's table: its contents on the host and its copy on the device.
type DeviceTable = (Vec<u8>, CudaSlice<u8>);

/// Token ids on the device, plus what the embedding backward needs: the positions of each
/// distinct token, bucketed on the host when the ids are uploaded (this makes the scatter-add
/// of the token-embedding gradient deterministic without atomics).
pub struct CudaTokens {
    ids: CudaSlice<u32>,
    host: Vec<u32>,
    bucket_tokens: CudaSlice<u32>,
    bucket_starts: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    /// How many of the buckets are in use (one value, on the device).
    num_buckets: CudaSlice<i32>,
}

/// The CUDA backend on one GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<Arc<CudaModule>>,
    functions: RefCell<HashMap<String, CudaFunction>>,
    lt: RefCell<Lt>,
    scratch: RefCell<Option<CudaSlice<u8>>>,
    /// Multi-tensor kernels' tables by kernel name: contents and device copy (see `table_ptr`).
    tables: RefCell<HashMap<String, DeviceTable>>,
    live: Rc<Cell<u64>>,
    peak: Cell<u64>,
    name: String,
    /// `HALFLING_CUDA_SYNC=1`: wait after every kernel, so a fault names the kernel that caused it.
    sync_each_launch: bool,
    /// Whether GEMMs may fuse the GELU and its derivative into cuBLASLt epilogues;
    /// `HALFLING_CUDA_FUSED_EPILOGUES=0` runs the separate kernels instead.
    fused_epilogues: bool,
    /// `HALFLING_CUDA_PROFILE=1`: events around every kernel and GEMM, summed by name.
    profile: Option<RefCell<Vec<(String, CudaEvent, CudaEvent)>>>,
    /// Scratch of the FP8 linear ops (`fp8.rs`).
    fp8: RefCell<fp8::Fp8Scratch>,
    /// Whether FP8 operands may run as FP8 GEMMs; `HALFLING_CUDA_FP8=0` runs them as bf16 GEMMs
    /// of the dequantized operands instead (same quantization, to compare).
    fp8_enabled: bool,
    /// Which FP8 GEMMs use cuBLASLt's fast accumulation (`HALFLING_CUDA_FP8_FAST_ACCUM`).
    fp8_fast_accum: fp8::FastAccum,
    /// `HALFLING_CUDA_FP8_SCALES=host`: FP8 GEMMs whose operands both have `Fixed` scales get
    /// them folded into `alpha` instead of cuBLASLt scale pointers (same result).
    fp8_host_scales: bool,
    /// Whether the Hopper attention forward (`attention_wgmma.cu`, wgmma, sm_90a) is loaded;
    /// `HALFLING_CUDA_WGMMA_ATTN=0` keeps attention.cu's mma.sync forward instead.
    wgmma_attention: bool,
    /// Whether f16 tensors (fp8-unit) take the tiled FP8 casts, fused bias gradient and kept
    /// copies as bf16 ones do (H100: fp8-unit at 0.91B 84.6 → 79.5 ms/step, +3.5 GB of kept
    /// copies); `HALFLING_CUDA_FP8_F16_TILED=0` takes the per-tensor `fp8_cast_f16` on every read.
    fp8_f16_tiled: bool,
    /// Whether FP8 casts may be kept for later GEMMs under the caller's `KeepToken`s;
    /// `HALFLING_CUDA_FP8_KEEP=0` casts every operand where it is read (less memory, to compare).
    fp8_keep: bool,
    /// Whether the MLP's FP8 backward applies the GELU derivative inside the up-projection's
    /// output-gradient cast (`fp8::DGeluCast`); `HALFLING_CUDA_FP8_DGELU_CAST=0` runs the
    /// separate in-place GELU backward instead (to compare).
    fp8_dgelu_cast: bool,
    /// Whether the MLP's FP8 forward applies GELU inside the down-projection's input cast
    /// (`fp8::CastOf::Gelu`), so the up-projection's GEMM writes only `pre`;
    /// `HALFLING_CUDA_FP8_GELU_CAST=0` runs the GELU epilogue and a plain cast instead (to
    /// compare).
    fp8_gelu_cast: bool,
    /// The Hopper attention backward (`attention_wgmma_bwd.cu`, wgmma, sm_90a) when loaded:
    /// `Some(v)` runs its tiling variant `v` where it applies; `None` (other GPUs, a failed
    /// build, `HALFLING_CUDA_WGMMA_ATTN=0` or `HALFLING_CUDA_ATTN_BWD=mma`) attention.cu's.
    wgmma_attention_bwd: Option<usize>,
    /// Streaming multiprocessors, for grids sized to one wave of resident blocks.
    sm_count: u32,
    /// Resident blocks per SM by (kernel, block size, dynamic shared bytes), from the driver.
    occupancy: RefCell<HashMap<(String, u32, u32), u32>>,
    /// Whether the LayerNorm backward runs as the one fused kernel where the width allows;
    /// `HALFLING_CUDA_LN_FUSED=0` runs the separate dinp and column-sum kernels (to compare).
    ln_fused: bool,
    /// [`Backend::zero`] defers its zeros to each buffer's first op (see `CudaBuf::unzeroed`),
    /// so the gradients' first writers overwrite them and the per-step memset goes;
    /// `HALFLING_CUDA_LAZY_ZERO=0` writes them at once (to compare).
    lazy_zero: bool,
    /// `HALFLING_CUDA_ATTN_QKV_BIAS=1` (opt-in until measured): the Hopper attention backward
    /// forms the QKV bias gradient's column sums as it stores dqkv, and the model hands it that
    /// bias ([`Backend::attention_forms_qkv_bias`]); otherwise the QKV linear forms it, as before.
    attn_qkv_bias: bool,
    /// Whether the model may record its training step as a CUDA graph and replay it
    /// ([`Backend::record_graph`]); off with `HALFLING_CUDA_GRAPHS=0`, `HALFLING_CUDA_PROFILE=1`
    /// or `HALFLING_CUDA_SYNC=1` (both time or wait per launch).
    graphs: bool,
    /// Set while `stream` records a graph: what cannot be recorded (allocation, upload,
    /// read-back, waiting) is refused then, with an error instead of a broken graph.
    recording: Cell<bool>,
    /// [`Backend::graph_epoch`]'s own part: bumped by every allocation, scratch growth and
    /// table upload (the GEMM plans keep their own count).
    memory_epoch: Cell<u64>,
}

/// A kernel argument: device pointers, ints, floats and 64-bit seeds.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    Int(i32),
    Float(f32),
    U64(u64),
}

/// Whether a usable CUDA driver and GPU are present (for `--device auto`).
pub fn cuda_available() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

/// An environment switch that is on unless set to "0" (the fast paths, off to compare).
fn env_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// An environment switch that is off unless set to "1" (diagnostics and opt-in paths).
fn env_opt_in(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// `$XDG_CACHE_HOME/halfling/<what>` (else `~/.cache/halfling/<what>`): where compiled kernels
/// and GEMM algorithm choices are kept between runs; `None` without either variable.
fn cache_dir(what: &str) -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("halfling").join(what))
}

fn gemm_type(dtype: DType) -> Result<GemmType> {
    match dtype {
        DType::F32 => Ok(GemmType::F32),
        DType::BF16 => Ok(GemmType::BF16),
        DType::F16 => Ok(GemmType::F16),
        other => bail!("the CUDA backend has no {other} matrix products yet (recipes fp32, bf16 and fp16 run on CUDA)"),
    }
}

/// [`Backend::casts_for_gemm`] of the CUDA backend: the FP8 casts of `fp8.cu` read bf16 and
/// f16 tensors; no other operand format is cast.
pub(crate) fn can_cast_for_gemm(tensors: DType, operand: DType) -> bool {
    !operand.is_float8() || matches!(tensors, DType::BF16 | DType::F16)
}

/// The one operand format of a GEMM without FP8 operands or amax slots (those go to `fp8.rs`):
/// the CUDA backend multiplies such operands as they are stored.
fn gemm_format(spec: GemmSpec) -> Result<DType> {
    let (a, b) = (spec.a.format, spec.b.format);
    if a != b {
        bail!("the CUDA backend has no mixed-format GEMMs ({a} x {b}) outside FP8");
    }
    Ok(a)
}

/// An op scale as a kernel argument: finite and non-zero (the attention backward divides by it).
fn op_scale(what: &str, scale: f32) -> Result<Arg> {
    if !scale.is_finite() || scale == 0.0 {
        bail!("internal error: {what} scale {scale} must be finite and non-zero");
    }
    Ok(Arg::Float(scale))
}

/// An amax buffer given to a GEMM whose operands record no amax (their specs name no slot, so
/// they reach this path): nothing to record, as on the CPU.
fn no_amax(amax: Option<&mut CudaBuf>) -> Result<()> {
    let _ = amax;
    Ok(())
}

/// Kernel-name suffix for buffers of `dtype`.
fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => bail!("the CUDA backend has no kernels for {other} activations yet (recipes fp32, bf16 and fp16 run on CUDA)"),
    }
}

fn int(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        anyhow!("tensor dimension {n} is too large for the CUDA kernels (max 2^31 - 1)")
    })
}

fn grid_for(n: usize) -> u32 {
    (n.div_ceil(BLOCK as usize)).clamp(1, 132 * 32) as u32
}

/// The directory holding the CUDA headers NVRTC needs (`cuda_bf16.h`).
fn cuda_include_dir() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("CUDA_INC") {
        candidates.push(dir.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            candidates.push(PathBuf::from(root).join("include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .ok_or_else(|| anyhow!("cannot find the CUDA headers (cuda_bf16.h) that NVRTC needs: set CUDA_HOME to your CUDA installation (or CUDA_INC to its include directory)"))
}

/// A compiled CUDA source as the driver loads it: PTX, which the driver compiles to the GPU's
/// machine code when loading (and keeps in its own cache), or a CUBIN, machine code NVRTC
/// already made for one exact architecture.
enum Image {
    Ptx(String),
    Cubin(Vec<u8>),
}

impl Image {
    fn loadable(self) -> cudarc::nvrtc::Ptx {
        match self {
            Image::Ptx(text) => cudarc::nvrtc::Ptx::from_src(text),
            Image::Cubin(bytes) => cudarc::nvrtc::Ptx::from_binary(bytes),
        }
    }
}

/// Compiles `source` for `arch` (to a CUBIN with `cubin`, else to PTX), or reads it from the
/// on-disk cache.
fn compile_cached(
    name: &str,
    source: &str,
    arch: &'static str,
    include: &std::path::Path,
    driver_version: i32,
    cubin: bool,
) -> Result<Image> {
    let options = nvrtc_options(arch, include);
    let key = ptx_cache_key(&[source, &options.join(" "), &driver_version.to_string()]);
    let cache_dir = cache_dir("ptx");
    let extension = if cubin { "cubin" } else { "ptx" };
    let cache_file = cache_dir
        .as_ref()
        .map(|d| d.join(format!("{name}-{key:016x}.{extension}")));
    let image = |bytes: Vec<u8>| -> Result<Image> {
        Ok(if cubin {
            Image::Cubin(bytes)
        } else {
            Image::Ptx(String::from_utf8(bytes)?)
        })
    };
    if let Some(Ok(bytes)) = cache_file.as_ref().map(std::fs::read) {
        if let Ok(cached) = image(bytes) {
            return Ok(cached);
        }
    }
    let bytes = if cubin {
        compile_cubin(name, source, arch, include)?
    } else {
        compile_ptx(name, source, arch, include)?.into_bytes()
    };
    if let (Some(dir), Some(path)) = (&cache_dir, &cache_file) {
        // The cache is an optimisation: failing to write it is not an error.
        if std::fs::create_dir_all(dir).is_ok() {
            let _ = crate::checkpoint::write_atomic(path, &bytes);
        }
    }
    image(bytes)
}

/// The NVRTC options every source is compiled with (also part of the cache key).
fn nvrtc_options(arch: &str, include: &std::path::Path) -> [String; 3] {
    [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        format!("--include-path={}", include.display()),
    ]
}

/// Compiles `source` (`name`.cu) with NVRTC to a CUBIN for the exact architecture `arch`
/// (`sm_90`, `sm_90a`, ...); needs no GPU.
fn compile_cubin(
    name: &str,
    source: &str,
    arch: &'static str,
    include: &std::path::Path,
) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let failed = |what: &str, e: &dyn std::fmt::Debug| anyhow!("NVRTC {what} {name}.cu: {e:?}");
    let src = std::ffi::CString::new(source).map_err(|e| failed("cannot read", &e))?;
    let file =
        std::ffi::CString::new(format!("{name}.cu")).map_err(|e| failed("cannot name", &e))?;
    let options = nvrtc_options(arch, include);
    let prog = result::create_program(&src, Some(&file)).map_err(|e| failed("cannot load", &e))?;
    // SAFETY: `prog` was created above and is destroyed once, below; the buffers passed are
    // sized as NVRTC reports.
    let cubin = unsafe {
        match result::compile_program(prog, &options) {
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut bytes = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast())
                            .result()
                            .map(|()| bytes)
                    })
                    .map_err(|e| failed("has no CUBIN for", &e))
            }
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(anyhow!("NVRTC could not compile {name}.cu: {e:?}\n{log}"))
            }
        }
    };
    // SAFETY: as above.
    let _ = unsafe { result::destroy_program(prog) };
    cubin
}

/// [`compile_cached`] for each `(name, source, arch)`, all at once (one thread each: NVRTC
/// compiles a program on the calling thread, and on a machine without the cache compiling the
/// sources one after another took minutes); results in the order given.
fn compile_all(
    sources: &[(&str, &str, &'static str)],
    include: &std::path::Path,
    driver_version: i32,
    cubin: bool,
) -> Vec<Result<Image>> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = sources
            .iter()
            .map(|&(name, source, arch)| {
                scope.spawn(move || {
                    compile_cached(name, source, arch, include, driver_version, cubin)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow!("internal error: a kernel compile panicked")))
            })
            .collect()
    })
}

/// Compiles `source` (`name`.cu) to PTX for `arch` with NVRTC; needs no GPU.
fn compile_ptx(
    name: &str,
    source: &str,
    arch: &'static str,
    include: &std::path::Path,
) -> Result<String> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options: vec!["-std=c++17".to_string()],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| anyhow!("NVRTC could not compile {name}.cu: {e:?}"))?;
    Ok(ptx.to_src())
}

/// FNV-1a over several strings (the PTX cache key).
fn ptx_cache_key(parts: &[&str]) -> u64 {
    let mut joined = Vec::new();
    for p in parts {
        joined.extend_from_slice(p.as_bytes());
        joined.push(0);
    }
    crate::data::fnv1a64(&joined)
}

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "sm_90",
        (8, 9) => "sm_89",
        (8, 6) => "sm_86",
        (8, 0) => "sm_80",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => "sm_80",
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads) the kernels and creates the cuBLASLt handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: these only try to dlopen the libraries; cudarc panics on first use otherwise.
        unsafe {
            if !cudarc::driver::sys::is_culib_present() {
                bail!("--device cuda: no NVIDIA driver found (libcuda.so.1 could not be loaded); install the driver or use --device cpu");
            }
            if !cudarc::nvrtc::sys::is_culib_present() {
                bail!("--device cuda: NVRTC (libnvrtc.so) could not be loaded; install the CUDA toolkit or add its lib directory to LD_LIBRARY_PATH (see README)");
            }
            if !cudarc::cublaslt::sys::is_culib_present() {
                bail!("--device cuda: cuBLASLt (libcublasLt.so) could not be loaded; install the CUDA toolkit or add its lib directory to LD_LIBRARY_PATH (see README)");
            }
        }
        let count = CudaContext::device_count()
            .map_err(|e| anyhow!("--device cuda: the CUDA driver failed to start ({e:?})"))?;
        if count <= 0 {
            bail!("--device cuda: no CUDA GPU found; use --device cpu");
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open GPU {ordinal}: {e:?}"))?;
        // One stream, ordered work: cudarc's per-buffer event tracking is not needed.
        // SAFETY: all work is issued on `stream`, so no cross-stream synchronisation is lost.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream, which cannot record graphs.
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("cannot create a CUDA stream on GPU {ordinal}: {e:?}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("cannot query the GPU: {e:?}"))?;
        if major < 8 {
            bail!("GPU {ordinal} has compute capability {major}.{minor}; halfling's CUDA backend needs 8.0 or newer (bf16)");
        }
        let name = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        let include = cuda_include_dir()?;
        let mut driver_version = 0i32;
        // SAFETY: the driver library is loaded (checked above); the out-pointer is valid.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        let arch = arch_name(major, minor);
        // The wgmma attention kernels need the sm_90a target (compute capability 9.0 exactly).
        // They are an optional fast path: where NVRTC or the driver cannot build them,
        // attention.cu's kernels run. The backward is a separate module (its tiling variants).
        let wgmma_wanted = (major, minor) == (9, 0) && env_on("HALFLING_CUDA_WGMMA_ATTN");
        let bwd_variant = attention::sm90_choice()?.filter(|_| wgmma_wanted);
        let mut sources: Vec<(&str, &str, &'static str)> =
            BASE_MODULES.iter().map(|&(f, s)| (f, s, arch)).collect();
        if wgmma_wanted {
            sources.push(("attention_wgmma", ATTENTION_WGMMA_CU, "sm_90a"));
        }
        if bwd_variant.is_some() {
            sources.push(("attention_wgmma_bwd", ATTENTION_WGMMA_BWD_CU, "sm_90a"));
        }
        // `HALFLING_CUDA_CUBIN=1` (opt-in until run on a GPU): NVRTC makes the machine code
        // itself, in the compile threads, instead of the driver compiling PTX one module after
        // another at load (most of a first run's start-up). Only for an exact architecture
        // (the PTX of a fallback one still runs on newer GPUs; its CUBIN would not).
        let cubin = env_opt_in("HALFLING_CUDA_CUBIN") && arch == format!("sm_{major}{minor}");
        let mut compiled = compile_all(&sources, &include, driver_version, cubin).into_iter();
        let mut modules = Vec::new();
        for (file, _) in BASE_MODULES {
            let image = compiled
                .next()
                .ok_or_else(|| anyhow!("internal error: {file}.cu was not compiled"))??;
            let module = ctx
                .load_module(image.loadable())
                .map_err(|e| anyhow!("cannot load the compiled {file}.cu on the GPU: {e:?}"))?;
            modules.push(module);
        }
        // An optional module: loaded if it compiled and the driver takes it.
        let mut load_optional = |image: Option<Result<Image>>| {
            image
                .and_then(|image| image.ok())
                .and_then(|image| ctx.load_module(image.loadable()).ok())
                .map(|m| modules.push(m))
                .is_some()
        };
        let wgmma_attention = wgmma_wanted && load_optional(compiled.next());
        let wgmma_attention_bwd = bwd_variant.filter(|_| load_optional(compiled.next()));
        let lt = Lt::new(&stream)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| anyhow!("cannot query the GPU: {e:?}"))?
            .max(1) as u32;
        Ok(Self {
            ctx,
            stream,
            modules,
            functions: RefCell::new(HashMap::new()),
            lt: RefCell::new(lt),
            scratch: RefCell::new(None),
            tables: RefCell::new(HashMap::new()),
            live: Rc::new(Cell::new(0)),
            peak: Cell::new(0),
            name: format!("cuda:{ordinal} ({name})"),
            sync_each_launch: env_opt_in("HALFLING_CUDA_SYNC"),
            fused_epilogues: env_on("HALFLING_CUDA_FUSED_EPILOGUES"),
            profile: env_opt_in("HALFLING_CUDA_PROFILE").then(|| RefCell::new(Vec::new())),
            fp8: RefCell::new(fp8::Fp8Scratch::default()),
            fp8_enabled: env_on("HALFLING_CUDA_FP8"),
            fp8_fast_accum: fp8::FastAccum::from_env(),
            fp8_host_scales: std::env::var("HALFLING_CUDA_FP8_SCALES").is_ok_and(|v| v == "host"),
            wgmma_attention,
            fp8_f16_tiled: env_on("HALFLING_CUDA_FP8_F16_TILED"),
            fp8_keep: env_on("HALFLING_CUDA_FP8_KEEP"),
            fp8_dgelu_cast: env_on("HALFLING_CUDA_FP8_DGELU_CAST"),
            fp8_gelu_cast: env_on("HALFLING_CUDA_FP8_GELU_CAST"),
            wgmma_attention_bwd,
            sm_count,
            occupancy: RefCell::new(HashMap::new()),
            ln_fused: env_on("HALFLING_CUDA_LN_FUSED"),
            lazy_zero: env_on("HALFLING_CUDA_LAZY_ZERO"),
            attn_qkv_bias: env_opt_in("HALFLING_CUDA_ATTN_QKV_BIAS"),
            graphs: env_on("HALFLING_CUDA_GRAPHS")
                && !env_opt_in("HALFLING_CUDA_PROFILE")
                && !env_opt_in("HALFLING_CUDA_SYNC"),
            recording: Cell::new(false),
            memory_epoch: Cell::new(0),
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.borrow().get(name) {
            return Ok(f.clone());
        }
        let f = self
            .modules
            .iter()
            .find_map(|m| m.load_function(name).ok())
            .ok_or_else(|| {
                anyhow!("internal error: kernel {name} is missing from the compiled CUDA sources")
            })?;
        self.functions
            .borrow_mut()
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_as(name, None, grid, block, shared, args)
    }

    /// Blocks of `name` (with `block` threads and `shared` dynamic shared bytes) that fit on the
    /// whole GPU at once (at least 1).
    fn resident_blocks(&self, name: &str, block: u32, shared: u32) -> Result<usize> {
        let key = (name.to_string(), block, shared);
        if let Some(&n) = self.occupancy.borrow().get(&key) {
            return Ok(n as usize * self.sm_count as usize);
        }
        let f = self.function(name)?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(block, shared as usize, None)
            .map_err(|e| anyhow!("kernel {name}: cannot query its occupancy: {e:?}"))?
            .max(1);
        self.occupancy.borrow_mut().insert(key, per_sm);
        Ok(per_sm as usize * self.sm_count as usize)
    }

    /// [`CudaBackend::launch`], profiled under `label` (the kernel's name if `None`).
    fn launch_as(
        &self,
        name: &str,
        label: Option<&str>,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.function(name)?;
        if shared > 48 * 1024 {
            f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)
                .map_err(|e| anyhow!("kernel {name}: cannot raise shared memory to {shared} bytes: {e:?}"))?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                Arg::Int(i) => b.arg(i),
                Arg::Float(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        let start = self.profile_event()?;
        // SAFETY: argument lists follow the kernel ABI documented in the .cu files, and every
        // pointer is a live allocation of at least the size the kernel indexes.
        unsafe { b.launch(cfg) }
            .map_err(|e| anyhow!("CUDA kernel {name} failed to launch: {e:?}"))?;
        self.profile_record(label.unwrap_or(name), start)?;
        if self.sync_each_launch {
            self.stream
                .synchronize()
                .map_err(|e| anyhow!("CUDA kernel {name} {grid:?}x{block} failed: {e:?}"))?;
        }
        Ok(())
    }

    /// A cuBLASLt product on our stream.
    fn gemm(&self, g: Gemm) -> Result<()> {
        let Gemm {
            m,
            n,
            k,
            inputs,
            out_type,
            epilogue,
            ..
        } = g;
        self.tune_gemm(&g, None)?;
        let start = self.profile_event()?;
        self.lt.borrow_mut().matmul(&self.stream, &g)?;
        if start.is_some() {
            let tag = epilogue.profile_tag();
            let label = format!("gemm {m}x{n}x{k} {inputs:?}->{out_type:?}{tag}");
            self.profile_record(&label, start)?;
        }
        if self.sync_each_launch {
            self.stream
                .synchronize()
                .map_err(|e| anyhow!("cuBLASLt matmul {m}x{n}x{k} failed: {e:?}"))?;
        }
        Ok(())
    }

    /// Chooses `g`'s cuBLASLt algorithm by timing at its plan's first call (`Lt::tune`; nothing
    /// to do afterwards). Where rerunning `g` in place would change its result, the timing runs
    /// write a scratch output from [`Backend::alloc`], so the peak memory reported counts it;
    /// it is freed after. If that allocation fails the plan keeps the heuristic's first answer.
    fn tune_gemm(&self, g: &Gemm, f: Option<&cublaslt::Fp8Scales>) -> Result<()> {
        let Some(bytes) = self.lt.borrow_mut().tune_need(&self.stream, g, f) else {
            return Ok(());
        };
        let scratch = if bytes > 0 {
            match self.alloc(DType::F32, bytes.div_ceil(4)) {
                Ok(buf) => Some(buf),
                Err(_) => return self.lt.borrow_mut().settle(&self.stream, g, f),
            }
        } else {
            None
        };
        let out = scratch.as_ref().map(|buf| self.ptr(buf)).transpose()?;
        self.lt.borrow_mut().tune(&self.stream, g, f, out)
    }

    /// Whether `g`'s fused epilogue can run (cuBLASLt has an algorithm for it and the matrices
    /// fit its rules); otherwise the caller runs the separate kernels instead.
    /// `HALFLING_CUDA_FUSED_EPILOGUES=0` turns fusion off, to compare the two paths.
    fn fusable(&self, g: &Gemm) -> bool {
        // The GELU input matrix's leading dimension (n) must be a multiple of 8. DGELU is fused
        // only at alpha = 1, the case selftest checks (unit scaling's alpha runs unfused; so does
        // a GELU scale other than 1, which no epilogue applies: the callers check that).
        let aux_ok = match g.epilogue {
            Epilogue::GeluAux { .. } => g.n % 8 == 0,
            Epilogue::DGelu { .. } => g.n % 8 == 0 && g.alpha == 1.0,
            _ => true,
        };
        self.fused_epilogues && aux_ok && self.lt.borrow_mut().supports(g)
    }

    /// A timing event recorded now, when profiling.
    fn profile_event(&self) -> Result<Option<CudaEvent>> {
        match &self.profile {
            Some(_) => Ok(Some(
                self.stream
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| anyhow!("cannot record a CUDA event: {e:?}"))?,
            )),
            None => Ok(None),
        }
    }

    fn profile_record(&self, name: &str, start: Option<CudaEvent>) -> Result<()> {
        if let (Some(log), Some(start)) = (&self.profile, start) {
            let end = self
                .profile_event()?
                .ok_or_else(|| anyhow!("internal error: profiling event"))?;
            log.borrow_mut().push((name.to_string(), start, end));
        }
        Ok(())
    }

    /// `buf`'s device address as an identity only (cache lookups): nothing reads or writes it,
    /// so deferred zeros stay deferred.
    fn address(&self, buf: &CudaBuf) -> u64 {
        let (p, _sync) = buf.mem.device_ptr(&self.stream);
        p
    }

    /// `buf`'s device address for an op that reads it (or accumulates into it): a buffer
    /// [`Backend::zero`] left unzeroed gets its zeros first.
    fn ptr(&self, buf: &CudaBuf) -> Result<u64> {
        let (p, _sync) = buf.mem.device_ptr(&self.stream);
        self.write_deferred_zeros(&buf.unzeroed, p, buf.mem.len())?;
        Ok(p)
    }

    /// [`CudaBackend::ptr`] for an op that writes `buf`.
    fn ptr_mut(&self, buf: &mut CudaBuf) -> Result<u64> {
        let bytes = buf.mem.len();
        let (p, _sync) = buf.mem.device_ptr_mut(&self.stream);
        self.write_deferred_zeros(&buf.unzeroed, p, bytes)?;
        Ok(p)
    }

    /// `buf`'s device address for an op that writes every element, and whether it must
    /// overwrite instead of accumulate (true where [`Backend::zero`] left the buffer unzeroed:
    /// the op stands in for the zeros, which are never written).
    fn ptr_first_write(&self, buf: &mut CudaBuf) -> (u64, bool) {
        let (p, _sync) = buf.mem.device_ptr_mut(&self.stream);
        (p, buf.unzeroed.replace(false))
    }

    /// Writes the zeros [`Backend::zero`] deferred (`unzeroed`) for the `bytes` at device
    /// address `p`, if any.
    fn write_deferred_zeros(&self, unzeroed: &Cell<bool>, p: u64, bytes: usize) -> Result<()> {
        if unzeroed.replace(false) {
            // SAFETY: p is a live allocation of `bytes` bytes; the memset is ordered on our
            // stream before the op that asked for the address.
            unsafe {
                cudarc::driver::result::memset_d8_async(p, 0, bytes, self.stream.cu_stream())
            }
            .map_err(|e| anyhow!("zeroing a GPU buffer failed: {e:?}"))?;
        }
        Ok(())
    }

    /// The device address of a multi-tensor kernel's table with contents `bytes`, uploaded only
    /// when they differ from the last table of that kernel: a model's tensors never move, so a
    /// training run uploads each table once. The upload is ordered on the stream after earlier
    /// launches that read the old contents.
    fn table_ptr(&self, kernel: &str, bytes: &[u8]) -> Result<u64> {
        let mut tables = self.tables.borrow_mut();
        if let Some((cached, mem)) = tables.get(kernel) {
            if cached.as_slice() == bytes {
                let (p, _sync) = mem.device_ptr(&self.stream);
                return Ok(p);
            }
        }
        self.new_device_memory("a kernel table upload")?;
        let mut mem = match tables.remove(kernel) {
            Some((_, mem)) if mem.len() >= bytes.len() => mem,
            _ => self
                .stream
                .alloc_zeros::<u8>(bytes.len().max(1))
                .map_err(|e| oom(e, bytes.len(), self.live.get()))?,
        };
        self.stream
            .memcpy_htod(bytes, &mut mem.slice_mut(..bytes.len()))
            .map_err(|e| anyhow!("upload to the GPU failed: {e:?}"))?;
        let p = {
            let (p, _sync) = mem.device_ptr(&self.stream);
            p
        };
        tables.insert(kernel.to_string(), (bytes.to_vec(), mem));
        Ok(p)
    }

    /// `dropout_T` from `x` into `out` (the same address in place) over `n` elements.
    #[allow(clippy::too_many_arguments)]
    fn dropout_launch(
        &self,
        out: u64,
        x: u64,
        n: usize,
        dtype: DType,
        p: f32,
        seed: &CudaSlice<u64>,
        site: u64,
    ) -> Result<()> {
        let (ps, _sync) = seed.device_ptr(&self.stream);
        self.elementwise(
            &format!("dropout_{}", suffix(dtype)?),
            n,
            &[
                Arg::Ptr(out),
                Arg::Ptr(x),
                Arg::Float(p),
                Arg::Ptr(ps),
                Arg::U64(site),
                Arg::Int(int(n)?),
            ],
        )
    }

    /// An internal error if `stream` is recording a graph: `what` would not be recorded (or
    /// would break the recording), so the step's code must not do it then.
    fn refuse_while_recording(&self, what: &str) -> Result<()> {
        if self.recording.get() {
            bail!("internal error: {what} while recording a CUDA graph (HALFLING_CUDA_GRAPHS=0 runs without graphs)");
        }
        Ok(())
    }

    /// Before `what` places device memory a recorded graph may come to address: refused while
    /// recording, and a new [`Backend::graph_epoch`] after.
    fn new_device_memory(&self, what: &str) -> Result<()> {
        self.refuse_while_recording(what)?;
        self.memory_epoch.set(self.memory_epoch.get() + 1);
        Ok(())
    }

    /// A scratch area of at least `bytes`, grown (never shrunk) on demand.
    fn scratch_ptr(&self, bytes: usize) -> Result<u64> {
        let mut scratch = self.scratch.borrow_mut();
        if scratch.as_ref().map_or(true, |s| s.len() < bytes) {
            self.new_device_memory("growing the scratch area")?;
            let mem = self
                .stream
                .alloc_zeros::<u8>(bytes.max(1 << 20))
                .map_err(|e| oom(e, bytes, self.live.get()))?;
            *scratch = Some(mem);
        }
        let s = scratch
            .as_ref()
            .ok_or_else(|| anyhow!("internal error: no scratch"))?;
        let (p, _sync) = s.device_ptr(&self.stream);
        Ok(p)
    }

    fn expect(&self, what: &str, buf: &CudaBuf, dtype: DType, len: usize) -> Result<()> {
        if buf.dtype != dtype || buf.len != len {
            bail!(
                "internal error: {what} is {} x {}, the op expects {dtype} x {len}",
                buf.dtype,
                buf.len
            );
        }
        Ok(())
    }

    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, (grid_for(n), 1, 1), BLOCK, 0, args)
    }

    /// `layernorm_forward_T` on rows `x` (made first as `add.2·add.0 + add.3·add.1` when given).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward_launch(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: u64,
        add: Option<(u64, u64, f32, f32)>,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let t = out.dtype;
        self.expect("layernorm output", out, t, n * c)?;
        self.expect("layernorm weight", weight, t, c)?;
        self.expect("layernorm bias", bias, t, c)?;
        self.expect("layernorm mean", mean, DType::F32, n)?;
        self.expect("layernorm rstd", rstd, DType::F32, n)?;
        let (add_a, add_b, sa, sb) = add.unwrap_or((0, 0, 1.0, 1.0));
        let (pw, pb) = (self.ptr(weight)?, self.ptr(bias)?);
        let (pm, pr) = (self.ptr_mut(mean)?, self.ptr_mut(rstd)?);
        let po = self.ptr_mut(out)?;
        // One warp per row, 8 rows per block.
        self.launch(
            &format!("layernorm_forward_{}", suffix(t)?),
            (block_index(n.div_ceil(8))?, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(po),
                Arg::Ptr(pm),
                Arg::Ptr(pr),
                Arg::Ptr(x),
                Arg::Ptr(add_a),
                Arg::Ptr(add_b),
                op_scale("residual", sa)?,
                op_scale("residual", sb)?,
                Arg::Ptr(pw),
                Arg::Ptr(pb),
                Arg::Int(int(n)?),
                Arg::Int(int(c)?),
            ],
        )
    }

    /// Column sums of `dout[n, oc]` times `scale` added into `dbias` (f32), deterministically in
    /// two passes.
    fn bias_backward(
        &self,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        n: usize,
        oc: usize,
        scale: f32,
    ) -> Result<()> {
        self.expect("bias gradient", dbias, DType::F32, oc)?;
        let (grid, rows_per_block) = column_sums_grid(n, oc)?;
        let g = grid.1 as usize;
        let partials = self.scratch_ptr(g * oc * 4)?;
        let sfx = suffix(dout.dtype)?;
        self.launch(
            &format!("bias_backward_partial_{sfx}"),
            grid,
            BLOCK,
            0,
            &[
                Arg::Ptr(partials),
                Arg::Ptr(self.ptr(dout)?),
                Arg::Int(int(n)?),
                Arg::Int(int(oc)?),
                Arg::Int(int(rows_per_block)?),
            ],
        )?;
        self.bias_backward_reduce(dbias, partials, g, oc, scale)
    }

    /// `dbias[oc] += scale · Σ_g partials[g, oc]` (f32 partial rows, summed in a fixed order;
    /// `=` where `dbias`'s zeros were deferred).
    fn bias_backward_reduce(
        &self,
        dbias: &mut CudaBuf,
        partials: u64,
        g: usize,
        oc: usize,
        scale: f32,
    ) -> Result<()> {
        self.expect("bias gradient", dbias, DType::F32, oc)?;
        let (db, overwrite) = self.ptr_first_write(dbias);
        // LayerNorm's reduce with one output.
        self.launch(
            "column_sums_reduce",
            (oc.div_ceil(32) as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(db),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(partials),
                op_scale("bias gradient", scale)?,
                Arg::Float(1.0),
                Arg::Int(int(g)?),
                Arg::Int(int(oc)?),
                Arg::Int(1),
                Arg::Int(i32::from(overwrite)),
            ],
        )
    }
}

/// The rows one classifier launch works on: device addresses of their losses (f32), logits and
/// targets (u32), and how many there are.
struct ClassifierRows {
    losses: u64,
    logits: u64,
    targets: u64,
    n: usize,
}

impl CudaBackend {
    /// The fused classifier over `rows`: losses only (`dloss = None`) or losses and the logit
    /// gradient in place of the logits.
    fn classifier_launch(
        &self,
        rows: ClassifierRows,
        dtype: DType,
        v: usize,
        vp: usize,
        dloss: Option<f32>,
    ) -> Result<()> {
        let mut args = vec![
            Arg::Ptr(rows.losses),
            Arg::Ptr(rows.logits),
            Arg::Ptr(rows.targets),
            Arg::Int(int(rows.n)?),
            Arg::Int(int(v)?),
            Arg::Int(int(vp)?),
        ];
        let sfx = suffix(dtype)?;
        match dloss {
            Some(d) => {
                args.push(Arg::Float(d));
                let name = format!("crossentropy_forward_backward_{sfx}");
                self.launch(&name, (block_index(rows.n)?, 1, 1), CE_THREADS, 0, &args)
            }
            None => {
                let name = format!("crossentropy_forward_{sfx}");
                self.launch(&name, (block_index(rows.n)?, 1, 1), CE_THREADS, 0, &args)
            }
        }
    }
}

/// Threads of a classifier block (one row each; kernels.cu's launch bounds).
const CE_THREADS: u32 = 512;

/// The largest chunk of at most `rows` rows (of `row_bytes` each) whose every start is a row
/// cuBLASLt may begin an operand at (256-byte aligned; see `cublaslt::REQUIRED_ALIGN`), or all
/// `n` rows when the chunk covers them.
fn aligned_rows(rows: usize, n: usize, row_bytes: usize) -> Result<usize> {
    if rows >= n {
        return Ok(n.max(1));
    }
    let (mut a, mut b) = (row_bytes, 256);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let granule = 256 / a;
    if rows < granule {
        bail!("internal error: a logits chunk of {rows} rows is below the {granule} rows that keep chunks 256-byte aligned");
    }
    Ok(rows / granule * granule)
}

fn oom(e: cudarc::driver::DriverError, bytes: usize, live: u64) -> anyhow::Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        anyhow!(
            "out of GPU memory allocating {} MiB ({} MiB already in use by halfling): lower train.batch_size (and raise train.grad_accum to keep the batch) or use a smaller model",
            bytes >> 20,
            live >> 20
        )
    } else {
        anyhow!("GPU allocation of {bytes} bytes failed: {e:?}")
    }
}

/// Buckets of equal token ids: (distinct tokens, CSR starts, positions), ids ascending and
/// positions ascending within a bucket. A counting sort over the id range (linear in the batch
/// and the vocabulary): this runs on the host before every training micro-batch, with the
/// device idle when the step before has been waited for.
fn token_buckets(ids: &[u32]) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
    let range = ids.iter().max().map_or(0, |&m| m as usize + 1);
    let mut next = vec![0i32; range];
    for &t in ids {
        next[t as usize] += 1;
    }
    let (mut tokens, mut starts) = (Vec::new(), Vec::new());
    let mut start = 0i32;
    for (t, slot) in next.iter_mut().enumerate() {
        let count = *slot;
        if count > 0 {
            tokens.push(t as u32);
            starts.push(start);
        }
        *slot = start;
        start += count;
    }
    starts.push(start);
    let mut order = vec![0i32; ids.len()];
    for (p, &t) in ids.iter().enumerate() {
        let slot = &mut next[t as usize];
        order[*slot as usize] = p as i32;
        *slot += 1;
    }
    (tokens, starts, order)
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Tokens = CudaTokens;
    type Graph = CudaGraph;
    type Seed = CudaSlice<u64>;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn kind(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        self.new_device_memory("an allocation")?;
        let bytes = len * dtype.size_bytes();
        let mem = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| oom(e, bytes, self.live.get()))?;
        self.live.set(self.live.get() + mem.len() as u64);
        self.peak.set(self.peak.get().max(self.live.get()));
        Ok(CudaBuf {
            dtype,
            len,
            mem,
            live: self.live.clone(),
            unzeroed: Cell::new(false),
        })
    }

    fn alloc_tokens(&self, len: usize) -> Result<CudaTokens> {
        self.new_device_memory("an allocation")?;
        let z = |n: usize| {
            self.stream
                .alloc_zeros::<i32>(n.max(1))
                .map_err(|e| oom(e, n * 4, self.live.get()))
        };
        Ok(CudaTokens {
            ids: self
                .stream
                .alloc_zeros::<u32>(len.max(1))
                .map_err(|e| oom(e, len * 4, self.live.get()))?,
            host: vec![0; len],
            bucket_tokens: self
                .stream
                .alloc_zeros::<u32>(len.max(1))
                .map_err(|e| oom(e, len * 4, self.live.get()))?,
            bucket_starts: z(len + 1)?,
            positions: z(len)?,
            num_buckets: z(1)?,
        })
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn dtype(&self, buf: &CudaBuf) -> DType {
        buf.dtype
    }

    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        self.refuse_while_recording("an upload")?;
        if src.len() != dst.len {
            bail!(
                "internal error: upload of {} values into a buffer of {}",
                src.len(),
                dst.len
            );
        }
        let bytes = numerics::encode(dst.dtype, src);
        self.ptr_mut(dst)?; // deferred zeros first: the copy may not cover the allocation
        self.stream
            .memcpy_htod(&bytes, &mut dst.mem.slice_mut(..bytes.len()))
            .map_err(|e| anyhow!("upload to the GPU failed: {e:?}"))?;
        Ok(())
    }

    fn upload_tokens(&self, dst: &mut CudaTokens, src: &[u32]) -> Result<()> {
        self.refuse_while_recording("an upload")?;
        if src.len() != dst.host.len() {
            bail!(
                "internal error: token upload of {} ids into {}",
                src.len(),
                dst.host.len()
            );
        }
        dst.host.copy_from_slice(src);
        let err = |e| anyhow!("token upload to the GPU failed: {e:?}");
        self.stream
            .memcpy_htod(
                src,
                &mut dst.ids.slice_mut(..src.len().max(1).min(dst.ids.len())),
            )
            .map_err(err)?;
        let (tokens, starts, positions) = token_buckets(src);
        // The count goes to the device too: the backward's grid is the capacity, so a
        // recorded step replays over any batch's buckets.
        self.stream
            .memcpy_htod(&[int(tokens.len())?], &mut dst.num_buckets)
            .map_err(err)?;
        if !tokens.is_empty() {
            self.stream
                .memcpy_htod(&tokens, &mut dst.bucket_tokens.slice_mut(..tokens.len()))
                .map_err(err)?;
            self.stream
                .memcpy_htod(&starts, &mut dst.bucket_starts.slice_mut(..starts.len()))
                .map_err(err)?;
            self.stream
                .memcpy_htod(&positions, &mut dst.positions.slice_mut(..positions.len()))
                .map_err(err)?;
        }
        Ok(())
    }

    fn alloc_seed(&self) -> Result<CudaSlice<u64>> {
        self.new_device_memory("an allocation")?;
        self.stream
            .alloc_zeros::<u64>(1)
            .map_err(|e| oom(e, 8, self.live.get()))
    }

    fn upload_seed(&self, dst: &mut CudaSlice<u64>, seed: u64) -> Result<()> {
        self.refuse_while_recording("an upload")?;
        self.stream
            .memcpy_htod(&[seed], dst)
            .map_err(|e| anyhow!("seed upload to the GPU failed: {e:?}"))
    }

    fn download_range(&self, src: &CudaBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        if offset + len > src.len {
            bail!(
                "internal error: download of {offset}+{len} from {}",
                src.len
            );
        }
        self.refuse_while_recording("a read-back")?;
        let size = src.dtype.size_bytes();
        let mut bytes = vec![0u8; len * size];
        self.ptr(src)?; // deferred zeros first
        self.stream
            .memcpy_dtoh(
                &src.mem.slice(offset * size..(offset + len) * size),
                &mut bytes,
            )
            .map_err(|e| anyhow!("download from the GPU failed: {e:?}"))?;
        numerics::decode(src.dtype, &bytes)
    }

    fn synchronize(&self) -> Result<()> {
        self.refuse_while_recording("waiting for the GPU")?;
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("a CUDA kernel failed: {e:?}"))
    }

    fn peak_mem_bytes(&self) -> u64 {
        self.peak.get()
    }

    fn supports(&self, dtype: DType) -> bool {
        // FP8 is a GEMM operand format here (cast from bf16 or f16 tensors by the linear ops).
        matches!(
            dtype,
            DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    fn tensor_stats(&self, bufs: &[&CudaBuf]) -> Result<Vec<TensorStats>> {
        // One launch per storage format over a table of the buffers; block b writes the
        // statistics of its chunk to partial slot b (`StatsPartial` in kernels.cu, 32 bytes);
        // one read-back; each tensor's partials are combined in block order (deterministic).
        const PARTIAL: usize = 32;
        let mut formats: Vec<DType> = bufs.iter().map(|b| b.dtype).collect();
        formats.sort_by_key(|d| d.to_string());
        formats.dedup();
        let mut first_slot = vec![0usize; bufs.len()];
        let mut launches = Vec::new();
        let mut slots = 0usize;
        for &dtype in &formats {
            let members: Vec<usize> = (0..bufs.len())
                .filter(|&i| bufs[i].dtype == dtype)
                .collect();
            let rows = members
                .iter()
                .map(|&i| Ok((self.ptr(bufs[i])?, bufs[i].len)))
                .collect::<Result<Vec<_>>>()?;
            let (table, blocks) = tensor_table(rows.into_iter(), MT_CHUNK)?;
            // The same block layout as `tensor_table`: each tensor's chunks in order.
            let mut next = slots;
            for &i in &members {
                first_slot[i] = next;
                next += bufs[i].len.div_ceil(MT_CHUNK);
            }
            launches.push((dtype, table, slots, blocks));
            slots += blocks;
        }
        let mut host = vec![0u8; slots * PARTIAL];
        if slots > 0 {
            let partials = self.scratch_ptr(slots * PARTIAL)?;
            for (dtype, table, slot, blocks) in launches {
                if blocks == 0 {
                    continue;
                }
                let name = format!("tensor_stats_multi_{}", suffix(dtype)?);
                let rows = table.len() / 24;
                let table = self.table_ptr(&name, &table)?;
                self.launch(
                    &name,
                    (block_index(blocks)?, 1, 1),
                    BLOCK,
                    0,
                    &[
                        Arg::Ptr(table),
                        Arg::Int(int(rows)?),
                        Arg::Float(dtype.min_normal()),
                        Arg::Float(dtype.max_finite()),
                        Arg::Ptr(partials + (slot * PARTIAL) as u64),
                    ],
                )?;
            }
            let scratch = self.scratch.borrow();
            let s = scratch
                .as_ref()
                .ok_or_else(|| anyhow!("internal error: no scratch"))?;
            self.stream
                .memcpy_dtoh(&s.slice(..slots * PARTIAL), &mut host)
                .map_err(|e| anyhow!("download from the GPU failed: {e:?}"))?;
        }
        let word =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Ok(bufs
            .iter()
            .zip(&first_slot)
            .map(|(buf, &first)| {
                let mut st = TensorStats {
                    len: buf.len as u64,
                    ..TensorStats::default()
                };
                for p in host[first * PARTIAL..]
                    .chunks_exact(PARTIAL)
                    .take(buf.len.div_ceil(MT_CHUNK))
                {
                    let mut sq = [0u8; 8];
                    sq.copy_from_slice(&p[..8]);
                    st.sum_sq += f64::from_le_bytes(sq);
                    st.amax = st.amax.max(f64::from(f32::from_bits(word(p, 8))));
                    st.finite += u64::from(word(p, 12));
                    st.zero += u64::from(word(p, 16));
                    st.subnormal += u64::from(word(p, 20));
                    st.saturated += u64::from(word(p, 24));
                    st.nan += u64::from(word(p, 28));
                }
                st
            })
            .collect())
    }

    fn casts_for_gemm(&self, tensors: DType, operand: DType) -> bool {
        can_cast_for_gemm(tensors, operand)
    }

    fn records_graphs(&self) -> bool {
        self.graphs
    }

    fn record_graph(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        if !self.graphs || self.recording.get() {
            bail!("internal error: a CUDA graph recording while graphs are off or one is already recording");
        }
        // Thread-local mode: another thread's unsafe calls do not break this recording.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("cannot start recording a CUDA graph: {e:?}"))?;
        self.recording.set(true);
        let queued = body();
        self.recording.set(false);
        // Always end the recording, so the stream runs work again whatever `body` did.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        queued?;
        match graph {
            Ok(Some(graph)) => Ok(graph),
            Ok(None) => bail!("internal error: recorded an empty CUDA graph"),
            Err(e) => bail!(
                "recording the training step as a CUDA graph failed ({e:?}); HALFLING_CUDA_GRAPHS=0 runs without graphs"
            ),
        }
    }

    fn replay_graph(&self, graph: &CudaGraph) -> Result<()> {
        self.refuse_while_recording("a graph replay")?;
        graph
            .launch()
            .map_err(|e| anyhow!("replaying a CUDA graph failed: {e:?}"))
    }

    fn graph_epoch(&self) -> u64 {
        self.memory_epoch.get() + self.lt.borrow().plan_changes()
    }

    fn profile_report(&self) -> Result<Option<String>> {
        let Some(log) = &self.profile else {
            return Ok(None);
        };
        self.synchronize()?;
        let mut totals: HashMap<String, (usize, f64)> = HashMap::new();
        for (name, start, end) in log.borrow_mut().drain(..) {
            let ms = f64::from(
                start
                    .elapsed_ms(&end)
                    .map_err(|e| anyhow!("CUDA event timing failed: {e:?}"))?,
            );
            let entry = totals.entry(name).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += ms;
        }
        let all: f64 = totals.values().map(|t| t.1).sum();
        let mut rows: Vec<_> = totals.into_iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut out = format!(
            "{:<58} {:>7} {:>10} {:>6}\n",
            "kernel", "calls", "total ms", "%"
        );
        for (name, (calls, ms)) in rows {
            out.push_str(&format!(
                "{name:<58} {calls:>7} {ms:>10.3} {:>5.1}%\n",
                100.0 * ms / all.max(1e-12)
            ));
        }
        out.push_str(&format!("{:<58} {:>7} {all:>10.3}\n", "all", ""));
        Ok(Some(out))
    }

    fn peak_flops(&self, dtype: DType) -> f64 {
        let _ = &self.ctx;
        match dtype {
            DType::F32 => H100_F32_PEAK,
            // Dense fp16 tensor-core peak equals bf16's on Hopper.
            _ => H100_BF16_PEAK,
        }
    }

    fn zero(&self, bufs: &mut [CudaBuf]) -> Result<()> {
        if self.lazy_zero {
            // Each buffer's first op writes the zeros or stands in for them (`CudaBuf::unzeroed`).
            for b in bufs.iter() {
                b.unzeroed.set(true);
            }
            return Ok(());
        }
        let rows = bufs
            .iter_mut()
            .map(|b| Ok((self.ptr_mut(b)?, b.mem.len())))
            .collect::<Result<Vec<_>>>()?;
        // zero_multi's blocks take MT_CHUNK f32s' worth of bytes each.
        let (table, blocks) = tensor_table(rows.into_iter(), MT_CHUNK * 4)?;
        if blocks == 0 {
            return Ok(());
        }
        let count = table.len() / 24;
        let table = self.table_ptr("zero_multi", &table)?;
        self.launch(
            "zero_multi",
            (block_index(blocks)?, 1, 1),
            BLOCK,
            0,
            &[Arg::Ptr(table), Arg::Int(int(count)?)],
        )
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) -> Result<()> {
        if value.to_bits() == 0 {
            // +0.0 is all-zero bytes in every format: the driver's memset (zeroing gradients at
            // every step) is cheaper than a kernel.
            buf.unzeroed.set(false);
            return self
                .stream
                .memset_zeros(&mut buf.mem)
                .map_err(|e| anyhow!("zeroing a GPU buffer failed: {e:?}"));
        }
        let n = buf.len;
        let name = format!("fill_{}", suffix(buf.dtype)?);
        let p = self.ptr_mut(buf)?;
        self.elementwise(
            &name,
            n,
            &[Arg::Ptr(p), Arg::Float(value), Arg::Int(int(n)?)],
        )
    }

    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        if dst.len != src.len {
            bail!(
                "internal error: copy of {} elements into {}",
                src.len,
                dst.len
            );
        }
        let n = dst.len;
        let name = match (src.dtype, dst.dtype) {
            (a, b) if a == b => format!("copy_{}", suffix(a)?),
            (a, b) => format!("copy_{}_to_{}", suffix(a)?, suffix(b)?),
        };
        let s = self.ptr(src)?;
        let d = self.ptr_mut(dst)?;
        self.elementwise(&name, n, &[Arg::Ptr(d), Arg::Ptr(s), Arg::Int(int(n)?)])
    }

    fn residual_forward(
        &self,
        out: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        (sa, sb): (f32, f32),
    ) -> Result<()> {
        let n = out.len;
        self.expect("residual a", a, out.dtype, n)?;
        self.expect("residual b", b, out.dtype, n)?;
        let name = format!("residual_forward_{}", suffix(out.dtype)?);
        let (pa, pb) = (self.ptr(a)?, self.ptr(b)?);
        let po = self.ptr_mut(out)?;
        self.elementwise(
            &name,
            n,
            &[
                Arg::Ptr(po),
                Arg::Ptr(pa),
                Arg::Ptr(pb),
                op_scale("residual", sa)?,
                op_scale("residual", sb)?,
                Arg::Int(int(n)?),
            ],
        )
    }

    fn scale(&self, buf: &mut CudaBuf, factor: f32) -> Result<()> {
        let n = buf.len;
        let name = format!("scale_{}", suffix(buf.dtype)?);
        let p = self.ptr_mut(buf)?;
        self.elementwise(
            &name,
            n,
            &[Arg::Ptr(p), Arg::Float(factor), Arg::Int(int(n)?)],
        )
    }

    fn gelu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf, scale: f32) -> Result<()> {
        let n = out.len;
        self.expect("gelu input", inp, out.dtype, n)?;
        let name = format!("gelu_forward_{}", suffix(out.dtype)?);
        let pi = self.ptr(inp)?;
        let po = self.ptr_mut(out)?;
        self.elementwise(
            &name,
            n,
            &[
                Arg::Ptr(po),
                Arg::Ptr(pi),
                op_scale("GELU", scale)?,
                Arg::Int(int(n)?),
            ],
        )
    }

    fn gelu_backward(&self, d: &mut CudaBuf, inp: &CudaBuf, scale: f32) -> Result<()> {
        let n = d.len;
        self.expect("gelu input", inp, d.dtype, n)?;
        let name = format!("gelu_backward_{}", suffix(d.dtype)?);
        let pi = self.ptr(inp)?;
        let pd = self.ptr_mut(d)?;
        // In place: the kernel reads each element of dout before writing it as dinp.
        self.elementwise(
            &name,
            n,
            &[
                Arg::Ptr(pd),
                Arg::Ptr(pi),
                Arg::Ptr(pd),
                op_scale("GELU", scale)?,
                Arg::Int(int(n)?),
            ],
        )
    }

    fn dropout_forward(
        &self,
        x: &mut CudaBuf,
        p: f32,
        seed: &CudaSlice<u64>,
        site: u64,
    ) -> Result<()> {
        let px = self.ptr_mut(x)?;
        self.dropout_launch(px, px, x.len, x.dtype, p, seed, site)
    }

    fn dropout_backward(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        p: f32,
        seed: &CudaSlice<u64>,
        site: u64,
    ) -> Result<()> {
        // The mask is regenerated from the seed: the same kernel serves both directions.
        self.expect("dropout output gradient", dy, dx.dtype, dx.len)?;
        let pg = self.ptr(dy)?;
        let pdx = self.ptr_mut(dx)?;
        self.dropout_launch(pdx, pg, dx.len, dx.dtype, p, seed, site)
    }

    fn linear_forward(
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
        if fp8::involved(&[gemm]) {
            return self.fp8_op_linear_forward(out, inp, w, bias, n, ic, oc, gemm, amax);
        }
        no_amax(amax)?;
        let t = out.dtype;
        let inputs = gemm_format(gemm)?;
        self.expect("linear input", inp, inputs, n * ic)?;
        self.expect("linear weight", w, inputs, oc * ic)?;
        self.expect("linear output", out, t, n * oc)?;
        if let Some(b) = bias {
            self.expect("linear bias", b, t, oc)?;
        }
        let epilogue = match bias {
            Some(b) => Epilogue::Bias { bias: self.ptr(b)? },
            None => Epilogue::None,
        };
        let (pi, pw) = (self.ptr(inp)?, self.ptr(w)?);
        let po = self.ptr_mut(out)?;
        self.gemm(Gemm {
            out: po,
            out_type: gemm_type(t)?,
            a: pi,
            b: pw,
            inputs: gemm_type(inputs)?,
            m: n,
            n: oc,
            k: ic,
            trans_a: false,
            trans_b: true,
            alpha: gemm.alpha,
            beta: 0.0,
            epilogue,
        })
    }

    fn linear_gelu_forward(
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
        if fp8::involved(&[gemm]) {
            return self.fp8_op_linear_gelu_forward(
                out, pre, inp, w, bias, n, ic, oc, gemm, amax, gelu_scale,
            );
        }
        no_amax(amax)?;
        let t = out.dtype;
        let inputs = gemm_format(gemm)?;
        self.expect("linear input", inp, inputs, n * ic)?;
        self.expect("linear weight", w, inputs, oc * ic)?;
        self.expect("linear+GELU output", out, t, n * oc)?;
        self.expect("linear+GELU pre-activation", pre, t, n * oc)?;
        if let Some(b) = bias {
            self.expect("linear bias", b, t, oc)?;
        }
        let g = Gemm {
            out: self.ptr_mut(out)?,
            out_type: gemm_type(t)?,
            a: self.ptr(inp)?,
            b: self.ptr(w)?,
            inputs: gemm_type(inputs)?,
            m: n,
            n: oc,
            k: ic,
            trans_a: false,
            trans_b: true,
            alpha: gemm.alpha,
            beta: 0.0,
            epilogue: Epilogue::GeluAux {
                bias: bias.map(|b| self.ptr(b)).transpose()?,
                pre: self.ptr_mut(pre)?,
            },
        };
        // The epilogue computes gelu(pre) unscaled.
        if gelu_scale == 1.0 && self.fusable(&g) {
            return self.gemm(g);
        }
        self.linear_forward(pre, inp, w, bias, n, ic, oc, gemm, None)?;
        self.gelu_forward(out, pre, gelu_scale)
    }

    fn linear_gelu_backward(
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
        if fp8::involved(&[dinp_gemm, dw_gemm]) {
            return self.fp8_op_linear_gelu_backward(
                dpre, dw, dbias, dout, gelu_out, pre, w, n, ic, oc, dinp_gemm, dw_gemm, amax,
                gelu_scale,
            );
        }
        no_amax(amax)?;
        let dinp_format = gemm_format(dinp_gemm)?;
        self.expect("linear dout", dout, dinp_format, n * oc)?;
        self.expect("linear weight", w, dinp_format, oc * ic)?;
        let t = dpre.dtype;
        self.expect("GELU input grad", dpre, t, n * ic)?;
        self.expect("GELU input", pre, t, n * ic)?;
        let g = Gemm {
            out: self.ptr_mut(dpre)?,
            out_type: gemm_type(t)?,
            a: self.ptr(dout)?,
            b: self.ptr(w)?,
            inputs: gemm_type(dinp_format)?,
            m: n,
            n: ic,
            k: oc,
            trans_a: false,
            trans_b: false,
            alpha: dinp_gemm.alpha,
            beta: 0.0,
            epilogue: Epilogue::DGelu {
                pre: self.ptr(pre)?,
            },
        };
        // The epilogue multiplies by gelu'(pre) unscaled.
        if gelu_scale != 1.0 || !self.fusable(&g) {
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
                None,
            )?;
            return self.gelu_backward(dpre, pre, gelu_scale);
        }
        self.gemm(g)?;
        self.linear_backward(
            None, dw, dbias, dout, gelu_out, w, n, ic, oc, dinp_gemm, dw_gemm, None,
        )
    }

    fn mlp_forward_writes_gelu(&self, act: DType, gemms: [GemmSpec; 2]) -> bool {
        !(act == DType::BF16 && self.fp8_mlp_gelu_cast(&gemms[1..]))
    }

    fn mlp_forward(
        &self,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        gelu_out: &mut CudaBuf,
        inp: &CudaBuf,
        w1: (&CudaBuf, Option<&CudaBuf>),
        w2: (&CudaBuf, Option<&CudaBuf>),
        sizes: (usize, usize, usize),
        gemms: [GemmSpec; 2],
        mut amax: Option<&mut CudaBuf>,
        gelu_scale: f32,
    ) -> Result<bool> {
        if self.fp8_mlp_gelu_cast(&gemms[1..]) {
            let ran = self.fp8_mlp_forward(
                out,
                pre,
                gelu_out,
                inp,
                w1,
                w2,
                sizes,
                gemms,
                amax.as_deref_mut(),
                gelu_scale,
            )?;
            if let Some(written) = ran {
                return Ok(written);
            }
        }
        crate::backend::mlp_forward_composed(
            self, out, pre, gelu_out, inp, w1, w2, sizes, gemms, amax, gelu_scale,
        )
    }

    fn mlp_backward(
        &self,
        dinp: &mut CudaBuf,
        dhidden: &mut CudaBuf,
        dw1: (&mut CudaBuf, Option<&mut CudaBuf>),
        dw2: (&mut CudaBuf, Option<&mut CudaBuf>),
        dout: &CudaBuf,
        acts: (&CudaBuf, &CudaBuf, GeluOut<'_, CudaBuf>),
        weights: (&CudaBuf, &CudaBuf),
        sizes: (usize, usize, usize),
        gemms: [GemmSpec; 4],
        amax: Option<&mut CudaBuf>,
        gelu_scale: f32,
    ) -> Result<()> {
        let [dx2, dw2_gemm, dx1, dw1_gemm] = gemms;
        if self.fp8_dgelu_cast && fp8::involved(&[dx2, dw2_gemm]) && fp8::involved(&[dx1, dw1_gemm])
        {
            return self.fp8_mlp_backward(
                dinp, dhidden, dw1, dw2, dout, acts, weights, sizes, gemms, amax, gelu_scale,
            );
        }
        // Without FP8 the down-projection's GEMM takes the GELU derivative as its epilogue.
        crate::backend::mlp_backward_composed(
            self, dinp, dhidden, dw1, dw2, dout, acts, weights, sizes, gemms, amax, gelu_scale,
        )
    }

    fn linear_backward(
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
        if fp8::involved(&[dinp_gemm, dw_gemm]) {
            return self.fp8_op_linear_backward(
                dinp, dw, dbias, dout, inp, w, n, ic, oc, dinp_gemm, dw_gemm, amax,
            );
        }
        no_amax(amax)?;
        let (dinp_format, dw_format) = (gemm_format(dinp_gemm)?, gemm_format(dw_gemm)?);
        self.expect("linear dout", dout, dinp_format, n * oc)?;
        self.expect("linear weight", w, dinp_format, oc * ic)?;
        self.expect("linear input", inp, dw_format, n * ic)?;
        let (pd, pw, pi) = (self.ptr(dout)?, self.ptr(w)?, self.ptr(inp)?);
        if let Some(dinp) = dinp {
            let t = dinp.dtype;
            self.expect("linear input grad", dinp, t, n * ic)?;
            let px = self.ptr_mut(dinp)?;
            self.gemm(Gemm {
                out: px,
                out_type: gemm_type(t)?,
                a: pd,
                b: pw,
                inputs: gemm_type(dinp_format)?,
                m: n,
                n: ic,
                k: oc,
                trans_a: false,
                trans_b: false,
                alpha: dinp_gemm.alpha,
                beta: 0.0,
                epilogue: Epilogue::None,
            })?;
        }
        if dw.len != oc * ic {
            bail!(
                "internal error: weight grad has {} elements, expected {}",
                dw.len,
                oc * ic
            );
        }
        let out_type = gemm_type(dw.dtype)?;
        let (pdw, overwrite) = self.ptr_first_write(dw);
        // Accumulates (beta = 1) into the fp32 gradient across micro-batches, or writes it where
        // its zeros were deferred.
        let g = Gemm {
            out: pdw,
            out_type,
            a: pd,
            b: pi,
            inputs: gemm_type(dw_format)?,
            m: oc,
            n: ic,
            k: n,
            trans_a: true,
            trans_b: false,
            alpha: dw_gemm.alpha,
            beta: if overwrite { 0.0 } else { 1.0 },
            epilogue: Epilogue::None,
        };
        self.gemm(g)?;
        if let Some(db) = dbias {
            self.bias_backward(db, dout, n, oc, dw_gemm.alpha)?;
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.expect("layernorm input", inp, out.dtype, n * c)?;
        let x = self.ptr(inp)?;
        self.layernorm_forward_launch(out, mean, rstd, x, None, weight, bias, n, c)
    }

    fn residual_layernorm_forward(
        &self,
        resid: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        scales: (f32, f32),
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let t = out.dtype;
        self.expect("residual output", resid, t, n * c)?;
        self.expect("residual input", a, t, n * c)?;
        self.expect("residual input", b, t, n * c)?;
        let x = self.ptr_mut(resid)?;
        let add = (self.ptr(a)?, self.ptr(b)?, scales.0, scales.1);
        self.layernorm_forward_launch(out, mean, rstd, x, Some(add), weight, bias, n, c)
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
        (sx, sp): (f32, f32),
        mut res_bias: Option<(&mut CudaBuf, f32)>,
    ) -> Result<()> {
        let t = dinp.dtype;
        self.expect("layernorm input grad", dinp, t, n * c)?;
        self.expect("layernorm dout", dout, t, n * c)?;
        self.expect("layernorm input", inp, t, n * c)?;
        self.expect("layernorm weight", weight, t, c)?;
        self.expect("layernorm weight grad", dweight, DType::F32, c)?;
        self.expect("layernorm bias grad", dbias, DType::F32, c)?;
        if let Some((db, _)) = &res_bias {
            self.expect("residual bias grad", db, DType::F32, c)?;
        }
        if n == 0 || c == 0 {
            return Ok(());
        }
        let sfx = suffix(t)?;
        let (pg, pi, pw, pm, pr) = (
            self.ptr(dout)?,
            self.ptr(inp)?,
            self.ptr(weight)?,
            self.ptr(mean)?,
            self.ptr(rstd)?,
        );
        let pd = self.ptr_mut(dinp)?;
        let sx = op_scale("LayerNorm input gradient", sx)?;
        // Threads per row in the fused kernel: 8 columns each, whole warps, at most 512.
        let tpr = c.div_ceil(8).next_multiple_of(32);
        let (partials, g, nout) = if self.ln_fused && tpr <= 512 {
            let name = format!("layernorm_backward_fused_{sfx}");
            // As many teams of `tpr` threads as fit in 512 (at most 8; the kernel's registers
            // allow one such block per SM), one wave of blocks (fewer blocks write fewer partial
            // rows; more would only queue), at least 4 rows a team.
            let teams = (512 / tpr).clamp(1, 8);
            let block = (teams * tpr) as u32;
            let shared = block * 8 * 4;
            let waves = self.resident_blocks(&name, block, shared)?;
            let g = waves.min(n.div_ceil(4 * teams)).max(1);
            let rows_per_block = n.div_ceil(g);
            let g = n.div_ceil(rows_per_block);
            let nout = if res_bias.is_some() { 3 } else { 2 };
            let partials = self.scratch_ptr(g * nout * c * 4)?;
            self.launch(
                &name,
                (block_index(g)?, 1, 1),
                block,
                shared,
                &[
                    Arg::Ptr(partials),
                    Arg::Ptr(pd),
                    Arg::Ptr(pg),
                    Arg::Ptr(pi),
                    Arg::Ptr(pw),
                    Arg::Ptr(pm),
                    Arg::Ptr(pr),
                    sx,
                    Arg::Int(int(n)?),
                    Arg::Int(int(c)?),
                    Arg::Int(int(tpr)?),
                    Arg::Int(int(rows_per_block)?),
                    Arg::Int(int(nout)?),
                ],
            )?;
            (partials, g, nout)
        } else {
            // Wider rows: the warp-per-row dinp kernel, then the column sums in their own pass
            // (and the residual bias through `bias_backward`, after dinp is final).
            self.launch(
                &format!("layernorm_backward_dinp_{sfx}"),
                (n.div_ceil(8) as u32, 1, 1),
                256,
                0,
                &[
                    Arg::Ptr(pd),
                    Arg::Ptr(pg),
                    Arg::Ptr(pi),
                    Arg::Ptr(pw),
                    Arg::Ptr(pm),
                    Arg::Ptr(pr),
                    sx,
                    Arg::Int(int(n)?),
                    Arg::Int(int(c)?),
                ],
            )?;
            let (grid, rows_per_block) = column_sums_grid(n, c)?;
            let g = grid.1 as usize;
            let partials = self.scratch_ptr(g * 2 * c * 4)?;
            self.launch(
                &format!("layernorm_backward_params_partial_{sfx}"),
                grid,
                256,
                0,
                &[
                    Arg::Ptr(partials),
                    Arg::Ptr(pg),
                    Arg::Ptr(pi),
                    Arg::Ptr(pm),
                    Arg::Ptr(pr),
                    Arg::Int(int(n)?),
                    Arg::Int(int(c)?),
                    Arg::Int(int(rows_per_block)?),
                ],
            )?;
            (partials, g, 2)
        };
        // Bit o of `overwrite`: output o's zeros were deferred, so it is written, not added to.
        let ((pdw, ow), (pdb, ob)) = (self.ptr_first_write(dweight), self.ptr_first_write(dbias));
        let (pres, sr, or) = match res_bias.as_mut() {
            Some((db, s)) if nout == 3 => {
                let (p, o) = self.ptr_first_write(db);
                (p, *s, o)
            }
            _ => (0, 1.0, false),
        };
        let overwrite = i32::from(ow) | i32::from(ob) << 1 | i32::from(or) << 2;
        self.launch(
            "column_sums_reduce",
            (c.div_ceil(32) as u32, nout as u32, 1),
            256,
            0,
            &[
                Arg::Ptr(pdw),
                Arg::Ptr(pdb),
                Arg::Ptr(pres),
                Arg::Ptr(partials),
                op_scale("LayerNorm parameter gradient", sp)?,
                op_scale("bias gradient", sr)?,
                Arg::Int(int(g)?),
                Arg::Int(int(c)?),
                Arg::Int(int(nout)?),
                Arg::Int(overwrite),
            ],
        )?;
        match res_bias {
            Some((db, s)) if nout == 2 => self.bias_backward(db, dinp, n, c, s),
            _ => Ok(()),
        }
    }

    fn check_attention_shape(&self, n_embd: usize, n_head: usize) -> Result<()> {
        attention::variant(n_embd, n_head).map(|_| ())
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        qkv: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
    ) -> Result<()> {
        let dt = out.dtype;
        self.expect("attention qkv", qkv, dt, b * t * 3 * c)?;
        self.expect("attention output", out, dt, b * t * c)?;
        self.expect("attention lse", lse, DType::F32, b * nh * t)?;
        let pq = self.ptr(qkv)?;
        let pl = self.ptr_mut(lse)?;
        let po = self.ptr_mut(out)?;
        attention::forward(self, dt, po, pl, pq, b, t, c, nh, out_scale)
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
        qkv_bias: Option<(&mut CudaBuf, f32)>,
    ) -> Result<()> {
        let dt = dqkv.dtype;
        self.expect("attention qkv grad", dqkv, dt, b * t * 3 * c)?;
        self.expect("attention dout", dout, dt, b * t * c)?;
        if let Some((db, _)) = &qkv_bias {
            self.expect("qkv bias gradient", db, DType::F32, 3 * c)?;
        }
        let (pg, pq, po, pl) = (
            self.ptr(dout)?,
            self.ptr(qkv)?,
            self.ptr(out)?,
            self.ptr(lse)?,
        );
        let pd = self.ptr_mut(dqkv)?;
        let fuse = qkv_bias.is_some() && self.attn_qkv_bias;
        let partials =
            attention::backward(self, dt, pd, pg, pq, po, pl, b, t, c, nh, out_scale, fuse)?;
        let Some((db, scale)) = qkv_bias else {
            return Ok(());
        };
        match partials {
            // The kernels wrote one partial row per row tile of every sequence.
            Some((p, g)) => self.bias_backward_reduce(db, p, g, 3 * c, scale),
            // Not opted in, or a kernel without the sums (attention.cu, f32, a tuning variant):
            // the column sums of dqkv as stored, as the QKV linear would form them.
            None => self.bias_backward(db, dqkv, b * t, 3 * c, scale),
        }
    }

    fn attention_forms_qkv_bias(&self, act: DType) -> bool {
        // Only where the Hopper kernels form it; elsewhere the linear keeps it, so the FP8
        // output-gradient casts still sum it as they read dqkv.
        self.attn_qkv_bias
            && self.wgmma_attention_bwd.is_some()
            && matches!(act, DType::BF16 | DType::F16)
    }

    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        tokens: &CudaTokens,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        scale: f32,
    ) -> Result<()> {
        let dt = out.dtype;
        self.expect("embedding output", out, dt, b * t * c)?;
        let vocab = wte.len / c;
        if let Some(&bad) = tokens.host.iter().find(|&&tok| tok as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let (pt, pw, pp) = (self.ptr_tokens(tokens), self.ptr(wte)?, self.ptr(wpe)?);
        let po = self.ptr_mut(out)?;
        let name = format!("embedding_forward_{}", suffix(dt)?);
        self.elementwise(
            &name,
            b * t * c,
            &[
                Arg::Ptr(po),
                Arg::Ptr(pt),
                Arg::Ptr(pw),
                Arg::Ptr(pp),
                op_scale("embedding", scale)?,
                Arg::Int(int(b)?),
                Arg::Int(int(t)?),
                Arg::Int(int(c)?),
            ],
        )
    }

    fn embedding_backward(
        &self,
        dwte: &mut CudaBuf,
        dwpe: &mut CudaBuf,
        dout: &CudaBuf,
        tokens: &CudaTokens,
        b: usize,
        t: usize,
        c: usize,
        (s_te, s_pe): (f32, f32),
    ) -> Result<()> {
        let sfx = suffix(dout.dtype)?;
        self.expect("embedding dout", dout, dout.dtype, b * t * c)?;
        let pg = self.ptr(dout)?;
        let pdp = self.ptr_mut(dwpe)?;
        self.elementwise(
            &format!("embedding_backward_wpe_{sfx}"),
            t * c,
            &[
                Arg::Ptr(pdp),
                Arg::Ptr(pg),
                op_scale("position embedding gradient", s_pe)?,
                Arg::Int(int(b)?),
                Arg::Int(int(t)?),
                Arg::Int(int(c)?),
            ],
        )?;
        // One block per possible bucket (a batch has at most one per token); those past the
        // batch's count, which the kernel reads from the device, return at once.
        let capacity = tokens.host.len();
        if capacity == 0 {
            return Ok(());
        }
        let (bt, bs, bp, nb) = {
            let (a, _s1) = tokens.bucket_tokens.device_ptr(&self.stream);
            let (s, _s2) = tokens.bucket_starts.device_ptr(&self.stream);
            let (p, _s3) = tokens.positions.device_ptr(&self.stream);
            let (n, _s4) = tokens.num_buckets.device_ptr(&self.stream);
            (a, s, p, n)
        };
        let pdt = self.ptr_mut(dwte)?;
        self.launch(
            &format!("embedding_backward_wte_{sfx}"),
            (block_index(capacity)?, 1, 1),
            BLOCK,
            0,
            &[
                Arg::Ptr(pdt),
                Arg::Ptr(pg),
                Arg::Ptr(bt),
                Arg::Ptr(bs),
                Arg::Ptr(bp),
                op_scale("token embedding gradient", s_te)?,
                Arg::Ptr(nb),
                Arg::Int(int(c)?),
            ],
        )
    }

    fn crossentropy_forward_backward(
        &self,
        losses: &mut CudaBuf,
        logits: &mut CudaBuf,
        targets: &CudaTokens,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
    ) -> Result<()> {
        self.expect("classifier losses", losses, DType::F32, n)?;
        self.expect("classifier logits", logits, logits.dtype, n * vp)?;
        let (pl, pg) = (self.ptr_mut(losses)?, self.ptr_mut(logits)?);
        let rows = ClassifierRows {
            losses: pl,
            logits: pg,
            targets: self.ptr_tokens(targets),
            n,
        };
        self.classifier_launch(rows, logits.dtype, v, vp, Some(dloss))
    }

    fn crossentropy_forward(
        &self,
        losses: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &CudaTokens,
        n: usize,
        v: usize,
        vp: usize,
    ) -> Result<()> {
        self.expect("classifier losses", losses, DType::F32, n)?;
        self.expect("classifier logits", logits, logits.dtype, n * vp)?;
        let rows = ClassifierRows {
            losses: self.ptr_mut(losses)?,
            logits: self.ptr(logits)?,
            targets: self.ptr_tokens(targets),
            n,
        };
        self.classifier_launch(rows, logits.dtype, v, vp, None)
    }

    fn chunks_linear_crossentropy(&self) -> bool {
        true
    }

    fn linear_crossentropy_forward_backward(
        &self,
        losses: &mut CudaBuf,
        logits: &mut CudaBuf,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        targets: &CudaTokens,
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        gemms: [GemmSpec; 3],
        dloss: f32,
    ) -> Result<()> {
        let [fwd, dinp_gemm, dw_gemm] = gemms;
        let chunk = linear_crossentropy_chunk(self, logits, x, w, losses, (n, c, vp), &gemms)?;
        let chunk = aligned_rows(chunk, n, c * x.dtype.size_bytes())?;
        self.expect("head input grad", dx, x.dtype, n * c)?;
        self.expect("head weight grad", dw, DType::F32, vp * c)?;
        let (px, pw, pg) = (self.ptr(x)?, self.ptr(w)?, self.ptr_mut(logits)?);
        let (pl, pdx) = (self.ptr_mut(losses)?, self.ptr_mut(dx)?);
        // The first chunk writes the weight gradient where its zeros were deferred.
        let (pdw, overwrite) = self.ptr_first_write(dw);
        let pt = self.ptr_tokens(targets);
        let (t, elem) = (gemm_type(x.dtype)?, x.dtype.size_bytes() as u64);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let x_rows = px + (start * c) as u64 * elem;
            self.gemm(Gemm::linear_forward(
                pg, x_rows, pw, t, rows, c, vp, fwd.alpha,
            ))?;
            let chunk_rows = ClassifierRows {
                losses: pl + 4 * start as u64,
                logits: pg,
                targets: pt + 4 * start as u64,
                n: rows,
            };
            self.classifier_launch(chunk_rows, x.dtype, v, vp, Some(dloss))?;
            let dx_rows = pdx + (start * c) as u64 * elem;
            self.gemm(Gemm::linear_input_grad(
                dx_rows,
                pg,
                pw,
                t,
                rows,
                c,
                vp,
                dinp_gemm.alpha,
            ))?;
            let mut g = Gemm::linear_weight_grad(pdw, pg, x_rows, t, rows, c, vp, dw_gemm.alpha);
            if overwrite && start == 0 {
                g.beta = 0.0;
            }
            self.gemm(g)?;
        }
        Ok(())
    }

    fn linear_crossentropy_forward(
        &self,
        losses: &mut CudaBuf,
        logits: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        targets: &CudaTokens,
        n: usize,
        c: usize,
        v: usize,
        vp: usize,
        fwd: GemmSpec,
    ) -> Result<()> {
        let chunk = linear_crossentropy_chunk(self, logits, x, w, losses, (n, c, vp), &[fwd])?;
        let chunk = aligned_rows(chunk, n, c * x.dtype.size_bytes())?;
        let (px, pw, pg) = (self.ptr(x)?, self.ptr(w)?, self.ptr_mut(logits)?);
        let (pl, pt) = (self.ptr_mut(losses)?, self.ptr_tokens(targets));
        let (t, elem) = (gemm_type(x.dtype)?, x.dtype.size_bytes() as u64);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let x_rows = px + (start * c) as u64 * elem;
            self.gemm(Gemm::linear_forward(
                pg, x_rows, pw, t, rows, c, vp, fwd.alpha,
            ))?;
            let chunk_rows = ClassifierRows {
                losses: pl + 4 * start as u64,
                logits: pg,
                targets: pt + 4 * start as u64,
                n: rows,
            };
            self.classifier_launch(chunk_rows, x.dtype, v, vp, None)?;
        }
        Ok(())
    }

    fn adamw_update(&self, tensors: &mut [AdamWTensor<'_, CudaBuf>], hp: &AdamW) -> Result<()> {
        let exponent = hp.step.min(i32::MAX as u64) as i32;
        let inv_bc1 = (1.0 / (1.0 - f64::from(hp.beta1).powi(exponent))) as f32;
        let inv_bc2 = (1.0 / (1.0 - f64::from(hp.beta2).powi(exponent))) as f32;
        // One launch per compute-copy format (all tensors share one in a model).
        let copy_dtype = |t: &AdamWTensor<'_, CudaBuf>| t.compute_copy.as_ref().map(|c| c.dtype);
        let mut formats: Vec<Option<DType>> = tensors.iter().map(copy_dtype).collect();
        formats.sort_by_key(|f| f.map(|d| d.to_string()));
        formats.dedup();
        for format in formats {
            let mut table = Vec::new();
            let mut blocks = 0usize;
            for (index, t) in tensors
                .iter_mut()
                .enumerate()
                .filter(|(_, t)| copy_dtype(t) == format)
            {
                let n = t.param.len;
                self.expect("adamw param", t.param, DType::F32, n)?;
                self.expect("adamw grad", t.grad, DType::F32, n)?;
                self.expect("adamw m", t.m, DType::F32, n)?;
                self.expect("adamw v", t.v, DType::F32, n)?;
                let copy = match t.compute_copy.as_deref_mut() {
                    Some(c) => {
                        self.expect("adamw compute copy", c, c.dtype, n)?;
                        self.ptr_mut(c)?
                    }
                    None => 0,
                };
                let weight_decay = t.weight_decay(hp);
                // struct AdamWRow in kernels.cu: five pointers, n, lr_scale, weight_decay,
                // first_block, index.
                for ptr in [
                    self.ptr_mut(t.param)?,
                    self.ptr(t.grad)?,
                    self.ptr_mut(t.m)?,
                    self.ptr_mut(t.v)?,
                    copy,
                ] {
                    table.extend_from_slice(&ptr.to_le_bytes());
                }
                table.extend_from_slice(&(n as u64).to_le_bytes());
                table.extend_from_slice(&t.lr_scale.to_le_bytes());
                table.extend_from_slice(&weight_decay.to_le_bytes());
                table.extend_from_slice(&block_index(blocks)?.to_le_bytes());
                table.extend_from_slice(&block_index(index)?.to_le_bytes());
                blocks += n.div_ceil(MT_CHUNK);
            }
            if blocks == 0 {
                continue;
            }
            let sfx = match format {
                Some(dtype) => suffix(dtype)?,
                None => "f32",
            };
            let name = format!("adamw_multi_{sfx}");
            let rows = table.len() / 64;
            let table = self.table_ptr(&name, &table)?;
            self.launch(
                &name,
                (block_index(blocks)?, 1, 1),
                BLOCK,
                0,
                &[
                    Arg::Ptr(table),
                    Arg::Int(int(rows)?),
                    Arg::Float(hp.lr),
                    Arg::Float(hp.beta1),
                    Arg::Float(hp.beta2),
                    Arg::Float(hp.eps),
                    Arg::Float(inv_bc1),
                    Arg::Float(inv_bc2),
                    Arg::Float(hp.grad_scale),
                    Arg::Int(i32::from(hp.rounding_seed.is_some())),
                    Arg::U64(hp.rounding_seed.map_or(0, |seed| {
                        crate::backend::cpu::kernels::rounding_step_key(seed, hp.step)
                    })),
                ],
            )?;
        }
        Ok(())
    }

    fn sum_squares(&self, buf: &CudaBuf) -> Result<f64> {
        self.global_sum_squares(std::slice::from_ref(buf))
    }

    fn global_sum_squares(&self, bufs: &[CudaBuf]) -> Result<f64> {
        // One launch per storage format over a table of the buffers; each block writes one
        // partial sum to scratch, which is read back once and summed in a fixed order: one
        // synchronisation per optimizer step, deterministic.
        let mut formats: Vec<DType> = bufs.iter().map(|b| b.dtype).collect();
        formats.sort_by_key(|d| d.to_string());
        formats.dedup();
        let mut tables = Vec::new();
        let mut slots = 0usize;
        for &dtype in &formats {
            let rows = bufs
                .iter()
                .filter(|b| b.dtype == dtype)
                .map(|b| Ok((self.ptr(b)?, b.len)))
                .collect::<Result<Vec<_>>>()?;
            let (table, blocks) = tensor_table(rows.into_iter(), MT_CHUNK)?;
            tables.push((dtype, table, slots, blocks));
            slots += blocks;
        }
        if slots == 0 {
            return Ok(0.0);
        }
        let partials = self.scratch_ptr(slots * 8)?;
        for (dtype, table, first_slot, blocks) in tables {
            if blocks == 0 {
                continue;
            }
            let name = format!("sum_squares_multi_{}", suffix(dtype)?);
            let rows = table.len() / 24;
            let table = self.table_ptr(&name, &table)?;
            self.launch(
                &name,
                (block_index(blocks)?, 1, 1),
                BLOCK,
                0,
                &[
                    Arg::Ptr(table),
                    Arg::Int(int(rows)?),
                    Arg::Ptr(partials + (first_slot * 8) as u64),
                ],
            )?;
        }
        let scratch = self.scratch.borrow();
        let s = scratch
            .as_ref()
            .ok_or_else(|| anyhow!("internal error: no scratch"))?;
        let mut host = vec![0u8; slots * 8];
        self.stream
            .memcpy_dtoh(&s.slice(..slots * 8), &mut host)
            .map_err(|e| anyhow!("download from the GPU failed: {e:?}"))?;
        Ok(host
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .sum())
    }
}

/// Grid and rows per block of a column-sum partial kernel over `n` rows of `c` columns
/// (`column_sums_partial_impl` in kernels.cu: 256 columns per block in x, row blocks in y).
/// About 512 blocks keep the memory system busy; at least 64 rows each keep the partial rows a
/// small fraction of the traffic.
fn column_sums_grid(n: usize, c: usize) -> Result<((u32, u32, u32), usize)> {
    let tiles = c.div_ceil(256).max(1);
    let rows_per_block = n.div_ceil(512usize.div_ceil(tiles)).max(64);
    let row_blocks = n.div_ceil(rows_per_block).max(1);
    Ok((
        (block_index(tiles)?, block_index(row_blocks)?, 1),
        rows_per_block,
    ))
}

/// Elements each block of a multi-tensor kernel works on (`MT_CHUNK` in kernels.cu).
const MT_CHUNK: usize = 16384;

/// A `TensorRow` table (kernels.cu) over `(pointer, length)` rows, where each block of the
/// launch takes `chunk` units of length; returns the table's bytes and the number of blocks.
fn tensor_table(
    rows: impl Iterator<Item = (u64, usize)>,
    chunk: usize,
) -> Result<(Vec<u8>, usize)> {
    let mut table = Vec::new();
    let mut blocks = 0usize;
    for (ptr, len) in rows {
        // struct TensorRow: pointer, n, first_block, unused.
        table.extend_from_slice(&ptr.to_le_bytes());
        table.extend_from_slice(&(len as u64).to_le_bytes());
        table.extend_from_slice(&block_index(blocks)?.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        blocks += len.div_ceil(chunk);
    }
    Ok((table, blocks))
}

/// A block index (or count) of a multi-tensor launch, which the kernels take as `unsigned int`.
fn block_index(blocks: usize) -> Result<u32> {
    u32::try_from(blocks).map_err(|_| anyhow!("too many elements for one multi-tensor launch"))
}

impl CudaBackend {
    fn ptr_tokens(&self, tokens: &CudaTokens) -> u64 {
        let (p, _sync) = tokens.ids.device_ptr(&self.stream);
        p
    }
}

mod attention {
    //! Launch geometry of the attention kernels, exactly as the comment block atop attention.cu
    //! specifies it.
    use super::*;

    /// Rows of D per block of the backward preprocess (8 lanes a row, 256 threads).
    const PRE_ROWS: usize = 32;

    /// bf16 forward tiling, as instantiated at the end of attention.cu: `nw` warps, each owning
    /// `mt` 16-row query tiles; key tiles of `bk` rows; Q in registers (`qreg`) or in smem.
    struct FwdTiling {
        hs: usize,
        nw: usize,
        mt: usize,
        bk: usize,
        qreg: bool,
    }

    impl FwdTiling {
        /// (queries per block, threads per block, dynamic shared memory bytes)
        fn geometry(&self) -> (usize, u32, u32) {
            let (bq, hsp) = (16 * self.mt * self.nw, self.hs + 8);
            let stage = 2 * self.bk * hsp;
            let q_in_stage = self.qreg && bq * hsp <= stage;
            let elems = 2 * stage + if q_in_stage { 0 } else { bq * hsp };
            (bq, 32 * self.nw as u32, 2 * elems as u32)
        }
    }

    /// The head size the wgmma kernels are instantiated for (their `HS`) at head size `hs`: `hs`
    /// rounded up to the k16 step of the products, at least 32. Columns hs .. HS-1 are zero-filled.
    fn wgmma_hs(hs: usize) -> usize {
        hs.div_ceil(16).max(2) * 16
    }

    /// Columns a wgmma kernel's shared-memory tile holds at padded head size `hs` (a whole number
    /// of 64-column swizzle blocks: their `HSP`).
    fn swizzle_cols(hs: usize) -> usize {
        hs.div_ceil(64) * 64
    }

    /// The Hopper forward's tiling (attention_wgmma.cu's instantiations): `nwg` warpgroups of 64
    /// queries each, key tiles of `bk` rows, double-buffered; `hs` the padded head size.
    struct WgmmaTiling {
        hs: usize,
        nwg: usize,
        bk: usize,
    }

    impl WgmmaTiling {
        /// (queries per block, threads per block, dynamic shared memory bytes)
        fn geometry(&self) -> (usize, u32, u32) {
            // Q, then two stages of K and V, 2 bytes an element; + 1024 to align the swizzled tiles.
            let bytes = 2 * swizzle_cols(self.hs) * (64 * self.nwg + 4 * self.bk) + 1024;
            (64 * self.nwg, 128 * self.nwg as u32, bytes as u32)
        }
    }

    /// At padded head size `hs` (32 .. 128, a multiple of 16): up to 64 as measured at hs 64, larger
    /// ones as at hs 128.
    fn fwd_wgmma(hs: usize) -> WgmmaTiling {
        WgmmaTiling {
            hs,
            nwg: 2,
            bk: if hs <= 64 { 64 } else { 128 },
        }
    }

    /// The 16-bit (bf16 and f16) forward tiling.
    fn fwd_bf16(hs_max: usize) -> FwdTiling {
        match hs_max {
            64 => FwdTiling {
                hs: 64,
                nw: 8,
                mt: 1,
                bk: 64,
                qreg: true,
            },
            _ => FwdTiling {
                hs: 128,
                nw: 4,
                mt: 2,
                bk: 32,
                qreg: false,
            },
        }
    }

    /// bf16 backward tiling, as instantiated at the end of attention.cu: `nw` warps in both
    /// halves; the dK,dV half has warps of `mt_kv` 16-row key tiles and query tiles of `bc_kv`,
    /// the dQ half warps of `mt_q` 16-row query tiles and key tiles of `bc_q`.
    struct BwdTiling {
        hs: usize,
        nw: usize,
        mt_kv: usize,
        bc_kv: usize,
        mt_q: usize,
        bc_q: usize,
    }

    impl BwdTiling {
        /// (grid.y, threads per block, dynamic shared memory bytes) for sequence length `t`.
        fn geometry(&self, t: usize) -> (usize, u32, u32) {
            let hsp = self.hs + 8;
            let (br_kv, br_q) = (16 * self.mt_kv * self.nw, 16 * self.mt_q * self.nw);
            let kv = 2 * (2 * br_kv * hsp + 4 * self.bc_kv * hsp) + 4 * 4 * self.bc_kv;
            let q = 2 * (2 * br_q * hsp + 4 * self.bc_q * hsp);
            let tiles = t.div_ceil(br_kv).max(t.div_ceil(br_q));
            (tiles, 32 * self.nw as u32, kv.max(q) as u32)
        }
    }

    fn bwd_bf16(hs_max: usize) -> BwdTiling {
        match hs_max {
            64 => BwdTiling {
                hs: 64,
                nw: 8,
                mt_kv: 1,
                bc_kv: 32,
                mt_q: 1,
                bc_q: 32,
            },
            _ => BwdTiling {
                hs: 128,
                nw: 4,
                mt_kv: 1,
                bc_kv: 16,
                mt_q: 1,
                bc_q: 32,
            },
        }
    }

    /// wgmma backward tiling (attention_wgmma_bwd.cu), as instantiated at the end of that file:
    /// `nwg` warpgroups of 64 rows, column tiles of `bn` rows in `ns` shared-memory stages.
    #[derive(Debug, PartialEq)]
    struct Sm90Tiling {
        nwg: usize,
        bn: usize,
        ns: usize,
    }

    impl Sm90Tiling {
        /// (rows per block, threads per block, dynamic shared memory bytes) at padded head size `hs`.
        fn geometry(&self, hs: usize) -> (usize, u32, u32) {
            let (bm, cols) = (64 * self.nwg, swizzle_cols(hs));
            let bytes =
                2 * bm * cols * 2 + self.ns * 2 * self.bn * cols * 2 + self.ns * 2 * self.bn * 4;
            // + 1024: the kernel aligns its base to the 1024-byte swizzle period
            (bm, 128 * self.nwg as u32, (bytes + 1024) as u32)
        }
    }

    /// Variants instantiated per element type: v0 (the default) at every padded head size, v1 and
    /// v2 (tuning) at 64 and 128 only.
    const SM90_VARIANTS: usize = 3;

    /// The tiling of variant `v` at padded head size `hs` (see [`wgmma_hs`]), if instantiated.
    fn sm90_tiling(hs: usize, v: usize) -> Option<Sm90Tiling> {
        let (nwg, bn, ns) = match (hs, v) {
            (32 | 48 | 64 | 80 | 96 | 112 | 128, 0) => (1, 64, 2),
            (64, 1) => (1, 64, 3),
            (64, 2) => (2, 64, 3),
            (128, 1) => (2, 64, 2),
            (128, 2) => (2, 64, 3),
            _ => return None,
        };
        Some(Sm90Tiling { nwg, bn, ns })
    }

    /// `HALFLING_CUDA_ATTN_BWD`: unset or `wgmma` = the wgmma backward (variant 0) where the GPU
    /// has it, `mma` = always attention.cu's kernels, `v1`, `v2` = other wgmma tilings (tuning).
    pub(super) fn sm90_choice() -> Result<Option<usize>> {
        let v = std::env::var("HALFLING_CUDA_ATTN_BWD").unwrap_or_default();
        match v.as_str() {
            "" | "wgmma" => Ok(Some(0)),
            "mma" => Ok(None),
            _ => match v.strip_prefix('v').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n < SM90_VARIANTS => Ok(Some(n)),
                _ => bail!(
                    "HALFLING_CUDA_ATTN_BWD={v}: expected wgmma, mma or v0 .. v{}",
                    SM90_VARIANTS - 1
                ),
            },
        }
    }

    /// Kernel variant (the largest head size it handles) for head size `hs`.
    pub(super) fn variant(c: usize, nh: usize) -> Result<(usize, usize)> {
        let hs = if nh > 0 && c % nh == 0 { c / nh } else { 0 };
        if hs == 0 || hs % 8 != 0 || hs > 128 {
            bail!(
                "the CUDA attention kernels need a head size (model.n_embd / model.n_head) that is a multiple of 8 up to 128; {c} / {nh} does not fit"
            );
        }
        Ok((hs, if hs <= 64 { 64 } else { 128 }))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        be: &CudaBackend,
        dt: DType,
        out: u64,
        lse: u64,
        qkv: u64,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
    ) -> Result<()> {
        let (hs, hs_max) = variant(c, nh)?;
        let sfx = suffix(dt)?;
        // The wgmma kernel copies qkv in 16-byte pieces: its base must be 16-byte aligned.
        let wgmma = be.wgmma_attention && matches!(dt, DType::BF16 | DType::F16) && qkv % 16 == 0;
        let (tile, block, shared) = match dt {
            _ if wgmma => fwd_wgmma(wgmma_hs(hs)).geometry(),
            DType::BF16 | DType::F16 => fwd_bf16(hs_max).geometry(),
            _ => (32, 128, 0),
        };
        let name = if wgmma {
            format!("attention_forward_wgmma_hs{}_{sfx}", wgmma_hs(hs))
        } else {
            format!("attention_forward_hs{hs_max}_{sfx}")
        };
        let grid = ((b * nh) as u32, t.div_ceil(tile) as u32, 1);
        let args = [
            Arg::Ptr(out),
            Arg::Ptr(lse),
            Arg::Ptr(qkv),
            Arg::Int(int(b)?),
            Arg::Int(int(t)?),
            Arg::Int(int(c)?),
            Arg::Int(int(nh)?),
            op_scale("attention output", out_scale)?,
        ];
        be.launch(&name, grid, block, shared, &args)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        be: &CudaBackend,
        dt: DType,
        dqkv: u64,
        dout: u64,
        qkv: u64,
        out: u64,
        lse: u64,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        out_scale: f32,
        qkv_bias: bool,
    ) -> Result<Option<(u64, usize)>> {
        let (hs, hs_max) = variant(c, nh)?;
        let sfx = suffix(dt)?;
        let bh = b * nh;
        // The wgmma kernels take 16-byte aligned tensors (cp.async); a tuning variant not built
        // for this head size runs as v0.
        let aligned = (dqkv | dout | qkv) % 16 == 0;
        let hsw = wgmma_hs(hs);
        let sm90 = be
            .wgmma_attention_bwd
            .filter(|_| matches!(dt, DType::BF16 | DType::F16) && aligned)
            .and_then(|v| {
                let v = if sm90_tiling(hsw, v).is_some() { v } else { 0 };
                sm90_tiling(hsw, v).map(|tiling| (v, tiling))
            });
        // With `qkv_bias`, v0 (the only variant with a `_qb` twin) also writes the bias
        // gradient's partial rows, one per row tile of each sequence, after D in the scratch.
        let qb_rows = match &sm90 {
            Some((0, tiling)) if qkv_bias => Some(b * t.div_ceil(tiling.geometry(hsw).0)),
            _ => None,
        };
        let d_bytes = (bh * t * 4).next_multiple_of(256);
        let qb_bytes = qb_rows.map_or(0, |g| g * 3 * c * 4);
        let d = be.scratch_ptr(d_bytes + qb_bytes)?;
        let partials = qb_rows.map(|g| (d + d_bytes as u64, g));
        // Both kernels end with the same arguments: the sizes and the output scale.
        let ints = [
            Arg::Int(int(b)?),
            Arg::Int(int(t)?),
            Arg::Int(int(c)?),
            Arg::Int(int(nh)?),
            op_scale("attention output", out_scale)?,
        ];
        let pre = [Arg::Ptr(d), Arg::Ptr(dout), Arg::Ptr(out)];
        let pre_args: Vec<Arg> = pre.into_iter().chain(ints.iter().copied()).collect();
        be.launch(
            &format!("attention_backward_preprocess_{sfx}"),
            ((bh * t).div_ceil(PRE_ROWS) as u32, 1, 1),
            256,
            0,
            &pre_args,
        )?;
        let main = [
            Arg::Ptr(dqkv),
            Arg::Ptr(dout),
            Arg::Ptr(qkv),
            Arg::Ptr(lse),
            Arg::Ptr(d),
        ];
        let mut args: Vec<Arg> = main.into_iter().chain(ints.iter().copied()).collect();
        if let Some((v, tiling)) = sm90 {
            let (bm, block, shared) = tiling.geometry(hsw);
            let qb = match partials {
                Some((p, _)) => {
                    args.push(Arg::Ptr(p));
                    "_qb"
                }
                None => "",
            };
            be.launch(
                &format!("attention_backward_sm90_hs{hsw}_v{v}{qb}_{sfx}"),
                (bh as u32, t.div_ceil(bm) as u32, 2),
                block,
                shared,
                &args,
            )?;
            return Ok(partials);
        }
        let (tiles, block, shared) = match dt {
            DType::BF16 | DType::F16 => bwd_bf16(hs_max).geometry(t),
            _ => (t.div_ceil(32), 128, 0),
        };
        be.launch(
            &format!("attention_backward_hs{hs_max}_{sfx}"),
            (bh as u32, tiles as u32, 2),
            block,
            shared,
            &args,
        )?;
        Ok(None)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn head_sizes_outside_the_kernels_range_are_refused() {
            assert_eq!(variant(768, 12).unwrap(), (64, 64));
            assert_eq!(variant(960, 10).unwrap(), (96, 128));
            assert_eq!(variant(48, 6).unwrap(), (8, 64));
            for (c, nh) in [(2048, 8), (100, 10), (768, 7), (768, 0)] {
                let err = variant(c, nh).unwrap_err().to_string();
                assert!(err.contains("multiple of 8 up to 128"), "{c}/{nh}: {err}");
            }
        }

        #[test]
        fn bf16_geometry_matches_the_cu_headers() {
            assert_eq!(fwd_bf16(64).geometry(), (128, 256, 36_864));
            assert_eq!(fwd_bf16(128).geometry(), (128, 128, 69_632));
            assert_eq!(fwd_wgmma(64).geometry(), (128, 256, 50_176));
            assert_eq!(fwd_wgmma(128).geometry(), (128, 256, 164_864));
            // padded head sizes keep whole 64-column swizzle blocks in shared memory
            assert_eq!(fwd_wgmma(32).geometry(), fwd_wgmma(64).geometry());
            assert_eq!(fwd_wgmma(80).geometry(), fwd_wgmma(128).geometry());
            assert_eq!(bwd_bf16(64).geometry(1024), (8, 256, 55_808));
            assert_eq!(bwd_bf16(128).geometry(1024), (16, 128, 69_632));
            assert_eq!(bwd_bf16(64).geometry(1), (1, 256, 55_808));
        }

        #[test]
        fn sm90_geometry_matches_the_attention_wgmma_bwd_cu_table() {
            // Sm90Bwd::SMEM for (HS, NWG, BN, NS) = (64, 1, 64, 2), (128, 1, 64, 2), (64, 2, 64, 3).
            assert_eq!(sm90_tiling(64, 0).unwrap().geometry(64), (64, 128, 51_200));
            assert_eq!(
                sm90_tiling(128, 0).unwrap().geometry(128),
                (64, 128, 100_352)
            );
            assert_eq!(sm90_tiling(64, 2).unwrap().geometry(64), (128, 256, 84_480));
            // every variant fits the 227 KB a block may have on Hopper
            for hs in [64, 128] {
                for v in 0..SM90_VARIANTS {
                    assert!(sm90_tiling(hs, v).unwrap().geometry(hs).2 <= 227 * 1024);
                }
            }
            // v0 at every padded head size, with whole 64-column blocks of shared memory
            assert_eq!(sm90_tiling(96, 0).unwrap().geometry(96), (64, 128, 100_352));
            assert_eq!(sm90_tiling(48, 0).unwrap().geometry(48), (64, 128, 51_200));
            assert_eq!(sm90_tiling(96, 1), None);
            assert_eq!(sm90_tiling(72, 0), None);
        }

        #[test]
        fn every_head_size_has_a_wgmma_instantiation() {
            let fwd = include_str!("attention_wgmma.cu");
            let bwd = include_str!("attention_wgmma_bwd.cu");
            for hs in (8..=128).step_by(8) {
                let w = wgmma_hs(hs);
                let fits = w % 16 == 0 && w >= hs && (w < hs + 16 || w == 32);
                assert!(fits, "hs {hs} -> {w}");
                assert!(sm90_tiling(w, 0).is_some(), "hs {hs}");
                // the instantiation lists name each padded size once per file
                assert!(fwd.contains(&format!("ATW_FWD_HS(E, sfx, {w})")), "hs {hs}");
                assert!(
                    bwd.contains(&format!("SM90_BWD_V0(E, sfx, {w})")),
                    "hs {hs}"
                );
                // (each with its `_qb` twin, which the QKV bias gradient option launches)
                assert!(bwd.contains("attention_backward_sm90_hs##HS##_v0_qb_##sfx"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_group_positions_in_order() {
        let (tokens, starts, positions) = token_buckets(&[5, 2, 5, 7, 2, 5]);
        assert_eq!(tokens, vec![2, 5, 7]);
        assert_eq!(starts, vec![0, 2, 5, 6]);
        assert_eq!(positions, vec![1, 4, 0, 2, 5, 3]);
    }

    #[test]
    fn token_buckets_match_a_sort_of_positions_by_id() {
        let mut rng = crate::data::Rng::new(3);
        for (n, vocab) in [(0usize, 1), (1, 1), (1000, 7), (5000, 50_257)] {
            let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
            let mut order: Vec<i32> = (0..n as i32).collect();
            order.sort_by_key(|&p| (ids[p as usize], p));
            let (tokens, starts, positions) = token_buckets(&ids);
            assert_eq!(positions, order);
            assert_eq!(starts.len(), tokens.len() + 1);
            assert_eq!(starts.last().copied(), Some(n as i32));
            for (k, &tok) in tokens.iter().enumerate() {
                let bucket = &positions[starts[k] as usize..starts[k + 1] as usize];
                assert!(!bucket.is_empty() && bucket.iter().all(|&p| ids[p as usize] == tok));
            }
            assert!(tokens.windows(2).all(|w| w[0] < w[1]));
        }
    }

    /// Every kernel source compiles for every architecture it is built for. Needs NVRTC and the
    /// CUDA headers but no GPU, so kernel edits can be compile-checked anywhere the toolkit (or
    /// the `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` wheels) is: point `LD_LIBRARY_PATH` at
    /// libnvrtc and `CUDA_INC` at the headers. The optional sm_90a modules would otherwise fail
    /// silently (the backend falls back to attention.cu). Skipped, with a line saying so, where
    /// NVRTC is missing (CI). `HALFLING_PTX_DUMP=DIR` writes the PTX there, to diff a
    /// refactor's output against the code before it.
    #[test]
    fn every_kernel_source_compiles_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC (libnvrtc.so) not found");
            return;
        }
        let include = match cuda_include_dir() {
            Ok(dir) => dir,
            Err(e) => {
                eprintln!("skipped: {e:#}");
                return;
            }
        };
        let dump = std::env::var_os("HALFLING_PTX_DUMP").map(PathBuf::from);
        let hopper = [
            ("attention_wgmma", ATTENTION_WGMMA_CU),
            ("attention_wgmma_bwd", ATTENTION_WGMMA_BWD_CU),
        ];
        let builds = BASE_MODULES
            .iter()
            .flat_map(|&(name, src)| [(name, src, "sm_80"), (name, src, "sm_90")])
            .chain(hopper.iter().map(|&(name, src)| (name, src, "sm_90a")));
        for (name, src, arch) in builds {
            let ptx = compile_ptx(name, src, arch, &include).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(ptx.contains(".entry"), "{name}.cu for {arch}: no kernels");
            if let Some(dir) = &dump {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(dir.join(format!("{name}-{arch}.ptx")), ptx).unwrap();
            }
        }
    }

    /// The CUBINs `HALFLING_CUDA_CUBIN=1` loads on an H100 build: ELF images naming their
    /// kernels. Skipped where NVRTC is missing, as above.
    #[test]
    fn hopper_cubins_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC (libnvrtc.so) not found");
            return;
        }
        let Ok(include) = cuda_include_dir() else {
            eprintln!("skipped: no CUDA headers");
            return;
        };
        // Each source with one kernel its CUBIN must hold (names the profile shows).
        let builds = [
            ("kernels", KERNELS_CU, "sm_90", "dropout_bf16"),
            (
                "attention",
                ATTENTION_CU,
                "sm_90",
                "attention_backward_preprocess_bf16",
            ),
            ("fp8", FP8_CU, "sm_90", "fp8_amax_partial_bf16"),
            (
                "attention_wgmma",
                ATTENTION_WGMMA_CU,
                "sm_90a",
                "attention_forward_wgmma_hs64_bf16",
            ),
            (
                "attention_wgmma_bwd",
                ATTENTION_WGMMA_BWD_CU,
                "sm_90a",
                "attention_backward_sm90_hs64_v0_bf16",
            ),
        ];
        assert_eq!(BASE_MODULES.map(|m| m.0), ["kernels", "attention", "fp8"]);
        for (name, src, arch, kernel) in builds {
            let cubin =
                compile_cubin(name, src, arch, &include).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(
                &cubin[..4],
                b"\x7fELF",
                "{name}.cu for {arch}: not an ELF image"
            );
            let named = cubin.windows(kernel.len()).any(|w| w == kernel.as_bytes());
            assert!(named, "{name}.cu for {arch}: no {kernel} in the CUBIN");
        }
    }

    #[test]
    fn backend_opens_where_cuda_is_and_errors_cleanly_where_it_is_not() {
        // On CI (no GPU) this checks the error path; on a GPU machine the success path.
        match (cuda_available(), CudaBackend::new(0)) {
            (true, Ok(be)) => assert_eq!(be.kind(), "cuda"),
            (true, Err(e)) => panic!("CUDA is present but the backend failed: {e:#}"),
            (false, Ok(_)) => panic!("backend opened without a usable GPU"),
            (false, Err(e)) => assert!(e.to_string().contains("--device cuda"), "{e:#}"),
        }
    }
}
