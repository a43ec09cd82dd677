// halfling FP8 kernels: the amax of a bf16 or f16 tensor, and its per-tensor scaled cast to FP8
// (e4m3 or e5m2), optionally transposed, for cuBLASLt's FP8 matmuls. Compiled at run time by
// NVRTC for sm_90 (no fast math); names, parameters and launch geometries follow the kernel ABI
// that src/backend/cuda/fp8.rs launches against. The kernels that read a tensor exist as
// `<name>_bf16` (T = __nv_bfloat16: the fp8 recipe) and `<name>_f16` (T = __half: fp8-unit).
//
// Semantics are those of the CPU reference (`gemm_operand` in src/backend/cpu/mod.rs and
// `numerics`), bit for bit:
// - amax = max |x| over the tensor as stored, NaN ignored (fmaxf, like f32::max); 0 when empty.
// - scale: `Current` scaling is `numerics::scale_from_amax(amax, format, margin)`, computed on
//   the device from the amax (no host round trip); `Fixed` scales come from the host.
// - cast: q = satfinite(RNE(x · scale)), ±inf saturates to ±max, NaN becomes the canonical NaN
//   code (0x7F e4m3, 0x7E e5m2) with its sign. x · scale is exact in f32 (scale is a power of
//   two) unless it leaves f32's range, which rounds to 0 / saturates the same way on the CPU.
// - the GEMM multiplies q / scale: cuBLASLt gets `1/scale` (exact) as the operand's scale.
//
// Determinism: recording an amax into the model's amax buffer uses an integer atomicMax on the
// f32 bits. For non-negative floats the unsigned bit order is the numeric order, and max is
// exact, associative and commutative, so the result does not depend on which block gets there
// first: it is the same bits every run (a NaN already in the slot has larger bits than any number
// and stays, as in the CPU's record). No floating-point atomics anywhere.
//
// Formats: `format` 0 = e4m3 (max 448), 1 = e5m2 (max 57344).

// Prepended by mod.rs: elementwise_common.cuh (u64, bf16, f16, to_float, from_float, load8,
// store8 but load8<f16>, the GELU formula).

// Instantiates one extern "C" wrapper per tensor type: M(suffix, T).
#define FOR_EACH_TYPE(M) M(bf16, bf16) M(f16, f16)

__device__ __forceinline__ float fp8_max_finite(int format) { return format == 0 ? 448.0f : 57344.0f; }

// numerics::scale_from_amax: 2^(floor(log2(max / amax)) - margin), exponent clamped to
// [-126, 64]; 1 for amax 0, NaN or inf. The quotient is formed in double, where it cannot round
// across a power of two, so the floor read from its exponent bits is exact.
__device__ __forceinline__ float fp8_scale_from_amax(float amax, int format, int margin) {
    amax = fabsf(amax);
    if (amax == 0.0f || !isfinite(amax)) return 1.0f;
    const double ratio = (double)fp8_max_finite(format) / (double)amax;
    long long e = (long long)((__double_as_longlong(ratio) >> 52) & 0x7FF) - 1023;
    e -= margin;
    e = e < -126 ? -126 : (e > 64 ? 64 : e);
    return ldexpf(1.0f, (int)e);
}

// The FP8 conversion instructions (cvt.*.e4m3x2 / e5m2x2) need sm_89. Older GPUs (no FP8 GEMMs
// either: their linear ops take the dequantized path) get the same codes from this software
// encoder, a line-by-line port of the CPU reference (`Fp8Format::encode` in
// src/numerics/convert.rs): RNE, ±inf and overflow saturate to ±max, f32 subnormals give ±0, NaN
// gives the canonical NaN code with its sign.
__device__ __forceinline__ unsigned char fp8_encode_soft(float v, int format) {
    const unsigned bits = __float_as_uint(v);
    const unsigned sign = (bits >> 24) & 0x80u;
    const int m = format == 0 ? 3 : 2;
    const int min_normal_exp = format == 0 ? -6 : -14;
    const unsigned max_code = format == 0 ? 0x7Eu : 0x7Bu;
    if (isnan(v)) return (unsigned char)(sign | (format == 0 ? 0x7Fu : 0x7Eu));
    const unsigned abs = bits & 0x7FFFFFFFu;
    const int biased_exp = (int)(abs >> 23);
    if (biased_exp == 0xFF) return (unsigned char)(sign | max_code);
    if (biased_exp == 0) return (unsigned char)sign;
    const int exp = biased_exp - 127;
    const unsigned significand = (abs & 0x007FFFFFu) | 0x00800000u;
    const int kept_exp = exp > min_normal_exp ? exp : min_normal_exp;
    // In [20, 25]: at least one bit is dropped, and past 25 everything rounds to zero anyway.
    const int drop = kept_exp - m - (exp - 23);
    const unsigned shift = (unsigned)(drop < 25 ? drop : 25);
    const unsigned kept = significand >> shift;
    const unsigned dropped = significand & ((1u << shift) - 1u);
    const unsigned half = 1u << (shift - 1u);
    const unsigned round_up = (dropped > half || (dropped == half && (kept & 1u))) ? 1u : 0u;
    const unsigned code = ((unsigned)(kept_exp - min_normal_exp) << m) + kept + round_up;
    return (unsigned char)(sign | (code < max_code ? code : max_code));
}

