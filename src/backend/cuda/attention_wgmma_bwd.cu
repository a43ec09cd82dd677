// Causal attention BACKWARD on Hopper tensor cores (wgmma, sm_90a), for halfling's 16-bit paths.
// Compiled by NVRTC for sm_90a only when the GPU is compute capability 9.0; elsewhere (and for
// tensors not 16-byte aligned) the host uses attention.cu's mma.sync kernels. Same interface and
// numerics as attention.cu's bf16 backward (read its header for the tensor layouts): dqkv fully
// overwritten, lse and D (from attention_backward_preprocess_*) read, out_scale folded in at the
// store. Deterministic: no atomics, every sum in a fixed order.
//
// EXTERN NAMES AND LAUNCH GEOMETRY (host: mod.rs, `mod attention`, `sm90_tiling`):
//   attention_backward_sm90_hs{HS}_v{0,1,2}_{bf16,f16}(E* dqkv, const E* dout, const E* qkv,
//       const float* lse, const float* D, int B, int T_, int C, int NH, float out_scale)
//   with HS = hs = C/NH rounded up to 16, at least 32 (v0: 32, 48, .., 128; v1, v2: 64, 128);
//   qkv, dout and dqkv 16-byte aligned. The products run over HS columns (k16 steps of S and dP,
//   N = HS of dV, dK, dQ); tiles are loaded zero-filled in columns hs .. HS-1 and only columns
//   < hs are stored. Shared-memory tiles hold HSP = HS rounded up to 64 (whole swizzle blocks).
//   grid = (B*NH, ceil(T_/BM), 2), block = 128*NWG, dynamic smem = Sm90Bwd::SMEM bytes,
//   BM = 64*NWG. Variant table (NWG, BN, NS, OVL, MINB) at the end of this file.
//   attention_backward_sm90_hs{HS}_v0_qb_{bf16,f16}(same arguments, float* qb): v0 that also
//   writes the QKV bias gradient's partial column sums (HALFLING_CUDA_ATTN_QKV_BIAS=1): with
//   NQB = ceil(T_/BM) row tiles per sequence, qb[(b*NQB + tile)*3C + j] = Σ over the tile's rows
//   r < T_ of dqkv[b, r, j] as stored (rounded to E), for every column j (each (row tile, j)
//   written by exactly one block: dQ blocks the Q columns of their head, dK/dV blocks the K and
//   V ones); the host then adds s·Σ_rows into the bias gradient (column_sums_reduce, G =
//   B*NQB). Same geometry and shared memory as v0.
//
// STRUCTURE. Like attention.cu: blockIdx.z == 0 blocks own BM keys and sum dK, dV over query
// tiles; blockIdx.z == 1 blocks own BM queries and sum dQ over key tiles (S and dP recomputed:
// 7 matmuls, no atomics). Each warpgroup (4 warps, 128 threads) owns 64 rows (one wgmma M=64
// tile). Per column tile of BN rows (queries for dK/dV, keys for dQ):
//   dK/dV: S^T = K Q^T, dP^T = V dO^T  (SS: A = own K/V rows, B = Q/dO tile, both K-major)
//          P^T = exp2(S^T*cs - L), dS^T = P^T (dP^T - D)  in registers, rounded to E
//          dV += P^T dO, dK += dS^T Q  (RS: A = P^T / dS^T registers, B = dO/Q tile MN-major)
//   dQ:    S = Q K^T, dP = dO V^T (SS), dS = P (dP - D), dQ += dS K (RS, B = K tile MN-major).
// The wgmma accumulator layout (per warp: rows g, g+8, columns 8j + 2*t4 + {0,1}) equals the
// register A-fragment layout, so P and dS feed the second products without shared memory.
// Tiles live in shared memory in the 128-byte-swizzle layout that wgmma descriptors name:
// [rows][64 elements] column blocks (HS > 64: two), row r's 16-byte chunk c at c ^ (r & 7),
// each block 1024-byte aligned. cp.async (16 B, zero-fill past T_ and hs) fills them; column tiles
// rotate through NS stages, prefetched one tile ahead; one __syncthreads per tile. OVL: the
// second product of tile i stays in flight while tile i+1's first product is issued (needs
// NS = 3, so the stage it reads is not refilled meanwhile); otherwise it is waited for at once.
// Causality: warpgroups skip column tiles wholly in their future (warpgroup-uniform), and only
// tiles crossing the diagonal or T_ are masked.
//
// TUNING (H200, GPT-2 124M shape hs=64 and the 0.91B shape hs=128, T=1024; ms per backward call,
// attention.cu's mma.sync kernels 0.58 and 0.97): one warpgroup per block, NS = 2, no overlap
// (v0: 3 blocks/SM at hs64 with 168 registers, 2 at hs128) measured 0.327 and 0.406; two
// warpgroups per block (lockstep at the block barrier) 0.37-0.43; BN = 128 no better. ncu on
// v0: issue-bound (hs64: 0.49 warps issued per scheduler cycle, 51% SM throughput; stalls
// mostly wait / not-selected / math-pipe throttle), the tensor pipe far from busy.
// Padded head sizes (H100, HALFLING_CUDA_PROFILE, L8 d1280 h16 = hs 80, B 8, T 1024): v0 at
// HS 80 0.283 ms per call, against 0.732 for attention.cu's hs128 kernel that ran it before.

