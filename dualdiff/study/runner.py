"""A study's runs: arms x seeds, each run resumable in its own folder, sharded over torchrun ranks.

Layout under ``out_dir``::

    study_manifest.json               the study's config fingerprint (a rerun must match it)
    runs/<arm>/seed_<s>/result.json   a finished run's metrics (written atomically, last)
    runs/<arm>/seed_<s>/error.json    the last failure of that run (traceback), if any
    work/seed_<s>/rank<r>/            the experiment's scratch files for one batch of runs
    study.md, study.json, study.png   the report (:mod:`dualdiff.study.report`)

Runs are numbered seed-major (``index = seed_position * len(arms) + arm_position``). A rerun
skips every run with a ``result.json`` and redoes the others (failed or crashed ones). Under
``torchrun --nproc_per_node N`` rank ``r`` takes the runs with ``index % N == r``; each rank
runs its share as plain single-process work (the torchrun variables are hidden from the
experiment while it runs, so its Trainer does not start DDP), then the ranks join one gloo
group, gather every rank's records, and rank 0 writes the report.

An experiment's :attr:`Study.execute` gets one seed and the list of this rank's pending arms
for that seed (so it can train them together, as toy2d's stacked grid does) and returns
``{arm: {metric: value}}``. An exception, or an arm missing from the answer, is recorded as
that run's failure (``error.json``) and reported, never dropped.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dualdiff.errors import ConfigError

__all__ = ["Run", "RunRecord", "Metric", "Claim", "Comparison", "Study", "plan_runs",
           "shard", "run_dir", "atomic_write_json", "load_record", "execute_runs",
           "config_fingerprint"]

log = logging.getLogger("dualdiff.study")

Value = float | None
Executor = Callable[[int, list[str], Path], Mapping[str, Mapping[str, Value]]]

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")


@dataclass(frozen=True)
class Run:
    """One run of a study: ``arm`` at ``seed``; ``index`` its seed-major position."""
    index: int
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/seed_{self.seed}"


@dataclass
class RunRecord:
    """What became of one run: ``status`` ``done`` (``metrics`` set) or ``failed`` (``error``
    set); ``cached``: finished by an earlier invocation and skipped by this one."""
    run: Run
    status: Literal["done", "failed"]
    metrics: dict[str, Value] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    cached: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A metric every run reports; ``lower_is_better`` only orients the report's text."""
    name: str
    label: str
    lower_is_better: bool = True


@dataclass(frozen=True)
class Comparison:
    """A paired difference ``metric(arm) - metric(baseline)`` reported with its interval."""
    arm: str
    baseline: str
    metric: str


@dataclass(frozen=True)
class Claim:
    """A claim judged by :func:`dualdiff.study.stats.verdict`: ``metric(arm)`` is
    ``direction`` (lower | higher) than ``metric(baseline)``. ``cited``: the seed document's
    own number or statement for it (a citation, shown beside the result); ``source`` where it
    comes from."""
    name: str
    text: str
    arm: str
    baseline: str
    metric: str
    direction: Literal["lower", "higher"] = "lower"
    cited: str | None = None
    source: str | None = None


@dataclass
class Study:
    """Everything the runner and the report need from an experiment.

    ``execute(seed, arms, work_dir) -> {arm: {metric: value}}`` runs the given arms at one
    seed (same seed -> same data and noise draws for every arm: common random numbers) and
    returns every arm's metrics (``None``/NaN for a value that could not be computed).
    ``cited[(arm, metric)]``: the seed document's number beside an arm. ``config``: the
    study's JSON-safe config (written to the report); ``fingerprint``: what a rerun in the
    same folder must match (:func:`config_fingerprint`). ``notes``: lines for the report
    (e.g. what the common random numbers cover). ``threads``: ``torch.set_num_threads`` while
    ``execute`` runs (0: unchanged).
    """
    name: str
    arms: list[str]
    seeds: list[int]
    metrics: list[Metric]
    execute: Executor
    claims: list[Claim] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    cited: dict[tuple[str, str], float | str] = field(default_factory=dict)
    cited_source: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    preset: str | None = None
    notes: list[str] = field(default_factory=list)
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be non-empty and distinct, got {self.arms}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be non-empty and distinct, got {self.seeds}")
        names = {m.name for m in self.metrics}
        for c in [*self.claims, *self.comparisons]:
            for a in (c.arm, c.baseline):
                if a not in self.arms:
                    raise ValueError(f"{c}: unknown arm {a!r}")
            if c.metric not in names:
                raise ValueError(f"{c}: unknown metric {c.metric!r}")
        for c in self.claims:
            if c.direction not in ("lower", "higher"):
                raise ValueError(f"claim {c.name!r}: direction must be lower|higher")


