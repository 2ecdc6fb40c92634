"""Backend discovery and selection for the fused ops.

Backends:
  ``triton``  Triton kernels from ``dualdiff.kernels``: CUDA tensors, or CPU tensors under
              ``TRITON_INTERPRET=1`` (how CI tests them; only when forced).
  ``cuda``    CUDA C++ kernels compiled into ``dualdiff._C`` when nvcc was found at build time.
  ``cpp``     C++ CPU kernels (OpenMP) of ``dualdiff._C``: CPU tensors.
  ``torch``   the plain-PyTorch reference: any device.

``DUALDIFF_BACKEND=auto|triton|cuda|cpp|torch`` (read at every call) forces one; forcing a
backend that the op lacks or that cannot run here raises :class:`BackendUnavailableError`
saying why. There is never a silent fallback.

"Usable" means built, importable AND a one-time probe launch on the device succeeded: a tiny
Gaussian-KL forward through the backend's real kernels, its value checked (cached per backend
and device). So on a GPU the extension was not built for (no kernel image), with a driver older
than the CUDA runtime linked into dualdiff._C, or where Triton cannot compile, auto picks the
next backend that works, and a forced one raises with the probe's error.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Sequence

import torch

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")
ENV_VAR = "DUALDIFF_BACKEND"

# dtype codes shared with csrc/dualdiff.h (enum class DType).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.uint8: 3,
    torch.bool: 4,
}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``DUALDIFF_BACKEND`` or ``backend=``) but cannot run."""


@functools.lru_cache(maxsize=None)
def _import_extension() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("dualdiff._C"), ""
    except ImportError as exc:  # pragma: no cover - depends on the install
        return None, f"dualdiff._C failed to import ({exc}); reinstall with `pip install .`"


def extension() -> ModuleType:
    """The compiled ``dualdiff._C`` module; raises BackendUnavailableError if it is missing."""
    mod, why = _import_extension()
    if mod is None:
        raise BackendUnavailableError(why)
    return mod


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
        importlib.import_module("dualdiff.kernels")
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return ""


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _static_status(name: str, device_type: str) -> tuple[bool, str]:
    """(buildable here, reason) from imports and build flags alone, no launch."""
    if name == "torch":
        return True, "plain PyTorch reference"
    if name == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        if device_type == "cuda":
            return True, "Triton JIT on the GPU"
        if triton_interpreter():
            return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for testing)"
        return False, "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)"
    mod, why = _import_extension()
    if mod is None:
        return False, why
    if name == "cpp":
        if device_type != "cpu":
            return False, f"the cpp backend runs on CPU tensors, not {device_type}"
        threads = mod.openmp_max_threads()
        return True, f"C++ CPU kernels ({'OpenMP, %d threads' % threads if mod.has_openmp else 'no OpenMP'})"
    if name == "cuda":
        if not mod.has_cuda:
            return False, "dualdiff._C was built without CUDA (no nvcc at build time)"
        if device_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, not {device_type}"
        return True, f"CUDA C++ kernels (built for {mod.cuda_archs})"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# ---- one-time probe launches ------------------------------------------------------------------
_PROBE_RESULTS: dict[tuple[str, str, int | None], tuple[bool, str]] = {}
_PROBE_MU, _PROBE_KL = 0.5, 0.125  # KL(N(0.5, 1) || N(0, 1)) = 0.5 * 0.5**2


def _probe_launch(name: str, device: torch.device) -> None:
    """One tiny launch of backend ``name`` on ``device`` (a [1, 1] Gaussian KL forward through the
    backend's real kernels); raises if the launch fails or computes a wrong value."""
    mu = torch.full((1, 1), _PROBE_MU, dtype=torch.float32, device=device)
    logvar = torch.zeros_like(mu)
    out = [torch.full((), float("nan"), dtype=torch.float32, device=device) for _ in range(3)]
    with device_guard(device):
        if name == "cpp":
            extension().vae_loss_forward_cpu(0, 0, 0, mu.data_ptr(), logvar.data_ptr(), 1,
                                             *(o.data_ptr() for o in out), 1.0, 1.0, 0.0, False, False)
        elif name == "cuda":
            partials = torch.empty(1, dtype=torch.float32, device=device)
            extension().vae_loss_forward_cuda(
                0, 0, 0, DTYPE_CODES[torch.float32], mu.data_ptr(), logvar.data_ptr(), 1,
                DTYPE_CODES[torch.float32], partials.data_ptr(), 0, 1, *(o.data_ptr() for o in out),
                1.0, 1.0, 0.0, False, False, cuda_stream(device))
        elif name == "triton":
            from dualdiff.kernels import vae as K

            K.vae_loss_forward(None, None, mu, logvar, *out, recon_scale=1.0, kl_scale=1.0,
                               kl_weight=0.0, mse=False)
        else:
            raise ValueError(f"no probe for backend {name!r}")
        value = out[2].item()  # synchronizes: an asynchronous launch error raises here
    if abs(value - _PROBE_KL) > 1e-6:
        raise RuntimeError(f"the probe computed {value}, expected {_PROBE_KL}")


