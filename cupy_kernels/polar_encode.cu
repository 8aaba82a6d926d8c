// Polar block encoder and decoder (docs/FORMAT.md), bit-exact twin of kvpolar.codec
// (quantize_blocks / dequantize_blocks) and of quantize_row_polar_ref in the llama.cpp patch.
//
// One warp per 64-value block, lane p = pair p. tree32 (FORMAT.md) is the xor butterfly:
// lane i adds v[i ^ h] for h = 16..1, which for i < h is numpy's v[i] + v[i + h]; float
// addition being commutative, every lane ends with the same bits as numpy's v[0].
// Must be compiled with --fmad=false (no contraction) and IEEE division and square root
// (NVRTC's defaults --prec-div=true --prec-sqrt=true --ftz=false); cupy_kernels.loader does so.
//
// Addressing: the input is a 4-D view x[B][H][T][64 * NB] with element strides (sb, sh, st, 1);
// the output is a cache out[B][H][T_max][NB][TYPE_SIZE] (byte strides ob, oh, ot) written at
// positions pos[b] + t (pos == nullptr: pos0 for all b). Block i = ((b * H + h) * T + t) * NB + j.

#include "polar_common.cuh"

#define FULL_MASK 0xffffffffu

template <int FMT> struct fmt_traits;

template <> struct fmt_traits<0> {
    enum { NCODES = POLAR_NCODES, NRINGS = POLAR_NRINGS, NCAND = POLAR_NCAND, NREFINE = POLAR_NREFINE,
           TYPE_SIZE = POLAR_TYPE_SIZE };
};
template <> struct fmt_traits<1> {
    enum { NCODES = POLAR3_NCODES, NRINGS = POLAR3_NRINGS, NCAND = POLAR3_NCAND, NREFINE = POLAR3_NREFINE,
           TYPE_SIZE = POLAR3_TYPE_SIZE };
};

__constant__ float c_polar_cx[POLAR_NCODES]             = POLAR_CX_INIT;
__constant__ float c_polar_cy[POLAR_NCODES]             = POLAR_CY_INIT;
__constant__ int   c_polar_ring_n[POLAR_NRINGS]         = POLAR_RING_N_INIT;
__constant__ int   c_polar_ring_off[POLAR_NRINGS]       = POLAR_RING_OFF_INIT;
__constant__ float c_polar_ring_phi[POLAR_NRINGS]       = POLAR_RING_PHI_INIT;
__constant__ float c_polar_ring_istep[POLAR_NRINGS]     = POLAR_RING_ISTEP_INIT;
__constant__ float c_polar_g[POLAR_NCAND]               = POLAR_G_INIT;
__constant__ float c_polar3_cx[POLAR3_NCODES]           = POLAR3_CX_INIT;
__constant__ float c_polar3_cy[POLAR3_NCODES]           = POLAR3_CY_INIT;
__constant__ int   c_polar3_ring_n[POLAR3_NRINGS]       = POLAR3_RING_N_INIT;
__constant__ int   c_polar3_ring_off[POLAR3_NRINGS]     = POLAR3_RING_OFF_INIT;
__constant__ float c_polar3_ring_phi[POLAR3_NRINGS]     = POLAR3_RING_PHI_INIT;
__constant__ float c_polar3_ring_istep[POLAR3_NRINGS]   = POLAR3_RING_ISTEP_INIT;
__constant__ float c_polar3_g[POLAR3_NCAND]             = POLAR3_G_INIT;

