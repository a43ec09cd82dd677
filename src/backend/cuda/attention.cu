// Fused causal self-attention (flash-style), forward and backward, for halfling.
// Compiled by NVRTC for sm_90 (no fast math). Never materialises T x T in global memory.
// Deterministic: no atomics; every reduction has a fixed order.
//
// ---------------------------------------------------------------------------------------------
// LAYOUT (all kernels)
//   qkv  [B, T_, 3C]: row (b,t) = [q (C) | k (C) | v (C)], head h uses columns h*hs .. h*hs+hs-1
//        of each part; hs = C / NH.
//   out  [B, T_, C]  : out[(b*T_+t)*C + h*hs + d]
//   lse  [B, NH, T_] (float): lse[(b*NH+h)*T_+t] = ln sum_{s<=t} exp(q_t.k_s / sqrt(hs))
//   dqkv [B, T_, 3C] : same layout as qkv; fully overwritten by the backward pass.
//   D    [B, NH, T_] (float scratch, B*NH*T_ floats): D[(b*NH+h)*T_+t] = sum_d dout*out / out_scale.
//   out_scale (every kernel's last argument; 1 outside unit scaling): the forward writes
//        out_scale * softmax(q k^T / sqrt(hs)) v, the backward is its exact derivative.
//   Element types: every kernel named _bf16 has an _f16 twin (__half instead of __nv_bfloat16,
//   same geometry; the tensor-core path is templated on the element type E).
//
// SUPPORTED HEAD SIZES: hs = C/NH must be a multiple of 8 with 8 <= hs <= 128 (C % NH == 0).
//   The host picks the variant by head size:  HS = 64 if hs <= 64, else HS = 128 (hs <= 128).
//   Any other hs (not a multiple of 8, or > 128) must be refused by the host with an error.
//   T_ >= 1 arbitrary (no multiple-of-tile requirement), B, NH >= 1 arbitrary.
//   Pointers: only element-size alignment is assumed (16-byte vector paths are used when the
//   base pointer happens to be 16-byte aligned, scalar fallbacks otherwise).
//
// EXTERN NAMES AND EXACT LAUNCH GEOMETRY. Let BH = B*NH. All launches on one stream.
//
//   Forward (one launch):
//     attention_forward_hs64_bf16 (bf16* out, float* lse, const bf16* qkv, int B, int T_, int C, int NH,
//                                  float out_scale)
//         grid = (BH, ceil(T_/128), 1), block = 256, dyn smem = 36,864 B    [tensor cores, mma.sync]
//     attention_forward_hs128_bf16(same signature)
//         grid = (BH, ceil(T_/128), 1), block = 128, dyn smem = 69,632 B
//     attention_forward_hs64_f32  (float* out, float* lse, const float* qkv, int B, int T_, int C, int NH,
//                                  float out_scale)
//     attention_forward_hs128_f32 (same signature)
//         grid = (BH, ceil(T_/32), 1),  block = 128, dyn smem = 0     [CUDA cores, fp32]
//
//   Backward (two launches, in this order):
//     1) attention_backward_preprocess_bf16(float* D, const bf16* dout, const bf16* out,
//                                           int B, int T_, int C, int NH, float out_scale)
//        attention_backward_preprocess_f32 (float* D, const float* dout, const float* out, same ints, out_scale)
//         grid = (ceil(BH*T_/32), 1, 1), block = 256, dyn smem = 0
//     2) attention_backward_hs64_bf16 (bf16* dqkv, const bf16* dout, const bf16* qkv,
//                                      const float* lse, const float* D, int B, int T_, int C, int NH,
//                                      float out_scale)
//         grid = (BH, ceil(T_/128), 2), block = 256, dyn smem = 55,808 B
//        attention_backward_hs128_bf16(same signature)
//         grid = (BH, ceil(T_/64), 2),  block = 128, dyn smem = 69,632 B
//          -> every bf16 kernel uses DYNAMIC shared memory, most of them > 48 KB: the host raises
//             CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES and passes the byte count at launch.
//             The host (mod.rs, `mod attention`) derives these numbers from the tilings instantiated
//             at the end of this file (AttFwd / AttKV / AttQ): change both together.
//        attention_backward_hs64_f32  (float* dqkv, const float* dout, const float* qkv,
//                                      const float* lse, const float* D, int B, int T_, int C, int NH,
//                                      float out_scale)
//        attention_backward_hs128_f32 (same signature)
//         grid = (BH, ceil(T_/32), 2), block = 128, dyn smem = 0
//        (blockIdx.z == 0 blocks compute dK,dV over key blocks; blockIdx.z == 1 blocks compute dQ
//         over query blocks; together they overwrite every element of dqkv.)
//     Scratch: D, B*NH*T_ floats (written by 1, read by 2). `out` is read only by 1.
//   grid.y (= ceil(T_/tile)) must be <= 65535: always true for T_ <= 2,097,120.
//
// BF16 TILING (mma.sync m16n8k16, fp32 accumulators; every warp owns MT 16-row tiles):
//   forward hs64 : 8 warps x 16 queries = 128 queries/block, key tiles of 64, Q in registers
//   forward hs128: 4 warps x 32 queries = 128 queries/block, key tiles of 32, Q re-read from smem
//                  (at hs128 two m16 tiles per warp halve the ldmatrix traffic per mma and win)
//   backward hs64 : 8 warps x 16 rows = 128 keys (dK,dV) / queries (dQ) per block, tiles of 32
//   backward hs128: 4 warps x 16 rows = 64 keys / queries per block, tiles of 16 (dK,dV) / 32 (dQ)
//   K/V (resp. Q/dO) tiles are double buffered with cp.async; only tiles crossing a warp's
//   diagonal (or the end of the sequence) are masked; warps skip tiles wholly in their future;
//   blocks are ordered so the longest causal rows start first. Measured on the H100 (GPT-2 124M
//   and 0.91B shapes), resident warps per SM mattered more than fragment reuse: the tilings above
//   are the fastest of ~25 measured (smaller tiles with more blocks per SM beat 2-tile warps at
//   hs64; 32-row warps only paid for the hs128 forward).
//   Folding dQ into the dK/dV half (5 matmuls instead of 7; dQ summed over key blocks in fp32
//   global scratch in a fixed key-block order through per-query-tile counters, so still no
//   atomics) was built, passed the selftest bit-reproducibly, and measured SLOWER on the H100:
//   0.91B backward 1.21 ms/call (with the hand-off pipelined one step) against 1.00 ms here,
//   124M 0.71 against 0.60 (unpipelined). Kept in the git history of the `attn` branch.
//
// NUMERICS: float accumulation everywhere; softmax in the log2 domain: bf16 kernels fold
// scale*log2(e) into one FFMA per score and use ex2.approx (MUFU, ~2 ulp; the f32 path uses the
// exp2f/log2f library calls); lse stored in natural log.
// bf16 path: Q,K,V,dO, and P / dS (rounded to bf16) are tensor-core operands, accumulation fp32
// (the usual FlashAttention-2 practice). f32 path: pure fp32 CUDA-core arithmetic.
// ---------------------------------------------------------------------------------------------

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int att_u32;

#define ATT_LN2 0.6931471805599453f
#define ATT_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float att_to_f(float x) { return x; }
__device__ __forceinline__ float att_to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float att_to_f(__half x) { return __half2float(x); }

