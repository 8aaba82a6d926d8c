// Split-K decode attention on tensor cores (polar_attn_mma, KMODE 0 only): the contract of
// polar_attn_simt (tensors, grid, partials: polar_attn_common.cuh), computed with
// mma.sync.m16n8k16 (f16 operands, f32 accumulation) on codebook entries gathered as half2.
//
// Each warp is an independent flash-decoding stream over warp tiles of TW keys (tiles w, w + NWARPS,
// ... of the CTA's chunk) with its own cp.async ring of STAGES stages, its own running max / sum and
// its own output accumulators; no CTA barrier in the main loop. The warps are merged at the end.
//   K phase, per 16 keys: S[key][col] = sum over the 8 k-steps of a 64-block of A x B, A = 16 keys x 16
//     (8 pairs x (x, y)) = the codebook entries (CX, CY)[code] (one half2 gather per pair, no FMA),
//     B = the query rows (pairs permuted the same way). score = sum_blocks d * 2^E * scale * S.
//     PREC 1: the codebook and q are split into fp16 hi + lo (hi + lo = the float32 value to ~2^-22);
//     the B columns hold [q_hi rows | q_lo rows], and A_hi x B + A_lo x B adds every term but lo x lo.
//   V phase, per 8 keys: out[pair][(row, xy)] += A x B with A = 16 pairs x 16 (8 keys x (x, y)) =
//     the gathered half2 entries again, B[(key, xy)][(row, xy')] = P[key][row] d[key] [xy == xy'].
//     PREC 1: 3 mma (A_hi B_hi, A_hi B_lo, A_lo B_hi).
// Fragment layouts (PTX ISA, m16n8k16 .f16): g = lane / 4, c = lane % 4;
//   A regs: (row g, k 2c..2c+1), (row g+8, k 2c..), (row g, k 2c+8..), (row g+8, k 2c+8..)
//   B regs: (k 2c..2c+1, col g), (k 2c+8..2c+9, col g);  C: (row g, col 2c, 2c+1), (row g+8, ...)
// K phase pair order: row-slot k 2c.. of k-step ks <-> pair 8c + 2ks, slot 2c+8.. <-> pair 8c + 2ks + 1.
// V phase: m-tile h of 64-block j, row g <-> pair 32j + 4g + 2h, row g+8 <-> pair 32j + 4g + 2h + 1.
//
// Compile-time constants besides those of polar_attn_common.cuh: TW, STAGES, PREC, SHARE_TAB, and the
// tuning options (cupy_kernels.attention.AttnConfig swizzle / lean / kvsplit; 0 = the kernel before
// them, same code and results):
//   SWZ 1: conflict-free shared-memory reads of the staged code words (rows of KROW % 4 == 0 bytes,
//     D >= 128). Key row r starts at word 17 r (KROW = 68 bytes at D=128), bank 17 r mod 32; in one
//     LDS of k_quads lane (g, c) reads word 17 r_g + 2 c + i, so rows g = 0..7 (banks 0, 17, 2, 19, ..)
//     collide 4-way (v_quad, lanes (g, c) on keys c: 2-way). Rows {0, 1, 8, 9, 16, 17, 24, 25} start
//     on banks {0, 17, 8, 25, 16, 1, 24, 9}: + 2 c covers all 32 banks once. So the K phase takes, in
//     each 32 keys, rows k_row(mt, kk, g) = 4 (mt & 1) + 2 kk + (g & 1) + 8 (g >> 1), quantized V takes
//     keys v_key(k8, h, c) = 8 c + (k8 & 3) + 4 h (banks 8 c + g + const), and P goes to a slot
//     (ws_slot_*) that keeps its STS and LDS conflict-free. Any bijection of the keys gives the same sums.
//   LEAN 1: full warp tiles (all TW keys valid) are staged with plain cp.async at lane + 32 k (no
//     zero-fill bookkeeping per 16-byte chunk); LEAN 2: also one dp4a per codebook address (code byte
//     x 128 + the lane's copy offset) instead of a byte extract + multiply-add.
//   KVSPLIT 1: K and V have separate rings of STAGES slots each (the same bytes as STAGES slots of K + V):
//     K(i + STAGES) is issued when K phase i is done and V(i + STAGES) when V phase i is done, so STAGES
//     1 (half the stage memory, each load overlapping the other phase) is allowed.
//   PDW 1: the softmax writes, for its key and rows, P d_j rounded to fp16 once per V block j (PREC 1:
//     also the lo parts; f16 V: P alone) in place of the float P: WN u32 words per (P slot, row), halves
//     of blocks 2w, 2w + 1 (hi parts first). Its owner lanes read d_j from the staged V row of the key
//     (KVSPLIT: the V wait moves before the softmax). The V phase then builds each B register with one
//     byte permute of a loaded word (no d loads, conversions, multiplies or shifts per key and block):
//     the same fp16 values, so the same sums. Same shared memory where WN == 1 (D <= 128, PREC 0).
//     (KVSPLIT with f16 V keeps its order: P alone needs no V bytes.)
//   SMLEAN 1: softmax cuts. With PREC 0 and RBP 4 the K phase's B columns 4..7 (zero: no lo parts)
//     repeat q's rows (QDUP), so lanes c and c + 2 compute the same scores and the shuffle that added
//     the hi and lo halves goes; P = exp2(s - m') with m' = m (0 where m = -inf: every s of the row is
//     -inf then, and exp2(-inf) = 0) instead of a test of s per score. SMLEAN 2: also no rescaling of
//     the output accumulators and l when no row's running max grew in the tile (alpha = 1 for all:
//     every lane holds every row's max, so the branch is warp-uniform). The same results.
//   PTRS 1: staging from running state: the next tile's first key and the lane's global chunk pointers
//     (advanced by NWARPS TW rows per tile; the stage calls come in tile order), full tiles (LEAN 1's
//     path, taken with PTRS whatever LEAN is) copied with constant offsets from them, instead of the
//     tile's key, bounds and addresses recomputed from its index.
//   VUNROLL 1: the V phase's loop over the TW / 8 key steps fully unrolled (instead of by 2): every
//     staged-row and P offset is a per-lane base plus a constant.
//   QSTAGE 1: the CTA's q rows are copied into shared memory (16-byte cp.async, the oldest group, issued
//     before the tables and the first stages; a row not 16-byte aligned is copied by plain loads), and the
//     q max and fragments read them there, instead of 2 + 1 dependent rounds of 2-byte global loads issued
//     behind the CTA's copies (~11 us of a ~12 us prologue at B=16 on the H200, bench_gpu.py anatomy,
//     session 18). The same q values: the same results.
//   PSHFL 1 (only where PDW, KSWZ, quantized V, 4 padded rows, VUNROLL and 32-key blocks; the plan sets it):
//     the P d words reach the V phase by warp shuffles instead of a store to and a load from the warp's P
//     slots (8 64-bit stores and 16 32-bit loads of shared memory a 64-key tile, 16 shuffles instead).
//     With the swizzled orders the V phase's key v_key(k8, h, c) is the K phase's k_row(2 (k8 >> 2) + h,
//     (k8 >> 1) & 1, 2 c + (k8 & 1)), and row r is held by lanes c' with c' & 1 = r >> 1 (both of a pair of
//     lanes c', c' ^ 2 hold rows ra, ra + 1, QDUP or not), so lane (g, c) reads row g >> 1 from lane
//     4 (2 c + (k8 & 1)) + (r >> 1) + 2 (r & 1), which offers the word of row ra where c' < 2 and of ra + 1
//     where c' >= 2. The same words into the same products: the same results.

