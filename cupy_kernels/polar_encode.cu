// Polar block encoder and decoder kernels (docs/FORMAT.md), bit-exact twins of kvpolar.codec
// (quantize_blocks / dequantize_blocks) and of quantize_row_polar_ref in the llama.cpp patch. The
// arithmetic is polar_block.cuh, shared with ggml-cuda: one warp per 64-value block, lane p =
// pair p; its inline PTX fixes every rounding, and cupy_kernels.loader still compiles this file
// with --fmad=false and IEEE division and square root.
//
// Addressing: the input is a 4-D view x[B][H][T][64 * NB] with element strides (sb, sh, st, 1);
// the output is a cache out[B][H][T_max][NB][TYPE_SIZE] (byte strides ob, oh, ot) written at
// positions pos[b] + t (pos == nullptr: pos0 for all b). Block i = ((b * H + h) * T + t) * NB + j.
// At most POLAR_ENC_WARPS warps per CTA (cupy_kernels.codec launches 8), each with its own
// polar_encode_scratch (the block's candidate table, 5.8 KiB).

#include "polar_common.cuh"
#include "polar_block.cuh"

#define POLAR_ENC_WARPS 8

// Block i of the input view and where its bytes go in the cache (addressing above).
template <int FMT, class IN>
__device__ __forceinline__ void encode_block_at(long long i, const typename IN::T * x, u8 * out, const int * pos,
                                                int H, int T, int NB, long long sb, long long sh, long long st,
                                                long long ob, long long oh, long long ot, int pos0,
                                                const typename IN::T *& xb, u8 *& dst) {
    const int       j = (int) (i % NB);
    long long       r = i / NB;
    const int       t = (int) (r % T);
    r /= T;
    const int       h = (int) (r % H);
    const long long b = r / H;
    const int       p = pos ? pos[b] : pos0;
    xb  = x + b * sb + h * sh + t * st + 64 * j;
    dst = out + b * ob + h * oh + (long long) (p + t) * ot + (long long) j * polar_fmt<FMT>::TYPE_SIZE;
}

// The block encoder of the warp path: its per-warp scratch and the call (the default,
// polar_encode_block with one warp a block; the throughput variants below bring their own).
template <int FMT> struct polar_enc_default {
    typedef polar_encode_scratch<1> scratch;

    static __device__ __forceinline__ void init(int, scratch *) {}

    static __device__ __forceinline__ void encode(float X, float Y, const float2 * tab, int lane, scratch * sc,
                                                  float & s, int & code) {
        polar_encode_block<FMT, 1, 1>(X, Y, tab, lane, 0, sc, s, code);
    }
};

template <int FMT, class IN, class ENC>
__device__ __forceinline__ void encode_kernel(const typename IN::T * __restrict__ x, u8 * __restrict__ out,
                                              const int * __restrict__ pos, long long n_blocks, int H, int T,
                                              int NB, long long sb, long long sh, long long st, long long ob,
                                              long long oh, long long ot, int pos0) {
    typedef polar_fmt<FMT> TR;
    __shared__ float2                 tab[TR::NCODES];
    __shared__ typename ENC::scratch scratch[POLAR_ENC_WARPS];
    polar_load_codebook<FMT, 1>(tab, threadIdx.x, blockDim.x);
    __syncthreads();

    const int       lane   = threadIdx.x & 31;
    const int       warps  = blockDim.x >> 5;
    const long long stride = (long long) gridDim.x * warps;
    ENC::init(lane, &scratch[threadIdx.x >> 5]);  // what the warp's scratch keeps across its blocks
    for (long long i = (long long) blockIdx.x * warps + (threadIdx.x >> 5); i < n_blocks; i += stride) {
        const typename IN::T * xb;
        u8 *                   dst;
        encode_block_at<FMT, IN>(i, x, out, pos, H, T, NB, sb, sh, st, ob, oh, ot, pos0, xb, dst);
        float s;
        int   code;
        ENC::encode(IN::load(xb + 2 * lane), IN::load(xb + 2 * lane + 1), tab, lane, &scratch[threadIdx.x >> 5], s,
                    code);
        polar_store_block<FMT>(dst, s, code, lane);
    }
}

