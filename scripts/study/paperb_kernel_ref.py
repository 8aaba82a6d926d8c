"""Paper B's per-token preset as a block format for the GPU attention kernel (numpy reference).

The preset is `study.paper_b.PaperBConfig(4, 4, pairing="norm", grouping="token",
group=64, params="scale")`: per 64-value block of a row, the 32 pairs (x[2p], x[2p+1]) are
written as a radius quantized uniformly on [0, rmax] with 4 bits and an angle on the full
circle with 4 bits, plus one fp16 rmax per block: 2 + 32 = 34 bytes per 64 values (4.25
bits/value, the size of `polar`). This module fixes the bytes so that the kernel and the
reference agree:

    block_paperb { ggml_half d;  uint8_t qs[32]; }       // polar's layout, 34 bytes
    d      = f16_ceil(max_p r_p)                          // smallest binary16 >= rmax
    qs[p]  = a_p << 4 | k_p
    k_p    = clip(rint(r_p / (d / 15)), 0, 15)            // radius level, r = k d / 15
    a_p    = rint((theta_p + pi) / (2 pi / 16)) mod 16    // angle -pi + a 2 pi / 16

Decoding is a 256-entry codebook scaled by d, like polar: y[2p] = d * CX[c], y[2p+1] =
d * CY[c] with CX[a << 4 | k] = (float32) (k / 15 cos(-pi + a pi / 8)), so the polar kernels
decode it with another table. The attention kernel's KMODE 2 uses the paper's trick instead:
per query a LUT over the 16 angles, LUT[p][a] = (q[2p] cos a + q[2p+1] sin a) / 15, and
score = d * sum_p k_p LUT[p][a_p].

The GPU kernels (cupy_kernels, the product) do not import this research module: the format
reaches them through `register_kernel_format()`, which hands cupy_kernels.formats the layout
(polar's block struct), the tables and the angle-LUT property; after it, "paperb" is a kfmt/vfmt
of cupy_kernels.attention.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from kvpolar.format import FP16_MAX, QK

NAME = "paperb"
RBITS = 4
ABITS = 4
NCODES = 1 << (RBITS + ABITS)  # one byte per pair
TYPE_SIZE = 2 + QK // 2  # fp16 rmax + one code per pair


@functools.cache
def tables() -> tuple[np.ndarray, np.ndarray]:
    """(CX, CY) float32 (256,): the decoded point of code a << 4 | k at scale 1."""
    c = np.arange(NCODES)
    k = (c & 15).astype(np.float64)
    a = (c >> 4).astype(np.float64)
    ang = -math.pi + a * (2 * math.pi / (1 << ABITS))
    rad = k / ((1 << RBITS) - 1)
    return (rad * np.cos(ang)).astype(np.float32), (rad * np.sin(ang)).astype(np.float32)


def _f16_ceil(v: np.ndarray) -> np.ndarray:
    h = np.minimum(np.asarray(v, np.float64), FP16_MAX).astype(np.float16)
    under = h.astype(np.float64) < np.minimum(v, FP16_MAX)
    return np.where(under, np.nextafter(h, np.float16(np.inf)), h).astype(np.float16)


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """(n, 64) float -> (n, 34) uint8 blocks. NaN -> 0; radii above 65504 saturate."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != QK:
        raise ValueError(f"{NAME}: expected blocks of shape (n, {QK}), got {x.shape}")
    x = np.where(np.isnan(x), 0.0, x)
    x = np.clip(x, -FP16_MAX, FP16_MAX)
    X, Y = x[:, 0::2], x[:, 1::2]
    r = np.hypot(X, Y)
    theta = np.arctan2(Y, X)
    d16 = _f16_ceil(r.max(1))
    d = d16.astype(np.float64)[:, None]
    step = np.where(d > 0, d / 15.0, 1.0)
    k = np.where(d > 0, np.clip(np.rint(r / step), 0, 15), 0).astype(np.int64)
    a = np.rint((theta + math.pi) / (2 * math.pi / 16)).astype(np.int64) % 16
    a = np.where(k > 0, a, 0)  # radius 0: the angle is irrelevant; write 0 (deterministic bytes)
    out = np.empty((len(x), TYPE_SIZE), np.uint8)
    out[:, :2] = d16.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = ((a << 4) | k).astype(np.uint8)
    return out


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """(n, 34) uint8 -> (n, 64) float32: y[2p] = d * CX[c], y[2p+1] = d * CY[c]."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    if b.ndim != 2 or b.shape[1] != TYPE_SIZE:
        raise ValueError(f"{NAME}: expected blocks of shape (n, {TYPE_SIZE}), got {b.shape}")
    cx, cy = tables()
    d = b[:, :2].copy().view("<f2")[:, 0].astype(np.float32)
    c = b[:, 2:].astype(np.int64)
    y = np.empty((len(b), QK), np.float32)
    y[:, 0::2] = d[:, None] * cx[c]
    y[:, 1::2] = d[:, None] * cy[c]
    return y


def register_kernel_format():
    """Register the preset with the CuPy kernels (cupy_kernels.formats) as NAME; idempotent."""
    from cupy_kernels import formats

    cx, cy = tables()
    fmt = formats.register_format(NAME, "polar", cx, cy, angle_lut=True)
    assert fmt.type_size == TYPE_SIZE and fmt.ncodes == NCODES
    return fmt


def study_config():
    """The equivalent `study.paper_b.PaperBConfig` (imports the study module)."""
    from .paper_b import PaperBConfig

    return PaperBConfig(RBITS, ABITS, pairing="norm", grouping="token", group=QK, params="scale")
