"""Every decoder family transformers ships runs correctly under a plan, or is refused with one line.

Each family is a tiny random-init model (4 layers, hidden 64, float32) built from transformers' own
config class, with the features that make it differ from Llama switched on so that dropping them
changes the logits: Gemma-2's logit softcap (set to 1.0, where ``tanh`` bends the scores), gpt-oss's
attention sinks (``s_aux``, drawn at scale 1), sliding-window layers with a window shorter than the
prompts, Granite's attention multiplier, fused ``qkv_proj`` (Phi-3), q/k norms (Qwen3, OLMo-2).

The reference is written here, independently of the package: :func:`family_attention` computes, in
float64, ``softmax(cap(q k^T * scaling) masked, [sink]) v`` with the mask built from positions (causal,
AND the layer's own window ``q - k < sliding_window``, AND the plan's triangle in triangle layers),
following each family's ``eager_attention_forward`` in transformers (softcap before the mask, the sink
logit as one extra softmax column that is dropped afterwards). It ignores the mask transformers
builds, so it is only used on unpadded prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trimix_probe import DynamicSpec, ModelIdentity, TriMixConfig, patch_model, unpatch_model

N_INIT, N_LOCAL, LAST_N = 3, 16, 5
WINDOW = 12  # sliding window of the window layers: shorter than every prompt below
VOCAB = 97
LONG, SHORT = 45, 20  # LONG > N_LOCAL + LAST_N drops a middle; SHORT <= it is the causal mask (dense fallback)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ALTERNATING = ["sliding_attention", "full_attention"] * 2


@dataclass(frozen=True)
class Family:
    """A tiny model of one transformers family and what the test knows about its attention."""

    name: str
    config_cls: type
    model_cls: type
    extra: dict = field(default_factory=dict)
    window_layers: tuple[int, ...] = ()  # layers with a sliding window of WINDOW keys
    impls: tuple[str, ...] = ("eager", "sdpa")  # attention implementations the family supports on CPU
    softcap: float | None = None
    sinks: bool = False
    replays: bool = True  # replay.py can start at a middle layer: not Falcon's (tuples), not Gemma-3n's shared K/V
    mla: bool = False  # v's head_dim is not q's: the kernels (one head_dim) do not apply
    chunked: bool = False  # chunked-attention layers: chunks count padded positions (padding changes them)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(COMMON["num_hidden_layers"]) if i not in self.window_layers)

    def build(self, impl: str | None = None, **overrides) -> torch.nn.Module:
        torch.manual_seed(0)
        config = self.config_cls(**(COMMON | self.extra | overrides))
        model = self.model_cls(config).eval()
        if self.sinks:  # random init leaves the sinks near 0; draw them at scale 1 so dropping them shows
            for layer in model.model.layers:
                layer.self_attn.sinks.data = torch.randn_like(layer.self_attn.sinks)
        model.set_attn_implementation(impl or self.impls[0])
        return model


FAMILIES = [
    Family("llama", tf.LlamaConfig, tf.LlamaForCausalLM),
    Family("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM),
    Family("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),  # q/k norm
    Family("mistral", tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    Family("mistral-window", tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": WINDOW},
           window_layers=(0, 1, 2, 3)),
    Family("phi3", tf.Phi3Config, tf.Phi3ForCausalLM),  # fused qkv_proj
    Family("gemma2", tf.Gemma2Config, tf.Gemma2ForCausalLM,
           {"head_dim": 16, "sliding_window": WINDOW, "attn_logit_softcapping": 1.0, "query_pre_attn_scalar": 16,
            "layer_types": ALTERNATING}, window_layers=(0, 2), impls=("eager",), softcap=1.0),
    Family("gemma3", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
           {"head_dim": 16, "sliding_window": WINDOW, "layer_types": ALTERNATING}, window_layers=(0, 2)),
    Family("gpt-oss", tf.GptOssConfig, tf.GptOssForCausalLM,
           {"head_dim": 16, "sliding_window": WINDOW, "layer_types": ALTERNATING, "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
           window_layers=(0, 2), impls=("eager",), sinks=True),
    Family("olmo2", tf.Olmo2Config, tf.Olmo2ForCausalLM),  # q/k norm over all heads
    Family("granite", tf.GraniteConfig, tf.GraniteForCausalLM, {"attention_multiplier": 0.5}),
    Family("cohere", tf.CohereConfig, tf.CohereForCausalLM),
    Family("cohere2", tf.Cohere2Config, tf.Cohere2ForCausalLM,
           {"sliding_window": WINDOW, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
           window_layers=(0, 1, 2)),
    Family("phi", tf.PhiConfig, tf.PhiForCausalLM),  # partial rotary, parallel block, biases
    Family("stablelm", tf.StableLmConfig, tf.StableLmForCausalLM),  # partial rotary
    Family("starcoder2", tf.Starcoder2Config, tf.Starcoder2ForCausalLM, {"sliding_window": None}),
    Family("gemma", tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),  # scaled embeddings
    Family("glm", tf.GlmConfig, tf.GlmForCausalLM, {"head_dim": 16}),  # partial rotary, interleaved
    Family("olmo", tf.OlmoConfig, tf.OlmoForCausalLM),  # non-parametric layer norm
    Family("smollm3", tf.SmolLM3Config, tf.SmolLM3ForCausalLM),  # NoPE layers (no rotary in every 4th)
    Family("exaone4", tf.Exaone4Config, tf.Exaone4ForCausalLM,
           {"sliding_window": None, "layer_types": ["full_attention"] * 4}),  # q/k norm, post-norm
    Family("olmo3", tf.Olmo3Config, tf.Olmo3ForCausalLM, {"sliding_window": WINDOW, "layer_types": ALTERNATING},
           window_layers=(0, 2)),
    Family("qwen2-window", tf.Qwen2Config, tf.Qwen2ForCausalLM,  # window layers from max_window_layers on
           {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2,
            "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2}, window_layers=(2, 3)),
    # the attention under another name: GPT-NeoX's `attention` (partial rotary, parallel residual),
    # Falcon's `self_attention` (its decoder layers return a tuple: no replay, whole forwards)
    Family("gpt-neox", tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
    # Llama 4: chunked attention in the rotary layers (chunks of WINDOW keys), NoPE full-attention layer 3 with
    # its query temperature (floor_scale 8: positions past 8 are scaled)
    Family("llama4", tf.Llama4TextConfig, tf.Llama4ForCausalLM,
           {"head_dim": 16, "attention_chunk_size": WINDOW, "num_local_experts": 2, "intermediate_size_mlp": 64,
            "no_rope_layers": [1, 1, 1, 0], "floor_scale": 8}, window_layers=(0, 1, 2), chunked=True),
    # Gemma-3n: AltUp and LAuReL blocks, per-layer inputs, sliding and full layers
    Family("gemma3n", tf.Gemma3nTextConfig, tf.Gemma3nForCausalLM,
           {"head_dim": 16, "layer_types": ALTERNATING, "sliding_window": WINDOW, "num_kv_shared_layers": 0,
            "laurel_rank": 8, "altup_num_inputs": 2, "activation_sparsity_pattern": [0.0] * 4,
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB}, window_layers=(0, 2)),
    Family("gemma3n-shared-kv", tf.Gemma3nTextConfig, tf.Gemma3nForCausalLM,  # layers 2-3 reuse 0-1's K/V
           {"head_dim": 16, "layer_types": ALTERNATING, "sliding_window": WINDOW, "num_kv_shared_layers": 2,
            "laurel_rank": 8, "altup_num_inputs": 2, "activation_sparsity_pattern": [0.0] * 4,
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB}, window_layers=(0, 2),
           replays=False),
    # Falcon-H1: attention beside a state-space branch in every layer ("hybrid" layers; no replay)
    Family("falcon-h1", tf.FalconH1Config, tf.FalconH1ForCausalLM,
           {"head_dim": 16, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8},
           replays=False),
    # DeepSeek's MLA: q/k head_dim 24 (16 + 8 rotary), v head_dim 8 (the output is shaped by v)
    Family("deepseek-v3", tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
           {"q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 8,
            "n_routed_experts": 2, "num_experts_per_tok": 1, "first_k_dense_replace": 4, "moe_intermediate_size": 32,
            "n_group": 1, "topk_group": 1, "num_key_value_heads": 4}, mla=True),
    # (from transformers 5.2x: before, Falcon calls SDPA itself and is refused, see
    # test_a_model_that_ignores_the_attention_interface_is_refused_in_one_line)
    *([Family("falcon", tf.FalconConfig, tf.FalconForCausalLM, {"new_decoder_architecture": True, "num_kv_heads": 2},
              replays=False)] if getattr(tf.FalconForCausalLM, "_can_set_attn_implementation", lambda: True)() else []),
]
BY_NAME = {f.name: f for f in FAMILIES}
WITH_FULL = [f for f in FAMILIES if f.full_layers]
WITH_WINDOW = [f for f in FAMILIES if f.window_layers]
CASES = [pytest.param(f, impl, id=f"{f.name}-{impl}") for f in FAMILIES for impl in f.impls]


# ------------------------------------------------------------------------------------------ reference
def chunk_of(module) -> int | None:
    """The chunk size of a chunked-attention layer (Llama 4's ``layer_types``), None for others."""
    text = module.config.get_text_config()
    types = getattr(text, "layer_types", None)
    return text.attention_chunk_size if types and types[module.layer_idx] == "chunked_attention" else None


def family_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     s_aux=None, sliding_window=None, **kwargs):
    """float64 attention of the family's own semantics with the mask built from positions.

    query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, k_len, head_dim] (the cache);
    query row r sits at position k_len - q_len + r. ``module._ref_triangle`` (set per test) restricts a
    prefill to the triangle of (n_init, n_local, last_n). Returns [batch, q_len, heads, head_dim]."""
    dtype = query.dtype
    if chunk_of(module) is not None and query.shape[2] != key.shape[2]:
        # a decode step of a chunked layer: its cache keeps only the current chunk (positions are not
        # the cache's length), so the step is transformers' own attention with its own mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0)
    group = query.shape[1] // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(group, 1)
    v = value.double().repeat_interleave(group, 1)
    q_len, k_len = q.shape[2], k.shape[2]
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    scores = q @ k.transpose(-1, -2) * scaling  # [batch, heads, q_pos, k_pos]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_idx = torch.arange(k_len - q_len, k_len)[:, None]
    kv_idx = torch.arange(k_len)[None, :]
    keep = kv_idx <= q_idx
    if sliding_window is not None:
        keep &= q_idx - kv_idx < sliding_window
    chunk = chunk_of(module)
    if chunk is not None:  # Llama 4: a query sees the keys of its own chunk
        keep &= q_idx // chunk == kv_idx // chunk
    triangle = getattr(module, "_ref_triangle", None)
    if triangle is not None and q_len == k_len:
        n_init, n_local, last_n = triangle
        keep &= (kv_idx < n_init) | (q_idx - kv_idx < n_local) | (q_idx >= q_len - last_n)
    scores = scores.masked_fill(~keep.to(scores.device), float("-inf"))
    if s_aux is not None:  # the sink: one more logit per head in the softmax denominator, no value
        sink = s_aux.double().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_family_ref", family_attention)
