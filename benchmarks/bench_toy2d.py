"""toy2d: the stacked grid (one Trainer step advances all 16 runs) against the template's own
loop, which trains the runs one model at a time.

The baseline is the loop of SakanaAI/AI-Scientist ``templates/2d_diffusion/experiment.py``,
written out here (:func:`template_train`): per step a DataLoader batch (``shuffle=True``),
fresh noise and t on the CPU moved to the device, ``add_noise``, forward, MSE, backward,
``clip_grad_norm_(0.5)``, AdamW, ``zero_grad``, an EMA update (every 10 steps, a copy during the
first 100), the cosine scheduler and ``loss.item()``; eager, fp32, one model at a time. Both
sides train every run for the same number of steps (no extrapolation), with the same sizes and
the same initial weights, after the same warm-up (every run of either side first trains
``WARMUP_STEPS`` steps, untimed).

    python benchmarks/bench_toy2d.py [--steps 300] [--size small|template] [--threads 1]
        CPU: grid vs template loop side by side (training only), with the ratio
    pytest benchmarks/bench_toy2d.py --benchmark-only
        pytest-benchmark: the 16-run grid vs the template loop over the 16 runs (tiny sizes)
    gpu_rows(timeit, device, smoke=False)   (benchmarks/gpu_report.py, on CUDA)
        the full 4 x 4 grid at the template's sizes: per mode (eager, torch.compile,
        + CUDA graphs, + batched clipping) the whole 10 000-step training's wall time and the
        steady-state step; and the template loop's step summed over the 16 runs ("eager", the
        baseline of the step rows), each run timed over TEMPLATE_GPU_STEPS steps.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dualdiff.config import apply_overrides
from dualdiff.experiments.toy2d import (Toy2DConfig, build_run_model, grid_runs, load_datasets,
                                        make_toy_schedule, train_grid)

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
SIZES = {"tiny": dict(embedding_dim=16, hidden_dim=32, hidden_layers=1),
         "small": dict(embedding_dim=32, hidden_dim=64, hidden_layers=2),
         "template": dict(embedding_dim=128, hidden_dim=256, hidden_layers=3)}
WARMUP_STEPS = 10
TEMPLATE_GPU_STEPS = 500


def bench_config(steps: int, size: str = "template", device: str = "cpu", **overrides) -> Toy2DConfig:
    """The template's config with ``steps`` steps, ``SIZES[size]``, no checkpoints or progress;
    ``overrides``: dotted keys (``"train.batch_size": 64``)."""
    base = {"train.steps": steps, "train.device": device, "train.progress": False,
            "train.log_every": max(steps, 1), "train.checkpoint_every": 0,
            "train.save_final": False, "data.chunk_steps": min(100, steps),
            **{f"model.{k}": v for k, v in SIZES[size].items()}}
    return apply_overrides(Toy2DConfig(), {**base, **overrides})


# ---------------------------------------------------------------------------------------------
# the template's loop (the baseline)
# ---------------------------------------------------------------------------------------------
def template_train(model: nn.Module, data: torch.Tensor, config: Toy2DConfig,
                   device: torch.device, steps: int) -> list[float]:
    """Train ``model`` alone for ``steps`` steps the template's way (module docstring);
    returns the per-step losses (read with ``.item()`` every step, as the template does)."""
    model.to(device).train()
    loader = DataLoader(TensorDataset(data), batch_size=config.train.batch_size, shuffle=True)
    ac = make_toy_schedule(config).alphas_cumprod.float()
    sqrt_ac, sqrt_1m_ac = ac.sqrt().to(device), (1 - ac).sqrt().to(device)
    T = config.num_timesteps
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)  # weight decay 0.01
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    decay, every, after = config.train.ema_decay, config.train.ema_every, config.train.ema_warmup
    losses: list[float] = []
    step = 0
    while step < steps:
        for (batch,) in loader:
            if step >= steps:
                break
            batch = batch.to(device)
            noise = torch.randn(batch.shape).to(device)
            t = torch.randint(0, T, (batch.shape[0],)).long().to(device)
            noisy = sqrt_ac[t].reshape(-1, 1) * batch + sqrt_1m_ac[t].reshape(-1, 1) * noise
            loss = F.mse_loss(model(noisy, t), noise)
            loss.backward()
            nn.utils.clip_grad_norm_(params, config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            if (step + 1) % every == 0:  # ema_pytorch: update_every=10, update_after_step=100
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        if step < after:
                            e.copy_(p)
                        else:
                            e.lerp_(p, 1 - decay)
            scheduler.step()
            losses.append(loss.detach().item())
            step += 1
    return losses


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def template_runs(config: Toy2DConfig, data: dict, device: torch.device, steps: int
                  ) -> dict[str, float]:
    """Every run of the grid trained alone with :func:`template_train`, one after the other,
    each from the grid's initial weights: ``{"v/d": seconds}``."""
    out = {}
    for v, d in grid_runs(config):
        model = build_run_model(v, d, config)
        _sync(device)
        t0 = time.perf_counter()
        template_train(model, data[d], config, device, steps)
        _sync(device)
        out[f"{v}/{d}"] = time.perf_counter() - t0
    return out