// ============================================================================================
// Backward preprocess: D = rowsum(dout * out) per (b, h, t). 8 lanes per row (32 rows per
// 256-thread block); lane u sums the 8-element chunks d = 8u + 64j with 16-byte loads, then a
// fixed xor butterfly over the 8 lanes (deterministic). hs is a multiple of 8 (host-checked).
// ============================================================================================
__device__ __forceinline__ float att_dot8(const float* a, const float* b, bool vec) {
    float acc = 0.f;
    if (vec) {
        const float4 a0 = reinterpret_cast<const float4*>(a)[0], a1 = reinterpret_cast<const float4*>(a)[1];
        const float4 b0 = reinterpret_cast<const float4*>(b)[0], b1 = reinterpret_cast<const float4*>(b)[1];
        acc = a0.x * b0.x + a0.y * b0.y + a0.z * b0.z + a0.w * b0.w;
        acc += a1.x * b1.x + a1.y * b1.y + a1.z * b1.z + a1.w * b1.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) acc += a[e] * b[e];
    }
    return acc;
}
__device__ __forceinline__ float att_dot8(const __nv_bfloat16* a, const __nv_bfloat16* b, bool vec) {
    float acc = 0.f;
    if (vec) {
        const uint4 ua = *reinterpret_cast<const uint4*>(a), ub = *reinterpret_cast<const uint4*>(b);
        const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&ua);
        const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&ub);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 fa = __bfloat1622float2(pa[e]), fb = __bfloat1622float2(pb[e]);
            acc += fa.x * fb.x + fa.y * fb.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) acc += __bfloat162float(a[e]) * __bfloat162float(b[e]);
    }
    return acc;
}
__device__ __forceinline__ float att_dot8(const __half* a, const __half* b, bool vec) {
    float acc = 0.f;
    if (vec) {
        const uint4 ua = *reinterpret_cast<const uint4*>(a), ub = *reinterpret_cast<const uint4*>(b);
        const __half2* pa = reinterpret_cast<const __half2*>(&ua);
        const __half2* pb = reinterpret_cast<const __half2*>(&ub);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 fa = __half22float2(pa[e]), fb = __half22float2(pb[e]);
            acc += fa.x * fb.x + fa.y * fb.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) acc += __half2float(a[e]) * __half2float(b[e]);
    }
    return acc;
}

// D is stored divided by the forward's out_scale s (which `out` includes): the main kernels then
// form dS / s = P (dP − D/s) with the unscaled dout and multiply s back in when they store dQ, dK
// and dV, which is the derivative of the scaled forward (the CPU reads dout as s·dout instead).
template <typename T>
__device__ __forceinline__ void attn_bwd_pre(float* D, const T* dout, const T* out, int B, int T_,
                                             int C, int NH, float out_scale) {
    const int hs = C / NH;
    const int row = blockIdx.x * 32 + (threadIdx.x >> 3);  // (b*NH + h)*T_ + t
    const int u = threadIdx.x & 7;
    const bool ok = row < B * NH * T_;
    const bool vec = ((((size_t)dout) | ((size_t)out)) & 15) == 0;
    float acc = 0.f;
    if (ok) {
        const int t = row % T_;
        const int bh = row / T_;
        const int h = bh % NH;
        const int b = bh / NH;
        const long long off = ((long long)b * T_ + t) * C + (long long)h * hs;
        for (int d = 8 * u; d < hs; d += 64) acc += att_dot8(dout + off + d, out + off + d, vec);
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (ok && u == 0) D[row] = acc / out_scale;
}

extern "C" __global__ void __launch_bounds__(256)
attention_backward_preprocess_f32(float* D, const float* dout, const float* out, int B, int T_,
                                  int C, int NH, float out_scale) {
    attn_bwd_pre<float>(D, dout, out, B, T_, C, NH, out_scale);
}
extern "C" __global__ void __launch_bounds__(256)
attention_backward_preprocess_bf16(float* D, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                                   int B, int T_, int C, int NH, float out_scale) {
    attn_bwd_pre<__nv_bfloat16>(D, dout, out, B, T_, C, NH, out_scale);
}
extern "C" __global__ void __launch_bounds__(256)
attention_backward_preprocess_f16(float* D, const __half* dout, const __half* out, int B, int T_,
                                  int C, int NH, float out_scale) {
    attn_bwd_pre<__half>(D, dout, out, B, T_, C, NH, out_scale);
}

// ============================================================================================
// fp32 path (CUDA cores). 128 threads = 32 rows x 4 threads; thread u of a row owns the head
// dims d = 16*i + 4*u + e (i < HS/16, e < 4). Dot products: per-thread partial + fixed quad
// butterfly (bitwise identical on all 4 threads). Tiles of 32 rows in shared memory [32][HS].
// ============================================================================================
#define ATT_F32_R 32

__device__ __forceinline__ float4 att_ld4(const float* p, bool vec) {
    if (vec) return *reinterpret_cast<const float4*>(p);
    return make_float4(p[0], p[1], p[2], p[3]);
}

__device__ __forceinline__ float att_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Rows row0 .. row0+R-1 of a [T_, stride] matrix (pointer already at the head's column 0) into
// sm[R][HS]; columns [hs, hs16) and rows >= T_ are zero-filled.
template <int HS>
__device__ __forceinline__ void att_load_tile_f32(float* sm, const float* g, int stride, int row0,
                                                  int T_, int hs, int hs16, bool vec) {
    const int nch = hs16 >> 2;
    for (int idx = threadIdx.x; idx < ATT_F32_R * nch; idx += blockDim.x) {
        const int r = idx / nch;
        const int c = (idx - r * nch) << 2;
        const int t = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < T_ && c < hs) v = att_ld4(g + (long long)t * stride + c, vec);
        *reinterpret_cast<float4*>(sm + r * HS + c) = v;
    }
}

template <int HS>
__device__ __forceinline__ void att_fwd_f32(float* out, float* lse, const float* qkv, int B, int T_,
                                            int C, int NH, float out_scale) {
    constexpr int R = ATT_F32_R;
    constexpr int NCH = HS / 16;
    __shared__ __align__(16) float Ks[R * HS];
    __shared__ __align__(16) float Vs[R * HS];

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + R - 1) / R;
    const int qb = nqb - 1 - (int)blockIdx.y;  // heaviest query blocks first
    const int r = threadIdx.x >> 2, u = threadIdx.x & 3;
    const int q0 = qb * R, t = q0 + r;
    const int C3 = 3 * C;
    const float* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const bool vec = (((size_t)qkv) & 15) == 0;
    const float cs = (1.0f / sqrtf((float)hs)) * LOG2E;

    float q[NCH][4], o[NCH][4];
#pragma unroll
    for (int i = 0; i < NCH; i++) {
        const int d = 16 * i + 4 * u;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < T_ && d < hs) v = att_ld4(base + (long long)t * C3 + d, vec);
        q[i][0] = v.x; q[i][1] = v.y; q[i][2] = v.z; q[i][3] = v.w;
        o[i][0] = 0.f; o[i][1] = 0.f; o[i][2] = 0.f; o[i][3] = 0.f;
    }
    float m = ATT_NEG_INF, l = 0.f;
    const int kend = min(q0 + R, T_);
    for (int k0 = 0; k0 < kend; k0 += R) {
        __syncthreads();
        att_load_tile_f32<HS>(Ks, base + C, C3, k0, T_, hs, hs16, vec);
        att_load_tile_f32<HS>(Vs, base + 2 * C, C3, k0, T_, hs, hs16, vec);
        __syncthreads();
        const bool need_mask = (k0 + R - 1 > q0) || (k0 + R > T_);
        float s[R];
        float tmax = ATT_NEG_INF;
#pragma unroll
        for (int j = 0; j < R; j++) {
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                if (16 * i < hs) {
                    const float4 kk = *reinterpret_cast<const float4*>(Ks + j * HS + 16 * i + 4 * u);
                    acc += q[i][0] * kk.x;
                    acc += q[i][1] * kk.y;
                    acc += q[i][2] * kk.z;
                    acc += q[i][3] * kk.w;
                }
            }
            acc = att_quad_sum(acc);
            float x = acc * cs;
            const int sk = k0 + j;
            if (need_mask && (sk > t || sk >= T_)) x = ATT_NEG_INF;
            s[j] = x;
            tmax = fmaxf(tmax, x);
        }
        const float mnew = fmaxf(m, tmax);
        const float mref = (mnew == ATT_NEG_INF) ? 0.f : mnew;
        const float corr = exp2f(m - mref);
        m = mnew;
        l *= corr;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            o[i][0] *= corr; o[i][1] *= corr; o[i][2] *= corr; o[i][3] *= corr;
        }
