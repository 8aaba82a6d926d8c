// The polar flash-attention kernels of the patched ggml-cuda run standalone, on random polar/polar3
// blocks: a GPU call of under a minute, where a llama.cpp CUDA build takes 5 min.
//   1. the vector kernel (fattn-vec.cuh): CTAs that take 2 or 4 query heads of a K/V head (heads_as_cols,
//      patch 0014) against one head a CTA, 4096 keys, 1 and 32 parallel blocks (combined here as
//      flash_attn_combine_results does). In session 9 it found why a CTA of 8 heads wrote +-inf (nvcc
//      dropped the statement after an `else #pragma unroll for` in the discarded branch of an if
//      constexpr; docs/results-cuda.md).
//   2. the tensor-core kernel (fattn-polar-mma.cuh, patch 0022) against the vector kernel's one head a
//      CTA, with and without attention sinks, and with the exact sink key (k0: key 0 from f32 values,
//      session 12; the case also fails when k0 leaves the vector kernel's result unchanged): values are
//      rounded to f16 for its products, so NMSE about 1e-6 is expected; a case fails above 1e-4.
//   2b. the row combine writing the output rotated by 64-value groups (patch 0027) against the plain
//      combine and fwht_cuda<64>'s operations on the host, bit for bit.
//   3. timing (CUDA events, 50 launches after 5, rotating over 8 copies of K/V so that they do not stay
//      in the 60 MB L2): each kernel with the parallel blocks launch_fattn chooses (its ggml_cuda_fattn_parallel_blocks), with the combine
//      kernel (the tensor-core kernel's merged by flash_attn_combine_results_rows, patch 0026, and also by
//      upstream's) and alone, at the shapes of SmolLM2-135M (head size 64, GQA 3) and Qwen2.5-1.5B (128,
//      GQA 6); the tensor-core kernel with 1, 2, 4 and 8 steps of 128 keys a CTA at least; also at 256
//      keys (a decode step at depth 0: one CTA a K/V head).
//   4. with --pb-sweep only: the tensor-core kernel's time for each count of parallel blocks that gives a
//      block 1-12 steps of keys at the fewest blocks, next to launch_fattn's choice (session 12).
//   5. with --profile only: a few launches for Nsight Compute (session 13).
//
//   T=<patched tree>/vendor/llama.cpp
//   scripts/ggml_cuda_nvcc.sh $T 90 -o fa_polar_harness scripts/fa_polar_harness.cu
//   ./fa_polar_harness      # exit status 1 when a result differs from the reference
//   ./fa_polar_harness --pb-sweep   # only 4. below: the tensor-core kernel's time by parallel blocks
//   ./fa_polar_harness --time-only  # only 3.
//
// scripts/gpu_run.sh checks builds and runs it.
#include "fattn-vec.cuh"
#include <cstdio>
#include <cstring>
#include <vector>
#include <random>
#include <cmath>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

enum kernel_kind { VEC1, VEC2, VEC4, MMA };
static const char * kind_name[] = { "vector, 1 head a CTA", "vector, 2 heads a CTA", "vector, 4 heads a CTA", "tensor cores" };

struct shape {
    int H, HKV, kv, nb11, nb21;
};

template <int D, ggml_type TK, ggml_type TV>
static fattn_kernel_t kernel_of(kernel_kind k) {
    switch (k) {
        case VEC1: return flash_attn_ext_vec<D, 1, TK, TV, false, false>;
        case VEC2: return flash_attn_ext_vec<D, 2, TK, TV, false, true>;
        case VEC4: return flash_attn_ext_vec<D, 4, TK, TV, false, true>;
        default:   return flash_attn_ext_polar_mma<D, TK, TV>;
    }
}

static int warps_of(kernel_kind k) { return k == MMA ? POLAR_FA_MMA_NWARPS : 4; }

static int cols_of(kernel_kind k) { return k == VEC1 ? 1 : k == VEC2 ? 2 : k == VEC4 ? 4 : POLAR_FA_MMA_ROWS; }

