"""Test setup shared by every test file.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET is read
when triton is first imported, so it is set here, before any test module imports a kernel; with a
GPU it is left alone. Tests marked ``gpu`` skip without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
