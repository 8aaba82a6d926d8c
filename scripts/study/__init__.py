"""The format study: the layouts compared in docs/format-study.md, on one interface, and the
metrics they are compared by.

Modules: `paper_a` (recursive polar transform, arXiv 2502.02617), `paper_b` (pairwise radius +
angle over RoPE pairs, NeurIPS 2025), `variants` (Lloyd-Max pairs, the chosen ring codes with and
without scale search, other ring counts), `baselines` (llama.cpp types, iq4_nl through
`ggml_lib`), `activations` (real post-RoPE Q/K/V); `run` measures (docs/format-study.json),
`report` writes docs/format-study.md from report_template.md, `cli` is the command line
(`python3 scripts/format_study.py`).

Every layout is a `Layout`: `fn` maps (heads, tokens, head_dim) float32 -> the same shape after
quantization and dequantization, `bits(shape)` is the exact storage cost per element counting
every scale, norm, min/max and (online) codebook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import baselines, paper_a, paper_b, variants

__all__ = ["AttentionRef", "Layout", "finish_attention", "labels", "layouts", "rel_mse_sums"]

Shape = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Layout:
    key: str  # stable id (JSON)
    label: str  # table text
    family: str  # "llama.cpp", "chosen", "paper A", "paper B", "variant"
    bits: Callable[[Shape], float]
    fn: Callable[[np.ndarray], np.ndarray]


def _rows(fn: Callable[[np.ndarray], np.ndarray], block: int) -> Callable[[np.ndarray], np.ndarray]:
    """Apply a (n, block) -> (n, block) block function to (heads, tokens, d) rows."""

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape[-1] % block:
            raise ValueError(f"head size {x.shape[-1]} is not a multiple of the block {block}")
        return np.asarray(fn(x.reshape(-1, block)), np.float32).reshape(x.shape)

    return run


def _const(b: float) -> Callable[[Shape], float]:
    return lambda _shape: b


BASELINES = ("q8_0", "q5_0", "q4_1", "q4_0", "iq4_nl")


def _baseline(t: str) -> Layout:
    return Layout(
        t,
        f"llama.cpp {t}",
        "llama.cpp",
        _const(baselines.BITS[t]),
        _rows(lambda b: baselines.roundtrip(b, t), 32),
    )


def labels(pairing: str = "norm") -> dict[str, str]:
    """Table text of every layout, iq4_nl included where this machine has no llama.cpp build
    to run it (the report is rendered from the JSON alone)."""
    everything = {**{t: _baseline(t) for t in BASELINES}, **layouts(pairing)}
    return {key: lay.label for key, lay in everything.items()}


def layouts(pairing: str = "norm") -> dict[str, Layout]:
    """All layouts of the study. `pairing`: the RoPE pairing of the rows ("norm" / "neox"),
    used by paper B (which quantizes RoPE pairs); "B-44-ch-other" uses the other one."""
    other = "neox" if pairing == "norm" else "norm"
    out: list[Layout] = []
    add = out.append

    for t in BASELINES:
        if t != "iq4_nl" or baselines.iq4_nl_available():
            add(_baseline(t))

    from kvpolar import format as kf

    for f in ("polar", "polar3"):
        bits = kf.get_format(f).bits_per_elem
        add(
            Layout(
                f,
                f"**{f}** (chosen: ring code, scale search)",
                "chosen",
                _const(bits),
                _rows(lambda b, f=f: variants.chosen_roundtrip(b, f, "search"), 64),
            )
        )
        for s, what in (("norm", "s = block RMS"), ("max", "s = rmax / r_out")):
            add(
                Layout(
                    f"{f}-{s}",
                    f"{f} codes, no search ({what})",
                    "variant",
                    _const(bits),
                    _rows(lambda b, f=f, s=s: variants.chosen_roundtrip(b, f, s), 64),
                )
            )

    def pa(key, cfg, note=""):
        def bits(shape, cfg=cfg):
            return paper_a.bits_per_elem(cfg, shape[0] * shape[1], shape[2])

        def fn(x, cfg=cfg):
            return paper_a.roundtrip(x.reshape(-1, x.shape[-1]), cfg).reshape(x.shape)

        add(Layout(key, cfg.label + note, "paper A", bits, fn))

    pa("A-preset", paper_a.PRESET, " (paper preset)")
    pa("A-none", paper_a.PaperAConfig(precond="none"))
    pa("A-gauss", paper_a.PaperAConfig(precond="gaussian"))
    pa("A-online", paper_a.PaperAConfig(codebook="online"))
    pa("A-4322", paper_a.PaperAConfig(bits=(4, 3, 2, 2)))

    def pb(key, cfg, note=""):
        add(
            Layout(
                key,
                cfg.label + note,
                "paper B",
                _const(cfg.bits_per_elem),
                lambda x, cfg=cfg: paper_b.roundtrip(x, cfg),
            )
        )

    pb("B-44-ch", paper_b.PaperBConfig(4, 4, pairing), " (paper Polar_44)")
    pb("B-33-ch", paper_b.PaperBConfig(3, 3, pairing), " (paper Polar_33)")
    pb("B-44-ch-other", paper_b.PaperBConfig(4, 4, other), " (wrong pairing)")
    pb("B-44-tok32", paper_b.PaperBConfig(4, 4, pairing, "token", 32, "scale"))
    pb("B-44-tok64", paper_b.PaperBConfig(4, 4, pairing, "token", 64, "scale"))
    pb("B-44-tok32-mm", paper_b.PaperBConfig(4, 4, pairing, "token", 32, "minmax"))
    pb("B-33-tok64", paper_b.PaperBConfig(3, 3, pairing, "token", 64, "scale"))

    for key, cfg in (
        ("LM-r3a5", variants.LMPairConfig(3, 5)),
        ("LM-r4a4", variants.LMPairConfig(4, 4)),
        ("LM-r2a4", variants.LMPairConfig(2, 4)),
    ):
        add(
            Layout(
                key,
                cfg.label,
                "variant",
                _const(cfg.bits_per_elem),
                _rows(lambda b, cfg=cfg: variants.lm_pair_roundtrip(b, cfg), cfg.block),
            )
        )

    for name, counts in variants.RING_VARIANTS.items():
        code = variants.RingCode(counts)
        add(
            Layout(
                f"ring:{name}",
                f"ring code {name}, scale search",
                "variant",
                _const(code.bits_per_elem),
                _rows(lambda b, code=code: variants.ring_roundtrip(b, code), 64),
            )
        )
    code32 = variants.RingCode(kf.POLAR.counts, block=32)
    add(
        Layout(
            "ring:polar-b32",
            "polar's 256-point code, block 32, scale search",
            "variant",
            _const(code32.bits_per_elem),
            _rows(lambda b: variants.ring_roundtrip(b, code32), 32),
        )
    )
    return {lay.key: lay for lay in out}


# ----------------------------------------------------------------------------------------------
# Metrics


def rel_mse_sums(x: np.ndarray, xh: np.ndarray) -> tuple[float, float]:
    """(sum |x - xh|^2, sum |x|^2) in float64."""
    x = np.asarray(x, np.float64)
    return float(((x - xh) ** 2).sum()), float((x * x).sum())


def _softmax_masked(lg: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the last axis restricted to `mask`; log-probabilities are 0 outside it."""
    lg = np.where(mask, lg, -np.inf)
    m = lg.max(-1, keepdims=True)
    e = np.exp(lg - m)
    z = e.sum(-1, keepdims=True)
    return e / z, np.where(mask, lg - m - np.log(z), 0.0)


