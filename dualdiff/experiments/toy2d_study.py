"""``dualdiff toy2d study``: the toy2d comparison over N seeds, with intervals and verdicts.

Arms: every ``variant/dataset`` of the experiment's grid (baseline MLP, dual-scale ``fixed``
0.5, learnable timestep-conditioned weighting ``adaptive``, deeper weight network
``adaptive_deep``; circle, dino, line, moons). Metrics per run: ``kl_divergence`` (the toy2d
k-NN KL of EMA samples vs the training set, lower is better) and ``eval_loss``.

Claims (one per dataset): "adaptive weighting lowers KL vs baseline", judged by
:data:`dualdiff.study.stats.VERDICT_RULE`, with the seed's own KL numbers beside them
(:data:`SEED_KL`, a citation). Every other variant's paired difference to the baseline is
reported too, and adaptive's to fixed (the weighting alone, same dual-scale model), without
a verdict.

A study seed ``s`` is the experiment's ``train.seed``: all four variants of a dataset then see
the same training set, the same batches (indices, timesteps, noise), the same eval-loss draws
and the same sampling noise (toy2d's :func:`~dualdiff.experiments.toy2d.run_seeds`); their
initial weights differ (the architectures differ). The runs of one seed that a process owns
are trained together as one stacked grid (:func:`~dualdiff.experiments.toy2d.train_grid`): a
run's result does not depend on which other runs share its grid.

    dualdiff toy2d study --out-dir runs/toy2d-study preset=tiny          # CPU, minutes
    dualdiff toy2d study --out-dir runs/toy2d-study seeds=5              # template sizes
    torchrun --nproc_per_node 2 -m dualdiff toy2d study --out-dir DIR preset=tiny
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualdiff.experiments.toy2d import (Toy2DConfig, evaluate_grid, grid_runs, load_datasets,
                                        train_grid)
from dualdiff.study import Claim, Comparison, Metric, Study, StudySettings

__all__ = ["Toy2DStudyConfig", "TOY2D_STUDY_PRESETS", "SEED_KL", "SEED_KL_SOURCE",
           "build_toy2d_study", "run_toy2d_seed", "register_toy2d_study"]

# The seed document's KL table (baseline and adaptive variants only), a citation: these are
# not results of this package. Recorded in benchmarks/RESULTS.md (2026-11-23, "toy2d: the
# full grid at the template's settings", column "seed's KL").
SEED_KL: dict[tuple[str, str], float] = {
    ("baseline", "circle"): 0.35, ("baseline", "dino"): 0.99,
    ("baseline", "line"): 0.16, ("baseline", "moons"): 0.09,
    ("adaptive", "circle"): 0.35, ("adaptive", "dino"): 0.87,
    ("adaptive", "line"): 0.16, ("adaptive", "moons"): 0.10,
}
SEED_KL_SOURCE = ("the seed document's toy2d KL table (10 000 steps, one seed, baseline and "
                  "adaptive only), as recorded in benchmarks/RESULTS.md, 2026-11-23, column "
                  "\"seed's KL\"")

METRICS = [Metric("kl_divergence", "KL (bits)"), Metric("eval_loss", "eval loss")]


def _study_experiment(base: Toy2DConfig) -> Toy2DConfig:
    # a study keeps only the numbers: no plots, no saved models, no inner progress bar
    # (and no checkpoints: a run is redone whole, its result is its result.json)
    return dataclasses.replace(base, plots=False, save_models=False,
                               train=dataclasses.replace(base.train, progress=False,
                                                         checkpoint_every=0, save_final=False))


@dataclass
class Toy2DStudyConfig(StudySettings):
    """``seeds`` x the grid ``experiment.variants x experiment.datasets``; ``experiment`` is
    the toy2d config each run uses (its ``train.seed`` is set to the study seed)."""
    experiment: Toy2DConfig = field(default_factory=lambda: _study_experiment(Toy2DConfig()))


def _tiny() -> Toy2DStudyConfig:
    """The CPU preset: toy2d's tiny sizes (1000 points, 16/32-wide one-layer models) trained
    10x longer than its smoke preset, with the template's batch of 256 (a step of these tiny
    stacked models costs about the same at 64 and 256) and 1000 samples per run for the KL;
    4 seeds, one CPU thread. Budget: at most 15 minutes on 2 shared CPU cores (measured 7.5
    minutes wall, 3.2 minutes of CPU, at a load average of 6-10 on 2 cores)."""
    exp = Toy2DConfig.from_name("tiny")
    exp = dataclasses.replace(exp, n_samples=1000, train=dataclasses.replace(
        exp.train, steps=2000, batch_size=256, log_every=500))
    return Toy2DStudyConfig(seeds=4, threads=1, experiment=_study_experiment(exp))


TOY2D_STUDY_PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "default": lambda: Toy2DStudyConfig(seeds=5),
}


def run_toy2d_seed(config: Toy2DStudyConfig, seed: int, arms: list[str], work_dir: Path
                   ) -> dict[str, dict[str, Any]]:
    """Train and evaluate the ``variant/dataset`` runs ``arms`` at experiment seed ``seed``
    together in one grid (the Trainer's files under ``work_dir``, cleared first); returns ``{arm: {"kl_divergence", "eval_loss", ...}}``."""
    exp = config.experiment
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, seed=seed))
    order = {r: i for i, r in enumerate(grid_runs(exp))}
    runs = sorted((tuple(a.split("/")) for a in arms), key=lambda r: order[r])  # variant-major
    if len(runs) != len(arms):
        raise ValueError(f"duplicated arms in {arms}")
    data = load_datasets(exp, sorted({d for _, d in runs}))
    work_dir = Path(work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)  # a crashed earlier attempt's scratch files
    training = train_grid(runs, data, exp, work_dir / "train")
    results = evaluate_grid(training, data, exp)
    out = {}
    for v, d in runs:
        info = results.runs[f"{v}/{d}"]
        out[f"{v}/{d}"] = {"kl_divergence": info["kl_divergence"],
                           "eval_loss": info["eval_loss"],
                           "final_train_loss": info["final_train_loss"],
                           "training_time_share": info["training_time"],
                           "device": info["device"], "kl_note": info.get("kl_note")}
    return out


