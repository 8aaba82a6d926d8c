#!/usr/bin/env python3
"""Should a left padding count in PolarCache's "prefill" centering offsets? A measurement on the CPU.

    python3 scripts/padded_centering.py [--model PATH.gguf] [--long 512] [--short 128] [--steps 64]
        [--starts 0 ...] [--json docs/torch-cache/padded-centering.json]

`PolarCache(centering="prefill")` takes, per sequence and KV head, the mean of the first update's keys and
values as its offsets (cupy_kernels.torch_cache). In a left-padded batch that first update holds the
padding's keys and values too; until session 37 a short prompt's offsets were therefore mostly the padding's
(exact under softmax either way, but the blocks are centered on the offsets). Since session 37 the layer
takes the mean over each sequence's own tokens once the prefill's mask shows the padding
(`PolarCacheLayer.recenter_prefill`); this script measured both.

Two prompts from the SQuAD text (`--long` and `--short` tokens, from token `--starts` on; one batch per
start) run as one left-padded batch through a model loaded from GGUF (SmolLM2-135M by default; float32 on the
CPU; transformers' GGUF loader needs accelerate), then `--steps` teacher-forced decode steps (the text's next
tokens, the padding mask and per-sequence positions as `generate` passes them). Caches, each on the numpy
reference codec (backend "reference", bit-exact with the GPU encoder):
  exact          float32 DynamicCache (the reference)
  none           PolarCache polar K+V, no centering
  prefill-padded centering="prefill" before session 37: the mean over the first update, padding included
  prefill        centering="prefill" as built: the mean over each sequence's own tokens (the padding left out)
  prefill-real   the same offsets set by this script from the start (no padded first encoding); must equal
                 prefill's results bit for bit (checked)
  prefill-balance  prefill with K balancing (`PolarCache(balance=True)`: llama.cpp's power-of-two factors per
                 RoPE pair from the first prefill's keys and queries, torch_cache.balance_factors)
  prefill-sink   prefill-real with K's offset 0.75 x that mean + 0.25 x the sequence's first key (llama.cpp's
                 sink-weighted offset, patch 0012, before its exact sink key; V as prefill-real)
and, for each, the mean KL divergence of the decode steps' next-token distributions from `exact`'s, per prompt
(over the starts: the mean of each batch's mean), and how often the top token is `exact`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text
from kvsetup.cpu import machine_label
from llama_bench import command_line

CACHES = ("exact", "none", "prefill-padded", "prefill", "prefill-real", "prefill-sink", "prefill-balance")
SINK_WEIGHT = 0.25  # prefill-sink's weight of the first key (llama.cpp's LLAMA_KV_CENTER_SINK of patch 0012)


def real_mean_prep(real, sink: float = 0.0):
    """A PolarCacheLayer._prep whose "prefill" offsets average each sequence's own tokens (`real` [B, T]
    bool: True where a token is not padding) instead of the whole first update; K's offset moved toward
    the sequence's first key by `sink`: (1 - sink) mean + sink k_first."""
    from cupy_kernels import torch_cache

    plain = torch_cache.PolarCacheLayer._prep

    def prep(self, key_states, value_states):
        if self.offsets == "prefill" and self.mu_k is None:
            T = key_states.shape[2]  # the prefill: tokens 0 .. T - 1
            w = real[:, :T].to(key_states.device, torch_cache.torch.float32)[:, None, :, None]  # [B, 1, T, 1]
            n = w.sum(2, keepdim=True)
            self.mu_k = (key_states.float() * w).sum(2, keepdim=True) / n
            self.mu_v = (value_states.float() * w).sum(2, keepdim=True) / n
            if sink:
                first = real[:, :T].long().argmax(1).to(key_states.device)  # each sequence's first own token
                k0 = key_states.float()[torch_cache.torch.arange(len(first)), :, first].unsqueeze(
                    2
                )  # [B, H, 1, D]
                self.mu_k = (1 - sink) * self.mu_k + sink * k0
        return plain(self, key_states, value_states)

    return prep


