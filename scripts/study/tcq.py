"""How far below polar3 could a 3.25-bit code go? A trellis-coded quantizer measured (issue 12, lever 4).

polar3 codes each pair of values with 6 bits (a 64-point ring code) under a searched fp16 block scale: 3.25
bits a value, relative MSE 0.0257 on Gaussian data, 2.3x Shannon's bound at 3.25 bits
(docs/format-study.md). Codes over many dimensions get closer to the bound; the cheapest family that decodes
one value at a time is a trellis. This module measures one, the bitshift trellis of QTIP (Tseng et al.,
arXiv 2406.11235), at the same rate and with the same kind of block scale, so that the study can say what a
better 3.25-bit code would be worth before anyone builds one:

- a block of 64 values is a stream of K = 3 bits a value; the value at step t is table[s_t], where the state
  s_t = ((s_{t-1} << K) | b_t) mod 2^L holds the stream's last L bits (start state 0: no side bits), so a
  value depends on its own 3 bits and the L - 3 before them;
- encoding is a Viterbi search over the 2^L states for the stream of least squared error; decoding is one
  table lookup a value (a 2^L-entry table, 1 KiB at L = 8 in fp32);
- the table is fitted by Lloyd iterations on training data (each state's value = the mean of the values its
  Viterbi paths assigned to it), from a Gaussian start;
- the block scale is fp16(g x RMS) with g searched over a grid per block, as polar3 searches its scale:
  16 + 3 x 64 bits a block = 3.25 bits a value.

Everything here is float64 numpy; nothing of it is a format of this project.
"""

from __future__ import annotations

import dataclasses

import numpy as np

QK = 64
K_BITS = 3
SCALE_GRID = tuple(np.linspace(0.8, 1.25, 10))  # multipliers g of the block RMS searched per block


def viterbi(x: np.ndarray, table: np.ndarray, L: int, k: int = K_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares path through the bitshift trellis for each row of x (n, T).

    Returns (states (n, T) int, reconstruction (n, T) float64): reconstruction[i, t] = table[states[i, t]].
    The predecessors of state s are (j << (L - k)) | (s >> k), j = 0 .. 2^k - 1; the start state is 0."""
    S = 1 << L
    if table.shape != (S,):
        raise ValueError(f"table must have 2^L = {S} entries, got shape {table.shape}")
    if not 0 < k < L:
        raise ValueError(f"need 0 < k < L, got k={k}, L={L}")
    n, T = x.shape
    low = S >> k  # predecessor groups, indexed by s >> k
    cost = np.full((n, S), np.inf)
    cost[:, 0] = 0.0
    back = np.empty((T, n, low), np.uint8)  # the chosen top bits j of the predecessor
    for t in range(T):
        c = cost.reshape(n, 1 << k, low)  # [j][s >> k] of the predecessor (j << (L - k)) | low bits
        j = c.argmin(1)
        m = np.take_along_axis(c, j[:, None, :], 1)[:, 0, :]
        back[t] = j
        cost = np.repeat(m, 1 << k, axis=1) + (x[:, t, None] - table[None, :]) ** 2
    states = np.empty((n, T), np.int64)
    s = cost.argmin(1)
    for t in range(T - 1, -1, -1):
        states[:, t] = s
        hi = back[t][np.arange(n), s >> k].astype(np.int64)
        s = (hi << (L - k)) | (s >> k)
    if not (s == 0).all():
        raise AssertionError("traceback did not end in the start state")
    return states, table[states]


def fit_table(x: np.ndarray, L: int, iters: int = 12, seed: int = 0, k: int = K_BITS) -> np.ndarray:
    """A 2^L-entry table for rows x (n, T) of unit-variance values: Lloyd iterations from N(0, 1) values."""
    S = 1 << L
    table = np.random.default_rng(seed).standard_normal(S)
    for _ in range(iters):
        states, _ = viterbi(x, table, L, k)
        sums = np.bincount(states.ravel(), weights=x.ravel(), minlength=S)
        counts = np.bincount(states.ravel(), minlength=S)
        used = counts > 0
        table[used] = sums[used] / counts[used]
    return table


def to_half(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float64).astype(np.float16).astype(np.float64)


def roundtrip(x: np.ndarray, table: np.ndarray, L: int, grid=SCALE_GRID, k: int = K_BITS) -> np.ndarray:
    """(n, 64) blocks -> their reconstruction: per block the scale fp16(g x RMS) of the grid whose Viterbi
    path has the least error (ties: the first)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != QK:
        raise ValueError(f"expected (n, {QK}) blocks, got shape {x.shape}")
    rms = np.sqrt((x * x).mean(1))
    best = np.zeros_like(x)
    best_err = np.full(len(x), np.inf)
    for g in grid:
        s = to_half(g * rms)
        safe = np.where(s > 0, s, 1.0)
        _, y = viterbi(x / safe[:, None], table, L, k)
        y = y * s[:, None]
        err = ((x - y) ** 2).sum(1)
        better = err < best_err
        best[better], best_err[better] = y[better], err[better]
    return best


@dataclasses.dataclass(frozen=True)
class TcqResult:
    L: int
    bits: float
    rel_mse: float
    x_bound: float


def measure_gaussian(Ls=(6, 8, 10), n_train: int = 2048, n_test: int = 4096, seed: int = 20250204):
    """Relative MSE of the 3.25-bit TCQ on i.i.d. N(0, 1) blocks for each trellis size L (tables fitted on
    separate training blocks), and of polar3 on the same test blocks through kvpolar's codec."""
    from .variants import chosen_roundtrip

    rng = np.random.default_rng(seed)
    train = rng.standard_normal((n_train, QK))
    test = rng.standard_normal((n_test, QK))
    bits = K_BITS + 16 / QK
    bound = 2 ** (-2 * bits)
    energy = (test * test).sum()
    out = []
    for L in Ls:
        rms = np.sqrt((train * train).mean(1, keepdims=True))
        table = fit_table(train / rms, L, seed=seed + L)
        err = ((test - roundtrip(test, table, L)) ** 2).sum() / energy
        out.append(TcqResult(L, bits, float(err), float(err / bound)))
    p3 = chosen_roundtrip(test.astype(np.float32), "polar3").astype(np.float64)
    err = ((test - p3) ** 2).sum() / energy
    return out, TcqResult(0, bits, float(err), float(err / bound))
