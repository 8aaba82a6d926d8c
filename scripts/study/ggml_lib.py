"""ctypes binding of the libggml-base entry points that read and run a type's traits.

Users: `study.baselines` (iq4_nl as a reference point), tests/test_c_parity.py (the polar
types of the patched build against `kvpolar.codec`) and scripts/cpu_build_ab.py (libggml-cpu's
cache write and reads timed in two builds). The shipped package does not load libggml.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

# ggml_to_float_t / ggml_from_float_t (ggml/include/ggml.h): (const void * x, void * y, int64_t k)
TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
FROM_FLOAT = TO_FLOAT


class GgmlTypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml/include/ggml.h), field for field."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class GgmlTypeTraitsCpu(ctypes.Structure):
    """struct ggml_type_traits_cpu (ggml/include/ggml-cpu.h), field for field."""

    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


# ggml_vec_dot_t (ggml/include/ggml-cpu.h):
# (int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc)
VEC_DOT = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
)  # fmt: skip


def load_cpu(path: str | os.PathLike, mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """libggml-cpu at `path`, initialized (ggml_cpu_init: its tables), with `ggml_get_type_traits_cpu`
    typed. Load libggml-base first (RTLD_GLOBAL) where the loader must find it."""
    lib = ctypes.CDLL(str(path), mode=mode)
    lib.ggml_cpu_init.restype = None
    lib.ggml_cpu_init()
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(GgmlTypeTraitsCpu)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    return lib


def symbol(lib: ctypes.CDLL, name: str) -> int | None:
    """Address of a function `lib` exports (internal ggml-cpu ones are exported on ELF builds), or None."""
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def load_base(path: str | os.PathLike, mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """libggml-base at `path` with `ggml_get_type_traits` and `ggml_quantize_chunk` typed.
    Raises OSError when it cannot be loaded."""
    lib = ctypes.CDLL(str(path), mode=mode)
    lib.ggml_get_type_traits.restype = ctypes.POINTER(GgmlTypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    # (type, const float * src, void * dst, int64_t start, int64_t nrows, int64_t n_per_row,
    #  const float * imatrix) -> bytes written
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    return lib


def type_traits(lib: ctypes.CDLL, type_id: int) -> GgmlTypeTraits:
    return lib.ggml_get_type_traits(type_id).contents


def quantize_chunk(lib: ctypes.CDLL, type_id: int, x: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml_quantize_chunk (no importance matrix) of float32 x (any shape, size a multiple of
    `n_per_row`) -> (size / blck_size * type_size,) uint8."""
    tr = type_traits(lib, type_id)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.zeros(x.size // tr.blck_size * tr.type_size, np.uint8)
    nrows = x.size // n_per_row
    n = lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
    assert n == out.size, (n, out.size)
    return out


def to_float(lib: ctypes.CDLL, type_id: int, b: np.ndarray) -> np.ndarray:
    """The type traits' to_float of the blocks `b` (uint8, n_blocks * type_size bytes) ->
    (n_blocks * blck_size,) float32."""
    tr = type_traits(lib, type_id)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    y = np.empty(b.size // tr.type_size * tr.blck_size, np.float32)
    TO_FLOAT(tr.to_float)(b.ctypes.data, y.ctypes.data, y.size)
    return y
