"""The polar block formats, defined once.

Every constant the numpy codec, the llama.cpp patch and the CuPy kernels use comes from here.
`docs/FORMAT.md` describes the bytes and the encoding algorithm; the C/CUDA header
`converter/kvpolar/csrc/ggml-polar-format.h` (block structs, type and kernel ids, tables)
and the stored tables `converter/kvpolar/_codebooks.py` are generated from this module by

    python -m kvpolar.format --write

Ring codes: ring j holds n_j points at radius r_j, angles phi_j + 2*pi*k/n_j with
phi_j = (j % 2) * pi / n_j; code index = sum(n_0..n_{j-1}) + k. Ring 0 is the origin.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text

log = logging.getLogger("kvpolar.format")

QK = 64  # coordinates per block (must divide the head size)
PAIRS = QK // 2
FP16_MAX = 65504.0
# inputs are clamped to [-VMAX, VMAX]: beyond 65504 * r_out (~2e5) nothing is representable
VMAX = float(2.0**20)

# Design of the codebooks (docs/format-study.md chose these).
DESIGN_SAMPLES = 400_000
DESIGN_ITERS = 40
DESIGN_SEED = 20250204
SCALE_GRID = (0.8, 1.3)  # multipliers g_k of the outer radius, evenly spaced
N_CAND = 16
N_REFINE = 2

LLAMA_LAST_TYPE_ID = 42  # GGML_TYPE_Q2_0 in llama.cpp 0c1e570


_CTYPES = {"half": ("POLAR_HALF", "<f2"), "uint8": ("uint8_t", "u1")}  # C type, numpy dtype


@dataclasses.dataclass(frozen=True)
class Field:
    """One member of a block struct: `ctype name[count]; // comment`."""

    name: str
    ctype: str  # "half" (IEEE binary16: ggml_half in ggml, POLAR_HALF elsewhere) or "uint8"
    count: int
    comment: str

    @property
    def c_type(self) -> str:
        return _CTYPES[self.ctype][0]

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of the member, little-endian (count > 1: a subarray)."""
        base = _CTYPES[self.ctype][1]
        return np.dtype(base if self.count == 1 else (base, (self.count,)))


@dataclasses.dataclass(frozen=True)
class PolarFormat:
    """One polar block type: byte layout and codebook definition."""

    name: str  # ggml type name, what `-ctk` takes
    type_id: int  # GGML_TYPE_* value, appended after llama.cpp's last id
    kernel_id: int  # KFMT/VFMT value of the CuPy kernels (cupy_kernels/gpu.py FMT_ID)
    code_bits: int  # bits per pair code
    counts: tuple[int, ...]  # points per ring, ring 0 = origin
    layout: tuple[Field, ...]  # the C struct block_<name>, in struct order

    @property
    def ncodes(self) -> int:
        return 1 << self.code_bits

    @property
    def block_size(self) -> int:
        return QK

    @property
    def dtype(self) -> np.dtype:
        """numpy structured dtype of one block, laid out as the C compiler lays out the struct."""
        return np.dtype([(f.name, f.dtype) for f in self.layout], align=True)

    @property
    def type_size(self) -> int:
        return self.dtype.itemsize

    @property
    def offsets(self) -> dict[str, int]:
        """Byte offset of each field in the block (C: offsetof(block_<name>, field))."""
        return {f.name: self.dtype.fields[f.name][1] for f in self.layout}

    @property
    def bits_per_elem(self) -> float:
        return 8.0 * self.type_size / QK

    @property
    def fields(self) -> tuple[tuple[str, str, int], ...]:
        """(name, numpy dtype, count) in struct order."""
        return tuple((f.name, _CTYPES[f.ctype][1], f.count) for f in self.layout)

    @property
    def ring_offsets(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.concatenate([[0], np.cumsum(self.counts)[:-1]]))

    @property
    def ring_phases(self) -> np.ndarray:
        return np.array([(j % 2) * math.pi / n if n > 1 else 0.0 for j, n in enumerate(self.counts)])

    def __post_init__(self) -> None:
        assert sum(self.counts) == self.ncodes, (self.name, sum(self.counts))
        assert self.counts[0] == 1
        # a half scale and the pair codes, nothing else and no padding
        assert self.type_size == 2 + PAIRS * self.code_bits // 8, (self.name, self.type_size)


