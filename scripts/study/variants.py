"""Pairwise polar codes beyond the two papers, and the chosen ring codes measured as-is.

- `LMPairConfig`: product code per pair: Lloyd-Max radius for the Rayleigh density (radii
  divided by the block RMS, stored fp16) + uniform angle. (rbits + abits)/2 + 16/block bits.
- `chosen_roundtrip`: the chosen formats `polar` / `polar3` through the reference codec
  `kvpolar.codec`, with the searched scale (the format) or with a plain scale (the format's
  codes at s = block RMS or s = rmax / r_out) to show what the search is worth. Nothing of the
  format is re-implemented here: tables, candidates, encoding and packing are kvpolar's.
- `RingCode`: a ring code with any ring counts and block size (radii designed by
  `kvpolar.format.design_ring_code`, the chosen formats' own design procedure; encoding with the
  same scale-candidate grid and refinement as FORMAT.md, in float64). For the record of
  which ring counts were tried.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from kvpolar import codec as kc
from kvpolar import format as kf

from .paper_a import ScalarCodebook, lloyd_max

# ----------------------------------------------------------------------------------------------
# Lloyd-Max radius + uniform angle


def rayleigh_pdf(r: np.ndarray) -> np.ndarray:
    """Density of |(a, b)| for a, b i.i.d. N(0, 1)."""
    return r * np.exp(-r * r / 2)


@functools.cache
def rayleigh_codebook(bits: int) -> ScalarCodebook:
    """Lloyd-Max radius codebook for Rayleigh(1) (support truncated at 12, mass beyond < 1e-31)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"radius bits must be 1..8, got {bits}")
    return lloyd_max(rayleigh_pdf, 0.0, 12.0, 1 << bits)


@dataclasses.dataclass(frozen=True)
class LMPairConfig:
    rbits: int = 3
    abits: int = 5
    block: int = 64  # coords per fp16 norm

    @property
    def bits_per_elem(self) -> float:
        return (self.rbits + self.abits) / 2 + 16 / self.block

    @property
    def label(self) -> str:
        return (
            f"pairs: Lloyd-Max radius {self.rbits} b + uniform angle {self.abits} b, "
            f"fp16 RMS per {self.block}"
        )


def lm_pair_roundtrip(x: np.ndarray, cfg: LMPairConfig = LMPairConfig()) -> np.ndarray:
    """(n, block) float -> (n, block) float32. Pairs (2p, 2p+1); sigma = fp16(RMS of the block)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != cfg.block or cfg.block % 2:
        raise ValueError(f"expected (n, {cfg.block}) blocks, got shape {x.shape}")
    sig = np.sqrt((x * x).mean(1, keepdims=True)).astype(np.float16).astype(np.float64)
    a, b = x[:, 0::2], x[:, 1::2]
    safe = np.where(sig > 0, sig, 1.0)
    r = np.hypot(a, b) / safe
    th = np.arctan2(b, a)
    book = rayleigh_codebook(cfg.rbits)
    rh = book.decode(book.encode(r)) * sig
    n = 1 << cfg.abits
    step = 2 * math.pi / n
    thh = (np.floor(th / step) + 0.5) * step
    out = np.empty_like(x)
    out[:, 0::2] = rh * np.cos(thh)
    out[:, 1::2] = rh * np.sin(thh)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The chosen formats through kvpolar.codec

SCALES = ("search", "norm", "max")


def chosen_roundtrip(x: np.ndarray, fmt: str = "polar", scale: str = "search") -> np.ndarray:
    """(n, 64) float -> (n, 64) float32 through kvpolar's codec.

    scale "search": `kvpolar.codec.quantize_blocks` (the format). "norm": the same codes at
    s = fp16(block RMS) (the ring code is designed for N(0, I_2)). "max": s = fp16(rmax / r_out),
    the outermost ring on the largest pair. Both plain scales encode with the codec's own
    nearest-point step (`kvpolar.codec._encode_at`) and decode with `dequantize_blocks`.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    f = kf.get_format(fmt)
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != kf.QK:
        raise ValueError(f"expected (n, {kf.QK}) blocks, got shape {x.shape}")
    if scale == "search":
        return kc.dequantize_blocks(kc.quantize_blocks(x, f), f)
    t = kf.tables(f.name)
    out = np.empty_like(x)
    for i in range(0, len(x), 4096):
        xs = kc.sanitize(x[i : i + 4096])
        X, Y = xs[:, 0::2], xs[:, 1::2]
        if scale == "norm":
            s = kc.to_half(np.sqrt((xs * xs).mean(1)))
        else:
            s = kc.to_half(np.sqrt((X * X + Y * Y).max(1)) / t.radii[-1])
        cand = kc._candidates(f, np.arctan2(Y, X))
        codes, _ = kc._encode_at(f, X, Y, cand, s)
        codes[s == 0] = 0
        out[i : i + 4096] = kc.dequantize_blocks(kc.pack(f, s, codes), f)
    return out


# ----------------------------------------------------------------------------------------------
# Ring codes with other ring counts

