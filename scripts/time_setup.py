#!/usr/bin/env python3
"""Time the README's two commands on a fresh clone: cold (empty cache) and warm.

    python3 scripts/time_setup.py            # clone HEAD to a temp dir, empty cache, no ccache
    python3 scripts/time_setup.py --keep     # keep the temp dir (its path is printed)

Steps, each timed as a whole process in the clone: `python3 scripts/bootstrap.py all` with an
empty $KVPOLAR_CACHE and KVPOLAR_NO_CCACHE=1 (cold: downloads, venv, compile, smoke run), the
same again (warm), then `./scripts/test.sh` and `./scripts/demo.sh` (warm). Standard library
only. Writes docs/setup-times.json and the table between the setup-times markers in README.md.
Exits non-zero when any step failed (the table then says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- setup-times:begin -->", "<!-- setup-times:end -->"
DEMO_BEGIN, DEMO_END = "<!-- demo-output:begin -->", "<!-- demo-output:end -->"
STEPS = (
    ("bootstrap, cold (empty cache, no ccache)", ["python3", "scripts/bootstrap.py", "all"]),
    ("bootstrap, warm", ["python3", "scripts/bootstrap.py", "all"]),
    ("./scripts/test.sh, warm", ["./scripts/test.sh"]),
    ("./scripts/demo.sh, warm", ["./scripts/demo.sh"]),
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_s(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.0f} s" if s >= 60 else f"{s:.1f} s"


def render(res: dict) -> str:
    lines = [
        f"Measured by `{res['command']}` on {res['date']} (commit {res['commit']}): {res['machine']}.",
        "",
        "| step | wall time | exit |",
        "|---|---|---|",
    ]
    for st in res["steps"]:
        lines.append(f"| {st['step']} | {fmt_s(st['seconds'])} | {st['exit']} |")
    return "\n".join(lines)


def demo_table(log: str) -> str:
    """The demo's side-by-side table and answers, from its output (the '== kvpolar demo' header on)."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("== kvpolar demo")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("full logs:")), len(lines))
    if start is None:
        return ""
    keep = [line for line in lines[start:end] if not line.lstrip().startswith(("logs:", "-- "))]
    return "\n".join(keep).strip()


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        return text
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + body + "\n" + end + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone and cache")
    args = ap.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="kvpolar-time-setup-"))
    clone = tmp / "kvpolar"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "KVPOLAR_CACHE": str(tmp / "cache"), "KVPOLAR_NO_CCACHE": "1"}
    for k in ("KVPOLAR_BUILD", "KVPOLAR_REPO", "KVPOLAR_PYTHON", "KVPOLAR_VENV", "LLAMA_CPP_LIB_PATH"):
        env.pop(k, None)
    steps = []
    for name, cmd in STEPS:
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        with open(tmp / f"step{len(steps)}.log", "w") as logf:
            rc = subprocess.run(cmd, cwd=clone, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
        steps.append(
            {"step": name, "command": " ".join(cmd), "seconds": round(time.time() - t0, 1), "exit": rc}
        )
        print(f"   {fmt_s(steps[-1]['seconds'])}, exit {rc} (log {logf.name})", flush=True)
    res = {
        "command": "python3 scripts/time_setup.py",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "steps": steps,
    }
    out = ROOT / "docs" / "setup-times.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    readme = replace_block((ROOT / "README.md").read_text(), BEGIN, END, render(res))
    demo = demo_table((tmp / f"step{len(STEPS) - 1}.log").read_text(errors="replace"))
    if demo and steps[-1]["exit"] == 0:
        note = f"Output of the warm `./scripts/demo.sh` step above ({res['machine']}, commit {commit}):"
        readme = replace_block(readme, DEMO_BEGIN, DEMO_END, note + "\n\n```\n" + demo + "\n```")
    (ROOT / "README.md").write_text(readme)
    print(render(res))
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(st["exit"] != 0 for st in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