static dim3 grid_of(kernel_kind k, const shape & sh, int PB) {
    const int gqa = sh.H/sh.HKV;
    const int nt = (gqa + cols_of(k) - 1)/cols_of(k);
    return dim3(1, PB, k == VEC1 ? sh.H : nt*sh.HKV);
}

// parallel blocks as launch_fattn chooses them: its own function (patch 0032), with the occupancy and the
// grid of this launch; balancing the tensor-core kernel's steps of POLAR_FA_MMA_KT keys as launch_fattn does
// by default (GGML_CUDA_POLAR_FA_MMA_BALANCE), or not (g_balance false: the choice before it, for --pb-sweep)
static bool g_balance = true;
static int choose_pb(fattn_kernel_t kern, kernel_kind k, const shape & sh, int nbatch_fa) {
    int dev; CK(cudaGetDevice(&dev));
    int nsm; CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev));
    int mb = 1; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&mb, kern, warps_of(k)*WARP_SIZE, 0));
    const int ntiles_dst = grid_of(k, sh, 1).z, ntiles_KV = (sh.kv + nbatch_fa - 1)/nbatch_fa;
    return ggml_cuda_fattn_parallel_blocks(mb, nsm, ntiles_dst, ntiles_KV, sh.kv, k == MMA ? POLAR_FA_MMA_KT : 0,
                                           g_balance);
}

// the tensor-core kernel's partial results merged by flash_attn_combine_results_rows (patch 0026), as
// launch_fattn does, or (false) by upstream's flash_attn_combine_results
static bool g_combine_rows = true;

