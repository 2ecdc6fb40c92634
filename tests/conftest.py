"""Test session setup.

On a machine without CUDA the Triton kernels run under the Triton interpreter: the
variable must be set before any ``@triton.jit`` function is created, hence here.
Tests marked ``cuda`` are skipped without a GPU (they run on the device machine).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
