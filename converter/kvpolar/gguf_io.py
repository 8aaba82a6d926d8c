"""GGUF files holding polar tensors, through gguf-py (0.19.0) with the polar types registered.

Importing this module extends gguf-py in place, without a fork (`register`, idempotent):

- `gguf.GGMLQuantizationType` gains POLAR = 43 and POLAR3 = 44: `GGMLQuantizationType(43)`,
  `GGMLQuantizationType["POLAR"]`, `.POLAR`, iteration and pickling work as for built-in members;
- `gguf.GGML_QUANT_SIZES[POLAR] = (64, 34)`, `[POLAR3] = (64, 26)`;
- `gguf.quants.quantize` / `dequantize` dispatch the two types to `kvpolar.codec`'s block
  functions through classes POLAR and POLAR3 built on gguf-py's own `__Quant` base, exactly as
  `class Q4_0(__Quant, qtype=...)` is.

So in this process `gguf.GGUFWriter`, `gguf.GGUFReader` and `gguf/scripts/gguf_dump.py` handle
polar tensors. A process that has not imported `kvpolar.gguf_io` does not know ids 43/44
(gguf-py's reader raises "43 is not a valid GGMLQuantizationType").

Reading is bounded: `scan` walks the header itself (every count, length and offset checked
against the file size, the layout rules of llama.cpp's gguf.cpp) before gguf-py's reader, which
does not bound counts (a corrupt array length can make it loop for ever), touches the file.
Errors are `GGUFFormatError` (a ValueError) naming the path, what was expected and what was found.

Writing goes to a temporary file in the target directory, renamed over the target at the end;
on any error the temporary file is removed and the target is untouched.

Shapes are numpy order throughout (the last axis is ggml's ne[0], the one split into blocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import struct
import tempfile
import threading
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValue, GGUFValueType

from . import codec
from .format import FORMATS, PolarFormat, get_format

log = logging.getLogger("kvpolar.gguf_io")

__all__ = [
    "POLAR_TYPES",
    "GGUFFile",
    "GGUFFormatError",
    "Layout",
    "RawTensor",
    "TensorInfo",
    "atomic_path",
    "encode_tensor",
    "ggml_type",
    "polar_format_of",
    "read_gguf",
    "read_tensors",
    "register",
    "scan",
    "summary",
    "write_tensors",
]

GGML_MAX_DIMS = 4  # ggml.h
GGML_MAX_NAME = 64  # ggml.h, including the terminating NUL
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf-py's reader accepts; v2 and v3 share the layout below
GGUF_HEADER_BYTES = 24  # magic u32, version u32, n_tensors u64, n_kv u64
_INT64_MAX = (1 << 63) - 1


class GGUFFormatError(ValueError):
    """A GGUF file is truncated, corrupt or uses something kvpolar cannot read."""


# ----------------------------------------------------------------------------------------------
# Registration of the polar types in gguf-py

_lock = threading.Lock()
POLAR_TYPES: dict[str, GGMLQuantizationType] = {}  # "polar" -> GGMLQuantizationType.POLAR, ...


def _add_enum_member(cls: type, name: str, value: int):
    """Add `name = value` to an existing IntEnum, as its class body would have (3.10 - 3.13).

    Builds the member like enum's `_proto_member.__set_name__` does for an int-based enum and
    records it in the three tables lookups use: `_member_map_` (cls[name]), `_value2member_map_`
    (cls(value)) and `_member_names_` (iteration, len). Already present with this value: no-op.
    """
    existing = cls._member_map_.get(name)
    if existing is not None:
        if int(existing) != value:
            raise RuntimeError(f"{cls.__name__}.{name} exists with value {int(existing)}, not {value}")
        return existing
    other = cls._value2member_map_.get(value)
    if other is not None:
        raise RuntimeError(
            f"gguf {_gguf_version()} already defines {cls.__name__} value {value} as {other.name}; "
            f"kvpolar wants it for {name} (kvpolar.format.LLAMA_LAST_TYPE_ID must follow llama.cpp)"
        )
    member = int.__new__(cls, value)
    member._value_ = value
    member._name_ = name
    member.__objclass__ = cls
    member._sort_order_ = len(cls._member_names_)
    type.__setattr__(cls, name, member)  # EnumType.__setattr__ refuses to touch members
    cls._member_names_.append(name)
    cls._member_map_[name] = member
    cls._value2member_map_[value] = member
    if not (cls(value) is member and cls[name] is member and getattr(cls, name) is member):
        raise RuntimeError(f"could not extend {cls.__name__} with {name} = {value} on this Python")
    return member


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # only used in messages
        return "(unknown version)"


def _quant_base() -> type:
    """gguf-py's base class of its block types (`class Q4_0(__Quant, qtype=...)`)."""
    base = vars(gguf.quants).get("__Quant")
    if base is None:
        raise RuntimeError(f"gguf {_gguf_version()}: gguf.quants has no __Quant base; kvpolar needs 0.19.0")
    return base


