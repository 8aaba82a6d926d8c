#!/usr/bin/env python3
"""Issue 12, lever 3 in llama.cpp: which layers' K and V are worth their bits (a per-layer policy).

    python3 scripts/layer_policy.py scan --bin BUILD/bin --model M [--group G] [--json out.json]
    python3 scripts/layer_policy.py eval --bin BUILD/bin --model M --policy V/K ... [--any-bits] [--json ...]
    python3 scripts/layer_policy.py speed --bin build/bin [--model M ...] [--json out.json]
    python3 scripts/layer_policy.py render out.json

The low-memory pair is polar K + polar3 V (3.75 bits/elem). A policy at the same average gives some
layers polar V (polar/polar, 4.25) and as many other layers polar3 K (polar3/polar3, 3.25); both pairs
exist on the GPU too. `scan` measures, one group of G layers at a time, what each move is worth by KLD
against the uniform pair: `v_up` (the group's V polar: the KLD it saves) and `k_down` (the group's K
polar3: the KLD it costs). It reads the second half of the SQuAD text, so that `eval` of a policy chosen
from it (on the first chunks of the text, as every other KLD in docs/quality-levers.md) is not scored on
the text it was chosen on. `eval` runs the pair as built ("default"), with LLAMA_KV_LAYER_POLICY=0
("uniform"; patch 0034's switch), q4_0 K + q4_0 V (issue 12's target) and each --policy, with
quality_levers.py's settings; the JSON records the build.

`scan` and --policy need a build with a measurement hack: LLAMA_KV_LAYER_K / LLAMA_KV_LAYER_V =
"TYPE:LIST" give those layers TYPE instead of -ctk / -ctv. The hack
patches/experiments/session21-layer-types-measure.diff is on patches 0001-0033 (that build has no
LLAMA_KV_LAYER_POLICY, so its "default" and "uniform" rows are the same run twice);
session29-layer-types-measure.diff is on the series through 0040, where either variable, when set, replaces
patch 0034's policy for its tensor. Both variables are always set (an empty LIST: every layer at -ctk /
-ctv), so a row means the same on both builds. --any-bits allows policies that do not keep 3.75 bits/elem
(as many V-up as K-down layers); every row records its bits/elem.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gguf import GGUFReader

import llama_bench
from bench_llama import BITS
from kvpolar.atomic import atomic_write_text
from kvpolar.paths import data_file
from kvsetup.cpu import cpu_model
from quality_levers import MODELS, kld_base, kld_row, tail_text

log = logging.getLogger("layer_policy")

PRESET = ("polar", "polar3")


def n_layers(model: str) -> int:
    r = GGUFReader(str(data_file(MODELS[model]["gguf"])))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    f = r.fields[f"{arch}.block_count"]
    return int(f.parts[f.data[0]][0])


def span(layers: list[int]) -> str:
    """[0, 1, 2, 7] -> "0-2,7" (the hack's LIST)."""
    out, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(out)


def policy_env(v_up: list[int], k_down: list[int]) -> dict:
    """Both variables, also for an empty list (every layer at -ctk / -ctv: with the session-29 hack a
    variable left unset would leave patch 0034's policy in place for its tensor)."""
    return {
        "LLAMA_KV_LAYER_V": "polar:" + span(sorted(v_up)),
        "LLAMA_KV_LAYER_K": "polar3:" + span(sorted(k_down)),
    }


def policy_bits(n: int, v_up: list[int], k_down: list[int]) -> float:
    """Bits/elem of polar K + polar3 V over n layers (K and V rows of the same size) with the layers v_up
    given polar V and k_down polar3 K."""
    k = sum(BITS["polar3"] if il in k_down else BITS["polar"] for il in range(n))
    v = sum(BITS["polar"] if il in v_up else BITS["polar3"] for il in range(n))
    return (k + v) / (2 * n)


def header(args, needs_hack: bool) -> dict:
    """The machine and the build of a result. A bootstrap.py build records its key and series; a
    measurement build made by hand (the hack on 0001-0033) has none. needs_hack: the run sets
    LLAMA_KV_LAYER_K/_V, which a build with patch 0034 (and without the hack) would ignore."""
    build = llama_bench.build_info(args.bin, required=False)
    if needs_hack and build and LAYER_POLICY_PATCH in llama_bench.llama_patch_numbers(build["patches"]):
        raise SystemExit(
            f"{args.cmd}: per-layer types need a measurement build (patches 0001-0033 with "
            f"patches/experiments/session21-layer-types-measure.diff, or the series with "
            f"session29-layer-types-measure.diff, built by hand), got {llama_bench.build_label(build)}"
        )
    return {"machine": cpu_model(), "nproc": os.cpu_count(), "build": build}


# patch 0034: the layer policy (LLAMA_KV_LAYER_POLICY), which the measurement build does not have
LAYER_POLICY_PATCH = "0034"


class Runner:
    """KLD rows of one model and text, two llama-perplexity processes (-t 1) at a time."""

    def __init__(self, args, model: str, text: Path | None, tag: str):
        self.bin = Path(args.bin)
        self.model = model
        self.text = text
        self.chunks = args.chunks or MODELS[model]["chunks"]
        self.base = kld_base(self.bin, model, self.chunks, Path(args.work), text, tag)
        self.jobs = args.jobs

    def one(self, row: dict) -> dict:
        res = kld_row(
            self.bin, self.model, self.base, row["ctk"], row["ctv"], row["env"], self.chunks, text=self.text
        )
        row = {"model": self.model, "chunks": self.chunks, **row, **res}
        log.info("%s", row)
        return row

    def run(self, rows: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(self.jobs) as ex:
            return list(ex.map(self.one, rows))


def run_scan(args) -> dict:
    out = {**header(args, needs_hack=True), "text": "squad second half", "models": {}}
    for model in args.model:
        n = n_layers(model)
        groups = [list(range(a, min(a + args.group, n))) for a in range(0, n, args.group)]
        env0 = policy_env([], [])
        rows = [{"move": "preset", "layers": [], "ctk": PRESET[0], "ctv": PRESET[1], "env": env0}]
        for g in groups:
            rows.append(
                {"move": "v_up", "layers": g, "ctk": "polar", "ctv": "polar3", "env": policy_env(g, [])}
            )
            rows.append(
                {"move": "k_down", "layers": g, "ctk": "polar", "ctv": "polar3", "env": policy_env([], g)}
            )
        res = Runner(args, model, tail_text(Path(args.work)), "tail").run(rows)
        base = res[0]["kld"]
        for r in res[1:]:
            r["delta"] = r["kld"] - base
        out["models"][model] = {"n_layer": n, "group": args.group, "rows": res}
    return out


def choose(scan: dict, model: str, pairs: int) -> tuple[list[int], list[int]]:
    """The `pairs` groups whose V saves most and, from the rest, the `pairs` whose K costs least."""
    rows = scan["models"][model]["rows"]
    v = sorted((r for r in rows if r["move"] == "v_up"), key=lambda r: r["delta"])
    picked_v = v[:pairs]
    taken = {tuple(r["layers"]) for r in picked_v}
    k = sorted(
        (r for r in rows if r["move"] == "k_down" and tuple(r["layers"]) not in taken),
        key=lambda r: r["delta"],
    )
    picked_k = k[:pairs]
    return sorted(x for r in picked_v for x in r["layers"]), sorted(x for r in picked_k for x in r["layers"])


def parse_layers(s: str) -> list[int]:
    out: list[int] = []
    for item in filter(None, s.split(",")):
        a, _, b = item.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def run_eval(args) -> dict:
    tail = args.text == "tail"
    out = {
        **header(args, needs_hack=bool(args.policy)),
        "text": "squad second half" if tail else "squad first chunks",
        "rows": [],
    }
    for model in args.model:
        n = n_layers(model)
        pair = policy_bits(n, [], [])  # the pair's 3.75, also with patch 0034's policy (the same bytes)
        rows = [
            {"policy": "default", "ctk": PRESET[0], "ctv": PRESET[1], "bits": pair, "env": {}},
            {
                "policy": "uniform",
                "ctk": PRESET[0],
                "ctv": PRESET[1],
                "bits": pair,
                "env": {"LLAMA_KV_LAYER_POLICY": "0"},
            },
            {"policy": "q4_0 K+V", "ctk": "q4_0", "ctv": "q4_0", "bits": BITS["q4_0"], "env": {}},
        ][: 0 if args.policies_only else 3]
        for spec in args.policy:
            v_s, _, k_s = spec.partition("/")
            v_up, k_down = parse_layers(v_s), parse_layers(k_s)
            if len(v_up) != len(k_down) and not args.any_bits:
                raise SystemExit(
                    f"--policy {spec}: expected as many V-up as K-down layers (3.75 bits), "
                    f"got {len(v_up)} and {len(k_down)} (--any-bits allows it)"
                )
            bad = [il for il in v_up + k_down if not 0 <= il < n]
            if bad:
                raise SystemExit(f"--policy {spec}: expected layers 0-{n - 1} of {model}, got {bad}")
            rows.append(
                {
                    "policy": spec,
                    "ctk": "polar",
                    "ctv": "polar3",
                    "bits": policy_bits(n, v_up, k_down),
                    "env": policy_env(v_up, k_down),
                }
            )
        text = tail_text(Path(args.work)) if tail else None
        out["rows"] += Runner(args, model, text, "tail" if tail else "").run(rows)
    return out


def run_speed(args) -> dict:
    """llama-bench pp512 / tg64 of polar K + polar3 V with the layer policy (default) and without
    (LLAMA_KV_LAYER_POLICY=0), alternated --rounds times, the first of a round switching each round (the
    same llama-bench settings as bench_llama.py)."""
    out = {**header(args, needs_hack=False), "rows": []}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_KV_")}
    for model in args.model:
        cmd = llama_bench.command(
            str(Path(args.bin) / "llama-bench"), str(data_file(MODELS[model]["gguf"])), *PRESET,
            args.depths, args.reps, ["-t", str(args.threads)],
        )  # fmt: skip
        pair = [("default", {}), ("uniform", {"LLAMA_KV_LAYER_POLICY": "0"})]
        for rnd in range(args.rounds):
            for policy, env in pair if rnd % 2 == 0 else pair[::-1]:  # each goes first every other round
                p = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, check=False)
                if p.returncode:
                    raise RuntimeError(f"llama-bench failed ({p.returncode}):\n{p.stderr[-3000:]}")
                for r in llama_bench.results(p.stdout):
                    out["rows"].append({"model": model, "policy": policy, "round": rnd, **r})
                    log.info("%s", out["rows"][-1])
    return out


def speed_means(res: dict) -> list[tuple[str, str, int, float, float]]:
    """(model, test, depth, mean t/s with the policy, mean t/s uniform) of a `speed` result (all rounds)."""
    out = []
    for key in dict.fromkeys((r["model"], r["test"], r["depth"]) for r in res["rows"]):
        tps = {
            pol: [
                r["tps"]
                for r in res["rows"]
                if (r["model"], r["test"], r["depth"]) == key and r["policy"] == pol
            ]
            for pol in ("default", "uniform")
        }
        if all(tps.values()):
            out.append((*key, *(sum(v) / len(v) for v in tps.values())))
    return out


def render(res: dict) -> str:
    lines = []
    if res.get("rows") and "round" in res["rows"][0]:
        lines += [
            "| model | test | depth | default (layer policy) t/s | uniform t/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for m, t, d, a, b in speed_means(res):
            lines.append(f"| {m} | {t} | {d} | {a:.1f} | {b:.1f} | {a / b:.3f} |")
        return "\n".join(lines)
    if "models" in res:
        for model, m in res["models"].items():
            rows = m["rows"]
            lines += [
                f"{model} ({m['n_layer']} layers, groups of {m['group']}; "
                f"the uniform pair {rows[0]['kld']:.4f}):",
                "",
                "| layers | V polar: KLD change | K polar3: KLD change |",
                "|---|---|---|",
            ]
            by = {}
            for r in rows[1:]:
                by.setdefault(tuple(r["layers"]), {})[r["move"]] = r["delta"]
            for g, d in by.items():
                lines.append(f"| {span(list(g))} | {d['v_up']:+.4f} | {d['k_down']:+.4f} |")
            lines.append("")
    else:
        lines += [
            "| model | K+V (policy: V polar / K polar3 layers) | bits/elem | mean KLD |",
            "|---|---|---|---|",
        ]
        for r in res["rows"]:
            b = f"{r['bits']:.4g}" if "bits" in r else "-"  # (JSONs before session 29 have none)
            lines.append(f"| {r['model']} | {r['policy']} | {b} | {r['kld']:.4f} ± {r['kld_pm']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd")
    for name in ("scan", "eval", "speed"):
        p = sub.add_parser(name)
        p.add_argument(
            "--bin", required=True, help="the build's bin/ (scan and --policy: the measurement build's)"
        )
        p.add_argument("--model", nargs="+", default=["smollm2-135m"], choices=list(MODELS))
        p.add_argument("--chunks", type=int, help="chunks (default: 4 for SmolLM2, 2 for Qwen)")
        p.add_argument("--work", default="/tmp/quality_levers", help="base logits go here")
        p.add_argument("--jobs", type=int, default=2, help="llama-perplexity processes at a time")
        p.add_argument("--json", help="write the results here")
        if name == "scan":
            p.add_argument("--group", type=int, default=3, help="layers a group")
        elif name == "speed":
            p.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
            p.add_argument("--reps", type=int, default=3)
            p.add_argument(
                "--rounds",
                type=int,
                default=6,
                help="default / uniform alternations (2 were too few, session 21)",
            )
            p.add_argument("--threads", type=int, default=os.cpu_count())
        else:
            p.add_argument(
                "--policy",
                nargs="*",
                default=[],
                help="V_UP/K_DOWN layer lists, e.g. 0-2/27-29 (the hack build)",
            )
            p.add_argument(
                "--text",
                choices=("head", "tail"),
                default="head",
                help="the first chunks of SQuAD (default) or the scan's second half",
            )
            p.add_argument(
                "--any-bits",
                action="store_true",
                help="allow --policy rows with more V-up than K-down layers (or fewer): not 3.75 bits/elem",
            )
            p.add_argument(
                "--policies-only",
                action="store_true",
                help="only the --policy rows (not default, uniform, q4_0)",
            )
    p = sub.add_parser("render")
    p.add_argument("json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.cmd is None:
        ap.print_help()
        return 0
    if args.cmd == "render":
        print(render(json.loads(Path(args.json).read_text())))
        return 0
    res = {"scan": run_scan, "eval": run_eval, "speed": run_speed}[args.cmd](args)
    res["command"] = llama_bench.command_line("layer_policy.py", argv)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n", mkdir=True)
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
