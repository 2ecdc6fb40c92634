"""``dualdiff toy2d``: train / evaluate / plot the toy2d grid (variants x datasets) at once.

    dualdiff toy2d run [--out-dir runs/toy2d] [--config FILE.yaml] [--resume [auto|latest|PATH]]
        [--device DEV] [--show-config] [key=value ...]
        e.g. dualdiff toy2d run datasets=circle,dino variants=baseline,adaptive train.steps=10000
             dualdiff toy2d run preset=tiny --out-dir runs/toy2d-tiny
    dualdiff toy2d plot [--out-dir runs/toy2d]     # redraw the three plots from saved results
    dualdiff toy2d demo [--out-dir runs/toy2d-demo] [key=value ...]   # ~1.5 CPU minutes: demo.png, demo.md

Keys are :class:`dualdiff.experiments.toy2d.Toy2DConfig`'s (``--show-config`` lists them all).
Wired into the main command by ``register_toy2d_commands(subparsers)``.
"""
from __future__ import annotations

import argparse
import logging
import time

__all__ = ["register_toy2d_commands"]

DEFAULT_OUT_DIR = "runs/toy2d"


def _run(args: argparse.Namespace) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.toy2d import run_grid

    cfg = config_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    res = run_grid(cfg)  # --out-dir / --resume folded into train.out_dir / train.resume
    t = res["timing"]
    if t["resumed_from_step"]:
        print(f"resumed at step {t['resumed_from_step']}: the time below covers the rest")
    print(f"grid of {t['grid_runs']} runs, {t['steps']} steps on {t['device_name']}: "
          f"{t['grid_training_time']:.2f} s training "
          f"({t['training_time_per_run']:.2f} s per run; first {t['grid_first_steps']} steps "
          f"{t['grid_first_steps_time']:.2f} s)")
    print(f"{'run':28s} {'eval_loss':>10s} {'kl':>8s} {'infer (s)':>10s}")
    for name, info in res["runs"].items():
        kl = info["kl_divergence"]
        print(f"{name:28s} {info['eval_loss']:10.4f} "
              f"{(f'{kl:8.3f}' if kl is not None else '     nan')} {info['inference_time']:10.3f}")
    print(f"results in {res['out_dir']}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from dualdiff.experiments.toy2d import plot_results

    for name, p in plot_results(args.out_dir).items():
        print(f"{name}: {p if p is not None else '(no adaptive variant: not drawn)'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.toy2d import demo_toy2d

    cfg = config_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    t0 = time.perf_counter()
    res = demo_toy2d(cfg)
    print(res["markdown"])
    print(f"{time.perf_counter() - t0:.1f} s; figure: {res['figure']}; report: {res['report']}; "
          f"results in {res['out_dir']}")
    return 0


def register_toy2d_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``toy2d run``, ``toy2d plot``, ``toy2d demo`` and ``toy2d study`` to an
    ``argparse`` subparsers object."""
    from dualdiff.cli_common import add_run_options
    from dualdiff.experiments.toy2d import TOY2D_PRESETS, Toy2DConfig

    toy = subparsers.add_parser(
        "toy2d", help="2-D toy diffusion grid: every (variant, dataset) run trained at once",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = toy.add_subparsers(dest="toy2d_command", required=True)
    run = sub.add_parser(
        "run", help="train, evaluate and plot the grid",
        description="Train every (variant, dataset) pair together (stacked models, one training "
                    "step advances every run), then evaluate eval loss, KL divergence and "
                    "sampling time, and write final_info.json per run, all_results.{json,npz} "
                    "and train_loss.png / generated_images.png / weight_evolution.png. "
                    "Example: dualdiff toy2d run datasets=circle,dino train.steps=10000")
    add_run_options(run, Toy2DConfig, presets=TOY2D_PRESETS, default_preset="default", out_dir="run")
    run.set_defaults(func=_run)
    plot = sub.add_parser("plot", help="redraw the plots from a finished grid's results")
    plot.add_argument("--out-dir", default=DEFAULT_OUT_DIR, metavar="DIR",
                      help=f"the grid's output folder (default {DEFAULT_OUT_DIR})")
    plot.set_defaults(func=_plot)
    demo = sub.add_parser(
        "demo", help="a small grid end to end on the CPU (~1.5 minutes): demo.png, demo.md",
        description="Train the demo preset's grid (4 variants x 4 datasets, 2000 steps; "
                    "preset=tiny for seconds), write the usual outputs, then demo.png (per "
                    "dataset the data beside each variant's samples, KL in every panel's title, "
                    "adaptive vs baseline in the figure's) and demo.md (one seed: differences "
                    "are within noise; dualdiff toy2d study gives intervals). "
                    "Example: dualdiff toy2d demo --out-dir runs/toy2d-demo")
    add_run_options(demo, Toy2DConfig, presets=TOY2D_PRESETS, default_preset="demo", out_dir="run",
                    resume=False)
    demo.set_defaults(func=_demo)
    from dualdiff.experiments.toy2d_study import register_toy2d_study  # dualdiff toy2d study
    register_toy2d_study(sub)
    return toy
