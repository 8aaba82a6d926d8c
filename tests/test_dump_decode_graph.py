"""scripts/dump_decode_graph.py: the nodes of a decode step's graph on the CPU (the order ggml-cuda
fuses), here for SmolLM2 with a polar cache: layer 0 from its norm to the FFN, with the polar
cache writes and the flash attention in it, and the query chain that ggml-cuda runs as one kernel."""

from __future__ import annotations

import io

import pytest

from dump_decode_graph import dump


@pytest.mark.build
def test_layer0_of_a_polar_decode_step(llama_cpp, smollm2_path):
    out = io.StringIO()
    assert dump(str(smollm2_path), "polar", "polar", 0, out) == 0
    lines = out.getvalue().splitlines()
    ops = [line.split()[1] for line in lines]
    names = " ".join(lines)
    assert "FLASH_ATTN_EXT" in ops and ops.count("SET_ROWS") == 2
    assert "cache_k_l0" in names and "cache_v_l0" in names and "-1 " not in names
    # the query chain: MUL by D^-1, RESHAPEs, the Hadamard MUL_MAT, before the K write's SUB
    i = ops.index("SUB")
    assert "MUL" in ops[:i] and "MUL_MAT" in ops[ops.index("MUL", ops.index("ROPE")) : i]


@pytest.mark.build
def test_a_missing_model_is_an_error(llama_cpp, tmp_path, capsys):
    assert dump(str(tmp_path / "none.gguf"), "polar", "polar", 0) == 1
    assert "cannot load" in capsys.readouterr().err
