"""Distributed data parallel under ``torchrun``: NCCL on GPU, gloo on CPU.

``torchrun --nproc_per_node=N script.py`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; :func:`init_distributed` reads them and initialises the default
process group once. A single process (no WORLD_SIZE or WORLD_SIZE=1) needs nothing.
"""
from __future__ import annotations

import datetime
import gc
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size",
           "get_local_rank", "is_main_process", "barrier", "all_gather_object",
           "cleanup_distributed", "default_device"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def default_device(device: str = "auto") -> torch.device:
    """'auto' -> this process's CUDA device (cuda:LOCAL_RANK) when CUDA exists, else CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str | None = None, device: torch.device | None = None,
                     timeout: datetime.timedelta | None = None) -> bool:
    """Initialise the process group from torchrun's environment when WORLD_SIZE > 1.

    Returns True when running distributed. ``backend`` defaults to NCCL on CUDA devices and
    gloo otherwise; ``timeout``: how long collectives (a :func:`barrier`) wait for the other
    ranks (None: torch's default). Calling it again is a no-op.
    """
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    device = device or default_device()
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if backend == "nccl" and device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, **kwargs)
    return True


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a one-item list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup_distributed(wait: bool = True) -> None:
    """Tear down the process group: a barrier, then destroy it (no-op in a single process).

    The barrier keeps a rank from closing its connections while another is still inside a
    collective; ``wait=False`` skips it (on an error path, where the other ranks may never reach
    it, or reach a different one). Drop every object holding the group (a ``Trainer``'s DDP
    wrapper) first: the ``gc.collect()`` here then frees it while the interpreter is fully
    alive; a gloo group freed later, at interpreter shutdown, can abort the process (SIGABRT).
    """
    if is_distributed():
        if wait:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()
