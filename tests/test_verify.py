"""Verification of the starting layer: the search on constructed curves, the figures against a
full-sequence forward computed apart, bad bound values, and analyze with and without --verify."""

import inspect
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trimix_probe.config import ModelIdentity, TriMixConfig
from trimix_probe.errors import InputError
from trimix_probe.verify import (Bound, LayerCheck, check_inputs, check_layer, dense_references, parse_layers, scan_layers,
                                 search_layer, verify)

N_INIT, N_LOCAL, LAST_N = 2, 6, 3


def tiny_model(layers: int = 4, vocab: int = 53):
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights every run
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, eos_token_id=None)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():  # larger than the init scale so attention is far from uniform
        p.data.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    return model.double().eval()


def random_samples(vocab: int, count: int = 3, n_prompt: int = 40, n_answer: int = 4):
    return [(torch.randint(0, vocab, (1, n_prompt + n_answer)), n_prompt) for _ in range(count)]


def factory(model):
    identity = ModelIdentity.from_hf_config(model.config)
    return lambda layer: TriMixConfig.triangle_from(identity, layer, n_init=N_INIT, n_local=N_LOCAL, last_n=LAST_N)


# ---------------------------------------------------------------------------------------- search
def fake_check(break_below: int, calls: list):
    """A check whose loss breaks below a known layer: drop 0.5 below it, 0.001 from it on."""
    def check(layer: int) -> LayerCheck:
        calls.append(layer)
        bad = layer < break_below
        d = 0.5 if bad else 0.001
        return LayerCheck(layer=layer, drop=d, changed=3 if bad else 0, samples=8, max_drop=d, seconds=0.0,
                          drops=(d,) * 8, same=(not bad,) * 3 + (True,) * 5, lost_flags=(bad,) * 3 + (False,) * 5)
    return check


@pytest.mark.parametrize("gradient,breaks", [
    (21, 12),   # the gradient is conservative: bisect below it
    (5, 12),    # the gradient is too early: move up, then bisect
    (12, 12),   # exactly right: one layer below is checked and fails
    (30, 0),    # everything passes: layer 0
    (0, 0),     # gradient 0 passes at once
    (29, 29),   # only the last layer passes
])
def test_search_picks_lowest_layer_within_bound(gradient, breaks):
    calls = []
    result = search_layer(fake_check(breaks, calls), gradient, 30, Bound(0.01, 0), max_checks=10)
    assert result.verified_layer == breaks
    assert result.gradient_layer == gradient
    assert len(calls) == len(set(calls)) <= 10  # each layer checked once
    assert [c.layer for c in result.checks] == sorted(calls)
    assert str(breaks) in result.reason


def test_search_none_passes_means_no_triangle_layer():
    calls = []
    result = search_layer(fake_check(31, calls), 20, 30, Bound(0.01, 0), max_checks=10)
    assert result.verified_layer == 30
    assert 29 in calls  # it moved up to the last layer
    assert "no triangle layer" in result.reason


def test_search_respects_check_budget():
    calls = []
    result = search_layer(fake_check(3, calls), 25, 30, Bound(0.01, 0), max_checks=3)
    assert len(calls) == 3
    passed = [c.layer for c in result.checks if c.drop <= 0.01]
    assert result.verified_layer == min(passed)  # the lowest passing layer it saw
    assert "not checked" in result.reason


def test_search_bound_counts_lost_answers():
    """A layer with a tiny drop but too many lost answers fails; max_lost lets it pass. Changed answers
    that lose nothing dense had right do not count."""
    def check(layer):
        lost = 2 if layer < 7 else 0
        return LayerCheck(layer=layer, drop=0.0, changed=5, samples=8, max_drop=0.0, seconds=0.0,
                          drops=(0.0,) * 8, same=(False,) * 5 + (True,) * 3,
                          lost_flags=(True,) * lost + (False,) * (8 - lost))
    assert search_layer(check, 15, 20, Bound(0.1, 1 / 8), max_checks=10).verified_layer == 7
    assert search_layer(check, 15, 20, Bound(0.1, 2 / 8), max_checks=10).verified_layer == 0


@pytest.mark.parametrize("share,samples,allowed", [(0.125, 16, 2), (0.125, 8, 1), (0.125, 7, 0), (0.0, 30, 0),
                                                   (1.0, 5, 5), (0.3, 10, 3)])
def test_lost_answers_allowed_are_a_share_rounded_down(share, samples, allowed):
    assert Bound(0.01, share).allowed(samples) == allowed


def test_loss_counts_gains_as_zero():
    """One sample's gain does not hide another's loss: the signed mean passes, the loss does not."""
    c = LayerCheck(layer=3, drop=0.0, changed=0, samples=2, max_drop=0.2, seconds=0.0, drops=(0.2, -0.2))
    assert c.drop == 0.0 and c.loss == pytest.approx(0.1)
    assert not Bound(0.05, 0).holds(c) and Bound(0.1, 0).holds(c)


def test_scan_takes_the_lowest_layer_from_which_every_scanned_layer_passes():
    """Layer 4 passes on its own, but 6 above it fails: the scan's choice is 8, the lowest layer from
    which the whole checked curve stays within the bound."""
    good = {4, 8, 10, 12}
    def check(layer):
        d = 0.0 if layer in good else 0.3
        return LayerCheck(layer=layer, drop=d, changed=0, samples=4, max_drop=d, seconds=0.0, drops=(d,) * 4)
    result = scan_layers(check, [12, 2, 4, 6, 8, 10], 12, 14, Bound(0.01, 0))
    assert result.verified_layer == 8 and result.search == "scan"
    assert [c.layer for c in result.checks] == [2, 4, 6, 8, 10, 12]
    assert "layer 6 is not" in result.reason
    top_fails = scan_layers(check, [6, 11], 12, 14, Bound(0.01, 0))
    assert top_fails.verified_layer == 14 and "no triangle layer" in top_fails.reason


@pytest.mark.parametrize("spec,layers,expect", [
    ("all", 5, [0, 1, 2, 3, 4]), ("2-4", 10, [2, 3, 4]), ("8-9,3,8", 10, [3, 8, 9]), (" 1 , 2 ", 3, [1, 2]),
])
def test_parse_layers(spec, layers, expect):
    assert parse_layers(spec, layers) == expect


@pytest.mark.parametrize("spec,layers", [("", None), ("a-b", None), ("4-2", None), ("-1", None), ("1,x", None),
                                         ("0-30", 30), ("31", 30)])
def test_parse_layers_refuses_bad_specs_in_one_line(spec, layers):
    with pytest.raises(InputError) as err:
        parse_layers(spec, layers)
    assert "--verify-layers" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("epsilon,max_lost,max_checks,name", [
    (-0.1, 1, 5, "epsilon"), (math.nan, 1, 5, "epsilon"), (math.inf, 1, 5, "epsilon"), ("0.1", 1, 5, "epsilon"),
    (0.1, -0.1, 5, "max_lost"), (0.1, 1.5, 5, "max_lost"), (0.1, True, 5, "max_lost"), (0.1, "1", 5, "max_lost"),
    (0.1, 1, 0, "max_checks"),
])
def test_bad_bound_values_are_one_line_input_errors(epsilon, max_lost, max_checks, name):
    with pytest.raises(InputError) as err:
        check_inputs(epsilon, max_lost, max_checks)
    assert name in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- figures
