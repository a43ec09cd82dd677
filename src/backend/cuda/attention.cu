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
//   D    [B, NH, T_] (float scratch, B*NH*T_ floats): D[(b*NH+h)*T_+t] = sum_d dout*out.
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
//     attention_forward_hs64_bf16 (bf16* out, float* lse, const bf16* qkv, int B, int T_, int C, int NH)
//         grid = (BH, ceil(T_/128), 1), block = 256, dyn smem = 0     [tensor cores, mma.sync]
//     attention_forward_hs128_bf16(same signature)
//         grid = (BH, ceil(T_/64), 1),  block = 128, dyn smem = 0
//     attention_forward_hs64_f32  (float* out, float* lse, const float* qkv, int B, int T_, int C, int NH)
//     attention_forward_hs128_f32 (same signature)
//         grid = (BH, ceil(T_/32), 1),  block = 128, dyn smem = 0     [CUDA cores, fp32]
//
//   Backward (two launches, in this order):
//     1) attention_backward_preprocess_bf16(float* D, const bf16* dout, const bf16* out,
//                                           int B, int T_, int C, int NH)
//        attention_backward_preprocess_f32 (float* D, const float* dout, const float* out, same ints)
//         grid = (ceil(BH*T_/8), 1, 1), block = 256, dyn smem = 0
//     2) attention_backward_hs64_bf16 (bf16* dqkv, const bf16* dout, const bf16* qkv,
//                                      const float* lse, const float* D, int B, int T_, int C, int NH)
//         grid = (BH, ceil(T_/64), 2), block = 128, dyn smem = 56320 bytes
//        attention_backward_hs128_bf16(same signature)
//         grid = (BH, ceil(T_/32), 2), block = 64,  dyn smem = 52736 bytes
//          -> both bf16 backward kernels use > 48 KB of DYNAMIC shared memory: once per kernel
//             (after loading the module) the host must call cuFuncSetAttribute(f,
//             CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 56320 resp. 52736) and pass that
//             same byte count as sharedMemBytes at launch.
//        attention_backward_hs64_f32  (float* dqkv, const float* dout, const float* qkv,
//                                      const float* lse, const float* D, int B, int T_, int C, int NH)
//        attention_backward_hs128_f32 (same signature)
//         grid = (BH, ceil(T_/32), 2), block = 128, dyn smem = 0
//        (blockIdx.z == 0 blocks compute dK,dV over key blocks; blockIdx.z == 1 blocks compute dQ
//         over query blocks; together they overwrite every element of dqkv.)
//     Scratch: D, B*NH*T_ floats (written by 1, read by 2). `out` is read only by 1.
//   grid.y (= ceil(T_/tile)) must be <= 65535: always true for T_ <= 2,097,120.
//
// NUMERICS: float accumulation everywhere; softmax in the log2 domain (x = score*scale*log2 e,
// exp2f/log2f, full-precision library calls, not the fast intrinsics); lse stored in natural log.
// bf16 path: Q,K,V,dO, and P / dS (rounded to bf16) are tensor-core operands, accumulation fp32
// (the usual FlashAttention-2 practice). f32 path: pure fp32 CUDA-core arithmetic.
// ---------------------------------------------------------------------------------------------

#include <cuda_bf16.h>

typedef unsigned int att_u32;

#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f
#define ATT_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float att_to_f(float x) { return x; }
__device__ __forceinline__ float att_to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// ============================================================================================
// Backward preprocess: D = rowsum(dout * out) per (b, h, t). One warp per row, 8 rows/block.
// ============================================================================================
template <typename T>
__device__ __forceinline__ void attn_bwd_pre(float* D, const T* dout, const T* out, int B, int T_,
                                             int C, int NH) {
    const int hs = C / NH;
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);  // (b*NH + h)*T_ + t
    const int lane = threadIdx.x & 31;
    const int total = B * NH * T_;
    if (row >= total) return;  // warp-uniform; no block barrier in this kernel
    const int t = row % T_;
    const int bh = row / T_;
    const int h = bh % NH;
    const int b = bh / NH;
    const long long off = ((long long)b * T_ + t) * C + (long long)h * hs;
    float acc = 0.f;
    for (int d = lane; d < hs; d += 32) acc += att_to_f(dout[off + d]) * att_to_f(out[off + d]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) D[row] = acc;
}