#include "polar_attn_common.cuh"

#ifndef QSTAGE
#define QSTAGE 0
#endif

#define RBP (RB <= 4 ? 4 : 8)                  // rows padded
#define QPARTS (PREC ? 2 : 1)
#define NQT ((QPARTS * RBP + 7) / 8)           // K-phase n-tiles
#define NVT (RBP / 4)                          // V-phase n-tiles (4 rows x (x, y) each)
#define NMT (HD / 32)                          // V-phase m-tiles (16 pairs each)
#define VROWS (VQUANT ? VROW : VROW + 32)      // smem row stride of V (f16 rows padded: no bank conflicts)
#if PDW
#define NBW (VQUANT ? NB : 1)                  // P d values per (key, row): one per V block (f16 V: P)
#define WH ((NBW + 1) / 2)                     // u32 words of their hi halves
#define WN (WH * (PREC ? 2 : 1))               // u32 words per (P slot, row): hi halves, then lo halves
#else
#define WN 1                                   // one float P per (P slot, row)
#endif
// shared memory layout (bytes); cupy_kernels.attention computes MSMEM_TOTAL the same way
#define MKTAB_BYTES (KNC * 128)
#define MVTAB_BYTES ((VQUANT && !SHARE_TAB) ? VNC * 128 : 0)
#define WKST ALIGN16(TW * KROW)
#define WVST ALIGN16(TW * VROWS)
#define WST (WKST + WVST)
#define MSTAGE_BYTES (NWARPS * STAGES * WST)
#define MRED_BYTES (NWARPS * RBP * HD * 4)
#define MOFF_KTAB 0
#define MOFF_VTAB (MOFF_KTAB + ALIGN16(MKTAB_BYTES))
#define MOFF_STAGE (MOFF_VTAB + ALIGN16(MVTAB_BYTES))
#define MOFF_WS (MOFF_STAGE + ALIGN16(MSTAGE_BYTES > MRED_BYTES ? MSTAGE_BYTES : MRED_BYTES))
#define MWS_BYTES (PSH ? RBP * 4 : NWARPS * TW * RBP * 4 * WN)  // P slots (PSH: none, the epilogue's l)
#define MOFF_ML (MOFF_WS + ALIGN16(MWS_BYTES))
#define QES (QT == 0 ? 4 : 2)                  // bytes of a q element
#define MQS_BYTES (QSTAGE ? RB * HD * QES : 0)   // QSTAGE: the CTA's q rows as they are in memory
#define MOFF_QS (MOFF_ML + ALIGN16(NWARPS * RBP * 4 * 2))
#define MSMEM_TOTAL (MOFF_QS + ALIGN16(MQS_BYTES))

static_assert(TW % 16 == 0, "warp tile must be a multiple of 16 keys");
static_assert(RB <= 8, "at most 8 rows per CTA");
static_assert(STAGES >= (KVSPLIT ? 1 : 2), "STAGES >= 2 (>= 1 with KVSPLIT)");

#define QDUP (SMLEAN && !PREC && RBP == 4)               // q rows repeated in the zero B columns
#define KSWZ (SWZ && KROW % 4 == 0)                      // the swizzle pays off for 4-byte aligned rows
#ifndef PSHFL
#define PSHFL 0
#endif
#define PSH PSHFL  // P d by shuffles (cupy_kernels.attention.pshfl_applies sets it only where it can)
static_assert(!PSHFL || (PDW && KSWZ && VQUANT && RBP == 4 && VUNROLL && TW % 32 == 0),
              "PSHFL needs PDW, KSWZ, quantized V, 4 padded rows, VUNROLL and 32-key blocks");
#define FULL32(blk) (TW % 32 == 0 || 32 * (blk) + 32 <= TW)  // keys 32 blk .. 32 blk + 31 in the tile

// Key row (of the warp tile) of the K phase's m-tile mt, A rows g (kk 0) / g + 8 (kk 1).
__device__ __forceinline__ int k_row(int mt, int kk, int g) {
#if KSWZ
    if (FULL32(mt >> 1)) {
        return 32 * (mt >> 1) + 4 * (mt & 1) + 2 * kk + (g & 1) + 8 * (g >> 1);
    }
    return 16 * mt + 4 * kk + (g & 1) + 8 * ((g >> 1) & 1) + 2 * (g >> 2);  // a last 16 keys: 2-way
#else
    return mt * 16 + g + 8 * kk;
#endif
}

// Key of the V phase's step k8 (8 keys), B slot c (h 0) / c + 4 (h 1).
__device__ __forceinline__ int v_key(int k8, int h, int c) {
#if KSWZ && VQUANT
    if (FULL32(k8 >> 2)) {
        return 32 * (k8 >> 2) + 8 * c + (k8 & 3) + 4 * h;
    }
#endif
    return 8 * k8 + c + 4 * h;
}

// Slot of P (ws [TW][RBP]) of key k_row(mt, kk, g) / v_key(k8, h, c): one bijection of the keys;
// with SWZ, bits (b4..b0) of key 32 b + r go to (b2 b1 b0 b4 b3) (quantized V) or to
// (b4 b2 b3 b1^b4 b0) (f16 V, whose V order stays 8 k8 + c), so both sides are conflict-free.
__device__ __forceinline__ int ws_slot_k(int mt, int kk, int g) {
#if KSWZ
    if (FULL32(mt >> 1)) {
#if VQUANT
        return 32 * (mt >> 1) + 16 * (mt & 1) + 8 * kk + 4 * (g & 1) + (g >> 1);
#else
        return 32 * (mt >> 1) + 8 * (mt & 1) + (g & 1) + 2 * (kk ^ (g >> 2)) + 4 * ((g >> 1) & 1) + 16 * (g >> 2);
#endif
    }
#endif
    return k_row(mt, kk, g);
}
__device__ __forceinline__ int ws_slot_v(int k8, int h, int c) {
#if KSWZ
    if (FULL32(k8 >> 2)) {
#if VQUANT
        return 32 * (k8 >> 2) + 4 * (k8 & 3) + 16 * h + c;
#else
        return 32 * (k8 >> 2) + (c ^ (k8 & 2)) + 4 * (k8 & 1) + 8 * h + 8 * (k8 & 2);
#endif
    }
#endif
    return v_key(k8, h, c);
}

#if PREC
typedef uint2 tab_t;  // (hi half2, lo half2)
#define TAB_LANE_OFF(lane) (((lane) & 15) * 8)
#else
typedef u32 tab_t;  // hi half2
#define TAB_LANE_OFF(lane) ((lane) * 4)
#endif

__device__ __forceinline__ u32 tab_hi(const uint2 e) { return e.x; }
__device__ __forceinline__ u32 tab_hi(const u32 e) { return e; }
__device__ __forceinline__ u32 tab_lo(const uint2 e) { return e.y; }
__device__ __forceinline__ u32 tab_lo(const u32) { return 0u; }

// entry of code `code` (the lane's own copy): tl = table + TAB_LANE_OFF(lane)
__device__ __forceinline__ tab_t tab_get(const u8 * tl, u32 code) { return *reinterpret_cast<const tab_t *>(tl + code * 128u); }

