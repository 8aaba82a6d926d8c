// Polar block codec on the device (docs/FORMAT.md), written once for the CuPy kernels (NVRTC)
// and ggml-cuda (nvcc; the set-up copies this file to ggml/src/ggml-cuda/polar_block.cuh).
// No standard headers; the block structs, ids and tables come from the generated
// ggml-polar-format.h.
//
// Bit-exact with kvpolar.codec.quantize_blocks and quantize_row_polar_ref whatever the compiler
// flags: every float32 operation of the encoder is an inline PTX instruction with an explicit
// rounding mode and no .ftz (mul.rn/add.rn/sub.rn are never fused into an FMA; div.rn and
// sqrt.rn are IEEE), so ggml-cuda's -use_fast_math (ftz, approximate division, contraction) and
// NVRTC's --fmad=false give the same bytes. Non-negative floats (distances, errors) are compared
// as their bit patterns, which orders them exactly without any flush of subnormals. atan2f only
// selects candidates (both angular neighbours on every ring): any atan2 accurate to well below
// half the finest angular step gives the same codes.
//
// Encoder shape: one warp per 64-value block, lane p holds pair p (x[2p], x[2p+1]); the NW
// warps of a CTA may share one block, warp w trying the scale candidates k = w, w + NW, ...
// (polar_encode_block). tree32 of FORMAT.md is the xor butterfly: lane i adds v[i ^ h] for
// h = 16..1, which for i < h is numpy's v[i] + v[i + h]; float addition being commutative, every
// lane ends with the bits of numpy's v[0].
#pragma once

#include "ggml-polar-format.h"

#define POLAR_BLOCK_PAIRS 32
#define POLAR_FULL_MASK 0xffffffffu

static_assert(QK_POLAR == 2 * POLAR_BLOCK_PAIRS && QK_POLAR3 == 2 * POLAR_BLOCK_PAIRS, "a block holds 32 pairs");
static_assert(POLAR_KERNEL_ID == 0 && POLAR3_KERNEL_ID == 1, "FMT 0 is polar and 1 is polar3");

// ---- float32 arithmetic that no compiler flag changes ----------------------------------------