#define ENCODE_ENTRY(NAME, FMT, IN)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * POLAR_ENC_WARPS)                                       \
        NAME(const IN::T * __restrict__ x, u8 * __restrict__ out, const int * __restrict__ pos, long long n_blocks, \
             int H, int T, int NB, long long sb, long long sh, long long st, long long ob, long long oh,       \
             long long ot, int pos0) {                                                                       \
        encode_kernel<FMT, IN, polar_enc_default<FMT>>(x, out, pos, n_blocks, H, T, NB, sb, sh, st, ob, oh, ot, pos0); \
    }

// Latency path (few blocks, e.g. one decode step of a small batch): one CTA of POLAR_ENC_CTA_WARPS
// warps per block, warp w trying the scale candidates w, w + NW, ... and the codebook REPL copies
// wide, as ggml-cuda's SET_ROWS encodes a decode step (patch 0008, polar_encode_cta): the same
// polar_encode_block path with NW > 1, so the CuPy parity tests check that path's bytes too.
#define POLAR_ENC_CTA_WARPS 16
#define POLAR_ENC_CTA_REPL 4

template <int FMT, class IN>
__device__ __forceinline__ void encode_cta_kernel(const typename IN::T * __restrict__ x, u8 * __restrict__ out,
                                                  const int * __restrict__ pos, long long n_blocks, int H, int T,
                                                  int NB, long long sb, long long sh, long long st, long long ob,
                                                  long long oh, long long ot, int pos0) {
    typedef polar_fmt<FMT> TR;
    __shared__ float2                                      tab[TR::NCODES * POLAR_ENC_CTA_REPL];
    __shared__ polar_encode_scratch<POLAR_ENC_CTA_WARPS> scratch;
    polar_load_codebook<FMT, POLAR_ENC_CTA_REPL>(tab, threadIdx.x, blockDim.x);
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (long long i = blockIdx.x; i < n_blocks; i += gridDim.x) {
        const typename IN::T * xb;
        u8 *                   dst;
        encode_block_at<FMT, IN>(i, x, out, pos, H, T, NB, sb, sh, st, ob, oh, ot, pos0, xb, dst);
        float s;
        int   code;
        if (polar_encode_block<FMT, POLAR_ENC_CTA_WARPS, POLAR_ENC_CTA_REPL>(
                IN::load(xb + 2 * lane), IN::load(xb + 2 * lane + 1), tab, lane, warp, &scratch, s, code)) {
            polar_store_block<FMT>(dst, s, code, lane);
        }
        __syncthreads();  // scratch is reused
    }
}

#define ENCODE_CTA_ENTRY(NAME, FMT, IN)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * POLAR_ENC_CTA_WARPS)                                   \
        NAME(const IN::T * __restrict__ x, u8 * __restrict__ out, const int * __restrict__ pos, long long n_blocks, \
             int H, int T, int NB, long long sb, long long sh, long long st, long long ob, long long oh,       \
             long long ot, int pos0) {                                                                       \
        encode_cta_kernel<FMT, IN>(x, out, pos, n_blocks, H, T, NB, sb, sh, st, ob, oh, ot, pos0);           \
    }

#ifndef POLAR_ENC_RS_G  // the default module (a variant module holds only its own entries)
ENCODE_CTA_ENTRY(polar_encode_cta_polar_f32, 0, in_f32)
ENCODE_CTA_ENTRY(polar_encode_cta_polar_f16, 0, in_f16)
ENCODE_CTA_ENTRY(polar_encode_cta_polar_bf16, 0, in_bf16)
ENCODE_CTA_ENTRY(polar_encode_cta_polar3_f32, 1, in_f32)
ENCODE_CTA_ENTRY(polar_encode_cta_polar3_f16, 1, in_f16)
ENCODE_CTA_ENTRY(polar_encode_cta_polar3_bf16, 1, in_bf16)

