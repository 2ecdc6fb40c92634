"""toy2d experiment: DDPM on 2-D point sets, every (variant, dataset) run trained at once.

The template (SakanaAI/AI-Scientist ``templates/2d_diffusion/experiment.py``) trains one MLP
denoiser per dataset, one after the other. Here the runs of a grid (variants x datasets) are
trained together: the models of one variant are stacked (:class:`dualdiff.models.stacked.
StackedModels`, ``vmap(functional_call)``), the variants' stacks sit side by side in one
:class:`ToyGridModel`, and one :class:`dualdiff.train.Trainer` step advances every run.

Entry points (in the order :func:`run_grid` calls them)::

    cfg = Toy2DConfig.from_name("tiny")            # or Toy2DConfig(), or the CLI's config
    training = train_grid(grid_runs(cfg), load_datasets(cfg), cfg, out / "train")
    results = evaluate_grid(training, data, cfg)   # eval loss, samples, KL, weights, timings
    write_results(results, cfg, out, ema_model=training.ema_model)
    plot_results(out)                              # the three PNGs, from the saved files
    load_results(out)                              # everything written, read back
    demo_toy2d(Toy2DConfig.from_name("demo"))      # run_grid + demo.png / demo.md

Config: :class:`Toy2DConfig` nests the shared :class:`~dualdiff.train.TrainConfig` as ``train``
(steps, batch size, optimizer, schedule, clipping, EMA, checkpoints, compile, device, seed) and
its own ``model`` / ``data`` sections; presets ``tiny``, ``demo`` and ``default`` (:data:`TOY2D_PRESETS`).

Per run the training is the template's:

* data: the run's dataset (``data.n_train`` = 100 000 points), batches of 256 drawn without
  replacement from a fresh permutation each epoch (the template's ``DataLoader(shuffle=True)``;
  its final partial batch of each epoch, 160 points, is dropped here so that every step of
  every run has the same batch size); t ~ U{0..T-1}, noise ~ N(0, I);
* loss: ``mse(model(q_sample(x0, t, noise), t), noise)`` (mean over the batch);
* T = 100 linear betas 1e-4..0.02; AdamW lr 3e-4 (weight decay 0.01, torch's AdamW default,
  which the template inherits), cosine annealing to 0 over ``train.steps``; gradient norm clipped
  to 0.5 **per run** (:meth:`StackedModels.clip_grad_norm_`); EMA as ema-pytorch's
  ``EMA(model, beta=0.995, update_every=10)``, which the template builds: the weights are copied
  up to step 100 (``update_after_step=100``), then averaged every 10 steps with the decay ramp
  ``min(0.995, 1 - (1 + s)^(-2/3))`` (``inv_gamma=1``, ``power=2/3``; 0.995 near step 2 900).
  ``train.ema_update_after_step=None train.ema_power=None train.ema_warmup=100`` gives the
  constant-decay EMA of dualdiff before 2026-12-07;
  fp32 (``train.amp=off``), as the template. On CUDA, AdamW is fused unless
  ``train.optimizer_kwargs.fused`` says otherwise.

The grid's loss is the **sum** of the runs' mean losses, so each run's gradient is exactly its own
(d loss / d loss_run = 1) and element-wise AdamW treats every run independently.

Randomness: run (variant, dataset) is initialised from ``derive_seed(train.seed, "init", variant,
dataset)``; its batches (permutations, t, noise) depend only on ``derive_seed(train.seed, "data",
dataset)`` and the step index (all variants see the *same* batches of a dataset: common random
numbers for the comparison), drawn ``data.chunk_steps`` steps at a time on the CPU. A run
trained alone with the same seed therefore sees the same data and starts from the same weights
as inside the grid (a test trains each run alone and checks the weights agree).

Evaluation, per run (as the template):

* ``eval_loss``: one pass over the whole training set in shuffled batches of ``train.batch_size``
  (the last one partial) with the trained, non-EMA model, fresh t and noise; the mean of the
  per-batch mean losses;
* ``inference_time``: DDPM ancestral sampling (posterior variance, no clipping) of
  ``n_samples`` = 10 000 points with the EMA model, T steps, through the shared
  :func:`dualdiff.diffusion.ddpm_sample` with one generator per run. The runs of a variant are
  sampled together (one vmapped call per step); the group's wall time is divided by the number
  of runs;
* ``kl_divergence``: :func:`dualdiff.metrics.kldiv` (npeet's estimator, k = 5, base 2) between
  the training set and the samples;
* ``training_time``: the grid trains as one job, so a run's share is the grid's wall time divided
  by the number of runs. ``grid_training_time`` (the whole grid, including any torch.compile
  warm-up) and ``grid_first_steps_time`` (the first ``warmup_steps_timed`` steps, where
  compilation and CUDA-graph recording happen) are reported beside it;
* for the adaptive variants, the EMA model's (global, local) weights at every timestep.

Outputs under ``out_dir``::

    <variant>/<dataset>/final_info.json   the run's metrics (the template's 4 keys + context)
    <variant>/<dataset>/samples.npy       [n_samples, 2] generated points
    <variant>/<dataset>/train_losses.npy  [steps] per-step training loss
    <variant>/<dataset>/weights.npy       [T, 2] (global, local) weight per timestep (adaptive)
    <variant>/<dataset>/ema_model.pt      the run's EMA state dict (save_models=True)
    <variant>/final_info.json             the template's layout: {dataset: {"means": {...}}}
    all_results.npz                       "<variant>/<dataset>/{train_losses,images,weights}"
    all_results.json                      every run's metrics, the timings and the config
    train_loss.png, generated_images.png, weight_evolution.png
    train/                                the Trainer's metrics.jsonl and config.yaml
    train/checkpoints/                    grid checkpoints (every ``train.checkpoint_every``
                                          steps and the final one): ``run_grid(resume=True)`` /
                                          ``dualdiff toy2d run --resume`` continue from them

Size (over ~500 lines): the config, the stacked grid model and its per-run batch streams,
training, evaluation and the result files of one grid stay together because every part is
specific to training many tiny runs at once; :class:`ToyGridModel` / :class:`RunBatches` /
:class:`GridBatches` are the next candidates for ``dualdiff.models`` / ``dualdiff.data``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dualdiff.data.toy2d import DATASETS, get_dataset
from dualdiff.diffusion import NoiseSchedule, ddpm_sample, make_schedule, q_sample
from dualdiff.diffusion.samplers import randn_chunks
from dualdiff.errors import ConfigError
from dualdiff.experiments.run import apply_run_flags, check_resume, from_name, normalize_resume
from dualdiff.metrics.kl import kldiv_noted
from dualdiff.models.stacked import StackedModels
from dualdiff.models.toy2d import VARIANTS, build_toy_model
from dualdiff.train import TrainConfig, Trainer
from dualdiff.train.distributed import default_device
from dualdiff.utils.seed import derive_seed

__all__ = [
    # config
    "Toy2DConfig",
    "Toy2DModelConfig",
    "Toy2DDataConfig",
    "TOY2D_PRESETS",
    # entry points
    "run_grid",
    "train_grid",
    "evaluate_grid",
    "write_results",
    "plot_results",
    "load_results",
    "demo_toy2d",
    "demo_report",
    # building blocks
    "GridTraining",
    "GridResults",
    "ToyGridModel",
    "RunBatches",
    "GridBatches",
    "grid_runs",
    "run_seeds",
    "load_datasets",
    "build_run_model",
    "make_toy_schedule",
    "trainer_config",
    "evaluate_eval_loss",
    "sample_runs",
    "branch_weights",
]

log = logging.getLogger("dualdiff.toy2d")



# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def _check_int(obj: Any, names: Sequence[str], low: int, prefix: str = "") -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{prefix}{name} must be an int >= {low}, got {v!r}")


def _check_names(names: Any, allowed: Sequence[str], what: str) -> None:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{what} must be a list of names from {', '.join(allowed)}, got "
                         f"{names!r}")
    if not names:
        raise ConfigError(f"{what}: empty; choose from {', '.join(allowed)}")
    for n in names:
        if n not in allowed:
            raise ConfigError(f"{what}: unknown name {n!r}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: duplicated names in {list(names)}")


@dataclass
class Toy2DModelConfig:
    """Denoiser sizes (each branch of the dual-scale variants has the baseline's sizes) and the
    dual-scale local branch's input: ``upscale`` = linear (the seed's) | factor."""
    embedding_dim: int = 128
    hidden_dim: int = 256
    hidden_layers: int = 3
    upscale: Literal["linear", "factor"] = "linear"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int(self, ("embedding_dim", "hidden_dim"), 1, "model.")
        _check_int(self, ("hidden_layers",), 0, "model.")
        if self.upscale not in ("linear", "factor"):
            raise ConfigError(f"model.upscale must be 'linear' or 'factor', got {self.upscale!r}")

    def kwargs(self, variant: str) -> dict[str, Any]:
        """:func:`dualdiff.models.toy2d.build_toy_model` keyword arguments for ``variant``."""
        kw: dict[str, Any] = dict(embedding_dim=self.embedding_dim, hidden_dim=self.hidden_dim,
                                  hidden_layers=self.hidden_layers)
        if variant != "baseline":
            kw["upscale"] = self.upscale
        return kw


@dataclass
class Toy2DDataConfig:
    """Training sets: ``n_train`` points per dataset. The dino points come from the package
    (``dino_source=embedded``) or from the full Datasaurus Dozen table (``dino_source=table``:
    ``datasaurus_path``, else the cache, else a download; :mod:`dualdiff.data.toy2d`).
    ``chunk_steps``: the batches' random draws are made this many steps at a time (part of the
    random stream: changing it changes the batches)."""
    n_train: int = 100_000
    dino_source: Literal["embedded", "table"] = "embedded"
    datasaurus_path: str | None = None
    chunk_steps: int = 100

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int(self, ("n_train", "chunk_steps"), 1, "data.")
        if self.dino_source not in ("embedded", "table"):
            raise ConfigError(f"data.dino_source must be 'embedded' or 'table', got "
                             f"{self.dino_source!r}")
        if self.datasaurus_path is not None and self.dino_source != "table":
            raise ConfigError("data.datasaurus_path is set but data.dino_source is 'embedded': "
                             "set data.dino_source=table to read that table (or drop the path)")


def _default_train() -> TrainConfig:
    # the template's settings (module docstring); a final checkpoint of the grid is kept
    return TrainConfig(steps=10_000, batch_size=256, lr=3e-4, optimizer="adamw",
                       weight_decay=0.01, scheduler="cosine", grad_clip=0.5, amp="off",
                       ema_decay=0.995, ema_every=10, ema_update_after_step=100,
                       ema_inv_gamma=1.0, ema_power=2 / 3, out_dir="runs/toy2d",
                       checkpoint_every=2000, keep_last=2, log_every=100, log_grad_norm=True)


@dataclass
class Toy2DConfig:
    """The toy2d grid (``variants`` x ``datasets``); defaults are the template's (module
    docstring). ``train`` is the shared Trainer's config; ``train.out_dir`` is the grid's run
    folder (the Trainer's own files go to ``<run folder>/train``) and ``train.resume`` resumes
    the grid, as in every experiment (:mod:`dualdiff.experiments.run`).

    ``num_timesteps`` / ``beta_start`` / ``beta_end``: the linear noise schedule;
    ``clip_mode``: per-run gradient clipping implementation (exact | batched, see
    :meth:`StackedModels.clip_grad_norm_`); ``n_samples``: points sampled per run for the KL
    (k = ``kl_k`` neighbours); ``warmup_steps_timed``: the first steps timed apart (compile and
    CUDA-graph warm-up; no checkpoint is written inside them); ``save_models``: write each run's
    EMA weights; ``plots``: draw the three plots at the end.
    """
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    model: Toy2DModelConfig = field(default_factory=Toy2DModelConfig)
    data: Toy2DDataConfig = field(default_factory=Toy2DDataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    num_timesteps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_mode: Literal["exact", "batched"] = "exact"
    n_samples: int = 10_000
    kl_k: int = 5
    warmup_steps_timed: int = 3
    save_models: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check this config's own keys and the cross-section ones (each section checks its
        own); raise :class:`~dualdiff.errors.ConfigError` naming the key. Never changes the config."""
        _check_names(self.datasets, DATASETS, "datasets")
        _check_names(self.variants, VARIANTS, "variants")
        _check_int(self, ("num_timesteps", "n_samples", "kl_k"), 1)
        _check_int(self, ("warmup_steps_timed",), 0)
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}")
        if self.clip_mode not in ("exact", "batched"):
            raise ConfigError(f"clip_mode must be 'exact' or 'batched', got {self.clip_mode!r}")
        if self.train.batch_size > self.data.n_train:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be <= "
                             f"data.n_train ({self.data.n_train})")
        if not self.kl_k < min(self.data.n_train, self.n_samples):
            raise ConfigError(f"kl_k ({self.kl_k}) must be < data.n_train ({self.data.n_train}) "
                             f"and n_samples ({self.n_samples})")
        if self.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum must be 1 for toy2d (one batch per step), got "
                             f"{self.train.grad_accum}")

    @classmethod
    def from_name(cls, name: str) -> "Toy2DConfig":
        """A copy of preset ``name`` (:data:`TOY2D_PRESETS`: ``tiny`` | ``default``)."""
        return from_name(TOY2D_PRESETS, name, cls.__name__)

    @classmethod
    def tiny(cls) -> "Toy2DConfig":
        """A smoke-size grid (every code path, about a minute on one CPU core, far from
        converged): 16 runs of a 1-layer 16/32-wide model, 200 steps of 64 on 1000 points,
        500 samples per run."""
        train = dataclasses.replace(_default_train(), steps=200, batch_size=64, lr=1e-3,
                                    ema_update_after_step=20, ema_every=2, log_every=50, progress=False,
                                    out_dir="runs/toy2d-tiny")
        return cls(model=Toy2DModelConfig(embedding_dim=16, hidden_dim=32, hidden_layers=1),
                   data=Toy2DDataConfig(n_train=1000, chunk_steps=50), train=train,
                   n_samples=500)


    @classmethod
    def demo(cls) -> "Toy2DConfig":
        """``dualdiff toy2d demo``'s grid (about 1.3 minutes on one idle CPU core): the 16 runs
        of the tiny preset with 32/64-wide two-layer models, 2000 steps of 256 on 10 000 points,
        2000 samples per run for the KL, written to ``runs/toy2d-demo``."""
        cfg = cls.tiny()
        cfg.model = Toy2DModelConfig(embedding_dim=32, hidden_dim=64, hidden_layers=2)
        cfg.data = Toy2DDataConfig(n_train=10_000, chunk_steps=50)
        cfg.train = dataclasses.replace(cfg.train, steps=2000, batch_size=256, log_every=500,
                                        out_dir="runs/toy2d-demo")
        cfg.n_samples = 2000
        cfg.validate()
        return cfg


