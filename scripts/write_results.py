"""Assemble docs/results.md from the raw benchmark files.

    python scripts/write_results.py

Reads docs/bench/{quality,speed,memory}-<model>.json (written by scripts/bench_llama.py),
docs/bench/profile-decode-<model>.json (scripts/profile_decode_cpu.py) and docs/results-gpu.md
(written by scripts/bench_gpu.py); every table names the command and the machine it came from.
Nothing here is typed by hand. Also draws the figures (scripts/figures.py) into docs/figures/ and
embeds them, each with a caption naming its raw files and commands.
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
from pathlib import Path

import figures
from ab_llama_gpu import device_of, env_key, mean_ci95, per_run_ratios, pool, summary_lines
from kvpolar.atomic import atomic_write_text
from layer_policy import LAYER_POLICY_PATCH, speed_means
from llama_bench import build_label, llama_patch_numbers
from profile_decode_cpu import cpu_totals
from profile_decode_cpu import render as profile_rows

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "docs" / "bench"
OUT = REPO / "docs" / "results.md"


def _load(kind: str, model: str) -> dict | None:
    p = BENCH / f"{kind}-{model}.json"
    return json.loads(p.read_text()) if p.exists() else None


def model_files(kind: str, model: str) -> list[Path]:
    """docs/bench/KIND-MODEL.json, then its variants KIND-MODEL-SUFFIX.json: another machine
    (speed-smollm2-avx2.json: a VM without AVX-512, whose CPU paths differ), another depth (-d4096 of
    profile_decode_cpu.py --depth), or both."""
    main = BENCH / f"{kind}-{model}.json"
    variants = sorted(BENCH.glob(f"{kind}-{model}-*.json"), key=lambda p: (p.stem.count("-"), p.name))
    return [main] * main.exists() + variants  # (a machine's own file before its depths)


def _src(d: dict) -> str:
    build = d.get("build", {})
    patches = build.get("patches", [])
    built = f", build {build['key']} ({len(patches)} patches)" if build.get("key") else ""
    return f"Command: `{d['command']}` — {d['machine']}, {d['date']}, {d['seconds']} s{built}."


def quality_table(d: dict) -> list[str]:
    out = [
        f"### KV-cache quality: {d['model_file']}, {d['chunks']} chunks x {d['ctx']} tokens",
        "",
        _src(d),
        "",
        "| K | V | centering | exact sink key | K bits/elem | mean KLD | same top token | PPL ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        sink = {True: "on", False: "off"}.get(r.get("sink"), "-")
        v = f"{r['v']} (uniform layers)" if r.get("layer_policy") is False else r["v"]
        if "error" in r:
            out.append(
                f"| {r['k']} | {v} | {'on' if r['center'] else 'off'} | {sink} | {r['bits_k']} "
                f"| error: {r['error']} | | |"
            )
            continue
        out.append(
            f"| {r['k']} | {v} | {'on' if r['center'] else 'off'} | {sink} | {r['bits_k']:g} "
            f"| {r['mean_kld']:.4f} "
            f"| {r['same_top_pct']:.1f} % | {r['ppl_ratio']:.3f} |"
        )
    patches = _patches(d)
    pair = any(r["k"] == "polar" and r["v"] == "polar3" for r in d["rows"])
    if pair and LAYER_POLICY_PATCH not in patches:
        out += [
            "",
            "The polar / polar3 rows are uniform (every layer polar K + polar3 V): this build predates "
            f"patch {LAYER_POLICY_PATCH}, whose layer policy is now that pair's default (its rows: "
            '"The low-memory pair\'s layer policy" below).',
        ]
    elif pair:
        out += [
            "",
            f"polar / polar3 (3.75 bits/elem): the layer policy of patch {LAYER_POLICY_PATCH} (the default: "
            "V polar in the first round(L / 10) layers, K polar3 in the last as many) unless marked uniform "
            "(`LLAMA_KV_LAYER_POLICY=0`). The K bits/elem column gives -ctk's type.",
        ]
    return [*out, ""]


def cpu_ab_tables() -> list[str]:
    """docs/bench/cpu-ab-*.json (scripts/cpu_build_ab.py): two builds on the CPU, the cache write's encoder
    a block (same bytes checked) and llama-bench pooled over the alternated rounds."""
    out: list[str] = []
    for f in sorted(BENCH.glob("cpu-ab-*.json")):
        d = json.loads(f.read_text())
        a, b = (build_label(d["builds"][x]) for x in ("A", "B"))
        out += [
            f"### Two builds on the CPU: {f.stem.removeprefix('cpu-ab-')}",
            "",
            f"Command: `{d['command']}` — {d['machine']}, {d['date']}, {d['seconds']} s. A: {a}; B: {b}.",
            "",
            "| a block written or read (least thread CPU time) | A ns | B ns | A / B | output |",
            "|---|---|---|---|---|",
        ]
        for key, ra in d["encode"]["A"].items():
            rb = d["encode"]["B"][key]
            same = "same" if ra["sha256"] == rb["sha256"] else "differ"
            out.append(
                f"| {key} | {ra['ns_per_block']:.0f} | {rb['ns_per_block']:.0f} | "
                f"{ra['ns_per_block'] / rb['ns_per_block']:.2f}x | {same} |"
            )
        sd = d.get("same_decode", {})
        if sd.get("tokens"):
            out += [
                "",
                f"Decoded one token at a time (llama-perplexity -ub 1, {sd['tokens']} SQuAD tokens), both "
                f"builds give the same logits, byte for byte, for {', '.join(sd['sha256'])}.",
            ]
        if not d["rows"]:  # (--rounds 0: the block timings only)
            out.append("")
            continue
        rounds = 1 + max(r["round"] for r in d["rows"])
        out += [
            "",
            f"| K / V | test | A t/s | B t/s | B / A (pooled over {rounds} alternated rounds) "
            "| each round's B / A |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['type']} | {r['test']} @ d{r['depth']} | {r['A']:.1f} | {r['B']:.1f} | {r['B/A']:.3f} | "
            + ", ".join(f"{x:.2f}" for x in r["rounds"])
            + " |"
            for r in d["pooled"]
        ]
        out.append("")
    return out


def cpu_extras_section() -> list[str]:
    """docs/bench/cpu-extras/pass*.json (ab_llama_gpu.py --set cpu-extras --cpu, several passes) as its
    `summarize` table: tg64 at depth 0 with each of polar's graph options off, as the same-run ratio to f16;
    each option's interval is held against the default polar row's."""
    runs = sorted((BENCH / "cpu-extras").glob("pass*.json"))
    if len(runs) < 2:
        return []
    docs = [json.loads(f.read_text()) for f in runs]
    per_run = [pool([d], 0) for d in docs]
    default = mean_ci95(per_run_ratios(per_run, ("polar/polar", "-")))
    apart = []
    for key in per_run[0]:
        if key[0] != "polar/polar" or key[1] == "-":
            continue
        m, h = mean_ci95(per_run_ratios(per_run, key))
        if abs(m - default[0]) > h + default[1]:
            apart.append(f"{key[1]} ({m:.3f} against {default[0]:.3f})")
    reading = (
        "Every option's interval overlaps the default's: on this machine no option's cost at depth 0 "
        "stands out of the run-to-run scatter."
        if not apart
        else "Apart from the default beyond both intervals: " + "; ".join(apart) + "."
    )
    paths = [f.relative_to(REPO).as_posix() for f in runs]
    body = summary_lines(docs, paths, 0, [])[2:]  # without its title line and the blank after it
    return ["### What polar's graph options cost on the CPU at depth 0", "", *body, "", reading, ""]


def layer_policy_table() -> list[str]:
    """docs/layer-policy/eval-<model>.json (scripts/layer_policy.py eval on a build with patch 0034): the
    pair polar K + polar3 V with its default layer policy, uniform, and q4_0 K+V, same runs."""
    files = sorted((REPO / "docs" / "layer-policy").glob("eval-*.json"))
    if not files:
        return []
    out = [
        "### The low-memory pair's layer policy (polar K + polar3 V, 3.75 bits/elem)",
        "",
        "Patch 0034: V polar in the first round(L / 10) of a model's L layers with a KV cache, K polar3 in "
        "the last as many (the same bytes); `LLAMA_KV_LAYER_POLICY=0` keeps every layer at polar K + "
        "polar3 V. Mean KLD against f16, same runs ([`quality-levers.md`](quality-levers.md), session 21).",
        "",
        "| model | polar / polar3, layer policy (default) | uniform (`LLAMA_KV_LAYER_POLICY=0`) | change "
        "| q4_0 / q4_0 (issue 12's target) | command, machine, build |",
        "|---|---|---|---|---|---|",
    ]
    for f in files:
        d = json.loads(f.read_text())
        for model in dict.fromkeys(r["model"] for r in d["rows"]):
            rows = {r["policy"]: r for r in d["rows"] if r["model"] == model}
            a, u, q = rows.get("default"), rows.get("uniform"), rows.get("q4_0 K+V")
            if not (a and u and q):
                continue
            out.append(
                f"| {model} ({a['chunks']} chunks) | {a['kld']:.4f} ± {a['kld_pm']:.4f} | {u['kld']:.4f} ± "
                f"{u['kld_pm']:.4f} | {100 * (a['kld'] / u['kld'] - 1):+.1f} % | "
                f"{q['kld']:.4f} ± {q['kld_pm']:.4f} "
                f"({'met' if a['kld'] <= q['kld'] else 'missed'}) | `{d['command']}`, {d['machine']}, "
                f"{build_label(d.get('build'))} |"
            )
    for f in sorted((REPO / "docs" / "layer-policy").glob("speed-*.json")):
        d = json.loads(f.read_text())
        ratios = [f"{t} @ {depth} {a / u:.3f}" for _, t, depth, a, u in speed_means(d)]
        out += [
            "",
            f"Speed on the CPU, {d['rows'][0]['model']} ({d['machine']}, {d['nproc']} cores, "
            f"{build_label(d.get('build'))}; `{d['command']}`, layer policy against uniform, llama-bench t/s "
            f"ratios pooled over {1 + max(r['round'] for r in d['rows'])} alternations): "
            + ", ".join(ratios)
            + ".",
        ]
    return [*out, ""]


def multiseq_table() -> list[str]:
    """docs/quality-levers-kld-multiseq-*.json (scripts/quality_levers.py kld --layout ...): polar K with
    a cache that serves several sequences, before patch 0035 (the model's K offsets) and with it (offsets
    from a built-in text), next to one sequence and to the offsets of the first batch of all."""
    docs = REPO / "docs"

    def load(name: str) -> dict | None:
        return json.loads((docs / name).read_text()) if (docs / name).is_file() else None

    def cell(r: dict | None) -> str:
        return f"{r['kld']:.4f} ± {r['kld_pm']:.4f}" if r else "-"

    out: list[str] = []
    sources: list[str] = []
    for model in ("smollm2-135m", "qwen2.5-coder-1.5b"):
        before = load(f"quality-levers-kld-multiseq-{model}.json")
        after = load(f"quality-levers-kld-multiseq-0035-{model}.json")
        if not (before and after):
            continue
        if not out:
            out = [
                "### Several sequences in one cache (llama-server's parallel slots)",
                "",
                "Mean KLD against f16, the chunks of the runs above decoded as sequences of one cache for 4 "
                "(llama-perplexity -b = 4 x -c, as llama-server -np 4: a stream each; with -kvu one unified "
                "stream, llama-server's default). Before patch 0035 such a cache took the model's K offsets "
                "(none for SmolLM2, the k bias for Qwen2.5); with it, offsets measured once from a built-in "
                "text when the context is created. `LLAMA_KV_CENTER_ONLINE=1` measures them from the first "
                "batch of all instead, which makes a sequence's result depend on the others "
                "([`quality-levers.md`](quality-levers.md), session 22).",
                "",
                "| model | K / V | one sequence | a stream each, 0034 | a stream each, 0035 | unified, 0034 "
                "| unified, 0035 | first batch of all: a stream each / unified |",
                "|---|---|---|---|---|---|---|---|",
            ]

        def row(d: dict, k: str, v: str, layout: str | None, env: dict | None = None) -> dict | None:
            for r in d["rows"]:
                if (r["ctk"], r["ctv"], r.get("layout"), r["env"]) == (k, v, layout, env or {}):
                    return r
            return None

        online = {"LLAMA_KV_CENTER_ONLINE": "1"}
        for k, v in dict.fromkeys((r["ctk"], r["ctv"]) for r in after["rows"]):
            first = [row(before, k, v, lay, online) for lay in ("streams", "unified")]
            out.append(
                f"| {model} | {k} / {v} | {cell(row(before, k, v, None))} | "
                f"{cell(row(before, k, v, 'streams'))} | {cell(row(after, k, v, 'streams'))} | "
                f"{cell(row(before, k, v, 'unified'))} | {cell(row(after, k, v, 'unified'))} | "
                + (" / ".join(cell(r) for r in first) if any(first) else "-")
                + " |"
            )
        sources.append(
            f"- {model} ({before['machine']}, {before['nproc']} cores): 0034 and one sequence "
            f"`{before['command']}`, {build_label(before.get('build'))}; 0035 `{after['command']}`, "
            f"{build_label(after.get('build'))}"
        )
    for model in ("smollm2", "qwen"):
        d = _load("startup", model)
        if d and out:
            secs = sorted(r["seconds"] for r in d["rows"])
            median = secs[len(secs) // 2]
            sources.append(
                f"- What it costs: creating a context for {d['seqs']} sequences decodes the built-in text "
                f"({d['rows'][0]['tokens']} tokens of {d['model_file']}): median {median:.2f} s "
                f"({secs[0]:.2f}-{secs[-1]:.2f} s over {len(secs)} runs, {d['threads']} threads; "
                f"`{d['command']}`, {d['machine']})"
            )
    return [*out, "", *sources, ""] if out else []


def profile_table(d: dict) -> list[str]:
    """profile_decode_cpu.py's run: each group's share of a decode's CPU samples, by cache type."""
    depth = d.get("depth", 0)
    where = "from an empty cache"
    if depth:
        tokens = d["rows"][0]["window"]["tokens"]
        where = (
            f"at depth {depth} (a time window of the last rep's decode, the samples of {tokens:.0f} tokens)"
        )
    return [
        f"### Where a decode step's CPU time goes: {d['model']}, llama-bench -fa 1 tg{d['n']} {where}, "
        f"{d['threads']} threads, under perf, {d['machine'].split(',')[0]}",
        "",
        _src(d),
        "",
        "Each cell: the group's share of the samples (CPU microseconds a token). One run of each, on a VM",
        "whose speed moves by several per cent from run to run: the cache's own groups (its write and reads)",
        "are the measurement, the tokens/s are not an A/B.",
        *(
            [
                "The groups go by function name. With a polar or polar3 K the decode step (patch 0042) turns",
                "K rows into floats with V's function (`dequantize_row_polar`), so its K read shows as 0 and",
                "its V read holds both; its scores and V sums (inlined: 0044-0045) count as attention.",
            ]
            if depth
            else []
        ),
        "",
        profile_rows(d),
        "",
        "CPU milliseconds a token, the cache's own (write, K read, V read) and all groups: "
        + "; ".join(
            "{} / {}: {:.1f} of {:.1f}".format(r["k"], r["v"], *(x / 1e3 for x in cpu_totals(r)))
            for r in d["rows"]
        )
        + ".",
        "",
    ]


