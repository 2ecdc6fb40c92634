"""Metric sinks: JSONL and CSV always (main process), TensorBoard / W&B on request.

Every record is a flat dict with a ``step`` key. The CSV gains columns when new metric
names appear (the file is rewritten once with the wider header). On resume,
:meth:`MetricsLogger.truncate_after` drops records past the resumed step so that the
files describe one consistent trajectory.

A crash in the middle of a write can leave a torn (incomplete, unterminated) last line.
:func:`read_jsonl` drops a torn *final* line with a warning; a bad line anywhere else is a
:class:`~dualdiff.errors.DataError` naming the file and the line. The logger repairs its
files when it opens them (truncating each to its last complete line, with a warning) so
appended records stay valid, and removes its own leftover ``*.tmp`` files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from dualdiff.errors import DataError

__all__ = ["MetricsLogger", "read_jsonl"]


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # 'nan' / 'inf': strict JSON has no such literals
    return v


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file. A torn final line (a crash mid-write: not valid JSON and
    not newline-terminated) is dropped with a RuntimeWarning; an invalid line elsewhere
    raises :class:`~dualdiff.errors.DataError` naming the file and the line number."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                warnings.warn(f"{path}: dropped the torn last line {i + 1} (an interrupted "
                              f"write): {line[:60]!r}", RuntimeWarning, stacklevel=2)
                break
            raise DataError(f"{path} line {i + 1} is not valid JSON ({e.msg}, column "
                            f"{e.colno}): {line[:80]!r}; fix or delete that line") from e
    return out


def _repair_last_line(path: Path) -> bool:
    """Truncate ``path`` to its last complete (newline-terminated) line when a crash left a
    torn one after it; warns and returns True when it did. A JSONL file whose unterminated
    last line is still valid JSON only gets its newline."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        # find the end of the last complete line
        block, pos = 1 << 16, size
        cut = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            k = chunk.rfind(b"\n")
            if k >= 0:
                cut = start + k + 1
                break
            pos = start
        f.seek(cut)
        tail = f.read()
        if path.suffix == ".jsonl":
            try:
                json.loads(tail.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
            else:  # complete record, only its newline is missing
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                return False
        f.truncate(cut)
    warnings.warn(f"{path}: dropped a torn last line ({len(tail)} bytes, an interrupted "
                  f"write); the file now ends at its last complete line",
                  RuntimeWarning, stacklevel=3)
    return True


class MetricsLogger:
    """Writes ``metrics.jsonl`` and ``metrics.csv`` under ``out_dir``.

    ``enabled=False`` (non-main ranks) makes every call a no-op. ``tensorboard=True`` /
    ``wandb=True`` add those sinks when the packages are installed (a warning otherwise).
    """

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True,
                 tensorboard: bool = False, wandb: bool = False,
                 wandb_kwargs: dict | None = None, config: dict | None = None):
        self.enabled = enabled
        self.dir = Path(out_dir)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self.csv_path = self.dir / "metrics.csv"
        self._columns: list[str] = []
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in (self.jsonl_path.with_suffix(".jsonl.tmp"),
                         self.csv_path.with_suffix(".csv.tmp")):
            if leftover.is_file():  # an interrupted rewrite; the real file is intact
                leftover.unlink()
                warnings.warn(f"removed {leftover}, left by an interrupted write",
                              RuntimeWarning, stacklevel=2)
        _repair_last_line(self.jsonl_path)
        _repair_last_line(self.csv_path)
        if self.csv_path.exists():
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            self._columns = list(header or [])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except Exception as e:  # ImportError when tensorboard is missing
                warnings.warn(f"tensorboard logging requested but unavailable: {e}",
                              RuntimeWarning, stacklevel=2)
        if wandb:
            try:
                import wandb as _wandb
                self._wandb = _wandb.init(config=config, dir=str(self.dir),
                                          **(wandb_kwargs or {}))
            except Exception as e:
                warnings.warn(f"wandb logging requested but unavailable: {e}",
                              RuntimeWarning, stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: _jsonable(v) for k, v in record.items()}
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self._write_csv(rec)
        step = int(rec.get("step", 0))
        numeric = {k: v for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def _write_csv(self, rec: dict[str, Any]) -> None:
        new = [k for k in rec if k not in self._columns]
        if new or not self.csv_path.exists():
            rows = []
            if self.csv_path.exists() and self._columns:
                with open(self.csv_path, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            self._columns = self._columns + new
            self._rewrite_csv(rows)
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(
                {k: rec.get(k, "") for k in self._columns})

    def _rewrite_csv(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in self._columns})
        tmp = self.csv_path.with_suffix(".csv.tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, self.csv_path)

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (used when resuming from a checkpoint)."""
        if not self.enabled:
            return
        if self.jsonl_path.exists():
            keep = [r for r in read_jsonl(self.jsonl_path) if int(r.get("step", 0)) <= step]
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
            os.replace(tmp, self.jsonl_path)
        if self.csv_path.exists() and self._columns:
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= step]
            self._rewrite_csv(rows)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