AttentionMaskInterface.register("test_family_ref", sdpa_mask)


def attention_layers(model) -> list[torch.nn.Module]:
    """The attention modules by layer (``families.attention_modules``: the names transformers' decoders
    use), one for every layer."""
    from trimix_probe.families import attention_modules

    found = attention_modules(model)
    assert sorted(found) == list(range(COMMON["num_hidden_layers"]))
    return [found[i] for i in sorted(found)]


def reference(model, run, triangle_layers=(), drop=()):
    """``run(model)`` with the float64 reference attention, triangle masks in ``triangle_layers``;
    ``drop`` names features the reference leaves out ("softcap", "s_aux") to show that they matter."""
    previous = model.config._attn_implementation

    def attention(module, *args, **kwargs):
        for name in drop:
            kwargs[name] = None
        return family_attention(module, *args, **kwargs)

    AttentionInterface.register("test_family_ref_drop", attention)
    AttentionMaskInterface.register("test_family_ref_drop", sdpa_mask)
    for idx, module in enumerate(attention_layers(model)):
        module._ref_triangle = (N_INIT, N_LOCAL, LAST_N) if idx in triangle_layers else None
    model.set_attn_implementation("test_family_ref_drop")
    try:
        with torch.no_grad():
            return run(model)
    finally:
        model.set_attn_implementation(previous)
        for module in attention_layers(model):
            del module._ref_triangle


