#!/usr/bin/env python3
"""Where a decode step's GPU time goes, kernel by kernel: llama-bench tg under Nsight Compute (ncu),
one kernel duration each, grouped by kernel name over the steady decode steps.

    python3 scripts/profile_decode_gpu.py --bin BUILD/bin --model M [--kv f16/f16 polar/polar]
        [--tokens 6] [--depth 0] [--env NAME=VALUE ...] [--out docs/bench/gpu] [--name profile-decode]
    python3 scripts/profile_decode_gpu.py --render docs/bench/gpu/profile-decode-....json

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
from llama_bench import command_line

METRIC = "gpu__time_duration.sum"
# the parts of a decode layer that the polar cache changes, by kernel name (the first match counts)
PARTS = (
    ("attention (flash attention, combine or stream-k fixup)", ("flash_attn",)),
    ("RoPE and the cache writes", ("rope_", "set_rows", "k_polar_layer_chains")),
    ("elementwise k_bin_bcast (balancing multiplies, residual add)", ("k_bin_bcast",)),
    ("Hadamard rotations (fwht_cuda)", ("fwht_cuda",)),
)
OTHER = "everything else (weights, norms, q8_1 quantization)"


def part_of(kernel: str) -> str:
    return next((name for name, keys in PARTS if any(k in kernel for k in keys)), OTHER)


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


def decode_bench_cmd(bin_dir: str, model: str, k: str, v: str, tokens: int, depth: int) -> list[str]:
    """llama-bench's decode run of one K/V pair: TOKENS tokens after DEPTH, the depth prefilled as one
    batch (-b/-ub = depth) so that its kernels are few; no warm-up, one repetition."""
    cmd = [str(Path(bin_dir) / "llama-bench"), "-m", model, "-ngl", "99", "-fa", "1", "-ctk", k, "-ctv", v]
    cmd += ["-p", "0", "-n", str(tokens), "-r", "1", "--no-warmup", "-d", str(depth)]
    return cmd + (["-b", str(depth), "-ub", str(depth)] if depth else [])


def write_tables(
    out: Path, name: str, script: str, argv, gpu: str, depth: int, runs: list, render_md
) -> dict:
    """OUT/NAME.json (the runs, the GPU and the command that made them) and OUT/NAME.md (render_md of it)."""
    command = command_line(script, argv)
    data = {"gpu": gpu, "command": command, "depth": depth, "runs": runs}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{name}.md").write_text(render_md(data))
    return data


def short(kernel: str) -> str:
    """A kernel's name with its template arguments, without "void " and its parameter list (the first "("
    outside the template arguments, which may hold casts: "(ggml_type)1" in a CUPTI trace's names)."""
    name = kernel.removeprefix("void ")
    depth = 0
    for i, c in enumerate(name):
        depth += (c == "<") - (c == ">")
        if c == "(" and depth == 0:
            return name[:i]
    return name


def render(data: dict) -> str:
    """The markdown table of a profile: one row per kernel, per K/V pair its launches and summed us a
    step, the largest first; the totals last."""
    depth = data["depth"]
    runs = data["runs"]
    names: dict[str, float] = {}
    for r in runs:
        for x in r["per_step"]:
            names[short(x["kernel"])] = max(names.get(short(x["kernel"]), 0.0), x["us"])
    cells = []
    for r in runs:
        m: dict[str, list[float]] = {}
        for x in r["per_step"]:
            c = m.setdefault(short(x["kernel"]), [0.0, 0.0])
            c[0] += x["launches"]
            c[1] += x["us"]
        cells.append(m)
    md = [
        f"# One decode step's kernels ({data['gpu']}), depth {depth}",
        "",
        f"Generated by `{data['command']}`. Per step (the mean over the steady steps): launches x "
        "summed kernel time in us, timed one kernel at a time by ncu (no launch gaps, no overlap).",
        "",
        "| kernel | " + " | ".join(r["kv"] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for name in sorted(names, key=lambda n: -names[n]):
        row = [f"{m[name][0]:.0f} x {m[name][1]:.1f}" if name in m else "-" for m in cells]
        md.append(f"| `{name}` | " + " | ".join(row) + " |")
    md.append(
        "| **total** | " + " | ".join(f"**{r['step_kernels']} x {r['total_us']:.1f}**" for r in runs) + " |"
    )
    md += ["", "By part (us a step; `PARTS` in the script):", "", md[4].replace("kernel", "part", 1), md[5]]
    for part in [p for p, _ in PARTS] + [OTHER]:
        us = [sum(x["us"] for x in r["per_step"] if part_of(x["kernel"]) == part) for r in runs]
        md.append(f"| {part} | " + " | ".join(f"{u:.1f}" for u in us) + " |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin")
    ap.add_argument("--model")
    ap.add_argument("--render", metavar="JSON", help="only write the .md of an earlier run's JSON next to it")
    ap.add_argument("--kv", nargs="+", default=["f16/f16", "polar/polar"])
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for every run")
    ap.add_argument("--out", default="docs/bench/gpu")
    ap.add_argument("--name", default="profile-decode")
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        data = json.loads(src.read_text())
        src.with_suffix(".md").write_text(render(data))
        return 0
    if not args.bin or not args.model:
        ap.error("--bin and --model are required (or --render JSON)")
    ncu = shutil.which("ncu")
    if ncu is None:
        print("profile_decode_gpu: ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(dict(e.split("=", 1) for e in args.env))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, failed = [], 0
    for kv in args.kv:
        k, v = kv.split("/")
        cmd = decode_bench_cmd(args.bin, args.model, k, v, args.tokens, args.depth)
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
    write_tables(out, args.name, "profile_decode_gpu.py", argv, gpu_name(), args.depth, runs, render)
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
