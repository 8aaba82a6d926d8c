"""Where a CPU decode step spends its time, by KV-cache type: llama-bench tg under `perf record`.

    python scripts/profile_decode_cpu.py [--model smollm2] [--pairs f16/f16 q4_0/q4_0 polar/polar]
        [--n 256] [--reps 2] [--threads 2] [--depth D] [--out docs/bench/profile-decode-<model>.json]

Each K/V pair runs `llama-bench -fa 1 -p 0 -n N [-d D]` under `perf record` (cpu-clock samples of
every thread, no call graphs). The samples of each symbol are summed into the groups below (GROUPS:
first matching pattern wins); a group's CPU microseconds a token are its share of the samples times
the samples' CPU time over the tokens they cover.
- Depth 0 (the default): decode from an empty cache, where the cache's own work (its write above all)
  weighs most against the model's. Every sample counts, over the tokens the run generated (N a rep and
  llama-bench's one warm-up token); model loading is in the samples too: on SmolLM2 the groups sum to
  within 2 % of threads / (tokens/s).
- --depth D: llama-bench decodes a D-token prompt before each rep's N tokens, so only a time window of
  the last rep's decode counts (decode_window): it ends at the last sample of the model's matmuls (the
  last token's) and spans WINDOW_SHARE of N tokens at llama-bench's tokens/s, so that no sample of the
  prompt, which a faster last rep would bring into a full-length window, is in it.
The tokens/s are llama-bench's own, measured under perf. Needs Linux `perf` (linux-tools): without it
the script stops and says so. One run of each pair: a profile, not an A/B (cpu_build_ab.py is that).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_bench
from bench_llama import MODELS
from kvpolar import paths
from kvpolar.atomic import atomic_write_text
from kvsetup.cpu import machine_label

# (group, regular expression on the symbol): the cache's write, its K and V reads, the rest of
# attention, the model's matmuls, the thread pool's waiting; the first that matches names the group.
# By symbol, so the default model's weights (Q4_1, Q8_0) and a q4_0 cache fall apart; a model with
# q4_0 weights would count them as the K read. The q8_0 copy of the query that a q4_0 K takes is
# counted with the matmuls (quantize_row_q8_0): under 0.5 % here.
GROUPS = [
    ("V read", r"dequantize_row_|fp16_to_fp32_row|vec_mad_f16"),
    (
        "cache write",
        r"polar_encode|polar_quantize|quantize_row_(polar|q4_0|q4_1|iq4_nl|q5_0)|set_rows|fp32_to_fp16",
    ),
    ("K read", r"vec_dot_(polar|polar3)(_f32)?\b|vec_dot_q4_0_q8_0|vec_dot_f16"),
    ("attention, rest", r"flash_attn|expf|fwht|softmax"),
    ("weights matmul", r"vec_dot_q\d_\d_q8|vec_dot_q8_0_q8_0|mul_mat|quantize_row_q8|gemv|gemm|repack"),
    ("thread wait", r"^libgomp|graph_compute_thread|sched_yield|futex|barrier"),
]


# the table's columns: the cache's own groups first
COLUMNS = ("cache write", "K read", "V read", "attention, rest", "weights matmul", "thread wait", "other")
assert {g for g, _ in GROUPS} | {"other"} == set(COLUMNS)


@functools.cache  # (a --depth run asks for every sample, twice: its symbols repeat)
def group_of(dso: str, symbol: str) -> str:
    key = symbol if not symbol.startswith("0x") else dso  # unresolved addresses: by their library
    for name, pat in GROUPS:
        if re.search(pat, key):
            return name
    return "other"


def parse_report(text: str) -> tuple[list[tuple[float, str, str]], float]:
    """(percent of samples, dso, symbol) of each line of `perf report --sort dso,symbol --stdio`, and the
    CPU time the samples stand for in ms (its header's event count of cpu-clock, ns)."""
    m = re.search(r"^# Event count \(approx\.\): (\d+)", text, re.M)
    if not m:
        raise ValueError(f"expected perf report's '# Event count' header, got {text[:300]!r}")
    rows = []
    for line in text.splitlines():
        r = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+?)\s*$", line)
        if r:
            rows.append((float(r.group(1)), r.group(2), r.group(3)))
    return rows, int(m.group(1)) / 1e6


