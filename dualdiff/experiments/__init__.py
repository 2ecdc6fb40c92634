"""Experiments: one module per experiment (config dataclass + train / evaluate / analyse entry points)."""