def plan(model, triangle_layers=()) -> TriMixConfig:
    identity = ModelIdentity.from_hf_config(model.config)
    layers = tuple("triangle" if i in triangle_layers else "dense" for i in range(identity.num_layers))
    return TriMixConfig(model=identity, layers=layers, n_init=N_INIT, n_local=N_LOCAL, last_n=LAST_N)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def prompts(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq))


# ------------------------------------------------------------------------------------- known bugs
def known(test: str, family: Family, impl: str = "") -> list:
    """The bugs each test hits today (strict: a fixed bug fails the suite until it is unmarked here)."""
    bugs = []  # none today: softcap and sinks reached the triangle implementations
    return [pytest.mark.xfail(strict=True, reason="; ".join(bugs))] if bugs else []


def params(test: str, families, with_impl: bool = False):
    if with_impl:
        return [pytest.param(f, impl, id=f"{f.name}-{impl}", marks=known(test, f, impl))
                for f in families for impl in f.impls]
    return [pytest.param(f, id=f.name, marks=known(test, f, f.impls[0])) for f in families]


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES if f.softcap or f.sinks])
def test_the_reference_sees_softcap_and_sinks(family):
    """The harness has teeth: leaving softcap / sinks out of the reference changes the logits."""
    model = family.build()
    ids = prompts(1, LONG)
    full = reference(model, lambda m: logits(m, ids))
    without = reference(model, lambda m: logits(m, ids), drop=("softcap", "s_aux"))
    assert (full - without).abs().max() > 1e-3


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_the_reference_is_the_model(family):
    """The float64 reference reproduces each family's own attention (dense, every window and feature)."""
    model = family.build()
    ids = prompts(2, LONG)
    expected = logits(model, ids)
    got = reference(model, lambda m: logits(m, ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "impl"), params("dense", FAMILIES, with_impl=True))