// Prepended by mod.rs: device_common.cuh (ex2_ftz, LOG2E) and wgmma_common.cuh (u32/u64,
// cp.async, wgmma wrappers Wg / WgRs, fences, sm90_desc, sm90_pack).

extern __shared__ __align__(1024) unsigned char sm90_dyn_smem[];

// K-major operand (rows = M or N, the reduction over the head dim) starting at row 0 of `tile`
// (a multiple of 64 rows into a tile); k-step kt of an NROWS-row tile adds sm90_koff<NROWS>(kt)
// (start-address units of 16 bytes). 8-row groups are 1024 B apart.
__device__ __forceinline__ u64 sm90_desc_k(u32 tile) { return sm90_desc(tile, 16, 1024); }
template <int NROWS>
__device__ __forceinline__ u64 sm90_koff(int kt) {
    return (u64)(((kt >> 2) * (NROWS * 128) + (kt & 3) * 32) >> 4);
}
// acc = A·Bᵀ reduced over the head dimension in HS/16 wgmma k-steps (acc overwritten): A the
// MROWS-row K-major tile at descriptor a, B the BN-row one at b (both from sm90_desc_k).
template <typename E, int BN, int MROWS, int HS>
__device__ __forceinline__ void sm90_ss_over_head(float (&acc)[BN / 2], u64 a, u64 b) {
    Wg<E, BN>::ss0(acc, a, b);
#pragma unroll
    for (int kt = 1; kt < HS / 16; kt++)
        Wg<E, BN>::ss1(acc, a + sm90_koff<MROWS>(kt), b + sm90_koff<BN>(kt));
}
// MN-major operand (the reduction over the tile's rows, N = all head columns): k-step kk (rows
// 16kk..16kk+15) adds kk * 128; the two 64-column blocks of HS = 128 are NROWS*128 bytes apart.
template <int NROWS>
__device__ __forceinline__ u64 sm90_desc_mn(u32 tile) { return sm90_desc(tile, NROWS * 128, 1024); }

// cp.async of 4 bytes (L1 and L2); zero-fill when !pred.
__device__ __forceinline__ void sm90_cp4(u32 dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 4 : 0)
                 : "memory");
}

