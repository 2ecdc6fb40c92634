"""The C++ CPU kernels with several threads, near the grain of csrc/cpu_parallel.h: cpp vs the
plain-PyTorch reference, forward + backward, side by side, on an idle or an oversubscribed CPU.

    python benchmarks/bench_cpu_threads.py [--threads 2] [--rounds 11] [--load 0]
        [--sizes 64,512,4096,16384,32768,65536,262144] [--json out.json]

For each op (``weighted_dice_loss``, sigmoid + squared_pred on [2, 4, numel/8] with a [2, 4]
weight; ``vae_loss``, BCE on [4, numel/4] with a [4, 32] latent) and size, the two backends
alternate for ``--rounds`` rounds (cpp torch, then torch cpp, ...), each timing as many calls as
make ~0.2 M elements; the row gives the median of t_torch / t_cpp over rounds (>= 1: the kernel
is faster) with its min and max. ``--load N`` keeps N busy-loop processes running during the
measurement: with ``N + threads`` > cores an OpenMP region waits for descheduled threads, which
is what the grain rule (no OpenMP region below 32,768 elements) is for.

Under plain ``pytest`` (smoke mode, benchmarks/conftest.py) :func:`test_cpu_threads_smoke` runs
two sizes once each.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from dualdiff.ops.vae import vae_loss
from dualdiff.ops.weighted_dice import weighted_dice_loss

BACKENDS = ("cpp", "torch")
SIZES = (64, 512, 4096, 16384, 32768, 65536, 262144)


def dice_step(numel: int) -> Callable[[str], None]:
    """Forward + backward of the Dice loss on about ``numel`` elements, for a given backend."""
    gen = torch.Generator().manual_seed(0)
    S = max(numel // 8, 1)
    x = torch.randn(2, 4, S, generator=gen, requires_grad=True)
    g = (torch.rand(2, 4, S, generator=gen) > 0.5).float()
    w = torch.ones(2, 4)

    def step(backend: str) -> None:
        weighted_dice_loss(x, g, w, activation="sigmoid", squared_pred=True,
                           backend=backend).backward()
    return step


def vae_step(numel: int) -> Callable[[str], None]:
    """Forward + backward of the VAE loss (BCE, [4, numel/4] image, [4, 32] latent)."""
    gen = torch.Generator().manual_seed(0)
    n = max(numel // 4, 1)
    logits = torch.randn(4, n, generator=gen, requires_grad=True)
    target = torch.rand(4, n, generator=gen)
    mu = torch.randn(4, 32, generator=gen, requires_grad=True)
    logvar = torch.randn(4, 32, generator=gen, requires_grad=True)

    def step(backend: str) -> None:
        vae_loss(logits, target, mu, logvar, backend=backend)[0].backward()
    return step


OPS = {"weighted_dice_loss": dice_step, "vae_loss": vae_step}


def _busy() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_load(n: int) -> Iterator[None]:
    """``n`` busy-loop processes for the duration of the block."""
    procs = [mp.get_context("spawn").Process(target=_busy, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()


def measure(op: str, numel: int, rounds: int) -> dict:
    """One row: median / min / max over rounds of t_torch / t_cpp for ``op`` at ``numel``."""
    step = OPS[op](numel)
    calls = max(3, 200_000 // max(numel, 1000))

    def timed(backend: str) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            step(backend)
        return (time.perf_counter() - t0) / calls

    for b in BACKENDS:  # warm-up
        timed(b)
    ratios, cpp_s = [], []
    for r in range(rounds):
        t = {b: timed(b) for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1])}
        ratios.append(t["torch"] / t["cpp"])
        cpp_s.append(t["cpp"])
    return {"op": op, "numel": numel, "calls": calls, "rounds": rounds,
            "cpp_us": statistics.median(cpp_s) * 1e6, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes alongside (default 0)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    from dualdiff._backend import backend_status, extension

    ok, why = backend_status("cpp", "cpu")
    if not ok:
        print(f"bench_cpu_threads: the cpp backend is not usable: {why}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    ext = extension()
    print(f"{os.cpu_count()} CPUs, {args.threads} threads (OpenMP max {ext.openmp_max_threads()}), "
          f"{args.load} busy processes, grain {ext.cpu_grain_elements} elements, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    with busy_load(args.load):
        for op in OPS:
            for numel in (int(s) for s in args.sizes.split(",")):
                row = measure(op, numel, args.rounds)
                row["cpp_threads"] = ext.cpu_threads_for(numel)
                rows.append(row)
                print(f"{op:>18} {numel:>7}: cpp {row['cpp_us']:8.1f} us ({row['cpp_threads']} thr), "
                      f"torch/cpp median {row['ratio_median']:.2f}x "
                      f"[{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "load": args.load, "rows": rows}, f, indent=2)
    return 0


def test_cpu_threads_smoke(tmp_path):
    from dualdiff.testing import require_backend

    require_backend("cpp")
    before = torch.get_num_threads()
    try:
        out = tmp_path / "rows.json"
        assert main(["--threads", "2", "--rounds", "1", "--sizes", "64,40000",
                     "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["numel"]) for r in rows] == [(op, n) for op in OPS for n in (64, 40000)]
    assert all(r["ratio_median"] > 0 and r["cpp_us"] > 0 for r in rows)
    assert [r["cpp_threads"] for r in rows if r["numel"] == 64] == [1, 1]


if __name__ == "__main__":
    sys.exit(main())
