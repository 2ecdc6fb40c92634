"""Helpers for testing fast backends against the reference (used by dualdiff's tests and benchmarks)."""
from __future__ import annotations

import contextlib
import importlib
import os
import types
from typing import Iterator

import torch

POISON = float("nan")


def on_ci() -> bool:
    """True under ``CI=true`` (CI installs the test extra: a missing library is an error there)."""
    return os.environ.get("CI", "").lower() == "true"


def require(module: str) -> types.ModuleType:
    """Import an optional test library (diffusers, monai, pytorch-fid, ...) for a test or a
    benchmark: skip it when the library is missing, FAIL it under ``CI=true``."""
    import pytest

    if on_ci():
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"CI=true and the test dependency {module!r} is missing ({exc}); "
                        "install the test extra: pip install '.[test]'", pytrace=False)
    return pytest.importorskip(module)


def backend_must_work(name: str, device_type: str) -> bool:
    """Whether backend ``name`` must be usable for ``device_type`` tensors on this machine:
    ``torch`` always; under ``CI=true`` the ``cpp`` backend and, on a CPU-only runner, ``triton``
    on the CPU (the interpreter); on a GPU host ``cuda`` and ``triton`` on the GPU."""
    if name == "torch":
        return True
    if device_type == "cuda":
        return torch.cuda.is_available() and name in ("cuda", "triton")
    if device_type == "cpu" and on_ci():
        return name == "cpp" or (name == "triton" and not torch.cuda.is_available())
    return False


def require_backend(name: str, device: str | torch.device = "cpu") -> None:
    """Return when backend ``name`` is usable for tensors on ``device``; otherwise FAIL the test
    when the backend is built but its probe fails, or when this machine must have it
    (:func:`backend_must_work`), and skip it only where it legitimately cannot run."""
    import pytest

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
        where = "CI=true" if on_ci() and device_type == "cpu" else "a GPU host"
        pytest.fail(f"backend {name!r} must be usable for {device_type} tensors on {where}, but: {why}",
                    pytrace=False)
    pytest.skip(f"backend {name!r} not available for {device_type} here: {why}")


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Set DUALDIFF_BACKEND=name for the duration of the block."""
    old = os.environ.get("DUALDIFF_BACKEND")
    os.environ["DUALDIFF_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DUALDIFF_BACKEND", None)
        else:
            os.environ["DUALDIFF_BACKEND"] = old


def poisoned_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN (or 0xFF bytes for integer dtypes): unwritten elements show."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.is_floating_point():
        out.fill_(POISON)
    else:
        out.fill_(-1 if dtype != torch.bool else True)
    return out


def assert_close_lowp(
    actual: torch.Tensor,
    reference_fp32: torch.Tensor,
    naive_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """flash-attention's rule for low precision: the kernel's max error against the fp32
    reference is at most ``factor`` x the error of plain PyTorch run in the same low
    precision (plus ``atol`` for outputs where that error is ~0)."""
    ref = reference_fp32.double()
    err = (actual.double() - ref).abs().max().item()
    base = (naive_lowp.double() - ref).abs().max().item()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert err <= factor * base + atol, (
        f"{name}: error {err:.3e} vs fp32 reference exceeds {factor} x plain-PyTorch "
        f"low-precision error {base:.3e} (+ atol {atol:.1e})"
    )
