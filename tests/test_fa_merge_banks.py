"""The shared-memory layout of the tensor-core polar kernel's warp merge (patch 0025, `polar_fa_o_slot` in
ggml-cuda's fattn-polar-mma.cuh) is free of bank conflicts, by a model of the 32 four-byte banks.

The formulas are read from the patch itself (the slot of row r, dim d, and the dim a lane's accumulator
O[n][c] holds), so the test follows the code: each of a warp's stores (lane (g, t), fixed n and c: 8 rows
x 4 dims) and each read of 32 consecutive dims of a row must touch 32 different banks, and the slots of a
row must be a permutation of its D + 1 floats' first D. The unswizzled layout of session 12 (rows of D
floats) is checked to fail the same model: 32-way conflicts (docs/results-cuda.md, session 13).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parents[1] / "patches" / "llama.cpp"


def _patch_text() -> str:
    for p in sorted(PATCHES.glob("*.patch")):
        t = p.read_text()
        if "polar_fa_o_slot(const int r, const int d)" in t:
            return t
    raise AssertionError(f"no patch in {PATCHES} defines polar_fa_o_slot")


def _c_to_py(expr: str) -> str:
    expr = re.sub(r"(\w+) == (\d+) \? (\d+) : (\d+)", r"(\3 if \1 == \2 else \4)", expr)
    return expr.replace("/", "//")


def _formulas():
    t = _patch_text()
    slot = re.search(r"return (r\*\(D \+ 1\) \+ .*);", t).group(1)
    shift = re.search(r"constexpr int L = (.*?);", t).group(1)
    dim = re.search(r"const int dim = (2\*\(\(2\*t .*?);", t).group(1)
    return _c_to_py(slot), _c_to_py(shift), _c_to_py(dim)


def _worst(D: int, slot) -> tuple[int, int]:
    """(worst store conflict, worst read conflict) of the merge at head size D under slot(r, d)."""
    _, _, dim_expr = _formulas()
    NPV = D // 16
    worst_store = 0
    for n in range(D // 8):
        for c in range(4):
            banks: dict[int, set[int]] = {}
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                row = g + 8 * (c // 2)
                d = eval(dim_expr, {}, {"t": t, "c": c, "n": n, "NPV": NPV})
                a = slot(row, d)
                banks.setdefault(a % 32, set()).add(a)
            worst_store = max(worst_store, max(len(v) for v in banks.values()))
    worst_read = 0
    for row in range(16):
        for d0 in range(0, D, 32):
            banks = {}
            for d in range(d0, d0 + 32):
                a = slot(row, d)
                banks.setdefault(a % 32, set()).add(a)
            worst_read = max(worst_read, max(len(v) for v in banks.values()))
    return worst_store, worst_read


@pytest.mark.parametrize("D", [64, 128])
def test_merge_layout_conflict_free(D):
    slot_expr, shift_expr, _ = _formulas()
    L = eval(shift_expr, {}, {"D": D})
    assert 1 << L == D // 4

    def slot(r, d):
        return eval(slot_expr, {}, {"r": r, "d": d, "D": D, "L": L})

    for r in range(4):
        assert sorted(slot(r, d) - r * (D + 1) for d in range(D)) == list(range(D))
    assert _worst(D, slot) == (1, 1)


@pytest.mark.parametrize("D", [64, 128])
def test_unswizzled_layout_conflicts(D):
    store, read = _worst(D, lambda r, d: r * D + d)
    assert read == 1
    assert store == (32 if D == 128 else 16)