#pragma unroll
        for (int j = 0; j < R; j++) {
            const float p = exp2f(s[j] - mref);
            l += p;
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                if (16 * i < hs) {
                    const float4 vv = *reinterpret_cast<const float4*>(Vs + j * HS + 16 * i + 4 * u);
                    o[i][0] += p * vv.x;
                    o[i][1] += p * vv.y;
                    o[i][2] += p * vv.z;
                    o[i][3] += p * vv.w;
                }
            }
        }
    }
    if (t < T_) {
        const float inv = out_scale / l;
        float* op = out + ((long long)b * T_ + t) * C + (long long)h * hs;
        const bool ovec = (((size_t)out) & 15) == 0;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const int d = 16 * i + 4 * u;
            if (d < hs) {
                const float4 v = make_float4(o[i][0] * inv, o[i][1] * inv, o[i][2] * inv, o[i][3] * inv);
                if (ovec) {
                    *reinterpret_cast<float4*>(op + d) = v;
                } else {
                    op[d] = v.x; op[d + 1] = v.y; op[d + 2] = v.z; op[d + 3] = v.w;
                }
            }
        }
        if (u == 0) lse[(long long)bh * T_ + t] = (m + log2f(l)) * ATT_LN2;
    }
}

// dK, dV for the 32 keys k0..k0+31 (blockIdx.z == 0). smem: Qs[32][HS], dOs[32][HS], Ls[32], Ds[32].
template <int HS>
__device__ __forceinline__ void att_bwd_dkdv_f32(float* smem, float* dqkv, const float* dout,
                                                 const float* qkv, const float* lse, const float* D,
                                                 int B, int T_, int C, int NH, float out_scale) {
    constexpr int R = ATT_F32_R;
    constexpr int NCH = HS / 16;
    float* Qs = smem;
    float* dOs = smem + R * HS;
    float* Ls = smem + 2 * R * HS;
    float* Ds = Ls + R;

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int kb = blockIdx.y;  // small kb = most work: scheduled first
    const int r = threadIdx.x >> 2, u = threadIdx.x & 3;
    const int k0 = kb * R, sk = k0 + r;
    const int C3 = 3 * C;
    const float* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const float* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const bool vec = ((((size_t)qkv) | ((size_t)dout)) & 15) == 0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * LOG2E;

    float kr[NCH][4], vr[NCH][4], dk[NCH][4], dv[NCH][4];
#pragma unroll
    for (int i = 0; i < NCH; i++) {
        const int d = 16 * i + 4 * u;
        float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
        if (sk < T_ && d < hs) {
            kv = att_ld4(base + (long long)sk * C3 + C + d, vec);
            vv = att_ld4(base + (long long)sk * C3 + 2 * C + d, vec);
        }
        kr[i][0] = kv.x; kr[i][1] = kv.y; kr[i][2] = kv.z; kr[i][3] = kv.w;
        vr[i][0] = vv.x; vr[i][1] = vv.y; vr[i][2] = vv.z; vr[i][3] = vv.w;
#pragma unroll
        for (int e = 0; e < 4; e++) { dk[i][e] = 0.f; dv[i][e] = 0.f; }
    }
    for (int q0 = k0; q0 < T_; q0 += R) {
        __syncthreads();
        att_load_tile_f32<HS>(Qs, base, C3, q0, T_, hs, hs16, vec);
        att_load_tile_f32<HS>(dOs, dbase, C, q0, T_, hs, hs16, vec);
        if (threadIdx.x < R) {
            const int tq = q0 + threadIdx.x;
            Ls[threadIdx.x] = tq < T_ ? lse[(long long)bh * T_ + tq] * LOG2E : 0.f;
            Ds[threadIdx.x] = tq < T_ ? D[(long long)bh * T_ + tq] : 0.f;
        }
        __syncthreads();
        const bool need_mask = (q0 < k0 + R - 1) || (q0 + R > T_);
#pragma unroll 4
        for (int j = 0; j < R; j++) {
            const int tq = q0 + j;
            const float* qrow = Qs + j * HS;
            const float* orow = dOs + j * HS;
            float acc = 0.f, dacc = 0.f;
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                if (16 * i < hs) {
                    const float4 qq = *reinterpret_cast<const float4*>(qrow + 16 * i + 4 * u);
                    const float4 oo = *reinterpret_cast<const float4*>(orow + 16 * i + 4 * u);
                    acc += kr[i][0] * qq.x; acc += kr[i][1] * qq.y;
                    acc += kr[i][2] * qq.z; acc += kr[i][3] * qq.w;
                    dacc += vr[i][0] * oo.x; dacc += vr[i][1] * oo.y;
                    dacc += vr[i][2] * oo.z; dacc += vr[i][3] * oo.w;
                }
            }
            acc = att_quad_sum(acc);
            dacc = att_quad_sum(dacc);
            float p = exp2f(acc * cs - Ls[j]);
            if (need_mask && (tq < sk || tq >= T_)) p = 0.f;
            const float ds = p * (dacc - Ds[j]);
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                if (16 * i < hs) {
                    const float4 qq = *reinterpret_cast<const float4*>(qrow + 16 * i + 4 * u);
                    const float4 oo = *reinterpret_cast<const float4*>(orow + 16 * i + 4 * u);
                    dv[i][0] += p * oo.x; dv[i][1] += p * oo.y;
                    dv[i][2] += p * oo.z; dv[i][3] += p * oo.w;
                    dk[i][0] += ds * qq.x; dk[i][1] += ds * qq.y;
                    dk[i][2] += ds * qq.z; dk[i][3] += ds * qq.w;
                }
            }
        }
    }
    if (sk < T_) {
        float* dp = dqkv + ((long long)b * T_ + sk) * C3 + (long long)h * hs;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const int d = 16 * i + 4 * u;
            if (d < hs) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    dp[C + d + e] = dk[i][e] * (scale * out_scale);
                    dp[2 * C + d + e] = dv[i][e] * out_scale;
                }
            }
        }
    }
}

// dQ for the 32 queries of block (blockIdx.z == 1). smem: Ks[32][HS], Vs[32][HS].
template <int HS>
__device__ __forceinline__ void att_bwd_dq_f32(float* smem, float* dqkv, const float* dout,
                                               const float* qkv, const float* lse, const float* D,
                                               int B, int T_, int C, int NH, float out_scale) {
    constexpr int R = ATT_F32_R;
    constexpr int NCH = HS / 16;
    float* Ks = smem;
    float* Vs = smem + R * HS;

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + R - 1) / R;
    const int qb = nqb - 1 - (int)blockIdx.y;
    const int r = threadIdx.x >> 2, u = threadIdx.x & 3;
    const int q0 = qb * R, t = q0 + r;
    const int C3 = 3 * C;
    const float* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const float* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const bool vec = ((((size_t)qkv) | ((size_t)dout)) & 15) == 0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * LOG2E;

    float qr[NCH][4], dor[NCH][4], dq[NCH][4];