def test_all_dense_plan_is_the_model_bit_for_bit(family, impl):
    """An all-dense plan runs the model's own attention: prefill and a decode step are bit-identical."""
    model = family.build(impl)
    ids = prompts(2, LONG)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values).logits
        patch_model(model, plan(model))
        out_p = model(ids, use_cache=True)
        step_p = model(out_p.logits[:, -1:].argmax(-1), past_key_values=out_p.past_key_values).logits
    assert torch.equal(out_p.logits, out.logits)
    assert torch.equal(step_p, step)


@pytest.mark.parametrize("seq", [LONG, SHORT])
@pytest.mark.parametrize("family", params("triangle", WITH_FULL))
def test_triangle_plan_matches_the_float64_reference(family, seq):
    """Triangle attention in the full-attention layers (window layers dense) matches the family's own
    attention with the triangle mask, for a prompt with a middle (LONG) and one without (SHORT: the
    dense fallback)."""
    model = family.build()
    ids = prompts(2, seq)
    expected = reference(model, lambda m: logits(m, ids), triangle_layers=family.full_layers)
    patch_model(model, plan(model, family.full_layers))
    got = logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if seq > N_LOCAL + LAST_N:  # and the plan really changes the answer
        dense = reference(model, lambda m: logits(m, ids))
        assert (got - dense).abs().max() > 1e-3


@pytest.mark.parametrize("dense_above", ["0", "2"])  # the dense fallback; the sparse path (never dense)
@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in WITH_FULL if f.softcap or f.sinks])
def test_dynamic_plan_keeping_every_key_is_the_model_with_softcap_and_sinks(family, dense_above, monkeypatch):
    """Dynamic layers on softcap / sinks attention: a budget that keeps every causal key (vertical = the
    prompt) gives the dense float64 reference, through the dense fallback and through the sparse path."""
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", dense_above)
    model = family.build()
    ids = prompts(2, LONG)
    expected = reference(model, lambda m: logits(m, ids))
    config = plan(model)
    spec = DynamicSpec(vertical=LONG, slash=16, block_size=16, last_q=8)
    layers = tuple("dynamic" if i in family.full_layers else kind for i, kind in enumerate(config.layers))
    patch_model(model, TriMixConfig(model=config.model, layers=layers, n_init=N_INIT, n_local=N_LOCAL,
                                    last_n=LAST_N, dynamic=spec))
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", params("generate", FAMILIES))
def test_generate_after_patching_matches_the_reference(family):
    """generate() with TriangleMix in the full-attention layers gives the reference's greedy tokens
    (prefill with the triangle, decode dense over the whole cache)."""
    model = family.build()
    ids = prompts(1, LONG)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    expected = reference(model, lambda m: m.generate(ids, **kwargs), triangle_layers=family.full_layers)
    patch_model(model, plan(model, family.full_layers))
    got = model.generate(ids, **kwargs)
    assert got.sequences.shape == (1, LONG + 4)
    assert got.sequences.tolist() == expected.sequences.tolist()
    # every step's logits, not only the argmax (the prefill's last row, then dense decode steps)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)
    unpatch_model(model)


@pytest.mark.parametrize("family", params("padded", FAMILIES))
def test_left_padded_batch_on_a_dense_plan_equals_each_prompt_alone(family):
    """A left-padded batch on an all-dense plan gives the unpatched model's logits for the same batch,
    and on each prompt's span those of the prompt alone (except where the model itself differs: Llama
    4's chunks count the padded positions)."""
    model = family.build()
    lengths = (LONG, 38, SHORT)
    singles = [prompts(1, n) for n in lengths]
    alone = [logits(model, p)[0] for p in singles]
    ids = torch.zeros(len(lengths), LONG, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(singles):
        ids[b, LONG - p.shape[1]:], mask[b, LONG - p.shape[1]:] = p[0], 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        own = model(ids, attention_mask=mask, position_ids=position_ids).logits
        patch_model(model, plan(model))
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for b, p in enumerate(singles):
        span = slice(LONG - p.shape[1], None)
        torch.testing.assert_close(batched[b, span], own[b, span], rtol=1e-4, atol=1e-4)
        if not family.chunked:
            torch.testing.assert_close(batched[b, span], alone[b], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in WITH_WINDOW])
