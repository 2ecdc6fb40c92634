"""Seeding for reproducible runs: python, numpy and torch (CPU and every CUDA device)."""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "derive_seed", "seed_worker"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and runs).

    Used to give each (seed, rank, epoch, batch) its own independent stream without the
    correlations of ``seed + rank`` style offsets.
    """
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU + all CUDA devices).

    ``deterministic=True`` also asks torch for deterministic algorithms (errors on ops that
    have none; sets CUBLAS_WORKSPACE_CONFIG as cuBLAS requires) and disables cuDNN autotuning.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed python/numpy from torch's worker seed."""
    s = torch.initial_seed() % (1 << 32)
    random.seed(s)
    np.random.seed(s)