#: name -> zero-argument function building a fresh config (``preset=NAME``)
TOY2D_PRESETS: dict[str, Callable[[], Toy2DConfig]] = {"default": Toy2DConfig, "tiny": Toy2DConfig.tiny,
                                                       "demo": Toy2DConfig.demo}


# ---------------------------------------------------------------------------------------------
# entry points: run_grid = train_grid -> evaluate_grid -> write_results -> plot_results
# ---------------------------------------------------------------------------------------------
def run_grid(config: Toy2DConfig | None = None, out_dir: str | os.PathLike | None = None, *,
             resume: bool | str | os.PathLike | None = None) -> dict:
    """Train, evaluate, save and plot the grid ``config.variants x config.datasets``.

    ``out_dir``: the run folder (None: ``config.train.out_dir``). ``resume`` (None: the
    ``train.resume`` key): ``"auto"`` / True (the newest usable checkpoint in
    ``out_dir/train/checkpoints`` when there is one, else fresh; when training had finished,
    go straight to the evaluation), ``"latest"`` (must exist), a checkpoint path, or False
    (fresh) — :mod:`dualdiff.experiments.run`. Timings then cover only the steps trained by
    this call; ``resumed_from_step`` says where it started.
    Returns ``{"runs": {"<variant>/<dataset>": final_info}, "timing": {...}, "out_dir": str}``.
    """
    config = Toy2DConfig() if config is None else config
    if not isinstance(config, Toy2DConfig):
        raise TypeError(f"config must be a Toy2DConfig, got {type(config).__name__}")
    config = apply_run_flags(config, out_dir, resume, presets=TOY2D_PRESETS)
    out = Path(config.train.out_dir)
    check_resume(config.train.resume, out / "train" / "checkpoints")
    resume = config.train.resume
    out.mkdir(parents=True, exist_ok=True)
    runs = grid_runs(config)
    data = load_datasets(config)
    log.info("toy2d: training %d runs (%s x %s) for %d steps", len(runs),
             ",".join(config.variants), ",".join(config.datasets), config.train.steps)
    training = train_grid(runs, data, config, out / "train", resume=resume)
    results = evaluate_grid(training, data, config)
    write_results(results, config, out, ema_model=training.ema_model)
    if config.plots:
        plot_results(out)
    return {"runs": results.runs, "timing": results.timing, "out_dir": str(out)}


