"""Atomic, weights-only-loadable training checkpoints.

A checkpoint is a plain dict of tensors and Python primitives (the config is stored as a
JSON-safe dict), so it loads with ``torch.load(weights_only=True)``: no pickled code runs.
Writes are atomic: the state is written to a temporary file in the same directory, flushed
and fsync'ed, then ``os.replace``d over the target (and the directory fsync'ed), so a crash
at any point leaves either the previous checkpoint or the new one, never a torn file.

What a crash can still leave behind, and how it is handled:

* a process killed inside :func:`atomic_save` (SIGKILL, power cut) leaves its temporary
  file ``.step_XXXXXXXX.pt.<random>.tmp``; :func:`remove_stale_tmp` (called by the Trainer
  at start) deletes such files with a one-line warning;
* a full disk (``ENOSPC``/``EDQUOT``, ``EFBIG`` from a file-size limit, or torch's
  ``RuntimeError [enforce fail at inline_container.cc]`` that wraps them) becomes one
  :class:`CheckpointError` naming the folder and the bytes needed; the partial temporary
  file is removed;
* pruning (``keep_last``) never deletes the checkpoint just written nor one with a higher
  step (e.g. an unreadable newer file left by another run), so the newest *loadable* state
  always survives;
* :func:`find_resumable` raises :class:`CheckpointError` when checkpoint files exist but
  none loads, so ``resume='auto'`` never silently restarts from scratch over them.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "FORMAT", "VERSION", "atomic_save", "save_checkpoint",
           "load_checkpoint", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
           "checkpoint_path", "resolve_checkpoint", "find_resumable", "remove_stale_tmp",
           "DISK_FULL_ERRNOS"]

FORMAT = "dualdiff.train.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "model")
_NAME = re.compile(r"^step_(\d+)\.pt$")
# the temporary files atomic_save makes: "." + target name + "." + mkstemp's random part + ".tmp"
_TMP = re.compile(r"^\..+\.pt\.[A-Za-z0-9_]+\.tmp$")
# errnos that mean "the file system will not take more bytes"
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None),
                                         errno.EFBIG) if e is not None)


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


def _nbytes(obj: Any) -> int:
    """Bytes of tensor data in ``obj`` (nested dicts/lists/tuples): what torch.save writes,
    less a few KiB of pickle and zip headers."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _disk_full_cause(exc: BaseException) -> OSError | None:
    """The OSError meaning "no space" behind ``exc`` (itself, or the cause/context torch's
    ``inline_container`` RuntimeError wraps), else None."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _is_torch_write_error(exc: BaseException) -> bool:
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in msg
                                              or "PytorchStreamWriter" in msg)


def _write_error(exc: BaseException, path: Path, needed: int) -> CheckpointError | None:
    """A one-line CheckpointError for a failed write of ``path`` (disk full, file-size limit,
    torch's zip writer failing), or None for other errors (re-raised unchanged)."""
    full = _disk_full_cause(exc)
    if full is None and not _is_torch_write_error(exc):
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:  # pragma: no cover
        free = None
    need = f"it needs about {needed:,} bytes" + (f", {free:,} are free" if free is not None
                                                 else "")
    if full is not None and full.errno == errno.EFBIG:
        what = "the file size limit was reached (EFBIG: ulimit -f / RLIMIT_FSIZE)"
    elif full is not None:
        what = f"no space left on the device ({errno.errorcode.get(full.errno, full.errno)})"
    elif free is not None and free < needed:
        what = "no space left on the device"
    else:
        what = f"the write failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return CheckpointError(
        f"cannot write checkpoint {path.name!r} in {str(path.parent)!r}: {what}; {need}. "
        f"Free space there (or set keep_last lower / out_dir elsewhere), then resume; the "
        f"partial file was removed and the previous checkpoints are intact")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + os.replace).

    A full disk or file-size limit raises :class:`CheckpointError` (one line naming the
    folder and the bytes needed); on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        err = _write_error(e, path, _nbytes(obj)) if isinstance(e, Exception) else None
        if err is not None:
            raise err from e
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_save` left in ``directory``
    (``.<name>.pt.<random>.tmp``), warning once (one line) when there were any. Call it
    only when no other process is writing checkpoints to ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in sorted(d.iterdir()):
        if _TMP.match(p.name) and p.is_file():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    if removed:
        warnings.warn(f"removed {len(removed)} partial checkpoint file(s) left by an "
                      f"interrupted write in {str(d)!r}: "
                      f"{', '.join(p.name for p in removed)}", RuntimeWarning, stacklevel=2)
    return removed


def save_checkpoint(state: dict, directory: str | os.PathLike, step: int,
                    keep_last: int | None = None) -> Path:
    """Write ``state`` (format/version added) as ``directory/step_XXXXXXXX.pt`` atomically,
    then delete all but the newest ``keep_last`` checkpoints up to ``step`` (None or <= 0
    keeps all; see :func:`prune_checkpoints`: nothing at or after ``step`` is deleted)."""
    state = {"format": FORMAT, "version": VERSION, **state, "step": int(step)}
    path = atomic_save(state, checkpoint_path(directory, step))
    if keep_last is not None and keep_last > 0:
        prune_checkpoints(directory, keep_last, current_step=int(step))
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


def _step_of(p: Path) -> int:
    return int(_NAME.match(p.name).group(1))


def prune_checkpoints(directory: str | os.PathLike, keep_last: int,
                      current_step: int | None = None) -> list[Path]:
    """Delete old checkpoints, keeping the newest ``keep_last`` (<= 0: delete nothing).

    With ``current_step`` (the step just saved) only checkpoints *older* than it are
    candidates: the one at ``current_step`` and any with a higher step (another run's, or an
    unreadable leftover) are never deleted, and the kept ones are the ``keep_last`` newest
    at or below ``current_step``. Returns the deleted paths."""
    ckpts = list_checkpoints(directory)
    if current_step is not None:
        ckpts = [p for p in ckpts if _step_of(p) <= current_step]
        if not any(_step_of(p) == current_step for p in ckpts):
            return []  # the file just written is gone (e.g. removed by hand): touch nothing
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
    """Newest checkpoint in ``directory`` that loads, as ``(path, state)``; None when the
    directory holds no checkpoint file. Unreadable newer ones are skipped with a warning
    (they cannot come from an atomic save, but a disk may still corrupt them). When files
    exist but none loads, raises :class:`CheckpointError` naming them and how to continue:
    starting from scratch over them silently would lose the run."""
    found = list_checkpoints(directory)
    errors = []
    for p in reversed(found):
        try:
            return p, load_checkpoint(p, map_location)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping unreadable checkpoint: {e}", RuntimeWarning, stacklevel=2)
    if found:
        raise CheckpointError(
            f"none of the {len(found)} checkpoint(s) in {str(directory)!r} can be loaded "
            f"({'; '.join(errors)}). Resume from a good copy with --resume PATH (resume=PATH), "
            f"or move these files away to start from scratch")
    return None
