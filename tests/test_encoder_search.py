"""The GPU encoder's pruned candidate search (cupy_kernels/polar_block.cuh) gives the bytes of
kvpolar.codec.quantize_blocks: its float32 numpy twin (tests/encoder_emulation.py) against the
reference on random and adversarial blocks, at single scales on points placed exactly on codes,
midway between codes and on ring boundaries, and with deliberately wrong windows (the bound must
reject them, the full search then answers). The throughput variants' grouped search
(polar_encode.cu, polar_encode_block_rs: reduce-scatter block sums, group winner by min and
ballot) is checked the same way, and its two pieces on their own: every lane's reduce-scatter sum
has tree32's bits, and the group choice is the sequential loop's first strict minimum. CPU only;
tests/test_gpu_parity.py and tests/test_gpu_encode_variants.py check the device.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

import blocks
import encoder_emulation as em
from kvpolar import codec
from kvpolar.format import FORMATS, PAIRS, QK, get_format, tables

FMTS = sorted(FORMATS)
N = 256  # blocks per kind and format (the numpy reference takes ~0.5 ms a block on one core)


def _scaled(rng, v: np.ndarray) -> np.ndarray:
    """v (n, 64) times a per-block power of two or binary16 value."""
    n = len(v)
    s = np.where(
        rng.random(n) < 0.5,
        2.0 ** rng.integers(-20, 12, n),
        rng.uniform(0.01, 100, n).astype(np.float16).astype(np.float64),
    )
    return (v * s[:, None]).astype(np.float32)


def _pairs(p: np.ndarray) -> np.ndarray:
    """(n, 32, 2) pairs -> (n, 64) rows."""
    return p.reshape(len(p), QK)


def _structured(fmt: str, kind: str, n: int, rng) -> np.ndarray:
    """Pairs exactly on codes, midway between two codes, on ring radii and window-table edges."""
    t = tables(fmt)
    b = em.bounds(fmt)
    nc = len(t.cx)
    if kind == "on_codes":
        c = rng.integers(0, nc, (n, 32))
        p = np.stack([t.cx[c], t.cy[c]], -1).astype(np.float64)
    elif kind == "midway":
        c = rng.integers(0, nc, (n, 32))
        c2 = np.where(rng.random((n, 32)) < 0.5, (c + 1) % nc, rng.integers(0, nc, (n, 32)))
        p = 0.5 * np.stack([t.cx[c] + t.cx[c2], t.cy[c] + t.cy[c2]], -1).astype(np.float64)
    elif kind == "ring_radii":
        j = rng.integers(0, len(b.mid), (n, 32))
        r = np.choose(
            rng.integers(0, 4, (n, 32)), [b.lo[j], b.hi[j], b.mid[j], 0.5 * (b.mid[j] + b.mid[j - 1])]
        )
        a = rng.uniform(-np.pi, np.pi, (n, 32))
        p = np.stack([r * np.cos(a), r * np.sin(a)], -1)
    elif kind == "lut_edges":
        r = rng.integers(0, 70, (n, 32)) / 16.0
        a = rng.uniform(-np.pi, np.pi, (n, 32))
        p = np.stack([r * np.cos(a), r * np.sin(a)], -1)
    elif kind == "bisectors":  # angle exactly between two neighbours of a ring, radius of that ring
        j = rng.integers(1, len(b.mid), (n, 32))
        k = rng.integers(0, 64, (n, 32)) % t.ring_n[j]
        a = t.ring_phi[j].astype(np.float64) + (k + 0.5) * 2 * np.pi / t.ring_n[j]
        r = b.mid[j].astype(np.float64)
        p = np.stack([r * np.cos(a), r * np.sin(a)], -1)
    else:
        raise AssertionError(kind)
    return _pairs(p.astype(np.float32))


def _rows(fmt: str, kind: str, n: int, rng) -> np.ndarray:
    """(n, 64) float32 test blocks of one kind: the shared kinds of tests/blocks.py, else the
    format's structured points (codes, midpoints, ring radii, window-table edges, bisectors)."""
    if kind in blocks.KINDS:
        return blocks.rows(kind, n, rng)
    return _scaled(rng, _structured(fmt, kind, n, rng))


KINDS = [
    "gaussian",
    "scaled",
    "heavy",
    "outlier",
    "zero",
    "huge",
    "tiny",
    "subnormal",
    "nonfinite",
    "randbits",
    "fp16grid",
    "mixed_radii",
    "on_codes",
    "midway",
    "ring_radii",
    "lut_edges",
    "bisectors",
]


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