// Saturating RNE f32 -> FP8 code (the hardware's .satfinite conversion), NaN made canonical.
__device__ __forceinline__ unsigned char fp8_encode(float v, int format) {
#if __CUDA_ARCH__ >= 890
    if (isnan(v)) return (unsigned char)((signbit(v) ? 0x80 : 0) | (format == 0 ? 0x7F : 0x7E));
    unsigned short packed;
    if (format == 0) {
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(0.0f), "f"(v));
    } else {
        asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(0.0f), "f"(v));
    }
    return (unsigned char)(packed & 0xFF);
#else
    return fp8_encode_soft(v, format);
#endif
}

// Exact value of an FP8 code.
__device__ __forceinline__ float fp8_decode(unsigned char code, int format) {
    const bool neg = code & 0x80;
    float v;
    if (format == 0) {
        const int e = (code >> 3) & 15, m = code & 7;
        if (e == 15 && m == 7) return __int_as_float(0x7fc00000);
        v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    } else {
        const int e = (code >> 2) & 31, m = code & 3;
        if (e == 31) return m == 0 ? __int_as_float(neg ? 0xff800000u : 0x7f800000u) : __int_as_float(0x7fc00000);
        v = e == 0 ? ldexpf((float)m, -16) : ldexpf((float)(4 + m), e - 17);
    }
    return neg ? -v : v;
}

// Max over the block (blockDim.x a multiple of 32, at most 256); every thread gets the result.
// fmaxf ignores NaN, and max is exact, so the tree's shape does not matter for the bits.
__device__ __forceinline__ float block_max256(float m, float* red /* [8] */) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, red[w]);
    return m;
}

// The scale every block of a cast uses: from the amax partials (current scaling; the first block
// records that amax) or `fixed_scale`. The first block also writes 1 / scale to inv_scale_out.
__device__ __forceinline__ float fp8_block_scale(const float* partials, int num_partials,
                                                 float fixed_scale, int format, int margin,
                                                 unsigned* amax_slot, float* inv_scale_out,
                                                 float* red /* [8] */) {
    float scale = fixed_scale;
    if (partials != nullptr) {
        float m = 0.0f;
        for (int i = threadIdx.x; i < num_partials; i += blockDim.x) m = fmaxf(m, partials[i]);
        m = block_max256(m, red);
        scale = fp8_scale_from_amax(m, format, margin);
        if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && amax_slot != nullptr)
            atomicMax(amax_slot, __float_as_uint(m));
    }
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && inv_scale_out != nullptr)
        *inv_scale_out = 1.0f / scale;
    return scale;
}

// load8<f16> (see elementwise_common.cuh) through cvt.
template <> __device__ __forceinline__ void load8<f16>(const f16* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 v = __half22float2(h[k]);  // .x = element 2k (the low half)
        f[2 * k] = v.x;
        f[2 * k + 1] = v.y;
    }
}

// fp8_amax_partial_T: partials[blockIdx.x] = max |x[i]| over the elements this block visits
// (grid-stride, 8 elements per thread and step, then the tail one by one).
// Launch: grid (G, 1, 1) with 1 <= G <= 1024, block (256, 1, 1); x is 16-byte aligned.
// The loop of every amax partial kernel: `eight(i, f)` fills f with the values of elements
// 8i .. 8i+7 (16-byte loads), `one(i)` gives element i of the tail.
template <typename Eight, typename One>
__device__ __forceinline__ void amax_partial_loop(float* partials, long long n, Eight eight,
                                                  One one) {
    __shared__ float red[8];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n8 = n / 8;
    float m = 0.0f;
    for (long long i = tid; i < n8; i += stride) {
        float f[8];
        eight(i, f);
#pragma unroll
        for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(f[k]));
    }
    for (long long i = 8 * n8 + tid; i < n; i += stride) m = fmaxf(m, fabsf(one(i)));
    m = block_max256(m, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = m;
}
#define DEF_AMAX_PARTIAL(S, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        fp8_amax_partial_##S(float* partials, const T* x, long long n) {                       \
        amax_partial_loop(                                                                     \
            partials, n, [&](long long i, float* f) { load8(x + 8 * i, f); },                  \
            [&](long long i) { return to_float(x[i]); });                                      \
    }
FOR_EACH_TYPE(DEF_AMAX_PARTIAL)

// The gradient of GELU's input as gelu_backward_bf16 (kernels.cu) stores it, for the output
// gradient casts that apply the GELU derivative themselves: gelu_input_grad (the same function,
// so the same bits), rounded to bf16 because that is the tensor the unfused path would have cast
// (its amax, codes and column sums are then the same).
__device__ __forceinline__ float dgelu_bf16(float x, float g, float scale) {
    return __bfloat162float(__float2bfloat16_rn(gelu_input_grad(x, g, scale)));
}

// fp8_amax_partial_dgelu_bf16: fp8_amax_partial_bf16 of dgelu_bf16(pre, d, gelu_scale) (the
// tensor the dgelu casts below cast), without forming it. Launch: as fp8_amax_partial_T; d and
// pre 16-byte aligned.
extern "C" __global__ void __launch_bounds__(256)
fp8_amax_partial_dgelu_bf16(float* partials, const bf16* d, const bf16* pre, float gelu_scale,
                            long long n) {
    amax_partial_loop(
        partials, n,
        [&](long long i, float* f) {
            float g[8], x[8];
            load8(d + 8 * i, g);
            load8(pre + 8 * i, x);
#pragma unroll
            for (int k = 0; k < 8; ++k) f[k] = dgelu_bf16(x[k], g[k], gelu_scale);
        },
        [&](long long i) { return dgelu_bf16(to_float(pre[i]), to_float(d[i]), gelu_scale); });
}

// GELU's output as gelu_forward_bf16 (kernels.cu) stores it, for the input casts that apply
// GELU themselves (the MLP's down-projection): gelu_value (the same function, so the same bits),
// rounded to bf16 because that is the tensor the unfused path would have cast.
__device__ __forceinline__ float gelu_bf16(float x, float scale) {
    return __bfloat162float(__float2bfloat16_rn(gelu_value(x, scale)));
}

// fp8_amax_partial_gelu_bf16: fp8_amax_partial_bf16 of gelu_bf16(pre, gelu_scale) (the tensor
// fp8_cast_tiled_gelu_bf16 casts), without forming it. Launch: as fp8_amax_partial_T; pre
// 16-byte aligned.
extern "C" __global__ void __launch_bounds__(256)
fp8_amax_partial_gelu_bf16(float* partials, const bf16* pre, float gelu_scale, long long n) {
    amax_partial_loop(
        partials, n,
        [&](long long i, float* f) {
            load8(pre + 8 * i, f);
#pragma unroll
            for (int k = 0; k < 8; ++k) f[k] = gelu_bf16(f[k], gelu_scale);
        },
        [&](long long i) { return gelu_bf16(to_float(pre[i]), gelu_scale); });
}

// fp8_amax_record: slot = max(slot, max(partials[0..num])) (an operand whose amax is recorded
// but which is not cast). Launch: grid (1, 1, 1), block (256, 1, 1).
extern "C" __global__ void __launch_bounds__(256)
fp8_amax_record(unsigned* slot, const float* partials, int num) {
    __shared__ float red[8];
    float m = 0.0f;
    for (int i = threadIdx.x; i < num; i += blockDim.x) m = fmaxf(m, partials[i]);
    m = block_max256(m, red);
    if (threadIdx.x == 0) atomicMax(slot, __float_as_uint(m));
}

