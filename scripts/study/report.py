"""docs/format-study.md from docs/format-study.json: the prose of report_template.md with the
numbers filled in. `render(res)` is a function of the JSON alone (no measurement, no llama.cpp
build), so tests/test_study_report.py can check the committed Markdown against it."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

from . import labels
from .run import COMMAND, CORE, CRIT_BITS, CRIT_GAUSS, MAIN_CELL

TEMPLATE = Path(__file__).with_name("report_template.md")

QW, SM = "qwen2.5-coder-1.5b", "smollm2-135m"
NAMES = {QW: "Qwen2.5", SM: "SmolLM2"}
YES_NO = {True: "yes", False: "**NO**", None: "not measured"}


# ----------------------------------------------------------------------------------------------
# Template


def _reflow(text: str) -> str:
    """Join the lines of each paragraph (see the top of report_template.md)."""
    out: list[str] = []
    for line in text.split("\n"):
        if (
            out
            and line
            and out[-1]
            and not line.startswith(("- ", "|", "#"))
            and not out[-1].startswith(("|", "#"))
        ):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


@functools.cache
def sections() -> dict[str, str]:
    """report_template.md's sections, reflowed, by name."""
    parts = re.split(r"^\[\[([a-z0-9_]+)\]\]\n", TEMPLATE.read_text(encoding="utf-8"), flags=re.M)
    return {name: _reflow(body.strip("\n")) for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def fill(name: str, **values) -> str:
    return sections()[name].format(**values)


# ----------------------------------------------------------------------------------------------
# Numbers


def f4(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"  # noqa: RUF001 (an en dash: Markdown)
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 0.01:
        return f"{v:.4f}"
    return f"{v:.2e}"


def bits_s(b: float) -> str:
    return f"{b:.4f}".rstrip("0").rstrip(".")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _get(res: dict, model: str, ck: str, key: str, metric: str):
    try:
        return res["real"][model]["cells"][ck]["layouts"][key][metric]
    except (KeyError, TypeError):
        return None


def _per_layer(res: dict, model: str, ck: str, key: str) -> dict | None:
    try:
        return res["real"][model]["cells"][ck]["layouts"][key]["per_layer"]
    except (KeyError, TypeError):
        return None


def _ratio_range(res: dict, model: str, ck: str, a: str, b: str, metric: str) -> tuple[float, float] | None:
    pa, pb = _per_layer(res, model, ck, a), _per_layer(res, model, ck, b)
    if pa is None or pb is None:
        return None
    r = [pa[layer][metric] / pb[layer][metric] for layer in pa if metric in pa[layer]]
    return (min(r), max(r)) if r else None


def machine_line(m: dict) -> str:
    return fill("machine", cpu=m["cpu"], cores=m["cores"], commit=m["commit"] or "?")


def _dump_note(res: dict) -> str:
    done = {m: r.get("dumped_s") for m, r in res["real"].items() if r and "meta" in r}
    made = {m: t for m, t in done.items() if t}
    if made:
        return fill("dumped", times=", ".join(f"{m} {t:.0f} s" for m, t in made.items()))
    cached = {m: r["meta"].get("seconds") for m, r in res["real"].items() if r and "meta" in r}
    times = ", ".join(f"{m} {t:.0f} s" for m, t in cached.items() if t)
    return fill("dumps_cached", times=times) if times else ""


def _iq4_note(v: str | None) -> str:
    if v and v.endswith(".so"):
        return fill("iq4_nl_ctypes", lib=Path(v).name)
    return v or "not measured"


# ----------------------------------------------------------------------------------------------
# Decision


def _polar_decision(res: dict, models: list[str]) -> list[str]:
    g = {r["key"]: r for r in res["gaussian"]}
    p = res["decision"]["polar"]
    out = [
        fill(
            "polar_heading",
            verdict="confirmed" if p["confirmed"] else "CHALLENGED",
            crit_bits=CRIT_BITS,
            bits=bits_s(p["bits"]),
            bits_ok=YES_NO[p["bits_ok"]],
            crit_gauss=CRIT_GAUSS,
            gauss=p["gauss_rel_mse"],
            gauss_ok=YES_NO[p["gauss_ok"]],
        )
    ]
    if p.get("qwen_ok") is not None:
        out.append(
            fill(
                "polar_qwen_row",
                polar=f4(p["qwen_k_logit_err"]),
                q4_0=f4(p["qwen_k_logit_err_q4_0"]),
                ok=YES_NO[p["qwen_ok"]],
            )
        )
    else:
        out.append(fill("polar_qwen_row_missing"))
    out.append("")
    keys = ("polar", "q4_0", "iq4_nl")
    for m in models:
        rq = _ratio_range(res, m, MAIN_CELL["k"], "polar", "q4_0", "logit_err")
        ri = _ratio_range(res, m, MAIN_CELL["k"], "polar", "iq4_nl", "logit_err")
        sentences = [
            fill(
                "polar_model",
                model=NAMES[m],
                **{f"lg_{k}": f4(_get(res, m, MAIN_CELL["k"], k, "logit_err")) for k in (*keys, "q5_0")},
                **{f"kl_{k}": f4(_get(res, m, MAIN_CELL["k"], k, "kl")) for k in keys},
            )
        ]
        if rq and ri:
            sentences.append(
                fill("polar_model_per_layer", q4_lo=rq[0], q4_hi=rq[1], iq_lo=ri[0], iq_hi=ri[1])
            )
        v = {f"v_{k}": f4(_get(res, m, MAIN_CELL["v"], k, "out_err_v")) for k in keys}
        sentences.append(fill("polar_model_v", **v))
        out.append(" ".join(sentences))
    if models:
        out += ["", _polar_reading(res, models, g)]
    out.append("")
    return out


def _polar_reading(res: dict, models: list[str], g: dict) -> str:
    b32 = _get(res, QW, MAIN_CELL["k"], "ring:polar-b32", "logit_err")
    iq = _get(res, QW, MAIN_CELL["k"], "iq4_nl", "logit_err")
    r11 = g.get("ring:256 pts, 11 rings", {}).get("rel_mse")
    ratios_q4, ratios_iq, stored, worse = [], [], [], []
    for m in models:
        for metric, ck in (("logit_err", MAIN_CELL["k"]), ("out_err_v", MAIN_CELL["v"])):
            for ref, acc in (("q4_0", ratios_q4), ("iq4_nl", ratios_iq)):
                pa, pb = _per_layer(res, m, ck, "polar"), _per_layer(res, m, ck, ref)
                if pa is None or pb is None:
                    continue
                for layer in pa:
                    r = pa[layer][metric] / pb[layer][metric]
                    acc.append(r)
                    if ref == "q4_0" and r >= 1:
                        where = {"model": NAMES[m], "tensor": ck[0].upper(), "layer": layer}
                        worse.append(fill("reading_worse_layer", **where, ratio=r))
            stored.append(_get(res, m, ck, "polar", "rel_mse"))
    stored = [v for v in stored if v is not None]
    return fill(
        "polar_reading",
        where=fill("reading_aggregate") if worse else fill("reading_everywhere"),
        q4_lo=min(ratios_q4),
        q4_hi=max(ratios_q4),
        worse=fill("reading_worse", layers=", ".join(worse)) if worse else "",
        iq_lo=min(ratios_iq),
        iq_hi=max(ratios_iq),
        stored_lo=min(stored),
        stored_hi=max(stored),
        gauss=g["polar"]["rel_mse"],
        b32=fill("reading_b32", b32=f4(b32), iq4_nl=f4(iq)) if b32 is not None else "",
        r11=" " + fill("reading_r11", r11=r11, polar=g["polar"]["rel_mse"]) if r11 else "",
    )


def _polar3_decision(res: dict, models: list[str]) -> list[str]:
    g = {r["key"]: r for r in res["gaussian"]}
    labels_g = {r["key"]: r["label"] for r in res["gaussian"]}
    q = res["decision"]["polar3"]
    best_mse, best = q["gauss_best_other_3_25"]
    out = [
        fill(
            "polar3_heading",
            verdict="confirmed" if q["gauss_ok"] else "CHALLENGED",
            gauss=q["gauss_rel_mse"],
            x_bound=g["polar3"]["x_bound"],
            best=labels_g.get(best, best),
            best_mse=best_mse,
            b33=g["B-33-ch"]["rel_mse"],
        ),
        "",
    ]
    for m in models:
        r3, r4 = (_get(res, m, MAIN_CELL["k"], k, "logit_err") for k in ("polar3", "q4_0"))
        if r3 is not None and r4:
            out.append(
                fill(
                    "polar3_model",
                    model=NAMES[m],
                    polar3=f4(r3),
                    ratio=r3 / r4,
                    share=3.25 / 4.5,
                    a_preset=f4(_get(res, m, MAIN_CELL["k"], "A-preset", "logit_err")),
                    b33=f4(_get(res, m, MAIN_CELL["k"], "B-33-ch", "logit_err")),
                )
            )
    return [*out, "", fill("polar3_reading"), ""]


def _graph_decision(res: dict, models: list[str]) -> list[str]:
    out = [fill("graph"), ""]
    for m in models:
        cks = ("k|0|none", "k|1|none", "k|0|mean", "k|1|mean")
        p = {ck: f4(_get(res, m, ck, "polar", "logit_err")) for ck in cks}
        q = {ck: f4(_get(res, m, ck, "q4_0", "logit_err")) for ck in cks}
        kb = _get(res, m, "k|1|kbias", "polar", "logit_err")
        out.append(
            fill(
                "graph_k_model",
                model=NAMES[m],
                p_raw=p["k|0|none"],
                p_rot=p["k|1|none"],
                p_mean=p["k|0|mean"],
                p_rot_mean=p["k|1|mean"],
                q_raw=q["k|0|none"],
                q_rot=q["k|1|none"],
                q_mean=q["k|0|mean"],
                q_rot_mean=q["k|1|mean"],
                kbias=fill("graph_k_kbias", polar=f4(kb)) if kb is not None else "",
            )
        )
    out += ["", fill("graph_v"), ""]
    for m in models:
        v = {
            n: _get(res, m, ck, "polar", metric)
            for n, ck, metric in (
                ("raw", "v|1|none", "out_err_v"),
                ("mean", "v|1|mean", "out_err_v"),
                ("raw_t0", "v|1|none", "out_err_v_t0"),
                ("mean_t0", "v|1|mean", "out_err_v_t0"),
            )
        }
        if v["raw"] is not None and v["raw_t0"] is not None:
            sink = res["real"][m]["sink_mass"]
            out.append(fill("graph_v_model", model=NAMES[m], sink=sink, **{n: f4(x) for n, x in v.items()}))
    out.append("")
    return out


def _papers(res: dict, models: list[str]) -> list[str]:
    g = {r["key"]: r for r in res["gaussian"]}
    pa, pb, pb3 = g["A-preset"], g["B-44-ch"], g["B-33-ch"]
    out = [fill("papers"), ""]
    text = [
        fill(
            "paper_a",
            bits=bits_s(pa["bits"]),
            mse=pa["rel_mse"],
            x_bound=pa["x_bound"],
            polar3=g["polar3"]["rel_mse"],
        )
    ]
    a_q = _get(res, QW, MAIN_CELL["k"], "A-preset", "logit_err")
    if a_q is not None:
        text.append(fill("paper_a_qwen", logit_err=f4(a_q)))
    out.append(" ".join(text))
    ratio = pb["rel_mse"] / g["polar"]["rel_mse"]
    text = [fill("paper_b", b44=pb["rel_mse"], ratio=ratio, b33=pb3["rel_mse"])]
    b_raw = _get(res, QW, "k|0|none", "B-44-ch", "logit_err")
    if b_raw is not None:
        text.append(
            fill(
                "paper_b_qwen",
                b_raw=f4(b_raw),
                b_kl_raw=f4(_get(res, QW, "k|0|none", "B-44-ch", "kl")),
                p_kl_raw=f4(_get(res, QW, "k|0|none", "polar", "kl")),
                b_rot_mean=f4(_get(res, QW, MAIN_CELL["k"], "B-44-ch", "logit_err")),
                p_rot_mean=f4(_get(res, QW, MAIN_CELL["k"], "polar", "logit_err")),
            )
        )
    text.append(fill("paper_b_groups"))
    out.append(" ".join(text))
    pair = []
    for m in models:
        right = _get(res, m, "k|0|none", "B-44-ch", "logit_err")
        other = _get(res, m, "k|0|none", "B-44-ch-other", "logit_err")
        if right is not None and other is not None:
            pair.append(fill("paper_b_pairing_model", model=NAMES[m], right=f4(right), other=f4(other)))
    if pair:
        out.append(fill("paper_b_pairing", models="; ".join(pair)))
    return out


def decision_text(res: dict) -> str:
    models = [m for m in (QW, SM) if res["real"].get(m) and "cells" in res["real"][m]]
    return "\n".join(
        _polar_decision(res, models)
        + _polar3_decision(res, models)
        + _graph_decision(res, models)
        + _papers(res, models)
    )


# ----------------------------------------------------------------------------------------------
# Tables


def _gaussian(res: dict, prov: str) -> list[str]:
    s = res["settings"]
    out = [fill("gaussian", blocks=s["gauss_blocks"], seed=s["gauss_seed"], provenance=prov)]
    for r in res["gaussian"]:
        out.append(row(r["label"], r["family"], bits_s(r["bits"]), f4(r["rel_mse"]), f"{r['x_bound']:.1f}"))
    out.append("")
    gk = {r["key"]: r for r in res["gaussian"]}
    need = ("A-preset", "B-44-ch", "B-33-ch", "polar", "polar-norm", "polar-max", "LM-r3a5")
    if all(k in gk for k in need):
        x = {k: gk[k]["x_bound"] for k in need}
        out.append(
            fill(
                "gaussian_reading",
                b44=x["B-44-ch"],
                b33=x["B-33-ch"],
                lm=x["LM-r3a5"],
                polar=x["polar"],
                gain_norm=1 - gk["polar"]["rel_mse"] / gk["polar-norm"]["rel_mse"],
                gain_max=1 - gk["polar"]["rel_mse"] / gk["polar-max"]["rel_mse"],
            )
        )
        out.append("")
    return out


def _real_model(model: str, r: dict, res: dict, prov: str) -> list[str]:
    mt = r["meta"]
    nq = res["settings"]["nq"]
    out = [
        fill(
            "real_model",
            model=model,
            **{k: mt[k] for k in ("n_layer", "n_head", "n_head_kv", "head_dim", "rope_theta", "pairing")},
            kbias=fill("real_kbias") if mt.get("has_kbias") else "",
            n_seq=mt["n_seq"],
            seq_len=mt["seq_len"],
            nll=", ".join(f"{v:.2f}" for v in mt["nll"]),
            layers=r["layers"],
            queries=r["queries_per_head"],
            every=max(1, mt["seq_len"] // nq),
            provenance=prov,
        ),
        "",
    ]
    cells = r["cells"]
    lab = labels(mt["pairing"])
    for t in ("k", "v"):
        main = cells.get(MAIN_CELL[t])
        if not main:
            continue
        out.append(fill(f"real_{t}_main"))
        for key, v in sorted(main["layouts"].items(), key=lambda kv: (kv[1]["bits"], kv[0])):
            if t == "k":
                metrics = (v["rel_mse"], v["logit_err"], v["kl"], v["out_err_k"])
            else:
                metrics = (v["rel_mse"], v["out_err_v"])
            out.append(row(lab.get(key, key), bits_s(v["bits"]), *map(f4, metrics)))
        out.append("")
        # rotation x centering grid
        heads = [
            (ck, f"rot {'on' if c['rot'] else 'off'}, {c['center'] if c['center'] != 'none' else 'raw'}")
            for ck, c in cells.items()
            if ck.startswith(t + "|")
        ]
        kbias = fill("real_k_grid_kbias") if t == "k" and mt.get("has_kbias") else ""
        out += [fill(f"real_{t}_grid", kbias=kbias), ""]
        core = [key for key in CORE if key in main["layouts"]]
        metric = "logit_err" if t == "k" else "out_err_v"
        out += [row("layout", "bits/elem", *(h for _, h in heads)), "|" + "---|" * (2 + len(heads))]
        for key in core:
            vals = [f4(cells[ck]["layouts"].get(key, {}).get(metric)) for ck, _ in heads]
            out.append(row(lab.get(key, key), bits_s(main["layouts"][key]["bits"]), *vals))
        out.append("")
        if t == "k":
            out += [fill("real_k_kl"), ""]
            out += [row("layout", *(h for _, h in heads)), "|" + "---|" * (1 + len(heads))]
            for key in core:
                vals = [f4(cells[ck]["layouts"].get(key, {}).get("kl")) for ck, _ in heads]
                out.append(row(lab.get(key, key), *vals))
            out.append("")
    return out


def render(res: dict) -> str:
    """docs/format-study.md of the results `res` (docs/format-study.json, loaded)."""
    m = res["machine"]
    v = m["versions"]
    prov = fill("provenance", command=res["command"], machine=machine_line(m))
    out = [
        fill(
            "header",
            command=COMMAND,
            machine=machine_line(m),
            python=v["python"],
            numpy=v["numpy"],
            torch=v.get("torch"),
            transformers=v.get("transformers"),
            gguf=v.get("gguf"),
            minutes=res["total_seconds"] / 60,
            dump_note=_dump_note(res),
            iq4_nl=_iq4_note(res.get("iq4_nl")),
        ),
        "",
    ]
    if res.get("decision"):
        out += [fill("decision"), "", decision_text(res), ""]
    out += _gaussian(res, prov)
    out += [fill("real"), ""]
    for model, r in res["real"].items():
        if not r or "skipped" in r:
            out += [fill("real_skipped", model=model, why=(r or {}).get("skipped")), ""]
        else:
            out += _real_model(model, r, res, prov)
    out += [fill("definitions"), ""]
    return "\n".join(out) + "\n"
