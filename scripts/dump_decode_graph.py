#!/usr/bin/env python3
"""The nodes of one decode step's graph on the CPU, as the patched llama.cpp builds them for a K/V
cache type: index, op, name, shape, where the data lies, and which nodes feed it. The node order is
the one ggml-cuda sees (the graph is built the same with the cache on the device), so a fusion
that ggml-cuda turns away can be checked against the real shapes (docs/results-cuda.md, session 11).

    python3 scripts/dump_decode_graph.py MODEL.gguf [--ctk polar] [--ctv polar] [--layer 0]

Runs through the patched llama-cpp-python (the venv of scripts/bootstrap.py): an eval callback
records every node of the step after an 8-token prompt (decode_nodes, which tests/test_graph_order.py
also reads); prints the nodes of one layer (names ending in "-<layer>" and the unnamed nodes between
them; srcs that are not nodes of the step print as "leaf"). Exits non-zero when the decode fails.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

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


def ggml_base(llama_cpp) -> ctypes.CDLL:
    """libggml-base next to the binding's libllama, with the name/op/size functions typed."""
    libdir = Path(llama_cpp.llama_cpp._lib._name).parent
    libs = sorted(libdir.glob("libggml-base.so*"))
    if not libs:
        raise FileNotFoundError(f"libggml-base.so not found next to {llama_cpp.llama_cpp._lib._name}")
    base = ctypes.CDLL(str(libs[0]))
    for f, res in (
        ("ggml_op_desc", ctypes.c_char_p),
        ("ggml_get_name", ctypes.c_char_p),
        ("ggml_nbytes", ctypes.c_size_t),
    ):
        getattr(base, f).restype = res
        getattr(base, f).argtypes = [ctypes.c_void_p]
    return base


def decode_nodes(
    llama_cpp, model, ctk: str, ctv: str, prompt, n_ctx=256, n_batch=64, n_threads=2
) -> list[dict]:
    """The nodes of one decode step (token 42 after `prompt`) in execution order, recorded through the
    binding's eval callback: ptr, op, name, struct_name, ne, data, nbytes, src (the node pointers it
    reads). Raises RuntimeError when the model, the context or a decode fails."""
    base = ggml_base(llama_cpp)
    recording, nodes = [False], []

    @ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
    def callback(t, ask, _user):
        if ask or not recording[0]:
            return True
        g = GgmlTensor.from_address(t)
        nodes.append(
            {
                "ptr": t,
                "op": base.ggml_op_desc(t).decode(),
                "name": base.ggml_get_name(t).decode(),
                "struct_name": g.name.decode(errors="replace"),
                "ne": list(g.ne),
                "data": g.data or 0,
                "nbytes": base.ggml_nbytes(t),
                "src": [s for s in g.src if s],
            }
        )
        return True

    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    model_h = llama_cpp.llama_model_load_from_file(str(model).encode(), mp)
    if not model_h:
        raise RuntimeError(f"cannot load {model}")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = (
        n_ctx,
        n_batch,
        n_batch,
        n_threads,
        n_threads,
    )
    cp.type_k = getattr(llama_cpp, f"GGML_TYPE_{ctk.upper()}")
    cp.type_v = getattr(llama_cpp, f"GGML_TYPE_{ctv.upper()}")
    cp.flash_attn_type = 1  # on
    cp.cb_eval = callback
    cp.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model_h, cp)
    try:
        if not ctx:
            raise RuntimeError("no context (see llama.cpp's log)")
        toks = (llama_cpp.llama_token * len(prompt))(*prompt)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(toks, len(prompt))) != 0:
            raise RuntimeError("the prompt's decode failed")
        recording[0] = True
        one = (llama_cpp.llama_token * 1)(42)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
            raise RuntimeError("the decode step failed")
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model_h)
    if not nodes:
        raise RuntimeError("the eval callback saw no node")
    return nodes


PROMPT = (1, 504, 3458, 282, 4649, 314, 7042, 30)


def dump(model: str, ctk: str, ctv: str, layer: int, out=sys.stdout) -> int:
    """Print the nodes of `layer` in one decode step; 1 (and why on stderr) when it fails."""
    import llama_cpp

    try:
        nodes = decode_nodes(llama_cpp, model, ctk, ctv, PROMPT)
    except RuntimeError as e:
        print(f"dump_decode_graph: {e}", file=sys.stderr)
        return 1
    index = {n["ptr"]: i for i, n in enumerate(nodes)}
    suffix, inside = f"-{layer}", False
    for i, n in enumerate(nodes):
        name = n["struct_name"]
        named = name.split(" ")[0]
        if named.endswith(suffix):
            inside = True
        elif named and "-" in named and named.rsplit("-", 1)[1].isdigit():
            if inside:
                break
            continue
        if not inside:
            continue
        srcs = [f"#{index[a]}" if a in index else "leaf" for a in n["src"]]
        print(
            f"{i:5d} {n['op']:15s} {name[:36]:36s} ne={n['ne']} "
            f"data={n['data']:#x}..{n['data'] + n['nbytes']:#x} src={srcs}",
            file=out,
        )
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