def run(model, ids, mask, steps, cache):
    """Teacher-forced: the prefill of ids[:, :-steps], then one step per remaining token; the log-softmax of
    each step's logits [steps, B, vocab]."""
    import torch

    from cupy_kernels import torch_cache

    n0 = ids.shape[1] - steps
    out = []
    with torch.no_grad():
        for t in range(steps):
            lo = 0 if t == 0 else n0 + t - 1
            hi = n0 + t
            m = mask[:, :hi]
            pos = torch_cache.padded_positions(m)[:, lo:hi]
            r = model(
                input_ids=ids[:, lo:hi],
                attention_mask=m,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            out.append(torch.log_softmax(r.logits[:, -1].float(), -1))
    return torch.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=None, help="a GGUF model, or a data file's name (default: SmolLM2-135M)"
    )
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--short", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument(
        "--starts", type=int, nargs="+", default=[0], help="token offsets of the text, one batch each"
    )
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if not (0 < a.short < a.long) or a.steps <= 0:
        raise SystemExit(f"need 0 < --short < --long and --steps > 0, got {a.short}, {a.long}, {a.steps}")

    import torch
    from transformers import DynamicCache

    from cupy_kernels import torch_cache
    from kvpolar import calibrate, paths

    path = a.model or paths.data_file(paths.SMOLLM2_GGUF)
    if not path.exists() and path.name == str(path):  # a data file's name (e.g. gemma-3-270m-q4_k_m.gguf)
        path = paths.data_file(path.name)
    t0 = time.time()
    model, tok = calibrate.load_gguf_model(path, "float32")
    torch_cache.enable(model)
    text = paths.data_file("squad.txt").read_text()
    toks = tok(text, return_tensors="pt").input_ids[0]
    n = a.long + a.steps
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad = a.long - a.short
    kl = {name: [] for name in CACHES[1:]}  # per start: [steps, B]
    top1 = {name: [] for name in CACHES[1:]}
    for start in a.starts:
        if start < 0 or toks.numel() < start + 2 * n:
            raise SystemExit(f"the text has {toks.numel()} tokens; start {start} needs {start + 2 * n}")
        seq_long = toks[start : start + n]
        seq_short = toks[start + n : start + n + a.short + a.steps]
        ids = torch.stack([seq_long, torch.cat([torch.full((pad,), pad_id), seq_short])])
        mask = torch.ones_like(ids, dtype=torch.long)
        mask[1, :pad] = 0
        logp = {}
        for name in CACHES:
            plain, recenter = torch_cache.PolarCacheLayer._prep, torch_cache.PolarCacheLayer.recenter_prefill
            if name in ("prefill-real", "prefill-sink"):
                sink = SINK_WEIGHT if name == "prefill-sink" else 0.0
                torch_cache.PolarCacheLayer._prep = real_mean_prep(mask.bool(), sink)
            if name == "prefill-padded":  # the padded first encoding kept
                torch_cache.PolarCacheLayer.recenter_prefill = lambda self, pads, query=None: None
            try:
                if name == "exact":
                    cache = DynamicCache()
                else:
                    centering = None if name == "none" else "prefill"
                    cache = torch_cache.PolarCache(
                        model.config,
                        centering=centering,
                        backend="reference",
                        balance=name == "prefill-balance",
                    )
                logp[name] = run(model, ids, mask, a.steps, cache)
            finally:
                torch_cache.PolarCacheLayer._prep = plain
                torch_cache.PolarCacheLayer.recenter_prefill = recenter
        if not torch.equal(logp["prefill"], logp["prefill-real"]):
            raise SystemExit(
                "prefill (as built) and prefill-real differ: recenter_prefill is not the own-token mean"
            )
        ref = logp["exact"]
        for name in CACHES[1:]:
            kl[name].append((ref.exp() * (ref - logp[name])).sum(-1))
            top1[name].append((ref.argmax(-1) == logp[name].argmax(-1)).float())
        print(f"  start {start}: done ({time.time() - t0:.0f} s)", flush=True)

    rows = []
    for name in CACHES[1:]:
        per = [k.mean(0) for k in kl[name]]  # per start: [B]
        rows.append(
            {
                "cache": name,
                "kld_long": float(sum(p[0] for p in per) / len(per)),
                "kld_short": float(sum(p[1] for p in per) / len(per)),
                "kld_short_per_start": [round(float(p[1]), 5) for p in per],
                "top1_long": float(torch.cat([t[:, 0] for t in top1[name]]).mean()),
                "top1_short": float(torch.cat([t[:, 1] for t in top1[name]]).mean()),
            }
        )
    print(
        f"{machine_label()}; model {path.name}; prompts {a.long} and {a.short} tokens (padding {pad}), "
        f"{a.steps} steps, starts {a.starts}; polar K+V"
    )
    print(
        f"{'cache':14s} {'KLD long':>10s} {'KLD short':>10s} {'top-1 long':>11s} {'top-1 short':>12s}"
        "  short per start"
    )
    for r in rows:
        print(
            f"{r['cache']:14s} {r['kld_long']:10.5f} {r['kld_short']:10.5f} {r['top1_long']:11.3f} "
            f"{r['top1_short']:12.3f}  {r['kld_short_per_start']}"
        )
    if a.json:
        doc = {
            "command": command_line("padded_centering.py", argv),
            "machine": machine_label(),
            "model": path.name,
            "long": a.long,
            "short": a.short,
            "padding": pad,
            "steps": a.steps,
            "starts": a.starts,
            "rows": rows,
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_text(a.json, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