template <int D, ggml_type TK, ggml_type TV>
static void launch(kernel_kind k, const shape & sh, int PB, const char * Q, const char * K, const char * V, const char * M,
                   const float * sinks, float * dst, float2 * meta, float * out, bool combine = true, cudaStream_t st = 0,
                   const float * k0 = nullptr, float * rot_out = nullptr) {
    const float scale = 1.0f/sqrtf(D);
    kernel_of<D, TK, TV>(k)<<<grid_of(k, sh, PB), dim3(WARP_SIZE, warps_of(k), 1), 0, st>>>(Q, K, V, M, (const char *) sinks, k0, nullptr,
        PB > 1 ? dst : out, meta, scale, 0.0f, 1.0f, 1.0f, 1, 0.0f,
        D, init_fastdiv_values(1), sh.H, 1, D*4, D*4, D*4*sh.H,
        D, sh.kv, sh.HKV, 1, sh.nb11, sh.nb11*sh.kv, (int64_t) sh.nb11*sh.kv*sh.HKV,
        sh.nb21, sh.nb21*sh.kv, (int64_t) sh.nb21*sh.kv*sh.HKV,
        1, 1, 1, sh.kv*2, sh.kv*2, (int64_t) sh.kv*2);
    if (PB > 1 && combine) {
        if (k == MMA && g_combine_rows) { // as launch_fattn merges the tensor-core kernel's blocks
            // rot_out (patch 0027): the output rotated by 64-value groups into rot_out
            if (rot_out) {
                flash_attn_combine_results_rows<D, 8, 64><<<dim3(1, sh.H, 1), dim3(D, 8, 1), 0, st>>>(dst, meta, out, PB, rot_out, 1/sqrtf(64));
            } else {
                flash_attn_combine_results_rows<D, 8, 0><<<dim3(1, sh.H, 1), dim3(D, 8, 1), 0, st>>>(dst, meta, out, PB, nullptr, 0.0f);
            }
            return;
        }
        flash_attn_combine_results<D><<<dim3(1, sh.H, 1), dim3(D, 1, 1), PB*sizeof(float2), st>>>(dst, meta, out, PB);
    }
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
struct problem {
    static constexpr int fK = TK == GGML_TYPE_POLAR3 ? POLAR3_KERNEL_ID : POLAR_KERNEL_ID;
    static constexpr int fV = TV == GGML_TYPE_POLAR3 ? POLAR3_KERNEL_ID : POLAR_KERNEL_ID;
    shape sh;
    int ncopy;
    size_t kbytes, vbytes;
    char *dq, *dk, *dv, *dm; float * ds; float * dk0; float * dst; float2 * meta; float * out;
    problem(int H, int HKV, int kv, int ncopy_) : ncopy(ncopy_) {
        sh.H = H; sh.HKV = HKV; sh.kv = kv;
        sh.nb11 = (D/64)*polar_fmt<fK>::TYPE_SIZE;
        sh.nb21 = TV == GGML_TYPE_F16 ? D*2 : (D/64)*polar_fmt<fV>::TYPE_SIZE;
        std::mt19937 rng(1234);
        std::normal_distribution<float> n01;
        std::vector<float> q(D*H); for (auto & x : q) x = n01(rng);
        std::vector<unsigned char> k(size_t(sh.nb11)*kv*HKV), v(size_t(sh.nb21)*kv*HKV);
        fill_blocks(k, polar_fmt<fK>::TYPE_SIZE, rng);
        if (TV == GGML_TYPE_F16) { for (size_t i = 0; i + 2 <= v.size(); i += 2) { __half h = __float2half(n01(rng)*0.1f); memcpy(&v[i], &h, 2); } } else { fill_blocks(v, polar_fmt<fV>::TYPE_SIZE, rng); }
        std::vector<__half> m(kv); for (auto & x : m) x = __float2half(n01(rng)*0.5f);
        std::vector<float> s(H); for (auto & x : s) x = n01(rng) + 2.0f;
        std::vector<float> k0(D*HKV); for (auto & x : k0) x = 0.3f*n01(rng); // the exact sink key (k0)
        kbytes = (k.size() + 4095)/4096*4096; vbytes = (v.size() + 4095)/4096*4096;
        CK(cudaMalloc(&dq, q.size()*4)); CK(cudaMalloc(&dk, kbytes*ncopy)); CK(cudaMalloc(&dv, vbytes*ncopy));
        CK(cudaMalloc(&dm, m.size()*2 + 4096)); CK(cudaMalloc(&ds, H*4)); CK(cudaMalloc(&dk0, k0.size()*4));
        CK(cudaMemcpy(dk0, k0.data(), k0.size()*4, cudaMemcpyHostToDevice));
        for (int c = 0; c < ncopy; ++c) {
            CK(cudaMemcpy(dk + c*kbytes, k.data(), k.size(), cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dv + c*vbytes, v.data(), v.size(), cudaMemcpyHostToDevice));
        }
        CK(cudaMemcpy(dq, q.data(), q.size()*4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dm, m.data(), m.size()*2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(ds, s.data(), s.size()*4, cudaMemcpyHostToDevice));
        const size_t maxpb = kv/64 + 1;
        CK(cudaMalloc(&dst, sizeof(float)*D*H*maxpb)); CK(cudaMalloc(&meta, sizeof(float2)*H*maxpb));
        CK(cudaMalloc(&out, sizeof(float)*D*H));
    }
    ~problem() { cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dm); cudaFree(ds); cudaFree(dk0); cudaFree(dst); cudaFree(meta); cudaFree(out); }
    std::vector<float> run(kernel_kind k, int PB, bool sinks, bool k0 = false) {
        CK(cudaMemset(out, 0xFF, sizeof(float)*D*sh.H));
        launch<D, TK, TV>(k, sh, PB, dq, dk, dv, dm, sinks ? ds : nullptr, dst, meta, out, true, 0, k0 ? dk0 : nullptr);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        std::vector<float> r(D*sh.H);
        CK(cudaMemcpy(r.data(), out, sizeof(float)*r.size(), cudaMemcpyDeviceToHost));
        return r;
    }
    // the tensor-core kernel with the row combine writing the output rotated (patch 0027): the rotated
    // output
    std::vector<float> run_rot(int PB) {
        float * rot; CK(cudaMalloc(&rot, sizeof(float)*D*sh.H));
        CK(cudaMemset(rot, 0xFF, sizeof(float)*D*sh.H));
        launch<D, TK, TV>(MMA, sh, PB, dq, dk, dv, dm, nullptr, dst, meta, out, true, 0, nullptr, rot);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        std::vector<float> r(D*sh.H);
        CK(cudaMemcpy(r.data(), rot, sizeof(float)*r.size(), cudaMemcpyDeviceToHost));
        CK(cudaFree(rot));
        return r;
    }
    // us per op (kernel + combine, or the kernel alone), parallel blocks as launch_fattn chooses them
    // with nbatch_fa keys a block at least
    float time(kernel_kind k, int nbatch_fa, bool combine, int & PB) {
        PB = choose_pb(kernel_of<D, TK, TV>(k), k, sh, nbatch_fa);
        return time_pb(k, PB, combine);
    }
    float time_pb(kernel_kind k, int PB, bool combine) {
        cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
        const int nwarm = 5, nrun = 50;
        for (int i = 0; i < nwarm + nrun; ++i) {
            if (i == nwarm) CK(cudaEventRecord(e0));
            const int c = i % ncopy;
            launch<D, TK, TV>(k, sh, PB, dq, dk + c*kbytes, dv + c*vbytes, dm, nullptr, dst, meta, out, combine);
        }
        CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
        CK(cudaGetLastError());
        return 1000.0f*ms/nrun;
    }
};

static void compare(const std::vector<float> & ref, const std::vector<float> & r, double & nmse, int & bad, float tol) {
    double e = 0, n = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        n += ref[i]*ref[i];
        e += (r[i] - ref[i])*(r[i] - ref[i]);
        bad += !(fabsf(r[i] - ref[i]) <= tol*(1 + fabsf(ref[i])));
    }
    nmse = e/n;
}