// fp8_cast_T: x[rows, cols] (of type T) scaled and cast to FP8.
//   out   [rows, cols]: the FP8 codes, or (dequant = 1) the values q / scale rounded to T, for
//         GEMMs that cannot run in FP8. Exact: q has at most 4 significant bits, bf16 spans
//         every q / scale, and f16 holds every q / scale of an f16 x up to its max 65504 (a
//         scale below 1 can round a value near that max past it; unit scaling's scale 1 keeps
//         |q / scale| <= 57344). null: not written.
//   out_t [cols, rows]: the FP8 codes transposed (the K-major copy a backward GEMM needs); null:
//         not written.
//   scale: partials != null: current scaling from amax = max(partials[0..num_partials]) (from
//          fp8_amax_partial_T over the same x) with `margin`; else `fixed_scale`.
//   amax_slot: null, or the model's amax cell to max-accumulate max |x| into (the partials' amax
//          with current scaling, else this kernel's own).
//   inv_scale_out: null, or where 1 / scale goes (cuBLASLt's scale pointer for this operand).
// Launch: grid (ceil(cols / 64), ceil(rows / 32), 1), block (256, 1, 1): one 32 x 64 tile per
// block. Full tiles of a tensor whose rows and cols are multiples of 8 move 8 elements per thread
// (16-byte loads, 8-byte stores); the rest go element by element. Same bits either way.
template <typename T>
__device__ void fp8_cast_impl(void* out, unsigned char* out_t, const T* x, int rows, int cols,
                              int format, int dequant, const float* partials, int num_partials,
                              float fixed_scale, int margin, unsigned* amax_slot,
                              float* inv_scale_out) {
    __shared__ unsigned char tile[64][32 + 4];
    __shared__ float red[8];
    const float scale = fp8_block_scale(partials, num_partials, fixed_scale, format, margin,
                                        amax_slot, inv_scale_out, red);
    const float inv = 1.0f / scale;

    const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 64;
    const bool vec = rows % 8 == 0 && cols % 8 == 0 && r0 + 32 <= rows && c0 + 64 <= cols;
    unsigned char* codes = reinterpret_cast<unsigned char*>(out);
    T* values = reinterpret_cast<T*>(out);
    float local = 0.0f;
    if (vec) {
        const int r = threadIdx.x >> 3, c = (threadIdx.x & 7) * 8;
        const size_t at = (size_t)(r0 + r) * cols + c0 + c;
        float f[8];
        load8(x + at, f);
        unsigned char q[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            local = fmaxf(local, fabsf(f[k]));
            q[k] = fp8_encode(f[k] * scale, format);
        }
        if (out != nullptr) {
            if (dequant) {
                float d[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) d[k] = fp8_decode(q[k], format) * inv;
                store8(values + at, d);
            } else {
                const unsigned lo = q[0] | (q[1] << 8) | (q[2] << 16) | ((unsigned)q[3] << 24);
                const unsigned hi = q[4] | (q[5] << 8) | (q[6] << 16) | ((unsigned)q[7] << 24);
                *reinterpret_cast<uint2*>(codes + at) = make_uint2(lo, hi);
            }
        }
        if (out_t != nullptr) {
#pragma unroll
            for (int k = 0; k < 8; ++k) tile[c + k][r] = q[k];
        }
    } else {
        for (int i = threadIdx.x; i < 64 * 32; i += blockDim.x) {
            const int r = i / 64, c = i % 64, gr = r0 + r, gc = c0 + c;
            unsigned char q = 0;
            if (gr < rows && gc < cols) {
                const size_t at = (size_t)gr * cols + gc;
                const float v = to_float(x[at]);
                local = fmaxf(local, fabsf(v));
                q = fp8_encode(v * scale, format);
                if (out != nullptr) {
                    if (dequant) values[at] = from_float<T>(fp8_decode(q, format) * inv);
                    else codes[at] = q;
                }
            }
            if (out_t != nullptr) tile[c][r] = q;
        }
    }
    if (out_t != nullptr) {
        __syncthreads();
        if (vec) {
            const int c = threadIdx.x >> 2, r = (threadIdx.x & 3) * 8;
            unsigned lo = 0, hi = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                lo |= (unsigned)tile[c][r + k] << (8 * k);
                hi |= (unsigned)tile[c][r + 4 + k] << (8 * k);
            }
            *reinterpret_cast<uint2*>(out_t + (size_t)(c0 + c) * rows + r0 + r) = make_uint2(lo, hi);
        } else {
            for (int i = threadIdx.x; i < 64 * 32; i += blockDim.x) {
                const int c = i / 32, r = i % 32, gr = r0 + r, gc = c0 + c;
                if (gr < rows && gc < cols) out_t[(size_t)gc * rows + gr] = tile[c][r];
            }
        }
    }
    if (partials == nullptr && amax_slot != nullptr) {
        local = block_max256(local, red);
        if (threadIdx.x == 0) atomicMax(amax_slot, __float_as_uint(local));
    }
}
#define DEF_CAST(S, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        fp8_cast_##S(void* out, unsigned char* out_t, const T* x, int rows, int cols,          \
                     int format, int dequant, const float* partials, int num_partials,         \
                     float fixed_scale, int margin, unsigned* amax_slot, float* inv_scale_out) { \
        fp8_cast_impl<T>(out, out_t, x, rows, cols, format, dequant, partials, num_partials,   \
                         fixed_scale, margin, amax_slot, inv_scale_out);                       \
    }