# Ring counts tried for the record (ring 0 = origin). Sums: 256, 128, 64 points.
RING_VARIANTS: dict[str, tuple[int, ...]] = {
    "256 pts, 9 rings": (1, 8, 16, 23, 30, 37, 44, 49, 48),
    "256 pts, 10 rings (polar)": kf.POLAR.counts,
    "256 pts, 11 rings": (1, 6, 13, 19, 24, 29, 33, 36, 34, 32, 29),
    "128 pts, 8 rings": (1, 7, 13, 19, 23, 24, 22, 19),
    "64 pts, 5 rings": (1, 7, 14, 20, 22),
    "64 pts, 6 rings (polar3)": kf.POLAR3.counts,
    "64 pts, 7 rings": (1, 5, 9, 12, 14, 13, 10),
}


DESIGN_SAMPLES = 200_000  # samples of N(0, I_2) for new ring codes (the formats used 400k; half keeps
# the study fast; the radii move by < 0.01)


def _radii_cache_dir() -> Path:
    from kvpolar.paths import cache_dir

    return cache_dir() / "study"


@functools.cache
def ring_radii(counts: tuple[int, ...]) -> np.ndarray:
    """Radii of a ring code, Lloyd-optimal for N(0, I_2), by kvpolar.format.design_ring_code
    (DESIGN_SAMPLES seeded samples, 40 iterations, as the chosen formats); cached on disk under
    $KVPOLAR_CACHE/study."""
    counts = tuple(int(c) for c in counts)
    if counts[0] != 1 or sum(counts) < 2:
        raise ValueError(f"ring 0 must be the origin (counts[0] == 1), got {counts}")
    for name, fmt in kf.FORMATS.items():
        if counts == fmt.counts:
            return kf.tables(name).radii.astype(np.float64)
    n = DESIGN_SAMPLES
    path = _radii_cache_dir() / ("ring-" + "-".join(map(str, counts)) + f"-n{n}.npy")
    if path.is_file():
        return np.load(path)
    radii = kf.design_ring_code(counts, samples=kf.design_samples(n))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, radii)
    tmp.replace(path)
    return radii


@dataclasses.dataclass(frozen=True)
class RingCode:
    counts: tuple[int, ...]
    block: int = 64
    search: bool = True  # False: s = fp16(rmax / r_out)

    @property
    def npoints(self) -> int:
        return sum(self.counts)

    @property
    def bits_per_elem(self) -> float:
        return math.log2(self.npoints) / 2 + 16 / self.block


def _nearest_ring(counts, radii, pts, xn, yn):
    """Exact nearest ring-code point of each (xn, yn) (float64): two angular neighbours per ring."""
    theta = np.arctan2(yn, xn)
    best = np.full(xn.shape, np.inf)
    code = np.zeros(xn.shape, np.int64)
    off = 0
    for j, n in enumerate(counts):
        if n == 1:
            cand = [np.full(xn.shape, off)]
        else:
            phi = (j % 2) * math.pi / n
            k = np.floor((theta - phi) * (n / (2 * math.pi))).astype(np.int64) % n
            cand = [off + k, off + (k + 1) % n]
        for c in cand:
            dd = (xn - pts[c, 0]) ** 2 + (yn - pts[c, 1]) ** 2
            upd = dd < best
            best = np.where(upd, dd, best)
            code = np.where(upd, c, code)
        off += n
    return code


def ring_roundtrip(x: np.ndarray, code: RingCode) -> np.ndarray:
    """(n, block) float -> (n, block) float32 with the ring code `code` (FORMAT.md's scale grid
    of N_CAND multipliers in SCALE_GRID and N_REFINE least-squares refinements, in float64)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != code.block or code.block % 2:
        raise ValueError(f"expected (n, {code.block}) blocks, got shape {x.shape}")
    radii = ring_radii(code.counts)
    pts = kf.ring_points(code.counts, radii)
    X, Y = x[:, 0::2], x[:, 1::2]
    rmax = np.sqrt((X * X + Y * Y).max(1))

    def h(v):
        return np.minimum(v, kf.FP16_MAX).astype(np.float16).astype(np.float64)

    def enc(s):
        inv = np.where(s > 0, 1 / np.where(s > 0, s, 1), 0)[:, None]
        c = _nearest_ring(code.counts, radii, pts, X * inv, Y * inv)
        e = ((X - s[:, None] * pts[c, 0]) ** 2 + (Y - s[:, None] * pts[c, 1]) ** 2).sum(1)
        return c, np.where(s > 0, e, np.inf)

    grid = np.linspace(*kf.SCALE_GRID, kf.N_CAND) if code.search else np.array([1.0])
    best_s = np.zeros(len(x))
    best_e = np.full(len(x), np.inf)
    best_c = np.zeros(X.shape, np.int64)
    for g in grid:
        s = h(rmax / (radii[-1] * g))
        c, e = enc(s)
        upd = e < best_e
        best_s[upd], best_e[upd], best_c[upd] = s[upd], e[upd], c[upd]
    if code.search:
        for _ in range(kf.N_REFINE):
            cx, cy = pts[best_c, 0], pts[best_c, 1]
            den = (cx * cx + cy * cy).sum(1)
            s = h(np.where(den > 0, (X * cx + Y * cy).sum(1) / np.where(den > 0, den, 1), 0))
            c, e = enc(s)
            upd = e < best_e
            best_s[upd], best_e[upd], best_c[upd] = s[upd], e[upd], c[upd]
    best_s[~np.isfinite(best_e)] = 0
    out = np.empty_like(x)
    out[:, 0::2] = best_s[:, None] * pts[best_c, 0]
    out[:, 1::2] = best_s[:, None] * pts[best_c, 1]
    return out.astype(np.float32)
