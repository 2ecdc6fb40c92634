"""Benchmarks for dualdiff.ops.frechet_distance vs pytorch-fid's scipy sqrtm route.

CPU (pytest-benchmark, D=512):  pytest benchmarks/bench_frechet.py --benchmark-only
CPU at D=2048 once:             python benchmarks/bench_frechet.py
GPU: ``gpu_rows`` (benchmarks/gpu_report.py) at D=2048 with variants 'scipy' (pytorch-fid on
the CPU, timed with a wall clock: ~10 s a call; left out when pytorch-fid is not installed),
'eigvals' (torch.linalg.eigvals of σ1σ2 in
float64 on the GPU, the torchmetrics route), 'dualdiff' (method auto: Cholesky + eigvalsh) and
'dualdiff-eigh' (the fallback for two singular sigmas). Target: dualdiff >= 50x faster than scipy.
Every variant gets one untimed warm-up round. Under plain ``pytest`` (smoke mode, see
benchmarks/conftest.py) each body runs once at D=32.
"""
from __future__ import annotations

import importlib.util
import os
import time
import warnings

import numpy as np
import pytest
import torch

from dualdiff.ops.frechet import frechet_distance, frechet_distance_reference
from dualdiff.testing import require

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
CPU_N, CPU_DIM = (100, 32) if SMOKE else (1500, 512)


def feature_stats(n: int, dim: int, seed: int, device="cpu", rank: int = 128):
    """Mean and float64 covariance of n synthetic non-negative 'activations' (see tests)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, dim, generator=g) / rank ** 0.5
    x = torch.relu(torch.randn(n, rank, generator=g) @ mix + 0.3 * torch.randn(n, dim, generator=g) + 0.2)
    xc = (x - x.mean(0)).double()
    return x.mean(0).double().to(device), ((xc.T @ xc) / (n - 1)).to(device)


def scipy_fid(mu1, s1, mu2, s2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(calculate_frechet_distance(*(t.cpu().numpy() for t in (mu1, s1, mu2, s2))))


def eigvals_fid(mu1, s1, mu2, s2) -> float:
    """torch.linalg.eigvals of the non-symmetric product (torchmetrics' route), float64."""
    ev = torch.linalg.eigvals(s1 @ s2)
    tr = ev.sqrt().real.sum()
    d = mu1 - mu2
    return float(d.dot(d) + s1.trace() + s2.trace() - 2 * tr)


# ----------------------------------------------------------------------------- CPU suite
@pytest.fixture(scope="module")
def cpu_stats():
    return feature_stats(CPU_N, CPU_DIM, 1) + feature_stats(CPU_N, CPU_DIM, 2)


@pytest.mark.benchmark(group=f"frechet-cpu-{CPU_DIM}")
def test_scipy_pytorch_fid(benchmark, cpu_stats):
    require("pytorch_fid")  # the optional reference row: a skip without it, a failure under CI=true
    benchmark.pedantic(scipy_fid, args=cpu_stats, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group=f"frechet-cpu-{CPU_DIM}")
def test_eigvals(benchmark, cpu_stats):
    benchmark.pedantic(eigvals_fid, args=cpu_stats, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group=f"frechet-cpu-{CPU_DIM}")
def test_dualdiff(benchmark, cpu_stats):
    value = benchmark.pedantic(frechet_distance, args=cpu_stats, rounds=5, iterations=1, warmup_rounds=1)
    assert value == pytest.approx(float(frechet_distance_reference(*cpu_stats)), rel=1e-6)


@pytest.mark.benchmark(group=f"frechet-cpu-{CPU_DIM}")
def test_dualdiff_eigh(benchmark, cpu_stats):
    benchmark.pedantic(lambda *a: frechet_distance(*a, method="eigh"), args=cpu_stats, rounds=5, iterations=1,
                       warmup_rounds=1)


# ----------------------------------------------------------------------------- GPU report
def _wall(fn, reps: int = 2) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6


def gpu_rows(timeit, device, smoke: bool = False):
    """Yields the rows at D=2048 (D=32 with smoke); the scipy row only with pytorch-fid installed.
    Accuracy is against pytorch-fid when present, else against frechet_distance_reference."""
    dim, n = (32, 100) if smoke else (2048, 10000)
    cpu = feature_stats(n, dim, 1) + feature_stats(n, dim, 2)
    gpu = tuple(t.to(device) for t in cpu)
    shape = f"D={dim} float64"
    scipy_us = None
    if importlib.util.find_spec("pytorch_fid") is not None:
        ref, ref_name = scipy_fid(*cpu), "pytorch-fid"
        scipy_us = _wall(lambda: scipy_fid(*cpu))
        yield {"op": "frechet_distance", "variant": "scipy", "shape": shape, "time_us": scipy_us,
               "bytes": None, "rel_err": 0.0, "note": "pytorch-fid on the CPU, wall clock"}
    else:
        ref, ref_name = float(frechet_distance_reference(*cpu)), "frechet_distance_reference"
    variants = {
        "eigvals": lambda: eigvals_fid(*gpu),
        "dualdiff": lambda: frechet_distance(*gpu),
        "dualdiff-eigh": lambda: frechet_distance(*gpu, method="eigh"),
    }
    for name, fn in variants.items():
        value = fn()
        t = timeit(fn, warmup=2, iters=10)
        rel = abs(value - ref) / abs(ref)
        yield {"op": "frechet_distance", "variant": name, "shape": shape, "time_us": t, "bytes": None,
               "rel_err": rel, "speedup_vs_scipy": scipy_us / t if scipy_us else None,
               "note": f"rel. err {rel:.1e} vs {ref_name}"
                       + (f"; {scipy_us / t:.1f}x scipy" if scipy_us else "")}


def main() -> None:
    """CPU timings at D=2048 (one call each): pytorch-fid's scipy route vs dualdiff."""
    stats = feature_stats(3000, 2048, 1) + feature_stats(3000, 2048, 2)
    t0 = time.perf_counter()
    ref = scipy_fid(*stats)
    t_scipy = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D=2048 float64")
    print(f"pytorch-fid (scipy sqrtm): {t_scipy:8.2f} s   value {ref:.10f}")
    for method in ("auto", "eigh"):
        t0 = time.perf_counter()
        val = frechet_distance(*stats, method=method)
        t = time.perf_counter() - t0
        print(f"dualdiff method={method:5s}:      {t:8.2f} s   value {val:.10f}  rel diff "
              f"{abs(val - ref) / abs(ref):.1e}  speedup {t_scipy / t:.1f}x")
    t0 = time.perf_counter()
    val = eigvals_fid(*stats)
    t = time.perf_counter() - t0
    print(f"torch eigvals(σ1σ2):         {t:8.2f} s   value {val:.10f}  rel diff {abs(val - ref) / abs(ref):.1e}")


if __name__ == "__main__":
    main()
