"""study.scalebits (quality_levers.py scalebits): the reference encoder with its block scale on a log grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

import quality_levers
from kvpolar import codec
from study import scalebits


def test_fp16_rounding_is_the_codec_itself():
    x = scalebits.blocks(256, 8.0, seed=1)
    for fmt in ("polar", "polar3"):
        want = codec.dequantize(codec.quantize(x.reshape(-1), fmt), fmt).reshape(x.shape)
        y, s = scalebits.roundtrip(x, fmt, None)
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(s, codec.to_half(s))  # fp16 values


def test_log_grid_scales_are_grid_points_and_the_codec_keeps_fp16():
    x = scalebits.blocks(64, 8.0, seed=2)
    _, s = scalebits.roundtrip(x, "polar", scalebits.log_grid(4))
    k = np.log2(s[s > 0]) * 4
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    # the reference encoder's own default is untouched: its scales are fp16 values, not grid points
    s16, _ = codec._encode_chunk(codec._fmt("polar"), x)
    np.testing.assert_array_equal(s16, codec.to_half(s16))
    assert not np.allclose(s16, s)
    with pytest.raises(ValueError, match="at least 1 step an octave, got 0"):
        scalebits.log_grid(0)


def test_a_coarser_grid_costs_more(tmp_path, capsys):
    out = tmp_path / "sb.json"
    argv = ["scalebits", "--blocks", "512", "--levels", "64", "2", "--json", str(out)]
    assert quality_levers.main(argv) == 0
    rows = {(r["type"], r["levels"]): r for r in json.loads(out.read_text())["rows"]}
    for fmt in ("polar", "polar3"):
        assert rows[(fmt, None)]["vs_fp16"] == 1.0
        # 2 steps an octave (scales up to 19 % off) clearly worse than fp16; 64 steps within 1 %
        assert rows[(fmt, 2)]["rel_mse"] > 1.05 * rows[(fmt, None)]["rel_mse"]
        assert abs(rows[(fmt, 64)]["vs_fp16"] - 1) < 0.01
    assert "| polar3 | log 2/octave |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        quality_levers.main(["scalebits", "--levels", "0"])


def test_real_rows_center_and_rotate_k(monkeypatch):
    """measure_real: K of window 0's mean plus noise, so that centering leaves the noise; with fp16 scales the
    pooled error is the codec's on those blocks (the same whatever constant offset K carries)."""
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((2, 2, 64, 64)).astype(np.float32)
    layer = {"k": noise + 50.0, "v": noise, "q": noise}
    monkeypatch.setattr(scalebits.activations, "have", lambda *a: True)
    monkeypatch.setattr(scalebits.activations, "meta", lambda *a: {"n_layer": 1})
    monkeypatch.setattr(scalebits.activations, "load_layer", lambda *a: layer)
    rows = scalebits.measure_real(["smollm2-135m"], n_layers=1, levels=(16,))
    by = {(r["tensor"], r["type"], r["levels"]): r for r in rows}
    assert set(by) == {(t, f, lv) for t in "KV" for f in ("polar", "polar3") for lv in (None, 16)}
    # the offset is gone: K's fp16 error is that of centered noise, near V's (the same noise, not centered)
    assert by[("K", "polar", None)]["rel_mse"] == pytest.approx(by[("V", "polar", None)]["rel_mse"], rel=0.1)
    monkeypatch.setattr(scalebits.activations, "have", lambda *a: False)
    with pytest.raises(SystemExit, match="no activations for smollm2-135m"):
        scalebits.measure_real(["smollm2-135m"])
