#!/usr/bin/env python3
"""A GGUF with a real model's architecture and tokenizer but random weights, for speed runs.

    python3 scripts/synth_gguf.py skeleton SRC.gguf OUT.skel
    python3 scripts/synth_gguf.py build OUT.skel|SRC.gguf OUT.gguf [--type q8_0|f16|same] [--seed N]
    python3 scripts/synth_gguf.py dequant SRC.gguf OUT.gguf

skeleton: reads SRC's header (every metadata key/value with its GGUF value type, tokenizer
arrays included, and every tensor's name, shape and type; no tensor data) and writes it as
gzip'ed JSON (a few MB for a 150k-token vocabulary), small enough to carry where the model is not.

build: writes OUT.gguf (atomically) with the same metadata and value types, except
  general.name        gets the suffix " (random weights)" (added as "<arch> (random weights)"
                      when absent),
  general.file_type   becomes MOSTLY_Q8_0 / MOSTLY_F16 for --type q8_0 / f16 (when present),
  kvpolar.synthetic   = true (BOOL) and kvpolar.synthetic.seed = N (UINT64) are added,
and every tensor with the same name and shape (numpy order: the last axis is ggml's ne[0]).
Values: 1-D tensors are 1.0 (norm weights, scales) or normal(0, 0.002) for names ending in
".bias"; larger tensors are normal(0, 0.02), drawn row chunk by row chunk from
numpy.random.default_rng(seed), so the output depends only on the skeleton and the seed.
Types: --type q8_0 (default): F32 for 1-D tensors, Q8_0 (gguf.quants.quantize) when the row
length is a multiple of 32, else F16; --type f16: F32 for 1-D, else F16; --type same: the source
type of each tensor, refused (before anything is written) when gguf-py cannot quantize it
(K-quants and I-quants).

dequant: writes OUT.gguf (atomically) with SRC's metadata and tensors, every tensor dequantized
to F32 (gguf.quants.dequantize: the exact values the quantized model computes with), general.name
with the suffix " (dequantized to f32)" and general.file_type ALL_F32. A model whose matrix
products run in float32 (no 8-bit rounding of the activations, as quantized weights have on the
CPU), for reference and exactness runs (scripts/centering_exactness.py --f32-weights).

Needs numpy, gguf-py (0.19.0; it imports PyYAML) and the kvpolar package in converter/. Outside
the venv: PYTHONPATH=converter:<dir with gguf and yaml> python3 scripts/synth_gguf.py build ...
Exit status: 0 on success, 1 on a bad input or a failed write (message on stderr), 2 on bad options.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from kvpolar.atomic import atomic_path, atomic_write_bytes
from kvpolar.gguf_scan import SCALAR_FMT, scan

log = logging.getLogger("synth_gguf")

SKELETON_FORMAT = "kvpolar-gguf-skeleton"
SKELETON_VERSION = 1
GZIP_MAGIC = b"\x1f\x8b"
GGUF_MAGIC = b"GGUF"
NAME_SUFFIX = " (random weights)"
SYNTHETIC_KEY = "kvpolar.synthetic"
SEED_KEY = "kvpolar.synthetic.seed"
TYPES = ("q8_0", "f16", "same")
FILE_TYPE = {"q8_0": LlamaFileType.MOSTLY_Q8_0, "f16": LlamaFileType.MOSTLY_F16, "f32": LlamaFileType.ALL_F32}
DEQUANT_SUFFIX = " (dequantized to f32)"
WEIGHT_STD = 0.02
BIAS_STD = 0.002
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per generated chunk
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]


# ----------------------------------------------------------------------------------------------
# skeleton: the header as JSON


def _json_value(v: Any) -> Any:
    """A metadata value for JSON: strings that are not UTF-8 (bytes) become {"hex": ...}."""
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def _gguf_value(v: Any) -> Any:
    if isinstance(v, dict):
        try:
            return bytes.fromhex(v["hex"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f'expected a string, a number or {{"hex": "<hex digits>"}}, found {v!r}'
            ) from None
    if isinstance(v, list):
        return [_gguf_value(x) for x in v]
    return v


def skeleton_of(path: Path) -> dict:
    """The header of the GGUF file at path as a JSON-ready dict (see parse_skeleton for its keys)."""
    lay = scan(path)  # GGUFFormatError (ValueError) / FileNotFoundError name the path
    metadata = []
    for key, kv in lay.kv.items():
        entry: dict[str, Any] = {"key": key, "type": kv.type.name, "value": _json_value(kv.value)}
        if kv.type == GGUFValueType.ARRAY:
            if kv.sub_type == GGUFValueType.ARRAY:
                raise ValueError(
                    f"{path}: metadata key {key!r} is an array of arrays, which is not supported"
                )
            entry["sub_type"] = kv.sub_type.name
        metadata.append(entry)
    return {
        "format": SKELETON_FORMAT,
        "version": SKELETON_VERSION,
        "source": {
            "file": path.name,
            "file_size": lay.file_size,
            "gguf_version": lay.version,
            "endian": "little" if lay.byte_order == "<" else "big",
        },
        "metadata": metadata,
        "tensors": [{"name": t.name, "type": t.type.name, "shape": list(t.shape)} for t in lay.tensors],
    }


def save_skeleton(skel: dict, path: Path) -> int:
    """Write skel as gzip'ed JSON (atomically); returns the file size in bytes."""
    raw = json.dumps(skel, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    data = gzip.compress(raw, compresslevel=9, mtime=0)
    atomic_write_bytes(path, data)
    return len(data)


def _check_values(vtype: GGUFValueType, values: list, what: str) -> None:
    """Each of values can be written as vtype (a scalar type, BOOL or STRING)."""
    if vtype == GGUFValueType.STRING:
        ok = all(isinstance(v, (str, bytes)) for v in values)
    elif vtype == GGUFValueType.BOOL:
        ok = all(isinstance(v, bool) for v in values)
    else:
        try:
            struct.pack(f"<{len(values)}{SCALAR_FMT[vtype]}", *values)
            ok = True
        except struct.error:
            ok = False
    if not ok:
        raise ValueError(f"{what}: expected values of type {vtype.name}, found {values[:8]!r}")


def _enum(cls, name: Any, what: str):
    try:
        return cls[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{what} has type {name!r}, expected one of {', '.join(m.name for m in cls)}"
        ) from None


def load_skeleton(path: Path) -> dict:
    """Read a skeleton file written by `skeleton` (gzip'ed JSON) and check it (parse_skeleton)."""
    try:
        with gzip.open(path, "rb") as f:
            skel = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable skeleton (gzip'ed JSON): {e}") from None
    return parse_skeleton(skel, path)


def parse_skeleton(skel: Any, path: Path) -> dict:
    """A skeleton dict (skeleton_of's form) checked, with types as enum members and values as
    GGUF values: {"source": {...}, "metadata": [{"key", "type": GGUFValueType, "sub_type":
    GGUFValueType | None, "value"}], "tensors": [{"name", "type": GGMLQuantizationType, "shape"}]}."""
    if not isinstance(skel, dict) or skel.get("format") != SKELETON_FORMAT:
        found = skel.get("format") if isinstance(skel, dict) else type(skel).__name__
        raise ValueError(f"{path}: expected a skeleton with format {SKELETON_FORMAT!r}, found {found!r}")
    if skel.get("version") != SKELETON_VERSION:
        raise ValueError(
            f"{path}: expected skeleton version {SKELETON_VERSION}, found {skel.get('version')!r}"
        )
    metadata = []
    for i, e in enumerate(skel.get("metadata", [])):
        what = f"{path}: metadata entry {i}"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or "value" not in e:
            raise ValueError(
                f"{what}: expected an object with 'key' (a string), 'type' and 'value', found {e!r}"
            )
        what += f" ({e['key']!r})"
        vtype = _enum(GGUFValueType, e.get("type"), what)
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = _enum(GGUFValueType, e.get("sub_type"), what + " element")
            if sub == GGUFValueType.ARRAY:
                raise ValueError(f"{what}: arrays of arrays are not supported")
            if not isinstance(e["value"], list):
                raise ValueError(f"{what}: an ARRAY needs a list value, found {type(e['value']).__name__}")
        try:
            value = _gguf_value(e["value"])
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        if sub is None:
            _check_values(vtype, [value], what)
        else:
            _check_values(sub, value, what)
        metadata.append({"key": e["key"], "type": vtype, "sub_type": sub, "value": value})
    tensors = []
    for i, t in enumerate(skel.get("tensors", [])):
        what = f"{path}: tensor {i}"
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(t.get("name"), str) or not isinstance(shape, list) or len(shape) > 4:
            raise ValueError(f"{what}: expected a name and a shape of at most 4 dimensions, found {t!r}")
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"{what} ({t['name']!r}): expected positive integer dimensions, found {shape}")
        qtype = _enum(GGMLQuantizationType, t.get("type"), f"{what} ({t['name']!r})")
        tensors.append({"name": t["name"], "type": qtype, "shape": shape})
    if not tensors:
        raise ValueError(f"{path}: expected at least one tensor, found none")
    return {"source": skel.get("source", {}), "metadata": metadata, "tensors": tensors}


def load_source(path: Path) -> dict:
    """A checked skeleton (parse_skeleton) from a GGUF file or a skeleton file, told apart by
    their first bytes."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a GGUF file or a skeleton)")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: expected a GGUF file or a skeleton, found a directory")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return parse_skeleton(skeleton_of(path), path)
    if head[:2] == GZIP_MAGIC:
        return load_skeleton(path)
    raise ValueError(
        f"{path}: expected a GGUF file (magic {GGUF_MAGIC!r}) or a skeleton from `synth_gguf.py skeleton` "
        f"(gzip'ed JSON, magic {GZIP_MAGIC!r}), found first bytes {head!r}"
    )


# ----------------------------------------------------------------------------------------------
# build: metadata, tensor plan, random data


def _can_quantize(qtype: GGMLQuantizationType) -> bool:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def plan_types(tensors: list[dict], mode: str) -> list[GGMLQuantizationType]:
    """The output type of each tensor for --type mode (see the module docstring)."""
    if mode == "f32":  # dequant
        return [GGMLQuantizationType.F32 for _ in tensors]
    if mode not in TYPES:
        raise ValueError(f"unknown --type {mode!r}; expected one of {', '.join(TYPES)}")
    if mode == "same":
        bad: dict[str, list[str]] = {}
        ok = {t: _can_quantize(t) for t in {t["type"] for t in tensors}}
        for t in tensors:
            if not ok[t["type"]]:
                bad.setdefault(t["type"].name, []).append(t["name"])
        if bad:
            what = "; ".join(f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in sorted(bad.items()))
            raise ValueError(
                f"--type same: gguf-py {gguf_version()} cannot quantize {what}; use --type q8_0 or --type f16"
            )
        return [t["type"] for t in tensors]
    out = []
    for t in tensors:
        shape = t["shape"]
        if len(shape) <= 1:
            out.append(GGMLQuantizationType.F32)
        elif mode == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
            out.append(GGMLQuantizationType.Q8_0)
        else:
            out.append(GGMLQuantizationType.F16)
    return out


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"


def out_metadata(meta: list[dict], mode: str, seed: int) -> list[dict]:
    """The source metadata with the changes listed in the module docstring."""
    out = [dict(e) for e in meta]
    by_key = {e["key"]: e for e in out}
    arch = by_key.get(Keys.General.ARCHITECTURE)
    if arch is None or arch["type"] != GGUFValueType.STRING:
        raise ValueError(f"expected a STRING {Keys.General.ARCHITECTURE} in the metadata, found {arch}")
    suffix = DEQUANT_SUFFIX if mode == "f32" else NAME_SUFFIX
    name = by_key.get(Keys.General.NAME)
    if name is None:
        value = f"{arch['value']}{suffix}"
        out.append({"key": Keys.General.NAME, "type": GGUFValueType.STRING, "sub_type": None, "value": value})
    elif not str(name["value"]).endswith(suffix):
        name["value"] = f"{name['value']}{suffix}"
    ftype = by_key.get(Keys.General.FILE_TYPE)
    if ftype is not None and mode in FILE_TYPE:
        ftype["value"] = int(FILE_TYPE[mode])
    marks = (
        ()
        if mode == "f32"
        else ((SYNTHETIC_KEY, GGUFValueType.BOOL, True), (SEED_KEY, GGUFValueType.UINT64, seed))
    )
    for key, vtype, value in marks:
        if key in by_key:
            by_key[key].update(type=vtype, sub_type=None, value=value)
        else:
            out.append({"key": key, "type": vtype, "sub_type": None, "value": value})
    for e in out:
        if e["type"] == GGUFValueType.ARRAY and not e["value"]:
            raise ValueError(f"metadata key {e['key']!r} is an empty array, which gguf-py cannot write")
    return out


def tensor_chunks(name: str, shape: list[int], rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The values of one tensor as float32 arrays of whole rows, (rows, shape[-1]), in order."""
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        if name.endswith(".bias"):
            x = rng.standard_normal(n, dtype=np.float32)
            x *= BIAS_STD
            yield x
        else:
            yield np.ones(n, np.float32)
        return
    ne0 = shape[-1]
    n_rows = math.prod(shape[:-1])
    step = max(1, CHUNK_ELEMENTS // ne0)
    for r0 in range(0, n_rows, step):
        x = rng.standard_normal((min(step, n_rows - r0), ne0), dtype=np.float32)
        x *= WEIGHT_STD
        yield x


def encode(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """x (rows, ne0) float32 as the bytes of qtype, C order (gguf.quants.quantize)."""
    return np.ascontiguousarray(gguf.quants.quantize(x, qtype))


def tensor_nbytes(shape: list[int], qtype: GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    ne0 = shape[-1] if shape else 1
    if ne0 % block:
        raise ValueError(f"row length {ne0} is not a multiple of the {qtype.name} block size {block}")
    return math.prod(shape) // block * size


def dequant_chunks(path: Path) -> Iterator[tuple[str, Iterator[np.ndarray]]]:
    """(name, float32 chunks) of every tensor of the GGUF file at path, dequantized, in file order."""
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        try:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{path}: gguf-py {gguf_version()} cannot dequantize {t.name} ({t.tensor_type.name})"
            ) from None
        ne0 = int(t.shape[0]) if len(t.shape) else 1
        yield t.name, iter((np.asarray(x, np.float32).reshape(-1, ne0),))


def build(src: dict, out: Path, mode: str = "q8_0", seed: int = 0, weights: Path | None = None) -> dict:
    """Write the synthetic GGUF for skeleton src (from load_source) to out, atomically; with
    weights (a GGUF file, mode "f32": `dequant`) its tensors dequantized instead of random ones.

    Returns {"n_tensors", "n_params", "file_size", "seconds", "types": {type name: count}}."""
    t0 = time.perf_counter()
    if not 0 <= seed < 2**64:
        raise ValueError(f"expected a seed in [0, 2^64), found {seed}")
    meta = out_metadata(src["metadata"], mode, seed)
    arch = next(e["value"] for e in meta if e["key"] == Keys.General.ARCHITECTURE)
    plan = []  # (name, shape, output type, bytes)
    for t, qtype in zip(src["tensors"], plan_types(src["tensors"], mode), strict=True):
        try:
            plan.append((t["name"], t["shape"], qtype, tensor_nbytes(t["shape"], qtype)))
        except ValueError as e:
            raise ValueError(f"tensor {t['name']!r} (shape {t['shape']}) as {qtype.name}: {e}") from None
    total = sum(p[3] for p in plan)
    rng = np.random.default_rng(seed)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)  # adds general.architecture as its first key
        for e in meta:
            if e["key"] == Keys.General.ARCHITECTURE:
                continue
            if e["key"] == Keys.General.ALIGNMENT:  # also sets the writer's data alignment
                w.add_custom_alignment(e["value"])
                continue
            w.add_key_value(e["key"], e["value"], e["type"], e["sub_type"])
        for name, shape, qtype, nbytes in plan:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        alignment = w.data_alignment
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        # The data, tensor by tensor in chunks of rows (GGUFWriter.write_tensor_data takes a
        # whole tensor): each tensor starts at a multiple of the alignment, as the offsets say.
        done, tenths = 0, 0
        with open(tmp, "r+b") as f:
            f.seek(0, 2)
            real = dequant_chunks(weights) if weights is not None else None
            for name, shape, qtype, nbytes in plan:
                f.write(b"\0" * (-f.tell() % alignment))
                if real is None:
                    chunks = tensor_chunks(name, shape, rng)
                else:
                    src_name, chunks = next(real)
                    if src_name != name:
                        raise ValueError(f"{weights}: tensor {src_name!r} where the header lists {name!r}")
                written = sum(f.write(encode(x, qtype).data) for x in chunks)
                if written != nbytes:
                    raise RuntimeError(f"{name}: wrote {written} bytes, expected {nbytes}")
                log.debug("%s %s %s: %d bytes", name, shape, qtype.name, nbytes)
                done += nbytes
                if 10 * done // total > tenths:
                    tenths = 10 * done // total
                    secs = time.perf_counter() - t0
                    log.info("%3d%% of %.1f MiB of tensor data, %.1f s", 10 * tenths, total / 2**20, secs)
            f.write(b"\0" * (-f.tell() % alignment))
        _check_written(tmp, out, plan)
        file_size = tmp.stat().st_size
    counts: dict[str, int] = {}
    for p in plan:
        counts[p[2].name] = counts.get(p[2].name, 0) + 1
    return {
        "n_tensors": len(plan),
        "n_params": sum(math.prod(p[1]) for p in plan),
        "file_size": file_size,
        "seconds": time.perf_counter() - t0,
        "types": counts,
    }


def dequant(src: Path, out: Path) -> dict:
    """`dequant`: src's tensors dequantized to F32 into out, same metadata (build's statistics)."""
    return build(load_source(src), out, "f32", weights=src)


def _check_written(tmp: Path, out: Path, plan: list[tuple]) -> None:
    """The written header lists exactly the planned tensors, each inside the file (gguf_scan)."""
    got = [(t.name, list(t.shape), t.type, t.nbytes) for t in scan(tmp).tensors]
    want = [(name, list(shape), qtype, nbytes) for name, shape, qtype, nbytes in plan]
    if got != want:
        i = next(
            (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), min(len(got), len(want))
        )
        found, expected = got[i] if i < len(got) else None, want[i] if i < len(want) else None
        raise RuntimeError(f"{out}: tensor info {i} as written is {found}, expected {expected}")


# ----------------------------------------------------------------------------------------------
# CLI


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, found {text!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^64), found {v}")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="synth_gguf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--verbose", "-v", action="store_true", help="log every tensor")
    sub = ap.add_subparsers(dest="cmd", metavar="{skeleton,build,dequant}")
    sk = sub.add_parser("skeleton", help="write the header of a GGUF file as a small gzip'ed JSON file")
    sk.add_argument("src", type=Path, help="the GGUF file")
    sk.add_argument("out", type=Path, help="the skeleton to write (e.g. model.skel)")
    b = sub.add_parser("build", help="write a GGUF with random weights from a skeleton or a GGUF file")
    b.add_argument("src", type=Path, help="a skeleton from `skeleton`, or a GGUF file")
    b.add_argument("out", type=Path, help="the GGUF file to write")
    b.add_argument("--type", choices=TYPES, default="q8_0", help="weight types (default q8_0)")
    b.add_argument("--seed", type=_seed, default=0, help="seed of numpy.random.default_rng (default 0)")
    d = sub.add_parser("dequant", help="write a GGUF file's tensors dequantized to F32 (same metadata)")
    d.add_argument("src", type=Path, help="the GGUF file")
    d.add_argument("out", type=Path, help="the GGUF file to write")
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if args.cmd == "skeleton":
            t0 = time.perf_counter()
            skel = skeleton_of(args.src)
            size = save_skeleton(skel, args.out)
            print(
                f"wrote {args.out}: {size / 2**20:.2f} MiB, {len(skel['metadata'])} metadata keys, "
                f"{len(skel['tensors'])} tensors, {time.perf_counter() - t0:.1f} s"
            )
        else:
            if args.cmd == "dequant":
                stats = dequant(args.src, args.out)
            else:
                stats = build(load_source(args.src), args.out, args.type, args.seed)
            types = ", ".join(f"{n} {k}" for k, n in sorted(stats["types"].items()))
            print(
                f"wrote {args.out}: {stats['file_size'] / 2**20:.1f} MiB, "
                f"{stats['n_tensors']} tensors ({types}), "
                f"{stats['n_params'] / 1e6:.1f} M parameters, {stats['seconds']:.1f} s "
                f"({stats['n_params'] / 1e6 / stats['seconds']:.1f} M parameters/s)"
            )
    except (ValueError, OSError) as e:
        print(f"synth_gguf.py {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
