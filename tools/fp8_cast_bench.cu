// Standalone timing and bit-exactness harness for the FP8 cast kernels of src/backend/cuda/fp8.cu:
// the tiled casts (several tile shapes) against fp8_cast_bf16, byte for byte on inputs with
// specials, then timed at the 0.91B model's cast shapes against a device-to-device copy.
// Build and run on the GPU machine: nvcc -O3 -std=c++17 -arch=sm_90 -o castbench tools/fp8_cast_bench.cu && ./castbench
#include "../src/backend/cuda/elementwise_common.cuh"  // mod.rs prepends it to fp8.cu
#include "../src/backend/cuda/fp8.cu"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <algorithm>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)

template <int TC, int RPT>
__global__ void __launch_bounds__(256) tiled_variant(unsigned char* out, unsigned char* out_t, const bf16* x, int rows, int cols,
                    int format, const float* partials, int num_partials, float fixed_scale,
                    int margin, unsigned* amax_slot, float* inv_scale_out) {
    fp8_cast_tiled<TC, RPT, false, false>(out, out_t, x, rows, cols, format, partials, num_partials, fixed_scale, margin, amax_slot, inv_scale_out, nullptr, nullptr, 1.0f);
}

__global__ void copy16(uint4* out, const uint4* in, size_t n16) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) out[i] = in[i];
}

__device__ unsigned hash32(unsigned long long x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33; return (unsigned)x;
}
// Random bf16 values over many binades, with a few specials when `specials`.
__global__ void fill(bf16* x, size_t n, unsigned long long seed, int specials) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = hash32(seed * 0x9E3779B97F4A7C15ULL + i);
        float u = ((h & 0xFFFFFF) + 0.5f) / 16777216.0f;  // (0,1)
        int e = (int)((h >> 24) & 31) - 20;                  // binades 2^-20 .. 2^11
        float v = (u - 0.5f) * ldexpf(1.0f, e);
        if (specials) {
            unsigned s = hash32(h + 77) % 4096;
            if (s == 0) v = __int_as_float(0x7fc00000); else if (s == 1) v = -__int_as_float(0x7fc00000);
            else if (s == 2) v = __int_as_float(0x7f800000); else if (s == 3) v = -__int_as_float(0x7f800000);
            else if (s == 4) v = 1e30f;
        }
        x[i] = __float2bfloat16_rn(v);
    }
}

typedef void (*CastFn)(unsigned char*, unsigned char*, const bf16*, int, int, int, const float*, int, float, int, unsigned*, float*);

struct Variant { const char* name; CastFn fn; int tc, tr; };

static void launch(const Variant& v, unsigned char* out, unsigned char* out_t, const bf16* x, int rows, int cols, int format,
                   const float* partials, int np, float scale, unsigned* amax, float* inv) {
    dim3 grid((cols + v.tc - 1) / v.tc, (rows + v.tr - 1) / v.tr);
    v.fn<<<grid, 256>>>(out, out_t, x, rows, cols, format, partials, np, scale, 0, amax, inv);
}


