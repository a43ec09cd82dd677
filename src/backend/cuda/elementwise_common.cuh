// Device helpers shared by kernels.cu and fp8.cu: storage types, conversions, 16-byte packed
// accesses and the GELU formula. Not a file NVRTC includes: mod.rs prepends it to both sources
// (concat!), and tools/fp8_cast_bench.cu includes it before fp8.cu. Everything is
// __forceinline__: a helper a module does not call emits no PTX.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(f16 x) { return __half2float(x); }

// Rounds to T, to nearest even (f16 overflows to ±inf).
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_float<f16>(float x) { return __float2half_rn(x); }

// Loads 8 consecutive elements as float (exact); p must be 16-byte aligned. load8<f16> is each
// module's own: kernels.cu widens with integer ops (its f16 classifier was bound by the
// conversion instructions), fp8.cu with cvt; the values are the same, the instructions are not.
template <typename T> __device__ __forceinline__ void load8(const T* p, float* f);
template <> __device__ __forceinline__ void load8<float>(const float* p, float* f) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
template <> __device__ __forceinline__ void load8<bf16>(const bf16* p, float* f) {
    // A bf16 is the top half of a float, so widening is a shift; element 0 is the low half.
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

// Stores 8 floats rounded to T (nearest even); p must be 16-byte aligned.
template <typename T> __device__ __forceinline__ void store8(T* p, const float* f);
template <> __device__ __forceinline__ void store8<float>(float* p, const float* f) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
template <> __device__ __forceinline__ void store8<bf16>(bf16* p, const float* f) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const unsigned lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * k]));
        const unsigned hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * k + 1]));
        w[k] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
template <> __device__ __forceinline__ void store8<f16>(f16* p, const float* f) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2half2_rn(f[2 * k], f[2 * k + 1]);  // .x = low half
    *reinterpret_cast<uint4*>(p) = u;
}

// GELU, tanh approximation, times `scale` (1 outside unit scaling), in f32: kernels.cu's
// gelu_forward_T / gelu_backward_T and fp8.cu's fused GELU casts compute these same expressions,
// so the fused casts see the bits the separate kernels would have stored.
#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
#define GELU_CUBIC 0.044715f

// ½(1 + tanh u) as the logistic 1/(1 + e^(−2u)): one expf, and it saturates to 0 or 1 without NaN.
__device__ __forceinline__ float sigmoid_2x(float u) { return 1.0f / (1.0f + expf(-(u + u))); }

// scale·x·σ(2u) with u = √(2/π)(x + 0.044715x³).
__device__ __forceinline__ float gelu_value(float x, float scale) {
    const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    return scale * (x * sigmoid_2x(u));
}
// scale·gelu'(x)·g: with σ = ½(1 + tanh u), d(xσ)/dx = σ + x·2σ(1 − σ)·du/dx.
__device__ __forceinline__ float gelu_input_grad(float x, float g, float scale) {
    const float sig = sigmoid_2x(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
    const float du_dx = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
    const float local = sig + 2.0f * x * sig * (1.0f - sig) * du_dx;
    return (scale * local) * g;
}
