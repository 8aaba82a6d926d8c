"""Python script inference with a polar KV cache through the patched llama-cpp-python.

    python scripts/python_inference.py [--model PATH] [--type-k polar] [--type-v polar] [-n 48]

Runs the same greedy prompt with an f16 cache and with the polar cache and prints both
completions and the first differing token (`scripts/demo.sh` prints the KV-cache sizes).
"""

from __future__ import annotations

import argparse
import json
import time

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def type_id(llama_cpp, name: str) -> int:
    const = f"GGML_TYPE_{name.upper()}"
    if not hasattr(llama_cpp, const):
        raise SystemExit(
            f"llama_cpp has no {const}: this is not the patched llama-cpp-python "
            "(install it with `python3 scripts/bootstrap.py llama`)"
        )
    return getattr(llama_cpp, const)


def run(model: str, type_k: str, type_v: str, n: int, ctx: int) -> dict:
    import llama_cpp

    fa = type_v not in ("f16", "f32")  # a quantized V cache needs flash attention
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=ctx,
        type_k=type_id(llama_cpp, type_k),
        type_v=type_id(llama_cpp, type_v),
        flash_attn=fa or type_k not in ("f16", "f32"),
        seed=0,
        verbose=False,
    )
    t0 = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, top_k=1)
    dt = time.perf_counter() - t0
    text = out["choices"][0]["text"]
    toks = llm.tokenize(text.encode(), add_bos=False)
    return {"type_k": type_k, "type_v": type_v, "text": text, "tokens": toks, "seconds": round(dt, 3)}


def main(argv=None) -> int:
    from kvpolar import paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF model (default: the built-in SmolLM2-135M)")
    ap.add_argument("--type-k", default="polar")
    ap.add_argument("--type-v", default="polar")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = args.model or str(paths.data_file(paths.SMOLLM2_GGUF))
    base = run(model, "f16", "f16", args.n, args.ctx)
    pol = run(model, args.type_k, args.type_v, args.n, args.ctx)
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(base["tokens"], pol["tokens"], strict=False)) if a != b),
        None if len(base["tokens"]) == len(pol["tokens"]) else min(len(base["tokens"]), len(pol["tokens"])),
    )
    res = {"model": model, "prompt": PROMPT, "f16": base, "polar": pol, "first_differing_token": first_diff}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"prompt: {PROMPT!r}")
        print(f"f16 cache            : {base['text']!r}")
        print(f"{args.type_k}/{args.type_v} cache : {pol['text']!r}")
        print("identical tokens" if first_diff is None else f"first differing token: {first_diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
