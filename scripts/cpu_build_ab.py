"""A/B of two bootstrap.py builds on the CPU: the polar cache write and reads a block, and llama-bench.

    python scripts/cpu_build_ab.py --a BUILD_A/bin --b BUILD_B/bin [--model smollm2] [--rounds 2]
        [--types f16 polar polar3] [--depths 0 4096] [--reps 3] [--threads N] [--json OUT]

encode: each build's CPU cache write (the CPU backend's from_float, which SET_ROWS calls) and
ggml-base's quantize_row_<type>_ref on the same Gaussian blocks, and the cache's reads by flash
attention (the CPU vec_dot of K against a float row, the SIMD decoder of V) of those blocks, in a
process of its own, timed in thread CPU time (the best of 3 passes; --block-rounds N: the two
builds' processes alternated N times, the least time kept), with the sha256 of what each wrote: the
builds must write the same bytes and read the same values, or the A/B stops. --rounds 0: only that.
bench: llama-bench -fa 1 pp512 and tg64 at each depth, K and V of each type (or K/V pair), the two builds
alternated --rounds times, the first of a round switching each round. Prints t/s of each and B / A
pooled over the rounds; --json keeps every row, the machine and both builds (llama_bench.build_info).
--same-decode CTX: before the timings, each type's logits over CTX tokens decoded one at a time
(llama-perplexity -ub 1) must be the same bytes for both builds, or the A/B stops.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import llama_bench
from kvpolar import format as pformat
from kvpolar import paths
from kvpolar.atomic import atomic_write_text
from kvsetup.cpu import machine_label
from study import ggml_lib
from study.ggml_lib import FROM_FLOAT, TO_FLOAT

MODELS = {"smollm2": paths.SMOLLM2_GGUF, "qwen": paths.QWEN_GGUF}
ENCODE_TYPES = ("polar", "polar3")


def _best(passes: int, fn) -> float:
    """The least thread CPU time of `passes` calls of fn()."""
    best = float("inf")
    for _ in range(passes):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def encode_times(bin_dir: Path, n_blocks: int, passes: int = 3) -> dict:
    """ns a block and the sha256 of the output of the CPU cache write and of the reference encoder,
    each type, in this process (one build's libraries a process)."""
    mode = getattr(ctypes, "RTLD_GLOBAL", 0)
    base = ggml_lib.load_base(bin_dir / "libggml-base.so", mode=mode)
    cpu = ggml_lib.load_cpu(bin_dir / "libggml-cpu.so", mode=mode)
    x = (np.random.default_rng(0).standard_normal(n_blocks * pformat.QK) * 3.0).astype(np.float32)
    out = {}
    for name in ENCODE_TYPES:
        fmt = pformat.get_format(name)
        fns = {
            "cache write": cpu.ggml_get_type_traits_cpu(fmt.type_id).contents.from_float,
            "reference": ggml_lib.type_traits(base, fmt.type_id).from_float_ref,
        }
        for what, fn in fns.items():
            y = np.zeros(n_blocks * fmt.type_size, np.uint8)
            best = _best(passes, lambda fn=fn, y=y: FROM_FLOAT(fn)(x.ctypes.data, y.ctypes.data, x.size))
            out[f"{name} {what}"] = {
                "ns_per_block": best * 1e9 / n_blocks,
                "sha256": hashlib.sha256(y.tobytes()).hexdigest(),
            }
            if what == "cache write":
                written = y
        out.update(_read_times(cpu, name, x, written, passes))
    return out


def _read_times(cpu: ctypes.CDLL, name: str, x: np.ndarray, y: np.ndarray, passes: int) -> dict:
    """The cache's reads by flash attention, on blocks y of type `name`: K's vec_dot against the float row x
    (one call over all the blocks) and V's SIMD decoder (ggml_cpu_dequantize_row_<name>): ns a block and the
    sha256 of what each returned."""
    fmt = pformat.get_format(name)
    n_blocks = x.size // pformat.QK
    dot = ggml_lib.VEC_DOT(cpu.ggml_get_type_traits_cpu(fmt.type_id).contents.vec_dot)
    s = ctypes.c_float()
    best = _best(passes, lambda: dot(x.size, ctypes.addressof(s), 0, y.ctypes.data, 0, x.ctypes.data, 0, 1))
    out = {
        f"{name} vec_dot (K)": {
            "ns_per_block": best * 1e9 / n_blocks,
            "sha256": hashlib.sha256(np.float32(s.value).tobytes()).hexdigest(),
        }
    }
    deq = TO_FLOAT(ggml_lib.symbol(cpu, f"ggml_cpu_dequantize_row_{name}"))
    v = np.zeros(x.size, np.float32)
    best = _best(passes, lambda: deq(y.ctypes.data, v.ctypes.data, v.size))
    out[f"{name} dequantize (V)"] = {
        "ns_per_block": best * 1e9 / n_blocks,
        "sha256": hashlib.sha256(v.tobytes()).hexdigest(),
    }
    return out


def _encode_in_child(bin_dir: Path, n_blocks: int) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    p = subprocess.run(
        [sys.executable, __file__, "_encode", str(bin_dir), str(n_blocks)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"the encoder timing of {bin_dir} failed (exit {p.returncode}): {p.stderr[-800:]}")
    return json.loads(p.stdout)


def block_times(builds: dict[str, Path], n_blocks: int, rounds: int) -> dict:
    """encode_times of each build, the builds' processes alternated `rounds` times (A B, B A, ...): per key
    the least ns a block over the rounds (the machine's drift and scatter between processes reach 20 %
    here), and a ValueError where one build's output differs between its rounds."""
    out: dict[str, dict] = {}
    for rnd in range(max(1, rounds)):
        for label in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
            r = _encode_in_child(builds[label].resolve(), n_blocks)
            mine = out.setdefault(label, {})
            for key, v in r.items():
                if key in mine and mine[key]["sha256"] != v["sha256"]:
                    raise ValueError(f"build {label} wrote or read different values in two rounds: {key}")
                if key not in mine or v["ns_per_block"] < mine[key]["ns_per_block"]:
                    mine[key] = v
    return out


def pool(rows: list[dict]) -> list[dict]:
    """Per (type, test, depth): the mean t/s of A and of B over the rounds, B / A of the means, and each
    round's B / A (the scatter the pooled ratio hides)."""
    out = []
    for key in dict.fromkeys((r["type"], r["test"], r["depth"]) for r in rows):
        mine = [r for r in rows if (r["type"], r["test"], r["depth"]) == key]
        tps = {lab: {r["round"]: r["tps"] for r in mine if r["build"] == lab} for lab in ("A", "B")}
        a, b = (float(np.mean(list(tps[lab].values()))) for lab in ("A", "B"))
        rounds = [tps["B"][n] / tps["A"][n] for n in sorted(tps["A"]) if n in tps["B"]]
        out.append(
            {"type": key[0], "test": key[1], "depth": key[2], "A": a, "B": b, "B/A": b / a, "rounds": rounds}
        )
    return out


def decode_logits_sha(bin_dir: Path, model: str, ktype: str, vtype: str, ctx: int, threads: int) -> str:
    """sha256 of the logits llama-perplexity saves (--kl-divergence-base) over one chunk of ctx SQuAD
    tokens decoded one token an ubatch (-ub 1: flash attention's decode step from the 512th key on),
    K ktype, V vtype."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.bin"
        cmd = [
            str(bin_dir / "llama-perplexity"),
            *("-m", model, "-f", str(paths.data_file(paths.SQUAD_TXT)), "-c", str(ctx), "--chunks", "1"),
            *("-b", str(ctx), "-ub", "1", "-fa", "on", "-t", str(threads), "-ctk", ktype, "-ctv", vtype),
            *("--kl-divergence-base", str(out)),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"llama-perplexity failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-800:]}"
            )
        with out.open("rb") as f:  # (about 100 MB for SmolLM2 at 1024 tokens: hashed in pieces)
            return hashlib.file_digest(f, "sha256").hexdigest()


def kv_pair(text: str) -> tuple[str, str]:
    """--types' entry: "polar" for K and V polar, "polar/f16" for polar K and f16 V."""
    k, _, v = text.partition("/")
    if not k or (_ and not v) or "/" in v:
        raise ValueError(f"expected a cache type or K/V (e.g. polar, polar/f16), got {text!r}")
    return k, v or k


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_encode":
        print(json.dumps(encode_times(Path(sys.argv[2]), int(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, type=Path, help="bin/ of build A (the baseline)")
    ap.add_argument("--b", required=True, type=Path, help="bin/ of build B")
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument(
        "--types",
        nargs="+",
        default=["f16", "polar", "polar3"],
        help="cache types, K and V alike (polar), or K/V pairs (polar/f16)",
    )
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="llama-bench rounds (0: the block timings only)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--blocks", type=int, default=20000, help="blocks of the block timings")
    ap.add_argument(
        "--block-rounds",
        type=int,
        default=1,
        help="block timings: the builds' processes alternated this many times, the least time of each kept",
    )
    ap.add_argument(
        "--same-decode",
        type=int,
        default=0,
        metavar="CTX",
        help="first check that both builds decode CTX tokens one at a time to the same logits, each type "
        "(llama-perplexity; 0: not checked)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:  # parsed once, refused before the timings start
        pairs = {t: kv_pair(t) for t in args.types}
    except ValueError as e:
        ap.error(f"--types: {e}")
    builds = {"A": args.a, "B": args.b}
    for label, d in builds.items():
        if not (d / "llama-bench").is_file():
            ap.error(f"--{label.lower()}: expected a build's bin/ with llama-bench, got {d}")
    t_start = time.time()
    enc = block_times(builds, args.blocks, args.block_rounds)
    for key in enc["A"]:
        if enc["A"][key]["sha256"] != enc["B"][key]["sha256"]:
            print(f"the builds write or read different values: {key}", file=sys.stderr)
            return 1
        a, b = enc["A"][key]["ns_per_block"], enc["B"][key]["ns_per_block"]
        print(f"{key}: A {a:.0f} ns/block, B {b:.0f} ns/block, A / B {a / b:.2f}x (same values)")
    model = str(paths.data_file(MODELS[args.model]))
    same_decode = {}
    for t in args.types if args.same_decode else ():
        sha = {
            lab: decode_logits_sha(builds[lab], model, *pairs[t], args.same_decode, args.threads)
            for lab in "AB"
        }
        if sha["A"] != sha["B"]:
            print(f"the builds decode to different logits: {t} ({args.same_decode} tokens)", file=sys.stderr)
            return 1
        same_decode[t] = sha["A"]
        print(
            f"{t}: the same logits over {args.same_decode} tokens decoded one at a time "
            f"(sha256 {sha['A'][:16]})"
        )
    rows = []
    for rnd in range(args.rounds):
        order = ["A", "B"] if rnd % 2 == 0 else ["B", "A"]
        for label in order:
            for t in args.types:
                ktype, vtype = pairs[t]
                cmd = llama_bench.command(
                    str(builds[label] / "llama-bench"),
                    model,
                    ktype,
                    vtype,
                    args.depths,
                    args.reps,
                    ["-t", str(args.threads)],
                )
                p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if p.returncode != 0:
                    print(f"llama-bench failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-800:]}")
                    return 1
                for r in llama_bench.results(p.stdout):
                    rows.append({"build": label, "round": rnd, "type": t, **r})
                    print(json.dumps(rows[-1]), flush=True)
    pooled = pool(rows)
    print("| K / V | test | A t/s | B t/s | B / A | each round's B / A |\n|---|---|---|---|---|---|")
    for r in pooled:
        each = ", ".join(f"{x:.3f}" for x in r["rounds"])
        print(
            f"| {r['type']} | {r['test']} @ d{r['depth']} | {r['A']:.1f} | {r['B']:.1f} | {r['B/A']:.3f} "
            f"| {each} |"
        )
    if args.json:
        doc = {
            "command": llama_bench.command_line("cpu_build_ab.py", argv),
            "machine": machine_label(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.time() - t_start),
            "builds": {lab: llama_bench.build_info(d) for lab, d in builds.items()},
            "encode": enc,
            "same_decode": {"tokens": args.same_decode, "sha256": same_decode},
            "pooled": pooled,
            "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
