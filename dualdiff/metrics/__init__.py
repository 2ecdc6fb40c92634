"""Metrics: k-NN KL divergence estimate (more to come: FID, MSE tests, Dice score)."""
from __future__ import annotations

from dualdiff.metrics.kl import kldiv

__all__ = ["kldiv"]
