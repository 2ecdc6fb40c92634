"""The Trainer: the one training loop every dualdiff experiment uses.

``Trainer(model, loss_fn, data, config).fit()`` trains any ``nn.Module`` given
``loss_fn(model, batch) -> loss`` (a scalar tensor) or ``-> (loss, {name: value})``; a
``loss_fn(model, batch, step)`` whose signature accepts a third positional argument also
gets the number of optimizer steps completed before this one (0 on the first step, the index
the LR schedule uses), e.g. for KL annealing. ``data`` is described in
:mod:`dualdiff.train.data`.

Per optimizer step the loop draws ``grad_accum`` micro-batches of ``batch_size`` samples
per process, so one step averages the gradient over ``batch_size * grad_accum *
world_size`` samples (``loss_fn`` should return a mean over its batch).

No host sync on steps that do not log. The non-finite guard is decided on the device: a
step whose loss (on any rank) or gradient norm is non-finite is skipped by a flag tensor
handed to the optimizer as ``found_inf`` (GradScaler's contract, honoured by fused
Adam/AdamW, which :func:`~dualdiff.train.optim.build_optimizer` picks by default), which
leaves the weights and the optimizer state untouched; the EMA is gated by the same flag.
Skip counters and the loss window live on the device and are read back only every
``log_every`` steps and at the end, so ``max_consecutive_nonfinite`` stops the run at the
first log step at which the last that-many steps or more were all skipped. Two cases still
read the flag on the host each step: an optimizer without ``found_inf`` support, and fp16
with a GradScaler (whose loss check must keep a skipped step away from the scaler). The LR
scheduler steps once per step, skipped steps included.

Mixed precision ('auto' = bf16 autocast on CUDA, off on CPU; 'fp16' adds a GradScaler),
optional ``torch.compile``, gradient clipping, EMA (:mod:`dualdiff.train.ema`), atomic
checkpoints (:mod:`dualdiff.train.checkpoint`), JSONL/CSV metrics (+ TensorBoard / W&B), a
tqdm progress bar, a debug switch and DDP under torchrun (:mod:`dualdiff.train.distributed`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dualdiff.train import distributed as ddist
from dualdiff.train.checkpoint import (CheckpointError, find_resumable, load_checkpoint,
                                       remove_stale_tmp, save_checkpoint)
from dualdiff.train.config import NonFiniteLossError, TrainConfig
from dualdiff.train.data import describe_batch, make_source, to_device
from dualdiff.train.ema import EMA, unwrap_model
from dualdiff.train.metrics_log import MetricsLogger
from dualdiff.train.optim import build_optimizer, build_scheduler, resolve_amp, supports_found_inf
from dualdiff.train.state import config_diff, jsonable_config, rng_state, set_rng_state
from dualdiff.utils.seed import derive_seed, seed_everything

__all__ = ["Trainer", "train", "LossFn"]

log = logging.getLogger("dualdiff.train")

LossFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]


def accepts_step(loss_fn: Callable) -> bool:
    """True when ``loss_fn``'s signature accepts a third positional argument (the step): a
    third positional parameter, with or without a default, or ``*args``. (A loss with an
    unrelated optional third positional parameter would receive the step: make it
    keyword-only.)"""
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


class _StepStats:
    """Device-side counters of the non-finite guard and the loss window of the current log
    interval; nothing here reads a value back (see :meth:`Trainer.read_record`)."""

    def __init__(self, device: torch.device):
        fdtype = torch.float32 if device.type == "mps" else torch.float64
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self.last_finite_step = torch.zeros((), dtype=torch.int64, device=device)
        self.window_sum = torch.zeros((), dtype=fdtype, device=device)  # losses of stepped steps
        self.window_n = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, step: int, loss: torch.Tensor, finite: torch.Tensor,
               stepped: torch.Tensor) -> None:
        """``finite``: step ``step`` passed the guard; ``stepped``: its weights were updated
        (differs from ``finite`` only on an fp16 overflow); both 0-d bool tensors."""
        self.skipped_total.add_(~finite)
        self.last_finite_step.masked_fill_(finite, step)
        self.window_sum.add_(torch.where(stepped, loss.detach(), 0.0))
        self.window_n.add_(stepped)

    def load(self, step: int, total: int, consecutive: int) -> None:
        self.skipped_total.fill_(total)
        self.last_finite_step.fill_(step - consecutive)

    def reset_window(self) -> None:
        self.window_sum.zero_()
        self.window_n.zero_()


class Trainer:
    """Train ``model`` with ``loss_fn(model, batch)`` (or ``loss_fn(model, batch, step)``,
    see the module docstring) on ``data`` under ``config``.

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
        self.loss_fn = loss_fn  # inspected once here: does it take the step?
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
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_every, cfg.ema_warmup,
                       update_after_step=cfg.ema_update_after_step, inv_gamma=cfg.ema_inv_gamma,
                       power=cfg.ema_power, min_decay=cfg.ema_min_decay) \
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

        self.data = make_source(data, cfg, self.rank, self.world_size, collate_fn,
                                pin_memory=self.device.type == "cuda")
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        if self.is_main:  # a write killed mid-way (SIGKILL, power cut) leaves its temp file
            remove_stale_tmp(self.checkpoint_dir)
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main,
                                    tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                    wandb_kwargs=cfg.wandb_kwargs,
                                    config=jsonable_config(run_config or cfg))

        self.step = 0
        self._stats = _StepStats(self.device)
        self._read: dict[str, Any] = {}  # the counters as of the last read_record
        self._logged_nonfinite = 0
        self._logged_step = 0
        self._last_logged_finite: tuple[int, float] | None = None  # (step, loss)
        self.amp_overflow_total = 0
        self.last_saved_step = -1
        self.history: list[dict] = []  # every logged record (all ranks; files: main rank only)
        self._debug_seen = 0
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
    def loss_fn(self) -> LossFn:
        return self._loss_fn

    @loss_fn.setter
    def loss_fn(self, fn: LossFn) -> None:
        if not callable(fn):
            raise TypeError(f"loss_fn must be callable, got {type(fn).__name__}")
        self._loss_fn = fn
        self._loss_takes_step = accepts_step(fn)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume (collective under DDP: every rank must call it);
        :meth:`load_state` takes it back. The tensors share storage with the live model and
        optimizer: ``copy.deepcopy`` it to keep a snapshot while training goes on."""
        rng = ddist.all_gather_object(rng_state())
        return {
            "step": self.step,
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
            "config": jsonable_config(self.config),
            "run_config": jsonable_config(self.run_config) if self.run_config is not None
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
                # records of an earlier attempt that died before its first checkpoint belong
                # to a discarded trajectory: the files restart with this run
                self.logger.truncate_after(0)
                return
            path, state = found
            self.load_state(state, path)
        else:
            self.load_state(load_checkpoint(resume), Path(resume))

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint file (clear errors for missing/corrupt/incompatible)."""
        self.load_state(load_checkpoint(path), Path(path))

    def load_state(self, state: dict, path: Path | str = "<state>") -> None:
        """Restore what :meth:`state_dict` returned (or a loaded checkpoint)."""
        where = f"checkpoint {str(path)!r}"
        if "step" not in state:
            raise CheckpointError(f"{where} has no 'step': not a Trainer state")
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
        diffs = config_diff(state.get("config") or {}, jsonable_config(self.config))
        important = [d for d in diffs if d.split(":")[0] in
                     ("batch_size", "grad_accum", "seed", "lr", "optimizer", "scheduler",
                      "shuffle", "amp")]
        if important:
            warnings.warn(f"resuming from {where} with a changed config: {'; '.join(important)}",
                          RuntimeWarning, stacklevel=2)
        c = state.get("counters", {})
        self.amp_overflow_total = int(c.get("amp_overflow_total", 0))
        self.step = int(state["step"])
        self._stats.load(self.step, int(c.get("nonfinite_total", 0)),
                         int(c.get("nonfinite_consecutive", 0)))
        self._logged_nonfinite = int(c.get("nonfinite_total", 0))
        self.last_saved_step = self.step
        if self.step > self.config.steps:
            raise CheckpointError(f"{where} is at step {self.step}, beyond config.steps="
                                  f"{self.config.steps}")
        rng = state.get("rng") or []
        if rng:
            set_rng_state(rng[self.rank % len(rng)])
        self.logger.truncate_after(self.step)
        self.resumed_from = Path(path)
        log.info("resumed from %s at step %d", path, self.step)

    # --- training ----------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _call_loss(self, batch):
        if self._loss_takes_step:
            return self._loss_fn(self.train_model, batch, self.step)
        return self._loss_fn(self.train_model, batch)

    def _forward_backward(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        cfg = self.config
        accum = cfg.grad_accum
        debug = cfg.debug and self._debug_seen < cfg.debug_batches
        losses = []
        extra: dict[str, list[torch.Tensor]] = {}
        for micro in range(accum):
            batch = to_device(self.data.next(), self.device,
                              non_blocking=self.device.type == "cuda")
            if debug:
                for line in describe_batch(batch):
                    log.info("debug step %d micro %d rank %d %s", self.step + 1, micro,
                             self.rank, line)
            sync = self._ddp.no_sync() if (self._ddp is not None and micro < accum - 1) \
                else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self._call_loss(batch)
                loss, metrics = _split_loss(out)
                lossf = loss.float()
                if debug:
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
                    else torch.tensor(float(v)))  # a CPU tensor: no host-to-device copy
        if cfg.debug:
            self._debug_seen += 1
        return losses, {k: torch.stack([t.to(v[0].device) for t in v]).mean()
                        for k, v in extra.items()}

    def _mean_loss(self, losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean micro-batch loss over all ranks, 0-d bool: every one of them was finite)."""
        if self._ddp is None and len(losses) == 1:
            return losses[0], torch.isfinite(losses[0])
        losses = torch.stack(losses)
        if self._ddp is None:
            return losses.mean(), torch.isfinite(losses).all()
        summary = torch.stack([losses.mean(), (~torch.isfinite(losses)).any().float()])
        dist.all_reduce(summary)
        return summary[0] / self.world_size, summary[1] == 0

    def _clip(self) -> torch.Tensor | None:
        """Clip (``grad_clip``) and/or measure (``log_grad_norm``) the gradient; its norm."""
        cfg = self.config
        model_clip = getattr(self.model, "clip_grad_norm_", None)
        if cfg.grad_clip and callable(model_clip):
            return model_clip(cfg.grad_clip)  # the model's own clipping rule
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        if cfg.grad_clip:
            return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if cfg.log_grad_norm and params:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return None

    def _optimizer_step(self, loss_ok: torch.Tensor
                        ) -> tuple[torch.Tensor, Any, torch.Tensor | bool]:
        """Clip and step, skipping a non-finite step; returns (finite flag, grad norm,
        stepped). Without fp16 the flag gates the fused optimizer on the device; otherwise
        it is read on the host (see the module docstring)."""
        if self.scaler.is_enabled():
            return self._scaled_step(loss_ok)
        grad_norm = self._clip()
        finite = loss_ok if grad_norm is None else loss_ok & torch.isfinite(grad_norm)
        if supports_found_inf(self.optimizer):
            opt = self.optimizer
            opt.grad_scale, opt.found_inf = None, (~finite).float()
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
            return finite, grad_norm, finite
        if bool(finite):  # host read: this optimizer cannot skip a step on the device
            self.optimizer.step()
            return finite, grad_norm, True
        return finite, grad_norm, False

    def _scaled_step(self, loss_ok: torch.Tensor) -> tuple[torch.Tensor, Any, bool]:
        """fp16: a non-finite loss skips the step before the GradScaler sees it (host read);
        a non-finite gradient is the scaler's overflow (skipped, not counted as non-finite)."""
        if not bool(loss_ok):
            return loss_ok, None, False
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before
        if not stepped:
            self.amp_overflow_total += 1
        return loss_ok, grad_norm, stepped

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns its record.

        The record's values may be 0-d tensors still on the device (loss, grad_norm,
        skipped, metrics): nothing is read back here (except for fp16 and optimizers without
        ``found_inf``). :meth:`fit` reads records back at log steps; :meth:`read_record`
        does it for a record of your own.
        """
        self.optimizer.zero_grad(set_to_none=True)
        losses, extra = self._forward_backward()
        loss, loss_ok = self._mean_loss(losses)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        finite, grad_norm, stepped = self._optimizer_step(loss_ok)
        self.step += 1
        if self.scheduler is not None:
            if stepped is False:  # optimizer.step() was not called (host-decided skip)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step",
                                            UserWarning)
                    self.scheduler.step()
            else:
                self.scheduler.step()
        if isinstance(stepped, bool):
            if self.ema is not None and stepped:
                self.ema.update(self.model, self.step)
            stepped = torch.tensor(stepped, device=finite.device)
        elif self.ema is not None:
            self.ema.update(self.model, self.step, gate=stepped)
        self._stats.update(self.step, loss, finite, stepped)
        rec: dict[str, Any] = {"step": self.step, "loss": loss, "lr": lrs[0]}
        for i, lr in enumerate(lrs[1:], 1):
            rec[f"lr_group{i}"] = lr
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if self.scaler.is_enabled():
            rec["amp_scale"] = self.scaler.get_scale()
            rec["amp_overflow_total"] = self.amp_overflow_total
        rec["skipped"] = ~stepped
        rec["epoch"] = self.data.epoch
        rec.update(extra)
        return rec

    def read_record(self, rec: dict) -> dict:
        """``rec`` with every tensor read back as a Python number (one transfer for the
        values on the training device), plus the guard's counters as they are now:
        ``nonfinite_total`` and, on a skipped step, ``nonfinite_reason`` ('loss' or 'grad')."""
        s = self._stats
        names = [k for k, v in rec.items() if isinstance(v, torch.Tensor)
                 and v.device == s.window_sum.device]
        dtype = s.window_sum.dtype
        vals = torch.stack([rec[k].reshape(()).to(dtype) for k in names] + [
            s.skipped_total.to(dtype), s.last_finite_step.to(dtype), s.window_sum,
            s.window_n.to(dtype)]).tolist()
        out = dict(rec)
        out.update(zip(names, vals))
        for k, v in out.items():
            if isinstance(v, torch.Tensor):  # on another device (e.g. constant metrics)
                out[k] = v.item()
        total, last_finite_step, wsum, wn = vals[len(names):]
        self._read = {"nonfinite_total": int(total),
                      "nonfinite_consecutive": self.step - int(last_finite_step),
                      "window_sum": wsum, "window_n": int(wn)}
        out["skipped"] = int(out["skipped"])
        if out["skipped"] and not (self.scaler.is_enabled() and math.isfinite(out["loss"])):
            out["nonfinite_reason"] = "loss" if not math.isfinite(out["loss"]) else "grad"
        elif not out["skipped"]:
            self._last_logged_finite = (out["step"], out["loss"])
        out["nonfinite_total"] = int(total)
        return out

    def _log_skips(self, rec: dict) -> None:
        total = self._read["nonfinite_total"]
        new = total - self._logged_nonfinite
        if new > 0:
            log.warning("steps %d..%d: %d non-finite step(s) skipped (last: %s, loss=%s; "
                        "%d consecutive, %d total)", self._logged_step + 1, self.step, new,
                        rec.get("nonfinite_reason", "none"), rec["loss"],
                        self._read["nonfinite_consecutive"], total)
        self._logged_nonfinite, self._logged_step = total, self.step

    def _check_nonfinite_stop(self, rec: dict) -> None:
        limit = self.config.max_consecutive_nonfinite
        run, total = self._read["nonfinite_consecutive"], self._read["nonfinite_total"]
        if limit and run >= limit:
            first = self.step - run + 1
            last = (f"last logged finite loss {self._last_logged_finite[1]:.6g} (step "
                    f"{self._last_logged_finite[0]})" if self._last_logged_finite is not None
                    else "no finite loss logged")
            raise NonFiniteLossError(
                f"training stopped: the {rec.get('nonfinite_reason')} was non-finite for "
                f"{run} consecutive steps (steps {first}..{self.step}; "
                f"max_consecutive_nonfinite={limit}, checked every log_every="
                f"{self.config.log_every} steps); {total} skipped in total, {last}. Weights "
                f"are those of step {first - 1}. Try a lower lr, grad_clip, amp='off', or "
                f"debug=True to inspect the batches.")

    # --- counters (host reads: for callers, never used inside the loop) ----------------

    @property
    def nonfinite_total(self) -> int:
        """Steps skipped so far because the loss or the gradient was non-finite."""
        return int(self._stats.skipped_total)

    @property
    def nonfinite_consecutive(self) -> int:
        """Skipped steps in a row up to the current step."""
        return self.step - int(self._stats.last_finite_step)

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

        Values are read back from the device only at log steps (every ``log_every`` steps,
        the last step, and eval steps). Returns the last logged record. Saves a final
        checkpoint when ``save_final`` (default: ``config.save_final``; False e.g. for a
        timed warm-up segment).
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
        self._logged_step = self.step
        self._stats.reset_window()
        last: dict = {}
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        try:
            while self.step < target:
                rec = self.train_step()
                self._steps_window += 1
                should_log = self.step % cfg.log_every == 0 or self.step == target
                do_eval = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                if should_log or do_eval:
                    rec = self.read_record(rec)
                if should_log:
                    now = time.perf_counter()
                    dt = max(now - self._t_window, 1e-9)
                    rec["samples_per_s"] = samples_per_step * self._steps_window / dt
                    rec["steps_per_s"] = self._steps_window / dt
                    if cfg.log_every > 1 and self._read["window_n"]:
                        rec["loss_window_mean"] = self._read["window_sum"] / self._read["window_n"]
                    self._t_window, self._steps_window = now, 0
                    self._stats.reset_window()
                if do_eval:
                    rec.update(self.evaluate())
                    rec = {k: (v.item() if isinstance(v, torch.Tensor) else v)
                           for k, v in rec.items()}
                if should_log or do_eval:
                    self.logger.log(rec)
                    self.history.append(rec)
                    last = rec
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.3g}",
                                        sps=f"{rec.get('samples_per_s', 0):.0f}", refresh=False)
                    self._log_skips(rec)
                    self._check_nonfinite_stop(rec)
                if bar is not None:
                    bar.update(1)
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
