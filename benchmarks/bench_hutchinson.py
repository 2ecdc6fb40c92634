"""Benchmarks for dualdiff.ops.hutchinson_vhv: batched probes vs the per-probe jvp loop.

CPU (pytest-benchmark, small shapes):  pytest benchmarks/bench_hutchinson.py --benchmark-only
GPU: ``gpu_rows`` (used by benchmarks/gpu_report.py): a small UNet (GroupNorm, attention at
16x16) at 64x64, batch 16, 8 probes. Variants: 'eager' = per-probe loop, eager (the
baseline: hutchinson_vhv_reference); 'batched' = all probes in one eager jvp;
'compile-loop' = per-probe jvp of the torch.compile'd model (chunk_size=1);
'compile' = all probes in one compiled jvp (the design). Every variant gets one untimed call
first (compilation for the compiled ones). Under plain ``pytest`` (smoke mode, see
benchmarks/conftest.py) each body runs once on a tiny case.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.nn import GroupNorm, SelfAttention2d
from dualdiff.ops.hutchinson import hutchinson_vhv, hutchinson_vhv_reference, rademacher_probes


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__()
        self.n1 = GroupNorm(groups, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.n2 = GroupNorm(groups, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class SmallUNet(nn.Module):
    """64x64 -> 32 -> 16 (attention) -> 32 -> 64, skip connections; ch channels at the top."""

    def __init__(self, ch: int = 32, heads: int = 4, groups: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.e1 = ResBlock(ch, ch, groups)
        self.d1 = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.e2 = ResBlock(2 * ch, 2 * ch, groups)
        self.d2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * ch, 2 * ch, groups)
        self.attn = SelfAttention2d(2 * ch, heads, norm_groups=groups)
        self.u2 = nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1)
        self.dec2 = ResBlock(4 * ch, 2 * ch, groups)
        self.u1 = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1)
        self.dec1 = ResBlock(2 * ch, ch, groups)
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x):
        h1 = self.e1(self.inp(x))
        h2 = self.e2(self.d1(h1))
        m = self.attn(self.mid(self.d2(h2)))
        y = self.dec2(torch.cat([self.u2(m), h2], 1))
        y = self.dec1(torch.cat([self.u1(y), h1], 1))
        return self.out(y)


def _setup(device, *, batch, size, probes, ch):
    torch.manual_seed(0)
    model = SmallUNet(ch=ch).to(device).eval()
    z = torch.randn(batch, 3, size, size, device=device)
    eps = rademacher_probes(probes, z, torch.Generator(device=device).manual_seed(0))
    return model, z, eps


# ----------------------------------------------------------------------------- CPU suite
SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
SMOKE_CFG = dict(batch=1, size=8, probes=2, ch=8)
CPU_CFG = SMOKE_CFG if SMOKE else dict(batch=2, size=16, probes=4, ch=16)


@pytest.fixture(scope="module")
def cpu_case():
    return _setup("cpu", **CPU_CFG)


@pytest.mark.benchmark(group="hutchinson-cpu")
def test_loop_eager(benchmark, cpu_case):
    model, z, eps = cpu_case
    with torch.no_grad():
        hutchinson_vhv_reference(model, z, eps)  # warm-up, like every variant
        benchmark(hutchinson_vhv_reference, model, z, eps)


@pytest.mark.benchmark(group="hutchinson-cpu")
def test_batched_eager(benchmark, cpu_case):
    model, z, eps = cpu_case
    with torch.no_grad():
        hutchinson_vhv(model, z, probes=None, eps=eps)  # warm-up, like every variant
        benchmark(lambda: hutchinson_vhv(model, z, probes=None, eps=eps))


@pytest.mark.benchmark(group="hutchinson-cpu")
def test_loop_compiled(benchmark, cpu_case):
    model, z, eps = cpu_case
    compiled = torch.compile(model)
    with torch.no_grad():
        hutchinson_vhv(compiled, z, probes=None, eps=eps, chunk_size=1)  # compile outside timing
        benchmark(lambda: hutchinson_vhv(compiled, z, probes=None, eps=eps, chunk_size=1))


@pytest.mark.benchmark(group="hutchinson-cpu")
def test_batched_compiled(benchmark, cpu_case):
    model, z, eps = cpu_case
    compiled = torch.compile(model)
    with torch.no_grad():
        hutchinson_vhv(compiled, z, probes=None, eps=eps)
        benchmark(lambda: hutchinson_vhv(compiled, z, probes=None, eps=eps))


# ----------------------------------------------------------------------------- GPU report
def gpu_rows(timeit, device, smoke: bool = False):
    """Yields one row per variant: B=16, 64x64, 8 probes, ch=64 (the tiny case with smoke)."""
    device = torch.device(device)
    cfg = SMOKE_CFG if smoke else dict(batch=16, size=64, probes=8, ch=64)
    batch, size, probes = cfg["batch"], cfg["size"], cfg["probes"]
    model, z, eps = _setup(device, **cfg)
    shape = f"B={batch} 3x{size}x{size} probes={probes}"
    compiled = torch.compile(model)
    variants = {
        "eager": lambda: hutchinson_vhv_reference(model, z, eps),
        "batched": lambda: hutchinson_vhv(model, z, probes=None, eps=eps),
        "compile-loop": lambda: hutchinson_vhv(compiled, z, probes=None, eps=eps, chunk_size=1),
        "compile": lambda: hutchinson_vhv(compiled, z, probes=None, eps=eps),
    }
    with torch.no_grad():
        ref = variants["eager"]()
        for name, fn in variants.items():
            if smoke and device.type == "cpu" and name.startswith("compile"):
                continue  # CPU compilation of the jvp takes minutes: not for a smoke run
            out = fn()  # compiles outside the timing
            rel = float(((out - ref).abs() / ref.abs()).max())
            t = timeit(fn, warmup=3, iters=10)
            yield {"op": "hutchinson_vhv", "variant": name, "shape": shape, "time_us": t,
                   "bytes": None, "max_rel_diff_vs_loop": rel, "note": f"max rel. diff vs loop {rel:.1e}"}