FOR_EACH_TYPE(DEF_CAST)

// ---------------------------------------------------------------------------------------------
// Tiled casts: the FP8 codes of a bf16 (or f16) tensor, row-major and/or transposed, from one
// read.
//
// fp8_cast_tiled_bf16 computes the same codes, scale and amax as fp8_cast_bf16 (bit for bit)
// but moves memory at close to the copy bandwidth: each block casts a 64 x 128 tile (256
// threads, 4 rows x 8 columns each), keeps four 16-byte loads in flight per thread, writes the
// row-major codes 8 bytes at a time, and assembles the transposed codes in shared memory as 32-bit
// words of 4 consecutive rows, so each thread stores them 16 bytes at a time (64 contiguous bytes
// per transposed row and tile). fp8_cast_bf16's 32 x 64 tiles moved one 16-byte load per thread
// and wrote the transposed codes a byte at a time into shared memory and 8 bytes at a time out.
// No dequantized output here (that path keeps fp8_cast_bf16). An output gradient's cast can also
// sum its columns per tile, so the bias gradient needs no second read of it (as Transformer
// Engine's cast-transpose-dbias does).
// ---------------------------------------------------------------------------------------------

// The two elements of a 32-bit word of T (the low half is the first), exactly as float.
template <typename T> __device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack2<bf16>(unsigned w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ void unpack2<f16>(unsigned w, float& lo, float& hi) {
    lo = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    hi = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}

// Two saturating RNE codes at once (cvt packs two), NaN made canonical as in fp8_encode; the
// low byte is `lo`'s code.
__device__ __forceinline__ unsigned fp8_encode2(float lo, float hi, int format) {
#if __CUDA_ARCH__ >= 890
    unsigned short packed;
    if (format == 0) {
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    }
    unsigned q = packed;
    const unsigned nan = format == 0 ? 0x7Fu : 0x7Eu;
    if (isnan(lo)) q = (q & 0xFF00u) | (signbit(lo) ? 0x80u : 0u) | nan;
    if (isnan(hi)) q = (q & 0x00FFu) | (((signbit(hi) ? 0x80u : 0u) | nan) << 8);
    return q;
#else
    return fp8_encode_soft(lo, format) | ((unsigned)fp8_encode_soft(hi, format) << 8);
#endif
}

// fp8_cast_tiled_bf16: x[rows, cols] (bf16) scaled and cast to FP8 codes. Parameters as
// fp8_cast_bf16's, less `dequant`: out [rows, cols] and/or out_t [cols, rows] (null: not written),
// the scale from the partials (current scaling) or `fixed_scale`, the amax max-accumulated into
// amax_slot, 1/scale into inv_scale_out.
// fp8_cast_tiled_dbias_bf16: the same, and col_sums [ceil(rows / 64), cols] (f32): row g gets the
// column sums of x over tile row g (the partials column_sums_reduce sums). A separate kernel
// because the sums cost registers (48 against 32) that the plain casts would pay for in occupancy.
// Launch: grid (ceil(cols / 128), ceil(rows / 64), 1), block (256, 1, 1). Full tiles of a tensor
// with rows % 16 == 0 and cols % 8 == 0 (x, out, out_t and pre 16-byte aligned) take the vector path;
// other tiles go element by element through the same shared-memory layout. Same bits either way.
// The tile geometry (TC columns, RPT rows per thread) is a template so that other shapes can be
// timed against it; the kernels instantiate the one measured best. SUMS: the column sums; DGELU:
// cast dgelu_bf16(pre, x, gelu_scale) instead of x (the dgelu kernels below); GELU: cast
// gelu_bf16(x, gelu_scale) (fp8_cast_tiled_gelu_bf16).
template <int TC, int RPT, bool SUMS, bool DGELU, bool GELU = false, typename T = bf16>
__device__ __forceinline__ void fp8_cast_tiled(unsigned char* out, unsigned char* out_t, const T* x,
                                               int rows, int cols, int format, const float* partials,
                                               int num_partials, float fixed_scale, int margin,
                                               unsigned* amax_slot, float* inv_scale_out,
                                               float* col_sums, const bf16* pre, float gelu_scale) {
    constexpr int THREADS = 256;
    constexpr int GROUPS = TC / 8;                   // threads across a tile row
    constexpr int TR = THREADS / GROUPS * RPT;       // rows per tile
    constexpr int PITCH = TR / 4 + 1;                // words per transposed tile row, padded
    static_assert(RPT % 4 == 0 && TR % 16 == 0, "whole words, 16-byte transposed stores");
    // words[c * PITCH + k]: the codes of rows 4k..4k+3 of tile column c, row 4k in the low byte.
    __shared__ unsigned words[TC * PITCH];
    __shared__ float red[8];
    // sums[g][c]: column c summed over the rows of thread row group g (col_sums only).
    __shared__ float sums[SUMS ? THREADS / GROUPS : 1][TC];
    const float scale = fp8_block_scale(partials, num_partials, fixed_scale, format, margin,
                                        amax_slot, inv_scale_out, red);

    // The value cast at element `at`: x, or (DGELU) the gradient of GELU's input from x = the
    // gradient of its output and `pre`, its input.
    auto value = [&](size_t at) {
        const float v = to_float(x[at]);
        if (GELU) return gelu_bf16(v, gelu_scale);
        return DGELU ? dgelu_bf16(__bfloat162float(pre[at]), v, gelu_scale) : v;
    };
    const int r0 = blockIdx.y * TR, c0 = blockIdx.x * TC;
    const bool vec = rows % 16 == 0 && cols % 8 == 0 && r0 + TR <= rows &&
                     c0 + TC <= cols;
    float local = 0.0f;
    if (vec) {
        const int cg = threadIdx.x % GROUPS, rg = threadIdx.x / GROUPS;
        const int c = cg * 8, r = rg * RPT;
        const T* src = x + (size_t)(r0 + r) * cols + c0 + c;
        uint4 raw[RPT];
        uint4 raw_pre[DGELU ? RPT : 1];
#pragma unroll
        for (int i = 0; i < RPT; ++i)
            raw[i] = __ldg(reinterpret_cast<const uint4*>(src + (size_t)i * cols));
        if (DGELU) {
            const bf16* p = pre + (size_t)(r0 + r) * cols + c0 + c;
#pragma unroll
            for (int i = 0; i < RPT; ++i)
                raw_pre[DGELU ? i : 0] = __ldg(reinterpret_cast<const uint4*>(p + (size_t)i * cols));
        }
        float csum[8];             // per column of the thread: the sum of its rows, in order
        unsigned col[8][RPT / 4];  // per column of the thread: its rows' codes, 4 to a word
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            csum[k] = 0.0f;
#pragma unroll
            for (int w = 0; w < RPT / 4; ++w) col[k][w] = 0;
        }
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const unsigned w[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
            unsigned pw[4] = {0u, 0u, 0u, 0u};
            if (DGELU) {
                const uint4 p4 = raw_pre[DGELU ? i : 0];
                pw[0] = p4.x, pw[1] = p4.y, pw[2] = p4.z, pw[3] = p4.w;
            }
            unsigned pair[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float lo, hi;
                unpack2<T>(w[k], lo, hi);
                if (DGELU) {
                    lo = dgelu_bf16(__uint_as_float(pw[k] << 16), lo, gelu_scale);
                    hi = dgelu_bf16(__uint_as_float(pw[k] & 0xffff0000u), hi, gelu_scale);
                }
                if (GELU) {
                    lo = gelu_bf16(lo, gelu_scale);
                    hi = gelu_bf16(hi, gelu_scale);
                }
                local = fmaxf(local, fmaxf(fabsf(lo), fabsf(hi)));
                if (SUMS) {
                    csum[2 * k] += lo;
                    csum[2 * k + 1] += hi;
                }
                pair[k] = fp8_encode2(lo * scale, hi * scale, format);
                col[2 * k][i / 4] |= (pair[k] & 0xFFu) << (8 * (i % 4));
                col[2 * k + 1][i / 4] |= (pair[k] >> 8) << (8 * (i % 4));
            }
            if (out != nullptr)
                *reinterpret_cast<uint2*>(out + (size_t)(r0 + r + i) * cols + c0 + c) =
                    make_uint2(pair[0] | (pair[1] << 16), pair[2] | (pair[3] << 16));
        }
        if (out_t != nullptr) {
#pragma unroll
            for (int k = 0; k < 8; ++k)
#pragma unroll
                for (int w = 0; w < RPT / 4; ++w) words[(c + k) * PITCH + r / 4 + w] = col[k][w];
        }
        if (SUMS) {
#pragma unroll
            for (int k = 0; k < 8; ++k) sums[rg][c + k] = csum[k];
        }
    } else {
        unsigned char* bytes = reinterpret_cast<unsigned char*>(words);
        for (int i = threadIdx.x; i < TR * TC; i += blockDim.x) {
            const int r = i / TC, c = i % TC, gr = r0 + r, gc = c0 + c;
            unsigned char q = 0;
            if (gr < rows && gc < cols) {
                const size_t at = (size_t)gr * cols + gc;
                const float v = value(at);
                local = fmaxf(local, fabsf(v));
                q = fp8_encode(v * scale, format);
                if (out != nullptr) out[at] = q;
            }
            if (out_t != nullptr) bytes[c * PITCH * 4 + r] = q;
        }
    }
    if (SUMS) {
        // Each column's tile sum: the row groups' sums in order (vector tiles), or the tile's
        // rows one by one (partial tiles). Deterministic either way.
        __syncthreads();
        const int c = threadIdx.x, gc = c0 + c;
        if (c < TC && gc < cols) {
            float t = 0.0f;
            if (vec) {
                for (int g = 0; g < (SUMS ? THREADS / GROUPS : 1); ++g) t += sums[g][c];
            } else {
                for (int r = 0; r < TR && r0 + r < rows; ++r) t += value((size_t)(r0 + r) * cols + gc);
            }
            col_sums[(size_t)blockIdx.y * cols + gc] = t;
        }
    }
    if (out_t != nullptr) {
        __syncthreads();
        if (vec) {
            constexpr int CHUNKS = TR / 16;  // 16-byte pieces of a transposed tile row
#pragma unroll
            for (int j = threadIdx.x; j < TC * CHUNKS; j += THREADS) {
                const int c = j / CHUNKS, part = j % CHUNKS;
                const unsigned* w = words + c * PITCH + part * 4;
                *reinterpret_cast<uint4*>(out_t + (size_t)(c0 + c) * rows + r0 + part * 16) =
                    make_uint4(w[0], w[1], w[2], w[3]);
            }
        } else {
            const unsigned char* bytes = reinterpret_cast<const unsigned char*>(words);
            for (int i = threadIdx.x; i < TR * TC; i += blockDim.x) {
                const int c = i / TR, r = i % TR, gr = r0 + r, gc = c0 + c;
                if (gr < rows && gc < cols) out_t[(size_t)gc * rows + gr] = bytes[c * PITCH * 4 + r];
            }
        }
    }
    if (partials == nullptr && amax_slot != nullptr) {
        local = block_max256(local, red);
        if (threadIdx.x == 0) atomicMax(amax_slot, __float_as_uint(local));
    }
}

