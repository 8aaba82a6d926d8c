// Split-K decode attention over a polar-compressed KV cache (flash-decoding).
//
//   q      [B][Hq][Tq][HD]                 float32 / float16 / bfloat16 (element strides)
//   k, v   [B][Hkv][T_max][NB][TYPE_SIZE]  polar / polar3 / paperb blocks, NB = HD / 64
//   v      [B][Hkv][T_max][HD] float16     (VFMT == 3)
//   lens   [B] int32: keys 0 .. lens[b]-1 are valid; query tq of Tq sits at lens[b] - Tq + tq
//          (causal within the tail)
//
// Kernel 1 (polar_attn_partial), grid (n_splits, row groups, B * Hkv), NTHREADS threads: the
// R = (Hq / Hkv) * Tq query rows of one KV head share every K/V byte read; one CTA takes RB of
// them and one chunk of keys, streams it through shared memory in tiles of TT keys
// (cp.async, STAGES deep) and keeps an online softmax in float32:
//   K phase: thread = key; score = sum_blocks d * sum_p (q[2p] CX[c_p] + q[2p+1] CY[c_p]),
//            KMODE 0: (CX, CY) gathered from a codebook copy replicated REPL times so that the
//                     lanes of a half-warp never share a bank (lane l reads copy l % REPL);
//            KMODE 1: LUT[p][c][r] = q_r[2p] CX[c] + q_r[2p+1] CY[c] precomputed per CTA;
//            KMODE 2: paper B's LUT over angles, LUT[p][a][r] = (q_r . (cos a, sin a)) / 15,
//                     score += rmax * sum_p rq_p LUT[p][a_p][r] (paperb keys only).
//   V phase: thread = (key, 8 output dims); acc += p * d * (CX, CY)[code], decoded on the fly.
// Kernel 2 (polar_attn_combine) merges the splits: out = sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s.
//
// Compile-time constants (#defines from kvpolar.gpu): HD, KFMT, VFMT (0 polar, 1 polar3,
// 2 paperb, 3 float16), KTS, VTS, KNC, VNC, KMODE, RB, NWARPS, TPT, STAGES, REPL, SHARE_TAB, QT.

#include "polar_common.cuh"

#define NB (HD / 64)
#define NTHREADS (NWARPS * 32)
#define TT (NTHREADS * TPT)
#define KROW (NB * KTS)
#define VQUANT (VFMT != 3)
#define VROW (VQUANT ? NB * VTS : HD * 2)
#define NBV (VQUANT ? NB : 1)
#define UPT (HD / 8)              // V units (8 output dims) per key
#define TSTEP (NTHREADS / UPT)    // keys processed at once in the V phase
#define NEG_INF (__int_as_float(0xff800000))

static_assert(HD % 64 == 0, "head dim must be a multiple of 64");
static_assert(NTHREADS % UPT == 0, "threads must cover whole keys in the V phase");

#define ALIGN16(x) (((x) + 15) / 16 * 16)
#define KSTAGE ALIGN16(TT * KROW)
#define VSTAGE ALIGN16(TT * VROW)

// shared memory layout (bytes); SMEM_TOTAL is computed the same way by kvpolar.gpu
#if KMODE == 0
#define KTAB_BYTES (KNC * REPL * 8)
#elif KMODE == 1
#define KTAB_BYTES ((HD / 2) * KNC * RB * 4)
#else
#define KTAB_BYTES ((HD / 2) * 16 * RB * 4)
#endif
#define USE_SHARED_TAB (SHARE_TAB && KMODE == 0)
#define VTAB_BYTES ((VQUANT && !USE_SHARED_TAB) ? VNC * REPL * 8 : 0)
#define QS_BYTES ALIGN16((HD / 2) * RB * 8)
#define STAGE_BYTES (STAGES * (KSTAGE + VSTAGE))
#define RED_BYTES (NTHREADS * 8 * RB * 4)
#define WS_BYTES ALIGN16(TT * NBV * RB * 4)
#define MAXRED_BYTES ALIGN16(NWARPS * RB * 4 * 2)

#define OFF_KTAB 0
#define OFF_VTAB (OFF_KTAB + ALIGN16(KTAB_BYTES))
#define OFF_QS (OFF_VTAB + ALIGN16(VTAB_BYTES))
#define OFF_STAGE (OFF_QS + QS_BYTES)
#define OFF_WS (OFF_STAGE + ALIGN16(STAGE_BYTES > RED_BYTES ? STAGE_BYTES : RED_BYTES))
#define OFF_MAXRED (OFF_WS + WS_BYTES)
#define SMEM_TOTAL (OFF_MAXRED + MAXRED_BYTES)

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

__device__ __forceinline__ float load_q(const void * q, long long i) {
#if QT == 0
    return reinterpret_cast<const float *>(q)[i];
#elif QT == 1
    return h2f(reinterpret_cast<const u16 *>(q)[i]);
#else
    return bf2f(reinterpret_cast<const u16 *>(q)[i]);
#endif
}