def test_a_triangle_window_layer_is_refused_before_any_forward(family):
    """Marking a sliding-window layer triangle is refused by patch_model with one line naming the layer
    and the window."""
    model = family.build()
    layer = family.window_layers[-1]
    with pytest.raises(ValueError, match=rf"layer {layer}\b.*(window|chunk).*\b{WINDOW}\b"):
        patch_model(model, plan(model, family.full_layers + (layer,)))


# -------------------------------------------------------------------------------------------- probe
def gated_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    **kwargs):
    """float64 attention with ``module._ref_gates`` [heads, 4] multiplying each section of the softmax
    output (init, local, last, middle; sections written out here), on full-attention layers only."""
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    seq = query.shape[2]
    scores = query @ k.transpose(-1, -2) * scaling
    pos = torch.arange(seq)
    q_idx, kv_idx = pos[:, None], pos[None, :]
    keep = kv_idx <= q_idx
    if sliding_window is not None:
        keep &= q_idx - kv_idx < sliding_window
    chunk = chunk_of(module)
    if chunk is not None:
        keep &= q_idx // chunk == kv_idx // chunk
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    if sliding_window is None and chunk is None:
        n_init, n_local, first_last = module._ref_sections
        sec = torch.where(kv_idx < n_init, 0, torch.where(q_idx - kv_idx < n_local, 1,
                                                            torch.where(q_idx >= first_last, 2, 3)))
        p = p * module._ref_gates[:, sec]  # [heads, q_pos, k_pos]
    return (p @ v).transpose(1, 2), None


AttentionInterface.register("test_gated_ref", gated_reference)
AttentionMaskInterface.register("test_gated_ref", sdpa_mask)
PROBED = [f for f in WITH_FULL if not (f.softcap or f.sinks)]


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in PROBED])
def test_probe_gradients_match_brute_force_and_skip_window_layers(family):
    """The probe's gate gradients equal autograd through explicit gated float64 attention on the
    full-attention layers; sliding-window layers are not probed (their gradients are exactly 0)."""
    from trimix_probe.probe import probe_sample, probing

    n_prompt, n_answer, (n_init, n_local, last_n) = 33, 3, (2, 7, 4)
    model = family.build("sdpa").double()
    ids = prompts(1, n_prompt + n_answer)
    layers = attention_layers(model)
    gates = torch.ones(len(layers), COMMON["num_attention_heads"], 4, dtype=torch.float64, requires_grad=True)
    for idx, module in enumerate(layers):
        module._ref_gates, module._ref_sections = gates[idx], (n_init, n_local, n_prompt - last_n)
    model.set_attn_implementation("test_gated_ref")
    logits_ = model(ids).logits[0]
    model.set_attn_implementation("sdpa")
    objective = -torch.nn.functional.cross_entropy(logits_[n_prompt - 1:-1], ids[0, n_prompt:])
    (want,) = torch.autograd.grad(objective, gates)
    with probing(model) as probe_gates:
        got = probe_sample(model, probe_gates, ids, n_prompt, n_init=n_init, n_local=n_local, last_n=last_n)
    assert want[list(family.full_layers)].abs().max() > 1e-4  # not vacuous
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert (got[list(family.window_layers)] == 0).all()


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES if f.softcap or f.sinks])
def test_probe_refuses_softcap_and_sinks_with_one_line(family):
    from trimix_probe.errors import InputError
    from trimix_probe.probe import probing

    model = family.build()
    feature = "softcap" if family.softcap else "sinks"
    with pytest.raises(InputError, match=rf"^layer {family.full_layers[0]}: the probe's gates do not implement "
                                         rf"{feature}[^\n]*$"):
        with probing(model):
            pass
    assert model.config._attn_implementation == family.impls[0]


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in WITH_WINDOW])
def test_a_probed_plan_marks_window_layers_sliding_and_runs(family):
    """analyze's plan (mark_sliding over TriangleMix from layer 1) keeps window layers 'sliding' and
    triangle only on full-attention layers; patch_model runs it and matches the reference."""
    from trimix_probe.families import attention_modules, layer_windows
    from trimix_probe.config import mark_sliding

    model = family.build()
    identity = ModelIdentity.from_hf_config(model.config)
    config = mark_sliding(TriMixConfig.triangle_from(identity, 1, n_init=N_INIT, n_local=N_LOCAL, last_n=LAST_N),
                          layer_windows(model, attention_modules(model)))
    triangles = tuple(i for i in family.full_layers if i >= 1)
    assert config.layers == tuple("sliding" if i in family.window_layers else "triangle" if i in triangles
                                  else "dense" for i in range(len(config.layers)))
    ids = prompts(1, LONG)
    expected = reference(model, lambda m: logits(m, ids), triangle_layers=triangles)
    patch_model(model, config)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["triangle", "dynamic"])
