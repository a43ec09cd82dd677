// halfling CUDA kernels: elementwise ops, AdamW, the grad-norm reduction, LayerNorm, embeddings
// and the fused softmax cross-entropy. Compiled at run time by NVRTC for sm_90 (no fast math);
// the names, parameters and launch geometries follow the kernel ABI that src/backend/cuda/mod.rs
// launches against (attention lives in attention.cu).
//
// Conventions that hold for every kernel here:
// - Each templated kernel exists as `<name>_f32` (T = float), `<name>_bf16` (T = __nv_bfloat16)
//   and `<name>_f16` (T = __half), instantiated by FOR_EACH_TYPE. Arithmetic is always in float;
//   results are rounded to T once, to nearest even (f16 overflows to ±inf, as the CPU's rounding
//   does, so fp16 loss scaling sees the overflow). Parameter gradients, optimizer state, mean/rstd, losses and partials are float (double
//   for the squared-norm partials).
// - Deterministic: no atomics. Every output is produced by one fixed sequence of operations:
//   fixed per-thread loops plus fixed xor-butterfly / shared-memory trees, whose shape depends only
//   on the launch geometry and the sizes, never on timing.
// - Any size works: every index is guarded. When every pointer involved is 16-byte aligned (and
//   row widths are multiples of 8 elements where rows matter) the kernels move 8 elements per
//   thread with 16-byte accesses; otherwise they fall back to per-element accesses. Both paths give
//   the same bits for elementwise kernels; for row reductions the per-lane grouping differs (still
//   deterministic for a given set of pointers and sizes).
// - Block-reduction kernels need blockDim.x to be a multiple of 32 (at most 1024).

// Prepended by mod.rs: elementwise_common.cuh (u64, bf16, f16, to_float, from_float, load8,
// store8 but load8<f16>, the GELU formula).

// ---------------------------------------------------------------------------------------------
// Conversions, packed accesses, reductions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<u64>(p) & 15ull) == 0;
}

// f16 bits → float, exactly, with integer and FP32 ops at full rate instead of a conversion
// instruction (quarter rate; the f16 classifier was bound by them). The magnitude bits shifted
// into place are the value scaled by 2^-112 (exponent bias 127 vs 15), subnormals included (the
// kernels run without flush-to-zero); inf and NaN (exponent all ones) are rebuilt directly.
__device__ __forceinline__ float f16_bits_to_float(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16, mag = h & 0x7fffu;
    const float finite = __uint_as_float(mag << 13) * 5.192296858534828e33f;  // 2^112
    const unsigned bits = mag >= 0x7c00u ? (0x7f800000u | ((mag & 0x3ffu) << 13))
                                         : __float_as_uint(finite);
    return __uint_as_float(bits | sign);
}
// load8<f16> (see elementwise_common.cuh) through f16_bits_to_float.
template <> __device__ __forceinline__ void load8<f16>(const f16* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = f16_bits_to_float(w[k] & 0xffffu);  // element 2k is the low half
        f[2 * k + 1] = f16_bits_to_float(w[k] >> 16);
    }
}

// Xor butterflies: a + b is commutative bit for bit, so every lane ends with the same value.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Grid-stride map over n elements: out[i] = op(a[i], b[i], i) for NIN = 0, 1 or 2 inputs.
// Packs of 8 when all pointers are 16-byte aligned, then the (< 8) tail per element; the
// per-element arithmetic is the same in both paths, so the bits do not depend on alignment.
template <int NIN, typename TO, typename TA, typename TB, typename Op>
__device__ __forceinline__ void map_elements(TO* out, const TA* a, const TB* b, int n, Op op) {
    const u64 un = n > 0 ? (u64)n : 0ull;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const bool vec = aligned16(out) && (NIN < 1 || aligned16(a)) && (NIN < 2 || aligned16(b));
    u64 start = 0;
    if (vec) {
        const u64 packs = un / 8;
        for (u64 p = tid; p < packs; p += stride) {
            const u64 i0 = p * 8;
            float fa[8] = {0, 0, 0, 0, 0, 0, 0, 0}, fb[8] = {0, 0, 0, 0, 0, 0, 0, 0}, fo[8];
            if constexpr (NIN >= 1) load8(a + i0, fa);
            if constexpr (NIN >= 2) load8(b + i0, fb);
#pragma unroll
            for (int k = 0; k < 8; ++k) fo[k] = op(fa[k], fb[k], i0 + k);
            store8(out + i0, fo);
        }
        start = packs * 8;
    }
    for (u64 i = start + tid; i < un; i += stride) {
        const float va = NIN >= 1 ? to_float(a[i]) : 0.0f;
        const float vb = NIN >= 2 ? to_float(b[i]) : 0.0f;
        out[i] = from_float<TO>(op(va, vb, i));
    }
}

// Instantiates one extern "C" wrapper per storage type: M(suffix, T).
#define FOR_EACH_TYPE(M) M(f32, float) M(bf16, bf16) M(f16, f16)

// ---------------------------------------------------------------------------------------------
// Elementwise (grid-stride; grid = min(ceil(n/256), 4224), block = 256; any geometry works)
// ---------------------------------------------------------------------------------------------

/// fill_T: x[i] = v (rounded to T).
template <typename T> __device__ void fill_impl(T* x, float v, int n) {
    map_elements<0>(x, x, x, n, [=](float, float, u64) { return v; });
}
#define DEF_FILL(S, T) \
    extern "C" __global__ void fill_##S(T* x, float v, int n) { fill_impl<T>(x, v, n); }
FOR_EACH_TYPE(DEF_FILL)

/// copy_A_to_B: dst = round_B(float(src)) between two storage types (widening is exact; bf16 <->
/// f16 goes through float, which holds both exactly, so it is one rounding).
#define DEF_CONVERT(SA, TA, SB, TB)                                                        \
    extern "C" __global__ void copy_##SA##_to_##SB(TB* dst, const TA* src, int n) {         \
        map_elements<1>(dst, src, src, n, [](float x, float, u64) { return x; });           \
    }
DEF_CONVERT(f32, float, bf16, bf16)
DEF_CONVERT(bf16, bf16, f32, float)
DEF_CONVERT(f32, float, f16, f16)
DEF_CONVERT(f16, f16, f32, float)
DEF_CONVERT(bf16, bf16, f16, f16)
DEF_CONVERT(f16, f16, bf16, bf16)

/// copy_T: bit-exact copy (NaN payloads included), 16 bytes at a time when aligned.
template <typename T> __device__ void copy_impl(T* dst, const T* src, int n) {
    constexpr int K = 16 / sizeof(T);
    const u64 un = n > 0 ? (u64)n : 0ull;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 start = 0;
    if (aligned16(dst) && aligned16(src)) {
        const u64 packs = un / K;
        for (u64 p = tid; p < packs; p += stride)
            reinterpret_cast<uint4*>(dst)[p] = reinterpret_cast<const uint4*>(src)[p];
        start = packs * K;
    }
    for (u64 i = start + tid; i < un; i += stride) dst[i] = src[i];
}
#define DEF_COPY(S, T) \
    extern "C" __global__ void copy_##S(T* dst, const T* src, int n) { copy_impl<T>(dst, src, n); }
FOR_EACH_TYPE(DEF_COPY)

/// residual_forward_T: out = sa·a + sb·b (out may alias a or b); unit scaling's weighted add,
/// a plain sum at sa = sb = 1 (1·x is exact, so the bits are those of a + b).
template <typename T>
__device__ void residual_impl(T* out, const T* a, const T* b, float sa, float sb, int n) {
    map_elements<2>(out, a, b, n, [=](float x, float y, u64) { return sa * x + sb * y; });
}
#define DEF_RESIDUAL(S, T)                                                                   \
    extern "C" __global__ void residual_forward_##S(T* out, const T* a, const T* b, float sa, \
                                                    float sb, int n) {                       \
        residual_impl<T>(out, a, b, sa, sb, n);                                              \
    }
