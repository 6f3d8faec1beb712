"""Integration with transformers on random-init tiny Llama / Qwen2 models (no downloads).

The reference model runs SDPA with an explicit boolean mask written out element by element here,
independently of the package's reference and kernels.
"""

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trimix_probe import ConfigError, ModelIdentity, PaddedBatchError, TriMixConfig, patch_model, unpatch_model
from trimix_probe.families import attention_modules
from trimix_probe.patch import routed

N_INIT, N_LOCAL, LAST_N = 3, 16, 5


def tiny(kind: str, layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.eval().set_attn_implementation("sdpa")
    return model


def brute_mask(seq: int, n_init: int, n_local: int, last_n: int) -> torch.Tensor:
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for i in range(seq):
        for j in range(i + 1):
            mask[i, j] = j < n_init or i - j < n_local or i >= seq - last_n
    return mask


def masked_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference: SDPA with the explicit mask ``module._ref_mask`` ([q, k] or [heads, q, k]); causal if None."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    q_len, k_len = query.shape[2], key.shape[2]
    mask = getattr(module, "_ref_mask", None)
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.device),
                                                           scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register("test_masked_sdpa", masked_sdpa)
AttentionMaskInterface.register("test_masked_sdpa", sdpa_mask)


def reference_logits(model, ids, triangle_layers, dense_heads=None, mask=None):
    """Logits with the brute-force triangle mask in ``triangle_layers`` (or ``mask`` if given)."""
    seq = ids.shape[1]
    heads = model.config.num_attention_heads
    for idx, module in attention_modules(model).items():
        module._ref_mask = None
        if idx in triangle_layers:
            m = (brute_mask(seq, N_INIT, N_LOCAL, LAST_N) if mask is None else mask).expand(heads, seq, seq).clone()
            for h in (dense_heads or {}).get(idx, ()):
                m[h] = torch.ones(seq, seq, dtype=torch.bool).tril()
            module._ref_mask = m
    model.set_attn_implementation("test_masked_sdpa")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation("sdpa")


def plan(model, starting_layer, **kw):
    return TriMixConfig.triangle_from(ModelIdentity.from_hf_config(model.config), starting_layer,
                                      n_init=N_INIT, n_local=N_LOCAL, last_n=LAST_N, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_all_dense_plan_reproduces_sdpa(kind):
    model = tiny(kind)
    ids = torch.randint(0, 97, (2, 41))
    with torch.no_grad():
        expected = model(ids).logits
        patch_model(model, plan(model, starting_layer=model.config.num_hidden_layers))
        got = model(ids).logits
    assert model.config._attn_implementation == "trimix"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("starting_layer", [0, 1])
@pytest.mark.parametrize("seq", [
    45,  # longer than n_local + last_n: the middle is dropped
    21,  # exactly n_local + last_n: the triangle is the causal mask
])
def test_triangle_plan_matches_masked_sdpa(kind, starting_layer, seq):
    model = tiny(kind)
    ids = torch.randint(0, 97, (2, seq))
    expected = reference_logits(model, ids, triangle_layers=range(starting_layer, 3))
    patch_model(model, plan(model, starting_layer))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if seq > N_LOCAL + LAST_N:  # and the plan really changes the answer there
        dense = reference_logits(model, ids, triangle_layers=())
        assert (got - dense).abs().max() > 1e-3


def test_per_head_dense_entries():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 50))
    expected = reference_logits(model, ids, triangle_layers={1, 2}, dense_heads={2: (1,)})
    patch_model(model, plan(model, 1, dense_heads={2: (1,)}))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_generate_decodes_densely_and_cache_keeps_every_key():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 48))
    patch_model(model, plan(model, 0))
    with torch.no_grad():
        prefill = model(ids, use_cache=True)
        cache = prefill.past_key_values
        assert cache.get_seq_length() == 48  # every key stays in the cache
        nxt = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 51) and gen[0, 48] == nxt[0, 0]
    # reference for the decode step: rows 0..47 see the triangle of a 48-token prompt, row 48 sees every key
    mask = torch.zeros(49, 49, dtype=torch.bool)
    mask[:48, :48] = brute_mask(48, N_INIT, N_LOCAL, LAST_N)
    mask[48] = True
    unpatch_model(model)
    expected = reference_logits(model, torch.cat([ids, nxt], 1), triangle_layers=range(3), mask=mask)[:, -1]
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-4)
    # and it differs from a dense prefill of the same 49 tokens (the cache really holds triangle states)
    dense = reference_logits(model, torch.cat([ids, nxt], 1), triangle_layers=())[:, -1]
    assert (step - dense).abs().max() > 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("starting_layer", [0, 3])  # triangle everywhere; all dense
