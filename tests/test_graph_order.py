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

import functools
from pathlib import Path

import pytest

import dump_decode_graph

pytestmark = pytest.mark.build

EMPTY = {"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "NONE"}


@functools.cache
def decode_nodes(llama_cpp, model: Path, ctk: str, ctv: str) -> tuple[dict, ...]:
    """The nodes of one decode step (after an 8-token prompt) in execution order: op, name, srcs
    (one run per cache pair and model: the tests only read them)."""
    return tuple(dump_decode_graph.decode_nodes(llama_cpp, model, ctk, ctv, dump_decode_graph.PROMPT))


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
