"""kvpolar recommend: the smallest KV-cache setting a model can afford, measured with llama.cpp.

The patched `llama-perplexity` runs once with an f16 K/V cache and saves its logits
(`--kl-divergence-base FILE`), then once per candidate setting (`-ctk K -ctv V --kl-divergence`,
flash attention on). From llama.cpp's KL-divergence summary it reads, per setting, the mean KLD
against the f16 run, how often the top token stays the same, and the perplexity ratio. The
recommendation is the setting with the fewest bits per element whose mean KLD is within the
budget (ties: the lower KLD).

Bits per element are ggml's, type size / block size (gguf-py's GGML_QUANT_SIZES; polar and
polar3 from kvpolar.format), K and V averaged over their head sizes. KV MiB come from the model's
GGUF header: ctx x sum over layers of n_head_kv x (head_k x bits_k + head_v x bits_v) / 8 bytes,
checked against the size llama.cpp prints for the same cache.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import paths
from .format import FORMATS
from .gguf_scan import scan

__all__ = [
    "DEFAULT_CHUNKS",
    "DEFAULT_CTX",
    "DEFAULT_MAX_KLD",
    "DEFAULT_TYPES",
    "KVShape",
    "LlamaRunError",
    "Setting",
    "bits_per_elem",
    "choose",
    "format_report",
    "kv_shape",
    "parse_kld",
    "parse_setting",
    "recommend",
]

PERPLEXITY = "llama-perplexity"
DEFAULT_CTX = 512
DEFAULT_CHUNKS = 4
# A setting is "T" (K and V both T) or "K/V"; polar/polar3 is the mixed setting.
DEFAULT_TYPES = ("q8_0", "q4_0", "iq4_nl", "polar", "polar3", "polar/polar3")
# Mean KLD budget (nats per token). docs/results.md measured on SmolLM2-135M: the 4-bit caches
# (q4_0, iq4_nl, polar) at 0.026-0.041, q8_0 at 0.005, the 3-bit polar3 at 0.11-0.17. 0.05
# admits the 4-bit class and keeps out the 3-bit one where its loss shows on a small model.
DEFAULT_MAX_KLD = 0.05
HELP_TIMEOUT_S = 60
RUN_TIMEOUT_S = 1800
TAIL_LINES = 15
MIB = 1024 * 1024


class LlamaRunError(RuntimeError):
    """llama-perplexity failed: `tail` holds its last output lines, `log` the full log's path."""

    def __init__(self, msg: str, tail: str = "", log: Path | None = None):
        super().__init__(msg)
        self.tail, self.log = tail, log


# ----------------------------------------------------------------------------------------------
# Types, settings, the model's KV shape


def bits_per_elem(t: str) -> float:
    """ggml bits per element of a cache type: f16 16, q8_0 8.5, q4_0 4.5, polar 4.25, polar3 3.25."""
    if t in FORMATS:
        return FORMATS[t].bits_per_elem
    block, size = _ggml_sizes(t)
    return 8.0 * size / block


def _ggml_sizes(t: str) -> tuple[int, int]:
    if t in FORMATS:
        return FORMATS[t].block_size, FORMATS[t].type_size
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
    except KeyError:
        raise ValueError(f"unknown ggml type {t!r}; expected a cache type such as f16, q8_0, polar") from None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One cache setting: `-ctk k -ctv v`."""

    k: str
    v: str

    @property
    def name(self) -> str:
        return self.k if self.k == self.v else f"{self.k}/{self.v}"


BASE = Setting("f16", "f16")


def parse_setting(s: str) -> Setting:
    """'T' -> K and V both T; 'K/V' -> K and V (e.g. 'polar/polar3', 'q8_0/f16' for K only)."""
    parts = s.strip().split("/")
    if len(parts) not in (1, 2) or not all(parts):
        raise ValueError(f"expected a cache setting 'T' or 'K/V' (e.g. polar, polar/polar3), got {s!r}")
    return Setting(parts[0], parts[-1])


@dataclasses.dataclass(frozen=True)
class KVShape:
    """The attention shape of a model, from its GGUF header."""

    arch: str
    n_layer: int
    n_head_kv: tuple[int, ...]  # per layer (0: a layer without a KV cache)
    head_k: int  # n_embd_head_k
    head_v: int  # n_embd_head_v

    def bits(self, s: Setting) -> float:
        """Bits per cached element, K and V weighted by their head sizes."""
        bk, bv = bits_per_elem(s.k), bits_per_elem(s.v)
        return (self.head_k * bk + self.head_v * bv) / (self.head_k + self.head_v)

    def kv_bytes(self, s: Setting, ctx: int) -> float:
        """Bytes of the K and V caches for `ctx` cells of one sequence."""
        per_cell = sum(self.n_head_kv) * (self.head_k * bits_per_elem(s.k) + self.head_v * bits_per_elem(s.v))
        return ctx * per_cell / 8

    def unfit(self, s: Setting) -> str | None:
        """Why the setting cannot hold this model's heads (a block must not straddle heads), or None."""
        for role, t, head in (("K", s.k, self.head_k), ("V", s.v, self.head_v)):
            block = _ggml_sizes(t)[0]
            if head % block:
                return f"{role} head size {head} is not a multiple of {t}'s block of {block}"
        return None