def test_padded_batch_equals_each_prompt_alone(side, starting_layer):
    model = tiny("llama")
    lengths = (45, 38, 20)  # 20 <= n_local + last_n: that prompt is causal throughout
    prompts = [torch.randint(1, 97, (1, n)) for n in lengths]
    patch_model(model, plan(model, starting_layer))
    ids = torch.zeros(len(lengths), 45, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        span = slice(45 - p.shape[1], 45) if side == "left" else slice(0, p.shape[1])
        ids[b, span], mask[b, span] = p[0], 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for b, p in enumerate(prompts):
            alone = model(p).logits[0]
            span = slice(45 - p.shape[1], 45) if side == "left" else slice(0, p.shape[1])
            torch.testing.assert_close(batched[b, span], alone, rtol=1e-4, atol=1e-4)


def test_padded_generate_equals_each_prompt_alone():
    model = tiny("qwen2")
    prompts = [torch.randint(1, 97, (1, n)) for n in (47, 40)]
    patch_model(model, plan(model, 1))
    ids = torch.zeros(2, 47, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as for batched generation
        ids[b, 47 - p.shape[1]:], mask[b, 47 - p.shape[1]:] = p[0], 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert batched[b, 47:].tolist() == alone[0, p.shape[1]:].tolist()


def test_padding_inside_a_prompt_is_refused():
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, 10:12] = 0
    patch_model(model, plan(model, 1))
    with pytest.raises(PaddedBatchError, match="padding inside the prompt"):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    with torch.no_grad():  # an all-ones mask is no padding
        model(ids, attention_mask=torch.ones_like(ids))


def test_config_for_another_model_is_refused():
    model = tiny("llama")
    other = tiny("llama", layers=4)
    with pytest.raises(ConfigError, match="num_layers 4 \\(config\\) vs 3 \\(model\\)"):
        patch_model(model, plan(other, 1))


def test_unpatch_restores_sdpa():
    model = tiny("qwen2")
    ids = torch.randint(0, 97, (1, 45))
    with torch.no_grad():
        expected = model(ids).logits
        patch_model(model, plan(model, 0))
        assert (model(ids).logits - expected).abs().max() > 1e-3
        unpatch_model(model)
        got = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_routed_runs_the_function_and_restores_after_an_error():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 20))
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return masked_sdpa(module, *args, **kwargs)

    with torch.no_grad(), pytest.raises(RuntimeError, match="inside"):
        with routed(model, "test_counting", counting):
            assert model.config._attn_implementation == "test_counting"
            model(ids)
            raise RuntimeError("inside")
    assert calls == [0, 1, 2] and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_model_runs_the_triton_kernel(kind, monkeypatch):
    """bf16 takes the Triton kernel (CUDA, or the interpreter on CPU); its error against an fp32
    reference model stays within twice that of plain bf16 SDPA with the same mask."""
    import trimix_probe.kernels.triangle as tri

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    launch = tri.triangle_attention
    monkeypatch.setattr(tri, "triangle_attention", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    model = tiny(kind)
    ids = torch.randint(0, 97, (2, 45))
    exact = reference_logits(model, ids, triangle_layers=range(1, 3))  # fp32
    model.to(torch.bfloat16)
    plain = reference_logits(model, ids, triangle_layers=range(1, 3)).float()
    patch_model(model, plan(model, 1))
    with torch.no_grad():
        got = model(ids).logits.float()
    assert len(calls) == 2  # layers 1 and 2
    err, base = (got - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)


def test_dispatched_model(tmp_path):
    """A model dispatched by accelerate (what device_map="auto" does on several GPUs). On a CPU-only
    machine we force the hook path by offloading one layer to disk; a split over several GPUs is not
    exercised here."""
    model = tiny("llama")
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 45))
    expected = reference_logits(model, ids, triangle_layers=range(1, 3))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = LlamaForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map, dtype=torch.float32,
                                                  offload_folder=str(tmp_path / "offload"))
    dispatched.eval().set_attn_implementation("sdpa")
    assert getattr(dispatched, "hf_device_map", {}).get("model.layers.2") == "disk"
    patch_model(dispatched, plan(dispatched, 1))
    with torch.no_grad():
        got = dispatched(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["triangle", "dynamic"])
def test_sliding_window_layer_longer_than_its_window_gets_the_sliding_window_refusal(kind):
    # transformers hands a sliding-window layer its window as a mask once the prompt is longer than
    # the window: the refusal must name the window, not "a custom attention mask"
    from transformers import MistralConfig, MistralForCausalLM

    from trimix_probe import DynamicSpec

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                                             max_position_embeddings=256)).eval()
    model.set_attn_implementation("sdpa")
    ident = ModelIdentity.from_hf_config(model.config)
    layers = ("dense", "triangle") if kind == "triangle" else ("dynamic", "dense")
    cfg = TriMixConfig(model=ident, layers=layers, n_init=2, n_local=8, last_n=4, dynamic=DynamicSpec(block_size=16))
    # refused at patch_model, before any forward: the check does not wait for a prompt longer than the window
    with pytest.raises(ValueError, match=r"is a sliding-window layer \(window 16\) and cannot run the") as info:
        patch_model(model, cfg)
    assert "custom attention mask" not in str(info.value)


@pytest.mark.parametrize("impl", ["flex", "reference"])
def test_triangle_implementations_match_masked_sdpa(impl):
    # every entry of the implementation table runs the same plan: logits against the explicit-mask reference
    from trimix_probe.ops import TRIANGLE_IMPLS

    assert impl in TRIANGLE_IMPLS
    model = tiny("llama")
    seq = 48
    ids = torch.randint(0, 97, (1, seq), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(model, ids, triangle_layers={1, 2})
    cfg = TriMixConfig.triangle_from(ModelIdentity.from_hf_config(model.config), 1, n_init=N_INIT, n_local=N_LOCAL,
                                     last_n=LAST_N)
    patch_model(model, cfg, impl=impl)
    with torch.no_grad():
        got = model(ids).logits
    unpatch_model(model)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
def test_every_triangle_implementation_honours_softcap_and_sinks(impl):
    # the table's uniform signature: softcap (a tanh cap of the scaled scores) and sinks (one logit per q head
    # in the softmax denominator) against a softmax over the triangle mask written out here, fp64; on CUDA where
    # present, else on CPU (Triton under the interpreter, which conftest switches on)
    from trimix_probe.ops import TRIANGLE_IMPLS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(21)
    batch, heads, kv_heads, seq, d, n_init, n_local, last_n = 2, 4, 2, 50, 64, 3, 9, 5  # GQA 2, odd length
    q = torch.randn(batch, heads, seq, d, generator=g)
    k, v = (torch.randn(batch, kv_heads, seq, d, generator=g) for _ in range(2))
    sinks, softcap, scale = torch.randn(heads, generator=g), 1.0, 0.2
    dtype = torch.bfloat16 if impl == "triton" else torch.float32
    got = TRIANGLE_IMPLS[impl](q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype), n_init=n_init, n_local=n_local,
                               last_n=last_n, scale=scale, softcap=softcap, sinks=sinks.to(dev)).double().cpu()
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    keep = (j <= i) & ((j < n_init) | (i - j < n_local) | (i >= seq - last_n))
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = softcap * torch.tanh(q.double() @ kk.transpose(-1, -2) * scale / softcap)
    s = torch.cat([s.masked_fill(~keep, float("-inf")), sinks.double()[None, :, None, None].expand(batch, -1, seq, 1)],
                  -1)
    want = s.softmax(-1)[..., :-1] @ vv
    tol = 2e-2 if impl == "triton" else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    plain = TRIANGLE_IMPLS["reference"](q, k, v, n_init=n_init, n_local=n_local, last_n=last_n, scale=scale).double()
    assert (plain - want).abs().max() > 10 * tol  # the features change the answer


def test_unknown_triangle_implementation_is_refused_before_patching():
    from trimix_probe.errors import InputError

    model = tiny("llama")
    cfg = TriMixConfig.triangle_from(ModelIdentity.from_hf_config(model.config), 1)
    with pytest.raises(InputError, match="accepted: auto, triton, flex, reference"):
        patch_model(model, cfg, impl="cuda-magic")
    assert model.config._attn_implementation == "sdpa"