ENCODE_ENTRY(polar_encode_polar_f32, 0, in_f32)
ENCODE_ENTRY(polar_encode_polar_f16, 0, in_f16)
ENCODE_ENTRY(polar_encode_polar_bf16, 0, in_bf16)
ENCODE_ENTRY(polar_encode_polar3_f32, 1, in_f32)
ENCODE_ENTRY(polar_encode_polar3_f16, 1, in_f16)
ENCODE_ENTRY(polar_encode_polar3_bf16, 1, in_bf16)
#endif

// ---- throughput variants of the warp path (issue 11, item 4) --------------------------------
// Compiled only when POLAR_ENC_RS_G (the group size G) is defined: cupy_kernels.codec compiles a
// module per variant (ENCODE_VARIANTS: POLAR_ENC_RS_G, _MINB) holding only its
// polar_encode_rs_<fmt>_<f32|f16>, so the default module is unchanged. Each writes the bytes of
// encode_kernel; scripts/bench_gpu.py encode --variants measures and compares them, and
// tests/encoder_emulation.py runs their search in numpy (encode_blocks(..., group=G)).
//
//  rs<G>    the 16 scale candidates in groups of G: each lane first computes its pair's error at
//           the G scales (polar_encode_lane: polar_encode_at without the block sum), then one
//           reduce-scatter butterfly sums all G at once: at step h = 16, 8, ... lane L keeps the
//           half of the remaining candidates selected by bit h of L and adds its partner's copy of
//           that half, so after log2 G steps each lane holds one candidate (k = L >> (5 - log2 G))
//           and plain butterfly steps finish it. Every candidate's sum is exactly tree32's: at each
//           level a lane adds the same two subtree sums as the xor butterfly (a + b = b + a). G - 1 +
//           5 - log2 G shuffles per group instead of 5 G. The winner of a group is the least E
//           (as bits, clamped to +inf) with the lowest k among equal ones (min over lanes, ballot,
//           lowest lane), kept only if strictly below the best so far: the first strict minimum of
//           the sequential loop. The slot of each candidate is kept as a byte per lane (two 64-bit
//           registers); (CX, CY) of the winner are read once from the table. The full search of a
//           warp without proof is a loop (not unrolled: it is rare, and unrolled it holds the
//           whole table in registers).
//  *_lb<N>  POLAR_ENC_MINB = N: __launch_bounds__(256, N), registers capped for N CTAs per SM
//           (N = 5: 48 registers).
//  *_w      POLAR_ENC_WIN_ONCE = 1: the window tables written once a warp, not once a block
//  *_n      POLAR_ENC_NOSKIP = 1: no branch around each candidate for a zero scale (its error is forced to
//           +inf after the search instead), so the compiler may interleave a group's candidates
#ifdef POLAR_ENC_RS_G

#ifndef POLAR_ENC_WIN_ONCE
#define POLAR_ENC_WIN_ONCE 0
#endif
#ifndef POLAR_ENC_NOSKIP
#define POLAR_ENC_NOSKIP 0
#endif

__device__ __forceinline__ unsigned int polar_umin(unsigned int a, unsigned int b) { return a < b ? a : b; }

// log2 of a power of two 1..32 at compile time
template <int G> struct polar_log2 {
    enum { value = 1 + polar_log2<G / 2>::value };
};
template <> struct polar_log2<1> {
    enum { value = 0 };
};

