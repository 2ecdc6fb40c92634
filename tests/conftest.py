"""Test session setup.

On a machine without CUDA the Triton kernels run under the Triton interpreter: the
variable must be set before any ``@triton.jit`` function is created, hence here. On a GPU
machine it is left alone, so the Triton kernels run natively there.
Tests marked ``cuda`` are skipped without a GPU (they run on the device machine).

Optional test libraries (diffusers, monai, pytorch-fid, torchvision, nibabel, ...) are imported
by the tests that need them through the ``require`` fixture: a missing one skips those tests,
except under ``CI=true``, where it fails them (CI installs ``.[test]``, so a missing library there
is a broken environment, not a reason to skip).
"""
from __future__ import annotations

import importlib
import os
import types
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require(module: str) -> types.ModuleType:
    """Import ``module`` for a test: skip the test when it is missing, fail it under ``CI=true``."""
    if os.environ.get("CI", "").lower() == "true":
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"CI=true and the test dependency {module!r} is missing ({exc}); "
                        "install the test extra: pip install '.[test]'", pytrace=False)
    return pytest.importorskip(module)


@pytest.fixture(name="require")
def require_fixture() -> Callable[[str], types.ModuleType]:
    """``require("diffusers")`` inside a test: the module, or a skip (a failure under CI=true)."""
    return require


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
