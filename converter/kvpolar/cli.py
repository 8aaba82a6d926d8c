"""kvpolar command line.

    kvpolar inspect FILE.gguf [--json]
    kvpolar encode IN OUT.gguf [--type polar|polar3] [--strict] [--sanitize] [--name NAME] [--json]
    kvpolar decode IN.gguf OUT [--tensor NAME] [--json]
    kvpolar dump FILE.gguf [gguf-dump options]   gguf-py's gguf-dump with the polar types registered
    kvpolar recommend MODEL.gguf [--text FILE] [--ctx N] [--chunks N] [--types T|K/V ...] [--max-kld X]
                      [--json] [--bin DIR]     KV-cache types measured with llama-perplexity (KLD vs f16)

IN and OUT arrays: .npy (one tensor), .npz or .safetensors (several; needs the safetensors
package). `encode` stores every float tensor whose last dimension is a multiple of 64 as
polar/polar3 and the others as F32 (ints as they are), or refuses them with --strict. `decode`
writes float32.

Exit status: 0 on success; 2 on a usage or input error, reported as one line on stderr
(--verbose adds the traceback); 1 on an internal error, or when a llama-perplexity run of
`recommend` failed (its last lines are shown).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .format import FORMATS, QK

log = logging.getLogger("kvpolar")

ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors")
EXIT_USAGE = 2
EXIT_INTERNAL = 1


class CLIError(Exception):
    """A usage or input error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Array files


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError:
        raise CLIError(
            "reading or writing .safetensors needs the safetensors package: pip install safetensors "
            "(or pip install -e '.[test]')"
        ) from None
    return stn


def _suffix(path: Path, allowed: tuple[str, ...], role: str) -> str:
    suf = path.suffix.lower()
    if suf not in allowed:
        raise CLIError(f"expected {role} to end in {', '.join(allowed)}, got {str(path)!r}")
    return suf


def _input_file(path: Path, role: str) -> None:
    if not path.exists():
        raise CLIError(f"{role} {str(path)!r} does not exist")
    if not path.is_file():
        raise CLIError(f"expected {role} {str(path)!r} to be a file, found a directory or special file")


