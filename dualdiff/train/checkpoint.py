"""Atomic, weights-only-loadable training checkpoints.

A checkpoint is a plain dict of tensors and Python primitives (the config is stored as a
JSON-safe dict), so it loads with ``torch.load(weights_only=True)``: no pickled code runs.
Writes are atomic: the state is written to a temporary file in the same directory, flushed
and fsync'ed, then ``os.replace``d over the target (and the directory fsync'ed), so a crash
at any point leaves either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "FORMAT", "VERSION", "atomic_save", "save_checkpoint",
           "load_checkpoint", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
           "checkpoint_path", "resolve_checkpoint"]

FORMAT = "dualdiff.train.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "model")
_NAME = re.compile(r"^step_(\d+)\.pt$")


from dualdiff.errors import CheckpointError  # noqa: E402  (re-exported here for older imports)


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict, directory: str | os.PathLike, step: int,
                    keep_last: int | None = None) -> Path:
    """Write ``state`` (format/version added) as ``directory/step_XXXXXXXX.pt`` atomically,
    then delete all but the newest ``keep_last`` checkpoints (None or <= 0 keeps all)."""
    state = {"format": FORMAT, "version": VERSION, **state, "step": int(step)}
    path = atomic_save(state, checkpoint_path(directory, step))
    if keep_last is not None and keep_last > 0:
        prune_checkpoints(directory, keep_last)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory`` sorted by step (temporary files are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file, a run directory or its ``checkpoints`` folder (latest).

    Raises ``FileNotFoundError`` (a user error on the CLI) naming the path when there is none.
    """
    p = Path(path)
    if p.is_dir():
        for d in (p, p / "checkpoints"):
            found = latest_checkpoint(d)
            if found is not None:
                return found
        raise FileNotFoundError(f"no checkpoint (step_*.pt) in {str(p)!r} or {str(p / 'checkpoints')!r}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    return p


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    ckpts = list_checkpoints(directory)
    removed = ckpts[:-keep_last] if keep_last > 0 else []
    for p in removed:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return removed


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load and check a checkpoint with ``torch.load(weights_only=True)``.

    Raises FileNotFoundError (missing; lists what the directory holds) or CheckpointError
    (empty, truncated, not a torch file, holds non-weights objects, wrong format/version or
    missing keys).
    """
    path = Path(path)
    if not path.exists():
        near = [p.name for p in list_checkpoints(path.parent)] if path.parent.is_dir() else []
        hint = f"; checkpoints in {path.parent}: {', '.join(near)}" if near else \
            f"; no checkpoints in {path.parent}"
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist{hint}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; pass a file or use "
                              f"latest_checkpoint()")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): an interrupted "
                              f"non-atomic copy? Use an older checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {str(path)!r} ({size} bytes) is corrupt or truncated: "
                              f"it is not a torch.save zip archive")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects that weights_only loading refuses "
            f"(it was not written by dualdiff.train, or stores custom classes): {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} ({size} bytes) is corrupt or truncated "
                              f"and cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, "
                              f"not a dualdiff training checkpoint dict")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a dualdiff training checkpoint "
                              f"(format={state.get('format')!r}; keys: {sorted(map(str, state))[:10]})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{state.get('version')!r}; this dualdiff reads version {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks key(s) {missing}")
    return state


def find_resumable(directory: str | os.PathLike, map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """Newest checkpoint in ``directory`` that loads; unreadable newer ones are skipped with a
    warning (they cannot come from an atomic save, but a disk may still corrupt them)."""
    for p in reversed(list_checkpoints(directory)):
        try:
            return p, load_checkpoint(p, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", RuntimeWarning, stacklevel=2)
    return None