@dataclass
class GridTraining:
    """What :func:`train_grid` returns."""
    runs: list[tuple[str, str]]
    trainer: Trainer
    model: ToyGridModel        # the trained weights
    ema_model: ToyGridModel    # the EMA weights
    train_losses: np.ndarray   # [steps, R] per-step training loss of every run
    seconds: float             # wall time of the whole training (incl. compile warm-up)
    first_steps_seconds: float  # wall time of the first warmup_steps_timed steps
    device: torch.device
    resumed_from_step: int = 0  # > 0: this process trained only the steps after it


def train_grid(runs: Sequence[tuple[str, str]], data: dict[str, torch.Tensor],
               config: Toy2DConfig, out_dir: str | os.PathLike, *,
               resume: bool | str | os.PathLike | None = None,
               until: int | None = None) -> GridTraining:
    """Train every run of ``runs`` (variant-major ``(variant, dataset)`` pairs) together.

    ``data``: ``{dataset: [n_train, 2] float32}`` (:func:`load_datasets`). The Trainer writes to
    ``out_dir`` (checkpoints in ``out_dir/checkpoints``). ``resume`` as in :func:`run_grid`
    (None: ``config.train.resume``)
    (exact: batches are indexed by step, and the per-step losses are a buffer of the
    checkpointed model). ``until``: stop after that step (a simulated preemption).
    """
    runs = [tuple(r) for r in runs]
    steps = config.train.steps
    device = default_device(config.train.device)
    schedule = make_toy_schedule(config)
    models = [build_run_model(v, d, config) for v, d in runs]
    grid = ToyGridModel(runs, models, schedule)
    grid.set_clip_mode(config.clip_mode)
    del models
    # every run's loss at every step; a buffer, so checkpoints carry it and resume restores it
    grid.register_buffer("train_losses", torch.zeros(steps, len(runs)))
    batches = GridBatches([data[d] for _, d in runs],
                          [run_seeds(config, v, d)["data"] for v, d in runs], config, device)
    mode = config.train.compile_kwargs.get("mode")
    cudagraphs = config.train.compile and mode in ("reduce-overhead", "max-autotune")

    def loss_fn(model, batch):
        if cudagraphs and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        losses = model(batch["x0"], batch["t"], batch["noise"])
        history = grid.train_losses  # looked up per call: .to() and resume replace the tensor
        if batch["index"] < history.shape[0]:  # (steps beyond train.steps: benchmarks)
            history[batch["index"]] = losses.detach()
        return losses.sum()

    trainer = Trainer(grid, loss_fn, batches, trainer_config(config, out_dir, device, resume),
                      run_config=config)
    start = trainer.step
    if start:
        log.info("toy2d: resumed the grid at step %d of %d", start, steps)
    try:
        _sync(device)
        t0 = time.perf_counter()
        first = min(config.warmup_steps_timed, steps)
        if first and start < first:
            # the timed first steps: no checkpoint written there
            trainer.fit(until=first if until is None else min(first, until), save_final=False)
            _sync(device)
        t1 = time.perf_counter()
        trainer.fit(until=until)
        _sync(device)
        t2 = time.perf_counter()
    finally:
        trainer.close()
    return GridTraining(runs, trainer, trainer.model, trainer.ema_model,
                        grid.train_losses.cpu().numpy(), t2 - t0, t1 - t0, device, start)


