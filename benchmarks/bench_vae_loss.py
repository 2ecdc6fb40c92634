"""Benchmarks of dualdiff.ops.vae, forward + backward (gradients of recon_logits, mu, logvar).

    pytest benchmarks/bench_vae_loss.py --benchmark-only   # pytest-benchmark table (CPU; CUDA if present)
    python benchmarks/bench_vae_loss.py                    # CPU: interleaved timings and ratios side by side

Variants, all on the same inputs, each call = forward + torch.autograd.grad (no .grad accumulation):
  eager      the loss as a β-VAE training script writes it: sigmoid, F.binary_cross_entropy (mean),
             KL summed over the latent and averaged over the batch (the issue's baseline)
  eager_ref  vae_loss_reference (the specification: softplus form from the logits)
  compile    torch.compile(vae_loss_reference) (default inductor)
  cpp / triton / cuda   dualdiff.ops.vae with the backend forced
Targets (issue 2): H100, [64, 3, 224, 224] + latent [64, 256] fp32: >= 6x faster than eager
(630 µs measured there). CPU (2 cores): cpp >= 2x faster than eager.
Minimum bytes (forward reads logits + x, backward reads logits + x and writes the gradient; the
latents likewise): 5 N + 6 M elements. Every variant gets the same warm-up calls. Under plain
``pytest`` (smoke mode, see benchmarks/conftest.py) each body runs once on a tiny shape.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from dualdiff._backend import backend_status
from dualdiff.testing import require_backend
from dualdiff.ops.vae import vae_loss, vae_loss_reference

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
SMOKE_SHAPE, SMOKE_LATENT = (2, 3, 8, 8), 16
CPU_SHAPE, CPU_LATENT = (SMOKE_SHAPE, SMOKE_LATENT) if SMOKE else ((16, 3, 64, 64), 256)
GPU_SHAPE, GPU_LATENT = (SMOKE_SHAPE, SMOKE_LATENT) if SMOKE else ((64, 3, 224, 224), 256)


def make_inputs(shape, latent, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    x = torch.rand(shape, generator=g).to(device, dtype)
    mu = torch.randn(shape[0], latent, generator=g).to(device, dtype).requires_grad_()
    logvar = (0.5 * torch.randn(shape[0], latent, generator=g)).to(device, dtype).requires_grad_()
    return logits, x, mu, logvar


def eager_seed(logits, x, mu, logvar, kl_weight=1.0):
    recon = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="mean")
    kl = (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)).mean()
    return recon + kl_weight * kl, recon, kl


def step_fn(loss_fn, inputs):
    """forward + backward of total w.r.t. (logits, mu, logvar)."""
    logits, x, mu, logvar = inputs

    def step():
        total = loss_fn(logits, x, mu, logvar)[0]
        return torch.autograd.grad(total, (logits, mu, logvar))

    return step


def variants(device: torch.device) -> dict:
    """name -> loss function (logits, x, mu, logvar) -> (total, recon, kl), usable on device."""
    out = {
        "eager": eager_seed,
        "eager_ref": lambda *a: vae_loss_reference(*a),
        "compile": torch.compile(lambda *a: vae_loss_reference(*a)),
    }
    backends = ("cpp",) if device.type == "cpu" else ("triton", "cuda")
    for b in backends:
        if backend_status(b, device.type)[0]:
            out[b] = lambda *a, b=b: vae_loss(*a, backend=b)
    return out


def min_bytes(shape, latent, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    es = torch.empty((), dtype=dtype).element_size()
    return (5 * n + 6 * shape[0] * latent) * es


# ----------------------------------------------------------------------------- pytest-benchmark
CPU_VARIANTS = ["eager", "eager_ref", "compile", "cpp"]


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_cpu_forward_backward(benchmark, variant):
    device = torch.device("cpu")
    fns = variants(device)
    if variant not in fns:
        require_backend(variant, "cpu")  # fails where the backend must work, else skips
        pytest.skip(f"{variant} unavailable here")
    step = step_fn(fns[variant], make_inputs(CPU_SHAPE, CPU_LATENT, device))
    step()  # warm-up (compilation)
    benchmark.extra_info.update(shape=str(CPU_SHAPE), latent=CPU_LATENT)
    benchmark(step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["eager", "eager_ref", "compile", "triton", "cuda"])
def test_cuda_forward_backward(benchmark, variant):
    device = torch.device("cuda")
    fns = variants(device)
    if variant not in fns:
        require_backend(variant, "cuda")  # fails where the backend must work, else skips
        pytest.skip(f"{variant} unavailable here")
    step = step_fn(fns[variant], make_inputs(GPU_SHAPE, GPU_LATENT, device))

    def synced():
        step()
        torch.cuda.synchronize()

    synced()  # warm-up (compilation), as on the CPU
    benchmark(synced)


# ----------------------------------------------------------------------------- GPU report rows
def gpu_rows(timeit, device, smoke: bool = False):
    """Yields one row per (dtype, variant) at the issue's shape (a tiny one with smoke)."""
    device = torch.device(device)
    fns = variants(device)
    shape_, latent = (SMOKE_SHAPE, SMOKE_LATENT) if smoke else (GPU_SHAPE, GPU_LATENT)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(shape_, latent, device, dtype)
        shape = f"{list(shape_)} + latent [{shape_[0]}, {latent}] {str(dtype).replace('torch.', '')} fwd+bwd"
        for name, fn in fns.items():
            if name == "cpp" and dtype != torch.float32:
                continue  # the C++ kernels are fp32
            if smoke and device.type == "cpu" and name == "compile":
                continue  # CPU compilation: too slow for a smoke run
            yield dict(op="vae_loss", variant=name, shape=shape, time_us=timeit(step_fn(fn, inputs)),
                       bytes=min_bytes(shape_, latent, dtype))


# ----------------------------------------------------------------------------- CPU side by side
def cpu_report(shape=CPU_SHAPE, latent=CPU_LATENT, rounds: int = 15, reps: int = 10) -> dict:
    """Interleaved timing (round-robin over variants, median of per-round means) so that load
    from other processes hits all variants alike. Returns name -> median µs."""
    device = torch.device("cpu")
    inputs = make_inputs(shape, latent, device)
    steps = {name: step_fn(fn, inputs) for name, fn in variants(device).items()}
    for step in steps.values():
        for _ in range(3):
            step()
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            samples[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


if __name__ == "__main__":
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"recon {list(CPU_SHAPE)}, latent [{CPU_SHAPE[0]}, {CPU_LATENT}] fp32, forward+backward")
    res = cpu_report()
    base = res["eager"]
    print("| variant | time (µs) | eager / variant |")
    print("|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {t:.0f} | {base / t:.2f}x |")
    if "cpp" in res:
        print(f"cpp vs eager {res['eager'] / res['cpp']:.2f}x, vs eager_ref {res['eager_ref'] / res['cpp']:.2f}x, "
              f"vs compile {res['compile'] / res['cpp']:.2f}x")
