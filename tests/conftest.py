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
# tiny training steps 117 s with 2 threads under load, ~6 s with 1). The C++ kernels' OpenMP
# threads are not affected (OMP_NUM_THREADS).
torch.set_num_threads(int(os.environ.get("DUALDIFF_TEST_THREADS", "1")))

# after TRITON_INTERPRET is set: nothing of dualdiff is imported before it
from dualdiff.testing import on_ci, require  # noqa: E402,F401  (require: tests import it from here)


_on_ci = on_ci


def backend_must_work(name: str, device_type: str) -> bool:
    """Whether backend ``name`` must be usable for ``device_type`` tensors on this machine (the
    rule in the module docstring)."""
    if name == "torch":
        return True
    if device_type == "cuda":
        return torch.cuda.is_available() and name in ("cuda", "triton")
    if device_type == "cpu" and _on_ci():
        return name == "cpp" or (name == "triton" and not torch.cuda.is_available())
    return False


def require_backend(name: str, device: str | torch.device = "cpu") -> None:
    """Return when backend ``name`` is usable for tensors on ``device``; otherwise FAIL the test
    when the backend is built but its probe fails, or when this machine must have it
    (:func:`backend_must_work`), and skip it only where it legitimately cannot run."""
    from dualdiff import _backend

    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; run on the device machine")
    ok, why = _backend.backend_status(name, device)
    if ok:
        return
    built, _ = _backend._static_status(name, device_type)
    if built:
        pytest.fail(f"backend {name!r} is built for {device_type} but unusable: {why}", pytrace=False)
    if backend_must_work(name, device_type):
        where = "CI=true" if _on_ci() and device_type == "cpu" else "a GPU host"
        pytest.fail(f"backend {name!r} must be usable for {device_type} tensors on {where}, but: {why}",
                    pytrace=False)
    pytest.skip(f"backend {name!r} not available for {device_type} here: {why}")


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
