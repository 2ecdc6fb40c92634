"""The one CLI helper every experiment's commands are built with.

Every command that trains or writes takes the same options, added by
:func:`add_run_options` and resolved by :func:`config_from_args`:

``--out-dir DIR``            the run folder of a training command (the ``train.out_dir`` key's
                             flag: giving both with different values is an error), or the
                             output folder of an analysis command (checked after --show-config)
``--config FILE.yaml``       a YAML file of the experiment config's keys
``key=value ...``            overrides of any (dotted) config key; ``preset=NAME`` picks the
                             starting preset (``tiny`` | ``default`` ...) before the file and
                             the other overrides are applied
``--resume [auto|latest|PATH]`` the ``train.resume`` key's flag: ``auto`` (the bare flag) = the
                             newest usable checkpoint of the run, else a fresh start; ``latest``
                             = the newest usable checkpoint, an error if none; ``PATH`` = that file
``--device DEV``             ``auto | cpu | cuda | cuda:N`` (sets the command's ``*.device`` key)
``--show-config``            print every key with its type, default and the value the
                             command would run with, then exit (no ``--out-dir`` needed)

The meanings live in :mod:`dualdiff.experiments.run` (one lifecycle for the five experiments).
A user's mistake (bad key or value, missing file, unreachable dataset, unusable backend)
is raised as :class:`UserError` (or :class:`dualdiff.config.ConfigError`);
:func:`dualdiff.cli.main` prints it as one ``dualdiff: error: ...`` line and exits 2
(``--debug`` or ``DUALDIFF_DEBUG=1`` shows the traceback instead).

An experiment registers its commands like this::

    def register(subparsers):
        exp = subparsers.add_parser("myexp", help=...)
        sub = exp.add_subparsers(dest="myexp_command", required=True)
        p = sub.add_parser("train", help=...)
        add_run_options(p, MyConfig, presets=MY_PRESETS, out_dir="run")
        p.set_defaults(func=_train)

    def _train(args):
        cfg = config_from_args(args)      # preset <- --config <- key=value <- --device/--out-dir/--resume
        train_myexp(cfg)                  # the run folder and resume request are in cfg.train
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dualdiff.errors import UserError, user_error_types

__all__ = [
    "UserError",
    "add_run_options",
    "config_from_args",
    "config_from_checkpoint_args",
    "format_config",
    "debug_enabled",
    "USER_ERRORS",
]


USER_ERRORS: Callable[[], tuple[type[BaseException], ...]] = user_error_types


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """True when ``--debug`` was given or ``DUALDIFF_DEBUG`` is set to a true value."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get("DUALDIFF_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------
# options


Presets = Mapping[str, Callable[[], Any]]  # name -> zero-argument callable (dualdiff.experiments.run)


