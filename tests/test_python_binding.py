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


@pytest.mark.parametrize("name", ["POLAR", "POLAR3", "Q4_0"])
def test_quantized_v_without_flash_attention_is_named(llama_cpp, smollm2_path, name):
    """llama.cpp refuses a quantized V cache without flash attention and says so only in its log; the
    binding (llama-cpp-python patch 0002) raises a ValueError naming the type and the fix instead of
    "Failed to create llama_context". flash_attn=False is Llama's default."""
    t = getattr(llama_cpp, f"GGML_TYPE_{name}")
    want = rf"type_v=GGML_TYPE_{name} .*needs flash attention: pass flash_attn=True \(got flash_attn=False\)"
    with pytest.raises(ValueError, match=want):
        llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=256, type_v=t, verbose=False)


def test_polar_k_without_flash_attention_runs(llama_cpp, smollm2_path):
    """A polar K cache with V f16 needs no flash attention (the exact sink key is used on that path too
    since patch 0033: tests/test_exact_sink.py)."""
    llm = llama_cpp.Llama(
        model_path=str(smollm2_path), n_ctx=256, type_k=llama_cpp.GGML_TYPE_POLAR, verbose=False, n_threads=2
    )
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0, top_k=1)
    assert "Paris" in out["choices"][0]["text"], out["choices"][0]["text"]
