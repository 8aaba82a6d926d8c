"""GGUF files holding polar tensors: read, write, encode.

Reading is bounded: `kvpolar.gguf_scan.scan` checks the header, every count and every offset
against the file size first; the tensor data are then taken from the offsets it found. Errors
are `GGUFFormatError` (a ValueError) naming the path, what was expected and what was found.
Writing goes through gguf-py's GGUFWriter (with the polar types registered by
`kvpolar.gguf_types`) into a temporary file renamed over the target at the end
(`kvpolar.atomic`); on any error the target is untouched.

Shapes are numpy order throughout (the last axis is ggml's ne[0], the one split into blocks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValue, GGUFValueType

from . import codec
from .atomic import atomic_path
from .format import PolarFormat, get_format
from .gguf_scan import GGML_MAX_DIMS, GGUFFormatError, KVInfo, TensorInfo, scan
from .gguf_types import ggml_type, polar_format_of

log = logging.getLogger("kvpolar.gguf_io")

__all__ = ["GGUFFile", "RawTensor", "encode_tensor", "read_gguf", "read_tensors", "write_tensors"]

GGML_MAX_NAME = 64  # ggml.h, including the terminating NUL


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


def _metadata_value(path: Path, key: str, kv: KVInfo) -> GGUFValue:
    """A scanned record -> the GGUFValue that GGUFWriter writes back byte for byte."""
    if kv.sub_type == GGUFValueType.ARRAY:
        raise ValueError(f"{path}: metadata {key!r} is a nested array, which kvpolar cannot copy")
    return GGUFValue(kv.value, kv.type, kv.sub_type)


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
    path: os.PathLike | str,
    decode: bool = True,
    metadata: bool = True,
    *,
    copy: bool = True,
    progress: bool = False,
) -> GGUFFile:
    """Read a GGUF file, bounds-checked by `kvpolar.gguf_scan.scan` before any data is read.

    decode=True: polar and other block types are dequantized to float32 (..., k*64), F32/F16/BF16
    to float32, F64 and integer tensors kept as they are. decode=False: RawTensor per tensor.
    copy=False (decode=False only): RawTensor data are read-only views of the file mapping
    instead of copies in memory, for copying a large model; the file must not change while
    they live. Polar blocks with a non-finite scale raise GGUFFormatError either way.
    metadata=False skips the metadata (arch is read either way). progress: a tqdm bar over the
    tensors (shown on a terminal only).
    """
    if decode and not copy:
        raise ValueError("copy=False applies to decode=False (decoded tensors are new arrays)")
    path = Path(path)
    layout = scan(path)
    arch_kv = layout.kv.get(gguf.Keys.General.ARCHITECTURE)
    if arch_kv is not None and arch_kv.type != GGUFValueType.STRING:
        arch_kv = None  # not a name: left in the metadata
    arch = arch_kv.value if arch_kv is not None else None
    meta: dict[str, GGUFValue] = {}
    if metadata:
        meta = {k: _metadata_value(path, k, kv) for k, kv in layout.kv.items() if kv is not arch_kv}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if mm.size != layout.file_size:
        raise GGUFFormatError(
            f"{path}: the file changed while being read: {layout.file_size} bytes, then {mm.size}"
        )
    infos = layout.tensors
    if progress:
        from tqdm import tqdm

        desc = "decoding" if decode else "reading"
        infos = tqdm(infos, desc=desc, unit="tensor", disable=None, leave=False)
    tensors: dict[str, Any] = {}
    for info in infos:
        data = _tensor_data(mm, info, layout.byte_order)
        if copy:
            data = np.array(data)
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
    del mm  # with copy=True the mapping closes here; views (copy=False) keep it open
    return GGUFFile(path, arch, meta, tensors, layout.version, layout.alignment)


def _tensor_data(mm: np.ndarray, info: TensorInfo, byte_order: str) -> np.ndarray:
    """A tensor's bytes in the file as RawTensor.data's dtype and shape (a view, or a native
    byte-order copy for a big-endian file)."""
    raw = mm[info.offset : info.offset + info.nbytes].view(np.ndarray)
    native = _NATIVE.get(info.type)
    if native is None:  # block types: uint8 (..., n_blocks * type_size)
        return raw.reshape(gguf.quant_shape_to_byte_shape(info.shape, info.type))
    data = raw.view(native.newbyteorder(byte_order)).reshape(info.shape)
    return data if data.dtype.isnative else data.astype(native)


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
