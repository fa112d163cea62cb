"""Medians, percentiles and ratios of samples."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really measured."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """n, median, p90, min and max of samples."""
    return {
        "n": len(samples),
        "median": median(samples),
        "p90": percentile(samples, 90),
        "min": min(samples) if samples else math.nan,
        "max": max(samples) if samples else math.nan,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan
