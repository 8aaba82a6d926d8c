"""study.vtransform: V transform coding (issue 12, measured in numpy and by KLD)."""

from __future__ import annotations

import numpy as np
import pytest

from study import vtransform
from study.vshape import V_ROT


def _aniso(rng, t: int, d: int, spread: float = 4.0) -> np.ndarray:
    """t rows of a zero-mean Gaussian in d dimensions, variances over `spread` octaves, in a random basis."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sd = 2.0 ** (-np.linspace(0.0, spread, d) / 2)
    return (rng.standard_normal((t, d)) * sd) @ q.T


@pytest.mark.parametrize(
    "kind,p", [("klt", 0.0), ("klt", 0.25), ("diag", 0.25), ("klt", 0.375), ("rand", 0.0), ("rand", 0.25)]
)
def test_transform_is_inverted_exactly(kind, p):
    rng = np.random.default_rng(0)
    m, mi = vtransform.transform(_aniso(rng, 300, 64), kind, p)
    assert np.allclose(m @ mi, np.eye(64), atol=1e-9)


@pytest.mark.parametrize("kind", ["klt", "rand"])
def test_without_shaping_is_orthogonal(kind):
    rng = np.random.default_rng(1)
    m, mi = vtransform.transform(_aniso(rng, 300, 64), kind, 0.0)
    assert np.allclose(m.T @ m, np.eye(64), atol=1e-9)
    assert np.allclose(mi, m.T, atol=1e-9)
    if kind == "rand":  # seeded: the same matrix for the same seed, another for another
        assert np.array_equal(m, vtransform.transform(_aniso(rng, 300, 64), kind, 0.0)[0])
        assert not np.allclose(m, vtransform.transform(_aniso(rng, 300, 64), kind, 0.0, seed=1)[0])


def test_shaping_equalises_the_stored_energy():
    """p = 1/2 whitens the calibration rows (each KLT direction carries the same energy); p = 1/4 halves the
    spread of the directions' energies in octaves."""
    rng = np.random.default_rng(2)
    x = _aniso(rng, 4000, 32, spread=6.0)
    for p, span in ((0.5, 0.0), (0.25, 3.0)):
        m, _ = vtransform.transform(x, "klt", p)
        e = ((x @ m) ** 2).mean(axis=0)
        assert np.log2(e.max() / e.min()) == pytest.approx(span, abs=0.05)


def test_predicted_gain():
    rng = np.random.default_rng(3)
    assert vtransform.predicted_gain(rng.standard_normal((20000, 16))) == pytest.approx(1.0, abs=0.02)
    x = _aniso(rng, 20000, 16, spread=6.0)
    lam = np.sort(np.linalg.eigvalsh(x.T @ x / len(x)))
    assert vtransform.predicted_gain(x) == pytest.approx(16 * lam.sum() / np.sqrt(lam).sum() ** 2)
    assert vtransform.predicted_gain(x) > 1.3


def test_identity_codec_gives_the_values_back():
    rng = np.random.default_rng(4)
    v = rng.standard_normal((2, 50, 2 * V_ROT))
    mats = [vtransform.transform(v[h], "klt", 0.25) for h in range(2)]
    out = vtransform.shaped_roundtrip(v, lambda y: y, mats)
    assert np.allclose(out, v, atol=1e-5)


def test_shaping_lowers_a_block_codes_error_on_anisotropic_values():
    """With a code whose error follows the block's size (here: rounding to 1/8 of the row's largest
    magnitude), p = 1/4 stores anisotropic values with less error than p = 0 (the orthogonal path)."""

    def code(y):
        step = np.abs(y).max(axis=-1, keepdims=True) / 8.0
        return np.round(y / step) * step

    rng = np.random.default_rng(5)
    v = np.stack([_aniso(rng, 2000, V_ROT, spread=6.0) for _ in range(2)])
    errs = {}
    for p in (0.0, 0.25):
        mats = [vtransform.transform(v[h, :500], "klt", p) for h in range(2)]
        errs[p] = float(((vtransform.shaped_roundtrip(v, code, mats) - v) ** 2).sum())
    assert errs[0.25] < 0.8 * errs[0.0]


def test_variant_names():
    assert vtransform._variant("klt-1/4") == ("klt", 0.25)
    assert vtransform._variant("diag-1/4") == ("diag", 0.25)
    assert vtransform._variant("rand-0") == ("rand", 0.0)
    for name in vtransform.VARIANTS:
        vtransform._variant(name)
    for bad in ("pca-1/4", "klt", "klt-"):
        with pytest.raises(ValueError, match="KIND-P"):
            vtransform._variant(bad)


def test_write_matrices_files(tmp_path, monkeypatch):
    """The measurement build's files: per layer M then M^-1 (float32, [n_head_kv][D][D]), M M^-1 = I; rand's
    seed picks other bases, klt's does not matter."""
    rng = np.random.default_rng(6)
    v = rng.standard_normal((2, 2, 40, 64)).astype(np.float32)  # (n_seq, n_head_kv, T, D)
    monkeypatch.setattr(vtransform.activations, "have", lambda model, n_seq, seq_len: True)
    monkeypatch.setattr(vtransform.activations, "meta", lambda model, n_seq, seq_len: {"n_layer": 3})
    monkeypatch.setattr(vtransform.activations, "load_layer", lambda model, il, n_seq, seq_len: {"v": v})
    for name, var, seed in (
        ("r0", "rand-0", 0),
        ("r1", "rand-0", 1),
        ("k0", "klt-1/4", 0),
        ("k1", "klt-1/4", 1),
    ):
        assert vtransform.write_matrices("m", tmp_path / name, var, 2, 40, 20, seed=seed) == 3
    files = {}
    for name in ("r0", "r1", "k0", "k1"):
        raw = np.fromfile(tmp_path / name / "L02.bin", dtype=np.float32).reshape(2, 2, 64, 64)
        for h in range(2):
            assert np.allclose(raw[0, h] @ raw[1, h], np.eye(64), atol=1e-4)
        files[name] = raw
    assert not np.allclose(files["r0"], files["r1"])
    assert np.array_equal(files["k0"], files["k1"])


def test_missing_activations_name_the_dump_command(monkeypatch):
    monkeypatch.setattr(vtransform.activations, "have", lambda model, n_seq, seq_len: False)
    with pytest.raises(SystemExit, match=r"no activations for m at 2 x 40: python -m study.activations dump"):
        vtransform.write_matrices("m", "/nonexistent", "klt-1/4", 2, 40, 20)
    with pytest.raises(SystemExit, match=r"--n-seq 2 --seq-len 40"):
        vtransform.measure(["m"], vtransform.Setup(["polar3"], ["klt-1/4"], 2, 40, 8, 20))
