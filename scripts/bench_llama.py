"""Quality, speed and memory of KV-cache types in the patched llama.cpp (CPU).

    python scripts/bench_llama.py quality --model smollm2 [--chunks 4 --ctx 2048]
    python scripts/bench_llama.py quality --model qwen    [--chunks 2 --ctx 1024]
    python scripts/bench_llama.py speed   --model smollm2 [--depths 0 4096 8192]
    python scripts/bench_llama.py memory  --model smollm2 [--ctx 8192 32768]
    python scripts/bench_llama.py startup --model smollm2 [--seqs 4 --rounds 5]

Each writes docs/bench/<kind>-<model>.json (the raw figures, the machine and every command)
and prints a markdown table; scripts/write_results.py assembles docs/results.md from them.

quality: `llama-perplexity --kl-divergence` against an f16-cache base run on the SQuAD text;
K types with V f16, each with centering off and on (env LLAMA_KV_CENTER), then K+V; the polar types
also with the exact sink key of patch 0024 on (their default) and off (env LLAMA_KV_EXACT_SINK), and
the pair polar K + polar3 V also without its layer policy (patch 0034; env LLAMA_KV_LAYER_POLICY=0).
speed: `llama-bench -fa 1`, pp512 and tg64 at the given depths. memory: the KV size
llama.cpp reports at context creation. startup: the seconds a context that serves several sequences
spends decoding patch 0035's built-in text (from the tool's time-stamped log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_bench
from kvpolar import format as pformat
from kvpolar import paths
from kvpolar.atomic import atomic_write_text
from kvsetup.cpu import machine_label

REPO = paths.repo_root()

# smollm2c: SmolLM2 with centering offsets from `kvpolar calibrate` on the Paul Graham essays
# (SmolLM2 has no k bias, so without them centering has nothing to subtract).
SMOLLM2C_GGUF = "SmolLM2-135M-Instruct.Q4_1.centered.gguf"
MODELS = {"smollm2": paths.SMOLLM2_GGUF, "smollm2c": SMOLLM2C_GGUF, "qwen": paths.QWEN_GGUF}
BITS = {"f16": 16.0, "q8_0": 8.5, "q5_0": 5.5, "iq4_nl": 4.5, "q4_1": 5.0, "q4_0": 4.5}
BITS.update({f.name: f.bits_per_elem for f in pformat.FORMATS.values()})
QUALITY_K = ["q8_0", "q5_0", "iq4_nl", "q4_0", "polar", "polar3"]
SINK_K = ("polar", "polar3")  # K types with the exact sink key (patch 0024, on by default)


def run(cmd: list[str], env_extra: dict | None = None, log=None) -> str:
    env = dict(os.environ, **(env_extra or {}))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    if log is not None:
        log.append(
            {
                "cmd": " ".join(cmd),
                "env": env_extra or {},
                "rc": p.returncode,
                "s": round(time.time() - t0, 1),
            }
        )
    if p.returncode != 0:
        tail = "\n".join(out.splitlines()[-15:])
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return out


def _num(pat: str, text: str) -> float | None:
    m = re.search(pat, text)
    return float(m.group(1)) if m else None


def parse_kld(out: str) -> dict:
    return {
        "mean_kld": _num(r"Mean\s+KLD:\s+([-\d.]+)", out),
        "same_top_pct": _num(r"Same top p:\s+([-\d.]+)", out),
        "ppl_ratio": _num(r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+([-\d.e+]+)", out),
        "ppl": _num(r"Mean PPL\(Q\)\s+:\s+([-\d.e+]+)", out),
    }


def quality(args, log) -> dict:
    binp = str(paths.bin_path("llama-perplexity"))
    model = str(paths.data_file(MODELS[args.model]))
    text = str(paths.data_file(paths.SQUAD_TXT))
    common = [
        binp,
        "-m",
        model,
        "-f",
        text,
        "-c",
        str(args.ctx),
        "--chunks",
        str(args.chunks),
        "-t",
        str(args.threads),
        "-fa",
        "on",
        "-b",
        str(args.ctx),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as td:
        base = os.path.join(td, "base.kld")
        out = run([*common, "--kl-divergence-base", base, "-ctk", "f16", "-ctv", "f16"], log=log)
        rows.append(
            {
                "k": "f16",
                "v": "f16",
                "center": False,
                "bits_k": 16.0,
                "ppl": _num(r"Final estimate: PPL = ([\d.]+)", out),
                "mean_kld": 0.0,
                "same_top_pct": 100.0,
                "ppl_ratio": 1.0,
            }
        )
        # (K, V, centering, exact sink key: None where the K type has none); "off" is stock llama.cpp,
        # the defaults (centering, and the exact sink for polar K) come before the same row without it
        plan = []
        for k in QUALITY_K:
            if k in SINK_K:
                plan += [(k, "f16", False, False), (k, "f16", True, True), (k, "f16", True, False)]
            else:
                plan += [(k, "f16", False, None), (k, "f16", True, None)]
        plan += [("q4_0", "q4_0", True, None)]
        plan += [
            (k, v, True, s)
            for k, v in (("polar", "polar"), ("polar3", "polar3"), ("polar", "polar3"))
            for s in (True, False)
        ]
        plan += [("f16", "f16", True, None)]
        plan = [(*row, None) for row in plan]
        # the low-memory pair's layer policy (patch 0034, its default) off: every layer polar K + polar3 V
        at = plan.index(("polar", "polar3", True, False, None)) + 1
        plan.insert(at, ("polar", "polar3", True, True, False))
        for k, v, center, sink, policy in plan:
            if args.only and k not in args.only:
                continue
            env = {"LLAMA_KV_CENTER": "1" if center else "0"}
            if sink is not None:
                env["LLAMA_KV_EXACT_SINK"] = "1" if sink else "0"
            if policy is not None:
                env["LLAMA_KV_LAYER_POLICY"] = "1" if policy else "0"
            try:
                out = run(
                    [*common, "--kl-divergence-base", base, "--kl-divergence", "-ctk", k, "-ctv", v],
                    env_extra=env,
                    log=log,
                )
                r = parse_kld(out)
            except RuntimeError as e:
                r = {"error": str(e).splitlines()[0]}
            row = {"k": k, "v": v, "center": center, "sink": sink, "bits_k": BITS[k]}
            if policy is not None:
                row["layer_policy"] = policy
            rows.append({**row, **r})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "chunks": args.chunks, "ctx": args.ctx}


def speed(args, log) -> dict:
    binp = str(paths.bin_path("llama-bench"))
    model = str(paths.data_file(MODELS[args.model]))
    rows = []
    for kv in args.types:
        for both in (False, True):
            if kv == "f16" and both:
                continue
            ctv = kv if both else "f16"
            cmd = llama_bench.command(binp, model, kv, ctv, args.depths, args.reps, ["-t", str(args.threads)])
            for r in llama_bench.results(run(cmd, log=log)):
                rows.append({"k": kv, "v": ctv, **r})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "reps": args.reps, "threads": args.threads}


def memory(args, log) -> dict:
    binp = str(paths.bin_path("llama-completion"))
    model = str(paths.data_file(MODELS[args.model]))
    rows = []
    for ctx in args.ctx:
        for kv in ("f16", "q8_0", "q4_0", "polar", "polar3"):
            cmd = llama_bench.kv_probe_command(binp, model, kv, kv, ctx, ["-t", str(args.threads)])
            size = llama_bench.kv_size(run(cmd, log=log))
            if size is None:
                raise RuntimeError(f"no KV size line in the output of {' '.join(cmd)}")
            rows.append(
                {
                    "ctx": ctx,
                    "kv": kv,
                    "total_mib": size["total_mib"],
                    "k_mib": size["k_mib"],
                    "v_mib": size["v_mib"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


STAMP = re.compile(r"^(\d+)\.(\d\d)\.(\d{3})\.(\d{3}) ")


def stamp(line: str) -> float | None:
    """Seconds since the start of a llama.cpp tool's log line ("min.ss.ms.us I ..."), None without one."""
    m = STAMP.match(line)
    return int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6 if m else None