// Rows row0 .. row0+NROWS-1, columns 0 .. HS-1 of a [T_, stride] matrix (g = the head's column 0
// of row 0) into the swizzled tile at shared address `tile`; rows >= T_ and columns >= hs
// zero-filled (16-byte pieces: hs is a multiple of 8). Asynchronous (caller commits). A thread
// keeps one piece column (rows are CPRP >= CPR pieces wide, a power of 2, the extra ones idle), so
// its addresses advance by constants: fewer live registers than a division per piece.
template <int NROWS, int HS, int NTH, typename E>
__device__ __forceinline__ void sm90_load(u32 tile, const E* g, int stride, int row0, int T_, int hs) {
    constexpr int CPR = HS / 8, CPRP = CPR <= 4 ? 4 : CPR <= 8 ? 8 : 16;
    constexpr int RS = NTH / CPRP, TOTAL = NROWS * CPRP;  // RS: rows between a thread's pieces
    static_assert(NTH % CPRP == 0 && RS % 8 == 0, "a thread keeps its piece column and swizzle phase");
    const int r0 = (int)threadIdx.x / CPRP, c8 = (int)threadIdx.x % CPRP;
    if (c8 >= CPR) return;
    const int tlim = c8 * 8 < hs ? T_ : 0;  // zero-fills this thread's pieces past hs
    const u32 dst = tile + (c8 >> 3) * (NROWS * 128) + r0 * 128 + (((c8 & 7) ^ (r0 & 7)) << 4);
    const E* src = g + (long long)(row0 + r0) * stride + c8 * 8;
#pragma unroll
    for (int it = 0; it < (TOTAL + NTH - 1) / NTH; it++) {
        if (TOTAL % NTH != 0 && (int)threadIdx.x + it * NTH >= TOTAL) break;
        const bool ok = row0 + r0 + it * RS < tlim;
        sm90_cp16(dst + it * RS * 128, ok ? src + (long long)it * RS * stride : g, ok);
    }
}

// Accumulator rows r0 (= base + g) and r0 + 8, columns < hs, times mul, rounded to E, to
// dst[row * stride + d] for rows < T_ (dst: the head's column 0 of row 0; 4-byte stores).
template <int HS, typename E>
__device__ __forceinline__ void sm90_store(E* dst, long long stride, int r0, int T_, int hs,
                                           const float (&acc)[HS / 2], float mul, int t4) {
#pragma unroll
    for (int j = 0; j < HS / 8; j++) {
        if (8 * j >= hs) break;  // warp-uniform: hs is a multiple of 8
        const int d = 8 * j + 2 * t4;
        if (r0 < T_) *reinterpret_cast<u32*>(dst + r0 * stride + d) = sm90_pack<E>(acc[4 * j] * mul, acc[4 * j + 1] * mul);
        if (r0 + 8 < T_)
            *reinterpret_cast<u32*>(dst + (r0 + 8) * stride + d) = sm90_pack<E>(acc[4 * j + 2] * mul, acc[4 * j + 3] * mul);
    }
}

// Two values of E in one register (as sm90_pack writes them) back to floats.
template <typename E> __device__ __forceinline__ float2 sm90_unpack(u32 v);
template <> __device__ __forceinline__ float2 sm90_unpack<__nv_bfloat16>(u32 v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
template <> __device__ __forceinline__ float2 sm90_unpack<__half>(u32 v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
}

// Halves the values a lane holds for the reduction over the 8 lanes of a column (step m = 16, 8,
// 4): of lanes l and l^m, the one without bit m keeps the first N of its 2N values, the other the
// second N, each adding its partner's copy of those (so every sum is formed once, in one order).
template <int NV, int N>
__device__ __forceinline__ void sm90_xfold(float (&v)[NV], int m, bool up) {
#pragma unroll
    for (int k = 0; k < N; k++) {
        const float send = up ? v[k] : v[k + N];
        const float keep = up ? v[k + N] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, m);
    }
}