// Steps 1-6 of one block, as polar_encode_block<FMT, 1, 1> (same bytes), the scale candidates
// evaluated G at a time with one reduce-scatter block sum per group (variants above).
template <int FMT, int G>
__device__ __forceinline__ void polar_encode_block_rs(float X, float Y, const float2 * tab, int lane,
                                                      polar_cand_table * t, float & s_out, int & code_out) {
    typedef polar_fmt<FMT> TR;
    constexpr int LG = polar_log2<G>::value;
    static_assert((1 << LG) == G && G >= 2 && G <= 16 && TR::NCAND % G == 0, "G: 2, 4, 8 or 16 dividing NCAND");

    X                = polar_sanitize(X);
    Y                = polar_sanitize(Y);
    const float rmax = polar_block_rmax(X, Y);
    const float r    = polar_fsqrt(polar_fadd(polar_fmul(X, X), polar_fmul(Y, Y)));

    __syncwarp();  // the lanes are done with the warp's previous block
    const float theta = atan2f(Y, X);
    polar_build_candidates<FMT, 1, !POLAR_ENC_WIN_ONCE>(theta, tab, lane, t);  // (else written by init)
    __syncwarp();

    static_assert(TR::NCAND <= POLAR_BLOCK_PAIRS, "one scale candidate per lane");
    const float s_lane   = polar_round_scale(polar_fmul(rmax, polar_tab<FMT>::g(lane % TR::NCAND)));
    const float inv_lane = polar_finv(s_lane);

    float        best_s = 0.0f;
    unsigned int best_b = POLAR_INF_BITS;  // bits of the best E
    int          best_i = 0;               // slot
#pragma unroll 1
    for (int k0 = 0; k0 < TR::NCAND; k0 += G) {
        float              v[G];
        unsigned long long sl0 = 0ull, sl1 = 0ull;  // slot of candidate c: byte c % 8 of sl0 (c < 8) or sl1
#pragma unroll
        for (int c = 0; c < G; ++c) {
            const float s = __shfl_sync(POLAR_FULL_MASK, s_lane, k0 + c);
            v[c]          = __uint_as_float(POLAR_INF_BITS);
            // warp-uniform; a zero scale's candidate sums to +inf and never wins (POLAR_ENC_NOSKIP: searched anyway,
            // its error then discarded, so that there is no branch between a group's candidates)
            if (POLAR_ENC_NOSKIP || s != 0.0f) {
                int         slot;
                float       bx, by;
                const float e = polar_encode_lane<FMT, 1>(X, Y, r, s, __shfl_sync(POLAR_FULL_MASK, inv_lane, k0 + c),
                                                          t, lane, slot, bx, by);
                v[c]          = s != 0.0f ? e : __uint_as_float(POLAR_INF_BITS);
                if (c < 8) {
                    sl0 |= (unsigned long long) slot << (8 * c);
                } else {
                    sl1 |= (unsigned long long) slot << (8 * (c - 8));
                }
            }
        }
        // reduce-scatter: after step h = 16 >> i, lane L holds the candidates whose bits from
        // LG - 1 down to LG - 1 - i are bits 4 .. 4 - i of L
#pragma unroll
        for (int i = 0; i < LG; ++i) {
            const int  h  = 16 >> i;
            const int  m  = G >> (i + 1);
            const bool up = (lane & h) != 0;
#pragma unroll
            for (int c = 0; c < m; ++c) {
                const float send = up ? v[c] : v[m + c];
                const float keep = up ? v[m + c] : v[c];
                v[c]             = polar_fadd(keep, __shfl_xor_sync(POLAR_FULL_MASK, send, h));
            }
        }
#pragma unroll
        for (int h = 16 >> LG; h >= 1; h >>= 1) {
            v[0] = polar_fadd(v[0], __shfl_xor_sync(POLAR_FULL_MASK, v[0], h));
        }
        // lane L holds E of candidate k0 + (L >> (5 - LG)); the least bits, lowest k on ties
        const unsigned int own = polar_umin(__float_as_uint(v[0]), POLAR_INF_BITS);
        unsigned int       eb  = own;
#pragma unroll
        for (int h = 16; h >= (32 >> LG); h >>= 1) {
            eb = polar_umin(eb, __shfl_xor_sync(POLAR_FULL_MASK, eb, h));
        }
        if (eb < best_b) {  // warp-uniform
            const int    kl = (__ffs(__ballot_sync(POLAR_FULL_MASK, own == eb)) - 1) >> (5 - LG);
            best_b = eb;
            best_i = (int) (((kl < 8 ? sl0 : sl1) >> (8 * (kl & 7))) & 0xffu);
            best_s = __shfl_sync(POLAR_FULL_MASK, s_lane, k0 + kl);
        }
    }
    const float2 b0 = polar_slot_xy(t, best_i, lane);
    // step 6, as polar_encode_block
    polar_refine_finish<FMT, false>(X, Y, r, theta, t, lane, best_s, __uint_as_float(best_b), best_i, b0.x, b0.y, 0.0f,
                                    0.0f, s_out, code_out);
}

