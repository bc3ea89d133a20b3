"""A histogram in plain numbers, for counters bumped on the serving event loop.

prometheus_client's Histogram takes a mutex per `observe()`; the event loop is one thread, so
a bisect and three additions do. The app layer's telemetry turns these into metric families
only when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class PlainHistogram:
    """Counts per bucket (upper bounds `bounds`, then +Inf), sum and count."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last: Prometheus's shape."""
        out = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            acc += n
            out.append((bound, acc))
        return out