#pragma unroll
    for (int i = 0; i < NCH; i++) {
        const int d = 16 * i + 4 * u;
        float4 qv = make_float4(0.f, 0.f, 0.f, 0.f), ov = qv;
        if (t < T_ && d < hs) {
            qv = att_ld4(base + (long long)t * C3 + d, vec);
            ov = att_ld4(dbase + (long long)t * C + d, vec);
        }
        qr[i][0] = qv.x; qr[i][1] = qv.y; qr[i][2] = qv.z; qr[i][3] = qv.w;
        dor[i][0] = ov.x; dor[i][1] = ov.y; dor[i][2] = ov.z; dor[i][3] = ov.w;
#pragma unroll
        for (int e = 0; e < 4; e++) dq[i][e] = 0.f;
    }
    const float L = t < T_ ? lse[(long long)bh * T_ + t] * LOG2E : 0.f;
    const float Dt = t < T_ ? D[(long long)bh * T_ + t] : 0.f;
    const int kend = min(q0 + R, T_);
    for (int k0 = 0; k0 < kend; k0 += R) {
        __syncthreads();
        att_load_tile_f32<HS>(Ks, base + C, C3, k0, T_, hs, hs16, vec);
        att_load_tile_f32<HS>(Vs, base + 2 * C, C3, k0, T_, hs, hs16, vec);
        __syncthreads();
        const bool need_mask = (k0 + R - 1 > q0) || (k0 + R > T_);
#pragma unroll 4
        for (int j = 0; j < R; j++) {
            const int sk = k0 + j;
            const float* krow = Ks + j * HS;
            const float* vrow = Vs + j * HS;
            float acc = 0.f, dacc = 0.f;
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                if (16 * i < hs) {
                    const float4 kk = *reinterpret_cast<const float4*>(krow + 16 * i + 4 * u);
                    const float4 vv = *reinterpret_cast<const float4*>(vrow + 16 * i + 4 * u);
                    acc += qr[i][0] * kk.x; acc += qr[i][1] * kk.y;
                    acc += qr[i][2] * kk.z; acc += qr[i][3] * kk.w;
                    dacc += dor[i][0] * vv.x; dacc += dor[i][1] * vv.y;
                    dacc += dor[i][2] * vv.z; dacc += dor[i][3] * vv.w;
                }
            }
            acc = att_quad_sum(acc);
            dacc = att_quad_sum(dacc);
            float p = exp2f(acc * cs - L);
            if (need_mask && (sk > t || sk >= T_)) p = 0.f;
            const float ds = p * (dacc - Dt);
#pragma unroll
            for (int i = 0; i < NCH; i++) {
                if (16 * i < hs) {
                    const float4 kk = *reinterpret_cast<const float4*>(krow + 16 * i + 4 * u);
                    dq[i][0] += ds * kk.x; dq[i][1] += ds * kk.y;
                    dq[i][2] += ds * kk.z; dq[i][3] += ds * kk.w;
                }
            }
        }
    }
    if (t < T_) {
        float* dp = dqkv + ((long long)b * T_ + t) * C3 + (long long)h * hs;
#pragma unroll
        for (int i = 0; i < NCH; i++) {
            const int d = 16 * i + 4 * u;
            if (d < hs) {
#pragma unroll
                for (int e = 0; e < 4; e++) dp[d + e] = dq[i][e] * (scale * out_scale);
            }
        }
    }
}

template <int HS>
__device__ __forceinline__ void att_bwd_f32(float* dqkv, const float* dout, const float* qkv,
                                            const float* lse, const float* D, int B, int T_, int C,
                                            int NH, float out_scale) {
    __shared__ __align__(16) float smem[2 * ATT_F32_R * HS + 2 * ATT_F32_R];
    if (blockIdx.z == 0)
        att_bwd_dkdv_f32<HS>(smem, dqkv, dout, qkv, lse, D, B, T_, C, NH, out_scale);
    else
        att_bwd_dq_f32<HS>(smem, dqkv, dout, qkv, lse, D, B, T_, C, NH, out_scale);
}

extern "C" __global__ void __launch_bounds__(128)
attention_forward_hs64_f32(float* out, float* lse, const float* qkv, int B, int T_, int C, int NH,
                           float out_scale) {
    att_fwd_f32<64>(out, lse, qkv, B, T_, C, NH, out_scale);
}
extern "C" __global__ void __launch_bounds__(128)
attention_forward_hs128_f32(float* out, float* lse, const float* qkv, int B, int T_, int C, int NH,
                            float out_scale) {
    att_fwd_f32<128>(out, lse, qkv, B, T_, C, NH, out_scale);
}
extern "C" __global__ void __launch_bounds__(128)
attention_backward_hs64_f32(float* dqkv, const float* dout, const float* qkv, const float* lse,
                            const float* D, int B, int T_, int C, int NH, float out_scale) {
    att_bwd_f32<64>(dqkv, dout, qkv, lse, D, B, T_, C, NH, out_scale);
}
extern "C" __global__ void __launch_bounds__(128)
attention_backward_hs128_f32(float* dqkv, const float* dout, const float* qkv, const float* lse,
                             const float* D, int B, int T_, int C, int NH, float out_scale) {
    att_bwd_f32<128>(dqkv, dout, qkv, lse, D, B, T_, C, NH, out_scale);
}

// ============================================================================================
// bf16 path (and f16: every function below is templated on the element type E, bf16 or f16; the
// names keep "bf16"): tensor cores via mma.sync.m16n8k16 (E in, fp32 accumulate), ldmatrix from
// shared memory tiles [rows][HS+8] (the +8 bf16 pad makes ldmatrix conflict-free).
// Each warp owns 16 rows (queries in forward / dQ, keys in dK,dV). Fragment layout
// (g = lane>>2, t4 = lane&3): C/D c0,c1 = (row g, cols 2t4, 2t4+1), c2,c3 = (row g+8, same).
// Columns [hs, round16(hs)) of every tile are zero-filled so the head-dim reduction can run in
// whole k=16 steps; rows >= T_ are zero-filled.
// ============================================================================================

