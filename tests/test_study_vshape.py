"""study.vshape: V noise shaping along the tokens (issue 12, measured in numpy and dropped)."""

from __future__ import annotations

import numpy as np
import pytest

from study import AttentionRef, vshape
from study.run import hadamard_rows


def _rounder(h: float):
    return lambda x: np.round(np.asarray(x) / h) * h


def test_plain_when_c_is_zero():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2, 9, 8))
    rt = _rounder(0.25)
    assert np.array_equal(vshape.shaped_roundtrip(v, rt, 0.0), rt(v))


def test_full_shaping_telescopes():
    """c = 1: e_t = r_{t-1} - r_t, so the errors of tokens 0..t add up to -r_t, never more than half a
    step, while the plain errors' sum grows with the number of tokens."""
    rng = np.random.default_rng(1)
    h = 0.5
    v = rng.standard_normal((3, 400, 4))
    shaped = vshape.shaped_roundtrip(v, _rounder(h), 1.0, skip_first=False)
    run = np.cumsum(shaped - v, axis=1)
    assert np.abs(run).max() <= h / 2 + 1e-12
    plain = np.cumsum(_rounder(h)(v) - v, axis=1)
    assert np.abs(plain).max() > 2 * h
    # skip_first: token 0's error is not passed on, so the sums from token 1 telescope instead
    shaped = vshape.shaped_roundtrip(v, _rounder(h), 1.0, skip_first=True)
    assert np.abs(np.cumsum(shaped[:, 1:] - v[:, 1:], axis=1)).max() <= h / 2 + 1e-12
    assert not np.array_equal(
        shaped[:, 1], vshape.shaped_roundtrip(v, _rounder(h), 1.0, skip_first=False)[:, 1]
    )


def test_lag1_of_flat_and_peaked_attention():
    """rho is near 1 where every key gets the same weight and 0 where each query sees one key."""
    t, d = 64, 8
    q = np.zeros((1, t, d))
    k = np.zeros((1, t, d))
    flat = AttentionRef(q, k, np.ones((1, t, d)), np.array([t - 1]))
    assert vshape.lag1(flat) > 0.95
    k = np.zeros((1, t, d))  # a large logit on key 40 only
    k[0, 40, 0] = 100.0
    q[0, :, 0] = 1.0
    peaked = AttentionRef(q, k, np.ones((1, t, d)), np.array([t - 1]))
    assert vshape.lag1(peaked) < 1e-6


def test_codec_roundtrip_rotates_and_undoes():
    """The study's V path: the rotation (its own inverse) around the codec; an identity codec gives
    the input back, and the codec sees the rotated rows."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 128))
    seen = []

    def ident(b):
        seen.append(b.copy())
        return b

    assert np.allclose(vshape.codec_roundtrip(ident)(x), x)
    assert np.allclose(seen[0], hadamard_rows(x, vshape.V_ROT).astype(np.float32))


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.25"])
def test_strength_outside_range_refused(bad, capsys):
    """`quality_levers.py vshape --c` takes strengths in (0, 1]; another is refused before anything loads,
    naming what it got."""
    import quality_levers

    with pytest.raises(SystemExit) as e:
        quality_levers.main(["vshape", "--c", "0.5", bad])
    assert e.value.code == 2
    assert f"each strength must be in (0, 1] (the plain codes are measured too), got [{float(bad)}]" in (
        capsys.readouterr().err
    )