def probe(name: str, device: torch.device) -> tuple[bool, str]:
    """(ok, message) of backend ``name``'s probe launch on ``device``; run once per backend and
    device, then cached."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device.type, device.index)
    result = _PROBE_RESULTS.get(key)
    if result is None:
        with _no_tracing_modes():
            try:
                _probe_launch(name, device)
                result = (True, "probe launch ok")
            except Exception as exc:  # noqa: BLE001 - any failure makes the backend unusable
                result = (False, f"probe launch on {device} failed: {type(exc).__name__}: {exc}")
        _PROBE_RESULTS[key] = result
    return result


def _no_tracing_modes() -> contextlib.AbstractContextManager:
    """Real tensors for the probe even while torch.compile traces (fake-tensor mode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _needs_probe(name: str, device_type: str) -> bool:
    # the Triton interpreter (CPU testing) and the torch reference need no launch check
    return name in ("cuda", "cpp") or (name == "triton" and device_type == "cuda")


def backend_status(name: str, device: torch.device | str) -> tuple[bool, str]:
    """(usable, reason) of backend ``name`` for tensors on ``device`` (a device or a device type,
    'cpu' or 'cuda'; 'cuda' means the current GPU): built, importable and, for the compiled
    backends, its probe launch on that device succeeded."""
    device = torch.device(device)
    ok, why = _static_status(name, device.type)
    if not ok or not _needs_probe(name, device.type):
        return ok, why
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    probed, message = probe(name, device)
    return probed, f"{why}; {message}"


def forced_backend() -> str | None:
    """The backend forced by ``DUALDIFF_BACKEND``, or None for auto."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(
            f"{ENV_VAR}={value!r} is not a backend; expected auto or one of {', '.join(BACKENDS)}"
        )
    return value


def select_backend(
    op: str,
    device: torch.device | str,
    supported: Sequence[str],
    prefer: dict[str, Sequence[str]],
    backend: str | None = None,
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``supported``: the backends the op implements. ``prefer``: device type -> order of
    preference for auto. ``backend`` (an explicit argument) overrides the environment.
    A forced backend that is unsupported or unusable raises BackendUnavailableError.
    Safe to call while torch.compile traces: the choice is then made once, at trace time.
    """
    device = torch.device(device)
    device_type = device.type
    return _select(op, device_type, device.index, tuple(supported),
                   tuple(prefer.get(device_type, ("torch",))), backend)


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str, index: int | None, supported: tuple[str, ...],
            order: tuple[str, ...], backend: str | None) -> str:
    # Runs eagerly even under dynamo (it imports the extension, which dynamo will not trace).
    forced = backend if backend not in (None, "auto") else forced_backend()
    if forced is not None:
        if forced not in BACKENDS:
            raise BackendUnavailableError(
                f"backend {forced!r} is not one of auto, {', '.join(BACKENDS)}"
            )
        if forced not in supported:
            raise BackendUnavailableError(
                f"{op} has no {forced!r} backend (it has: {', '.join(supported)})"
            )
        ok, why = backend_status(forced, torch.device(device_type, index))
        if not ok:
            raise BackendUnavailableError(f"{op}: backend {forced!r} is forced but unusable: {why}")
        return forced
    for name in order:
        if name == "triton" and device_type != "cuda":
            continue  # the Triton interpreter is for testing: only when forced
        if name in supported and backend_status(name, torch.device(device_type, index))[0]:
            return name
    return "torch"


@torch.compiler.assume_constant_result
def _is_forced(backend: str | None) -> bool:
    # Read at trace time under torch.compile, like _select (the environment is not traced).
    return backend not in (None, "auto") or forced_backend() is not None


def select_by_size(chosen: str, device: torch.device | str, backend: str | None, numel,
                   min_numel: dict[str, dict[str, int]]) -> str:
    """auto's size rule on top of :func:`select_backend`'s ``chosen``: the plain-PyTorch
    reference ("torch") when auto picked a fused backend for an input of fewer than
    ``min_numel[device type][chosen]`` elements (where the fused path's fixed cost was measured
    to lose), else ``chosen``. A forced backend (``backend=`` or ``DUALDIFF_BACKEND``) is never
    overridden; a missing or 0 threshold means always fused (and adds no guard).

    Compile-friendly: the forcing test is taken at trace time; with symbolic shapes the
    comparison of ``numel`` with the threshold becomes a guard, so a graph traced on one side of
    the threshold is recompiled, not reused, for sizes on the other side.
    """
    if chosen == "torch":
        return chosen
    threshold = min_numel.get(torch.device(device).type, {}).get(chosen, 0)
    if threshold <= 0 or _is_forced(backend):
        return chosen
    return "torch" if numel < threshold else chosen


def backends() -> dict[str, dict[str, object]]:
    """What was built and what is usable here, per backend and device type."""
    mod, why = _import_extension()
    report: dict[str, dict[str, object]] = {
        "extension": {
            "built": mod is not None,
            "error": why,
            "cuda_kernels": bool(mod is not None and mod.has_cuda),
            "cuda_archs": getattr(mod, "cuda_archs", ""),
            "openmp": bool(mod is not None and mod.has_openmp),
        },
        "torch": {"version": torch.__version__, "cuda_available": torch.cuda.is_available()},
        "forced": {"DUALDIFF_BACKEND": os.environ.get(ENV_VAR, "auto")},
    }
    for device_type in ("cpu", "cuda"):  # "usable" includes the probe launch (see probe())
        report[device_type] = {
            name: {"usable": ok, "why": why}
            for name in BACKENDS
            for ok, why in [backend_status(name, device_type)]
        }
    return report


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device for the block (kernel launches go to the current
    device); a no-op for CPU tensors or when it already is current."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer handle for dualdiff._C."""
    return torch.cuda.current_stream(device).cuda_stream
