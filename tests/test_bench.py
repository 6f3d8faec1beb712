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