def test_alibi_is_refused_by_sparse_layers_and_kept_by_dense_ones(kind):
    """Falcon with ``alibi=True`` adds a position bias through the mask, which no sparse kernel applies:
    a sparse layer is refused with one line before any forward, the probe refuses the model, and an
    all-dense plan is the model bit for bit."""
    from trimix_probe.errors import InputError
    from trimix_probe.probe import probing

    if "falcon" not in BY_NAME:
        pytest.skip("this transformers' Falcon calls SDPA itself: refused before ALiBi is looked at")
    model = BY_NAME["falcon"].build(alibi=True)
    ids = prompts(1, LONG)
    plain = logits(model, ids)
    base = plan(model)
    layers = ("dense", kind, "dense", "dense")
    sparse = TriMixConfig(model=base.model, layers=layers, n_init=N_INIT, n_local=N_LOCAL, last_n=LAST_N,
                          dynamic=DynamicSpec() if kind == "dynamic" else None)
    with pytest.raises(ValueError, match=r"^layer 1: this model adds an ALiBi position bias") as info:
        patch_model(model, sparse)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="ALiBi"):
        with probing(model):
            pass
    patch_model(model, base)
    assert torch.equal(logits(model, ids), plain)


HYBRIDS = {  # layers that mix tokens without softmax attention (linear attention, convolution)
    "qwen3-next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM,
                   {"head_dim": 16, "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_experts": 2,
                    "num_experts_per_tok": 1, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                    "linear_num_value_heads": 2, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16}, "0, 1, 2: linear_attention"),
    "minimax": (tf.MiniMaxConfig, tf.MiniMaxForCausalLM,  # its linear layers' module is `self_attn` too
                {"head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1,
                 "layer_types": ["linear_attention", "full_attention"] * 2}, "0, 2: linear_attention"),
    "lfm2": (tf.Lfm2Config, tf.Lfm2ForCausalLM, {"layer_types": ["conv", "full_attention"] * 2}, "0, 2: conv"),
}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_a_hybrid_model_is_refused_in_one_line(name):
    """A model with layers that are not softmax attention is refused by patch_model and by the probe with
    one line naming those layers and their type (MiniMax's crashed with an AttributeError before)."""
    from trimix_probe.errors import InputError
    from trimix_probe.families import check_softmax_layers
    from trimix_probe.probe import probing

    config_cls, model_cls, extra, named = HYBRIDS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**(COMMON | extra))).eval()
    expected = rf"^this model \(\w+\) mixes tokens without softmax attention in \d+ of its 4 layers \({named}\);"
    with pytest.raises(InputError, match=expected):
        check_softmax_layers(model.config)
    identity = ModelIdentity.from_hf_config(model.config)
    with pytest.raises(InputError, match=expected):
        patch_model(model, TriMixConfig.triangle_from(identity, 4))
    with pytest.raises(InputError, match=expected):
        with probing(model):
            pass
    check_softmax_layers(BY_NAME["llama4"].build().config)  # chunked, sliding and full layers pass


def test_load_model_refuses_a_hybrid_before_its_weights(tmp_path):
    """The CLI's loader refuses a hybrid model from its config.json alone (the folder has no weights)."""
    from trimix_probe.errors import InputError
    from trimix_probe.models import load_model

    config_cls, _, extra, named = HYBRIDS["qwen3-next"]
    config_cls(**(COMMON | extra)).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=rf"mixes tokens without softmax attention .*\({named}\)"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("how", ["declared", "ignored"])
def test_a_model_that_ignores_the_attention_interface_is_refused_in_one_line(how, monkeypatch):
    """A model whose attention does not go through transformers' attention interface (Falcon before
    transformers 5.2x) would run dense under any plan, and the probe's gates would read 0: patch_model
    and the probe refuse it with one line, whether transformers says so (``declared``) or the model just
    ignores ``set_attn_implementation`` (``ignored``)."""
    from trimix_probe.errors import InputError
    from trimix_probe.probe import probing

    model = BY_NAME["llama"].build()
    if how == "declared":
        monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    else:
        monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)
    expected = r"^this model \(LlamaForCausalLM\) does not run its attention through transformers' attention interface"
    with pytest.raises(InputError, match=expected):
        patch_model(model, plan(model, (2, 3)))
    assert not any(hasattr(m, "_trimix_plan") for m in attention_layers(model))  # refused before any change
    with pytest.raises(InputError, match=expected):
        with probing(model):
            pass


