"""The one training loop every dualdiff experiment uses.

``Trainer(model, loss_fn, data, config).fit()`` trains any ``nn.Module`` given
``loss_fn(model, batch) -> loss`` (a scalar tensor) or ``-> (loss, {name: value})``.

Data (``data=``), chosen so that a resumed run sees exactly the batches the uninterrupted
run would have seen:

* a map-style ``Dataset`` (``__len__`` + ``__getitem__``): batched by a seeded
  :class:`ResumableBatchSampler`; each epoch is a fresh permutation derived from
  (seed, epoch), split into global batches of ``batch_size * world_size`` samples of which
  rank r takes slice r. The position (epoch, batch) is checkpointed. Incomplete last
  batches are dropped so every rank and step sees the same batch size;
* a function ``fn(index, generator) -> batch`` for synthetic / on-the-fly data; batch
  ``index`` of rank r draws from a ``torch.Generator`` seeded from (seed, rank, index);
* an iterable with ``state_dict()`` / ``load_state_dict()`` (restored before iterating);
* any other iterable (re-iterated at exhaustion). It cannot be repositioned: resuming
  skips the consumed batches of a fresh iterator and warns that this is only exact for a
  deterministic iterable.

Per optimizer step the loop draws ``grad_accum`` micro-batches of ``batch_size`` samples
per process, so one step averages the gradient over ``batch_size * grad_accum *
world_size`` samples (``loss_fn`` should return a mean over its batch).

Mixed precision ('auto' = bf16 autocast on CUDA, off on CPU; 'fp16' adds a GradScaler),
optional ``torch.compile``, gradient clipping, EMA (:mod:`dualdiff.train.ema`), atomic
checkpoints (:mod:`dualdiff.train.checkpoint`), a non-finite loss guard, JSONL/CSV metrics
(+ TensorBoard / W&B), a tqdm progress bar, a debug switch and DDP under torchrun
(:mod:`dualdiff.train.distributed`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dualdiff.train import distributed as ddist
from dualdiff.train.checkpoint import (CheckpointError, find_resumable, latest_checkpoint,
                                       load_checkpoint, save_checkpoint)
from dualdiff.train.ema import EMA, unwrap_model
from dualdiff.train.metrics_log import MetricsLogger
from dualdiff.utils.seed import derive_seed, seed_everything

__all__ = ["TrainConfig", "Trainer", "train", "NonFiniteLossError", "ResumableBatchSampler",
           "build_optimizer", "build_scheduler", "resolve_amp"]

log = logging.getLogger("dualdiff.train")


class NonFiniteLossError(RuntimeError):
    """Raised when ``max_consecutive_nonfinite`` steps in a row had a non-finite loss."""


@dataclass
class TrainConfig:
    """Everything the loop needs; load/override with :mod:`dualdiff.config`.

    Sizes: ``batch_size`` samples per process per micro-batch; ``grad_accum`` micro-batches
    per optimizer step; ``steps`` optimizer steps in total (skipped steps count).
    """
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    # optimizer: any torch.optim class by (case-insensitive) name, e.g. adamw, adam, sgd
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    # scheduler: none | constant | cosine | linear (these three with warmup_steps and
    # min_lr_ratio) | onecycle (max_lr=lr, total_steps=steps, kwargs e.g. pct_start) |
    # step (StepLR kwargs) | exponential (ExponentialLR kwargs)
    scheduler: Literal["none", "constant", "cosine", "linear", "onecycle", "step",
                       "exponential"] = "none"
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None  # max global L2 norm; None or 0 = no clipping
    # (a model defining clip_grad_norm_(max_norm) -> scalar norm tensor clips itself instead,
    # e.g. dualdiff.models.StackedModels clips each stacked member separately)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: bool = False
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    # EMA: None disables it; else ema <- decay*ema + (1-decay)*w every ema_every steps after
    # ema_warmup steps during which ema = w
    ema_decay: float | None = None
    ema_every: int = 1
    ema_warmup: int = 0
    # checkpoints under out_dir/checkpoints: every checkpoint_every steps (0 = never
    # periodically) and at the end of fit() when save_final; keep the newest keep_last (0 = all)
    out_dir: str = "runs/train"
    checkpoint_every: int = 0
    keep_last: int = 3
    save_final: bool = True
    # resume: None (fresh start) | 'auto' (latest if any, else fresh) | 'latest' (must
    # exist) | a checkpoint file path
    resume: str | None = None
    log_every: int = 1
    eval_every: int = 0
    max_consecutive_nonfinite: int = 10  # 0 = never stop
    debug: bool = False
    debug_batches: int = 2
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    num_workers: int = 0
    shuffle: bool = True
    progress: bool = True
    log_grad_norm: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_kwargs: dict[str, Any] = field(default_factory=dict)
    ddp_find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def pos(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
        for name in ("steps", "batch_size", "grad_accum", "ema_every", "log_every",
                     "debug_batches"):
            pos(name)
        for name in ("warmup_steps", "checkpoint_every", "keep_last", "eval_every",
                     "max_consecutive_nonfinite", "num_workers", "ema_warmup", "debug_batches"):
            pos(name, allow_zero=True)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite float, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 or None, got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1] or None, got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.scheduler == "step" and "step_size" not in self.scheduler_kwargs:
            raise ValueError("scheduler 'step' needs scheduler_kwargs.step_size")
        if self.scheduler == "exponential" and "gamma" not in self.scheduler_kwargs:
            raise ValueError("scheduler 'exponential' needs scheduler_kwargs.gamma")


# ---------------------------------------------------------------------------------------
# optimizer / scheduler / precision


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``torch.optim.<name>(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)``."""
    names = {n.lower(): n for n in dir(torch.optim)
             if isinstance(getattr(torch.optim, n), type)
             and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
             and n != "Optimizer"}
    key = cfg.optimizer.lower()
    if key not in names:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of "
                         f"{', '.join(sorted(names))} or pass optimizer=")
    kwargs = {"lr": cfg.lr, **cfg.optimizer_kwargs}
    if cfg.weight_decay:
        kwargs.setdefault("weight_decay", cfg.weight_decay)
    for k in ("betas",):
        if k in kwargs and isinstance(kwargs[k], list):
            kwargs[k] = tuple(kwargs[k])
    return getattr(torch.optim, names[key])(params, **kwargs)


