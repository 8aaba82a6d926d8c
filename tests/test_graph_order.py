"""The decode graph's node order that ggml-cuda's fused polar cache writes need (patches 0016-0018).

ggml-cuda runs `[SUB] [MUL] [RESHAPE MUL_MAT(H) RESHAPE] VIEW SET_ROWS(polar)` as one kernel only
when those nodes are consecutive (ggml_cuda_polar_try_fuse_chain); if a change of the graph
interleaved them again, the fusion would stop silently (same results, slower). These tests record
the nodes of one decode step through the binding's eval callback (the CPU build runs the same graph)
and check the order: the K chain and the V chain each end in their SET_ROWS without a foreign op in
between, right after the query's D^-1 and rotation (patch 0018 runs the three chains as one kernel);
with an f16 cache, upstream's ROPE -> VIEW -> SET_ROWS stays consecutive for its own fusion.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import pytest

import dump_decode_graph

pytestmark = pytest.mark.build

# struct ggml_tensor of the pinned ggml.h; test_the_tensor_layout_matches checks it against the library
GgmlTensor = dump_decode_graph.GgmlTensor


EMPTY = {"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "NONE"}


def _ggml_base(llama_cpp) -> ctypes.CDLL:
    libdir = Path(llama_cpp.llama_cpp._lib._name).parent
    libs = sorted(libdir.glob("libggml-base.so*"))
    assert libs, f"libggml-base.so not found next to {llama_cpp.llama_cpp._lib._name}"
    base = ctypes.CDLL(str(libs[0]))
    base.ggml_op_desc.restype = ctypes.c_char_p
    base.ggml_op_desc.argtypes = [ctypes.c_void_p]
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    return base


@functools.cache
def decode_nodes(llama_cpp, model: Path, ctk: str, ctv: str) -> tuple[dict, ...]:
    """The nodes of one decode step (after an 8-token prompt) in execution order: op, name, srcs
    (one run per cache pair and model: the tests only read them)."""
    base = _ggml_base(llama_cpp)
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
                "struct_name": g.name.decode(),
                "src": [s for s in g.src if s],
            }
        )
        return True

    mp = llama_cpp.llama_model_default_params()
    model_h = llama_cpp.llama_model_load_from_file(str(model).encode(), mp)
    assert model_h, f"could not load {model}"
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 256, 64, 64, 2, 2
    cp.type_k = getattr(llama_cpp, f"GGML_TYPE_{ctk.upper()}")
    cp.type_v = getattr(llama_cpp, f"GGML_TYPE_{ctv.upper()}")
    cp.flash_attn_type = 1  # on
    cp.cb_eval = callback
    cp.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model_h, cp)
    assert ctx, "could not create the context"
    try:
        prompt = (llama_cpp.llama_token * 8)(1, 504, 3458, 282, 4649, 314, 7042, 30)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(prompt, 8)) == 0
        recording[0] = True
        one = (llama_cpp.llama_token * 1)(42)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model_h)
    assert nodes, "the eval callback saw no node"
    return tuple(nodes)


def write_chain(nodes: tuple[dict, ...], cache: str) -> list[str]:
    """The ops from the first compute node of a cache write's chain to its SET_ROWS (cache
    'cache_k_l0' or 'cache_v_l0'): walk back from the SET_ROWS through the nodes it reads."""
    end = next(i for i, n in enumerate(nodes) if n["op"] == "SET_ROWS" and n["name"].startswith(cache))
    index = {n["ptr"]: i for i, n in enumerate(nodes)}
    chain, frontier = {end}, [end]
    while frontier:  # the nodes that feed the SET_ROWS, through views and the chain's ops
        i = frontier.pop()
        for s in nodes[i]["src"]:
            j = index.get(s)
            if j is None or j in chain:
                continue
            if nodes[j]["op"] in EMPTY | {"SUB", "MUL", "MUL_MAT"} and not nodes[j]["name"].startswith(
                ("Kcur", "Vcur", "Qcur")
            ):
                chain.add(j)
                frontier.append(j)
    start = min(j for j in chain if nodes[j]["op"] not in EMPTY)
    # what runs between the chain's first op and its SET_ROWS: the chain and no-op views only
    foreign = [nodes[k]["op"] for k in range(start, end) if k not in chain and nodes[k]["op"] not in EMPTY]
    assert not foreign, f"{cache}: ops {foreign} between the write chain's nodes"
    return [nodes[k]["op"] for k in range(start, end + 1) if nodes[k]["op"] not in EMPTY or k in chain]


@pytest.fixture(autouse=True)
def _defaults(kv_env, monkeypatch):
    kv_env()  # the centering/balancing defaults
    monkeypatch.delenv("LLAMA_ATTN_ROT_DISABLE", raising=False)


def test_the_tensor_layout_matches(llama_cpp, smollm2_path):
    nodes = decode_nodes(llama_cpp, smollm2_path, "polar", "polar")
    assert all(n["struct_name"] == n["name"] for n in nodes), "struct ggml_tensor layout differs from ggml.h"


@pytest.mark.parametrize("vtype", ["polar", "polar3", "f16"])
def test_polar_write_chains_are_consecutive(llama_cpp, smollm2_path, vtype):
    nodes = decode_nodes(llama_cpp, smollm2_path, "polar", vtype)
    k_ops = [op for op in write_chain(nodes, "cache_k_l0") if op not in EMPTY]
    # centering (SUB), balancing (MUL), upstream's Hadamard rotation (MUL_MAT), the write
    assert k_ops == ["SUB", "MUL", "MUL_MAT", "SET_ROWS"], k_ops
    if vtype != "f16":
        v_ops = [op for op in write_chain(nodes, "cache_v_l0") if op not in EMPTY]
        assert v_ops == ["MUL_MAT", "SET_ROWS"], v_ops


def _through_views(nodes: tuple[dict, ...], i: int) -> int:
    """The first node at or before index i (following src[0] back) that is not a no-op view."""
    index = {n["ptr"]: k for k, n in enumerate(nodes)}
    while nodes[i]["op"] in EMPTY:
        i = index[nodes[i]["src"][0]]
    return i


@pytest.mark.parametrize("vtype", ["polar", "polar3", "f16"])
def test_query_chain_and_writes_are_one_run(llama_cpp, smollm2_path, vtype):
    """Patch 0018: the query's D^-1 and rotation (what flash attention reads as Q), then the K and V
    write chains, with nothing else in between: ggml-cuda runs the layer's chains as one kernel."""
    nodes = decode_nodes(llama_cpp, smollm2_path, "polar", vtype)
    index = {n["ptr"]: k for k, n in enumerate(nodes)}
    fa = next(i for i, n in enumerate(nodes) if n["op"] == "FLASH_ATTN_EXT")
    q_rot = _through_views(nodes, index[nodes[fa]["src"][0]])
    before = [n["op"] for n in nodes[: q_rot + 1] if n["op"] not in EMPTY][-2:]
    assert before == ["MUL", "MUL_MAT"], before  # D^-1 of the query's KV head, the rotation
    end_v = next(
        i for i, n in enumerate(nodes) if n["op"] == "SET_ROWS" and n["name"].startswith("cache_v_l0")
    )
    after = [n["op"] for n in nodes[q_rot + 1 : end_v + 1] if n["op"] not in EMPTY]
    v_part = ["MUL_MAT", "SET_ROWS"] if vtype != "f16" else ["SET_ROWS"]
    assert after == ["SUB", "MUL", "MUL_MAT", "SET_ROWS", *v_part], after


