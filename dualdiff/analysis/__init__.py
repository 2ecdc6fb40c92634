"""Analysis tools: DP / greedy paths through the LIFT error heatmap and path -> γ schedules."""
from __future__ import annotations

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
