"""Benchmarks of dualdiff.ops.DualTimestepEmbedding (forward; forward+backward for reference).

    pytest benchmarks/bench_timestep_embedding.py --benchmark-only   # CPU cases; CUDA if present
    python benchmarks/gpu_report.py --only bench_timestep_embedding  # GPU table (H100)

Variants, same parameters and timesteps (t0 != t1 per sample), inference under torch.no_grad():
  eager       the unfused module (DualTimestepEmbeddingReference): ~12 kernel launches
  compile     torch.compile(unfused) (default inductor)
  compile_ro  torch.compile(unfused, mode="reduce-overhead") (CUDA graphs)
  triton      DualTimestepEmbedding(backend="triton"): one fused launch
  cuda        DualTimestepEmbedding(backend="cuda"): one fused launch
Each GPU call is timed with a device sync (gpu_report.timeit: CUDA events around the call, end
event synchronized), so host launch overhead counts, as it does in a sampling loop.
Target (issue 2): B = 64, freq_dim 64, hidden 256 fp32 forward on an H100: >= 5x faster than
eager, >= 3x faster than compile, faster than compile_ro.
Minimum bytes: every weight read once, t0/t1 read once, the output written once.
Every variant gets the same warm-up calls. Under plain ``pytest`` (smoke mode, see
benchmarks/conftest.py) each body runs once on a tiny shape.
"""
from __future__ import annotations

import os

import pytest
import torch

from dualdiff._backend import backend_status
from dualdiff.testing import require_backend
from dualdiff.ops.timestep_embedding import DualTimestepEmbedding

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
SMOKE_SHAPE = (4, 16, 32)
GPU_SHAPE = SMOKE_SHAPE if SMOKE else (64, 64, 256)  # B, freq_dim, hidden_dim (the target)
CPU_SHAPE = SMOKE_SHAPE if SMOKE else (64, 64, 256)  # small already: the CPU cases use the same shape


def make(shape, device, dtype=torch.float32):
    B, fd, hd = shape
    torch.manual_seed(0)
    fused = DualTimestepEmbedding(fd, hd, device=device, dtype=dtype)
    t0 = torch.randint(0, 1000, (B,), device=device)
    t1 = torch.randint(0, 1000, (B,), device=device)
    return fused, t0, t1


def variants(fused: DualTimestepEmbedding, device: torch.device) -> dict:
    """name -> module (t0, t1) -> [B, H]; all share fused's parameters."""
    plain = fused.unfused()
    out = {"eager": plain, "compile": torch.compile(plain)}
    if device.type == "cuda":
        out["compile_ro"] = torch.compile(plain, mode="reduce-overhead")
        for b in ("triton", "cuda"):
            if backend_status(b, "cuda")[0]:
                m = DualTimestepEmbedding(fused.freq_dim, fused.hidden_dim, backend=b,
                                          device=device, dtype=fused.out.weight.dtype)
                m.load_state_dict(fused.state_dict())
                out[b] = m
    else:
        out["fused_auto"] = fused  # torch backend on the CPU
    return out


def min_bytes(fused, t0, t1) -> int:
    w = sum(p.numel() * p.element_size() for p in fused.parameters())
    out = t0.shape[0] * fused.hidden_dim * fused.out.weight.element_size()
    return w + t0.numel() * t0.element_size() + t1.numel() * t1.element_size() + out


def forward_fn(mod, t0, t1):
    def fwd():
        with torch.no_grad():
            return mod(t0, t1)
    return fwd


def train_fn(mod, t0, t1, params):
    def step():
        return torch.autograd.grad(mod(t0, t1).sum(), params)
    return step


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("variant", ["eager", "compile", "fused_auto"])
def test_cpu_forward(benchmark, variant):
    fused, t0, t1 = make(CPU_SHAPE, torch.device("cpu"))
    fn = forward_fn(variants(fused, torch.device("cpu"))[variant], t0, t1)
    fn()
    fn()  # compile / warm-up
    benchmark.extra_info.update(shape=str(CPU_SHAPE))
    benchmark(fn)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["eager", "compile", "compile_ro", "triton", "cuda"])
def test_cuda_forward(benchmark, variant):
    device = torch.device("cuda")
    fused, t0, t1 = make(GPU_SHAPE, device)
    fns = variants(fused, device)
    if variant not in fns:
        require_backend(variant, "cuda")  # fails where the backend must work, else skips
        pytest.skip(f"{variant} unavailable here")
    fn = forward_fn(fns[variant], t0, t1)

    def synced():
        fn()
        torch.cuda.synchronize()

    for _ in range(5):
        synced()  # compile, CUDA-graph capture, kernel JIT
    benchmark.extra_info.update(shape=str(GPU_SHAPE))
    benchmark(synced)


# ----------------------------------------------------------------------------- GPU report rows
def gpu_rows(timeit, device, smoke: bool = False):
    """Yields the forward rows (fp32, bf16) and the fp32 training-step rows per variant."""
    device = torch.device(device)
    gpu_shape = SMOKE_SHAPE if smoke else GPU_SHAPE
    for dtype in (torch.float32, torch.bfloat16):
        fused, t0, t1 = make(gpu_shape, device, dtype)
        nbytes = min_bytes(fused, t0, t1)
        B, fd, hd = gpu_shape
        shape = f"B={B} freq={fd} hidden={hd} {str(dtype).replace('torch.', '')} fwd"
        for name, mod in variants(fused, device).items():
            if smoke and device.type == "cpu" and name.startswith("compile"):
                continue  # CPU compilation: too slow for a smoke run
            fn = forward_fn(mod, t0, t1)
            for _ in range(5):
                fn()
            yield dict(op="dual_timestep_embedding", variant=name, shape=shape,
                       time_us=timeit(fn), bytes=nbytes)
    # training step (forward + weight gradients), fp32: informative, no target
    fused, t0, t1 = make(gpu_shape, device)
    shape = f"B={gpu_shape[0]} freq={gpu_shape[1]} hidden={gpu_shape[2]} float32 fwd+bwd"
    for name, mod in variants(fused, device).items():
        if name == "compile_ro" or (smoke and device.type == "cpu" and name == "compile"):
            continue  # CUDA-graph outputs are overwritten by the next replay: not for autograd loops
        params = tuple(mod.parameters())
        fn = train_fn(mod, t0, t1, params)
        for _ in range(3):
            fn()
        yield dict(op="dual_timestep_embedding", variant=name, shape=shape,
                   time_us=timeit(fn), bytes=None)
