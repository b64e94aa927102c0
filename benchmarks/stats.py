"""Timing helpers: repeated runs bounded in count and time, medians and p95."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))]


@dataclass(frozen=True)
class Timing:
    n: int
    p50: float  # ms
    p95: float  # ms

    @classmethod
    def of(cls, times_ms: list[float]) -> Timing:
        return cls(len(times_ms), statistics.median(times_ms), percentile(times_ms, 95))


def time_calls(
    fn: Callable[[], object], repeats: int, max_seconds: float, warmup: int = 2
) -> Timing:
    """Call `fn` up to `repeats` times (at least 3) or until `max_seconds` have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return Timing.of(times)