__device__ __forceinline__ u32 dp4a(u32 a, u32 b, u32 c) {
    u32 d;
    asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// entry of the code in bits sh .. sh + 7 of x: tab = the table, lo = TAB_LANE_OFF(lane), tl = tab + lo
__device__ __forceinline__ tab_t tab_code(const u8 * tab, u32 lo, const u8 * tl, u32 x, int sh) {
#if LEAN >= 2
    return *reinterpret_cast<const tab_t *>(tab + dp4a(x, 128u << sh, lo));  // code * 128 + lo
#else
    return tab_get(tl, bfe(x, sh, 8));
#endif
}

template <bool B> struct bool_c {
    static constexpr bool value = B;
};

__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16_zfill(u32 dst, const void * src, u32 nbytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(nbytes));
}

__device__ __forceinline__ u32 pack_h2(u16 lo, u16 hi) { return (u32) lo | ((u32) hi << 16); }

// (fp16 lo, fp16 hi) in one cvt (the same round-to-nearest-even as two f2h)
__device__ __forceinline__ u32 f2h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// float2 -> (hi half2, lo half2) with hi + lo ~ v
__device__ __forceinline__ void split_h2(float x, float y, u32 & hi, u32 & lo) {
    const u16 hx = f2h(x), hy = f2h(y);
    hi = pack_h2(hx, hy);
    lo = pack_h2(f2h(x - h2f(hx)), f2h(y - h2f(hy)));
}

template <int N> __device__ __forceinline__ float sel_arr(const float (&a)[N], int i) {
    float v = a[0];
#pragma unroll
    for (int k = 1; k < N; ++k) {
        v = i == k ? a[k] : v;
    }
    return v;
}
template <int N> __device__ __forceinline__ int sel_arr(const int (&a)[N], int i) {
    int v = a[0];
#pragma unroll
    for (int k = 1; k < N; ++k) {
        v = i == k ? a[k] : v;
    }
    return v;
}

// K phase: the codes of pairs 8c .. 8c+7 of one block (quads 2c, 2c+1), block at byte `off`
template <int FMT> __device__ __forceinline__ void k_quads(const u8 * st, u32 off, int c, u32 (&w)[2]);
template <> __device__ __forceinline__ void k_quads<POLAR_KERNEL_ID>(const u8 * st, u32 off, int c, u32 (&w)[2]) {
    lds_words_a2<2>(st, off + 2 + 8 * c, w);
}
template <> __device__ __forceinline__ void k_quads<POLAR3_KERNEL_ID>(const u8 * st, u32 off, int c, u32 (&w)[2]) {
    u32 qs[2], qh[2];
    lds_words_a2<2>(st, off + 2 + 8 * (c & 1), qs);  // qs words 2(c&1), 2(c&1)+1
    lds_words_a2<2>(st, off + 18, qh);
    const int s4 = 4 * (c >> 1), s2 = 2 * c;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        w[i] = ((qs[i] >> s4) & 0x0F0F0F0Fu) | (((qh[i] >> s2) & 0x03030303u) << 4);
    }
}

#if PDW
// n consecutive u32 words at p (n * 4-byte aligned) in vector loads
template <int N> __device__ __forceinline__ void lds_vec(const u32 * p, u32 (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            const uint4 v = *reinterpret_cast<const uint4 *>(p + i);
            w[i] = v.x, w[i + 1] = v.y, w[i + 2] = v.z, w[i + 3] = v.w;
        }
    } else if constexpr (N == 2) {
        const uint2 v = *reinterpret_cast<const uint2 *>(p);
        w[0] = v.x, w[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            w[i] = p[i];
        }
    }
}

// PDW: the words of rows ra, ra + 1 (P = pa, pb) of the key whose staged V row starts at byte vrow of
// vst, in w (2 WN words, row ra's then row ra + 1's)
__device__ __forceinline__ void pdw_words(u32 (&w)[2 * WN], const u8 * vst, u32 vrow, float pa, float pb) {
#pragma unroll
    for (int jj = 0; jj < WH; ++jj) {
        float x[2][2];  // [row][j & 1]
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int j = 2 * jj + e;
#if VQUANT
            const float dv = j < NBW ? h2f(lds_u16(vst, vrow + j * VTS)) : 0.0f;
#else
            const float dv = j < NBW ? 1.0f : 0.0f;
#endif
            x[0][e] = pa * dv;
            x[1][e] = pb * dv;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#if PREC
            const u16 h0 = f2h(x[r][0]), h1 = f2h(x[r][1]);
            w[r * WN + jj]      = pack_h2(h0, h1);
            w[r * WN + WH + jj] = f2h2(x[r][0] - h2f(h0), x[r][1] - h2f(h1));
#else
            w[r * WN + jj] = f2h2(x[r][0], x[r][1]);
#endif
        }
    }
}

// PDW: pdw_words to dst = the (slot, ra) entry if `store` (computed by every lane: only the store is
// predicated, no branch)
__device__ __forceinline__ void write_pdw(u32 * dst, const u8 * vst, u32 vrow, float pa, float pb, bool store) {
    u32 w[2 * WN];
    pdw_words(w, vst, vrow, pa, pb);
    if (!store) {
        return;
    }
    if constexpr (2 * WN % 4 == 0) {
#pragma unroll
        for (int i = 0; i < 2 * WN; i += 4) {
            *reinterpret_cast<uint4 *>(dst + i) = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
        }
    } else {
        *reinterpret_cast<uint2 *>(dst) = make_uint2(w[0], w[1]);
    }
}
#endif

// The warps' partials of row r merged: M = max_w m_w and sum_w 2^(m_w - M) x(w) over the warps
// with m_w > -inf (0 if there are none); mw = m [NWARPS][RBP].
template <class X> __device__ __forceinline__ float merge_warps(const float * mw, int r, float & M, X x) {
    M = NEG_INF;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
        M = fmaxf(M, mw[w * RBP + r]);
    }
    float sum = 0.0f;
    if (M != NEG_INF) {
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) {
            const float mv = mw[w * RBP + r];
            if (mv != NEG_INF) {
                sum += exp2f(mv - M) * x(w);
            }
        }
    }
    return sum;
}

// KVSPLIT exists for occupancy: where the shared memory allows 3 or more CTAs per SM (sm_90: 228 KiB
// per SM, 1 KiB reserved per CTA), ptxas is asked for them, as far as 80 registers a thread (what the
// kernel takes unasked) allow; otherwise (and always without KVSPLIT) it is not asked. MMA_CTAS
// (AttnConfig.ctas) > 0 asks for that many instead (1: no minimum).
#define SMEM_CTAS (233472 / (MSMEM_TOTAL + 1024))
#define REG_CTAS (65536 / (80 * NTHREADS))
#define MIN_CTAS (SMEM_CTAS < REG_CTAS ? SMEM_CTAS : REG_CTAS)
#if defined(MMA_CTAS) && MMA_CTAS > 0  // AttnConfig.ctas: asked for by the caller instead
#define MMA_LAUNCH_BOUNDS __launch_bounds__(NTHREADS, MMA_CTAS)
#elif KVSPLIT && MIN_CTAS >= 3
#define MMA_LAUNCH_BOUNDS __launch_bounds__(NTHREADS, MIN_CTAS)
#else
#define MMA_LAUNCH_BOUNDS __launch_bounds__(NTHREADS)
#endif