__device__ __forceinline__ att_u32 att_smem_addr(const void* p) {
    return (att_u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void att_ldsm_x4(att_u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(att_smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void att_ldsm_x4_t(att_u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(att_smem_addr(p))
                 : "memory");
}
// D += A·B on the tensor cores, A and B in E (bf16 or f16), D in f32.
template <typename E>
__device__ __forceinline__ void att_mma(float (&c)[4], const att_u32 (&a)[4], att_u32 b0, att_u32 b1);
template <>
__device__ __forceinline__ void att_mma<__nv_bfloat16>(float (&c)[4], const att_u32 (&a)[4], att_u32 b0, att_u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void att_mma<__half>(float (&c)[4], const att_u32 (&a)[4], att_u32 b0, att_u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats rounded to E (nearest even) in one register, lo in the low 16 bits.
template <typename E> __device__ __forceinline__ att_u32 att_pack(float lo, float hi);
template <> __device__ __forceinline__ att_u32 att_pack<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<att_u32*>(&v);
}
template <> __device__ __forceinline__ att_u32 att_pack<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<att_u32*>(&v);
}
// The two 16-bit halves of v to p[0] (low) and p[1], for a p that is not 4-byte aligned.
template <typename E> __device__ __forceinline__ void att_st2(E* p, att_u32 v) {
    reinterpret_cast<unsigned short*>(p)[0] = (unsigned short)(v & 0xffffu);
    reinterpret_cast<unsigned short*>(p)[1] = (unsigned short)(v >> 16);
}

// Address (per lane) for an A fragment (16 rows x 16 cols, rows m0.., cols k0..) of a
// row-major tile; also used for "B from an [n][k] tile" with rows/cols swapped below.
//   A:            row m0 + (lane&7) + ((lane>>3)&1)*8, col k0 + (lane>>4)*8   -> a0..a3
//   B (non-trans, tile stored [n][k]): row n0 + (lane&7) + (lane>>4)*8,
//                 col k0 + ((lane>>3)&1)*8  -> {b0,b1} of n-tile n0, {b0,b1} of n-tile n0+8
//   B (trans, tile stored [k][n]):    row k0 + (lane&7) + ((lane>>3)&1)*8,
//                 col n0 + (lane>>4)*8      -> {b0,b1} of n-tile n0, {b0,b1} of n-tile n0+8
template <int HSP, typename E>
__device__ __forceinline__ const E* att_a_ptr(const E* s, int m0, int k0, int lane) {
    return s + (m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * HSP + k0 + (lane >> 4) * 8;
}
template <int HSP, typename E>
__device__ __forceinline__ const E* att_bn_ptr(const E* s, int n0, int k0, int lane) {
    return s + (n0 + (lane & 7) + (lane >> 4) * 8) * HSP + k0 + ((lane >> 3) & 1) * 8;
}
template <int HSP, typename E>
__device__ __forceinline__ const E* att_bt_ptr(const E* s, int k0, int n0, int lane) {
    return s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * HSP + n0 + (lane >> 4) * 8;
}

// cp.async (16-byte, L2 only) with zero-fill when !pred (src-size 0: nothing is read).
__device__ __forceinline__ void att_cp16(void* sdst, const void* gsrc, bool pred) {
    const int sz = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(att_smem_addr(sdst)), "l"(gsrc),
                 "r"(sz)
                 : "memory");
}
__device__ __forceinline__ void att_cp4(void* sdst, const void* gsrc, bool pred) {
    const int sz = pred ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(att_smem_addr(sdst)), "l"(gsrc),
                 "r"(sz)
                 : "memory");
}
__device__ __forceinline__ void att_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void att_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows row0 .. row0+NROWS-1 of a [T_, stride] bf16 matrix (g = the head's column 0 of row 0) into
// sm[NROWS][HS+8], columns [0, hs16): zero for rows >= T_ or columns >= hs. Asynchronous (cp.async,
// caller commits/waits) when the tensor base is 16-byte aligned (vec), synchronous otherwise.
template <int HS, int NROWS, int NTH, typename E>
__device__ __forceinline__ void att_tile_async(E* sm, const E* g, int stride,
                                               int row0, int T_, int hs, int hs16, bool vec) {
    constexpr int HSP = HS + 8, CH = HS / 8, TOTAL = NROWS * CH, ITERS = (TOTAL + NTH - 1) / NTH;
#pragma unroll 1
    for (int it = 0; it < ITERS; it++) {
        const int idx = (int)threadIdx.x + it * NTH;
        if ((TOTAL % NTH == 0) || idx < TOTAL) {
            const int r = idx / CH, c = (idx % CH) * 8;
            if (c < hs16) {
                const int t = row0 + r;
                const bool ok = (t < T_) && (c < hs);
                E* dst = sm + r * HSP + c;
                const E* src = ok ? g + (long long)t * stride + c : g;
                if (vec) {
                    att_cp16(dst, src, ok);
                } else {
                    uint4 v = make_uint4(0u, 0u, 0u, 0u);
                    if (ok) {
                        const unsigned short* s16 = reinterpret_cast<const unsigned short*>(src);
                        v.x = (att_u32)s16[0] | ((att_u32)s16[1] << 16);
                        v.y = (att_u32)s16[2] | ((att_u32)s16[3] << 16);
                        v.z = (att_u32)s16[4] | ((att_u32)s16[5] << 16);
                        v.w = (att_u32)s16[6] | ((att_u32)s16[7] << 16);
                    }
                    *reinterpret_cast<uint4*>(dst) = v;
                }
            }
        }
    }
}

// Store a [16 rows][HS] fp32 accumulator fragment set (rows r0 = base_row+g, r1 = r0+8) times mul
// into dst[row*stride + d] for d < hs and row < T_.
template <int HS, typename E>
__device__ __forceinline__ void att_store_frag_bf16(E* dst, long long stride, int r0, int T_,
                                                    int hs, const float (&acc)[HS / 8][4], float mul0,
                                                    float mul1, bool vec2, int t4) {
    const int r1 = r0 + 8;
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) {
        const int d = dt * 8 + 2 * t4;
        if (d < hs) {
            if (r0 < T_) {
                E* p = dst + (long long)r0 * stride + d;
                const att_u32 v = att_pack<E>(acc[dt][0] * mul0, acc[dt][1] * mul0);
                if (vec2) *reinterpret_cast<att_u32*>(p) = v;
                else { att_st2(p, v); }
            }
            if (r1 < T_) {
                E* p = dst + (long long)r1 * stride + d;
                const att_u32 v = att_pack<E>(acc[dt][2] * mul1, acc[dt][3] * mul1);
                if (vec2) *reinterpret_cast<att_u32*>(p) = v;
                else { att_st2(p, v); }
            }
        }
    }
}

extern __shared__ __align__(16) unsigned char att_dyn_smem[];

// ---------------------------------------------------------------------------------------------
// Forward, bf16. NW warps; each warp owns MT m16 row tiles (WR = 16*MT queries), so every K / V
// fragment a warp reads from shared memory (ldmatrix) feeds MT mma: at MT = 1 the ldmatrix
// traffic, not the tensor cores, bounds the kernel. BQ = WR*NW queries per block; key tiles of
// BK rows (K then V), double buffered with cp.async. QREG: Q is held in registers as A fragments
// (staged through stage 1 when it fits); otherwise Q stays in its own smem region (large HS,
// where registers are short) and is re-read per key tile. Dynamic smem (AttFwd::SMEM bytes).
// ---------------------------------------------------------------------------------------------
template <int HS, int NW, int MT, int BK, bool QREG>
struct AttFwd {
    static constexpr int WR = 16 * MT;
    static constexpr int BQ = WR * NW;
    static constexpr int HSP = HS + 8;
    static constexpr int NTH = 32 * NW;
    static constexpr int STAGE = 2 * BK * HSP;  // K tile then V tile (elements)
    static constexpr bool QIN1 = QREG && BQ * HSP <= STAGE;  // Q staged through stage 1
    static constexpr int SMEM = (2 * STAGE + (QIN1 ? 0 : BQ * HSP)) * 2;
};

template <int HS, int NW, int MT, int BK, bool QREG, typename E>
__device__ __forceinline__ void att_fwd_bf16(E* out, float* lse, const E* qkv,
                                             int B, int T_, int C, int NH, float out_scale) {
    typedef AttFwd<HS, NW, MT, BK, QREG> Cf;
    constexpr int HSP = Cf::HSP, BQ = Cf::BQ, WR = Cf::WR, NTH = Cf::NTH, STAGE = Cf::STAGE;
    constexpr int KT = HS / 16;  // k-steps over the head dim
    constexpr int NT = BK / 8;   // n-tiles of S
    constexpr int DT = HS / 8;   // n-tiles of O
    E* kv = reinterpret_cast<E*>(att_dyn_smem);
    E* Qs = kv + (Cf::QIN1 ? STAGE : 2 * STAGE);

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + BQ - 1) / BQ;
    const int qb = nqb - 1 - (int)blockIdx.y;  // heaviest first
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = qb * BQ, wq0 = q0 + warp * WR;
    const int C3 = 3 * C;
    const E* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const bool vec = (((size_t)qkv) & 15) == 0;
    const float cs = (1.0f / sqrtf((float)hs)) * LOG2E;
    const int kend = min(q0 + BQ, T_);
    const int ntiles = (kend + BK - 1) / BK;

    att_tile_async<HS, BQ, NTH>(Qs, base, C3, q0, T_, hs, hs16, vec);
    att_cp_commit();
    att_tile_async<HS, BK, NTH>(kv, base + C, C3, 0, T_, hs, hs16, vec);
    att_tile_async<HS, BK, NTH>(kv + BK * HSP, base + 2 * C, C3, 0, T_, hs, hs16, vec);
    att_cp_commit();
    att_u32 qa[MT][QREG ? KT : 1][4];
    if (QREG) {
        att_cp_wait<1>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int kt = 0; kt < (QREG ? KT : 1); kt++) {
                if (kt * 16 < hs16) att_ldsm_x4(qa[mt][kt], att_a_ptr<HSP>(Qs, warp * WR + mt * 16, kt * 16, lane));
                else { qa[mt][kt][0] = 0u; qa[mt][kt][1] = 0u; qa[mt][kt][2] = 0u; qa[mt][kt][3] = 0u; }
            }
        }
        if (Cf::QIN1) __syncthreads();  // stage 1 (Q) is reused for key tile 1
    }

    float o[MT][DT][4], m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int dt = 0; dt < DT; dt++) { o[mt][dt][0] = 0.f; o[mt][dt][1] = 0.f; o[mt][dt][2] = 0.f; o[mt][dt][3] = 0.f; }
        m[mt][0] = ATT_NEG_INF; m[mt][1] = ATT_NEG_INF; l[mt][0] = 0.f; l[mt][1] = 0.f;
    }

    for (int i = 0; i < ntiles; i++) {
        const int k0 = i * BK;
        if (i + 1 < ntiles) {
            E* nx = kv + ((i + 1) & 1) * STAGE;
            att_tile_async<HS, BK, NTH>(nx, base + C, C3, k0 + BK, T_, hs, hs16, vec);
            att_tile_async<HS, BK, NTH>(nx + BK * HSP, base + 2 * C, C3, k0 + BK, T_, hs, hs16, vec);
            att_cp_commit();
            att_cp_wait<1>();
        } else {
            att_cp_wait<0>();
        }
        __syncthreads();
        const E* Ks = kv + (i & 1) * STAGE;
        const E* Vs = Ks + BK * HSP;
        if (k0 <= wq0 + WR - 1) {  // warp-uniform: otherwise every key of the tile is in this warp's future
            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++) { s[mt][nt][0] = 0.f; s[mt][nt][1] = 0.f; s[mt][nt][2] = 0.f; s[mt][nt][3] = 0.f; }
            }
            // S = Q K^T (raw scores; the scale is folded into the exp2 argument below)
