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
// (polar_encode_block). The nearest-code search evaluates 4 of the 2 * NRINGS candidates and
// proves the others cannot win (polar_encode_at; the proof is above polar_ring_bounds). tree32 of FORMAT.md is the xor butterfly: lane i adds v[i ^ h] for
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

// fl(1 / b) as rcp.rn.f32: IEEE 754's correctly rounded reciprocal, so the same bits as div.rn.f32 of 1 for
// every b, with a shorter fast path (MUFU.RCP and two FMAs instead of MUFU.RCP, FCHK and five FMAs, sm_90)
__device__ __forceinline__ float polar_frcp(float b) {
    float r;
    asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(b));
    return r;
}

// POLAR_ENC_RCP (default 0): the encoder's reciprocals of the scales (fl(1 / s), the same bits either way) by
// polar_frcp instead of polar_fdiv(1, s). H200, session 17: the warp path 398 -> 400 M blocks/s (polar from f16,
// "rs8_lb5_wnr", the CuPy default); the latency path (one CTA a block, ggml-cuda's shape) no faster (4.73 -> 4.75
// us for 4 blocks), so ggml-cuda and the "cta" path keep the division.
#ifndef POLAR_ENC_RCP
#define POLAR_ENC_RCP 0
#endif

__device__ __forceinline__ float polar_finv(float b) {
#if POLAR_ENC_RCP
    return polar_frcp(b);
#else
    return polar_fdiv(1.0f, b);
#endif
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
// The ring tables are const, so that nvcc folds them into the unrolled table build (immediates instead
// of constant loads, the n > 1 branches gone: 3296 -> 3176 SASS instructions in the rs8_lb5 kernel, nvcc
// 13, sm_90; the same values, so the same bytes). H200, session 16 (scripts/bench_gpu.py encode --variants
// all, as "rs8_lb5_c"): 366 -> 381 M blocks/s, polar from float16.
static __constant__ const int   polar_c_ring_n[POLAR_NRINGS]       = POLAR_RING_N_INIT;
static __constant__ const int   polar_c_ring_off[POLAR_NRINGS]     = POLAR_RING_OFF_INIT;
static __constant__ const float polar_c_ring_phi[POLAR_NRINGS]     = POLAR_RING_PHI_INIT;
static __constant__ const float polar_c_ring_istep[POLAR_NRINGS]   = POLAR_RING_ISTEP_INIT;
static __constant__ float polar_c_g[POLAR_NCAND]             = POLAR_G_INIT;
static __constant__ const int   polar3_c_ring_n[POLAR3_NRINGS]     = POLAR3_RING_N_INIT;
static __constant__ const int   polar3_c_ring_off[POLAR3_NRINGS]   = POLAR3_RING_OFF_INIT;
static __constant__ const float polar3_c_ring_phi[POLAR3_NRINGS]   = POLAR3_RING_PHI_INIT;
static __constant__ const float polar3_c_ring_istep[POLAR3_NRINGS] = POLAR3_RING_ISTEP_INIT;
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

// ---- the candidate search (step 4), pruned by ring radii ---------------------------------------
//
// The 2 * NRINGS candidates of a pair (both angular neighbours on every ring) do not depend on the
// scale: polar_build_candidates writes them once per block into shared memory (polar_cand_table),
// ring j of pair p as slots 2j (the lower code) and 2j + 1 (the higher), so slots ascend with the
// codes and the lower-code tie rule is a strict < in slot order. Ring 0 (a single point, code 0)
// fills both of its slots; the second never wins a strict <.
//
// At scale s, lane p evaluates only its window, rings w and w + 1 around rho = |(xn, yn)|, and
// proves that no candidate on any other ring can be the full search's answer; if a lane of the
// warp cannot, the warp runs the full search (all slots in order). Proof that the windowed answer
// is the full search's answer, float32 rounding and ties included (u = 2^-24, no FMA, IEEE .rn):
//  - A candidate point c has radius |c| (exact, of the float32 table entries) in [LO_j, HI_j] for
//    its ring j; polar_ring_bounds holds these bounds widened by 2^-20 (computed in double at
//    compile time, errors ~1e-16). A = HI_{w-1} bounds the rings below the window (or -1e30 when
//    there are none), B = LO_{w+2} the rings above (or +1e30).
//  - Let rho* = |(xn, yn)| exactly. The lane computes rho = fl(fl(sqrt(fl(fl(X^2) + fl(Y^2)))) * inv)
//    (once per block for the sqrt): rho = rho* (1 + e) with |e| <= 6u plus, when squares
//    underflow, an absolute error below 2^-74.5 * inv <= 2^-50.5 (inv <= 2^24: s is a positive
//    binary16). So rho_lo = fl(fl(rho (1 - 2^-12)) - 2^-40) <= rho* <= rho_hi = fl(fl(rho (1 + 2^-12)) + 2^-40).
//  - Triangle inequality: a candidate c below the window has D_c = |p - c|^2 >= (rho* - |c|)^2
//    >= (rho_lo - A)^2 when rho_lo > A; one above, D_c >= (B - rho_hi)^2 when B > rho_hi. The lane
//    computes m = min(fl(rho_lo - A), fl(B - rho_hi)) (a sign-exact rounding of each gap, <= (1 + u) gap)
//    and lb = fl(fl(m * m) * (1 - 2^-10)) < gap^2 (1 - 2^-11) for every candidate outside.
//  - The computed distance of c, dd_c = fl(fl(dx^2) + fl(dy^2)) with dx = fl(xn - CX) (exact
//    when subnormal), is >= D_c (1 - 4u) - 2^-148 (each rounding relative <= u, each underflowing
//    square off by at most 2^-150).
//  - If m > 0 and lb > max(best, 2^-120), best the least computed distance of the window, then for
//    every c outside: dd_c >= gap^2 (1 - 4u) - 2^-148 > lb (1 + 2^-11)(1 - 4u) - 2^-148
//    > lb + lb 2^-12 - 2^-148 > lb > best. So no candidate outside equals or beats best: the full
//    search's minimum is best and its lowest code among equal distances is in the window, which is
//    searched in ascending slot (= code) order with a strict <. Any w is correct (w only decides
//    how often the full search runs); the comparisons that choose w may flush subnormals.
// tests/test_encoder_search.py runs a float32 numpy twin of this search (tests/encoder_emulation.py)
// against kvpolar.codec.quantize_blocks.

#define POLAR_INF_BITS 0x7f800000u
#define POLAR_MAX_RINGS (POLAR_NRINGS > POLAR3_NRINGS ? POLAR_NRINGS : POLAR3_NRINGS)
#define POLAR_BOUND_FAR 1e30f                // A or B where no ring lies below or above the window
#define POLAR_RHO_REL_LO 0.999755859375f     // 1 - 2^-12
#define POLAR_RHO_REL_HI 1.000244140625f     // 1 + 2^-12
#define POLAR_RHO_ABS 9.094947017729282e-13f // 2^-40
#define POLAR_LB_REL 0.9990234375f           // 1 - 2^-10
#define POLAR_LB_MIN 7.52316384526264e-37f   // 2^-120

#define POLAR_WIN_LUT 64 // w = lut[min((int) (rho * POLAR_WIN_LUT_SCALE), 63)]: cells of 1/16 up to rho = 4
#define POLAR_WIN_LUT_SCALE 16.0f

// Radius bounds of the rings of a format and its window tables (compile time, from the codebook):
// lo[j] <= |(CX[c], CY[c])| <= hi[j] for every code c on ring j, mid[j] the ring's radius.
struct polar_ring_bounds {
    float         lo[POLAR_MAX_RINGS];
    float         hi[POLAR_MAX_RINGS];
    float         mid[POLAR_MAX_RINGS];
    float2        win[POLAR_MAX_RINGS];  // window w (rings w, w + 1): (A, B) = (hi[w-1] or -FAR, lo[w+2] or +FAR)
    unsigned char lut[POLAR_WIN_LUT];    // cell e: #{j in 1..NR-2: (e + 0.5) / 16 >= mid[j]}, the rings around it
};

__host__ __device__ constexpr double polar_csqrt(double v) {
    double r = v > 1.0 ? v : 1.0;  // Newton from above: monotone, exact to ~1 ulp after 64 steps for v <= 1e4
    for (int i = 0; i < 64 && v > 0.0; ++i) {
        r = 0.5 * (r + v / r);
    }
    return v > 0.0 ? r : 0.0;
}

template <int NR, int NC>
__host__ __device__ constexpr polar_ring_bounds polar_make_ring_bounds(const int (&n)[NR], const float (&cx)[NC], const float (&cy)[NC]) {
    polar_ring_bounds b{};
    int off = 0;
    for (int j = 0; j < NR; ++j) {
        double mn = 1e300, mx = 0.0;
        for (int c = off; c < off + n[j]; ++c) {
            const double r2 = (double) cx[c] * cx[c] + (double) cy[c] * cy[c];
            mn = r2 < mn ? r2 : mn;
            mx = r2 > mx ? r2 : mx;
        }
        b.lo[j]  = (float) (polar_csqrt(mn) * (1.0 - 1.0 / (1 << 20)));
        b.hi[j]  = (float) (polar_csqrt(mx) * (1.0 + 1.0 / (1 << 20)));
        b.mid[j] = (float) polar_csqrt(0.5 * (mn + mx));
        off += n[j];
    }
    for (int w = 0; w + 1 < NR; ++w) {
        b.win[w].x = w == 0 ? -POLAR_BOUND_FAR : b.hi[w - 1];
        b.win[w].y = w + 2 >= NR ? POLAR_BOUND_FAR : b.lo[w + 2];
    }
    for (int e = 0; e < POLAR_WIN_LUT; ++e) {
        const float cell_mid = ((float) e + 0.5f) / POLAR_WIN_LUT_SCALE;
        int         w        = 0;
        for (int j = 1; j + 1 < NR; ++j) {
            w += cell_mid >= b.mid[j] ? 1 : 0;
        }
        b.lut[e] = (unsigned char) w;
    }
    return b;
}

constexpr int   polar_k_ring_n[POLAR_NRINGS]   = POLAR_RING_N_INIT;
constexpr float polar_k_cx[POLAR_NCODES]       = POLAR_CX_INIT;
constexpr float polar_k_cy[POLAR_NCODES]       = POLAR_CY_INIT;
constexpr int   polar3_k_ring_n[POLAR3_NRINGS] = POLAR3_RING_N_INIT;
constexpr float polar3_k_cx[POLAR3_NCODES]     = POLAR3_CX_INIT;
constexpr float polar3_k_cy[POLAR3_NCODES]     = POLAR3_CY_INIT;
static_assert(polar_k_ring_n[0] == 1 && polar3_k_ring_n[0] == 1, "ring 0 is the single point at the origin");

// in global memory: lanes read different entries (polar_build_candidates)
static __device__ const polar_ring_bounds polar_g_bounds[2] = {
    polar_make_ring_bounds(polar_k_ring_n, polar_k_cx, polar_k_cy),
    polar_make_ring_bounds(polar3_k_ring_n, polar3_k_cx, polar3_k_cy),
};

// The candidates of one block in shared memory (written once per block by polar_build_candidates).
struct polar_cand_table {
    float4        xy[POLAR_MAX_RINGS][POLAR_BLOCK_PAIRS]; // ring j, pair p: (CX, CY) of slot 2j, (CX, CY) of slot 2j + 1
    float2        win[POLAR_MAX_RINGS];                   // window w (rings w, w + 1): (A, B) = (HI_{w-1}, LO_{w+2})
    unsigned char lut[POLAR_WIN_LUT];                     // window of a cell of rho: the rings around its centre
};

// floor(v) as an int (cvt.rmi, no .ftz: the same for any compiler flags)
__device__ __forceinline__ int polar_floor_int(float v) {
    int r;
    asm("cvt.rmi.s32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}

// the codes of ring j's two candidates for a pair at angle theta, lower first (step 4); inline PTX,
// so that the table (polar_build_candidates) and the final code (polar_encode_block) agree
template <int FMT> __device__ __forceinline__ void polar_ring_neighbours(float theta, int j, int & lo, int & hi) {
    typedef polar_tab<FMT> TB;
    const int n   = TB::ring_n(j);
    const int off = TB::ring_off(j);
    lo            = off;
    hi            = off;
    if (n > 1) {
        // |theta| <= pi and 0 <= phi < 2 pi / n put k in [-n/2 - 1, n/2]: k mod n without a division
        int k = polar_floor_int(polar_fmul(polar_fsub(theta, TB::ring_phi(j)), TB::ring_istep(j)));
        k += k < 0 ? n : 0;
        k -= k >= n ? n : 0;
        // neighbours k and (k + 1) mod n; k = n - 1 wraps to 0, the lower code
        lo = off + (k + 1 == n ? 0 : k);
        hi = off + (k + 1 == n ? k : k + 1);
    }
}

// the window tables of a candidate table (the same for every block: a warp that keeps its table may
// write them once, polar_build_candidates<..., false>)
template <int FMT> __device__ __forceinline__ void polar_write_windows(int lane, polar_cand_table * t) {
    const polar_ring_bounds & B = polar_g_bounds[FMT];
    if (lane < polar_fmt<FMT>::NRINGS - 1) {
        t->win[lane] = B.win[lane];
    }
#pragma unroll
    for (int e = lane; e < POLAR_WIN_LUT; e += POLAR_BLOCK_PAIRS) {
        t->lut[e] = B.lut[e];
    }
}

// step 4's candidates of this lane's pair (both angular neighbours on every ring, lower code first)
// and (WIN) the window tables
template <int FMT, int REPL, bool WIN = true>
__device__ __forceinline__ void polar_build_candidates(float theta, const float2 * tab, int lane, polar_cand_table * t) {
    constexpr int NR = polar_fmt<FMT>::NRINGS;
#pragma unroll
    for (int j = 0; j < NR; ++j) {
        int lo, hi;
        polar_ring_neighbours<FMT>(theta, j, lo, hi);
        const float2 a = tab[lo * REPL + lane % REPL];
        const float2 b = tab[hi * REPL + lane % REPL];
        t->xy[j][lane] = make_float4(a.x, a.y, b.x, b.y);
    }
    if constexpr (WIN) {
        polar_write_windows<FMT>(lane, t);
    }
}

// polar_build_candidates spread over the warps of a CTA that all hold the block's pairs (NW > NRINGS): warp
// j < NRINGS builds ring j's row of the table, warp NRINGS the window tables; the same entries, each
// computed by the same code, at the latency of one ring instead of NRINGS in one warp (session 14's
// profile of ggml-cuda's layer launch: warp 0 alone built the table while the other 15 waited)
template <int FMT, int REPL>
__device__ __forceinline__ void polar_build_candidates_split(float theta, const float2 * tab, int lane, int warp,
                                                             polar_cand_table * t) {
    constexpr int NR = polar_fmt<FMT>::NRINGS;
    if (warp < NR) {
        int lo, hi;
        polar_ring_neighbours<FMT>(theta, warp, lo, hi);
        const float2 a = tab[lo * REPL + lane % REPL];
        const float2 b = tab[hi * REPL + lane % REPL];
        t->xy[warp][lane] = make_float4(a.x, a.y, b.x, b.y);
    } else if (warp == NR) {
        polar_write_windows<FMT>(lane, t);
    }
}

// one candidate of the search: computed distance, kept on a strict < (slots ascend with codes)
__device__ __forceinline__ void polar_try(float xn, float yn, float cx, float cy, int slot, float & best, int & bs,
                                          float & bx, float & by) {
    const float dx = polar_fsub(xn, cx);
    const float dy = polar_fsub(yn, cy);
    const float dd = polar_fadd(polar_fmul(dx, dx), polar_fmul(dy, dy));
    if (polar_lt_nonneg(dd, best)) {
        best = dd;
        bs   = slot;
        bx   = cx;
        by   = cy;
    }
}

// (CX, CY) of slot i of this lane
__device__ __forceinline__ float2 polar_slot_xy(const polar_cand_table * t, int slot, int lane) {
    const float4 q = t->xy[slot >> 1][lane];
    return (slot & 1) ? make_float2(q.z, q.w) : make_float2(q.x, q.y);
}

// step 4 at scale s (inv = fl(1 / s)) in one lane: the slot of this lane's code (the nearest
// candidate, the lower code on equal distances), its (CX, CY), and its squared error
// fl(ex^2 + ey^2), the value the block error E sums (polar_tree32). UNROLL: of the rare full search
// (1 keeps the registers of polar_encode.cu's rs variants down). r: fl(sqrt(fl(X^2) + fl(Y^2))).
template <int FMT, int UNROLL = polar_fmt<FMT>::NRINGS>
__device__ __forceinline__ float polar_encode_lane(float X, float Y, float r, float s, float inv,
                                                   const polar_cand_table * t, int lane, int & slot, float & bx,
                                                   float & by) {
    constexpr int NR  = polar_fmt<FMT>::NRINGS;
    const float   xn  = polar_fmul(X, inv);
    const float   yn  = polar_fmul(Y, inv);
    const float   rho = polar_fmul(r, inv);

    // rings w, w + 1: about the ring radii around rho (any w is correct)
    const int    cell = (int) polar_fmul(rho, POLAR_WIN_LUT_SCALE);  // saturating conversion
    const int    w    = t->lut[cell < POLAR_WIN_LUT - 1 ? cell : POLAR_WIN_LUT - 1];
    const float4 q0   = t->xy[w][lane];
    const float4 q1   = t->xy[w + 1][lane];
    const float  dx0  = polar_fsub(xn, q0.x);
    const float  dy0  = polar_fsub(yn, q0.y);
    float        best = polar_fadd(polar_fmul(dx0, dx0), polar_fmul(dy0, dy0));
    int          bs   = 2 * w;
    bx                = q0.x;
    by                = q0.y;
    polar_try(xn, yn, q0.z, q0.w, 2 * w + 1, best, bs, bx, by);
    polar_try(xn, yn, q1.x, q1.y, 2 * w + 2, best, bs, bx, by);
    polar_try(xn, yn, q1.z, q1.w, 2 * w + 3, best, bs, bx, by);

    // no candidate outside the window can be the answer (proof above)
    const float2 ab     = t->win[w];
    const float  rho_lo = polar_fsub(polar_fmul(rho, POLAR_RHO_REL_LO), POLAR_RHO_ABS);
    const float  rho_hi = polar_fadd(polar_fmul(rho, POLAR_RHO_REL_HI), POLAR_RHO_ABS);
    const float  m      = polar_fmin(polar_fsub(rho_lo, ab.x), polar_fsub(ab.y, rho_hi));
    const float  lb     = polar_fmul(polar_fmul(m, m), POLAR_LB_REL);
    const bool   ok     = __float_as_int(m) > 0 && polar_lt_nonneg(polar_fmax(best, POLAR_LB_MIN), lb);
    if (__any_sync(POLAR_FULL_MASK, !ok)) {
        best = __uint_as_float(POLAR_INF_BITS);
#pragma unroll UNROLL
        for (int j = 0; j < NR; ++j) {
            const float4 q = t->xy[j][lane];
            polar_try(xn, yn, q.x, q.y, 2 * j, best, bs, bx, by);
            polar_try(xn, yn, q.z, q.w, 2 * j + 1, best, bs, bx, by);
        }
    }
    slot           = bs;
    const float ex = polar_fsub(X, polar_fmul(s, bx));
    const float ey = polar_fsub(Y, polar_fmul(s, by));
    return polar_fadd(polar_fmul(ex, ex), polar_fmul(ey, ey));
}

// step 4 for the block: polar_encode_lane and the block error E (all lanes)
template <int FMT>
__device__ __forceinline__ void polar_encode_at(float X, float Y, float r, float s, float inv,
                                                const polar_cand_table * t, int lane, int & slot, float & bx,
                                                float & by, float & E) {
    E = polar_tree32(polar_encode_lane<FMT>(X, Y, r, s, inv, t, lane, slot, bx, by));
}

// tree32 of a and of b in every lane (the bits of polar_tree32 of each) with 6 shuffles instead of
// 10: a reduce-scatter step (step 16: lanes 0-15 keep a, 16-31 keep b), then the butterfly, then
// each lane takes the other sum from lane ^ 16.
__device__ __forceinline__ void polar_tree32x2(float a, float b, int lane, float & sa, float & sb) {
    const bool up = (lane & 16) != 0;
    float      v  = polar_fadd(up ? b : a, __shfl_xor_sync(POLAR_FULL_MASK, up ? a : b, 16));
#pragma unroll
    for (int h = 8; h >= 1; h >>= 1) {
        v = polar_fadd(v, __shfl_xor_sync(POLAR_FULL_MASK, v, h));
    }
    const float o = __shfl_xor_sync(POLAR_FULL_MASK, v, 16);
    sa            = up ? o : v;
    sb            = up ? v : o;
}

// step 6's block sums for this lane's chosen (CX, CY) = (cx, cy): num = tree32(X CX + Y CY) and
// den = tree32(CX^2 + CY^2), summed together (polar_tree32x2: the bits of two polar_tree32)
__device__ __forceinline__ void polar_step6_sums(float X, float Y, float cx, float cy, int lane, float & num,
                                                 float & den) {
    const float a = polar_fadd(polar_fmul(X, cx), polar_fmul(Y, cy));
    const float b = polar_fadd(polar_fmul(cx, cx), polar_fmul(cy, cy));
    polar_tree32x2(a, b, lane, num, den);
}

// step 4 at scale s (polar_encode_at) and, reduced beside its block error E, step 6's sums of the codes
// it chose (polar_step6_sums): the two butterflies are independent, so the sums cost issue slots, not
// latency, where the next step needs them
template <int FMT>
__device__ __forceinline__ void polar_encode_at_sums(float X, float Y, float r, float s, float inv,
                                                     const polar_cand_table * t, int lane, int & slot, float & E,
                                                     float & num, float & den) {
    float       bx, by;
    const float err = polar_encode_lane<FMT>(X, Y, r, s, inv, t, lane, slot, bx, by);
    polar_step6_sums(X, Y, bx, by, lane, num, den);
    E = polar_tree32(err);
}

// step 4 at scale s, kept when its block error is lower than best_e: s, E and this lane's slot into best_s,
// best_e, best_i, and into best_a, best_b this lane's (CX, CY) (SUMS false: polar_encode_at) or step 6's
// sums num, den of the trial's codes (SUMS true: polar_encode_at_sums); returns whether it was kept
template <int FMT, bool SUMS>
__device__ __forceinline__ bool polar_keep_if_lower(float X, float Y, float r, float s, float inv,
                                                    const polar_cand_table * t, int lane, float & best_s,
                                                    float & best_e, int & best_i, float & best_a, float & best_b) {
    int   i;
    float E, a, b;
    if constexpr (SUMS) {
        polar_encode_at_sums<FMT>(X, Y, r, s, inv, t, lane, i, E, a, b);
    } else {
        polar_encode_at<FMT>(X, Y, r, s, inv, t, lane, i, a, b, E);
    }
    if (!polar_lt_nonneg(E, best_e)) {
        return false;
    }
    best_s = s;
    best_e = E;
    best_i = i;
    best_a = a;
    best_b = b;
    return true;
}

// Steps 6 and 7's inputs: from the chosen scale best_s, block error best_e (+inf: none) and this
// lane's slot best_i with its (CX, CY) best_x, best_y, the least-squares scale num / den of the chosen
// codes (step 6's sums, polar_step6_sums), kept while it lowers the error (NREFINE times at most); then
// s (0: the zero block) and this lane's code.
// SPEC false: each iteration sums its codes first (num, den unused on entry). SPEC true (the latency
// path, POLAR_ENC_CTA_WINNER): num, den are the sums of the chosen codes on entry (best_x, best_y
// unused), and each trial but the last reduces its error together with its codes' sums
// (polar_encode_at_sums): one butterfly an iteration on the serial path instead of two, at the cost of
// the sums of a trial that does not win (issue slots the throughput paths keep). The same bits.
template <int FMT, bool SPEC>
__device__ __forceinline__ void polar_refine_finish(float X, float Y, float r, float theta, const polar_cand_table * t,
                                                    int lane, float best_s, float best_e, int best_i, float best_x,
                                                    float best_y, float num, float den, float & s_out,
                                                    int & code_out) {
    constexpr int NREF   = polar_fmt<FMT>::NREFINE;
    bool          active = __float_as_uint(best_e) != POLAR_INF_BITS;
#pragma unroll 1
    for (int it = 0; it < NREF && active; ++it) {
        if constexpr (!SPEC) {
            polar_step6_sums(X, Y, best_x, best_y, lane, num, den);
        }
        active = false;
        if (den > 0.0f) {
            const float s2 = polar_round_scale(polar_fdiv(num, den));
            if (s2 > 0.0f && s2 != best_s) {
                const float inv = polar_finv(s2);
                if (SPEC && it + 1 < NREF) {
                    active = polar_keep_if_lower<FMT, true>(X, Y, r, s2, inv, t, lane, best_s, best_e, best_i, num,
                                                            den);
                } else {  // (SPEC: best_x, best_y are not read)
                    active = polar_keep_if_lower<FMT, false>(X, Y, r, s2, inv, t, lane, best_s, best_e, best_i,
                                                             best_x, best_y);
                }
            }
        }
    }
    if (__float_as_uint(best_e) == POLAR_INF_BITS) {
        s_out    = 0.0f;
        code_out = 0;
    } else {
        int lo, hi;
        polar_ring_neighbours<FMT>(theta, best_i >> 1, lo, hi);
        s_out    = best_s;
        code_out = (best_i & 1) ? hi : lo;
    }
}

// POLAR_ENC_CTA_WINNER (default 1): in a CTA with a warp for every scale candidate (the latency path), each
// warp reduces its candidate's step-6 sums beside its error, and the warp whose candidate wins refines it
// from its own registers. 0: warp 0 takes the winner's codes from shared memory and sums them first, as
// before; kept for scripts/bench_gpu.py encode-latency (cupy_kernels.codec.CTA_VARIANTS). Same bytes.
#ifndef POLAR_ENC_CTA_WINNER
#define POLAR_ENC_CTA_WINNER 1
#endif

// the warp w < NW with the least (e[w] as bits, k[w]) (every lane of the calling warp gets it): the first
// strict minimum of E over the candidates, as the sequential loop chooses
template <int NW>
__device__ __forceinline__ int polar_least_warp(const float * e, const int * k, int lane) {
    const unsigned int eb = lane < NW ? __float_as_uint(e[lane]) : 0xffffffffu;
    const unsigned int kb = lane < NW ? (unsigned int) k[lane] : 0xffffffffu;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned int em = __reduce_min_sync(POLAR_FULL_MASK, eb);
    const unsigned int km = __reduce_min_sync(POLAR_FULL_MASK, eb == em ? kb : 0xffffffffu);
#else
    unsigned int em = eb;
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        const unsigned int o = __shfl_xor_sync(POLAR_FULL_MASK, em, h);
        em                   = o < em ? o : em;
    }
    unsigned int km = eb == em ? kb : 0xffffffffu;
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        const unsigned int o = __shfl_xor_sync(POLAR_FULL_MASK, km, h);
        km                   = o < km ? o : km;
    }
#endif
    return __ffs(__ballot_sync(POLAR_FULL_MASK, eb == em && kb == km)) - 1;
}

// Scratch in shared memory for polar_encode_block: the block's candidates and, with NW > 1 warps
// per block, each warp's best.
template <int NW> struct polar_encode_scratch {
    polar_cand_table t;                          // written by warp 0
    float            e[NW];                      // best error of warp w (+inf: no candidate)
    float            s[NW];                      // its scale (read by the handoff, not by the winner)
    int              k[NW];                      // its candidate index
    unsigned char    c[NW][POLAR_BLOCK_PAIRS];   // its candidate slots
};

template <> struct polar_encode_scratch<1> {
    polar_cand_table t;
};

// Steps 1-6 for one block: X, Y the raw pair of this lane; sets the scale s (0: the zero block)
// and this lane's code. Warp `warp` of NW tries scale candidates warp, warp + NW, ...; all NW warps
// of the CTA must call it (NW > 1: two __syncthreads) and one warp refines: returns true in the
// warp that holds the block's result (warp 0, or with POLAR_ENC_CTA_WINNER the winning candidate's). The choice is the first strict minimum of E over
// k = 0..NCAND-1, as in the sequential loop (NW = 1). scratch: one per block being encoded (with
// NW = 1, one per warp).
template <int FMT, int NW, int REPL>
__device__ __forceinline__ bool polar_encode_block(float X, float Y, const float2 * tab, int lane, int warp,
                                                   polar_encode_scratch<NW> * scratch, float & s_out, int & code_out) {
    typedef polar_fmt<FMT> TR;
    polar_cand_table * t = &scratch->t;

    X = polar_sanitize(X);
    Y = polar_sanitize(Y);
    const float rmax = polar_block_rmax(X, Y);
    const float r    = polar_fsqrt(polar_fadd(polar_fmul(X, X), polar_fmul(Y, Y)));

    if (NW == 1) {
        __syncwarp();  // the lanes are done with the warp's previous block
    }
    const float theta = atan2f(Y, X);
    if constexpr (NW > TR::NRINGS) {
        polar_build_candidates_split<FMT, REPL>(theta, tab, lane, warp, t);
    } else if (NW == 1 || warp == 0) {
        polar_build_candidates<FMT, REPL>(theta, tab, lane, t);
    }
    if (NW > 1) {
        __syncthreads();
    } else {
        __syncwarp();
    }

    // step 3 in parallel: lane k holds scale candidate s_k and fl(1 / s_k)
    static_assert(TR::NCAND <= POLAR_BLOCK_PAIRS, "one scale candidate per lane");
    const float s_lane   = polar_round_scale(polar_fmul(rmax, polar_tab<FMT>::g(lane % TR::NCAND)));
    const float inv_lane = polar_finv(s_lane);

    // WIN: one candidate a warp at most, and the winner refines (POLAR_ENC_CTA_WINNER)
    constexpr bool WIN = POLAR_ENC_CTA_WINNER && NW >= TR::NCAND;
    float best_s = 0.0f;
    float best_e = __uint_as_float(POLAR_INF_BITS);
    int   best_i = 0;  // slot
    float best_x = 0.0f;
    float best_y = 0.0f;
    int   best_k = TR::NCAND;
    float num = 0.0f, den = 0.0f;  // WIN: step 6's sums of the best codes
#pragma unroll 1
    for (int k = warp; k < TR::NCAND; k += NW) {
        const float s = __shfl_sync(POLAR_FULL_MASK, s_lane, k);
        if (s == 0.0f) {
            continue;  // warp-uniform
        }
        const float inv = __shfl_sync(POLAR_FULL_MASK, inv_lane, k);
        const bool kept =
            WIN ? polar_keep_if_lower<FMT, true>(X, Y, r, s, inv, t, lane, best_s, best_e, best_i, num, den)
                : polar_keep_if_lower<FMT, false>(X, Y, r, s, inv, t, lane, best_s, best_e, best_i, best_x, best_y);
        if (kept) {
            best_k = k;
        }
    }

    if constexpr (NW > 1) {
        if constexpr (!WIN) {
            scratch->c[warp][lane] = (unsigned char) best_i;
        }
        if (lane == 0) {
            scratch->e[warp] = best_e;
            if constexpr (!WIN) {
                scratch->s[warp] = best_s;  // (the winner keeps its own)
            }
            scratch->k[warp] = best_k;
        }
        __syncthreads();
        if (!WIN && warp != 0) {
            return false;
        }
        const int bw = polar_least_warp<NW>(scratch->e, scratch->k, lane);
        if constexpr (WIN) {
            if (warp != bw) {
                return false;  // the winner has its codes and their sums in registers
            }
        } else {
            best_e         = scratch->e[bw];
            best_s         = scratch->s[bw];
            best_i         = scratch->c[bw][lane];
            const float2 b = polar_slot_xy(t, best_i, lane);
            best_x         = b.x;
            best_y         = b.y;
        }
    }

    // step 6: least-squares scale of the chosen codes, kept while it lowers the error
    polar_refine_finish<FMT, WIN>(X, Y, r, theta, t, lane, best_s, best_e, best_i, best_x, best_y, num, den, s_out,
                                  code_out);
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
