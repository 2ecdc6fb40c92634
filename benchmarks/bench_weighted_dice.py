"""Benchmarks of dualdiff.ops.weighted_dice_loss, forward+backward.

    pytest benchmarks/bench_weighted_dice.py --benchmark-only

Each backend against eager PyTorch (the reference) and torch.compile of the reference on the
same inputs: small shapes on the CPU, the issue's shape ([32, 4, 256, 256] fp32) on CUDA.
``gpu_rows`` feeds benchmarks/gpu_report.py. Every variant gets the same 3 warm-up calls.
Under plain ``pytest`` (smoke mode, see benchmarks/conftest.py) the bodies run once on tiny shapes.
"""
from __future__ import annotations

import os

import pytest
import torch

from dualdiff._backend import backend_status
from dualdiff.testing import require_backend
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
SMOKE_SHAPES = [(2, 3, 8, 8), (1, 2, 4, 4, 4)]
CPU_SHAPES = SMOKE_SHAPES if SMOKE else [(8, 4, 64, 64), (2, 3, 32, 32, 32)]
GPU_SHAPES = SMOKE_SHAPES[:1] if SMOKE else [(32, 4, 256, 256)]
ACTIVATIONS = ["sigmoid", "softmax"]


def _inputs(shape, device, dtype=torch.float32):
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    g = (torch.rand(shape, device=device) > 0.5).float()
    w = torch.rand(shape[0], device=device)
    return x, g, w


def _step(fn, x, g, w, activation):
    def run():
        x.grad = None
        fn(x, g, w, activation=activation).backward()
    return run


def _variants(device_type):
    """name -> loss function(x, g, w, activation=...)."""
    out = {"eager": weighted_dice_loss_reference}
    compiled = torch.compile(weighted_dice_loss_reference, dynamic=False)
    out["compile"] = compiled
    for be in ("triton", "cuda", "cpp"):
        if be == "triton" and device_type != "cuda":
            continue  # the interpreter is not a benchmark
        if backend_status(be, device_type)[0]:
            out[be] = lambda x, g, w, activation, _be=be: weighted_dice_loss(x, g, w, activation=activation, backend=_be)
    return out


def min_bytes(x: torch.Tensor, g: torch.Tensor) -> int:
    """Forward reads logits + target, backward reads them again and writes the gradient."""
    return 2 * (x.numel() * x.element_size() + g.numel() * g.element_size()) + x.numel() * x.element_size()


@pytest.mark.parametrize("variant", ["eager", "compile", "cpp", "torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_fwd_bwd(benchmark, shape, activation, variant):
    torch.manual_seed(0)
    x, g, w = _inputs(shape, "cpu")
    if variant == "torch":
        fn = lambda x, g, w, activation: weighted_dice_loss(x, g, w, activation=activation, backend="torch")
    else:
        vs = _variants("cpu")
        if variant not in vs:
            require_backend(variant, "cpu")  # fails where the backend must work, else skips
            pytest.skip(f"{variant} unusable here")
        fn = vs[variant]
    step = _step(fn, x, g, w, activation)
    for _ in range(3):  # warm-up (torch.compile compiles here, not in the timed rounds)
        step()
    benchmark.group = f"weighted_dice cpu {shape} {activation}"
    benchmark(step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["eager", "compile", "triton", "cuda"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_fwd_bwd(benchmark, shape, activation, variant):
    torch.manual_seed(0)
    x, g, w = _inputs(shape, "cuda")
    vs = _variants("cuda")
    if variant not in vs:
        require_backend(variant, "cuda")  # fails where the backend must work, else skips
        pytest.skip(f"{variant} unusable here")
    step = _step(vs[variant], x, g, w, activation)

    def synced():
        step()
        torch.cuda.synchronize()

    for _ in range(3):
        synced()

    benchmark.group = f"weighted_dice cuda {shape} {activation}"
    benchmark(synced)


def gpu_rows(timeit, device, smoke: bool = False):
    """Yields one row per (activation, variant) at the issue's shape (a tiny one with smoke)."""
    device = torch.device(device)
    for shape in SMOKE_SHAPES[:1] if smoke else GPU_SHAPES:
        for activation in ACTIVATIONS:
            torch.manual_seed(0)
            x, g, w = _inputs(shape, device)
            for name, fn in _variants(device.type).items():
                if smoke and device.type == "cpu" and name == "compile":
                    continue  # CPU compilation: too slow for a smoke run
                yield {
                    "op": f"weighted_dice_loss fwd+bwd ({activation})",
                    "variant": name,
                    "shape": f"{list(shape)} fp32, target fp32",
                    "time_us": timeit(_step(fn, x, g, w, activation)),
                    "bytes": min_bytes(x, g),
                }
