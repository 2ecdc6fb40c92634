"""Data sets: toy 2-D point sets (more to come: image folders, synthetic data)."""
from __future__ import annotations

from dualdiff.data.toy2d import (
    DATASAURUS_SHA256,
    DATASAURUS_URL,
    DATASETS as TOY2D_DATASETS,
    DatasaurusUnavailableError,
    datasaurus_path,
    get_dataset,
)

__all__ = [
    "DATASAURUS_SHA256",
    "DATASAURUS_URL",
    "TOY2D_DATASETS",
    "DatasaurusUnavailableError",
    "datasaurus_path",
    "get_dataset",
]
