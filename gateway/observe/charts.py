"""The status page's small charts: inline SVG drawn from ``/status.json``'s series, on the server.

No library and nothing fetched: a chart is a few ``<polyline>``s (one per run of points with data —
a bucket without data is a gap, not a zero), a base line, vertical marks (circuit transitions) and
an optional limit line (a budget). It stretches to its box (``preserveAspectRatio="none"``) with
strokes of constant width, so one drawing fits a wide screen and a phone. The page's script
redraws the same SVG from each refresh (``chartSvg`` in ``templates/status.html``): change one,
change both. Only numbers and this module's own class names go into the markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markupsafe import Markup

W, H, PAD = 240, 56, 4  # viewBox units; the box's CSS size decides what they are on screen

# What each target's card shows: the series drawn (the first in the accent colour, the second in amber:
# ``names`` are their legend), how the newest value reads, and the least the y axis goes up to (so a
# trickle does not fill the chart).
CHARTS: tuple[dict[str, Any], ...] = (
    {"id": "rps", "title": "Requests/s", "names": [], "series": ["requests_per_s"], "unit": "rate", "floor": 1},
    {"id": "errors", "title": "Upstream errors", "names": [], "series": ["upstream_error_rate"], "unit": "pct",
     "floor": 0.1},
    {"id": "retries", "title": "", "names": ["Retries", "fallbacks"], "series": ["retries", "fallbacks"],
     "unit": "count", "floor": 2},
    {"id": "latency", "title": "Latency", "names": ["p50", "p99"], "series": ["latency_p50_ms", "latency_p99_ms"],
     "unit": "ms", "floor": 1},
    {"id": "ttft", "title": "First token", "names": ["p50", "p99"], "series": ["ttft_p50_ms", "ttft_p99_ms"],
     "unit": "ms", "floor": 1},
)


def top(series: Sequence[Sequence[float | None]], floor: float, limit: float | None = None) -> float:
    """The y axis's top: the highest value, the limit, or the floor, whichever is most."""
    values = [v for s in series for v in s if v is not None]
    return max(floor, limit or 0.0, *values) or 1.0


def svg(series: Sequence[Sequence[float | None]], *, ymax: float, marks: Sequence[tuple[float, str]] = (),
        limit: float | None = None, label: str = "") -> Markup:
    """One chart: each series's points spread evenly across the width (point i of n at the middle of
    the i-th n-th), ``marks`` as (fraction of the width, state) vertical lines, ``limit`` a dashed line."""
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img" aria-label="',
             Markup.escape(label), '">', f'<line class="base" x1="0" y1="{H - PAD}" x2="{W}" y2="{H - PAD}"/>']
    if limit is not None:
        y = _y(limit, ymax)
        parts.append(f'<line class="limit" x1="0" y1="{y}" x2="{W}" y2="{y}"/>')
    for at, state in marks:
        x = _num(min(max(at, 0.0), 1.0) * W)
        parts.extend(['<line class="mark" data-to="', Markup.escape(state), f'" x1="{x}" y1="0" x2="{x}" y2="{H}"/>'])
    for k, values in enumerate(series):
        n, run = len(values), []
        for i, v in enumerate([*values, None]):
            if v is not None:
                run.append(f"{_num((i + 0.5) / n * W)},{_y(v, ymax)}")
            elif run:
                parts.append(f'<polyline class="s{k}" points="{" ".join(run)}"/>')
                run = []
    parts.append("</svg>")
    return Markup("".join(str(p) for p in parts))


def _y(value: float, ymax: float) -> str:
    return _num(PAD + (H - 2 * PAD) * (1 - min(value / ymax, 1.0)))


def _num(v: float) -> str:
    return f"{v:.1f}"


def target_charts(trend: dict[str, Any], window: dict[str, Any]) -> list[dict[str, Any]]:
    """A target's cards: for each chart its id, title, SVG, the y axis's top and the newest values."""
    span = window["bucket_s"] * window["points"]
    marks = [(m["offset_s"] / span, m["to"]) for m in trend["circuit_marks"]]
    out = []
    for c in CHARTS:
        series = [trend[name] for name in c["series"]]
        ymax = top(series, c["floor"])
        out.append({**c, "ymax": ymax, "latest": [s[-1] for s in series],
                    "svg": svg(series, ymax=ymax, marks=marks, label=label(c))})
    return out


def label(chart: dict[str, Any]) -> str:
    return " ".join([chart["title"], *chart["names"]]).strip()


def spend_chart(cumulative: list[float | None], budget: float | None) -> Markup:
    """Today's spend, hour by hour, against the daily budget (if any)."""
    ymax = top([cumulative], 0.0, budget)
    return svg([cumulative], ymax=ymax, limit=budget, label="spend today by hour")