WINDOW_SHARE = 0.8  # --depth: the share of the last rep's N tokens whose decode time the window spans


def parse_samples(text: str) -> list[tuple[float, int, str, str]]:
    """(time s, period ns, dso file name, symbol) of each line of `perf script -F time,period,ip,sym,dso`;
    an unresolved symbol ("[unknown]") becomes its address, as perf report shows it (group_of goes by
    the library then)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(\d+\.\d+):\s+(\d+)\s+([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$", line)
        if m:
            sym = m.group(4)
            if sym == "[unknown]":
                sym = "0x" + m.group(3)
            out.append((float(m.group(1)), int(m.group(2)), Path(m.group(5)).name, sym))
    if not out:
        raise ValueError(f"expected perf script's 'time: period ip symbol (dso)' lines, got {text[:300]!r}")
    return out


def decode_window(samples: list[tuple[float, int, str, str]], n: int, tps: float) -> tuple[float, float]:
    """The last rep's decode as a time window (seconds): it ends at the last sample of the model's
    matmuls (the last token's step) and spans WINDOW_SHARE * n tokens at tps."""
    if n < 1 or tps <= 0:
        raise ValueError(f"decode_window: expected positive n and tps, got {n} and {tps}")
    ends = [t for t, _, dso, sym in samples if group_of(dso, sym) == "weights matmul"]
    if not ends:
        raise ValueError("decode_window: expected samples of the model's matmuls, got none")
    t1 = max(ends)
    return t1 - WINDOW_SHARE * n / tps, t1


def window_groups(
    samples: list[tuple[float, int, str, str]], t0: float, t1: float
) -> tuple[dict[str, float], float, int]:
    """Each group's percent of the CPU time of the samples in [t0, t1], that CPU time in ms (the samples'
    periods), and how many samples it holds."""
    inside = [(period, dso, sym) for t, period, dso, sym in samples if t0 <= t <= t1]
    cpu_ns = sum(period for period, _, _ in inside)
    if not cpu_ns:
        raise ValueError(f"window_groups: expected samples between {t0:.3f} and {t1:.3f} s, got none")
    groups: dict[str, float] = {}
    for period, dso, sym in inside:
        g = group_of(dso, sym)
        groups[g] = groups.get(g, 0.0) + 100 * period / cpu_ns
    return groups, cpu_ns / 1e6, len(inside)


def profile_pair(k: str, v: str, args, workdir: Path) -> dict:
    binp = str(paths.bin_path("llama-bench"))
    model = str(paths.data_file(MODELS[args.model]))
    cmd = [binp, "-m", model, "-fa", "1", "-ctk", k, "-ctv", v, "-p", "0", "-n", str(args.n)]
    cmd += ["-r", str(args.reps), "-t", str(args.threads), "-o", "json"]
    if args.depth:
        cmd += ["-d", str(args.depth)]
    data = workdir / f"{k}-{v}.perf"
    p = subprocess.run(
        ["perf", "record", "-q", "-F", "2000", "-o", str(data), "--", *cmd],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if p.returncode != 0:
        raise RuntimeError(f"perf record of {k}/{v} failed (exit {p.returncode}): {p.stderr[-800:]}")
    rows = llama_bench.results(p.stdout)
    tg = next(r for r in rows if r["test"].startswith("tg"))
    window = None
    if args.depth:  # the last rep's decode: a window of the samples, by their times
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "time,period,ip,sym,dso"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        samples = parse_samples(script)
        t0, t1 = decode_window(samples, args.n, tg["tps"])
        groups, cpu_ms, inside = window_groups(samples, t0, t1)
        tokens = WINDOW_SHARE * args.n
        window = {"seconds": round(t1 - t0, 3), "tokens": tokens, "samples": inside}
    else:
        report = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(data),
                "--no-children",
                "--sort",
                "dso,symbol",
                "-g",
                "none",
                "--stdio",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        symbols, cpu_ms = parse_report(report)
        groups: dict[str, float] = {}
        for pct, dso, sym in symbols:
            g = group_of(dso, sym)
            groups[g] = groups.get(g, 0.0) + pct
        tokens = args.n * args.reps + 1  # each rep's N and the warm-up's one
    us_tok = {g: round(pct / 100 * cpu_ms * 1e3 / tokens, 1) for g, pct in groups.items()}
    return {
        **({"window": window} if window else {}),
        "k": k,
        "v": v,
        "tg_tps": tg["tps"],
        "tg_tps_sd": tg["tps_sd"],
        "percent": {g: round(p, 2) for g, p in sorted(groups.items(), key=lambda t: -t[1])},
        "cpu_us_per_token": us_tok,
        "cpu_ms_sampled": round(cpu_ms, 1),
        "command": " ".join(cmd),
    }


CACHE_GROUPS = ("cache write", "K read", "V read")  # the cache's own work


def cpu_totals(row: dict) -> tuple[float, float]:
    """A row's CPU microseconds a token: the cache's own groups (CACHE_GROUPS) and all groups."""
    us = row["cpu_us_per_token"]
    return sum(us.get(g, 0.0) for g in CACHE_GROUPS), sum(us.values())


def render(res: dict) -> str:
    """The markdown table of a run: a row a K/V pair, each cell a group's share (CPU us a token)."""
    lines = ["| K / V | tg t/s | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in res["rows"]:
        cells = [
            f"{r['percent'].get(g, 0.0):.1f} % ({r['cpu_us_per_token'].get(g, 0.0):.0f})" for g in COLUMNS
        ]
        lines.append(f"| {r['k']} / {r['v']} | {r['tg_tps']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--pairs", nargs="+", default=["f16/f16", "q4_0/q4_0", "polar/polar"], metavar="K/V")
    ap.add_argument("--n", type=int, default=256, help="tokens generated a rep (default 256)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--depth",
        type=int,
        default=0,
        help="decode after a prompt of this many tokens (a window of the last rep)",
    )
    ap.add_argument("--out", type=Path, help="JSON of every row, the machine and the build")
    args = ap.parse_args(argv)
    if args.depth < 0 or args.n < 1 or args.reps < 1:
        ap.error(
            f"expected --depth >= 0, --n >= 1 and --reps >= 1, got {args.depth}, {args.n} and {args.reps}"
        )
    pairs = []
    for s in args.pairs:
        if s.count("/") != 1 or not all(s.split("/")):
            ap.error(f"--pairs: expected K/V such as polar/polar, got {s!r}")
        pairs.append(tuple(s.split("/")))
    if shutil.which("perf") is None:
        print("profile_decode_cpu: expected Linux `perf` on PATH (linux-tools), found none", file=sys.stderr)
        return 2
    t0 = time.time()
    with tempfile.TemporaryDirectory() as td:
        rows = []
        for k, v in pairs:
            rows.append(profile_pair(k, v, args, Path(td)))
            print(json.dumps(rows[-1]), flush=True)
    res = {
        "machine": machine_label(),
        "build": llama_bench.build_info(paths.bin_path("llama-bench").parent),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.time() - t0),
        "command": llama_bench.command_line("profile_decode_cpu.py", argv),
        "model": MODELS[args.model],
        "n": args.n,
        "depth": args.depth,
        "reps": args.reps,
        "threads": args.threads,
        "rows": rows,
    }
    print(render(res))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