#pragma unroll
            for (int kt = 0; kt < KT; kt++) {
                if (kt * 16 < hs16) {
                    att_u32 a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        if (QREG) { a[mt][0] = qa[mt][QREG ? kt : 0][0]; a[mt][1] = qa[mt][QREG ? kt : 0][1]; a[mt][2] = qa[mt][QREG ? kt : 0][2]; a[mt][3] = qa[mt][QREG ? kt : 0][3]; }
                        else att_ldsm_x4(a[mt], att_a_ptr<HSP>(Qs, warp * WR + mt * 16, kt * 16, lane));
                    }
#pragma unroll
                    for (int np = 0; np < NT / 2; np++) {
                        att_u32 bb[4];
                        att_ldsm_x4(bb, att_bn_ptr<HSP>(Ks, np * 16, kt * 16, lane));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            att_mma<E>(s[mt][2 * np], a[mt], bb[0], bb[1]);
                            att_mma<E>(s[mt][2 * np + 1], a[mt], bb[2], bb[3]);
                        }
                    }
                }
            }
            // Only tiles that cross this warp's diagonal (or the end of the sequence) need a mask.
            if ((k0 + BK - 1 > wq0) || (k0 + BK > T_)) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int col = k0 + nt * 8 + 2 * t4 + (e & 1);
                            const int row = wq0 + mt * 16 + g + (e >> 1) * 8;
                            if (col > row || col >= T_) s[mt][nt][e] = ATT_NEG_INF;
                        }
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                float mx0 = ATT_NEG_INF, mx1 = ATT_NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    mx0 = fmaxf(mx0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                    mx1 = fmaxf(mx1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
                }
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                // running max in the scaled log2 domain (cs > 0, so max and scaling commute)
                const float mn0 = fmaxf(m[mt][0], mx0 * cs), mn1 = fmaxf(m[mt][1], mx1 * cs);
                const float mr0 = (mn0 == ATT_NEG_INF) ? 0.f : mn0;  // fully masked row: no NaN
                const float mr1 = (mn1 == ATT_NEG_INF) ? 0.f : mn1;
                const float cr0 = ex2_ftz(m[mt][0] - mr0), cr1 = ex2_ftz(m[mt][1] - mr1);
                m[mt][0] = mn0; m[mt][1] = mn1;
                l[mt][0] *= cr0; l[mt][1] *= cr1;
#pragma unroll
                for (int dt = 0; dt < DT; dt++) {
                    o[mt][dt][0] *= cr0; o[mt][dt][1] *= cr0; o[mt][dt][2] *= cr1; o[mt][dt][3] *= cr1;
                }
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    s[mt][nt][0] = ex2_ftz(fmaf(s[mt][nt][0], cs, -mr0));
                    s[mt][nt][1] = ex2_ftz(fmaf(s[mt][nt][1], cs, -mr0));
                    s[mt][nt][2] = ex2_ftz(fmaf(s[mt][nt][2], cs, -mr1));
                    s[mt][nt][3] = ex2_ftz(fmaf(s[mt][nt][3], cs, -mr1));
                    l[mt][0] += s[mt][nt][0] + s[mt][nt][1];
                    l[mt][1] += s[mt][nt][2] + s[mt][nt][3];
                }
            }
            // O += P V  (P from registers as A fragments, V tile [keys][d] via ldmatrix.trans)
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                att_u32 pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    pa[mt][0] = att_pack<E>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = att_pack<E>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = att_pack<E>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = att_pack<E>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    if (dp * 16 < hs16) {
                        att_u32 bb[4];
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(Vs, kk * 16, dp * 16, lane));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            att_mma<E>(o[mt][2 * dp], pa[mt], bb[0], bb[1]);
                            att_mma<E>(o[mt][2 * dp + 1], pa[mt], bb[2], bb[3]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
    const bool ovec = (((size_t)out) & 3) == 0;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        float l0 = l[mt][0], l1 = l[mt][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const int r0 = wq0 + mt * 16 + g, r1 = r0 + 8;
        att_store_frag_bf16<HS>(out + (long long)b * T_ * C + (long long)h * hs, C, r0, T_, hs, o[mt],
                                out_scale / l0, out_scale / l1, ovec, t4);
        if (t4 == 0) {
            if (r0 < T_) lse[(long long)bh * T_ + r0] = (m[mt][0] + log2f(l0)) * ATT_LN2;
            if (r1 < T_) lse[(long long)bh * T_ + r1] = (m[mt][1] + log2f(l1)) * ATT_LN2;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, bf16: one launch, blockIdx.z = 0 blocks compute dK, dV (a block owns a key block and
// loops over query tiles), blockIdx.z = 1 blocks compute dQ (a block owns a query block and loops
// over key tiles). dQ recomputes S and dP instead of accumulating across key blocks: no atomics,
// fixed summation order, bit-identical reruns. Both halves use NW warps; warp w owns MT m16 row
// tiles (keys for dK/dV, queries for dQ), so each shared-memory fragment feeds MT mma. Column
// tiles of BC rows are double buffered with cp.async. Dynamic smem = max of the two halves.
// ---------------------------------------------------------------------------------------------
template <int HS, int NW, int MT, int BC>
struct AttKV {  // dK, dV half
    static constexpr int WR = 16 * MT, BR = WR * NW, HSP = HS + 8, NTH = 32 * NW;
    // K [BR][HSP], V [BR][HSP]; stage s: Q [BC][HSP], dO [BC][HSP]; floats: stage s: L[BC], D[BC]
    static constexpr int SMEM = (2 * BR * HSP + 4 * BC * HSP) * 2 + 4 * BC * 4;
};
template <int HS, int NW, int MT, int BC>
struct AttQ {  // dQ half
    static constexpr int WR = 16 * MT, BR = WR * NW, HSP = HS + 8, NTH = 32 * NW;
    // Q [BR][HSP], dO [BR][HSP]; stage s: K [BC][HSP], V [BC][HSP]
    static constexpr int SMEM = (2 * BR * HSP + 4 * BC * HSP) * 2;
};

// dK, dV for keys k0 .. k0+BR-1 (warp w: keys k0+WR*w ..), loop over query tiles t >= k0.
template <int HS, int NW, int MT, int BC, typename E>
__device__ __noinline__ void att_bwd_dkdv_bf16(E* dqkv, const E* dout,
                                                  const E* qkv, const float* lse,
                                                  const float* D, int B, int T_, int C, int NH,
                                                  float out_scale) {
    typedef AttKV<HS, NW, MT, BC> Cf;
    constexpr int HSP = Cf::HSP, BR = Cf::BR, WR = Cf::WR, NTH = Cf::NTH;
    constexpr int KT = HS / 16, NTC = BC / 8, DT = HS / 8;
    static_assert(BR % BC == 0, "key blocks start on a query-tile boundary");
    E* buf = reinterpret_cast<E*>(att_dyn_smem);
    E* Ks = buf;
    E* Vs = buf + BR * HSP;
    E* st0 = buf + 2 * BR * HSP;  // stage s: Q at st0 + 2s*BC*HSP, dO right after
    float* fbuf = reinterpret_cast<float*>(buf + 2 * BR * HSP + 4 * BC * HSP);

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    if ((int)blockIdx.y * BR >= T_) return;  // block-uniform (grid.y covers the larger half)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int k0 = (int)blockIdx.y * BR;  // small key blocks (most work) first
    const int ws0 = k0 + warp * WR;
    const int C3 = 3 * C;
    const E* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const E* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const float* lbase = lse + (long long)bh * T_;
    const float* Dbase = D + (long long)bh * T_;
    const bool vec = ((((size_t)qkv) | ((size_t)dout)) & 15) == 0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * LOG2E;
    const int ntiles = (T_ - k0 + BC - 1) / BC;  // >= 1 (k0 < T_)

    att_tile_async<HS, BR, NTH>(Ks, base + C, C3, k0, T_, hs, hs16, vec);
    att_tile_async<HS, BR, NTH>(Vs, base + 2 * C, C3, k0, T_, hs, hs16, vec);
    att_cp_commit();
    // issue query tile i into stage (i & 1); L is stored pre-scaled by log2(e) after the wait
    auto issue = [&](int i_) {
        const int s_ = i_ & 1, qq = k0 + i_ * BC;
        att_tile_async<HS, BC, NTH>(st0 + 2 * s_ * BC * HSP, base, C3, qq, T_, hs, hs16, vec);
        att_tile_async<HS, BC, NTH>(st0 + (2 * s_ + 1) * BC * HSP, dbase, C, qq, T_, hs, hs16, vec);
        for (int j = threadIdx.x; j < BC; j += NTH) {
            const int tq = qq + j;
            const bool ok = tq < T_;
            att_cp4(fbuf + s_ * 2 * BC + j, ok ? lbase + tq : lbase, ok);
            att_cp4(fbuf + s_ * 2 * BC + BC + j, ok ? Dbase + tq : Dbase, ok);
        }
        att_cp_commit();
    };
    issue(0);

    float dk[MT][DT][4], dv[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) { dk[mt][dt][e] = 0.f; dv[mt][dt][e] = 0.f; }
        }
    }

    for (int i = 0; i < ntiles; i++) {
        const int q0 = k0 + i * BC;
        if (i + 1 < ntiles) {
            issue(i + 1);
            att_cp_wait<1>();
        } else {
            att_cp_wait<0>();
        }
        __syncthreads();
        const E* Qs = st0 + 2 * (i & 1) * BC * HSP;
        const E* dOs = Qs + BC * HSP;
        const float* Ls = fbuf + (i & 1) * 2 * BC;
        const float* Ds = Ls + BC;
        if (q0 + BC - 1 >= ws0) {  // warp-uniform: some query of the tile sees some key of the warp
            float st[MT][NTC][4], dpt[MT][NTC][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) { st[mt][nt][e] = 0.f; dpt[mt][nt][e] = 0.f; }
                }
            }
            // S^T = K Q^T, then dP^T = V dO^T  (WR keys x BC queries per warp; one product at a
            // time keeps only one set of A fragments live)
#pragma unroll
            for (int pass = 0; pass < 2; pass++) {
                const E* As = pass ? Vs : Ks;
                const E* Bs = pass ? dOs : Qs;
#pragma unroll
                for (int kt = 0; kt < KT; kt++) {
                    if (kt * 16 < hs16) {
                        att_u32 a[MT][4];
#pragma unroll
                        for (int mt = 0; mt < MT; mt++)
                            att_ldsm_x4(a[mt], att_a_ptr<HSP>(As, warp * WR + mt * 16, kt * 16, lane));
#pragma unroll
                        for (int np = 0; np < NTC / 2; np++) {
                            att_u32 bb[4];
                            att_ldsm_x4(bb, att_bn_ptr<HSP>(Bs, np * 16, kt * 16, lane));
#pragma unroll
                            for (int mt = 0; mt < MT; mt++) {
                                float(&c0)[4] = pass ? dpt[mt][2 * np] : st[mt][2 * np];
                                float(&c1)[4] = pass ? dpt[mt][2 * np + 1] : st[mt][2 * np + 1];
                                att_mma<E>(c0, a[mt], bb[0], bb[1]);
                                att_mma<E>(c1, a[mt], bb[2], bb[3]);
                            }
                        }
                    }
                }
            }
            // P = exp2(S*cs - L*log2e), dS = P (dP - D); masked only on tiles crossing the diagonal
            const bool need_mask = (q0 < ws0 + WR - 1) || (q0 + BC > T_);
#pragma unroll
            for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                for (int e1 = 0; e1 < 2; e1++) {
                    const int ti = nt * 8 + 2 * t4 + e1;
                    const float Lq = Ls[ti] * LOG2E, Dq = Ds[ti];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                        for (int e2 = 0; e2 < 2; e2++) {
                            const int e = e1 + 2 * e2;
                            float p = ex2_ftz(fmaf(st[mt][nt][e], cs, -Lq));
                            if (need_mask) {
                                const int tq = q0 + ti;
                                const int sk = ws0 + mt * 16 + g + e2 * 8;
                                if (tq < sk || tq >= T_) p = 0.f;
                            }
                            st[mt][nt][e] = p;
                            dpt[mt][nt][e] = p * (dpt[mt][nt][e] - Dq);
                        }
                    }
                }
            }
            // dV += P^T dO ; dK += dS^T Q   (A from registers, B = [queries][d] tiles, trans)
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                att_u32 pa[MT][4], da[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    pa[mt][0] = att_pack<E>(st[mt][2 * kk][0], st[mt][2 * kk][1]);
                    pa[mt][1] = att_pack<E>(st[mt][2 * kk][2], st[mt][2 * kk][3]);
                    pa[mt][2] = att_pack<E>(st[mt][2 * kk + 1][0], st[mt][2 * kk + 1][1]);
                    pa[mt][3] = att_pack<E>(st[mt][2 * kk + 1][2], st[mt][2 * kk + 1][3]);
                    da[mt][0] = att_pack<E>(dpt[mt][2 * kk][0], dpt[mt][2 * kk][1]);
                    da[mt][1] = att_pack<E>(dpt[mt][2 * kk][2], dpt[mt][2 * kk][3]);
                    da[mt][2] = att_pack<E>(dpt[mt][2 * kk + 1][0], dpt[mt][2 * kk + 1][1]);
                    da[mt][3] = att_pack<E>(dpt[mt][2 * kk + 1][2], dpt[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    if (dp * 16 < hs16) {
                        att_u32 bb[4];
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(dOs, kk * 16, dp * 16, lane));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            att_mma<E>(dv[mt][2 * dp], pa[mt], bb[0], bb[1]);
                            att_mma<E>(dv[mt][2 * dp + 1], pa[mt], bb[2], bb[3]);
                        }
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(Qs, kk * 16, dp * 16, lane));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            att_mma<E>(dk[mt][2 * dp], da[mt], bb[0], bb[1]);
                            att_mma<E>(dk[mt][2 * dp + 1], da[mt], bb[2], bb[3]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
    const bool ovec = (((size_t)dqkv) & 3) == 0;
    const float gs = scale * out_scale;  // D was divided by out_scale (attn_bwd_pre)
    E* dbh = dqkv + (long long)b * T_ * C3 + (long long)h * hs;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        att_store_frag_bf16<HS>(dbh + C, C3, ws0 + mt * 16 + g, T_, hs, dk[mt], gs, gs, ovec, t4);
        att_store_frag_bf16<HS>(dbh + 2 * C, C3, ws0 + mt * 16 + g, T_, hs, dv[mt], out_scale, out_scale, ovec, t4);
    }
}

// dQ for queries q0 .. q0+BR-1 (warp w: queries q0+WR*w ..), loop over key tiles s <= t.
template <int HS, int NW, int MT, int BC, typename E>
__device__ __noinline__ void att_bwd_dq_bf16(E* dqkv, const E* dout,
                                                const E* qkv, const float* lse,
                                                const float* D, int B, int T_, int C, int NH,
                                                float out_scale) {
    typedef AttQ<HS, NW, MT, BC> Cf;
    constexpr int HSP = Cf::HSP, BR = Cf::BR, WR = Cf::WR, NTH = Cf::NTH;
    constexpr int KT = HS / 16, NTC = BC / 8, DT = HS / 8;
    E* buf = reinterpret_cast<E*>(att_dyn_smem);
    E* Qs = buf;
    E* dOs = buf + BR * HSP;
    E* st0 = buf + 2 * BR * HSP;  // stage s: K at st0 + 2s*BC*HSP, V right after

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + BR - 1) / BR;
    if ((int)blockIdx.y >= nqb) return;  // block-uniform (grid.y covers the larger half)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = (nqb - 1 - (int)blockIdx.y) * BR;  // heaviest first
    const int wq0 = q0 + warp * WR;
    const int C3 = 3 * C;
    const E* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const E* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const bool vec = ((((size_t)qkv) | ((size_t)dout)) & 15) == 0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * LOG2E;
    const int kend = min(q0 + BR, T_);
    const int ntiles = (kend + BC - 1) / BC;

    att_tile_async<HS, BR, NTH>(Qs, base, C3, q0, T_, hs, hs16, vec);
    att_tile_async<HS, BR, NTH>(dOs, dbase, C, q0, T_, hs, hs16, vec);
    att_cp_commit();
    att_tile_async<HS, BC, NTH>(st0, base + C, C3, 0, T_, hs, hs16, vec);
    att_tile_async<HS, BC, NTH>(st0 + BC * HSP, base + 2 * C, C3, 0, T_, hs, hs16, vec);
    att_cp_commit();
    float L[MT][2], Dr[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int r = wq0 + mt * 16 + g + 8 * hh;
            L[mt][hh] = r < T_ ? lse[(long long)bh * T_ + r] * LOG2E : 0.f;
            Dr[mt][hh] = r < T_ ? D[(long long)bh * T_ + r] : 0.f;
        }
    }

    float dq[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int dt = 0; dt < DT; dt++) { dq[mt][dt][0] = 0.f; dq[mt][dt][1] = 0.f; dq[mt][dt][2] = 0.f; dq[mt][dt][3] = 0.f; }
    }

    for (int i = 0; i < ntiles; i++) {
        const int k0 = i * BC;
        if (i + 1 < ntiles) {
            E* nx = st0 + 2 * ((i + 1) & 1) * BC * HSP;
            att_tile_async<HS, BC, NTH>(nx, base + C, C3, k0 + BC, T_, hs, hs16, vec);
            att_tile_async<HS, BC, NTH>(nx + BC * HSP, base + 2 * C, C3, k0 + BC, T_, hs, hs16, vec);
            att_cp_commit();
            att_cp_wait<1>();
        } else {
            att_cp_wait<0>();
        }
        __syncthreads();
        const E* Ks = st0 + 2 * (i & 1) * BC * HSP;
        const E* Vs = Ks + BC * HSP;
        if (k0 <= wq0 + WR - 1) {  // warp-uniform
            float s[MT][NTC][4], dps[MT][NTC][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) { s[mt][nt][e] = 0.f; dps[mt][nt][e] = 0.f; }
                }
            }
            // S = Q K^T, then dP = dO V^T  (WR queries x BC keys per warp)