__device__ __forceinline__ float polar_fmul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float polar_fadd(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float polar_fsub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float polar_fdiv(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float polar_fsqrt(float a) {
    float r;
    asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}

__device__ __forceinline__ float polar_fmin(float a, float b) {
    float r;
    asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float polar_fmax(float a, float b) {
    float r;
    asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// binary16 bits <-> float32, round to nearest even, subnormals kept (numpy's astype)
__device__ __forceinline__ float polar_h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short polar_f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// a < b for a, b >= +0 (or +inf): the bit patterns of non-negative floats are ordered like them
__device__ __forceinline__ bool polar_lt_nonneg(float a, float b) { return __float_as_uint(a) < __float_as_uint(b); }

// ---- format traits and tables ---------------------------------------------------------------

template <int FMT> struct polar_fmt;

template <> struct polar_fmt<POLAR_KERNEL_ID> {
    enum { NCODES = POLAR_NCODES, NRINGS = POLAR_NRINGS, NCAND = POLAR_NCAND, NREFINE = POLAR_NREFINE,
           TYPE_SIZE = POLAR_TYPE_SIZE };
    typedef block_polar block;
};

template <> struct polar_fmt<POLAR3_KERNEL_ID> {
    enum { NCODES = POLAR3_NCODES, NRINGS = POLAR3_NRINGS, NCAND = POLAR3_NCAND, NREFINE = POLAR3_NREFINE,
           TYPE_SIZE = POLAR3_TYPE_SIZE };
    typedef block_polar3 block;
};

// Encoder constants (read warp-uniformly: constant memory) and the codebooks, which kernels copy
// into shared memory (polar_load_codebook) or read from global memory (polar_cx / polar_cy).
static __constant__ int   polar_c_ring_n[POLAR_NRINGS]       = POLAR_RING_N_INIT;
static __constant__ int   polar_c_ring_off[POLAR_NRINGS]     = POLAR_RING_OFF_INIT;
static __constant__ float polar_c_ring_phi[POLAR_NRINGS]     = POLAR_RING_PHI_INIT;
static __constant__ float polar_c_ring_istep[POLAR_NRINGS]   = POLAR_RING_ISTEP_INIT;
static __constant__ float polar_c_g[POLAR_NCAND]             = POLAR_G_INIT;
static __constant__ int   polar3_c_ring_n[POLAR3_NRINGS]     = POLAR3_RING_N_INIT;
static __constant__ int   polar3_c_ring_off[POLAR3_NRINGS]   = POLAR3_RING_OFF_INIT;
static __constant__ float polar3_c_ring_phi[POLAR3_NRINGS]   = POLAR3_RING_PHI_INIT;
static __constant__ float polar3_c_ring_istep[POLAR3_NRINGS] = POLAR3_RING_ISTEP_INIT;
static __constant__ float polar3_c_g[POLAR3_NCAND]           = POLAR3_G_INIT;
static __device__ const float polar_g_cx[POLAR_NCODES]       = POLAR_CX_INIT;
static __device__ const float polar_g_cy[POLAR_NCODES]       = POLAR_CY_INIT;
static __device__ const float polar3_g_cx[POLAR3_NCODES]     = POLAR3_CX_INIT;
static __device__ const float polar3_g_cy[POLAR3_NCODES]     = POLAR3_CY_INIT;

template <int FMT> struct polar_tab;

template <> struct polar_tab<POLAR_KERNEL_ID> {
    static __device__ __forceinline__ float cx(int c) { return polar_g_cx[c]; }
    static __device__ __forceinline__ float cy(int c) { return polar_g_cy[c]; }
    static __device__ __forceinline__ int   ring_n(int j) { return polar_c_ring_n[j]; }
    static __device__ __forceinline__ int   ring_off(int j) { return polar_c_ring_off[j]; }
    static __device__ __forceinline__ float ring_phi(int j) { return polar_c_ring_phi[j]; }
    static __device__ __forceinline__ float ring_istep(int j) { return polar_c_ring_istep[j]; }
    static __device__ __forceinline__ float g(int k) { return polar_c_g[k]; }
};

template <> struct polar_tab<POLAR3_KERNEL_ID> {
    static __device__ __forceinline__ float cx(int c) { return polar3_g_cx[c]; }
    static __device__ __forceinline__ float cy(int c) { return polar3_g_cy[c]; }
    static __device__ __forceinline__ int   ring_n(int j) { return polar3_c_ring_n[j]; }
    static __device__ __forceinline__ int   ring_off(int j) { return polar3_c_ring_off[j]; }
    static __device__ __forceinline__ float ring_phi(int j) { return polar3_c_ring_phi[j]; }
    static __device__ __forceinline__ float ring_istep(int j) { return polar3_c_ring_istep[j]; }
    static __device__ __forceinline__ float g(int k) { return polar3_c_g[k]; }
};

// tab[r * REPL + j] = (CX[r], CY[r]) for r < NCODES, j < REPL: the codebook, REPL copies side by
// side (lane l reading copy l % REPL keeps 8-byte gathers of a half-warp off shared bank conflicts
// for REPL = 16). Thread i of n loads codes i, i + n, ... once each from global memory and writes
// their REPL copies (one global round trip for n >= NCODES); the caller synchronizes.
template <int FMT, int REPL>
__device__ __forceinline__ void polar_load_codebook(float2 * tab, int i, int n) {
    for (int c = i; c < polar_fmt<FMT>::NCODES; c += n) {
        const float2 v = make_float2(polar_tab<FMT>::cx(c), polar_tab<FMT>::cy(c));
#pragma unroll
        for (int j = 0; j < REPL; ++j) {
            tab[c * REPL + j] = v;
        }
    }
}

// ---- decoding: y[2p] = d * CX[c[p]], y[2p+1] = d * CY[c[p]] -------------------------------------

// scale d of a block (2-byte aligned) as float32
__device__ __forceinline__ float polar_block_scale(const unsigned char * blk) {
    return polar_h2f(*reinterpret_cast<const unsigned short *>(blk));
}

// code of pair p (0..31) of a block (layout: ggml-polar-format.h)
template <int FMT> __device__ __forceinline__ int polar_block_code(const unsigned char * blk, int p) {
    if (FMT == POLAR_KERNEL_ID) {
        return blk[2 + p];
    }
    const int lo = (blk[2 + (p & 15)] >> (4 * (p >> 4))) & 15;
    const int hi = (blk[18 + (p & 7)] >> (2 * (p >> 3))) & 3;
    return lo | (hi << 4);
}

// polar3: the codes of pairs 4q .. 4q+3 (q = 0..7), one per byte, from little-endian words of the
// block: qs_w = qs word q & 3 (bytes 2 + 4 (q & 3) ..), qh_w = qh word q & 1 (bytes 18 + 4 (q & 1) ..)
__device__ __forceinline__ unsigned int polar3_code_quad(unsigned int qs_w, unsigned int qh_w, int q) {
    const unsigned int lo = (qs_w >> (4 * (q >> 2))) & 0x0F0F0F0Fu;
    const unsigned int hi = (qh_w >> (2 * (q >> 1))) & 0x03030303u;
    return lo | (hi << 4);
}

// decoded pair: one float32 multiplication per value, as dequantize_row_polar
__device__ __forceinline__ float2 polar_decode_pair(float d, float2 cxy) {
    return make_float2(polar_fmul(d, cxy.x), polar_fmul(d, cxy.y));
}

// ---- encoding (FORMAT.md "Encoding"), lane = pair ---------------------------------------------

__device__ __forceinline__ float polar_tree32(float v) {
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        v = polar_fadd(v, __shfl_xor_sync(POLAR_FULL_MASK, v, h));
    }
    return v;
}

// step 1: NaN -> 0, clamp to [-VMAX, VMAX]
__device__ __forceinline__ float polar_sanitize(float v) {
    const bool nan = (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
    return nan ? 0.0f : polar_fmin(polar_fmax(v, -POLAR_VMAX), POLAR_VMAX);
}

// h(v) of step 3: clamp to at most 65504, round to binary16, back to float32
__device__ __forceinline__ float polar_round_scale(float v) {
    return polar_h2f(polar_f2h(polar_fmin(v, POLAR_FP16_MAX)));
}

// step 2: block radius (all lanes)
__device__ __forceinline__ float polar_block_rmax(float X, float Y) {
    float r2 = polar_fadd(polar_fmul(X, X), polar_fmul(Y, Y));
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        r2 = polar_fmax(r2, __shfl_xor_sync(POLAR_FULL_MASK, r2, h));
    }
    return polar_fsqrt(r2);
}

// candidate codes of this lane's pair: both angular neighbours on every ring (step 4)
template <int FMT>
__device__ __forceinline__ void polar_pair_candidates(float X, float Y, int (&cand)[2 * polar_fmt<FMT>::NRINGS]) {
    typedef polar_tab<FMT> TB;
    const float theta = atan2f(Y, X);
#pragma unroll
    for (int j = 0; j < polar_fmt<FMT>::NRINGS; ++j) {
        const int n   = TB::ring_n(j);
        const int off = TB::ring_off(j);
        if (n == 1) {
            cand[2 * j] = cand[2 * j + 1] = off;
        } else {
            // |theta| <= pi and 0 <= phi < 2 pi / n put k in [-n/2 - 1, n/2]: k mod n without a division
            int k = (int) floorf((theta - TB::ring_phi(j)) * TB::ring_istep(j));
            k += k < 0 ? n : 0;
            k -= k >= n ? n : 0;
            cand[2 * j]     = off + k;
            cand[2 * j + 1] = off + (k + 1 == n ? 0 : k + 1);
        }
    }
}

// step 4 at scale s: this lane's code (nearest candidate, the lower code on equal distances)
// and the block error E (all lanes). tab: the codebook (polar_load_codebook, REPL copies).
template <int FMT, int REPL>
__device__ __forceinline__ void polar_encode_at(float X, float Y, float s, const int (&cand)[2 * polar_fmt<FMT>::NRINGS],
                                                const float2 * tab, int lane, int & code, float & E) {
    const float inv = polar_fdiv(1.0f, s);
    const float xn  = polar_fmul(X, inv);
    const float yn  = polar_fmul(Y, inv);
    float best = 0.0f;
    int   bc   = 0;
#pragma unroll
    for (int i = 0; i < 2 * polar_fmt<FMT>::NRINGS; ++i) {
        const int    c  = cand[i];
        const float2 t  = tab[c * REPL + lane % REPL];
        const float  dx = polar_fsub(xn, t.x);
        const float  dy = polar_fsub(yn, t.y);
        const float  dd = polar_fadd(polar_fmul(dx, dx), polar_fmul(dy, dy));
        if (i == 0 || polar_lt_nonneg(dd, best) || (__float_as_uint(dd) == __float_as_uint(best) && c < bc)) {
            best = dd;
            bc   = c;
        }
    }
    const float2 t  = tab[bc * REPL + lane % REPL];
    const float  ex = polar_fsub(X, polar_fmul(s, t.x));
    const float  ey = polar_fsub(Y, polar_fmul(s, t.y));
    code = bc;
    E    = polar_tree32(polar_fadd(polar_fmul(ex, ex), polar_fmul(ey, ey)));
}

// Scratch in shared memory for polar_encode_block with NW > 1 warps per block.
template <int NW> struct polar_encode_scratch {
    float         e[NW];                     // best error of warp w (+inf: no candidate)
    float         s[NW];                     // its scale
    int           k[NW];                     // its candidate index
    unsigned char c[NW][POLAR_BLOCK_PAIRS];  // its codes
};

#define POLAR_INF_BITS 0x7f800000u

// Steps 1-6 for one block: X, Y the raw pair of this lane; sets the scale s (0: the zero block)
// and this lane's code. Warp `warp` of NW tries scale candidates warp, warp + NW, ...; with
// NW > 1 all NW warps of the CTA must call it (one __syncthreads) and only warp 0 refines:
// returns true in the warp that holds the block's result (warp 0). The choice is the first
// strict minimum of E over k = 0..NCAND-1, as in the sequential loop (NW = 1).
template <int FMT, int NW, int REPL>
__device__ __forceinline__ bool polar_encode_block(float X, float Y, const float2 * tab, int lane, int warp,
                                                   polar_encode_scratch<NW> * scratch, float & s_out, int & code_out) {
    typedef polar_fmt<FMT> TR;

    X = polar_sanitize(X);
    Y = polar_sanitize(Y);
    const float rmax = polar_block_rmax(X, Y);

    int cand[2 * TR::NRINGS];
    polar_pair_candidates<FMT>(X, Y, cand);

    float best_s = 0.0f;
    float best_e = __uint_as_float(POLAR_INF_BITS);
    int   best_c = 0;
    int   best_k = TR::NCAND;
#pragma unroll 1
    for (int k = warp; k < TR::NCAND; k += NW) {
        const float s = polar_round_scale(polar_fmul(rmax, polar_tab<FMT>::g(k)));
        if (s == 0.0f) {
            continue;  // warp-uniform
        }
        int   c;
        float E;
        polar_encode_at<FMT, REPL>(X, Y, s, cand, tab, lane, c, E);
        if (polar_lt_nonneg(E, best_e)) {
            best_s = s;
            best_e = E;
            best_c = c;
            best_k = k;
        }
    }

    if (NW > 1) {
        scratch->c[warp][lane] = (unsigned char) best_c;
        if (lane == 0) {
            scratch->e[warp] = best_e;
            scratch->s[warp] = best_s;
            scratch->k[warp] = best_k;
        }
        __syncthreads();
        if (warp != 0) {
            return false;
        }
        // the warp with the least (E, k), E compared as bits: a butterfly over lanes 0..NW-1
        unsigned long long key = lane < NW ? ((unsigned long long) __float_as_uint(scratch->e[lane]) << 32) |
                                                 (unsigned int) (scratch->k[lane] * 32 + lane)
                                           : ~0ull;
#pragma unroll
        for (int h = 16; h >= 1; h >>= 1) {
            const unsigned long long o = __shfl_xor_sync(POLAR_FULL_MASK, key, h);
            key                        = o < key ? o : key;
        }
        const int bw = (int) (key & 31u);
        best_e = scratch->e[bw];
        best_s = scratch->s[bw];
        best_c = scratch->c[bw][lane];
    }

    // step 6: least-squares scale of the chosen codes, kept while it lowers the error
    bool active = __float_as_uint(best_e) != POLAR_INF_BITS;
#pragma unroll 1
    for (int it = 0; it < TR::NREFINE && active; ++it) {
        const float2 t   = tab[best_c * REPL + lane % REPL];
        const float  num = polar_tree32(polar_fadd(polar_fmul(X, t.x), polar_fmul(Y, t.y)));
        const float  den = polar_tree32(polar_fadd(polar_fmul(t.x, t.x), polar_fmul(t.y, t.y)));
        active           = false;
        if (den > 0.0f) {
            const float s2 = polar_round_scale(polar_fdiv(num, den));
            if (s2 > 0.0f && s2 != best_s) {
                int   c;
                float E;
                polar_encode_at<FMT, REPL>(X, Y, s2, cand, tab, lane, c, E);
                if (polar_lt_nonneg(E, best_e)) {
                    best_s = s2;
                    best_e = E;
                    best_c = c;
                    active = true;
                }
            }
        }
    }
    if (__float_as_uint(best_e) == POLAR_INF_BITS) {
        best_s = 0.0f;
        best_c = 0;
    }
    s_out    = best_s;
    code_out = best_c;
    return true;
}

// Step 7: write the block (TYPE_SIZE bytes at out, 2-byte aligned); all 32 lanes of the warp.
template <int FMT>
__device__ __forceinline__ void polar_store_block(unsigned char * out, float s, int code, int lane) {
    if (lane == 0) {
        // one 16-bit store: two byte stores of the cvt.rn.f16.f32 result were miscompiled under
        // cupy 14.2 / NVRTC 13.2, driver 580.159 (H100, H200): the low byte came out as the float
        // converted to u8.
        *reinterpret_cast<unsigned short *>(out) = polar_f2h(s);
    }
    if (FMT == POLAR_KERNEL_ID) {
        out[2 + lane] = (unsigned char) code;
    } else {
        const int c8  = __shfl_sync(POLAR_FULL_MASK, code, (lane + 8) & 31);
        const int c16 = __shfl_sync(POLAR_FULL_MASK, code, (lane + 16) & 31);
        const int c24 = __shfl_sync(POLAR_FULL_MASK, code, (lane + 24) & 31);
        if (lane < 16) {
            out[2 + lane] = (unsigned char) ((code & 15) | ((c16 & 15) << 4));
        }
        if (lane < 8) {
            out[18 + lane] = (unsigned char) ((code >> 4) | ((c8 >> 4) << 2) | ((c16 >> 4) << 4) | ((c24 >> 4) << 6));
        }
    }
}