template <int FMT> struct fmt_tables;
template <> struct fmt_tables<0> {
    static __device__ __forceinline__ const float * cx() { return c_polar_cx; }
    static __device__ __forceinline__ const float * cy() { return c_polar_cy; }
    static __device__ __forceinline__ int   ring_n(int j) { return c_polar_ring_n[j]; }
    static __device__ __forceinline__ int   ring_off(int j) { return c_polar_ring_off[j]; }
    static __device__ __forceinline__ float ring_phi(int j) { return c_polar_ring_phi[j]; }
    static __device__ __forceinline__ float ring_istep(int j) { return c_polar_ring_istep[j]; }
    static __device__ __forceinline__ float g(int k) { return c_polar_g[k]; }
};
template <> struct fmt_tables<1> {
    static __device__ __forceinline__ const float * cx() { return c_polar3_cx; }
    static __device__ __forceinline__ const float * cy() { return c_polar3_cy; }
    static __device__ __forceinline__ int   ring_n(int j) { return c_polar3_ring_n[j]; }
    static __device__ __forceinline__ int   ring_off(int j) { return c_polar3_ring_off[j]; }
    static __device__ __forceinline__ float ring_phi(int j) { return c_polar3_ring_phi[j]; }
    static __device__ __forceinline__ float ring_istep(int j) { return c_polar3_ring_istep[j]; }
    static __device__ __forceinline__ float g(int k) { return c_polar3_g[k]; }
};

__device__ __forceinline__ float tree32(float v) {
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        v = v + __shfl_xor_sync(FULL_MASK, v, h);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, h));
    }
    return v;
}

// h(v) of FORMAT.md step 3: clamp to 65504, round to binary16, back to float32.
__device__ __forceinline__ float to_half(float v) { return h2f(f2h(fminf(v, POLAR_FP16_MAX))); }

// FORMAT.md step 4 at scale s for this lane's pair: code and the block error (all lanes).
template <int FMT>
__device__ __forceinline__ void encode_at(float X, float Y, float s, const int (&cand)[2 * fmt_traits<FMT>::NRINGS],
                                          const float2 * tab, int & code, float & E) {
    const float inv = 1.0f / s;
    const float xn = X * inv;
    const float yn = Y * inv;
    float best = 0.0f;
    int   bc   = 0;
#pragma unroll
    for (int i = 0; i < 2 * fmt_traits<FMT>::NRINGS; ++i) {
        const int    c  = cand[i];
        const float2 t  = tab[c];
        const float  dx = xn - t.x;
        const float  dy = yn - t.y;
        const float  dd = dx * dx + dy * dy;
        if (i == 0 || dd < best || (dd == best && c < bc)) {
            best = dd;
            bc   = c;
        }
    }
    const float2 t  = tab[bc];
    const float  ex = X - s * t.x;
    const float  ey = Y - s * t.y;
    code = bc;
    E    = tree32(ex * ex + ey * ey);
}

