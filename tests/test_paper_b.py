"""Paper B (pairwise radius + angle over RoPE pairs, NeurIPS 2025): pairings, quantizers, bits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study import paper_b as B


def test_pair_indices():
    a, b = B.pair_indices(8, "norm")
    assert a.tolist() == [0, 2, 4, 6] and b.tolist() == [1, 3, 5, 7]
    a, b = B.pair_indices(8, "neox")
    assert a.tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="pairing"):
        B.pair_indices(8, "gptj")


def rope(x: np.ndarray, pairing: str, base: float = 10000.0) -> np.ndarray:
    """Apply RoPE with the given pairing to (T, d) rows, position t = row index."""
    t, d = x.shape
    a, b = B.pair_indices(d, pairing)
    ang = np.arange(t)[:, None] * base ** (-np.arange(d // 2) * 2 / d)[None, :]
    out = x.copy()
    out[:, a] = x[:, a] * np.cos(ang) - x[:, b] * np.sin(ang)
    out[:, b] = x[:, a] * np.sin(ang) + x[:, b] * np.cos(ang)
    return out


@pytest.mark.parametrize("pairing", B.PAIRINGS)
def test_pairing_picks_the_rope_pairs(pairing):
    """With the right pairing the pair radii of a RoPE-rotated constant key do not depend on the
    position; with the other pairing they do."""
    d = 16
    k0 = np.random.default_rng(0).standard_normal(d)
    x = rope(np.tile(k0, (64, 1)), pairing)
    r, _ = B.to_pairs(x, pairing)
    np.testing.assert_allclose(r, np.tile(r[0], (64, 1)), rtol=1e-12)
    other = "neox" if pairing == "norm" else "norm"
    r2, _ = B.to_pairs(x, other)
    assert np.ptp(r2, axis=0).max() > 0.1


@pytest.mark.parametrize("pairing", B.PAIRINGS)
def test_pairs_round_trip(pairing):
    x = np.random.default_rng(1).standard_normal((3, 5, 32))
    r, th = B.to_pairs(x, pairing)
    assert np.all(th > -math.pi - 1e-15) and np.all(th <= math.pi)
    np.testing.assert_allclose(B.from_pairs(r, th, pairing), x, atol=1e-12)


def test_fp16_outward_rounding():
    v = np.random.default_rng(2).standard_normal(10000) * 100
    lo, hi = B.f16_floor(v), B.f16_ceil(v)
    assert np.all(lo <= v) and np.all(hi >= v)
    assert np.array_equal(lo.astype(np.float16).astype(np.float64), lo)
    assert np.array_equal(hi.astype(np.float16).astype(np.float64), hi)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_minmax_half_step(bits):
    v = np.random.default_rng(bits).uniform(-3, 7, (100, 64))
    mn, mx = B.f16_floor(v.min(1, keepdims=True)), B.f16_ceil(v.max(1, keepdims=True))
    q, vh = B.uniform_minmax(v, mn, mx, bits)
    step = (mx - mn) / ((1 << bits) - 1)
    assert q.min() >= 0 and q.max() <= (1 << bits) - 1
    assert np.all(np.abs(v - vh) <= step / 2 * (1 + 1e-12))


def test_uniform_circle_half_step():
    th = np.random.default_rng(3).uniform(-math.pi, math.pi, 100000)
    q, thh = B.uniform_circle(th, 4)
    err = np.angle(np.exp(1j * (th - thh)))
    assert np.all(np.abs(err) <= math.pi / 16 * (1 + 1e-12))
    assert q.min() >= 0 and q.max() <= 15


@pytest.mark.parametrize("pairing", B.PAIRINGS)
@pytest.mark.parametrize("rb,ab", [(4, 4), (3, 3)])
def test_per_channel_round_trip_error_bound(pairing, rb, ab):
    """|pair - pair_hat| <= dr/2 + r_max * dtheta/2 with the per-group steps of r and theta."""
    g = 128
    x = np.random.default_rng(4).standard_normal((2, 256, 64)) * 2 + 1
    cfg = B.PaperBConfig(rb, ab, pairing, "channel", g)
    y = B.roundtrip(x, cfg)
    r, th = B.to_pairs(x, pairing)
    a, b = B.pair_indices(64, pairing)
    err = np.hypot(x[..., a] - y[..., a], x[..., b] - y[..., b])
    for grp in range(2):
        sl = slice(grp * g, (grp + 1) * g)
        rr, tt = r[:, sl], th[:, sl]
        dr = (B.f16_ceil(rr.max(1)) - B.f16_floor(rr.min(1))) / ((1 << rb) - 1)
        dt = (B.f16_ceil(tt.max(1)) - B.f16_floor(tt.min(1))) / ((1 << ab) - 1)
        bound = dr / 2 + B.f16_ceil(rr.max(1)) * dt / 2
        assert np.all(err[:, sl] <= bound[:, None, :] * (1 + 1e-6) + 1e-6)


def test_per_token_scale_round_trip_error_bound():
    x = np.random.default_rng(5).standard_normal((1, 100, 64))
    cfg = B.PaperBConfig(4, 4, "norm", "token", 32, "scale")
    y = B.roundtrip(x, cfg)
    r, _ = B.to_pairs(x, "norm")
    rmax = B.f16_ceil(r.reshape(1, 100, 2, 16).max(-1))  # per block of 16 pairs
    dr = rmax / 15
    bound = dr / 2 + rmax * (2 * math.pi / 16) / 2
    err = np.hypot(x[..., 0::2] - y[..., 0::2], x[..., 1::2] - y[..., 1::2]).reshape(1, 100, 2, 16)
    assert np.all(err <= bound[..., None] * (1 + 1e-6))


def test_bits():
    assert B.POLAR_44.bits_per_elem == 4.25  # paper: Polar_44 at g = 128
    assert B.POLAR_33.bits_per_elem == 3.25
    assert B.PaperBConfig(grouping="token", group=32, params="scale").bits_per_elem == 4.5
    assert B.PaperBConfig(grouping="token", group=64, params="scale").bits_per_elem == 4.25
    assert B.PaperBConfig(grouping="token", group=32, params="minmax").bits_per_elem == 6.0


def test_input_checks():
    with pytest.raises(ValueError, match="multiple of the group"):
        B.roundtrip(np.zeros((1, 100, 64)), B.POLAR_44)
    with pytest.raises(ValueError, match="heads, tokens, head_dim"):
        B.roundtrip(np.zeros((100, 64)), B.POLAR_44)
    with pytest.raises(ValueError, match="params"):
        B.PaperBConfig(params="absmax")


def test_gaussian_error_levels():
    x = np.random.default_rng(6).standard_normal((1, 8192, 64))
    e44 = ((x - B.roundtrip(x, B.POLAR_44)) ** 2).sum() / (x**2).sum()
    e33 = ((x - B.roundtrip(x, B.POLAR_33)) ** 2).sum() / (x**2).sum()
    assert 0.014 < e44 < 0.018 and 0.06 < e33 < 0.085


def test_constant_channel_is_exact():
    """A pair whose radius and angle are constant over the group costs nothing (min == max)."""
    x = np.zeros((1, 128, 8))
    x[..., 0], x[..., 4] = 3.0, 4.0  # neox pair 0: r = 5, constant angle
    y = B.roundtrip(x, B.POLAR_44)
    np.testing.assert_allclose(y, x, atol=2e-3)
