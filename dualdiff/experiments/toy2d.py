"""toy2d experiment: DDPM on 2-D point sets, every (variant, dataset) run trained at once.

The template (SakanaAI/AI-Scientist ``templates/2d_diffusion/experiment.py``) trains one MLP
denoiser per dataset, one after the other. Here the runs of a grid (variants x datasets) are
trained together: the models of one variant are stacked (:class:`dualdiff.models.stacked.
StackedModels`, ``vmap(functional_call)``), the variants' stacks sit side by side in one
:class:`ToyGridModel`, and one :class:`dualdiff.train.Trainer` step advances every run.

Per run the training is the template's:

* data: the run's dataset (``n_train`` = 100 000 points), batches of 256 drawn without
  replacement from a fresh permutation each epoch (the template's ``DataLoader(shuffle=True)``;
  its final partial batch of each epoch, 160 points, is dropped here so that every step of
  every run has the same batch size); t ~ U{0..T-1}, noise ~ N(0, I);
* loss: ``mse(model(q_sample(x0, t, noise), t), noise)`` (mean over the batch);
* T = 100 linear betas 1e-4..0.02; AdamW lr 3e-4 (weight decay 0.01, torch's AdamW default,
  which the template inherits), cosine annealing to 0 over ``steps``; gradient norm clipped to
  0.5 **per run** (:meth:`StackedModels.clip_grad_norm_`); EMA 0.995 every 10 steps after a
  100-step warm-up during which it copies the weights (ema_pytorch's ``update_after_step=100``
  default; ema_pytorch also ramps its decay up with ``1 - (1 + step)^(-2/3)`` until it reaches
  0.995 near step 2 900, which Trainer's EMA does not: the last ~2 000 steps dominate both);
  fp32 (no autocast), as the template.

The grid's loss is the **sum** of the runs' mean losses, so each run's gradient is exactly its own
(d loss / d loss_run = 1) and element-wise AdamW treats every run independently.

Randomness: run (variant, dataset) is initialised from ``derive_seed(seed, "init", variant,
dataset)``; its batches (permutations, t, noise) depend only on ``derive_seed(seed, "data",
dataset)`` and the step index (all variants see the *same* batches of a dataset: common random
numbers for the comparison), drawn ``chunk_steps`` steps at a time on the CPU. A run trained
alone (:func:`train_sequential`) with the same seed therefore sees the same data and starts from
the same weights as inside the grid (tests check the trained weights agree).

Evaluation, per run (as the template):

* ``eval_loss``: one pass over the whole training set in shuffled batches of ``batch_size``
  (the last one partial) with the trained, non-EMA model, fresh t and noise; the mean of the
  per-batch mean losses;
* ``inference_time``: DDPM ancestral sampling (posterior variance, no clipping) of
  ``n_samples`` = 10 000 points with the EMA model, T steps. The runs of a variant are sampled
  together (one vmapped call per step); the group's wall time is divided by the number of runs;
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
    train/checkpoints/                    grid checkpoints (every ``checkpoint_every`` steps and
                                          the final one): ``run_grid(resume=True)`` /
                                          ``dualdiff toy2d run --resume`` continue from them
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.data.toy2d import DATASETS, get_dataset
from dualdiff.diffusion import NoiseSchedule, ddpm_step, make_schedule, q_sample
from dualdiff.models.stacked import StackedModels
from dualdiff.models.toy2d import VARIANTS, build_toy_model
from dualdiff.train import TrainConfig, Trainer
from dualdiff.train.distributed import default_device
from dualdiff.utils.seed import derive_seed

__all__ = [
    "Toy2DConfig",
    "ToyGridModel",
    "RunBatches",
    "GridBatches",
    "GridTraining",
    "parse_names",
    "run_seeds",
    "load_datasets",
    "build_run_model",
    "train_config",
    "train_grid",
    "train_sequential",
    "evaluate_eval_loss",
    "sample_ddpm",
    "branch_weights",
    "run_grid",
    "load_results",
]

log = logging.getLogger("dualdiff.toy2d")


@dataclass
class Toy2DConfig:
    """The toy2d grid's settings; defaults are the template's (module docstring)."""
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    # data
    n_train: int = 100_000
    datasaurus_path: str | None = None  # the dino table; None = cache / download
    # models (each branch of the dual-scale variants has the baseline's sizes)
    embedding_dim: int = 128
    hidden_dim: int = 256
    hidden_layers: int = 3
    upscale: str = "linear"  # dual-scale local branch input: linear (the seed's) | factor
    # diffusion
    num_timesteps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # training
    steps: int = 10_000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01  # torch AdamW's default, which the template uses
    grad_clip: float = 0.5  # per run
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_warmup: int = 100
    seed: int = 0
    chunk_steps: int = 100  # random draws made this many steps at a time (part of the stream)
    # evaluation
    n_samples: int = 10_000
    kl_k: int = 5
    # runtime
    device: str = "auto"
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode, e.g. reduce-overhead (CUDA graphs)
    compile_backend: str | None = None  # torch.compile backend (None = inductor)
    clip_mode: str = "exact"  # per-run clipping implementation: exact | batched
    fused_optimizer: bool | None = None  # AdamW(fused=...): None = fused on CUDA
    log_every: int = 100
    checkpoint_every: int = 2000  # grid checkpoints under <out>/train/checkpoints (0 = none)
    keep_checkpoints: int = 2  # the newest kept (the final one included)
    warmup_steps_timed: int = 3
    progress: bool = True
    save_models: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("datasets", "variants"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, parse_names(v, DATASETS if name == "datasets" else VARIANTS,
                                                name))
            else:
                parse_names(list(v), DATASETS if name == "datasets" else VARIANTS, name)
        for name in ("n_train", "embedding_dim", "hidden_dim", "num_timesteps", "steps",
                     "batch_size", "ema_every", "chunk_steps", "n_samples", "kl_k", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("hidden_layers", "ema_warmup", "warmup_steps_timed", "checkpoint_every",
                     "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size ({self.batch_size}) must be <= n_train ({self.n_train})")
        if not self.kl_k < min(self.n_train, self.n_samples):
            raise ValueError(f"kl_k ({self.kl_k}) must be < n_train and n_samples")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.upscale not in ("linear", "factor"):
            raise ValueError(f"upscale must be 'linear' or 'factor', got {self.upscale!r}")
        if self.clip_mode not in ("exact", "batched"):
            raise ValueError(f"clip_mode must be 'exact' or 'batched', got {self.clip_mode!r}")

    def model_kwargs(self, variant: str) -> dict[str, Any]:
        kw: dict[str, Any] = dict(embedding_dim=self.embedding_dim, hidden_dim=self.hidden_dim,
                                  hidden_layers=self.hidden_layers)
        if variant != "baseline":
            kw["upscale"] = self.upscale
        return kw


def parse_names(value: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> checked list (known names, no duplicates, not empty)."""
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{what}: empty; choose from {', '.join(allowed)}")
    for n in names:
        if n not in allowed:
            raise ValueError(f"{what}: unknown name {n!r}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicated names in {names}")
    return names