// 1. packed vector CTAs against one head a CTA
template <int D, ggml_type TK, ggml_type TV>
static int check_packed(const char * name, int H, int HKV, int kv, int PB) {
    problem<D, TK, TV> p(H, HKV, kv, 1);
    auto ref = p.run(VEC1, PB, false);
    auto r2  = p.run(VEC2, PB, false);
    auto r4  = p.run(VEC4, PB, false);
    double e2, e4; int bad = 0;
    compare(ref, r2, e2, bad, 1e-3f);
    compare(ref, r4, e4, bad, 1e-3f);
    printf("packed %-14s D=%d H=%d HKV=%d kv=%d PB=%d: nmse2 %.3g nmse4 %.3g bad %d/%zu\n", name, D, H, HKV, kv, PB, e2, e4, bad, 2*ref.size());
    if (bad) {
        for (int h = 0; h < H; ++h) printf("  head %d ref %.5f r2 %.5f r4 %.5f\n", h, ref[h*D], r2[h*D], r4[h*D]);
    }
    return bad != 0;
}

// 2. the tensor-core kernel against the vector kernel (one head a CTA), also with the exact sink key
// (k0: key 0 from f32 values, which must change the result)
template <int D, ggml_type TK, ggml_type TV>
static int check_mma(const char * name, int H, int HKV, int kv, int PB, bool sinks, bool k0 = false) {
    problem<D, TK, TV> p(H, HKV, kv, 1);
    auto ref = p.run(VEC1, PB, sinks, k0);
    int fails = 0;
    if (k0) {
        double e; int bad = 0;
        compare(ref, p.run(VEC1, PB, sinks, false), e, bad, 0.0f);
        const bool fail = !(e > 1e-6);
        printf("k0     %-14s D=%d H=%d HKV=%d kv=%d PB=%d: nmse with k0 vs without %.3g%s\n", name, D, H, HKV, kv, PB, e, fail ? "  FAIL (k0 ignored)" : "");
        fails += fail;
    }
    {
        auto r = p.run(MMA, PB, sinks, k0);
        double e; int bad = 0;
        compare(ref, r, e, bad, 2e-2f);
        const bool fail = !(e <= 1e-4) || bad;
        printf("mma    %-14s D=%d H=%d HKV=%d kv=%d PB=%d sinks=%d k0=%d: nmse %.3g bad %d/%zu%s\n", name, D, H, HKV, kv, PB, sinks, k0, e, bad, ref.size(), fail ? "  FAIL" : "");
        if (fail) {
            for (int h = 0; h < H; ++h) printf("  head %d ref %.5f %.5f mma %.5f %.5f\n", h, ref[h*D], ref[h*D + 1], r[h*D], r[h*D + 1]);
        }
        fails += fail;
    }
    return fails != 0;
}

