"""The status page's trends (gateway/observe/trends.py) and their charts (gateway/observe/charts.py):
fixed rings moved by an injected clock — time here is a number the test sets, nothing sleeps."""

from __future__ import annotations

import math
import re

import pytest

from gateway.observe.charts import spend_chart, svg, target_charts
from gateway.observe.counters import Observatory
from gateway.observe.events import CircuitTransition, FallbackUsed, RetryScheduled, UpstreamAnswered
from gateway.observe.trends import BINS, BUCKET_S, POINTS, TargetTrend, TenantSpend, quantile, window

MIDNIGHT = 1_700_006_400.0  # a UTC midnight (and so the start of a bucket)
T0 = MIDNIGHT + 10  # 10 s into a bucket


def sizes(trend: TargetTrend) -> list[int]:
    return [len(trend.attempts), len(trend.upstream_errors), len(trend.retries),
            len(trend.fallbacks), len(trend.latency), len(trend.ttft)]


def test_a_new_ring_says_no_data_before_it_existed_and_counts_the_newest_bucket_per_second_so_far():
    trend = TargetTrend(T0)
    for _ in range(5):
        trend.request(T0, 100.0, None)
    s = trend.series(T0 + 10)  # 20 s into the bucket: 5 requests / 20 s
    assert len(s["requests_per_s"]) == POINTS
    assert s["requests_per_s"][:-1] == [None] * (POINTS - 1) and s["requests_per_s"][-1] == 0.25
    assert s["upstream_error_rate"][-1] is None  # no upstream attempt: no rate, not 0 %
    assert s["ttft_p50_ms"][-1] is None and s["retries"][-1] == 0


def test_buckets_move_with_the_clock_and_old_ones_fall_off_without_growing_anything():
    trend = TargetTrend(T0)
    before = sizes(trend)
    for k in range(POINTS + 5):  # 35 buckets, k + 1 requests in bucket k
        for _ in range(k + 1):
            trend.request(T0 + k * BUCKET_S, 50.0, None)
    assert sizes(trend) == before
    s = trend.series(T0 + (POINTS + 4) * BUCKET_S + 15)  # T0 is 10 s into its bucket: 25 s into the newest
    counts = [round(r * BUCKET_S) for r in s["requests_per_s"][:-1]]
    assert counts == list(range(6, POINTS + 5))  # buckets 5..33 (k + 1 requests each), oldest first
    # A quiet ten minutes: the old traffic moves left and out, nothing is repeated.
    later = trend.series(T0 + (POINTS + 4 + 20) * BUCKET_S)
    assert [round(r * BUCKET_S) for r in later["requests_per_s"][:10]] == list(range(26, POINTS + 6))
    assert later["requests_per_s"][10:] == [0.0] * (POINTS - 10)


def test_a_clock_set_back_counts_in_the_newest_bucket_and_a_late_event_in_its_own_or_nowhere():
    trend = TargetTrend(T0)
    trend.request(T0 + 10 * BUCKET_S, 10.0, None)
    trend.request(T0 - 5 * BUCKET_S, 10.0, None)  # the wall clock was set back: the newest bucket takes it
    trend.retry(T0 + 3 * BUCKET_S)  # an event stamped earlier, still in the window: its own bucket
    trend.retry(T0 - 5 * BUCKET_S)  # before the ring existed: dropped
    trend.retry(T0 + 10 * BUCKET_S - POINTS * BUCKET_S)  # out of the window: dropped
    s = trend.series(T0 + 10 * BUCKET_S)
    assert [None if r is None else round(r * BUCKET_S) for r in s["requests_per_s"][:-1]] == [None] * 19 + [0] * 10
    assert s["requests_per_s"][-1] == 0.2  # 2 requests in the 10 s of the newest bucket
    assert s["retries"] == [None] * 19 + [0, 0, 0, 1] + [0] * 7