// RB consecutive floats from/to 16-byte aligned shared memory, as wide accesses
template <int N> __device__ __forceinline__ void ld_vec(const float * p, float (&v)[N]) {
    if (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            const float4 t = *reinterpret_cast<const float4 *>(p + i);
            v[i] = t.x; v[i + 1] = t.y; v[i + 2] = t.z; v[i + 3] = t.w;
        }
    } else if (N % 2 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 2) {
            const float2 t = *reinterpret_cast<const float2 *>(p + i);
            v[i] = t.x; v[i + 1] = t.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            v[i] = p[i];
        }
    }
}

template <int N> __device__ __forceinline__ void st_vec(float * p, const float (&v)[N]) {
    if (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            *reinterpret_cast<float4 *>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
        }
    } else if (N % 2 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 2) {
            *reinterpret_cast<float2 *>(p + i) = make_float2(v[i], v[i + 1]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            p[i] = v[i];
        }
    }
}

__device__ __forceinline__ u16 lds_u16(const u8 * base, u32 off) { return *reinterpret_cast<const u16 *>(base + off); }

// codes of pairs 4m .. 4m+3 of one block (bytes of the result), from the block's code words
template <int FMT> struct codes;
template <> struct codes<0> {  // polar, paperb: qs[32]
    enum { NW = 8 };
    static __device__ __forceinline__ u32 quad(const u32 (&w)[NW], int m) { return w[m]; }
};
template <> struct codes<2> : codes<0> {};
template <> struct codes<1> {  // polar3: qs[16], qh[8]
    enum { NW = 6 };
    static __device__ __forceinline__ u32 quad(const u32 (&w)[NW], int m) {
        const u32 qs[4] = { w[0], w[1], w[2], w[3] };
        const u32 qh[2] = { w[4], w[5] };
        return polar3_quad(qs, qh, m);
    }
};

// One V unit's 4 codes (pairs 4qd .. 4qd+3 of block j) of the key at byte offset `row`.
template <int FMT> __device__ __forceinline__ u32 v_quad(const u8 * vst, u32 row, int j, int qd);
template <> __device__ __forceinline__ u32 v_quad<0>(const u8 * vst, u32 row, int j, int qd) {
    return lds_u32_a2(vst, row + j * VTS + 2 + 4 * qd);
}
template <> __device__ __forceinline__ u32 v_quad<2>(const u8 * vst, u32 row, int j, int qd) {
    return v_quad<0>(vst, row, j, qd);
}
template <> __device__ __forceinline__ u32 v_quad<1>(const u8 * vst, u32 row, int j, int qd) {
    const u32 qsw = lds_u32_a2(vst, row + j * VTS + 2 + 4 * (qd & 3));
    const u32 qhw = lds_u32_a2(vst, row + j * VTS + 18 + 4 * (qd & 1));
    return ((qsw >> (4 * (qd >> 2))) & 0x0F0F0F0Fu) | (((qhw >> (2 * (qd >> 1))) & 0x03030303u) << 4);
}