// 2b. (patch 0027) the row combine's rotated output against fwht_cuda<64>'s
// operations on the host (scale 1/8, butterflies of stride 1, 2, ..., 32: the lower element a + b, the upper
// partner - own), bit for bit
template <int D, ggml_type TK, ggml_type TV>
static int check_rot(const char * name, int H, int HKV, int kv, int PB) {
    problem<D, TK, TV> p(H, HKV, kv, 1);
    std::vector<float> ref = p.run(MMA, PB, false);
    const std::vector<float> r = p.run_rot(PB);
    for (size_t g = 0; g < ref.size(); g += 64) {
        float * v = &ref[g];
        for (int i = 0; i < 64; ++i) v[i] *= 1/sqrtf(64);
        for (int h = 1; h < 64; h *= 2) {
            for (int i = 0; i < 64; ++i) {
                if ((i & h) == 0) {
                    const float a = v[i], b = v[i + h];
                    v[i] = a + b;
                    v[i + h] = a - b;
                }
            }
        }
    }
    int bad = 0;
    for (size_t i = 0; i < ref.size(); ++i) bad += memcmp(&ref[i], &r[i], 4) != 0;
    printf("rot    %-14s D=%d H=%d HKV=%d kv=%d PB=%d: rotated combine vs combine + host fwht: %d/%zu differ%s\n", name, D, H, HKV, kv, PB, bad, ref.size(), bad ? "  FAIL" : "");
    return bad != 0;
}

// 3. timing: the vector kernel (1 and 4 heads a CTA, nbatch_fa = D as upstream) and the tensor-core
// kernel with at least 1, 2, 4 and 8 steps of 128 keys a CTA (GGML_CUDA_POLAR_FA_MMA_STEPS), with the
// combine kernel and without it
template <int D, ggml_type TK, ggml_type TV>
static void timing(const char * name, int H, int HKV, int kv) {
    problem<D, TK, TV> p(H, HKV, kv, 8);
    for (kernel_kind k : { VEC1, VEC4 }) {
        int PB; const float us = p.time(k, D, true, PB);
        int PB0; const float us0 = p.time(k, D, false, PB0);
        printf("time   %-14s D=%d H=%d HKV=%d kv=%d: %-24s %7.2f us, kernel alone %7.2f (PB %d)\n", name, D, H, HKV, kv, kind_name[k], us, us0, PB);
    }
    {
        const kernel_kind k = MMA;
        for (int steps : {1, 2, 4, 8}) {
            const int keys = steps*warps_of(k)*POLAR_FA_MMA_KW; // keys a CTA takes at least
            int PB; const float us = p.time(k, keys, true, PB);
            int PB0; const float us0 = p.time(k, keys, false, PB0);
            char what[64]; snprintf(what, sizeof(what), "%s, steps %d", kind_name[k], steps);
            g_combine_rows = false;
            int PB1; const float us1 = p.time(k, keys, true, PB1);
            g_combine_rows = true;
            printf("time   %-14s D=%d H=%d HKV=%d kv=%d: %-32s %7.2f us, kernel alone %7.2f, with upstream's combine %7.2f (PB %d)\n",
                   name, D, H, HKV, kv, what, us, us0, us1, PB);
        }
    }
}

// 4. --pb-sweep (session 12): the tensor-core kernel walks its keys in steps of POLAR_FA_MMA_KT, block y
// taking steps y, y + PB, ..., so a block does ceil(steps/PB) of them and the slowest block sets the time
// (at 32768 keys launch_fattn's PB 127 leaves 2 blocks 3 steps where the rest do 2). Each PB that gives
// a block w = 1..12 steps at the fewest blocks (PB = ceil(steps/w)), next to launch_fattn's choice for 1
// and 2 steps a CTA (before and after its balancing), with the combine kernel.
template <int D, ggml_type TK, ggml_type TV>
static void pb_sweep(const char * name, int H, int HKV, int kv) {
    problem<D, TK, TV> p(H, HKV, kv, 8);
    const int steps = (kv + POLAR_FA_MMA_KT - 1)/POLAR_FA_MMA_KT;
    for (int s : {1, 2}) {
        for (bool bal : {false, true}) {
            g_balance = bal;
            int PB; const float us = p.time(MMA, s*POLAR_FA_MMA_KT, true, PB);
            printf("pb     %-14s D=%d H=%d HKV=%d kv=%d: launch_fattn%s, steps %d: PB %3d (%d steps a block) %7.2f us\n",
                   name, D, H, HKV, kv, bal ? "" : " before balancing", s, PB, (steps + PB - 1)/PB, us);
        }
    }
    g_balance = true;
    int last = -1;
    for (int w = 1; w <= 12; ++w) {
        const int PB = (steps + w - 1)/w;
        if (PB == last || PB < 1) continue;
        last = PB;
        printf("pb     %-14s D=%d H=%d HKV=%d kv=%d: balanced: PB %3d (%d steps a block) %7.2f us\n",
               name, D, H, HKV, kv, PB, (steps + PB - 1)/PB, p.time_pb(MMA, PB, true));
    }
}

// 5. --profile: a few launches of the tensor-core kernel on Qwen2.5-1.5B's shape (256 keys, one CTA a K/V
// head; 32768 keys, launch_fattn's blocks for 2 steps a CTA), on SmolLM2's at 16384 keys, and of the vector
// kernel at 256 keys, for
// Nsight Compute (`ncu -k regex:flash_attn_ext ... fa_polar_harness --profile`; session 13)
static void profile_launches() {
    for (int kv : {256, 32768}) {
        problem<128, GGML_TYPE_POLAR, GGML_TYPE_POLAR> p(12, 2, kv, 1);
        int PB = choose_pb(kernel_of<128, GGML_TYPE_POLAR, GGML_TYPE_POLAR>(MMA), MMA, p.sh, 2*POLAR_FA_MMA_KT);
        for (int i = 0; i < 2; ++i) {
            p.run(MMA, PB, false);
        }
        if (kv == 256) {
            p.run(VEC1, 2, false);
        }
        printf("profile kv=%d: tensor-core kernel with PB %d\n", kv, PB);
    }
    { // SmolLM2's shape at issue 10's depth (head size 64, GQA 3, 16384 keys; session 18)
        problem<64, GGML_TYPE_POLAR, GGML_TYPE_POLAR> p(9, 3, 16384, 1);
        int PB = choose_pb(kernel_of<64, GGML_TYPE_POLAR, GGML_TYPE_POLAR>(MMA), MMA, p.sh, 2*POLAR_FA_MMA_KT);
        for (int i = 0; i < 2; ++i) {
            p.run(MMA, PB, false);
        }
        printf("profile D=64 kv=16384: tensor-core kernel with PB %d\n", PB);
    }
}

