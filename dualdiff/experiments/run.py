"""The one run lifecycle of the five experiments: preset -> validate -> run folder -> resume ->
train, and :func:`load_run` for every command that reads a finished run.

Every experiment and every ``dualdiff <exp> ...`` command goes through these functions, so each
option has one meaning everywhere:

``preset=NAME``
    :func:`from_name`: presets are a dict ``name -> zero-argument callable`` returning a fresh
    config; an unknown name is a :class:`~dualdiff.errors.ConfigError` listing the choices.
``--out-dir DIR`` / ``train.out_dir``
    The run folder. ``train.out_dir`` is a user key and ``--out-dir`` (or a function's
    ``out_dir`` argument) its shorthand: when both are given with different values it is a
    :class:`ConfigError` (:data:`CONFLICT`), checked once in :func:`apply_run_flags`. A
    ``train.out_dir`` equal to one of the experiment's presets' own values (or TrainConfig's
    default) counts as not set.
``--resume [auto|latest|PATH]`` / ``train.resume``
    ``auto`` (the bare flag, ``resume=True``): the newest usable checkpoint of the run folder,
    else a fresh start; ``latest``: the newest usable checkpoint, a
    :class:`~dualdiff.errors.CheckpointError` when there is none; ``PATH``: that checkpoint
    file. A flag and a key that disagree are a :class:`ConfigError` (:data:`CONFLICT`).
``load_run(path, ConfigClass)``
    A checkpoint file or run folder -> ``(state, config, file)``; any missing, unreadable,
    corrupt or foreign file is a :class:`CheckpointError` naming it.

Library errors are :mod:`dualdiff.errors` types; :func:`dualdiff.cli.main` maps them (and
:func:`dualdiff.errors.user_error_types`) to one ``dualdiff: error: ...`` line, exit 2.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from dualdiff.errors import CheckpointError, ConfigError

__all__ = ["Presets", "CONFLICT", "RESUME_MODES", "from_name", "section", "apply_run_flags",
           "normalize_resume", "check_resume", "LoadedRun", "load_run", "load_weights"]

#: name -> zero-argument callable returning a fresh config (the one way presets are declared)
Presets = Mapping[str, Callable[[], Any]]

#: the message of a flag and a key naming the same thing with different values
CONFLICT = "{flag} {flag_value!r} and {key}={key_value!r} conflict: give one of them"

RESUME_MODES = ("auto", "latest")


def from_name(presets: Presets, name: str, config_name: str) -> Any:
    """A fresh config from the preset ``name`` of ``presets``; :class:`ConfigError` when unknown:
    ``unknown preset 'huge' for LIFTConfig; choose one of: default, tiny`` (``config_name``: the
    config class's name, so the message is the same from the CLI and from Python)."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r} for {config_name}; choose one of: "
                          f"{', '.join(sorted(presets)) or '(none)'}")
    make = presets[name]
    if not callable(make):
        raise TypeError(f"preset {name!r} must be a zero-argument callable, got {type(make).__name__}")
    return make()


def section(cfg: Any, key: str) -> Any:
    """The (nested) dataclass at dotted ``key`` of ``cfg`` (e.g. ``"ae.train"``)."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def normalize_resume(resume: bool | str | os.PathLike | None) -> str | None:
    """One spelling of a resume request: None/False -> None (fresh start), True -> ``"auto"``,
    ``"auto"`` / ``"latest"`` as is, a path -> ``str(path)``."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return "auto"
    if isinstance(resume, (str, os.PathLike)):
        s = str(resume)
        if not s:
            raise ConfigError("resume: empty value; use auto, latest or a checkpoint path")
        return s
    raise ConfigError(f"resume must be auto, latest or a checkpoint path, got {resume!r}")


def _preset_out_dirs(presets: Presets) -> frozenset[str]:
    """The run folders no user set: TrainConfig's default and each preset's own. Computed on each
    call (a few dataclass constructions): a cache keyed by ``id(presets)`` returned another table's
    folders once a CLI parser's presets dict was freed and its id reused."""
    from dualdiff.train.config import TrainConfig

    dirs = {str(TrainConfig.__dataclass_fields__["out_dir"].default)}
    for make in presets.values():
        train = getattr(make(), "train", None)
        if train is not None and hasattr(train, "out_dir"):
            dirs.add(str(train.out_dir))
    return frozenset(dirs)