def config_fingerprint(config: Mapping[str, Any], exclude: Sequence[str] = ()) -> str:
    """A short hash of ``config`` (a nested JSON-safe dict) without the dotted keys
    ``exclude`` (e.g. ``seeds``, the device)."""
    def drop(d: Any, prefix: str) -> Any:
        if not isinstance(d, Mapping):
            return d
        return {k: drop(v, prefix + k + ".") for k, v in d.items() if prefix + k not in exclude}
    text = json.dumps(drop(config, ""), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_runs(arms: Sequence[str], seeds: Sequence[int]) -> list[Run]:
    """Every (arm, seed) run, seed-major: ``index = i_seed * len(arms) + i_arm``."""
    return [Run(i * len(arms) + j, a, s) for i, s in enumerate(seeds) for j, a in enumerate(arms)]


def shard(runs: Sequence[Run], rank: int, world_size: int) -> list[Run]:
    """Rank ``rank``'s share: the runs with ``index % world_size == rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return [r for r in runs if r.index % world_size == rank]


def _safe(name: str) -> str:
    bad = set('<>:"\\|?*') | {os.sep}
    return "".join("_" if ch in bad else ch for ch in name)


def run_dir(out_dir: str | os.PathLike, run: Run) -> Path:
    """The run's own folder: ``out_dir/runs/<arm>/seed_<seed>`` (an arm's ``/`` nests)."""
    parts = [_safe(p) for p in run.arm.split("/") if p not in ("", ".", "..")]
    return Path(out_dir, "runs", *parts, f"seed_{run.seed}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (a reader
    sees the old file or the whole new one, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _clean(v: Any) -> Value:
    if v is None:
        return None
    f = float(v)
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def load_record(out_dir: str | os.PathLike, run: Run) -> RunRecord | None:
    """The finished run's record from its ``result.json``, or None when it has none (never
    run, failed or crashed) or the file is unreadable."""
    p = run_dir(out_dir, run) / "result.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        if d.get("arm") != run.arm or d.get("seed") != run.seed:
            return None
        return RunRecord(run, "done", dict(d["metrics"]), None, d.get("seconds"), True,
                         dict(d.get("info", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _single_process_env(threads: int = 0) -> Iterator[None]:
    """Hide torchrun's RANK / WORLD_SIZE ... so code run inside sees one process (LOCAL_RANK
    stays: it picks this rank's GPU); with ``threads`` > 0 set torch's CPU threads meanwhile."""
    import torch

    saved = {k: os.environ.pop(k) for k in _DIST_VARS if k in os.environ}
    saved_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.environ.update(saved)
        if threads > 0:
            torch.set_num_threads(saved_threads)


def execute_runs(study: Study, runs: Sequence[Run], out_dir: str | os.PathLike, *,
                 rank: int = 0, progress: bool = True) -> list[RunRecord]:
    """Run the given ``runs`` (skipping finished ones) and return one record per run.

    This rank's pending runs are grouped by seed (in index order) and each group goes to
    ``study.execute`` at once. A finished run's ``result.json`` is written atomically, its
    stale ``error.json`` removed; a failure writes ``error.json`` and is returned as a
    ``failed`` record.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    records: dict[int, RunRecord] = {}
    pending: list[Run] = []
    for r in runs:
        rec = load_record(out, r)
        if rec is not None:
            records[r.index] = rec
        else:
            pending.append(r)
    by_seed: dict[int, list[Run]] = {}
    for r in pending:
        by_seed.setdefault(r.seed, []).append(r)
    bar = tqdm(total=len(runs), initial=len(records), desc=f"{study.name} study rank {rank}",
               unit="run", disable=not progress, position=rank, leave=True)
    try:
        for seed, group in by_seed.items():
            arms = [r.arm for r in group]
            work = out / "work" / f"seed_{seed}" / f"rank{rank}"
            bar.set_postfix_str(f"seed {seed}: {len(arms)} arms")
            t0 = time.perf_counter()
            try:
                with _single_process_env(study.threads):
                    answer = dict(study.execute(seed, arms, work))
                error = None
            except Exception:  # noqa: BLE001 - recorded and reported, the study goes on
                answer, error = {}, traceback.format_exc()
                log.error("study %s: seed %d failed for %d runs:\n%s", study.name, seed,
                          len(arms), error)
            seconds = (time.perf_counter() - t0) / len(group)
            for r in group:
                records[r.index] = _finish(out, r, answer, error, seconds, study)
            bar.update(len(group))
    finally:
        bar.close()
    return [records[r.index] for r in runs]


def _finish(out: Path, run: Run, answer: Mapping[str, Any], error: str | None,
            seconds: float, study: Study) -> RunRecord:
    d = run_dir(out, run)
    d.mkdir(parents=True, exist_ok=True)
    if error is None and run.arm not in answer:
        error = f"the experiment returned no result for arm {run.arm!r}"
    if error is None:
        raw = dict(answer[run.arm])
        missing = [m.name for m in study.metrics if m.name not in raw]
        if missing:
            error = f"the experiment's result for {run.arm!r} lacks metrics {missing}"
    if error is not None:
        atomic_write_json(d / "error.json", {"arm": run.arm, "seed": run.seed, "error": error,
                                             "time": _now()})
        return RunRecord(run, "failed", {}, error, seconds)
    metrics = {m.name: _clean(raw.pop(m.name)) for m in study.metrics}
    info = {k: v for k, v in raw.items() if isinstance(v, (str, int, float, bool, type(None)))}
    atomic_write_json(d / "result.json", {"arm": run.arm, "seed": run.seed, "metrics": metrics,
                                          "seconds": seconds, "info": info, "time": _now()})
    (d / "error.json").unlink(missing_ok=True)
    return RunRecord(run, "done", metrics, None, seconds, False, info)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _check_manifest(study: Study, out: Path, write: bool = True) -> None:
    p = out / "study_manifest.json"
    if p.is_file():
        old = json.loads(p.read_text())
        if old.get("fingerprint") != study.fingerprint or old.get("arms") != study.arms:
            raise ConfigError(
                f"--out-dir {out} holds a study with another config (fingerprint "
                f"{old.get('fingerprint')} vs {study.fingerprint}, or other arms): finished runs "
                "would be mixed; rerun with the same config or choose a new --out-dir")
        dropped = sorted(set(old.get("seeds", [])) - set(study.seeds))
        if dropped:
            raise ConfigError(
                f"--out-dir {out} already ran seeds {dropped} that this config leaves out: a study "
                "reports every seed it ran (raise seeds=, or choose a new --out-dir)")
    if write:
        atomic_write_json(p, {"study": study.name, "fingerprint": study.fingerprint,
                              "arms": study.arms, "seeds": study.seeds,
                              "config": study.config})
