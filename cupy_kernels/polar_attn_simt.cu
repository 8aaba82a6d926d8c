// Split-K decode attention, float32 FMA kernel (polar_attn_simt, every KMODE); the tensors, the
// grid and the partials are described in polar_attn_common.cuh.
//
// One CTA of NTHREADS threads streams its chunk of keys through shared memory in tiles of TT keys
// (cp.async, STAGES deep) and keeps an online softmax in float32:
//   K phase: thread = key; score = sum_blocks d * sum_p (q[2p] CX[c_p] + q[2p+1] CY[c_p]),
//            KMODE 0: (CX, CY) gathered from a codebook copy replicated REPL times so that the
//                     lanes of a half-warp never share a bank (lane l reads copy l % REPL);
//            KMODE 1: LUT[p][c][r] = q_r[2p] CX[c] + q_r[2p+1] CY[c] precomputed per CTA;
//            KMODE 2: paper B's LUT over angles, LUT[p][a][r] = (q_r . (cos a, sin a)) / 15,
//                     score += rmax * sum_p rq_p LUT[p][a_p][r] (keys of an angle-LUT codebook:
//                     code = angle a << 4 | radius level 0..15, entry (a << 4) | 15 the unit vector).
//   V phase: thread = (key, 8 output dims); acc += p * d * (CX, CY)[code], decoded on the fly.
//
// Compile-time constants besides those of polar_attn_common.cuh: KMODE, TPT, STAGES, REPL, SHARE_TAB.

#include "polar_attn_common.cuh"

#define TT (NTHREADS * TPT)
#define NBV (VQUANT ? NB : 1)
#define UPT (HD / 8)              // V units (8 output dims) per key
#define TSTEP (NTHREADS / UPT)    // keys processed at once in the V phase

static_assert(NTHREADS % UPT == 0, "threads must cover whole keys in the V phase");

#define KSTAGE ALIGN16(TT * KROW)
#define VSTAGE ALIGN16(TT * VROW)

// shared memory layout (bytes); SMEM_TOTAL is computed the same way by cupy_kernels.attention
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

// codes of pairs 4m .. 4m+3 of one block (bytes of the result), from the block's code words
template <int FMT> struct codes;
template <> struct codes<POLAR_KERNEL_ID> {  // qs[32]
    enum { NW = 8 };
    static __device__ __forceinline__ u32 quad(const u32 (&w)[NW], int m) { return w[m]; }
};
template <> struct codes<POLAR3_KERNEL_ID> {  // qs[16], qh[8]
    enum { NW = 6 };
    static __device__ __forceinline__ u32 quad(const u32 (&w)[NW], int m) {
        const u32 qs[4] = { w[0], w[1], w[2], w[3] };
        const u32 qh[2] = { w[4], w[5] };
        return polar3_quad(qs, qh, m);
    }
};

extern "C" __global__ void __launch_bounds__(NTHREADS) polar_attn_simt(POLAR_ATTN_PARAMS) {
    extern __shared__ __align__(16) u8 smem[];
    const int      tid  = threadIdx.x;
    const int      lane = tid & 31;
    const int      warp = tid >> 5;
    const attn_cta cta  = attn_cta_get(lens, Hkv, G, Tq, chunk);
    const int      r0 = cta.r0, z = cta.z, R = cta.R, c0 = cta.c0, c1 = cta.c1;

    float2 * qs = reinterpret_cast<float2 *>(smem + OFF_QS);  // [HD/2][RB], pre-scaled by scale * log2(e)
    float *  ws = reinterpret_cast<float *>(smem + OFF_WS);   // [TT][NBV][RB]
    float *  mr = reinterpret_cast<float *>(smem + OFF_MAXRED);

    if (c0 >= c1) {
        attn_write_empty(cta, tid, o_part, m_part, l_part);
        return;
    }

    // causal limit per row: key t is visible to row r iff t < lim[r]
    int lim[RB];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        const int rr = r0 + r;
        lim[r]       = rr < R ? cta.limit(rr) : 0;
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
            const long long off = cta.q_row(rr, sqb, sqh, sqt) + 2 * p;
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
            o_part[cta.part(r) * HD + d] = sm;
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
        m_part[cta.part(tid)] = mv;
        l_part[cta.part(tid)] = l;
    }
}