// CTA_TIMES N > 0 (AttnConfig.cta_times, instrumentation only; scripts/bench_gpu.py anatomy reads it): thread 0
// of each CTA (linear index x + gridDim.x (y + gridDim.y z) < N) writes %globaltimer (ns) at entry (mark 0),
// after issuing the table and first-stage copies (1), after building its q fragments (2), when the tables
// have landed (3), when every warp's main loop is done (4), after the partials are written (5), and its SM
// (slot 6), to polar_attn_cta_times [N][7]
#ifndef CTA_TIMES
#define CTA_TIMES 0
#endif
#if CTA_TIMES
__device__ unsigned long long polar_attn_cta_times[CTA_TIMES * 7];
__device__ __forceinline__ void cta_mark(int k) {
    const unsigned cid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (threadIdx.x == 0 && cid < CTA_TIMES) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        polar_attn_cta_times[cid * 7 + k] = t;
        if (k == 0) {
            unsigned sm;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            polar_attn_cta_times[cid * 7 + 6] = sm;
        }
    }
}
#define CTA_MARK(k) cta_mark(k)
#else
#define CTA_MARK(k)
#endif

// OUT_TYPE (cupy_kernels.attention.run, for a launch of one split into a contiguous output; absent: -1): 0
// float32, 1 float16, 2 bfloat16. Then o_part is the output [B][Hq][Tq][HD] of that type, and each CTA writes
// its final rows there, o / l (0 for a row without keys), at the index its partial would have (with one split,
// row z R + r is (b, hq, tq)); no m / l, and no combine kernel. The same operations as the combine's on one
// split (weight 2^0 = 1), so the same values. A define, not an argument: with a run-time choice ptxas
// allocated the main loop differently (nvcc 13.0, commit 81d0fef: 1676 instructions a 64-key tile, not 1643).
#ifndef OUT_TYPE
#define OUT_TYPE (-1)
#endif

