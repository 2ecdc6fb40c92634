"""`dualdiff ldm autoencoder | encode | train | sample | eval | plot | demo` (the ldm experiment).

One run folder carries the pipeline: ``autoencoder`` writes ``R/autoencoder/``, ``encode`` the
latent caches, ``train`` checkpoints and metrics, ``sample`` / ``eval`` / ``plot`` read them::

    dualdiff ldm autoencoder --out-dir R preset=tiny
    dualdiff ldm encode --out-dir R preset=tiny
    dualdiff ldm train --out-dir R preset=tiny
    dualdiff ldm sample --out-dir R cond_scale=6
    dualdiff ldm eval --out-dir R
    dualdiff ldm plot --out-dir R
    dualdiff ldm demo --out-dir R          # all of the above on the tiny preset
"""
from __future__ import annotations

import argparse
import json

from dualdiff.cli_common import add_run_options, config_from_args

__all__ = ["register_ldm_commands"]


def register_ldm_commands(subparsers) -> None:
    from dualdiff.experiments.ldm import LDM_PRESETS, LDMConfig

    exp = subparsers.add_parser("ldm", help="latent diffusion conditioned on a mask's class distribution")
    sub = exp.add_subparsers(dest="ldm_command", required=True)
    for name, fn, text in (
        ("autoencoder", _autoencoder, "train the conv_kl autoencoder (the vae experiment's) on the tiles"),
        ("encode", _encode, "encode the train/test tiles once into latent caches"),
        ("train", _train, "train the conditioned UNet on the cached latents"),
        ("demo", _demo, "the tiny preset end to end on the CPU (a few minutes)"),
    ):
        p = sub.add_parser(name, help=text)
        add_run_options(p, LDMConfig, presets=LDM_PRESETS, default_preset="tiny" if name == "demo" else "default",
                        resume=name in ("autoencoder", "train"))
        p.set_defaults(func=fn)
    for name, fn, text in (
        ("sample", _sample, "guided DDIM samples for test-set class distributions (samples/grid.png)"),
        ("eval", _eval, "conditioning error, Fréchet distance on AE features, loss per t quartile"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--out-dir", required=True, metavar="DIR", help="the run folder")
        p.add_argument("--device", default=None, metavar="DEV", help="auto | cpu | cuda | cuda:N")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides of the run's config, e.g. cond_scale=6 rescaled_phi=0")
        p.set_defaults(func=fn)
    p = sub.add_parser("plot", help="redraw the figures of a run")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="the run folder")
    p.set_defaults(func=_plot)


def _overrides(args: argparse.Namespace) -> list[str]:
    from dualdiff.config import ConfigError

    for tok in args.overrides:
        if "=" not in tok:
            raise ConfigError(f"argument {tok!r} is not key=value")
    return list(args.overrides)


def _autoencoder(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import train_autoencoder

    res = train_autoencoder(config_from_args(args), args.out_dir, resume=args.resume)
    print(json.dumps(res["metrics"].get("val", {}), indent=2))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import encode_latents

    for name, path in encode_latents(config_from_args(args), args.out_dir).items():
        print(f"{name}: {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import train_ldm

    res = train_ldm(config_from_args(args), args.out_dir, resume=args.resume)
    h = res["history"]
    if h:
        print(f"step {h[-1]['step']}: loss {h[-1]['loss']:.4g} (first logged {h[0]['loss']:.4g})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import sample_ldm

    res = sample_ldm(args.out_dir, _overrides(args), device=args.device)
    print(f"wrote {res['grid']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import evaluate_ldm

    evaluate_ldm(args.out_dir, _overrides(args), device=args.device)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import plot_ldm

    for f in plot_ldm(args.out_dir):
        print(f"wrote {f}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import demo_ldm

    s = demo_ldm(args.out_dir, config_from_args(args))
    print(json.dumps({"times": s["times"], "first_loss": s["first_loss"], "last_loss": s["last_loss"]}, indent=2))
    return 0