def apply_run_flags(config: Any, out_dir: str | os.PathLike | None = None,
                    resume: bool | str | os.PathLike | None = None, *, presets: Presets,
                    train_key: str = "train") -> Any:
    """A deep copy of ``config`` with the run folder (``train.out_dir``) and the resume request
    (``<train_key>.resume``) set from the flags / arguments, validated.

    ``out_dir`` / ``resume`` None: the keys decide. Given: they must agree with a key the user
    set, else :class:`ConfigError` (:data:`CONFLICT`). ``resume=False`` is an explicit fresh
    start (it conflicts with a set ``resume`` key)."""
    cfg = copy.deepcopy(config)
    train = getattr(cfg, "train", None)
    if out_dir is not None:
        if train is None or not hasattr(train, "out_dir"):
            raise ConfigError(f"{type(cfg).__name__} has no train.out_dir: this command takes no run folder")
        want = str(out_dir)
        have = str(train.out_dir)
        if have != want and have not in _preset_out_dirs(presets):
            raise ConfigError(CONFLICT.format(flag="--out-dir", flag_value=want, key="train.out_dir",
                                              key_value=have))
        train.out_dir = want
    if resume is not None:
        tc = section(cfg, train_key)
        want_r = normalize_resume(resume)
        if tc.resume is not None and tc.resume != want_r:
            raise ConfigError(CONFLICT.format(flag="--resume", flag_value=want_r if want_r is not None else False,
                                              key=f"{train_key}.resume", key_value=tc.resume))
        tc.resume = want_r
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def check_resume(resume: str | None, checkpoint_dir: str | os.PathLike) -> None:
    """Fail early (before data or models are built) on a resume request that cannot be met:
    ``latest`` with no usable checkpoint in ``checkpoint_dir``, or a ``PATH`` that is no file."""
    if resume is None or resume == "auto":
        return
    if resume == "latest":
        from dualdiff.train.checkpoint import find_resumable

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found = find_resumable(checkpoint_dir)
        if found is None:
            raise CheckpointError(f"--resume latest: no usable checkpoint (step_*.pt) in {str(checkpoint_dir)!r}")
        return
    if not Path(resume).is_file():
        raise CheckpointError(f"--resume: checkpoint file {resume!r} does not exist")


class LoadedRun(NamedTuple):
    """What :func:`load_run` returns."""
    state: dict
    config: Any
    path: Path


def _resolve(path: str | os.PathLike) -> Path:
    from dualdiff.train.checkpoint import latest_checkpoint

    p = Path(path)
    if p.is_dir():
        for d in (p / "checkpoints", p):
            found = latest_checkpoint(d)
            if found is not None:
                return found
        raise CheckpointError(f"no checkpoint (step_*.pt) in {str(p)!r} or {str(p / 'checkpoints')!r}")
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}: it does not exist")
    return p


def load_run(path: str | os.PathLike, config_cls: type, *, writer: str = "",
             map_location: Any = "cpu") -> LoadedRun:
    """The checkpoint ``path`` (a file, or a run folder: its newest ``checkpoints/step_*.pt``)
    loaded with ``torch.load(weights_only=True)`` and its stored run config as ``config_cls``.

    Any missing, empty, truncated, foreign or corrupt file, or a run config of another
    experiment, raises :class:`CheckpointError` naming the file (``writer`` names the function
    that writes such runs, for the message)."""
    from dualdiff.config import from_dict
    from dualdiff.train.checkpoint import load_checkpoint

    p = _resolve(path)
    try:
        state = load_checkpoint(p, map_location=map_location)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    run = state.get("run_config")
    hint = f": was it written by {writer}?" if writer else ""
    if not isinstance(run, Mapping) or not run:
        raise CheckpointError(f"checkpoint {str(p)!r} has no {config_cls.__name__} run config{hint}")
    try:
        cfg = from_dict(config_cls, run)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(p)!r} does not hold a {config_cls.__name__} run config{hint} ({e})") from e
    return LoadedRun(state, cfg, p)


def load_weights(model: Any, run: LoadedRun, *, ema: bool = True, warn_missing_ema: bool = False) -> Any:
    """Load ``run``'s weights (its EMA weights when ``ema`` and present) into ``model``; a
    mismatch is a :class:`CheckpointError` naming the file. Returns ``model``."""
    state = run.state
    weights = state["model"]
    if ema:
        if state.get("ema") is not None:
            weights = state["ema"]["model"]
        elif warn_missing_ema:
            warnings.warn(f"checkpoint {str(run.path)!r} has no EMA weights; loading the raw weights",
                          RuntimeWarning, stacklevel=3)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(run.path)!r} does not fit the model its config describes: {e}") from e
    return model


def replace_train(cfg: Any, train_key: str = "train", **changes: Any) -> Any:
    """``dataclasses.replace`` of the TrainConfig at ``train_key`` (returns the new TrainConfig)."""
    return dataclasses.replace(section(cfg, train_key), **changes)


def keys_given(overrides: Iterable[str]) -> list[str]:
    """The dotted keys of ``key=value`` tokens."""
    return [tok.partition("=")[0].strip() for tok in overrides if "=" in tok]