template <int FMT, class IN>
__device__ __forceinline__ void encode_block(const typename IN::T * __restrict__ x, u8 * __restrict__ out,
                                             const float2 * tab, int lane) {
    typedef fmt_traits<FMT> TR;
    typedef fmt_tables<FMT> TB;

    // 1. sanitize
    float X = IN::load(x + 2 * lane);
    float Y = IN::load(x + 2 * lane + 1);
    X = X != X ? 0.0f : fminf(fmaxf(X, -POLAR_VMAX), POLAR_VMAX);
    Y = Y != Y ? 0.0f : fminf(fmaxf(Y, -POLAR_VMAX), POLAR_VMAX);

    // 2. block radius
    const float rmax = sqrtf(warp_max(X * X + Y * Y));

    // candidates of this pair: both angular neighbours on every ring
    int cand[2 * TR::NRINGS];
    {
        const float theta = atan2f(Y, X);
#pragma unroll
        for (int j = 0; j < TR::NRINGS; ++j) {
            const int n   = TB::ring_n(j);
            const int off = TB::ring_off(j);
            if (n == 1) {
                cand[2 * j] = cand[2 * j + 1] = off;
            } else {
                int k = (int) floorf((theta - TB::ring_phi(j)) * TB::ring_istep(j));
                k %= n;
                if (k < 0) {
                    k += n;
                }
                cand[2 * j]     = off + k;
                cand[2 * j + 1] = off + (k + 1 == n ? 0 : k + 1);
            }
        }
    }

    // 3.-5. scale candidates, first strict minimum of the block error
    float best_s = 0.0f;
    float best_e = __int_as_float(0x7f800000);  // +inf
    int   best_c = 0;
#pragma unroll 1
    for (int k = 0; k < TR::NCAND; ++k) {
        const float s = to_half(rmax * TB::g(k));
        if (s == 0.0f) {
            continue;  // warp-uniform
        }
        int   c;
        float E;
        encode_at<FMT>(X, Y, s, cand, tab, c, E);
        if (E < best_e) {
            best_s = s;
            best_e = E;
            best_c = c;
        }
    }

    // 6. refine
    bool active = best_e != __int_as_float(0x7f800000);
#pragma unroll 1
    for (int it = 0; it < TR::NREFINE && active; ++it) {
        const float2 t   = tab[best_c];
        const float  num = tree32(X * t.x + Y * t.y);
        const float  den = tree32(t.x * t.x + t.y * t.y);
        active           = false;
        if (den > 0.0f) {
            const float s2 = to_half(num / den);
            if (s2 > 0.0f && s2 != best_s) {
                int   c;
                float E;
                encode_at<FMT>(X, Y, s2, cand, tab, c, E);
                if (E < best_e) {
                    best_s = s2;
                    best_e = E;
                    best_c = c;
                    active = true;
                }
            }
        }
    }
    if (best_e == __int_as_float(0x7f800000)) {
        best_s = 0.0f;
        best_c = 0;
    }

    // 7. emit
    if (lane == 0) {
        // one 16-bit store (blocks are 34 or 26 bytes: d is 2-byte aligned). Two byte stores of
        // the cvt.rn.f16.f32 result were miscompiled under cupy 14.2 / NVRTC 13.2, driver 580.159
        // (H100, H200): the low byte came out as the float converted to u8.
        *reinterpret_cast<u16 *>(out) = f2h(best_s);
    }
    if (FMT == 0) {
        out[2 + lane] = (u8) best_c;
    } else {
        const int c8  = __shfl_sync(FULL_MASK, best_c, (lane + 8) & 31);
        const int c16 = __shfl_sync(FULL_MASK, best_c, (lane + 16) & 31);
        const int c24 = __shfl_sync(FULL_MASK, best_c, (lane + 24) & 31);
        if (lane < 16) {
            out[2 + lane] = (u8) ((best_c & 15) | ((c16 & 15) << 4));
        }
        if (lane < 8) {
            out[18 + lane] = (u8) ((best_c >> 4) | ((c8 >> 4) << 2) | ((c16 >> 4) << 4) | ((c24 >> 4) << 6));
        }
    }
}

template <int FMT, class IN>
__device__ __forceinline__ void encode_kernel(const typename IN::T * __restrict__ x, u8 * __restrict__ out,
                                              const int * __restrict__ pos, long long n_blocks, int H, int T,
                                              int NB, long long sb, long long sh, long long st, long long ob,
                                              long long oh, long long ot, int pos0) {
    typedef fmt_traits<FMT> TR;
    __shared__ float2 tab[TR::NCODES];
    for (int i = threadIdx.x; i < TR::NCODES; i += blockDim.x) {
        tab[i] = make_float2(fmt_tables<FMT>::cx()[i], fmt_tables<FMT>::cy()[i]);
    }
    __syncthreads();

    const int       lane   = threadIdx.x & 31;
    const int       warps  = blockDim.x >> 5;
    const long long stride = (long long) gridDim.x * warps;
    for (long long i = (long long) blockIdx.x * warps + (threadIdx.x >> 5); i < n_blocks; i += stride) {
        const int       j    = (int) (i % NB);
        long long       r    = i / NB;
        const int       t    = (int) (r % T);
        r /= T;
        const int       h    = (int) (r % H);
        const long long b    = r / H;
        const int       p    = pos ? pos[b] : pos0;
        encode_block<FMT, IN>(x + b * sb + h * sh + t * st + 64 * j,
                              out + b * ob + h * oh + (long long) (p + t) * ot + (long long) j * TR::TYPE_SIZE,
                              tab, lane);
    }
}

