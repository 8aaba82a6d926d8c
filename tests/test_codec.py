"""numpy reference codec: an independent brute-force encoder of docs/FORMAT.md, the golden
vectors, packing, edge cases and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvpolar import codec, format

F32 = np.float32
GOLDEN = Path(__file__).parent / "data" / "golden.json"
FORMATS = list(format.FORMATS)


def brute_force_block(x: np.ndarray, name: str) -> tuple[np.float32, np.ndarray]:
    """FORMAT.md, one block at a time, nearest point by exhaustive search over all codes."""
    t = format.tables(name)
    x = np.where(np.isnan(x), F32(0), x).astype(F32)
    x = np.clip(x, F32(-format.VMAX), F32(format.VMAX)).astype(F32)
    X, Y = x[0::2], x[1::2]
    rmax = np.sqrt((X * X + Y * Y).max())

    def tree(v):
        v = v.copy()
        h = 16
        while h:
            v[:h] = v[:h] + v[h : 2 * h]
            h //= 2
        return v[0]

    def enc(s):
        inv = F32(1) / s
        codes = np.empty(32, np.int64)
        e = np.empty(32, F32)
        for p in range(32):
            dx = X[p] * inv - t.cx
            dy = Y[p] * inv - t.cy
            c = int(np.argmin(dx * dx + dy * dy))  # first minimum = lowest code
            codes[p] = c
            ex = X[p] - s * t.cx[c]
            ey = Y[p] - s * t.cy[c]
            e[p] = ex * ex + ey * ey
        return codes, tree(e)

    half = lambda v: F32(np.float16(min(F32(v), F32(format.FP16_MAX))))  # noqa: E731
    best = None
    if rmax > 0:
        for g in t.g:
            s = half(rmax * g)
            if s == 0:
                continue
            codes, err = enc(s)
            if best is None or err < best[2]:
                best = (s, codes, err)
    if best is None:
        return F32(0), np.zeros(32, np.int64)
    for _ in range(format.N_REFINE):
        s, codes, err = best
        num = tree(X * t.cx[codes] + Y * t.cy[codes])
        den = tree(t.cx[codes] * t.cx[codes] + t.cy[codes] * t.cy[codes])
        if not den > 0:
            break
        s2 = half(num / den)
        if not (s2 > 0 and s2 != s):
            break
        c2, e2 = enc(s2)
        if not e2 < err:
            break
        best = (s2, c2, e2)
    return best[0], best[1]


def golden_cases():
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("name", FORMATS)
def test_golden_vectors(name):
    cases = golden_cases()
    x = np.array([[float.fromhex(v) for v in c["x"]] for c in cases], F32)
    got = codec.quantize_blocks(x, name)
    for i, c in enumerate(cases):
        assert got[i].tobytes().hex() == c[name], f"{name}: golden block {c['name']} differs"


@pytest.mark.parametrize("name", FORMATS)
def test_golden_vectors_match_brute_force(name):
    """Re-derives each golden entry with the exhaustive encoder (independent of the ring logic)."""
    for c in golden_cases():
        x = np.array([float.fromhex(v) for v in c["x"]], F32)
        d, codes = brute_force_block(x, name)
        want = codec.pack(name, np.array([d]), codes[None])[0]
        assert want.tobytes().hex() == c[name], f"{name}: {c['name']}"


@pytest.mark.parametrize("name", FORMATS)
def test_ring_candidates_find_exact_nearest(name):
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            rng.standard_normal((24, 64)),
            rng.standard_t(3, (8, 64)),
            rng.standard_normal((8, 64)) * rng.uniform(0.1, 10, (8, 1)) + rng.standard_normal(64) * 3,
        ]
    ).astype(F32)
    got = codec.quantize_blocks(x, name)
    for i, row in enumerate(x):
        d, codes = brute_force_block(row, name)
        want = codec.pack(name, np.array([d]), codes[None])[0]
        gd, gc = codec.unpack(name, got[i : i + 1])
        assert got[i].tobytes() == want.tobytes(), (
            f"block {i}: d {gd[0]} vs {d}, first differing code at pair "
            f"{int(np.argmax(gc[0] != codes)) if (gc[0] != codes).any() else None}"
        )


@pytest.mark.parametrize("name", FORMATS)
def test_pack_unpack_round_trip(name):
    fmt = format.get_format(name)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, fmt.ncodes, (50, 32))
    d = rng.standard_normal(50).astype(np.float16).astype(F32)
    b = codec.pack(name, d, codes)
    assert b.shape == (50, fmt.type_size)
    d2, c2 = codec.unpack(name, b)
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(d2, d)


@pytest.mark.parametrize("name", FORMATS)
def test_random_bytes_decode_finite_and_exact(name):
    fmt = format.get_format(name)
    t = format.tables(name)
    rng = np.random.default_rng(11)
    b = rng.integers(0, 256, (200, fmt.type_size), dtype=np.uint8)
    d = b[:, :2].copy().view("<f2")
    bad = ~np.isfinite(d[:, 0])
    b[bad, 1] &= 0x3F  # keep d finite
    y = codec.dequantize_blocks(b, name)
    assert np.isfinite(y).all()
    s, codes = codec.unpack(name, b)
    np.testing.assert_array_equal(y[:, 0::2], s[:, None] * t.cx[codes])
    np.testing.assert_array_equal(y[:, 1::2], s[:, None] * t.cy[codes])


@pytest.mark.parametrize("name", FORMATS)
def test_zero_block(name):
    b = codec.quantize_blocks(np.zeros((3, 64), F32), name)
    assert not b.any(), "an all-zero block encodes to all-zero bytes"
    y = codec.dequantize_blocks(np.zeros((2, format.get_format(name).type_size), np.uint8), name)
    assert (y == 0).all() and not np.signbit(y).any()


@pytest.mark.parametrize("name", FORMATS)
def test_edge_inputs(name):
    rng = np.random.default_rng(5)
    huge = (rng.standard_normal((2, 64)) * 1e30).astype(F32)
    y = codec.dequantize_blocks(codec.quantize_blocks(huge, name), name)
    assert np.isfinite(y).all()
    assert np.abs(y).max() <= format.FP16_MAX * format.tables(name).radii[-1] * 1.001  # saturated scale
    sub = (rng.standard_normal((2, 64)) * 1e-42).astype(F32)
    y = codec.dequantize_blocks(codec.quantize_blocks(sub, name), name)
    assert np.isfinite(y).all()
    small = (rng.standard_normal((4, 64)) * 1e-3).astype(F32)
    y = codec.dequantize_blocks(codec.quantize_blocks(small, name), name)
    rel = ((small - y) ** 2).sum() / (small**2).sum()
    assert rel < {"polar": 0.02, "polar3": 0.06}[name]  # fp16 subnormal scales still work
    nf = np.array([[np.nan, np.inf, -np.inf] + [0.5] * 61], F32)
    y = codec.dequantize_blocks(codec.quantize_blocks(nf, name), name)
    assert np.isfinite(y).all()
    assert y[0, 1] > 1e4 and y[0, 2] < -1e4  # +-Inf saturate


@pytest.mark.parametrize(("name", "bound"), [("polar", 0.0065), ("polar3", 0.027)])
def test_gaussian_distortion(name, bound):
    """The format-study figures (docs/format-study.md) on a fixed seed: 0.0063 and 0.0258."""
    x = np.random.default_rng(2024).standard_normal((8000, 64)).astype(F32)
    y = codec.dequantize_blocks(codec.quantize_blocks(x, name), name)
    rel = float(((x - y).astype(np.float64) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
    assert rel <= bound


def test_row_api_shapes_and_errors():
    x = np.random.default_rng(0).standard_normal((3, 5, 128)).astype(F32)
    b = codec.quantize(x, "polar")
    assert b.shape == (3, 5, 68) and b.dtype == np.uint8
    assert codec.dequantize(b, "polar").shape == x.shape
    with pytest.raises(ValueError, match=r"multiple of the block size 64, got shape \(3, 96\)"):
        codec.quantize(np.zeros((3, 96), F32), "polar")
    with pytest.raises(ValueError, match="NaN/Inf"):
        codec.quantize(np.full((1, 64), np.nan, F32))
    codec.quantize(np.full((1, 64), np.nan, F32), nonfinite="sanitize")
    with pytest.raises(ValueError, match="unknown polar format 'q4'"):
        codec.quantize(np.zeros((1, 64), F32), "q4")
    with pytest.raises(ValueError, match="uint8"):
        codec.dequantize(np.zeros((1, 34), np.int8), "polar")
    with pytest.raises(ValueError, match="multiple of the block size 26 bytes"):
        codec.dequantize(np.zeros((1, 34), np.uint8), "polar3")
    with pytest.raises(ValueError, match="real float"):
        codec.quantize(np.zeros((1, 64), np.complex64))