def speed_table(d: dict) -> list[str]:
    tests = sorted({(r["test"], r["depth"]) for r in d["rows"]}, key=lambda t: (t[0].startswith("tg"), t[1]))
    out = [
        f"### Speed: {d['model_file']}, llama-bench -fa 1, {d['threads']} threads, {d['reps']} reps, "
        f"{d['machine'].split(',')[0]}",
        "",
        _src(d),
        "",
        "| K | V | " + " | ".join(f"{t} @ d{dep} (t/s)" for t, dep in tests) + " |",
        "|---|---|" + "---|" * len(tests),
    ]
    combos = []
    for r in d["rows"]:
        if (r["k"], r["v"]) not in combos:
            combos.append((r["k"], r["v"]))
    for k, v in combos:
        cells = []
        for t, dep in tests:
            m = [r for r in d["rows"] if (r["k"], r["v"], r["test"], r["depth"]) == (k, v, t, dep)]
            cells.append(f"{m[0]['tps']:.1f} ± {m[0]['tps_sd']:.1f}" if m else "")
        out.append(f"| {k} | {v} | " + " | ".join(cells) + " |")
    tps = {(r["k"], r["v"], r["test"], r["depth"]): r["tps"] for r in d["rows"]}
    notes = []
    for t, dep in tests:
        f16 = tps.get(("f16", "f16", t, dep))
        for kv in ("polar", "polar3"):
            mine, q4 = tps.get((kv, kv, t, dep)), tps.get(("q4_0", "q4_0", t, dep))
            if mine and q4 and f16:
                notes.append(f"{t} @ d{dep}: K+V {kv} {mine / q4:.2f}x K+V q4_0, {mine / f16:.2f}x f16")
    if notes:
        out += ["", "Ratios (same run): " + "; ".join(notes) + "."]
    return [*out, ""]