extern "C" __global__ void MMA_LAUNCH_BOUNDS polar_attn_mma(POLAR_ATTN_PARAMS) {
    extern __shared__ __align__(16) u8 smem[];
    CTA_MARK(0);
    const int      tid  = threadIdx.x;
    const int      lane = tid & 31;
    const int      warp = tid >> 5;
    const int      g    = lane >> 2;
    const int      c    = lane & 3;
    const attn_cta cta  = attn_cta_get(lens, Hkv, G, Tq, chunk);
    const int      r0 = cta.r0, z = cta.z, R = cta.R, c0 = cta.c0, c1 = cta.c1;

    if (c0 >= c1) {
#if OUT_TYPE >= 0
        for (int e = tid; e < RB * HD; e += NTHREADS) {
            if (r0 + e / HD < R) {
                store_out(o_part, cta.part(e / HD) * HD + e % HD, 0.0f, OUT_TYPE);
            }
        }
#else
        attn_write_empty(cta, tid, o_part, m_part, l_part);
#endif
        return;
    }

    const u8 * kbase = kc + (long long) z * T_max * KROW;
    const u8 * vbase = vc + (long long) z * T_max * VROW;
    const int  ntw   = (c1 - c0 + TW - 1) / TW;                                 // warp tiles in the chunk
    const int  nmine = ntw > warp ? (ntw - warp + NWARPS - 1) / NWARPS : 0;     // this warp's
    u8 *       wstage = smem + MOFF_STAGE + warp * (STAGES * WST);
    // the warp's cp.async ring: slot s = K at wstage + s * WST, V after it; KVSPLIT: a ring of K
    // slots (wstage + s * WKST), then one of V slots (wstage + STAGES * WKST + s * WVST)
#if KVSPLIT
#define KSLOT(i) (wstage + ((i) % STAGES) * WKST)
#define VSLOT(i) (wstage + STAGES * WKST + ((i) % STAGES) * WVST)
#else
#define KSLOT(i) (wstage + ((i) % STAGES) * WST)
#define VSLOT(i) (KSLOT(i) + WKST)
#endif

    // stage the K / V rows of a warp tile (keys t0 .. t0 + nvalid - 1 valid: the bytes past them are
    // zero-filled); LEAN: a full tile (nvalid == TW) without the zero-fill bookkeeping
#define STAGE_K_ZFILL(kdst, ksrc, nvalid)                                            \
    {                                                                                \
        const int kvb = (nvalid) * KROW;                                             \
        for (int ch = lane; ch < TW * KROW / 16; ch += 32) {                         \
            const int n = min(max(kvb - 16 * ch, 0), 16);                            \
            cp_async16_zfill((kdst) + 16 * ch, n ? (ksrc) + 16 * ch : kc, n);        \
        }                                                                            \
    }
#if VQUANT
#define V_CHUNK_DST(vdst, ch) ((vdst) + 16 * (ch))
#else  // float16 V rows padded to VROWS bytes
#define V_CHUNK_DST(vdst, ch) ((vdst) + ((ch) / (VROW / 16)) * VROWS + ((ch) % (VROW / 16)) * 16)
#endif
#define STAGE_V_ZFILL(vdst, vsrc, nvalid)                                            \
    {                                                                                \
        const int vvb = (nvalid) * VROW;                                             \
        for (int ch = lane; ch < TW * VROW / 16; ch += 32) {                         \
            const int n = min(max(vvb - 16 * ch, 0), 16);                            \
            const u32 d = V_CHUNK_DST(vdst, ch);                                     \
            cp_async16_zfill(d, n ? (vsrc) + 16 * ch : vc, n);                       \
        }                                                                            \
    }
#if LEAN
    // chunk ch = lane + 32 k of a full tile (a V row is VROW / 16 = HD / 8 chunks, a divisor of 32)
    auto stage_k_full = [&](u32 kdst, const u8 * ksrc) {
#pragma unroll
        for (int k = 0; k < (TW * KROW / 16 + 31) / 32; ++k) {
            const int ch = lane + 32 * k;
            if ((TW * KROW / 16) % 32 == 0 || ch < TW * KROW / 16) {
                cp_async16(kdst + 16 * ch, ksrc + 16 * ch);
            }
        }
    };
    auto stage_v_full = [&](u32 vdst, const u8 * vsrc) {
#pragma unroll
        for (int k = 0; k < (TW * VROW / 16 + 31) / 32; ++k) {
            const int ch = lane + 32 * k;
            if ((TW * VROW / 16) % 32 == 0 || ch < TW * VROW / 16) {
#if VQUANT
                const u32 d = vdst + 16 * ch;
#else
                const u32 d = vdst + (lane / (VROW / 16) + k * (32 / (VROW / 16))) * VROWS + (lane % (VROW / 16)) * 16;
#endif
                cp_async16(d, vsrc + 16 * ch);
            }
        }
    };
#endif
#if PTRS
    // running staging state: the first key of the next K (V) tile to stage and the lane's first chunk
    // of it in global memory (issue / issue_k / issue_v are called in the order of i); a full tile is
    // staged from the lane's pointers with constant offsets (chunk lane + 32 k: 512 k bytes on)
    int        pk_t = c0 + warp * TW;
    const u8 * pk_s = kbase + (long long) pk_t * KROW + 16 * lane;
    const u8 * pv_s = vbase + (long long) pk_t * VROW + 16 * lane;
#if KVSPLIT
    int pv_t = pk_t;
#endif
#if VQUANT
    const u32 vlane = 16 * lane;  // the lane's chunk 0 in a V slot, and chunk k's offset from it
#define V_LANE_STEP 512
#else
    const u32 vlane = (lane / (VROW / 16)) * VROWS + (lane % (VROW / 16)) * 16;
#define V_LANE_STEP ((32 / (VROW / 16)) * VROWS)
#endif
    auto stage_k_lane = [&](u32 kdl, const u8 * ksl) {
#pragma unroll
        for (int k = 0; k < (TW * KROW / 16 + 31) / 32; ++k) {
            if ((TW * KROW / 16) % 32 == 0 || lane + 32 * k < TW * KROW / 16) {
                cp_async16(kdl + 512 * k, ksl + 512 * k);
            }
        }
    };
    auto stage_v_lane = [&](u32 vdl, const u8 * vsl) {
#pragma unroll
        for (int k = 0; k < (TW * VROW / 16 + 31) / 32; ++k) {
            if ((TW * VROW / 16) % 32 == 0 || lane + 32 * k < TW * VROW / 16) {
                cp_async16(vdl + V_LANE_STEP * k, vsl + 512 * k);
            }
        }
    };
#endif
#if KVSPLIT
    // stage K (is_v: bool_c<false>) or V (bool_c<true>) of warp tile i into its ring
    auto issue_kv = [&](auto is_v, int i) {
        constexpr bool IS_V = decltype(is_v)::value;
#if PTRS
        int &        pt  = IS_V ? pv_t : pk_t;
        const u8 *&  ps  = IS_V ? pv_s : pk_s;
        const u32    pd  = smem_u32(IS_V ? VSLOT(i) : KSLOT(i));
        if (pt + TW <= c1) {
            if constexpr (IS_V) {
                stage_v_lane(pd + vlane, ps);
            } else {
                stage_k_lane(pd + 16 * lane, ps);
            }
        } else {
            const int nvalid = min(TW, c1 - pt);
            if constexpr (IS_V) {
                STAGE_V_ZFILL(pd, vbase + (long long) pt * VROW, nvalid)
            } else {
                STAGE_K_ZFILL(pd, kbase + (long long) pt * KROW, nvalid)
            }
        }
        pt += NWARPS * TW;
        ps += NWARPS * TW * (IS_V ? VROW : KROW);
        return;
#endif
        const int      t0     = c0 + (warp + i * NWARPS) * TW;
        const int      nvalid = min(TW, c1 - t0);
        const u32      dst    = smem_u32(IS_V ? VSLOT(i) : KSLOT(i));
        const u8 *     src    = IS_V ? vbase + (long long) t0 * VROW : kbase + (long long) t0 * KROW;
#if LEAN
        if (nvalid == TW) {
            if constexpr (IS_V) {
                stage_v_full(dst, src);
            } else {
                stage_k_full(dst, src);
            }
            return;
        }
#endif
        if constexpr (IS_V) {
            STAGE_V_ZFILL(dst, src, nvalid)
        } else {
            STAGE_K_ZFILL(dst, src, nvalid)
        }
    };
    auto issue_k = [&](int i) { issue_kv(bool_c<false>(), i); };
    auto issue_v = [&](int i) { issue_kv(bool_c<true>(), i); };
#else
    // stage warp tile i (keys t0 .. t0 + TW - 1)
    auto issue = [&](int i) {
#if PTRS
        {
            const u32 kd = smem_u32(wstage + (i % STAGES) * WST);
            if (pk_t + TW <= c1) {
                stage_k_lane(kd + 16 * lane, pk_s);
                stage_v_lane(kd + WKST + vlane, pv_s);
            } else {
                const int nvalid = min(TW, c1 - pk_t);
                STAGE_K_ZFILL(kd, kbase + (long long) pk_t * KROW, nvalid)
                STAGE_V_ZFILL(kd + WKST, vbase + (long long) pk_t * VROW, nvalid)
            }
            pk_t += NWARPS * TW;
            pk_s += NWARPS * TW * KROW;
            pv_s += NWARPS * TW * VROW;
            return;
        }
#endif
        const int  t0     = c0 + (warp + i * NWARPS) * TW;
        const int  nvalid = min(TW, c1 - t0);
        u8 *       kst    = wstage + (i % STAGES) * WST;
        const u32  kdst   = smem_u32(kst);
        const u32  vdst   = kdst + WKST;
        const u8 * ksrc   = kbase + (long long) t0 * KROW;
        const u8 * vsrc   = vbase + (long long) t0 * VROW;
#if LEAN
        if (nvalid == TW) {
            stage_k_full(kdst, ksrc);
            stage_v_full(vdst, vsrc);
            return;
        }
#endif
        STAGE_K_ZFILL(kdst, ksrc, nvalid)
        STAGE_V_ZFILL(vdst, vsrc, nvalid)
    };
#endif
#if QSTAGE
    // the q rows first, a group of their own (the oldest): RB rows of HD elements, 16 bytes a copy
    {
        constexpr int QCH = HD * QES / 16;  // 16-byte chunks a row
        const u32     qs  = smem_u32(smem + MOFF_QS);
        for (int e = tid; e < RB * QCH; e += NTHREADS) {
            const int r = e / QCH, ch = e % QCH;
            if (r0 + r < R) {
                const u8 * src = reinterpret_cast<const u8 *>(q) + cta.q_row(r0 + r, sqb, sqh, sqt) * QES + 16 * ch;
                if ((reinterpret_cast<unsigned long long>(src) & 15) == 0) {
                    cp_async16(qs + (r * QCH + ch) * 16, src);
                } else {  // a row not 16-byte aligned (a strided view): element by element
                    for (int i = 0; i < 16; i += QES) {
                        if (QES == 4) {
                            *reinterpret_cast<u32 *>(smem + MOFF_QS + (r * QCH + ch) * 16 + i) =
                                *reinterpret_cast<const u32 *>(src + i);
                        } else {
                            *reinterpret_cast<u16 *>(smem + MOFF_QS + (r * QCH + ch) * 16 + i) =
                                *reinterpret_cast<const u16 *>(src + i);
                        }
                    }
                }
            }
        }
        cp_async_commit();
    }
#endif
    // codebook tables, prebuilt by cupy_kernels.codec in the shared-memory layout (entry (hi half2
    // [, lo half2]) of code k, copy l at byte k * 128 + TAB_LANE_OFF(l)): one cp.async group of
    // their own (the oldest), overlapping the first K/V stages
    {
        const u32 kt = smem_u32(smem + MOFF_KTAB);
        for (int ch = tid; ch < MKTAB_BYTES / 16; ch += NTHREADS) {
            cp_async16(kt + 16 * ch, reinterpret_cast<const u8 *>(ktab_g) + 16 * ch);
        }
#if VQUANT && !SHARE_TAB
        const u32 vt = smem_u32(smem + MOFF_VTAB);
        for (int ch = tid; ch < MVTAB_BYTES / 16; ch += NTHREADS) {
            cp_async16(vt + 16 * ch, reinterpret_cast<const u8 *>(vtab_g) + 16 * ch);
        }
#endif
        cp_async_commit();
    }
#if KVSPLIT
    // groups: tables, K0, V0, K1, V1, .. K(STAGES-1), V(STAGES-1); then K(i + STAGES) after K phase i,
    // V(i + STAGES) after V phase i: 2 STAGES - 1 groups are younger than the one each phase waits for
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        if (s < nmine) {
            issue_k(s);
        }
        cp_async_commit();
        if (s < nmine) {
            issue_v(s);
        }
        cp_async_commit();
    }
#define TAB_WAIT (2 * STAGES)
#else
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nmine) {
            issue(s);
        }
        cp_async_commit();
    }
#define TAB_WAIT (STAGES - 1)
#endif
    CTA_MARK(1);
    const u8 * ktl = smem + MOFF_KTAB + TAB_LANE_OFF(lane);
#if VQUANT
    const u8 * vtl = smem + (SHARE_TAB ? MOFF_KTAB : MOFF_VTAB) + TAB_LANE_OFF(lane);
#endif
    // LEAN 2: the tables and this lane's copy offset apart (one dp4a per address)
    const u32  ktlo = TAB_LANE_OFF(lane);
    const u8 * ktab = smem + MOFF_KTAB;
