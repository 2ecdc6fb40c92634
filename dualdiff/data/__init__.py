"""Data sets: images (embedded procedural default, image folders, Hugging Face AFHQ) and the
toy 2-D point sets."""
from __future__ import annotations

from dualdiff.data.images import (DatasetUnavailableError, ImageFolderDataset,
                                  ProceduralDualScaleImages, dual_scale_views, hf_afhq)
from dualdiff.data.toy2d import (
    DATASAURUS_SHA256,
    DATASAURUS_URL,
    DATASETS as TOY2D_DATASETS,
    DatasaurusUnavailableError,
    datasaurus_path,
    get_dataset,
)

__all__ = [
    "DatasetUnavailableError", "ImageFolderDataset", "ProceduralDualScaleImages",
    "dual_scale_views", "hf_afhq",
    "DATASAURUS_SHA256",
    "DATASAURUS_URL",
    "TOY2D_DATASETS",
    "DatasaurusUnavailableError",
    "datasaurus_path",
    "get_dataset",
]