class WarmupDecay:
    """LR multiplier: linear warm-up over ``warmup`` steps, then constant / cosine / linear
    decay to ``min_ratio`` at ``total`` steps. Only primitive attributes, so LambdaLR's
    state dict stays loadable with weights_only=True."""

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        p = min(max((step - self.warmup) / max(1, self.total - self.warmup), 0.0), 1.0)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            shape = 1.0 - p
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    s = cfg.scheduler
    kw = dict(cfg.scheduler_kwargs)
    if s == "none":
        return None
    if s in ("constant", "cosine", "linear"):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    if s == "onecycle":
        kw.setdefault("max_lr", cfg.lr)
        kw.setdefault("total_steps", cfg.steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, **kw)
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, **kw)
    if s == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, **kw)
    raise ValueError(f"unknown scheduler {s!r}")  # pragma: no cover - Literal-checked


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"amp must be auto|bf16|fp16|off, got {amp!r}")


# ---------------------------------------------------------------------------------------
# data


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Seeded, shardable, resumable batch sampler over ``range(n)``.

    Epoch e uses the permutation of ``torch.Generator(seed=derive_seed(seed, 'epoch', e))``
    (or the identity when not shuffling); global batch b is ``perm[b*G:(b+1)*G]`` with
    ``G = batch_size * world_size`` and rank r yields ``[r*batch_size:(r+1)*batch_size]`` of it.
    So the union over ranks of their b-th batches equals the b-th batch of one process with
    ``batch_size * world_size``. :meth:`set_position` starts an epoch mid-way.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {n} samples is smaller than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        lo = self.rank * self.batch_size
        for b in range(self.start, self.batches_per_epoch):
            base = b * self.global_batch
            yield perm[base + lo: base + lo + self.batch_size].tolist()


class _DatasetSource:
    kind = "dataset"

    def __init__(self, dataset, cfg: TrainConfig, rank: int, world: int, collate_fn,
                 pin_memory: bool):
        self.sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, rank,
                                             world, cfg.shuffle)
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "workers", rank))
        kw = {} if collate_fn is None else {"collate_fn": collate_fn}
        if cfg.num_workers > 0:
            from dualdiff.utils.seed import seed_worker
            kw["worker_init_fn"] = seed_worker
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=cfg.num_workers,
            pin_memory=pin_memory, generator=g, **kw)
        self.epoch = 0
        self.pos = 0
        self._it: Iterator | None = None

    def next(self):
        if self._it is None:
            self.sampler.set_position(self.epoch, self.pos)
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.pos = 0
            self.sampler.set_position(self.epoch, 0)
            self._it = iter(self.loader)
            batch = next(self._it)
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "epoch": self.epoch, "batch_in_epoch": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["batch_in_epoch"])
        self._it = None


