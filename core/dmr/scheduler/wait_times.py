"""How long requests waited for memory, per model, and how long runners took to load,
as Prometheus histograms' data."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["WAIT_BUCKETS", "SecondsHistogram", "WaitTimes"]

# Seconds; from "no wait" to past the default queue deadline.
WAIT_BUCKETS = (0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class SecondsHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    count: int = 0
    total: float = 0.0
    longest: float = 0.0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(WAIT_BUCKETS, seconds)
        if index < len(self.counts):
            self.counts[index] += 1
        self.count += 1
        self.total += seconds
        self.longest = max(self.longest, seconds)

    def cumulative(self) -> list[tuple[str, int]]:
        """`(le, count)` pairs as Prometheus writes histogram buckets, `+Inf` last."""
        pairs = []
        running = 0
        for bound, count in zip(WAIT_BUCKETS, self.counts, strict=True):
            running += count
            pairs.append((f"{bound:g}", running))
        pairs.append(("+Inf", self.count))
        return pairs


class WaitTimes:
    """Only requests that queued are observed: admitted at once is no wait."""

    def __init__(self) -> None:
        self.by_model: dict[str, SecondsHistogram] = {}

    def observe(self, model: str, seconds: float) -> None:
        self.by_model.setdefault(model, SecondsHistogram()).observe(seconds)
