"""``run_study``: a study from start to report — this rank's runs (:mod:`dualdiff.study.runner`),
the gather over torchrun ranks, then the report (:mod:`dualdiff.study.report`) on rank 0.
Its own module so that the runner and the report never import each other."""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

from dualdiff.study.report import build_report, write_report
from dualdiff.study.runner import Study, _check_manifest, execute_runs, plan_runs, shard

__all__ = ["run_study"]


def run_study(study: Study, out_dir: str | os.PathLike, *, progress: bool = True,
              write: bool = True, dist_timeout: datetime.timedelta | None = None
              ) -> dict[str, Any] | None:
    """Run (or finish) ``study`` in ``out_dir`` and write its report.

    Single process: every run here. Under torchrun (``WORLD_SIZE > 1``): this rank's share
    (:func:`shard`), then a gloo group gathers every rank's records (``dist_timeout``: how
    long a rank waits for the slowest one, default 7 days) and rank 0 writes the report.
    Returns the report (:func:`dualdiff.study.report.build_report`) on rank 0 (None on the
    other ranks); ``write=False`` skips writing the files.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("run_study starts its own process group after the runs: call it "
                           "before torch.distributed is initialised (the experiment's runs must "
                           "not join a DDP group)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(study, out, write=rank == 0)
    t0 = time.perf_counter()
    all_runs = plan_runs(study.arms, study.seeds)
    mine = shard(all_runs, rank, world)
    records = execute_runs(study, mine, out, rank=rank, progress=progress)
    seconds = time.perf_counter() - t0
    if world > 1:
        from dualdiff.train.distributed import init_distributed
        timeout = dist_timeout or datetime.timedelta(days=7)
        init_distributed(backend="gloo", device=None, timeout=timeout)
        try:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (rank, records, seconds))
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return None
        records = [rec for _, recs, _ in gathered for rec in recs]
        rank_seconds = {r: s for r, _, s in gathered}
    else:
        rank_seconds = {0: seconds}
    by_index = {rec.run.index: rec for rec in records}
    if sorted(by_index) != [r.index for r in all_runs]:
        raise RuntimeError("the gathered records do not cover every run of the study")
    ordered = [by_index[r.index] for r in all_runs]
    report = build_report(study, ordered, timing={"seconds_per_rank": rank_seconds,
                                                  "world_size": world})
    if write:
        write_report(report, out)
    return report