def startup(args, log) -> dict:
    """What patch 0035 adds to creating a context that serves several sequences: the decode of its built-in
    text, from `llama-perplexity -v`'s log (a cache for --seqs sequences, polar K and V): the time from the
    log line before kvpolar_center_fixed's "measured from N tokens" to that line."""
    binp = str(paths.bin_path("llama-perplexity"))
    model = str(paths.data_file(MODELS[args.model]))
    text = str(paths.data_file(paths.SQUAD_TXT))
    cmd = [binp, "-m", model, "-f", text, "-c", "256", "--chunks", "1", "-b", str(256 * args.seqs)]
    cmd += ["-t", str(args.threads), "-fa", "on", "-ctk", "polar", "-ctv", "polar", "-v"]
    rows = []
    for i in range(args.rounds):
        lines = run(cmd, log=log).splitlines()
        at = [j for j, ln in enumerate(lines) if "kvpolar_center_fixed:" in ln and "measured from" in ln]
        if not at:
            raise RuntimeError(f"no 'measured from N tokens' line of kvpolar_center_fixed in {' '.join(cmd)}")
        before = [t for t in map(stamp, lines[: at[0]]) if t is not None]
        end = stamp(lines[at[0]])
        if not before or end is None:
            raise RuntimeError(f"expected time-stamped log lines (-v) from {' '.join(cmd)}")
        n = int(re.search(r"measured from (\d+) tokens", lines[at[0]])[1])
        rows.append({"round": i, "tokens": n, "seconds": round(end - before[-1], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "seqs": args.seqs, "threads": args.threads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("quality", "speed", "memory", "startup"):
        p = sub.add_parser(name)
        p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--out", default=None, help="JSON path (default docs/bench/<cmd>-<model>.json)")
    q = sub.choices["quality"]
    q.add_argument("--chunks", type=int, default=4)
    q.add_argument("--ctx", type=int, default=2048)
    q.add_argument("--only", nargs="*", help="only these K types")
    s = sub.choices["speed"]
    s.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    s.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0", "polar", "polar3"])
    s.add_argument("--reps", type=int, default=3)
    m = sub.choices["memory"]
    m.add_argument("--ctx", type=int, nargs="+", default=[8192, 32768])
    u = sub.choices["startup"]
    u.add_argument("--seqs", type=int, default=4, help="sequences the cache serves (llama-server -np)")
    u.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    log: list = []
    t0 = time.time()
    res = {"quality": quality, "speed": speed, "memory": memory, "startup": startup}[args.cmd](args, log)
    res.update(
        {
            "kind": args.cmd,
            "model": args.model,
            "model_file": MODELS[args.model],
            "machine": machine_label(),
            "command": "python scripts/bench_llama.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "build": paths.build_info() if hasattr(paths, "build_info") else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.time() - t0),
            "runs": log,
        }
    )
    out = Path(args.out) if args.out else REPO / "docs" / "bench" / f"{args.cmd}-{args.model}.json"
    atomic_write_text(out, json.dumps(res, indent=1) + "\n", mkdir=True)
    print(f"wrote {out}")
    failed = [r for r in res["rows"] if "error" in r]
    if failed:  # quality goes on past a failed type; the exit status still says so
        print(f"{len(failed)} runs failed: " + "; ".join(r["error"] for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