@dataclass
class GridResults:
    """What :func:`evaluate_grid` returns (and :func:`write_results` writes)."""
    runs: dict[str, dict]          # "v/d" -> the run's final_info (JSON-safe values)
    timing: dict[str, Any]         # grid-level timings and context
    arrays: dict[str, np.ndarray]  # "v/d/train_losses" [steps], "v/d/images" [n_samples, 2],
    #                                "v/d/weights" [T, 2] (adaptive variants)


def evaluate_grid(training: GridTraining, data: dict[str, torch.Tensor],
                  config: Toy2DConfig) -> GridResults:
    """Every run's eval loss, EMA samples (timed per variant group), KL divergence and, for the
    adaptive variants, branch weights over t (module docstring)."""
    runs, R, device = training.runs, len(training.runs), training.device
    schedule = make_toy_schedule(config)
    steps = config.train.steps
    timing: dict[str, Any] = {
        "grid_training_time": training.seconds,
        "grid_first_steps_time": training.first_steps_seconds,
        "grid_first_steps": min(config.warmup_steps_timed, steps),
        "grid_runs": R, "training_time_per_run": training.seconds / R,
        "resumed_from_step": training.resumed_from_step, "steps": steps, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": config.train.compile, "compile_mode": config.train.compile_kwargs.get("mode"),
        "groups": {}}
    infos: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for v, o, m in training.model.groups:
        names = [d for _, d in runs[o:o + m]]
        seeds = [run_seeds(config, v, d) for d in names]
        eval_losses = evaluate_eval_loss(training.model.stacks[v], [data[d] for d in names],
                                         [s["eval"] for s in seeds], schedule,
                                         config.train.batch_size)
        ema_stack = training.ema_model.stacks[v]
        ema_stack.eval()
        # time only the sampling loop of the group (synchronised on CUDA)
        _sync(device)
        t0 = time.perf_counter()
        samples = sample_runs(ema_stack, config.n_samples, schedule, [s["sample"] for s in seeds])
        samples_np = samples.cpu().numpy()
        group_time = time.perf_counter() - t0
        weights = branch_weights(ema_stack, config.num_timesteps).cpu().numpy() \
            if v in ("adaptive", "adaptive_deep") else None
        timing["groups"][v] = {"runs": m, "inference_time": group_time,
                               "inference_time_per_run": group_time / m}
        for j, d in enumerate(names):
            r = o + j
            kl, kl_note = kldiv_noted(data[d].numpy(), samples_np[j], k=config.kl_k)
            info = {"training_time": training.seconds / R, "eval_loss": float(eval_losses[j]),
                    "inference_time": group_time / m, "kl_divergence": kl,
                    "variant": v, "dataset": d, "steps": steps,
                    "final_train_loss": float(training.train_losses[-1, r]),
                    "grid_training_time": training.seconds, "grid_runs": R,
                    "group_inference_time": group_time, "group_runs": m,
                    "device": str(device), "seed": config.train.seed}
            if kl_note:
                info["kl_note"] = kl_note
            if training.resumed_from_step:
                info["resumed_from_step"] = training.resumed_from_step
            infos[f"{v}/{d}"] = {k: _jsonable(val) for k, val in info.items()}
            arrays[f"{v}/{d}/train_losses"] = training.train_losses[:, r]
            arrays[f"{v}/{d}/images"] = samples_np[j]
            if weights is not None:
                arrays[f"{v}/{d}/weights"] = weights[j]
    return GridResults(infos, timing, arrays)


