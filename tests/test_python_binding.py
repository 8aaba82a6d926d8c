"""The patched llama-cpp-python: polar type constants and Llama(type_k=polar) generation."""

from __future__ import annotations

import pytest

from kvpolar import format as pformat

pytestmark = pytest.mark.build


def test_constants_match_the_format(llama_cpp):
    assert llama_cpp.GGML_TYPE_POLAR == pformat.POLAR.type_id
    assert llama_cpp.GGML_TYPE_POLAR3 == pformat.POLAR3.type_id
    assert llama_cpp.GGML_TYPE_COUNT == pformat.POLAR3.type_id + 1


@pytest.mark.parametrize("name", ["polar", "polar3"])
def test_llama_generates_with_polar_cache(llama_cpp, smollm2_path, name):
    t = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")
    llm = llama_cpp.Llama(
        model_path=str(smollm2_path),
        n_ctx=256,
        type_k=t,
        type_v=t,
        flash_attn=True,
        verbose=False,
        n_threads=2,
    )
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0, top_k=1)
    text = out["choices"][0]["text"]
    assert "Paris" in text, text