#pragma unroll
            for (int pass = 0; pass < 2; pass++) {
                const E* As = pass ? dOs : Qs;
                const E* Bs = pass ? Vs : Ks;
#pragma unroll
                for (int kt = 0; kt < KT; kt++) {
                    if (kt * 16 < hs16) {
                        att_u32 a[MT][4];
#pragma unroll
                        for (int mt = 0; mt < MT; mt++)
                            att_ldsm_x4(a[mt], att_a_ptr<HSP>(As, warp * WR + mt * 16, kt * 16, lane));
#pragma unroll
                        for (int np = 0; np < NTC / 2; np++) {
                            att_u32 bb[4];
                            att_ldsm_x4(bb, att_bn_ptr<HSP>(Bs, np * 16, kt * 16, lane));
#pragma unroll
                            for (int mt = 0; mt < MT; mt++) {
                                float(&c0)[4] = pass ? dps[mt][2 * np] : s[mt][2 * np];
                                float(&c1)[4] = pass ? dps[mt][2 * np + 1] : s[mt][2 * np + 1];
                                att_mma<E>(c0, a[mt], bb[0], bb[1]);
                                att_mma<E>(c1, a[mt], bb[2], bb[3]);
                            }
                        }
                    }
                }
            }
            const bool need_mask = (k0 + BC - 1 > wq0) || (k0 + BC > T_);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float p = ex2_ftz(fmaf(s[mt][nt][e], cs, -L[mt][e >> 1]));
                        if (need_mask) {
                            const int sk = k0 + nt * 8 + 2 * t4 + (e & 1);
                            const int tq = wq0 + mt * 16 + g + (e >> 1) * 8;
                            if (sk > tq || sk >= T_) p = 0.f;
                        }
                        s[mt][nt][e] = p * (dps[mt][nt][e] - Dr[mt][e >> 1]);  // dS
                    }
                }
            }
            // dQ += dS K  (B = K tile [keys][d], trans)
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                att_u32 da[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    da[mt][0] = att_pack<E>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    da[mt][1] = att_pack<E>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    da[mt][2] = att_pack<E>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    da[mt][3] = att_pack<E>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    if (dp * 16 < hs16) {
                        att_u32 bb[4];
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(Ks, kk * 16, dp * 16, lane));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            att_mma<E>(dq[mt][2 * dp], da[mt], bb[0], bb[1]);
                            att_mma<E>(dq[mt][2 * dp + 1], da[mt], bb[2], bb[3]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
    const bool ovec = (((size_t)dqkv) & 3) == 0;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        att_store_frag_bf16<HS>(dqkv + (long long)b * T_ * C3 + (long long)h * hs, C3, wq0 + mt * 16 + g, T_,
                                hs, dq[mt], scale * out_scale, scale * out_scale, ovec, t4);
    }
}