#if IMPL == 0
extern "C" __global__ void __launch_bounds__(NTHREADS)
    polar_attn_partial(const void * __restrict__ q, long long sqb, long long sqh, long long sqt,
                       const u8 * __restrict__ kc, const u8 * __restrict__ vc, const float2 * __restrict__ ktab_g,
                       const float2 * __restrict__ vtab_g, const int * __restrict__ lens, int Hkv, int G, int Tq,
                       int T_max, int chunk, float scale_log2, float * __restrict__ o_part,
                       float * __restrict__ m_part, float * __restrict__ l_part) {
    extern __shared__ __align__(16) u8 smem[];
    const int tid   = threadIdx.x;
    const int lane  = tid & 31;
    const int warp  = tid >> 5;
    const int split = blockIdx.x;
    const int r0    = blockIdx.y * RB;
    const int z     = blockIdx.z;  // b * Hkv + hkv
    const int b     = z / Hkv;
    const int hkv   = z % Hkv;
    const int R     = G * Tq;
    const int nspl  = gridDim.x;
    const int len   = lens[b];
    const int c0    = split * chunk;
    const int c1    = min(c0 + chunk, len);

    float2 * qs = reinterpret_cast<float2 *>(smem + OFF_QS);  // [HD/2][RB], pre-scaled by scale * log2(e)
    float *  ws = reinterpret_cast<float *>(smem + OFF_WS);   // [TT][NBV][RB]
    float *  mr = reinterpret_cast<float *>(smem + OFF_MAXRED);

    if (c0 >= c1) {  // empty chunk: neutral partials
        for (int e = tid; e < RB * HD; e += NTHREADS) {
            const int r = e / HD;
            if (r0 + r < R) {
                o_part[((long long) (z * R + r0 + r) * nspl + split) * HD + e % HD] = 0.0f;
            }
        }
        if (tid < RB && r0 + tid < R) {
            m_part[(long long) (z * R + r0 + tid) * nspl + split] = NEG_INF;
            l_part[(long long) (z * R + r0 + tid) * nspl + split] = 0.0f;
        }
        return;
    }

    // causal limit per row: key t is visible to row r iff t < lim[r]
    int lim[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        const int rr = r0 + r;
        lim[r]       = rr < R ? min(c1, len - Tq + (rr % Tq) + 1) : 0;
    }

    // ---- prologue: start the first tiles, load q and the tables -----------------------------
    const u8 * kbase  = kc + (long long) z * T_max * KROW;
    const u8 * vbase  = vc + (long long) z * T_max * VROW;
    const int  ntiles = (c1 - c0 + TT - 1) / TT;

    auto issue = [&](int it) {
        const int t0     = c0 + it * TT;
        const int nvalid = min(TT, c1 - t0);
        u8 *      kst    = smem + OFF_STAGE + (it % STAGES) * (KSTAGE + VSTAGE);
        u8 *      vst    = kst + KSTAGE;
        const u8 * ksrc  = kbase + (long long) t0 * KROW;
        const u8 * vsrc  = vbase + (long long) t0 * VROW;
        const int  nk    = (nvalid * KROW + 15) / 16;
        const int  nv    = (nvalid * VROW + 15) / 16;
        const u32  kdst  = smem_u32(kst);
        const u32  vdst  = smem_u32(vst);
        for (int c = tid; c < nk; c += NTHREADS) {
            cp_async16(kdst + 16 * c, ksrc + 16 * c);
        }
        for (int c = tid; c < nv; c += NTHREADS) {
            cp_async16(vdst + 16 * c, vsrc + 16 * c);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) {
            issue(s);
        }
        cp_async_commit();
    }

    for (int e = tid; e < (HD / 2) * RB; e += NTHREADS) {
        const int p  = e / RB;
        const int r  = e % RB;
        const int rr = r0 + r;
        float2    v  = make_float2(0.0f, 0.0f);
        if (rr < R) {
            const int       hq  = hkv * G + rr / Tq;
            const long long off = (long long) b * sqb + (long long) hq * sqh + (long long) (rr % Tq) * sqt + 2 * p;
            v = make_float2(load_q(q, off) * scale_log2, load_q(q, off + 1) * scale_log2);
        }
        qs[p * RB + r] = v;
    }
#if KMODE == 0
    float2 * ktab = reinterpret_cast<float2 *>(smem + OFF_KTAB);  // [KNC][REPL]
    for (int e = tid; e < KNC * REPL; e += NTHREADS) {
        ktab[e] = ktab_g[e / REPL];
    }
#endif
#if VQUANT
#if USE_SHARED_TAB
    const float2 * vtab = ktab;
#else
    float2 * vtab_w = reinterpret_cast<float2 *>(smem + OFF_VTAB);
    for (int e = tid; e < VNC * REPL; e += NTHREADS) {
        vtab_w[e] = vtab_g[e / REPL];
    }
    const float2 * vtab = vtab_w;
#endif
#endif
    __syncthreads();  // qs ready
#if KMODE == 1
    float * lut = reinterpret_cast<float *>(smem + OFF_KTAB);  // [HD/2][KNC][RB]
    for (int e = tid; e < (HD / 2) * KNC * RB; e += NTHREADS) {
        const int    r  = e % RB;
        const int    c  = (e / RB) % KNC;
        const int    p  = e / (RB * KNC);
        const float2 qv = qs[p * RB + r];
        const float2 cv = ktab_g[c];
        lut[e]          = qv.x * cv.x + qv.y * cv.y;
    }
#elif KMODE == 2
    float * lut = reinterpret_cast<float *>(smem + OFF_KTAB);  // [HD/2][16][RB]
    for (int e = tid; e < (HD / 2) * 16 * RB; e += NTHREADS) {
        const int    r  = e % RB;
        const int    a  = (e / RB) % 16;
        const int    p  = e / (RB * 16);
        const float2 qv = qs[p * RB + r];
        const float2 cv = ktab_g[(a << 4) | 15];  // unit vector of angle a
        lut[e]          = (qv.x * cv.x + qv.y * cv.y) * (1.0f / 15.0f);
    }
#endif

    // ---- state -----------------------------------------------------------------------------
    float m_run[RB], l_thr[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        m_run[r] = NEG_INF;
        l_thr[r] = 0.0f;
    }
    float acc[8][RB];
#pragma unroll
    for (int d = 0; d < 8; ++d) {
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            acc[d][r] = 0.0f;
        }
    }
    const int vu   = tid % UPT;  // V unit: output dims 8 vu .. 8 vu + 7
    const int vtok = tid / UPT;
    const int lrep = lane % REPL;

