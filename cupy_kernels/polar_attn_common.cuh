// Device helpers of the split-K decode attention kernels (flash-decoding): polar_attn_simt.cu
// and polar_attn_mma.cu write partials over chunks of keys, polar_attn_combine.cu merges them.
//
//   q      [B][Hq][Tq][HD]                 float32 / float16 / bfloat16 (element strides)
//   k, v   [B][Hkv][T_max][NB][TYPE_SIZE]  polar / polar3 blocks (or a registered codebook in
//                                          one of their layouts), NB = HD / 64
//   v      [B][Hkv][T_max][HD] float16     (VFMT == F16_KERNEL_ID)
//   lens   [B] int32: keys 0 .. lens[b]-1 are valid; query tq of Tq sits at lens[b] - Tq + tq
//          (causal within the tail)
//
// Both partial kernels take the same arguments (POLAR_ATTN_PARAMS) on the grid (n_splits, row
// groups, B * Hkv): the R = (Hq / Hkv) * Tq query rows of one KV head share every K/V byte read,
// one CTA takes RB of them and one chunk of keys, and writes float32 partials per (row, split):
//   o_part [B * Hkv][R][n_splits][HD]  sum_t 2^(s_t - m) v_t,   m_part, l_part [B * Hkv][R][n_splits]
// (m = the running max of the scores s in log2 units, l = sum_t 2^(s_t - m)); polar_attn_combine
// merges the splits.
//
// Compile-time constants (#defines from cupy_kernels.attention): HD, KFMT, VFMT (POLAR_KERNEL_ID,
// POLAR3_KERNEL_ID of ggml-polar-format.h or F16_KERNEL_ID), KTS, VTS, KNC, VNC, RB, NWARPS, QT;
// the combine kernel takes HD only.
#pragma once

#include "polar_common.cuh"

#define F16_KERNEL_ID 3  // VFMT of float16 V (cupy_kernels.attention.F16_KERNEL_ID)

#define NB (HD / 64)
#define NTHREADS (NWARPS * 32)
#define KROW (NB * KTS)
#define VQUANT (VFMT != F16_KERNEL_ID)
#define VROW (VQUANT ? NB * VTS : HD * 2)
#define NEG_INF (__int_as_float(0xff800000))
#define ALIGN16(x) (((x) + 15) / 16 * 16)

static_assert(HD % 64 == 0, "head dim must be a multiple of 64");

// The arguments of polar_attn_simt and polar_attn_mma (cupy_kernels.attention.run passes them).
#define POLAR_ATTN_PARAMS                                                                              \
    const void * __restrict__ q, long long sqb, long long sqh, long long sqt, const u8 * __restrict__ kc, \
        const u8 * __restrict__ vc, const float2 * __restrict__ ktab_g, const float2 * __restrict__ vtab_g, \
        const int * __restrict__ lens, int Hkv, int G, int Tq, int T_max, int chunk, float scale_log2,       \
        float * __restrict__ o_part, float * __restrict__ m_part, float * __restrict__ l_part

__device__ __forceinline__ u32 smem_u32(const void * p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void * src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

#ifdef QT
// element i of q (QT: 0 float32, 1 float16, 2 bfloat16) as float32
__device__ __forceinline__ float load_q(const void * q, long long i) {
#if QT == 0
    return reinterpret_cast<const float *>(q)[i];
#elif QT == 1
    return h2f(reinterpret_cast<const u16 *>(q)[i]);
#else
    return bf2f(reinterpret_cast<const u16 *>(q)[i]);
#endif
}
#endif

__device__ __forceinline__ u16 lds_u16(const u8 * base, u32 off) { return *reinterpret_cast<const u16 *>(base + off); }

// One V unit's 4 codes (pairs 4qd .. 4qd+3 of block j) of the key at byte offset `row`.
template <int FMT> __device__ __forceinline__ u32 v_quad(const u8 * vst, u32 row, int j, int qd);
template <> __device__ __forceinline__ u32 v_quad<POLAR_KERNEL_ID>(const u8 * vst, u32 row, int j, int qd) {
    return lds_u32_a2(vst, row + j * VTS + 2 + 4 * qd);
}
template <> __device__ __forceinline__ u32 v_quad<POLAR3_KERNEL_ID>(const u8 * vst, u32 row, int j, int qd) {
    const u32 qsw = lds_u32_a2(vst, row + j * VTS + 2 + 4 * (qd & 3));
    const u32 qhw = lds_u32_a2(vst, row + j * VTS + 18 + 4 * (qd & 1));
    return ((qsw >> (4 * (qd >> 2))) & 0x0F0F0F0Fu) | (((qhw >> (2 * (qd >> 1))) & 0x03030303u) << 4);
}

// The CTA's place in the grid (split = blockIdx.x, first row r0 = blockIdx.y * RB, z = blockIdx.z
// = b * Hkv + hkv), its rows' shape (R = G * Tq rows per KV head, nspl splits) and its keys
// c0 .. c1 - 1 (chunk `split` of the len = lens[b] valid keys).
struct attn_cta {
    int split, r0, z, b, hkv, R, nspl, len, c0, c1, G, Tq;

    // index of the (row r0 + r, split) partial in m_part / l_part (times HD in o_part)
    __device__ __forceinline__ long long part(int r) const { return (long long) (z * R + r0 + r) * nspl + split; }

    // causal limit of row rr < R in this chunk: key t is visible to the row iff t < limit(rr)
    __device__ __forceinline__ int limit(int rr) const { return min(c1, len - Tq + (rr % Tq) + 1); }

    // element offset of row rr of q (head hkv * G + rr / Tq, token rr % Tq)
    __device__ __forceinline__ long long q_row(int rr, long long sqb, long long sqh, long long sqt) const {
        const int hq = hkv * G + rr / Tq;
        return (long long) b * sqb + (long long) hq * sqh + (long long) (rr % Tq) * sqt;
    }
};

__device__ __forceinline__ attn_cta attn_cta_get(const int * __restrict__ lens, int Hkv, int G, int Tq, int chunk) {
    attn_cta t;
    t.split = blockIdx.x;
    t.r0    = blockIdx.y * RB;
    t.z     = blockIdx.z;
    t.b     = t.z / Hkv;
    t.hkv   = t.z % Hkv;
    t.R     = G * Tq;
    t.nspl  = gridDim.x;
    t.len   = lens[t.b];
    t.c0    = t.split * chunk;
    t.c1    = min(t.c0 + chunk, t.len);
    t.G     = G;
    t.Tq    = Tq;
    return t;
}

// An empty chunk (c0 >= c1): neutral partials o = 0, m = -inf, l = 0 for the CTA's rows.
__device__ __forceinline__ void attn_write_empty(const attn_cta & cta, int tid, float * __restrict__ o_part,
                                                 float * __restrict__ m_part, float * __restrict__ l_part) {
    for (int e = tid; e < RB * HD; e += NTHREADS) {
        const int r = e / HD;
        if (cta.r0 + r < cta.R) {
            o_part[cta.part(r) * HD + e % HD] = 0.0f;
        }
    }
    if (tid < RB && cta.r0 + tid < cta.R) {
        m_part[cta.part(tid)] = NEG_INF;
        l_part[cta.part(tid)] = 0.0f;
    }
}
