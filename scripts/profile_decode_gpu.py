#!/usr/bin/env python3
"""Where a decode step's GPU time goes, kernel by kernel: llama-bench tg under Nsight Compute (ncu),
one kernel duration each, grouped by kernel name over the steady decode steps.

    python3 scripts/profile_decode_gpu.py --bin BUILD/bin --model M [--kv f16/f16 polar/polar]
        [--tokens 6] [--depth 0] [--out docs/bench/gpu] [--name profile-decode]

For each K/V pair, ncu (--clock-control none, --cache-control none: the card's clocks and the L2
as a real run leaves them) times every kernel of `llama-bench -p 0 -n TOKENS -d DEPTH -ngl 99 -fa 1
--no-warmup`. The depth is prefilled as one batch (-b/-ub = depth), so that its kernels are few.
The decode steps are found as the period of the kernel-name sequence at the end of the run; the
table gives, per step, each kernel's launches and summed duration (mean over the last TOKENS-1
steps), and their total. Kernel durations do not include the gaps between launches: compare the
total with the step time that llama-bench reports without ncu.
Writes <out>/<name>.json and .md, and ncu's table of each run as <out>/<name>-K-V.csv; standard
library only; exits non-zero when a run failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

from bench_llama_gpu import gpu_name

METRIC = "gpu__time_duration.sum"


def ncu_rows(text: str) -> list[dict]:
    """The kernel rows of ncu's --csv --page raw output (a header row, a units row, then kernels)."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError(f"ncu printed no CSV table: {text[-800:]!r}")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    return [r for r in rows if r.get("ID", "").isdigit() and r.get(METRIC)]


def period(names: list[str], lo: int = 8) -> int:
    """The smallest p >= lo with the last 2p names made of two equal halves (one decode step)."""
    for p in range(lo, len(names) // 2 + 1):
        if names[-p:] == names[-2 * p : -p]:
            return p
    raise ValueError(f"no repeating decode step in {len(names)} kernels")


def per_step(rows: list[dict], steps: int) -> tuple[int, int, OrderedDict]:
    names = [r["Kernel Name"] for r in rows]
    p = period(names)
    n = 2  # the steps at the end that repeat the last one (at most `steps`)
    while n < steps and len(names) >= (n + 1) * p and names[-(n + 1) * p : -n * p] == names[-p:]:
        n += 1
    n = min(n, steps)
    tail = rows[-n * p :]
    table: OrderedDict[str, list[float]] = OrderedDict()
    for r in tail:
        cell = table.setdefault(r["Kernel Name"], [0.0, 0.0])
        cell[0] += 1
        cell[1] += float(r[METRIC].replace(",", "")) / 1e3  # ns -> us (ncu may print "3,808")
    for cell in table.values():
        cell[0] /= n
        cell[1] /= n
    return p, n, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv", nargs="+", default=["f16/f16", "polar/polar"])
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for every run")
    ap.add_argument("--out", default="docs/bench/gpu")
    ap.add_argument("--name", default="profile-decode")
    args = ap.parse_args(argv)
    ncu = shutil.which("ncu")
    if ncu is None:
        print("profile_decode_gpu: ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(dict(e.split("=", 1) for e in args.env))
    bench = str(Path(args.bin) / "llama-bench")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, failed = [], 0
    for kv in args.kv:
        k, v = kv.split("/")
        cmd = [
            bench,
            "-m",
            args.model,
            "-ngl",
            "99",
            "-fa",
            "1",
            "-ctk",
            k,
            "-ctv",
            v,
            "-p",
            "0",
            "-n",
            str(args.tokens),
            "-r",
            "1",
            "--no-warmup",
            "-d",
            str(args.depth),
        ]
        if args.depth:
            cmd += ["-b", str(args.depth), "-ub", str(args.depth)]
        full = [
            ncu,
            "--clock-control",
            "none",
            "--cache-control",
            "none",
            "--metrics",
            METRIC,
            "--csv",
            "--page",
            "raw",
            "--print-units",
            "base",
            *cmd,
        ]
        p = subprocess.run(full, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        raw = out / f"{args.name}-{k}-{v}.csv"
        raw.write_text(p.stdout[p.stdout.find('"ID"') :] if '"ID"' in p.stdout else p.stdout)
        try:
            rows = ncu_rows(p.stdout)
            plen, n, table = per_step(rows, args.tokens - 1)
        except ValueError as e:
            print(f"{kv}: rc {p.returncode}: {e}\n{p.stderr[-1500:]}", file=sys.stderr)
            failed += 1
            continue
        total = sum(c[1] for c in table.values())
        runs.append(
            {
                "kv": kv,
                "command": " ".join(full),
                "kernels": len(rows),
                "step_kernels": plen,
                "steps": n,
                "total_us": total,
                "per_step": [{"kernel": name, "launches": c[0], "us": c[1]} for name, c in table.items()],
            }
        )
        print(f"{kv}: {plen} kernels a step, {total:.1f} us of kernel time a step", flush=True)
    command = "python3 scripts/profile_decode_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{args.name}.json").write_text(
        json.dumps({"gpu": gpu_name(), "command": command, "runs": runs}, indent=1) + "\n"
    )
    md = [
        f"# One decode step's kernels ({gpu_name()}), depth {args.depth}",
        "",
        f"Generated by `{command}`; per step: launches and summed kernel time (us), mean over the "
        "steady steps; no launch gaps.",
        "",
    ]
    for r in runs:
        md += [
            f"## {r['kv']}: {r['step_kernels']} launches, {r['total_us']:.1f} us a step",
            "",
            "| kernel | launches | us | share |",
            "|---|---|---|---|",
        ]
        for row in sorted(r["per_step"], key=lambda x: -x["us"]):
            md.append(
                f"| `{row['kernel'][:90]}` | {row['launches']:.0f} | {row['us']:.1f} | "
                f"{100 * row['us'] / r['total_us']:.1f} % |"
            )
        md.append("")
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
