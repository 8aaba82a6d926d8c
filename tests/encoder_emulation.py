"""float32 numpy twin of the GPU encoder's pruned candidate search (cupy_kernels/polar_block.cuh).

`encode_blocks(x, fmt)` runs, operation for operation and rounding for rounding, what
`polar_encode_block` does on the device: the per-block candidate table (ring j's two angular
neighbours as slots 2j < 2j + 1, ascending codes), the window of two rings w, w + 1 picked by a
64-cell table of rho, the ring-radius lower bound that proves no candidate outside the window can
win, and the full search of every slot for a whole block (a warp) when one of its pairs has no
proof. Its bytes must equal `kvpolar.codec.quantize_blocks` (tests/test_encoder_search.py).

`encode_blocks(x, fmt, group=G)` runs instead the throughput variants of polar_encode.cu
(polar_encode_block_rs): each lane's errors at G scales first, one reduce-scatter butterfly for
the G block sums (`group_sums`, lane by lane), the group's winner by least E bits and lowest k
(min over lanes, ballot), kept on a strict <.

Constants (same names as the CUDA #defines): RHO_REL_LO/HI = 1 -/+ 2^-12, RHO_ABS = 2^-40,
LB_REL = 1 - 2^-10, LB_MIN = 2^-120, BOUND_FAR = 1e30, WIN_LUT = 64 cells of 1/16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kvpolar import codec
from kvpolar.format import N_REFINE, PAIRS, get_format, tables

F32 = np.float32
RHO_REL_LO = F32(1 - 2.0**-12)
RHO_REL_HI = F32(1 + 2.0**-12)
RHO_ABS = F32(2.0**-40)
LB_REL = F32(1 - 2.0**-10)
LB_MIN = F32(2.0**-120)
BOUND_FAR = F32(1e30)
WIN_LUT = 64
WIN_LUT_SCALE = F32(16.0)


def _csqrt(v: float) -> float:
    """polar_csqrt: Newton from above in double, 64 steps (the C++ constexpr twin)."""
    if not v > 0.0:
        return 0.0
    r = v if v > 1.0 else 1.0
    for _ in range(64):
        r = 0.5 * (r + v / r)
    return r


@dataclass(frozen=True)
class Bounds:
    lo: np.ndarray  # (R,) float32: below every code's radius on ring j
    hi: np.ndarray  # (R,) float32: above every code's radius on ring j
    mid: np.ndarray  # (R,) float32: the ring's radius
    win: np.ndarray  # (R - 1, 2) float32: window w -> (A, B) = (hi[w-1] or -FAR, lo[w+2] or +FAR)
    lut: np.ndarray  # (WIN_LUT,) int: the window of each cell of rho


@functools.cache
def bounds(name: str) -> Bounds:
    """polar_make_ring_bounds and the window tables of polar_build_candidates."""
    t = tables(name)
    nr = len(t.ring_n)
    lo, hi, mid = (np.zeros(nr, F32) for _ in range(3))
    for j in range(nr):
        o, n = int(t.ring_off[j]), int(t.ring_n[j])
        r2 = [float(t.cx[c]) * float(t.cx[c]) + float(t.cy[c]) * float(t.cy[c]) for c in range(o, o + n)]
        mn, mx = min(r2), max(r2)
        lo[j] = F32(_csqrt(mn) * (1.0 - 1.0 / (1 << 20)))
        hi[j] = F32(_csqrt(mx) * (1.0 + 1.0 / (1 << 20)))
        mid[j] = F32(_csqrt(0.5 * (mn + mx)))
    win = np.array(
        [
            [-BOUND_FAR if w == 0 else hi[w - 1], BOUND_FAR if w + 2 >= nr else lo[w + 2]]
            for w in range(nr - 1)
        ],
        F32,
    )
    cell_mid = (np.arange(WIN_LUT, dtype=F32) + F32(0.5)) / WIN_LUT_SCALE
    lut = sum((cell_mid >= mid[j]).astype(np.int64) for j in range(1, nr - 1))
    return Bounds(lo, hi, mid, win, np.asarray(lut, np.int64))


def slot_codes(name: str, theta: np.ndarray) -> np.ndarray:
    """(..., 2R) codes of the slots: ring j's neighbours k, (k + 1) mod n as 2j (lower), 2j + 1."""
    t = tables(name)
    out = []
    for j in range(len(t.ring_n)):
        n, off = int(t.ring_n[j]), int(t.ring_off[j])
        if n == 1:
            c = np.full(theta.shape, off, np.int64)
            out += [c, c]
            continue
        k = np.floor((theta - t.ring_phi[j]) * t.ring_istep[j]).astype(np.int64) % n
        wrap = k + 1 == n
        out += [off + np.where(wrap, 0, k), off + np.where(wrap, k, k + 1)]
    return np.stack(out, -1)