extern "C" __global__ void __launch_bounds__(256)
attention_backward_preprocess_f32(float* D, const float* dout, const float* out, int B, int T_,
                                  int C, int NH) {
    attn_bwd_pre<float>(D, dout, out, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(256)
attention_backward_preprocess_bf16(float* D, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                                   int B, int T_, int C, int NH) {
    attn_bwd_pre<__nv_bfloat16>(D, dout, out, B, T_, C, NH);
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
                                            int C, int NH) {
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
    const float cs = (1.0f / sqrtf((float)hs)) * ATT_LOG2E;

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
        const float inv = 1.0f / l;
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
                                                 int B, int T_, int C, int NH) {
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
    const float cs = scale * ATT_LOG2E;

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
            Ls[threadIdx.x] = tq < T_ ? lse[(long long)bh * T_ + tq] * ATT_LOG2E : 0.f;
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
                    dp[C + d + e] = dk[i][e] * scale;
                    dp[2 * C + d + e] = dv[i][e];
                }
            }
        }
    }
}

// dQ for the 32 queries of block (blockIdx.z == 1). smem: Ks[32][HS], Vs[32][HS].
template <int HS>
__device__ __forceinline__ void att_bwd_dq_f32(float* smem, float* dqkv, const float* dout,
                                               const float* qkv, const float* lse, const float* D,
                                               int B, int T_, int C, int NH) {
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
    const float cs = scale * ATT_LOG2E;

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
    const float L = t < T_ ? lse[(long long)bh * T_ + t] * ATT_LOG2E : 0.f;
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
                for (int e = 0; e < 4; e++) dp[d + e] = dq[i][e] * scale;
            }
        }
    }
}

template <int HS>
__device__ __forceinline__ void att_bwd_f32(float* dqkv, const float* dout, const float* qkv,
                                            const float* lse, const float* D, int B, int T_, int C,
                                            int NH) {
    __shared__ __align__(16) float smem[2 * ATT_F32_R * HS + 2 * ATT_F32_R];
    if (blockIdx.z == 0)
        att_bwd_dkdv_f32<HS>(smem, dqkv, dout, qkv, lse, D, B, T_, C, NH);
    else
        att_bwd_dq_f32<HS>(smem, dqkv, dout, qkv, lse, D, B, T_, C, NH);
}

