"""``dualdiff tadiff ...``: make-data, train, sweep, eval, plot, demo, study.

Every command but ``plot`` takes the shared options (``--config`` YAML, ``key=value``
overrides of :class:`dualdiff.experiments.tadiff.TaDiffConfig`, ``--show-config``, ``--device``;
``preset=tiny|default|demo``); ``eval`` applies them to the config stored in the checkpoint.
``--out-dir`` of train / sweep / demo is the run folder (the ``train.out_dir`` key's flag) and
``--resume [auto|latest|PATH]`` has one meaning (:mod:`dualdiff.experiments.run`). ``sweep`` trains the
schedules of the config key ``schedules`` (``schedules=fixed,power,cosine,step,learnable``; a
key rather than a flag, so there is one way to set it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dualdiff.errors import ConfigError

__all__ = ["register_tadiff_commands"]


def _make_data(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import make_data

    cfg = config_from_args(args)
    if cfg.data.source != "procedural":
        raise ConfigError("make-data writes procedural patients; data.source must be 'procedural'")
    path = make_data(cfg, cfg.data.path or args.out_dir)
    print(f"wrote {cfg.data.num_patients} procedural patients ({cfg.model.image_size}x"
          f"{cfg.model.image_size}x{cfg.data.depth}, {cfg.data.sessions} sessions) to {path}")
    return 0


def _train(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import train_tadiff

    cfg = config_from_args(args)  # --out-dir / --resume folded into train.out_dir / train.resume
    trainer = train_tadiff(cfg)
    hist = [r for r in trainer.history if "noise_mse" in r]
    if hist:
        a, b = hist[0], hist[-1]
        print(f"trained to step {trainer.step}: loss {a['loss']:.4f} -> {b['loss']:.4f}, noise MSE "
              f"{a['noise_mse']:.4f} -> {b['noise_mse']:.4f}, Dice loss {a['dice_loss']:.4f} -> "
              f"{b['dice_loss']:.4f}; checkpoints in {Path(cfg.train.out_dir) / 'checkpoints'}")
    return 0


def _sweep(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import sweep_tadiff

    cfg = config_from_args(args)
    sweep_tadiff(cfg)
    print(f"wrote {Path(cfg.train.out_dir) / 'comparison.md'} and the figures")
    return 0


def _eval(args) -> int:
    from dualdiff.cli_common import config_from_checkpoint_args
    from dualdiff.experiments.tadiff import evaluate_tadiff

    cfg = config_from_checkpoint_args(args, writer="train_tadiff")
    evaluate_tadiff(args.checkpoint, args.out_dir, config=cfg)
    return 0


def _plot(args) -> int:
    from dualdiff.experiments.tadiff import plot_tadiff

    for f in plot_tadiff(args.run_dir):
        print(f"wrote {f}")
    return 0


def _demo(args) -> int:
    from dualdiff.cli_common import config_from_args
    from dualdiff.experiments.tadiff import demo_tadiff

    demo_tadiff(config=config_from_args(args))
    return 0


def register_tadiff_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dualdiff tadiff {make-data,train,sweep,eval,plot,demo,study}``."""
    from dualdiff.cli_common import add_run_options
    from dualdiff.experiments.tadiff import TADIFF_PRESETS, TaDiffConfig

    exp = subparsers.add_parser("tadiff", help="joint denoising + segmentation with a time-dependent Dice weight λ(t)")
    sub = exp.add_subparsers(dest="tadiff_command", required=True)

    p = sub.add_parser("make-data", help="write procedural longitudinal patients in the public .npy layout")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="default", resume=False)
    p.set_defaults(func=_make_data)

    p = sub.add_parser("train", help="train one run (λ schedule from the key schedule=...)")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="default", out_dir="run")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="train + evaluate every schedule of the key schedules=a,b,... "
                                     "with common random numbers; comparison table and figures")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="default", out_dir="run")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("eval", help="validation losses, Dice vs t and sampled-session metrics of a run "
                                    "(key=value: the stored config's evaluation / data keys)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run directory (latest step_*.pt)")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, out_dir="optional",
                    default_out_dir=None, resume=False, run_input="--checkpoint")
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="figures of a run or sweep directory")
    p.add_argument("--run-dir", required=True, help="a run (with eval.json) or a sweep directory")
    p.set_defaults(func=_plot)

    p = sub.add_parser("demo", help="the demo preset end to end: data, sweep of fixed/power/learnable, "
                                    "evaluation, table and figures, ending with demo.md and the one "
                                    "figure demo.png (which differences to fixed are within noise)")
    add_run_options(p, TaDiffConfig, presets=TADIFF_PRESETS, default_preset="demo", out_dir="run", resume=False)
    p.set_defaults(func=_demo)

    from dualdiff.experiments.tadiff_study import register_tadiff_study  # dualdiff tadiff study
    register_tadiff_study(sub)