#define ENCODE_ENTRY(NAME, FMT, IN)                                                                           \
    extern "C" __global__ void NAME(const IN::T * __restrict__ x, u8 * __restrict__ out,                       \
                                    const int * __restrict__ pos, long long n_blocks, int H, int T, int NB,   \
                                    long long sb, long long sh, long long st, long long ob, long long oh,     \
                                    long long ot, int pos0) {                                                 \
        encode_kernel<FMT, IN>(x, out, pos, n_blocks, H, T, NB, sb, sh, st, ob, oh, ot, pos0);                \
    }

ENCODE_ENTRY(polar_encode_polar_f32, 0, in_f32)
ENCODE_ENTRY(polar_encode_polar_f16, 0, in_f16)
ENCODE_ENTRY(polar_encode_polar_bf16, 0, in_bf16)
ENCODE_ENTRY(polar_encode_polar3_f32, 1, in_f32)
ENCODE_ENTRY(polar_encode_polar3_f16, 1, in_f16)
ENCODE_ENTRY(polar_encode_polar3_bf16, 1, in_bf16)

// ---- decoder: y[2p] = d * CX[c], y[2p+1] = d * CY[c] ----------------------------------------
// Blocks b[n][TYPE_SIZE] (contiguous) -> y[n][64]; one thread per pair.

template <int FMT> __device__ __forceinline__ int block_code(const u8 * blk, int p) {
    if (FMT == 0) {
        return blk[2 + p];
    }
    const int lo = (blk[2 + (p & 15)] >> (4 * (p >> 4))) & 15;
    const int hi = (blk[18 + (p & 7)] >> (2 * (p >> 3))) & 3;
    return lo | (hi << 4);
}

template <int FMT, bool HALF_OUT>
__device__ __forceinline__ void decode_kernel(const u8 * __restrict__ b, void * __restrict__ y, long long n_pairs) {
    typedef fmt_traits<FMT> TR;
    __shared__ float2 tab[TR::NCODES];
    for (int i = threadIdx.x; i < TR::NCODES; i += blockDim.x) {
        tab[i] = make_float2(fmt_tables<FMT>::cx()[i], fmt_tables<FMT>::cy()[i]);
    }
    __syncthreads();
    const long long stride = (long long) gridDim.x * blockDim.x;
    for (long long i = (long long) blockIdx.x * blockDim.x + threadIdx.x; i < n_pairs; i += stride) {
        const long long blk_i = i >> 5;
        const int       p     = (int) (i & 31);
        const u8 *      blk   = b + blk_i * TR::TYPE_SIZE;
        const float     s     = h2f((u16) (blk[0] | (blk[1] << 8)));
        const float2    t     = tab[block_code<FMT>(blk, p)];
        const float     vx    = s * t.x;
        const float     vy    = s * t.y;
        if (HALF_OUT) {
            reinterpret_cast<u32 *>(y)[i] = (u32) f2h(vx) | ((u32) f2h(vy) << 16);
        } else {
            reinterpret_cast<float2 *>(y)[i] = make_float2(vx, vy);
        }
    }
}

extern "C" __global__ void polar_decode_polar_f32(const u8 * b, void * y, long long n) { decode_kernel<0, false>(b, y, n); }
extern "C" __global__ void polar_decode_polar_f16(const u8 * b, void * y, long long n) { decode_kernel<0, true>(b, y, n); }
extern "C" __global__ void polar_decode_polar3_f32(const u8 * b, void * y, long long n) { decode_kernel<1, false>(b, y, n); }
extern "C" __global__ void polar_decode_polar3_f16(const u8 * b, void * y, long long n) { decode_kernel<1, true>(b, y, n); }
