"""Figures of the results, drawn with matplotlib from the raw result files in docs/.

    python scripts/write_results.py     # draws them into docs/figures/ and embeds them in docs/results.md

`figures()` lists the figures whose raw files exist (name, sources, caption, draw function);
`draw_all(out_dir)` writes them as PNG. Every number plotted is read from a raw file
(docs/bench/*.json, docs/bench/gpu/*.json, docs/gpu/*.json); titles name the machine and the
model from the same files.

Reproducibility: the Agg renderer, matplotlib's default style and its bundled DejaVu Sans font;
the image is saved by Pillow as a 128-colour palette PNG with no timestamp or version, so the
same inputs, matplotlib and Pillow give the same bytes (checked on one machine). Each PNG also
carries a tEXt chunk `kvpolar-sources` = sha256 over this file and the figure's raw files
(`fingerprint()`): tests/test_figures.py compares it with the committed PNGs, which says whether
docs/figures/ is up to date without relying on byte-identical rendering across machines.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from PIL import Image, PngImagePlugin

from kvpolar.atomic import atomic_path

REPO = Path(__file__).resolve().parents[1]
FIG_DIR = REPO / "docs" / "figures"
DPI = 110
PALETTE = 128  # colours of the saved PNG (matplotlib's RGBA image quantized: ~3x smaller, same look)
FINGERPRINT_KEY = "kvpolar-sources"

# One colour per K type (V's type is the line style / marker), the same in every figure.
TYPE_COLOR = {
    "f16": "black",
    "q8_0": "tab:green",
    "q5_0": "tab:brown",
    "iq4_nl": "tab:purple",
    "q4_0": "tab:blue",
    "polar": "tab:red",
    "polar3": "tab:orange",
    "paperb": "tab:pink",
}
CPU_MODELS = ("smollm2", "smollm2c", "qwen")  # docs/bench/<kind>-<model>.json, as write_results reads them


@dataclass(frozen=True)
class Figure:
    name: str  # file name under docs/figures/
    title: str  # short: the image's alt text and the caption's start
    sources: tuple[str, ...]  # raw files it reads, relative to the repository root
    draw: Callable[[], MplFigure]
    note: str = ""  # how to read it, for the caption

    def caption(self) -> str:
        """One line: what it shows, the raw files and the commands that wrote them."""
        src = "; ".join(f"`{s}` (`{_command(s)}`)" for s in self.sources)
        note = f" {self.note}." if self.note else ""
        return f"{self.title}.{note} Source: {src}. Drawn by `python scripts/write_results.py`."


def _read(rel: str, keys: tuple[str, ...]) -> dict:
    p = REPO / rel
    d = json.loads(p.read_text())
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{rel}: expected the keys {list(keys)}, missing {missing} (found {sorted(d)})")
    return d


def _argv_command(d: dict) -> str:
    return "python " + shlex.join(d["argv"])


def _style(k: str, v: str) -> dict:
    """K type -> colour; V: same as K solid, f16 dashed (K quantized), other dash-dot."""
    ls = "-" if v == k else "--" if v == "f16" else "-."
    return {"color": TYPE_COLOR.get(k, "tab:gray"), "linestyle": ls}


def _hatch(k: str, v: str) -> str:
    """Bar fill by V, as _style's line styles: same as K plain, f16 hatched, other dotted."""
    return "" if v == k else "//" if v == "f16" else ".."


def _log_axis(axis) -> None:
    """Log axis labelled 1, 2, 5 x 10^n in plain numbers."""
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _pair(k: str, v: str) -> str:
    return f"K {k} / V {v}"


def _new(ncols: int, width: float = 4.6, height: float = 4.0) -> tuple[MplFigure, list]:
    fig = MplFigure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, list(axes)


def _pairs_in_order(rows: list[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["k"], r["v"]) for r in rows))


# ---------------------------------------------------------------------------------------------
# 1. quality per bit