def memory_table(d: dict) -> list[str]:
    out = [
        f"### KV-cache memory: {d['model_file']} (K and V of the same type)",
        "",
        _src(d),
        "",
        "| ctx | type | K MiB | V MiB | total MiB | f16 size / this |",
        "|---|---|---|---|---|---|",
    ]
    f16 = {r["ctx"]: r["total_mib"] for r in d["rows"] if r["kv"] == "f16"}
    for r in d["rows"]:
        out.append(
            f"| {r['ctx']} | {r['kv']} | {r['k_mib']:.2f} | {r['v_mib']:.2f} | {r['total_mib']:.2f} "
            f"| {f16[r['ctx']] / r['total_mib']:.2f}x |"
        )
    return [*out, ""]


def needle_table(d: dict) -> list[str]:
    names = [k for k in d["cells"][0] if isinstance(d["cells"][0][k], dict)]
    ctxs = sorted({c["ctx"] for c in d["cells"]})
    out = [
        f"### Needle in a haystack: {d['model']} ({d['device']}, {d['dtype']}, centering: {d['centering']})",
        "",
        f"Command: `{d['command']}` — {d['date']}; haystack {d['haystack']}, {len(d['cells'])} cells "
        f"({len(d['cells']) // len(ctxs)} needle depths from 0 to 1 per context), greedy answers.",
        "",
        "| cache | " + " | ".join(f"found @ {c}" for c in ctxs) + " | missed where the reference found it |",
        "|---|" + "---|" * (len(ctxs) + 1),
    ]
    for n in names:
        found = [sum(c[n]["found"] for c in d["cells"] if c["ctx"] == x) for x in ctxs]
        miss = [
            f"{c['ctx']}@{c['depth']:.1f} ({c[n]['answer']!r})"
            for c in d["cells"]
            if c["reference"]["found"] and not c[n]["found"]
        ]
        per = len(d["cells"]) // len(ctxs)
        out.append(f"| {n} | " + " | ".join(f"{f}/{per}" for f in found) + f" | {', '.join(miss) or '–'} |")  # noqa: RUF001 - the table's dash
    return [*out, ""]


def generate_table(d: dict, path: str) -> list[str]:
    keys = [k for k in d if isinstance(d[k], dict) and "tok_per_s" in d[k]]
    out = [
        f"### Greedy generation: {d['model']} ({d['device']}), {d['prompt_tokens']}-token prompt, "
        f"{d['max_new_tokens']} new tokens, centering: {d.get('centering', 'none')}",
        "",
        f"Command: `python {' '.join(d['argv'])}` (`{path}`). tok/s = new tokens / the whole "
        "generate call (prefill included, eager transformers: host-bound, not a kernel comparison).",
        "",
        "| cache | first token differing from the fp16 cache | tok/s |",
        "|---|---|---|",
    ]
    for k in keys:
        div = d[k].get("first_divergence", "–")  # noqa: RUF001 - the table's dash
        out.append(f"| {k} | {'none' if div is None else div} | {d[k]['tok_per_s']:.1f} |")
    return [*out, ""]


BITS_NOTE = {"q4_0": "4.5", "iq4_nl": "4.5", "q5_0": "5.5"}


def _row(d: dict | None, **kw) -> dict | None:
    if not d:
        return None
    for r in d["rows"]:
        if all(r.get(k) == v for k, v in kw.items()) and "error" not in r:
            return r
    return None


QWEN_SHAPE = "Qwen2.5-1.5B shape (random Q8_0 weights)"  # the random-weight model of the GPU runs