_D = Field("d", "half", 1, "block scale")
POLAR = PolarFormat(
    name="polar",
    type_id=LLAMA_LAST_TYPE_ID + 1,
    kernel_id=0,
    code_bits=8,
    counts=(1, 7, 14, 20, 26, 32, 37, 41, 40, 38),
    layout=(_D, Field("qs", "uint8", PAIRS, "code c[p] of pair p (0..255)")),
)
POLAR3 = PolarFormat(
    name="polar3",
    type_id=LLAMA_LAST_TYPE_ID + 2,
    kernel_id=1,
    code_bits=6,
    counts=(1, 6, 11, 16, 16, 14),
    layout=(
        _D,
        Field("qs", "uint8", PAIRS // 2, "low 4 bits: qs[i] = c[i] & 15 | (c[i+16] & 15) << 4"),
        Field(
            "qh",
            "uint8",
            PAIRS // 4,
            "high 2 bits: qh[i] = c[i] >> 4 | c[i+8] >> 4 << 2 | c[i+16] >> 4 << 4 | c[i+24] >> 4 << 6",
        ),
    ),
)
FORMATS: dict[str, PolarFormat] = {f.name: f for f in (POLAR, POLAR3)}


def get_format(name: str) -> PolarFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown polar format {name!r}; expected one of {sorted(FORMATS)}") from None


# ----------------------------------------------------------------------------------------------
# Codebook design


def ring_points(counts, radii) -> np.ndarray:
    """(sum(counts), 2) float64 points of a ring code."""
    pts = []
    for j, (n, r) in enumerate(zip(counts, radii, strict=True)):
        phi = (j % 2) * math.pi / n if n > 1 else 0.0
        a = phi + 2 * math.pi * np.arange(n) / n
        pts.append(np.stack([r * np.cos(a), r * np.sin(a)], 1))
    return np.concatenate(pts)


def nearest(x: np.ndarray, pts: np.ndarray, chunk: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force nearest point (index, squared distance) for (n, 2) samples; design only."""
    idx = np.empty(len(x), np.int64)
    dist = np.empty(len(x))
    p2 = (pts**2).sum(1)
    for i in range(0, len(x), chunk):
        xs = x[i : i + chunk]
        d = p2[None, :] - 2.0 * (xs @ pts.T)
        k = d.argmin(1)
        idx[i : i + chunk] = k
        dist[i : i + chunk] = ((xs - pts[k]) ** 2).sum(1)
    return idx, dist


def lloyd_ring_step(counts, radii, samples) -> tuple[np.ndarray, float]:
    """One restricted Lloyd step: new radii (centroid condition along each point's direction)
    and the mean squared error per coordinate before the step."""
    pts = ring_points(counts, radii)
    idx, dist = nearest(samples, pts)
    ring = np.repeat(np.arange(len(counts)), counts)[idx]
    norms = np.linalg.norm(pts, axis=1, keepdims=True)
    unit = np.divide(pts, norms, out=np.zeros_like(pts), where=norms > 0)
    proj = (samples * unit[idx]).sum(1)
    new = np.array(radii, dtype=np.float64)
    for j in range(1, len(counts)):
        m = ring == j
        if m.any():
            new[j] = proj[m].mean()
    return new, float(dist.mean() / 2)


def design_samples(n: int = DESIGN_SAMPLES, seed: int = DESIGN_SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2))


def design_ring_code(counts, iters: int = DESIGN_ITERS, samples: np.ndarray | None = None) -> np.ndarray:
    """Radii of the ring code with these counts, Lloyd-optimal for N(0, I_2) (float64)."""
    samples = design_samples() if samples is None else samples
    q = (np.cumsum(counts) - np.asarray(counts) / 2) / sum(counts)
    radii = np.sqrt(-2 * np.log1p(-q))  # Rayleigh quantiles
    radii[0] = 0.0
    for _ in range(iters):
        radii, _ = lloyd_ring_step(counts, radii, samples)
    return radii


@dataclasses.dataclass(frozen=True)
class Tables:
    """float32 tables of one format, exactly as the C/CUDA code sees them."""

    cx: np.ndarray  # (ncodes,) float32
    cy: np.ndarray
    ring_n: np.ndarray  # (R,) int32
    ring_off: np.ndarray  # (R,) int32
    ring_phi: np.ndarray  # (R,) float32
    ring_istep: np.ndarray  # (R,) float32, n_j / (2 pi)
    g: np.ndarray  # (N_CAND,) float32 scale-candidate multipliers of rmax
    radii: np.ndarray  # (R,) float32, documentation and tests


def make_tables(fmt: PolarFormat, radii) -> Tables:
    radii = np.asarray(radii, dtype=np.float64)
    pts = ring_points(fmt.counts, radii)
    gk = np.linspace(SCALE_GRID[0], SCALE_GRID[1], N_CAND)
    return Tables(
        cx=pts[:, 0].astype(np.float32),
        cy=pts[:, 1].astype(np.float32),
        ring_n=np.array(fmt.counts, np.int32),
        ring_off=np.array(fmt.ring_offsets, np.int32),
        ring_phi=fmt.ring_phases.astype(np.float32),
        ring_istep=(np.array(fmt.counts, np.float64) / (2 * math.pi)).astype(np.float32),
        g=(1.0 / (radii[-1] * gk)).astype(np.float32),
        radii=radii.astype(np.float32),
    )


@functools.cache
def tables(name: str) -> Tables:
    """The stored tables of a format (from converter/kvpolar/_codebooks.py, generated)."""
    from . import _codebooks

    fmt = get_format(name)
    radii = np.array([float.fromhex(h) for h in _codebooks.RADII[name]], dtype=np.float64)
    return make_tables(fmt, radii)


# ----------------------------------------------------------------------------------------------
# Generated files

GEN_COMMAND = "python -m kvpolar.format --write"
REPO = Path(__file__).resolve().parent
HEADER_PATH = REPO / "csrc" / "ggml-polar-format.h"
CODEBOOKS_PATH = REPO / "_codebooks.py"


def _f32(v: float) -> str:
    """A C float literal that parses back to exactly this float32 (9 significant digits)."""
    v = float(np.float32(v))
    assert math.isfinite(v)
    s = f"{v:.9g}"
    return s + ("f" if ("." in s or "e" in s) else ".0f")


def _init(vals, fmt_one) -> str:
    items = [fmt_one(v) for v in vals]
    lines = []
    for i in range(0, len(items), 8):
        lines.append("    " + ", ".join(items[i : i + 8]))
    return "{ \\\n" + ", \\\n".join(lines) + " \\\n}"


_HEADER_TYPES = """\
// Types of the block structs. ggml-common.h includes this file among its own block structs,
// where uint8_t and ggml_half (half under CUDA) are declared; a standalone includer gets
// <stdint.h> and the binary16 bits in a uint16_t, or its own POLAR_HALF. NVRTC has no
// standard headers.
#if !defined(GGML_COMMON_DECL)
#if defined(__CUDACC_RTC__)
typedef unsigned char  uint8_t;
typedef unsigned short uint16_t;
#else
#include <stdint.h>
#endif
#endif

#ifndef POLAR_HALF
#if defined(GGML_COMMON_DECL)
#define POLAR_HALF ggml_half
#else
#define POLAR_HALF uint16_t
#endif
#endif

#if defined(__cplusplus)
#define POLAR_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define POLAR_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#else
#define POLAR_STATIC_ASSERT(cond, msg) extern char polar_static_assert[(cond) ? 1 : -1]
#endif
"""


def render_struct(fmt: PolarFormat) -> list[str]:
    """`typedef struct { ... } block_<name>;` with a comment per field and a size check."""
    tw = max(len(f.c_type) for f in fmt.layout)
    decls = [f"{f.c_type:<{tw}} {f.name}" + (f"[{f.count}]" if f.count > 1 else "") + ";" for f in fmt.layout]
    w = max(map(len, decls))
    return [
        "typedef struct {",
        *(f"    {d:<{w}} // {f.comment}" for f, d in zip(fmt.layout, decls, strict=True)),
        f"}} block_{fmt.name};",
        f"POLAR_STATIC_ASSERT(sizeof(block_{fmt.name}) == {fmt.name.upper()}_TYPE_SIZE, "
        f'"wrong {fmt.name} block size/padding");',
    ]


def render_header() -> str:
    out = [
        "// Generated by `" + GEN_COMMAND + "` from converter/kvpolar/format.py. Do not edit.",
        "// Layout and algorithm: docs/FORMAT.md. C99, C++ and CUDA (nvcc, NVRTC): the block structs,",
        "// and the tables as initializer-list macros, each consumer declaring its own array",
        "// (static const / __constant__). ggml-common.h includes this file for block_polar*.",
        "#pragma once",
        "",
        f"#define POLAR_VMAX {VMAX:.1f}f",
        f"#define POLAR_FP16_MAX {FP16_MAX:.1f}f",
        "",
        _HEADER_TYPES,
        "// A block holds 64 floats as 32 pairs (x[2p], x[2p+1]); pair p is coded as c[p], one point",
        "// of a 2-D ring codebook (CX, CY) scaled by d.",
        "",
    ]
    for fmt in FORMATS.values():
        t = tables(fmt.name)
        u = fmt.name.upper()
        out += [
            f"// {fmt.name}: {fmt.type_size} bytes per {QK} values ({fmt.bits_per_elem} bits/elem), "
            f"{fmt.ncodes}-point ring code",
            f"//   rings (points): {list(fmt.counts)}",
            f"//   radii: {[round(float(r), 6) for r in t.radii]}",
            f"#define GGML_TYPE_{u}_ID {fmt.type_id}",
            f"#define {u}_KERNEL_ID {fmt.kernel_id} // KFMT/VFMT of the CuPy kernels",
            f"#define QK_{u} {QK}",
            f"#define {u}_TYPE_SIZE {fmt.type_size}",
            f"#define {u}_NCODES {fmt.ncodes}",
            f"#define {u}_NRINGS {len(fmt.counts)}",
            f"#define {u}_NCAND {N_CAND}",
            f"#define {u}_NREFINE {N_REFINE}",
            "",
            *render_struct(fmt),
            "",
            f"#define {u}_CX_INIT " + _init(t.cx, _f32),
            f"#define {u}_CY_INIT " + _init(t.cy, _f32),
            f"#define {u}_RING_N_INIT " + _init(t.ring_n, str),
            f"#define {u}_RING_OFF_INIT " + _init(t.ring_off, str),
            f"#define {u}_RING_PHI_INIT " + _init(t.ring_phi, _f32),
            f"#define {u}_RING_ISTEP_INIT " + _init(t.ring_istep, _f32),
            f"#define {u}_G_INIT " + _init(t.g, _f32),
            "",
        ]
    return "\n".join(out)


def render_codebooks(radii: dict[str, np.ndarray]) -> str:
    lines = [
        f'"""Generated by `{GEN_COMMAND}`: Lloyd-optimal ring radii (float64 hex). Do not edit."""',
        "",
        "RADII = {",
    ]
    for name, r in radii.items():
        lines.append(f"    {name!r}: (")
        lines += [f"        {float(v).hex()!r}," for v in r]
        lines.append("    ),")
    lines += ["}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvpolar.format", description=__doc__)
    ap.add_argument(
        "--write", action="store_true", help="redesign the codebooks and write all generated files"
    )
    ap.add_argument("--write-header", action="store_true", help="write the C/CUDA header from stored tables")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not (args.write or args.write_header):
        ap.print_help()
        return 0
    if args.write:
        samples = design_samples()
        radii = {}
        for fmt in FORMATS.values():
            radii[fmt.name] = design_ring_code(fmt.counts, samples=samples)
            log.info("%s radii %s", fmt.name, np.round(radii[fmt.name], 4))
        atomic_write_text(CODEBOOKS_PATH, render_codebooks(radii))
        import importlib

        from . import _codebooks

        importlib.reload(_codebooks)
        tables.cache_clear()
    atomic_write_text(HEADER_PATH, render_header())
    print(f"wrote {HEADER_PATH}" + (f" and {CODEBOOKS_PATH}" if args.write else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
