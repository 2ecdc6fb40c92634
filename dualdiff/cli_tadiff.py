"""``dualdiff tadiff ...``: make-data, train, sweep, eval, plot, demo.

Every command but ``plot`` takes ``key=value`` overrides of
:class:`dualdiff.experiments.tadiff.TaDiffConfig` (``preset=tiny|default``, ``--config``
YAML); ``eval`` applies them to the config stored in the checkpoint. ``sweep`` trains the
schedules of the config key ``schedules`` (``schedules=fixed,power,cosine,step,learnable``; a
key rather than a flag, so there is one way to set it).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

__all__ = ["register_tadiff_commands"]


def _user_errors(fn):
    """Data-layout errors (:class:`TaDiffDataError`) are the user's: report them as UserError."""
    @functools.wraps(fn)
    def run(args):
        from dualdiff.errors import UserError
        from dualdiff.data.tadiff_io import TaDiffDataError

        try:
            return fn(args)
        except TaDiffDataError as e:
            raise UserError(str(e)) from e
    return run


@_user_errors
def _make_data(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import make_data

    cfg = config_from_args(args)
    if cfg.data.source != "procedural":
        from dualdiff.config import ConfigError
        raise ConfigError("make-data writes procedural patients; data.source must be 'procedural'")
    path = make_data(cfg, cfg.data.path or args.out_dir)
    print(f"wrote {cfg.data.num_patients} procedural patients ({cfg.model.image_size}x"
          f"{cfg.model.image_size}x{cfg.data.depth}, {cfg.data.sessions} sessions) to {path}")
    return 0


@_user_errors
def _train(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import train_tadiff

    cfg = config_from_args(args)
    trainer = train_tadiff(cfg, args.out_dir, resume=args.resume or False)
    hist = [r for r in trainer.history if "noise_mse" in r]
    if hist:
        a, b = hist[0], hist[-1]
        print(f"trained to step {trainer.step}: loss {a['loss']:.4f} -> {b['loss']:.4f}, noise MSE "
              f"{a['noise_mse']:.4f} -> {b['noise_mse']:.4f}, Dice loss {a['dice_loss']:.4f} -> "
              f"{b['dice_loss']:.4f}; checkpoints in {Path(args.out_dir) / 'checkpoints'}")
    return 0


@_user_errors
def _sweep(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import sweep_tadiff

    cfg = config_from_args(args)
    sweep_tadiff(cfg, args.out_dir, resume=bool(args.resume))
    print(f"wrote {Path(args.out_dir) / 'comparison.md'} and the figures")
    return 0


@_user_errors
def _eval(args) -> int:
    from dualdiff.experiments.tadiff import evaluate_tadiff

    for tok in args.overrides or []:
        if "=" not in tok:
            from dualdiff.config import ConfigError
            raise ConfigError(f"argument {tok!r} is not key=value")
    device = args.device or "auto"
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluate_tadiff(args.checkpoint, args.out_dir, overrides=list(args.overrides or []), device=device)
    return 0


@_user_errors
def _plot(args) -> int:
    from dualdiff.experiments.tadiff import plot_tadiff

    for f in plot_tadiff(args.run_dir):
        print(f"wrote {f}")
    return 0


@_user_errors
def _demo(args) -> int:
    from dualdiff.experiments.tadiff import demo_tadiff

    demo_tadiff(args.out_dir, list(args.overrides or []))
    return 0


def register_tadiff_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dualdiff tadiff {make-data,train,sweep,eval,plot,demo}``."""
    from dualdiff.cli_common import add_run_options
    from dualdiff.experiments.tadiff import TADIFF_PRESETS, TaDiffConfig

    exp = subparsers.add_parser("tadiff", help="joint denoising + segmentation with a time-dependent Dice weight λ(t)")
    sub = exp.add_subparsers(dest="tadiff_command", required=True)

    p = sub.add_parser("make-data", help="write procedural longitudinal patients in the public .npy layout")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="default", resume=False)
    p.set_defaults(func=_make_data)

    p = sub.add_parser("train", help="train one run (λ schedule from the key schedule=...)")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="default")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="train + evaluate every schedule of the key schedules=a,b,... "
                                     "with common random numbers; comparison table and figures")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="default")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("eval", help="validation losses, Dice vs t and sampled-session metrics of a run")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (latest step_*.pt)")
    p.add_argument("--out-dir", default=None, help="output folder (default: the run directory)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:k] (default auto)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the stored config's evaluation / data keys, e.g. num_samples=8")
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="figures of a run or sweep directory")
    p.add_argument("--run-dir", required=True, help="a run (with eval.json) or a sweep directory")
    p.set_defaults(func=_plot)

    p = sub.add_parser("demo", help="the tiny preset end to end: data, sweep of fixed/power/learnable, "
                                    "evaluation, table and figures (a few CPU minutes)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the tiny preset")
    p.set_defaults(func=_demo)
