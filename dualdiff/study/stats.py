"""The statistics of a study: Student-t intervals over seeds, paired differences, the verdict rule.

Everything here is fixed before any number of a study is seen; :data:`LEVEL` and
:data:`VERDICT_RULE` are written verbatim into every report.

* :func:`t_interval`: mean of ``n`` values with the two-sided ``LEVEL`` Student-t interval
  ``mean +- t_{(1+LEVEL)/2, n-1} * sd / sqrt(n)`` (``sd`` with ``n - 1`` in the denominator);
  no interval for ``n < 2``.
* :func:`paired_differences`: ``a[s] - b[s]`` for every seed ``s`` where both values are
  finite (common random numbers: the same seed gives both arms the same data and noise).
* :func:`verdict`: the rule below, applied to the interval of the paired differences.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.special import stdtrit

__all__ = ["LEVEL", "SUPPORTED", "CONTRADICTED", "INCONCLUSIVE", "VERDICTS", "VERDICT_RULE",
           "Interval", "t_interval", "paired_differences", "paired_interval", "verdict"]

LEVEL = 0.95
SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this scale"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE)

Direction = Literal["lower", "higher"]

VERDICT_RULE = (
    "For a claim 'arm A has a lower (higher) metric than arm B', take the paired differences "
    "d_s = metric(A, seed s) - metric(B, seed s) over the seeds s where both runs finished with "
    "a finite value, and their two-sided 95 % Student-t interval mean(d) +- t_{0.975, n-1} * "
    "sd(d) / sqrt(n). The claim is *supported* if the interval lies entirely on the claimed "
    "side of 0 (upper end < 0 for 'lower', lower end > 0 for 'higher'), *contradicted* if it "
    "lies entirely on the other side, and *inconclusive at this scale* otherwise: when it "
    "contains 0, when fewer than 2 pairs exist, or when any of the study's seeds is missing "
    "for A or B (a failed run or a non-finite value is never dropped silently). Each claim is "
    "judged at 95 % on its own, with no correction for the number of claims.")


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided Student-t interval at ``level`` over ``n`` values
    (``low``/``high``/``sd`` are NaN when ``n < 2``; everything is NaN when ``n == 0``)."""
    mean: float
    low: float
    high: float
    n: int
    sd: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """True when the interval exists and 0 lies outside it."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-safe: NaN becomes None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def t_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """Mean and two-sided Student-t ``level`` interval of ``values`` (all must be finite)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (filter missing runs out first)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = int(x.size)
    nan = float("nan")
    if n == 0:
        return Interval(nan, nan, nan, 0, nan, level)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, nan, nan, 1, nan, level)
    sd = float(x.std(ddof=1))
    half = float(stdtrit(n - 1, (1 + level) / 2)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, level)


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) \
        and math.isfinite(float(v))


def paired_differences(a: Mapping[int, float | None], b: Mapping[int, float | None]
                       ) -> dict[int, float]:
    """``{seed: a[seed] - b[seed]}`` over the seeds where both values exist and are finite,
    in increasing seed order."""
    return {s: float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))
            if _finite(a[s]) and _finite(b[s])}


def paired_interval(a: Mapping[int, float | None], b: Mapping[int, float | None],
                    level: float = LEVEL) -> Interval:
    """The Student-t interval of :func:`paired_differences` ``(a, b)``."""
    return t_interval(paired_differences(a, b).values(), level)


def verdict(diff: Interval, direction: Direction, *, complete: bool = True) -> str:
    """:data:`VERDICT_RULE` for the interval ``diff`` of ``metric(A) - metric(B)``.

    ``direction``: the claim says A is ``"lower"`` or ``"higher"`` than B. ``complete``: every
    seed of the study gave a finite value for both arms (False gives :data:`INCONCLUSIVE`).
    """
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    if not complete or diff.n < 2 or not diff.excludes_zero():
        return INCONCLUSIVE
    below = diff.high < 0
    claimed_below = direction == "lower"
    return SUPPORTED if below == claimed_below else CONTRADICTED