// the block encoder of encode_kernel for the rs<G> variants
template <int FMT, int G> struct polar_enc_rs {
    typedef polar_cand_table scratch;

    static __device__ __forceinline__ void init(int lane, scratch * sc) {
        if constexpr (POLAR_ENC_WIN_ONCE) {
            polar_write_windows<FMT>(lane, sc);  // once a warp: the blocks' tables rewrite only xy
        }
    }

    static __device__ __forceinline__ void encode(float X, float Y, const float2 * tab, int lane, scratch * sc,
                                                  float & s, int & code) {
        polar_encode_block_rs<FMT, G>(X, Y, tab, lane, sc, s, code);
    }
};

#ifndef POLAR_ENC_MINB
#define POLAR_ENC_MINB 1
#endif

#define ENCODE_RS_ENTRY(NAME, FMT, IN)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * POLAR_ENC_WARPS, POLAR_ENC_MINB)                       \
        NAME(const IN::T * __restrict__ x, u8 * __restrict__ out, const int * __restrict__ pos, long long n_blocks, \
             int H, int T, int NB, long long sb, long long sh, long long st, long long ob, long long oh,       \
             long long ot, int pos0) {                                                                       \
        encode_kernel<FMT, IN, polar_enc_rs<FMT, POLAR_ENC_RS_G>>(x, out, pos, n_blocks, H, T, NB, sb, sh, st, ob, oh, ot, \
                                                               pos0);                                         \
    }

// float32 and float16 input (what scripts/bench_gpu.py measures)
ENCODE_RS_ENTRY(polar_encode_rs_polar_f32, 0, in_f32)
ENCODE_RS_ENTRY(polar_encode_rs_polar_f16, 0, in_f16)
ENCODE_RS_ENTRY(polar_encode_rs_polar3_f32, 1, in_f32)
ENCODE_RS_ENTRY(polar_encode_rs_polar3_f16, 1, in_f16)

#endif  // POLAR_ENC_RS_G

#ifndef POLAR_ENC_RS_G

// ---- decoder: y[2p] = d * CX[c], y[2p+1] = d * CY[c] ----------------------------------------
// Blocks b[n][TYPE_SIZE] (contiguous) -> y[n][64]; one thread per pair.

template <int FMT, bool HALF_OUT>
__device__ __forceinline__ void decode_kernel(const u8 * __restrict__ b, void * __restrict__ y, long long n_pairs) {
    typedef polar_fmt<FMT> TR;
    __shared__ float2 tab[TR::NCODES];
    polar_load_codebook<FMT, 1>(tab, threadIdx.x, blockDim.x);
    __syncthreads();
    const long long stride = (long long) gridDim.x * blockDim.x;
    for (long long i = (long long) blockIdx.x * blockDim.x + threadIdx.x; i < n_pairs; i += stride) {
        const u8 *   blk = b + (i >> 5) * TR::TYPE_SIZE;
        const int    p   = (int) (i & 31);
        const float2 v   = polar_decode_pair(polar_block_scale(blk), tab[polar_block_code<FMT>(blk, p)]);
        if (HALF_OUT) {
            reinterpret_cast<u32 *>(y)[i] = (u32) f2h(v.x) | ((u32) f2h(v.y) << 16);
        } else {
            reinterpret_cast<float2 *>(y)[i] = v;
        }
    }
}

extern "C" __global__ void polar_decode_polar_f32(const u8 * b, void * y, long long n) { decode_kernel<0, false>(b, y, n); }
extern "C" __global__ void polar_decode_polar_f16(const u8 * b, void * y, long long n) { decode_kernel<0, true>(b, y, n); }
extern "C" __global__ void polar_decode_polar3_f32(const u8 * b, void * y, long long n) { decode_kernel<1, false>(b, y, n); }
extern "C" __global__ void polar_decode_polar3_f16(const u8 * b, void * y, long long n) { decode_kernel<1, true>(b, y, n); }

#endif
