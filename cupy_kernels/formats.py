"""The block formats the CuPy kernels read: polar and polar3 from `kvpolar.format`, plus any
format registered at run time.

A kernel knows a block layout by its kernel id (KFMT/VFMT, `kvpolar.format.PolarFormat.kernel_id`,
POLAR_KERNEL_ID / POLAR3_KERNEL_ID in the generated ggml-polar-format.h) and a codebook only
through the table it is given, so another codebook stored in one of those layouts needs no new
kernel code. Research formats stay out of this package: their own code describes them and
registers them here, e.g. the paper-B preset (scripts/study/paperb_kernel_ref.py,
`register_kernel_format()`), which stores polar's layout with an angle x radius codebook and
also enables the attention kernel's angle-LUT mode (KMODE 2, `angle_lut=True`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kvpolar import format as kvformat

BUILTIN = ("polar", "polar3")


@dataclasses.dataclass(frozen=True, eq=False)
class CacheFormat:
    """A block format the kernels read. Compared and hashed by identity (caches key on it)."""

    name: str
    kernel_id: int  # KFMT/VFMT of the layout (the built-in format whose struct it uses)
    type_size: int  # bytes per block of 64 values
    cx: np.ndarray = dataclasses.field(repr=False)  # (ncodes,) float32: decoded x of each code at d = 1
    cy: np.ndarray = dataclasses.field(repr=False)  # (ncodes,) float32: decoded y
    # codes are angle a << 4 | radius level k (0..15) and entry a << 4 | 15 is the unit vector of
    # angle a: what the attention kernel's "anglelut" mode (KMODE 2) assumes
    angle_lut: bool = False

    @property
    def ncodes(self) -> int:
        return len(self.cx)


@functools.cache
def _builtin(name: str) -> CacheFormat:
    f = kvformat.get_format(name)
    t = kvformat.tables(name)
    return CacheFormat(name, f.kernel_id, f.type_size, t.cx, t.cy)


_registered: dict[str, CacheFormat] = {}


def register_format(
    name: str, layout: str, cx: np.ndarray, cy: np.ndarray, angle_lut: bool = False
) -> CacheFormat:
    """Make the kernels read format `name`: blocks of the built-in format `layout` ("polar":
    d + one 8-bit code per pair; "polar3": d + 6-bit codes) decoded with the codebook (cx, cy)
    (float32, one entry per code). Registering a name again with the same definition returns
    the registered format (plans and device tables are cached per format)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in format and cannot be registered again")
    if layout not in BUILTIN:
        raise ValueError(f"layout must be one of {BUILTIN}, got {layout!r}")
    base = _builtin(layout)
    cx = np.ascontiguousarray(cx, dtype=np.float32)
    cy = np.ascontiguousarray(cy, dtype=np.float32)
    if cx.shape != (base.ncodes,) or cy.shape != (base.ncodes,):
        raise ValueError(
            f"the {layout} layout has {base.ncodes} codes: cx and cy must be ({base.ncodes},), "
            f"got {cx.shape} and {cy.shape}"
        )
    if angle_lut and base.ncodes != 256:
        raise ValueError("angle_lut formats use 8-bit codes (angle << 4 | radius): layout 'polar'")
    old = _registered.get(name)
    if old is not None:
        same = old.kernel_id == base.kernel_id and old.angle_lut == angle_lut
        if same and np.array_equal(old.cx, cx) and np.array_equal(old.cy, cy):
            return old
        raise ValueError(f"format {name!r} is registered already, with another definition")
    fmt = CacheFormat(name, base.kernel_id, base.type_size, cx, cy, angle_lut)
    _registered[name] = fmt
    return fmt


def names() -> tuple[str, ...]:
    return (*BUILTIN, *_registered)


def get(name: str) -> CacheFormat:
    """The format `name` (built-in or registered); ValueError naming the known ones otherwise."""
    if name in BUILTIN:
        return _builtin(name)
    fmt = _registered.get(name)
    if fmt is None:
        raise ValueError(
            f"unknown cache format {name!r}: one of {names()} "
            "(research formats are registered with cupy_kernels.formats.register_format)"
        )
    return fmt


def type_size(name: str) -> int:
    """Bytes per 64-value block of format `name`."""
    return get(name).type_size