#pragma unroll 1
    for (int it = 0; it < ntiles; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (it + STAGES - 1 < ntiles) {
            issue(it + STAGES - 1);
        }
        cp_async_commit();

        const u8 * kst    = smem + OFF_STAGE + (it % STAGES) * (KSTAGE + VSTAGE);
        const u8 * vst    = kst + KSTAGE;
        const int  t0     = c0 + it * TT;
        const int  nvalid = min(TT, c1 - t0);

        // ---- K phase: thread = key -----------------------------------------------------------
        float s[TPT][RB];
#pragma unroll
        for (int i = 0; i < TPT; ++i) {
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                s[i][r] = 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < NB; ++j) {
            u32   cw[TPT][codes<KFMT>::NW];
            float dk[TPT];
#pragma unroll
            for (int i = 0; i < TPT; ++i) {
                const u32 off = (u32) (i * NTHREADS + tid) * KROW + j * KTS;
                dk[i]         = h2f(lds_u16(kst, off));
                lds_words_a2<codes<KFMT>::NW>(kst, off + 2, cw[i]);
            }
            float a[TPT][RB];
#pragma unroll
            for (int i = 0; i < TPT; ++i) {
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    a[i][r] = 0.0f;
                }
            }
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                u32 quad[TPT];
#pragma unroll
                for (int i = 0; i < TPT; ++i) {
                    quad[i] = codes<KFMT>::quad(cw[i], m);
                }
#pragma unroll
                for (int bb = 0; bb < 4; ++bb) {
                    const int p = j * 32 + 4 * m + bb;
#if KMODE == 0
                    float qf[2 * RB];
                    ld_vec<2 * RB>(reinterpret_cast<const float *>(qs + p * RB), qf);
#pragma unroll
                    for (int i = 0; i < TPT; ++i) {
                        const u32    c  = bfe(quad[i], 8 * bb, 8);
                        const float2 kv = ktab[c * REPL + lrep];
#pragma unroll
                        for (int r = 0; r < RB; ++r) {
                            a[i][r] = fmaf(qf[2 * r], kv.x, fmaf(qf[2 * r + 1], kv.y, a[i][r]));
                        }
                    }
#elif KMODE == 1
#pragma unroll
                    for (int i = 0; i < TPT; ++i) {
                        const u32 c = bfe(quad[i], 8 * bb, 8);
#pragma unroll
                        for (int r = 0; r < RB; ++r) {
                            a[i][r] += lut[(p * KNC + c) * RB + r];
                        }
                    }
#else
#pragma unroll
                    for (int i = 0; i < TPT; ++i) {
                        const u32   ang = bfe(quad[i], 8 * bb + 4, 4);
                        const float rq  = (float) bfe(quad[i], 8 * bb, 4);
#pragma unroll
                        for (int r = 0; r < RB; ++r) {
                            a[i][r] = fmaf(rq, lut[(p * 16 + ang) * RB + r], a[i][r]);
                        }
                    }
#endif
                }
            }
#pragma unroll
            for (int i = 0; i < TPT; ++i) {
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    s[i][r] = fmaf(dk[i], a[i][r], s[i][r]);
                }
            }
        }

        // mask, tile max
        float tmax[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            tmax[r] = NEG_INF;
#pragma unroll
            for (int i = 0; i < TPT; ++i) {
                const int t = t0 + i * NTHREADS + tid;
                s[i][r]     = t < lim[r] ? s[i][r] : NEG_INF;
                tmax[r]     = fmaxf(tmax[r], s[i][r]);
            }
#pragma unroll
            for (int h = 16; h >= 1; h >>= 1) {
                tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], h));
            }
        }
        float * mrb = mr + (it & 1) * NWARPS * RB;  // double-buffered: no barrier needed before the write
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                mrb[warp * RB + r] = tmax[r];
            }
        }
        __syncthreads();
        float alpha[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            float mt = NEG_INF;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                mt = fmaxf(mt, mrb[w * RB + r]);
            }
            const float mn = fmaxf(m_run[r], mt);
            alpha[r]       = mn == NEG_INF ? 1.0f : exp2f(m_run[r] - mn);
            m_run[r]       = mn;
            l_thr[r] *= alpha[r];
        }
#pragma unroll
        for (int i = 0; i < TPT; ++i) {
            const int tl = i * NTHREADS + tid;
            float     pr[RB];
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                pr[r] = s[i][r] == NEG_INF ? 0.0f : exp2f(s[i][r] - m_run[r]);
                l_thr[r] += pr[r];
            }
#if VQUANT
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                const float dv = tl < nvalid ? h2f(lds_u16(vst, (u32) tl * VROW + j * VTS)) : 0.0f;
                float wv[RB];
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    wv[r] = pr[r] * dv;
                }
                st_vec<RB>(ws + (tl * NB + j) * RB, wv);
            }
#else
            st_vec<RB>(ws + tl * RB, pr);
#endif
        }
#pragma unroll
        for (int d = 0; d < 8; ++d) {
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                acc[d][r] *= alpha[r];
            }
        }
        __syncthreads();  // ws ready

        // ---- V phase: thread = (key, 8 dims) -------------------------------------------------
