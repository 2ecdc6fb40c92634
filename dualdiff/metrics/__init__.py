"""Metrics: FID (pytorch-fid Inception features + dualdiff.ops.frechet_distance), k-NN KL
divergence estimate, the LIFT MSE tests."""
from __future__ import annotations

from dualdiff.metrics.fid import InceptionWeightsError, fid_from_folders, load_inception
from dualdiff.metrics.kl import kldiv
from dualdiff.metrics.mse_tests import run_mse_tests

__all__ = ["InceptionWeightsError", "fid_from_folders", "load_inception", "kldiv", "run_mse_tests"]