def _quality_sources() -> list[str]:
    return [
        f"docs/bench/quality-{m}.json" for m in CPU_MODELS if (REPO / f"docs/bench/quality-{m}.json").exists()
    ]


def draw_quality() -> MplFigure:
    srcs = _quality_sources()
    fig, axes = _new(len(srcs), width=5.0, height=5.0)
    types = []
    for ax, rel in zip(axes, srcs, strict=True):
        d = _read(rel, ("rows", "model_file", "machine", "chunks", "ctx"))
        rows = [r for r in d["rows"] if "error" not in r and r["mean_kld"] > 0]
        for k, v in _pairs_in_order(rows):
            both = sorted((r for r in rows if (r["k"], r["v"]) == (k, v)), key=lambda r: r["center"])
            if len(both) == 2:
                ax.plot(
                    [r["bits_k"] for r in both], [r["mean_kld"] for r in both], color="0.7", lw=0.8, zorder=1
                )
            for r in both:
                c = TYPE_COLOR.get(k, "tab:gray")
                ax.plot(
                    r["bits_k"],
                    r["mean_kld"],
                    marker="o" if v == "f16" else "s",
                    ms=7,
                    color=c,
                    markerfacecolor=c if r["center"] else "white",
                    markeredgewidth=1.5,
                    linestyle="none",
                    zorder=2,
                )
            types += [k]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r["bits_k"] for r in rows})
        # a tick too close to the one before it gets its label one line lower
        low = {b for a, b in itertools.pairwise(ticks) if b / a < 1.15}
        ax.set_xticks(ticks, [("\n" if t in low else "") + f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K bits per element (V: f16, or the same type for squares)")
        ax.set_ylabel("mean KLD vs the f16 cache (nats/token)")
        ax.set_title(
            f"{d['model_file']}\n{d['machine']}, {d['chunks']} x {d['ctx']} tokens",
            fontsize=9,
        )
    handles = [
        Line2D([], [], color=TYPE_COLOR.get(t, "tab:gray"), marker="o", ls="none", label=t)
        for t in dict.fromkeys(types)
    ]
    handles += [
        Line2D([], [], color="0.3", marker="o", ls="none", markerfacecolor="white", label="centering off"),
        Line2D([], [], color="0.3", marker="o", ls="none", label="centering on"),
        Line2D([], [], color="0.3", marker="s", ls="none", label="K and V quantized"),
    ]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=5)
    fig.suptitle("KV-cache quality per bit: mean KLD vs K bits/element (llama-perplexity on the CPU)")
    return fig


# ---------------------------------------------------------------------------------------------
# 2. speed vs depth (llama-bench, CPU and CUDA)


def _speed_panels() -> list[tuple[str, str, str]]:
    """(source, panel title prefix, model label) for the CPU and CUDA llama-bench files."""
    out = []
    for m in CPU_MODELS:
        rel = f"docs/bench/speed-{m}.json"
        if (REPO / rel).exists():
            d = _read(rel, ("rows", "machine", "model_file", "threads", "command"))
            out.append((rel, f"CPU: {d['machine']}, {d['threads']} threads", d["model_file"]))
    rel = "docs/bench/gpu/llama-gpu-smollm2.json"
    if (REPO / rel).exists():
        d = _read(rel, ("rows", "gpu", "name", "model", "command"))
        out.append((rel, f"CUDA: {d['gpu']}, -ngl 99", f"{d['name']} ({d['model']})"))
    return out


def _command(rel: str) -> str:
    d = json.loads((REPO / rel).read_text())
    return d["command"] if "command" in d else _argv_command(d)


def _draw_speed(test: str) -> MplFigure:
    panels = _speed_panels()
    fig, axes = _new(len(panels), width=4.4, height=4.3)
    for ax, (rel, machine, model) in zip(axes, panels, strict=True):
        every = json.loads((REPO / rel).read_text())["rows"]
        rows = [r for r in every if r["test"].startswith(test)]
        if not rows:
            raise ValueError(
                f"{rel}: expected {test}* rows, found the tests {sorted({r['test'] for r in every})}"
            )
        for k, v in _pairs_in_order(rows):
            rs = sorted((r for r in rows if (r["k"], r["v"]) == (k, v)), key=lambda r: r["depth"])
            ax.errorbar(
                [r["depth"] for r in rs],
                [r["tps"] for r in rs],
                yerr=[r["tps_sd"] for r in rs],
                marker="o",
                ms=4,
                capsize=2,
                label=_pair(k, v),
                **_style(k, v),
            )
        ax.set_xticks(sorted({r["depth"] for r in rows}))
        ax.set_xlabel("context depth before the test (tokens)")
        ax.set_ylabel(f"{rows[0]['test']} speed (tokens/s, mean ± sd)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{machine}\n{model}", fontsize=9)
        ax.legend(fontsize=7)
    what = "generation" if test == "tg" else "prompt processing"
    fig.suptitle(f"llama.cpp {what} speed vs context depth per KV type (llama-bench -fa 1)")
    return fig


def draw_tg() -> MplFigure:
    return _draw_speed("tg")


def draw_pp() -> MplFigure:
    return _draw_speed("pp")


# ---------------------------------------------------------------------------------------------
# 3. GPU attention (CuPy kernels)

H200_COMPARE = "docs/gpu/compare_h200_session4.json"
H100_ATTN = "docs/gpu/bench_attn_h100.json"
# variant names in the bench_gpu.py files: "attn" rows and "compare" rows
ATTN_VARIANTS = {
    "sdpa_fold": ("f16", "f16", "fp16 SDPA (torch)"),
    "polar+polar": ("polar", "polar", "polar K+V"),
    "polar+f16": ("polar", "f16", "polar K, fp16 V"),
    "polar3+polar3": ("polar3", "polar3", "polar3 K+V"),
    "paperb+paperb (anglelut)": ("paperb", "paperb", "paper-B K+V (simt, angle LUT)"),
    "paperb+f16 (anglelut)": ("paperb", "f16", "paper-B K, fp16 V (simt, angle LUT)"),
}
COMPARE_VARIANTS = {
    "sdpa fp16": ("f16", "f16", "fp16 SDPA (torch)"),
    "polar+polar mma default": ("polar", "polar", "polar K+V, tensor cores"),
    "polar+f16 mma default": ("polar", "f16", "polar K, fp16 V, tensor cores"),
    "polar3+polar3 mma default": ("polar3", "polar3", "polar3 K+V, tensor cores"),
    "polar+polar simt (before)": ("polar", "polar", "polar K+V, float32 FMA (before)"),
    "polar+f16 simt (before)": ("polar", "f16", "polar K, fp16 V, float32 FMA (before)"),
    "polar3+polar3 simt (before)": ("polar3", "polar3", "polar3 K+V, float32 FMA (before)"),
}


def _gpu_rows(rel: str, key: str) -> tuple[dict, list[dict]]:
    d = _read(rel, ("device", "argv", key))
    return d, d[key]


def draw_gpu_attention() -> MplFigure:
    panels = []  # (raw file, key of its rows, variant names, (B, Hq, Hkv, D))
    if (REPO / H200_COMPARE).exists():
        panels.append((H200_COMPARE, "compare", COMPARE_VARIANTS, (16, 32, 8, 128)))
    if (REPO / H100_ATTN).exists():
        panels += [
            (H100_ATTN, "attn", ATTN_VARIANTS, (16, 32, 8, 128)),
            (H100_ATTN, "attn", ATTN_VARIANTS, (16, 9, 3, 64)),
        ]
    fig, axes = _new(len(panels), width=4.6, height=4.5)
    for ax, (rel, key, variants, shape) in zip(axes, panels, strict=True):
        d, rows = _gpu_rows(rel, key)
        rows = [r for r in rows if (r["B"], r["Hq"], r["Hkv"], r["D"]) == shape]
        if not rows:
            raise ValueError(f"{rel}: no {key} rows for B, Hq, Hkv, D = {shape}")
        for name, (k, v, label) in variants.items():
            rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["T"])
            st = _style(k, v) if "before" not in name else {**_style(k, v), "linestyle": ":", "alpha": 0.7}
            if rs:
                ax.plot(
                    [r["T"] for r in rs], [r["ms"] * 1000 for r in rs], marker="o", ms=4, label=label, **st
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
        ax.set_xticks(sorted({r["T"] for r in rows}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x) // 1024}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context length T (tokens per sequence)")
        ax.set_ylabel("decode attention time per call (µs, median)")
        ax.legend(fontsize=7)
        b, hq, hkv, hd = shape
        ax.set_title(
            f"{d['device']['name']} ({Path(rel).name})\n"
            f"batch {b}, {hq} q / {hkv} KV heads, head dim {hd}, eager calls",
            fontsize=9,
        )
    fig.suptitle("GPU decode attention (CuPy kernels) vs context: one query token per sequence, random KV")
    return fig


HISTORY = (  # (kernel version, raw file, key of its rows), oldest first
    ("first kernel", "docs/gpu/bench_first_version_h100.json", "attn"),
    ("float32 FMA, tuned", "docs/gpu/bench_headline_h100.json", "attn"),
    ("tensor cores", "docs/gpu/bench_compare_h100.json", "compare"),
    ("tensor cores", H200_COMPARE, "compare"),
)
HISTORY_BARS = (  # (label, K, V, name in "attn" files, name in "compare" files)
    ("fp16 SDPA (torch)", "f16", "f16", "sdpa_fold", "sdpa fp16"),
    ("polar K+V", "polar", "polar", "polar+polar", "polar+polar mma default"),
    ("polar K, fp16 V", "polar", "f16", "polar+f16", "polar+f16 mma default"),
    ("polar3 K+V", "polar3", "polar3", "polar3+polar3", "polar3+polar3 mma default"),
)


def draw_gpu_history() -> MplFigure:
    stages = [s for s in HISTORY if (REPO / s[1]).exists()]
    gpus = [_gpu_rows(rel, key)[0]["device"]["name"] for _, rel, key in stages]
    contexts = (32768, 131072)
    fig, axes = _new(len(contexts), width=5.6, height=4.3)
    width = 0.8 / len(HISTORY_BARS)
    for ax, t in zip(axes, contexts, strict=True):
        for i, (label, k, v, attn_name, cmp_name) in enumerate(HISTORY_BARS):
            ys = []
            for _, rel, key in stages:
                _, rows = _gpu_rows(rel, key)
                name = attn_name if key == "attn" else cmp_name
                m = [r for r in rows if r["variant"] == name and r["shape"] == f"B16 T{t} 32/8 D128"]
                if not m:
                    raise ValueError(f"{rel}: no {name!r} row for B16 T{t} 32/8 D128")
                ys.append(m[0]["ms"] * 1000)
            ax.bar(
                [j + (i - (len(HISTORY_BARS) - 1) / 2) * width for j in range(len(stages))],
                ys,
                width,
                label=label,
                color=TYPE_COLOR[k],
                hatch=_hatch(k, v),
                edgecolor="white",
            )
        ticks = [f"{s[0]}\n({g.removeprefix('NVIDIA ')})" for s, g in zip(stages, gpus, strict=True)]
        ax.set_xticks(range(len(stages)), ticks, fontsize=8)
        ax.set_ylabel("decode attention time per call (µs, median)")
        ax.set_title(f"batch 16, T = {t // 1024}k, 32 q / 8 KV heads, head dim 128", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("GPU decode attention (CuPy kernels) per kernel version: " + ", ".join(dict.fromkeys(gpus)))
    return fig


# ---------------------------------------------------------------------------------------------
# 4. KV bytes per token and context in a memory budget (llama.cpp CUDA run)

LLAMA_GPU = "docs/bench/gpu/llama-gpu-smollm2.json"


def draw_kv_memory() -> MplFigure:
    d = _read(LLAMA_GPU, ("memory", "gpu", "name", "model", "budget_gib"))
    rows = d["memory"]
    fig, axes = _new(2, width=4.8, height=3.6)
    labels = [_pair(r["k"], r["v"]) for r in rows]
    ys = range(len(rows))[::-1]
    for ax, key, xlabel in (
        (axes[0], "bytes_per_token", "KV cache bytes per token (all layers)"),
        (axes[1], "max_ctx_in_budget", f"longest context in {d['budget_gib']:g} GiB of KV cache (tokens)"),
    ):
        ax.barh(
            ys,
            [r[key] for r in rows],
            color=[TYPE_COLOR.get(r["k"], "tab:gray") for r in rows],
            hatch=[_hatch(r["k"], r["v"]) for r in rows],
            edgecolor="white",
        )
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
        for y, r in zip(ys, rows, strict=True):
            ax.text(r[key], y, f" {r[key]:,.0f}", va="center", fontsize=7)
        ax.set_xlim(right=max(r[key] for r in rows) * 1.25)
    axes[1].xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M"))
    fig.suptitle(
        f"KV-cache size per type: {d['name']} ({d['model']}) in llama.cpp on {d['gpu']} "
        f"(KV MiB at ctx {rows[0]['ctx']})",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# 5. decode-step ops in ggml-cuda (test-backend-ops perf), one figure per docs/bench/gpu/ops-decode*.json

OPS_SHAPES = {
    (64, 3): "SmolLM2-135M shape: head dim 64, 3 KV heads, GQA 3",
    (128, 2): "Qwen2.5-1.5B shape: head dim 128, 2 KV heads, GQA 6",
}


def _ops_files() -> list[str]:
    return [str(p.relative_to(REPO)) for p in sorted((REPO / "docs/bench/gpu").glob("ops-decode*.json"))]


def _draw_ops(rel: str) -> MplFigure:
    d = _read(rel, ("flash_attn", "set_rows", "gpu", "argv"))
    fig, axes = _new(3, width=4.3, height=4.2)
    for ax, ((hs, nh), label) in zip(axes[:2], OPS_SHAPES.items(), strict=True):
        rows = [r for r in d["flash_attn"] if (r["hs"], r["nh"]) == (hs, nh)]
        for pair in dict.fromkeys(r["pair"] for r in rows):
            k, v = pair.split("/")
            rs = sorted((r for r in rows if r["pair"] == pair), key=lambda r: r["kv"])
            ax.plot(
                [r["kv"] for r in rs],
                [r["us"] for r in rs],
                marker="o",
                ms=4,
                label=_pair(k, v),
                **_style(k, v),
            )
        ax.set_xticks(sorted({r["kv"] for r in rows}))
        ax.set_xlabel("KV length (tokens)")
        ax.set_ylabel("FLASH_ATTN_EXT time (µs per op)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"one query token\n{label}", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    sizes = sorted({r["row"] for r in d["set_rows"]})
    types = list(dict.fromkeys(r["type"] for r in d["set_rows"]))
    width = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        by_t = {r["type"]: r["us"] for r in d["set_rows"] if r["row"] == n}
        ax.bar(
            [j + (i - (len(sizes) - 1) / 2) * width for j, t in enumerate(types) if t in by_t],
            [by_t[t] for t in types if t in by_t],
            width,
            color=[TYPE_COLOR.get(t, "tab:gray") for t in types if t in by_t],
            hatch="" if i == 0 else "..",
            edgecolor="white",
        )
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("SET_ROWS time (µs per op)")
    ax.set_xlabel("cache type")
    ax.set_title(
        "one cache row written (a decode step's write)\nbars: "
        + ", ".join(f"{n} values" for n in sizes)
        + " (dotted)",
        fontsize=9,
    )
    fig.suptitle(
        f"ggml-cuda decode-step ops on {d['gpu']} (test-backend-ops perf -b CUDA0): {Path(rel).stem}"
    )
    return fig


# ---------------------------------------------------------------------------------------------


def figures() -> list[Figure]:
    """The figures whose raw files exist, in the order results.md shows them."""
    out = []
    if q := _quality_sources():
        note = (
            "Filled: centering on, hollow: off; circles: K quantized, V f16; squares: K and V quantized. "
            "f16/f16 without centering is the reference (KLD 0, not drawn)"
        )
        out.append(Figure("kld-vs-bits.png", "KV-cache quality per bit", tuple(q), draw_quality, note))
    if sp := tuple(s for s, _, _ in _speed_panels()):
        note = "Colour: K type; line: V the same type (solid), f16 (dashed), another type (dash-dot)"
        out += [
            Figure(
                "tg-vs-depth.png", "llama.cpp generation speed (tg64) vs context depth", sp, draw_tg, note
            ),
            Figure("pp-vs-depth.png", "llama.cpp prompt speed (pp512) vs context depth", sp, draw_pp, note),
        ]
    if srcs := tuple(s for s in (H200_COMPARE, H100_ATTN) if (REPO / s).exists()):
        note = (
            "Colour: K type; line: V the same type (solid), f16 (dashed); dotted: the float32-FMA kernel "
            "before the tensor-core one. Eager calls: the flat parts at small sizes are the call's host "
            'time (see the GPU section, "Batch 1 and host overhead")'
        )
        out.append(
            Figure(
                "gpu-attention-vs-context.png",
                "GPU decode attention vs context",
                srcs,
                draw_gpu_attention,
                note,
            )
        )
    if hist := tuple(s[1] for s in HISTORY if (REPO / s[1]).exists()):
        note = "Batch 16, 32 q / 8 KV heads, head dim 128; hatched bars: V f16"
        out.append(
            Figure(
                "gpu-kernel-history.png",
                "GPU decode attention per kernel version",
                hist,
                draw_gpu_history,
                note,
            )
        )
    if (REPO / LLAMA_GPU).exists():
        out.append(
            Figure(
                "kv-memory.png",
                "KV-cache bytes per token and context in a fixed budget",
                (LLAMA_GPU,),
                draw_kv_memory,
                "Bar colour: K type; plain: V the same type, hatched: V f16, dotted: V another type",
            )
        )
    for rel in _ops_files():
        out.append(
            Figure(
                f"{Path(rel).stem}.png",
                f"ggml-cuda decode-step ops: FLASH_ATTN_EXT and SET_ROWS ({Path(rel).stem})",
                (rel,),
                lambda rel=rel: _draw_ops(rel),
            )
        )
    return out


def fingerprint(fig: Figure) -> str:
    """sha256 over this file and the figure's raw files: what the PNG was drawn from."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for rel in fig.sources:
        h.update(b"\0" + rel.encode() + b"\0" + (REPO / rel).read_bytes())
    return h.hexdigest()


def draw(fig: Figure, out_dir: Path) -> Path:
    """Draw one figure to out_dir/fig.name (PNG, written atomically); returns the path."""
    with matplotlib.style.context("default"), matplotlib.rc_context({"font.family": "DejaVu Sans"}):
        buf = io.BytesIO()
        fig.draw().savefig(buf, format="png", dpi=DPI)
    image = (
        Image.open(buf).convert("RGB").quantize(PALETTE, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    )
    info = PngImagePlugin.PngInfo()
    info.add_text(FINGERPRINT_KEY, fingerprint(fig))
    path = Path(out_dir) / fig.name
    with atomic_path(path, mkdir=True) as tmp:
        image.save(tmp, format="png", optimize=True, pnginfo=info)
    return path


def draw_all(out_dir: Path = FIG_DIR) -> list[Path]:
    return [draw(f, out_dir) for f in figures()]


def markdown(rel_dir: str = "figures") -> list[str]:
    """The figures section of results.md: each image with its caption line."""
    out = ["## Figures", ""]
    for f in figures():
        out += [f"![{f.title}]({rel_dir}/{f.name})", "", f"*{f.caption()}*", ""]
    return out