def load_arrays(path: Path, name: str | None = None) -> dict[str, np.ndarray]:
    """{name: array} from .npy (named `name`, default the file stem), .npz or .safetensors."""
    suf = _suffix(path, ARRAY_SUFFIXES, "the input")
    _input_file(path, "input")
    if suf == ".safetensors":
        stn = _safetensors_numpy()
        try:
            return dict(stn.load_file(str(path)))
        except Exception as e:  # safetensors raises its own SafetensorError / TypeError
            raise CLIError(f"{path}: could not read the safetensors file: {type(e).__name__}: {e}") from e
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CLIError(f"{path}: could not read the {suf} file: {e}") from e
    if suf == ".npy":
        return {name or path.stem: loaded}
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write {name: array} atomically as .npy (exactly one array), .npz or .safetensors."""
    suf = _suffix(path, ARRAY_SUFFIXES, "the output")
    if suf == ".npy" and len(arrays) != 1:
        raise CLIError(f"a .npy file holds one tensor, got {len(arrays)}")
    stn = _safetensors_numpy() if suf == ".safetensors" else None
    with atomic_path(path) as tmp:
        if stn is not None:
            stn.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        else:
            with open(tmp, "wb") as f:
                if suf == ".npy":
                    np.save(f, next(iter(arrays.values())), allow_pickle=False)
                else:
                    np.savez(f, **arrays)


# ----------------------------------------------------------------------------------------------
# Subcommands


def _fmt_shape(shape) -> str:
    return " x ".join(str(s) for s in shape) if len(shape) else "scalar"


def _fmt_bits(b: float | None) -> str:
    return "-" if b is None else f"{b:.4g}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .gguf_scan import summary

    path = Path(args.file)
    _input_file(path, "GGUF file")
    s = summary(path)
    if args.json:
        json.dump(s, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(
        f"{s['path']}: GGUF v{s['version']} ({s['endian']} endian), {s['file_size']} bytes, "
        f"architecture {s['architecture']!r}, alignment {s['alignment']}, {len(s['metadata'])} metadata keys"
    )
    for key, m in s["metadata"].items():
        if "length" in m:
            print(f"  {key} = {m['type']} x {m['length']}")
        else:
            v = m["value"]
            v = repr(v[:60] + "...") if isinstance(v, str) and len(v) > 60 else repr(v)
            print(f"  {key} = {v} ({m['type']})")
    rows = [("name", "type", "shape", "bytes", "bits/elem")]
    rows += [
        (t["name"], t["type"], _fmt_shape(t["shape"]), str(t["nbytes"]), _fmt_bits(t["bits_per_elem"]))
        for t in s["tensors"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        cells = [c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  " + "  ".join(cells))
    t = s["totals"]
    ratio = f", {t['compression_vs_f32']:.2f}x smaller" if t["compression_vs_f32"] else ""
    print(
        f"total: {t['n_tensors']} tensors, {t['n_elements']} elements, {t['nbytes']} bytes, "
        f"{_fmt_bits(t['bits_per_elem'])} bits/elem (f32: {t['f32_nbytes']} bytes{ratio})"
    )
    return 0


def _plan_tensor(name: str, x: np.ndarray, strict: bool, fmt: str) -> str:
    """'encode', 'f32' or 'keep' (integer types GGUF stores as they are); CLIError otherwise."""
    is_float = np.issubdtype(x.dtype, np.floating)
    if is_float and x.ndim >= 1 and x.shape[-1] % QK == 0:
        return "encode"
    why = (
        f"tensor {name!r} (dtype {x.dtype}, shape {x.shape}) cannot be encoded as {fmt}: expected a float "
        f"array whose last dimension is a multiple of {QK}"
    )
    if strict:
        raise CLIError(why + " (--strict)")
    if is_float:
        log.warning("%s; stored as F32", why)
        return "f32"
    if x.dtype.newbyteorder("=") in (np.int8, np.int16, np.int32, np.int64):
        log.warning("%s; stored as %s", why, x.dtype)
        return "keep"
    raise CLIError(why + f"; nor can dtype {x.dtype} be stored as is (expected float or int8..int64)")


def cmd_encode(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .gguf_io import encode_tensor, write_tensors
    from .gguf_scan import summary

    src, out = Path(args.input), Path(args.output)
    _suffix(src, ARRAY_SUFFIXES, "the input")
    _suffix(out, (".gguf",), "the output")
    if args.name is not None and src.suffix.lower() != ".npy":
        raise CLIError(f"--name applies to a .npy input, got {str(src)!r}")
    arrays = load_arrays(src, args.name)
    if not arrays:
        raise CLIError(f"{src}: expected at least one tensor, found none")
    plans = {name: _plan_tensor(name, x, args.strict, args.type) for name, x in arrays.items()}
    nonfinite = "sanitize" if args.sanitize else "error"
    tensors: dict[str, Any] = {}
    for name, x in tqdm(
        arrays.items(), desc=f"encoding {args.type}", unit="tensor", disable=None, leave=False
    ):
        if plans[name] == "encode":
            tensors[name] = encode_tensor(name, x, args.type, nonfinite=nonfinite)
        elif plans[name] == "f32":
            tensors[name] = np.asarray(x, dtype=np.float32)
        else:
            tensors[name] = x
    write_tensors(out, tensors, None)
    s = summary(out)
    s["input"] = str(src)
    if args.json:
        json.dump(s, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    t = s["totals"]
    kinds = ", ".join(f"{v['n_tensors']} {k}" for k, v in s["by_type"].items())
    print(
        f"wrote {out}: {t['n_tensors']} tensors ({kinds}), {t['nbytes']} bytes of tensor data, "
        f"{_fmt_bits(t['bits_per_elem'])} bits/elem (f32: {t['f32_nbytes']} bytes)"
    )
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from .gguf_io import read_tensors
    from .gguf_scan import scan

    src, out = Path(args.input), Path(args.output)
    suf = _suffix(out, ARRAY_SUFFIXES, "the output")
    _input_file(src, "GGUF file")
    names = [t.name for t in scan(src).tensors]
    if args.tensor is not None:
        if args.tensor not in names:
            raise CLIError(f"{src}: no tensor {args.tensor!r}; expected one of {names}")
    elif suf == ".npy" and len(names) != 1:
        raise CLIError(
            f"{src} holds {len(names)} tensors ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); "
            f"a .npy file holds one: pass --tensor NAME, or write .npz/.safetensors"
        )
    tensors = read_tensors(src, decode=True, progress=True)
    if args.tensor is not None:
        tensors = {args.tensor: tensors[args.tensor]}
    save_arrays(out, tensors)
    info = {
        "input": str(src),
        "output": str(out),
        "tensors": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()],
    }
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(
            f"wrote {out}: " + ", ".join(f"{k} {v.dtype} {_fmt_shape(v.shape)}" for k, v in tensors.items())
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibrate, paths

    src, out = Path(args.model), Path(args.output)
    _input_file(src, "GGUF model")
    if out.exists() and out.resolve() == src.resolve():
        raise CLIError(f"output must be a new path, got the input {src}")
    text_path = Path(args.text) if args.text else paths.data_file(paths.SQUAD_TXT)
    _input_file(text_path, "calibration text")
    res = calibrate.calibrate(
        src,
        out,
        text_path.read_text(encoding="utf-8"),
        n_tokens=args.tokens,
        ctx=args.ctx,
        progress=sys.stderr.isatty(),
    )
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(
            f"wrote {out}: centering offsets for {res['layers']} layers from {args.tokens} tokens "
            f"of {text_path}"
        )
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from . import recommend as rec

    try:
        rep = rec.recommend(
            Path(args.model),
            Path(args.text) if args.text else None,
            ctx=args.ctx,
            chunks=args.chunks,
            types=args.types,
            max_kld=args.max_kld,
            threads=args.threads,
            bin_dir=Path(args.bin) if args.bin else None,
            kv_ctx=args.kv_ctx,
            timeout=args.timeout,
        )
    except rec.LlamaRunError as e:
        if e.tail:
            print("\n".join("    " + ln for ln in e.tail.splitlines()), file=sys.stderr)
        where = f" (above: its last lines; full log: {e.log})" if e.log else ""
        print(f"kvpolar recommend: error: {e}{where}", file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(rec.format_report(rep))
    return EXIT_INTERNAL if any("error" in r for r in rep["rows"]) else 0


def run_dump(rest: list[str]) -> int:
    """gguf-py's gguf_dump.main on `rest`, in this process where the polar types are registered."""
    from gguf.scripts import gguf_dump

    from .gguf_scan import scan

    files = [a for a in rest if not a.startswith("-")]
    if len(files) == 1:  # check the file first: gguf-py's errors on corrupt files are obscure
        path = Path(files[0])
        _input_file(path, "GGUF file")
        scan(path)
    argv = sys.argv
    sys.argv = ["kvpolar dump", *rest]
    try:
        gguf_dump.main()
    finally:
        sys.argv = argv
    return 0


PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {"dump": run_dump}


# ----------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvpolar", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--verbose", "-v", action="store_true", help="debug logging and tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    types_ = sorted(FORMATS)

    p = sub.add_parser("inspect", parents=[common], help="tensors, types, shapes, bytes, bits/elem of a GGUF")
    p.add_argument("file", metavar="FILE.gguf")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("encode", parents=[common], help="arrays (.npy/.npz/.safetensors) -> polar GGUF")
    p.add_argument("input", metavar="IN", help="a .npy, .npz or .safetensors file")
    p.add_argument("output", metavar="OUT.gguf")
    p.add_argument("--type", "-t", choices=types_, default="polar", help="polar block type (default polar)")
    p.add_argument(
        "--strict", action="store_true", help="refuse tensors that cannot be encoded (default: F32)"
    )
    p.add_argument(
        "--sanitize", action="store_true", help="encode NaN as 0, clamp Inf (default: refuse them)"
    )
    p.add_argument("--name", help="tensor name for a .npy input (default: the file stem)")
    p.add_argument("--json", action="store_true", help="machine-readable summary of the written file")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common], help="GGUF -> float32 arrays (.npy/.npz/.safetensors)")
    p.add_argument("input", metavar="IN.gguf")
    p.add_argument("output", metavar="OUT", help="a .npy (one tensor), .npz or .safetensors file")
    p.add_argument("--tensor", metavar="NAME", help="decode only this tensor (needed for .npy when several)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_decode)

    sub.add_parser(
        "dump", add_help=False, help="gguf-py's gguf-dump, polar types known (see kvpolar dump --help)"
    )

    p = sub.add_parser(
        "calibrate",
        parents=[common],
        help="measure K/V centering offsets on text and write them into a model copy",
    )
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("output", metavar="OUT.gguf", help="the new model file (written atomically)")
    p.add_argument("--text", help="calibration text file (default: the SQuAD text of the cache)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per forward pass (default 1024)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_calibrate)

    from . import recommend as rec

    p = sub.add_parser(
        "recommend",
        parents=[common],
        help="measure KV-cache types on a model (llama-perplexity KLD vs f16), pick the smallest in budget",
        description=rec.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--text", help="evaluation text file (default: the SQuAD text of the cache)")
    p.add_argument(
        "--ctx", type=int, default=rec.DEFAULT_CTX, help=f"tokens per chunk (default {rec.DEFAULT_CTX})"
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=rec.DEFAULT_CHUNKS,
        help=f"chunks of text (default {rec.DEFAULT_CHUNKS})",
    )
    p.add_argument(
        "--types",
        nargs="+",
        metavar="T|K/V",
        help="candidate settings: T for K and V, K/V for each (q8_0/f16: K only); "
        f"default: {' '.join(rec.DEFAULT_TYPES)} (those the binary accepts)",
    )
    p.add_argument(
        "--max-kld",
        type=float,
        default=rec.DEFAULT_MAX_KLD,
        help=f"mean KLD budget in nats/token (default {rec.DEFAULT_MAX_KLD}: admits 4-bit caches, not 3-bit, "
        "on SmolLM2-135M; docs/recommend.md)",
    )
    p.add_argument("--kv-ctx", type=int, help="context for the KV MiB column (default: --ctx)")
    p.add_argument("--threads", "-t", type=int, help="llama.cpp threads (default: all cores)")
    p.add_argument(
        "--bin", metavar="DIR", help="directory of llama-perplexity (default: the patched build's bin)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=rec.RUN_TIMEOUT_S,
        help=f"seconds per run (default {rec.RUN_TIMEOUT_S})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_recommend)
    return ap


def _one_line(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if not argv:
        ap.print_help()
        return 0
    cmd_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    rest: list[str] | None = None
    if cmd_at is not None and argv[cmd_at] in PASSTHROUGH:
        argv, rest = argv[: cmd_at + 1], argv[cmd_at + 1 :]
    args = ap.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:
        ap.print_help()
        return 0
    try:
        if rest is not None:
            return PASSTHROUGH[args.command](rest)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout closed early (kvpolar inspect ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print(f"kvpolar {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, ImportError) as e:
        if verbose:
            traceback.print_exc()
        print(f"kvpolar {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if verbose:
            traceback.print_exc()
        print(
            f"kvpolar {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
            f"(rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