def test_sliding_on_a_full_attention_layer_is_refused():
    model = BY_NAME["gemma3"].build()
    config = plan(model)
    config = TriMixConfig(model=config.model, layers=("sliding",) * 4, n_init=N_INIT, n_local=N_LOCAL, last_n=LAST_N)
    with pytest.raises(ValueError, match=r"^layer 1 is marked 'sliding' but the model declares no sliding window"):
        patch_model(model, config)


def test_probe_refuses_a_model_without_full_attention_layers():
    from trimix_probe.errors import InputError
    from trimix_probe.probe import probing

    model = BY_NAME["mistral-window"].build()
    with pytest.raises(InputError, match="^every layer of this model attends through a sliding window"):
        with probing(model):
            pass


# ------------------------------------------------------------------------------------ kernel path
def check_kernel_path(family, head_dim: int, seq: int, monkeypatch):
    """bf16 with head_dim in the kernel's set: triangle layers run the Triton kernel, and the logits' error
    against the fp32 model with the float64 reference stays within twice that of the bf16 model with the
    reference attention (plus a small floor)."""
    import trimix_probe.kernels.triangle as tri

    calls = []
    launch = tri.triangle_attention
    monkeypatch.setattr(tri, "triangle_attention", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    # 4 heads of head_dim (Phi-3, Cohere, GPT-NeoX derive head_dim from hidden_size; Falcon's is a property)
    sizes = {"hidden_size": 4 * head_dim}
    if not isinstance(getattr(family.config_cls, "head_dim", None), property):
        sizes["head_dim"] = head_dim
    model = family.build(**sizes, **({"query_pre_attn_scalar": head_dim} if "query_pre_attn_scalar" in family.extra
                                     else {}))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ids = prompts(2, seq).to(device)
    exact = reference(model, lambda m: logits(m, ids), triangle_layers=family.full_layers)
    model.to(torch.bfloat16)
    plain = reference(model, lambda m: logits(m, ids), triangle_layers=family.full_layers).float()
    patch_model(model, plan(model, family.full_layers))
    got = logits(model, ids).float()
    assert len(calls) == len(family.full_layers)
    err, base = (got - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name, marks=known("triangle", f))
                                    for f in (BY_NAME["qwen3"], BY_NAME["phi3"], BY_NAME["gemma2"],
                                              BY_NAME["gpt-oss"])])
