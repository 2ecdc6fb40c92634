"""The one helper that adds ``dualdiff <exp> study`` to an experiment's commands.

    dualdiff <exp> study --out-dir DIR [--config FILE.yaml] [--device DEV] [--show-config]
        [seeds=N] [first_seed=S] [preset=NAME] [experiment.<key>=value ...]

The options are :func:`dualdiff.cli_common.add_run_options`'s (no ``--resume``: a study always
resumes, skipping the runs that finished); ``--device`` sets the nested experiment config's
device key. An experiment provides a study config dataclass (a :class:`StudySettings`
subclass with an ``experiment`` field holding the experiment's config), presets for it, and
``build(config, preset) -> Study``; see :func:`add_study_command`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dualdiff.study.runner import Study

__all__ = ["StudySettings", "add_study_command", "study_config_from_args", "preset_name"]


@dataclass
class StudySettings:
    """The keys every study config has: ``seeds`` runs per arm, with seeds ``first_seed``,
    ``first_seed + 1``, ... (each becomes the experiment's seed); ``threads``: torch's CPU
    threads while the runs execute (0 = leave torch's setting; 1 suits small models on a
    shared CPU, where idle threads spinning for a core cost more than they give). Subclass it
    and add an ``experiment`` field holding the experiment's config."""
    seeds: int = 3
    first_seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """``seeds`` >= 1, ``first_seed`` >= 0 and ``threads`` >= 0, as ints."""
        for name, low in (("seeds", 1), ("first_seed", 0), ("threads", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")

    def seed_list(self) -> list[int]:
        """The study's seeds: ``first_seed .. first_seed + seeds - 1``."""
        return list(range(self.first_seed, self.first_seed + self.seeds))


def _device_key(cfg: Any) -> str | None:
    exp = getattr(cfg, "experiment", None)
    if exp is None or not dataclasses.is_dataclass(exp):
        return None
    train = getattr(exp, "train", None)
    if train is not None and dataclasses.is_dataclass(train) and hasattr(train, "device"):
        return "experiment.train.device"
    return "experiment.device" if hasattr(exp, "device") else None


def preset_name(args: argparse.Namespace) -> str | None:
    """The preset a command's ``key=value`` list picks (the last ``preset=``), else the
    default preset."""
    name = args._default_preset
    for tok in getattr(args, "overrides", None) or []:
        key, eq, value = tok.partition("=")
        if eq and key.strip() == "preset":
            name = value.strip()
    return name


def study_config_from_args(args: argparse.Namespace) -> Any:
    """The study config: preset <- ``--config`` <- ``key=value`` <- ``--device`` (on the nested
    experiment's device key); prints it and exits on ``--show-config``."""
    from dualdiff.cli_common import config_from_args, format_config
    from dualdiff.config import ConfigError, apply_overrides

    plain = copy.copy(args)
    plain.device = None
    plain.show_config = False
    cfg = config_from_args(plain)
    if args.device is not None:
        key = _device_key(cfg)
        if key is None:
            raise ConfigError(f"{type(cfg).__name__} has no experiment device key; "
                              "--device does not apply")
        cfg = apply_overrides(cfg, [f"{key}={args.device}"])
    if args.show_config:
        print(format_config(cfg, preset_name(args)))
        raise SystemExit(0)
    return cfg


def _run(args: argparse.Namespace) -> int:
    from dualdiff.study.orchestrator import run_study

    cfg = study_config_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    study: Study = args._build_study(cfg, preset_name(args))
    report = run_study(study, args.out_dir)
    if report is None:  # a torchrun rank other than 0: rank 0 writes and prints
        return 0
    for c in report["claims"]:
        iv = c["interval"]
        diff = "no value" if iv["mean"] is None else (
            f"{iv['mean']:+.4g}" + ("" if iv["low"] is None
                                    else f" [{iv['low']:+.4g}, {iv['high']:+.4g}]"))
        print(f"{c['name']}: {c['verdict']}  (difference {diff}, n={iv['n']})")
    print(f"report: {args.out_dir}/study.md, study.json, study.png")
    if report["failed_runs"]:
        print(f"{len(report['failed_runs'])} runs failed (see study.md); rerun the same command "
              "to redo them")
        return 1
    return 0


def add_study_command(subparsers: Any, config_cls: type,
                      build: Callable[[Any, str | None], Study], *,
                      presets: Mapping[str, Any] | None = None,
                      default_preset: str | None = None, default_out_dir: str | None = None,
                      help: str | None = None, description: str | None = None
                      ) -> argparse.ArgumentParser:
    """Add a ``study`` command to an experiment's ``subparsers``.

    ``config_cls``: the study config (a :class:`StudySettings` subclass with an ``experiment``
    field); ``presets``: name -> instance or factory; ``build(config, preset_name) -> Study``
    (:class:`dualdiff.study.runner.Study`). The command runs
    :func:`dualdiff.study.orchestrator.run_study` and exits 1 when a run failed.
    """
    from dualdiff.cli_common import add_run_options

    help = help or "run the design's comparison over N seeds and report verdicts"
    p = subparsers.add_parser(
        "study", help=help.replace("%", "%%"),  # argparse %-formats help, not the description
        description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, config_cls, presets=presets, default_preset=default_preset,
                    out_dir="optional" if default_out_dir else "required",
                    default_out_dir=default_out_dir, resume=False)
    p.set_defaults(func=_run, _build_study=build)
    return p
