"""The benchmark commands on a machine without a GPU: one clear error, before any work. (Their
numbers come from GPU runs recorded in docs/performance.md; benchmarks are never timed tests.)"""

import pytest
import torch
from typer.testing import CliRunner

from trimix_probe.cli.app import app


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("args", [["bench", "ttft", "--dynamic", "--seqs", "1k"], ["bench", "ttft", "--seqs", "1k"],
                                  ["bench", "dynamic", "--seqs", "1k"], ["bench", "kernel"]])
def test_benchmarks_refuse_without_a_gpu_in_one_line(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "need a CUDA GPU" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_bench_probe_dry_run_on_cpu(device_map):
    # the random model built whole on a device, or empty and dispatched by accelerate (device_map)
    from trimix_probe.bench.probe import bench_probe

    result = bench_probe(seq=720, samples=1, answer=8, arch="tiny", device="cpu", dtype="float32",
                         device_map=device_map)
    assert result["finite_grads"] and result["device"].startswith("CPU") and result["backend"] == "reference"


def test_bench_architectures_and_closed_choices():
    from trimix_probe.bench.common import heads_of, llama_config

    assert heads_of("llama-3.1-8b") == {"heads": 32, "kv_heads": 8, "head_dim": 128}
    big = llama_config("llama-3.1-70b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads,
            big.intermediate_size, big.vocab_size, big.rope_scaling["factor"]) == (8192, 80, 64, 8, 28672, 128256, 8.0)
    res = CliRunner().invoke(app, ["bench", "probe", "--arch", "llama-9b"])
    assert res.exit_code == 2 and "llama-3.1-70b" in res.output and "Traceback" not in res.output


def test_transfer_plan_keeps_the_plans_shares():
    """A real model's emitted plan (Qwen 0.5B at 128K: 24 layers, 14 heads) laid onto the 8B architecture
    (32 layers, 32 heads): every target layer takes the kind of the source layer at its depth, dense
    heads keep their count, and vertical-slash budgets scale with the length."""
    from pathlib import Path

    from trimix_probe.bench.dynamic import transfer_plan
    from trimix_probe.config import ModelIdentity, TriMixConfig

    src = TriMixConfig.load(Path(__file__).parent.parent / "docs/raw/faithful-2026-12-04/qwen-130944-dyn/config.json")
    target = ModelIdentity(name="llama-8b", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                           architecture="LlamaConfig")
    probed = max(src.provenance["probed_lengths"])
    plan = transfer_plan(src, target, probed)
    assert len(plan.layers) == 32
    for i, kind in enumerate(plan.layers):
        assert kind == src.layers[i * 24 // 32]
    assert plan.starting_layer == min(i for i, kind in enumerate(plan.layers) if kind == "triangle")
    assert plan.starting_layer / 32 == pytest.approx(src.starting_layer / 24, abs=1 / 24)
    for i in (i for i, kind in enumerate(plan.layers) if kind == "dynamic"):
        s = i * 24 // 32
        assert plan.dynamic_spec(i) == src.dynamic_spec(s)  # at the probed length: the budgets as emitted
        assert len(plan.dense_heads.get(i, ())) == len(src.dense_heads.get(s, ()))
        assert all(0 <= h < 32 for h in plan.dense_heads.get(i, ()))
    half = transfer_plan(src, target, probed // 2)
    i = plan.layers.index("dynamic")
    assert half.dynamic_spec(i).vertical == round(src.dynamic_spec(i * 24 // 32).vertical / 2)
    TriMixConfig.from_dict(plan.to_dict())  # a valid config
