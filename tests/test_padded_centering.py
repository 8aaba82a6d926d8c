"""scripts/padded_centering.py: "prefill" offsets over a sequence's own tokens, and the teacher-forced run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import padded_centering as pc  # noqa: E402
from cupy_kernels import torch_cache as tc  # noqa: E402
from gpu_generate import tiny_llama  # noqa: E402


def _batch(pad: int, n: int, steps: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (2, n + steps), generator=g)
    ids[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def test_real_mean_prep_leaves_the_padding_out():
    _, mask = _batch(pad=5, n=12, steps=2)
    k = torch.randn(2, 2, 12, 64)
    v = torch.randn(2, 2, 12, 64)
    layer = tc.PolarCacheLayer("polar", "polar", rotate=False, offsets="prefill", backend="reference")
    pc.real_mean_prep(mask.bool())(layer, k, v)
    torch.testing.assert_close(layer.mu_k[0], k[0].mean(1, keepdim=True))  # no padding: the plain mean
    torch.testing.assert_close(layer.mu_k[1], k[1, :, 5:].mean(1, keepdim=True))  # its own 7 tokens
    torch.testing.assert_close(layer.mu_v[1], v[1, :, 5:].mean(1, keepdim=True))
    plain = tc.PolarCacheLayer("polar", "polar", rotate=False, offsets="prefill", backend="reference")
    plain._prep(k, v)
    assert not torch.allclose(plain.mu_k[1], layer.mu_k[1])  # the layer's first encoding: padding in the mean


def test_run_teacher_forced_equals_one_pass():
    """run's prefill + steps with the padding mask and positions give the logits of one pass over the whole
    batch (an exact cache), so the decode steps are the text's next tokens as `generate` would feed them."""
    from transformers import DynamicCache

    model = tiny_llama(0, "cpu")
    ids, mask = _batch(pad=4, n=10, steps=3)
    logp = pc.run(model, ids, mask, 3, DynamicCache())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    want = torch.log_softmax(full[:, -4:-1], -1).transpose(
        0, 1
    )  # the logits at the last prefill token and steps
    torch.testing.assert_close(logp, want, atol=2e-4, rtol=0)


def test_real_mean_prep_sink_weight():
    _, mask = _batch(pad=3, n=10, steps=1)
    k = torch.randn(2, 2, 10, 64)
    v = torch.randn(2, 2, 10, 64)
    layer = tc.PolarCacheLayer("polar", "polar", rotate=False, offsets="prefill", backend="reference")
    pc.real_mean_prep(mask.bool(), sink=0.25)(layer, k, v)
    want = 0.75 * k[1, :, 3:].mean(1, keepdim=True) + 0.25 * k[1, :, 3:4]  # its first own key: token 3
    torch.testing.assert_close(layer.mu_k[1], want)
    torch.testing.assert_close(layer.mu_k[0], 0.75 * k[0].mean(1, keepdim=True) + 0.25 * k[0, :, :1])
    torch.testing.assert_close(layer.mu_v[1], v[1, :, 3:].mean(1, keepdim=True))  # V: the plain own mean
