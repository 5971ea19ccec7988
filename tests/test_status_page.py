"""The status page ``/`` and ``/status.json`` (SPEC §7): what an operator sees, in plain HTTP
and in a real headless Chromium (tests/support/browser.py) that must follow a circuit opening by
itself, without a reload.

The browser cases skip with the reason when no Chromium is installed — or fail when
``RELIAPI_REQUIRE_BROWSER=1`` (``.ci/run`` sets it). ``RELIAPI_SCREENSHOT_DIR=dir`` keeps
a screenshot of the page at 1280 and 375 px from the browser test, to look at.
"""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__
from gateway.keys import RUNTIME
from gateway.observe.trends import BUCKET_S, POINTS
from tests.support.browser import Browser, find_chromium
from tests.support.config import NO_RETRY, GatewayConfig, header_env
from tests.support.fakes import Fault

TENANT_KEY = "tenant-acme-Secret-7f3a9c"
LAB_KEY = "tenant-lab-Secret-51be02"
POOL_KEY_1 = "sk-pool-Secret-one-0a1b2c3d"
POOL_KEY_2 = "sk-pool-Secret-two-4e5f6a7b"
REST_KEY = "rest-api-Secret-c0ffee11"
SECRETS = (TENANT_KEY, LAB_KEY, POOL_KEY_1, POOL_KEY_2, REST_KEY)
ENV = {"POOL_KEY_2": POOL_KEY_2, "REST_KEY": REST_KEY}
ACME = {"Authorization": f"Bearer {TENANT_KEY}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}


def config(url: str) -> GatewayConfig:
    """``up`` (OpenAI, cached, a two-key pool) and ``rest`` (plain HTTP, its own key); two tenants."""
    cfg = GatewayConfig(url, default_target="up")
    cfg.tenant("acme", api_key=TENANT_KEY, budget={"daily_usd": 5, "monthly_usd": 50}).tenant("lab", api_key=LAB_KEY)
    cfg.up(cache={"ttl_s": 60}, retry_matrix=NO_RETRY)
    cfg.rest(auth=header_env("x-api-key", "REST_KEY"), retry_matrix=NO_RETRY)
    return cfg.section("provider_key_pools", {"up": {"keys": [{"id": "up-one", "api_key": POOL_KEY_1},
                                                              {"id": "up-two", "api_key": "env:POOL_KEY_2"}]}})


class Page(HTMLParser):
    """What the page shows, read the way the script reads it: rows by ``data-target`` /
    ``data-tenant`` / ``data-error``, their ``data-field`` texts and states, and elements by id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.targets: dict[str, dict[str, str]] = {}
        self.tenants: dict[str, dict[str, str]] = {}
        self.errors: list[dict[str, str]] = []
        self.ids: dict[str, str] = {}
        self.states: dict[tuple[str, str], str] = {}  # (row, field) -> data-state / data-level
        self.sections: dict[str, str] = {}  # section id -> data-empty
        self._row: dict[str, str] | None = None
        self._row_name = ""
        self._open: list[tuple[str, dict[str, str] | None, str]] = []  # (tag, where its text goes, key)
        self._in_template = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "template":
            self._in_template += 1
        if self._in_template or tag in ("meta", "link", "br", "img", "input"):
            return
        if tag == "section" and "id" in a:
            self.sections[a["id"]] = a.get("data-empty", "")
        if tag == "tr":
            if "data-target" in a:
                self._row, self._row_name = self.targets.setdefault(a["data-target"], {}), a["data-target"]
            elif "data-tenant" in a:
                self._row, self._row_name = self.tenants.setdefault(a["data-tenant"], {}), a["data-tenant"]
            elif "data-error" in a:
                self._row = {}
                self._row_name = f"error{len(self.errors)}"
                self.errors.append(self._row)
        sink, key = None, ""
        if "data-field" in a and self._row is not None:
            sink, key = self._row, a["data-field"]
            self.states[(self._row_name, key)] = a.get("data-state", a.get("data-level", ""))
        elif "id" in a:
            sink, key = self.ids, a["id"]
            self.states[("#", key)] = a.get("data-state", a.get("data-level", ""))
        if sink is not None:
            sink[key] = ""
        self._open.append((tag, sink, key))

    def handle_endtag(self, tag: str) -> None:
        if tag == "template":
            self._in_template -= 1
            return
        if self._in_template:
            return
        while self._open:
            open_tag, _, _ = self._open.pop()
            if open_tag == tag:
                break
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_template:
            return
        for _, sink, key in self._open:
            if sink is not None:
                sink[key] += data


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
        assert "Secret" not in text  # not even a piece of one


# ---------------------------------------------------------------- plain HTTP


@pytest.fixture
async def started(gateway, fake, clock):
    into_day = clock.time() % 86400
    if into_day > 86400 - 2 * 3600:  # the tests move the clock on an hour: never across UTC midnight ("spent today")
        clock.advance(86400 - into_day + 60)
    client, _ = await gateway(config(fake.url), env=ENV, clock=clock)
    return client


async def get_page(client) -> tuple[Any, str]:
    resp = await client.get("/")
    return resp, await resp.text()


async def test_the_page_and_the_json_show_the_same_numbers_after_real_traffic(started, fake, clock):
    client = started
    for _ in range(2):  # a miss, then a hit
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=ACME)
        assert resp.status == 200
    fake.plan(Fault(status=503))
    failed = await client.post("/v1/chat/completions", json={**CHAT, "temperature": 1}, headers=ACME)
    assert failed.status == 503
    resp = await client.get("/t/rest/items", headers=ACME)
    assert resp.status == 200
    clock.advance(3725)

    resp = await client.get("/status.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    data = await resp.json()
    assert data["version"] == __version__ and data["store"] == {"backend": "memory", "url": "memory://", "healthy": True,
                                                                   "error": None}
    up, rest = (next(t for t in data["targets"] if t["name"] == n) for n in ("up", "rest"))
    assert (up["requests"], up["errors"], up["error_rate"]) == (3, 1, 0.3333)
    assert up["cache"] == {"hits": 1, "misses": 2, "hit_ratio": 0.3333}
    assert up["key_pool"]["total"] == 2 and up["circuit"] == "closed" and up["spend_today_usd"] > 0
    assert (rest["requests"], rest["errors"], rest["key_pool"], rest["cache"]["hit_ratio"]) == (1, 0, None, None)
    acme = next(t for t in data["tenants"] if t["name"] == "acme")
    assert acme["requests"] == 4 and acme["budget"] == {"daily_usd": 5, "monthly_usd": 50}
    assert acme["spend_today_usd"] > 0
    [error] = data["errors"]
    assert error["request_id"] == failed.headers["X-Request-Id"]
    assert (error["target"], error["tenant"], error["status"], error["code"]) == ("up", "acme", 503, "upstream_503")

    resp, html = await get_page(client)
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Cache-Control"] == "no-store"
    page = Page(html)
    assert page.ids["version"] == __version__
    assert page.ids["store-backend"] == "memory" and page.ids["store-health"] == "healthy"
    assert page.ids["uptime"] == "1h 2m"
    assert page.ids["total-requests"] == "4" and page.ids["circuits"] == "all closed"
    assert set(page.targets) == {"up", "rest"}
    for name in ("up", "rest"):
        assert page.targets[name]["circuit"] == "closed" and page.states[(name, "circuit")] == "closed"
    shown = page.targets["up"]
    assert (shown["requests"], shown["error_rate"], shown["cache"], shown["cache_detail"]) == ("3", "33.3%", "33.3%", "1 of 3")
    assert (shown["keys"], shown["keys_detail"]) == ("2/2", "healthy")
    assert shown["spend"] == f"${up['spend_today_usd']:.6f}"  # under a cent: six places
    assert re.fullmatch(r"\d+\.\d ms", shown["p50"]) and re.fullmatch(r"\d+\.\d ms", shown["p99"])
    assert (page.targets["rest"]["cache"], page.targets["rest"]["keys"]) == ("—", "—")
    assert page.tenants["acme"]["requests"] == "4"
    assert page.tenants["acme"]["day"] == f"${acme['spend_today_usd']:.6f} of $5.00"
    assert page.tenants["acme"]["month"].endswith(" of $50.00")
    assert page.tenants["lab"]["day"] == "$0.00" and page.tenants["lab"]["month"] == "—"
    [row] = page.errors
    assert (row["status"], row["code"], row["target"], row["tenant"]) == ("503", "upstream_503", "up", "acme")
    assert row["request_id"] == failed.headers["X-Request-Id"]
    assert_no_secrets(html, await (await client.get("/status.json")).text())


async def test_an_open_circuit_shows_without_javascript(started):
    client = started
    client.app[RUNTIME].current.circuits["rest"].breaker.open("test")
    page = Page((await get_page(client))[1])
    assert page.targets["rest"]["circuit"] == "open" and page.states[("rest", "circuit")] == "open"
    assert page.targets["up"]["circuit"] == "closed"
    assert page.ids["circuits"] == "1 open" and page.states[("#", "circuits")] == "bad"
    data = await (await client.get("/status.json")).json()
    assert {t["name"]: t["circuit"] for t in data["targets"]} == {"up": "closed", "rest": "open"}


async def test_what_a_client_sent_is_escaped_not_run(started):
    client = started
    evil = "<script>alert('pwned')</script>"
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={**ACME, "X-ReliAPI-Target": evil})
    assert resp.status == 404
    resp, html = await get_page(client)
    assert evil in Page(html).errors[0]["message"]  # shown as text
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    # The page's own script is the only one it runs, and nothing is fetched from anywhere else.
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "connect-src 'self'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert re.findall(r"<script\b[^>]*>", html) == [f'<script nonce="{nonce}">']
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)


async def test_a_key_cooling_down_shows_in_the_pool_health(started, fake):
    client = started
    fake.plan(Fault(status=429, headers={"Retry-After": "30"}))
    await client.post("/v1/chat/completions", json=CHAT, headers=ACME)
    data = await (await client.get("/status.json")).json()
    pool = data["targets"][0]["key_pool"]
    assert {k: v for k, v in pool.items() if k != "keys"} == {"total": 2, "active": 1, "cooling": 1, "disabled": 0}
    cooling = [k for k, v in pool["keys"].items() if v == "cooling"]
    assert sorted(pool["keys"]) == ["up-one", "up-two"] and len(cooling) == 1  # by id, never by value
    page = Page((await get_page(client))[1])
    assert (page.targets["up"]["keys"], page.targets["up"]["keys_detail"]) == ("1/2", f"1 cooling ({cooling[0]})")
    assert page.states[("up", "keys")] == "warn"


async def test_a_gateway_without_tenants_or_errors_says_so(gateway, fake):
    client, _ = await gateway(f"targets:\n  only:\n    base_url: {fake.url}/api\n")
    page = Page((await get_page(client))[1])
    assert set(page.targets) == {"only"} and not page.tenants and not page.errors
    assert page.sections == {"targets": "no", "trends": "no", "tenants": "yes", "bans": "yes", "errors": "yes"}
    assert page.targets["only"]["error_rate"] == "—" and page.targets["only"]["p50"] == "—"


# ---------------------------------------------------------------- a real browser

CHROMIUM = find_chromium()


def need_browser() -> None:
    if CHROMIUM is not None:
        return
    reason = "no Chromium to drive (apt-get install chromium, or set RELIAPI_CHROMIUM)"
    if os.environ.get("RELIAPI_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def two_targets(alpha: str, beta: str) -> GatewayConfig:
    return GatewayConfig().target("alpha", f"{alpha}/api", retry_matrix=NO_RETRY).target(
        "beta", f"{beta}/api", retry_matrix=NO_RETRY, circuit={"error_threshold": 2, "cooldown_s": 600})


CIRCUITS_JS = """Object.fromEntries([...document.querySelectorAll('#targets tr[data-target]')].map(
  r => [r.dataset.target, r.querySelector('[data-field="circuit"]').textContent]))"""
FIELD_JS = """document.querySelector('tr[data-target="{target}"] [data-field="{field}"]').textContent"""
# Every URL the page refers to or loaded that is not this origin (data: URIs are part of the page).
EXTERNAL_JS = """[...[...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href),
  ...performance.getEntriesByType('resource').map(e => e.name)]
  .filter(u => !u.startsWith('data:') && new URL(u, location.href).origin !== location.origin)"""


async def test_a_real_browser_shows_each_circuit_and_follows_it_opening_without_a_reload(gateway, upstreams):
    need_browser()
    alpha, beta = await upstreams(), await upstreams()
    client, _ = await gateway(two_targets(alpha.url, beta.url))
    async with Browser.launch(CHROMIUM) as browser:
        await browser.navigate(str(client.make_url("/")))
        assert await browser.evaluate(CIRCUITS_JS) == {"alpha": "closed", "beta": "closed"}
        await browser.evaluate("window.sameDocument = true")  # gone if the page were loaded again

        beta.plan(Fault(status=503), Fault(status=503))
        for _ in range(2):
            assert (await client.get("/t/beta/charges")).status == 503
        assert client.app[RUNTIME].current.circuits["beta"].state == "open"

        # The page's own refresh (every ~2 s) must bring it; look for up to 10 s.
        await browser.wait_for(FIELD_JS.format(target="beta", field="circuit") + " === 'open'", timeout_s=10)
        assert await browser.evaluate(CIRCUITS_JS) == {"alpha": "closed", "beta": "open"}
        assert await browser.evaluate("window.sameDocument === true")
        badge = "getComputedStyle(document.querySelector('tr[data-target=\"{}\"] [data-field=\"circuit\"]')).color"
        assert await browser.evaluate(badge.format("beta")) != await browser.evaluate(badge.format("alpha"))
        assert await browser.evaluate(FIELD_JS.format(target="beta", field="requests")) == "2"
        assert await browser.evaluate(FIELD_JS.format(target="beta", field="error_rate")) == "100.0%"
        assert await browser.evaluate("document.getElementById('circuits').textContent") == "1 open"
        assert await browser.evaluate("document.querySelectorAll('#errors tbody tr').length") == 2
        assert await browser.evaluate("document.getElementById('live').dataset.live") == "on"
        assert await browser.evaluate(EXTERNAL_JS) == []

        # A reload that adds a target: its row appears in config order, still without navigating.
        config = two_targets(alpha.url, beta.url).target("gamma", f"{alpha.url}/api").load()
        await client.app[RUNTIME].reload(config)
        await browser.wait_for("document.querySelector('tr[data-target=\"gamma\"]') !== null", timeout_s=10)
        rows = await browser.evaluate(CIRCUITS_JS)
        assert list(rows) == ["alpha", "beta", "gamma"] and rows["gamma"] == "closed"
        assert await browser.evaluate(FIELD_JS.format(target="gamma", field="requests")) == "0"
        assert await browser.evaluate("window.sameDocument === true")
        # …and its trend card, drawn by the script from a blank one: one point so far (its ring is new; two when a
        # 30 s bucket boundary of the real clock fell between the reload and this look), no mark.
        trends = "[...document.querySelectorAll('#trends [data-trend]')].map((c) => c.dataset.trend)"
        assert await browser.evaluate(trends) == ["alpha", "beta", "gamma"]
        gamma = await browser.evaluate(CHARTS_JS.format(target="gamma"))
        assert gamma["rps"]["s0"] in (1, 2) and gamma["rps"]["s1"] == 0 and gamma["rps"]["marks"] == []
        assert len(gamma) == 5
        assert (await browser.evaluate(CHARTS_JS.format(target="beta")))["rps"]["marks"] == ["open"]

        shots = os.environ.get("RELIAPI_SCREENSHOT_DIR")
        if shots:
            await browser.screenshot(Path(shots) / "status-1280.png")
        # A phone: nothing sticks out sideways, every target is still there.
        await browser.viewport(375, 812)
        assert await browser.evaluate("document.documentElement.scrollWidth") <= 375
        assert list(await browser.evaluate(CIRCUITS_JS)) == ["alpha", "beta", "gamma"]
        if shots:
            await browser.screenshot(Path(shots) / "status-375.png")
        assert browser.console_errors == []


# ---------------------------------------------------------------- trends (the last 15 minutes)

BUDGET = {"Authorization": f"Bearer {TENANT_KEY}"}
SMALL = {**CHAT, "max_tokens": 16}  # what the budget reserves for an answer before it comes: little


def trend_config(primary: str, spare: str) -> GatewayConfig:
    """``up`` retries 5xx (the default: two retries), falls back to ``spare`` and opens its circuit after three
    failures in a row, for 45 s; tenants ``acme`` (a daily budget) and ``lab`` (none)."""
    cfg = GatewayConfig(primary, default_target="up")
    cfg.tenant("acme", api_key=TENANT_KEY, budget={"daily_usd": 0.0005}).tenant("lab", api_key=LAB_KEY)
    cfg.up(fallback_targets=["spare"], circuit={"error_threshold": 3, "cooldown_s": 45})
    return cfg.target("spare", f"{spare}/v1", provider="openai")


def align(clock) -> None:
    """Half a second into a bucket, so a test's own run time never crosses into the next one by itself."""
    clock.advance(BUCKET_S - clock.time() % BUCKET_S + 0.5)


async def bucket(client, fake, clock, n: int, *, retried: int = 0, streams: int = 0, move_on: bool = True) -> None:
    """``n`` answered requests in this bucket (the first ``retried`` after one upstream 503 each, ``streams``
    of them streamed), then the clock moves on to the next bucket (unless not ``move_on``)."""
    fake.plan(*[Fault(status=503) for _ in range(retried)])
    for i in range(n):
        body = {**SMALL, "stream": True} if i >= n - streams else SMALL
        resp = await client.post("/v1/chat/completions", json=body, headers=BUDGET)
        assert resp.status == 200
        await resp.read()
    if move_on:
        clock.advance(BUCKET_S)


async def outage(client, fake, clock) -> None:
    """Three 503s in a row: retried twice, then the request falls back to ``spare`` and ``up``'s circuit opens;
    a minute later (two buckets on) the first request probes it (half-open) and closes it."""
    fake.plan(Fault(status=503), Fault(status=503), Fault(status=503))
    resp = await client.post("/v1/chat/completions", json=SMALL, headers=BUDGET)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Target"] == "spare"
    assert client.app[RUNTIME].current.circuits["up"].state == "open"
    clock.advance(2 * BUCKET_S)
    assert (await client.post("/v1/chat/completions", json=SMALL, headers=BUDGET)).status == 200
    assert client.app[RUNTIME].current.circuits["up"].state == "closed"


def card(html: str, target: str) -> str:
    """One target's trend card in the page's HTML (up to the next card or the section's end)."""
    start = html.index(f'<div class="trend" data-trend="{target}">')
    ends = [i for i in (html.find('<div class="trend" data-trend=', start + 1), html.find("</section>", start)) if i > 0]
    return html[start:min(ends)]


def chart_points(html: str, chart: str, series: int = 0) -> int:
    """How many points one chart of a card draws for one series (over all its runs)."""
    figure = html[html.index(f'data-chart="{chart}"'):]
    figure = figure[:figure.index("</figure>")]
    return sum(len(p.split()) for p in re.findall(rf'<polyline class="s{series}" points="([^"]*)"', figure))


async def test_retried_5xx_a_fallback_and_the_circuit_show_in_the_trends_though_every_answer_was_200(
        gateway, upstreams, clock):
    fake, spare = await upstreams(), await upstreams()
    align(clock)
    client, _ = await gateway(trend_config(fake.url, spare.url), clock=clock)
    await bucket(client, fake, clock, 3)
    await bucket(client, fake, clock, 10, retried=1, streams=2)  # 11 attempts upstream for 10 answers
    await outage(client, fake, clock)  # ends two buckets later, in the fifth

    data = await (await client.get("/status.json")).json()
    assert data["trend_window"]["bucket_s"] == BUCKET_S and data["trend_window"]["points"] == POINTS
    up = next(t for t in data["targets"] if t["name"] == "up")
    assert (up["requests"], up["error_rate"]) == (14, 0.0)  # the totals: nothing wrong, since start
    trend, last5 = up["trend"], slice(POINTS - 5, None)
    assert len(trend["requests_per_s"]) == POINTS and trend["requests_per_s"][: POINTS - 5] == [None] * (POINTS - 5)
    assert trend["upstream_attempts"][last5] == [3, 11, 3, 0, 1]
    assert trend["upstream_error_rate"][last5] == [0.0, round(1 / 11, 4), 1.0, None, 0.0]  # the trend: 9 %, then 100 %
    assert trend["retries"][last5] == [0, 1, 2, 0, 0] and trend["fallbacks"][last5] == [0, 0, 1, 0, 0]
    assert [round(r * BUCKET_S) for r in trend["requests_per_s"][POINTS - 5:-1]] == [3, 10, 0, 0]
    assert trend["latency_p50_ms"][POINTS - 5] > 0 and trend["latency_p99_ms"][POINTS - 3] is None  # (spare answered)
    assert trend["ttft_p50_ms"][last5][1] is not None and trend["ttft_p50_ms"][POINTS - 5] is None  # streams only
    marks = trend["circuit_marks"]
    assert [m["to"] for m in marks] == ["open", "half_open", "closed"]
    start = data["trend_window"]["start"]
    assert (POINTS - 3) * BUCKET_S <= marks[0]["offset_s"] < (POINTS - 2) * BUCKET_S  # in the outage's bucket
    assert marks[1]["offset_s"] >= (POINTS - 1) * BUCKET_S and start % BUCKET_S == 0
    spare_trend = next(t for t in data["targets"] if t["name"] == "spare")["trend"]
    assert spare_trend["upstream_attempts"][POINTS - 3] == 1 and spare_trend["circuit_marks"] == []
    acme, lab = data["tenants"]
    hour = int(clock.time() % 86400) // 3600
    hours = acme["spend_by_hour_usd"]
    assert len(hours) == 24 and hours[hour + 1:] == [None] * (23 - hour) and None not in hours[: hour + 1]
    assert hours[hour] == pytest.approx(acme["spend_today_usd"]) and hours[hour] > 0  # one process: all of it
    assert lab["spend_by_hour_usd"][hour] == 0.0

    html = (await get_page(client))[1]
    page = card(html, "up")
    assert re.findall(r'data-chart="(\w+)"', page) == ["rps", "errors", "retries", "latency", "ttft"]
    assert chart_points(page, "rps") == 5 and chart_points(page, "errors") == 4  # no attempt in the fourth: a gap
    assert chart_points(page, "retries", 0) == chart_points(page, "retries", 1) == 5
    assert re.findall(r'class="mark" data-to="(\w+)"', page) == ["open", "half_open", "closed"] * 5
    assert "Upstream errors" in page and "0.0%" in page  # the newest bucket's rate, beside the chart
    row = html[html.index('<tr data-tenant="acme">'):]
    row = row[:row.index("</tr>")]
    assert len(re.findall(r'<polyline class="s0" points="([^"]*)"', row)[0].split()) == hour + 1
    assert row.count('class="limit"') == 1  # the daily budget
    lab_row = html[html.index('<tr data-tenant="lab">'):]
    assert 'class="limit"' not in lab_row[:lab_row.index("</tr>")]
    assert_no_secrets(html)


# Every CSP violation the page causes, recorded by a listener that is in place before the page's own script runs.
CSP_WATCH = "window.__csp = []; document.addEventListener('securitypolicyviolation', " \
            "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
# Points drawn by each chart of a target's card, per series, and its circuit marks.
CHARTS_JS = """Object.fromEntries([...document.querySelectorAll('[data-trend="{target}"] figure[data-chart]')].map((f) =>
  [f.dataset.chart, {{s0: [...f.querySelectorAll('polyline.s0')].reduce((n, p) => n + p.points.numberOfItems, 0),
                     s1: [...f.querySelectorAll('polyline.s1')].reduce((n, p) => n + p.points.numberOfItems, 0),
                     marks: [...f.querySelectorAll('line.mark')].map((m) => m.dataset.to)}}]))"""
# The page's own drawing of some charts next to the server's drawing of the same data (a fresh GET /).
MIRROR_JS = """fetch('/').then((r) => r.text()).then((html) => {
  const server = new DOMParser().parseFromString(html, 'text/html');
  const lines = (doc) => ['errors', 'retries', 'latency', 'ttft'].map((c) => [...doc.querySelectorAll(
    `[data-trend="up"] [data-chart="${c}"] polyline, [data-trend="up"] [data-chart="${c}"] line`)].map(
    (p) => p.getAttribute('class') + ':' + (p.getAttribute('points') || p.getAttribute('x1'))));
  return JSON.stringify(lines(document)) === JSON.stringify(lines(server)) ? 'same' : [lines(document), lines(server)];
})"""


async def test_a_real_browser_draws_the_trends_keeps_them_current_and_the_csp_holds(gateway, upstreams, clock):
    need_browser()
    fake, spare = await upstreams(), await upstreams()
    align(clock)
    client, _ = await gateway(trend_config(fake.url, spare.url), clock=clock)
    for n, retried in ((4, 0), (6, 1), (5, 0), (8, 0), (7, 2), (9, 0), (6, 0), (5, 1)):  # eight buckets of traffic
        await bucket(client, fake, clock, n, retried=retried, streams=1)
    await outage(client, fake, clock)  # the ninth; the probe in the eleventh
    await bucket(client, fake, clock, 3, streams=1, move_on=False)  # the eleventh, the newest
    async with Browser.launch(CHROMIUM) as browser:
        await browser.call("Page.addScriptToEvaluateOnNewDocument", source=CSP_WATCH)
        await browser.navigate(str(client.make_url("/")))
        assert await browser.evaluate("document.querySelectorAll('#trends [data-trend]').length") == 2
        up = await browser.evaluate(CHARTS_JS.format(target="up"))
        assert list(up) == ["rps", "errors", "retries", "latency", "ttft"]
        assert up["rps"]["s0"] == 11  # one point a bucket since the gateway started
        assert up["errors"]["s0"] == 10  # the bucket of the open circuit had no upstream attempt: a gap
        assert up["retries"]["s0"] == up["retries"]["s1"] == 11 and up["latency"]["s1"] == 9  # (spare answered in the ninth)
        assert all(c["marks"] == ["open", "half_open", "closed"] for c in up.values())
        spare_charts = await browser.evaluate(CHARTS_JS.format(target="spare"))
        assert spare_charts["rps"]["s0"] == 11 and spare_charts["latency"]["s0"] == 1 and spare_charts["rps"]["marks"] == []
        hour = int(clock.time() % 86400) // 3600
        hours = "document.querySelectorAll('tr[data-tenant=\"{}\"] [data-field=\"hours\"] {}')"
        assert await browser.evaluate(hours.format("acme", "polyline") + "[0].points.numberOfItems") == hour + 1
        assert await browser.evaluate(hours.format("acme", "line.limit") + ".length") == 1
        assert await browser.evaluate(hours.format("lab", "line.limit") + ".length") == 0

        # The page redraws itself: a new bucket of traffic shows up as a twelfth point, without a reload.
        await browser.evaluate("window.sameDocument = true")
        clock.advance(BUCKET_S)
        await bucket(client, fake, clock, 4, retried=1, move_on=False)
        rps = CHARTS_JS.format(target="up") + ".rps.s0"
        await browser.wait_for(rps + " === 12", timeout_s=10)
        assert await browser.evaluate("window.sameDocument === true")
        assert await browser.evaluate(MIRROR_JS) == "same"  # the script draws what the server draws

        shots = os.environ.get("RELIAPI_SCREENSHOT_DIR")
        if shots:
            await browser.screenshot(Path(shots) / "status-trends-1280.png")
        await browser.viewport(375, 812)
        assert await browser.evaluate("document.documentElement.scrollWidth") <= 375
        width = "document.querySelector('[data-trend=\"up\"] [data-chart=\"rps\"] svg').getBoundingClientRect().width"
        assert await browser.evaluate(width) >= 120  # two charts a row on a phone, not slivers
        if shots:
            await browser.screenshot(Path(shots) / "status-trends-375.png")
        assert browser.console_errors == []
        assert await browser.evaluate("window.__csp") == []
        # The watch works: a script the page did not sign is refused, and seen.
        await browser.evaluate("document.body.append(Object.assign(document.createElement('script'), {textContent: '1'}))")
        await browser.wait_for("window.__csp.length === 1", timeout_s=5)
        assert (await browser.evaluate("window.__csp"))[0].startswith("script-src")
