"""`dualdiff ldm autoencoder | encode | train | sample | eval | plot | demo` (the ldm experiment).

One run folder (``--out-dir``, the ``train.out_dir`` key's flag) carries the pipeline:
``autoencoder`` writes ``R/autoencoder/`` (trained with its own TrainConfig ``ae.train.*``; a
``train.*`` key given to it is an error, not ignored), ``encode`` the latent caches, ``train``
checkpoints and metrics (``train.*``), ``sample`` / ``eval`` / ``plot`` read them (``sample`` and
``eval`` apply ``--config`` / ``key=value`` to the run's stored config)::

    dualdiff ldm autoencoder --out-dir R preset=tiny
    dualdiff ldm encode --out-dir R preset=tiny
    dualdiff ldm train --out-dir R preset=tiny
    dualdiff ldm sample --out-dir R cond_scale=6
    dualdiff ldm eval --out-dir R
    dualdiff ldm plot --out-dir R
    dualdiff ldm demo --out-dir R          # all of the above on the tiny preset
    dualdiff ldm study --out-dir S preset=tiny   # guidance / cutoff claims over N seeds
"""
from __future__ import annotations

import argparse
import json

from dualdiff.cli_common import add_run_options, config_from_args

__all__ = ["register_ldm_commands"]


def register_ldm_commands(subparsers) -> None:
    """Add ``dualdiff ldm {autoencoder,encode,train,sample,eval,plot,demo,study}``."""
    from dualdiff.experiments.ldm import LDM_PRESETS, LDMConfig

    exp = subparsers.add_parser("ldm", help="latent diffusion conditioned on a mask's class distribution")
    sub = exp.add_subparsers(dest="ldm_command", required=True)
    for name, fn, text, opts in (
        ("autoencoder", _autoencoder, "train the conv_kl autoencoder (the vae experiment's) on the tiles with "
                                      "its own TrainConfig ae.train.*", dict(train_key="ae.train", foreign_keys=("train.",))),
        ("encode", _encode, "encode the train/test tiles once into latent caches",
         dict(resume=False, foreign_keys=("ae.train.",),
              train_keys_read=("train.out_dir", "train.batch_size", "train.device"))),
        ("train", _train, "train the conditioned UNet on the cached latents (train.*)",
         dict(foreign_keys=("ae.train.",))),
        ("demo", _demo, "the demo preset (tiny) end to end on the CPU (a few minutes)", dict(resume=False)),
    ):
        p = sub.add_parser(name, help=text)
        add_run_options(p, LDMConfig, presets=LDM_PRESETS, default_preset="demo" if name == "demo" else "default",
                        out_dir="run", **opts)
        p.set_defaults(func=fn)
    for name, fn, text in (
        ("sample", _sample, "guided DDIM samples for test-set class distributions (samples/grid.png)"),
        ("eval", _eval, "conditioning error, Fréchet distance on AE features, loss per t quartile"),
    ):
        p = sub.add_parser(name, help=text + "; key=value: the run's stored config, e.g. cond_scale=6")
        add_run_options(p, LDMConfig, presets=LDM_PRESETS, out_dir="required", resume=False,
                        run_input="--out-dir", foreign_keys=("ae.train.",),
                        train_keys_read=("train.out_dir", "train.seed", "train.device"))
        p.set_defaults(func=fn)
    p = sub.add_parser("plot", help="redraw the figures of a run")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="the run folder")
    p.set_defaults(func=_plot)
    from dualdiff.experiments.ldm_study import register_ldm_study
    register_ldm_study(sub)


def _autoencoder(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import train_autoencoder

    res = train_autoencoder(config_from_args(args))
    print(json.dumps(res["metrics"].get("val", {}), indent=2))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import encode_latents

    for name, path in encode_latents(config_from_args(args)).items():
        print(f"{name}: {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import train_ldm

    res = train_ldm(config_from_args(args))
    h = res["history"]
    if h:
        print(f"step {h[-1]['step']}: loss {h[-1]['loss']:.4g} (first logged {h[0]['loss']:.4g})")
    return 0


def _stored_config(args: argparse.Namespace):
    """The run's config (``--out-dir``) with the shared options applied; the preset's without a run
    (``--show-config`` only)."""
    from dualdiff.experiments.ldm import load_ldm

    base = load_ldm(args.out_dir)[1] if args.out_dir is not None else None
    return config_from_args(args, base=base)


def _sample(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import sample_ldm

    res = sample_ldm(args.out_dir, config=_stored_config(args))
    print(f"wrote {res['grid']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import evaluate_ldm

    evaluate_ldm(args.out_dir, config=_stored_config(args))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from dualdiff.experiments.ldm import plot_ldm

    for f in plot_ldm(args.out_dir):
        print(f"wrote {f}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dualdiff.config import apply_overrides
    from dualdiff.experiments.ldm import demo_ldm

    device, args.device = args.device, None
    cfg = config_from_args(args)
    if device is not None:  # the demo's two stages run on one device
        cfg = apply_overrides(cfg, [f"train.device={device}", f"ae.train.device={device}"])
    s = demo_ldm(cfg=cfg)
    print(json.dumps({"times": s["times"], "first_loss": s["first_loss"], "last_loss": s["last_loss"]}, indent=2))
    return 0
