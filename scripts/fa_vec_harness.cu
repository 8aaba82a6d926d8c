// The polar vector flash-attention kernel of the patched ggml-cuda (fattn-vec.cuh), run standalone:
// the CTAs that take 2 or 4 query heads of a K/V head (heads_as_cols, patch 0014) against one head a
// CTA, on random polar/polar3 blocks, 4096 keys, with 1 and 32 parallel blocks (the partial results
// combined here as flash_attn_combine_results does). A GPU call of 40 s, where a llama.cpp CUDA build
// takes 5 min: in session 9 it found why a CTA of 8 heads wrote +-inf (nvcc dropped the statement
// after an `else #pragma unroll for` in the discarded branch of an if constexpr; docs/results-cuda.md).
//
//   T=<patched tree>/vendor/llama.cpp
//   nvcc -std=c++17 -arch=sm_90 -O3 -use_fast_math -extended-lambda -DGGML_USE_CUDA -DNDEBUG \
//        -I$T/ggml/include -I$T/ggml/src -I$T/ggml/src/ggml-cuda -o fa_vec_harness scripts/fa_vec_harness.cu
//   ./fa_vec_harness        # exit status 1 when a packed output differs from the reference
//
// scripts/gpu_run.sh checks builds and runs it. Output: NMSE of the 2- and 4-head results against one
// head a CTA (float order differs: about 1e-13), and per head where a value differs by more than 1e-3.
#include "fattn-vec.cuh"
#include <cstdio>
#include <vector>
#include <random>
#include <cmath>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

template <int D, int ncols, ggml_type TK, ggml_type TV, bool hac>
static std::vector<float> run(const char * Q, const char * K, const char * V, const char * M, int H, int HKV, int kv, int PB,
                              int nb11, int nb21) {
    const int gqa = H/HKV;
    const int ntiles_gqa = hac ? (gqa + ncols - 1)/ncols : 1;
    dim3 grid(1, PB, hac ? ntiles_gqa*HKV : H);
    dim3 block(WARP_SIZE, 4, 1);
    float * dst; float2 * meta;
    CK(cudaMalloc(&dst, sizeof(float)*D*H*PB));
    CK(cudaMalloc(&meta, sizeof(float2)*H*PB));
    CK(cudaMemset(dst, 0xFF, sizeof(float)*D*H*PB));
    CK(cudaMemset(meta, 0xFF, sizeof(float2)*H*PB));
    const float scale = 1.0f/sqrtf(D);
    flash_attn_ext_vec<D, ncols, TK, TV, false, hac><<<grid, block>>>(Q, K, V, M, nullptr, nullptr, dst, meta,
        scale, 0.0f, 1.0f, 1.0f, 1, 0.0f,
        D, init_fastdiv_values(1), H, 1, D*4, D*4, D*4*H,
        D, kv, HKV, 1, nb11, nb11*kv, (int64_t) nb11*kv*HKV,
        nb21, nb21*kv, (int64_t) nb21*kv*HKV,
        1, 1, 1, kv*2, kv*2, (int64_t) kv*2);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<float> out(D*H*PB);
    CK(cudaMemcpy(out.data(), dst, sizeof(float)*out.size(), cudaMemcpyDeviceToHost));
    if (PB > 1) { // combine as flash_attn_combine_results
        std::vector<float2> mt(H*PB);
        CK(cudaMemcpy(mt.data(), meta, sizeof(float2)*H*PB, cudaMemcpyDeviceToHost));
        std::vector<float> res(D*H);
        for (int h = 0; h < H; ++h) {
            float mx = -INFINITY; for (int b = 0; b < PB; ++b) mx = fmaxf(mx, mt[h*PB+b].x);
            double den = 0; for (int b = 0; b < PB; ++b) den += expf(mt[h*PB+b].x - mx)*mt[h*PB+b].y;
            for (int i = 0; i < D; ++i) { double num = 0; for (int b = 0; b < PB; ++b) num += expf(mt[h*PB+b].x - mx)*out[(h*PB+b)*D+i]; res[h*D+i] = num/den; }
        }
        out = res;
    }
    cudaFree(dst); cudaFree(meta);
    return out;
}

static void fill_blocks(std::vector<unsigned char> & b, int TS, std::mt19937 & rng) {
    std::uniform_int_distribution<int> u(0, 255);
    for (size_t i = 0; i < b.size(); ++i) b[i] = u(rng);
    for (size_t o = 0; o + TS <= b.size(); o += TS) { // scale: f16 in [0.05, 0.2]
        __half h = __float2half(0.05f + 0.15f*(u(rng)/255.0f));
        memcpy(&b[o], &h, 2);
    }
}

template <int D, ggml_type TK, ggml_type TV>
static int check(const char * name, int H, int HKV, int kv, int PB) {
    constexpr int fK = TK == GGML_TYPE_POLAR3 ? POLAR3_KERNEL_ID : POLAR_KERNEL_ID;
    constexpr int fV = TV == GGML_TYPE_POLAR3 ? POLAR3_KERNEL_ID : POLAR_KERNEL_ID;
    const int nb11 = (D/64)*polar_fmt<fK>::TYPE_SIZE, nb21 = TV == GGML_TYPE_F16 ? D*2 : (D/64)*polar_fmt<fV>::TYPE_SIZE;
    std::mt19937 rng(1234);
    std::normal_distribution<float> n01;
    std::vector<float> q(D*H); for (auto & x : q) x = n01(rng);
    std::vector<unsigned char> k(size_t(nb11)*kv*HKV), v(size_t(nb21)*kv*HKV);
    fill_blocks(k, polar_fmt<fK>::TYPE_SIZE, rng);
    if (TV == GGML_TYPE_F16) { for (size_t i = 0; i + 2 <= v.size(); i += 2) { __half h = __float2half(n01(rng)*0.1f); memcpy(&v[i], &h, 2); } } else { fill_blocks(v, polar_fmt<fV>::TYPE_SIZE, rng); }
    std::vector<__half> m(kv); for (auto & x : m) x = __float2half(n01(rng)*0.5f);
    char *dq, *dk, *dv, *dm;
    CK(cudaMalloc(&dq, q.size()*4)); CK(cudaMalloc(&dk, k.size() + 4096)); CK(cudaMalloc(&dv, v.size() + 4096)); CK(cudaMalloc(&dm, m.size()*2 + 4096));
    CK(cudaMemcpy(dq, q.data(), q.size()*4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dk, k.data(), k.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, v.data(), v.size(), cudaMemcpyHostToDevice)); CK(cudaMemcpy(dm, m.data(), m.size()*2, cudaMemcpyHostToDevice));
    auto ref = run<D, 1, TK, TV, false>(dq, dk, dv, dm, H, HKV, kv, PB, nb11, nb21);
    auto r2  = run<D, 2, TK, TV, true >(dq, dk, dv, dm, H, HKV, kv, PB, nb11, nb21);
    auto r4  = run<D, 4, TK, TV, true >(dq, dk, dv, dm, H, HKV, kv, PB, nb11, nb21);
    double e2 = 0, e4 = 0, n = 0;
    int bad = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        n  += ref[i]*ref[i];
        e2 += (r2[i]-ref[i])*(r2[i]-ref[i]);
        e4 += (r4[i]-ref[i])*(r4[i]-ref[i]);
        for (float r : { r2[i], r4[i] }) {
            bad += !(fabsf(r - ref[i]) <= 1e-3f*(1 + fabsf(ref[i])));
        }
    }
    printf("%-16s D=%d H=%d HKV=%d kv=%d PB=%d: nmse2 %.3g nmse4 %.3g bad %d/%zu\n", name, D, H, HKV, kv, PB, e2/n, e4/n, bad, 2*ref.size());
    if (bad) {
        for (int h = 0; h < H; ++h) {
            printf("  head %d ref %.5f r2 %.5f r4 %.5f\n", h, ref[h*D], r2[h*D], r4[h*D]);
        }
    }
    cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dm);
    return bad != 0;
}

int main() {
    int fails = 0;
    for (int PB : {1, 32}) {
        fails += check< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    9, 3, 4096, PB); // SmolLM2, GQA 3
        fails += check<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    4, 2, 4096, PB);
        fails += check<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",   12, 2, 4096, PB); // Qwen2.5-1.5B
        fails += check< 64, GGML_TYPE_POLAR3, GGML_TYPE_POLAR3>("polar3/polar3", 16, 2, 4096, PB);
        fails += check<128, GGML_TYPE_POLAR,  GGML_TYPE_F16   >("polar/f16",     12, 2, 4096, PB);
        fails += check< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR3>("polar/polar3",  24, 2, 4096, PB);
    }
    printf("harness: %d failing\n", fails);
    return fails != 0;
}
