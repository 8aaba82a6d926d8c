#!/usr/bin/env python3
"""Where a kernel's instructions go, from Nsight Compute's SASS page (`ncu -i REP --page source --csv
--print-source sass`, as scripts/gpu_run.sh's kernel-profile, chain-profile and encode-profile keep it,
gzipped or not).

    python3 scripts/ncu_sass_summary.py FILE.csv[.gz] --per N [--top 12] [--json OUT]

--per N divides the executed warp instructions by N units of work (e.g. the encoder's 64-value blocks
of the launch, or a launch's CTAs), so each SASS instruction's count becomes "times a unit": 1.0 for
straight-line code run once a unit, 2.0 for a loop body run twice, and so on. Prints the total a unit,
the instructions grouped by that multiplicity (how much is straight-line, how much each loop level),
the contiguous runs of straight-line code (with their first and last SASS index, to find them in the
CSV), the opcodes that execute most, and the warp stall samples of each group. Then where the samples
are: their total by stall reason (ncu's stall_* columns), and the contiguous segments of SASS that run
equally often (a phase of the kernel: e.g. 64 = every warp of the 4 K-write CTAs, 4 = their warp 0 alone;
a never-run instruction does not end a segment), the segments with the most samples first, and the
instructions with the most samples. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import sys
from pathlib import Path

COL_SOURCE = "Source"
COL_EXEC = "Instructions Executed"
COL_STALL = "Warp Stall Sampling (All Samples)"


def read_rows(path: Path) -> tuple[str, list[tuple[str, float, int, dict[str, int]]]]:
    """(kernel name, [(SASS text, warp instructions executed, stall samples, {stall reason: samples})]) of
    ncu's SASS CSV (the reasons: its stall_* columns of all samples, where it has them)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    head = next((i for i, r in enumerate(rows) if COL_SOURCE in r and COL_EXEC in r), None)
    if head is None:
        raise ValueError(f"{path}: no header row with {COL_SOURCE!r} and {COL_EXEC!r}: not ncu's SASS page")
    hdr = rows[head]
    kernel = next((r[1] for r in rows[:head] if len(r) > 1 and r[0] == "Kernel Name"), "?")
    i_src, i_exe = hdr.index(COL_SOURCE), hdr.index(COL_EXEC)
    i_st = hdr.index(COL_STALL) if COL_STALL in hdr else None
    i_reasons = [(i, h) for i, h in enumerate(hdr) if h.startswith("stall_") and "(Not Issued)" not in h]

    def num(s: str) -> float:
        return float(s.replace(",", "")) if s.strip() not in ("", "-") else 0.0

    out = []
    for r in rows[head + 1 :]:
        if len(r) <= max(i_src, i_exe):
            continue
        reasons = {h: int(num(r[i])) for i, h in i_reasons if i < len(r) and num(r[i])}
        out.append((r[i_src].strip(), num(r[i_exe]), int(num(r[i_st])) if i_st is not None else 0, reasons))
    if not out:
        raise ValueError(f"{path}: the SASS table has no rows")
    return kernel, out


def opcode(sass: str) -> str:
    """The opcode without its modifiers or predicate: '@!P0 FSEL.X R1, ...' -> 'FSEL'."""
    parts = sass.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else "?"


