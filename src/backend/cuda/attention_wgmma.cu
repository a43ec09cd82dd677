// Causal self-attention FORWARD for Hopper (sm_90a): warpgroup MMA (wgmma.mma_async).
// Compiled by NVRTC for sm_90a only (mod.rs loads it on compute capability 9.0 and falls back to
// attention.cu's mma.sync kernels elsewhere, or when this file does not compile). Same contract
// as attention.cu's bf16/f16 forward (read that file's header): layout, out_scale, lse in natural
// log, any T_ >= 1, hs a multiple of 8 up to 128; in addition the qkv pointer must be 16-byte
// aligned (the host checks, and uses the old kernel otherwise). Deterministic: no atomics, fixed
// reduction order.
//
// EXTERN NAMES AND LAUNCH GEOMETRY (mod.rs, `mod attention`, mirrors the instantiations at the end):
//   attention_forward_wgmma_hs{HS}_{bf16,f16}(E* out, float* lse, const E* qkv, int B, int T_,
//                                             int C, int NH, float out_scale)
//     HS = hs = C/NH rounded up to 16, at least 32: 32, 48, 64, 80, 96, 112, 128. The products
//     run over HS columns (k16 steps of S = Q K^T, N = HS of O += P V); columns hs .. HS-1 are
//     zero-filled. Shared memory holds HSP = HS rounded up to 64 columns (whole swizzle blocks).
//     grid = (B*NH, ceil(T_/BQ), 1), block = 128*NWG, BQ = 64*NWG,
//     dyn smem = AtwFwd::SMEM = 2*HSP*(BQ + 4*BK) + 1024 bytes (> 48 KB: the host raises the limit)
//     HS <= 64: NWG = 2, BK = 64,  <= 128 registers (2 blocks per SM), 50,176 B
//     HS > 64 : NWG = 2, BK = 128, 1 block per SM,                      164,864 B
//
// SCHEME. A block owns BQ = 64*NWG queries; warpgroup w (4 warps, 128 threads) owns 64 of them.
// Q [BQ][HS] and double-buffered K, V tiles [BK][HS] sit in shared memory in the canonical 128-byte
// swizzled layout of wgmma (copied by cp.async, 16 bytes a thread, zero-filled past T_ and past hs):
// the head dimension is cut in 64-element column chunks; in a chunk row r occupies 128 bytes at
// r*128 and its 16-byte piece c lands at piece c ^ (r & 7); chunk regions are 1024-byte aligned.
// Per key tile a warpgroup computes S = Q K^T (m64nBKk16, both operands K-major from shared
// memory), applies the causal mask on tiles crossing its diagonal, updates the online softmax in
// registers (exp2 domain, as attention.cu), rounds P to E and computes O += P V with P as the
// register A operand (its fragments are the accumulator's, regrouped) and V read MN-major
// (transposed) from the same swizzled tile. Warpgroups skip tiles wholly in their future; blocks
// are ordered heaviest first.
//
// MEASURED (H200, standalone harness, bf16, median of 7 x 30 calls over 3 rotating input sets;
// causal TFLOP/s = 4*B*NH*T^2*hs/2 / time). attention.cu's mma.sync forward: 124M shape (B 16,
// T 1024, 12 heads, hs 64) 0.177 ms (145 TFLOP/s); 0.91B shape (B 8, T 1024, 16 heads, hs 128)
// 0.267 ms (129). This kernel: 124M 0.096 ms (269, 1.85x), 0.91B 0.136 ms (253, 1.97x).
// Warpgroups resident per SM (registers, shared memory) decided the tiling:
//   hs64 : NWG 2 BK 64 (2 blocks/SM) 0.096 | NWG 2 BK 128 (178 registers, 1 block) 0.140 |
//          NWG 1 BK 64 0.109 | NWG 1 BK 128 0.125 | NWG 3 BK 64 0.156 | NWG 3 BK 128 0.145
//   hs128: NWG 2 BK 128 0.136 | NWG 1 BK 64 0.137 | NWG 2 BK 64 0.141 | NWG 3 BK 64 0.154 |
//          NWG 1 BK 128 0.207
// Intra-warpgroup pipelining (FA3-style: issue S_j and P_{j-1} V_{j-1} together, softmax of tile j
// while the tensor cores do P_{j-1} V_{j-1}; three K/V stages; P ping-ponged between two register
// sets because a register copy let ptxas merge them and serialise every wgmma) was correct but
// no faster at these shapes: hs64 0.097 (NWG 2 BK 64, <= 128 registers), hs128 0.137-0.141.
// It, Q held in registers (S by register-A wgmma) and one barrier per tile over three stages are
// in commit 67ab960 of the attnfwd branch (the last two written but never measured).
// Padded head sizes (H100, HALFLING_CUDA_PROFILE, hs 80 at B 8, T 1024, 16 heads): HS 80 0.112 ms
// per call, against 0.130 when hs 80 ran as HS 128.
// ---------------------------------------------------------------------------------------------