def add_run_options(parser: argparse.ArgumentParser, config_cls: type, *,
                    presets: Presets | None = None, default_preset: str | None = None,
                    out_dir: str = "required", default_out_dir: str | None = None,
                    resume: bool = True, train_key: str = "train",
                    foreign_keys: tuple[str, ...] = (), train_keys_read: tuple[str, ...] | None = None,
                    run_input: str | None = None) -> None:
    """Add the shared options to ``parser`` for a command configured by ``config_cls``.

    ``out_dir``: ``"run"`` (the run folder: ``--out-dir`` is the ``train.out_dir`` key's flag),
    ``"required"`` (an output folder the command needs; checked after ``--show-config``, never
    by argparse), ``"optional"`` (with ``default_out_dir``) or ``"none"``. ``presets`` maps a
    name to a zero-argument callable; ``default_preset`` is used without ``preset=``.
    ``train_key``: the TrainConfig section the command trains with (``--resume`` and
    ``--device`` set its keys). ``foreign_keys``: key prefixes the command does not read
    (a ``key=value`` under them is a ConfigError, never ignored). ``train_keys_read``: for a
    command that reads only some ``train.*`` keys, those keys (any other ``train.*`` key=value is a
    ConfigError naming them; None: all are read). ``run_input``: the name of the
    option holding a finished run whose stored config the command starts from (``load_run``).
    """
    if out_dir not in {"run", "required", "optional", "none"}:
        raise ValueError(f"out_dir must be run|required|optional|none, got {out_dir!r}")
    if out_dir == "run":
        parser.add_argument("--out-dir", default=None, metavar="DIR",
                            help="the run folder (the train.out_dir key's flag; default: the preset's)")
    elif out_dir == "required":
        parser.add_argument("--out-dir", default=None, metavar="DIR", help="output folder (required)")
    elif out_dir == "optional":
        where = (f"default {default_out_dir}" if default_out_dir is not None
                 else f"default: the folder of the run given by {run_input}" if run_input
                 else "optional")
        parser.add_argument("--out-dir", default=default_out_dir, metavar="DIR",
                            help=f"output folder ({where})")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help=f"YAML file of {config_cls.__name__} keys")
    if resume:
        parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|latest|PATH",
                            help="continue the run (the train.resume key's flag): auto (the bare flag) = "
                                 "the newest usable checkpoint, else a fresh start; latest = the newest "
                                 "usable checkpoint, an error if there is none; PATH = that checkpoint")
    parser.add_argument("--device", default=None, metavar="DEV",
                        help="auto | cpu | cuda | cuda:N (sets the config's device key)")
    parser.add_argument("--show-config", action="store_true",
                        help="print every key with type, default and the value it would run "
                             "with, then exit")
    names = ", ".join(sorted(presets)) if presets else ""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.lr=2e-4"
                             + (f"; preset=NAME picks one of: {names}" if names else ""))
    parser.set_defaults(_config_cls=config_cls, _presets=dict(presets or {}),
                        _default_preset=default_preset, _out_dir_mode=out_dir, _train_key=train_key,
                        _foreign_keys=tuple(foreign_keys), _train_keys_read=train_keys_read,
                        _run_input=run_input)


def _device_key(cfg: Any, train_key: str = "train") -> str | None:
    from dualdiff.experiments.run import section

    try:
        tc = section(cfg, train_key)
    except AttributeError:
        tc = None
    if dataclasses.is_dataclass(tc) and hasattr(tc, "device"):
        return f"{train_key}.device"
    if "device" in {f.name for f in dataclasses.fields(cfg)}:
        return "device"
    return None


