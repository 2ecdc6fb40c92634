"""``dualdiff toy2d``: train / evaluate / plot the toy2d grid (variants x datasets) at once.

    dualdiff toy2d run --datasets circle,dino,line,moons \\
        --variants baseline,fixed,adaptive,adaptive_deep --steps 10000 --out runs/toy2d \\
        [config.yaml] [key=value ...]          # any Toy2DConfig field, e.g. compile=true
    dualdiff toy2d plot --out runs/toy2d      # redraw the three plots from saved results

Wired into the main command by ``register_toy2d_commands(subparsers)``.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["register_toy2d_commands", "main"]


def _run(args: argparse.Namespace) -> int:
    import logging

    from dualdiff.config import ConfigError, apply_overrides, describe, load_config
    from dualdiff.experiments.toy2d import Toy2DConfig, run_grid

    if args.show_config:
        print(describe(Toy2DConfig))
        return 0
    files = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    if len(files) > 1:
        raise ConfigError(f"at most one YAML config file, got {files}")
    cfg = load_config(Toy2DConfig, files[0] if files else None)
    flags = {}
    if args.datasets is not None:
        flags["datasets"] = args.datasets
    if args.variants is not None:
        flags["variants"] = args.variants
    if args.steps is not None:
        flags["steps"] = args.steps
    if args.device is not None:
        flags["device"] = args.device
    if args.seed is not None:
        flags["seed"] = args.seed
    if args.compile:
        flags["compile"] = True
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    for k, v in flags.items():  # explicit flags win over key=value overrides
        setattr(cfg, k, v)
    cfg.validate()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    res = run_grid(None, None, cfg, args.out, resume=args.resume)
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
    from dualdiff.analysis.toy2d_plots import plot_all
    from dualdiff.experiments.toy2d import load_results

    paths = plot_all(load_results(args.out), args.out)
    for name, p in paths.items():
        print(f"{name}: {p if p is not None else '(no adaptive variant: not drawn)'}")
    return 0


def register_toy2d_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``toy2d run`` and ``toy2d plot`` to an ``argparse`` subparsers object."""
    toy = subparsers.add_parser(
        "toy2d", help="2-D toy diffusion grid: every (variant, dataset) run trained at once",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = toy.add_subparsers(dest="toy2d_command", required=True)
    run = sub.add_parser(
        "run", help="train, evaluate and plot the grid",
        description="Train every (variant, dataset) pair together (stacked models, one training "
                    "step advances every run), then evaluate eval loss, KL divergence and "
                    "sampling time, and write final_info.json per run, all_results.{json,npz} "
                    "and train_loss.png / generated_images.png / weight_evolution.png.")
    run.add_argument("--datasets", help="comma-separated subset of circle,dino,line,moons "
                                        "(default: all)")
    run.add_argument("--variants", help="comma-separated subset of baseline,fixed,adaptive,"
                                        "adaptive_deep (default: all)")
    run.add_argument("--steps", type=int, help="training steps per run (default 10000)")
    run.add_argument("--out", default="runs/toy2d", help="output folder (default runs/toy2d)")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--seed", type=int, help="seed of inits, batches and sampling (default 0)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the grid's training step (add compile_mode="
                          "reduce-overhead for CUDA graphs)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest grid checkpoint in OUT/train/checkpoints "
                          "(training already finished: evaluate only)")
    run.add_argument("--show-config", action="store_true",
                     help="list every config key with its type and default, then exit")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="Toy2DConfig overrides (e.g. n_train=20000 lr=1e-3 "
                          "datasaurus_path=DatasaurusDozen.tsv) or one YAML config file")
    run.set_defaults(func=_run)
    plot = sub.add_parser("plot", help="redraw the plots from a finished grid's results")
    plot.add_argument("--out", default="runs/toy2d", help="the grid's output folder")
    plot.set_defaults(func=_plot)
    return toy


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m dualdiff.cli_toy2d toy2d run ...``)."""
    parser = argparse.ArgumentParser(prog="dualdiff")
    register_toy2d_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
