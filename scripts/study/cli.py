"""Regenerate the format study: docs/format-study.json (measured) and docs/format-study.md
(rendered from it).

    python3 scripts/format_study.py run            # everything (dumps activations if missing)
    python3 scripts/format_study.py render         # rewrite the .md from the .json, no measuring
    python3 scripts/format_study.py run --quick    # small smoke run, writes to /tmp
    python3 scripts/format_study.py tcq --json docs/format-study-tcq.json   # a 3.25-bit trellis code
                                                   # against polar3 on Gaussian blocks (study.tcq)

What `run` measures: `study.run`. The activation dump needs torch + transformers
(+ accelerate); the data files come from `python3 scripts/bootstrap.py data --qwen`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvpolar.paths import repo_root

from . import tcq
from .report import render
from .run import machine, measure

DOC_MD = repo_root() / "docs" / "format-study.md"
DOC_JSON = repo_root() / "docs" / "format-study.json"
QUICK_MD = "/tmp/format-study-quick.md"
QUICK_JSON = "/tmp/format-study-quick.json"


def cmd_run(args) -> int:
    res = measure(args)
    atomic_write_text(args.out_json, json.dumps(res, indent=1, default=float) + "\n", mkdir=True)
    atomic_write_text(args.out_md, render(res), mkdir=True)
    print(f"wrote {args.out_md} and {args.out_json} ({res['total_seconds']:.0f}s)")
    return 0


def cmd_render(args) -> int:
    res = json.loads(Path(args.out_json).read_text(encoding="utf-8"))
    atomic_write_text(args.out_md, render(res))
    print(f"wrote {args.out_md}")
    return 0


def cmd_tcq(args) -> int:
    t0 = time.time()
    rows, p3 = tcq.measure_gaussian(tuple(args.L), args.train, args.test, args.seed)
    lines = ["| code | bits/elem | rel. MSE | x bound | polar3 / it |", "|---|---|---|---|---|"]
    lines.append(f"| polar3 (kvpolar's codec) | {p3.bits:.2f} | {p3.rel_mse:.4f} | {p3.x_bound:.2f} | 1.00 |")
    for r in rows:
        lines.append(
            f"| TCQ, bitshift trellis L = {r.L} ({1 << r.L} states) | {r.bits:.2f} | {r.rel_mse:.4f} "
            f"| {r.x_bound:.2f} | {p3.rel_mse / r.rel_mse:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        cmd = "python3 scripts/format_study.py tcq " + " ".join(
            [f"--L {' '.join(map(str, args.L))}", f"--train {args.train}", f"--test {args.test}"]
        )
        doc = {
            "command": cmd,
            "machine": machine(),
            "seconds": round(time.time() - t0, 1),
            "scale_grid": [float(g) for g in tcq.SCALE_GRID],
            "polar3": dataclasses.asdict(p3),
            "tcq": [dataclasses.asdict(r) for r in rows],
        }
        out = Path(args.json)
        out = out if out.is_absolute() else repo_root() / out
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n", mkdir=True)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="format_study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="measure everything, write the .md and .json")
    r.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    r.add_argument("--layers", type=int, default=8, help="layers per model, evenly spaced (default 8)")
    r.add_argument("--n-seq", type=int, default=2, help="token windows per model (first calibrates offsets)")
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--nq", type=int, default=128, help="query positions per head")
    r.add_argument("--gauss-blocks", type=int, default=32768)
    r.add_argument("--seed", type=int, default=20250204)
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    r.add_argument("--no-dump", action="store_true", help="skip models whose activations are not cached")
    r.add_argument("--quick", action="store_true", help="smoke run: few layouts/layers, writes under /tmp")
    r.add_argument("--out-md", default=None)
    r.add_argument("--out-json", default=None)
    t = sub.add_parser("tcq", help="a 3.25-bit trellis-coded quantizer against polar3 (Gaussian blocks)")
    t.add_argument("--L", type=int, nargs="+", default=[8, 10, 12], help="trellis state bits (2^L states)")
    t.add_argument("--train", type=int, default=2048, help="training blocks of 64 values for the tables")
    t.add_argument("--test", type=int, default=2048, help="test blocks of 64 values")
    t.add_argument("--seed", type=int, default=20250204)
    t.add_argument("--json", help="write the results here (relative paths: to the repository)")
    rr = sub.add_parser("render", help="rewrite the .md from the .json (no measuring)")
    rr.add_argument("--out-md", default=str(DOC_MD))
    rr.add_argument("--out-json", default=str(DOC_JSON))
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    if args.cmd is None:
        ap.print_help()
        return 0
    if args.cmd == "run":
        if args.out_md is None:
            args.out_md = QUICK_MD if args.quick else str(DOC_MD)
        if args.out_json is None:
            args.out_json = QUICK_JSON if args.quick else str(DOC_JSON)
        return cmd_run(args)
    if args.cmd == "tcq":
        if min(args.L) <= tcq.K_BITS or max(args.L) > 14:
            ap.error(f"--L takes trellis sizes {tcq.K_BITS + 1}..14, got {args.L}")
        return cmd_tcq(args)
    return cmd_render(args)