extern "C" __global__ void __launch_bounds__(128)
attention_forward_hs64_f32(float* out, float* lse, const float* qkv, int B, int T_, int C, int NH) {
    att_fwd_f32<64>(out, lse, qkv, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(128)
attention_forward_hs128_f32(float* out, float* lse, const float* qkv, int B, int T_, int C, int NH) {
    att_fwd_f32<128>(out, lse, qkv, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(128)
attention_backward_hs64_f32(float* dqkv, const float* dout, const float* qkv, const float* lse,
                            const float* D, int B, int T_, int C, int NH) {
    att_bwd_f32<64>(dqkv, dout, qkv, lse, D, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(128)
attention_backward_hs128_f32(float* dqkv, const float* dout, const float* qkv, const float* lse,
                             const float* D, int B, int T_, int C, int NH) {
    att_bwd_f32<128>(dqkv, dout, qkv, lse, D, B, T_, C, NH);
}

// ============================================================================================
// bf16 path: tensor cores via mma.sync.m16n8k16 (bf16 in, fp32 accumulate), ldmatrix from
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
__device__ __forceinline__ void att_mma(float (&c)[4], const att_u32 (&a)[4], att_u32 b0, att_u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ att_u32 att_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<att_u32*>(&v);
}

// Address (per lane) for an A fragment (16 rows x 16 cols, rows m0.., cols k0..) of a
// row-major tile; also used for "B from an [n][k] tile" with rows/cols swapped below.
//   A:            row m0 + (lane&7) + ((lane>>3)&1)*8, col k0 + (lane>>4)*8   -> a0..a3
//   B (non-trans, tile stored [n][k]): row n0 + (lane&7) + (lane>>4)*8,
//                 col k0 + ((lane>>3)&1)*8  -> {b0,b1} of n-tile n0, {b0,b1} of n-tile n0+8
//   B (trans, tile stored [k][n]):    row k0 + (lane&7) + ((lane>>3)&1)*8,
//                 col n0 + (lane>>4)*8      -> {b0,b1} of n-tile n0, {b0,b1} of n-tile n0+8
template <int HSP>
__device__ __forceinline__ const __nv_bfloat16* att_a_ptr(const __nv_bfloat16* s, int m0, int k0, int lane) {
    return s + (m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * HSP + k0 + (lane >> 4) * 8;
}
template <int HSP>
__device__ __forceinline__ const __nv_bfloat16* att_bn_ptr(const __nv_bfloat16* s, int n0, int k0, int lane) {
    return s + (n0 + (lane & 7) + (lane >> 4) * 8) * HSP + k0 + ((lane >> 3) & 1) * 8;
}
template <int HSP>
__device__ __forceinline__ const __nv_bfloat16* att_bt_ptr(const __nv_bfloat16* s, int k0, int n0, int lane) {
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
template <int HS, int NROWS, int NTH>
__device__ __forceinline__ void att_tile_async(__nv_bfloat16* sm, const __nv_bfloat16* g, int stride,
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
                __nv_bfloat16* dst = sm + r * HSP + c;
                const __nv_bfloat16* src = ok ? g + (long long)t * stride + c : g;
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
template <int HS>
__device__ __forceinline__ void att_store_frag_bf16(__nv_bfloat16* dst, long long stride, int r0, int T_,
                                                    int hs, const float (&acc)[HS / 8][4], float mul0,
                                                    float mul1, bool vec2, int t4) {
    const int r1 = r0 + 8;
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) {
        const int d = dt * 8 + 2 * t4;
        if (d < hs) {
            if (r0 < T_) {
                __nv_bfloat16* p = dst + (long long)r0 * stride + d;
                const __nv_bfloat162 v = __floats2bfloat162_rn(acc[dt][0] * mul0, acc[dt][1] * mul0);
                if (vec2) *reinterpret_cast<__nv_bfloat162*>(p) = v;
                else { p[0] = v.x; p[1] = v.y; }
            }
            if (r1 < T_) {
                __nv_bfloat16* p = dst + (long long)r1 * stride + d;
                const __nv_bfloat162 v = __floats2bfloat162_rn(acc[dt][2] * mul1, acc[dt][3] * mul1);
                if (vec2) *reinterpret_cast<__nv_bfloat162*>(p) = v;
                else { p[0] = v.x; p[1] = v.y; }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward, bf16. Block: NW warps, BQ = 16*NW queries (16 per warp); key tiles of BK, double
// buffered with cp.async (Q is staged through stage 1, then held in registers as A fragments).
//   HS 64 : NW = 8, BQ = 128, BK = 64, static smem 2*2*64*72*2 = 36,864 B
//   HS 128: NW = 4, BQ = 64, BK = 32, static smem 2*2*32*136*2 = 34,816 B
// ---------------------------------------------------------------------------------------------
template <int HS>
struct AttFwdCfg {
    static constexpr int NW = (HS <= 64) ? 8 : 4;
    static constexpr int BQ = 16 * NW;
    static constexpr int BK = (HS <= 64) ? 64 : 32;
    static constexpr int HSP = HS + 8;
    static constexpr int STAGE = 2 * BK * HSP;  // K tile then V tile (elements)
};

template <int HS>
__device__ __forceinline__ void att_fwd_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv,
                                             int B, int T_, int C, int NH) {
    typedef AttFwdCfg<HS> Cf;
    constexpr int HSP = Cf::HSP, BQ = Cf::BQ, BK = Cf::BK, NTH = 32 * Cf::NW, STAGE = Cf::STAGE;
    constexpr int KT = HS / 16;  // k-steps over the head dim
    constexpr int NT = BK / 8;   // n-tiles of S
    constexpr int DT = HS / 8;   // n-tiles of O
    static_assert(BQ * HSP <= STAGE, "Q staging must fit in one stage");
    __shared__ __align__(16) __nv_bfloat16 kv[2 * STAGE];

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + BQ - 1) / BQ;
    const int qb = nqb - 1 - (int)blockIdx.y;  // heaviest first
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = qb * BQ, wq0 = q0 + warp * 16;
    const int r0 = wq0 + g, r1 = r0 + 8;
    const int C3 = 3 * C;
    const __nv_bfloat16* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const bool vec = (((size_t)qkv) & 15) == 0;
    const float cs = (1.0f / sqrtf((float)hs)) * ATT_LOG2E;
    const int kend = min(q0 + BQ, T_);
    const int ntiles = (kend + BK - 1) / BK;

    att_tile_async<HS, BQ, NTH>(kv + STAGE, base, C3, q0, T_, hs, hs16, vec);
    att_cp_commit();
    att_tile_async<HS, BK, NTH>(kv, base + C, C3, 0, T_, hs, hs16, vec);
    att_tile_async<HS, BK, NTH>(kv + BK * HSP, base + 2 * C, C3, 0, T_, hs, hs16, vec);
    att_cp_commit();
    att_cp_wait<1>();
    __syncthreads();
    att_u32 qa[KT][4];
#pragma unroll
    for (int kt = 0; kt < KT; kt++) {
        if (kt * 16 < hs16) att_ldsm_x4(qa[kt], att_a_ptr<HSP>(kv + STAGE, warp * 16, kt * 16, lane));
        else { qa[kt][0] = 0u; qa[kt][1] = 0u; qa[kt][2] = 0u; qa[kt][3] = 0u; }
    }
    __syncthreads();  // stage 1 (Q) is reused for key tile 1

    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) { o[dt][0] = 0.f; o[dt][1] = 0.f; o[dt][2] = 0.f; o[dt][3] = 0.f; }
    float m0 = ATT_NEG_INF, m1 = ATT_NEG_INF, l0 = 0.f, l1 = 0.f;

    for (int i = 0; i < ntiles; i++) {
        const int k0 = i * BK;
        if (i + 1 < ntiles) {
            __nv_bfloat16* nx = kv + ((i + 1) & 1) * STAGE;
            att_tile_async<HS, BK, NTH>(nx, base + C, C3, k0 + BK, T_, hs, hs16, vec);
            att_tile_async<HS, BK, NTH>(nx + BK * HSP, base + 2 * C, C3, k0 + BK, T_, hs, hs16, vec);
            att_cp_commit();
            att_cp_wait<1>();
        } else {
            att_cp_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16* Ks = kv + (i & 1) * STAGE;
        const __nv_bfloat16* Vs = Ks + BK * HSP;
        if (k0 <= wq0 + 15) {  // warp-uniform: otherwise every key of the tile is in this warp's future
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++) { s[nt][0] = 0.f; s[nt][1] = 0.f; s[nt][2] = 0.f; s[nt][3] = 0.f; }
#pragma unroll
            for (int kt = 0; kt < KT; kt++) {
                if (kt * 16 < hs16) {
#pragma unroll
                    for (int np = 0; np < NT / 2; np++) {
                        att_u32 bb[4];
                        att_ldsm_x4(bb, att_bn_ptr<HSP>(Ks, np * 16, kt * 16, lane));
                        att_mma(s[2 * np], qa[kt], bb[0], bb[1]);
                        att_mma(s[2 * np + 1], qa[kt], bb[2], bb[3]);
                    }
                }
            }
            const bool need_mask = (k0 + BK - 1 > wq0) || (k0 + BK > T_);
            float mx0 = ATT_NEG_INF, mx1 = ATT_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[nt][e] * cs;
                    if (need_mask) {
                        const int col = k0 + nt * 8 + 2 * t4 + (e & 1);
                        const int row = (e < 2) ? r0 : r1;
                        if (col > row || col >= T_) x = ATT_NEG_INF;
                    }
                    s[nt][e] = x;
                    if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
                }
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float mr0 = (mn0 == ATT_NEG_INF) ? 0.f : mn0;  // fully masked row: no NaN
            const float mr1 = (mn1 == ATT_NEG_INF) ? 0.f : mn1;
            const float cr0 = exp2f(m0 - mr0), cr1 = exp2f(m1 - mr1);
            m0 = mn0; m1 = mn1;
            l0 *= cr0; l1 *= cr1;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                o[dt][0] *= cr0; o[dt][1] *= cr0; o[dt][2] *= cr1; o[dt][3] *= cr1;
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                s[nt][0] = exp2f(s[nt][0] - mr0);
                s[nt][1] = exp2f(s[nt][1] - mr0);
                s[nt][2] = exp2f(s[nt][2] - mr1);
                s[nt][3] = exp2f(s[nt][3] - mr1);
                l0 += s[nt][0] + s[nt][1];
                l1 += s[nt][2] + s[nt][3];
            }
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                att_u32 pa[4];
                pa[0] = att_pack(s[2 * kk][0], s[2 * kk][1]);
                pa[1] = att_pack(s[2 * kk][2], s[2 * kk][3]);
                pa[2] = att_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[3] = att_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    if (dp * 16 < hs16) {
                        att_u32 bb[4];
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(Vs, kk * 16, dp * 16, lane));
                        att_mma(o[2 * dp], pa, bb[0], bb[1]);
                        att_mma(o[2 * dp + 1], pa, bb[2], bb[3]);
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const bool ovec = (((size_t)out) & 3) == 0;
    att_store_frag_bf16<HS>(out + (long long)b * T_ * C + (long long)h * hs, C, r0, T_, hs, o,
                            1.0f / l0, 1.0f / l1, ovec, t4);
    if (t4 == 0) {
        if (r0 < T_) lse[(long long)bh * T_ + r0] = (m0 + log2f(l0)) * ATT_LN2;
        if (r1 < T_) lse[(long long)bh * T_ + r1] = (m1 + log2f(l1)) * ATT_LN2;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, bf16. NW warps (4 for HS 64, 2 for HS 128), BR = 16*NW rows per block, column tiles
// of BC = BR, double buffered with cp.async. DYNAMIC shared memory (host must raise the limit):
//   6 tiles [BR][HS+8] bf16 + 4*BC floats = 56,320 B (HS 64) / 52,736 B (HS 128).
// ---------------------------------------------------------------------------------------------
template <int HS>
struct AttBwdCfg {
    static constexpr int NW = (HS <= 64) ? 4 : 2;
    static constexpr int BR = 16 * NW;
    static constexpr int BC = BR;
    static constexpr int HSP = HS + 8;
    static constexpr int NTH = 32 * NW;
    static constexpr int TILE = BR * HSP;  // elements
    static constexpr int SMEM_BYTES = 6 * TILE * 2 + 4 * BC * 4;
};

extern __shared__ __align__(16) unsigned char att_dyn_smem[];

// dK, dV for keys k0 .. k0+BR-1 (warp w: keys k0+16w ..), loop over query tiles t >= k0.
// smem: tile0 K, tile1 V, stage s: tile 2+2s Q, tile 3+2s dO; floats: stage s: L[BC], D[BC].
template <int HS>
__device__ __noinline__ void att_bwd_dkdv_bf16(__nv_bfloat16* buf, float* fbuf, __nv_bfloat16* dqkv,
                                                  const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                                  const float* lse, const float* D, int B, int T_, int C,
                                                  int NH) {
    typedef AttBwdCfg<HS> Cf;
    constexpr int HSP = Cf::HSP, BR = Cf::BR, BC = Cf::BC, NTH = Cf::NTH, TILE = Cf::TILE;
    constexpr int KT = HS / 16, NTC = BC / 8, DT = HS / 8;
    const __nv_bfloat16* Ks = buf;
    const __nv_bfloat16* Vs = buf + TILE;

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int k0 = (int)blockIdx.y * BR;  // small key blocks (most work) first
    const int ws0 = k0 + warp * 16;
    const int C3 = 3 * C;
    const __nv_bfloat16* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const __nv_bfloat16* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const float* lbase = lse + (long long)bh * T_;
    const float* Dbase = D + (long long)bh * T_;
    const bool vec = ((((size_t)qkv) | ((size_t)dout)) & 15) == 0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * ATT_LOG2E;
    const int qstart = (k0 / BC) * BC;
    const int ntiles = (T_ - qstart + BC - 1) / BC;  // >= 1 (k0 < T_)

    att_tile_async<HS, BR, NTH>(buf, base + C, C3, k0, T_, hs, hs16, vec);
    att_tile_async<HS, BR, NTH>(buf + TILE, base + 2 * C, C3, k0, T_, hs, hs16, vec);
    att_cp_commit();
    // issue query tile i into stage (i & 1)
#define ATT_DKDV_ISSUE(i_)                                                                         \
    {                                                                                              \
        const int st_ = (i_) & 1, qq_ = qstart + (i_) * BC;                                        \
        att_tile_async<HS, BC, NTH>(buf + (2 + 2 * st_) * TILE, base, C3, qq_, T_, hs, hs16, vec); \
        att_tile_async<HS, BC, NTH>(buf + (3 + 2 * st_) * TILE, dbase, C, qq_, T_, hs, hs16, vec); \
        if ((int)threadIdx.x < BC) {                                                               \
            const int tq_ = qq_ + (int)threadIdx.x;                                                \
            const bool ok_ = tq_ < T_;                                                             \
            att_cp4(fbuf + st_ * 2 * BC + threadIdx.x, ok_ ? lbase + tq_ : lbase, ok_);            \
            att_cp4(fbuf + st_ * 2 * BC + BC + threadIdx.x, ok_ ? Dbase + tq_ : Dbase, ok_);       \
        }                                                                                          \
        att_cp_commit();                                                                           \
    }
    ATT_DKDV_ISSUE(0);

    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) { dk[dt][e] = 0.f; dv[dt][e] = 0.f; }
    }

    for (int i = 0; i < ntiles; i++) {
        const int q0 = qstart + i * BC;
        if (i + 1 < ntiles) {
            ATT_DKDV_ISSUE(i + 1);
            att_cp_wait<1>();
        } else {
            att_cp_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16* Qs = buf + (2 + 2 * (i & 1)) * TILE;
        const __nv_bfloat16* dOs = buf + (3 + 2 * (i & 1)) * TILE;
        const float* Ls = fbuf + (i & 1) * 2 * BC;
        const float* Ds = Ls + BC;
        if (q0 + BC - 1 >= ws0) {  // warp-uniform: some query of the tile sees some key of the warp
            float st[NTC][4], dpt[NTC][4];
#pragma unroll
            for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) { st[nt][e] = 0.f; dpt[nt][e] = 0.f; }
            }
            // S^T = K Q^T and dP^T = V dO^T  (16 keys x BC queries per warp)
#pragma unroll
            for (int kt = 0; kt < KT; kt++) {
                if (kt * 16 < hs16) {
                    att_u32 ka[4], va[4];
                    att_ldsm_x4(ka, att_a_ptr<HSP>(Ks, warp * 16, kt * 16, lane));
                    att_ldsm_x4(va, att_a_ptr<HSP>(Vs, warp * 16, kt * 16, lane));
#pragma unroll
                    for (int np = 0; np < NTC / 2; np++) {
                        att_u32 bb[4];
                        att_ldsm_x4(bb, att_bn_ptr<HSP>(Qs, np * 16, kt * 16, lane));
                        att_mma(st[2 * np], ka, bb[0], bb[1]);
                        att_mma(st[2 * np + 1], ka, bb[2], bb[3]);
                        att_ldsm_x4(bb, att_bn_ptr<HSP>(dOs, np * 16, kt * 16, lane));
                        att_mma(dpt[2 * np], va, bb[0], bb[1]);
                        att_mma(dpt[2 * np + 1], va, bb[2], bb[3]);
                    }
                }
            }
            const bool need_mask = (q0 < ws0 + 15) || (q0 + BC > T_);
#pragma unroll
            for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int ti = nt * 8 + 2 * t4 + (e & 1);
                    float p = exp2f(st[nt][e] * cs - Ls[ti] * ATT_LOG2E);
                    if (need_mask) {
                        const int tq = q0 + ti;
                        const int sk = ws0 + g + (e >> 1) * 8;
                        if (tq < sk || tq >= T_) p = 0.f;
                    }
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - Ds[ti]);
                }
            }
            // dV += P^T dO ; dK += dS^T Q   (A from registers, B = [queries][d] tiles, trans)
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                att_u32 pa[4], da[4];
                pa[0] = att_pack(st[2 * kk][0], st[2 * kk][1]);
                pa[1] = att_pack(st[2 * kk][2], st[2 * kk][3]);
                pa[2] = att_pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
                pa[3] = att_pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
                da[0] = att_pack(dpt[2 * kk][0], dpt[2 * kk][1]);
                da[1] = att_pack(dpt[2 * kk][2], dpt[2 * kk][3]);
                da[2] = att_pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
                da[3] = att_pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    if (dp * 16 < hs16) {
                        att_u32 bb[4];
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(dOs, kk * 16, dp * 16, lane));
                        att_mma(dv[2 * dp], pa, bb[0], bb[1]);
                        att_mma(dv[2 * dp + 1], pa, bb[2], bb[3]);
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(Qs, kk * 16, dp * 16, lane));
                        att_mma(dk[2 * dp], da, bb[0], bb[1]);
                        att_mma(dk[2 * dp + 1], da, bb[2], bb[3]);
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
#undef ATT_DKDV_ISSUE
    const bool ovec = (((size_t)dqkv) & 3) == 0;
    __nv_bfloat16* dbh = dqkv + (long long)b * T_ * C3 + (long long)h * hs;
    att_store_frag_bf16<HS>(dbh + C, C3, ws0 + g, T_, hs, dk, scale, scale, ovec, t4);
    att_store_frag_bf16<HS>(dbh + 2 * C, C3, ws0 + g, T_, hs, dv, 1.0f, 1.0f, ovec, t4);
}

// dQ for queries q0 .. q0+BR-1 (warp w: queries q0+16w ..), loop over key tiles s <= t.
// smem: tile0 Q, tile1 dO, stage s: tile 2+2s K, tile 3+2s V.
template <int HS>
__device__ __noinline__ void att_bwd_dq_bf16(__nv_bfloat16* buf, __nv_bfloat16* dqkv,
                                                const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                                const float* lse, const float* D, int B, int T_, int C,
                                                int NH) {
    typedef AttBwdCfg<HS> Cf;
    constexpr int HSP = Cf::HSP, BR = Cf::BR, BC = Cf::BC, NTH = Cf::NTH, TILE = Cf::TILE;
    constexpr int KT = HS / 16, NTC = BC / 8, DT = HS / 8;
    const __nv_bfloat16* Qs = buf;
    const __nv_bfloat16* dOs = buf + TILE;

    const int hs = C / NH, hs16 = (hs + 15) & ~15;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int nqb = (T_ + BR - 1) / BR;
    const int q0 = (nqb - 1 - (int)blockIdx.y) * BR;  // heaviest first
    const int wq0 = q0 + warp * 16;
    const int r0 = wq0 + g, r1 = r0 + 8;
    const int C3 = 3 * C;
    const __nv_bfloat16* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const __nv_bfloat16* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const bool vec = ((((size_t)qkv) | ((size_t)dout)) & 15) == 0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * ATT_LOG2E;
    const int kend = min(q0 + BR, T_);
    const int ntiles = (kend + BC - 1) / BC;

    att_tile_async<HS, BR, NTH>(buf, base, C3, q0, T_, hs, hs16, vec);
    att_tile_async<HS, BR, NTH>(buf + TILE, dbase, C, q0, T_, hs, hs16, vec);
    att_cp_commit();
    att_tile_async<HS, BC, NTH>(buf + 2 * TILE, base + C, C3, 0, T_, hs, hs16, vec);
    att_tile_async<HS, BC, NTH>(buf + 3 * TILE, base + 2 * C, C3, 0, T_, hs, hs16, vec);
    att_cp_commit();
    const float L0 = r0 < T_ ? lse[(long long)bh * T_ + r0] * ATT_LOG2E : 0.f;
    const float L1 = r1 < T_ ? lse[(long long)bh * T_ + r1] * ATT_LOG2E : 0.f;
    const float D0 = r0 < T_ ? D[(long long)bh * T_ + r0] : 0.f;
    const float D1 = r1 < T_ ? D[(long long)bh * T_ + r1] : 0.f;

    float dq[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) { dq[dt][0] = 0.f; dq[dt][1] = 0.f; dq[dt][2] = 0.f; dq[dt][3] = 0.f; }

    for (int i = 0; i < ntiles; i++) {
        const int k0 = i * BC;
        if (i + 1 < ntiles) {
            const int st_ = (i + 1) & 1;
            att_tile_async<HS, BC, NTH>(buf + (2 + 2 * st_) * TILE, base + C, C3, k0 + BC, T_, hs, hs16, vec);
            att_tile_async<HS, BC, NTH>(buf + (3 + 2 * st_) * TILE, base + 2 * C, C3, k0 + BC, T_, hs, hs16, vec);
            att_cp_commit();
            att_cp_wait<1>();
        } else {
            att_cp_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16* Ks = buf + (2 + 2 * (i & 1)) * TILE;
        const __nv_bfloat16* Vs = buf + (3 + 2 * (i & 1)) * TILE;
        if (k0 <= wq0 + 15) {  // warp-uniform
            float s[NTC][4], dps[NTC][4];
#pragma unroll
            for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) { s[nt][e] = 0.f; dps[nt][e] = 0.f; }
            }
            // S = Q K^T, dP = dO V^T  (16 queries x BC keys per warp)
#pragma unroll
            for (int kt = 0; kt < KT; kt++) {
                if (kt * 16 < hs16) {
                    att_u32 qa[4], oa[4];
                    att_ldsm_x4(qa, att_a_ptr<HSP>(Qs, warp * 16, kt * 16, lane));
                    att_ldsm_x4(oa, att_a_ptr<HSP>(dOs, warp * 16, kt * 16, lane));
#pragma unroll
                    for (int np = 0; np < NTC / 2; np++) {
                        att_u32 bb[4];
                        att_ldsm_x4(bb, att_bn_ptr<HSP>(Ks, np * 16, kt * 16, lane));
                        att_mma(s[2 * np], qa, bb[0], bb[1]);
                        att_mma(s[2 * np + 1], qa, bb[2], bb[3]);
                        att_ldsm_x4(bb, att_bn_ptr<HSP>(Vs, np * 16, kt * 16, lane));
                        att_mma(dps[2 * np], oa, bb[0], bb[1]);
                        att_mma(dps[2 * np + 1], oa, bb[2], bb[3]);
                    }
                }
            }
            const bool need_mask = (k0 + BC - 1 > wq0) || (k0 + BC > T_);
#pragma unroll
            for (int nt = 0; nt < NTC; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float p = exp2f(s[nt][e] * cs - ((e < 2) ? L0 : L1));
                    if (need_mask) {
                        const int sk = k0 + nt * 8 + 2 * t4 + (e & 1);
                        const int tq = (e < 2) ? r0 : r1;
                        if (sk > tq || sk >= T_) p = 0.f;
                    }
                    s[nt][e] = p * (dps[nt][e] - ((e < 2) ? D0 : D1));  // dS
                }
            }
            // dQ += dS K  (B = K tile [keys][d], trans)
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                att_u32 da[4];
                da[0] = att_pack(s[2 * kk][0], s[2 * kk][1]);
                da[1] = att_pack(s[2 * kk][2], s[2 * kk][3]);
                da[2] = att_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                da[3] = att_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    if (dp * 16 < hs16) {
                        att_u32 bb[4];
                        att_ldsm_x4_t(bb, att_bt_ptr<HSP>(Ks, kk * 16, dp * 16, lane));
                        att_mma(dq[2 * dp], da, bb[0], bb[1]);
                        att_mma(dq[2 * dp + 1], da, bb[2], bb[3]);
                    }
                }
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
    const bool ovec = (((size_t)dqkv) & 3) == 0;
    att_store_frag_bf16<HS>(dqkv + (long long)b * T_ * C3 + (long long)h * hs, C3, r0, T_, hs, dq,
                            scale, scale, ovec, t4);
}

template <int HS>
__device__ __forceinline__ void att_bwd_bf16(__nv_bfloat16* dqkv, const __nv_bfloat16* dout,
                                             const __nv_bfloat16* qkv, const float* lse, const float* D,
                                             int B, int T_, int C, int NH) {
    typedef AttBwdCfg<HS> Cf;
    __nv_bfloat16* buf = reinterpret_cast<__nv_bfloat16*>(att_dyn_smem);
    float* fbuf = reinterpret_cast<float*>(att_dyn_smem + 6 * Cf::TILE * 2);
    if (blockIdx.z == 0)
        att_bwd_dkdv_bf16<HS>(buf, fbuf, dqkv, dout, qkv, lse, D, B, T_, C, NH);
    else
        att_bwd_dq_bf16<HS>(buf, dqkv, dout, qkv, lse, D, B, T_, C, NH);
}

extern "C" __global__ void __launch_bounds__(256)
attention_forward_hs64_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int B, int T_,
                            int C, int NH) {
    att_fwd_bf16<64>(out, lse, qkv, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(128)
attention_forward_hs128_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int B, int T_,
                             int C, int NH) {
    att_fwd_bf16<128>(out, lse, qkv, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(128)
attention_backward_hs64_bf16(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                             const float* lse, const float* D, int B, int T_, int C, int NH) {
    att_bwd_bf16<64>(dqkv, dout, qkv, lse, D, B, T_, C, NH);
}
extern "C" __global__ void __launch_bounds__(64)
attention_backward_hs128_bf16(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                              const float* lse, const float* D, int B, int T_, int C, int NH) {
    att_bwd_bf16<128>(dqkv, dout, qkv, lse, D, B, T_, C, NH);
}
