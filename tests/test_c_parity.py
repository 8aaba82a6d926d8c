"""numpy == C: the patched libggml encodes and decodes polar/polar3 exactly like kvpolar.codec.

Loads libggml-base / libggml-cpu of the patched llama.cpp build (<repo>/build/bin, or
$KVPOLAR_BUILD/bin) through ctypes and compares, bit for bit:
  - ggml_quantize_chunk (quantize_<type> -> quantize_row_<type>_ref) with codec.quantize_blocks,
  - the type traits' from_float_ref and the CPU backend's from_float (the cache write) with it,
  - to_float (dequantize_row_<type>) with codec.dequantize_blocks, on encoder output and on
    random bytes,
on Gaussian, heavy-tailed, real-like, all-zero, tiny/subnormal, huge and NaN/Inf blocks.
A failure names the first differing block and field (d or the code index).
"""

from __future__ import annotations

import ctypes
import sys
import zlib

import numpy as np
import pytest

from conftest import require_build
from kvpolar import codec
from kvpolar import format as pformat
from study import ggml_lib
from study.ggml_lib import FROM_FLOAT, TO_FLOAT, VEC_DOT, GgmlTypeTraits, GgmlTypeTraitsCpu

pytestmark = pytest.mark.build

TYPES = ("polar", "polar3")
QK = pformat.QK


GGML_TYPE_F32 = 0


