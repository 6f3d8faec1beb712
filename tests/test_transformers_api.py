"""The transformers interfaces the patch relies on, checked on the installed release.

The patch does not rewrite model forwards; it plugs in through ``AttentionInterface`` and
``AttentionMaskInterface`` and reads a few things transformers passes. A release that changes one
of them fails here, by name, before the behavioural tests in test_patch.py / test_families.py
fail in a harder-to-read way. Each check records what transformers actually passed on a tiny
random-init Llama (prefill, then decode steps through ``generate``), so nothing here is a copy of
our own code's assumptions.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

NAME = "trimix_api_probe"


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def recorded():
    """What transformers passed to a registered attention function and mask builder."""
    calls: dict[str, list] = {"attn": [], "mask": []}

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls["attn"].append(dict(layer=getattr(module, "layer_idx", None), q=tuple(query.shape),
                                  k=tuple(key.shape), v=tuple(value.shape), mask=attention_mask,
                                  scaling=scaling, dropout=dropout, kwargs=sorted(kwargs)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    def mask(**kwargs):
        calls["mask"].append(dict(kwargs))
        return sdpa_mask(**kwargs)

    AttentionInterface.register(NAME, attn)
    AttentionMaskInterface.register(NAME, mask)
    model = _tiny_llama()
    model.set_attn_implementation(NAME)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, min_new_tokens=3)
    return calls, model, ids, out


def test_attention_function_receives_unrepeated_heads_and_the_layer(recorded):
    calls, model, ids, _ = recorded
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    prefill = [c for c in calls["attn"] if c["q"][2] == ids.shape[1]]
    assert {c["layer"] for c in prefill} == {0, 1}, "module.layer_idx picks each layer's plan"
    for c in prefill:
        # query [batch, heads, q_len, head_dim]; key/value [batch, kv_heads, k_len, head_dim] (GQA not repeated)
        assert c["q"] == (1, cfg.num_attention_heads, ids.shape[1], head_dim)
        assert c["k"] == c["v"] == (1, cfg.num_key_value_heads, ids.shape[1], head_dim)
        assert c["scaling"] == pytest.approx(head_dim ** -0.5), "scaling is passed as a keyword"
        assert c["dropout"] == 0.0


def test_decode_steps_see_the_whole_cache(recorded):
    calls, model, ids, out = recorded
    decode = [c for c in calls["attn"] if c["q"][2] == 1]
    assert decode, "generate() ran no decode step through the registered attention"
    # each step's key covers every earlier token: the patch tells decode from prefill by q_len != k_len
    assert sorted({c["k"][2] for c in decode}) == list(range(ids.shape[1] + 1, out.shape[1]))


def test_mask_builder_gets_the_prefill_keywords(recorded):
    calls, _, ids, _ = recorded
    prefill = [m for m in calls["mask"] if m.get("q_length") == ids.shape[1]]
    assert prefill, "the registered mask builder was not called for the prefill"
    m = prefill[0]
    # trimix_mask recognises a causal prefill from exactly these keywords
    for key in ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function",
                "attention_mask", "config"):
        assert key in m, f"transformers {transformers.__version__} no longer passes {key!r} to the mask builder"
    assert m["kv_length"] == ids.shape[1] and m["q_offset"] == 0 and m["kv_offset"] == 0
    assert m["mask_function"] is causal_mask_function


def test_builders_the_patch_calls_keep_their_signatures():
    # families.OwnAttention.causal_mask and patch.trimix_mask call sdpa_mask with these keywords
    params = inspect.signature(sdpa_mask).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function",
                "attention_mask", "allow_is_causal_skip", "config", "device"):
        assert key in params or takes_any, f"sdpa_mask lost the keyword {key!r}"
    params = list(inspect.signature(sdpa_attention_forward).parameters)
    assert params[:5] == ["module", "query", "key", "value", "attention_mask"]


def test_the_model_returns_a_layered_cache():
    # replay.py copies KV-cache layers: the cache must expose per-layer entries and its length
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = next((getattr(out, n) for n in ("cache", "past_key_values") if getattr(out, n, None) is not None), None)
    assert cache is not None, "the model output carries no KV cache under a known name"
    assert hasattr(cache, "layers") and len(cache.layers) == model.config.num_hidden_layers
    assert cache.get_seq_length() == ids.shape[1]