// sm90_store, and this warp's column sums of the values it stores (rounded to E; rows >= T_ count
// 0) into red[0 .. hs-1]. A thread adds its two rows per column (NV values, padded with zeros to a
// multiple of 8), three sm90_xfold steps sum them over the 8 lanes sharing its columns (same t4)
// and leave each lane NV/8 of them, which it writes. Whole warps only (hs is a multiple of 8).
template <int HS, typename E>
__device__ __forceinline__ void sm90_store_colsum(E* dst, long long stride, int r0, int T_, int hs,
                                                  const float (&acc)[HS / 2], float mul, int lane,
                                                  float* red) {
    constexpr int NV = (HS / 4 + 7) / 8 * 8;
    const int t4 = lane & 3;
    float v[NV];
#pragma unroll
    for (int k = 0; k < NV; k++) v[k] = 0.f;
#pragma unroll
    for (int j = 0; j < HS / 8; j++) {
        if (8 * j >= hs) break;  // warp-uniform
        const int d = 8 * j + 2 * t4;
        const u32 lo = sm90_pack<E>(acc[4 * j] * mul, acc[4 * j + 1] * mul);
        const u32 hi = sm90_pack<E>(acc[4 * j + 2] * mul, acc[4 * j + 3] * mul);
        if (r0 < T_) *reinterpret_cast<u32*>(dst + r0 * stride + d) = lo;
        if (r0 + 8 < T_) *reinterpret_cast<u32*>(dst + (r0 + 8) * stride + d) = hi;
        const float2 a = sm90_unpack<E>(r0 < T_ ? lo : 0u), b = sm90_unpack<E>(r0 + 8 < T_ ? hi : 0u);
        v[2 * j] = a.x + b.x;
        v[2 * j + 1] = a.y + b.y;
    }
    sm90_xfold<NV, NV / 2>(v, 16, lane & 16);
    sm90_xfold<NV, NV / 4>(v, 8, lane & 8);
    sm90_xfold<NV, NV / 8>(v, 4, lane & 4);
    // v[i] is the sum of value k = base + i: column 8*(k/2) + 2*t4 + k%2.
    const int base = (lane & 16 ? NV / 2 : 0) + (lane & 8 ? NV / 4 : 0) + (lane & 4 ? NV / 8 : 0);
#pragma unroll
    for (int i = 0; i < NV / 8; i++) {
        const int k = base + i, col = 8 * (k >> 1) + 2 * t4 + (k & 1);
        if (col < hs) red[col] = v[i];
    }
}

// The block's partial row of the QKV bias gradient (see the header): warp w's sums of part p are
// at red[(p*NW + w)*HS + d] (NW warps), folded over warps in order by thread d; part p of this
// block lands at qb[p*C + d] (qb: this row tile's row, at the head's first column of part 0).
template <int HS, int NW, int NPART, int NTH>
__device__ __forceinline__ void sm90_colsum_fold(float* qb, const float* red, int hs, int C) {
    static_assert(NTH >= HS, "a thread per column");
    const int d = (int)threadIdx.x;
    if (d >= hs) return;
#pragma unroll
    for (int p = 0; p < NPART; p++) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) s += red[(p * NW + w) * HS + d];
        qb[(long long)p * C + d] = s;
    }
}

