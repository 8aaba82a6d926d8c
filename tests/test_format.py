"""The format definition: sizes, generated files up to date, codebooks Lloyd-optimal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvpolar import format


def test_layout_constants():
    assert format.POLAR.type_size == 34 and format.POLAR.bits_per_elem == 4.25
    assert format.POLAR3.type_size == 26 and format.POLAR3.bits_per_elem == 3.25
    assert [f.type_id for f in format.FORMATS.values()] == [43, 44]  # after GGML_TYPE_Q2_0 = 42
    for f in format.FORMATS.values():
        assert sum(np.dtype(dt).itemsize * n for _, dt, n in f.fields) == f.type_size
        assert 64 % f.block_size == 0 and 128 % f.block_size == 0


def test_header_is_generated_from_this_module():
    assert format.HEADER_PATH.read_text() == format.render_header(), (
        f"{format.HEADER_PATH} is stale: run `{format.GEN_COMMAND.replace('--write', '--write-header')}`"
    )


def test_header_literals_parse_back_exactly():
    text = format.HEADER_PATH.read_text()
    for name in format.FORMATS:
        t = format.tables(name)
        body = text.split(f"#define {name.upper()}_CX_INIT {{")[1].split("}")[0]
        vals = np.array([float(v.strip().rstrip("f")) for v in body.replace("\\", "").split(",")], np.float32)
        np.testing.assert_array_equal(vals, t.cx)


@pytest.mark.parametrize("name", list(format.FORMATS))
def test_tables_follow_ring_definition(name):
    f = format.get_format(name)
    t = format.tables(name)
    assert t.cx.shape == (f.ncodes,) and t.cx[0] == 0 and t.cy[0] == 0
    r = np.hypot(t.cx.astype(np.float64), t.cy.astype(np.float64))
    for j, (n, off) in enumerate(zip(t.ring_n, t.ring_off, strict=True)):
        np.testing.assert_allclose(r[off : off + n], t.radii[j], rtol=1e-6, atol=1e-7)
        if n > 1:
            ang = np.arctan2(t.cy[off : off + n], t.cx[off : off + n]).astype(np.float64)
            steps = np.diff(np.unwrap(ang))
            np.testing.assert_allclose(steps, 2 * math.pi / n, rtol=1e-5)
    assert np.all(np.diff(t.radii) > 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(format.FORMATS))
def test_codebook_is_lloyd_fixed_point(name):
    """Centroid condition: one more restricted Lloyd step on the design samples moves no radius."""
    f = format.get_format(name)
    radii = format.tables(name).radii.astype(np.float64)
    samples = format.design_samples(100_000, seed=99)  # fresh samples: optimal for the law, not the draw
    new, mse = format.lloyd_ring_step(f.counts, radii, samples)
    np.testing.assert_allclose(new, radii, atol=0.01)
    assert mse < {"polar": 0.0095, "polar3": 0.034}[name]
