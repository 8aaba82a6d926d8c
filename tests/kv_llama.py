"""A small llama_cpp context on SmolLM2 for the KV-cache centering and quality-lever tests
(tests/test_centering.py, tests/test_quality_levers.py), the logits of its last token, and the
logits after a K shift."""

from __future__ import annotations

import numpy as np

# the environment a new context reads for centering, balancing and the exact sink key (kv_env in
# conftest.py clears them)
KV_ENV_VARS = (
    "LLAMA_KV_CENTER",
    "LLAMA_KV_CENTER_V",
    "LLAMA_KV_CENTER_ONLINE",
    "LLAMA_KV_CENTER_SINK",
    "LLAMA_KV_BALANCE",
    "LLAMA_KV_EXACT_SINK",
    "LLAMA_KV_LAYER_POLICY",
)


def new_llama(llama_cpp, model, ctk="polar", flash_attn=True, ctv="f16"):
    """256-token context, K cache of type ctk, V ctv, flash attention (unless flash_attn False), 2 threads."""
    return llama_cpp.Llama(
        model_path=str(model),
        n_ctx=256,
        n_batch=256,
        type_k=getattr(llama_cpp, f"GGML_TYPE_{ctk.upper()}"),
        type_v=getattr(llama_cpp, f"GGML_TYPE_{ctv.upper()}"),
        flash_attn=flash_attn,
        n_threads=2,
        verbose=False,
    )


def prompted(llama_cpp, model, prompt, ctk="polar"):
    """A new context (new_llama) that has evaluated prompt, and the state it saved then."""
    llm = new_llama(llama_cpp, model, ctk=ctk)
    llm.eval(prompt)
    return llm, llm.save_state()


def logits(llama_cpp, llm) -> np.ndarray:
    """A copy of the logits of the last evaluated token."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def k_shift_logits(llama_cpp, llm, prompt, cont, n_discard=32) -> np.ndarray:
    """Prompt, then drop positions [4, 4 + n_discard) and shift the rest back (K shift), then cont."""
    llm.eval(prompt)
    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 4, 4 + n_discard)
    llama_cpp.llama_memory_seq_add(mem, 0, 4 + n_discard, -1, -n_discard)
    llm.n_tokens = len(prompt) - n_discard
    llm.eval(cont)
    return logits(llama_cpp, llm)


def restored_logits(llama_cpp, model, state, cont, ctv="f16") -> np.ndarray:
    """A fresh context (new_llama, polar K, V ctv) that loads state, then evaluates cont: its last logits."""
    llm = new_llama(llama_cpp, model, ctv=ctv)
    llm.load_state(state)
    llm.eval(cont)
    return logits(llama_cpp, llm)
