// Shared definitions of the CuPy kernels: half/bfloat16 conversions and byte-level readers of
// blocks in shared memory. The block structs come from the generated ggml-polar-format.h.
//
// Compiled by NVRTC through cupy_kernels.loader, which passes -I<repo>/cupy_kernels and
// -I<kvpolar>/csrc (the generated ggml-polar-format.h) and prepends the compile-time
// constants of the kernel variant as #defines. No CUDA headers are needed: the conversions are
// single PTX instructions.
#pragma once

#include "ggml-polar-format.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// Byte layout: block_polar (34 bytes) and block_polar3 (26 bytes) in ggml-polar-format.h.
// polar3 code of pair i (6 bits): (qs[i % 16] >> 4 * (i / 16)) & 15 | ((qh[i % 8] >> 2 * (i / 8)) & 3) << 4
// A registered format (cupy_kernels.formats) uses one of these layouts with its own codebook, e.g.
//   the paper-B preset (scripts/study/paperb_kernel_ref.py): polar's, with qs[p] = angle index
//   (high nibble) << 4 | radius index (low nibble) and d = fp16 block radius max.
static_assert(POLAR_KERNEL_ID == 0 && POLAR3_KERNEL_ID == 1, "FMT 0 is polar and 1 is polar3 in the kernels");

#define POLAR_QK 64
#define POLAR_PAIRS 32

// ---- conversions (round to nearest even, subnormals kept, like numpy's astype) -------------

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32) b) << 16); }

__device__ __forceinline__ u16 f2bf(float f) {
    u16 b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}

// Element i of an output of type OT (0 float32, 1 float16, 2 bfloat16) set to v rounded to nearest: the final
// rows of the attention kernels (polar_attn_combine's argument OT; polar_attn_mma's OUT_TYPE, a constant).
__device__ __forceinline__ void store_out(void * out, long long i, float v, int OT) {
    if (OT == 0) {
        reinterpret_cast<float *>(out)[i] = v;
    } else if (OT == 1) {
        reinterpret_cast<u16 *>(out)[i] = f2h(v);
    } else {
        reinterpret_cast<u16 *>(out)[i] = f2bf(v);
    }
}

// Input element types of the encoder (converted to float32 exactly).
struct in_f32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float * p) { return *p; }
};
struct in_f16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const u16 * p) { return h2f(*p); }
};
struct in_bf16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const u16 * p) { return bf2f(*p); }
};

// ---- readers of blocks held in shared memory ------------------------------------------------

__device__ __forceinline__ u32 lds_u32(const u8 * base, u32 off) {
    return *reinterpret_cast<const u32 *>(base + off);
}

// The 4 bytes at base + off for any off that is 2-byte aligned (blocks are 34 or 26 bytes, so
// a block's qs is 4-byte aligned or 2 bytes off): two aligned loads and a funnel shift.
__device__ __forceinline__ u32 lds_u32_a2(const u8 * base, u32 off) {
    const u32 a  = off & ~3u;
    const u32 sh = (off & 3u) * 8u;
    const u32 lo = lds_u32(base, a);
    const u32 hi = lds_u32(base, a + 4);
    return __funnelshift_r(lo, hi, sh);
}

// n consecutive words starting at a 2-byte aligned offset (n + 1 aligned loads).
template <int N> __device__ __forceinline__ void lds_words_a2(const u8 * base, u32 off, u32 (&w)[N]) {
    const u32 a  = off & ~3u;
    const u32 sh = (off & 3u) * 8u;
    u32 raw[N + 1];
#pragma unroll
    for (int i = 0; i <= N; ++i) {
        raw[i] = lds_u32(base, a + 4 * i);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        w[i] = __funnelshift_r(raw[i], raw[i + 1], sh);
    }
}

__device__ __forceinline__ u32 bfe(u32 v, u32 pos, u32 len) {
    u32 r;
    asm("bfe.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(pos), "r"(len));
    return r;
}

// polar3: the 4 codes of pairs 4q .. 4q+3 (q = 0..7) packed in the bytes of a u32, from the
// four qs words and two qh words of a block.
__device__ __forceinline__ u32 polar3_quad(const u32 (&qs)[4], const u32 (&qh)[2], int q) {
    const u32 lo = (qs[q & 3] >> (4 * (q >> 2))) & 0x0F0F0F0Fu;
    const u32 hi = (qh[q & 1] >> (2 * (q >> 1))) & 0x03030303u;
    return lo | (hi << 4);
}