def test_bf16_family_runs_the_triton_kernel(family, monkeypatch):
    """Under the Triton interpreter on CPU (CUDA where present), head_dim 64."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernel_path(family, 64, LONG, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("family", [pytest.param(f, id=f.name, marks=known("triangle", f)) for f in WITH_FULL
                                    if not f.mla])
def test_gpu_family_kernel_path(family, head_dim, monkeypatch):
    """Every family with full-attention layers, at each head size the kernel takes, on CUDA (a longer
    prompt: several kernel blocks)."""
    check_kernel_path(family, head_dim, 700, monkeypatch)


@pytest.mark.parametrize("kind", ["triangle", "dynamic"])
def test_mla_takes_the_torch_paths_in_bf16(kind, monkeypatch):
    """DeepSeek's MLA with q/k head_dim 64 (48 + 16 rotary), one the kernels take, and v head_dim 32:
    the kernels take one head_dim, so bf16 triangle and dynamic layers run no kernel (CUDA, or the
    interpreter on CPU) and still give the plan's attention: the triangle's float64 reference within
    bf16's error, and a dynamic budget that keeps every key gives dense."""
    import trimix_probe.dynamic as dyn
    import trimix_probe.kernels.blockwise as bw
    import trimix_probe.kernels.triangle as tri
    import trimix_probe.kernels.vertical_slash as vs

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")  # the sparse path, never the dense fallback
    calls = []
    for mod, name in ((tri, "triangle_attention"), (vs, "vertical_slash_attention"), (bw, "blockwise_attention")):
        monkeypatch.setattr(mod, name, lambda *a, **kw: calls.append(1))
    family = BY_NAME["deepseek-v3"]
    model = family.build(qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=32, hidden_size=128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ids = prompts(2, LONG).to(device)
    layers = (2, 3)
    exact = reference(model, lambda m: logits(m, ids), triangle_layers=layers if kind == "triangle" else ())
    model.to(torch.bfloat16)
    plain = reference(model, lambda m: logits(m, ids), triangle_layers=layers if kind == "triangle" else ()).float()
    config = plan(model, layers)
    if kind == "dynamic":
        spec = DynamicSpec(vertical=LONG, slash=16, block_size=16, last_q=8)
        config = TriMixConfig(model=config.model, layers=("dense", "dense", "dynamic", "dynamic"), n_init=N_INIT,
                              n_local=N_LOCAL, last_n=LAST_N, dynamic=spec)
        assert dyn.work_share(spec, LONG) <= 2
    patch_model(model, config)
    got = logits(model, ids).float()
    assert not calls
    err, base = (got - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


@pytest.mark.parametrize("family", params("verify_replay", WITH_FULL))
def test_verification_replay_equals_whole_forwards(family):
    """The verification's checks that start from dense's recorded hidden states (replay.py) give each
    family's whole-forward figures bit for bit: embeddings scaled (Gemma), parallel blocks (Cohere),
    window layers below the start ('sliding', replayed as dense), sinks and softcap above it."""
    from trimix_probe.families import attention_modules, layer_windows, shares_kv_across_layers
    from trimix_probe.config import mark_sliding
    from trimix_probe.verify import Bound, verify

    model = family.build()
    identity = ModelIdentity.from_hf_config(model.config)
    windows = layer_windows(model, attention_modules(model))

    def make(layer):
        return mark_sliding(TriMixConfig.triangle_from(identity, layer, n_init=N_INIT, n_local=N_LOCAL,
                                                       last_n=LAST_N), windows)
    samples = [(prompts(1, LONG + 3), LONG) for _ in range(2)]
    start = max(family.full_layers)
    kwargs = dict(bound=Bound(0.0, 0.0), layers=list(range(1, COMMON["num_hidden_layers"])), progress=False)
    whole = verify(model, samples, make, start, replay=False, **kwargs)
    fast = verify(model, samples, make, start, **kwargs)
    assert fast.replayed == family.replays  # else whole forwards (a layer returns a tuple)
    assert [(c.layer, c.drops, c.same, c.lost_flags) for c in fast.checks] == \
        [(c.layer, c.drops, c.same, c.lost_flags) for c in whole.checks]
    # a triangle layer before the last changes the answer, unless every later layer reuses earlier K/V
    # (Gemma-3n with 2 of 4 layers shared: layer 1's middle rows reach no answer row)
    if min(family.full_layers) < COMMON["num_hidden_layers"] - 1 and not shares_kv_across_layers(model):
        assert any(d != 0.0 for c in whole.checks for d in c.drops)  # the plans change something


@pytest.mark.parametrize("family", params("eval_replay", WITH_FULL))
def test_eval_prefill_from_dense_state_equals_whole_generation(family):
    """eval's shared prefix (replay.recording_prefill / prefilling_from): a plan's generate that starts
    its prefill at layer L from dense's recorded state, with dense's KV cache below L put in place,
    gives the whole generate's prefill logits bit for bit and its tokens, on a left-padded batch, in
    every family with a full-attention layer (window layers below L kept as dense's cache)."""
    from trimix_probe.families import attention_modules, layer_windows
    from trimix_probe.config import mark_sliding
    from trimix_probe.replay import first_logits, prefilling_from, recording_prefill

    model = family.build()
    identity = ModelIdentity.from_hf_config(model.config)
    windows = layer_windows(model, attention_modules(model))
    ids = prompts(2, LONG + 6)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    layers = range(1, COMMON["num_hidden_layers"])

    def gen():
        return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        with recording_prefill(model, set(layers), max(layers)) as record:
            dense = gen()
        if not family.replays:  # a layer returns a tuple: eval runs every plan whole
            assert not record.ok
            return
        assert record.ok and set(record.states) == set(layers)
        changed = False
        for start in layers:
            patch_model(model, mark_sliding(TriMixConfig.triangle_from(identity, start, n_init=N_INIT,
                                                                       n_local=N_LOCAL, last_n=LAST_N), windows))
            try:
                with first_logits(model) as replayed, prefilling_from(model, start, record):
                    got = gen()
                with first_logits(model) as whole:
                    expected = gen()
            finally:
                unpatch_model(model)
            assert torch.equal(replayed.value, whole.value), start
            assert got.tolist() == expected.tolist(), start
            changed |= got.tolist() != dense.tolist() or not torch.equal(whole.value, record_logits(model, ids, mask))
        if min(family.full_layers) < COMMON["num_hidden_layers"] - 1:
            assert changed  # the plans differ from dense somewhere: the equality above is not dense's


def record_logits(model, ids, mask):
    """Dense's prefill logits of the last row (what generate's prefill returns), unpatched."""
    from trimix_probe.replay import first_logits

    with first_logits(model) as out:
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return out.value