int main() {
    cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0));
    printf("device %s, %d SMs, L2 %d MB\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20);
    Variant vars[] = {
        {"old 32x64", nullptr, 64, 32},
        {"tiled 64x128", tiled_variant<128, 4>, 128, 64},
        {"tiled 128x64", tiled_variant<64, 4>, 64, 128},
        {"tiled 128x128", tiled_variant<128, 8>, 128, 128},
        {"tiled 32x256", tiled_variant<256, 4>, 256, 32},
        {"tiled 64x256", tiled_variant<256, 8>, 256, 64},
    };
    const int NV = sizeof(vars) / sizeof(vars[0]);
    const size_t MAXE = 8192ull * 8192ull;
    const int POOL = 8;
    std::vector<bf16*> in(POOL); std::vector<unsigned char*> o(POOL), ot(POOL);
    for (int i = 0; i < POOL; ++i) {
        CK(cudaMalloc(&in[i], MAXE * 2)); CK(cudaMalloc(&o[i], MAXE)); CK(cudaMalloc(&ot[i], MAXE));
        fill<<<2048, 256>>>(in[i], MAXE, 1234 + i, 0);
    }
    unsigned char *ref_o, *ref_ot; CK(cudaMalloc(&ref_o, MAXE)); CK(cudaMalloc(&ref_ot, MAXE));
    float* cells; CK(cudaMalloc(&cells, 64 * 1024));
    unsigned* amaxes = (unsigned*)(cells + 4096); float* invs = cells + 8192; float* partials = cells;
    CK(cudaDeviceSynchronize());

    // ---- bit-exactness against the old kernel ----
    struct Shape { int rows, cols; };
    Shape tests[] = {{8192, 2048}, {2048, 8192}, {6144, 2048}, {64, 128}, {100, 72}, {37, 53}, {192, 136}, {128, 264}, {8, 8}, {16, 4096}, {4096, 24}, {1, 1}, {65, 129}};
    bf16* tx; CK(cudaMalloc(&tx, MAXE * 2));
    int fails = 0, checks = 0;
    for (int seed = 0; seed < 2; ++seed)
    for (const Shape& s : tests) {
        size_t n = (size_t)s.rows * s.cols;
        fill<<<1024, 256>>>(tx, n, 999 + seed * 31 + s.rows, 1);
        for (int format = 0; format < 2; ++format)
        for (int cur = 0; cur < 2; ++cur) {
            int np = 0;
            if (cur) { np = (int)std::min<size_t>(std::max<size_t>((n + 2047) / 2048, 1), 1024); fp8_amax_partial_bf16<<<np, 256>>>(partials, tx, (long long)n); }
            float scale = format == 0 ? 64.0f : 2048.0f;
            CK(cudaMemset(amaxes, 0, 256)); CK(cudaMemset(ref_o, 0xAB, n)); CK(cudaMemset(ref_ot, 0xAB, n));
            fp8_cast_bf16<<<dim3((s.cols + 63) / 64, (s.rows + 31) / 32), 256>>>(ref_o, ref_ot, tx, s.rows, s.cols, format, 0, cur ? partials : nullptr, np, scale, 0, amaxes, invs);
            for (int v = 1; v < NV; ++v) {
                CK(cudaMemset(o[0], 0xCD, n)); CK(cudaMemset(ot[0], 0xCD, n));
                launch(vars[v], o[0], ot[0], tx, s.rows, s.cols, format, cur ? partials : nullptr, np, scale, amaxes + v, invs + v);
                // plain-only and transposed-only runs too
                CK(cudaMemset(o[1], 0xCD, n)); CK(cudaMemset(ot[1], 0xCD, n));
                launch(vars[v], o[1], nullptr, tx, s.rows, s.cols, format, cur ? partials : nullptr, np, scale, amaxes + 16 + v, invs + 16 + v);
                launch(vars[v], nullptr, ot[1], tx, s.rows, s.cols, format, cur ? partials : nullptr, np, scale, amaxes + 32 + v, invs + 32 + v);
                CK(cudaDeviceSynchronize());
                std::vector<unsigned char> a(n), b(n), c(n), d(n), e(n), f(n);
                CK(cudaMemcpy(a.data(), ref_o, n, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(b.data(), ref_ot, n, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(c.data(), o[0], n, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(d.data(), ot[0], n, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(e.data(), o[1], n, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(f.data(), ot[1], n, cudaMemcpyDeviceToHost));
                unsigned am[48]; float iv[48];
                CK(cudaMemcpy(am, amaxes, sizeof am, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(iv, invs, sizeof iv, cudaMemcpyDeviceToHost));
                bool ok = a == c && b == d && a == e && b == f && am[v] == am[0] && am[16 + v] == am[0] && am[32 + v] == am[0] &&
                          iv[v] == iv[0] && iv[16 + v] == iv[0] && iv[32 + v] == iv[0];
                ++checks;
                if (!ok) { ++fails; printf("MISMATCH %s %dx%d fmt %d cur %d (plain %d T %d amax %08x vs %08x)\n", vars[v].name, s.rows, s.cols, format, cur, a == c, b == d, am[v], am[0]); }
            }
        }
    }
    printf("bit-exact checks: %d, failures: %d\n", checks, fails);

    // ---- timing ----
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    const int ITERS = 24;
    auto time_it = [&](auto body) {
        for (int i = 0; i < 4; ++i) body(i % POOL);
        CK(cudaEventRecord(e0));
        for (int i = 0; i < ITERS; ++i) body(i % POOL);
        CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1)); CK(cudaGetLastError());
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); return ms * 1000.0f / ITERS;
    };
    {
        float us2 = time_it([&](int i) { copy16<<<p.multiProcessorCount * 8, 512>>>((uint4*)ot[i], (const uint4*)in[i], MAXE * 2 / 16); });
        printf("copy ceiling: 134 MB -> 134 MB: %.1f us, %.2f TB/s\n", us2, (MAXE * 4) / us2 / 1e6);
    }
    struct Use { int rows, cols, mode, count; const char* what; };  // mode 1 plain, 2 T, 3 both
    // Per step of the 0.91B model (16 layers), today's casts...
    Use today[] = {
        {8192, 2048, 1, 48, "x fwd (ln1, atty, ln2)"}, {8192, 8192, 1, 16, "x fwd (gelu)"},
        {6144, 2048, 1, 16, "w qkv"}, {2048, 2048, 1, 16, "w proj"}, {8192, 2048, 1, 16, "w fc"}, {2048, 8192, 1, 16, "w fcproj"},
        {8192, 6144, 3, 16, "dy qkv"}, {8192, 2048, 3, 32, "dy proj, fcproj"}, {8192, 8192, 3, 16, "dy fc"},
        {6144, 2048, 2, 16, "wT qkv"}, {2048, 2048, 2, 16, "wT proj"}, {8192, 2048, 2, 16, "wT fc"}, {2048, 8192, 2, 16, "wT fcproj"},
        {8192, 2048, 2, 48, "xT"}, {8192, 8192, 2, 16, "xT gelu"},
    };
    // ...and with x and w cast once into both layouts.
    Use stash[] = {
        {8192, 2048, 3, 48, "x fwd both"}, {8192, 8192, 3, 16, "x gelu both"},
        {6144, 2048, 3, 16, "w qkv both"}, {2048, 2048, 3, 16, "w proj both"}, {8192, 2048, 3, 16, "w fc both"}, {2048, 8192, 3, 16, "w fcproj both"},
        {8192, 6144, 3, 16, "dy qkv"}, {8192, 2048, 3, 32, "dy proj, fcproj"}, {8192, 8192, 3, 16, "dy fc"},
    };
    auto run_table = [&](const char* title, Use* uses, int nu) {
        printf("\n%s (us per cast, TB/s; per-step ms = sum count*us)\n", title);
        printf("%-22s %-11s %4s", "cast", "shape", "mode");
        for (int v = 0; v < NV; ++v) printf(" | %14s", vars[v].name);
        printf(" | bound@copy\n");
        std::vector<double> step(NV, 0.0); double bound_step = 0;
        double copy_tbs = 0;
        { float us = time_it([&](int i) { copy16<<<p.multiProcessorCount * 8, 512>>>((uint4*)ot[i], (const uint4*)in[i], MAXE * 2 / 16); }); copy_tbs = MAXE * 4 / us / 1e6; }
        for (int u = 0; u < nu; ++u) {
            const Use& s = uses[u];
            size_t n = (size_t)s.rows * s.cols;
            double bytes = n * (2.0 + (s.mode & 1) + ((s.mode >> 1) & 1));
            printf("%-22s %5dx%-5d %4s", s.what, s.rows, s.cols, s.mode == 1 ? "P" : s.mode == 2 ? "T" : "P+T");
            for (int v = 0; v < NV; ++v) {
                int fmt = strncmp(s.what, "dy", 2) == 0 ? 1 : 0;
                float us = time_it([&](int i) {
                    unsigned char* po = (s.mode & 1) ? o[i] : nullptr; unsigned char* pt = (s.mode & 2) ? ot[i] : nullptr;
                    if (v == 0) fp8_cast_bf16<<<dim3((s.cols + 63) / 64, (s.rows + 31) / 32), 256>>>(po, pt, in[i], s.rows, s.cols, fmt, 0, nullptr, 0, 64.0f, 0, amaxes, invs);
                    else launch(vars[v], po, pt, in[i], s.rows, s.cols, fmt, nullptr, 0, 64.0f, amaxes, invs);
                });
                step[v] += s.count * us / 1000.0;
                printf(" | %7.1f %5.2f", us, bytes / us / 1e6);
            }
            double bus = bytes / copy_tbs / 1e6; bound_step += s.count * bus / 1000.0;
            printf(" | %7.1f\n", bus);
        }
        printf("%-39s", "per step (ms)");
        for (int v = 0; v < NV; ++v) printf(" | %14.2f", step[v]);
        printf(" | %7.2f\n", bound_step);
    };
    run_table("TODAY's casts", today, sizeof(today) / sizeof(today[0]));
    run_table("STASHED (x, w both layouts once)", stash, sizeof(stash) / sizeof(stash[0]));

    // current scaling: partials + cast with partials, 8192x8192 both
    {
        int np = 1024;
        float a = time_it([&](int i) { fp8_amax_partial_bf16<<<np, 256>>>(partials, in[i], (long long)MAXE); });
        float b = time_it([&](int i) { launch(vars[1], o[i], ot[i], in[i], 8192, 8192, 0, partials, np, 1.0f, amaxes, invs); });
        float c = time_it([&](int i) { launch(vars[1], o[i], ot[i], in[i], 8192, 8192, 0, nullptr, 0, 64.0f, amaxes, invs); });
        printf("\ncurrent scaling 8192x8192 P+T: amax partials %.1f us, tiled cast reading partials %.1f us (fixed: %.1f us)\n", a, b, c);
    }
    CK(cudaDeviceSynchronize());
    printf("done\n");
    return fails != 0;
}
