#!/usr/bin/env python3
"""The nodes of one decode step's graph on the CPU, as the patched llama.cpp builds them for a K/V
cache type: index, op, name, shape, where the data lies, and which nodes feed it. The node order is
the one ggml-cuda sees (the graph is built the same with the cache on the device), so a fusion
that ggml-cuda turns away can be checked against the real shapes (docs/results-cuda.md, session 11).

    python3 scripts/dump_decode_graph.py MODEL.gguf [--ctk polar] [--ctv polar] [--layer 0]

Runs through the patched llama-cpp-python (the venv of scripts/bootstrap.py): an eval callback
records every node of the step after a 5-token prompt; prints the nodes of one layer (names ending
in "-<layer>" and the unnamed nodes between them). Exits non-zero when the decode fails.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

GGML_MAX_SRC = 10


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the pinned ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64); tests/test_graph_order.py checks it against the library."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def dump(model: str, ctk: str, ctv: str, layer: int, out=sys.stdout) -> int:
    import llama_cpp

    base = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    rec = {"on": False, "nodes": []}

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, _ud):
        if not ask and rec["on"]:
            rec["nodes"].append((t, ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents))
        return True

    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    m = llama_cpp.llama_model_load_from_file(model.encode(), mp)
    if not m:
        print(f"dump_decode_graph: cannot load {model}", file=sys.stderr)
        return 1
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 512, 512, 1, 1
    cp.type_k = getattr(llama_cpp, f"GGML_TYPE_{ctk.upper()}")
    cp.type_v = getattr(llama_cpp, f"GGML_TYPE_{ctv.upper()}")
    cp.flash_attn_type = 1
    cp.cb_eval = cb
    ctx = llama_cpp.llama_init_from_model(m, cp)
    if not ctx:
        print("dump_decode_graph: no context (see llama.cpp's log)", file=sys.stderr)
        return 1
    vocab = llama_cpp.llama_model_get_vocab(m)
    toks = (llama_cpp.llama_token * 5)(
        *[min(100 + 7 * i, llama_cpp.llama_vocab_n_tokens(vocab) - 1) for i in range(5)]
    )
    for i, (arr, n) in enumerate(((toks, 5), ((llama_cpp.llama_token * 1)(toks[4]), 1))):
        rec["on"] = i == 1
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, n))
        if rc != 0:
            print(f"dump_decode_graph: llama_decode returned {rc}", file=sys.stderr)
            return 1
    index = {ctypes.cast(p, ctypes.c_void_p).value: i for i, (p, _) in enumerate(rec["nodes"])}
    suffix, inside = f"-{layer}", False
    for i, (p, t) in enumerate(rec["nodes"]):
        name = t.name.decode(errors="replace")
        named = name.split(" ")[0]
        if named.endswith(suffix):
            inside = True
        elif named and "-" in named and named.rsplit("-", 1)[1].isdigit():
            if inside:
                break
            continue
        if not inside:
            continue
        srcs = []
        for a in t.src:
            if a:
                srcs.append(
                    f"#{index[a]}" if a in index else base.ggml_get_name(a).decode(errors="replace")[:24]
                )
        lo = t.data or 0
        print(
            f"{i:5d} {base.ggml_op_name(t.op).decode():15s} {name[:36]:36s} ne={list(t.ne)} "
            f"data={lo:#x}..{lo + base.ggml_nbytes(p):#x} src={srcs}",
            file=out,
        )
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(m)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ctk", default="polar")
    ap.add_argument("--ctv", default="polar")
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args(argv)
    return dump(args.model, args.ctk, args.ctv, args.layer)


if __name__ == "__main__":
    sys.exit(main())
