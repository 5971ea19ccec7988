"""The last fifteen minutes, per target, and today's spend by hour, per tenant: the status page's charts.

A ``TargetTrend`` is a ring of ``POINTS`` buckets of ``BUCKET_S`` seconds, each bucket a handful of
counters and two small log-scale histograms (latency, time to first token). Its lists are made once,
when the target is first configured (``Observatory.track``); a request or an event adds to one slot
of them — no allocation on the hot path, and a bucket's slot is zeroed when time moves past it
(at most ``POINTS`` slots per move, once per bucket). Quantiles are read from the histograms only
when ``/status.json`` or the page asks (``series``), so p50 / p99 are within half a bin (±9 %).

Time is the observatory's wall clock (injectable: tests move it forward instead of sleeping). A
bucket older than the ring is dropped; buckets from before the ring existed read ``None`` (no data,
not zero). Circuit transitions are kept as marks (time, new state), the last ``MARKS`` of them.

A ``TenantSpend`` is today's spend (UTC) in 24 hourly slots, reset when the day changes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

BUCKET_S = 30
POINTS = 30  # 15 minutes
MARKS = 32  # circuit transitions kept per target: more than fit in 15 minutes of a sane breaker
# Histogram bin edges in ms: four per doubling from 0.5 ms to 2^17 ms (131 s), one overflow bin above.
EDGES_MS = tuple(2 ** (k / 4) for k in range(-4, 69))
BINS = len(EDGES_MS) + 1


class TargetTrend:
    __slots__ = ("born", "head", "since", "until", "at", "attempts", "upstream_errors", "retries", "fallbacks",
                 "latency", "ttft", "marks")

    def __init__(self, now: float) -> None:
        self.born = int(now // BUCKET_S)  # the first bucket with data
        self.head = self.born  # the newest bucket; it spans [since, until) and its slot is ``at``
        self.since, self.until = self.head * BUCKET_S, (self.head + 1) * BUCKET_S
        self.at = self.head % POINTS
        self.attempts = [0] * POINTS  # upstream attempts (UpstreamAnswered)
        self.upstream_errors = [0] * POINTS  # of them: no answer (status 0) or 5xx
        self.retries = [0] * POINTS
        self.fallbacks = [0] * POINTS
        self.latency = [0] * (POINTS * BINS)  # slot * BINS + bin; a slot's sum is its number of requests
        self.ttft = [0] * (POINTS * BINS)
        self.marks: deque[tuple[float, str]] = deque(maxlen=MARKS)

    def _slot(self, now: float) -> int:
        """The slot of the bucket ``now`` falls in, moving the ring forward if needed; -1: too old to keep.
        The per-request feeds ask only once ``now`` is past the newest bucket (one float comparison):
        the wall clock only goes back when it is set, and then the newest bucket takes the difference."""
        bucket = int(now // BUCKET_S)
        if bucket < self.head:
            return bucket % POINTS if self.head - bucket < POINTS and bucket >= self.born else -1
        if bucket > self.head:
            for b in range(max(self.head + 1, bucket - POINTS + 1), bucket + 1):
                i = b % POINTS
                self.attempts[i] = self.upstream_errors[i] = self.retries[i] = self.fallbacks[i] = 0
                self.latency[i * BINS:(i + 1) * BINS] = self.ttft[i * BINS:(i + 1) * BINS] = ZERO_BINS
            self.head = bucket
            self.since, self.until = bucket * BUCKET_S, (bucket + 1) * BUCKET_S
            self.at = bucket % POINTS
        return self.at

    # -- feeds (one call per request or event: a few list increments) ------------------------

    def request(self, now: float, latency_ms: float, ttft_ms: float | None) -> None:
        i = self.at if now < self.until else self._slot(now)
        if i < 0:
            return
        self.latency[i * BINS + bisect_left(EDGES_MS, latency_ms)] += 1
        if ttft_ms is not None:
            self.ttft[i * BINS + bisect_left(EDGES_MS, ttft_ms)] += 1

    def attempt(self, now: float, status: int) -> None:
        i = self.at if now < self.until else self._slot(now)
        if i < 0:
            return
        self.attempts[i] += 1
        if status == 0 or status >= 500:
            self.upstream_errors[i] += 1

    def retry(self, now: float) -> None:
        i = self._slot(now)
        if i >= 0:
            self.retries[i] += 1

    def fallback(self, now: float) -> None:
        i = self._slot(now)
        if i >= 0:
            self.fallbacks[i] += 1

    def transition(self, now: float, to_state: str) -> None:
        self.marks.append((now, to_state))

    # -- read (per /status.json) --------------------------------------------------------

    def series(self, now: float) -> dict[str, Any]:
        """The window ending with the bucket ``now`` is in, oldest first; see ``window``."""
        self._slot(now)  # a quiet ring still moves on: old buckets read as nothing, not as the last traffic
        first = self.head - POINTS + 1
        out: dict[str, list[Any]] = {k: [] for k in SERIES}
        for b in range(first, self.head + 1):
            if b < self.born:
                for values in out.values():
                    values.append(None)
                continue
            i = b % POINTS
            attempts = self.attempts[i]
            lat, ttft = self.latency[i * BINS:(i + 1) * BINS], self.ttft[i * BINS:(i + 1) * BINS]
            span = BUCKET_S if b < self.head else max(1.0, now - b * BUCKET_S)  # the newest bucket is not over
            out["requests_per_s"].append(round(sum(lat) / span, 3))
            out["upstream_attempts"].append(attempts)
            out["upstream_error_rate"].append(round(self.upstream_errors[i] / attempts, 4) if attempts else None)
            out["retries"].append(self.retries[i])
            out["fallbacks"].append(self.fallbacks[i])
            out["latency_p50_ms"].append(quantile(lat, 0.50))
            out["latency_p99_ms"].append(quantile(lat, 0.99))
            out["ttft_p50_ms"].append(quantile(ttft, 0.50))
            out["ttft_p99_ms"].append(quantile(ttft, 0.99))
        start = first * BUCKET_S
        marks = [{"offset_s": round(t - start, 1), "to": to} for t, to in self.marks if t >= start]
        return {**out, "circuit_marks": marks}


SERIES = ("requests_per_s", "upstream_attempts", "upstream_error_rate", "retries", "fallbacks",
          "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p99_ms")
ZERO_BINS = [0] * BINS


def window(now: float) -> dict[str, Any]:
    """The time axis every target's series share: ``points`` buckets of ``bucket_s`` from ``start``."""
    return {"bucket_s": BUCKET_S, "points": POINTS, "start": (int(now // BUCKET_S) - POINTS + 1) * BUCKET_S}


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of one bucket's histogram, interpolated within its bin on the log scale."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for b, n in enumerate(counts):
        if n and seen + n >= rank:
            if b == 0:
                return round(EDGES_MS[0], 1)
            if b == len(EDGES_MS):
                return round(EDGES_MS[-1], 1)
            low, high = EDGES_MS[b - 1], EDGES_MS[b]
            return round(low * (high / low) ** ((rank - seen) / n), 1)
        seen += n
    return None


class TenantSpend:
    """Today's spend (UTC), hour by hour: this process's share of it."""

    __slots__ = ("day", "hours")

    def __init__(self) -> None:
        self.day = -1
        self.hours = [0.0] * 24

    def add(self, now: float, usd: float) -> None:
        day = int(now // 86400)
        if day != self.day:
            self.day = day
            self.hours[:] = ZERO_HOURS
        self.hours[int(now % 86400) // 3600] += usd

    def cumulative(self, now: float) -> list[float | None]:
        """Spend up to the end of each hour of today; ``None`` for the hours still to come."""
        hour = int(now % 86400) // 3600
        today = int(now // 86400) == self.day
        out: list[float | None] = []
        total = 0.0
        for h in range(24):
            if h > hour:
                out.append(None)
                continue
            total += self.hours[h] if today else 0.0
            out.append(round(total, 8))
        return out


ZERO_HOURS = [0.0] * 24