def grid_vs_template(steps: int = 300, size: str = "small", device: str = "cpu",
                     **overrides) -> dict:
    """Wall times (s) of the grid and of the template loop over the same runs and steps, each
    after the same warm-up (every run trains ``WARMUP_STEPS`` steps first, untimed)."""
    dev = torch.device(device)
    cfg = bench_config(steps, size, device, **overrides)
    warm = bench_config(WARMUP_STEPS, size, device, **overrides)
    data = load_datasets(cfg)
    runs = grid_runs(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        train_grid(runs, data, warm, pathlib.Path(tmp) / "warm")
        template_runs(warm, data, dev, WARMUP_STEPS)
        grid = train_grid(runs, data, cfg, pathlib.Path(tmp) / "grid")
    per_run = template_runs(cfg, data, dev, steps)
    return {"runs": len(runs), "steps": steps, "size": size, "grid_s": grid.seconds,
            "template_s": sum(per_run.values()), "template_per_run_s": per_run}


# ---------------------------------------------------------------------------------------------
# pytest-benchmark (CPU; tiny sizes, 20 steps; 5 under smoke)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = bench_config(5 if SMOKE else 20, "tiny", **{"data.n_train": 2000,
                                                     "train.batch_size": 64})
    yield cfg, grid_runs(cfg), load_datasets(cfg)
    torch.set_num_threads(n)


def test_grid_16_runs(benchmark, tiny, tmp_path):
    cfg, runs, data = tiny
    train_grid(runs, data, cfg, tmp_path / "warm")  # the same warm-up as the template side
    benchmark.pedantic(lambda: train_grid(runs, data, cfg, tmp_path), rounds=3, iterations=1)


def test_sequential_16_runs(benchmark, tiny):
    """The template's loop over the 16 runs, one model at a time."""
    cfg, _, data = tiny
    template_runs(cfg, data, torch.device("cpu"), cfg.train.steps)  # warm-up
    benchmark.pedantic(lambda: template_runs(cfg, data, torch.device("cpu"), cfg.train.steps),
                       rounds=3, iterations=1)


# ---------------------------------------------------------------------------------------------
# GPU rows
# ---------------------------------------------------------------------------------------------
GPU_MODES = {
    "eager": {"train.compile": False},
    "compile": {"train.compile": True},
    "compile+cudagraphs": {"train.compile": True,
                           "train.compile_kwargs": {"mode": "reduce-overhead"}},
    "compile+cudagraphs+batched_clip": {"train.compile": True,
                                        "train.compile_kwargs": {"mode": "reduce-overhead"},
                                        "clip_mode": "batched"},
}


def gpu_rows(timeit, device, smoke: bool = False, steps: int = 10_000, modes=tuple(GPU_MODES)):
    """Rows for gpu_report.py (module docstring); ``smoke``: tiny sizes and a few steps."""
    device = torch.device(device)
    size = "tiny" if smoke else "template"
    steps = 4 if smoke else steps
    template_steps = 4 if smoke else TEMPLATE_GPU_STEPS
    cfg0 = bench_config(steps, size, str(device))
    data = load_datasets(cfg0)
    runs = grid_runs(cfg0)
    shape = f"4x4 grid, {steps} steps, B=256, {SIZES[size]}"
    step_shape = f"16 runs, B=256, {SIZES[size]}"
    # the baseline: the template's loop, every run alone, warmed like the grid
    template_runs(bench_config(WARMUP_STEPS, size, str(device)), data, device, WARMUP_STEPS)
    per_run = template_runs(bench_config(template_steps, size, str(device)), data, device,
                            template_steps)
    yield {"op": "toy2d_step", "variant": "eager", "shape": step_shape,
           "time_us": sum(per_run.values()) / template_steps * 1e6, "bytes": None,
           "note": f"template loop, 16 runs one after another, {template_steps} steps each"}
    for name in modes:
        overrides = GPU_MODES[name]
        if smoke and device.type != "cuda" and name != "eager":
            continue  # compile on the CPU would take minutes; the code path is the eager one
        cfg = bench_config(steps, size, str(device), **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            train_grid(runs, data, bench_config(WARMUP_STEPS, size, str(device), **overrides),
                       pathlib.Path(tmp) / "warm")
            _sync(device)
            t0 = time.perf_counter()
            tr = train_grid(runs, data, cfg, pathlib.Path(tmp) / "run")
            wall = time.perf_counter() - t0
            yield {"op": "toy2d_grid_train", "variant": name, "shape": shape,
                   "time_us": tr.seconds * 1e6, "bytes": None,
                   "note": f"first {cfg.warmup_steps_timed} steps {tr.first_steps_seconds:.2f}"
                           f" s; with setup {wall:.2f} s"}
            trainer = tr.trainer
            trainer.config.steps = trainer.step + 10_000  # room for timed extra steps
            yield {"op": "toy2d_step", "variant": f"grid {name}", "shape": step_shape,
                   "time_us": timeit(trainer.train_step, warmup=5, iters=50), "bytes": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = grid_vs_template(args.steps, args.size, "cpu", **{"train.batch_size": args.batch_size})
    n, s = r["runs"], r["steps"]
    print(f"CPU ({args.threads} thread(s)), {n} runs x {s} steps each, sizes {args.size} "
          f"{SIZES[args.size]}, batch {args.batch_size}; warm-up {WARMUP_STEPS} steps per run "
          "on both sides")
    print("| mode | wall time (s) | run-steps/s | vs template loop |")
    print("|---|---|---|---|")
    for name, sec in (("template loop, one run at a time (eager)", r["template_s"]),
                      ("grid (stacked, one Trainer)", r["grid_s"])):
        print(f"| {name} | {sec:.2f} | {n * s / sec:.0f} | {r['template_s'] / sec:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