@functools.cache
def _all_kinds(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """N blocks of every kind and numpy's bytes for them (computed once per format)."""
    x = np.concatenate([_rows(fmt, k, N, _rng(fmt, k)) for k in KINDS])
    return x, codec.quantize_blocks(x, fmt)


@pytest.mark.parametrize("fmt", FMTS)
def test_blocks_equal_reference(fmt):
    x, want = _all_kinds(fmt)
    got, stats = em.encode_blocks(x, fmt)
    assert (got == want).all(), blocks.first_diff(fmt, got, want, "emulation")
    # the window nearly always carries its proof: the full search is the exception
    assert stats["full"] <= 0.01 * stats["scales"], stats


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shift", [-3, -1, 1, 4])
def test_wrong_window_is_rejected(fmt, shift):
    """A window away from rho fails the bound; the full search then gives the reference bytes."""
    rng = _rng(fmt, "shift", shift)
    x = np.concatenate([_rows(fmt, k, 24, rng) for k in ("gaussian", "midway", "ring_radii", "outlier")])
    want = codec.quantize_blocks(x, fmt)
    got, stats = em.encode_blocks(x, fmt, w_shift=shift)
    assert (got == want).all(), blocks.first_diff(fmt, got, want, "emulation")
    assert stats["full"] > 0.5 * stats["scales"], stats


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", ["on_codes", "midway", "ring_radii", "lut_edges", "bisectors"])
def test_search_at_exact_scales(fmt, kind):
    """At power-of-two scales xn = X / s is exact, so the points sit exactly on codes, midpoints
    (distance ties), ring radii and window-table edges in the normalized domain."""
    rng = _rng(fmt, "search", kind)
    n = 512
    p = _structured(fmt, kind, n, rng)
    s = (2.0 ** rng.integers(-24, 15, n)).astype(np.float32)
    x = codec.sanitize(p * s[:, None])
    X, Y = x[:, 0::2], x[:, 1::2]
    theta = np.arctan2(Y, X)
    want_codes, want_e = codec._encode_at(get_format(fmt), X, Y, codec._candidates(get_format(fmt), theta), s)

    t = tables(fmt)
    codes = em.slot_codes(fmt, theta)
    stats = {"scales": 0, "full": 0}
    slot, e = em._encode_at(fmt, X, Y, np.sqrt(X * X + Y * Y), s, t.cx[codes], t.cy[codes], stats)
    got = np.take_along_axis(codes, slot[..., None], -1)[..., 0]
    bad = np.argwhere(got != want_codes)
    if len(bad):
        i = tuple(bad[0])
        pytest.fail(f"{len(bad)} pairs differ; first (block, pair) {i}: code {got[i]}, numpy {want_codes[i]}")
    assert (e.view(np.uint32) == want_e.view(np.uint32)).all()


# ---- the throughput variants' grouped search (polar_encode_block_rs) ---------------------------


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("group", [2, 4, 8, 16])
def test_grouped_search_equals_reference(fmt, group):
    x, want = _all_kinds(fmt)
    got, stats = em.encode_blocks(x, fmt, group=group)
    assert (got == want).all(), blocks.first_diff(fmt, got, want, "emulation")
    assert stats["full"] <= 0.01 * stats["scales"], stats


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shift", [-2, 3])
def test_grouped_search_wrong_window(fmt, shift):
    """Deliberately wrong windows in the grouped search: the full search answers, same bytes."""
    rng = _rng(fmt, "gshift", shift)
    x = np.concatenate([_rows(fmt, k, 16, rng) for k in ("gaussian", "midway", "zero", "tiny", "outlier")])
    want = codec.quantize_blocks(x, fmt)
    got, _ = em.encode_blocks(x, fmt, w_shift=shift, group=8)
    assert (got == want).all(), blocks.first_diff(fmt, got, want, "emulation")


@pytest.mark.parametrize("group", [2, 4, 8, 16])
def test_group_sums_have_tree32_bits(group):
    """Each lane of the reduce-scatter holds tree32's bits of its candidate: values over many
    decades (so that the order of the additions shows in the bits), zeros and infinities."""
    rng = _rng("group_sums", group)
    n = 4000
    v = (
        rng.standard_normal((n, group, PAIRS)) ** 2 * 10.0 ** rng.uniform(-30, 30, (n, group, PAIRS))
    ).astype(np.float32)
    v[rng.random(v.shape) < 0.02] = 0.0
    v[rng.random(v.shape) < 0.002] = np.inf
    e = em.group_sums(v)
    want = codec.tree32(v)  # (n, G)
    k = np.arange(PAIRS) >> (5 - (group.bit_length() - 1))
    assert np.array_equal(e.view(np.uint32), want[:, k].view(np.uint32))


@pytest.mark.parametrize("group", [2, 4, 8, 16])
def test_group_select_is_first_strict_minimum(group):
    """The group's (least bits, lowest k) kept on a strict < over groups is the sequential loop's
    first strict minimum, ties and +inf (skipped scales) included."""
    rng = _rng("group_select", group)
    n, ncand = 5000, 16
    E = rng.integers(0, 6, (n, ncand)).astype(np.float32)  # many ties
    E[rng.random(E.shape) < 0.3] = np.inf
    E[rng.random(n) < 0.05] = np.inf  # every scale skipped
    want_k = np.full(n, -1)
    best = np.full(n, np.inf, np.float32)
    for k in range(ncand):
        u = E[:, k] < best
        best[u], want_k[u] = E[u, k], k
    lg = group.bit_length() - 1
    lane_k = np.arange(PAIRS) >> (5 - lg)
    got_k = np.full(n, -1)
    best_b = np.full(n, em.INF_BITS, np.uint32)
    for k0 in range(0, ncand, group):
        eb, kl = em.group_select(np.ascontiguousarray(E[:, k0 + lane_k]), group)
        u = eb < best_b
        best_b[u], got_k[u] = eb[u], k0 + kl[u]
    assert np.array_equal(got_k, want_k)
    assert np.array_equal(best_b.view(np.float32), best)
