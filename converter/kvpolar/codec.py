"""numpy reference codec of the polar block formats (docs/FORMAT.md).

Block functions in the shape of gguf-py's quants.py:

    quantize_blocks(x: (n, 64) float32, fmt)  -> (n, type_size) uint8   # C: quantize_row_polar_ref
    dequantize_blocks(b: (n, type_size) uint8, fmt) -> (n, 64) float32  # C: dequantize_row_polar

and row-level wrappers `quantize` / `dequantize` that check their input. All arithmetic is
float32 elementwise numpy (no fused multiply-add), in the order FORMAT.md gives, so the bytes
equal the C and CUDA encoders'.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .format import FP16_MAX, N_REFINE, PAIRS, QK, VMAX, PolarFormat, get_format, tables

_CHUNK = 4096  # blocks per vectorized step (bounds temporary memory)


def _fmt(fmt: PolarFormat | str) -> PolarFormat:
    return fmt if isinstance(fmt, PolarFormat) else get_format(fmt)


def to_half(v: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even binary16 (saturating at 65504) -> float32."""
    return np.minimum(v, np.float32(FP16_MAX)).astype(np.float16).astype(np.float32)


def tree32(v: np.ndarray) -> np.ndarray:
    """Butterfly sum over the last axis of 32: v[i] += v[i+h] for h = 16..1 (a warp reduction)."""
    assert v.shape[-1] == PAIRS
    h = PAIRS // 2
    while h >= 1:
        v = v[..., :h] + v[..., h : 2 * h]
        h //= 2
    return v[..., 0]


def sanitize(x: np.ndarray) -> np.ndarray:
    """NaN -> 0, clamp to [-VMAX, VMAX] (FORMAT.md step 1)."""
    x = np.where(np.isnan(x), np.float32(0), x)
    return np.clip(x, np.float32(-VMAX), np.float32(VMAX)).astype(np.float32)


def _candidates(fmt: PolarFormat, theta: np.ndarray) -> np.ndarray:
    """(..., 2R) int32 candidate codes per pair, sorted (ties then go to the lowest code)."""
    t = tables(fmt.name)
    cands = []
    for j in range(len(fmt.counts)):
        n, off = int(t.ring_n[j]), int(t.ring_off[j])
        if n == 1:
            c = np.full(theta.shape, off, np.int32)
            cands += [c, c]
            continue
        k = np.floor((theta - t.ring_phi[j]) * t.ring_istep[j]).astype(np.int64) % n
        cands += [(off + k).astype(np.int32), (off + (k + 1) % n).astype(np.int32)]
    return np.sort(np.stack(cands, -1), -1)


def _encode_at(fmt, X, Y, cand, s):
    """FORMAT.md step 4 at per-block scales s (n,): codes (n, 32) and block errors E (n,)."""
    t = tables(fmt.name)
    ok = s > 0
    inv = np.float32(1.0) / np.where(ok, s, np.float32(1.0))
    xn = (X * inv[:, None])[..., None]
    yn = (Y * inv[:, None])[..., None]
    dx = xn - t.cx[cand]
    dy = yn - t.cy[cand]
    dd = dx * dx + dy * dy
    codes = np.take_along_axis(cand, dd.argmin(-1)[..., None], -1)[..., 0]
    ex = X - s[:, None] * t.cx[codes]
    ey = Y - s[:, None] * t.cy[codes]
    err = tree32(ex * ex + ey * ey)
    return codes, np.where(ok, err, np.float32(np.inf))