def cache_path_logits(model, ids, n):
    """Logits [A, vocab] predicting the answer, as inference computes them: prefill(prompt), then the
    answer fed over transformers' own cache (q_len != k_len: a patched model runs it densely)."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids[:, :n], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    rest = model(input_ids=ids[:, n:-1], use_cache=True, **{kw: cache}).logits[0]
    return torch.cat([out.logits[0, -1:], rest])


def direct_figures(model, ids, n, config):
    """Independently of verify.py: dense = one full forward with the model's own attention; the plan =
    prefill of the prompt with ``config`` then the answer over the cache. (drop, dense argmax, plan argmax)."""
    from trimix_probe.patch import patch_model, unpatch_model

    with torch.no_grad():
        dense = model(input_ids=ids).logits[0, n - 1:-1]
        patch_model(model, config)
        patched = cache_path_logits(model, ids, n)
        unpatch_model(model)
    target = ids[0, n:]
    lp = lambda logits: -torch.nn.functional.cross_entropy(logits.double(), target).item()  # noqa: E731
    return lp(dense) - lp(patched), dense.argmax(-1), patched.argmax(-1)


def test_figures_equal_a_direct_computation():
    model = tiny_model()
    samples = random_samples(model.config.vocab_size)
    make = factory(model)
    refs = dense_references(model, samples)
    for layer in (0, 2):
        check = check_layer(model, refs, make(layer))
        direct = [direct_figures(model, ids, n, make(layer)) for ids, n in samples]
        # fp32 limits both sides (the triangle reference and verify's log-softmax run in fp32);
        # a wrong plan (answer rows not dense, prompt rows with more keys) moves drops by > 1e-2
        torch.testing.assert_close(torch.tensor(check.drops), torch.tensor([d for d, _, _ in direct]),
                                   rtol=1e-4, atol=1e-5)
        assert any(abs(d) > 1e-3 for d, _, _ in direct)  # the plan changes something: the test can fail
        assert check.drop == pytest.approx(sum(check.drops) / len(samples))
        assert check.loss == pytest.approx(sum(max(d, 0.0) for d, _, _ in direct) / len(samples), abs=1e-5)
        assert list(check.same) == [torch.equal(a, b) for _, a, b in direct]
        gold = [ids[0, n:] for ids, n in samples]
        assert list(check.lost_flags) == [bool(((a == g) & (b != g)).any()) for (_, a, b), g in zip(direct, gold)]


def test_argmax_check_is_greedy_generation_when_the_answer_is_denses():
    """With dense's greedy answer as the gold one, ``same`` is exactly 'greedy generation under the plan
    gives dense's tokens' (model.generate, with the library's own cache, computed apart)."""
    from trimix_probe.patch import patch_model, unpatch_model

    model = tiny_model()
    prompts = random_samples(model.config.vocab_size, count=6, n_answer=0)
    samples = [(model.generate(ids, max_new_tokens=5, do_sample=False), n) for ids, n in prompts]
    refs = dense_references(model, samples)
    config = factory(model)(0)
    check = check_layer(model, refs, config)
    patch_model(model, config)
    gens = [model.generate(ids[:, :n], max_new_tokens=5, do_sample=False) for ids, n in samples]
    unpatch_model(model)
    assert list(check.same) == [torch.equal(g, ids) for g, (ids, _) in zip(gens, samples)]
    assert all(torch.equal(r.argmax, ids[0, n:]) for r, (ids, n) in zip(refs, samples))  # dense: its own answer


def test_layers_that_do_not_matter_pass_and_the_search_finds_them():
    """Layers >= 2 have a zero attention output projection, so triangle attention there changes nothing:
    their drop is exactly 0 and no answer changes; layers 0 and 1 are real."""
    model = tiny_model(layers=4)
    for layer in model.model.layers[2:]:
        layer.self_attn.o_proj.weight.data.zero_()
    samples = random_samples(model.config.vocab_size, count=3)
    make = factory(model)
    refs = dense_references(model, samples)
    for layer in (2, 3):
        check = check_layer(model, refs, make(layer))
        assert abs(check.drop) < 1e-12 and check.changed == 0 and check.lost == 0
    result = verify(model, samples, make, gradient_layer=3, bound=Bound(0.0, 0), max_checks=4, progress=False)
    figures = {c.layer: c for c in result.checks}
    v = result.verified_layer
    assert v <= 2 and Bound(0.0, 0).holds(figures[v])
    assert v == 0 or not Bound(0.0, 0).holds(figures[v - 1])  # the layer below was checked and fails
    assert result.samples == 3 and result.seconds > 0


# ---------------------------------------------------------------------------------------- analyze
def test_analyze_no_verify_gives_the_gradient_choice(tiny_llama, tmp_path):
    from trimix_probe.probe import analyze

    folder = tiny_llama(layers=3)
    common = dict(lengths="1k", tasks="niah_single_noise,vt", samples=1, n_init=4, n_local=64, last_n=16, dtype="float32")
    off = analyze(str(folder), tmp_path / "off", verify=False, **common)
    on = analyze(str(folder), tmp_path / "on", verify=True, epsilon=0.05, max_lost=0.5, **common)
    meta_off = json.loads((off / "probe.json").read_text())
    meta_on = json.loads((on / "probe.json").read_text())
    cfg_off, cfg_on = TriMixConfig.load(off / "config.json"), TriMixConfig.load(on / "config.json")
    # same seed, same gradient: --no-verify emits exactly the gradient's layer
    assert cfg_off.starting_layer == meta_off["starting_layer"] == meta_on["verification"]["gradient_layer"]
    assert "verification" not in meta_off and "verification" not in cfg_off.provenance
    v = meta_on["verification"]
    assert cfg_on.starting_layer == v["verified_layer"] == meta_on["starting_layer"]
    assert cfg_on.provenance["gradient_layer"] == v["gradient_layer"]
    assert cfg_on.provenance["verified_layer"] == v["verified_layer"]
    assert cfg_on.provenance["verification"]["checks"] and v["checks"][0]["drops"]
    assert v["data"]["seed"] == meta_on["data"]["seed"] + 1
    report = (on / "report.md").read_text()
    assert "check against dense" in report.splitlines()[2] and (on / "verification.png").is_file()
    assert "## Verification" in report and "## Verification" not in (off / "report.md").read_text()


def test_analyze_refuses_bad_epsilon_before_loading(tmp_path):
    from trimix_probe.probe import analyze

    with pytest.raises(InputError, match="epsilon"):
        analyze("/nonexistent/model", tmp_path, epsilon=-1.0)
    with pytest.raises(InputError, match="max_lost"):
        analyze("/nonexistent/model", tmp_path, max_lost=-2)
    with pytest.raises(InputError, match="--verify-layers"):
        analyze("/nonexistent/model", tmp_path, verify_layers="3-x")


def test_cli_defaults_are_the_library_defaults():
    from trimix_probe.cli import app as cli
    from trimix_probe.verify import EPSILON, MAX_CHECKS, MAX_LOST, VERIFY

    params = inspect.signature(cli.analyze).parameters
    assert (params["epsilon"].default.default, params["max_lost"].default.default,
            params["max_checks"].default.default, params["verify"].default.default) == (EPSILON, MAX_LOST, MAX_CHECKS, VERIFY)
    from trimix_probe.choice import RECALL_TARGET
    from trimix_probe.probe import BUDGET_SAMPLES, analyze

    lib = inspect.signature(analyze).parameters
    assert (params["recall_target"].default.default, params["budget_samples"].default.default) == \
        (RECALL_TARGET, BUDGET_SAMPLES) == (lib["recall_target"].default, lib["budget_samples"].default)
    assert all(params[k].default.default is None is lib[k].default for k in ("vertical", "slash", "gamma"))


def test_analyze_scan_records_every_listed_layer(tiny_llama, tmp_path):
    from trimix_probe.probe import analyze

    folder = tiny_llama(layers=3)
    out = analyze(str(folder), tmp_path / "scan", lengths="1k", tasks="vt", samples=1, n_init=4, n_local=64,
                  last_n=16, dtype="float32", verify_layers="all", epsilon=1e9, max_lost=1.0)
    v = json.loads((out / "probe.json").read_text())["verification"]
    assert v["search"] == "scan" and [c["layer"] for c in v["checks"]] == [0, 1, 2]
    assert v["verified_layer"] == 0  # a bound nothing can fail: every layer passes
    assert v["samples"] == 2  # the default verification samples per task (one task here)
    assert all("loss" in c and "lost" in c and len(c["lost_flags"]) == 2 for c in v["checks"])
    assert "a scan of layers" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------- replay
@pytest.mark.parametrize("gradient,breaks,checks", [(21, 12, 4), (5, 12, 4), (29, 0, 3), (0, 17, 5), (30, 30, 4)])
def test_search_candidates_hold_every_layer_the_search_checks(gradient, breaks, checks):
    from trimix_probe.verify import search_candidates

    calls = []
    search_layer(fake_check(breaks, calls), gradient, 30, Bound(0.01, 0), max_checks=checks)
    assert set(calls) <= search_candidates(gradient, 30, checks)


def test_replayed_checks_equal_whole_forwards_and_skip_the_dense_prefix():
    """Checks that start from dense's recorded hidden states give the same figures, bit for bit, as
    whole forwards, and do not run the attention of the layers below the starting layer."""
    model = tiny_model(layers=6)
    samples = random_samples(model.config.vocab_size, count=3)
    make = factory(model)
    whole = verify(model, samples, make, gradient_layer=4, bound=Bound(0.0, 0.0), max_checks=3, progress=False,
                   replay=False)
    ran = []
    hooks = [m.self_attn.register_forward_hook(lambda mod, a, o, i=i: ran.append(i))
             for i, m in enumerate(model.model.layers)]
    fast = verify(model, samples, make, gradient_layer=4, bound=Bound(0.0, 0.0), max_checks=3, progress=False)
    for h in hooks:
        h.remove()
    assert fast.replayed and not whole.replayed
    assert [(c.layer, c.drops, c.same, c.lost_flags) for c in fast.checks] == \
        [(c.layer, c.drops, c.same, c.lost_flags) for c in whole.checks]
    assert fast.verified_layer == whole.verified_layer
    # the dense pass runs every layer per sample; each check runs its layers from L on (the first
    # replayed forward also once whole, to confirm it)
    expected = (6 * len(samples) + sum((6 - c.layer) * len(samples) for c in fast.checks)
                + 6 * any(c.layer > 0 for c in fast.checks))
    assert len(ran) == expected
    assert all("forward" not in m.__dict__ for m in model.model.layers)  # the layers are as they were


def test_replay_stops_when_the_replayed_forward_differs(monkeypatch):
    """A replay that hands the wrong state is caught by the first comparison: replay stops and the
    figures are those of whole forwards."""
    from contextlib import contextmanager

    from trimix_probe import replay as replay_mod

    model = tiny_model(layers=4)
    samples = random_samples(model.config.vocab_size, count=2)
    make = factory(model)
    whole = verify(model, samples, make, gradient_layer=2, bound=Bound(0.0, 0.0), max_checks=3, progress=False,
                   replay=False)
    real = replay_mod.replaying

    @contextmanager
    def broken(model, layer, hidden):
        with real(model, layer, hidden * 0.5):
            yield
    monkeypatch.setattr(replay_mod, "replaying", broken)
    caught = verify(model, samples, make, gradient_layer=2, bound=Bound(0.0, 0.0), max_checks=3, progress=False)
    assert not caught.replayed
    assert [c.drops for c in caught.checks] == [c.drops for c in whole.checks]


# ------------------------------------------------------------------------------------- the whole plan
def plan_check(fails, calls):
    """A fake whole-plan check: loss 1 nat/token while ``fails(steps)``, else 0."""
    def check(steps):
        calls.append(dict(steps))
        d = 1.0 if fails(steps) else 0.0
        return LayerCheck(layer=-1, drop=d, changed=0, samples=4, max_drop=d, seconds=0.0, drops=(d,) * 4,
                          lost_flags=(False,) * 4)
    return check


def one_up(steps, failures):  # every sparse layer one rung up, dense past rung 2
    return {layer: None if s is None or s + 1 > 2 else s + 1 for layer, s in steps.items()}


def test_settle_budgets_raises_until_the_plan_passes():
    from trimix_probe.verify import settle_budgets

    calls = []
    # planted: the plan fails while layer 3 runs below rung 2
    result = settle_budgets(plan_check(lambda s: s[3] is not None and s[3] < 2, calls), {0: 0, 3: 0, 5: None},
                            one_up, Bound(0.01, 0), max_checks=4)
    assert calls == [{0: 0, 3: 0, 5: None}, {0: 1, 3: 1, 5: None}, {0: 2, 3: 2, 5: None}]
    assert result.passed and dict(result.steps) == {0: 2, 3: 2, 5: None}
    assert [c.passed for c in result.checks] == [False, False, True] and "after 2 raise(s)" in result.reason


def test_settle_budgets_ends_dense_within_the_check_budget():
    from trimix_probe.verify import settle_budgets

    calls = []
    result = settle_budgets(plan_check(lambda s: True, calls), {0: 0, 1: 0}, one_up, Bound(0.01, 0), max_checks=2)
    assert len(calls) == 2 and dict(result.steps) == {0: None, 1: None} and result.passed
    assert "no checked budget kept the whole plan" in result.reason
    # an advance that raises nothing (or lowers a rung) cannot loop: the plan goes dense
    calls.clear()
    result = settle_budgets(plan_check(lambda s: True, calls), {0: 1}, lambda s, f: {0: 0}, Bound(0.01, 0), 9)
    assert len(calls) == 1 and dict(result.steps) == {0: None}
    # every shallow layer dense from the start: nothing to check
    assert settle_budgets(plan_check(lambda s: True, calls), {0: None}, one_up, Bound(), 4).checks == ()


def test_at_inference_grows_every_dynamic_budget():
    from trimix_probe.config import DynamicSpec
    from trimix_probe.verify import at_inference

    ident = ModelIdentity(name="t", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = TriMixConfig.triangle_from(ident, 2, last_n=4).with_budgets(
        {0: DynamicSpec(vertical=8, dense_last=4), 1: DynamicSpec(vertical=16, dense_last=4)})
    grown = at_inference(cfg, 5)
    assert grown.last_n == 9 and [grown.dynamic_spec(i).dense_last for i in (0, 1)] == [9, 9]
    assert [grown.dynamic_spec(i).vertical for i in (0, 1)] == [8, 16]


def test_plan_verification_reuses_the_starting_layers_dense_references(monkeypatch):
    """verify() hands its dense references on (without the recorded hidden states): verify_plan on the
    same samples runs dense once in all and gives the figures a verify_plan computing its own gives;
    references of other samples are not reused."""
    import trimix_probe.verify as V
    from trimix_probe.config import DynamicSpec

    model = tiny_model()
    samples = random_samples(model.config.vocab_size)
    make = factory(model)
    calls = []
    real = V.dense_references

    def counted(model, samples, record=frozenset()):
        calls.append(len(samples))
        return real(model, samples, record)
    monkeypatch.setattr(V, "dense_references", counted)
    checked = verify(model, samples, make, gradient_layer=2, bound=Bound(1e9, 1), layers=[2], progress=False)
    assert calls == [3] and len(checked.references) == 3
    assert all(not r.inputs for r in checked.references)  # the replay states are not kept alive
    ladder = tuple(DynamicSpec(vertical=v, slash=8, block_size=8, last_q=4) for v in (1, 2, 4))

    def plan(steps):
        return make(2).with_budgets({layer: None if s is None else ladder[s] for layer, s in steps.items()})

    class Never(Bound):  # every check fails, so the budgets are raised over several checks (bound 0
        def holds(self, check):  # passes a random model's plan whose three drops happen to be gains)
            return False

    run = dict(make_config=plan, steps={0: 0, 1: 0}, advance=one_up, bound=Never(0.0, 0), max_checks=3, progress=False)
    reused = V.verify_plan(model, samples, references=checked.references, **run)
    assert calls == [3]  # dense ran once: in verify
    fresh = V.verify_plan(model, samples, **run)
    assert calls == [3, 3] and len(reused.checks) == len(fresh.checks) >= 2
    assert (reused.steps, reused.passed, reused.reason) == (fresh.steps, fresh.passed, fresh.reason)
    for a, b in zip(reused.checks, fresh.checks):
        assert (a.steps, a.passed) == (b.steps, b.passed)
        assert (a.figures.drops, a.figures.same, a.figures.lost_flags) == (b.figures.drops, b.figures.same,
                                                                            b.figures.lost_flags)
    # other prompts, or the same prompts with another answer split: computed anew
    other = random_samples(model.config.vocab_size)
    V.verify_plan(model, other, references=checked.references, **run)
    shifted = [(ids, n - 1) for ids, n in samples]
    V.verify_plan(model, shifted, references=checked.references, **run)
    V.verify_plan(model, samples[:2], references=checked.references, **run)
    assert calls == [3, 3, 3, 3, 2]


# ------------------------------------------------------------------------------- the generation check
OLD_CHECK_KEYS = {"layer", "drop", "changed", "samples", "max_drop", "seconds", "drops", "same", "lost_flags",
                  "loss", "lost"}  # a starting layer's check in probe.json before the generation check
OLD_PLAN_KEYS = {"budgets", "passed", "loss", "lost", "changed", "samples", "drop", "max_drop", "seconds"}


def silent_model(layers: int = 4):
    """A tiny model whose attention outputs are zero: no plan changes a logit, so every teacher-forced
    check passes any bound (drop 0, nothing lost); only a planted generation can fail."""
    model = tiny_model(layers)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
    return model


def gold_of(samples, task: str = "vt"):
    from trimix_probe.verify import GoldAnswers

    return GoldAnswers(tokenizer=None, tasks=(task,) * len(samples), answers=(("gold",),) * len(samples))


def planted_generation(monkeypatch, plan_score):
    """Replace the generation seam: dense (the model unpatched) scores 1.0 on every sample; a patched
    model scores ``plan_score(config, prompt)``. Returns the calls, (config or None, prompt tokens)."""
    import trimix_probe.verify as V

    calls = []

    def fake(model, tokenizer, prompt, task, answers):
        config = getattr(model, "_trimix_config", None)
        calls.append((config, prompt.shape[1]))
        return 1.0 if config is None else plan_score(config, prompt)
    monkeypatch.setattr(V, "generated_score", fake)
    return calls


def test_union_of_teacher_forced_and_generation_losses_counts_each_sample_once():
    c = LayerCheck(layer=2, drop=0.0, changed=0, samples=4, max_drop=0.0, seconds=0.0, drops=(0.0,) * 4,
                   lost_flags=(True, False, True, False), dense_scores=(1.0, 1.0, 0.5, 0.25),
                   plan_scores=(0.75, 0.5, 0.5, 0.5))
    assert c.generation_flags == (True, True, False, False) and c.lost_generation == 2
    assert c.lost == 3  # sample 0 is lost both ways, once
    assert not Bound(1.0, 2 / 4).holds(c) and Bound(1.0, 3 / 4).holds(c)


def test_generation_check_rejects_a_layer_that_teacher_forcing_passes(monkeypatch):
    """Attention changes no logit, so teacher forcing passes every layer; the planted generation drops
    a value on sample 0 while triangle layers start at 1 or below. Without the check the search takes
    layer 0; with it, layer 2, and the record says why."""
    model = silent_model()
    samples = random_samples(model.config.vocab_size)
    make = factory(model)
    calls = planted_generation(monkeypatch, lambda cfg, prompt: 0.75 if cfg.starting_layer <= 1 and
                               prompt.shape[1] == samples[0][1] and torch.equal(prompt[0], samples[0][0][0, :40])
                               else 1.0)
    run = dict(gradient_layer=3, bound=Bound(0.0, 0), max_checks=4, progress=False)
    alone = verify(model, samples, make, **run)
    assert alone.verified_layer == 0 and all(c.lost == 0 and c.loss == 0 for c in alone.checks)
    checked = verify(model, samples, make, generation=gold_of(samples), **run)
    assert checked.verified_layer == 2
    figures = {c.layer: c for c in checked.checks}
    assert figures[1].lost_flags == (False,) * 3 and figures[1].loss == 0   # teacher forced: nothing lost
    assert figures[1].dense_scores == (1.0,) * 3 and figures[1].plan_scores == (0.75, 1.0, 1.0)
    assert figures[1].lost_generation == figures[1].lost == 1 and not Bound(0.0, 0).holds(figures[1])
    assert figures[2].lost == 0 and Bound(0.0, 0).holds(figures[2])
    assert "generat" in checked.reason and "1 in generation" in checked.reason
    # the plan generates with the config as emitted (prefill with the plan, dense decode), not the
    # teacher-forced forward's (last_n grown by the answer); every prompt is the sample's first N tokens
    assert {cfg.last_n for cfg, _ in calls if cfg is not None} == {LAST_N} and {n for _, n in calls} == {40}
    record = checked.to_dict(per_sample=True)["checks"]
    row = next(r for r in record if r["layer"] == 1)
    assert (row["dense_scores"], row["plan_scores"], row["lost_generation"], row["lost"]) == (
        [1.0] * 3, [0.75, 1.0, 1.0], 1, 1)
    brief = next(r for r in checked.to_dict()["checks"] if r["layer"] == 1)
    assert brief["lost_generation"] == 1 and "plan_scores" not in brief and "dense_scores" not in brief


def test_without_the_generation_check_records_and_choice_are_as_before():
    """generation=None is the default: the same figures, reason, choice and record keys as before the
    check existed, for a starting layer's verification and for the whole plan's."""
    import trimix_probe.verify as V
    from trimix_probe.config import DynamicSpec

    model = tiny_model()
    samples = random_samples(model.config.vocab_size)
    make = factory(model)
    run = dict(gradient_layer=2, bound=Bound(0.01, 1 / 3), max_checks=3, progress=False)

    def record(v, **kw):
        out = v.to_dict(**kw)
        for c in out["checks"]:
            c.pop("seconds")
        return out | {"seconds": 0}
    default, off = verify(model, samples, make, **run), verify(model, samples, make, generation=None, **run)
    assert default.verified_layer == off.verified_layer and default.reason == off.reason
    assert record(default, per_sample=True) == record(off, per_sample=True)
    assert all(set(c) == OLD_CHECK_KEYS for c in default.to_dict(per_sample=True)["checks"])
    assert "generat" not in default.reason
    ladder = tuple(DynamicSpec(vertical=v, slash=8, block_size=8, last_q=4) for v in (1, 2, 4))

    def plan(steps):
        return make(2).with_budgets({layer: None if s is None else ladder[s] for layer, s in steps.items()})
    prun = dict(make_config=plan, steps={0: 0, 1: 0}, advance=one_up, bound=Bound(0.0, 0), max_checks=2,
                progress=False)
    a = V.verify_plan(model, samples, **prun)
    b = V.verify_plan(model, samples, generation=None, **prun)
    assert (a.steps, a.passed, a.reason) == (b.steps, b.passed, b.reason) and "generat" not in a.reason
    assert all(set(c) == OLD_PLAN_KEYS for c in a.to_dict(per_sample=True)["checks"])


def test_dense_generates_once_per_sample_across_verify_and_verify_plan(monkeypatch):
    """Dense's generations are kept with the references: verify() generates each sample once and
    verify_plan() on the same samples reuses them; each check generates every sample under its plan.
    The planted generation fails the whole plan while layer 0 is at rung 0, so the budgets are raised
    on the generation check alone, and the plan's record says so."""
    import trimix_probe.verify as V
    from trimix_probe.config import DynamicSpec

    model = silent_model()
    samples = random_samples(model.config.vocab_size)
    make = factory(model)
    ladder = tuple(DynamicSpec(vertical=v, slash=8, block_size=8, last_q=4) for v in (1, 2, 4))
    calls = planted_generation(monkeypatch, lambda cfg, prompt: 0.5 if cfg.dynamic_spec(0) == ladder[0] else 1.0)
    gold = gold_of(samples)
    checked = verify(model, samples, make, gradient_layer=2, bound=Bound(0.0, 0), layers=[2], progress=False,
                     generation=gold)
    dense = [c for c in calls if c[0] is None]
    assert len(dense) == 3 and len(calls) == 3 + 3  # dense once, then layer 2's plan
    assert [r.score for r in checked.references] == [1.0] * 3

    def plan(steps):
        return make(2).with_budgets({layer: None if s is None else ladder[s] for layer, s in steps.items()})
    result = V.verify_plan(model, samples, plan, {0: 0, 1: 0}, one_up, Bound(0.0, 0), 4, progress=False,
                           references=checked.references, generation=gold)
    assert len([c for c in calls if c[0] is None]) == 3  # no dense generation in verify_plan
    assert len(calls) == 6 + 3 * len(result.checks)
    first, last = result.checks[0], result.checks[-1]
    assert not first.passed and first.figures.lost_generation == 3 and first.figures.lost_flags == (False,) * 3
    assert last.passed and dict(result.steps) == {0: 1, 1: 1} and "generat" in result.reason
    rows = result.to_dict(per_sample=True)["checks"]
    assert rows[0]["lost_generation"] == 3 and rows[0]["plan_scores"] == [0.5] * 3
    assert "plan_scores" not in result.to_dict()["checks"][0]
    # references without dense's generations (a verify() without the check): dense generates once here
    bare = verify(model, samples, make, gradient_layer=2, bound=Bound(0.0, 0), layers=[2], progress=False)
    before = len(calls)
    V.verify_plan(model, samples, plan, {0: 1, 1: 1}, one_up, Bound(0.0, 0), 4, progress=False,
                  references=bare.references, generation=gold)
    assert [c[0] is None for c in calls[before:]] == [True] * 3 + [False] * 3


class Words:
    """A tokenizer stub for generate_batch: a token id is the word ``<id>``."""

    pad_token_id = None
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"<{int(i)}>" for i in ids)  # delimited: one answer holds another only if equal


def test_generation_is_the_plans_prefill_then_dense_decode():
    """The real generation: each sample's prompt (its first N tokens) greedily continued for the
    task's RULER length, dense unpatched and the plan patched as emitted, scored with tasks.score;
    the same as model.generate (transformers' cache: the plan's prefill, dense decode) computed apart."""
    from trimix_probe.patch import patch_model, unpatch_model
    from trimix_probe.tasks import MAX_NEW_TOKENS, score
    from trimix_probe.verify import GoldAnswers

    model = tiny_model()
    samples = random_samples(model.config.vocab_size, count=3)
    config = factory(model)(0)
    steps = MAX_NEW_TOKENS["vt"]

    def texts():
        return [Words().decode(model.generate(ids[:, :n], max_new_tokens=steps, do_sample=False)[0, n:])
                for ids, n in samples]
    dense = texts()
    patch_model(model, config)
    plan = texts()
    unpatch_model(model)
    assert dense != plan  # triangle attention from layer 0 changes some answer of a random model
    # gold: a word of dense's answer and the whole of it, so a plan scores below dense exactly where its
    # text differs (two words alone may survive a changed answer: a flaky count)
    gold = GoldAnswers(Words(), ("vt",) * 3, tuple((t.split()[2], t) for t in dense))
    checked = verify(model, samples, factory(model), gradient_layer=0, bound=Bound(1e9, 1.0), layers=[0],
                     progress=False, generation=gold)
    c, = checked.checks
    assert c.dense_scores == (1.0,) * 3
    assert c.plan_scores == tuple(score("vt", t, a) for t, a in zip(plan, gold.answers))
    assert c.lost_generation == sum(p != d for p, d in zip(plan, dense)) >= 1


def test_generation_matches_eval(tiny_llama):
    """Dense's and a plan's generation scores are those `eval` gives for the same samples and plan
    (run_methods: encode_prompt with the answer prefix, generate_batch, RULER's score)."""
    from dataclasses import replace as dc_replace

    from trimix_probe.evaluate import Method, run_methods
    from trimix_probe.models import load_model
    from trimix_probe.probe import _tokenize
    from trimix_probe.tasks import make_samples
    from trimix_probe.verify import GoldAnswers

    lm, tok, _ = load_model(str(tiny_llama(layers=2, hidden=64)), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)  # weights whose plan changes an answer (checked below)
    for p in lm.parameters():  # far from uniform attention
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    identity = ModelIdentity.from_hf_config(lm.config)
    config = TriMixConfig.triangle_from(identity, 0, n_init=4, n_local=32, last_n=8)
    data = make_samples(tok, "vt", 500, 2, seed=3)
    methods = [Method("dense", None, None), Method("plan", config, 0)]
    first = run_methods(lm, tok, methods, [(500, i, s) for i, s in enumerate(data)], share_prefix=False)
    # gold answers from dense's own words, so the scores are not all 0
    words = [r["prediction"].split() or ["none"] for r in first if r["method"] == "dense"]
    data = [dc_replace(s, answers=(w[0], w[-1])) for s, w in zip(data, words)]
    rows = run_methods(lm, tok, methods, [(500, i, s) for i, s in enumerate(data)], share_prefix=False)
    gold = GoldAnswers(tok, tuple(s.task for s in data), tuple(s.answers for s in data))
    checked = verify(lm, [_tokenize(tok, s, True) for s in data], lambda layer: config, gradient_layer=0,
                     bound=Bound(1e9, 1.0), layers=[0], progress=False, generation=gold)
    c, = checked.checks
    assert c.dense_scores == tuple(r["score"] for r in rows if r["method"] == "dense") == (1.0, 1.0)
    assert c.plan_scores == tuple(r["score"] for r in rows if r["method"] == "plan") != c.dense_scores
    assert c.lost_generation >= 1


def test_cli_check_generation_reaches_analyze(monkeypatch):
    from typer.testing import CliRunner

    import trimix_probe.probe as probe
    from trimix_probe.cli.app import app

    seen = []
    monkeypatch.setattr(probe, "analyze", lambda **kw: seen.append(kw["check_generation"]))
    for extra in ([], ["--check-generation"]):
        res = CliRunner().invoke(app, ["analyze", "some-model", *extra])
        assert res.exit_code == 0, res.output
    assert seen == [False, True]