class _FunctionSource:
    kind = "function"

    def __init__(self, fn, seed: int, rank: int):
        self.fn, self.seed, self.rank, self.index = fn, seed, rank, 0

    def next(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batch", self.rank, self.index))
        batch = self.fn(self.index, g)
        self.index += 1
        return batch

    @property
    def epoch(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {"kind": self.kind, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.index = int(s["index"])


class _IterableSource:
    def __init__(self, iterable):
        self.iterable = iterable
        self.stateful = callable(getattr(iterable, "state_dict", None)) and callable(
            getattr(iterable, "load_state_dict", None))
        self.kind = "stateful_iterable" if self.stateful else "iterable"
        self.consumed = 0
        self.epoch = 0
        self._it: Iterator | None = None
        self._skip = 0

    def next(self):
        if self._it is None:
            self._it = iter(self.iterable)
            for _ in range(self._skip):
                next(self._it)
            self._skip = 0
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.iterable)
            try:
                batch = next(self._it)
            except StopIteration:
                raise RuntimeError("the training data iterable is empty") from None
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        s = {"kind": self.kind, "consumed": self.consumed, "epoch": self.epoch}
        if self.stateful:
            s["iterable"] = self.iterable.state_dict()
        return s

    def load_state_dict(self, s: dict) -> None:
        self.consumed, self.epoch = int(s["consumed"]), int(s.get("epoch", 0))
        self._it = None
        if self.stateful:
            self.iterable.load_state_dict(s["iterable"])
        else:
            warnings.warn("resuming with a plain iterable: skipping the "
                          f"{self.consumed} consumed batches of a fresh iterator; this "
                          "reproduces the data order only if the iterable is deterministic "
                          "(pass a Dataset or a batch function for exact resume)",
                          RuntimeWarning, stacklevel=3)
            self._skip = self.consumed  # fast-forward within the current pass (best effort)


def _make_source(data, cfg, rank, world, collate_fn, pin_memory):
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and hasattr(
            data, "__getitem__") and not isinstance(data, torch.utils.data.IterableDataset):
        return _DatasetSource(data, cfg, rank, world, collate_fn, pin_memory)
    if hasattr(data, "__iter__"):
        return _IterableSource(data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _DatasetSource(data, cfg, rank, world, collate_fn, pin_memory)
    if callable(data):
        return _FunctionSource(data, cfg.seed, rank)
    raise TypeError("data must be a map-style Dataset, a function (index, generator) -> batch "
                    f"or an iterable of batches, got {type(data).__name__}")


def _to_device(x, device: torch.device, non_blocking: bool):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return type(x)({k: _to_device(v, device, non_blocking) for k, v in x.items()}) \
            if not hasattr(x, "_fields") else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_to_device(v, device, non_blocking) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device, non_blocking) for v in x)
    return x


def _describe_batch(x, prefix: str = "batch") -> list[str]:
    if isinstance(x, torch.Tensor):
        s = f"{prefix}: shape={tuple(x.shape)} dtype={x.dtype} device={x.device}"
        if x.numel() and (x.is_floating_point() or x.is_complex()):
            xf = x.detach().float()
            finite = torch.isfinite(xf)
            nf = int((~finite).sum())
            xf = xf[finite] if nf else xf
            if xf.numel():
                s += (f" min={xf.min().item():.4g} max={xf.max().item():.4g} "
                      f"mean={xf.mean().item():.4g} std={xf.std().item() if xf.numel() > 1 else 0:.4g}")
            s += f" nonfinite={nf}"
        elif x.numel():
            s += f" min={x.min().item()} max={x.max().item()}"
        return [s]
    if isinstance(x, Mapping):
        return [ln for k, v in x.items() for ln in _describe_batch(v, f"{prefix}[{k!r}]")]
    if isinstance(x, (list, tuple)):
        return [ln for i, v in enumerate(x) for ln in _describe_batch(v, f"{prefix}[{i}]")]
    return [f"{prefix}: {type(x).__name__} {x!r:.80}"]


# ---------------------------------------------------------------------------------------
# RNG state (weights_only-safe representation)


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s.get("cuda"):
        if len(s["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(s["cuda"])
        else:
            warnings.warn("checkpoint CUDA RNG states are for a different device count; "
                          "CUDA RNG not restored", RuntimeWarning, stacklevel=3)


def _jsonable_config(cfg: Any) -> dict:
    from dualdiff.config import to_dict
    if cfg is None:
        return {}
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------------------
# the trainer


LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]


class Trainer:
    """Train ``model`` with ``loss_fn(model, batch)`` on ``data`` under ``config``.

    ``optimizer``/``scheduler``: an instance, a factory (``params -> Optimizer``,
    ``optimizer -> scheduler``) or None to build them from the config.
    ``eval_fn(model, step) -> dict | None`` runs every ``eval_every`` steps on the EMA
    weights when EMA is on (the raw model otherwise), in eval mode, under no_grad.
    ``run_config``: the whole experiment config (dataclass or dict), stored in checkpoints.

    After construction (and resuming when ``config.resume`` says so) call :meth:`fit`.
    ``loss_fn`` receives the training wrapper (DDP / compiled) as ``model``; reach the
    plain module through :func:`dualdiff.train.unwrap_model` or ``trainer.model``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, config: TrainConfig,
                 optimizer: Any = None, scheduler: Any = None,
                 eval_fn: Callable[[nn.Module, int], dict | None] | None = None,
                 collate_fn: Callable | None = None, run_config: Any = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validate()
        self.config = cfg = config
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.run_config = run_config

        self.device = ddist.default_device(cfg.device)
        self.distributed = ddist.init_distributed(device=self.device)
        self.rank = ddist.get_rank()
        self.world_size = ddist.get_world_size()
        self.is_main = self.rank == 0
        if cfg.debug:
            _enable_debug_logging()
        seed_everything(derive_seed(cfg.seed, "train", self.rank), cfg.deterministic)

        self.model = unwrap_model(model).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        if optimizer is None:
            self.optimizer = build_optimizer(params, cfg)
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        elif callable(optimizer):
            self.optimizer = optimizer(params)
        else:
            raise TypeError("optimizer must be None, an Optimizer or a factory params -> Optimizer")
        if scheduler is None:
            self.scheduler = build_scheduler(self.optimizer, cfg)
        elif callable(scheduler) and not hasattr(scheduler, "step"):
            self.scheduler = scheduler(self.optimizer)
        else:
            self.scheduler = scheduler

        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_every, cfg.ema_warmup) \
            if cfg.ema_decay is not None else None

        train_model: nn.Module = self.model
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        if self.distributed and self.world_size > 1:
            self._ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.ddp_find_unused_parameters)
            train_model = self._ddp
        if cfg.compile:
            train_model = torch.compile(train_model, **cfg.compile_kwargs)
        self.train_model = train_model

        self.data = _make_source(data, cfg, self.rank, self.world_size, collate_fn,
                                 pin_memory=self.device.type == "cuda")
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main,
                                    tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                    wandb_kwargs=cfg.wandb_kwargs,
                                    config=_jsonable_config(run_config or cfg))

        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_consecutive = 0
        self.amp_overflow_total = 0
        self.last_finite_loss: float | None = None
        self.last_saved_step = -1
        self.history: list[dict] = []  # every logged record (all ranks; files: main rank only)
        self._debug_seen = 0
        self._window: list[float] = []
        self._window_metrics: dict[str, list[float]] = {}
        self._t_window = time.perf_counter()
        self._steps_window = 0
        self.resumed_from: Path | None = None

        if self.is_main:
            from dualdiff.config import dump_yaml
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if dataclasses.is_dataclass(run_config or cfg):
                dump_yaml(run_config or cfg, self.out_dir / "config.yaml")
        if cfg.debug:
            n = sum(p.numel() for p in params)
            log.info("debug: device=%s world_size=%d amp=%s compile=%s params=%d "
                     "global batch=%d", self.device, self.world_size, self.amp_dtype,
                     cfg.compile, n, cfg.batch_size * cfg.grad_accum * self.world_size)
        if cfg.resume:
            self._auto_resume(cfg.resume)

    # --- public helpers ----------------------------------------------------------------

    @property
    def ema_model(self) -> nn.Module:
        """The EMA module when EMA is on, else the trained module (for eval and sampling)."""
        return self.ema.model if self.ema is not None else self.model

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the trained module temporarily holds the EMA weights."""
        if self.ema is None:
            yield self.model
            return
        with self.ema.swapped_into(self.model) as m:
            yield m

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume (collective under DDP: every rank must call it)."""
        rng = ddist.all_gather_object(_rng_state())
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scheduler_class": type(self.scheduler).__name__ if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
            "data": self.data.state_dict(),
            "counters": {"nonfinite_total": self.nonfinite_total,
                         "nonfinite_consecutive": self.nonfinite_consecutive,
                         "amp_overflow_total": self.amp_overflow_total},
            "world_size": self.world_size,
            "config": _jsonable_config(self.config),
            "run_config": _jsonable_config(self.run_config) if self.run_config is not None
            else None,
            "torch_version": str(torch.__version__),
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/checkpoints/step_XXXXXXXX.pt`` (main rank); returns its path."""
        state = self.state_dict()
        path = None
        if self.is_main:
            path = save_checkpoint(state, self.checkpoint_dir, self.step, self.config.keep_last)
            log.info("saved checkpoint %s", path)
        self.last_saved_step = self.step
        ddist.barrier()
        return path

    def _auto_resume(self, resume: str) -> None:
        if resume in ("auto", "latest"):
            found = find_resumable(self.checkpoint_dir)
            if found is None:
                if resume == "latest":
                    raise FileNotFoundError(
                        f"resume='latest' but no checkpoint in {self.checkpoint_dir}")
                log.info("resume='auto': no checkpoint in %s, starting fresh",
                         self.checkpoint_dir)
                return
            path, state = found
            self.load_state(state, path)
        else:
            self.load_state(load_checkpoint(resume), Path(resume))

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint file (clear errors for missing/corrupt/incompatible)."""
        self.load_state(load_checkpoint(path), Path(path))

    def load_state(self, state: dict, path: Path | str = "<state>") -> None:
        where = f"checkpoint {str(path)!r}"
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{where} does not fit this model: {e}") from e
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{where}: optimizer state does not fit this optimizer "
                                  f"({type(self.optimizer).__name__}): {e}") from e
        saved_sched = state.get("scheduler")
        if self.scheduler is not None and saved_sched is not None:
            cls = state.get("scheduler_class")
            if cls and cls != type(self.scheduler).__name__:
                raise CheckpointError(f"{where} holds a {cls} scheduler state but this run uses "
                                      f"{type(self.scheduler).__name__}")
            self.scheduler.load_state_dict(saved_sched)
        elif (self.scheduler is None) != (saved_sched is None):
            warnings.warn(f"{where}: scheduler presence differs from this run's "
                          f"(checkpoint: {state.get('scheduler_class')}, run: "
                          f"{type(self.scheduler).__name__ if self.scheduler else None}); "
                          "scheduler state not restored", RuntimeWarning, stacklevel=2)
        if self.ema is not None:
            if state.get("ema") is not None:
                try:
                    self.ema.load_state_dict(state["ema"])
                except RuntimeError as e:
                    raise CheckpointError(f"{where}: EMA weights do not fit this model: {e}") from e
            else:
                warnings.warn(f"{where} has no EMA; EMA restarts from the loaded weights",
                              RuntimeWarning, stacklevel=2)
                self.ema.model.load_state_dict(self.model.state_dict())
        if self.scaler.is_enabled() and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        data_state = state.get("data") or {}
        if data_state.get("kind") != self.data.kind:
            raise CheckpointError(f"{where} was made with data of kind "
                                  f"{data_state.get('kind')!r}, this run's data is "
                                  f"{self.data.kind!r}")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size:
            warnings.warn(f"{where} was written with world_size {saved_world}, this run has "
                          f"{self.world_size}: data order and RNG streams will differ from the "
                          "original run", RuntimeWarning, stacklevel=2)
        self.data.load_state_dict(data_state)
        diffs = _config_diff(state.get("config") or {}, _jsonable_config(self.config))
        important = [d for d in diffs if d.split(":")[0] in
                     ("batch_size", "grad_accum", "seed", "lr", "optimizer", "scheduler",
                      "shuffle", "amp")]
        if important:
            warnings.warn(f"resuming from {where} with a changed config: {'; '.join(important)}",
                          RuntimeWarning, stacklevel=2)
        c = state.get("counters", {})
        self.nonfinite_total = int(c.get("nonfinite_total", 0))
        self.nonfinite_consecutive = int(c.get("nonfinite_consecutive", 0))
        self.amp_overflow_total = int(c.get("amp_overflow_total", 0))
        self.step = int(state["step"])
        self.last_saved_step = self.step
        if self.step > self.config.steps:
            raise CheckpointError(f"{where} is at step {self.step}, beyond config.steps="
                                  f"{self.config.steps}")
        rng = state.get("rng") or []
        if rng:
            _set_rng_state(rng[self.rank % len(rng)])
        self.logger.truncate_after(self.step)
        self.resumed_from = Path(path)
        log.info("resumed from %s at step %d", path, self.step)

    # --- training ----------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward_backward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        accum = cfg.grad_accum
        losses = []
        extra: dict[str, list[torch.Tensor]] = {}
        for micro in range(accum):
            batch = _to_device(self.data.next(), self.device,
                               non_blocking=self.device.type == "cuda")
            if cfg.debug and self._debug_seen < cfg.debug_batches:
                for line in _describe_batch(batch):
                    log.info("debug step %d micro %d rank %d %s", self.step + 1, micro,
                             self.rank, line)
            sync = self._ddp.no_sync() if (self._ddp is not None and micro < accum - 1) \
                else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self.loss_fn(self.train_model, batch)
                loss, metrics = _split_loss(out)
                lossf = loss.float()
                if cfg.debug and self._debug_seen < cfg.debug_batches:
                    log.info("debug step %d micro %d loss=%s dtype=%s", self.step + 1, micro,
                             lossf.item(), loss.dtype)
                scaled = lossf / accum
                if self.scaler.is_enabled():
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            losses.append(lossf.detach())
            for k, v in metrics.items():
                extra.setdefault(k, []).append(
                    v.detach().float().mean() if isinstance(v, torch.Tensor)
                    else torch.tensor(float(v)))
        if cfg.debug:
            self._debug_seen += 1
        stacked = torch.stack(losses)
        return stacked, {k: torch.stack([t.to(stacked.device) for t in v]).mean()
                         for k, v in extra.items()}

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns its log record."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        losses, extra = self._forward_backward()
        summary = torch.stack([losses.mean(), (~torch.isfinite(losses)).any().float()])
        if self._ddp is not None:
            dist.all_reduce(summary)
            summary[0] /= self.world_size
        loss_value, bad_flag = summary.tolist()
        bad = bad_flag > 0
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.step += 1
        rec: dict[str, Any] = {"step": self.step, "loss": loss_value, "lr": lrs[0]}
        for i, lr in enumerate(lrs[1:], 1):
            rec[f"lr_group{i}"] = lr
        reason = "loss" if bad else None
        grad_norm = None
        if not bad:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]
                      if p.grad is not None]
            model_clip = getattr(self.model, "clip_grad_norm_", None)
            if cfg.grad_clip and callable(model_clip):
                grad_norm = model_clip(cfg.grad_clip)  # the model's own clipping rule
            elif cfg.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            elif cfg.log_grad_norm and params:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if grad_norm is not None:
                gn = float(grad_norm)
                rec["grad_norm"] = gn
                if not math.isfinite(gn) and not self.scaler.is_enabled():
                    bad, reason = True, "grad"
        if bad:
            self._skip_step(rec, reason)
        else:
            stepped = True
            if self.scaler.is_enabled():
                before = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= before
                if not stepped:
                    self.amp_overflow_total += 1
                rec["amp_scale"] = self.scaler.get_scale()
                rec["amp_overflow_total"] = self.amp_overflow_total
            else:
                self.optimizer.step()
            if stepped:
                if self.scheduler is not None:
                    self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model, self.step)
            self.nonfinite_consecutive = 0
            self.last_finite_loss = loss_value
            rec["skipped"] = 0 if stepped else 1
        rec["nonfinite_total"] = self.nonfinite_total
        rec["epoch"] = self.data.epoch
        for k, v in extra.items():
            rec[k] = v
        return rec

    def _skip_step(self, rec: dict, reason: str | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_consecutive += 1
        rec["skipped"] = 1
        rec["nonfinite_reason"] = reason
        log.warning("step %d: non-finite %s (loss=%s); optimizer step skipped "
                    "(%d consecutive, %d total)", self.step, reason, rec["loss"],
                    self.nonfinite_consecutive, self.nonfinite_total)

    def _check_nonfinite_stop(self, rec: dict) -> None:
        limit = self.config.max_consecutive_nonfinite
        if limit and self.nonfinite_consecutive >= limit:
            first = self.step - self.nonfinite_consecutive + 1
            last = (f"last finite loss {self.last_finite_loss:.6g}"
                    if self.last_finite_loss is not None else "no finite loss yet")
            raise NonFiniteLossError(
                f"training stopped: the {rec.get('nonfinite_reason')} was non-finite for "
                f"{self.nonfinite_consecutive} consecutive steps (steps {first}..{self.step}; "
                f"max_consecutive_nonfinite={limit}); {self.nonfinite_total} skipped in total, "
                f"{last}. Weights are those of step {first - 1}. Try a lower lr, grad_clip, "
                f"amp='off', or debug=True to inspect the batches.")

    def evaluate(self) -> dict:
        """Run ``eval_fn`` on the EMA model (or the trained one) in eval mode, no grad."""
        if self.eval_fn is None:
            return {}
        m = self.ema_model
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                out = self.eval_fn(m, self.step) or {}
        finally:
            m.train(was_training)
        return {f"eval/{k}" if not str(k).startswith("eval") else k: v for k, v in out.items()}

    def fit(self, until: int | None = None, save_final: bool | None = None) -> dict:
        """Train until ``config.steps`` (or step ``until``, e.g. to simulate preemption).

        Returns the last logged record. Saves a final checkpoint when ``save_final`` (default:
        ``config.save_final``; False e.g. for a timed warm-up segment).
        """
        cfg = self.config
        target = cfg.steps if until is None else min(int(until), cfg.steps)
        self.model.train()
        use_bar = cfg.progress and self.is_main and sys.stderr.isatty()
        bar = None
        if use_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        self._t_window = time.perf_counter()
        self._steps_window = 0
        last: dict = {}
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        try:
            while self.step < target:
                rec = self.train_step()
                self._steps_window += 1
                if rec.get("skipped") == 0:
                    self._window.append(rec["loss"])
                should_log = (self.step % cfg.log_every == 0 or self.step == target
                              or rec.get("nonfinite_reason") is not None)
                if should_log:
                    now = time.perf_counter()
                    dt = max(now - self._t_window, 1e-9)
                    rec["samples_per_s"] = samples_per_step * self._steps_window / dt
                    rec["steps_per_s"] = self._steps_window / dt
                    if cfg.log_every > 1 and self._window:
                        rec["loss_window_mean"] = sum(self._window) / len(self._window)
                    self._t_window, self._steps_window, self._window = now, 0, []
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    rec.update(self.evaluate())
                    should_log = True
                if should_log:
                    rec = {k: (v.item() if isinstance(v, torch.Tensor) else v)
                           for k, v in rec.items()}
                    self.logger.log(rec)
                    self.history.append(rec)
                    last = rec
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.3g}",
                                        sps=f"{rec.get('samples_per_s', 0):.0f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                self._check_nonfinite_stop(rec)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if save_final is None:
                save_final = cfg.save_final
            if save_final and self.step > self.last_saved_step and self.step > 0:
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return last

    def close(self) -> None:
        self.logger.close()


def _split_loss(out) -> tuple[torch.Tensor, dict]:
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError("loss_fn must return a scalar tensor or (loss, dict of metrics), "
                            f"got a tuple of {len(out)}")
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a scalar loss tensor, got "
                        + (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                           else type(loss).__name__))
    if not loss.requires_grad:
        raise RuntimeError("the loss does not require grad: does loss_fn use the model passed "
                           "to it, and is the model's output detached somewhere?")
    return loss.reshape(()), dict(metrics)


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k not in (
                "optimizer_kwargs", "scheduler_kwargs"):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _enable_debug_logging() -> None:
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[dualdiff.train] %(message)s"))
        log.addHandler(h)


def train(model: nn.Module, loss_fn: LossFn, data: Any, config: TrainConfig, **kwargs) -> Trainer:
    """Build a :class:`Trainer`, run :meth:`Trainer.fit`, close the loggers; returns it."""
    trainer = Trainer(model, loss_fn, data, config, **kwargs)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer
