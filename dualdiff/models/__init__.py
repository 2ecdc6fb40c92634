"""Models: MLP denoisers of the toy2d experiment (more to come: UNets, beta-VAE)."""
from __future__ import annotations

from dualdiff.models.toy2d import (
    VARIANTS as TOY2D_VARIANTS,
    DualScaleDenoiser,
    MLPDenoiser,
    build_toy_model,
)

__all__ = ["TOY2D_VARIANTS", "DualScaleDenoiser", "MLPDenoiser", "build_toy_model"]