FOR_EACH_TYPE(DEF_RESIDUAL)

/// scale_T: x *= s in place.
template <typename T> __device__ void scale_impl(T* x, float s, int n) {
    map_elements<1>(x, x, x, n, [=](float v, float, u64) { return v * s; });
}
#define DEF_SCALE(S, T) \
    extern "C" __global__ void scale_##S(T* x, float s, int n) { scale_impl<T>(x, s, n); }
FOR_EACH_TYPE(DEF_SCALE)

/// gelu_forward_T: tanh-approximation GELU times `scale` (1 outside unit scaling),
/// scale·x·σ(2u) with u = √(2/π)(x + 0.044715x³).
template <typename T> __device__ void gelu_forward_impl(T* out, const T* inp, float scale, int n) {
    map_elements<1>(out, inp, inp, n, [=](float x, float, u64) { return gelu_value(x, scale); });
}
#define DEF_GELU_FWD(S, T)                                                                    \
    extern "C" __global__ void gelu_forward_##S(T* out, const T* inp, float scale, int n) {   \
        gelu_forward_impl<T>(out, inp, scale, n);                                             \
    }
FOR_EACH_TYPE(DEF_GELU_FWD)

/// gelu_backward_T: dinp = scale·gelu'(inp)·dout, the derivative of gelu_forward_T with the same
/// scale (overwrites dinp; dinp may alias dout).
template <typename T>
__device__ void gelu_backward_impl(T* dinp, const T* inp, const T* dout, float scale, int n) {
    map_elements<2>(dinp, inp, dout, n, [=](float x, float g, u64) { return gelu_input_grad(x, g, scale); });
}
#define DEF_GELU_BWD(S, T)                                                                     \
    extern "C" __global__ void gelu_backward_##S(T* dinp, const T* inp, const T* dout,         \
                                                 float scale, int n) {                         \
        gelu_backward_impl<T>(dinp, inp, dout, scale, n);                                      \
    }
FOR_EACH_TYPE(DEF_GELU_BWD)

// splitmix64's finalizer; must match the CPU backend's mix64 bit for bit.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// counter_hash(key, i) of the CPU backend: the bits behind dropout masks and stochastic rounding.
__device__ __forceinline__ u64 counter_hash(u64 key, u64 i) {
    return mix64(key + (i + 1ull) * 0x9E3779B97F4A7C15ull);
}

// mask_uniform(seed, i) of the CPU backend, with key = mix64(seed ^ 0x5851F42D4C957F2D) hoisted.
// (h >> 40) < 2^24, so the conversion and the scaling by 2^-24 are exact.
__device__ __forceinline__ float mask_uniform_keyed(u64 key, u64 i) {
    return (float)(counter_hash(key, i) >> 40) * (1.0f / 16777216.0f);
}

/// dropout_T: out[i] = x[i]·1/(1−p) iff mask_uniform(s, i) >= p, else +0 (forward in place, out =
/// x; backward from the output gradient x into out), with s = dropout_site_seed(*seed, site) of
/// the backend module (the seed read here, so a recorded launch replays with each micro-batch's).
template <typename T>
__device__ void dropout_impl(T* out, const T* x, float p, const u64* seed, u64 site, int n) {
    if (p <= 0.0f) {
        if (out != x) map_elements<1>(out, x, x, n, [](float v, float, u64) { return v; });
        return;
    }
    if (p >= 1.0f) {
        map_elements<0>(out, x, x, n, [](float, float, u64) { return 0.0f; });
        return;
    }
    const float keep_scale = 1.0f / (1.0f - p);
    const u64 site_seed = mix64(*seed ^ (site * 0x9E3779B97F4A7C15ull));
    const u64 key = mix64(site_seed ^ 0x5851F42D4C957F2Dull);
    map_elements<1>(out, x, x, n, [=](float v, float, u64 i) {
        return mask_uniform_keyed(key, i) >= p ? v * keep_scale : 0.0f;
    });
}
#define DEF_DROPOUT(S, T)                                                                      \
    extern "C" __global__ void dropout_##S(T* out, const T* x, float p,                        \
                                           const unsigned long long* seed,                     \
                                           unsigned long long site, int n) {                   \
        dropout_impl<T>(out, x, p, seed, site, n);                                             \
    }
FOR_EACH_TYPE(DEF_DROPOUT)

// One AdamW update of one element (decoupled weight decay, as torch.optim.AdamW).
__device__ __forceinline__ float adamw_one(float p, float grad, float& m, float& v, float lr,
                                           float beta1, float beta2, float one_minus_beta1,
                                           float one_minus_beta2, float eps, float wd,
                                           float inv_bc1, float inv_bc2, float grad_scale) {
    const float g = grad * grad_scale;
    m = beta1 * m + one_minus_beta1 * g;
    v = beta2 * v + one_minus_beta2 * g * g;
    const float m_hat = m * inv_bc1;
    const float v_hat = v * inv_bc2;
    return p - lr * (m_hat / (sqrtf(v_hat) + eps) + wd * p);
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor kernels: one launch over a table of tensors (all parameters of the model), instead
// of one launch per tensor. Block b works on elements [(b − first_block)·MT_CHUNK, +MT_CHUNK) of
// the tensor with the largest first_block ≤ b; the host lays out the table (mod.rs). Block = 256.
// ---------------------------------------------------------------------------------------------

#define MT_CHUNK 16384

/// The table row of the tensor block `blockIdx.x` works on (binary search on first_block).
template <typename D> __device__ __forceinline__ D mt_row(const D* table, int count) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[mid].first_block <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    return table[lo];
}

/// One tensor of adamw_multi_T: 64 bytes, laid out by `adamw_update` in mod.rs. Nothing in it
/// changes from step to step, so the table is uploaded once per run.
struct AdamWRow {
    float* param;
    const float* grad;
    float* m;
    float* v;
    void* copy;  // T*, or NULL when the tensor has no compute copy
    u64 n;
    float lr_scale;      // this tensor's learning rate is lr · lr_scale
    float weight_decay;  // already divided by lr_scale
    unsigned int first_block;
    unsigned int index;  // position in the update (keys its stochastic rounding)
};

/// The compute copy's value of x: round to nearest even, or (bf16 with `stochastic`) up in
/// magnitude with probability equal to the dropped fraction of an ulp, using the CPU backend's
/// rounding_bits(key, i) (f32_to_bf16_bits_stochastic there).
template <typename T>
__device__ __forceinline__ T round_copy(float x, bool stochastic, u64 key, u64 i);
template <> __device__ __forceinline__ float round_copy<float>(float x, bool, u64, u64) {
    return x;
}
template <>
__device__ __forceinline__ bf16 round_copy<bf16>(float x, bool stochastic, u64 key, u64 i) {
    if (!stochastic || isnan(x)) return __float2bfloat16_rn(x);
    const unsigned r = (unsigned)(counter_hash(key, i) >> 48);  // rounding_bits(key, i)
    return __ushort_as_bfloat16((unsigned short)((__float_as_uint(x) + r) >> 16));
}
// f16 compute copies are always rounded to nearest even (the CPU backend rounds only bf16 copies
// stochastically).
template <> __device__ __forceinline__ f16 round_copy<f16>(float x, bool, u64, u64) {
    return __float2half_rn(x);
}