def kv_shape(model: Path) -> KVShape:
    """n_layer, n_head_kv, head sizes from the GGUF metadata (the keys llama.cpp reads).

    Raises GGUFFormatError (a ValueError) for a file that is not a GGUF, ValueError naming the
    key when one is missing.
    """
    kv = scan(model).kv

    def get(key: str, what: str, default: Any = None) -> Any:
        if key in kv:
            return kv[key].value
        if default is not None:
            return default
        raise ValueError(
            f"{model}: expected the {what} ({key}) in the GGUF metadata, not found; "
            "kvpolar recommend reads the attention shape from it"
        )

    arch = get("general.architecture", "architecture")
    n_layer = int(get(f"{arch}.block_count", "layer count"))
    n_head = get(f"{arch}.attention.head_count", "attention head count")
    n_head_kv = get(f"{arch}.attention.head_count_kv", "KV head count", n_head)

    def per_layer(v: Any, what: str) -> tuple[int, ...]:
        vals = tuple(int(x) for x in v) if isinstance(v, list) else (int(v),) * n_layer
        if len(vals) != n_layer or min(vals) < 0:
            raise ValueError(f"{model}: expected {what} for {n_layer} layers, found {v!r}")
        return vals

    heads = [h for h in per_layer(n_head, "attention head counts") if h]
    if not heads:
        raise ValueError(f"{model}: no layer has attention heads ({arch}.attention.head_count = {n_head!r})")
    head_k = (
        int(get(f"{arch}.attention.key_length", "key head size", 0))
        or int(get(f"{arch}.embedding_length", "embedding length")) // heads[0]
    )
    head_v = int(get(f"{arch}.attention.value_length", "value head size", 0)) or head_k
    return KVShape(arch, n_layer, per_layer(n_head_kv, "KV head counts"), head_k, head_v)


# ----------------------------------------------------------------------------------------------
# llama-perplexity: finding it, running it, reading its output


def find_perplexity(bin_dir: Path | None) -> Path:
    """llama-perplexity in `bin_dir`, else in the patched build's bin ($KVPOLAR_BUILD or <repo>/build)."""
    if bin_dir is None:
        try:
            bin_dir, origin = paths.build_dir() / "bin", "the patched build"
        except paths.BuildNotFoundError as e:
            raise paths.BuildNotFoundError(f"{e} (or pass --bin DIR holding {PERPLEXITY})") from None
    else:
        origin = "--bin"
    exe = Path(bin_dir) / PERPLEXITY
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise paths.BuildNotFoundError(
            f"{PERPLEXITY} not found in {bin_dir} ({origin}); expected the bin directory of the patched "
            "llama.cpp build: python3 scripts/bootstrap.py llama builds it (into <repo>/build/bin)"
        )
    return exe