class AttentionRef:
    """Exact attention of one layer and sequence, kept to score many quantized K or V.

    q (Hq, T, d), k/v (Hkv, T, d); query head h reads kv head h // (Hq / Hkv) (grouped-query
    attention); queries at positions `qpos`, each over its causal window; logits
    l = q.k / sqrt(d). All sums in float64.
    """

    def __init__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, qpos: np.ndarray) -> None:
        hq, t, d = q.shape
        self.hkv = k.shape[0]
        self.rep = hq // self.hkv
        self.scale = 1.0 / np.sqrt(d)
        mask = np.arange(t)[None, :] <= np.asarray(qpos)[:, None]  # (nq, T)
        self.mask = np.tile(mask, (self.rep, 1))  # (rep*nq, T)
        self.nq = self.mask.shape[0] * self.hkv
        self.v = v.astype(np.float64)
        self.Q, self.p, self.logp, self.lg, self.o = [], [], [], [], []
        self.logit_var = 0.0
        self.out_sq = 0.0
        self.p0 = 0.0  # attention mass on token 0 (the "sink"), summed over queries
        cnt = self.mask.sum(1, keepdims=True)
        for g in range(self.hkv):
            Q = q[g * self.rep : (g + 1) * self.rep][:, qpos].reshape(-1, d).astype(np.float64)
            lg = (Q @ k[g].astype(np.float64).T) * self.scale
            p, logp = _softmax_masked(lg, self.mask)
            o = p @ self.v[g]
            mean = np.where(self.mask, lg, 0.0).sum(1, keepdims=True) / cnt
            dev = np.where(self.mask, lg - mean, 0.0)
            self.logit_var += float((dev * dev).sum())
            self.out_sq += float((o * o).sum())
            self.p0 += float(p[:, 0].sum())
            for lst, val in ((self.Q, Q), (self.lg, lg), (self.p, p), (self.logp, logp), (self.o, o)):
                lst.append(val)

    def k_sums(self, khat: np.ndarray) -> dict[str, float]:
        """Sums for a decoded K (Hkv, T, d): logit squared error (logit_se) and the per-query
        centred logit variance (logit_var) over the causal entries, KL(softmax(l) || softmax(l_hat))
        summed over queries (kl, nq), |o_K - o|^2 and |o|^2 with o_K = softmax(l_hat) V."""
        s = {
            "logit_se": 0.0,
            "logit_var": self.logit_var,
            "kl": 0.0,
            "nq": float(self.nq),
            "outk_se": 0.0,
            "out_sq": self.out_sq,
        }
        for g in range(self.hkv):
            lh = (self.Q[g] @ khat[g].astype(np.float64).T) * self.scale
            diff = np.where(self.mask, lh - self.lg[g], 0.0)
            s["logit_se"] += float((diff * diff).sum())
            ph, logph = _softmax_masked(lh, self.mask)
            s["kl"] += float((self.p[g] * (self.logp[g] - logph)).sum())
            ok = ph @ self.v[g] - self.o[g]
            s["outk_se"] += float((ok * ok).sum())
        return s

    def v_sums(self, vhat: np.ndarray) -> dict[str, float]:
        """Sums for a decoded V (Hkv, T, d): |o_V - o|^2 and |o|^2 with o_V = softmax(l) V_hat."""
        s = {"outv_se": 0.0, "out_sq": self.out_sq}
        for g in range(self.hkv):
            ov = self.p[g] @ vhat[g].astype(np.float64) - self.o[g]
            s["outv_se"] += float((ov * ov).sum())
        return s


def finish_attention(s: dict[str, float]) -> dict[str, float]:
    """Sums (added over layers) -> logit_err (MSE / variance), kl (mean per query), out_err_k,
    out_err_v (relative MSE of the attention output)."""
    res = {}
    if s.get("nq"):
        res["logit_err"] = s["logit_se"] / s["logit_var"]
        res["kl"] = s["kl"] / s["nq"]
        res["out_err_k"] = s["outk_se"] / s["out_sq"]
    if "outv_se" in s and s.get("out_sq"):
        res["out_err_v"] = s["outv_se"] / s["out_sq"]
    return res
