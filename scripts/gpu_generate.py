#!/usr/bin/env python3
"""Greedy generation with an fp16 KV cache vs the polar cache (cupy_kernels.torch_cache) on a GPU.

    python scripts/gpu_generate.py gguf PATH.gguf [--prompt TEXT] [--max-new-tokens N] [--json out.json]
    python scripts/gpu_generate.py tiny [--max-new-tokens N] [--json out.json]

`gguf` loads a GGUF model through transformers (needs the gguf package; weights are
dequantized to float16); `tiny` builds a randomly initialized LlamaConfig model (hidden 256,
4 layers, head_dim 64, 4/2 heads) for when no model file is at hand. Reports, for every cache
variant, the generated tokens, the first position where they differ from the fp16 cache,
and tokens/s of the whole generate call (prefill included, CUDA synchronized).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kvpolar.atomic import atomic_write_text

log = logging.getLogger("gpu_generate")

PROMPT = (
    "The history of the city begins with a small fishing village on the river. Over the centuries "
    "it grew into a trading port, and by the nineteenth century"
)
VARIANTS = [("polar", "polar"), ("polar", "f16"), ("polar3", "polar3")]


def load_gguf(path: Path, dtype: str = "float16"):
    from kvpolar.calibrate import load_gguf_model

    model, tok = load_gguf_model(path, dtype)
    return model.cuda(), tok


# The small random Llama of `tiny`, of the tests (tests/test_torch_cache.py, tests/test_gpu_decode_bench.py)
TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    initializer_range=0.05,
)


def tiny_llama(seed: int = 0, device: str = "cpu", dtype=None):
    """The TINY_LLAMA model with weights from torch.manual_seed(seed), in eval mode, attention
    "kvpolar" registered (cupy_kernels.torch_cache.enable)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cupy_kernels import torch_cache as tc

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval().to(device)
    if dtype is not None:
        m = m.to(dtype)
    tc.enable(m)
    return m


def load_tiny():
    import torch

    return tiny_llama(0, "cuda", torch.float16), None


def run(model, ids, max_new: int, cache=None):
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(
        ids, past_key_values=cache, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
    )
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return out[:, ids.shape[1] :], dt


def main(argv=None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prompt", default=PROMPT)
    common.add_argument("--max-new-tokens", type=int, default=128)
    common.add_argument("--json", help="write the results to this file")
    common.add_argument("--verbose", action="store_true")
    common.add_argument(
        "--no-center",
        action="store_true",
        help="no centering (default: llama.cpp's offsets, cupy_kernels.torch_cache.model_offsets)",
    )
    common.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("gguf", help="a GGUF model file", parents=[common])
    g.add_argument("path", type=Path)
    sub.add_parser("tiny", help="a tiny random Llama", parents=[common])
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    import torch

    from cupy_kernels import torch_cache as tc

    if args.cmd == "gguf":
        if not args.path.is_file():
            raise SystemExit(f"no such GGUF file: {args.path}")
        model, tok = load_gguf(args.path, args.dtype)
        ids = tok(args.prompt, return_tensors="pt").input_ids.cuda()
        name = args.path.name
    else:
        model, tok = load_tiny()
        ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1)).cuda()
        name = "tiny random Llama (4 layers, 4/2 heads, D=64)"
    tc.enable(model)
    offsets = None
    if not args.no_center:
        offsets = tc.model_offsets(model, args.path if args.cmd == "gguf" else None) or None
    run(model, ids, 4)  # warm-up (cuBLAS, SDPA)
    ref, dt_ref = run(model, ids, args.max_new_tokens)
    res = {
        "model": name,
        "device": torch.cuda.get_device_name(0),
        "prompt_tokens": ids.shape[1],
        "max_new_tokens": args.max_new_tokens,
        "argv": sys.argv,
        "centering": f"{len(offsets)} layers" if offsets else "none",
        "fp16": {"tokens": ref[0].tolist(), "tok_per_s": args.max_new_tokens / dt_ref},
    }
    if tok is not None:
        res["fp16"]["text"] = tok.decode(ref[0])
    print(f"{name}: fp16 cache {args.max_new_tokens / dt_ref:.1f} tok/s")
    for kfmt, vfmt in VARIANTS:
        run(model, ids, 4, tc.PolarCache(model.config, kfmt=kfmt, vfmt=vfmt, centering=offsets))  # compile
        cache = tc.PolarCache(model.config, kfmt=kfmt, vfmt=vfmt, centering=offsets)
        got, dt = run(model, ids, args.max_new_tokens, cache)
        div = tc.first_divergence(ref, got)
        key = f"{kfmt}+{vfmt}"
        res[key] = {
            "tokens": got[0].tolist(),
            "tok_per_s": args.max_new_tokens / dt,
            "first_divergence": div,
            "cache_bytes_per_token_layer": int(
                cache.layers[0].keys[0, :, 0].numel()
                + cache.layers[0].values[0, :, 0].numel() * cache.layers[0].values.element_size()
            ),
        }
        if tok is not None:
            res[key]["text"] = tok.decode(got[0])
        print(f"{key}: {args.max_new_tokens / dt:.1f} tok/s, first divergence from fp16 at token {div}")
    if tok is not None:
        for k in ("fp16", *(f"{a}+{b}" for a, b in VARIANTS)):
            print(f"--- {k}\n{res[k]['text']}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n", mkdir=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
