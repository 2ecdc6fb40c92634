"""Run state that is not a tensor of the model: RNG streams and config snapshots.

Both are stored in checkpoints in a form ``torch.load(weights_only=True)`` accepts (tensors,
lists, dicts, numbers, strings).
"""
from __future__ import annotations

import dataclasses
import json
import random
import warnings
from typing import Any

import numpy as np
import torch

from dualdiff.config import to_dict

__all__ = ["rng_state", "set_rng_state", "jsonable_config", "config_diff"]


def rng_state() -> dict:
    """The python, numpy, torch and CUDA RNG states of this process (weights_only-safe)."""
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


def set_rng_state(s: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA only for the same device count)."""
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


def jsonable_config(cfg: Any) -> dict:
    """A dataclass / mapping config as plain JSON types (unknown objects become strings)."""
    if cfg is None:
        return {}
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=str))


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every differing key of two config dicts (nested keys
    dotted; optimizer/scheduler kwargs compared whole)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k not in (
                "optimizer_kwargs", "scheduler_kwargs"):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
