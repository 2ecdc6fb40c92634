"""Models: UNet blocks, the LIFT dual-timestep UNet and its single-scale baseline, and the MLP
denoisers of the toy2d experiment."""
from __future__ import annotations

from dualdiff.models.lift import LIFTDualTimestepModel, LIFTModelConfig, SingleScaleUNet
from dualdiff.models.stacked import StackedModels
from dualdiff.models.toy2d import (
    VARIANTS as TOY2D_VARIANTS,
    DualScaleDenoiser,
    MLPDenoiser,
    build_toy_model,
)
from dualdiff.models.unet import ResBlock, UNet, count_parameters

__all__ = [
    "LIFTDualTimestepModel", "LIFTModelConfig", "SingleScaleUNet",
    "ResBlock", "UNet", "count_parameters", "StackedModels",
    "TOY2D_VARIANTS", "DualScaleDenoiser", "MLPDenoiser", "build_toy_model",
]
