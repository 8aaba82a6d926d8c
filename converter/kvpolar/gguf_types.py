"""The polar block types registered in gguf-py (0.19.0), in place, without a fork.

Importing this module extends gguf-py (`register`, idempotent):

- `gguf.GGMLQuantizationType` gains POLAR = 43 and POLAR3 = 44: `GGMLQuantizationType(43)`,
  `GGMLQuantizationType["POLAR"]`, `.POLAR`, iteration and pickling work as for built-in members;
- `gguf.GGML_QUANT_SIZES[POLAR] = (64, 34)`, `[POLAR3] = (64, 26)`;
- `gguf.quants.quantize` / `dequantize` dispatch the two types to `kvpolar.codec`'s block
  functions through classes POLAR and POLAR3 built on gguf-py's own `__Quant` base, exactly as
  `class Q4_0(__Quant, qtype=...)` is.

So in this process `gguf.GGUFWriter`, `gguf.GGUFReader` and `gguf/scripts/gguf_dump.py` handle
polar tensors. A process that has not imported `kvpolar.gguf_types` does not know ids 43/44
(gguf-py's reader raises "43 is not a valid GGMLQuantizationType").
"""

from __future__ import annotations

import threading
import types

import gguf
import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import codec
from .format import FORMATS, PolarFormat, get_format

__all__ = [
    "POLAR_TYPES",
    "QUANT_CLASSES",
    "ggml_type",
    "gguf_version",
    "known_type_ids",
    "polar_format_of",
    "register",
]

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
            f"gguf {gguf_version()} already defines {cls.__name__} value {value} as {other.name}; "
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


def gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # only used in messages
        return "(unknown version)"


def _quant_base() -> type:
    """gguf-py's base class of its block types (`class Q4_0(__Quant, qtype=...)`)."""
    base = vars(gguf.quants).get("__Quant")
    if base is None:
        raise RuntimeError(f"gguf {gguf_version()}: gguf.quants has no __Quant base; kvpolar needs 0.19.0")
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


def known_type_ids() -> str:
    """The ggml type ids gguf-py knows, as runs: "0..3, 6..41, 43..44"."""
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
