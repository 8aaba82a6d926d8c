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
        np.testing.assert_array_equal(scalebits.roundtrip(x, fmt, None), want)


def test_log_grid_scales_are_grid_points_and_the_codec_is_restored():
    x = scalebits.blocks(64, 8.0, seed=2)
    rnd = scalebits.log_grid(4)
    with scalebits.scale_rounding(rnd):
        s, _ = codec._encode_chunk(codec._fmt("polar"), x)
    k = np.log2(s[s > 0]) * 4
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert codec.to_half is not rnd
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
