"""Test session setup.

On a machine without CUDA the Triton kernels run under the Triton interpreter: the
variable must be set before any ``@triton.jit`` function is created, hence here. On a GPU
machine it is left alone, so the Triton kernels run natively there.
Tests marked ``cuda`` are skipped without a GPU (they run on the device machine).

Optional test libraries (diffusers, monai, pytorch-fid, torchvision, nibabel, ...) are imported
by the tests that need them through the ``require`` fixture: a missing one skips those tests,
except under ``CI=true``, where it fails them (CI installs ``.[test]``, so a missing library there
is a broken environment, not a reason to skip).

Fused-op backends are asked for through :func:`require_backend` (``from conftest import
require_backend`` or the ``require_backend`` fixture), never by an ad-hoc skip: a backend that is
built but unusable (its probe launch fails) always FAILS; one that is not built fails where it
must exist -- under ``CI=true`` the ``cpp`` backend and, on a CPU-only CI runner, ``triton`` on the
CPU (the interpreter); on a GPU host (``torch.cuda.is_available()``) ``cuda`` and ``triton`` on the
GPU -- and skips elsewhere.
"""
from __future__ import annotations

import os
import types
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread for the whole suite (DUALDIFF_TEST_THREADS overrides): the tests' models are
# tiny, and on a 2-core machine, let alone a shared one, a second thread slows them (measured: 30
# tiny training steps 117 s with 2 threads under load, ~6 s with 1). torch and dualdiff._C share
# the process's OpenMP runtime, so this is the C++ kernels' thread count too:
# tests/test_cpu_parallel.py raises it to run their multi-threaded path.
torch.set_num_threads(int(os.environ.get("DUALDIFF_TEST_THREADS", "1")))

# after TRITON_INTERPRET is set: nothing of dualdiff is imported before it
from dualdiff.testing import backend_must_work, on_ci, require, require_backend  # noqa: E402,F401
# (tests import require / require_backend from here)


@pytest.fixture(name="require_backend")
def require_backend_fixture() -> Callable[..., None]:
    """``require_backend("cpp")`` / ``require_backend("cuda", "cuda")`` inside a test."""
    return require_backend


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
