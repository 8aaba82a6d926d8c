"""Study variants (Lloyd-Max pairs, chosen ring codes with/without scale search, ring counts) and
the study's attention metrics."""

from __future__ import annotations

import numpy as np
import pytest

from kvpolar import codec
from kvpolar import format as kf
from study import AttentionRef, finish_attention, layouts
from study import variants as V

scipy_integrate = pytest.importorskip("scipy.integrate")


@pytest.fixture(scope="module")
def gauss():
    return np.random.default_rng(123).standard_normal((4096, 64)).astype(np.float32)


def rel(x, y):
    x = x.astype(np.float64)
    return float(((x - y) ** 2).sum() / (x * x).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rayleigh_codebook_lloyd_max_conditions(bits):
    book = V.rayleigh_codebook(bits)
    c, b = book.centroids, book.boundaries
    np.testing.assert_allclose(b, (c[1:] + c[:-1]) / 2, atol=1e-15)
    edges = np.concatenate([[0.0], b, [np.inf]])
    for j in range(len(c)):
        mass = scipy_integrate.quad(V.rayleigh_pdf, edges[j], edges[j + 1])[0]
        mom = scipy_integrate.quad(lambda r: r * V.rayleigh_pdf(r), edges[j], edges[j + 1])[0]
        assert abs(mom / mass - c[j]) < 1e-6, (j, mom / mass, c[j])


def test_lm_pair(gauss):
    cfg = V.LMPairConfig(3, 5)
    assert cfg.bits_per_elem == 4.25
    y = V.lm_pair_roundtrip(gauss, cfg)
    assert y.shape == gauss.shape and y.dtype == np.float32
    assert 0.0085 < rel(gauss, y) < 0.0100  # docs/format-study.md: 0.0092
    np.testing.assert_array_equal(V.lm_pair_roundtrip(np.zeros((2, 64)), cfg), 0)


def test_chosen_search_is_the_codec(gauss):
    ref = codec.dequantize_blocks(codec.quantize_blocks(gauss[:512], "polar"), "polar")
    np.testing.assert_array_equal(V.chosen_roundtrip(gauss[:512], "polar", "search"), ref)


@pytest.mark.parametrize("fmt", ["polar", "polar3"])
def test_scale_search_beats_plain_scales(fmt, gauss):
    x = gauss[:1024]
    e = {s: rel(x, V.chosen_roundtrip(x, fmt, s)) for s in V.SCALES}
    assert e["search"] < e["norm"] and e["search"] < e["max"]
    assert e["search"] < 0.9 * min(e["norm"], e["max"])


def test_plain_scale_zero_block():
    z = np.zeros((3, 64), np.float32)
    for s in ("norm", "max"):
        np.testing.assert_array_equal(V.chosen_roundtrip(z, "polar", s), 0)


def test_ring_code_with_chosen_counts_matches_codec(gauss):
    x = gauss[:1024]
    code = V.RingCode(kf.POLAR.counts)
    assert code.bits_per_elem == kf.POLAR.bits_per_elem
    e_ring = rel(x, V.ring_roundtrip(x, code))
    e_codec = rel(x, V.chosen_roundtrip(x, "polar"))
    assert abs(e_ring - e_codec) < 0.01 * e_codec


def test_ring_design_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLAR_CACHE", str(tmp_path))
    monkeypatch.setattr(V, "DESIGN_SAMPLES", 20000)
    V.ring_radii.cache_clear()
    counts = (1, 3, 4)
    r = V.ring_radii(counts)
    assert r[0] == 0 and np.all(np.diff(r) > 0)
    assert (tmp_path / "study" / "ring-1-3-4-n20000.npy").is_file()
    V.ring_radii.cache_clear()
    np.testing.assert_array_equal(V.ring_radii(counts), r)
    V.ring_radii.cache_clear()
    x = np.random.default_rng(0).standard_normal((256, 64))
    y = V.ring_roundtrip(x, V.RingCode(counts, search=False))
    assert y.shape == x.shape
    with pytest.raises(ValueError, match="origin"):
        V.ring_radii((2, 6))


def test_ring_variants_sum_to_powers_of_two():
    for name, counts in V.RING_VARIANTS.items():
        n = sum(counts)
        assert n & (n - 1) == 0 and name.startswith(f"{n} pts, {len(counts)} rings"), (name, counts)


def test_layouts_registry_shapes():
    lays = layouts("neox")
    x = np.random.default_rng(9).standard_normal((2, 128, 128)).astype(np.float32)
    for key in ("q4_0", "q8_0", "polar", "polar3", "A-preset", "B-44-ch", "B-33-ch", "LM-r3a5"):
        y = lays[key].fn(x)
        assert y.shape == x.shape, key
        assert 0 < rel(x, y) < 0.1, key
    assert lays["polar"].bits(x.shape) == 4.25 and lays["B-44-ch"].bits(x.shape) == 4.25
    assert lays["A-preset"].bits(x.shape) == 3.875


def test_attention_metrics():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 64, 16))
    k = rng.standard_normal((2, 64, 16))
    v = rng.standard_normal((2, 64, 16))
    ref = AttentionRef(q, k, v, np.arange(3, 64, 4))
    exact = finish_attention({**ref.k_sums(k), **ref.v_sums(v)})
    assert exact["logit_err"] == 0 and abs(exact["kl"]) < 1e-12 and exact["out_err_k"] < 1e-25
    assert exact["out_err_v"] < 1e-25
    # a fixed offset on every key shifts each query's logits by a constant: softmax unchanged
    shifted = finish_attention(ref.k_sums(k + rng.standard_normal((2, 1, 16))))
    assert shifted["logit_err"] > 0.01 and abs(shifted["kl"]) < 1e-12 and shifted["out_err_k"] < 1e-20
    noisy = finish_attention(ref.k_sums(k + 0.1 * rng.standard_normal(k.shape)))
    assert 0 < noisy["kl"] and 0 < noisy["out_err_k"]
