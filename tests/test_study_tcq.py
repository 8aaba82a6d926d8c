"""study.tcq: the 3.25-bit trellis-coded quantizer of the format study (issue 12, lever 4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from study import tcq


def test_viterbi_is_the_least_squares_path():
    """On a small trellis, Viterbi's path equals the best of every bit stream from the start state."""
    L, k, T = 5, 3, 3
    rng = np.random.default_rng(1)
    table = rng.standard_normal(1 << L)
    x = rng.standard_normal((6, T))
    states, y = tcq.viterbi(x, table, L, k)
    assert np.array_equal(y, table[states])
    for i in range(len(x)):
        best = np.inf
        for bits in itertools.product(range(1 << k), repeat=T):
            s, err = 0, 0.0
            for t, b in enumerate(bits):
                s = ((s << k) | b) & ((1 << L) - 1)
                err += (x[i, t] - table[s]) ** 2
            best = min(best, err)
        assert ((x[i] - y[i]) ** 2).sum() == pytest.approx(best, rel=1e-12)
        # consecutive states follow the shift rule
        prev = 0
        for s in states[i]:
            assert s >> k == prev & ((1 << (L - k)) - 1)
            prev = s


def test_viterbi_rejects_bad_tables():
    with pytest.raises(ValueError, match="2\\^L"):
        tcq.viterbi(np.zeros((1, 4)), np.zeros(10), 4)
    with pytest.raises(ValueError, match="0 < k < L"):
        tcq.viterbi(np.zeros((1, 4)), np.zeros(8), 3, 3)


def test_fit_table_lowers_the_error():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 64))
    L = 6
    start = np.random.default_rng(7).standard_normal(1 << L)
    fitted = tcq.fit_table(x, L, iters=4, seed=7)
    e0 = ((x - tcq.viterbi(x, start, L)[1]) ** 2).sum()
    e1 = ((x - tcq.viterbi(x, fitted, L)[1]) ** 2).sum()
    assert e1 < 0.9 * e0


def test_roundtrip_scale_search():
    """The searched scale is never worse than g = 1 alone; zero blocks stay zero; bad shapes fail."""
    rng = np.random.default_rng(3)
    L = 6
    table = tcq.fit_table(rng.standard_normal((64, 64)), L, iters=3)
    x = rng.standard_normal((32, 64)) * rng.uniform(0.01, 100, (32, 1))
    x[5] = 0.0
    y = tcq.roundtrip(x, table, L)
    y1 = tcq.roundtrip(x, table, L, grid=(1.0,))
    assert (((x - y) ** 2).sum(1) <= ((x - y1) ** 2).sum(1) + 1e-9).all()
    assert (y[5] == 0).all()
    with pytest.raises(ValueError, match="blocks"):
        tcq.roundtrip(np.zeros((2, 32)), table, L)


def test_measure_gaussian_small():
    rows, p3 = tcq.measure_gaussian(Ls=(6,), n_train=64, n_test=64)
    assert [r.L for r in rows] == [6] and rows[0].bits == p3.bits == 3.25
    assert 0.02 < p3.rel_mse < 0.032  # polar3's ~0.0257 (docs/format-study.md) on few blocks
    assert 0.015 < rows[0].rel_mse < 0.04
