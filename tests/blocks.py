"""Test blocks for the encoders: (n, 64) float32 rows of one kind, shared by the numpy/GPU parity
tests (tests/test_gpu_parity.py, tests/test_gpu_encode_variants.py) and the CPU twin of the GPU search
(tests/test_encoder_search.py), and the message those tests fail with (first_diff)."""

from __future__ import annotations

import numpy as np

from kvpolar.format import QK, get_format

KINDS = (
    "gaussian",
    "scaled",
    "heavy",
    "outlier",
    "zero",
    "sparse",
    "huge",
    "tiny",
    "subnormal",
    "nonfinite",
    "randbits",
    "fp16grid",
    "mixed_radii",
)


def rows(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 64) float32 blocks of `kind` (one of KINDS)."""
    if kind == "gaussian":
        return rng.standard_normal((n, QK)).astype(np.float32)
    if kind == "scaled":
        return (rng.standard_normal((n, QK)) * np.exp(rng.uniform(-12, 12, (n, 1)))).astype(np.float32)
    if kind == "heavy":
        return rng.standard_t(1.5, (n, QK)).astype(np.float32)
    if kind == "outlier":
        x = rng.standard_normal((n, QK)).astype(np.float32)
        x[np.arange(n), rng.integers(0, QK, n)] *= 1000
        return x
    if kind == "zero":  # +0, -0 and a few tiny values
        x = np.zeros((n, QK), np.float32)
        x[1::2, ::7] = -0.0
        x[2::4, 5] = 1e-3
        return x
    if kind == "sparse":
        x = np.zeros((n, QK), np.float32)
        x[np.arange(n), rng.integers(0, QK, n)] = rng.standard_normal(n).astype(np.float32)
        return x
    if kind == "huge":
        scale = rng.choice([1e4, 1e6, 1e12, 3e38], (n, 1))
        with np.errstate(over="ignore"):  # 3e38 * N(0, 1) overflows to +-inf: sanitized
            return (rng.standard_normal((n, QK)) * scale).astype(np.float32)
    if kind == "tiny":
        return (rng.standard_normal((n, QK)) * rng.choice([1e-6, 1e-9, 1e-30], (n, 1))).astype(np.float32)
    if kind == "subnormal":
        return (rng.standard_normal((n, QK)) * 1e-39).astype(np.float32)
    if kind == "nonfinite":
        x = rng.standard_normal((n, QK)).astype(np.float32)
        idx = rng.integers(0, QK, (n, 3))
        for j, v in enumerate([np.nan, np.inf, -np.inf]):
            x[np.arange(n), idx[:, j]] = v
        x[::5] = np.nan
        return x
    if kind == "randbits":
        return rng.integers(0, 2**32, (n, QK), dtype=np.uint64).astype(np.uint32).view(np.float32)
    if kind == "fp16grid":  # values on the fp16 grid, incl. fp16 subnormals and extremes
        h = rng.integers(0, 2**16, (n, QK), dtype=np.uint32).astype(np.uint16).view(np.float16)
        return np.where(np.isfinite(h), h, 0).astype(np.float32)
    if kind == "mixed_radii":  # one large pair, the rest spread over many decades
        x = rng.standard_normal((n, QK)) * 10.0 ** rng.uniform(-8, 0, (n, QK))
        x[:, :2] *= 100
        return x.astype(np.float32)
    raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")


def first_diff(fmt: str, got: np.ndarray, want: np.ndarray, who: str = "gpu") -> str:
    """Where encoded blocks got (n, type_size) differ from numpy's want: how many blocks, and the first
    differing field of the first differing block (who: the name of the encoder tested)."""
    bad = np.nonzero((got != want).any(1))[0]
    i = int(bad[0])
    off = 0
    for name, dt, cnt in get_format(fmt).fields:
        size = np.dtype(dt).itemsize * cnt
        if (got[i, off : off + size] != want[i, off : off + size]).any():
            return (
                f"{len(bad)} blocks differ; first block {i}, field {name}: "
                f"{who} {got[i, off : off + size].tolist()} numpy {want[i, off : off + size].tolist()}"
            )
        off += size
    return f"{len(bad)} blocks differ"