// Accumulator (64 x BN, this warp's rows) -> BN/16 A fragments of the next product (k = columns).
template <int BN, typename E>
__device__ __forceinline__ void sm90_to_a(u32 (&a)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        a[kk][0] = sm90_pack<E>(s[8 * kk + 0], s[8 * kk + 1]);
        a[kk][1] = sm90_pack<E>(s[8 * kk + 2], s[8 * kk + 3]);
        a[kk][2] = sm90_pack<E>(s[8 * kk + 4], s[8 * kk + 5]);
        a[kk][3] = sm90_pack<E>(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// Geometry: NWG warpgroups, BM = 64*NWG own rows, column tiles of BN rows in NS stages. HS is the
// head size rounded up to 16 (what the products cover), HSP rounded up to the 64-column swizzle
// block (what a tile holds; columns HS .. HSP-1 are neither written nor read).
template <int HS, int NWG, int BN, int NS>
struct Sm90Bwd {
    static_assert(HS % 16 == 0 && HS >= 32 && HS <= 128, "the head-dim products are m64nHSk16");
    static constexpr int NTH = 128 * NWG, BM = 64 * NWG, HSP = (HS + 63) / 64 * 64;
    static constexpr int OWN = BM * HSP * 2;    // bytes of one own-rows tile (K, V / Q, dO)
    static constexpr int COL = BN * HSP * 2;    // bytes of one column tile
    static constexpr int STAGE = 2 * COL;       // Q + dO (dK/dV) or K + V (dQ)
    // own tiles, stages, then (dK/dV half) L and D floats per stage; +1024 to align the base
    static constexpr int SMEM = 2 * OWN + NS * STAGE + NS * 2 * BN * 4 + 1024;
};

__device__ __forceinline__ unsigned char* sm90_smem_base() {
    const u32 a = sm90_addr(sm90_dyn_smem);
    return sm90_dyn_smem + ((1024u - (a & 1023u)) & 1023u);
}

// dK, dV for keys k0 .. k0+BM-1 (warpgroup w: keys k0+64w ..), loop over query tiles t >= k0.
template <int HS, int NWG, int BN, int NS, bool OVL, bool QB, typename E>
__device__ __forceinline__ void sm90_dkdv(E* dqkv, const E* dout, const E* qkv, const float* lse,
                                          const float* D, int T_, int C, int NH, float out_scale,
                                          float* qb) {
    typedef Sm90Bwd<HS, NWG, BN, NS> Cf;
    constexpr int BM = Cf::BM, NTH = Cf::NTH;
    static_assert(!OVL || NS >= 3, "an in-flight second product reads the stage two tiles back");
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int k0 = (int)blockIdx.y * BM;  // small key blocks (most work) first
    if (k0 >= T_) return;                 // block-uniform
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wk0 = k0 + 64 * wg;
    const int C3 = 3 * C;
    const int hs = C / NH;
    const E* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const E* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    const float* lb = lse + (long long)bh * T_;
    const float* Db = D + (long long)bh * T_;
    unsigned char* sm = sm90_smem_base();
    const u32 s0 = sm90_addr(sm);
    const u32 Kt = s0, Vt = s0 + Cf::OWN, St = s0 + 2 * Cf::OWN;
    const float* Fp = reinterpret_cast<const float*>(sm + 2 * Cf::OWN + NS * Cf::STAGE);
    const u32 Ft = s0 + 2 * Cf::OWN + NS * Cf::STAGE;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * LOG2E;
    const int qt0 = (k0 / BN) * BN;  // the first query tile that sees a key of this block
    const int ntiles = (T_ - qt0 + BN - 1) / BN;

    auto load_stage = [&](int s, int q0) {
        const u32 q = St + s * Cf::STAGE;
        sm90_load<BN, HS, NTH>(q, base, C3, q0, T_, hs);
        sm90_load<BN, HS, NTH>(q + Cf::COL, dbase, C, q0, T_, hs);
        if (tid < BN) {
            const int t = q0 + tid;
            const bool ok = t < T_;
            sm90_cp4(Ft + (s * 2 * BN + tid) * 4, ok ? lb + t : lb, ok);
            sm90_cp4(Ft + (s * 2 * BN + BN + tid) * 4, ok ? Db + t : Db, ok);
        }
    };
    sm90_load<BM, HS, NTH>(Kt, base + C, C3, k0, T_, hs);
    sm90_load<BM, HS, NTH>(Vt, base + 2 * C, C3, k0, T_, hs);
    load_stage(0, qt0);
    sm90_cp_commit();

    float dk[HS / 2], dv[HS / 2];
    int acc = 0;
    const int sk0 = wk0 + 16 * warp + g;  // this thread's keys: sk0, sk0 + 8
    const u64 dk0 = sm90_desc_k(Kt + 64 * wg * 128), dv0 = sm90_desc_k(Vt + 64 * wg * 128);

    for (int i = 0; i < ntiles; i++) {
        sm90_cp_wait<0>();
        sm90_fence_proxy();
        __syncthreads();  // tile i landed; every warpgroup is done with the stage refilled next
        if (i + 1 < ntiles) {
            load_stage((i + 1) % NS, qt0 + (i + 1) * BN);
            sm90_cp_commit();
        }
        const int q0 = qt0 + i * BN;
        const int s = i % NS;
        const u32 Qt = St + s * Cf::STAGE, dOt = Qt + Cf::COL;
        const float* Ls = Fp + s * 2 * BN;
        const float* Ds = Ls + BN;
        // One inlined copy per masking need: otherwise ptxas computes every score's mask
        // predicate (hoisted above the wgmma) on every tile, a third of the loop's instructions.
        auto tile = [&](const bool MASK) {
            float st[BN / 2], dpt[BN / 2];
            const u64 dq = sm90_desc_k(Qt), ddo = sm90_desc_k(dOt);
            sm90_wg_fence();
            sm90_ss_over_head<E, BN, BM, HS>(st, dk0, dq);
            sm90_ss_over_head<E, BN, BM, HS>(dpt, dv0, ddo);
            sm90_wg_commit();
            sm90_wg_wait<0>();
            sm90_fence_acc(st);
            sm90_fence_acc(dpt);
#pragma unroll
            for (int j = 0; j < BN / 8; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int qi = 8 * j + 2 * t4 + e;
                    const float Lq = Ls[qi] * LOG2E, Dq = Ds[qi];
#pragma unroll
                    for (int hh = 0; hh < 2; hh++) {
                        const int x = 4 * j + 2 * hh + e;
                        float p = ex2_ftz(fmaf(st[x], cs, -Lq));
                        if (MASK) {
                            const int tq = q0 + qi;
                            if (tq < sk0 + 8 * hh || tq >= T_) p = 0.f;
                        }
                        st[x] = p;
                        dpt[x] = p * (dpt[x] - Dq);
                    }
                }
            }
            u32 pa[BN / 16][4], da[BN / 16][4];
            sm90_to_a<BN, E>(pa, st);
            sm90_to_a<BN, E>(da, dpt);
            const u64 mq = sm90_desc_mn<BN>(Qt), mdo = sm90_desc_mn<BN>(dOt);
            sm90_wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) WgRs<E, HS>::rs(dv, pa[kk], mdo + kk * 128, kk ? 1 : acc);
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) WgRs<E, HS>::rs(dk, da[kk], mq + kk * 128, kk ? 1 : acc);
            acc = 1;
            sm90_wg_commit();
            if (!OVL) sm90_wg_wait<0>();  // else it completes under the next tile's first product
        };
        if (q0 + BN - 1 >= wk0 && wk0 < T_) {         // warpgroup-uniform
            if ((q0 < wk0 + 63) || (q0 + BN > T_))  // crosses the diagonal or T_
                tile(true);
            else
                tile(false);
        } else {
            sm90_wg_wait<0>();
        }
    }
    sm90_wg_wait<0>();
    sm90_fence_acc(dk);
    sm90_fence_acc(dv);
    E* dst = dqkv + (long long)b * T_ * C3 + (long long)h * hs;
    const float gs = scale * out_scale;  // D was divided by out_scale (attn_bwd_pre)
    if (QB) {
        // The tiles are free once every warpgroup's products are done (each waited above).
        constexpr int NW = 4 * NWG;
        static_assert(2 * NW * HS * 4 <= 2 * Cf::OWN, "the sums fit where K and V were");
        float* red = reinterpret_cast<float*>(sm);
        const int w = tid >> 5;
        __syncthreads();
        sm90_store_colsum<HS>(dst + C, C3, sk0, T_, hs, dk, gs, lane, red + w * HS);
        sm90_store_colsum<HS>(dst + 2 * C, C3, sk0, T_, hs, dv, out_scale, lane, red + (NW + w) * HS);
        __syncthreads();
        const int nqb = (T_ + BM - 1) / BM;
        float* row = qb + ((long long)b * nqb + blockIdx.y) * C3 + C + (long long)h * hs;
        sm90_colsum_fold<HS, NW, 2, NTH>(row, red, hs, C);
    } else {
        sm90_store<HS>(dst + C, C3, sk0, T_, hs, dk, gs, t4);
        sm90_store<HS>(dst + 2 * C, C3, sk0, T_, hs, dv, out_scale, t4);
    }
}

// dQ for queries q0 .. q0+BM-1 (warpgroup w: queries q0+64w ..), loop over key tiles s <= t.
template <int HS, int NWG, int BN, int NS, bool OVL, bool QB, typename E>
__device__ __forceinline__ void sm90_dq(E* dqkv, const E* dout, const E* qkv, const float* lse,
                                        const float* D, int T_, int C, int NH, float out_scale,
                                        float* qb) {
    typedef Sm90Bwd<HS, NWG, BN, NS> Cf;
    constexpr int BM = Cf::BM, NTH = Cf::NTH;
    static_assert(!OVL || NS >= 3, "an in-flight second product reads the stage two tiles back");
    const int bh = blockIdx.x, b = bh / NH, h = bh - b * NH;
    const int nqb = (T_ + BM - 1) / BM;
    if ((int)blockIdx.y >= nqb) return;  // block-uniform
    const int q0 = (nqb - 1 - (int)blockIdx.y) * BM;  // heaviest first
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wq0 = q0 + 64 * wg;
    const int C3 = 3 * C;
    const int hs = C / NH;
    const E* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const E* dbase = dout + (long long)b * T_ * C + (long long)h * hs;
    unsigned char* sm = sm90_smem_base();
    const u32 s0 = sm90_addr(sm);
    const u32 Qt = s0, dOt = s0 + Cf::OWN, St = s0 + 2 * Cf::OWN;
    const float scale = 1.0f / sqrtf((float)hs);
    const float cs = scale * LOG2E;
    const int kend = min(q0 + BM, T_);
    const int ntiles = (kend + BN - 1) / BN;

    sm90_load<BM, HS, NTH>(Qt, base, C3, q0, T_, hs);
    sm90_load<BM, HS, NTH>(dOt, dbase, C, q0, T_, hs);
    sm90_load<BN, HS, NTH>(St, base + C, C3, 0, T_, hs);
    sm90_load<BN, HS, NTH>(St + Cf::COL, base + 2 * C, C3, 0, T_, hs);
    sm90_cp_commit();

    const int tq0 = wq0 + 16 * warp + g;  // this thread's queries: tq0, tq0 + 8
    const u64 dq0 = sm90_desc_k(Qt + 64 * wg * 128), ddo0 = sm90_desc_k(dOt + 64 * wg * 128);
    float L[2], Dr[2];
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int r = tq0 + 8 * hh;
        L[hh] = r < T_ ? lse[(long long)bh * T_ + r] * LOG2E : 0.f;
        Dr[hh] = r < T_ ? D[(long long)bh * T_ + r] : 0.f;
    }
    float dq[HS / 2];
    int acc = 0;

    for (int i = 0; i < ntiles; i++) {
        sm90_cp_wait<0>();
        sm90_fence_proxy();
        __syncthreads();
        if (i + 1 < ntiles) {
            const u32 nx = St + ((i + 1) % NS) * Cf::STAGE;
            sm90_load<BN, HS, NTH>(nx, base + C, C3, (i + 1) * BN, T_, hs);
            sm90_load<BN, HS, NTH>(nx + Cf::COL, base + 2 * C, C3, (i + 1) * BN, T_, hs);
            sm90_cp_commit();
        }
        const int k0 = i * BN;
        const u32 Kt = St + (i % NS) * Cf::STAGE, Vt = Kt + Cf::COL;
        auto tile = [&](const bool MASK) {
            float s[BN / 2], dp[BN / 2];
            const u64 dkt = sm90_desc_k(Kt), dvt = sm90_desc_k(Vt);
            sm90_wg_fence();
            sm90_ss_over_head<E, BN, BM, HS>(s, dq0, dkt);
            sm90_ss_over_head<E, BN, BM, HS>(dp, ddo0, dvt);
            sm90_wg_commit();
            sm90_wg_wait<0>();
            sm90_fence_acc(s);
            sm90_fence_acc(dp);
#pragma unroll
            for (int j = 0; j < BN / 8; j++) {
#pragma unroll
                for (int x2 = 0; x2 < 4; x2++) {
                    const int x = 4 * j + x2, hh = x2 >> 1;
                    float p = ex2_ftz(fmaf(s[x], cs, -L[hh]));
                    if (MASK && k0 + 8 * j + 2 * t4 + (x2 & 1) > tq0 + 8 * hh) p = 0.f;
                    s[x] = p * (dp[x] - Dr[hh]);  // dS
                }
            }
            u32 da[BN / 16][4];
            sm90_to_a<BN, E>(da, s);
            const u64 mk = sm90_desc_mn<BN>(Kt);
            sm90_wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) WgRs<E, HS>::rs(dq, da[kk], mk + kk * 128, kk ? 1 : acc);
            acc = 1;
            sm90_wg_commit();
            if (!OVL) sm90_wg_wait<0>();
        };
        if (k0 <= wq0 + 63 && wq0 < T_) {  // warpgroup-uniform
            if (k0 + BN - 1 > wq0)          // crosses the diagonal
                tile(true);
            else
                tile(false);
        } else {
            sm90_wg_wait<0>();
        }
    }
    sm90_wg_wait<0>();
    sm90_fence_acc(dq);
    E* dst = dqkv + (long long)b * T_ * C3 + (long long)h * hs;
    if (QB) {
        constexpr int NW = 4 * NWG;
        static_assert(NW * HS * 4 <= Cf::OWN, "the sums fit where Q was");
        float* red = reinterpret_cast<float*>(sm);
        __syncthreads();  // every warpgroup's products are done (each waited above)
        sm90_store_colsum<HS>(dst, C3, tq0, T_, hs, dq, scale * out_scale, lane, red + (tid >> 5) * HS);
        __syncthreads();
        float* row = qb + ((long long)b * nqb + q0 / BM) * C3 + (long long)h * hs;
        sm90_colsum_fold<HS, NW, 1, NTH>(row, red, hs, C);
    } else {
        sm90_store<HS>(dst, C3, tq0, T_, hs, dq, scale * out_scale, t4);
    }
}

#define SM90_BWD_KERNEL(name, E, HS, NWG, BN, NS, OVL, MINB)                                                    \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB)                                      \
    name(E* dqkv, const E* dout, const E* qkv, const float* lse, const float* D, int B, int T_, int C, \
         int NH, float out_scale) {                                                                 \
        if (blockIdx.z == 0)                                                                        \
            sm90_dkdv<HS, NWG, BN, NS, OVL, false, E>(dqkv, dout, qkv, lse, D, T_, C, NH, out_scale, nullptr); \
        else                                                                                        \
            sm90_dq<HS, NWG, BN, NS, OVL, false, E>(dqkv, dout, qkv, lse, D, T_, C, NH, out_scale, nullptr);   \
    }
// The same with the QKV bias gradient's partial sums (`qb`, see the header).
#define SM90_BWD_KERNEL_QB(name, E, HS, NWG, BN, NS, OVL, MINB)                                       \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB)                                      \
    name(E* dqkv, const E* dout, const E* qkv, const float* lse, const float* D, int B, int T_, int C, \
         int NH, float out_scale, float* qb) {                                                      \
        if (blockIdx.z == 0)                                                                        \
            sm90_dkdv<HS, NWG, BN, NS, OVL, true, E>(dqkv, dout, qkv, lse, D, T_, C, NH, out_scale, qb); \
        else                                                                                        \
            sm90_dq<HS, NWG, BN, NS, OVL, true, E>(dqkv, dout, qkv, lse, D, T_, C, NH, out_scale, qb);   \
    }

