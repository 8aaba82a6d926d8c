#!/usr/bin/env python3
"""Is K centering exact? Logits with and without it, float32 cache, no flash attention.

    python scripts/centering_exactness.py [--model smollm2|qwen] [--tokens 400] [--ubatch 512]
        [--online 1|0] [--weights f32|file] [--json out.json]

Centering subtracts a fixed per-layer offset c from every key after RoPE; for a query q every
logit moves by the same q.c, so the softmax, and with a float32 cache the logits, should not
change beyond float32 rounding. This script evaluates the first --tokens tokens of the SQuAD
text with the patched llama_cpp twice in fresh processes (LLAMA_KV_CENTER=0, then =1, with
LLAMA_KV_CENTER_ONLINE=--online: 1 measures c from the first ubatch, 0 takes the model's k bias
or zeros), type_k = type_v = float32, flash attention off, one thread, and prints the largest
absolute logit difference per token.

--weights f32 (default) runs a copy of the model with every tensor dequantized to float32
(scripts/synth_gguf.py dequant, cached next to the model): its matrix products are float32 end to
end, so the comparison sees only the centering. --weights file runs the quantized file as it is:
on the CPU its matrix products round the activations to 8 bits (q8_0/q8_1 for Q4_1/Q4_K weights),
which turns the float32 rounding differences of the centered attention (~1e-7) into 1e-2 steps and,
through the layers, logit differences of order 1 (docs/centering-online.md): a property of the
model's arithmetic, not of the centering. Standard library + numpy + gguf + the project's llama_cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kvpolar import paths
from kvpolar.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth_gguf

MODELS = {"smollm2": paths.SMOLLM2_GGUF, "qwen": paths.QWEN_GGUF}

CHILD = r"""
import sys, numpy as np, llama_cpp
from llama_cpp import Llama
model, text, n, ub, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = Llama(model, n_ctx=max(256, n + 16), n_batch=max(n, 16), n_ubatch=ub, type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, logits_all=True, verbose=False, n_threads=1)
toks = llm.tokenize(open(text, encoding="utf-8").read()[: 20 * n].encode())[:n]
llm.eval(toks)
np.save(out, np.array(llm.scores[: len(toks)], dtype=np.float32))
"""


def logits(model: Path, text: Path, n: int, ub: int, center: int, online: int, tmp: Path) -> np.ndarray:
    out = tmp / f"logits-{center}.npy"
    env = {**os.environ, "LLAMA_KV_CENTER": str(center), "LLAMA_KV_CENTER_ONLINE": str(online)}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(text), str(n), str(ub), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"llama_cpp run with LLAMA_KV_CENTER={center} failed:\n{p.stderr[-2000:]}")
    return np.load(out)


def f32_copy(model: Path) -> Path:
    """The model with every tensor dequantized to float32, built once next to it."""
    out = model.with_name(model.stem + ".dequant-f32.gguf")
    if not out.is_file() or out.stat().st_mtime < model.stat().st_mtime:
        synth_gguf.dequant(model, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--online", type=int, choices=[0, 1], default=1)
    ap.add_argument("--weights", choices=["f32", "file"], default="f32")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = paths.data_file(MODELS[args.model])
    if args.weights == "f32":
        model = f32_copy(model)
    text = paths.data_file(paths.SQUAD_TXT)
    with tempfile.TemporaryDirectory() as t:
        a = logits(model, text, args.tokens, args.ubatch, 0, args.online, Path(t))
        b = logits(model, text, args.tokens, args.ubatch, 1, args.online, Path(t))
    per_token = np.abs(a - b).max(axis=1)
    first = int(np.argmax(per_token > 1e-3)) if (per_token > 1e-3).any() else None
    res = {
        "command": " ".join(
            ["python scripts/centering_exactness.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": model.name,
        "tokens": int(a.shape[0]),
        "ubatch": args.ubatch,
        "online": args.online,
        "weights": args.weights,
        "max_abs_logit_diff": float(per_token.max()),
        "first_token_over_1e-3": first,
        "per_token_max": [round(float(x), 5) for x in per_token],
    }
    print(
        f"{model.name}, {a.shape[0]} tokens, ubatch {args.ubatch}, online {args.online}: largest logit "
        f"difference centered vs not {per_token.max():.4g} (first token over 1e-3: {first})"
    )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n", mkdir=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