_TEMPLATE_KEYS = ("training_time", "eval_loss", "inference_time", "kl_divergence")


def write_results(results: GridResults, config: Toy2DConfig, out_dir: str | os.PathLike, *,
                  ema_model: ToyGridModel | None = None) -> Path:
    """Write the files of the module docstring's layout under ``out_dir`` (the runs' EMA
    weights too when ``config.save_models`` and ``ema_model`` is given); returns ``out_dir``."""
    from dualdiff.config import to_dict

    out = Path(out_dir)
    per_variant: dict[str, dict] = {}
    for name, info in results.runs.items():
        v, d = name.split("/")
        run_dir = out / v / d
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "final_info.json").write_text(json.dumps(info, indent=2))
        np.save(run_dir / "samples.npy", results.arrays[f"{name}/images"])
        np.save(run_dir / "train_losses.npy", results.arrays[f"{name}/train_losses"])
        if f"{name}/weights" in results.arrays:
            np.save(run_dir / "weights.npy", results.arrays[f"{name}/weights"])
        per_variant.setdefault(v, {})[d] = {"means": {k: info[k] for k in _TEMPLATE_KEYS}}
    if config.save_models and ema_model is not None:
        for v, o, m in ema_model.groups:
            stack = ema_model.stacks[v]
            for j in range(m):
                d = ema_model.runs[o + j][1]
                torch.save({k: t.cpu() for k, t in stack.member_state_dict(j).items()},
                           out / v / d / "ema_model.pt")
    for v, layout in per_variant.items():
        (out / v / "final_info.json").write_text(json.dumps(layout, indent=2))
    np.savez(out / "all_results.npz", **results.arrays)
    summary = {"runs": results.runs, "timing": results.timing, "config": to_dict(config),
               "datasets": config.datasets, "variants": config.variants}
    (out / "all_results.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    return out


def demo_toy2d(config: Toy2DConfig | None = None, out_dir: str | os.PathLike | None = None
               ) -> dict:
    """``dualdiff toy2d demo``: :func:`run_grid` on the ``demo`` preset (or ``config``), then,
    from the saved results (:func:`load_results`), one figure ``demo.png`` (per dataset the data
    beside each variant's samples, the KL in each panel's title, the headline in the figure's)
    and the report ``demo.md`` (:func:`demo_report`). On the CPU the grid trains with one
    torch thread (restored after). Returns ``{"headline", "differences",
    "markdown", "figure", "report", "out_dir", "runs", "timing"}``."""
    from dualdiff.analysis.toy2d_plots import plot_demo

    config = Toy2DConfig.from_name("demo") if config is None else config
    threads = torch.get_num_threads()
    if default_device(config.train.device).type == "cpu":
        # tiny models: one intra-op thread is fastest, far faster on a shared CPU (measured:
        # this preset > 11 min with 2 threads under load, 76 s with 1)
        torch.set_num_threads(1)
    try:
        res = run_grid(config, out_dir)
    finally:
        torch.set_num_threads(threads)
    out = Path(res["out_dir"])
    results = load_results(out)
    data = load_datasets(config, results["datasets"])  # the points the runs trained on
    report = demo_report(results)
    figure = plot_demo(results, {d: x.numpy() for d, x in data.items()}, out / "demo.png",
                       title=report["headline"], subtitle=report["subtitle"])
    (out / "demo.md").write_text(report["markdown"])
    return {**report, "figure": figure, "report": out / "demo.md", "out_dir": str(out),
            "runs": res["runs"], "timing": res["timing"]}


def _kl_text(kl: Any) -> str:
    return f"{kl:.2f}" if isinstance(kl, (int, float)) and math.isfinite(kl) else "nan"


def demo_report(results: dict) -> dict:
    """The demo's answer from a grid's saved results (:func:`load_results`): per dataset the KL
    of each variant and the difference adaptive − baseline (else last − first variant), the
    headline on ``dino`` (else the first dataset), and the markdown report, which says that one
    seed cannot tell the variants apart and points to ``dualdiff toy2d study``. Returns
    ``{"headline", "subtitle", "differences", "markdown"}``."""
    datasets, variants, runs = results["datasets"], results["variants"], results["runs"]
    kl = {(v, d): runs[f"{v}/{d}"]["kl_divergence"] for v in variants for d in datasets}
    if "adaptive" in variants and "baseline" in variants:
        a, b = "adaptive", "baseline"
    else:
        a, b = variants[-1], variants[0]
    diffs: dict[str, float | None] = {}
    for d in datasets:
        ka, kb = kl[a, d], kl[b, d]
        ok = all(isinstance(k, (int, float)) and math.isfinite(k) for k in (ka, kb))
        diffs[d] = ka - kb if ok else None
    focus = "dino" if "dino" in datasets else datasets[0]
    seed = results["config"]["train"]["seed"]
    steps = results["timing"]["steps"]

    def signed(x: float | None) -> str:
        return "nan" if x is None else f"{x:+.2f}".replace("-", "\u2212")

    if a != b:
        headline = f"{a} vs {b} KL: {signed(diffs[focus])} on {focus}"
        others = [f"{d} {signed(diffs[d])}" for d in datasets if d != focus]
        if others:
            headline += f" ({', '.join(others)})"
    else:
        headline = f"{a} KL on {focus}: {_kl_text(kl[a, focus])}"
    subtitle = (f"one seed ({seed}), {steps} steps: every difference between variants is within "
                f"noise; intervals: dualdiff toy2d study")
    L = ["# toy2d demo: does a dual-scale denoiser fit 2-D point sets better than an MLP?", "",
         f"**{headline}** (KL of samples vs data, lower is better).", "",
         f"**With one seed every difference between variants is within noise**: this run "
         f"trained each model once (seed {seed}, {steps} steps), so it shows what the variants "
         f"produce, not which is better. `dualdiff toy2d study` trains the grid over several "
         f"seeds and reports each difference with a 95 % interval and a verdict.", "",
         "| dataset | " + " | ".join(f"{v} KL" for v in variants)
         + (f" | {a} \u2212 {b} |" if a != b else " |"),
         "|---|" + "---|" * (len(variants) + (a != b))]
    for d in datasets:
        row = f"| {d} | " + " | ".join(_kl_text(kl[v, d]) for v in variants) + " |"
        if a != b:
            row += f" {signed(diffs[d])} |"
        L.append(row)
    L += ["", "KL: k-nearest-neighbour estimate (k = "
          f"{results['config']['kl_k']}, bits) between the {results['config']['data']['n_train']} "
          f"training points and {results['config']['n_samples']} samples of the EMA model. "
          "Per-run numbers: `all_results.json`; other figures: `train_loss.png`, "
          "`generated_images.png`, `weight_evolution.png`.", "", "![demo](demo.png)", ""]
    return {"headline": headline, "subtitle": subtitle,
            "differences": {"variant": a, "baseline": b, "kl": diffs},
            "markdown": "\n".join(L)}


def plot_results(out_dir: str | os.PathLike) -> dict[str, Path | None]:
    """Draw ``train_loss.png``, ``generated_images.png`` and ``weight_evolution.png`` (None
    when no adaptive variant ran) into ``out_dir`` from the files :func:`write_results` wrote."""
    from dualdiff.analysis.toy2d_plots import plot_all

    return plot_all(load_results(out_dir), out_dir)


def load_results(out_dir: str | os.PathLike) -> dict:
    """Read a grid's ``all_results.json`` + ``all_results.npz`` back:
    ``{"datasets", "variants", "runs": {"v/d": info}, "timing", "config",
    "arrays": {"v/d/train_losses" | "v/d/images" | "v/d/weights": ndarray}}``."""
    out = Path(out_dir)
    js = out / "all_results.json"
    if not js.is_file():
        raise FileNotFoundError(f"out_dir: no all_results.json in {out} (run the grid first)")
    summary = json.loads(js.read_text())
    with np.load(out / "all_results.npz", allow_pickle=False) as z:
        summary["arrays"] = {k: z[k] for k in z.files}
    return summary


# ---------------------------------------------------------------------------------------------
# runs, data, models
# ---------------------------------------------------------------------------------------------
def grid_runs(config: Toy2DConfig) -> list[tuple[str, str]]:
    """The grid's ``(variant, dataset)`` pairs, variant-major."""
    return [(v, d) for v in config.variants for d in config.datasets]


def run_seeds(config: Toy2DConfig, variant: str, dataset: str) -> dict[str, int]:
    """The seeds of run (variant, dataset): init (per run), data and eval / sampling (per dataset:
    common random numbers across variants)."""
    s = config.train.seed
    return {"init": derive_seed(s, "init", variant, dataset),
            "data": derive_seed(s, "data", dataset),
            "eval": derive_seed(s, "eval", dataset),
            "sample": derive_seed(s, "sample", dataset)}


def load_datasets(config: Toy2DConfig, names: Sequence[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """``{name: float32 CPU tensor [data.n_train, 2]}`` for ``names`` (default
    ``config.datasets``), the template's generators."""
    out = {}
    for n in (config.datasets if names is None else names):
        kw: dict[str, Any] = {}
        if n == "dino":
            kw["source"] = config.data.dino_source
            if config.data.datasaurus_path is not None:
                kw["path"] = config.data.datasaurus_path
        out[n] = get_dataset(n, n=config.data.n_train, **kw)
    return out


def build_run_model(variant: str, dataset: str, config: Toy2DConfig) -> nn.Module:
    """Run (variant, dataset)'s freshly initialised model (seeded, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seeds(config, variant, dataset)["init"])
        return build_toy_model(variant, **config.model.kwargs(variant))


def make_toy_schedule(config: Toy2DConfig) -> NoiseSchedule:
    """The linear schedule of ``num_timesteps`` betas from ``beta_start`` to ``beta_end``."""
    return make_schedule("linear", num_timesteps=config.num_timesteps,
                         beta_start=config.beta_start, beta_end=config.beta_end)


# ---------------------------------------------------------------------------------------------
# batches and the grid model
# ---------------------------------------------------------------------------------------------
class RunBatches:
    """One run's training draws for step ``index``: ``(idx [B], t [B], noise [B, 2])``.

    Epoch ``e`` shuffles ``range(n)`` with ``randperm`` seeded by ``(seed, "perm", e)`` and
    serves ``n // B`` full batches of it. ``t`` and ``noise`` come ``chunk`` steps at a time from
    a generator seeded by ``(seed, "noise", chunk index)``. Everything depends only on
    (seed, n, B, T, chunk, index): the same whatever else is trained beside the run.
    """

    def __init__(self, n: int, batch_size: int, num_timesteps: int, seed: int, chunk: int = 100):
        if batch_size > n:
            raise ValueError(f"batch_size ({batch_size}) must be <= n ({n})")
        self.n, self.batch_size, self.T, self.seed, self.chunk = n, batch_size, num_timesteps, \
            seed, chunk
        self.batches_per_epoch = n // batch_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "perm", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def chunk_draws(self, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps ``c*chunk .. (c+1)*chunk - 1``: idx ``[C, B]`` long, t ``[C, B]`` long, noise
        ``[C, B, 2]`` float32 (CPU)."""
        C, B = self.chunk, self.batch_size
        rows = []
        for i in range(c * C, (c + 1) * C):
            e, pos = divmod(i, self.batches_per_epoch)
            rows.append(self._perm(e)[pos * B:(pos + 1) * B])
        g = torch.Generator().manual_seed(derive_seed(self.seed, "noise", c))
        t = torch.randint(0, self.T, (C, B), generator=g)
        noise = torch.randn(C, B, 2, generator=g)
        return torch.stack(rows), t, noise


class GridBatches:
    """Trainer data function ``(index, generator) -> batch`` for R runs at once.

    ``batch = {"index": index, "x0": [R, B, 2], "t": [R, B], "noise": [R, B, 2]}`` on ``device``;
    row r is run r's :class:`RunBatches` draw (the Trainer's generator is not used: each run has
    its own stream). Draws are made ``chunk`` steps at a time and moved to the device at once;
    the data ``[R, n, 2]`` lives on the device and is gathered there.
    """

    def __init__(self, data: Sequence[torch.Tensor], seeds: Sequence[int], config: Toy2DConfig,
                 device: torch.device):
        if len(data) != len(seeds) or not data:
            raise ValueError("data and seeds must be non-empty and of the same length")
        n = data[0].shape[0]
        if any(d.shape != (n, 2) for d in data):
            raise ValueError("every run's data must have shape [n_train, 2]")
        self.device = torch.device(device)
        self.data = torch.stack([d.float() for d in data]).to(self.device)
        chunk = config.data.chunk_steps
        self.runs = [RunBatches(n, config.train.batch_size, config.num_timesteps, s, chunk)
                     for s in seeds]
        self.chunk = chunk
        self._rows = torch.arange(len(data), device=self.device)[:, None]
        self._c = -1
        self._draws: tuple[torch.Tensor, ...] = ()

    def __call__(self, index: int, generator: torch.Generator | None = None) -> dict:
        c, r = divmod(int(index), self.chunk)
        if c != self._c:
            per_run = [rb.chunk_draws(c) for rb in self.runs]
            self._draws = tuple(torch.stack([d[k] for d in per_run], dim=1).to(self.device)
                                for k in range(3))  # [C, R, B(, 2)]
            self._c = c
        idx, t, noise = (d[r] for d in self._draws)
        return {"index": int(index), "x0": self.data[self._rows, idx], "t": t, "noise": noise}


class ToyGridModel(nn.Module):
    """The grid's trainable module: one :class:`StackedModels` per variant.

    ``forward(x0 [R, B, 2], t [R, B], noise [R, B, 2]) -> [R]``: each run's mean noise-prediction
    loss, runs in the order of ``runs`` (variant-major). ``clip_grad_norm_`` clips every run
    separately (called by :class:`~dualdiff.train.Trainer`).
    """

    def __init__(self, runs: Sequence[tuple[str, str]], models: Sequence[nn.Module],
                 schedule: NoiseSchedule):
        super().__init__()
        self.runs = [tuple(r) for r in runs]
        variants = list(dict.fromkeys(v for v, _ in self.runs))
        self.groups: list[tuple[str, int, int]] = []  # (variant, offset, count)
        stacks = {}
        for v in variants:
            idx = [i for i, (vv, _) in enumerate(self.runs) if vv == v]
            if idx != list(range(idx[0], idx[0] + len(idx))):
                raise ValueError("runs must be grouped by variant (variant-major order)")
            stacks[v] = StackedModels([models[i] for i in idx])
            self.groups.append((v, idx[0], len(idx)))
        self.stacks = nn.ModuleDict(stacks)
        self.schedule = schedule
        self.last_grad_norms: torch.Tensor | None = None

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        device = next(self.parameters()).device
        self.schedule = self.schedule.to(device)
        return out

    def set_clip_mode(self, mode: str) -> None:
        for s in self.stacks.values():
            s.clip_mode = mode

    def forward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        losses = []
        for v, o, m in self.groups:
            xs, ts, ns = x0[o:o + m], t[o:o + m], noise[o:o + m]
            noisy = q_sample(xs.reshape(-1, 2), ts.reshape(-1), ns.reshape(-1, 2),
                             self.schedule).view_as(xs)
            pred = self.stacks[v](noisy, ts)
            losses.append((pred - ns).pow(2).mean(dim=(1, 2)))
        return torch.cat(losses)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Per-run clipping (each stack's :meth:`StackedModels.clip_grad_norm_`); returns the
        largest run norm, keeps all in :attr:`last_grad_norms` ``[R]``."""
        tops = [self.stacks[v].clip_grad_norm_(max_norm) for v, _, _ in self.groups]
        self.last_grad_norms = torch.cat([self.stacks[v].last_grad_norms.to(tops[0].device)
                                          for v, _, _ in self.groups])
        return torch.stack(tops).max()

    def run_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every run's state dict, in ``runs`` order (original member parameter names)."""
        return [sd for v, _, _ in self.groups for sd in self.stacks[v].state_dicts()]


# ---------------------------------------------------------------------------------------------
# training helpers
# ---------------------------------------------------------------------------------------------
def trainer_config(config: Toy2DConfig, out_dir: str | os.PathLike, device: torch.device,
                   resume: bool | str | os.PathLike | None = None) -> TrainConfig:
    """``config.train`` as the Trainer gets it: writing to ``out_dir``, on ``device``, resuming
    per ``resume`` (None: ``config.train.resume``; :func:`dualdiff.experiments.run.normalize_resume`),
    and on CUDA with fused AdamW unless ``train.optimizer_kwargs`` has a ``fused`` key."""
    resume_key = config.train.resume if resume is None else normalize_resume(resume)
    kwargs = dict(config.train.optimizer_kwargs)
    if device.type == "cuda":
        kwargs.setdefault("fused", True)
    return dataclasses.replace(config.train, out_dir=str(out_dir), device=str(device),
                               resume=resume_key, optimizer_kwargs=kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_eval_loss(stack: StackedModels, data: Sequence[torch.Tensor], seeds: Sequence[int],
                       schedule: NoiseSchedule, batch_size: int) -> np.ndarray:
    """The template's eval loss for each member of ``stack`` (``[M]``): one pass over member m's
    data ``data[m]`` in a seeded random order, batches of ``batch_size`` (the last partial),
    fresh t and noise; the mean of the per-batch mean squared errors."""
    was = stack.training
    stack.eval()
    device = next(stack.parameters()).device
    n = data[0].shape[0]
    T = schedule.num_timesteps
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    perm = torch.stack([torch.randperm(n, generator=g) for g in gens])
    t_all = torch.stack([torch.randint(0, T, (n,), generator=g) for g in gens]).to(device)
    noise_all = torch.stack([torch.randn(n, 2, generator=g) for g in gens]).to(device)
    x_all = torch.stack([d.float() for d in data]).to(device)
    rows = torch.arange(len(data), device=device)[:, None]
    perm = perm.to(device)
    sched = schedule.to(device)
    batch_means = []
    for lo in range(0, n, batch_size):
        idx = perm[:, lo:lo + batch_size]
        x0 = x_all[rows, idx]
        t, noise = t_all[:, lo:lo + batch_size], noise_all[:, lo:lo + batch_size]
        noisy = q_sample(x0.reshape(-1, 2), t.reshape(-1), noise.reshape(-1, 2), sched).view_as(x0)
        batch_means.append((stack(noisy, t) - noise).pow(2).mean(dim=(1, 2)))
    stack.train(was)
    return torch.stack(batch_means).mean(dim=0).cpu().numpy()


@torch.no_grad()
def sample_runs(stack: StackedModels, n: int, schedule: NoiseSchedule, seeds: Sequence[int]
                ) -> torch.Tensor:
    """DDPM ancestral sampling (epsilon prediction, posterior variance, T steps) of ``n`` points
    for every member of ``stack`` at once -> ``[M, n, 2]`` float32, through the shared
    :func:`dualdiff.diffusion.ddpm_sample` with one generator per member: member m's x_T and
    step noise come from a generator seeded with ``seeds[m]`` (on the stack's device), so its
    samples are those of member m sampled alone."""
    device = next(stack.parameters()).device
    M = stack.num_models
    if len(seeds) != M:
        raise ValueError(f"seeds: need one per member ({M}), got {len(seeds)}")
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    x_T = randn_chunks((M * n, 2), gens, device)  # [M*n, 2]: member m's rows from gens[m]

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return stack(x.view(M, n, 2), t.reshape(M, n)).reshape(M * n, 2)

    out = ddpm_sample(model_fn, x_T, schedule.to(device), prediction_type="epsilon",
                      variance_type="fixed_small", generator=gens)
    return out.sample.view(M, n, 2)


@torch.no_grad()
def branch_weights(stack: StackedModels, num_timesteps: int) -> torch.Tensor:
    """``[M, T, 2]``: every member's (global, local) weights at t = 0..T-1 (dual-scale models;
    the weights depend on t only)."""
    device = next(stack.parameters()).device
    M = stack.num_models
    t = torch.arange(num_timesteps, device=device).expand(M, num_timesteps)
    x = torch.zeros(M, num_timesteps, 2, device=device)
    _, w = stack(x, t, return_weights=True)
    return w


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v