/// adamw_multi_T: fp32 master step on param/m/v of every tensor in the table; also writes
/// round_T(param) into each non-NULL copy.
template <typename T>
__device__ void adamw_multi_impl(const AdamWRow* table, int count, float lr_base, float beta1,
                                 float beta2, float eps, float inv_bc1, float inv_bc2,
                                 float grad_scale, int stochastic, u64 rounding_step_key) {
    const bool sr = stochastic != 0;
    const AdamWRow r = mt_row(table, count);
    const float omb1 = 1.0f - beta1, omb2 = 1.0f - beta2, wd = r.weight_decay;
    const float lr = lr_base * r.lr_scale;
    // rounding_key(seed, step, index) of the CPU backend.
    const u64 key = mix64(rounding_step_key ^ ((u64)r.index * 0xC2B2AE3D27D4EB4Full));
    T* copy = (T*)r.copy;
    const u64 begin = (u64)(blockIdx.x - r.first_block) * MT_CHUNK;
    const u64 end = min(begin + (u64)MT_CHUNK, r.n);
    const bool vec = aligned16(r.param) && aligned16(r.grad) && aligned16(r.m) &&
                     aligned16(r.v) && (copy == nullptr || aligned16(copy));
    u64 start = begin;
    if (vec) {
        const u64 packs = (end - begin) / 8;
        for (u64 pk = threadIdx.x; pk < packs; pk += blockDim.x) {
            const u64 i0 = begin + pk * 8;
            float fp[8], fg[8], fm[8], fv[8];
            load8(r.param + i0, fp);
            load8(r.grad + i0, fg);
            load8(r.m + i0, fm);
            load8(r.v + i0, fv);
#pragma unroll
            for (int k = 0; k < 8; ++k)
                fp[k] = adamw_one(fp[k], fg[k], fm[k], fv[k], lr, beta1, beta2, omb1, omb2, eps,
                                  wd, inv_bc1, inv_bc2, grad_scale);
            store8(r.param + i0, fp);
            store8(r.m + i0, fm);
            store8(r.v + i0, fv);
            if (copy != nullptr && !sr) store8(copy + i0, fp);
            if (copy != nullptr && sr) {
#pragma unroll
                for (int k = 0; k < 8; ++k)
                    copy[i0 + k] = round_copy<T>(fp[k], true, key, i0 + k);
            }
        }
        start = begin + packs * 8;
    }
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float mi = r.m[i], vi = r.v[i];
        const float p = adamw_one(r.param[i], r.grad[i], mi, vi, lr, beta1, beta2, omb1, omb2,
                                  eps, wd, inv_bc1, inv_bc2, grad_scale);
        r.param[i] = p;
        r.m[i] = mi;
        r.v[i] = vi;
        if (copy != nullptr) copy[i] = round_copy<T>(p, sr, key, i);
    }
}
#define DEF_ADAMW(S, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        adamw_multi_##S(const AdamWRow* table, int count, float lr, float beta1, float beta2,   \
                        float eps, float inv_bias_correction1, float inv_bias_correction2,      \
                        float grad_scale, int stochastic_rounding,                              \
                        unsigned long long rounding_step_key) {                                 \
        adamw_multi_impl<T>(table, count, lr, beta1, beta2, eps, inv_bias_correction1,          \
                            inv_bias_correction2, grad_scale, stochastic_rounding,              \
                            rounding_step_key);                                                 \
    }
FOR_EACH_TYPE(DEF_ADAMW)

/// One tensor of sum_squares_multi_T and zero_multi: 24 bytes, laid out by `tensor_table` in
/// mod.rs.
struct TensorRow {
    const void* x;  // T*
    u64 n;
    unsigned int first_block;
    unsigned int unused;
};

/// zero_multi: every byte of every tensor in the table set to 0 (n counts bytes here).
extern "C" __global__ void __launch_bounds__(256) zero_multi(const TensorRow* table, int count) {
    const TensorRow r = mt_row(table, count);
    unsigned char* x = (unsigned char*)r.x;
    const u64 begin = (u64)(blockIdx.x - r.first_block) * MT_CHUNK * 4;
    const u64 end = min(begin + (u64)MT_CHUNK * 4, r.n);
    u64 start = begin;
    if (aligned16(x)) {
        const u64 packs = (end - begin) / 16;
        for (u64 pk = threadIdx.x; pk < packs; pk += blockDim.x)
            *(uint4*)(x + begin + pk * 16) = make_uint4(0u, 0u, 0u, 0u);
        start = begin + packs * 16;
    }
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) x[i] = 0;
}

/// sum_squares_multi_T: partials[b] = Σ x² in double over block b's chunk of its tensor.
template <typename T>
__device__ void sum_squares_multi_impl(const TensorRow* table, int count, double* partials) {
    __shared__ double warp_sums[32];
    const TensorRow r = mt_row(table, count);
    const T* x = (const T*)r.x;
    const u64 begin = (u64)(blockIdx.x - r.first_block) * MT_CHUNK;
    const u64 end = min(begin + (u64)MT_CHUNK, r.n);
    double acc = 0.0;
    u64 start = begin;
    if (aligned16(x)) {
        const u64 packs = (end - begin) / 8;
        for (u64 pk = threadIdx.x; pk < packs; pk += blockDim.x) {
            float f[8];
            load8(x + begin + pk * 8, f);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc += (double)f[k] * (double)f[k];
        }
        start = begin + packs * 8;
    }
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double d = (double)to_float(x[i]);
        acc += d * d;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    acc = warp_sum(acc);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double s = lane < nwarps ? warp_sums[lane] : 0.0;
        s = warp_sum(s);
        if (lane == 0) partials[blockIdx.x] = s;
    }
}
#define DEF_SUMSQ(S, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        sum_squares_multi_##S(const TensorRow* table, int count, double* partials) {            \
        sum_squares_multi_impl<T>(table, count, partials);                                       \
    }
FOR_EACH_TYPE(DEF_SUMSQ)

/// One block's statistics of its chunk (tensor_stats_multi_T): 32 bytes, read by
/// `tensor_stats` in mod.rs. Counts: finite, zero, subnormal, saturated, NaN.
struct StatsPartial {
    double sum_sq;
    float amax;
    unsigned int counts[5];
};