def _encode_chunk(
    fmt: PolarFormat, x: np.ndarray, round_scale: Callable[[np.ndarray], np.ndarray] = to_half
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-6 for blocks x (n, 64): scales (n,) and codes (n, 32). round_scale: what every scale tried is
    rounded to (the format: fp16; scripts/study/scalebits.py measures coarser grids)."""
    t = tables(fmt.name)
    x = sanitize(x)
    X, Y = x[:, 0::2], x[:, 1::2]
    r2 = X * X + Y * Y
    rmax = np.sqrt(r2.max(1))
    cand = _candidates(fmt, np.arctan2(Y, X))

    n = len(x)
    best_s = np.zeros(n, np.float32)
    best_e = np.full(n, np.inf, np.float32)
    best_c = np.zeros((n, PAIRS), np.int32)
    for g in t.g:
        s = round_scale(rmax * g)
        codes, err = _encode_at(fmt, X, Y, cand, s)
        upd = err < best_e
        best_s[upd], best_e[upd], best_c[upd] = s[upd], err[upd], codes[upd]

    active = np.isfinite(best_e)
    for _ in range(N_REFINE):
        cx, cy = t.cx[best_c], t.cy[best_c]
        num = tree32(X * cx + Y * cy)
        den = tree32(cx * cx + cy * cy)
        with np.errstate(divide="ignore", invalid="ignore"):
            s2 = round_scale(np.where(den > 0, num / np.where(den > 0, den, 1), np.float32(0)))
        try_ = active & (den > 0) & (s2 > 0) & (s2 != best_s)
        codes, err = _encode_at(fmt, X, Y, cand, np.where(try_, s2, np.float32(0)))
        upd = try_ & (err < best_e)
        best_s[upd], best_e[upd], best_c[upd] = s2[upd], err[upd], codes[upd]
        active = upd

    zero = ~np.isfinite(best_e)  # rmax == 0 or every candidate scale rounded to 0
    best_s[zero] = 0
    best_c[zero] = 0
    return best_s, best_c


def _split_codes(fmt: PolarFormat, c: np.ndarray) -> dict[str, np.ndarray]:
    """Codes (n, 32) uint8 -> the code fields of the block (FORMAT.md, byte layout)."""
    if fmt.code_bits == 8:
        return {"qs": c}
    lo, hi = c & 15, c >> 4
    return {
        "qs": lo[:, :16] | (lo[:, 16:] << 4),
        "qh": hi[:, 0:8] | (hi[:, 8:16] << 2) | (hi[:, 16:24] << 4) | (hi[:, 24:32] << 6),
    }


def _join_codes(fmt: PolarFormat, blk: np.ndarray) -> np.ndarray:
    """The inverse of _split_codes: blocks (n,) of fmt.dtype -> codes (n, 32) int32."""
    if fmt.code_bits == 8:
        return blk["qs"].astype(np.int32)
    qs = blk["qs"].astype(np.int32)
    qh = blk["qh"].astype(np.int32)
    lo = np.concatenate([qs & 15, qs >> 4], 1)
    hi = np.concatenate([(qh >> (2 * k)) & 3 for k in range(4)], 1)
    return lo | (hi << 4)


def pack(fmt: PolarFormat | str, d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Scales (n,) float and codes (n, 32) -> (n, type_size) uint8 blocks, fields as fmt.layout."""
    fmt = _fmt(fmt)
    n = len(d)
    blk = np.zeros(n, fmt.dtype)
    blk["d"] = np.asarray(d, np.float32).astype(np.float16)
    for name, v in _split_codes(fmt, codes.astype(np.uint8)).items():
        blk[name] = v
    return blk.view(np.uint8).reshape(n, fmt.type_size)


def unpack(fmt: PolarFormat | str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, type_size) uint8 -> scales (n,) float32 and codes (n, 32) int32."""
    fmt = _fmt(fmt)
    blk = np.ascontiguousarray(b, dtype=np.uint8).view(fmt.dtype)[:, 0]
    return blk["d"].astype(np.float32), _join_codes(fmt, blk)


def quantize_blocks(x: np.ndarray, fmt: PolarFormat | str) -> np.ndarray:
    """(n, 64) float32 -> (n, type_size) uint8. C twin: quantize_row_<fmt>_ref."""
    fmt = _fmt(fmt)
    x = np.asarray(x, dtype=np.float32)
    assert x.ndim == 2 and x.shape[1] == QK, x.shape
    out = np.empty((len(x), fmt.type_size), np.uint8)
    for i in range(0, len(x), _CHUNK):
        d, codes = _encode_chunk(fmt, x[i : i + _CHUNK])
        out[i : i + _CHUNK] = pack(fmt, d, codes)
    return out


def dequantize_blocks(b: np.ndarray, fmt: PolarFormat | str) -> np.ndarray:
    """(n, type_size) uint8 -> (n, 64) float32. C twin: dequantize_row_<fmt>."""
    fmt = _fmt(fmt)
    return decode(fmt, *unpack(fmt, b))


def decode(fmt: PolarFormat | str, d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Scales d (n,) and codes (n, 32) -> blocks (n, 64) float32: d (CX, CY)[code] for each pair."""
    t = tables(_fmt(fmt).name)
    y = np.empty((len(d), QK), np.float32)
    y[:, 0::2] = d[:, None] * t.cx[codes]
    y[:, 1::2] = d[:, None] * t.cy[codes]
    return y


def quantize(x, fmt: PolarFormat | str = "polar", nonfinite: str = "error") -> np.ndarray:
    """Rows of floats (..., k*64) -> polar bytes (..., k*type_size) uint8.

    nonfinite: "error" raises ValueError on NaN/Inf; "sanitize" encodes them as the C cache
    write does (NaN -> 0, +-Inf -> clamped).
    """
    fmt = _fmt(fmt)
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"expected a real float array, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % QK != 0:
        raise ValueError(
            f"{fmt.name}: the last dimension must be a multiple of the block size {QK}, got shape {x.shape}"
        )
    if nonfinite not in ("error", "sanitize"):
        raise ValueError(f"nonfinite must be 'error' or 'sanitize', got {nonfinite!r}")
    x = x.astype(np.float32)
    if nonfinite == "error" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{fmt.name}: input has NaN/Inf (first at index {tuple(int(i) for i in bad)})")
    lead = x.shape[:-1]
    nb = x.shape[-1] // QK
    b = quantize_blocks(x.reshape(-1, QK), fmt)
    return b.reshape(*lead, nb * fmt.type_size)


def dequantize(b, fmt: PolarFormat | str = "polar") -> np.ndarray:
    """Polar bytes (..., k*type_size) uint8 -> floats (..., k*64) float32."""
    fmt = _fmt(fmt)
    b = np.asarray(b)
    if b.dtype != np.uint8:
        raise ValueError(f"expected uint8 bytes, got dtype {b.dtype}")
    if b.ndim == 0 or b.shape[-1] % fmt.type_size != 0:
        raise ValueError(
            f"{fmt.name}: the last dimension must be a multiple of the block size "
            f"{fmt.type_size} bytes, got shape {b.shape}"
        )
    lead = b.shape[:-1]
    nb = b.shape[-1] // fmt.type_size
    y = dequantize_blocks(b.reshape(-1, fmt.type_size), fmt)
    return y.reshape(*lead, nb * QK)


def sylvester_hadamard(n: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix (n, n) float64, H @ H = I (ggml_gen_hadamard's)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)