// Kernel entry points: forward <HS, NW, MT, BK, QREG>; backward <HS, NW, MT(dK,dV), BC(dK,dV),
// MT(dQ), BC(dQ)>; MINB = blocks per SM the register allocation must allow. The host's launch
// geometry (mod.rs, `mod attention`) must match these numbers.
#define ATT_FWD_KERNEL(name, E, HS, NW, MT, BK, QR, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                         \
    name(E* out, float* lse, const E* qkv, int B, int T_, int C, int NH, float out_scale) {             \
        att_fwd_bf16<HS, NW, MT, BK, QR>(out, lse, qkv, B, T_, C, NH, out_scale);                      \
    }
#define ATT_BWD_KERNEL(name, E, HS, NW, MK, BCK, MQ, BCQ, MINB)                                          \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                         \
    name(E* dqkv, const E* dout, const E* qkv, const float* lse, const float* D, int B, int T_, int C,  \
         int NH, float out_scale) {                                                                    \
        if (blockIdx.z == 0)                                                                           \
            att_bwd_dkdv_bf16<HS, NW, MK, BCK>(dqkv, dout, qkv, lse, D, B, T_, C, NH, out_scale);       \
        else                                                                                           \
            att_bwd_dq_bf16<HS, NW, MQ, BCQ>(dqkv, dout, qkv, lse, D, B, T_, C, NH, out_scale);         \
    }

// bf16 and f16 share the tilings (same element size, same mma shape).
ATT_FWD_KERNEL(attention_forward_hs64_bf16, __nv_bfloat16, 64, 8, 1, 64, true, 2)
ATT_FWD_KERNEL(attention_forward_hs128_bf16, __nv_bfloat16, 128, 4, 2, 32, false, 2)
ATT_BWD_KERNEL(attention_backward_hs64_bf16, __nv_bfloat16, 64, 8, 1, 32, 1, 32, 2)
ATT_BWD_KERNEL(attention_backward_hs128_bf16, __nv_bfloat16, 128, 4, 1, 16, 1, 32, 3)
ATT_FWD_KERNEL(attention_forward_hs64_f16, __half, 64, 8, 1, 64, true, 2)
ATT_FWD_KERNEL(attention_forward_hs128_f16, __half, 128, 4, 2, 32, false, 2)
ATT_BWD_KERNEL(attention_backward_hs64_f16, __half, 64, 8, 1, 32, 1, 32, 2)
ATT_BWD_KERNEL(attention_backward_hs128_f16, __half, 128, 4, 1, 16, 1, 32, 3)