/// tensor_stats_multi_T: the numerics monitor's statistics (numerics::TensorStats::of on the CPU)
/// of block b's chunk of its tensor, in the tensor's storage format T: Σ x² (double) and max |x|
/// over finite values, and exact counts of finite, zero, subnormal (nonzero, |x| < min_normal),
/// saturated (|x| >= max_finite, infinities included) and NaN values. Deterministic: fixed
/// per-thread loops, fixed butterflies; the host adds the partials in block order.
template <typename T>
__device__ void tensor_stats_multi_impl(const TensorRow* table, int count, float min_normal,
                                        float max_finite, StatsPartial* partials) {
    __shared__ double w_sq[32];
    __shared__ float w_amax[32];
    __shared__ unsigned int w_cnt[5][32];
    const TensorRow r = mt_row(table, count);
    const T* x = (const T*)r.x;
    const u64 begin = (u64)(blockIdx.x - r.first_block) * MT_CHUNK;
    const u64 end = min(begin + (u64)MT_CHUNK, r.n);
    double sq = 0.0;
    float amax = 0.0f;
    unsigned int cnt[5] = {0u, 0u, 0u, 0u, 0u};
    auto add = [&](float v) {
        if (isnan(v)) {
            ++cnt[4];
            return;
        }
        const float a = fabsf(v);
        if (a >= max_finite) ++cnt[3];
        if (isfinite(a)) {
            ++cnt[0];
            amax = fmaxf(amax, a);
            sq += (double)a * (double)a;
        }
        if (a == 0.0f) ++cnt[1];
        else if (a < min_normal) ++cnt[2];
    };
    u64 start = begin;
    if (aligned16(x)) {
        const u64 packs = (end - begin) / 8;
        for (u64 pk = threadIdx.x; pk < packs; pk += blockDim.x) {
            float f[8];
            load8(x + begin + pk * 8, f);
#pragma unroll
            for (int k = 0; k < 8; ++k) add(f[k]);
        }
        start = begin + packs * 8;
    }
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) add(to_float(x[i]));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    sq = warp_sum(sq);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
#pragma unroll
        for (int k = 0; k < 5; ++k) cnt[k] += __shfl_xor_sync(0xffffffffu, cnt[k], o);
    }
    if (lane == 0) {
        w_sq[warp] = sq;
        w_amax[warp] = amax;
#pragma unroll
        for (int k = 0; k < 5; ++k) w_cnt[k][warp] = cnt[k];
    }
    __syncthreads();
    if (warp == 0) {
        sq = lane < nwarps ? w_sq[lane] : 0.0;
        amax = lane < nwarps ? w_amax[lane] : 0.0f;
#pragma unroll
        for (int k = 0; k < 5; ++k) cnt[k] = lane < nwarps ? w_cnt[k][lane] : 0u;
        sq = warp_sum(sq);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
#pragma unroll
            for (int k = 0; k < 5; ++k) cnt[k] += __shfl_xor_sync(0xffffffffu, cnt[k], o);
        }
        if (lane == 0) {
            StatsPartial p;
            p.sum_sq = sq;
            p.amax = amax;
#pragma unroll
            for (int k = 0; k < 5; ++k) p.counts[k] = cnt[k];
            partials[blockIdx.x] = p;
        }
    }
}
#define DEF_STATS(S, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        tensor_stats_multi_##S(const TensorRow* table, int count, float min_normal,              \
                               float max_finite, StatsPartial* partials) {                      \
        tensor_stats_multi_impl<T>(table, count, min_normal, max_finite, partials);              \
    }
FOR_EACH_TYPE(DEF_STATS)

// ---------------------------------------------------------------------------------------------
// LayerNorm (forward and input gradient: one warp per row, grid = ceil(N/8), block = 256)
// ---------------------------------------------------------------------------------------------

#define LN_EPS 1e-5f

/// layernorm_forward_T: out = (x−mean)·rstd·w + b per row, biased variance; saves mean and rstd.
/// With `add_a` non-NULL the row is first made: x = round_T(sa·add_a + sb·add_b), stored into
/// `x_io` (the residual add that closes a block's branch, fused with the LayerNorm that follows
/// it; sa = sb = 1 outside unit scaling).
template <typename T>
__device__ void layernorm_forward_impl(T* out, float* mean, float* rstd, T* x_io,
                                       const T* add_a, const T* add_b, float sa, float sb,
                                       const T* weight, const T* bias, int N, int C) {
    const int lane = threadIdx.x & 31;
    const int row = (int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
    if (row >= N || C <= 0) return;  // no block barriers below, so whole warps may leave
    T* x = x_io + (u64)row * C;
    T* o = out + (u64)row * C;
    const bool add = add_a != nullptr;
    const T* a = add ? add_a + (u64)row * C : nullptr;
    const T* b = add ? add_b + (u64)row * C : nullptr;
    const bool vec = (C % 8 == 0) && aligned16(x_io) && aligned16(out) && aligned16(weight) &&
                     aligned16(bias) && (!add || (aligned16(add_a) && aligned16(add_b)));
    // Two passes (mean, then squared deviations) re-reading the row from L1: exact-enough
    // variance without the cancellation of E[x²] − E[x]². Each lane re-reads only elements it
    // wrote itself in the first pass, so the fused residual needs no barrier.
    float sum = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float f[8];
            if (add) {
                float fb[8];
                load8(a + c, f);
                load8(b + c, fb);
#pragma unroll
                for (int k = 0; k < 8; ++k) f[k] = to_float(from_float<T>(sa * f[k] + sb * fb[k]));
                store8(x + c, f);
            } else {
                load8(x + c, f);
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) sum += f[k];
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            if (add) x[c] = from_float<T>(sa * to_float(a[c]) + sb * to_float(b[c]));
            sum += to_float(x[c]);
        }
    }
    const float mu = warp_sum(sum) / (float)C;
    float sq = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float f[8];
            load8(x + c, f);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float d = f[k] - mu;
                sq += d * d;
            }
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const float d = to_float(x[c]) - mu;
            sq += d * d;
        }
    }
    const float rs = 1.0f / sqrtf(warp_sum(sq) / (float)C + LN_EPS);
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float f[8], w[8], b[8];
            load8(x + c, f);
            load8(weight + c, w);
            load8(bias + c, b);
#pragma unroll
            for (int k = 0; k < 8; ++k) f[k] = (f[k] - mu) * rs * w[k] + b[k];
            store8(o + c, f);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const float nrm = (to_float(x[c]) - mu) * rs;
            o[c] = from_float<T>(nrm * to_float(weight[c]) + to_float(bias[c]));
        }
    }
    if (lane == 0) {
        if (mean != nullptr) mean[row] = mu;
        if (rstd != nullptr) rstd[row] = rs;
    }
}
#define DEF_LN_FWD(S, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                           \
    layernorm_forward_##S(T* out, float* mean, float* rstd, T* x_io, const T* add_a,            \
                          const T* add_b, float sa, float sb, const T* weight, const T* bias,   \
                          int N, int C) {                                                       \
        layernorm_forward_impl<T>(out, mean, rstd, x_io, add_a, add_b, sa, sb, weight, bias, N,  \
                                  C);                                                           \
    }
FOR_EACH_TYPE(DEF_LN_FWD)

/// layernorm_backward_dinp_T: dinp += sx·rstd·(dnorm − mean(dnorm) − norm·mean(dnorm·norm))
/// (sx = 1 outside unit scaling).
template <typename T>
__device__ void layernorm_backward_dinp_impl(T* dinp, const T* dout, const T* inp, const T* weight,
                                             const float* mean, const float* rstd, float sx, int N,
                                             int C) {
    const int lane = threadIdx.x & 31;
    const int row = (int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
    if (row >= N || C <= 0) return;
    const u64 base = (u64)row * C;
    const T* x = inp + base;
    const T* g = dout + base;
    T* d = dinp + base;
    const float mu = mean[row], rs = rstd[row], rs_scaled = rs * sx;
    const bool vec = (C % 8 == 0) && aligned16(dinp) && aligned16(dout) && aligned16(inp) &&
                     aligned16(weight);
    float s_dn = 0.0f, s_dn_n = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float fx[8], fg[8], fw[8];
            load8(x + c, fx);
            load8(g + c, fg);
            load8(weight + c, fw);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float dn = fg[k] * fw[k];
                s_dn += dn;
                s_dn_n += dn * ((fx[k] - mu) * rs);
            }
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const float dn = to_float(g[c]) * to_float(weight[c]);
            s_dn += dn;
            s_dn_n += dn * ((to_float(x[c]) - mu) * rs);
        }
    }
    const float m_dn = warp_sum(s_dn) / (float)C;
    const float m_dn_n = warp_sum(s_dn_n) / (float)C;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float fx[8], fg[8], fw[8], fd[8];
            load8(x + c, fx);
            load8(g + c, fg);
            load8(weight + c, fw);
            load8(d + c, fd);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float nrm = (fx[k] - mu) * rs;
                fd[k] = fd[k] + rs_scaled * (fg[k] * fw[k] - m_dn - nrm * m_dn_n);
            }
            store8(d + c, fd);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const float nrm = (to_float(x[c]) - mu) * rs;
            const float dn = to_float(g[c]) * to_float(weight[c]);
            d[c] = from_float<T>(to_float(d[c]) + rs_scaled * (dn - m_dn - nrm * m_dn_n));
        }
    }
}
#define DEF_LN_BWD_DINP(S, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                            \
    layernorm_backward_dinp_##S(T* dinp, const T* dout, const T* inp, const T* weight,           \
                                const float* mean, const float* rstd, float sx, int N, int C) {  \
        layernorm_backward_dinp_impl<T>(dinp, dout, inp, weight, mean, rstd, sx, N, C);          \
    }
