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

template <int FMT, class IN>
__device__ __forceinline__ void encode_kernel(const typename IN::T * __restrict__ x, u8 * __restrict__ out,
                                              const int * __restrict__ pos, long long n_blocks, int H, int T,
                                              int NB, long long sb, long long sh, long long st, long long ob,
                                              long long oh, long long ot, int pos0) {
    typedef polar_fmt<FMT> TR;
    __shared__ float2                   tab[TR::NCODES];
    __shared__ polar_encode_scratch<1> scratch[POLAR_ENC_WARPS];
    polar_load_codebook<FMT, 1>(tab, threadIdx.x, blockDim.x);
    __syncthreads();

    const int       lane   = threadIdx.x & 31;
    const int       warps  = blockDim.x >> 5;
    const long long stride = (long long) gridDim.x * warps;
    for (long long i = (long long) blockIdx.x * warps + (threadIdx.x >> 5); i < n_blocks; i += stride) {
        const typename IN::T * xb;
        u8 *                   dst;
        encode_block_at<FMT, IN>(i, x, out, pos, H, T, NB, sb, sh, st, ob, oh, ot, pos0, xb, dst);
        float s;
        int   code;
        polar_encode_block<FMT, 1, 1>(IN::load(xb + 2 * lane), IN::load(xb + 2 * lane + 1), tab, lane, 0,
                                      &scratch[threadIdx.x >> 5], s, code);
        polar_store_block<FMT>(dst, s, code, lane);
    }
}

#define ENCODE_ENTRY(NAME, FMT, IN)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * POLAR_ENC_WARPS)                                       \
        NAME(const IN::T * __restrict__ x, u8 * __restrict__ out, const int * __restrict__ pos, long long n_blocks, \
             int H, int T, int NB, long long sb, long long sh, long long st, long long ob, long long oh,       \
             long long ot, int pos0) {                                                                       \
        encode_kernel<FMT, IN>(x, out, pos, n_blocks, H, T, NB, sb, sh, st, ob, oh, ot, pos0);               \
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
