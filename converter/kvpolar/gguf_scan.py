"""Bounded reading of a GGUF file's header: every count, length and offset checked.

`scan` walks the header, the metadata and the tensor infos itself, checking each count, length
and offset against the file size and the layout rules of llama.cpp's gguf.cpp, before any
tensor data is touched; gguf-py's reader does not bound counts (a corrupt array length can make
it loop for ever). Errors are `GGUFFormatError` (a ValueError) naming the path, what was
expected and what was found.

Shapes are numpy order throughout (the last axis is ggml's ne[0], the one split into blocks).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .gguf_types import gguf_version, known_type_ids

__all__ = ["GGML_MAX_DIMS", "GGUFFormatError", "KVInfo", "Layout", "TensorInfo", "scan", "summary"]

GGML_MAX_DIMS = 4  # ggml.h
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf-py's reader accepts; v2 and v3 share the layout below
GGUF_HEADER_BYTES = 24  # magic u32, version u32, n_tensors u64, n_kv u64
_INT64_MAX = (1 << 63) - 1


class GGUFFormatError(ValueError):
    """A GGUF file is truncated, corrupt or uses something kvpolar cannot read."""


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
    """One metadata key/value record with its value."""

    type: GGUFValueType
    value: Any  # scalar / str (bytes if not UTF-8) / list of element values for arrays
    sub_type: GGUFValueType | None = None  # arrays: element type
    length: int | None = None  # arrays: element count
    offset: int = 0  # absolute file offset of the record


@dataclasses.dataclass(frozen=True)
class Layout:
    """What `scan` found: the header, every metadata record and every tensor info."""

    path: Path
    file_size: int
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    data_offset: int
    kv: dict[str, KVInfo]
    tensors: list[TensorInfo]


# struct format of each scalar GGUF value type (little-endian files use '<' before it)
SCALAR_FMT = {
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

    def value(self, t: GGUFValueType, what: str, depth: int = 0):
        """Read one value of type t: a scalar, a str (bytes if not UTF-8) or, for an array,
        (element type, list of element values)."""
        if t in SCALAR_FMT:
            return self.unpack(SCALAR_FMT[t], what)
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
        if sub in SCALAR_FMT:
            min_item = struct.calcsize(SCALAR_FMT[sub])
        else:  # string: its length; array: element type and length
            min_item = 8 if sub == GGUFValueType.STRING else 12
        if n * min_item > self.size - self.pos:
            raise GGUFFormatError(
                f"{self.path}: truncated or corrupt GGUF file: {what} at offset {self.pos} declares {n} "
                f"elements of {sub.name} (at least {n * min_item} bytes), found {self.size - self.pos} bytes "
                f"left in the file"
            )
        if sub in SCALAR_FMT:
            values = list(struct.unpack_from(f"{self.order}{n}{SCALAR_FMT[sub]}", self.buf, self.pos))
            self.pos += n * min_item
        else:
            values = [self.value(sub, f"{what}[{i}]", depth + 1) for i in range(n)]
            if sub == GGUFValueType.ARRAY:
                values = [v for _, v in values]
        return sub, values


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
        val = c.value(t, f"value of {key!r}")
        if t == GGUFValueType.ARRAY:
            sub, values = val
            kv[key] = KVInfo(t, values, sub_type=sub, length=len(values), offset=start)
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
                f"(gguf {gguf_version()} with kvpolar's polar types knows ids {known_type_ids()})"
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