FOR_EACH_TYPE(DEF_LN_BWD_DINP)

// Fused LayerNorm backward: dinp as above plus the column sums of the parameter gradients and,
// with `res_sums`, of the updated dinp as stored (the bias gradient of the linear whose output
// gradient this residual-stream gradient is), from one read of dout, inp and dinp. Replaces the
// dinp kernel and the separate column-sum passes (three more reads of [N, C]) where C <= 8·tpr.
//
// Block = `teams` teams of `tpr` threads (tpr a multiple of 32, 8·tpr >= C, teams <= 8, block <=
// 512): a team takes one row at a time, thread x of it owning columns [8x, 8x + 8), so the weights
// and the running column sums stay in registers. Block g takes rows [g·R, (g+1)·R), R =
// rows_per_block; team j its rows g·R + j, g·R + j + teams, ... in order (one barrier of the
// team's own per row, so teams do not wait on each other: each warp's row sums go through shared
// memory, double-buffered, and the team adds its warps' in order); the next row is loaded while
// the current one is reduced. At the end the teams' column sums are added in team order and one
// partial row per output is written: partials[(g·nout + o)·C + c] with o = 0: Σ dout·norm, 1:
// Σ dout, 2 (nout = 3): Σ dinp. column_sums_reduce finishes them.
// Dynamic shared memory: teams·8·tpr floats.
#define LN_FUSED_MAX_WARPS 16

// Barrier `id` (1..15; 0 is __syncthreads') of the `n` threads (a multiple of 32) that use it.
__device__ __forceinline__ void named_barrier(int id, int n) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}

// 8 elements of T as stored (16 bytes for bf16 and f16, 32 for float): rows in flight are kept
// packed, which halves their registers for the 16-bit types.
template <typename T> struct Pack8 {
    uint4 v[sizeof(T) / 2];
};
__device__ __forceinline__ unsigned bits_of(float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned bits_of(bf16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ unsigned bits_of(f16 x) { return __half_as_ushort(x); }

// Columns [c0, c0 + 8) of the row at p (zeros past C); 16-byte loads with `vec`.
template <typename T>
__device__ __forceinline__ Pack8<T> load_pack8(const T* p, int c0, int C, bool vec) {
    constexpr int W = (int)sizeof(T) / 2;
    Pack8<T> r;
    if (vec) {
#pragma unroll
        for (int i = 0; i < W; ++i) r.v[i] = reinterpret_cast<const uint4*>(p + c0)[i];
    } else {
        unsigned w[4 * W];
#pragma unroll
        for (int i = 0; i < 4 * W; ++i) w[i] = 0u;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const unsigned b = c0 + k < C ? bits_of(p[c0 + k]) : 0u;
            if constexpr (W == 2) {
                w[k] = b;
            } else {
                w[k / 2] |= b << (16 * (k % 2));  // element 2i is the low half, as in memory
            }
        }
#pragma unroll
        for (int i = 0; i < W; ++i)
            r.v[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
    return r;
}

// A 16-bit element's bits as float (exact); the pointer only picks the type.
__device__ __forceinline__ float bits16_to_float(const bf16*, unsigned h) {
    return __uint_as_float(h << 16);
}
__device__ __forceinline__ float bits16_to_float(const f16*, unsigned h) {
    return f16_bits_to_float(h);
}
__device__ __forceinline__ float bits16_to_float(const float*, unsigned) { return 0.0f; }

// The 8 values of a Pack8 as float (exact).
template <typename T> __device__ __forceinline__ void unpack8(const Pack8<T>& r, float* f) {
    constexpr int W = (int)sizeof(T) / 2;
    unsigned w[4 * W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
        w[4 * i] = r.v[i].x;
        w[4 * i + 1] = r.v[i].y;
        w[4 * i + 2] = r.v[i].z;
        w[4 * i + 3] = r.v[i].w;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        if constexpr (W == 2) {
            f[k] = __uint_as_float(w[k]);
        } else {
            const unsigned h = (w[k / 2] >> (16 * (k % 2))) & 0xffffu;
            f[k] = bits16_to_float(static_cast<const T*>(nullptr), h);
        }
    }
}

// One row of the fused backward's pipeline: its statistics and its columns of inp, dout, dinp.
template <typename T> struct LnRow {
    float mu, rs;
    Pack8<T> x, g, d;
};
template <typename T>
__device__ __forceinline__ LnRow<T> load_ln_row(const T* inp, const T* dout, const T* dinp,
                                                const float* mean, const float* rstd, int r,
                                                bool live, bool has, int c0, int C, bool vec) {
    LnRow<T> row;
    row.mu = live ? mean[r] : 0.0f;
    row.rs = live ? rstd[r] : 0.0f;
    if (live && has) {
        const u64 base = (u64)r * C;
        row.x = load_pack8(inp + base, c0, C, vec);
        row.g = load_pack8(dout + base, c0, C, vec);
        row.d = load_pack8(dinp + base, c0, C, vec);
    } else {
#pragma unroll
        for (int i = 0; i < (int)sizeof(T) / 2; ++i)
            row.x.v[i] = row.g.v[i] = row.d.v[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    return row;
}

template <typename T>
__device__ void layernorm_backward_fused_impl(float* partials, T* dinp, const T* dout,
                                              const T* inp, const T* weight, const float* mean,
                                              const float* rstd, float sx, int N, int C, int tpr,
                                              int rows_per_block, int nout) {
    extern __shared__ float fold[];  // [teams][8·tpr]
    __shared__ float red[2][LN_FUSED_MAX_WARPS][2];
    const int tid = (int)threadIdx.x, teams = (int)blockDim.x / tpr;
    const int team = tid / tpr, x = tid % tpr, warp = tid >> 5, lane = tid & 31;
    const int wpt = tpr >> 5, w0 = team * wpt;
    const int c0 = 8 * x;
    const bool has = c0 < C;
    const long long r0l = (long long)blockIdx.x * rows_per_block;
    const int r0 = (int)(r0l < N ? r0l : N);
    const int r1 = (int)(r0l + rows_per_block < N ? r0l + rows_per_block : N);
    const int steps = r0 + team < r1 ? (r1 - r0 - team + teams - 1) / teams : 0;
    const bool vec = (C % 8 == 0) && aligned16(dinp) && aligned16(dout) && aligned16(inp) &&
                     aligned16(weight);
    float w[8], s_dw[8], s_db[8], s_res[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = s_dw[k] = s_db[k] = s_res[k] = 0.0f;
    if (has) unpack8(load_pack8(weight, c0, C, vec), w);
    // Rows in flight: two ahead of the one worked on for the 16-bit types (packed, they fit the
    // registers), one for float. A load waited for in the loop would put a memory latency on
    // every row.
    constexpr bool two_ahead = sizeof(T) == 2;
    int r = r0 + team;
    LnRow<T> cur = load_ln_row(inp, dout, dinp, mean, rstd, r, r < r1, has, c0, C, vec);
    LnRow<T> next = load_ln_row(inp, dout, dinp, mean, rstd, r + teams, r + teams < r1, has, c0,
                                C, vec);
    for (int s = 0; s < steps; ++s, r += teams) {
        LnRow<T> after;
        if constexpr (two_ahead) {
            const int ra = r + 2 * teams;
            after = load_ln_row(inp, dout, dinp, mean, rstd, ra, ra < r1, has, c0, C, vec);
        }
        float cx[8], cg[8], cd[8], nrm[8], a = 0.0f, b = 0.0f;
        unpack8(cur.x, cx);
        unpack8(cur.g, cg);
        const float mu = cur.mu, rs = cur.rs;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            nrm[k] = (cx[k] - mu) * rs;
            const float dn = cg[k] * w[k];
            a += dn;
            b += dn * nrm[k];
        }
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) {
            red[s & 1][warp][0] = a;
            red[s & 1][warp][1] = b;
        }
        named_barrier(1 + team, tpr);
        float ta = 0.0f, tb = 0.0f;
        for (int j = 0; j < wpt; ++j) {
            ta += red[s & 1][w0 + j][0];
            tb += red[s & 1][w0 + j][1];
        }
        if (has) {
            unpack8(cur.d, cd);
            const float m_dn = ta / (float)C, m_dn_n = tb / (float)C, rs_scaled = rs * sx;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                cd[k] = to_float(
                    from_float<T>(cd[k] + rs_scaled * (cg[k] * w[k] - m_dn - nrm[k] * m_dn_n)));
                s_dw[k] += cg[k] * nrm[k];
                s_db[k] += cg[k];
                s_res[k] += cd[k];
            }
            T* d = dinp + (u64)r * C;
            if (vec) {
                store8(d + c0, cd);
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k)
                    if (c0 + k < C) d[c0 + k] = from_float<T>(cd[k]);
            }
        }
        cur = next;
        if constexpr (two_ahead) {
            next = after;
        } else {
            const int rn = r + 2 * teams;
            next = load_ln_row(inp, dout, dinp, mean, rstd, rn, rn < r1, has, c0, C, vec);
        }
    }
    const int width = 8 * tpr;
#pragma unroll
    for (int o = 0; o < 3; ++o) {
        if (o < nout) {
#pragma unroll
            for (int k = 0; k < 8; ++k)
                fold[team * width + c0 + k] = o == 0 ? s_dw[k] : (o == 1 ? s_db[k] : s_res[k]);
            __syncthreads();
            for (int c = tid; c < C; c += (int)blockDim.x) {
                float t = 0.0f;
                for (int j = 0; j < teams; ++j) t += fold[j * width + c];
                partials[((u64)blockIdx.x * nout + o) * C + c] = t;
            }
            __syncthreads();
        }
    }
}
#define DEF_LN_BWD_FUSED(S, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(512) layernorm_backward_fused_##S(             \
        float* partials, T* dinp, const T* dout, const T* inp, const T* weight,                  \
        const float* mean, const float* rstd, float sx, int N, int C, int tpr,                   \
        int rows_per_block, int nout) {                                                          \
        layernorm_backward_fused_impl<T>(partials, dinp, dout, inp, weight, mean, rstd, sx, N,   \
                                         C, tpr, rows_per_block, nout);                          \
    }
FOR_EACH_TYPE(DEF_LN_BWD_FUSED)

// Column sums of a [N, C] matrix over row blocks: block (t, g) of grid (ceil(C/256), G) sums
// rows [g·R, (g+1)·R) of columns [256t, 256t + 256) and writes one partial row per output. The
// block is 32 column lanes × 8 row lanes: thread (x, y) takes 8 adjacent columns (one 16-byte
// load for bf16) of rows ≡ y (mod 8), in order; the 8 row lanes are then added in a fixed order
// in shared memory. NOUT = 1: Σ dout (bias gradient). NOUT = 2: Σ dout·norm(x) and Σ dout
// (LayerNorm weight and bias gradients; norm(x) = (x − mean)·rstd). Block = 256.
#define COLSUM_TILE 256

template <typename T, int NOUT>
__device__ void column_sums_partial_impl(float* partials, const T* dout, const T* inp,
                                         const float* mean, const float* rstd, int N, int C,
                                         int rows_per_block) {
    __shared__ float fold[8][NOUT][COLSUM_TILE];
    const int x = threadIdx.x & 31, y = threadIdx.x >> 5;
    const int tile0 = (int)blockIdx.x * COLSUM_TILE;
    const int c0 = tile0 + x * 8;
    const long long r0l = (long long)blockIdx.y * rows_per_block;
    const int r0 = (int)(r0l < N ? r0l : N);
    const int r1 = (int)(r0l + rows_per_block < N ? r0l + rows_per_block : N);
    float s[NOUT][8];
#pragma unroll
    for (int o = 0; o < NOUT; ++o)
#pragma unroll
        for (int k = 0; k < 8; ++k) s[o][k] = 0.0f;
    const bool vec = (C % 8 == 0) && aligned16(dout) && (NOUT == 1 || aligned16(inp));
    if (c0 < C) {
        for (int r = r0 + y; r < r1; r += 8) {
            const u64 base = (u64)r * C + c0;
            float d[8], xv[8];
            if (vec) {
                load8(dout + base, d);
                if (NOUT == 2) load8(inp + base, xv);
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const bool in = c0 + k < C;
                    d[k] = in ? to_float(dout[base + k]) : 0.0f;
                    if (NOUT == 2) xv[k] = in ? to_float(inp[base + k]) : 0.0f;
                }
            }
            if (NOUT == 2) {
                const float mu = mean[r], rs = rstd[r];
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    s[0][k] += d[k] * ((xv[k] - mu) * rs);
                    s[NOUT - 1][k] += d[k];
                }
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) s[0][k] += d[k];
            }
        }
    }
