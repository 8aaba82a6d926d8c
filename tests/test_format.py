"""The format definition: sizes, the generated header (up to date, and its structs compiled
against the Python layout), codebooks Lloyd-optimal."""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from kvpolar import format


def test_layout_constants():
    assert format.POLAR.type_size == 34 and format.POLAR.bits_per_elem == 4.25
    assert format.POLAR3.type_size == 26 and format.POLAR3.bits_per_elem == 3.25
    assert [f.type_id for f in format.FORMATS.values()] == [43, 44]  # after GGML_TYPE_Q2_0 = 42
    assert [f.kernel_id for f in format.FORMATS.values()] == [0, 1]  # KFMT/VFMT of cupy_kernels
    assert format.POLAR.offsets == {"d": 0, "qs": 2}
    assert format.POLAR3.offsets == {"d": 0, "qs": 2, "qh": 18}
    for f in format.FORMATS.values():
        assert sum(fld.dtype.itemsize for fld in f.layout) == f.type_size  # no padding
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


def _probe_source() -> str:
    """A C program printing what the compiler made of the header: one `key value` per line."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "ggml-polar-format.h"']
    lines.append("int main(void) {")
    for f in format.FORMATS.values():
        st, u = f"block_{f.name}", f.name.upper()
        lines.append(f'    printf("{st} %d\\n", (int) sizeof({st}));')
        for fld in f.layout:
            lines.append(
                f'    printf("{st}.{fld.name} %d %d\\n", (int) offsetof({st}, {fld.name}), '
                f"(int) sizeof((({st} *) 0)->{fld.name}));"
            )
        for macro in (f"GGML_TYPE_{u}_ID", f"{u}_KERNEL_ID", f"{u}_TYPE_SIZE", f"QK_{u}"):
            lines.append(f'    printf("{macro} %d\\n", (int) ({macro}));')
    return "\n".join([*lines, "    return 0;", "}", ""])


def _expected() -> dict[str, str]:
    want = {}
    for f in format.FORMATS.values():
        st, u = f"block_{f.name}", f.name.upper()
        want[st] = str(f.type_size)
        for fld in f.layout:
            want[f"{st}.{fld.name}"] = f"{f.offsets[fld.name]} {fld.dtype.itemsize}"
        want[f"GGML_TYPE_{u}_ID"] = str(f.type_id)
        want[f"{u}_KERNEL_ID"] = str(f.kernel_id)
        want[f"{u}_TYPE_SIZE"] = str(f.type_size)
        want[f"QK_{u}"] = str(f.block_size)
    return want


@pytest.mark.parametrize(
    ("compiler", "std", "suffix"), [("cc", "c99", ".c"), ("cc", "c11", ".c"), ("c++", "c++17", ".cpp")]
)
def test_header_structs_match_layout(tmp_path, compiler, std, suffix):
    """sizeof/offsetof of every field of every block struct and the ids, as a compiler sees
    the generated header, equal the layout in kvpolar.format."""
    env = {"cc": "CC", "c++": "CXX"}[compiler]
    cc = shutil.which(os.environ.get(env, compiler))
    if cc is None:
        pytest.skip(f"no {compiler} compiler (set ${env})")
    src = tmp_path / f"probe{suffix}"
    src.write_text(_probe_source())
    exe = tmp_path / "probe"
    flags = [f"-std={std}", "-Wall", "-Wextra", "-pedantic", "-Werror"]
    cmd = [cc, *flags, "-I", str(format.HEADER_PATH.parent), str(src), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    got = dict(line.split(" ", 1) for line in out.splitlines())
    assert got == _expected()


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
