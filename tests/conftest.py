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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU models: one intra-op thread is fastest, and far faster when the CPU is shared
    (measured here: 30 tiny training steps took 117 s with 2 threads under load, ~6 s with 1).
    Use as ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
