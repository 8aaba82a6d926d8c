#!/usr/bin/env python3
"""Needle in a haystack with the polar KV cache (cupy_kernels.torch_cache) against the model's
default fp16/bf16 cache, on a GPU (or, slowly, the CPU reference backend).

    python scripts/needle.py MODEL.gguf [--haystack pg_essays.txt] [--contexts 8192 16384 32768]
                             [--depths 11] [--variants polar+polar polar+f16] [--json out.json]

For every context length C and needle depth d (fractions 0..1 of the haystack, `--depths`
evenly spaced points), the prompt is the model's chat template around
    <the first C - margin tokens of the haystack, with one needle sentence inserted at d>
    <the question>
The needle is "The special magic number for <city> is <7 digits>." (city and number drawn
per cell from a fixed seed); the question asks for that number. Greedy decoding, up to
`--max-new-tokens` tokens; a cell is "found" when the number appears in the answer.
Every variant runs on the same prompt: the reference cache (the model's own, SDPA), then each
`kfmt+vfmt` PolarCache with the llama.cpp centering offsets (cupy_kernels.torch_cache.model_offsets:
attn_k.center from the GGUF, else the k bias). Reports found/not per cell and variant, the
answers, and where the polar answer first differs from the reference's.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text

log = logging.getLogger("needle")

CITIES = [
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Quito",
    "Tallinn",
    "Hobart",
    "Tbilisi",
    "Montevideo",
    "Dakar",
    "Reykjavik",
    "Kraków",
    "Valparaíso",
    "Da Nang",
    "Windhoek",
    "Trondheim",
    "Cusco",
    "Zanzibar",
]
QUESTION = (
    "What is the special magic number for {city} mentioned in the text above? Answer with the number only."
)
NEEDLE = " The special magic number for {city} is {num}. "
HOLE = "\u0000HAYSTACK\u0000"


def load_model(path: Path, dtype: str, device: str):
    from kvpolar.calibrate import load_gguf_model

    model, tok = load_gguf_model(path, dtype)
    return model.to(device), tok


def template_parts(tok, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack in the chat-templated prompt."""
    msg = [{"role": "user", "content": HOLE + "\n\n" + question}]
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    else:
        text = msg[0]["content"] + "\nAnswer:"
    pre, post = text.split(HOLE)
    return tok(pre, add_special_tokens=False).input_ids, tok(post, add_special_tokens=False).input_ids


def sentence_start(tok, hay: list[int], pos: int, back: int = 256) -> int:
    """A position at or before `pos` right after a token that ends a sentence (or `pos`)."""
    for p in range(pos, max(0, pos - back), -1):
        if p == 0 or tok.decode(hay[p - 1 : p]).rstrip().endswith((".", "!", "?")):
            return p
    return pos


def build_prompt(tok, hay: list[int], ctx: int, depth: float, city: str, num: str, margin: int):
    pre, post = template_parts(tok, QUESTION.format(city=city))
    needle = tok(NEEDLE.format(city=city, num=num), add_special_tokens=False).input_ids
    n_hay = ctx - margin - len(pre) - len(post) - len(needle)
    if n_hay <= 0:
        raise ValueError(f"context {ctx} is too small for the prompt around the haystack")
    if n_hay > len(hay):
        raise ValueError(f"haystack has {len(hay)} tokens, context {ctx} needs {n_hay}")
    body = hay[:n_hay]
    p = sentence_start(tok, body, round(depth * n_hay))
    ids = pre + body[:p] + needle + body[p:] + post
    return ids, p / n_hay


def generate(model, ids, max_new: int, cache=None):
    import torch

    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=max_new, do_sample=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - t0


def save(path: Path | None, res: dict) -> None:
    """Write the results atomically (after every cell, so a run cut short keeps what it did)."""
    if path is not None:
        atomic_write_text(path, json.dumps(res, indent=1) + "\n", mkdir=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF model file (transformers GGUF loading)")
    ap.add_argument("--haystack", type=Path, default=None, help="text file (default: the PG essays)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--depths", type=int, default=11, help="grid points from 0 to 1")
    ap.add_argument("--variants", nargs="+", default=["polar+polar", "polar+f16"])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--margin", type=int, default=32, help="context tokens left for the answer")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-center", action="store_true", help="polar caches without centering")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    import torch

    from cupy_kernels import torch_cache as tc
    from kvpolar import paths

    if not args.model.is_file():
        raise SystemExit(f"no such GGUF file: {args.model}")
    variants = []
    for v in args.variants:
        k, _, val = v.partition("+")
        if k not in ("polar", "polar3") or val not in ("polar", "polar3", "f16"):
            raise SystemExit(f"variant must be K+V, K in polar|polar3, V in polar|polar3|f16, got {v!r}")
        variants.append((k, val))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hay_path = args.haystack or paths.data_file(paths.HAYSTACK_TXT)
    text = Path(hay_path).read_text(encoding="utf-8")

    t0 = time.perf_counter()
    model, tok = load_model(args.model, args.dtype, device)
    t_load = time.perf_counter() - t0
    tc.enable(model)
    offsets = None if args.no_center else tc.model_offsets(model, args.model)
    hay = tok(text, add_special_tokens=False).input_ids
    log.info("haystack %d tokens, model loaded in %.1f s", len(hay), t_load)

    meta = {
        "model": args.model.name,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": args.dtype,
        "centering": "none" if args.no_center else f"{len(offsets)} layers",
        "haystack": Path(hay_path).name,
        "haystack_tokens": len(hay),
        "load_seconds": round(t_load, 1),
        "command": "python scripts/needle.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    rng = random.Random(args.seed)
    grid = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    cells = []
    names = ["reference"] + [f"{k}+{v}" for k, v in variants]
    for ctx in args.contexts:
        for depth in grid:
            city = rng.choice(CITIES)
            num = str(rng.randrange(10**6, 10**7))
            ids, actual = build_prompt(tok, hay, ctx, depth, city, num, args.margin)
            x = torch.tensor([ids], device=device)
            cell = {
                "ctx": ctx,
                "depth": depth,
                "needle_at": round(actual, 4),
                "prompt_tokens": len(ids),
                "city": city,
                "number": num,
            }
            ref = None
            for name, kv in zip(names, [None, *variants], strict=True):
                cache = None
                if kv is not None:
                    cache = tc.PolarCache(model.config, kfmt=kv[0], vfmt=kv[1], centering=offsets or None)
                toks, dt = generate(model, x, args.max_new_tokens, cache)
                ans = tok.decode(toks, skip_special_tokens=True)
                r = {
                    "found": num in ans.replace(",", "").replace(" ", ""),
                    "answer": ans.strip(),
                    "seconds": round(dt, 3),
                }
                if ref is None:
                    ref = toks
                else:
                    r["first_divergence"] = tc.first_divergence(torch.tensor([ref]), torch.tensor([toks]))
                cell[name] = r
                del cache
            cells.append(cell)
            save(args.json, {**meta, "complete": False, "cells": cells})
            print(
                f"ctx {ctx:6d} depth {depth:.2f}: "
                + "  ".join(f"{n}={'Y' if cell[n]['found'] else 'n'}" for n in names),
                flush=True,
            )

    summary = {}
    for name in names:
        summary[name] = {
            str(c): sum(cell[name]["found"] for cell in cells if cell["ctx"] == c) for c in args.contexts
        }
    # "±1 on the grid": a polar miss counts against it only if the reference found that cell and
    # neither grid neighbour of the same context was also a polar hit.
    for name in names[1:]:
        misses = []
        for i, cell in enumerate(cells):
            if cell["reference"]["found"] and not cell[name]["found"]:
                nb = [
                    cells[j] for j in (i - 1, i + 1) if 0 <= j < len(cells) and cells[j]["ctx"] == cell["ctx"]
                ]
                misses.append(
                    {
                        "ctx": cell["ctx"],
                        "depth": cell["depth"],
                        "neighbour_found": any(n[name]["found"] for n in nb),
                    }
                )
        summary[name + ":missed_where_reference_found"] = misses
    print(json.dumps(summary, indent=1))
    save(args.json, {**meta, "complete": True, "summary": summary, "cells": cells})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