// Prepended by mod.rs: device_common.cuh (ex2_ftz, LOG2E) and wgmma_common.cuh (u32/u64,
// cp.async, wgmma wrappers Wg / WgRs, fences, sm90_desc, sm90_pack).

#define ATW_LN2 0.6931471805599453f
#define ATW_NEG_INF __int_as_float(0xff800000)

extern __shared__ __align__(1024) unsigned char atw_smem[];

// The descriptor of sm90_desc (wgmma_common.cuh, which has the layout), the start address masked
// before the shift: the same value, but NVRTC keeps the and/shr order, and this forward's PTX as
// measured has this one.
__device__ __forceinline__ u64 atw_desc(u32 saddr, u32 lbo, u32 sbo) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) |
           ((u64)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

// Rows row0 .. row0+R-1 of a [T_, stride] matrix (g = the head's column 0 of row 0) into the
// swizzled layout at shared address s (HS/64 column chunks of R*128 bytes). Pieces of rows >= T_
// or columns >= hs are zero-filled. All NTH threads of the block take part.
template <int HS, int R, int NTH, typename E>
__device__ __forceinline__ void atw_load_tile(u32 s, const E* g, int stride, int row0, int T_, int hs) {
    constexpr int CPR = HS / 8;  // 16-byte pieces per row
    constexpr int TOTAL = R * CPR;
#pragma unroll
    for (int it = 0; it < (TOTAL + NTH - 1) / NTH; it++) {
        const int idx = (int)threadIdx.x + it * NTH;
        if ((TOTAL % NTH == 0) || idx < TOTAL) {
            const int r = idx / CPR, cg = idx % CPR;
            const int t = row0 + r;
            const bool ok = (t < T_) && (cg * 8 < hs);
            const E* src = ok ? g + (long long)t * stride + cg * 8 : g;
            const u32 dst = s + (cg >> 3) * (R * 128) + r * 128 + (((cg & 7) ^ (r & 7)) << 4);
            sm90_cp16(dst, src, ok);
        }
    }
}

// Causal mask, online-softmax update and P for one S tile (NS n8 column groups, the m64nN
// accumulator layout: s[4j+e] is row r0 (e < 2) or r1, key k0 + 8j + 2*t4 + (e & 1)). Returns the
// factors cr0, cr1 that rescale this thread's two O rows; P rounded to E lands in pa as the
// A fragments of the next product (k-step j/2: row r0 keys 2t4.., row r1, then keys + 8).
template <int NS, typename E>
__device__ __forceinline__ void atw_softmax(float (&s)[NS * 4], u32 (&pa)[NS / 2][4], bool mask,
                                            int k0, int r0, int r1, int t4, int T_, float cs,
                                            float& m0, float& m1, float& l0, float& l1,
                                            float& cr0, float& cr1) {
    if (mask) {
#pragma unroll
        for (int j = 0; j < NS; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = k0 + 8 * j + 2 * t4 + (e & 1);
                const int row = (e & 2) ? r1 : r0;
                if (col > row || col >= T_) s[4 * j + e] = ATW_NEG_INF;
            }
        }
    }
    float mx0 = ATW_NEG_INF, mx1 = ATW_NEG_INF;
#pragma unroll
    for (int j = 0; j < NS; j++) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // running max in the scaled log2 domain (cs > 0, so max and scaling commute)
    const float mn0 = fmaxf(m0, mx0 * cs), mn1 = fmaxf(m1, mx1 * cs);
    const float mr0 = (mn0 == ATW_NEG_INF) ? 0.f : mn0;  // fully masked row: no NaN
    const float mr1 = (mn1 == ATW_NEG_INF) ? 0.f : mn1;
    cr0 = ex2_ftz(m0 - mr0);
    cr1 = ex2_ftz(m1 - mr1);
    m0 = mn0;
    m1 = mn1;
    l0 *= cr0;
    l1 *= cr1;
#pragma unroll
    for (int j = 0; j < NS; j++) {
        const float p0 = ex2_ftz(fmaf(s[4 * j], cs, -mr0));
        const float p1 = ex2_ftz(fmaf(s[4 * j + 1], cs, -mr0));
        const float p2 = ex2_ftz(fmaf(s[4 * j + 2], cs, -mr1));
        const float p3 = ex2_ftz(fmaf(s[4 * j + 3], cs, -mr1));
        l0 += p0 + p1;
        l1 += p2 + p3;
        pa[j >> 1][(j & 1) * 2] = sm90_pack<E>(p0, p1);
        pa[j >> 1][(j & 1) * 2 + 1] = sm90_pack<E>(p2, p3);
    }
}

// S = Q K^T for one warpgroup (64 query rows at sQw, key tile at sK): HS/16 k16 steps, both
// operands K-major; columns hs .. HS-1 (where hs % 16 == 8) are zero in both tiles. Issued, not
// waited for.
template <int HS, int BQ, int BK, typename E>
__device__ __forceinline__ void atw_issue_s(float (&s)[BK / 2], u32 sQw, u32 sK) {
#pragma unroll
    for (int kt = 0; kt < HS / 16; kt++) {
        const u32 qa = sQw + (kt >> 2) * (BQ * 128) + (kt & 3) * 32;
        const u32 ka = sK + (kt >> 2) * (BK * 128) + (kt & 3) * 32;
        Wg<E, BK>::ss(s, atw_desc(qa, 16, 1024), atw_desc(ka, 16, 1024), kt > 0);
    }
}
// O += P V, N = HS (V MN-major from the swizzled tile at sV: k16 step kk starts 16 rows = 2048
// bytes on; 64-column chunks are BK*128 bytes apart). Issued, not waited for.
template <int HS, int BK, typename E>
__device__ __forceinline__ void atw_issue_pv(float (&o)[HS / 2], const u32 (&pa)[BK / 16][4], u32 sV) {
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) WgRs<E, HS>::rs1(o, pa[kk], atw_desc(sV + kk * 2048, BK * 128, 1024));
}

// Output and log-sum-exp of this thread's two rows.
template <int HS, typename E>
__device__ __forceinline__ void atw_store(E* out, float* lse, const float (&o)[HS / 2], float m0, float m1,
                                          float l0, float l1, int b, int h, int bh, int r0, int r1,
                                          int t4, int T_, int C, int hs, float out_scale) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float mul0 = out_scale / l0, mul1 = out_scale / l1;
    E* ob = out + (long long)b * T_ * C + (long long)h * hs;
    const bool vec2 = (((size_t)out) & 3) == 0;
#pragma unroll
    for (int j = 0; j < HS / 8; j++) {
        const int d = 8 * j + 2 * t4;
        if (8 * j < hs) {  // warp-uniform (hs is a multiple of 8)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = hf ? r1 : r0;
                if (r < T_) {
                    const float mul = hf ? mul1 : mul0;
                    const u32 v = sm90_pack<E>(o[4 * j + 2 * hf] * mul, o[4 * j + 2 * hf + 1] * mul);
                    E* p = ob + (long long)r * C + d;
                    if (vec2) {
                        *reinterpret_cast<u32*>(p) = v;
                    } else {
                        reinterpret_cast<unsigned short*>(p)[0] = (unsigned short)(v & 0xffffu);
                        reinterpret_cast<unsigned short*>(p)[1] = (unsigned short)(v >> 16);
                    }
                }
            }
        }
    }
    if (t4 == 0) {
        if (r0 < T_) lse[(long long)bh * T_ + r0] = (m0 + log2f(l0)) * ATW_LN2;
        if (r1 < T_) lse[(long long)bh * T_ + r1] = (m1 + log2f(l1)) * ATW_LN2;
    }
}

// HS: the head size rounded up to 16 (what the products cover); HSP: rounded up to the 64-column
// swizzle chunk (what shared memory holds; columns HS .. HSP-1 are never written nor read).
template <int HS, int NWG, int BK>
struct AtwFwd {
    static_assert(HS % 16 == 0 && HS >= 32 && HS <= 128, "the head-dim products are m64nHSk16");
    static constexpr int HSP = (HS + 63) / 64 * 64;
    static constexpr int BQ = 64 * NWG;
    static constexpr int NTH = 128 * NWG;
    static constexpr int QBYTES = BQ * HSP * 2;
    static constexpr int TBYTES = BK * HSP * 2;  // one K or V tile
    static constexpr int SMEM = QBYTES + 4 * TBYTES + 1024;  // 2 K/V stages; + 1024: alignment slack
};