// fp8_cast_tiled_T and fp8_cast_tiled_dbias_T (T = bf16, or f16 for fp8-unit): the tiled cast
// of x, without and with the column sums; on f16 the codes and amax are fp8_cast_f16's and the
// sums the f32 sums of x's values.
#define DEF_TILED_CAST(S, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        fp8_cast_tiled_##S(unsigned char* out, unsigned char* out_t, const T* x, int rows,     \
                           int cols, int format, const float* partials, int num_partials,      \
                           float fixed_scale, int margin, unsigned* amax_slot,                 \
                           float* inv_scale_out) {                                             \
        fp8_cast_tiled<128, 4, false, false>(out, out_t, x, rows, cols, format, partials,      \
                                             num_partials, fixed_scale, margin, amax_slot,     \
                                             inv_scale_out, nullptr, nullptr, 1.0f);           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        fp8_cast_tiled_dbias_##S(unsigned char* out, unsigned char* out_t, const T* x,         \
                                 int rows, int cols, int format, const float* partials,        \
                                 int num_partials, float fixed_scale, int margin,              \
                                 unsigned* amax_slot, float* inv_scale_out, float* col_sums) { \
        fp8_cast_tiled<128, 4, true, false>(out, out_t, x, rows, cols, format, partials,       \
                                            num_partials, fixed_scale, margin, amax_slot,      \
                                            inv_scale_out, col_sums, nullptr, 1.0f);           \
    }