class Ggml:
    """The few libggml entry points the parity tests call."""

    def __init__(self, bindir):
        ext = ".dylib" if sys.platform == "darwin" else ".so"
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        self.base = b = ggml_lib.load_base(bindir / f"libggml-base{ext}", mode=mode)
        self.cpu = ggml_lib.load_cpu(bindir / f"libggml-cpu{ext}", mode=mode)

        b.ggml_row_size.restype = ctypes.c_size_t
        b.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        b.ggml_validate_row_data.restype = ctypes.c_bool
        b.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]

    def traits(self, name: str) -> GgmlTypeTraits:
        return ggml_lib.type_traits(self.base, pformat.get_format(name).type_id)

    def traits_cpu(self, name: str) -> GgmlTypeTraitsCpu:
        return self.cpu.ggml_get_type_traits_cpu(pformat.get_format(name).type_id).contents

    def quantize_chunk(self, name: str, x: np.ndarray, n_per_row: int = QK) -> np.ndarray:
        fmt = pformat.get_format(name)
        return ggml_lib.quantize_chunk(self.base, fmt.type_id, x, n_per_row).reshape(-1, fmt.type_size)

    def from_float(self, fn_ptr: int, name: str, x: np.ndarray) -> np.ndarray:
        fmt = pformat.get_format(name)
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = np.zeros(x.size // QK * fmt.type_size, np.uint8)
        FROM_FLOAT(fn_ptr)(x.ctypes.data, out.ctypes.data, x.size)
        return out.reshape(-1, fmt.type_size)

    def to_float(self, name: str, b: np.ndarray) -> np.ndarray:
        return ggml_lib.to_float(self.base, pformat.get_format(name).type_id, b).reshape(-1, QK)

    def vec_dot(self, name: str, b: np.ndarray, q: np.ndarray, fn_ptr: int | None = None) -> float:
        b = np.ascontiguousarray(b, dtype=np.uint8)
        q = np.ascontiguousarray(q, dtype=np.float32)
        s = ctypes.c_float()
        fn = VEC_DOT(fn_ptr or self.traits_cpu(name).vec_dot)
        fn(q.size, ctypes.addressof(s), 0, b.ctypes.data, 0, q.ctypes.data, 0, 1)
        return s.value

    def cpu_symbol(self, symbol: str) -> int | None:
        """Address of an internal ggml-cpu function (exported on ELF builds), or None."""
        return ggml_lib.symbol(self.cpu, symbol)

    def cpu_to_float(self, name: str, b: np.ndarray) -> np.ndarray | None:
        """ggml_cpu_dequantize_row_<name>: the SIMD decoder of the flash-attention V path."""
        fn = self.cpu_symbol(f"ggml_cpu_dequantize_row_{name}")
        if fn is None:
            return None
        b = np.ascontiguousarray(b, dtype=np.uint8)
        y = np.empty(len(b) * QK, np.float32)
        TO_FLOAT(fn)(b.ctypes.data, y.ctypes.data, y.size)
        return y.reshape(-1, QK)


@pytest.fixture(scope="module")
def ggml(build_dir) -> Ggml:
    return Ggml(build_dir / "bin")


# ----------------------------------------------------------------------------------------------
# inputs


def _rotation(rng, n=QK) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def blocks(kind: str, n: int, seed: int) -> np.ndarray:
    """(n, 64) float32 test blocks of one kind."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, QK)).astype(np.float32) * np.float32(rng.uniform(0.01, 100))
    if kind == "heavy":  # Student t, 2 degrees of freedom, and a few Cauchy blocks
        x = rng.standard_t(2, (n, QK))
        x[: n // 8] = rng.standard_cauchy((n // 8, QK))
        return x.astype(np.float32)
    if kind == "reallike":  # anisotropic per-dimension scale and offset, then a fixed rotation
        scale = np.exp(rng.normal(0, 1.0, QK))
        offset = rng.normal(0, 3.0, QK) * (rng.uniform(size=QK) < 0.2)
        x = rng.standard_normal((n, QK)) * scale + offset
        return (x @ _rotation(rng).T).astype(np.float32)
    if kind == "zero":
        x = np.zeros((n, QK), np.float32)
        x[n // 2 :] = -0.0
        return x
    if kind == "tiny":  # subnormals and values whose scales round to 0 or to fp16 subnormals
        mags = 10.0 ** rng.uniform(-44, -3, (n, 1))
        x = (rng.standard_normal((n, QK)) * mags).astype(np.float32)
        x[: n // 4, 1:] = 0  # a single tiny coordinate
        return x
    if kind == "huge":  # around and beyond the fp16 range of the scale and VMAX
        mags = 10.0 ** rng.uniform(3, 38, (n, 1))
        x = rng.standard_normal((n, QK)) * mags
        x[: n // 4] = np.sign(x[: n // 4]) * np.float32(3.4e38)
        return np.clip(x, -3.4e38, 3.4e38).astype(np.float32)
    if kind == "nonfinite":
        x = rng.standard_normal((n, QK)).astype(np.float32)
        specials = np.array([np.nan, np.inf, -np.inf], np.float32)
        mask = rng.uniform(size=x.shape) < 0.1
        x[mask] = rng.choice(specials, mask.sum())
        x[: n // 8] = np.nan
        x[n // 8 : n // 4] = np.inf
        return x
    if kind == "sparse":  # one or two nonzero pairs, ring-boundary angles, exact codebook points
        x = np.zeros((n, QK), np.float32)
        t = pformat.tables("polar")
        for i in range(n):
            p = rng.integers(0, QK // 2, 2)
            c = rng.integers(0, len(t.cx))
            x[i, 2 * p[0]] = t.cx[c] * (i + 1)
            x[i, 2 * p[0] + 1] = t.cy[c] * (i + 1)
            if i % 2:
                ang = np.float32(rng.integers(0, 64) * np.pi / 32)
                x[i, 2 * p[1]], x[i, 2 * p[1] + 1] = np.cos(ang), np.sin(ang)
        return x
    raise ValueError(kind)


KINDS = ("gaussian", "heavy", "reallike", "zero", "tiny", "huge", "nonfinite", "sparse")
N_BLOCKS = {"gaussian": 3000, "heavy": 2000, "reallike": 3000}  # others: 512


# ----------------------------------------------------------------------------------------------
# comparison with a useful message


def _f16(b: np.ndarray) -> float:
    return float(b[:2].copy().view("<f2")[0])


def assert_same_blocks(name: str, got: np.ndarray, want: np.ndarray, x: np.ndarray | None = None, what="C"):
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.nonzero((got != want).any(1))[0]
    if len(diff) == 0:
        return
    i = int(diff[0])
    gd, gc = codec.unpack(name, got[i : i + 1])
    wd, wc = codec.unpack(name, want[i : i + 1])
    if gd[0] != wd[0] or (np.isnan(gd[0]) != np.isnan(wd[0])):
        field = f"d: {what} {_f16(got[i])!r} vs numpy {_f16(want[i])!r}"
    else:
        p = int(np.nonzero(gc[0] != wc[0])[0][0])
        field = f"code[{p}]: {what} {int(gc[0, p])} vs numpy {int(wc[0, p])} (d = {_f16(got[i])!r})"
        if x is not None:
            field += f", pair ({x[i, 2 * p]!r}, {x[i, 2 * p + 1]!r})"
    extra = (
        "" if x is None else f"\n  block {i} input: {np.array2string(x[i], precision=9, max_line_width=200)}"
    )
    pytest.fail(f"{name}: {len(diff)} of {len(got)} blocks differ; first block {i}, {field}{extra}")


def assert_same_floats(name: str, got: np.ndarray, want: np.ndarray, what="C to_float"):
    g = got.view(np.uint32)
    w = want.view(np.uint32)
    if np.array_equal(g, w):
        return
    i, j = (int(v[0]) for v in np.nonzero(g != w))
    n = int((g != w).sum())
    pytest.fail(
        f"{name}: {what} differs from codec.dequantize_blocks in {n} values; first block {i}, "
        f"value {j} (code index {j // 2}): {got[i, j]!r} vs {want[i, j]!r}"
    )


# ----------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", TYPES)
def test_traits(ggml, name):
    fmt = pformat.get_format(name)
    t = ggml.traits(name)
    assert t.type_name.decode() == name
    assert (t.blck_size, t.type_size, t.is_quantized) == (QK, fmt.type_size, True)
    assert t.to_float and t.from_float_ref
    assert ggml.base.ggml_row_size(fmt.type_id, 4 * QK) == 4 * fmt.type_size
    tc = ggml.traits_cpu(name)
    assert tc.from_float and tc.vec_dot
    assert tc.vec_dot_type == GGML_TYPE_F32
    assert tc.nrows == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", TYPES)
def test_encode_parity(ggml, name, kind):
    x = blocks(kind, N_BLOCKS.get(kind, 512), seed=zlib.crc32(f"{name}/{kind}".encode()))
    want = codec.quantize_blocks(x, name)
    assert_same_blocks(name, ggml.quantize_chunk(name, x), want, x, "ggml_quantize_chunk")
    # the same rows as one long row (n_per_row = 8 blocks), the shape of a KV-cache row
    n8 = len(x) // 8 * 8
    assert_same_blocks(
        name,
        ggml.quantize_chunk(name, x[:n8], 8 * QK),
        want[:n8],
        x,
        "ggml_quantize_chunk (rows of 8 blocks)",
    )
    assert_same_blocks(
        name, ggml.from_float(ggml.traits(name).from_float_ref, name, x), want, x, "from_float_ref"
    )
    assert_same_blocks(
        name, ggml.from_float(ggml.traits_cpu(name).from_float, name, x), want, x, "CPU from_float"
    )
    assert_same_floats(name, ggml.to_float(name, want), codec.dequantize_blocks(want, name))


@pytest.mark.parametrize("name", TYPES)
def test_decode_random_bytes(ggml, name):
    fmt = pformat.get_format(name)
    rng = np.random.default_rng(7)
    b = rng.integers(0, 256, (4096, fmt.type_size), dtype=np.uint8)
    d = b[:, :2].copy().view("<u2")[:, 0]
    d = np.where((d & 0x7C00) == 0x7C00, d & 0xBFFF, d)  # finite d only (NaN/Inf are rejected on load)
    d[:64] = 0
    b[:, :2] = d.astype("<u2").view(np.uint8).reshape(-1, 2)
    want = codec.dequantize_blocks(b, name)
    assert np.isfinite(want).all()
    assert_same_floats(name, ggml.to_float(name, b), want)
    simd = ggml.cpu_to_float(name, b)
    if simd is None:
        if require_build():
            pytest.fail(
                f"ggml_cpu_dequantize_row_{name} is not exported by this build (KVPOLAR_REQUIRE_BUILD=1)"
            )
    else:
        assert_same_floats(name, simd, want, "ggml_cpu_dequantize_row (SIMD)")


@pytest.mark.parametrize("name", TYPES)
def test_zero_block_decodes_to_zero(ggml, name):
    fmt = pformat.get_format(name)
    y = ggml.to_float(name, np.zeros((3, fmt.type_size), np.uint8))
    assert (y.view(np.uint32) == 0).all()  # +0.0, not -0.0


@pytest.mark.parametrize("name", TYPES)
def test_validate_row_data(ggml, name):
    fmt = pformat.get_format(name)
    b = codec.quantize_blocks(blocks("gaussian", 4, 1), name)
    assert ggml.base.ggml_validate_row_data(fmt.type_id, b.ctypes.data, b.size)
    for bad in (0x7C00, 0xFC00, 0x7E00):  # +Inf, -Inf, NaN
        bb = b.copy()
        bb[2, :2] = np.array([bad], "<u2").view(np.uint8)
        assert not ggml.base.ggml_validate_row_data(fmt.type_id, bb.ctypes.data, bb.size)
    assert not ggml.base.ggml_validate_row_data(fmt.type_id, b.ctypes.data, b.size - 1)


@pytest.mark.parametrize("impl", ["traits", "generic"])
@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("name", TYPES)
def test_vec_dot(ggml, name, n_blocks, impl):
    """CPU vec_dot(polar row, float row) (the SIMD one of the traits, and the scalar generic one)
    against the float64 dot of the decoded row."""
    fn = None
    if impl == "generic":
        fn = ggml.cpu_symbol(f"ggml_vec_dot_{name}_f32_generic")
        if fn is None:
            msg = f"ggml_vec_dot_{name}_f32_generic is not exported by this build"
            if require_build():
                pytest.fail(msg + " (KVPOLAR_REQUIRE_BUILD=1)")
            pytest.skip(msg)
    rng = np.random.default_rng(n_blocks)
    for trial in range(50):
        x = blocks("reallike", n_blocks, seed=1000 * n_blocks + trial)
        b = codec.quantize_blocks(x, name)
        q = rng.standard_normal(n_blocks * QK).astype(np.float32)
        y = codec.dequantize_blocks(b, name).reshape(-1).astype(np.float64)
        want = float(y @ q)
        got = ggml.vec_dot(name, b, q, fn)
        # float32 accumulation in any order: a few ulps of the sum of |terms|
        tol = 1e-6 * float(np.abs(y * q).sum()) + 1e-30
        assert abs(got - want) <= tol, (trial, got, want, tol)


class GgmlInitParams(ctypes.Structure):
    """struct ggml_init_params (ggml/include/ggml.h)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


GGML_TYPE_I64 = 27


@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("n_rows", [1, 3])
@pytest.mark.parametrize("name", TYPES)
def test_set_rows_cache_write(ggml, name, n_rows, n_threads):
    """SET_ROWS, the KV-cache write (rows of 3 blocks, the threads splitting the rows or the blocks of
    one row), stores exactly codec.quantize_blocks' bytes."""
    b, c = ggml.base, ggml.cpu
    b.ggml_init.restype = ctypes.c_void_p
    b.ggml_init.argtypes = [GgmlInitParams]
    b.ggml_free.argtypes = [ctypes.c_void_p]
    b.ggml_new_tensor_2d.restype = ctypes.c_void_p
    b.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    b.ggml_new_tensor_1d.restype = ctypes.c_void_p
    b.ggml_new_tensor_1d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    b.ggml_get_data.restype = ctypes.c_void_p
    b.ggml_get_data.argtypes = [ctypes.c_void_p]
    b.ggml_set_rows.restype = ctypes.c_void_p
    b.ggml_set_rows.argtypes = [ctypes.c_void_p] * 4
    b.ggml_new_graph.restype = ctypes.c_void_p
    b.ggml_new_graph.argtypes = [ctypes.c_void_p]
    b.ggml_build_forward_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    c.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    fmt = pformat.get_format(name)
    nc, n_cells = 3 * QK, 8
    x = blocks("reallike", n_rows * 3, seed=n_rows).reshape(n_rows, nc)
    cells = (np.arange(n_rows) * 5 + 2) % n_cells

    ctx = b.ggml_init(GgmlInitParams(16 << 20, None, False))
    assert ctx
    try:
        cache = b.ggml_new_tensor_2d(ctx, fmt.type_id, nc, n_cells)
        src = b.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, nc, n_rows)
        idx = b.ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_rows)
        cache_bytes = n_cells * nc // QK * fmt.type_size
        ctypes.memset(b.ggml_get_data(cache), 0, cache_bytes)
        ctypes.memmove(b.ggml_get_data(src), np.ascontiguousarray(x).ctypes.data, x.nbytes)
        cells64 = cells.astype(np.int64)
        ctypes.memmove(b.ggml_get_data(idx), cells64.ctypes.data, cells64.nbytes)
        graph = b.ggml_new_graph(ctx)
        b.ggml_build_forward_expand(graph, b.ggml_set_rows(ctx, cache, src, idx))
        assert c.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        got = np.ctypeslib.as_array(
            (ctypes.c_uint8 * cache_bytes).from_address(b.ggml_get_data(cache))
        ).copy()
    finally:
        b.ggml_free(ctx)
    got = got.reshape(n_cells, 3, fmt.type_size)[cells].reshape(-1, fmt.type_size)
    assert_same_blocks(
        name, got, codec.quantize_blocks(x.reshape(-1, QK), name), x.reshape(-1, QK), "SET_ROWS"
    )
