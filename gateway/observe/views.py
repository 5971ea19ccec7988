"""The small mutable records the observatory (``gateway.observe.counters``) adds a request to: a
histogram's buckets, and what it keeps per target, per (target, model, tenant) and per tenant."""

from __future__ import annotations

import bisect
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.observe.trends import TargetTrend, TenantSpend

RECENT = 512  # latencies kept per target for the status page's p50/p99


class Hist:
    """Bucket counts of one label set (turned into an aioprometheus histogram at scrape)."""

    __slots__ = ("bounds", "counts", "sum", "n")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.n += 1


class TargetView:
    """Per-target numbers for the status page (this process, since it started)."""

    __slots__ = ("requests", "errors", "recent", "cache_hits", "cache_misses", "spend_day", "spend_usd", "trend")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.cache_hits = 0
        self.cache_misses = 0
        self.spend_day = ""
        self.spend_usd = 0.0
        self.trend: TargetTrend | None = None  # a configured target's last 15 minutes (``Observatory.track``)


class ModelView:
    """One target's answers by one model for one tenant: the ``tokens`` and ``cost`` series, summed here
    so that a request adds to three attributes instead of hashing three label tuples."""

    __slots__ = ("prompt", "completion", "cost", "per_answer")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        self.cost = 0.0  # USD of the priced answers
        self.per_answer: Hist | None = None  # the (target, model)'s cost per answer, made at its first priced answer


class TenantView:
    __slots__ = ("requests", "rate_limited", "spend_day", "spend_usd", "hourly")

    def __init__(self) -> None:
        self.requests = 0
        self.rate_limited = 0
        self.spend_day = ""
        self.spend_usd = 0.0
        self.hourly: TenantSpend | None = None  # a configured tenant's spend today by hour (``Observatory.track``)
