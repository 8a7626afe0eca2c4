"""What the benchmarks share (not a benchmark itself: `make bench` skips `_*.py`)."""

from __future__ import annotations


def percentile(values: list[float], p: float) -> float:
    """The `p`th percentile of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
