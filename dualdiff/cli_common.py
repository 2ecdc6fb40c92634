"""The one CLI helper every experiment's commands are built with.

Every command that trains or writes takes the same options, added by
:func:`add_run_options` and resolved by :func:`config_from_args`:

``--out-dir DIR``            the run's output folder
``--config FILE.yaml``       a YAML file of the experiment config's keys
``key=value ...``            overrides of any (dotted) config key; ``preset=NAME`` picks the
                             starting preset (``tiny`` | ``default`` ...) before the file and
                             the other overrides are applied
``--resume [auto|PATH]``     continue a run: ``auto`` (the bare flag) = the newest checkpoint
                             in ``--out-dir`` if there is one, else a fresh start; or a path
``--device DEV``             ``auto | cpu | cuda | cuda:N`` (sets ``train.device``)
``--show-config``            print every key with its type, default and the value the
                             command would run with, then exit

A user's mistake (bad key or value, missing file, unreachable dataset, unusable backend)
is raised as :class:`UserError` (or :class:`dualdiff.config.ConfigError`);
:func:`dualdiff.cli.main` prints it as one ``dualdiff: error: ...`` line and exits 2
(``--debug`` or ``DUALDIFF_DEBUG=1`` shows the traceback instead).

An experiment registers its commands like this::

    def register(subparsers):
        exp = subparsers.add_parser("myexp", help=...)
        sub = exp.add_subparsers(dest="myexp_command", required=True)
        p = sub.add_parser("train", help=...)
        add_run_options(p, MyConfig, presets=MY_PRESETS)
        p.set_defaults(func=_train)

    def _train(args):
        cfg = config_from_args(args)      # preset <- --config <- key=value <- --device
        train_myexp(cfg, args.out_dir, resume=args.resume)
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


Presets = Mapping[str, Any]  # name -> config instance, or a callable returning one


def add_run_options(parser: argparse.ArgumentParser, config_cls: type, *,
                    presets: Presets | None = None, default_preset: str | None = None,
                    out_dir: str = "required", default_out_dir: str | None = None,
                    resume: bool = True) -> None:
    """Add the shared options to ``parser`` for a command configured by ``config_cls``.

    ``out_dir`` is ``"required"``, ``"optional"`` (with ``default_out_dir``) or ``"none"``
    (commands that write nothing). ``presets`` maps a name to a config instance or a
    zero-argument callable returning one; ``default_preset`` is used without ``preset=``.
    """
    if out_dir not in {"required", "optional", "none"}:
        raise ValueError(f"out_dir must be required|optional|none, got {out_dir!r}")
    if out_dir == "required":
        parser.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    elif out_dir == "optional":
        parser.add_argument("--out-dir", default=default_out_dir, metavar="DIR",
                            help=f"output folder (default {default_out_dir})")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help=f"YAML file of {config_cls.__name__} keys")
    if resume:
        parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                            help="continue from the newest checkpoint in --out-dir (auto, the "
                                 "bare flag's meaning: a fresh start when there is none) or "
                                 "from a checkpoint file")
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
                        _default_preset=default_preset)


def _preset_instance(name: str, cls: type, presets: Presets) -> Any:
    from dualdiff.config import ConfigError

    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(presets)) or '(none)'}")
    p = presets[name]
    obj = p() if callable(p) and not isinstance(p, cls) else copy.deepcopy(p)
    if not isinstance(obj, cls):
        raise TypeError(f"preset {name!r} gives {type(obj).__name__}, not {cls.__name__}")
    return obj


def _device_key(cfg: Any) -> str | None:
    names = {f.name for f in dataclasses.fields(cfg)}
    if "train" in names and dataclasses.is_dataclass(cfg.train) and hasattr(cfg.train, "device"):
        return "train.device"
    if "device" in names:
        return "device"
    return None


def config_from_args(args: argparse.Namespace) -> Any:
    """The config a command runs with: preset <- ``--config`` <- ``key=value`` <- ``--device``.

    Prints the config and exits (``SystemExit(0)``) when ``--show-config`` was given.
    Raises :class:`dualdiff.config.ConfigError` naming the key on any bad key or value.
    """
    from dualdiff.config import ConfigError, _read_yaml, _validate, apply_overrides, from_dict, merge

    cls: type = args._config_cls
    presets: Presets = args._presets
    overrides = list(getattr(args, "overrides", None) or [])
    for tok in overrides:
        if "=" not in tok:
            raise ConfigError(f"argument {tok!r} is not key=value (a config file goes after --config)")
    preset = args._default_preset
    rest = []
    for tok in overrides:
        key, _, value = tok.partition("=")
        if key.strip() == "preset":
            if not presets:
                raise ConfigError(f"{cls.__name__} has no presets; 'preset' is not a key")
            preset = value.strip()
        else:
            rest.append(tok)
    base = _preset_instance(preset, cls, presets) if preset is not None else from_dict(cls, {})
    cfg = base
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {str(path)!r}")
        cfg = merge(cfg, _read_yaml(path), _validate_after=False)
    if rest:
        cfg = apply_overrides(cfg, rest)
    if getattr(args, "device", None) is not None:
        key = _device_key(cfg)
        if key is None:
            raise ConfigError(f"{cls.__name__} has no device key; --device does not apply")
        cfg = apply_overrides(cfg, [f"{key}={args.device}"])
    _validate(cfg)
    if getattr(args, "show_config", False):
        print(format_config(cfg, preset))
        raise SystemExit(0)
    return cfg


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