def _kld(d: dict | None, **kw) -> float | None:
    r = _row(d, **kw)
    return r["mean_kld"] if r else None


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def quality_headline() -> list[str]:
    """Issue 12's targets from the stock-file quality runs (bench_llama.py quality), with the defaults on."""
    out = []
    runs = (("qwen", "Qwen2.5-Coder-1.5B", "0.010"), ("smollm2", "SmolLM2-135M", "0.025"))
    loaded = [(_load("quality", m), label, target) for m, label, target in runs]
    for d, label, target in loaded:
        polar = _kld(d, k="polar", v="f16", center=True, sink=True)
        if polar is None:
            continue
        others = [(t, _kld(d, k=t, v="f16", center=True)) for t in ("iq4_nl", "q4_0", "q5_0")]
        out.append(
            f"- {label}, K = polar (4.25 bits), V f16: mean KLD **{polar:.4f}** (target <= {target}: "
            f"{_verdict(polar <= float(target))}); with the same centering "
            + ", ".join(f"{t} ({BITS_NOTE[t]} bits) {x:.4f}" for t, x in others if x is not None)
            + f"; {_src_short(d)}."
        )
    for d, label, _ in loaded:
        pair = _row(d, k="polar", v="polar3", center=True, sink=True, layer_policy=None)
        q4 = _kld(d, k="q4_0", v="q4_0", center=True)
        if pair and q4 is not None:
            policy = (
                "layer policy"
                if LAYER_POLICY_PATCH in _patches(d)
                else "uniform layers: the run predates the layer policy"
            )
            out.append(
                f"- {label}, the low-memory pair polar K + polar3 V (3.75 bits/elem, {policy}): "
                f"**{pair['mean_kld']:.4f}** against centered q4_0 K + q4_0 V (4.5 bits) {q4:.4f} "
                f"(target <=: {_verdict(pair['mean_kld'] <= q4)})."
            )
    for d, label, _ in loaded:
        p3 = _kld(d, k="polar3", v="f16", center=True, sink=True)
        q4 = _kld(d, k="q4_0", v="f16", center=True)
        if p3 is not None and q4:
            out.append(
                f"- {label}, K = polar3 (3.25 bits): **{p3:.4f}** = {p3 / q4:.2f}x centered q4_0 K "
                f"({q4:.4f}) "
                f"(target <= 2x: {_verdict(p3 <= 2 * q4)})."
            )
    return out


def _patches(d: dict) -> list[str]:
    return llama_patch_numbers(d.get("build", {}).get("patches", []))


def _src_short(d: dict) -> str:
    n = _patches(d)
    build = f"build {d['build']['key']} (patches {n[0]}-{n[-1]})" if n else "build unknown"
    return f"`{d['command']}`, {d['machine'].split(',')[0]}, {build}"


