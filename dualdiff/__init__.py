"""dualdiff: fast fused kernels and drop-in experiments for diffusion-model research."""
from __future__ import annotations

from dualdiff._backend import BackendUnavailableError, backends

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "backends", "__version__"]
