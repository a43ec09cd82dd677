// Device helpers shared by the Hopper attention kernels, attention_wgmma.cu (forward) and
// attention_wgmma_bwd.cu (backward), both compiled by NVRTC for sm_90a only. Not a file NVRTC
// includes: mod.rs prepends it to each of them (concat!), so every module sees one copy. All are
// __forceinline__ (or macros): a helper a module does not call emits no PTX.
//   - cp.async 16-byte copies into shared memory, commit / wait, the generic-to-async proxy fence
//   - wgmma fence / commit / wait, and the compiler fence for accumulators after a wait
//   - the 128-byte-swizzle shared-memory matrix descriptor
//   - wgmma m64nNk16 with f32 accumulators: Wg<E, N> (A and B from shared memory, N = 64, 128)
//     and WgRs<E, N> (A from registers, N = 32 .. 128 in steps of 16), E = bf16 or f16
//   - two floats packed into one register of E

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned long long u64;


__device__ __forceinline__ u32 sm90_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// cp.async of 16 bytes (L2 only); zero-fill when !pred (src-size 0: nothing is read).
__device__ __forceinline__ void sm90_cp16(u32 dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void sm90_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N committed cp.async groups are pending.
template <int N>
__device__ __forceinline__ void sm90_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes (cp.async) made visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void sm90_fence_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void sm90_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void sm90_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void sm90_wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// After a wgmma wait: the compiler must not move accesses of the accumulators across it.
template <int N>
__device__ __forceinline__ void sm90_fence_acc(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (mode 1 in bits 62-63): start address,
// leading and stride byte offsets, in 16-byte units. K-major: sbo = 1024 (8 rows of 128 bytes),
// lbo unused (16). MN-major: sbo = 1024 (the next 8 rows along K), lbo = the byte stride between
// 64-element column blocks.
__device__ __forceinline__ u64 sm90_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr >> 4) & 0x3FFFu) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) |
           ((u64)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

// Two floats rounded to E (nearest even) in one register, lo in the low 16 bits.
template <typename E> __device__ __forceinline__ u32 sm90_pack(float lo, float hi);
template <> __device__ __forceinline__ u32 sm90_pack<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}
template <> __device__ __forceinline__ u32 sm90_pack<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// ---- wgmma wrappers (m64nNk16, f32 accumulators) ------------------------------------------------
// The accumulator of N columns is N/2 f32 registers per thread, operands %0 .. %(N/2 - 1):
// SM90_ACC<N>(c) lists them with constraint c ("+f" read and written, "=f" written only) and
// SM90_REGS<N> their placeholders; the operands after them are numbered by the callers.
#define SM90_D8(c, i) c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), c(d[i + 7])
#define SM90_ACC32(c) SM90_D8(c, 0), SM90_D8(c, 8)
#define SM90_ACC48(c) SM90_ACC32(c), SM90_D8(c, 16)
#define SM90_ACC64(c) SM90_ACC48(c), SM90_D8(c, 24)
#define SM90_ACC80(c) SM90_ACC64(c), SM90_D8(c, 32)
#define SM90_ACC96(c) SM90_ACC80(c), SM90_D8(c, 40)
#define SM90_ACC112(c) SM90_ACC96(c), SM90_D8(c, 48)
#define SM90_ACC128(c) SM90_ACC112(c), SM90_D8(c, 56)
#define SM90_REGS32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define SM90_REGS48 SM90_REGS32 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define SM90_REGS64 SM90_REGS48 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define SM90_REGS80 SM90_REGS64 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define SM90_REGS96 SM90_REGS80 ", %40, %41, %42, %43, %44, %45, %46, %47"
#define SM90_REGS112 SM90_REGS96 ", %48, %49, %50, %51, %52, %53, %54, %55"
#define SM90_REGS128 SM90_REGS112 ", %56, %57, %58, %59, %60, %61, %62, %63"