#pragma unroll
    for (int o = 0; o < NOUT; ++o)
#pragma unroll
        for (int k = 0; k < 8; ++k) fold[y][o][x * 8 + k] = s[o][k];
    __syncthreads();
    const int c = tile0 + (int)threadIdx.x;
    if (c < C) {
#pragma unroll
        for (int o = 0; o < NOUT; ++o) {
            float t = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) t += fold[j][o][threadIdx.x];
            partials[((u64)blockIdx.y * NOUT + o) * C + c] = t;
        }
    }
}

/// layernorm_backward_params_partial_T: partial rows [g][0] = Σ dout·norm, [g][1] = Σ dout.
#define DEF_LN_BWD_PARTIAL(S, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) layernorm_backward_params_partial_##S(     \
        float* partials, const T* dout, const T* inp, const float* mean, const float* rstd,      \
        int N, int C, int rows_per_block) {                                                       \
        column_sums_partial_impl<T, 2>(partials, dout, inp, mean, rstd, N, C, rows_per_block);   \
    }
FOR_EACH_TYPE(DEF_LN_BWD_PARTIAL)

/// bias_backward_partial_T: partial rows [g] = Σ dout over row block g.
#define DEF_BIAS_PARTIAL(S, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) bias_backward_partial_##S(                \
        float* partials, const T* dout, int N, int OC, int rows_per_block) {                     \
        column_sums_partial_impl<T, 1>(partials, dout, dout, nullptr, nullptr, N, OC,            \
                                       rows_per_block);                                          \
    }
FOR_EACH_TYPE(DEF_BIAS_PARTIAL)

// The two reduce kernels below sum G partial rows per column. One thread per column left the
// GPU nearly idle (a few blocks, long dependent load chains), so each block takes 32 columns
// and 8 row groups: thread (x, y) sums rows g ≡ y (mod 8) in order, then the 8 group sums are
// added in a fixed order. Launch: grid = ceil(C / 32), block = 256 (32 × 8). Deterministic.
#define REDUCE_COLS 32
#define REDUCE_GROUPS 8