FOR_EACH_TYPE(DEF_TILED_CAST)

// fp8_cast_tiled_dgelu_bf16 / fp8_cast_tiled_dbias_dgelu_bf16: fp8_cast_tiled_bf16 and
// fp8_cast_tiled_dbias_bf16 with x the gradient of GELU's output and `pre` [rows, cols] (bf16,
// 16-byte aligned) its input: they cast dgelu_bf16(pre, x, gelu_scale), the gradient of GELU's
// input, which is never stored (the MLP's up-projection backward reads it only here). Scale and
// amax are that tensor's (current scaling takes its partials from fp8_amax_partial_dgelu_bf16).
extern "C" __global__ void __launch_bounds__(256)
fp8_cast_tiled_dgelu_bf16(unsigned char* out, unsigned char* out_t, const bf16* x, int rows,
                          int cols, int format, const float* partials, int num_partials,
                          float fixed_scale, int margin, unsigned* amax_slot,
                          float* inv_scale_out, const bf16* pre, float gelu_scale) {
    fp8_cast_tiled<128, 4, false, true>(out, out_t, x, rows, cols, format, partials, num_partials,
                                        fixed_scale, margin, amax_slot, inv_scale_out, nullptr,
                                        pre, gelu_scale);
}

extern "C" __global__ void __launch_bounds__(256)
fp8_cast_tiled_dbias_dgelu_bf16(unsigned char* out, unsigned char* out_t, const bf16* x,
                                int rows, int cols, int format, const float* partials,
                                int num_partials, float fixed_scale, int margin,
                                unsigned* amax_slot, float* inv_scale_out, float* col_sums,
                                const bf16* pre, float gelu_scale) {
    fp8_cast_tiled<128, 4, true, true>(out, out_t, x, rows, cols, format, partials, num_partials,
                                       fixed_scale, margin, amax_slot, inv_scale_out, col_sums,
                                       pre, gelu_scale);
}

// fp8_cast_tiled_gelu_bf16: fp8_cast_tiled_bf16 of gelu_bf16(x, gelu_scale), x being GELU's
// input (the MLP's pre-activation): the down-projection's input codes in both layouts without
// GELU's output ever being stored. Scale and amax are that tensor's (current scaling reduces
// fp8_amax_partial_gelu_bf16's partials). Launch: as fp8_cast_tiled_bf16.
extern "C" __global__ void __launch_bounds__(256)
fp8_cast_tiled_gelu_bf16(unsigned char* out, unsigned char* out_t, const bf16* x, int rows,
                         int cols, int format, const float* partials, int num_partials,
                         float fixed_scale, int margin, unsigned* amax_slot, float* inv_scale_out,
                         float gelu_scale) {
    fp8_cast_tiled<128, 4, false, false, true>(out, out_t, x, rows, cols, format, partials,
                                               num_partials, fixed_scale, margin, amax_slot,
                                               inv_scale_out, nullptr, nullptr, gelu_scale);
}