def _dd(xn, yn, cx, cy):
    dx = xn - cx
    dy = yn - cy
    return dx * dx + dy * dy


def _encode_at(name, X, Y, r, s, sx, sy, stats, w_shift=0, lane_err=False):
    """polar_encode_at at per-block scales s (n,), s > 0: slots (n, 32) and errors E (n,).
    lane_err: the per-lane squared errors (n, 32) instead of E (polar_lane_err)."""
    b = bounds(name)
    nr = len(b.mid)
    inv = F32(1.0) / s
    xn = X * inv[:, None]
    yn = Y * inv[:, None]
    rho = r * inv[:, None]
    cell = np.minimum(rho * WIN_LUT_SCALE, F32(WIN_LUT - 1)).astype(np.int64)
    w = np.clip(b.lut[cell] + w_shift, 0, nr - 2)  # w_shift != 0: a deliberately bad window (tests)
    slots = np.stack([2 * w, 2 * w + 1, 2 * w + 2, 2 * w + 3], -1)
    cx = np.take_along_axis(sx, slots, -1)
    cy = np.take_along_axis(sy, slots, -1)
    dd = _dd(xn[..., None], yn[..., None], cx, cy)
    i = dd.argmin(-1)  # the first least: a strict < in ascending slots
    best = np.take_along_axis(dd, i[..., None], -1)[..., 0]
    slot = np.take_along_axis(slots, i[..., None], -1)[..., 0]

    a, bb = b.win[w, 0], b.win[w, 1]
    rho_lo = rho * RHO_REL_LO - RHO_ABS
    rho_hi = rho * RHO_REL_HI + RHO_ABS
    m = np.minimum(rho_lo - a, bb - rho_hi)
    with np.errstate(over="ignore"):
        lb = (m * m) * LB_REL
    ok = (m > 0) & (np.maximum(best, LB_MIN) < lb)
    full = ~ok.all(-1)  # a block (warp) with a pair without proof searches every slot
    stats["scales"] += len(s)
    stats["full"] += int(full.sum())
    if full.any():
        dd_all = _dd(xn[full][..., None], yn[full][..., None], sx[full], sy[full])
        slot[full] = dd_all.argmin(-1)
    bx = np.take_along_axis(sx, slot[..., None], -1)[..., 0]
    by = np.take_along_axis(sy, slot[..., None], -1)[..., 0]
    ex = X - s[:, None] * bx
    ey = Y - s[:, None] * by
    if lane_err:
        return slot, ex * ex + ey * ey
    return slot, codec.tree32(ex * ex + ey * ey)


INF_BITS = np.uint32(0x7F800000)


def group_sums(v: np.ndarray) -> np.ndarray:
    """The reduce-scatter butterfly of polar_encode_block_rs, lane by lane: v (n, G, 32) float32
    (candidate c, lane L) -> (n, 32) float32, lane L holding the block sum of candidate
    L >> (5 - log2 G). Step h = 16, 8, ...: lane L keeps the upper half of its candidates if bit h
    of L is set, else the lower half, and adds what lane L ^ h sends (the half L keeps)."""
    G = v.shape[1]
    lg = G.bit_length() - 1
    assert 1 << lg == G and 2 <= G <= 16
    lanes = np.arange(PAIRS)
    w = np.moveaxis(np.asarray(v, F32), 1, 2).copy()  # (n, 32 lanes, G)
    for i in range(lg):
        h, m = 16 >> i, G >> (i + 1)
        up = ((lanes & h) != 0)[None, :, None]
        send = np.where(up, w[..., :m], w[..., m : 2 * m])
        keep = np.where(up, w[..., m : 2 * m], w[..., :m])
        w = keep + send[:, lanes ^ h]
    e = w[..., 0]
    h = 16 >> lg
    while h >= 1:
        e = e + e[:, lanes ^ h]
        h >>= 1
    return e