// D (64 x N, f32) (+)= A·B^T, A = [64][16] and B = [N][16] both K-major in shared memory
// (descriptors); N = 64 or 128 (a tile of keys or queries). ss0 overwrites D, which it only
// writes ("=f": accumulators are never zeroed by ordinary instructions, ptxas then serializes
// every wgmma); ss1 accumulates; ss overwrites iff scale_d == 0 (D read and written).
// DA, DB, P: the operand numbers of the two descriptors and of scale-d (after the accumulator).
template <typename E, int N>
struct Wg;
#define SM90_SS_ASM(TY, N, DA, DB, P)                                                             \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                              \
    "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" SM90_REGS##N "}, %" #DA     \
    ", %" #DB ", p, 1, 1, 0, 0;\n}\n"
#define SM90_SS(E, TY, N, DA, DB, P)                                                              \
    template <>                                                                                   \
    struct Wg<E, N> {                                                                             \
        static __device__ __forceinline__ void ss(float (&d)[N / 2], u64 da, u64 db, int scale_d) { \
            asm volatile(SM90_SS_ASM(TY, N, DA, DB, P) : SM90_ACC##N("+f") : "l"(da), "l"(db), "r"(scale_d)); \
        }                                                                                         \
        static __device__ __forceinline__ void ss0(float (&d)[N / 2], u64 da, u64 db) {           \
            asm volatile(SM90_SS_ASM(TY, N, DA, DB, P) : SM90_ACC##N("=f") : "l"(da), "l"(db), "r"(0)); \
        }                                                                                         \
        static __device__ __forceinline__ void ss1(float (&d)[N / 2], u64 da, u64 db) { ss(d, da, db, 1); } \
    };
SM90_SS(__nv_bfloat16, "bf16", 64, 32, 33, 34)
SM90_SS(__nv_bfloat16, "bf16", 128, 64, 65, 66)
SM90_SS(__half, "f16", 64, 32, 33, 34)
SM90_SS(__half, "f16", 128, 64, 65, 66)

// D (64 x N) (+)= A (64 x 16, registers: the accumulator-shaped fragments, i.e. the mma.sync
// A-fragment layout per warp) * B (16 x N, MN-major in shared memory: a descriptor); N = the
// padded head size HS (a multiple of 16, 32 .. 128). rs accumulates iff acc != 0 (a predicate);
// rs1 always accumulates (scale-d an immediate 1).
template <typename E, int N>
struct WgRs;
#define SM90_RS(E, TY, N, A0, A1, A2, A3, B, P)                                                      \
    template <>                                                                                      \
    struct WgRs<E, N> {                                                                              \
        static __device__ __forceinline__ void rs(float (&d)[N / 2], const u32 (&a)[4], u64 db, int acc) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                             \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" SM90_REGS##N \
                         "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 1;\n}\n"      \
                         : SM90_ACC##N("+f")                                                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));            \
        }                                                                                            \
        static __device__ __forceinline__ void rs1(float (&d)[N / 2], const u32 (&a)[4], u64 db) {   \
            asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" SM90_REGS##N  \
                         "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", 1, 1, 1, 1;\n"          \
                         : SM90_ACC##N("+f")                                                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                      \
        }                                                                                            \
    };
#define SM90_RS_SIZES(E, TY)                      \
    SM90_RS(E, TY, 32, 16, 17, 18, 19, 20, 21)    \
    SM90_RS(E, TY, 48, 24, 25, 26, 27, 28, 29)    \
    SM90_RS(E, TY, 64, 32, 33, 34, 35, 36, 37)    \
    SM90_RS(E, TY, 80, 40, 41, 42, 43, 44, 45)    \
    SM90_RS(E, TY, 96, 48, 49, 50, 51, 52, 53)    \
    SM90_RS(E, TY, 112, 56, 57, 58, 59, 60, 61)   \
    SM90_RS(E, TY, 128, 64, 65, 66, 67, 68, 69)
SM90_RS_SIZES(__nv_bfloat16, "bf16")
SM90_RS_SIZES(__half, "f16")