def allowed_cache_types(exe: Path) -> list[str]:
    """The values listed under --cache-type-k in `llama-perplexity --help` (the list wraps)."""
    try:
        p = subprocess.run(
            [str(exe), "--help"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=HELP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LlamaRunError(f"`{exe} --help` did not finish in {HELP_TIMEOUT_S} s") from None
    out = p.stdout + p.stderr
    m = re.search(r"--cache-type-k.*?allowed values:(.*?)\(default", out, re.S)
    if not m:
        raise LlamaRunError(
            f"`{exe} --help` ({_exit_text(p.returncode)}) lists no cache types (no 'allowed values:' under "
            "--cache-type-k)",
            _tail(out),
        )
    return re.findall(r"[\w.]+", m.group(1))


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "timed out"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}"


def _tail(out: str, n: int = TAIL_LINES) -> str:
    return "\n".join(out.rstrip().splitlines()[-n:])


_PM = r"\s*(?:±|\+/-)\s*"
_KLD_LINES = {  # key: (the line llama-perplexity prints, its pattern)
    "mean_kld": ("Mean    KLD:", rf"Mean\s+KLD:\s*(\S+){_PM}(\S+)"),
    "same_top_pct": ("Same top p:", rf"Same top p:\s*(\S+){_PM}(\S+)\s*%"),
    "ppl_ratio": ("Mean PPL(Q)/PPL(base)", rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*(\S+){_PM}(\S+)"),
}


def parse_kld(out: str) -> dict[str, float]:
    """{mean_kld, same_top_pct, ppl_ratio} and their `_err` from llama-perplexity's KL summary.

    Raises ValueError naming the missing lines when the output has no summary.
    """
    res: dict[str, float] = {}
    missing = []
    for key, (line, pat) in _KLD_LINES.items():
        m = re.search(pat, out)
        if m is None:
            missing.append(repr(line))
            continue
        res[key], res[key + "_err"] = float(m.group(1)), float(m.group(2))
    if missing:
        raise ValueError(f"no KL-divergence summary in the output (missing: {', '.join(missing)})")
    return res


def _num(pat: str, out: str) -> float | None:
    m = re.search(pat, out)
    return float(m.group(1)) if m else None


def _llama_kv(out: str) -> tuple[float, int] | None:
    """(MiB, cells) from libllama's `llama_kv_cache: size = X MiB (N cells, ...)` line."""
    m = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", out)
    return (float(m.group(1)), int(m.group(2))) if m else None


def _k_centered(out: str) -> int:
    """Layers whose K llama.cpp centers (its `KV centering: K offsets in N of M layers` line)."""
    m = re.search(r"KV centering: K offsets in (\d+) of", out)
    return int(m.group(1)) if m else 0


def _run(cmd: list[str], log: Path, timeout: float) -> str:
    """Run llama-perplexity, its output into `log`; LlamaRunError unless it exits 0."""
    with log.open("w", encoding="utf-8") as f:
        f.write(shlex.join(cmd) + "\n\n")
        f.flush()
        try:
            rc: int | None = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    out = log.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        why = f"did not finish in {timeout:g} s" if rc is None else f"failed ({_exit_text(rc)})"
        raise LlamaRunError(f"{PERPLEXITY} {why}", _tail(out), log)
    return out


# ----------------------------------------------------------------------------------------------
# Checks before any run


def _text_file(text: Path | None) -> Path:
    if text is None:
        try:
            return paths.data_file(paths.SQUAD_TXT)
        except paths.DataNotFoundError as e:
            raise paths.DataNotFoundError(f"no --text given, and the default text is missing: {e}") from None
    text = Path(text)
    if not text.is_file():
        what = "is not a file" if text.exists() else "does not exist"
        raise FileNotFoundError(f"text file {str(text)!r} {what}")
    return text


def _needed_tokens(ctx: int, chunks: int) -> int:
    return ctx * max(chunks, 2)  # llama-perplexity refuses fewer than 2 x ctx tokens


def _check_text_size(text: Path, ctx: int, chunks: int) -> None:
    """A token spans at least one byte: a text of fewer bytes than tokens needed is too short."""
    need = _needed_tokens(ctx, chunks)
    size = text.stat().st_size
    if size < need:
        raise ValueError(
            f"text {text} is too short: {size} bytes, so at most about {size} tokens; --ctx {ctx} x --chunks "
            f"{chunks} needs {need} tokens (English prose: about {4 * need} bytes). Give a longer --text or "
            "lower --ctx/--chunks"
        )


def _check_base_tokens(out: str, text: Path, ctx: int, chunks: int) -> None:
    """Translate llama-perplexity's 'too short' outcomes (it exits 0 on them) into errors."""
    need = _needed_tokens(ctx, chunks)
    n_tok = _num(r"tokenizes to only (\d+) tokens", out)
    if n_tok is not None or "you need at least" in out:
        got = f"{int(n_tok)} tokens" if n_tok is not None else "too few tokens"
        raise ValueError(
            f"text {text} is too short: it tokenizes to {got}; --ctx {ctx} x --chunks {chunks} needs {need}. "
            "Give a longer --text or lower --ctx/--chunks"
        )
    ran = _num(r"calculating perplexity over (\d+) chunks", out)
    if ran is not None and ran < chunks:
        raise ValueError(
            f"text {text} is too short: it holds {int(ran)} chunks of {ctx} tokens, --chunks {chunks} "
            f"asked for {chunks * ctx} tokens. Give a longer --text or lower --ctx/--chunks"
        )


def _plan(
    candidates: list[Setting], explicit: bool, allowed: list[str], shape: KVShape
) -> tuple[list[Setting], list[dict[str, str]]]:
    """The settings to run and those skipped, with the reason. Types given explicitly must be
    ones the binary accepts; default ones it does not accept are skipped."""
    settings: list[Setting] = []
    skipped: list[dict[str, str]] = []
    for s in candidates:
        unknown = [t for t in (s.k, s.v) if t not in allowed]
        if unknown and explicit:
            raise ValueError(
                f"cache type {unknown[0]!r} (setting {s.name!r}) is not one {PERPLEXITY} accepts; "
                f"allowed: {', '.join(allowed)}"
            )
        if s == BASE:
            raise ValueError("f16/f16 is the base every setting is compared with; it always runs")
        if s in settings:
            raise ValueError(f"setting {s.name!r} is given twice")
        why = f"{PERPLEXITY} does not accept {unknown[0]}" if unknown else shape.unfit(s)
        if why:
            skipped.append({"k": s.k, "v": s.v, "reason": why})
        else:
            settings.append(s)
    return settings, skipped


# ----------------------------------------------------------------------------------------------
# The measurement


def choose(rows: list[dict], max_kld: float) -> dict | None:
    """The row with the fewest bits whose mean KLD <= max_kld (ties: lower KLD), else None."""
    ok = [r for r in rows if r.get("mean_kld") is not None and r["mean_kld"] <= max_kld]
    return min(ok, key=lambda r: (r["bits"], r["mean_kld"]), default=None)


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _clock(s: float) -> str:
    return f"{s:.0f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _row(shape: KVShape, s: Setting, kv_ctx: int, secs: float, out: str | None = None) -> dict[str, Any]:
    """A table row: the setting's size from the header; with the run's output, what llama.cpp
    reported (KV size at its context, K-centered layers)."""
    r: dict[str, Any] = {
        "k": s.k,
        "v": s.v,
        "bits": shape.bits(s),
        "kv_mib": shape.kv_bytes(s, kv_ctx) / MIB,
        "seconds": round(secs, 1),
    }
    if out is None:
        return r
    r["k_centered_layers"] = _k_centered(out)
    llama = _llama_kv(out)
    if llama is not None:
        mib, cells = llama
        r["llama_kv_mib"], r["llama_kv_cells"] = mib, cells
        # llama.cpp prints MiB with 2 decimals
        r["kv_mib_matches_llama"] = abs(shape.kv_bytes(s, cells) / MIB - mib) <= 0.01 + 1e-3 * mib
    return r


def recommend(
    model: Path,
    text: Path | None = None,
    *,
    ctx: int = DEFAULT_CTX,
    chunks: int = DEFAULT_CHUNKS,
    types: list[str] | None = None,
    max_kld: float = DEFAULT_MAX_KLD,
    threads: int | None = None,
    bin_dir: Path | None = None,
    kv_ctx: int | None = None,
    timeout: float = RUN_TIMEOUT_S,
    progress: bool | None = None,
) -> dict:
    """Measure the f16 base and each candidate setting; return the JSON-ready report.

    Errors before any run: ValueError (not a GGUF, bad arguments, text too short, unknown type),
    FileNotFoundError (model, text or build missing). The base run failing raises LlamaRunError;
    a candidate failing is recorded in its row (`error`, `log`) and the others still run; the
    logs are then kept (report["logs"]). progress: a tqdm bar on stderr (None: on a terminal
    only); one line per finished run goes to stderr in any case.
    """
    from tqdm import tqdm

    for name, val in (
        ("--ctx", ctx),
        ("--chunks", chunks),
        ("--kv-ctx", kv_ctx or 1),
        ("--timeout", timeout),
    ):
        if not val > 0:
            raise ValueError(f"{name} must be positive, got {val}")
    if not (math.isfinite(max_kld) and max_kld >= 0):
        raise ValueError(f"--max-kld must be a finite number >= 0, got {max_kld}")
    threads = threads or _threads()
    kv_ctx = kv_ctx or ctx
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(
            f"model {str(model)!r} {'is not a file' if model.exists() else 'does not exist'}"
        )
    shape = kv_shape(model)
    explicit = types is not None
    candidates = [parse_setting(t) for t in (types if explicit else DEFAULT_TYPES)]
    for t in {t for s in candidates for t in (s.k, s.v)}:
        _ggml_sizes(t)  # a ValueError for a name ggml does not know, before the build is needed
    text = _text_file(text)
    _check_text_size(text, ctx, chunks)
    exe = find_perplexity(bin_dir)
    settings, skipped = _plan(candidates, explicit, allowed_cache_types(exe), shape)
    if not settings:
        raise ValueError(f"no candidate setting to run ({'; '.join(s['reason'] for s in skipped)})")

    workdir = Path(tempfile.mkdtemp(prefix="kvpolar-recommend-"))
    base_file = workdir / "base.kld"
    common = [
        str(exe),
        "-m",
        str(model),
        "-f",
        str(text),
        "-c",
        str(ctx),
        "-b",
        str(ctx),
        "--chunks",
        str(chunks),
    ]
    common += [
        "-t",
        str(threads),
        "-fa",
        "on",
        "-lv",
        "4",
        "--kl-divergence-base",
        str(base_file),
    ]  # -lv 4: KV size
    n_runs = 1 + len(settings)
    t_start = time.perf_counter()
    bar = tqdm(total=n_runs, unit="run", file=sys.stderr, disable=None if progress is None else not progress)

    def done(i: int, what: str, t0: float) -> None:
        bar.update()
        now = time.perf_counter()
        tqdm.write(
            f"[{i}/{n_runs}] {what}, {_clock(now - t0)} (total {_clock(now - t_start)})", file=sys.stderr
        )

    rows: list[dict[str, Any]] = []
    keep_logs = True
    try:
        bar.set_description("K f16 V f16 (base)")
        t0 = time.perf_counter()
        log = workdir / "f16-f16.log"
        out = _run([*common, "-ctk", "f16", "-ctv", "f16"], log, timeout)
        _check_base_tokens(out, text, ctx, chunks)
        ppl = _num(r"Final estimate: PPL = (\S+)", out)
        if ppl is None or not base_file.is_file():
            raise LlamaRunError(
                f"{PERPLEXITY} printed no 'Final estimate: PPL' for the f16 base", _tail(out), log
            )
        base = {**_row(shape, BASE, kv_ctx, time.perf_counter() - t0, out), "ppl": ppl}
        done(1, f"K f16 V f16 (base): PPL {ppl:.3f}", t0)
        for i, s in enumerate(settings, 2):
            bar.set_description(f"K {s.k} V {s.v}")
            t0 = time.perf_counter()
            log = workdir / f"{s.k}-{s.v}.log"
            try:
                out = _run([*common, "--kl-divergence", "-ctk", s.k, "-ctv", s.v], log, timeout)
                try:
                    r = {**_row(shape, s, kv_ctx, time.perf_counter() - t0, out), **parse_kld(out)}
                except ValueError as e:
                    raise LlamaRunError(f"{PERPLEXITY}: {e}", _tail(out), log) from None
                what = f"mean KLD {r['mean_kld']:.4f}, same top {r['same_top_pct']:.1f} %"
            except LlamaRunError as e:
                r = {**_row(shape, s, kv_ctx, time.perf_counter() - t0), "error": str(e), "log": str(log)}
                what = f"FAILED: {e}; its last lines:\n" + "\n".join(
                    "    " + ln for ln in e.tail.splitlines()
                )
            rows.append(r)
            done(i, f"K {s.k} V {s.v}: {what}", t0)
        keep_logs = any("error" in r for r in rows)
    except ValueError:  # the text was too short: nothing in the logs to look at
        keep_logs = False
        raise
    finally:
        bar.close()
        base_file.unlink(missing_ok=True)
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "model": str(model),
        "arch": shape.arch,
        "n_layer": shape.n_layer,
        "n_head_kv": list(shape.n_head_kv) if len(set(shape.n_head_kv)) > 1 else shape.n_head_kv[0],
        "head_k": shape.head_k,
        "head_v": shape.head_v,
        "text": str(text),
        "ctx": ctx,
        "chunks": chunks,
        "kv_ctx": kv_ctx,
        "threads": threads,
        "max_kld": max_kld,
        "binary": str(exe),
        "env": {k: os.environ.get(k) for k in ("LLAMA_KV_CENTER", "LLAMA_KV_CENTER_V")},
        "base": base,
        "rows": sorted(rows, key=lambda r: -r["bits"]),  # most bits first; ties in run order
        "skipped": skipped,
        "recommended": choose(rows, max_kld),
        "seconds": round(time.perf_counter() - t_start, 1),
        **({"logs": str(workdir)} if keep_logs else {}),
    }


# ----------------------------------------------------------------------------------------------
# The report as text


def _pm(r: dict, key: str, spec: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:{spec}} ± {r[key + '_err']:{spec}}"


def format_report(rep: dict) -> str:
    """The table and the recommendation, as `kvpolar recommend` prints them."""
    heads = rep["n_head_kv"]
    lines = [
        f"model: {rep['model']} ({rep['arch']}, {rep['n_layer']} layers, {heads} KV heads, head size "
        f"K {rep['head_k']} V {rep['head_v']})",
        f"text: {rep['text']}, {rep['chunks']} chunks x {rep['ctx']} tokens (KLD over the second half of "
        f"each chunk), {rep['threads']} threads, flash attention on; f16 base PPL {rep['base']['ppl']:.3f}",
        "",
    ]
    base = rep["base"]
    table = [
        ("K", "V", "bits/elem", f"KV MiB @{rep['kv_ctx']}", "mean KLD", "same top %", "PPL ratio", "time")
    ]
    table.append(("f16", "f16", "16", f"{base['kv_mib']:.2f}", "(base)", "", "", f"{base['seconds']:.0f} s"))
    best = rep["recommended"]
    for r in rep["rows"]:
        mark = " *" if r is best else ""
        if "error" in r:
            cells = ("failed", "", "")
        else:
            cells = (
                _pm(r, "mean_kld", ".4f") + mark,
                _pm(r, "same_top_pct", ".1f"),
                _pm(r, "ppl_ratio", ".3f"),
            )
        table.append(
            (r["k"], r["v"], f"{r['bits']:.4g}", f"{r['kv_mib']:.2f}", *cells, f"{r['seconds']:.0f} s")
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    lines.append("")
    for s in rep["skipped"]:
        lines.append(f"skipped K {s['k']} V {s['v']}: {s['reason']}")
    for r in rep["rows"]:
        if "error" in r:
            lines.append(f"failed K {r['k']} V {r['v']}: {r['error']} (log: {r['log']})")
    budget = rep["max_kld"]
    if best is None:
        lines.append(
            f"recommendation: none of the {len(rep['rows'])} settings has a mean KLD within the budget "
            f"{budget:g} (--max-kld); keep the f16 cache or raise the budget"
        )
    else:
        ratio = base["kv_mib"] / best["kv_mib"]
        lines.append(
            f"recommendation: K {best['k']} V {best['v']}: {best['bits']:.4g} bits/elem, "
            f"{best['kv_mib']:.2f} MiB at {rep['kv_ctx']} tokens ({ratio:.2f}x smaller than f16), "
            f"mean KLD {best['mean_kld']:.4f} <= budget {budget:g}"
        )
        lines.append(f"  use: -ctk {best['k']} -ctv {best['v']} -fa on")
    lines.append(_centering_note(rep))
    if any(r.get("kv_mib_matches_llama") is False for r in [base, *rep["rows"]]):
        lines.append(
            "note: llama.cpp reported a different KV size than the header arithmetic for some settings "
            "(llama_kv_mib in --json); this architecture's cache is not plain per-layer K/V"
        )
    return "\n".join(lines)


def _centering_note(rep: dict) -> str:
    env = rep["env"]
    if env.get("LLAMA_KV_CENTER") is not None:
        return (
            f"centering: LLAMA_KV_CENTER={env['LLAMA_KV_CENTER']} was set for every run (it overrides "
            "llama.cpp's default of centering polar K)"
        )
    polar = [r for r in rep["rows"] if r["k"] in FORMATS and "error" not in r]
    n = max((r["k_centered_layers"] for r in polar), default=0)
    what = f"K offsets in {n} of {rep['n_layer']} layers here" if polar else "no polar K setting ran"
    return (
        "centering: llama.cpp centers polar K by default (offsets from `kvpolar calibrate`, else measured "
        f"from the first batch, else the k-projection bias): {what}; LLAMA_KV_CENTER=0|1 overrides"
    )