def _make_quant_class(fmt: PolarFormat, qtype: GGMLQuantizationType) -> type:
    """`class POLAR(__Quant, qtype=GGMLQuantizationType.POLAR)` with kvpolar's block codec."""

    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # (n, 64) float32 -> (n, type_size) uint8; sanitizes NaN/Inf as the C encoder does
        return codec.quantize_blocks(blocks, fmt)

    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # (n, type_size) uint8 -> (n, 64) float32
        return codec.dequantize_blocks(blocks, fmt)

    def body(ns: dict) -> None:
        ns["__module__"] = __name__
        ns["__doc__"] = f"{fmt.name}: {fmt.type_size} bytes per {fmt.block_size} values (kvpolar.codec)."
        ns["kvpolar_format"] = fmt.name
        ns["quantize_blocks"] = classmethod(quantize_blocks)
        ns["dequantize_blocks"] = classmethod(dequantize_blocks)

    return types.new_class(fmt.name.upper(), (_quant_base(),), {"qtype": qtype}, body)


QUANT_CLASSES: dict[str, type] = {}  # "polar" -> the gguf.quants class registered for it


def register() -> dict[str, GGMLQuantizationType]:
    """Register POLAR/POLAR3 with gguf-py (enum, GGML_QUANT_SIZES, gguf.quants). Idempotent.

    Returns {"polar": GGMLQuantizationType.POLAR, "polar3": GGMLQuantizationType.POLAR3}.
    Raises RuntimeError when the installed gguf already uses the ids or names otherwise.
    """
    with _lock:
        traits = gguf.quants._type_traits
        for fmt in FORMATS.values():
            qtype = _add_enum_member(GGMLQuantizationType, fmt.name.upper(), fmt.type_id)
            sizes = (fmt.block_size, fmt.type_size)
            if GGML_QUANT_SIZES.setdefault(qtype, sizes) != sizes:
                raise RuntimeError(
                    f"gguf.GGML_QUANT_SIZES[{qtype.name}] is {GGML_QUANT_SIZES[qtype]}, kvpolar needs {sizes}"
                )
            have = traits.get(qtype)
            if have is None:
                have = _make_quant_class(fmt, qtype)
            elif getattr(have, "kvpolar_format", None) != fmt.name:
                raise RuntimeError(f"gguf.quants already has {have!r} for {qtype.name}")
            QUANT_CLASSES[fmt.name] = have
            POLAR_TYPES[fmt.name] = qtype
        return dict(POLAR_TYPES)


register()


def ggml_type(fmt: PolarFormat | str) -> GGMLQuantizationType:
    """The gguf-py type of a polar format name ('polar', 'polar3')."""
    name = fmt.name if isinstance(fmt, PolarFormat) else get_format(fmt).name
    return POLAR_TYPES[name]


def polar_format_of(qtype: int) -> PolarFormat | None:
    """The polar format of a ggml type id, None for other types."""
    for fmt in FORMATS.values():
        if fmt.type_id == int(qtype):
            return fmt
    return None


def _known_type_ids() -> str:
    ids = sorted(int(t) for t in GGML_QUANT_SIZES)
    runs: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs)


# ----------------------------------------------------------------------------------------------
# Bounded header scan


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor-info record of a GGUF file, checked against the file size."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (reversed ggml ne)
    n_elements: int
    nbytes: int
    offset: int  # absolute file offset of the data
    info_offset: int  # absolute file offset of the tensor-info record

    @property
    def bits_per_elem(self) -> float | None:
        return 8.0 * self.nbytes / self.n_elements if self.n_elements else None


@dataclasses.dataclass(frozen=True)
class KVInfo:
    """One metadata key/value record: scalars and strings with their value, arrays summarized."""

    type: GGUFValueType
    value: Any  # scalar / str (bytes if not UTF-8) / None for arrays
    sub_type: GGUFValueType | None = None  # arrays: element type
    length: int | None = None  # arrays: element count
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    path: Path
    file_size: int
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    data_offset: int
    kv: dict[str, KVInfo]
    tensors: list[TensorInfo]


_SCALAR_FMT = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}
_MAX_ARRAY_NESTING = 8


class _Cursor:
    def __init__(self, path: Path, buf, order: str):
        self.path, self.buf, self.order = path, buf, order
        self.size = len(buf)
        self.pos = 0

    def fail(self, msg: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: corrupt GGUF file: {msg}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFFormatError(
                f"{self.path}: truncated GGUF file: {what} at offset {self.pos} needs {n} bytes, "
                f"found {max(self.size - self.pos, 0)} (file size {self.size})"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - len(raw)} is not UTF-8: {raw[:40]!r}") from None

    def vtype(self, raw: int, what: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            known = ", ".join(f"{t.value} ({t.name})" for t in GGUFValueType)
            raise self.fail(f"{what} has value type {raw}, expected one of {known}") from None

    def skip_value(self, t: GGUFValueType, what: str, depth: int = 0):
        """Walk one value of type t; return it for scalars and strings, (sub_type, n) for arrays."""
        if t in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[t], what)
        if t == GGUFValueType.STRING:
            raw = self.string(what)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw
        assert t == GGUFValueType.ARRAY
        if depth >= _MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays deeper than {_MAX_ARRAY_NESTING}")
        sub = self.vtype(self.unpack("I", f"element type of {what}"), f"element of {what}")
        n = self.unpack("Q", f"length of {what}")
        if sub in _SCALAR_FMT:
            min_item = struct.calcsize(_SCALAR_FMT[sub])
        else:  # string: its length; array: element type and length
            min_item = 8 if sub == GGUFValueType.STRING else 12
        if n * min_item > self.size - self.pos:
            raise GGUFFormatError(
                f"{self.path}: truncated or corrupt GGUF file: {what} at offset {self.pos} declares {n} "
                f"elements of {sub.name} (at least {n * min_item} bytes), found {self.size - self.pos} bytes "
                f"left in the file"
            )
        if sub in _SCALAR_FMT:
            self.pos += n * min_item
        else:
            for i in range(n):
                self.skip_value(sub, f"{what}[{i}]", depth + 1)
        return sub, n


def scan(path: os.PathLike | str) -> Layout:
    """Walk a GGUF file's header and tensor infos, checking every count, length and offset.

    Layout rules (as llama.cpp's gguf.cpp): magic "GGUF", version 2 or 3, known value and tensor
    types, at most 4 dims, ne[0] a multiple of the type's block size, tensor data stored in
    order at offsets padded to `general.alignment` (default 32), each tensor inside the file.
    Raises GGUFFormatError (ValueError) naming the path, what was expected and what was found;
    FileNotFoundError/IsADirectoryError for a missing path.
    """
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError names the path
    if path.is_dir():
        raise IsADirectoryError(f"{path}: expected a GGUF file, found a directory")
    if size < GGUF_HEADER_BYTES:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:4] != GGUF_MAGIC[: len(head)]:
            raise GGUFFormatError(f"{path}: not a GGUF file: expected magic {GGUF_MAGIC!r}, found {head!r}")
        raise GGUFFormatError(
            f"{path}: truncated GGUF file: expected a {GGUF_HEADER_BYTES}-byte header, found {size} bytes"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _scan(path, buf)
        finally:
            buf.release()


def _scan(path: Path, buf) -> Layout:
    size = len(buf)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file: expected magic {GGUF_MAGIC!r}, found {magic!r}")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written on a host of the other byte order (as gguf-py decides)
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in GGUF_VERSIONS:
        raise GGUFFormatError(
            f"{path}: unsupported GGUF version {version}; expected one of {list(GGUF_VERSIONS)}"
        )
    c = _Cursor(path, buf, order)
    c.pos = 8
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "key/value count")
    # smallest records: key/value = key length 8 + type 4 + 1-byte value; tensor info = name
    # length 8 + n_dims 4 + type 4 + offset 8
    min_bytes = 13 * n_kv + 24 * n_tensors
    if min_bytes > size - c.pos:
        raise GGUFFormatError(
            f"{path}: truncated or corrupt GGUF file: the header declares {n_tensors} tensors and {n_kv} "
            f"key/value pairs (at least {min_bytes} bytes), found {size - c.pos} bytes after the header"
        )

    kv: dict[str, KVInfo] = {}
    for i in range(n_kv):
        start = c.pos
        key = c.text(f"key of metadata entry {i}")
        if key in kv:
            raise c.fail(f"duplicate metadata key {key!r} at offset {start}")
        t = c.vtype(c.unpack("I", f"value type of {key!r}"), f"metadata key {key!r}")
        val = c.skip_value(t, f"value of {key!r}")
        if t == GGUFValueType.ARRAY:
            kv[key] = KVInfo(t, None, sub_type=val[0], length=val[1], offset=start)
        else:
            kv[key] = KVInfo(t, val, offset=start)

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    al = kv.get(gguf.Keys.General.ALIGNMENT)
    if al is not None:
        if al.type != GGUFValueType.UINT32 or al.value == 0 or al.value & (al.value - 1):
            raise c.fail(
                f"{gguf.Keys.General.ALIGNMENT} must be a UINT32 power of two, "
                f"found {al.type.name} {al.value!r}"
            )
        alignment = al.value

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = c.pos
        name = c.text(f"name of tensor {i}")
        if name in names:
            raise c.fail(f"duplicate tensor name {name!r} at offset {start}")
        names.add(name)
        n_dims = c.unpack("I", f"n_dims of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions, expected at most {GGML_MAX_DIMS}")
        ne = [c.unpack("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        if any(d > _INT64_MAX for d in ne):
            raise c.fail(f"tensor {name!r} has dimensions {ne}, expected each below 2^63")
        tid = c.unpack("I", f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(tid)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(
                f"{path}: tensor {name!r} has ggml type id {tid}, which is not a known type "
                f"(gguf {_gguf_version()} with kvpolar's polar types knows ids {_known_type_ids()})"
            ) from None
        ne0 = ne[0] if ne else 1
        if ne0 % block_size:
            raise c.fail(
                f"tensor {name!r} of type {qtype.name} has ne = {ne} (ne[0] = {ne0}), expected ne[0] a "
                f"multiple of its block size {block_size}"
            )
        off = c.unpack("Q", f"data offset of tensor {name!r}")
        n = 1
        for d in ne:
            n *= d
        infos.append((name, qtype, tuple(reversed(ne)), n, n * type_size // block_size, off, start))

    data_offset = -(-c.pos // alignment) * alignment
    tensors = []
    expect = 0
    for name, qtype, shape, n, nbytes, off, start in infos:
        if off != expect:
            raise c.fail(
                f"tensor {name!r} has data offset {off}, expected {expect} (tensors are stored in order, "
                f"each padded to the alignment {alignment})"
            )
        begin = data_offset + off
        if begin + nbytes > size:
            raise GGUFFormatError(
                f"{path}: truncated GGUF file: tensor {name!r} ({qtype.name}, shape {shape}) needs bytes "
                f"[{begin}, {begin + nbytes}), found a file of {size} bytes"
            )
        tensors.append(TensorInfo(name, qtype, shape, n, nbytes, begin, start))
        expect += -(-nbytes // alignment) * alignment
    return Layout(path, size, version, order, alignment, data_offset, kv, tensors)


# ----------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class RawTensor:
    """A tensor as stored in GGUF.

    data: for block types (polar, Q*, BF16, ...) uint8 of shape (*shape[:-1], shape[-1] //
    block_size * type_size); for F32/F16/F64/I8..I64 the native array of `shape`.
    """

    type: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in elements, numpy order
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits_per_elem(self) -> float | None:
        n = self.n_elements
        return 8.0 * self.nbytes / n if n else None


_NATIVE = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.F64: np.dtype(np.float64),
    GGMLQuantizationType.I8: np.dtype(np.int8),
    GGMLQuantizationType.I16: np.dtype(np.int16),
    GGMLQuantizationType.I32: np.dtype(np.int32),
    GGMLQuantizationType.I64: np.dtype(np.int64),
}
_NATIVE_BY_DTYPE = {v: k for k, v in _NATIVE.items()}


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    n = len(name.encode("utf-8"))
    if n >= GGML_MAX_NAME:
        raise ValueError(
            f"tensor name {name!r} is {n} bytes, expected at most {GGML_MAX_NAME - 1} (GGML_MAX_NAME)"
        )


def _check_polar_scales(where: str, fmt: PolarFormat, data: np.ndarray) -> None:
    """Block scales d must be finite (FORMAT.md: the reader rejects ±Inf/NaN scales)."""
    blocks = np.ascontiguousarray(data).reshape(-1, fmt.type_size)
    d = blocks[:, :2].copy().view("<f2")[:, 0]
    bad = ~np.isfinite(d)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{where} ({fmt.name}): block {i} has scale d = {d[i]}, expected a finite float16 "
            f"(the encoder never writes one; the data is corrupt)"
        )


def encode_tensor(
    name: str, x: np.ndarray, fmt: PolarFormat | str = "polar", nonfinite: str = "error"
) -> RawTensor:
    """Float array (..., k*64) -> RawTensor of the polar type, bytes (..., k*type_size) uint8.

    Raises ValueError naming the tensor for a non-float dtype, a last dimension that is not a
    multiple of 64, more than 4 dims, or NaN/Inf (unless nonfinite="sanitize").
    """
    fmt = fmt if isinstance(fmt, PolarFormat) else get_format(fmt)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"tensor {name!r}: expected a floating-point array to encode as {fmt.name}, got dtype {x.dtype}"
        )
    if x.ndim == 0 or x.shape[-1] % fmt.block_size:
        raise ValueError(
            f"tensor {name!r}: the last dimension must be a multiple of the {fmt.name} block size "
            f"{fmt.block_size}, got shape {x.shape}"
        )
    if x.ndim > GGML_MAX_DIMS:
        raise ValueError(f"tensor {name!r}: expected at most {GGML_MAX_DIMS} dimensions, got shape {x.shape}")
    try:
        b = codec.quantize(x, fmt, nonfinite=nonfinite)
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
    return RawTensor(ggml_type(fmt), tuple(int(s) for s in x.shape), b)


def _as_raw(name: str, v: Any, fmt: PolarFormat | None, nonfinite: str) -> RawTensor:
    if isinstance(v, RawTensor):
        try:
            qtype = GGMLQuantizationType(v.type)
            GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r}: unknown ggml type {v.type!r}") from None
        shape = tuple(int(s) for s in v.shape)
        if len(shape) > GGML_MAX_DIMS:
            raise ValueError(f"tensor {name!r}: expected at most {GGML_MAX_DIMS} dims, got shape {shape}")
        if qtype in _NATIVE:
            want_dtype, want_shape = _NATIVE[qtype], shape
        else:
            block_size = GGML_QUANT_SIZES[qtype][0]
            if not shape or shape[-1] % block_size:
                raise ValueError(
                    f"tensor {name!r} ({qtype.name}): the last dimension must be a multiple of the block "
                    f"size {block_size}, got shape {shape}"
                )
            want_dtype = np.dtype(np.uint8)
            want_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        data = np.asarray(v.data)
        if data.dtype.newbyteorder("=") != want_dtype or data.shape != want_shape:
            raise ValueError(
                f"tensor {name!r} ({qtype.name}, shape {shape}): expected data {want_dtype} of shape "
                f"{want_shape}, got {data.dtype} of shape {data.shape}"
            )
        pf = polar_format_of(qtype)
        if pf is not None:
            _check_polar_scales(f"tensor {name!r}", pf, data)
        return RawTensor(qtype, shape, np.ascontiguousarray(data, dtype=want_dtype))
    x = np.asarray(v)
    if fmt is not None:
        return encode_tensor(name, x, fmt, nonfinite)
    dt = x.dtype.newbyteorder("=")
    qtype = _NATIVE_BY_DTYPE.get(dt)
    if qtype is None:
        raise ValueError(
            f"tensor {name!r}: dtype {x.dtype} cannot be stored as is; expected one of "
            f"{sorted(str(d) for d in _NATIVE_BY_DTYPE)} (or pass fmt to encode floats)"
        )
    if x.ndim > GGML_MAX_DIMS:
        raise ValueError(f"tensor {name!r}: expected at most {GGML_MAX_DIMS} dimensions, got shape {x.shape}")
    return RawTensor(qtype, tuple(int(s) for s in x.shape), np.ascontiguousarray(x, dtype=dt))


# ----------------------------------------------------------------------------------------------
# Metadata

_NP_SCALAR = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}


def _scalar_type(key: str, v: Any) -> GGUFValueType:
    """gguf-py's conventions (str, bool, int -> INT32, float -> FLOAT32), widened for large
    ints; numpy scalars keep their exact type."""
    if isinstance(v, np.generic) and v.dtype in _NP_SCALAR:
        return _NP_SCALAR[v.dtype]
    if isinstance(v, (str, bytes)):
        return GGUFValueType.STRING
    if isinstance(v, bool):
        return GGUFValueType.BOOL
    if isinstance(v, int):
        if -(1 << 31) <= v < (1 << 31):
            return GGUFValueType.INT32
        if -(1 << 63) <= v < (1 << 63):
            return GGUFValueType.INT64
        if 0 <= v < (1 << 64):
            return GGUFValueType.UINT64
        raise ValueError(f"metadata {key!r}: integer {v} does not fit 64 bits")
    if isinstance(v, float):
        return GGUFValueType.FLOAT32
    raise ValueError(
        f"metadata {key!r}: expected str, bytes, bool, int, float, a list of one of them or a "
        f"gguf.GGUFValue, got {type(v).__name__}"
    )


def _to_gguf_value(key: str, v: Any) -> GGUFValue:
    if not isinstance(key, str) or not key:
        raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
    if isinstance(v, GGUFValue):
        return v
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"metadata {key!r}: GGUF arrays cannot be empty")
        types_ = {_scalar_type(key, x) for x in v}
        if len(types_) != 1:
            got = sorted(t.name for t in types_)
            raise ValueError(f"metadata {key!r}: array elements must share one type, got {got}")
        return GGUFValue(list(v), GGUFValueType.ARRAY, types_.pop())
    return GGUFValue(v, _scalar_type(key, v))


def _field_value(path: Path, field) -> GGUFValue:
    """gguf-py ReaderField -> GGUFValue that GGUFWriter writes back byte for byte."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = GGUFValueType(int(field.parts[3][0]))  # parts: key len, key, type, element type, n, ...
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"{path}: metadata {field.name!r} is a nested array, which kvpolar cannot copy")
        if sub == GGUFValueType.STRING:
            vals = [_str_or_bytes(field.parts[i]) for i in field.data]
        else:
            vals = [field.parts[i].tolist()[0] for i in field.data]
        return GGUFValue(vals, main, sub)
    if main == GGUFValueType.STRING:
        return GGUFValue(_str_or_bytes(field.parts[-1]), main)
    return GGUFValue(field.parts[-1].tolist()[0], main)


def _str_or_bytes(a: np.ndarray) -> str | bytes:
    raw = a.tobytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class GGUFFile:
    """Everything `write_tensors` needs to write the file again, byte for byte."""

    path: Path
    arch: str | None  # general.architecture
    metadata: dict[str, GGUFValue]  # every other key, in file order (general.alignment included)
    tensors: dict[str, Any]  # name -> float32/native array (decode=True) or RawTensor
    version: int
    alignment: int


def read_gguf(
    path: os.PathLike | str, decode: bool = True, metadata: bool = True, *, progress: bool = False
) -> GGUFFile:
    """Read a GGUF file (bounds-checked by `scan`, then through gguf.GGUFReader).

    decode=True: polar and other block types are dequantized to float32 (..., k*64), F32/F16/BF16
    to float32, F64 and integer tensors kept as they are. decode=False: RawTensor per tensor.
    Polar blocks with a non-finite scale raise GGUFFormatError either way. progress: a tqdm bar
    over the tensors (shown on a terminal only).
    """
    path = Path(path)
    layout = scan(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # scan() passed, so this is something gguf-py cannot handle
        raise GGUFFormatError(f"{path}: gguf-py could not read the file: {type(e).__name__}: {e}") from e
    try:
        tensors: dict[str, Any] = {}
        pairs = zip(layout.tensors, reader.tensors, strict=True)
        if progress:
            from tqdm import tqdm

            desc = "decoding" if decode else "reading"
            pairs = tqdm(
                pairs, total=len(layout.tensors), desc=desc, unit="tensor", disable=None, leave=False
            )
        for info, t in pairs:
            assert (t.name, int(t.tensor_type), t.data_offset) == (info.name, int(info.type), info.offset)
            data = np.array(t.data)  # copy out of the memmap
            if data.dtype.byteorder not in "=|":
                data = data.astype(data.dtype.newbyteorder("="))
            pf = polar_format_of(info.type)
            if pf is not None:
                try:
                    _check_polar_scales(f"tensor {info.name!r}", pf, data)
                except ValueError as e:
                    raise GGUFFormatError(f"{path}: corrupt GGUF file: {e}") from None
            if decode:
                tensors[info.name] = _decode(path, info, data, pf)
            else:
                tensors[info.name] = RawTensor(info.type, info.shape, data)
        arch = None
        meta: dict[str, GGUFValue] = {}
        if metadata:
            for key, field in reader.fields.items():
                if key.startswith("GGUF."):
                    continue
                v = _field_value(path, field)
                if key == gguf.Keys.General.ARCHITECTURE and v.type == GGUFValueType.STRING:
                    arch = v.value
                else:
                    meta[key] = v
    finally:
        del reader  # the memmap closes when its last view goes; data above are copies
    return GGUFFile(path, arch, meta, tensors, layout.version, layout.alignment)


def _decode(path: Path, info: TensorInfo, data: np.ndarray, pf: PolarFormat | None) -> np.ndarray:
    if pf is not None:
        return codec.dequantize(data, pf)
    if info.type == GGMLQuantizationType.F16:
        return data.astype(np.float32)
    if info.type in _NATIVE:  # F32 as is; F64 and integers are not narrowed
        return data
    try:
        return np.asarray(gguf.quants.dequantize(data, info.type), dtype=np.float32).reshape(info.shape)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {info.name!r} has type {info.type.name}, which gguf-py cannot dequantize; "
            f"read it with decode=False"
        ) from None


def read_tensors(path: os.PathLike | str, decode: bool = True, *, progress: bool = False) -> dict[str, Any]:
    """{name: array} of a GGUF file: float32 (decode=True, see read_gguf) or RawTensor."""
    return read_gguf(path, decode=decode, metadata=False, progress=progress).tensors


# ----------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path in path's directory; on success it replaces path (fsync'd, mode
    0666 & ~umask), on any exception it is removed and path is left as it was."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: the output directory {parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: expected a file path for the output, found a directory")
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tensors(
    path: os.PathLike | str,
    tensors: Mapping[str, Any],
    fmt: PolarFormat | str | None,
    metadata: Mapping[str, Any] | None = None,
    arch: str = "kvpolar",
    *,
    nonfinite: str = "error",
    progress: bool = False,
) -> Path:
    """Write tensors to a GGUF file at path, atomically.

    tensors: name -> float array (encoded to fmt; fmt=None writes it as is: f32, f16, f64 or
    int8..int64) or RawTensor (written as is, e.g. from read_tensors(decode=False)).
    Encoded arrays need their last dimension a multiple of 64 (ValueError naming the tensor,
    its shape and the block size). metadata: key -> str/bytes/bool/int/float, a list of one of
    them, or gguf.GGUFValue for an exact type; `general.alignment` sets the data alignment.
    Every tensor is encoded and checked before the file is created. Returns path.
    """
    path = Path(path)
    pf = None if fmt is None else (fmt if isinstance(fmt, PolarFormat) else get_format(fmt))
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a non-empty string, got {arch!r}")
    kvs = {}
    for key, v in (metadata or {}).items():
        if key == gguf.Keys.General.ARCHITECTURE:
            raise ValueError(f"metadata: pass {key!r} as arch=, not in metadata")
        kvs[key] = _to_gguf_value(key, v)
    alignment = kvs.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None and (
        alignment.type != GGUFValueType.UINT32
        or not isinstance(alignment.value, (int, np.integer))
        or alignment.value <= 0
        or alignment.value & (alignment.value - 1)
    ):
        raise ValueError(
            f"metadata {gguf.Keys.General.ALIGNMENT!r}: expected a UINT32 power of two, got {alignment}"
        )

    raws: dict[str, RawTensor] = {}
    items = list(tensors.items())
    bar = None
    if progress and pf is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"encoding {pf.name}", unit="tensor", leave=False)
    try:
        for name, v in items:
            _check_name(name)
            raws[name] = _as_raw(name, v, pf, nonfinite)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            for key, v in kvs.items():
                w.add_key_value(key, v.value, v.type, v.sub_type)
            if alignment is not None:
                w.data_alignment = int(alignment.value)
            for name, r in raws.items():
                w.add_tensor(name, r.data, raw_shape=None, raw_dtype=r.type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=progress)
        finally:
            w.close()
    log.info("wrote %s: %d tensors", path, len(raws))
    return path


# ----------------------------------------------------------------------------------------------
# Summary (kvpolar inspect)


def summary(path: os.PathLike | str) -> dict:
    """JSON-ready description of a GGUF file from its header (no tensor data is read)."""
    lay = scan(path)
    tensors = []
    by_type: dict[str, dict[str, int]] = {}
    for t in lay.tensors:
        tensors.append(
            {
                "name": t.name,
                "type": t.type.name,
                "type_id": int(t.type),
                "shape": list(t.shape),
                "ne": list(reversed(t.shape)),
                "n_elements": t.n_elements,
                "nbytes": t.nbytes,
                "bits_per_elem": t.bits_per_elem,
                "offset": t.offset,
            }
        )
        agg = by_type.setdefault(t.type.name, {"n_tensors": 0, "n_elements": 0, "nbytes": 0})
        agg["n_tensors"] += 1
        agg["n_elements"] += t.n_elements
        agg["nbytes"] += t.nbytes
    n_el = sum(t.n_elements for t in lay.tensors)
    nbytes = sum(t.nbytes for t in lay.tensors)
    meta = {}
    for key, kv in lay.kv.items():
        if kv.type == GGUFValueType.ARRAY:
            meta[key] = {"type": f"[{kv.sub_type.name}]", "length": kv.length}
        else:
            val = kv.value if not isinstance(kv.value, bytes) else kv.value.hex()
            meta[key] = {"type": kv.type.name, "value": val}
    arch = lay.kv.get(gguf.Keys.General.ARCHITECTURE)
    return {
        "path": str(lay.path),
        "file_size": lay.file_size,
        "version": lay.version,
        "endian": "little" if lay.byte_order == "<" else "big",
        "alignment": lay.alignment,
        "data_offset": lay.data_offset,
        "architecture": arch.value if arch is not None else None,
        "metadata": meta,
        "tensors": tensors,
        "by_type": by_type,
        "totals": {
            "n_tensors": len(lay.tensors),
            "n_elements": n_el,
            "nbytes": nbytes,
            "bits_per_elem": 8.0 * nbytes / n_el if n_el else None,
            "f32_nbytes": 4 * n_el,
            "compression_vs_f32": 4.0 * n_el / nbytes if nbytes else None,
        },
    }