def config_from_args(args: argparse.Namespace, base: Any = None) -> Any:
    """The config a command runs with: preset (or ``base``, e.g. a finished run's stored config)
    <- ``--config`` <- ``key=value`` <- ``--device`` / ``--out-dir`` / ``--resume``.

    Prints the config and exits (``SystemExit(0)``) when ``--show-config`` was given (no
    ``--out-dir`` needed). Raises :class:`dualdiff.errors.ConfigError` naming the key on any bad
    key or value, and on a flag that conflicts with its key
    (:func:`dualdiff.experiments.run.apply_run_flags`).
    """
    from dualdiff.config import ConfigError, _read_yaml, _validate, apply_overrides, from_dict, merge
    from dualdiff.experiments.run import apply_run_flags, from_name

    cls: type = args._config_cls
    presets: Presets = args._presets
    train_key: str = getattr(args, "_train_key", "train")
    overrides = list(getattr(args, "overrides", None) or [])
    resume = getattr(args, "resume", None)
    if resume is not None and "=" in resume and not Path(resume).exists():
        # the bare flag before a key=value word: argparse took the word as the flag's value
        overrides.append(resume)
        args.resume = "auto"
    for tok in overrides:
        if "=" not in tok:
            raise ConfigError(f"argument {tok!r} is not key=value (a config file goes after --config)")
    preset = args._default_preset
    rest = []
    for tok in overrides:
        key, _, value = tok.partition("=")
        key = key.strip()
        if key == "preset":
            if not presets:
                raise ConfigError(f"{cls.__name__} has no presets; 'preset' is not a key")
            if base is not None:
                raise ConfigError("preset= does not apply here: the command starts from the run's stored config")
            preset = value.strip()
            continue
        for prefix in getattr(args, "_foreign_keys", ()):
            if key.startswith(prefix) and key != "train.out_dir":  # the run folder: every command's
                raise ConfigError(f"{key} is not used by this command (it trains with {train_key}.*): "
                                  f"set it for the command that reads it")
        read = getattr(args, "_train_keys_read", None)
        if read is not None and key.startswith("train.") and key not in read:
            raise ConfigError(f"{key} is not used by this command (of train.* it reads only "
                              f"{', '.join(read)}): set it for the command that reads it")
        rest.append(tok)
    if base is not None:
        cfg = copy.deepcopy(base)
    elif preset is not None:
        cfg = from_name(presets, preset, cls.__name__)
    else:
        cfg = from_dict(cls, {})
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {str(path)!r}")
        cfg = merge(cfg, _read_yaml(path), _validate_after=False)
    if rest:
        cfg = apply_overrides(cfg, rest)
    if getattr(args, "device", None) is not None:
        key = _device_key(cfg, train_key)
        if key is None:
            raise ConfigError(f"{cls.__name__} has no device key; --device does not apply")
        cfg = apply_overrides(cfg, [f"{key}={args.device}"])
    _validate(cfg)
    mode = getattr(args, "_out_dir_mode", "none")
    if mode == "run" or getattr(args, "resume", None) is not None:
        cfg = apply_run_flags(cfg, getattr(args, "out_dir", None) if mode == "run" else None,
                              getattr(args, "resume", None), presets=presets, train_key=train_key)
    if getattr(args, "show_config", False):
        print(format_config(cfg, preset if base is None else None))
        raise SystemExit(0)
    if mode == "required" and getattr(args, "out_dir", None) is None:
        raise ConfigError("--out-dir is required")
    return cfg


def config_from_checkpoint_args(args: argparse.Namespace, writer: str) -> Any:
    """:func:`config_from_args` for a command that reads a finished run given by ``--checkpoint``
    (``add_run_options(..., run_input="--checkpoint")``): the run's stored config (written by
    ``writer``, :func:`dualdiff.experiments.run.load_run`) is the base. ``--checkpoint`` is
    required except with ``--show-config``."""
    from dualdiff.errors import ConfigError
    from dualdiff.experiments.run import load_run

    stored = None
    if args.checkpoint is not None:
        stored = load_run(args.checkpoint, args._config_cls, writer=writer).config
    elif not args.show_config:
        raise ConfigError("--checkpoint is required")
    return config_from_args(args, base=stored)


def format_config(cfg: Any, preset: str | None = None) -> str:
    """One line per key: ``key: type = default -> value`` (``-> value`` only where it differs).

    The default is the experiment config's own (``type(cfg)()``), so nested sections show the
    values the experiment sets, not the nested class's bare defaults.
    """
    from dualdiff.config import _fields, _is_dataclass_type, _plain, _type_name

    lines = [f"# {type(cfg).__name__}" + (f" (preset {preset})" if preset else "")]
    try:
        defaults: Any = type(cfg)()
    except TypeError:  # a config with required keys has no default instance
        defaults = None

    def walk(obj: Any, ref: Any, cls: type, prefix: str) -> None:
        for name, (f, tp) in _fields(cls).items():
            value = getattr(obj, name)
            if _is_dataclass_type(tp):
                walk(value, getattr(ref, name, None) if ref is not None else None, tp, prefix + name + ".")
                continue
            if ref is not None:
                default = getattr(ref, name)
            elif f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = "<required>"
            line = f"{prefix}{name}: {_type_name(tp)} = {_plain(default)!r}"
            if _plain(value) != _plain(default):
                line += f" -> {_plain(value)!r}"
            lines.append(line)

    walk(cfg, defaults, type(cfg), "")
    return "\n".join(lines)
