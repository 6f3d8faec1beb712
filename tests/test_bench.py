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
