// Merge of the split-K partials of polar_attn_simt / polar_attn_mma (polar_attn_common.cuh):
//   out = sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s,  m = max_s m_s  (0 where every m_s = -inf)
// grid (B * Hq * Tq), block HD threads. OT: 0 float32, 1 float16, 2 bfloat16.
// Compile-time constant (#define from cupy_kernels.attention): HD.

#include "polar_common.cuh"

#define NEG_INF (__int_as_float(0xff800000))  // the m of an empty split (polar_attn_common.cuh)

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
    store_out(out, (long long) b * sob + (long long) hq * soh + (long long) tq * sot + d, o, OT);
}