def summarize(rows: list[tuple[str, float, int, dict[str, int]]], per: float, top: int = 12) -> dict:
    """The breakdown described in the module docstring (numbers a unit of work)."""
    if per <= 0:
        raise ValueError(f"--per must be positive, got {per}")
    groups: dict[float, dict] = {}
    runs: list[dict] = []
    ops: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    segments: list[dict] = []
    cur = None
    for i, (sass, e, st, why) in enumerate(rows):
        reasons.update(why)
        if e and (not segments or segments[-1]["executed_each"] != e):
            segments.append(
                {"first": i, "last": i, "executed_each": e, "times_a_unit": e / per, "stall_samples": 0}
            )
        if segments:
            segments[-1]["last"] = i
            segments[-1]["stall_samples"] += st
        m = round(e / per, 1)
        g = groups.setdefault(m, {"times_a_unit": m, "sass": 0, "executed": 0.0, "stall_samples": 0})
        g["sass"] += 1
        g["executed"] += e / per
        g["stall_samples"] += st
        ops[opcode(sass)] += e / per
        if m == 1.0:
            if cur is not None and cur["last"] == i - 1:
                cur["last"] = i
                cur["executed"] += e / per
            else:
                cur = {"first": i, "last": i, "executed": e / per}
                runs.append(cur)
    total = sum(r[1] for r in rows) / per
    return {
        "executed_a_unit": total,
        "sass_instructions": len(rows),
        "by_multiplicity": [groups[k] for k in sorted(groups) if groups[k]["executed"] > 0],
        "straight_runs": sorted(runs, key=lambda r: -r["executed"])[:top],
        "top_opcodes": [{"opcode": k, "executed": v} for k, v in ops.most_common(top)],
        "stall_samples": sum(r[2] for r in rows),
        "stall_reasons": dict(reasons.most_common()),
        "segments": sorted(segments, key=lambda g: -g["stall_samples"])[:top],
        "top_stalled": [
            {
                "index": i,
                "sass": r[0],
                "stall_samples": r[2],
                "reason": max(r[3], key=r[3].get) if r[3] else "-",
            }
            for i, r in sorted(enumerate(rows), key=lambda x: -x[1][2])[:top]
            if r[2]
        ],
    }


def render(kernel: str, s: dict, per: float) -> str:
    lines = [
        f"{kernel}: {s['executed_a_unit']:.1f} warp instructions a unit (--per {per:g}), "
        f"{s['sass_instructions']} SASS instructions",
        "",
        "times a unit | SASS instructions | executed a unit | share | stall samples",
    ]
    for g in s["by_multiplicity"]:
        lines.append(
            f"{g['times_a_unit']:>12.1f} | {g['sass']:>17d} | {g['executed']:>15.1f} | "
            f"{100 * g['executed'] / s['executed_a_unit']:>4.1f}% | {g['stall_samples']:>13d}"
        )
    lines += ["", "largest straight-line runs (executed once a unit): SASS index first-last, instructions"]
    lines += [f"  {r['first']:>5d}-{r['last']:<5d} {r['executed']:7.1f}" for r in s["straight_runs"]]
    lines += ["", "opcodes: " + ", ".join(f"{o['opcode']} {o['executed']:.1f}" for o in s["top_opcodes"])]
    lines += ["", f"stall samples: {s['stall_samples']}"]
    if s["stall_reasons"]:
        lines.append(
            "by reason: "
            + ", ".join(f"{k.removeprefix('stall_')} {v}" for k, v in s["stall_reasons"].items())
        )
    lines += [
        "segments run equally often, most samples first: SASS index first-last, executions of each, samples"
    ]
    lines += [
        f"  {g['first']:>5d}-{g['last']:<5d} {g['executed_each']:>9.0f} {g['stall_samples']:>7d}"
        for g in s["segments"]
    ]
    lines += ["instructions with the most samples: SASS index, samples, main reason, SASS"]
    lines += [
        f"  {t['index']:>5d} {t['stall_samples']:>5d} {t['reason']:<24} {t['sass']}" for t in s["top_stalled"]
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--per", type=float, required=True, help="units of work of the profiled launch")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        kernel, rows = read_rows(args.csv)
        s = summarize(rows, args.per, args.top)
    except (OSError, ValueError) as e:
        print(f"ncu_sass_summary: {e}", file=sys.stderr)
        return 1
    print(render(kernel, s, args.per))
    if args.json:
        args.json.write_text(json.dumps({"kernel": kernel, "per": args.per, **s}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
