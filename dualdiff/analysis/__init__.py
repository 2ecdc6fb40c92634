"""Analysis tools: the LIFT error heatmap (batched Hutchinson), DP / greedy paths through it,
path -> γ schedules -> timesteps, generation along paths, plots."""
from __future__ import annotations

from dualdiff.analysis.generate import GenerationPath, generate, generate_for_fid, make_path
from dualdiff.analysis.heatmap import HeatmapResult, compute_error_heatmap, merge_heatmap_shards
from dualdiff.analysis.paths import (
    FIXED_STEP_OBJECTIVES,
    OBJECTIVES,
    GammaSchedule,
    GridPath,
    NoPathError,
    diagonal_schedule,
    fixed_step_path,
    fixed_step_path_cost,
    fixed_step_schedule,
    greedy_path,
    seed_dp_path,
    seed_path_schedule,
)

__all__ = [
    "GenerationPath", "generate", "generate_for_fid", "make_path",
    "HeatmapResult", "compute_error_heatmap", "merge_heatmap_shards",
    "FIXED_STEP_OBJECTIVES",
    "OBJECTIVES",
    "GammaSchedule",
    "GridPath",
    "NoPathError",
    "diagonal_schedule",
    "fixed_step_path",
    "fixed_step_path_cost",
    "fixed_step_schedule",
    "greedy_path",
    "seed_dp_path",
    "seed_path_schedule",
]