def group_select(e: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """polar_encode_block_rs's choice from group_sums' lanes e (n, 32): the least E bits (clamped
    to +inf) over the lanes and, of the lanes holding it, the lowest (ballot, ffs), as the
    candidate index in the group. Returns (bits (n,) uint32, k (n,) int)."""
    own = np.minimum(e.view(np.uint32), INF_BITS)
    eb = own.min(1)
    lowest = np.argmax(own == eb[:, None], 1)
    return eb, lowest >> (5 - (G.bit_length() - 1))


def encode_chunk(
    name: str, x: np.ndarray, stats: dict, w_shift: int = 0, group: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """polar_encode_block for blocks x (n, 64) float32: scales (n,) float32, codes (n, 32).
    group: polar_encode_block_rs with G = group instead."""
    t = tables(name)
    x = codec.sanitize(np.asarray(x, F32))
    X, Y = x[:, 0::2], x[:, 1::2]
    r2 = X * X + Y * Y
    rmax = np.sqrt(r2.max(1))
    r = np.sqrt(r2)
    theta = np.arctan2(Y, X)
    codes = slot_codes(name, theta)
    sx, sy = t.cx[codes], t.cy[codes]

    n = len(x)
    best_s = np.zeros(n, F32)
    best_e = np.full(n, np.inf, F32)
    best_i = np.zeros((n, PAIRS), np.int64)

    def trial(s, try_):
        idx = np.nonzero(try_)[0]
        slot, err = _encode_at(name, X[idx], Y[idx], r[idx], s[idx], sx[idx], sy[idx], stats, w_shift)
        upd = err < best_e[idx]
        u = idx[upd]
        best_s[u], best_e[u], best_i[u] = s[u], err[upd], slot[upd]
        out = np.zeros(n, bool)
        out[u] = True
        return out

    if group is None:
        for g in t.g:
            s = codec.to_half(rmax * g)
            trial(s, s > 0)
    else:
        best_b = np.full(n, INF_BITS, np.uint32)
        for k0 in range(0, len(t.g), group):
            v = np.full((n, group, PAIRS), np.inf, F32)  # a skipped scale sums to +inf
            sl = np.zeros((n, group, PAIRS), np.int64)
            ss = np.zeros((n, group), F32)
            for c in range(group):
                s = codec.to_half(rmax * t.g[k0 + c])
                ss[:, c] = s
                idx = np.nonzero(s > 0)[0]
                if len(idx):
                    sl[idx, c], v[idx, c] = _encode_at(
                        name,
                        X[idx],
                        Y[idx],
                        r[idx],
                        s[idx],
                        sx[idx],
                        sy[idx],
                        stats,
                        w_shift,
                        lane_err=True,
                    )
            eb, kl = group_select(group_sums(v), group)
            u = np.nonzero(eb < best_b)[0]
            best_b[u] = eb[u]
            best_s[u] = ss[u, kl[u]]
            best_i[u] = sl[u, kl[u]]
        best_e[:] = best_b.view(F32)

    active = np.isfinite(best_e)
    for _ in range(N_REFINE):
        bx = np.take_along_axis(sx, best_i[..., None], -1)[..., 0]
        by = np.take_along_axis(sy, best_i[..., None], -1)[..., 0]
        if group is None:
            num = codec.tree32(X * bx + Y * by)
            den = codec.tree32(bx * bx + by * by)
        else:  # polar_tree32x2: group_sums of the two, lane 0 holding num and lane 16 den
            e = group_sums(np.stack([X * bx + Y * by, bx * bx + by * by], 1))
            num, den = e[:, 0], e[:, 16]
        with np.errstate(divide="ignore", invalid="ignore"):
            s2 = codec.to_half(np.where(den > 0, num / np.where(den > 0, den, 1), F32(0)))
        active = trial(s2, active & (den > 0) & (s2 > 0) & (s2 != best_s))

    zero = ~np.isfinite(best_e)
    best_s[zero] = 0
    out = np.take_along_axis(codes, best_i[..., None], -1)[..., 0]
    out[zero] = 0
    return best_s, out


def encode_blocks(
    x: np.ndarray, fmt: str, w_shift: int = 0, group: int | None = None
) -> tuple[np.ndarray, dict]:
    """(n, 64) float32 -> (n, type_size) uint8 as the GPU encoder writes them (group: as its
    throughput variant rs<group>), and counts {"scales": scale trials, "full": trials that ran
    the full search}."""
    stats = {"scales": 0, "full": 0}
    d, codes = encode_chunk(fmt, x, stats, w_shift, group)
    return codec.pack(get_format(fmt), d, codes), stats