/// column_sums_reduce: for output o = blockIdx.y, out_o[c] += scale_o·Σ_g partials[(g·nout + o)·C
/// + c] (= where bit o of `overwrite` is set: that output's zeros were deferred). LayerNorm's
/// (rows as the fused kernel and layernorm_backward_params_partial write them): o = 0 dweight,
/// 1 dbias (scale sp), 2 dres (scale sr; only with nout = 3); a bias gradient's (bias_partial
/// rows, the FP8 casts' and the attention backward's): nout = 1, out_0 = dweight (scale sp). The
/// sums are formed first and scaled once, as on the CPU (scales are 1 outside unit scaling;
/// a bias gradient's is the weight gradient's alpha). Grid (ceil(C/32), nout), block 256.
extern "C" __global__ void column_sums_reduce(float* dweight, float* dbias, float* dres,
                                                     const float* partials, float sp, float sr,
                                                     int G, int C, int nout, int overwrite) {
    __shared__ float s_s[REDUCE_GROUPS][REDUCE_COLS];
    const int o = (int)blockIdx.y;
    const int x = threadIdx.x % REDUCE_COLS, y = threadIdx.x / REDUCE_COLS;
    const int c = (int)blockIdx.x * REDUCE_COLS + x;
    float s = 0.0f;
    if (c < C) {
        for (int g = y; g < G; g += REDUCE_GROUPS) s += partials[((u64)g * nout + o) * C + c];
    }
    s_s[y][x] = s;
    __syncthreads();
    if (y == 0 && c < C) {
        float t = 0.0f;
        for (int j = 0; j < REDUCE_GROUPS; ++j) t += s_s[j][x];
        float* out = o == 0 ? dweight : (o == 1 ? dbias : dres);
        const float v = (o == 2 ? sr : sp) * t;
        out[c] = (overwrite >> o & 1) ? v : out[c] + v;
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------------

// a / b and a % b, in 32 bits when a < 2^32 (`small`).
__device__ __forceinline__ u64 div_u64(u64 a, unsigned b, bool small) {
    return small ? (u64)((unsigned)a / b) : a / b;
}
__device__ __forceinline__ u64 mod_u64(u64 a, unsigned b, bool small) {
    return small ? (u64)((unsigned)a % b) : a % b;
}

/// embedding_forward_T: out[b,t,:] = scale·(wte[tokens[b,t],:] + wpe[t,:]) (grid-stride over
/// B·T_·C; scale = 1 outside unit scaling).
template <typename T>
__device__ void embedding_forward_impl(T* out, const unsigned* tokens, const T* wte, const T* wpe,
                                       float scale, int B, int T_, int C) {
    if (B <= 0 || T_ <= 0 || C <= 0) return;
    const u64 total = (u64)B * T_ * C;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const bool vec = (C % 8 == 0) && aligned16(out) && aligned16(wte) && aligned16(wpe);
    const bool small = total <= 0xffffffffull;  // 32-bit division is several times cheaper
    u64 start = 0;
    if (vec) {
        // C % 8 == 0, so a pack never straddles two rows.
        const u64 packs = total / 8;
        for (u64 p = tid; p < packs; p += stride) {
            const u64 i0 = p * 8;
            const u64 row = div_u64(i0, (unsigned)C, small), c = i0 - row * (unsigned)C;
            const u64 t = mod_u64(row, (unsigned)T_, small);
            float a[8], b[8];
            load8(wte + (u64)tokens[row] * C + c, a);
            load8(wpe + t * C + c, b);
#pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = scale * (a[k] + b[k]);
            store8(out + i0, a);
        }
        start = packs * 8;
    }
    for (u64 i = start + tid; i < total; i += stride) {
        const u64 row = div_u64(i, (unsigned)C, small), c = i - row * (unsigned)C;
        const u64 t = mod_u64(row, (unsigned)T_, small);
        out[i] = from_float<T>(scale *
                               (to_float(wte[(u64)tokens[row] * C + c]) + to_float(wpe[t * C + c])));
    }
}
#define DEF_EMB_FWD(S, T)                                                                      \
    extern "C" __global__ void embedding_forward_##S(T* out, const unsigned int* tokens,      \
                                                     const T* wte, const T* wpe, float scale,   \
                                                     int B, int T_, int C) {                    \
        embedding_forward_impl<T>(out, tokens, wte, wpe, scale, B, T_, C);                     \
    }
FOR_EACH_TYPE(DEF_EMB_FWD)

/// embedding_backward_wpe_T: dwpe[t,c] += scale·Σ_b dout[b,t,c], b in order (grid-stride over
/// T_·C; the sum is scaled once, scale = 1 outside unit scaling).
template <typename T>
__device__ void embedding_backward_wpe_impl(float* dwpe, const T* dout, float scale, int B, int T_,
                                            int C) {
    if (B <= 0 || T_ <= 0 || C <= 0) return;
    const u64 tc = (u64)T_ * C;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    // Every dout[b] slice starts 16-byte aligned only if T_·C is a multiple of 8.
    const bool vec = (tc % 8 == 0) && aligned16(dwpe) && aligned16(dout);
    u64 start = 0;
    if (vec) {
        const u64 packs = tc / 8;
        for (u64 p = tid; p < packs; p += stride) {
            const u64 i0 = p * 8;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int b = 0; b < B; ++b) {
                float f[8];
                load8(dout + (u64)b * tc + i0, f);
#pragma unroll
                for (int k = 0; k < 8; ++k) acc[k] += f[k];
            }
            float d[8];
            load8(dwpe + i0, d);
#pragma unroll
            for (int k = 0; k < 8; ++k) d[k] += scale * acc[k];
            store8(dwpe + i0, d);
        }
        start = packs * 8;
    }
    for (u64 i = start + tid; i < tc; i += stride) {
        float acc = 0.0f;
        for (int b = 0; b < B; ++b) acc += to_float(dout[(u64)b * tc + i]);
        dwpe[i] += scale * acc;
    }
}
#define DEF_EMB_BWD_WPE(S, T)                                                                 \
    extern "C" __global__ void embedding_backward_wpe_##S(float* dwpe, const T* dout,        \
                                                          float scale, int B, int T_, int C) { \
        embedding_backward_wpe_impl<T>(dwpe, dout, scale, B, T_, C);                          \
    }
FOR_EACH_TYPE(DEF_EMB_BWD_WPE)

/// embedding_backward_wte_T: block k adds scale·Σ dout[pos,:] over bucket k's positions (in order)
/// into dwte[bucket_tokens[k],:]; buckets hold distinct tokens, so blocks never share a row. The
/// grid may exceed the bucket count *num_buckets (read here, so a recorded launch fits any batch).
template <typename T>
__device__ void embedding_backward_wte_impl(float* dwte, const T* dout,
                                            const unsigned* bucket_tokens, const int* bucket_starts,
                                            const int* positions, float scale,
                                            const int* num_buckets, int C) {
    const int k = blockIdx.x;
    if (k >= *num_buckets || C <= 0) return;
    const u64 tok = bucket_tokens[k];
    const int s0 = bucket_starts[k], s1 = bucket_starts[k + 1];
    const int bd = blockDim.x;
    for (int c0 = threadIdx.x; c0 < C; c0 += 4 * bd) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = s0; j < s1; ++j) {
            const u64 base = (u64)positions[j] * C;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int c = c0 + q * bd;
                if (c < C) acc[q] += to_float(dout[base + c]);
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int c = c0 + q * bd;
            if (c < C) dwte[tok * C + c] += scale * acc[q];
        }
    }
}
#define DEF_EMB_BWD_WTE(S, T)                                                                   \
    extern "C" __global__ void embedding_backward_wte_##S(                                     \
        float* dwte, const T* dout, const unsigned int* bucket_tokens, const int* bucket_starts, \
        const int* positions, float scale, const int* num_buckets, int C) {                     \
        embedding_backward_wte_impl<T>(dwte, dout, bucket_tokens, bucket_starts, positions,     \
                                       scale, num_buckets, C);                                  \
    }
FOR_EACH_TYPE(DEF_EMB_BWD_WTE)

// ---------------------------------------------------------------------------------------------
// Classifier: fused softmax cross-entropy (grid = N rows, block = 512)
// ---------------------------------------------------------------------------------------------

// Online softmax state (running max m, Σ exp(x − m) = s) absorbing one logit: one expf either
// way. A −inf logit adds nothing (and must not make exp(−inf − (−inf)) = NaN); NaN propagates.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += (x == neg_inf()) ? 0.0f : expf(x - m);
    }
}

// Merges two online states. A side with s == 0 contributes exactly 0 (its m may be −inf).
// Symmetric in its two arguments bit for bit, so butterfly lanes agree.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    const float a = (s == 0.0f) ? 0.0f : s * expf(m - mn);
    const float b = (s2 == 0.0f) ? 0.0f : s2 * expf(m2 - mn);
    m = mn;
    s = a + b;
}

// The classifier's per-logit exponentials: exp(x − c) as 2^(x·log2 e − c·log2 e), one FMA and
// the flush-to-zero ex2 (`ex2_ftz`, device_common.cuh; exp2 of −126 and below is 0: terms under 1e-38 of a sum of at least 1,
// gradients under bf16's range). c·log2 e is rounded once per row, so its error scales the
// whole row alike; relative error a few 1e-7 per term. expf's exact sequence (and __expf's
// subnormal handling) cost ~7 instructions a logit where this costs 2, and instructions, not
// bytes, bound the classifier (a variant reading each row once ran no faster): with full packs
// also skipping the per-logit column checks, 0.429 → 0.349 ms per 4096 GPT-2 rows on the H100.

// log Σ_{j<V} exp(row[j]), by a fixed-shape tree: lanes, then warps. Ends with a barrier.
template <typename T> __device__ float row_logsumexp(const T* x, int V, bool vec) {
    __shared__ float sm_m[32], sm_s[32];
    __shared__ float sm_lse;
    float m = neg_inf(), s = 0.0f;
    if (vec) {
        // Four packs of 8 in flight per thread (a row is ~100 KB: memory-level parallelism is
        // what this loop needs); each pack rescales the running sum once, by its own max.
        const int step = blockDim.x * 8;
        for (int c0 = threadIdx.x * 8; c0 < V; c0 += 4 * step) {
            float f[4][8];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (c0 + u * step < V) load8(x + c0 + u * step, f[u]);  // padding is ignored
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int c = c0 + u * step;
                if (c >= V) break;
                if (c + 8 > V) {  // the row's last pack: mask its padding
#pragma unroll
                    for (int k = 0; k < 8; ++k)
                        if (c + k >= V) f[u][k] = neg_inf();
                }
                float pm = neg_inf();
#pragma unroll
                for (int k = 0; k < 8; ++k) pm = fmaxf(pm, f[u][k]);
                if (pm == neg_inf()) continue;
                if (pm > m) {
                    s = (s == 0.0f) ? 0.0f : s * expf(m - pm);
                    m = pm;
                }
                const float mb = m * LOG2E;
#pragma unroll
                for (int k = 0; k < 8; ++k) s += ex2_ftz(fmaf(f[u][k], LOG2E, -mb));
            }
        }
    } else {
        for (int c = threadIdx.x; c < V; c += blockDim.x) online_add(m, s, to_float(x[c]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) { sm_m[warp] = m; sm_s[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? sm_m[lane] : neg_inf();
        s = lane < nwarps ? sm_s[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            online_merge(m, s, m2, s2);
        }
        if (lane == 0) sm_lse = m + logf(s);
    }
    __syncthreads();
    return sm_lse;
}

/// crossentropy_forward_backward_T: losses[i] = lse − logit[target]; logits become
/// (softmax − onehot)·dloss on the V real columns and 0 on the padding (never read).
template <typename T>
__device__ void crossentropy_forward_backward_impl(float* losses, T* logits,
                                                   const unsigned* targets, int N, int V, int Vp,
                                                   float dloss) {
    const int row = blockIdx.x;
    if (row >= N) return;  // uniform across the block, so the barriers below stay matched
    T* x = logits + (u64)row * Vp;
    const unsigned target = targets[row];
    const bool valid = V > 0 && target < (unsigned)V;
    // Read the target logit before the barriers inside row_logsumexp: afterwards it is overwritten.
    const float x_target = (threadIdx.x == 0 && valid) ? to_float(x[target]) : 0.0f;
    const bool vec = (Vp % 8 == 0) && aligned16(logits);
    const float lse = row_logsumexp(x, V, vec);
    if (threadIdx.x == 0) losses[row] = valid ? lse - x_target : quiet_nan();
    const float lb = lse * LOG2E;
    if (vec) {
        const int step = blockDim.x * 8;
        for (int c0 = threadIdx.x * 8; c0 < Vp; c0 += 4 * step) {
            float f[4][8];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (c0 + u * step < V) load8(x + c0 + u * step, f[u]);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int c = c0 + u * step;
                if (c >= Vp) break;
                if (c + 8 <= V) {  // real columns only: softmax·dloss, the target's −dloss after
#pragma unroll
                    for (int k = 0; k < 8; ++k)
                        f[u][k] = ex2_ftz(fmaf(f[u][k], LOG2E, -lb)) * dloss;
                    if (valid && target - (unsigned)c < 8u) {
#pragma unroll
                        for (int k = 0; k < 8; ++k)
                            if ((unsigned)(c + k) == target) f[u][k] -= dloss;
                    }
                } else {
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        const int j = c + k;
                        f[u][k] = j < V ? (ex2_ftz(fmaf(f[u][k], LOG2E, -lb)) -
                                           ((unsigned)j == target ? 1.0f : 0.0f)) * dloss
                                        : 0.0f;
                    }
                }
                store8(x + c, f[u]);
            }
        }
    } else {
        for (int j = threadIdx.x; j < Vp; j += blockDim.x) {
            const float g = j < V ? (ex2_ftz(fmaf(to_float(x[j]), LOG2E, -lb)) -
                                     ((unsigned)j == target ? 1.0f : 0.0f)) * dloss
                                  : 0.0f;
            x[j] = from_float<T>(g);
        }
    }
}
#define DEF_CE_FWD_BWD(S, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(512) crossentropy_forward_backward_##S(         \
        float* losses, T* logits, const unsigned int* targets, int N, int V, int Vp,            \
        float dloss) {                                                                           \
        crossentropy_forward_backward_impl<T>(losses, logits, targets, N, V, Vp, dloss);         \
    }
FOR_EACH_TYPE(DEF_CE_FWD_BWD)

/// crossentropy_forward_T: losses[i] = logsumexp(logits[i, :V]) − logits[i, target]; no writes.
template <typename T>
__device__ void crossentropy_forward_impl(float* losses, const T* logits, const unsigned* targets,
                                          int N, int V, int Vp) {
    const int row = blockIdx.x;
    if (row >= N) return;
    const T* x = logits + (u64)row * Vp;
    const unsigned target = targets[row];
    const bool valid = V > 0 && target < (unsigned)V;
    const bool vec = (Vp % 8 == 0) && aligned16(logits);
    const float lse = row_logsumexp(x, V, vec);
    if (threadIdx.x == 0) losses[row] = valid ? lse - to_float(x[target]) : quiet_nan();
}
#define DEF_CE_FWD(S, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(512) crossentropy_forward_##S(                 \
        float* losses, const T* logits, const unsigned int* targets, int N, int V, int Vp) {   \
        crossentropy_forward_impl<T>(losses, logits, targets, N, V, Vp);                        \
    }
FOR_EACH_TYPE(DEF_CE_FWD)