def compare_runs() -> list[tuple[str, str, dict]]:
    """Every `bench_gpu.py compare` JSON under docs/gpu, plain or a member of a .tgz (`gpu_run.sh cupy
    issue11` packs its JSONs): (its link, its name, the data), in the order of the time each records."""
    runs = []
    for f in sorted((REPO / "docs" / "gpu").rglob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "compare" in d:
            runs.append((str(f.relative_to(REPO / "docs")), f.name, d))
    for f in sorted((REPO / "docs" / "gpu").rglob("*.tgz")):
        with tarfile.open(f) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(".json"):
                    d = json.loads(t.extractfile(m).read())
                    if isinstance(d, dict) and "compare" in d:
                        runs.append((str(f.relative_to(REPO / "docs")), f"{f.name}: {Path(m.name).name}", d))
    return sorted(runs, key=lambda r: str(r[2].get("time", "")))


def kernel_headline() -> list[str]:
    """Issue 11's targets for the CuPy decode attention (B=16, 32/8 heads, D=128, each call replayed from a
    CUDA graph, SDPA's too), from the newest `bench_gpu.py compare` of each GPU model that timed all three
    (compare_runs)."""
    newest = {}
    for link, name, d in compare_runs():
        t = {
            (r["T"], r["variant"]): r for r in d["compare"] if r["shape"].startswith("B16 ") and r["D"] == 128
        }
        kv, kf = (
            t.get((32768, "polar+polar mma default graph")),
            t.get((32768, "polar+f16 mma default graph")),
        )
        long = t.get((131072, "polar+polar mma default graph"))
        if kv and kf and long:
            newest[d["device"]["name"]] = (link, name, d, kv, kf, long)
    out = []
    for gpu, (link, name, d, kv, kf, long) in sorted(newest.items()):
        copy = d["copy_rate_Bps"] / 1e9
        x_kv, x_kf, pct = kv["speedup_vs_sdpa"], kf["speedup_vs_sdpa"], long["pct_copy_rate"]
        out.append(
            f"- CuPy decode attention on {gpu}, B=16, 32768 keys: polar K+V {x_kv:.2f}x fp16 SDPA "
            f"(>= 3.0x: {_verdict(x_kv >= 3.0)}), polar K + fp16 V {x_kf:.2f}x "
            f"(>= 1.45x: {_verdict(x_kf >= 1.45)}); "
            f"131072 keys: polar K+V reads at {pct:.0f} % of the copy rate measured in the same run "
            f"({copy:.0f} GB/s; >= 75 %: {_verdict(pct >= 75)}); {d.get('time', 'time not recorded')}, "
            f"[{name}]({link})."
        )
    return out


def headline(gpu_runs: list[tuple[tuple[str, str, str], str]]) -> list[str]:
    """Where each issue's targets stand, read from the raw files (None-safe: a missing file drops its lines):
    issue 12's quality on the stock model files, the CPU speed and memory, and for llama.cpp on a GPU the
    newest run of each kind on each GPU model of `gpu_runs` (gpu_tg_lines; every run: gpu_runs_section)."""
    out = ["## Headline (computed from the raw files below)", ""]
    q = quality_headline()
    if q:
        out += [
            "Quality per bit (issue 12): stock model files, the defaults of `-ctk polar` (centering, "
            "balancing, the exact sink key), `llama-perplexity --kl-divergence` against f16 with -fa on.",
            "",
            *q,
            "",
        ]
    cpu = []
    for model, label in (("smollm2", "SmolLM2-135M"), ("qwen", "Qwen2.5-Coder-1.5B")):
        sp = _load("speed", model)
        if not sp:
            continue
        t = {(r["k"], r["v"], r["test"], r["depth"]): r["tps"] for r in sp["rows"]}
        a, b, f = (t.get((x, x, "tg64", 4096)) for x in ("polar", "q4_0", "f16"))
        if a and b and f:
            cpu.append(
                f"- {label}, tg64 @ depth 4096, K+V polar: {a:.1f} t/s = {a / b:.2f}x K+V q4_0 "
                f"({b:.1f}), {a / f:.2f}x f16 ({f:.1f}) (target >= 1.0x q4_0: {_verdict(a >= b)}); "
                f"{_src_short(sp)}."
            )
        k1, k0 = t.get(("polar", "f16", "tg64", 4096)), t.get(("q4_0", "f16", "tg64", 4096))
        if k1 and k0:
            cpu.append(
                f"- {label}, tg64 @ depth 4096, K-only polar (V f16): {k1:.1f} t/s = {k1 / k0:.2f}x "
                f"K-only q4_0 ({k0:.1f}){' (a loss)' if k1 < k0 else ''}."
            )
    m = _load("memory", "smollm2")
    if m:
        f16 = {r["ctx"]: r["total_mib"] for r in m["rows"] if r["kv"] == "f16"}
        for r in m["rows"]:
            if r["kv"] == "polar":
                cpu.append(
                    f"- KV memory at ctx {r['ctx']}: polar K+V {r['total_mib']:.1f} MiB = "
                    f"{f16[r['ctx']] / r['total_mib']:.2f}x smaller than f16."
                )
                break
    if cpu:
        out += ["llama.cpp on the CPU:", "", *cpu, ""]
    gpu = [line for _, line in newest_per_gpu(gpu_runs)]
    if gpu:
        out += [
            "llama.cpp with CUDA (issue 10's tg targets): the newest run of each kind on each GPU model; "
            "every run is listed in docs/results.md under \"llama.cpp with CUDA: every run of issue 10's tg "
            'targets".',
            "",
            *gpu,
            "",
        ]
    nd = REPO / "docs" / "gpu" / "needle_qwen_h100.json"
    if nd.exists():
        d = json.loads(nd.read_text())
        for name in [k for k in d["cells"][0] if isinstance(d["cells"][0][k], dict)]:
            n = sum(c[name]["found"] for c in d["cells"])
            out.append(
                f"- GPU needle in a haystack, Qwen2.5-Coder-1.5B, 8k/16k/32k x 11 depths: "
                f"{name} finds {n}/{len(d['cells'])}."
            )
    kern = kernel_headline()
    if kern:
        out += [
            "",
            "CuPy kernels (issue 11; its targets are set on the H200, the H100 rows show the same kernels on "
            "the other card), each call replayed from a CUDA graph; the full tables: docs/results.md's GPU "
            "section.",
            "",
            *kern,
        ]
    return [*out, ""]


def gpu_tg_lines() -> list[tuple[tuple[str, str, str], str]]:
    """Issue 10's tg targets in every llama.cpp CUDA run, newest first within each kind: ((kind, GPU, model),
    the line). The kinds: the same-run A/Bs (ab_llama_gpu.py, AB_LATEST), then bench_llama_gpu.py's tables."""
    lines = []
    for paths, label, depth, same, polar_env in AB_LATEST:
        if not all((REPO / p).exists() for p in paths):
            continue
        docs = [json.loads((REPO / p).read_text()) for p in paths]
        t = {key: sum(c["tg"]) / len(c["tg"]) for key, c in pool(docs, depth, same).items() if c["tg"]}
        a = t.get(("polar/polar", env_key(polar_env)))
        b, f = t.get(("q4_0/q4_0", "-")), t.get(("f16/f16", "-"))
        if a and b and f:
            what = paths[0] if len(paths) == 1 else f"{len(paths)} runs pooled, {paths[0].rsplit('/', 2)[0]}"
            if polar_env:
                what += f"; polar row {env_key(polar_env)}"
            gpu = device_of(docs[0])
            line = _gpu_tg_line(label, gpu, depth, f", same-run A/B ({what})", a, b, f)
            lines.append((("ab", gpu.split(",")[0], label), line))
    tables = (("smollm2", "SmolLM2-135M", 16384), ("qwen2.5-1.5b-synthetic", QWEN_SHAPE, 32768))
    for folder, (name, label, depth) in itertools.product((*H100_TABLES, "docs/bench/gpu"), tables):
        path = REPO / folder / f"llama-gpu-{name}.json"
        if not path.exists():
            continue
        g = json.loads(path.read_text())
        t = {(r["k"], r["v"], r["test"], r["depth"]): r["tps"] for r in g["rows"] if "error" not in r}
        a, b, f = (t.get((x, x, "tg64", depth)) for x in ("polar", "q4_0", "f16"))
        if a and b and f:
            build = build_label(g.get("build")) or GPU_TABLES_BUILD
            line = _gpu_tg_line(label, g["gpu"], depth, f" (bench_llama_gpu.py table, {build})", a, b, f)
            lines.append((("table", g["gpu"].split(",")[0], label), line))
    return lines


def newest_per_gpu(lines: list[tuple[tuple[str, str, str], str]]) -> list[tuple[tuple[str, str, str], str]]:
    """The first (newest) line of each (kind, GPU, model) of gpu_tg_lines, in their order."""
    seen, out = set(), []
    for key, line in lines:
        if key not in seen:
            seen.add(key)
            out.append((key, line))
    return out


def gpu_runs_section(lines: list[tuple[tuple[str, str, str], str]]) -> list[str]:
    """Every run of issue 10's tg targets, `lines` of gpu_tg_lines (the runs scatter by several per cent, so
    none is dropped)."""
    if not lines:
        return []
    return [
        "## llama.cpp with CUDA: every run of issue 10's tg targets",
        "",
        "Newest first within each kind (same-run A/Bs of `ab_llama_gpu.py`, then `bench_llama_gpu.py`'s "
        "tables); the headline shows the first of each GPU model. The commands and logs: "
        "[`results-cuda.md`](results-cuda.md).",
        "",
        *(line for _, line in lines),
        "",
    ]


def _gpu_tg_line(label: str, gpu: str, depth: int, source: str, a: float, b: float, f: float) -> str:
    """One headline of issue 10's tg targets: polar K+V (a) against f16 (f) and q4_0 K+V (b)."""
    return (
        f"- {label}, llama.cpp CUDA on {gpu.split(',')[0]}, tg64 @ depth {depth}, K+V polar{source}: "
        f"{a:.1f} t/s = {a / f:.2f}x f16 ({f:.1f}), {a / b:.2f}x K+V q4_0 ({b:.1f}) "
        f"(target >= 1.0x f16 {'met' if a >= f else 'missed'}, "
        f">= 1.2x q4_0 {'met' if a >= 1.2 * b else 'missed'})."
    )


# bench_llama_gpu.py's tables on an H100, newest first, listed before the H200's: session 42 (the series
# 0001-0045), session 34 (0001-0042), session 31 (the series 0001-0040 with session 30's encoder header),
# session 26 (0001-0039)
H100_TABLES = (
    "docs/gpu/h100-llama/session42/bench-tables",
    "docs/gpu/h100-llama/session34/bench-tables",
    "docs/gpu/h100-llama/session31/bench-tables",
    "docs/gpu/h100-llama/session26/bench-tables",
)

# the build that docs/bench/gpu/llama-gpu-*.json (bench_llama_gpu.py, `gpu_run.sh bench tables`) last ran on,
# for the tables written before bench_llama_gpu.py recorded it ("build": llama_bench.build_info)
GPU_TABLES_BUILD = "session 20's build, patch 0031's code"

# ab_llama_gpu.py runs of issue 10's tg targets (docs/results-cuda.md), newest first, listed in
# results.md next to the full bench_llama_gpu.py tables (every run, as the runs scatter by several per
# cent): (runs pooled by ab_llama_gpu.pool, model, depth, settings the build does not read, the environment
# of the polar/polar row to take). Session 23: `ab targets`, the series 0001-0035 (five passes).
# Session 20: the A/B of 0031's diff (three passes; its rows without an environment are 0031's code).
# Session 19: the series 0001-0030, as a tree with the dropped prefetch
# experiment (two passes; its GGML_CUDA_POLAR_FA_PREFETCH=0 rows are 0030's kernel, and at head size 128 every
# row is) and as the A/B of 0030's diff (three passes; its rows without an environment are 0030's code);
# session 18: the series 0001-0029, three passes (its GGML_CUDA_POLAR_NO_EARLY rows are the same code);
# session 17: the A/B of a dropped experiment (the write kernel's early reads: its polar/polar rows ran the
# same encoder and attention arithmetic, each setting twice, pooled); session 16's two builds: the ring
# tables const (ab-rot) and the session-15 tree it started from (ab-pdl, the rows with PDL on).
AB_DIR = "docs/gpu/h200-llama/session16/ab"
S20C = "docs/gpu/h200-llama/session20/combine-ab"
S19P = "docs/gpu/h200-llama/session19/prefetch-ab"
S19L = "docs/gpu/h200-llama/session19/loads-ab"
S19_OFF = {"GGML_CUDA_POLAR_FA_PREFETCH": "0"}
S18 = "docs/gpu/h200-llama/session18/series-ab"
S18_SAME = {"GGML_CUDA_POLAR_NO_EARLY": "1"}
S23T = "docs/gpu/h200-llama/session23/targets-ab"
S26T = "docs/gpu/h100-llama/session26/targets-ab"  # an H100: the series 0001-0039, five passes
S30T = "docs/gpu/h100-llama/session30/targets-ab"  # an H100: 0001-0040, session 30's header, five passes
S27T = "docs/gpu/h100-llama/session27/targets-ab"  # an H100: the series 0001-0040, ten passes
AB_LATEST = (
    (tuple(f"{S30T}/pass{i}/ab-targets-smollm2.json" for i in range(1, 6)), "SmolLM2-135M", 16384, {}, {}),
    (tuple(f"{S30T}/pass{i}/ab-targets-qwen.json" for i in range(1, 6)), QWEN_SHAPE, 32768, {}, {}),
    (tuple(f"{S27T}/pass{i}/ab-targets-smollm2.json" for i in range(1, 11)), "SmolLM2-135M", 16384, {}, {}),
    (tuple(f"{S27T}/pass{i}/ab-targets-qwen.json" for i in range(1, 11)), QWEN_SHAPE, 32768, {}, {}),
    (tuple(f"{S26T}/pass{i}/ab-targets-smollm2.json" for i in range(1, 6)), "SmolLM2-135M", 16384, {}, {}),
    (tuple(f"{S26T}/pass{i}/ab-targets-qwen.json" for i in range(1, 6)), QWEN_SHAPE, 32768, {}, {}),
    (tuple(f"{S23T}/pass{i}/ab-targets-smollm2.json" for i in range(1, 6)), "SmolLM2-135M", 16384, {}, {}),
    (tuple(f"{S23T}/pass{i}/ab-targets-qwen.json" for i in range(1, 6)), QWEN_SHAPE, 32768, {}, {}),
    (tuple(f"{S20C}/pass{i}/ab-combine-smollm2.json" for i in (1, 2, 3)), "SmolLM2-135M", 16384, {}, {}),
    (tuple(f"{S20C}/pass{i}/ab-combine-qwen.json" for i in (1, 2, 3)), QWEN_SHAPE, 32768, {}, {}),
    (tuple(f"{S19P}/pass{i}/ab-prefetch-smollm2.json" for i in (1, 2)), "SmolLM2-135M", 16384, {}, S19_OFF),
    (
        tuple(f"{S19P}/pass{i}/ab-prefetch-qwen.json" for i in (1, 2)),
        QWEN_SHAPE,
        32768,
        S19_OFF,
        {},
    ),
    (tuple(f"{S19L}/pass{i}/ab-loads-smollm2.json" for i in (1, 2, 3)), "SmolLM2-135M", 16384, {}, {}),
    (tuple(f"{S19L}/pass{i}/ab-loads-qwen.json" for i in (1, 2, 3)), QWEN_SHAPE, 32768, {}, {}),
    (tuple(f"{S18}/pass{i}/ab-early-smollm2.json" for i in (1, 2, 3)), "SmolLM2-135M", 16384, S18_SAME, {}),
    (tuple(f"{S18}/pass{i}/ab-early-qwen.json" for i in (1, 2, 3)), QWEN_SHAPE, 32768, S18_SAME, {}),
    (("docs/gpu/h200-llama/session17/ab/ab-early-smollm2.json",), "SmolLM2-135M", 16384, {}, {}),
    (("docs/gpu/h200-llama/session17/ab/ab-early-qwen.json",), QWEN_SHAPE, 32768, {}, {}),
    ((f"{AB_DIR}/ab-rot-smollm2.json",), "SmolLM2-135M", 16384, {}, {}),
    ((f"{AB_DIR}/ab-pdl-smollm2.json",), "SmolLM2-135M", 16384, {}, {}),
    ((f"{AB_DIR}/ab-rot-qwen.json",), QWEN_SHAPE, 32768, {}, {}),
    ((f"{AB_DIR}/ab-pdl-qwen.json",), QWEN_SHAPE, 32768, {}, {}),
)


def render() -> str:
    """The text of docs/results.md (figures referenced by name; figures.draw_all draws them)."""
    lines = [
        "# Results",
        "",
        "Generated by `python scripts/write_results.py` from the raw files in `docs/bench/` and",
        "`docs/results-gpu.md`. Re-run the commands named under each table after any change to",
        "`converter/`, `cupy_kernels/` or `patches/`.",
        "",
    ]
    gpu_runs = gpu_tg_lines()  # (read once: the headline and the section of every run)
    lines += headline(gpu_runs)
    lines += figures.markdown()
    lines += ["## llama.cpp on the CPU", ""]
    for model in ("smollm2", "smollm2c", "qwen"):
        tables = (("quality", quality_table), ("speed", speed_table), ("memory", memory_table))
        for kind, fn in (*tables, ("profile-decode", profile_table)):
            for p in model_files(kind, model):
                lines += fn(json.loads(p.read_text()))
    lines += cpu_ab_tables()
    lines += cpu_extras_section()
    lines += layer_policy_table()
    lines += multiseq_table()
    lines += gpu_runs_section(gpu_runs)
    gpu = REPO / "docs" / "results-gpu.md"
    if gpu.exists():
        lines += ["## GPU (CuPy kernels)", "", *gpu.read_text().splitlines()[1:], ""]
    for p in sorted((REPO / "docs" / "gpu").glob("needle_*.json")):
        lines += needle_table(json.loads(p.read_text()))
    for p in sorted((REPO / "docs" / "gpu").glob("generate_qwen*.json")):
        lines += generate_table(json.loads(p.read_text()), str(p.relative_to(REPO)))
    return "\n".join(lines) + "\n"


README = REPO / "README.md"
README_BEGIN = (
    "<!-- headline: generated by `python scripts/write_results.py` from the raw result files; do not edit -->"
)
README_END = "<!-- /headline -->"


def readme_with_headline(text: str, lines: list[str]) -> str:
    """README.md's text with the lines between its headline markers replaced by `lines` (the headline of
    results.md without its title); a README without both markers, in that order, is an error."""
    a, b = text.find(README_BEGIN), text.find(README_END)
    if a < 0 or b < a:
        raise ValueError(f"README.md: expected the markers {README_BEGIN!r} and {README_END!r} in that order")
    body = "\n".join(lines).strip("\n")
    return text[: a + len(README_BEGIN)] + "\n" + body + "\n" + text[b:]


def readme_headline(results_md: str) -> list[str]:
    """The headline section of a rendered results.md, its title dropped and its links made relative to the
    repository root (README.md's folder)."""
    head = results_md.split("## Headline", 1)[1].split("\n## ", 1)[0]
    body = head.split("\n", 1)[1]
    body = re.sub(r"\]\((?![a-z]+:|/|#)", "](docs/", body)
    return [
        "From the raw files, with their commands and machines (the full tables: "
        "[`docs/results.md`](docs/results.md)).",
        *body.split("\n"),
    ]


def main() -> int:
    drawn = figures.draw_all(figures.FIG_DIR)
    for p in sorted(set(figures.FIG_DIR.glob("*.png")) - set(drawn)):
        p.unlink()
        print(f"removed {p} (no raw file draws it any more)")
    print(f"drew {len(drawn)} figures in {figures.FIG_DIR}")
    text = render()
    atomic_write_text(OUT, text)
    print(f"wrote {OUT}")
    atomic_write_text(README, readme_with_headline(README.read_text(), readme_headline(text)))
    print(f"wrote the headline into {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