# ---------------------------------------------------------------------------------------------
# runs, data, models
# ---------------------------------------------------------------------------------------------
def run_seeds(config: Toy2DConfig, variant: str, dataset: str) -> dict[str, int]:
    """The seeds of run (variant, dataset): init (per run), data and eval / sampling (per dataset:
    common random numbers across variants)."""
    s = config.seed
    return {"init": derive_seed(s, "init", variant, dataset),
            "data": derive_seed(s, "data", dataset),
            "eval": derive_seed(s, "eval", dataset),
            "sample": derive_seed(s, "sample", dataset)}


def load_datasets(names: Sequence[str], config: Toy2DConfig) -> dict[str, torch.Tensor]:
    """``{name: float32 CPU tensor [n_train, 2]}`` (the template's generators)."""
    out = {}
    for n in names:
        kw = {"path": config.datasaurus_path} if n == "dino" else {}
        out[n] = get_dataset(n, n=config.n_train, **kw)
    return out


def build_run_model(variant: str, dataset: str, config: Toy2DConfig) -> nn.Module:
    """Run (variant, dataset)'s freshly initialised model (seeded, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seeds(config, variant, dataset)["init"])
        return build_toy_model(variant, **config.model_kwargs(variant))


def make_toy_schedule(config: Toy2DConfig) -> NoiseSchedule:
    return make_schedule("linear", num_timesteps=config.num_timesteps,
                         beta_start=config.beta_start, beta_end=config.beta_end)


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
        self.runs = [RunBatches(n, config.batch_size, config.num_timesteps, s, config.chunk_steps)
                     for s in seeds]
        self.chunk = config.chunk_steps
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
# training
# ---------------------------------------------------------------------------------------------
def train_config(config: Toy2DConfig, out_dir: Path, device: torch.device,
                 resume: bool = False) -> TrainConfig:
    """The :class:`TrainConfig` of the template's settings (module docstring); with
    ``config.checkpoint_every`` the grid is checkpointed (and saved at the end), and ``resume``
    continues from the newest checkpoint in ``out_dir`` when there is one."""
    fused = config.fused_optimizer
    if fused is None:
        fused = device.type == "cuda"
    compile_kwargs: dict[str, Any] = {"mode": config.compile_mode} if config.compile_mode else {}
    if config.compile_backend:
        compile_kwargs["backend"] = config.compile_backend
    return TrainConfig(
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, optimizer="adamw",
        weight_decay=config.weight_decay, optimizer_kwargs={"fused": True} if fused else {},
        scheduler="cosine", warmup_steps=0, min_lr_ratio=0.0,
        grad_clip=config.grad_clip or None, amp="off", compile=config.compile,
        compile_kwargs=compile_kwargs, ema_decay=config.ema_decay, ema_every=config.ema_every,
        ema_warmup=config.ema_warmup, out_dir=str(out_dir), checkpoint_every=config.checkpoint_every,
        keep_last=config.keep_checkpoints, save_final=config.checkpoint_every > 0,
        resume="auto" if resume else None, log_every=config.log_every, seed=config.seed,
        device=str(device), progress=config.progress, log_grad_norm=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
               config: Toy2DConfig, out_dir: str | Path, *, resume: bool = False,
               until: int | None = None) -> GridTraining:
    """Train every run of ``runs`` (variant-major ``(variant, dataset)`` pairs) together.

    ``resume``: continue from the newest checkpoint in ``out_dir/checkpoints`` if there is one
    (exactly: batches are indexed by step, and the per-step losses are a buffer of the
    checkpointed model). ``until``: stop after that step (a simulated preemption).
    """
    runs = [tuple(r) for r in runs]
    device = default_device(config.device)
    schedule = make_toy_schedule(config)
    models = [build_run_model(v, d, config) for v, d in runs]
    grid = ToyGridModel(runs, models, schedule)
    grid.set_clip_mode(config.clip_mode)
    del models
    # every run's loss at every step; a buffer, so checkpoints carry it and resume restores it
    grid.register_buffer("train_losses", torch.zeros(config.steps, len(runs)))
    batches = GridBatches([data[d] for _, d in runs],
                          [run_seeds(config, v, d)["data"] for v, d in runs], config, device)
    cudagraphs = config.compile and config.compile_mode in ("reduce-overhead",
                                                            "max-autotune")

    def loss_fn(model, batch):
        if cudagraphs and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        losses = model(batch["x0"], batch["t"], batch["noise"])
        history = grid.train_losses  # looked up per call: .to() and resume replace the tensor
        if batch["index"] < history.shape[0]:  # (steps beyond config.steps: benchmarks)
            history[batch["index"]] = losses.detach()
        return losses.sum()

    trainer = Trainer(grid, loss_fn, batches, train_config(config, Path(out_dir), device, resume),
                      run_config=config)
    start = trainer.step
    if start:
        log.info("toy2d: resumed the grid at step %d of %d", start, config.steps)
    try:
        _sync(device)
        t0 = time.perf_counter()
        first = min(config.warmup_steps_timed, config.steps)
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


def train_sequential(runs: Sequence[tuple[str, str]], data: dict[str, torch.Tensor],
                     config: Toy2DConfig, out_dir: str | Path) -> list[dict]:
    """The reference: every run trained alone (plain model, Trainer's own clipping), one after
    the other, with the same seeds and batches as in the grid. Returns per run
    ``{"run", "model", "ema_model", "train_losses" [steps], "seconds"}``."""
    device = default_device(config.device)
    schedule = make_toy_schedule(config).to(device)
    out = []
    for v, d in runs:
        model = build_run_model(v, d, config)
        batches = GridBatches([data[d]], [run_seeds(config, v, d)["data"]], config, device)
        history = torch.zeros(config.steps, device=device)

        def loss_fn(m, batch, history=history):
            x0, t, noise = batch["x0"][0], batch["t"][0], batch["noise"][0]
            loss = F.mse_loss(m(q_sample(x0, t, noise, schedule), t), noise)
            history[batch["index"]] = loss.detach()
            return loss

        trainer = Trainer(model, loss_fn, batches,
                          train_config(config, Path(out_dir) / f"{v}_{d}", device))
        try:
            _sync(device)
            t0 = time.perf_counter()
            trainer.fit()
            _sync(device)
            sec = time.perf_counter() - t0
        finally:
            trainer.close()
        out.append({"run": (v, d), "model": trainer.model, "ema_model": trainer.ema_model,
                    "train_losses": history.cpu().numpy(), "seconds": sec})
    return out


# ---------------------------------------------------------------------------------------------
# evaluation
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
def sample_ddpm(stack: StackedModels, n: int, schedule: NoiseSchedule, seeds: Sequence[int]
                ) -> torch.Tensor:
    """DDPM ancestral sampling (epsilon prediction, posterior variance, T steps) of ``n`` points
    for every member of ``stack`` at once -> ``[M, n, 2]``. Member m's x_T and step noise come
    from a generator seeded with ``seeds[m]`` (on the stack's device)."""
    device = next(stack.parameters()).device
    M, T = stack.num_models, schedule.num_timesteps
    sched = schedule.to(device)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn(n, 2, generator=g, device=device) for g in gens])  # [M*n, 2]
    for step in range(T - 1, -1, -1):
        t = torch.full((M, n), step, dtype=torch.long, device=device)
        eps = stack(x.view(M, n, 2), t).reshape(M * n, 2)
        noise = torch.cat([torch.randn(n, 2, generator=g, device=device) for g in gens]) \
            if step > 0 else None
        x, _ = ddpm_step(eps, step, x, sched, prediction_type="epsilon",
                         variance_type="fixed_small", variance_noise=noise)
    return x.view(M, n, 2)


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


