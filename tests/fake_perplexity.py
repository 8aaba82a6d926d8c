"""A stand-in llama-perplexity for the tests of the scripts that run it (kvpolar recommend,
scripts/quality_levers.py kld, scripts/layer_policy.py): a Python script printing what the real one
prints. KLD by the K and V types (per layer with LLAMA_KV_LAYER_K / _V); FAKE_PPL=fail|fail-polar3|short|
fewer|partial for the failure modes; FAKE_LOG=FILE records each call's arguments, FAKE_ENV_LOG=FILE its
LLAMA_KV_* variables. The fixture fake_bin
(conftest.py) puts it in a folder of its own."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

FAKE = r"""
import json, os, sys
args = sys.argv[1:]
if "--help" in args:
    print("-ctk,  --cache-type-k TYPE              KV cache data type for K\n"
          "                                        allowed values: f32, f16, q8_0, q4_0,\n"
          "                                        polar, polar3\n"
          "                                        (default: f16)")
    sys.exit(0)
if os.environ.get("FAKE_LOG"):  # every call's arguments, one JSON list a line
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(args) + "\n")
if os.environ.get("FAKE_ENV_LOG"):  # every call's LLAMA_KV_* variables, one JSON object a line
    with open(os.environ["FAKE_ENV_LOG"], "a") as f:
        f.write(json.dumps({a: b for a, b in os.environ.items() if a.startswith("LLAMA_KV_")}) + "\n")
mode = os.environ.get("FAKE_PPL", "ok")
k, v = args[args.index("-ctk") + 1], args[args.index("-ctv") + 1]
if mode == "fail" or (mode == "fail-polar3" and k == "polar3"):
    print("\n".join(f"load line {i}" for i in range(30)))
    print("llama_init_from_model: failed to create context: unsupported cache type")
    sys.exit(3)
if mode == "short":
    print("perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512")
    print("perplexity: the data file you provided tokenizes to only 700 tokens")
    sys.exit(0)
if "--kl-divergence" not in args:
    chunks = int(args[args.index("--chunks") + 1]) - (mode == "fewer")
    if mode == "partial":  # killed while writing the base logits
        open(args[args.index("--kl-divergence-base") + 1], "wb").write(b"log")
        sys.exit(9)
    open(args[args.index("--kl-divergence-base") + 1], "wb").write(b"logits")
    print(f"perplexity: calculating perplexity over {chunks} chunks, n_ctx=512")
    print("Final estimate: PPL = 23.2304 +/- 2.07959")
    sys.exit(0)
kld = {"f16": 0.0, "q8_0": 0.004, "q4_0": 0.04, "polar": 0.03, "polar3": 0.15}
# per-layer types (the session-21/29 measurement hacks' LLAMA_KV_LAYER_K / _V = "TYPE:a-b,c") over FAKE_LAYERS
# layers; a layer's K weighs 1 + l, its V n - l
n = int(os.environ.get("FAKE_LAYERS", "4"))
def layer_kld(name, default, weight):
    types = [default] * n
    spec = os.environ.get(name)
    if spec:
        t, _, items = spec.partition(":")
        for item in filter(None, items.split(",")):  # (an empty list: no layer)
            a, _, b = item.partition("-")
            for l in range(int(a), int(b or a) + 1):
                types[l] = t
    w = [weight(l) for l in range(n)]
    return sum(wl * kld[tl] for wl, tl in zip(w, types)) / sum(w)
d_k = layer_kld("LLAMA_KV_LAYER_K", k, lambda l: 1 + l)
d = (d_k + layer_kld("LLAMA_KV_LAYER_V", v, lambda l: n - l)) / 2
print("llama_kv_cache: KV centering: K offsets in 0 of 2 layers, V offsets in 0" if "polar" in k else "")
print(f"Mean PPL(Q)/PPL(base)         :   {1 + d:.6f} ±   0.01\nMean    KLD:   {d:.6f} ±   0.001")
print(f"Same top p: {100 - 100 * d:.3f} ± 1.0 %")
"""


def make(folder: Path) -> Path:
    """folder/llama-perplexity, executable; returns folder."""
    exe = folder / "llama-perplexity"
    folder.mkdir(parents=True, exist_ok=True)
    exe.write_text(f"#!{sys.executable}\n{FAKE}", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder
