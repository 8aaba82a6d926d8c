#!/usr/bin/env python3
"""One decode step's attention and cache write, per KV type, timed op by op on the GPU.

    python3 scripts/perf_ops_gpu.py --bin BUILD/bin [--out docs/bench/gpu] [--name ops-decode]
    python3 scripts/perf_ops_gpu.py --parse FA.txt SET_ROWS.txt [--out ...]   # tables from saved logs

Runs `test-backend-ops perf -b CUDA0` on the cases patch 0011 adds for one decode step:
FLASH_ATTN_EXT at SmolLM2-135M's shape (head size 64, 3 K/V heads, GQA 3) and Qwen2.5-1.5B's
(head size 128, 2 K/V heads, GQA 6), 1 query, KV 256 / 16384 / 32768, for f16, q8_0, q4_0 and
the polar pairs; SET_ROWS of one cache row (192 and 256 values) per type. test-backend-ops
repeats each op in a graph and prints microseconds per run. Writes <out>/<name>.json and .md
with the raw logs under <out>/raw/; standard library only; exits non-zero when a run failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

FA_FILTER = r"nh=3,nr23=\[3,1\]|nh=2,nr23=\[6,1\]"
SET_ROWS_FILTER = r"ne=\[192,16384|ne=\[256,32768"
MODELS = {
    ("64", "3"): "SmolLM2-135M (D 64, 3 KV heads, GQA 3)",
    ("128", "2"): "Qwen2.5-1.5B (D 128, 2 KV heads, GQA 6)",
}
PAIR_ORDER = [
    "f16/f16",
    "q8_0/q8_0",
    "q4_0/q4_0",
    "polar/polar",
    "polar3/polar3",
    "polar/f16",
    "polar/polar3",
]

FA_RE = re.compile(
    r"FLASH_ATTN_EXT\(hsk=(\d+),.*?nh=(\d+),.*?kv=(\d+),.*?type_K=(\w+),type_V=(\w+),.*?([\d.]+) us/run"
)
SR_RE = re.compile(r"SET_ROWS\(type_src=\w+,type_dst=(\w+),.*?ne=\[(\d+),.*?([\d.]+) us/run")


def parse(fa_text: str, sr_text: str) -> dict:
    fa = [
        {"hs": int(m[0]), "nh": int(m[1]), "kv": int(m[2]), "pair": f"{m[3]}/{m[4]}", "us": float(m[5])}
        for m in FA_RE.findall(fa_text)
    ]
    sr = [{"type": m[0], "row": int(m[1]), "us": float(m[2])} for m in SR_RE.findall(sr_text)]
    return {"flash_attn": fa, "set_rows": sr}


def run_perf(bin_dir: Path, op: str, flt: str) -> str:
    cmd = [str(bin_dir / "test-backend-ops"), "perf", "-b", "CUDA0", "-o", op, "-p", flt]
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-1500:]}")
    return p.stdout + p.stderr  # the device line ("Device 0: ...") is on stderr


def to_md(res: dict, header: str) -> str:
    lines = [f"# {header}", ""]
    fa = res["flash_attn"]
    for (hs, nh), label in MODELS.items():
        rows = [r for r in fa if str(r["hs"]) == hs and str(r["nh"]) == nh]
        kvs = sorted({r["kv"] for r in rows})
        if not rows:
            continue
        f16 = {r["kv"]: r["us"] for r in rows if r["pair"] == "f16/f16"}
        lines += [f"## FLASH_ATTN_EXT, one query, {label}: us per op (x f16)", ""]
        lines += ["| K / V | " + " | ".join(f"KV {kv}" for kv in kvs) + " |", "|---|" + "---|" * len(kvs)]
        for pair in PAIR_ORDER:
            by_kv = {r["kv"]: r["us"] for r in rows if r["pair"] == pair}
            if by_kv:
                cells = [
                    f"{by_kv[kv]:.2f} ({by_kv[kv] / f16[kv]:.2f}x)" if kv in by_kv and kv in f16 else "-"
                    for kv in kvs
                ]
                lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        lines.append("")
    sr = res["set_rows"]
    if sr:
        rows_n = sorted({r["row"] for r in sr})
        lines += ["## SET_ROWS, one cache row (a decode step's write): us per op", ""]
        lines += [
            "| type | " + " | ".join(f"{n} values" for n in rows_n) + " |",
            "|---|" + "---|" * len(rows_n),
        ]
        for t in dict.fromkeys(r["type"] for r in sr):
            by_n = {r["row"]: r["us"] for r in sr if r["type"] == t}
            lines.append(
                f"| {t} | " + " | ".join(f"{by_n[n]:.2f}" if n in by_n else "-" for n in rows_n) + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bin", help="folder with test-backend-ops of a CUDA build")
    src.add_argument(
        "--parse", nargs=2, metavar=("FA_LOG", "SET_ROWS_LOG"), help="tables from saved perf logs"
    )
    ap.add_argument("--out", default="docs/bench/gpu")
    ap.add_argument("--name", default="ops-decode")
    ap.add_argument("--title", default=None, help="heading of the .md (default: the GPU and the command)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    if args.bin:
        fa_text = run_perf(Path(args.bin), "FLASH_ATTN_EXT", FA_FILTER)
        sr_text = run_perf(Path(args.bin), "SET_ROWS", SET_ROWS_FILTER)
        (out / "raw" / f"{args.name}-fa.txt").write_text(fa_text)
        (out / "raw" / f"{args.name}-setrows.txt").write_text(sr_text)
    else:
        fa_text, sr_text = (Path(p).read_text() for p in args.parse)
    res = parse(fa_text, sr_text)
    if not res["flash_attn"] or not res["set_rows"]:
        print("perf_ops_gpu: no FLASH_ATTN_EXT or SET_ROWS timings found in the perf output", file=sys.stderr)
        return 1
    gpu = re.search(r"Device 0: ([^,\n]*)", fa_text)
    res.update(
        gpu=gpu[1].strip() if gpu else "unknown GPU",
        argv=sys.argv,
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    title = args.title or f"Decode-step ops on {res['gpu']} (`test-backend-ops perf`, {args.name})"
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(to_md(res, title))
    print(to_md(res, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