// Per key tile: S (waited for), mask and softmax, then O += P V (waited for) before the barrier
// that frees the stage for the next prefetch.
template <int HS, int NWG, int BK, typename E>
__device__ __forceinline__ void atw_fwd(E* out, float* lse, const E* qkv, int B, int T_, int C,
                                        int NH, float out_scale) {
    typedef AtwFwd<HS, NWG, BK> Cf;
    constexpr int BQ = Cf::BQ, NTH = Cf::NTH, TB = Cf::TBYTES;
    constexpr int NS = BK / 8;  // n8 column groups of S (4 registers each)
    constexpr int NO = HS / 8;  // n8 column groups of O
    const u32 sQ = (sm90_addr(atw_smem) + 1023u) & ~1023u;
    const u32 sKV = sQ + Cf::QBYTES;  // stage s: K at sKV + 2s*TB, V at + TB

    const int hs = C / NH;
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + BQ - 1) / BQ;
    const int q0 = (nqb - 1 - (int)blockIdx.y) * BQ;  // heaviest first
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int t4 = lane & 3;
    const int wq0 = q0 + 64 * wg;
    const int r0 = wq0 + 16 * warp + (lane >> 2), r1 = r0 + 8;  // this thread's two rows
    const int C3 = 3 * C;
    const E* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const float cs = (1.0f / sqrtf((float)hs)) * LOG2E;
    const int kend = min(q0 + BQ, T_);
    const int ntiles = (kend + BK - 1) / BK;
    const u32 sQw = sQ + wg * (64 * 128);

    atw_load_tile<HS, BQ, NTH>(sQ, base, C3, q0, T_, hs);
    atw_load_tile<HS, BK, NTH>(sKV, base + C, C3, 0, T_, hs);
    atw_load_tile<HS, BK, NTH>(sKV + TB, base + 2 * C, C3, 0, T_, hs);
    sm90_cp_commit();

    float o[NO * 4];
#pragma unroll
    for (int i = 0; i < NO * 4; i++) o[i] = 0.f;
    float m0 = ATW_NEG_INF, m1 = ATW_NEG_INF, l0 = 0.f, l1 = 0.f;

    for (int i = 0; i < ntiles; i++) {
        const int k0 = i * BK;
        if (i + 1 < ntiles) {
            const u32 nx = sKV + ((i + 1) & 1) * 2 * TB;
            atw_load_tile<HS, BK, NTH>(nx, base + C, C3, k0 + BK, T_, hs);
            atw_load_tile<HS, BK, NTH>(nx + TB, base + 2 * C, C3, k0 + BK, T_, hs);
            sm90_cp_commit();
            sm90_cp_wait<1>();
        } else {
            sm90_cp_wait<0>();
        }
        sm90_fence_proxy();
        __syncthreads();
        if (k0 <= wq0 + 63) {  // warpgroup-uniform: otherwise every key is in this warpgroup's future
            const u32 sK = sKV + (i & 1) * 2 * TB;
            float s[NS * 4];
            sm90_wg_fence();
            atw_issue_s<HS, BQ, BK, E>(s, sQw, sK);
            sm90_wg_commit();
            sm90_wg_wait<0>();
            sm90_fence_acc(s);
            u32 pa[BK / 16][4];
            float cr0, cr1;
            atw_softmax<NS, E>(s, pa, (k0 + BK - 1 > wq0) || (k0 + BK > T_), k0, r0, r1, t4, T_, cs,
                               m0, m1, l0, l1, cr0, cr1);
#pragma unroll
            for (int j = 0; j < NO; j++) {
                o[4 * j] *= cr0;
                o[4 * j + 1] *= cr0;
                o[4 * j + 2] *= cr1;
                o[4 * j + 3] *= cr1;
            }
            sm90_wg_fence();
            atw_issue_pv<HS, BK, E>(o, pa, sK + TB);
            sm90_wg_commit();
            sm90_wg_wait<0>();
            sm90_fence_acc(o);
        }
        __syncthreads();  // the stage just read is refilled by the next iteration's prefetch
    }
    atw_store<HS, E>(out, lse, o, m0, m1, l0, l1, b, h, bh, r0, r1, t4, T_, C, hs, out_scale);
}

#define ATW_FWD_KERNEL(name, E, HS, NWG, BK, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB)                                   \
    name(E* out, float* lse, const E* qkv, int B, int T_, int C, int NH, float out_scale) {         \
        atw_fwd<HS, NWG, BK, E>(out, lse, qkv, B, T_, C, NH, out_scale);                           \
    }

// Instantiations, one per padded head size HS: two warpgroups per block; HS <= 64 as measured at
// hs 64 (key tile 64, 2 blocks per SM), larger HS as at hs 128 (key tile 128, 1 block per SM).
// bf16 and f16 share them. mod.rs (`mod attention`, fwd_wgmma) mirrors these numbers.
#define ATW_FWD_HS(E, sfx, HS) \
    ATW_FWD_KERNEL(attention_forward_wgmma_hs##HS##_##sfx, E, HS, 2, (HS <= 64 ? 64 : 128), (HS <= 64 ? 2 : 1))
#define ATW_FWD_SIZES(E, sfx)                                                                      \
    ATW_FWD_HS(E, sfx, 32) ATW_FWD_HS(E, sfx, 48) ATW_FWD_HS(E, sfx, 64) ATW_FWD_HS(E, sfx, 80)  \
    ATW_FWD_HS(E, sfx, 96) ATW_FWD_HS(E, sfx, 112) ATW_FWD_HS(E, sfx, 128)
ATW_FWD_SIZES(__nv_bfloat16, bf16)
ATW_FWD_SIZES(__half, f16)