def test_upstream_errors_are_per_attempt_so_retried_5xx_show_though_every_request_succeeded():
    obs = Observatory(wall=lambda: T0)
    obs.track(["up"], [])
    for i in range(10):
        if i == 0:  # one 503, retried, then a 200: the request succeeded
            obs.on_event(UpstreamAnswered(target="up", seconds=0.01, status=503))
            obs.on_event(RetryScheduled(target="up", reason="5xx", attempt=2, delay_s=0.1))
        obs.on_event(UpstreamAnswered(target="up", seconds=0.01, status=200))
    obs.on_event(UpstreamAnswered(target="up", seconds=5.0, status=0))  # a timeout is an error too
    obs.on_event(FallbackUsed(target="up", to_target="spare", reason="server_error"))
    obs.on_event(CircuitTransition(target="up", from_state="closed", to_state="open", reason="test"))
    obs.on_event(UpstreamAnswered(target="unconfigured", seconds=0.01, status=500))  # no ring: ignored
    s = obs.trends["up"].series(T0)
    assert s["upstream_attempts"][-1] == 12 and s["upstream_error_rate"][-1] == round(2 / 12, 4)
    assert (s["retries"][-1], s["fallbacks"][-1]) == (1, 1)
    start = window(T0)["start"]
    assert s["circuit_marks"] == [{"offset_s": T0 - start, "to": "open"}]
    assert "unconfigured" not in obs.trends


@pytest.mark.parametrize("values", [[100.0] * 99 + [3000.0], [float(v) for v in range(1, 1001)], [0.2, 0.3, 250_000.0]])
def test_quantiles_from_the_histogram_are_within_ten_percent(values):
    trend = TargetTrend(T0)
    for v in values:
        trend.request(T0, v, v)
    counts = trend.latency[(int(T0 // BUCKET_S) % POINTS) * BINS:][:BINS]
    ordered = sorted(values)
    for q in (0.5, 0.99):
        exact = ordered[math.ceil(q * len(ordered)) - 1]  # the nearest rank
        got = quantile(counts, q)
        assert got is not None
        assert exact / 1.1 <= got <= exact * 1.1 or not 0.5 <= exact <= 131_072  # outside the bins: the edge
    s = trend.series(T0)
    assert s["latency_p50_ms"][-1] == s["ttft_p50_ms"][-1]


def test_spend_by_hour_is_cumulative_and_starts_again_the_next_day():
    midnight = MIDNIGHT
    spend = TenantSpend()
    spend.add(midnight + 600, 0.5)  # 00:10
    spend.add(midnight + 2 * 3600 + 5, 0.25)  # 02:00:05
    spend.add(midnight + 2 * 3600 + 50, 0.25)
    assert spend.cumulative(midnight + 3 * 3600 + 1) == [0.5, 0.5, 1.0, 1.0] + [None] * 20
    assert spend.cumulative(midnight + 86400 + 60) == [0.0] + [None] * 23  # a new day, nothing spent yet
    spend.add(midnight + 86400 + 60, 0.1)
    assert spend.cumulative(midnight + 86400 + 120)[0] == 0.1


def test_a_chart_draws_one_point_per_bucket_with_data_gaps_for_none_and_marks_and_a_limit():
    drawn = str(svg([[None, 1.0, 2.0, None, 4.0], [0.0] * 5], ymax=4.0, marks=[(0.5, "open"), (0.9, "closed")],
                    limit=3.0, label="x"))
    lines = re.findall(r'<polyline class="(s\d)" points="([^"]*)"', drawn)
    assert [(k, len(p.split())) for k, p in lines] == [("s0", 2), ("s0", 1), ("s1", 5)]
    assert re.findall(r'class="mark" data-to="(\w+)" x1="([\d.]+)"', drawn) == [("open", "120.0"), ("closed", "216.0")]
    assert len(re.findall(r'class="limit"', drawn)) == 1
    first = lines[0][1].split()[0].split(",")
    assert first == ["72.0", "40.0"]  # point 1 of 5 at 1.5/5 of 240 wide; 1/4 up the 48 between 4 of padding
    assert "<script" not in drawn and "<svg" in drawn


def test_a_targets_cards_share_the_time_axis_and_marks_and_the_spend_chart_has_its_budget_line():
    trend = TargetTrend(T0)
    trend.request(T0, 10.0, 5.0)
    trend.transition(T0, "open")
    cards = target_charts(trend.series(T0), window(T0))
    assert [c["id"] for c in cards] == ["rps", "errors", "retries", "latency", "ttft"]
    for c in cards:
        assert str(c["svg"]).count('class="mark" data-to="open"') == 1
    assert str(spend_chart([0.5, 1.0] + [None] * 22, 2.0)).count('class="limit"') == 1
    assert 'class="limit"' not in str(spend_chart([None] * 24, None))