#pragma unroll 2
        for (int tl = vtok; tl < nvalid; tl += TSTEP) {
#if VQUANT
            const int j  = vu >> 3;
            const int qd = vu & 7;
            const u32 cq = v_quad<VFMT>(vst, (u32) tl * VROW, j, qd);
            float     w[RB];
            ld_vec<RB>(ws + (tl * NB + j) * RB, w);
#pragma unroll
            for (int bb = 0; bb < 4; ++bb) {
                const float2 cv = vtab[bfe(cq, 8 * bb, 8) * REPL + lrep];
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    acc[2 * bb][r]     = fmaf(w[r], cv.x, acc[2 * bb][r]);
                    acc[2 * bb + 1][r] = fmaf(w[r], cv.y, acc[2 * bb + 1][r]);
                }
            }
#else
            const uint4 raw = *reinterpret_cast<const uint4 *>(vst + (u32) tl * VROW + vu * 16);
            const u32   wd[4] = { raw.x, raw.y, raw.z, raw.w };
            float       w[RB];
            ld_vec<RB>(ws + tl * RB, w);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float v0 = h2f((u16) (wd[e] & 0xffff));
                const float v1 = h2f((u16) (wd[e] >> 16));
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    acc[2 * e][r]     = fmaf(w[r], v0, acc[2 * e][r]);
                    acc[2 * e + 1][r] = fmaf(w[r], v1, acc[2 * e + 1][r]);
                }
            }
#endif
        }
    }

    // ---- epilogue: reduce over threads, write partials -------------------------------------
    cp_async_wait<0>();
    __syncthreads();  // stage buffers free for the reduction
    float * red = reinterpret_cast<float *>(smem + OFF_STAGE);  // [NTHREADS][8][RB]
#pragma unroll
    for (int d = 0; d < 8; ++d) {
        st_vec<RB>(red + (tid * 8 + d) * RB, acc[d]);
    }
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        float l = l_thr[r];
#pragma unroll
        for (int h = 16; h >= 1; h >>= 1) {
            l += __shfl_xor_sync(0xffffffffu, l, h);
        }
        l_thr[r] = l;
    }
    float * lr = ws;  // [NWARPS][RB]
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            lr[warp * RB + r] = l_thr[r];
        }
    }
    __syncthreads();
    for (int e = tid; e < RB * HD; e += NTHREADS) {
        const int r = e / HD;
        const int d = e % HD;
        if (r0 + r < R) {
            const int u  = d >> 3;
            float     sm = 0.0f;
            for (int k = 0; k < TSTEP; ++k) {
                sm += red[((k * UPT + u) * 8 + (d & 7)) * RB + r];
            }
            o_part[((long long) (z * R + r0 + r) * nspl + split) * HD + d] = sm;
        }
    }
    if (tid < RB && r0 + tid < R) {
        float l = 0.0f;
        for (int w = 0; w < NWARPS; ++w) {
            l += lr[w * RB + tid];
        }
        float mv = NEG_INF;
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            mv = r == tid ? m_run[r] : mv;
        }
        m_part[(long long) (z * R + r0 + tid) * nspl + split] = mv;
        l_part[(long long) (z * R + r0 + tid) * nspl + split] = l;
    }
}
#endif  // IMPL == 0

#if IMPL == 1
// ================================================================================================
// Tensor-core variant (polar_attn_mma): the same split-K contract as polar_attn_partial, computed
// with mma.sync.m16n8k16 (f16 operands, f32 accumulation) on codebook entries gathered as half2.
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

#define RBP (RB <= 4 ? 4 : 8)                  // rows padded
#define QPARTS (PREC ? 2 : 1)
#define NQT ((QPARTS * RBP + 7) / 8)           // K-phase n-tiles
#define NVT (RBP / 4)                          // V-phase n-tiles (4 rows x (x, y) each)
#define NMT (HD / 32)                          // V-phase m-tiles (16 pairs each)
#define VROWS (VQUANT ? VROW : VROW + 32)      // smem row stride of V (f16 rows padded: no bank conflicts)
#define MKTAB_BYTES (KNC * 128)
#define MVTAB_BYTES ((VQUANT && !SHARE_TAB) ? VNC * 128 : 0)
#define WKST ALIGN16(TW * KROW)
#define WST (WKST + ALIGN16(TW * VROWS))
#define MSTAGE_BYTES (NWARPS * STAGES * WST)
#define MRED_BYTES (NWARPS * RBP * HD * 4)
#define MOFF_KTAB 0
#define MOFF_VTAB (MOFF_KTAB + ALIGN16(MKTAB_BYTES))
#define MOFF_STAGE (MOFF_VTAB + ALIGN16(MVTAB_BYTES))
#define MOFF_WS (MOFF_STAGE + ALIGN16(MSTAGE_BYTES > MRED_BYTES ? MSTAGE_BYTES : MRED_BYTES))
#define MOFF_ML (MOFF_WS + ALIGN16(NWARPS * TW * RBP * 4))
#define MSMEM_TOTAL (MOFF_ML + ALIGN16(NWARPS * RBP * 4 * 2))

