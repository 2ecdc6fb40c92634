"""toy2d: the stacked grid (every run advanced by one training step) against the runs trained one
after another, through the same Trainer, same steps and seeds.

    python benchmarks/bench_toy2d.py [--steps 200] [--size small|template] [--threads 1]
        CPU: grid time vs sequential time side by side (training only, no evaluation)
    pytest benchmarks/bench_toy2d.py --benchmark-only
        pytest-benchmark: 20 grid steps vs 20 steps of each run alone (tiny sizes)
    gpu_rows(timeit, device)   (benchmarks/gpu_report.py, on CUDA)
        the full 4 x 4 grid at the template's sizes, 10 000 steps (target < 30 s on an H100):
        one row per mode (eager, torch.compile, torch.compile + CUDA graphs), time_us = the
        whole run's wall time, plus a steady-state per-step row and the one-run-alone estimate.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import pytest
import torch

from dualdiff.experiments.toy2d import (Toy2DConfig, load_datasets, train_grid,
                                        train_sequential)
from dualdiff.models.toy2d import VARIANTS

DATASETS = ["circle", "dino", "line", "moons"]
SHARED_TSV = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "DatasaurusDozen.tsv"
SIZES = {"small": dict(embedding_dim=32, hidden_dim=64, hidden_layers=2),
         "template": dict(embedding_dim=128, hidden_dim=256, hidden_layers=3)}


def bench_config(steps: int, size: str = "template", device: str = "cpu", **kw) -> Toy2DConfig:
    tsv = str(SHARED_TSV) if SHARED_TSV.is_file() else None
    base = dict(steps=steps, device=device, progress=False, log_every=max(steps, 1), checkpoint_every=0,
                datasaurus_path=tsv, chunk_steps=min(100, steps), **SIZES[size])
    base.update(kw)
    return Toy2DConfig(**base)


def grid_vs_sequential(steps: int = 200, size: str = "small", device: str = "cpu",
                       datasets=DATASETS, variants=VARIANTS, **kw) -> dict:
    """Train the grid and the same runs one by one; return the two wall times (s)."""
    cfg = bench_config(steps, size, device, **kw)
    runs = [(v, d) for v in variants for d in datasets]
    data = load_datasets(datasets, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (first-call costs of vmap / allocator) outside the timings
        warm = bench_config(2, size, device, **kw)
        train_grid(runs[:1], data, warm, pathlib.Path(tmp) / "w")
        train_sequential(runs[:1], data, warm, pathlib.Path(tmp) / "w1")
        grid = train_grid(runs, data, cfg, pathlib.Path(tmp) / "grid")
        seq = train_sequential(runs, data, cfg, pathlib.Path(tmp) / "seq")
    per_run = {f"{v}/{d}": s["seconds"] for (v, d), s in zip(runs, seq)}
    return {"runs": len(runs), "steps": steps, "size": size, "grid_s": grid.seconds,
            "sequential_s": sum(per_run.values()), "sequential_per_run_s": per_run}


# ---------------------------------------------------------------------------------------------
# pytest-benchmark (CPU, tiny)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = bench_config(20, "small", n_train=2000, batch_size=64, embedding_dim=16, hidden_dim=32,
                       hidden_layers=1)
    runs = [(v, d) for v in VARIANTS for d in DATASETS]
    yield cfg, runs, load_datasets(DATASETS, cfg)
    torch.set_num_threads(n)


def test_grid_16_runs(benchmark, tiny, tmp_path):
    cfg, runs, data = tiny
    benchmark.pedantic(lambda: train_grid(runs, data, cfg, tmp_path), rounds=3, iterations=1)


def test_sequential_16_runs(benchmark, tiny, tmp_path):
    cfg, runs, data = tiny
    benchmark.pedantic(lambda: train_sequential(runs, data, cfg, tmp_path), rounds=3,
                       iterations=1)


# ---------------------------------------------------------------------------------------------
# GPU rows
# ---------------------------------------------------------------------------------------------
GPU_MODES = {
    "eager": dict(compile=False),
    "compile": dict(compile=True),
    "compile+cudagraphs": dict(compile=True, compile_mode="reduce-overhead"),
    "compile+cudagraphs+batched_clip": dict(compile=True, compile_mode="reduce-overhead",
                                            clip_mode="batched"),
}


def gpu_rows(timeit, device, steps: int = 10_000, modes=tuple(GPU_MODES)) -> list[dict]:
    """The full grid (4 variants x 4 datasets, template sizes) on ``device``: per mode the whole
    training's wall time (one run: 10 000 steps, compile/graph warm-up included) and its
    steady-state step time (``timeit`` over extra Trainer steps of the trained grid). Plus one
    run alone (baseline on circle) per step, for the 16-runs-one-by-one estimate."""
    device = torch.device(device)
    rows = []
    runs = [(v, d) for v in VARIANTS for d in DATASETS]
    cfg0 = bench_config(steps, "template", str(device))
    data = load_datasets(DATASETS, cfg0)
    shape = f"4x4 grid, {steps} steps, B=256, E=128 H=256 L=3"
    for name in modes:
        cfg = bench_config(steps, "template", str(device), **GPU_MODES[name])
        with tempfile.TemporaryDirectory() as tmp:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            tr = train_grid(runs, data, cfg, tmp)
            wall = time.perf_counter() - t0
            rows.append({"op": "toy2d_grid_train", "variant": name, "shape": shape,
                         "time_us": tr.seconds * 1e6, "bytes": None,
                         "note": f"first {cfg.warmup_steps_timed} steps {tr.first_steps_seconds:.2f}"
                                 f" s; with setup {wall:.2f} s"})
            trainer = tr.trainer
            trainer.config.steps = trainer.step + 10_000  # room for timed extra steps
            rows.append({"op": "toy2d_grid_step", "variant": name, "shape": "16 runs, B=256",
                         "time_us": timeit(trainer.train_step, warmup=5, iters=50),
                         "bytes": None})
    # one run alone, eager, per step: x 16 runs x steps = the template's one-by-one cost
    single = min(200, steps)
    with tempfile.TemporaryDirectory() as tmp:
        seq = train_sequential([("baseline", "circle")], data,
                               bench_config(single, "template", str(device)), tmp)
    rows.append({"op": "toy2d_single_run_step", "variant": "eager", "shape": "1 run, B=256",
                 "time_us": seq[0]["seconds"] / single * 1e6, "bytes": None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = grid_vs_sequential(args.steps, args.size, "cpu", batch_size=args.batch_size)
    print(f"CPU ({args.threads} thread(s)), {r['runs']} runs x {r['steps']} steps, sizes "
          f"{args.size} {SIZES[args.size]}, batch {args.batch_size}")
    print(f"| mode | wall time (s) | per step (ms) |")
    print(f"|---|---|---|")
    print(f"| grid (stacked, one Trainer) | {r['grid_s']:.2f} | "
          f"{1e3 * r['grid_s'] / r['steps']:.2f} |")
    print(f"| 16 runs one after another | {r['sequential_s']:.2f} | "
          f"{1e3 * r['sequential_s'] / r['steps']:.2f} |")
    print(f"sequential / grid = {r['sequential_s'] / r['grid_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
