"""Studies: an experiment's comparison over N seeds, with intervals and fixed verdict rules.

* :mod:`dualdiff.study.stats`  Student-t intervals, paired differences, the verdict rule
* :mod:`dualdiff.study.runner` runs = arms x seeds, resumable, sharded over torchrun ranks
* :mod:`dualdiff.study.report` study.md, study.json and study.png
* :mod:`dualdiff.study.orchestrator` ``run_study``: runs, gather, report
* :mod:`dualdiff.study.cli`    ``add_study_command``: the ``dualdiff <exp> study`` command

An experiment adds its study by building a :class:`Study` (arms, seeds, metrics, claims and an
``execute(seed, arms, work_dir) -> {arm: {metric: value}}`` function) from a study config and
registering it with :func:`add_study_command` (example: :mod:`dualdiff.experiments.toy2d_study`).
"""
from __future__ import annotations

from dualdiff.study.cli import StudySettings, add_study_command
from dualdiff.study.orchestrator import run_study
from dualdiff.study.runner import Claim, Comparison, Metric, Run, RunRecord, Study
from dualdiff.study.stats import VERDICT_RULE, Interval, paired_interval, t_interval, verdict

__all__ = ["Study", "Metric", "Claim", "Comparison", "Run", "RunRecord", "run_study",
           "StudySettings", "add_study_command", "VERDICT_RULE", "Interval", "t_interval",
           "paired_interval", "verdict"]