def build_toy2d_study(config: Toy2DStudyConfig, preset: str | None = None) -> Study:
    """The :class:`~dualdiff.study.Study` of ``config`` (arms, claims, citations, executor)."""
    from dualdiff.config import to_dict
    from dualdiff.study.runner import config_fingerprint

    exp = config.experiment
    arms = [f"{v}/{d}" for v, d in grid_runs(exp)]
    claims, comparisons = [], []
    for d in exp.datasets:
        if "baseline" not in exp.variants:
            break
        for v in exp.variants:
            if v == "baseline":
                continue
            for m in METRICS:
                comparisons.append(Comparison(f"{v}/{d}", f"baseline/{d}", m.name))
        if "adaptive" in exp.variants and "fixed" in exp.variants:
            # the weighting itself: adaptive vs the same dual-scale model at a fixed 0.5
            for m in METRICS:
                comparisons.append(Comparison(f"adaptive/{d}", f"fixed/{d}", m.name))
        if "adaptive" in exp.variants:
            b, a = SEED_KL.get(("baseline", d)), SEED_KL.get(("adaptive", d))
            cited = None if a is None or b is None else \
                f"KL {b:.2f} (baseline) vs {a:.2f} (adaptive): {a - b:+.2f}"
            claims.append(Claim(
                name=f"adaptive < baseline KL, {d}",
                text=f"adaptive weighting lowers KL vs baseline on {d}",
                arm=f"adaptive/{d}", baseline=f"baseline/{d}", metric="kl_divergence",
                direction="lower", cited=cited, source=SEED_KL_SOURCE))
    cfg_dict = to_dict(config)
    e, t = exp, exp.train
    notes = [
        "Common random numbers: a seed gives every variant of a dataset the same training set, "
        "batches (indices, timesteps, noise), eval-loss draws and sampling noise; the initial "
        "weights differ between variants (different architectures).",
        f"Scale: {t.steps} steps of batch {t.batch_size} on {e.data.n_train} points, models "
        f"{e.model.embedding_dim}/{e.model.hidden_dim} wide with {e.model.hidden_layers} hidden "
        f"layers, KL (k={e.kl_k}, bits) of {e.n_samples} EMA samples vs the training set. The "
        "seed's numbers come from the template's scale (10 000 steps, 100 000 points, 10 000 "
        "samples): compare directions, not values, when the scales differ.",
    ]
    return Study(
        name="toy2d", arms=arms, seeds=config.seed_list(), metrics=list(METRICS),
        execute=lambda seed, a, w: run_toy2d_seed(config, seed, a, w),
        claims=claims, comparisons=comparisons,
        cited={(f"{v}/{d}", "kl_divergence"): kl for (v, d), kl in SEED_KL.items()
               if f"{v}/{d}" in arms},
        cited_source=SEED_KL_SOURCE, config=cfg_dict,
        fingerprint=config_fingerprint(cfg_dict, ("seeds", "first_seed", "threads",
                                                  "experiment.train.device",
                                                  "experiment.train.out_dir")),
        preset=preset, notes=notes, threads=config.threads)


def register_toy2d_study(toy2d_subparsers: Any) -> Any:
    """Add ``study`` to the ``dualdiff toy2d`` subcommands (``toy2d_subparsers``: the
    ``add_subparsers()`` object of the toy2d parser)."""
    from dualdiff.study.cli import add_study_command

    return add_study_command(
        toy2d_subparsers, Toy2DStudyConfig, build_toy2d_study, presets=TOY2D_STUDY_PRESETS,
        default_preset="default",
        default_out_dir="runs/toy2d-study",
        help="compare the variants over N seeds: KL and eval loss with 95 % intervals, "
             "verdicts on 'adaptive lowers KL'",
        description=__doc__)