// Variants (NWG, BN, NS, OVL, MINB = blocks per SM the registers must allow); the host's table
// (mod.rs, `sm90_tiling`) must match. v0, the default, exists for every padded head size HS (32 to
// 128 in steps of 16; MINB as measured at hs 64 and 128), with its _qb twin; v1, v2 only at HS 64
// and 128, kept for tuning (HALFLING_CUDA_ATTN_BWD=v1, v2), without one.
#define SM90_BWD_V0(E, sfx, HS)                                                                          \
    SM90_BWD_KERNEL(attention_backward_sm90_hs##HS##_v0_##sfx, E, HS, 1, 64, 2, false, (HS <= 64 ? 3 : 2)) \
    SM90_BWD_KERNEL_QB(attention_backward_sm90_hs##HS##_v0_qb_##sfx, E, HS, 1, 64, 2, false, (HS <= 64 ? 3 : 2))
#define SM90_BWD_VARIANTS(E, sfx)                                                                       \
    SM90_BWD_V0(E, sfx, 32) SM90_BWD_V0(E, sfx, 48) SM90_BWD_V0(E, sfx, 64) SM90_BWD_V0(E, sfx, 80)   \
    SM90_BWD_V0(E, sfx, 96) SM90_BWD_V0(E, sfx, 112) SM90_BWD_V0(E, sfx, 128)                        \
    SM90_BWD_KERNEL(attention_backward_sm90_hs64_v1_##sfx, E, 64, 1, 64, 3, true, 2)                 \
    SM90_BWD_KERNEL(attention_backward_sm90_hs64_v2_##sfx, E, 64, 2, 64, 3, true, 1)                 \
    SM90_BWD_KERNEL(attention_backward_sm90_hs128_v1_##sfx, E, 128, 2, 64, 2, false, 1)              \
    SM90_BWD_KERNEL(attention_backward_sm90_hs128_v2_##sfx, E, 128, 2, 64, 3, false, 1)
SM90_BWD_VARIANTS(__nv_bfloat16, bf16)
SM90_BWD_VARIANTS(__half, f16)