#if VQUANT
    const u8 * vtab = smem + (SHARE_TAB ? MOFF_KTAB : MOFF_VTAB);
#endif

    // q: a power-of-two normalization 2^-E (max |q| of the CTA's rows < 1, so fp16 never overflows),
    // then this lane's B fragments. score = fac * sum_blocks d * S, fac = scale * log2(e) * 2^E.
#if QSTAGE
    cp_async_wait<TAB_WAIT + 1>();  // the q group (the oldest) has landed
    __syncthreads();                // (and the rows copied element by element)
    const void * qsrc = smem + MOFF_QS;  // row r0 + r at element r * HD
#endif
    float qmax = 0.0f;
    for (int e = lane; e < RB * HD; e += 32) {
        const int rr = r0 + e / HD;
        if (rr < R) {
#if QSTAGE
            qmax = fmaxf(qmax, fabsf(load_q(qsrc, e)));
#else
            qmax = fmaxf(qmax, fabsf(load_q(q, cta.q_row(rr, sqb, sqh, sqt) + e % HD)));
#endif
        }
    }
#pragma unroll
    for (int h = 16; h >= 1; h >>= 1) {
        qmax = fmaxf(qmax, __shfl_xor_sync(0xffffffffu, qmax, h));
    }
    int qexp = 0;
    if (qmax > 0.0f && qmax <= 3.0e38f) {
        frexpf(qmax, &qexp);
        qexp = max(min(qexp, 120), -120);
    }
    const float qnorm = __int_as_float((127 - qexp) << 23);
    const float fac   = scale_log2 * __int_as_float((127 + qexp) << 23);

    u32 qf[NB][4][NQT][2];
#pragma unroll
    for (int t = 0; t < NQT; ++t) {
        const int col  = 8 * t + g;
        const int part = col / RBP;
        const int r    = col % RBP;
        const int rr   = r0 + r;
        const bool ok  = r < RB && rr < R && (part < QPARTS || QDUP);
#if QSTAGE
        const void *    qb   = qsrc;
        const long long qoff = (long long) r * HD;
#else
        const void * qb   = q;
        long long    qoff = 0;
        if (ok) {
            qoff = cta.q_row(rr, sqb, sqh, sqt);
        }
#endif
#pragma unroll
        for (int j = 0; j < NB; ++j) {
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int p = 32 * j + 8 * c + 2 * ks + e;
                    u32 v = 0;
                    if (ok) {
                        u32 hi, lo;
                        split_h2(load_q(qb, qoff + 2 * p) * qnorm, load_q(qb, qoff + 2 * p + 1) * qnorm, hi, lo);
                        v = (part == 0 || QDUP) ? hi : lo;
                    }
                    qf[j][ks][t][e] = v;
                }
            }
        }
    }

    CTA_MARK(2);
    // rows of this lane in the K phase (ra, ra + 1); owner lanes write P and l
#if RBP == 4
    const int  ra    = 2 * (c & 1);
    const bool owner = c < 2;
#else
    const int  ra    = 2 * c;
    const bool owner = true;
#endif
    int lim_a, lim_b;  // key t is visible to row r iff t < lim
    {
        const int rra = r0 + ra, rrb = r0 + ra + 1;
        lim_a = (ra < RB && rra < R) ? cta.limit(rra) : 0;
        lim_b = (ra + 1 < RB && rrb < R) ? cta.limit(rrb) : 0;
    }

    float m_run[RBP];
#pragma unroll
    for (int r = 0; r < RBP; ++r) {
        m_run[r] = NEG_INF;
    }
    float l_a = 0.0f, l_b = 0.0f;
    float acc[NMT][NVT][4];
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NVT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[mt][nt][e] = 0.0f;
            }
        }
    }
#if !PSH  // (PSH: the P d words go by shuffles; MOFF_WS holds no P slots)
    float * ws = reinterpret_cast<float *>(smem + MOFF_WS) + warp * TW * RBP * WN;  // P [TW][RBP]
#endif
#if PDW
#if !PSH
    u32 *     wsw   = reinterpret_cast<u32 *>(ws);  // PDW: P d [TW][RBP][WN]
#endif
    const u32 psel0 = (g & 1) ? 0x1044u : 0x4410u;  // byte permutes: half 0 / 1 of a word to half g & 1
    const u32 psel1 = (g & 1) ? 0x3244u : 0x4432u;
#endif

    cp_async_wait<TAB_WAIT>();  // the table group (the oldest) has landed
    __syncthreads();             // tables ready
    CTA_MARK(3);

#pragma unroll 1
    for (int i = 0; i < nmine; ++i) {
#if KVSPLIT
        cp_async_wait<2 * STAGES - 1>();  // K(i)
        __syncwarp();
#else
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        if (i + STAGES - 1 < nmine) {
            issue(i + STAGES - 1);
        }
        cp_async_commit();
#endif

        const u8 * kst = KSLOT(i);
        const u8 * vst = VSLOT(i);
        const int  t0  = c0 + (warp + i * NWARPS) * TW;

        // ---- K phase ----------------------------------------------------------------------------
        float s[TW / 16][2][2];  // [m-tile][key g, g+8][row ra, ra+1]
#pragma unroll
        for (int mt = 0; mt < TW / 16; ++mt) {
#if KSWZ
            const u32 rowg  = (u32) k_row(mt, 0, g) * KROW;
            const u32 rowg8 = (u32) k_row(mt, 1, g) * KROW;
#else
            const u32 rowg  = (u32) (mt * 16 + g) * KROW;  // k_row(mt, 0, g) * KROW
            const u32 rowg8 = rowg + 8 * KROW;
#endif
            float     sc[NQT][4];
#pragma unroll
            for (int t = 0; t < NQT; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    sc[t][e] = 0.0f;
                }
            }
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                const float dg  = h2f(lds_u16(kst, rowg + j * KTS));
                const float dg8 = h2f(lds_u16(kst, rowg8 + j * KTS));
                u32 wa[2], wb[2];
                k_quads<KFMT>(kst, rowg + j * KTS, c, wa);
                k_quads<KFMT>(kst, rowg8 + j * KTS, c, wb);
                float C[NQT][4];
#pragma unroll
                for (int t = 0; t < NQT; ++t) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        C[t][e] = 0.0f;
                    }
                }
#pragma unroll
                for (int ks = 0; ks < 4; ++ks) {
                    const u32   xa = wa[ks >> 1], xb = wb[ks >> 1];
                    const int   sh = 16 * (ks & 1);
                    const tab_t e0 = tab_code(ktab, ktlo, ktl, xa, sh);
                    const tab_t e1 = tab_code(ktab, ktlo, ktl, xb, sh);
                    const tab_t e2 = tab_code(ktab, ktlo, ktl, xa, sh + 8);
                    const tab_t e3 = tab_code(ktab, ktlo, ktl, xb, sh + 8);
#pragma unroll
                    for (int t = 0; t < NQT; ++t) {
                        mma16816(C[t], tab_hi(e0), tab_hi(e1), tab_hi(e2), tab_hi(e3), qf[j][ks][t][0], qf[j][ks][t][1]);
                    }
#if PREC
                    mma16816(C[0], tab_lo(e0), tab_lo(e1), tab_lo(e2), tab_lo(e3), qf[j][ks][0][0], qf[j][ks][0][1]);
#endif
                }
#pragma unroll
                for (int t = 0; t < NQT; ++t) {
                    sc[t][0] = fmaf(dg, C[t][0], sc[t][0]);
                    sc[t][1] = fmaf(dg, C[t][1], sc[t][1]);
                    sc[t][2] = fmaf(dg8, C[t][2], sc[t][2]);
                    sc[t][3] = fmaf(dg8, C[t][3], sc[t][3]);
                }
            }
            // columns -> rows ra, ra + 1 (hi + lo parts), scale, mask
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
#if QDUP
                    const float v = sc[0][2 * kk + e];  // columns 2c, 2c + 1 = rows ra, ra + 1 for every c
#elif RBP == 4
                    float v = sc[0][2 * kk + e];
                    v += __shfl_xor_sync(0xffffffffu, v, 2);
#elif NQT == 2
                    const float v = sc[0][2 * kk + e] + sc[1][2 * kk + e];
#else
                    const float v = sc[0][2 * kk + e];
#endif
#if KSWZ
                    const int t = t0 + k_row(mt, kk, g);
#else
                    const int t = t0 + mt * 16 + g + 8 * kk;  // t0 + k_row(mt, kk, g)
#endif
                    s[mt][kk][e] = t < (e ? lim_b : lim_a) ? v * fac : NEG_INF;
                }
            }
        }

#define PDW_VWAIT (KVSPLIT && PDW && VQUANT)  // the softmax reads V's scales: wait for V(i) before it
#if PDW_VWAIT
        __syncwarp();              // K slot i % STAGES is free
        if (i + STAGES < nmine) {
            issue_k(i + STAGES);
        }
        cp_async_commit();
        cp_async_wait<2 * STAGES - 1>();  // V(i): the softmax reads its scales
        __syncwarp();
#endif

        // ---- online softmax (per warp) ----------------------------------------------------------
        float tm[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float x = NEG_INF;
#pragma unroll
            for (int mt = 0; mt < TW / 16; ++mt) {
                x = fmaxf(x, fmaxf(s[mt][0][e], s[mt][1][e]));
            }
            x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
            x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
            x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
            tm[e] = x;
        }
        float tmax[RBP];  // every lane: all rows
#if RBP == 4
        {
            const float o0 = __shfl_xor_sync(0xffffffffu, tm[0], 1);
            const float o1 = __shfl_xor_sync(0xffffffffu, tm[1], 1);
            const bool  od = c & 1;
            tmax[0] = od ? o0 : tm[0];
            tmax[1] = od ? o1 : tm[1];
            tmax[2] = od ? tm[0] : o0;
            tmax[3] = od ? tm[1] : o1;
        }
#else
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
            tmax[2 * cc]     = __shfl_sync(0xffffffffu, tm[0], (lane & ~3) | cc);
            tmax[2 * cc + 1] = __shfl_sync(0xffffffffu, tm[1], (lane & ~3) | cc);
        }
#endif
        float alpha[RBP];
#pragma unroll
        for (int r = 0; r < RBP; ++r) {
            const float mn = fmaxf(m_run[r], tmax[r]);
            alpha[r]       = mn == NEG_INF ? 1.0f : exp2f(m_run[r] - mn);
            m_run[r]       = mn;
        }
#if SMLEAN >= 2
        bool grew = false;  // the same on every lane
#pragma unroll
        for (int r = 0; r < RBP; ++r) {
            grew |= alpha[r] != 1.0f;
        }
#endif
#if PSH
        u32 pw[TW / 16][2][WN];  // the P d words this lane offers the V phase: row ra's (c < 2), else ra + 1's
#endif
        {
            const float ma = sel_arr(m_run, ra), mb = sel_arr(m_run, ra + 1);
#if SMLEAN >= 2
            if (grew)
#endif
            {
                l_a *= sel_arr(alpha, ra);
                l_b *= sel_arr(alpha, ra + 1);
            }
#if SMLEAN
            const float ma0 = ma == NEG_INF ? 0.0f : ma, mb0 = mb == NEG_INF ? 0.0f : mb;
#endif
#pragma unroll
            for (int mt = 0; mt < TW / 16; ++mt) {
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
#if SMLEAN
                    const float pa = exp2f(s[mt][kk][0] - ma0);  // s = -inf: 0
                    const float pb = exp2f(s[mt][kk][1] - mb0);
#else
                    const float pa = s[mt][kk][0] == NEG_INF ? 0.0f : exp2f(s[mt][kk][0] - ma);
                    const float pb = s[mt][kk][1] == NEG_INF ? 0.0f : exp2f(s[mt][kk][1] - mb);
#endif
                    l_a += pa;
                    l_b += pb;
#if PSH
                    {
                        u32 w[2 * WN];
                        pdw_words(w, vst, (u32) k_row(mt, kk, g) * VROWS, pa, pb);
#pragma unroll
                        for (int n = 0; n < WN; ++n) {
                            pw[mt][kk][n] = (c & 2) ? w[WN + n] : w[n];
                        }
                    }
#elif PDW
                    write_pdw(wsw + (ws_slot_k(mt, kk, g) * RBP + ra) * WN, vst, (u32) k_row(mt, kk, g) * VROWS, pa, pb,
                              owner);
#else
                    if (owner) {
                        *reinterpret_cast<float2 *>(ws + ws_slot_k(mt, kk, g) * RBP + ra) = make_float2(pa, pb);
                    }
#endif
                }
            }
        }
        auto rescale = [&]() {
#pragma unroll
            for (int nt = 0; nt < NVT; ++nt) {
                const float al = sel_arr(alpha, 4 * nt + c);
#pragma unroll
                for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        acc[mt][nt][e] *= al;
                    }
                }
            }
        };
#if SMLEAN >= 2
        if (grew) {
            rescale();
        }
#else
        rescale();
#endif
        __syncwarp();  // P in ws
#if KVSPLIT && !PDW_VWAIT
        if (i + STAGES < nmine) {  // K slot i % STAGES is free (the __syncwarp above)
            issue_k(i + STAGES);
        }
        cp_async_commit();
        cp_async_wait<2 * STAGES - 1>();  // V(i)
        __syncwarp();
#endif

        // ---- V phase ----------------------------------------------------------------------------
#if VUNROLL
#pragma unroll
#else
#pragma unroll 2
#endif
        for (int k8 = 0; k8 < TW / 8; ++k8) {
#if KSWZ
            const int kc0 = v_key(k8, 0, c), kc1 = v_key(k8, 1, c);  // keys of B slots c, c + 4
#if !PSH
            const int pc0 = ws_slot_v(k8, 0, c), pc1 = ws_slot_v(k8, 1, c);
#endif
#else
            const int kc0 = k8 * 8 + c, kc1 = kc0 + 4;
            const int pc0 = kc0, pc1 = kc1;
#endif
#if PSH
            u32 w0[NVT][WN], w1[NVT][WN];  // P d of keys kc0, kc1 for row g >> 1 (NVT = 1), from the K phase's
            {                              // lanes that hold them (the header's PSHFL)
                const int r   = g >> 1;
                const int src = 4 * (2 * c + (k8 & 1)) + (r >> 1) + 2 * (r & 1);
#pragma unroll
                for (int n = 0; n < WN; ++n) {
                    w0[0][n] = __shfl_sync(0xffffffffu, pw[2 * (k8 >> 2)][(k8 >> 1) & 1][n], src);
                    w1[0][n] = __shfl_sync(0xffffffffu, pw[2 * (k8 >> 2) + 1][(k8 >> 1) & 1][n], src);
                }
            }
#elif PDW
            u32 w0[NVT][WN], w1[NVT][WN];  // P d of keys kc0, kc1 for row 4 nt + (g >> 1)
#pragma unroll
            for (int nt = 0; nt < NVT; ++nt) {
                lds_vec<WN>(wsw + (pc0 * RBP + 4 * nt + (g >> 1)) * WN, w0[nt]);
                lds_vec<WN>(wsw + (pc1 * RBP + 4 * nt + (g >> 1)) * WN, w1[nt]);
            }
#else
            float p0[NVT], p1[NVT];
#pragma unroll
            for (int nt = 0; nt < NVT; ++nt) {
                p0[nt] = ws[pc0 * RBP + 4 * nt + (g >> 1)];
                p1[nt] = ws[pc1 * RBP + 4 * nt + (g >> 1)];
            }
            const int hs = 16 * (g & 1);  // column g holds (row, x) for even g, (row, y) for odd g
#endif
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                u32 bh0[NVT], bh1[NVT];
#if PREC
                u32 bl0[NVT], bl1[NVT];
#endif
#if PDW
                const int jw = VQUANT ? j : 0;  // the value of block j (f16 V: P, the same for all j)
                const u32 ps = (jw & 1) ? psel1 : psel0;
#pragma unroll
                for (int nt = 0; nt < NVT; ++nt) {
                    bh0[nt] = __byte_perm(w0[nt][jw >> 1], 0u, ps);
                    bh1[nt] = __byte_perm(w1[nt][jw >> 1], 0u, ps);
#if PREC
                    bl0[nt] = __byte_perm(w0[nt][WH + (jw >> 1)], 0u, ps);
                    bl1[nt] = __byte_perm(w1[nt][WH + (jw >> 1)], 0u, ps);
#endif
                }
#else
#if VQUANT
                const float dv0 = h2f(lds_u16(vst, (u32) kc0 * VROWS + j * VTS));
                const float dv1 = h2f(lds_u16(vst, (u32) kc1 * VROWS + j * VTS));
#else
                const float dv0 = 1.0f, dv1 = 1.0f;
#endif
#pragma unroll
                for (int nt = 0; nt < NVT; ++nt) {
                    const float w0 = p0[nt] * dv0, w1 = p1[nt] * dv1;
                    const u16   h0 = f2h(w0), h1 = f2h(w1);
                    bh0[nt] = (u32) h0 << hs;
                    bh1[nt] = (u32) h1 << hs;
#if PREC
                    bl0[nt] = (u32) f2h(w0 - h2f(h0)) << hs;
                    bl1[nt] = (u32) f2h(w1 - h2f(h1)) << hs;
#endif
                }
#endif
#if VQUANT
                const u32 x0 = v_quad<VFMT>(vst, (u32) kc0 * VROWS, j, g);
                const u32 x1 = v_quad<VFMT>(vst, (u32) kc1 * VROWS, j, g);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const tab_t e0 = tab_code(vtab, ktlo, vtl, x0, 16 * h);
                    const tab_t e1 = tab_code(vtab, ktlo, vtl, x0, 16 * h + 8);
                    const tab_t e2 = tab_code(vtab, ktlo, vtl, x1, 16 * h);
                    const tab_t e3 = tab_code(vtab, ktlo, vtl, x1, 16 * h + 8);
#pragma unroll
                    for (int nt = 0; nt < NVT; ++nt) {
                        mma16816(acc[2 * j + h][nt], tab_hi(e0), tab_hi(e1), tab_hi(e2), tab_hi(e3), bh0[nt], bh1[nt]);
#if PREC
                        mma16816(acc[2 * j + h][nt], tab_hi(e0), tab_hi(e1), tab_hi(e2), tab_hi(e3), bl0[nt], bl1[nt]);
                        mma16816(acc[2 * j + h][nt], tab_lo(e0), tab_lo(e1), tab_lo(e2), tab_lo(e3), bh0[nt], bh1[nt]);
#endif
                    }
                }
#else
                const uint4 v0 = *reinterpret_cast<const uint4 *>(vst + (u32) kc0 * VROWS + 128 * j + 16 * g);
                const uint4 v1 = *reinterpret_cast<const uint4 *>(vst + (u32) kc1 * VROWS + 128 * j + 16 * g);
#pragma unroll
                for (int nt = 0; nt < NVT; ++nt) {
                    mma16816(acc[2 * j][nt], v0.x, v0.y, v1.x, v1.y, bh0[nt], bh1[nt]);
                    mma16816(acc[2 * j + 1][nt], v0.z, v0.w, v1.z, v1.w, bh0[nt], bh1[nt]);
#if PREC
                    mma16816(acc[2 * j][nt], v0.x, v0.y, v1.x, v1.y, bl0[nt], bl1[nt]);
                    mma16816(acc[2 * j + 1][nt], v0.z, v0.w, v1.z, v1.w, bl0[nt], bl1[nt]);
#endif
                }
#endif
            }
        }
#if KVSPLIT
        __syncwarp();  // V slot i % STAGES is free
        if (i + STAGES < nmine) {
            issue_v(i + STAGES);
        }
        cp_async_commit();
#endif
    }

    // ---- epilogue: merge the warps, write partials ---------------------------------------------
    cp_async_wait<0>();
    __syncthreads();  // stage buffers free
    CTA_MARK(4);
    float * red = reinterpret_cast<float *>(smem + MOFF_STAGE);  // [NWARPS][RBP][HD]
    float * mw  = reinterpret_cast<float *>(smem + MOFF_ML);     // [NWARPS][RBP]
    float * lw  = mw + NWARPS * RBP;
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NVT; ++nt) {
            const int r = 4 * nt + c;
            const int d = 64 * (mt >> 1) + 8 * g + 4 * (mt & 1);
            *reinterpret_cast<float4 *>(red + (warp * RBP + r) * HD + d) =
                make_float4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
        }
    }
#pragma unroll
    for (int h = 4; h <= 16; h <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, h);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, h);
    }
    if (g == 0 && owner) {
        lw[warp * RBP + ra]     = l_a;
        lw[warp * RBP + ra + 1] = l_b;
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < RBP; ++r) {
            mw[warp * RBP + r] = m_run[r];
        }
    }
    __syncthreads();
#if OUT_TYPE >= 0
    float * lrow = reinterpret_cast<float *>(smem + MOFF_WS);  // [RB] each row's l (0 iff no keys, else >= 1)
    if (tid < RB) {                                             // (the P slots are free now)
        float M;
        lrow[tid] = merge_warps(mw, tid, M, [&](int w) { return lw[w * RBP + tid]; });
    }
    __syncthreads();
#endif
    for (int e = tid; e < RB * HD; e += NTHREADS) {
        const int r = e / HD;
        const int d = e % HD;
        if (r0 + r < R) {
            float       M;
            const float o = merge_warps(mw, r, M, [&](int w) { return red[(w * RBP + r) * HD + d]; });
#if OUT_TYPE >= 0
            store_out(o_part, cta.part(r) * HD + d, lrow[r] == 0.0f ? 0.0f : o / lrow[r], OUT_TYPE);
#else
            o_part[cta.part(r) * HD + d] = o;
#endif
        }
    }
#if OUT_TYPE < 0
    if (tid < RB && r0 + tid < R) {
        float       M;
        const float L = merge_warps(mw, tid, M, [&](int w) { return lw[w * RBP + tid]; });
        m_part[cta.part(tid)] = M;
        l_part[cta.part(tid)] = L;
    }
#endif
#if CTA_TIMES
    __syncthreads();
    CTA_MARK(5);
#endif
}