def _kl(real: np.ndarray, sample: np.ndarray, k: int) -> tuple[float, str | None]:
    from dualdiff.metrics.kl import kldiv
    if not np.isfinite(sample).all():
        return float("nan"), "samples contain non-finite values"
    try:
        return float(kldiv(real, sample, k=k)), None
    except ValueError as e:  # duplicated points: npeet's tie-breaking noise
        return float(kldiv(real, sample, k=k, jitter=1e-10, seed=0)), f"jitter 1e-10 ({e})"


# ---------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def run_grid(datasets: Sequence[str] | str | None = None,
             variants: Sequence[str] | str | None = None,
             config: Toy2DConfig | None = None, out_dir: str | Path = "runs/toy2d",
             resume: bool = False) -> dict:
    """Train, evaluate, save and plot the grid ``variants x datasets`` (module docstring).

    ``resume``: continue training from the newest checkpoint in ``out_dir/train/checkpoints``
    (when training had finished, go straight to the evaluation). Timings then cover only the
    steps trained by this call; ``resumed_from_step`` says where it started.

    ``datasets`` / ``variants`` (lists or comma-separated strings) default to the config's.
    Returns ``{"runs": {"<variant>/<dataset>": final_info}, "timing": {...}, "out_dir": str}``.
    """
    config = dataclasses.replace(config) if config is not None else Toy2DConfig()
    if datasets is not None:
        config.datasets = parse_names(datasets, DATASETS, "datasets")
    if variants is not None:
        config.variants = parse_names(variants, VARIANTS, "variants")
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(v, d) for v in config.variants for d in config.datasets]
    data = load_datasets(config.datasets, config)
    log.info("toy2d: training %d runs (%s x %s) for %d steps", len(runs),
             ",".join(config.variants), ",".join(config.datasets), config.steps)

    tr = train_grid(runs, data, config, out / "train", resume=resume)
    R = len(runs)
    device = tr.device
    schedule = make_toy_schedule(config)
    infos: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    timing = {"grid_training_time": tr.seconds, "grid_first_steps_time": tr.first_steps_seconds,
              "grid_first_steps": min(config.warmup_steps_timed, config.steps),
              "grid_runs": R, "training_time_per_run": tr.seconds / R,
              "resumed_from_step": tr.resumed_from_step,
              "steps": config.steps, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "compile": config.compile, "compile_mode": config.compile_mode,
              "groups": {}}
    for v, o, m in tr.model.groups:
        group_runs = runs[o:o + m]
        names = [d for _, d in group_runs]
        seeds = [run_seeds(config, v, d) for _, d in group_runs]
        eval_losses = evaluate_eval_loss(tr.model.stacks[v], [data[d] for d in names],
                                         [s["eval"] for s in seeds], schedule, config.batch_size)
        ema_stack = tr.ema_model.stacks[v]
        ema_stack.eval()
        # time only the sampling loop of the group (synchronised on CUDA)
        _sync(device)
        t0 = time.perf_counter()
        samples = sample_ddpm(ema_stack, config.n_samples, schedule, [s["sample"] for s in seeds])
        samples_np = samples.cpu().numpy()
        group_time = time.perf_counter() - t0
        weights = branch_weights(ema_stack, config.num_timesteps).cpu().numpy() \
            if v in ("adaptive", "adaptive_deep") else None
        timing["groups"][v] = {"runs": m, "inference_time": group_time,
                               "inference_time_per_run": group_time / m}
        variant_info = {}
        for j, d in enumerate(names):
            r = o + j
            kl, kl_note = _kl(data[d].numpy(), samples_np[j], config.kl_k)
            info = {"training_time": tr.seconds / R, "eval_loss": float(eval_losses[j]),
                    "inference_time": group_time / m, "kl_divergence": kl,
                    "variant": v, "dataset": d, "steps": config.steps,
                    "final_train_loss": float(tr.train_losses[-1, r]),
                    "grid_training_time": tr.seconds, "grid_runs": R,
                    "group_inference_time": group_time, "group_runs": m,
                    "device": str(device), "seed": config.seed}
            if kl_note:
                info["kl_note"] = kl_note
            if tr.resumed_from_step:
                info["resumed_from_step"] = tr.resumed_from_step
            info = {k: _jsonable(val) for k, val in info.items()}
            run_dir = out / v / d
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "final_info.json").write_text(json.dumps(info, indent=2))
            np.save(run_dir / "samples.npy", samples_np[j])
            np.save(run_dir / "train_losses.npy", tr.train_losses[:, r])
            arrays[f"{v}/{d}/train_losses"] = tr.train_losses[:, r]
            arrays[f"{v}/{d}/images"] = samples_np[j]
            if weights is not None:
                np.save(run_dir / "weights.npy", weights[j])
                arrays[f"{v}/{d}/weights"] = weights[j]
            if config.save_models:
                torch.save({k: t.cpu() for k, t in ema_stack.member_state_dict(j).items()},
                           run_dir / "ema_model.pt")
            infos[f"{v}/{d}"] = info
            variant_info[d] = {"means": {k: info[k] for k in ("training_time", "eval_loss",
                                                              "inference_time",
                                                              "kl_divergence")}}
        (out / v).mkdir(parents=True, exist_ok=True)
        (out / v / "final_info.json").write_text(json.dumps(variant_info, indent=2))

    from dualdiff.config import to_dict
    np.savez(out / "all_results.npz", **arrays)
    summary = {"runs": infos, "timing": timing, "config": to_dict(config),
               "datasets": config.datasets, "variants": config.variants}
    (out / "all_results.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    if config.plots:
        from dualdiff.analysis.toy2d_plots import plot_all
        plot_all(load_results(out), out)
    return {"runs": infos, "timing": timing, "out_dir": str(out)}


def load_results(out_dir: str | Path) -> dict:
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
