"""Where the training batches come from, reproducibly and resumably.

The Trainer's ``data=`` may be, chosen so that a resumed run sees exactly the batches the
uninterrupted run would have seen:

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

:func:`make_source` wraps ``data`` in one of these; every source has ``next()``, ``epoch``,
``kind``, ``state_dict()`` and ``load_state_dict()``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from dualdiff.train.config import TrainConfig
from dualdiff.utils.seed import derive_seed

__all__ = ["ResumableBatchSampler", "make_source", "to_device", "describe_batch"]


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


def make_source(data: Any, cfg: TrainConfig, rank: int, world: int,
                collate_fn: Callable | None, pin_memory: bool):
    """Wrap the Trainer's ``data`` (module docstring) in a resumable batch source."""
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


def to_device(x: Any, device: torch.device, non_blocking: bool) -> Any:
    """``x`` with every tensor moved to ``device``, through dicts, lists, tuples and
    namedtuples (other leaves unchanged)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return type(x)({k: to_device(v, device, non_blocking) for k, v in x.items()}) \
            if not hasattr(x, "_fields") else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(to_device(v, device, non_blocking) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x


def describe_batch(x: Any, prefix: str = "batch") -> list[str]:
    """One line per tensor of a batch: shape, dtype, device, min/max/mean/std, non-finite
    count (reads the values back: debug logging only)."""
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
        return [ln for k, v in x.items() for ln in describe_batch(v, f"{prefix}[{k!r}]")]
    if isinstance(x, (list, tuple)):
        return [ln for i, v in enumerate(x) for ln in describe_batch(v, f"{prefix}[{i}]")]
    return [f"{prefix}: {type(x).__name__} {x!r:.80}"]