static_assert(TW % 16 == 0, "warp tile must be a multiple of 16 keys");
static_assert(RB <= 8, "at most 8 rows per CTA");

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

__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16_zfill(u32 dst, const void * src, u32 nbytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(nbytes));
}

__device__ __forceinline__ u32 pack_h2(u16 lo, u16 hi) { return (u32) lo | ((u32) hi << 16); }

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
template <> __device__ __forceinline__ void k_quads<0>(const u8 * st, u32 off, int c, u32 (&w)[2]) {
    lds_words_a2<2>(st, off + 2 + 8 * c, w);
}
template <> __device__ __forceinline__ void k_quads<2>(const u8 * st, u32 off, int c, u32 (&w)[2]) {
    k_quads<0>(st, off, c, w);
}
template <> __device__ __forceinline__ void k_quads<1>(const u8 * st, u32 off, int c, u32 (&w)[2]) {
    u32 qs[2], qh[2];
    lds_words_a2<2>(st, off + 2 + 8 * (c & 1), qs);  // qs words 2(c&1), 2(c&1)+1
    lds_words_a2<2>(st, off + 18, qh);
    const int s4 = 4 * (c >> 1), s2 = 2 * c;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        w[i] = ((qs[i] >> s4) & 0x0F0F0F0Fu) | (((qh[i] >> s2) & 0x03030303u) << 4);
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
    polar_attn_mma(const void * __restrict__ q, long long sqb, long long sqh, long long sqt,
                   const u8 * __restrict__ kc, const u8 * __restrict__ vc, const float2 * __restrict__ ktab_g,
                   const float2 * __restrict__ vtab_g, const int * __restrict__ lens, int Hkv, int G, int Tq,
                   int T_max, int chunk, float scale_log2, float * __restrict__ o_part,
                   float * __restrict__ m_part, float * __restrict__ l_part) {
    extern __shared__ __align__(16) u8 smem[];
    const int tid   = threadIdx.x;
    const int lane  = tid & 31;
    const int warp  = tid >> 5;
    const int g     = lane >> 2;
    const int c     = lane & 3;
    const int split = blockIdx.x;
    const int r0    = blockIdx.y * RB;
    const int z     = blockIdx.z;  // b * Hkv + hkv
    const int b     = z / Hkv;
    const int hkv   = z % Hkv;
    const int R     = G * Tq;
    const int nspl  = gridDim.x;
    const int len   = lens[b];
    const int c0    = split * chunk;
    const int c1    = min(c0 + chunk, len);

    if (c0 >= c1) {  // empty chunk: neutral partials
        for (int e = tid; e < RB * HD; e += NTHREADS) {
            const int r = e / HD;
            if (r0 + r < R) {
                o_part[((long long) (z * R + r0 + r) * nspl + split) * HD + e % HD] = 0.0f;
            }
        }
        if (tid < RB && r0 + tid < R) {
            m_part[(long long) (z * R + r0 + tid) * nspl + split] = NEG_INF;
            l_part[(long long) (z * R + r0 + tid) * nspl + split] = 0.0f;
        }
        return;
    }

    const u8 * kbase = kc + (long long) z * T_max * KROW;
    const u8 * vbase = vc + (long long) z * T_max * VROW;
    const int  ntw   = (c1 - c0 + TW - 1) / TW;                                 // warp tiles in the chunk
    const int  nmine = ntw > warp ? (ntw - warp + NWARPS - 1) / NWARPS : 0;     // this warp's
    u8 *       wstage = smem + MOFF_STAGE + warp * (STAGES * WST);

    // stage a warp tile (keys t0 .. t0 + TW - 1; bytes past the valid keys are zero-filled)
    auto issue = [&](int i) {
        const int  t0     = c0 + (warp + i * NWARPS) * TW;
        const int  nvalid = min(TW, c1 - t0);
        u8 *       kst    = wstage + (i % STAGES) * WST;
        const u32  kdst   = smem_u32(kst);
        const u32  vdst   = kdst + WKST;
        const u8 * ksrc   = kbase + (long long) t0 * KROW;
        const u8 * vsrc   = vbase + (long long) t0 * VROW;
        const int  kvb    = nvalid * KROW;
        for (int ch = lane; ch < TW * KROW / 16; ch += 32) {
            const int n = min(max(kvb - 16 * ch, 0), 16);
            cp_async16_zfill(kdst + 16 * ch, n ? ksrc + 16 * ch : kc, n);
        }
        const int vvb = nvalid * VROW;
        for (int ch = lane; ch < TW * VROW / 16; ch += 32) {
            const int n = min(max(vvb - 16 * ch, 0), 16);
#if VQUANT
            const u32 d = vdst + 16 * ch;
#else
            const u32 d = vdst + (ch / (VROW / 16)) * VROWS + (ch % (VROW / 16)) * 16;
#endif
            cp_async16_zfill(d, n ? vsrc + 16 * ch : vc, n);
        }
    };
    // codebook tables, prebuilt by kvpolar.gpu in the shared-memory layout (entry (hi half2 [, lo
    // half2]) of code k, copy l at byte k * 128 + TAB_LANE_OFF(l)): one cp.async group of their own
    // (the oldest), overlapping the first K/V stages
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
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nmine) {
            issue(s);
        }
        cp_async_commit();
    }
    const u8 * ktl = smem + MOFF_KTAB + TAB_LANE_OFF(lane);
#if VQUANT
    const u8 * vtl = smem + (SHARE_TAB ? MOFF_KTAB : MOFF_VTAB) + TAB_LANE_OFF(lane);
#endif

    // q: a power-of-two normalization 2^-E (max |q| of the CTA's rows < 1, so fp16 never overflows),
    // then this lane's B fragments. score = fac * sum_blocks d * S, fac = scale * log2(e) * 2^E.
    float qmax = 0.0f;
    for (int e = lane; e < RB * HD; e += 32) {
        const int rr = r0 + e / HD;
        if (rr < R) {
            const int hq = hkv * G + rr / Tq;
            qmax = fmaxf(qmax, fabsf(load_q(q, (long long) b * sqb + (long long) hq * sqh + (long long) (rr % Tq) * sqt + e % HD)));
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
        const bool ok  = r < RB && rr < R && part < QPARTS;
        long long qoff = 0;
        if (ok) {
            const int hq = hkv * G + rr / Tq;
            qoff = (long long) b * sqb + (long long) hq * sqh + (long long) (rr % Tq) * sqt;
        }
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
                        split_h2(load_q(q, qoff + 2 * p) * qnorm, load_q(q, qoff + 2 * p + 1) * qnorm, hi, lo);
                        v = part == 0 ? hi : lo;
                    }
                    qf[j][ks][t][e] = v;
                }
            }
        }
    }

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
        lim_a = (ra < RB && rra < R) ? min(c1, len - Tq + (rra % Tq) + 1) : 0;
        lim_b = (ra + 1 < RB && rrb < R) ? min(c1, len - Tq + (rrb % Tq) + 1) : 0;
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
    float * ws = reinterpret_cast<float *>(smem + MOFF_WS) + warp * TW * RBP;  // P [TW][RBP]

    cp_async_wait<STAGES - 1>();  // the table group (the oldest) has landed
    __syncthreads();               // tables ready

#pragma unroll 1
    for (int i = 0; i < nmine; ++i) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        if (i + STAGES - 1 < nmine) {
            issue(i + STAGES - 1);
        }
        cp_async_commit();

        const u8 * kst = wstage + (i % STAGES) * WST;
        const u8 * vst = kst + WKST;
        const int  t0  = c0 + (warp + i * NWARPS) * TW;

        // ---- K phase ----------------------------------------------------------------------------
        float s[TW / 16][2][2];  // [m-tile][key g, g+8][row ra, ra+1]
#pragma unroll
        for (int mt = 0; mt < TW / 16; ++mt) {
            const u32 rowg  = (u32) (mt * 16 + g) * KROW;
            const u32 rowg8 = rowg + 8 * KROW;
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
                    const tab_t e0 = tab_get(ktl, bfe(xa, sh, 8));
                    const tab_t e1 = tab_get(ktl, bfe(xb, sh, 8));
                    const tab_t e2 = tab_get(ktl, bfe(xa, sh + 8, 8));
                    const tab_t e3 = tab_get(ktl, bfe(xb, sh + 8, 8));
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
#if RBP == 4
                    float v = sc[0][2 * kk + e];
                    v += __shfl_xor_sync(0xffffffffu, v, 2);
#elif NQT == 2
                    const float v = sc[0][2 * kk + e] + sc[1][2 * kk + e];
#else
                    const float v = sc[0][2 * kk + e];
#endif
                    const int t = t0 + mt * 16 + g + 8 * kk;
                    s[mt][kk][e] = t < (e ? lim_b : lim_a) ? v * fac : NEG_INF;
                }
            }
        }

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
        {
            const float ma = sel_arr(m_run, ra), mb = sel_arr(m_run, ra + 1);
            l_a *= sel_arr(alpha, ra);
            l_b *= sel_arr(alpha, ra + 1);
#pragma unroll
            for (int mt = 0; mt < TW / 16; ++mt) {
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    const float pa = s[mt][kk][0] == NEG_INF ? 0.0f : exp2f(s[mt][kk][0] - ma);
                    const float pb = s[mt][kk][1] == NEG_INF ? 0.0f : exp2f(s[mt][kk][1] - mb);
                    l_a += pa;
                    l_b += pb;
                    if (owner) {
                        *reinterpret_cast<float2 *>(ws + (mt * 16 + g + 8 * kk) * RBP + ra) = make_float2(pa, pb);
                    }
                }
            }
        }
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
        __syncwarp();  // P in ws

        // ---- V phase ----------------------------------------------------------------------------
#pragma unroll 2
        for (int k8 = 0; k8 < TW / 8; ++k8) {
            const int kc0 = k8 * 8 + c, kc1 = kc0 + 4;
            float     p0[NVT], p1[NVT];
#pragma unroll
            for (int nt = 0; nt < NVT; ++nt) {
                p0[nt] = ws[kc0 * RBP + 4 * nt + (g >> 1)];
                p1[nt] = ws[kc1 * RBP + 4 * nt + (g >> 1)];
            }
            const int hs = 16 * (g & 1);  // column g holds (row, x) for even g, (row, y) for odd g
#pragma unroll
            for (int j = 0; j < NB; ++j) {
#if VQUANT
                const float dv0 = h2f(lds_u16(vst, (u32) kc0 * VROWS + j * VTS));
                const float dv1 = h2f(lds_u16(vst, (u32) kc1 * VROWS + j * VTS));
#else
                const float dv0 = 1.0f, dv1 = 1.0f;
#endif
                u32 bh0[NVT], bh1[NVT];
#if PREC
                u32 bl0[NVT], bl1[NVT];
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
#if VQUANT
                const u32 x0 = v_quad<VFMT>(vst, (u32) kc0 * VROWS, j, g);
                const u32 x1 = v_quad<VFMT>(vst, (u32) kc1 * VROWS, j, g);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const tab_t e0 = tab_get(vtl, bfe(x0, 16 * h, 8));
                    const tab_t e1 = tab_get(vtl, bfe(x0, 16 * h + 8, 8));
                    const tab_t e2 = tab_get(vtl, bfe(x1, 16 * h, 8));
                    const tab_t e3 = tab_get(vtl, bfe(x1, 16 * h + 8, 8));
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
    }

    // ---- epilogue: merge the warps, write partials ---------------------------------------------
    cp_async_wait<0>();
    __syncthreads();  // stage buffers free
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
    for (int e = tid; e < RB * HD; e += NTHREADS) {
        const int r = e / HD;
        const int d = e % HD;
        if (r0 + r < R) {
            float M = NEG_INF;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                M = fmaxf(M, mw[w * RBP + r]);
            }
            float sm = 0.0f;
            if (M != NEG_INF) {
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) {
                    const float mv = mw[w * RBP + r];
                    if (mv != NEG_INF) {
                        sm += exp2f(mv - M) * red[(w * RBP + r) * HD + d];
                    }
                }
            }
            o_part[((long long) (z * R + r0 + r) * nspl + split) * HD + d] = sm;
        }
    }
    if (tid < RB && r0 + tid < R) {
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) {
            M = fmaxf(M, mw[w * RBP + tid]);
        }
        float L = 0.0f;
        if (M != NEG_INF) {
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const float mv = mw[w * RBP + tid];
                if (mv != NEG_INF) {
                    L += exp2f(mv - M) * lw[w * RBP + tid];
                }
            }
        }
        m_part[(long long) (z * R + r0 + tid) * nspl + split] = M;
        l_part[(long long) (z * R + r0 + tid) * nspl + split] = L;
    }
}
#endif  // IMPL == 1

// grid (B * Hq * Tq), block HD threads. OT: 0 float32, 1 float16, 2 bfloat16.
extern "C" __global__ void polar_attn_combine(const float * __restrict__ o_part, const float * __restrict__ m_part,
                                              const float * __restrict__ l_part, void * __restrict__ out,
                                              long long sob, long long soh, long long sot, int Hq, int Hkv,
                                              int Tq, int nspl, int OT) {
    const int row = blockIdx.x;
    const int tq  = row % Tq;
    const int hq  = (row / Tq) % Hq;
    const int b   = row / (Tq * Hq);
    const int G   = Hq / Hkv;
    const int R   = G * Tq;
    const int z   = b * Hkv + hq / G;
    const int r   = (hq % G) * Tq + tq;
    const long long pidx = (long long) (z * R + r) * nspl;
    float m = NEG_INF;
    for (int s = 0; s < nspl; ++s) {
        m = fmaxf(m, m_part[pidx + s]);
    }
    float L = 0.0f, o = 0.0f;
    const int d = threadIdx.x;
    if (m != NEG_INF) {
        for (int s = 0; s < nspl; ++s) {
            const float ms = m_part[pidx + s];
            const float w  = ms == NEG_INF ? 0.0f : exp2f(ms - m);
            L += w * l_part[pidx + s];
            o += w * o_part[(pidx + s) * HD + d];
        }
        o = o / L;
    }
    const long long oi = (long long) b * sob + (long long) hq * soh + (long long) tq * sot + d;
    if (OT == 0) {
        reinterpret_cast<float *>(out)[oi] = o;
    } else if (OT == 1) {
        reinterpret_cast<u16 *>(out)[oi] = f2h(o);
    } else {
        reinterpret_cast<u16 *>(out)[oi] = f2bf(o);
    }
}
