// Device helpers every CUDA source shares. Not a file NVRTC includes: mod.rs prepends it to
// each source (concat!), ahead of that source's own common header. Everything is
// __forceinline__ (or a macro): a helper a module does not call emits no PTX.

#define LOG2E 1.4426950408889634f

// exp2 on the MUFU unit: ex2.approx.ftz (~2 ulp; -inf -> +0; subnormal results flush to 0).
// The softmaxes (attention, classifier) fold their scale·log2(e) into one FMA a score, so each
// exponential costs FMA + MUFU where expf costs ~7 instructions.
__device__ __forceinline__ float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