def test_f16_cache_keeps_upstream_rope_fusion(llama_cpp, smollm2_path):
    nodes = decode_nodes(llama_cpp, smollm2_path, "f16", "f16")
    end = next(i for i, n in enumerate(nodes) if n["op"] == "SET_ROWS" and n["name"].startswith("cache_k_l0"))
    assert [n["op"] for n in nodes[end - 2 : end + 1]] == ["ROPE", "VIEW", "SET_ROWS"]


def test_query_chain_and_writes_are_one_run_in_iswa_caches(llama_cpp, gemma3_path):
    """The same order in the sliding-window (iSWA) build_attn (Gemma 3: both the SWA and the global
    layers' caches): every layer's polar writes directly follow its query chain."""
    nodes = decode_nodes(llama_cpp, gemma3_path, "polar", "polar")
    index = {n["ptr"]: k for k, n in enumerate(nodes)}
    fas = [i for i, n in enumerate(nodes) if n["op"] == "FLASH_ATTN_EXT"]
    assert len(fas) > 1
    for fa in fas:
        q_rot = _through_views(nodes, index[nodes[fa]["src"][0]])
        assert nodes[q_rot]["op"] == "MUL_MAT", nodes[q_rot]["op"]
        after = [n["op"] for n in nodes[q_rot + 1 : fa] if n["op"] not in EMPTY]
        assert after == ["SUB", "MUL", "MUL_MAT", "SET_ROWS", "MUL_MAT", "SET_ROWS"], (fa, after)
