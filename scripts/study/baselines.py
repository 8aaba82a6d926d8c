"""llama.cpp's block types as reference points, on (n, k*32) float rows.

q4_0, q4_1, q5_0, q8_0: gguf-py's numpy quants (`gguf.quants.quantize` / `dequantize`, bit-exact
twins of ggml's `quantize_row_*_ref`). iq4_nl: the built libggml-base through `study.ggml_lib`
(`ggml_quantize_chunk`, which searches the block scale, and the type traits' `to_float`);
unavailable (`iq4_nl_available()` False, with the reason in `IQ4NL_MISSING`) when the
llama.cpp build (`kvpolar.paths.lib_path("ggml-base")`, or $KVPOLAR_GGML_BASE) is absent.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from . import ggml_lib

GGUF_TYPES = ("q4_0", "q4_1", "q5_0", "q8_0")
ALL_TYPES = (*GGUF_TYPES, "iq4_nl")
GGML_TYPE_IQ4_NL = 20  # enum ggml_type in ggml.h (llama.cpp 0c1e570)

# bits per element: block bytes * 8 / block elements (ggml-common.h)
BITS = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q8_0": 8.5, "iq4_nl": 4.5}

IQ4NL_MISSING: str | None = None


@functools.cache
def _ggml():
    global IQ4NL_MISSING
    path = os.environ.get("KVPOLAR_GGML_BASE")
    if not path:
        try:
            from kvpolar.paths import lib_path

            path = str(lib_path("ggml-base"))
        except FileNotFoundError as e:
            IQ4NL_MISSING = f"iq4_nl skipped: {e}"
            return None
    try:
        lib = ggml_lib.load_base(path)
    except OSError as e:
        IQ4NL_MISSING = f"iq4_nl skipped: cannot load {path}: {e}"
        return None
    tr = ggml_lib.type_traits(lib, GGML_TYPE_IQ4_NL)
    if tr.type_name != b"iq4_nl" or tr.blck_size != 32 or tr.type_size != 18:
        IQ4NL_MISSING = (
            f"iq4_nl skipped: unexpected traits {tr.type_name!r} {tr.blck_size} {tr.type_size} in {path}"
        )
        return None
    return lib, path


def iq4_nl_available() -> bool:
    return _ggml() is not None


def ggml_library() -> str | None:
    g = _ggml()
    return None if g is None else g[1]


def _iq4_nl(x: np.ndarray) -> np.ndarray:
    g = _ggml()
    if g is None:
        raise RuntimeError(IQ4NL_MISSING or "iq4_nl unavailable")
    lib = g[0]
    buf = ggml_lib.quantize_chunk(lib, GGML_TYPE_IQ4_NL, x, x.shape[1])
    return ggml_lib.to_float(lib, GGML_TYPE_IQ4_NL, buf).reshape(x.shape)


def roundtrip(x: np.ndarray, qtype: str) -> np.ndarray:
    """(n, k*32) float -> (n, k*32) float32 quantized and dequantized as llama.cpp's `qtype`."""
    if qtype not in ALL_TYPES:
        raise ValueError(f"qtype must be one of {ALL_TYPES}, got {qtype!r}")
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] % 32:
        raise ValueError(f"rows must be a multiple of 32 long, got shape {x.shape}")
    if qtype == "iq4_nl":
        return _iq4_nl(x)
    import gguf
    from gguf import quants

    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    return quants.dequantize(quants.quantize(x, t), t).astype(np.float32).reshape(x.shape)
