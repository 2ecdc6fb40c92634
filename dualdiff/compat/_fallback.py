"""One-time notices for the compat modules' plain-PyTorch fallbacks.

A compat module that cannot map an option onto a fused op computes the same function in plain
PyTorch. It records why in ``.fallback_reason`` and says so once per (module class, reason) with
a :class:`FallbackWarning`, so that no numeric path changes silently.
"""
from __future__ import annotations

import warnings

__all__ = ["FallbackWarning", "notify_fallback"]

_SEEN: set[tuple[str, str]] = set()


class FallbackWarning(UserWarning):
    """A dualdiff.compat module runs (part of) its computation in plain PyTorch."""


def notify_fallback(owner: str, reason: str, *, stacklevel: int = 3) -> None:
    """Warn once per ``(owner, reason)`` that ``owner`` falls back to plain PyTorch."""
    key = (owner, reason)
    if key in _SEEN:
        return
    _SEEN.add(key)
    warnings.warn(f"{owner}: plain-PyTorch path ({reason})", FallbackWarning, stacklevel=stacklevel)


def reset_notices() -> None:
    """Forget which notices were given (tests)."""
    _SEEN.clear()