int main(int argc, char ** argv) {
    if (argc > 1 && strcmp(argv[1], "--profile") == 0) {
        profile_launches();
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "--pb-sweep") == 0) {
        for (int kv : {4096, 16384, 32768}) {
            pb_sweep< 64, GGML_TYPE_POLAR, GGML_TYPE_POLAR>("polar/polar",  9, 3, kv);
            pb_sweep<128, GGML_TYPE_POLAR, GGML_TYPE_POLAR>("polar/polar", 12, 2, kv);
        }
        return 0;
    }
    const bool time_only = argc > 1 && strcmp(argv[1], "--time-only") == 0;
    int fails = 0;
    if (!time_only) { // 1. and 2.
        for (int PB : {1, 32}) {
            fails += check_packed< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    9, 3, 4096, PB); // SmolLM2, GQA 3
            fails += check_packed<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    4, 2, 4096, PB);
            fails += check_packed<128, GGML_TYPE_POLAR3, GGML_TYPE_POLAR3>("polar3/polar3",  4, 1, 4096, PB);
            fails += check_packed<128, GGML_TYPE_POLAR,  GGML_TYPE_F16   >("polar/f16",      4, 2, 4096, PB);
        }
        for (int PB : {1, 32}) {
            for (bool sinks : {false, true}) {
                fails += check_mma< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    9, 3, 4096, PB, sinks); // SmolLM2
                fails += check_mma<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",   12, 2, 4096, PB, sinks); // Qwen2.5-1.5B
                fails += check_mma<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",   40, 2, 4096, PB, sinks); // GQA 20: 2 tiles
                fails += check_mma< 64, GGML_TYPE_POLAR3, GGML_TYPE_POLAR3>("polar3/polar3", 16, 2, 4096, PB, sinks);
                fails += check_mma<128, GGML_TYPE_POLAR3, GGML_TYPE_POLAR3>("polar3/polar3",  8, 4, 4096, PB, sinks);
                fails += check_mma<128, GGML_TYPE_POLAR,  GGML_TYPE_F16   >("polar/f16",     12, 2, 4096, PB, sinks);
                fails += check_mma< 64, GGML_TYPE_POLAR,  GGML_TYPE_F16   >("polar/f16",      6, 3, 4096, PB, sinks);
                fails += check_mma< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR3>("polar/polar3",  24, 2, 4096, PB, sinks);
                fails += check_mma<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR3>("polar/polar3",  12, 2, 4096, PB, sinks);
            }
            fails += check_mma< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    9, 3, 4096, PB, false, true);
            fails += check_mma<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",   12, 2, 4096, PB, true,  true);
            fails += check_mma<128, GGML_TYPE_POLAR3, GGML_TYPE_POLAR3>("polar3/polar3",  8, 4, 4096, PB, false, true);
            fails += check_mma<128, GGML_TYPE_POLAR,  GGML_TYPE_F16   >("polar/f16",     12, 2, 4096, PB, false, true);
        }
        // 2b. (patch 0027; nothing on an older tree)
        for (int PB : {2, 32, 127, 160}) { // (160: more blocks than the combine's loads at once take)
            fails += check_rot< 64, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",    9, 3, 32768, PB);
            fails += check_rot<128, GGML_TYPE_POLAR,  GGML_TYPE_POLAR >("polar/polar",   12, 2, 32768, PB);
            fails += check_rot<128, GGML_TYPE_POLAR3, GGML_TYPE_POLAR3>("polar3/polar3",  8, 4, 32768, PB);
            fails += check_rot<128, GGML_TYPE_POLAR,  GGML_TYPE_F16   >("polar/f16",     12, 2, 32768, PB);
        }
    }
    if (argc < 2 || strcmp(argv[1], "--no-time") != 0) {
        for (int kv : {256, 4096, 16384, 32768}) {
            timing< 64, GGML_TYPE_POLAR, GGML_TYPE_POLAR >("polar/polar",  9, 3, kv);
            timing<128, GGML_TYPE_POLAR, GGML_TYPE_POLAR >("polar/polar", 12, 2, kv);
            timing<128, GGML_TYPE_POLAR, GGML_TYPE_POLAR3>("polar/polar3", 12, 2, kv);
            timing<128, GGML_TYPE_POLAR, GGML_TYPE_F16   >("polar/f16",   12, 2, kv);
        }
    }
    printf("harness: %d failing\n", fails);
    return fails != 0;
}