def test_each_dynamic_layer_runs_its_own_budget(monkeypatch):
    """Per-layer budgets: every dynamic layer runs dynamic_attention with its own spec (checked against
    a model routed through dynamic_attention with the spec of each layer written out here), and the
    result differs from giving every layer the first layer's budget."""
    from trimix_probe import DynamicSpec
    from trimix_probe.dynamic import dynamic_attention

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")  # sparse even where the budget covers most keys
    model = tiny("llama")
    ident = ModelIdentity.from_hf_config(model.config)
    specs = {0: DynamicSpec(vertical=2, slash=16, block_size=16, last_q=8),
             1: DynamicSpec(vertical=40, slash=32, block_size=16, last_q=8)}
    cfg = TriMixConfig.triangle_from(ident, 3).with_budgets(specs)
    assert cfg.layers == ("dynamic", "dynamic", "dense") and cfg.dynamic_layers
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(5))

    def by_hand(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        spec = specs.get(module.layer_idx)
        if spec is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return dynamic_attention(query, key, value, spec, scale=scaling).transpose(1, 2), None
    with routed(model, "by_hand", by_hand), torch.no_grad():
        want = model(ids).logits
    patch_model(model, cfg)
    assert [attention_modules(model)[i]._trimix_plan.dynamic for i in (0, 1)] == [specs[0], specs[1]]
    with torch.no_grad():
        got = model(ids).logits
    unpatch_model(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    patch_model(model, cfg.with_budgets({0: specs[0], 1: specs[0]}))
    with torch.no_grad():
        one = model(ids).logits
    unpatch_model(model)
    assert (one - got).abs().max() > 1e-3


def test_dense_heads_of_a_dynamic_layer_are_exact(monkeypatch):
    """A dynamic layer's dense heads get full causal attention (a float64 reference written here), its
    other heads the dynamic pattern; without the entry those heads differ."""
    from trimix_probe import DynamicSpec
    from trimix_probe.dynamic import dynamic_attention

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")  # the sparse path even at this length
    model = tiny("llama")
    ident = ModelIdentity.from_hf_config(model.config)
    spec = DynamicSpec(vertical=2, slash=16, block_size=16, last_q=8)
    dense = (1,)
    cfg = TriMixConfig.triangle_from(ident, 3).with_budgets({0: spec, 1: spec}, {0: dense})
    assert cfg.dense_heads == {0: dense} and TriMixConfig.from_dict(cfg.to_dict()).dense_heads == {0: dense}
    seen = {}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx == 0:
            seen.update(q=query, k=key, v=value, scale=scaling)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(7))
    with routed(model, "record", record), torch.no_grad():
        model(ids)
    q, k, v, scale = seen["q"], seen["k"], seen["v"], seen["scale"]
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(96, 96, dtype=torch.bool).triu(1), float("-inf"))
    full = scores.softmax(-1) @ vv
    from trimix_probe.patch import LayerPlan, _prefill_sparse

    plan = LayerPlan(kind="dynamic", n_init=8, n_local=512, last_n=128, dense_heads=dense, dynamic=spec)
    got = _prefill_sparse(plan, q, k, v, scale, None, None)
    sparse = dynamic_attention(q, k, v, spec, scale=scale)
    torch.testing.assert_close(got[:, list(dense)].double(), full[:, list(dense)], atol=1e-5, rtol=1e-5)
    others = [h for h in range(q.shape[1]) if h not in dense]
    torch.testing.assert_close(got[:, others], sparse[:, others])
    assert (sparse[:, list(dense)].double() - full[:, list(dense)]).abs().max() > 1e-3  # the entry matters
    with pytest.raises(ConfigError, match="dense_heads"):  # a dense layer has no heads to keep dense
        TriMixConfig(model=ident, layers=("dense",) * ident.num_layers, dense_heads={0: (1,)})


def test_the_single_spec_config_of_issue_24_still_runs(monkeypatch):
    """docs/raw/.../dynamic.json (one 'dynamic' spec, before per-layer budgets) patches a random model
    of its shape (Qwen2.5-0.5B: 24 layers, 14 heads / 2 kv, head_dim 64) and runs; at a length its
    budget covers, sparse or not, it gives dense's logits."""
    from pathlib import Path

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")  # run the sparse path, not the dense fallback
    cfg = TriMixConfig.load(Path(__file__).parent.parent / "docs/raw/long-context-2026-12-01/ttft/configs/dynamic.json")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=896, intermediate_size=32, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, use_sliding_window=False,
                                         max_position_embeddings=1024)).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    patch_model(model, cfg)
    assert attention_modules(model)[0]._trimix_plan.dynamic == cfg.dynamic
    with torch.no_grad():
        got = model(ids).logits
    unpatch_model(model)
    # 1000 columns, 6096 diagonals and the last 128 rows dense cover all 160 keys; layers 16-23 are
    # triangle (window 512 > 160: the causal mask)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)
