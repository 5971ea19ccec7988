"""``GET /metrics`` (SPEC §7): every series with exactly its labels, and exact counts after scripted traffic.

The exposition is parsed the way Prometheus reads it (``parse``: ``name{labels} value``), and
what a scrape shows is compared with what the traffic must have produced: a retry, a cache
miss and hit, an idempotent duplicate coalesced and one replayed, a circuit opening while a
fallback takes the traffic, the three budget rules, a rate-limit refusal, a stream, a key pool
that cooled one of its two keys, a plain-HTTP call and an unknown tenant key. Fake upstreams
are real servers on loopback; every backoff runs on the test's FakeClock.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.keys import RUNTIME
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from tests.support.circuits import eventually
from tests.support.config import NO_RETRY, GatewayConfig, bearer_env
from tests.support.fakes import Fault
from tests.support.metrics_spec import SPEC_SERIES, WIKI_SERIES

# SPEC §8: "Redis down: cache and usage degrade to pass-through (logged, metric, …)" — the metric.
EXTRA_SERIES = {"reliapi_store_degraded_total": {"target", "policy"}, **WIKI_SERIES}
HISTOGRAMS = {"reliapi_request_duration_seconds", "reliapi_upstream_duration_seconds", "reliapi_ttft_seconds",
              "reliapi_llm_cost_usd"}

Labels = frozenset[tuple[str, str]]

# ---------------------------------------------------------------- the exposition, parsed

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse(text: str) -> dict[str, dict[Labels, float]]:
    """``name{a="x",b="y"} 1`` lines → {name: {frozenset({(a, x), (b, y)}): 1.0}}; a line that is
    not a comment and does not parse fails the test (a scraper would reject the whole scrape)."""
    out: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, raw, value = m.groups()
        labels: list[tuple[str, str]] = []
        pos = 0
        while raw and pos < len(raw):
            lm = _LABEL.match(raw, pos)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm[1], re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e[0]], lm[2])))
            pos = lm.end()
        key = frozenset(labels)
        assert key not in out.get(name, {}), f"duplicate sample {line!r}"
        out.setdefault(name, {})[key] = float(value)
    return out


def L(**labels: str) -> Labels:  # noqa: N802 - reads like the exposition: L(target="up", to="open")
    return frozenset((k.removesuffix("_"), v) for k, v in labels.items())


async def scrape(client) -> dict[str, dict[Labels, float]]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


def count(m: dict, name: str) -> dict[Labels, float]:
    """A histogram's ``_count`` samples by their labels."""
    return m.get(name + "_count", {})


# ---------------------------------------------------------------- the gateway under test

ACME, TIGHT, BROKE = "acme-tenant-key-0001", "tight-tenant-key-0002", "broke-tenant-key-0003"
ENV = {"ACME_KEY": ACME, "TIGHT_KEY": TIGHT, "BROKE_KEY": BROKE, "UP_KEY": "sk-up-metrics-key",
       "K1": "sk-pool-one-1111", "K2": "sk-pool-two-2222"}
RETRY_5XX_ONCE = {"429": {"attempts": 0}, "5xx": {"attempts": 1, "base_s": 0.5}, "net": {"attempts": 0},
                  "timeout": {"attempts": 0}}


def config(url: str, down: str) -> GatewayConfig:
    """``up`` (retry once on 5xx, soft and hard caps), ``cached``, ``flaky`` (its own fake, circuit
    opens after 2 failures, falls back to ``backup``), ``pooled`` (two keys), plain-HTTP ``rest``;
    tenants ``acme`` (no limits), ``tight`` (1 request a minute), ``broke`` (a budget already spent)."""
    cfg = GatewayConfig(url, default_target="up")
    cfg.tenant("acme", api_key_env="ACME_KEY").tenant("tight", api_key_env="TIGHT_KEY", rate_limit={"rpm": 1})
    cfg.tenant("broke", api_key_env="BROKE_KEY", budget={"daily_usd": 0.0000001})
    cfg.up(auth=bearer_env("UP_KEY"), retry_matrix=RETRY_5XX_ONCE,
           llm={"soft_cost_cap_usd": 0.001, "hard_cost_cap_usd": 0.01})
    cfg.up("cached", models=None, cache={"ttl_s": 60})
    cfg.target("flaky", f"{down}/v1", provider="openai", retry_matrix=NO_RETRY,
               circuit={"error_threshold": 2, "cooldown_s": 30}, fallback_targets=["backup"])
    cfg.up("backup", models=None)
    cfg.up("pooled", models=None, retry_matrix=NO_RETRY, auth={"type": "bearer_env", "env_vars": ["K1", "K2"]})
    return cfg.rest()


def chat(text: str = "hi", **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def as_(tenant_key: str, target: str | None = None, **headers: str) -> dict[str, str]:
    h = {"Authorization": f"Bearer {tenant_key}", **headers}
    if target:
        h["X-ReliAPI-Target"] = target
    return h


async def post(client, body: dict, headers: dict[str, str], expect: int) -> str:
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    text = await resp.text()
    assert resp.status == expect, text
    return text


@pytest.fixture
async def toured(fake, upstreams, gateway, clock):
    """The gateway after the whole script; returns (client, fake, down)."""
    down = await upstreams()
    client, _ = await gateway(config(fake.url, down.url), env=ENV, clock=clock)
    acme = as_(ACME)

    fake.plan(Fault(status=503), Fault())  # a retry: 503, then 200
    await post(client, chat("retry me"), acme, 200)

    await post(client, chat("cache me"), as_(ACME, "cached"), 200)  # a miss
    await post(client, chat("cache me"), as_(ACME, "cached"), 200)  # a hit

    fake.plan(Fault(delay_ms=200))  # an idempotent duplicate joins the first while it runs, a third replays
    keyed = as_(ACME, **{"Idempotency-Key": "metrics-k1"})
    await asyncio.gather(*(post(client, chat("once"), keyed, 200) for _ in range(2)))
    await post(client, chat("once"), keyed, 200)

    down.plan(Fault(status=503), Fault(status=503))  # two failures open flaky's circuit; backup answers all three
    for _ in range(3):
        await post(client, chat("fall back"), as_(ACME, "flaky"), 200)
    assert len(down.requests) == 2

    await post(client, chat("too dear", max_tokens=100_000), acme, 400)  # hard cap: no upstream call
    await post(client, chat("lowered", max_tokens=10_000), acme, 200)  # soft cap: max_tokens lowered
    await post(client, chat("spent"), as_(BROKE), 402)  # tenant budget exhausted

    await post(client, chat("first"), as_(TIGHT), 200)  # a rate limit of 1 a minute: the second is refused
    await post(client, chat("second"), as_(TIGHT), 429)

    await post(client, chat("stream me", stream=True), acme, 200)

    fake.plan(Fault(status=429))  # K1 cools, K2 answers at once
    await post(client, chat("pool"), as_(ACME, "pooled"), 200)

    resp = await client.get("/t/rest/things", headers=acme)
    assert resp.status == 200
    await post(client, chat("who?"), as_("not-a-tenant-key"), 401)
    return client, fake, down


def cost(prompt: int, completion: int) -> float:  # gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens
    return (prompt * 0.15 + completion * 0.60) / 1e6


# ---------------------------------------------------------------- tests


async def test_every_spec_series_is_there_with_exactly_its_labels(toured):
    client, _, _ = toured
    m = await scrape(client)
    for name, labels in SPEC_SERIES.items():
        if name in HISTOGRAMS:
            for suffix in ("_count", "_sum"):
                assert m.get(name + suffix), f"{name}{suffix} has no sample"
                assert all(dict(k).keys() == labels for k in m[name + suffix]), (name, list(m[name + suffix]))
            assert all(dict(k).keys() == labels | {"le"} for k in m[name + "_bucket"])
        else:
            assert m.get(name), f"{name} has no sample"
            assert all(dict(k).keys() == labels for k in m[name]), (name, list(m[name]))
    extra = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in m} - set(SPEC_SERIES)
    assert extra <= set(EXTRA_SERIES)


async def test_counters_after_the_script_are_exact(toured):
    client, _, _ = toured
    m = await scrape(client)
    v1 = {"kind": "llm", "route": "v1"}
    assert m["reliapi_requests_total"] == {
        L(target="up", status="200", tenant="acme", **v1): 6,  # retried, 3 idempotent, soft cap, stream
        L(target="up", status="400", tenant="acme", **v1): 1,
        L(target="up", status="402", tenant="broke", **v1): 1,
        L(target="up", status="200", tenant="tight", **v1): 1,
        L(target="up", status="429", tenant="tight", **v1): 1,
        L(target="cached", status="200", tenant="acme", **v1): 2,
        L(target="backup", status="200", tenant="acme", **v1): 3,  # the target that answered
        L(target="pooled", status="200", tenant="acme", **v1): 1,
        L(target="rest", kind="http", route="t", status="200", tenant="acme"): 1,
        L(target="", kind="", route="v1", status="401", tenant=""): 1,  # refused before a target was chosen
    }
    assert m["reliapi_errors_total"] == {
        L(target="up", code="budget_exceeded"): 1, L(target="up", code="budget_exhausted"): 1,
        L(target="up", code="rate_limited"): 1, L(target="", code="unauthorized"): 1,
    }
    assert m["reliapi_retries_total"] == {L(target="up", reason="5xx"): 1, L(target="pooled", reason="key"): 1}
    assert m["reliapi_cache_misses_total"] == {L(target="cached"): 1}
    assert m["reliapi_cache_hits_total"] == {L(target="cached"): 1}
    assert m["reliapi_coalesced_total"] == {L(target="up"): 1}
    assert m["reliapi_idempotent_hits_total"] == {L(target="up"): 1}
    assert m["reliapi_circuit_breaker_transitions_total"] == {L(target="flaky", to="open"): 1}
    assert m["reliapi_fallbacks_total"] == {L(from_="flaky", to="backup"): 3}
    assert m["reliapi_rate_limited_total"] == {L(tenant="tight"): 1}
    assert m["reliapi_budget_events_total"] == {
        # soft_cap: "lowered" (max_tokens 10,000), and the 8 requests to ``up`` that sent none: a cap bounds those
        # at 4,096 tokens ($0.0025 > the $0.001 soft cap), so each is lowered to fit (retry me, once ×3, spent,
        # first, second, stream me; "second" is then refused by the tenant's quota, which sits inside the cache
        # and so after the caps)
        L(target="up", event="hard_cap"): 1, L(target="up", event="soft_cap"): 9, L(target="up", event="exhausted"): 1,
    }
    model = "gpt-4o-mini"  # every fake answer reports 5 prompt tokens and 4 completion tokens (a stream: 3)
    assert m["reliapi_llm_tokens_total"] == {
        L(target="up", model=model, kind="prompt"): 25, L(target="up", model=model, kind="completion"): 19,
        L(target="cached", model=model, kind="prompt"): 5, L(target="cached", model=model, kind="completion"): 4,
        L(target="backup", model=model, kind="prompt"): 15, L(target="backup", model=model, kind="completion"): 12,
        L(target="pooled", model=model, kind="prompt"): 5, L(target="pooled", model=model, kind="completion"): 4,
    }
    spent = m["reliapi_llm_cost_usd_total"]
    assert set(spent) == {L(target=t, model=model, tenant=n) for t, n in
                          [("up", "acme"), ("up", "tight"), ("cached", "acme"), ("backup", "acme"), ("pooled", "acme")]}
    assert spent[L(target="up", model=model, tenant="acme")] == pytest.approx(cost(20, 15))
    assert spent[L(target="up", model=model, tenant="tight")] == pytest.approx(cost(5, 4))
    assert spent[L(target="backup", model=model, tenant="acme")] == pytest.approx(cost(15, 12))
    # seeds 000 and 001: reliapi_llm_cost_usd is a histogram — one observation per priced answer
    assert count(m, "reliapi_llm_cost_usd") == {L(target="up", model=model): 5, L(target="cached", model=model): 1,
                                                L(target="backup", model=model): 3, L(target="pooled", model=model): 1}
    sums = m["reliapi_llm_cost_usd_sum"]
    assert sum(sums.values()) == pytest.approx(sum(spent.values()))


async def test_histograms_count_requests_attempts_and_first_tokens(toured):
    client, _, _ = toured
    m = await scrape(client)
    assert count(m, "reliapi_request_duration_seconds") == {
        L(target="up", kind="llm"): 10, L(target="cached", kind="llm"): 2, L(target="backup", kind="llm"): 3,
        L(target="pooled", kind="llm"): 1, L(target="rest", kind="http"): 1, L(target="", kind=""): 1,
    }
    # one per upstream answer: up 2 (retried) + 1 (idempotent) + soft cap + tight + stream; flaky's two 503s
    assert count(m, "reliapi_upstream_duration_seconds") == {
        L(target="up"): 6, L(target="cached"): 1, L(target="flaky"): 2, L(target="backup"): 3,
        L(target="pooled"): 2, L(target="rest"): 1,
    }
    assert count(m, "reliapi_ttft_seconds") == {L(target="up"): 1}  # the stream only
    buckets = {dict(k)["le"]: v for k, v in m["reliapi_ttft_seconds_bucket"].items()}
    assert buckets["+Inf"] == 1 and list(buckets.values()) == sorted(buckets.values())  # cumulative


async def test_the_wikis_series_names_are_the_same_counts(toured):
    """Seed 000 names reliapi_http_requests_total, reliapi_llm_requests_total and reliapi_latency_ms."""
    client, _, _ = toured
    m = await scrape(client)
    assert m["reliapi_http_requests_total"] == {L(target="rest", status="200"): 1}
    llm = m["reliapi_llm_requests_total"]
    assert llm[L(target="up", status="200")] == 7 and llm[L(target="backup", status="200")] == 3  # acme 6 + tight 1
    assert sum(llm.values()) == 16
    seconds, ms = count(m, "reliapi_request_duration_seconds"), count(m, "reliapi_latency_ms")
    assert ms == seconds
    assert sum(m["reliapi_latency_ms_sum"].values()) == pytest.approx(1000 * sum(m["reliapi_request_duration_seconds_sum"].values()))
    assert "5000.0" in {dict(k)["le"] for k in m["reliapi_latency_ms_bucket"]}  # the 5 s bucket, in ms


async def test_gauges_after_the_script(toured):
    client, _, down = toured
    m = await scrape(client)
    targets = ("up", "cached", "flaky", "backup", "pooled", "rest")
    assert m["reliapi_inflight_requests"] == {L(target=t): 0 for t in targets}
    assert m["reliapi_circuit_breaker_state"] == {L(target=t): 1 if t == "flaky" else 0 for t in targets}
    assert m["reliapi_key_pool_keys"] == {
        L(target="pooled", state="active"): 1, L(target="pooled", state="cooling"): 1,
        L(target="pooled", state="disabled"): 0,
    }


async def test_a_half_open_circuit_shows_2(fake, gateway, clock):
    from tests.support.circuits import config as circuit_config
    from tests.support.circuits import open_circuit

    client, _ = await gateway(circuit_config(fake.url), clock=clock)
    await open_circuit(client, fake)
    assert (await scrape(client))["reliapi_circuit_breaker_state"][L(target="up")] == 1
    clock.advance(31)  # past the cooldown: the next attempt is a probe
    fake.plan(Fault(delay_ms=1000))  # the probe is held at the upstream while the gateway is scraped
    probe = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat()))
    assert await eventually(lambda: len(fake.requests) == 3)
    m = await scrape(client)
    assert m["reliapi_circuit_breaker_state"][L(target="up")] == 2
    assert m["reliapi_inflight_requests"][L(target="up")] == 1
    assert (await probe).status == 200
    m = await scrape(client)
    assert m["reliapi_circuit_breaker_state"][L(target="up")] == 0
    assert m["reliapi_inflight_requests"][L(target="up")] == 0
    assert m["reliapi_circuit_breaker_transitions_total"] == {
        L(target="up", to="open"): 1, L(target="up", to="half_open"): 1, L(target="up", to="closed"): 1,
    }


async def test_a_stream_in_flight_is_counted_until_the_client_leaves(fake, gateway, clock):
    from tests.support.config import llm_config

    client, _ = await gateway(llm_config(fake.url), env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    fake.plan(Fault(chunks=5, stall_after=2))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # the first event is here: the stream is under way
    assert (await scrape(client))["reliapi_inflight_requests"][L(target="up")] == 1
    resp.close()  # the client goes away mid-stream
    assert await eventually(lambda: client.app[RUNTIME].current.observatory.inflight["up"] == 0)
    m = await scrape(client)
    assert m["reliapi_inflight_requests"][L(target="up")] == 0
    assert m["reliapi_requests_total"] == {L(target="up", kind="llm", route="v1", status="200", tenant=""): 1}
    assert m["reliapi_errors_total"] == {L(target="up", code="client_closed"): 1}
    assert count(m, "reliapi_ttft_seconds") == {L(target="up"): 1}


async def test_a_shared_stream_whose_first_client_left_is_counted_once_when_it_ends(fake, gateway, clock):
    """The first client of a cached stream leaves early; a duplicate that joined it reads it to the end. The upstream
    billed one answer: its tokens and cost are counted once, when the stream ends (they were counted from the first
    client's access record, written as it left, before they were known: not at all — found by a black-box review)."""
    from tests.support.config import llm_config

    cfg = llm_config(fake.url).up(cache={"ttl_s": 60})
    client, logs = await gateway(cfg, env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    fake.plan(Fault(chunks=5, interval_ms=80))
    body = chat("share me", stream=True)
    first = await client.post("/v1/chat/completions", json=body)
    await first.content.readuntil(b"\n\n")
    follower = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await asyncio.sleep(0.05)
    first.close()  # the first client leaves; the duplicate goes on reading the shared stream
    assert (await (await follower).read()).endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 1
    m = await scrape(client)
    model = "gpt-4o-mini"  # the fake's stream reports 5 prompt tokens and 5 completion tokens (one a chunk)
    assert m["reliapi_llm_tokens_total"] == {L(target="up", model=model, kind="prompt"): 5,
                                            L(target="up", model=model, kind="completion"): 5}
    assert m["reliapi_llm_cost_usd_total"] == {L(target="up", model=model, tenant=""): pytest.approx(cost(5, 5))}
    assert count(m, "reliapi_llm_cost_usd") == {L(target="up", model=model): 1}


async def test_a_label_value_a_client_chose_cannot_break_the_exposition(fake, gateway, clock):
    """The model label comes from the request body: quotes, backslashes and newlines are escaped."""
    from tests.support.config import llm_config

    client, _ = await gateway(llm_config(fake.url), env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    model = 'gpt-x"} 99\nreliapi_forged_total 1 \\'
    resp = await client.post("/v1/chat/completions", json={**chat(), "model": model})
    assert resp.status == 200
    m = await scrape(client)  # every line parses
    assert "reliapi_forged_total" not in m
    assert m["reliapi_llm_tokens_total"] == {
        L(target="up", model=model, kind="prompt"): 5, L(target="up", model=model, kind="completion"): 4,
    }


async def test_counters_survive_a_reload_and_a_removed_targets_gauges_go(fake, gateway, clock):
    # no grace: the old runtime closes its connection pools at once (see RuntimeSlot.close)
    first = config(fake.url, fake.url).server(shutdown_grace_s=0)
    client, _ = await gateway(first, env=ENV, clock=clock)
    await post(client, chat(), as_(ACME), 200)
    before = await scrape(client)
    assert L(target="pooled", state="active") in before["reliapi_key_pool_keys"]
    only_up = GatewayConfig(fake.url, default_target="up").tenant("acme", api_key_env="ACME_KEY").up()
    await client.app[RUNTIME].reload(only_up.load(env=ENV))
    await post(client, chat(), as_(ACME), 200)
    m = await scrape(client)
    assert m["reliapi_requests_total"] == {L(target="up", kind="llm", route="v1", status="200", tenant="acme"): 2}
    assert m["reliapi_inflight_requests"] == {L(target="up"): 0}
    assert m["reliapi_circuit_breaker_state"] == {L(target="up"): 0}
    assert "reliapi_key_pool_keys" not in m


async def test_a_fresh_gateway_shows_only_its_targets_gauges(fake, gateway):
    """Every app has its own registry: nothing from the other tests' gateways leaks in."""
    from tests.support.config import llm_config

    client, _ = await gateway(llm_config(fake.url))
    m = await scrape(client)
    assert set(m) == {"reliapi_inflight_requests", "reliapi_circuit_breaker_state"}
    assert m["reliapi_inflight_requests"] == {L(target=t): 0 for t in ("up", "claude", "rest")}


class DownStore(MemoryStore):
    """A store whose atomic claims and reservations fail, as Redis does when it goes away."""

    async def claim(self, *args, **kwargs):
        raise StoreError("redis claim failed: ConnectionError: refused")

    async def reserve(self, *args, **kwargs):
        raise StoreError("redis reserve failed: ConnectionError: refused")


async def test_a_failing_store_is_counted_per_policy(fake, gateway, clock):
    client, _ = await gateway(config(fake.url, fake.url), env=ENV, clock=clock, store=DownStore(clock=clock.time))
    for _ in range(2):
        await post(client, chat("cache me"), as_(ACME, "cached"), 200)  # served, uncached
    await post(client, chat("spend?"), as_(BROKE), 503)  # a budgeted tenant: its spend cannot be checked
    m = await scrape(client)
    assert m["reliapi_store_degraded_total"] == {L(target="cached", policy="cache"): 2,
                                                  L(target="up", policy="budget"): 1}
    assert dict(next(iter(m["reliapi_store_degraded_total"]))).keys() == EXTRA_SERIES["reliapi_store_degraded_total"]
    assert "reliapi_cache_hits_total" not in m and "reliapi_cache_misses_total" not in m


async def test_a_stream_through_the_cache_keeps_its_time_to_first_token(fake, gateway, clock):
    """A cached target's stream is relayed through a recording (single flight): its TTFT is still measured."""
    from tests.support.config import llm_config

    cfg = llm_config(fake.url).up(cache={"ttl_s": 60})
    client, logs = await gateway(cfg, env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
    await resp.read()
    assert await eventually(lambda: bool(logs))
    assert logs[-1]["ttft_ms"] is not None
    assert count(await scrape(client), "reliapi_ttft_seconds") == {L(target="up"): 1}


async def test_model_label_values_are_bounded(fake, gateway, clock, monkeypatch):
    """Clients choose the model name: past a bound, new names are counted under one label value."""
    from gateway.observe import counters as observe
    from tests.support.config import llm_config

    monkeypatch.setattr(observe, "MAX_MODELS", 2)
    client, _ = await gateway(llm_config(fake.url), env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    for model in ("gpt-a", "gpt-b", "gpt-c", "gpt-d", "gpt-a"):
        assert (await client.post("/v1/chat/completions", json={**chat(), "model": model})).status == 200
    prompt = {labels: v for labels, v in (await scrape(client))["reliapi_llm_tokens_total"].items()
              if dict(labels)["kind"] == "prompt"}
    assert prompt == {L(target="up", model="gpt-a", kind="prompt"): 10, L(target="up", model="gpt-b", kind="prompt"): 5,
                      L(target="up", model=observe.OTHER_MODEL, kind="prompt"): 10}


def _record(status: int, outcome: str, code: str | None = None, upstream: int | None = None) -> dict:
    return {"ts": None, "request_id": "r", "tenant": "acme", "target": "up", "kind": "llm", "route": "v1",
            "method": "POST", "status": status, "model": "gpt-4o-mini", "outcome": outcome, "error_code": code,
            "upstream_status": upstream, "latency_ms": 1.0, "ttft_ms": None, "path": "/v1/chat/completions"}


def test_a_targets_error_rate_counts_its_failures_not_the_gateways_refusals():
    from gateway.observe.counters import Observatory

    obs = Observatory(wall=lambda: 1_700_000_000.0)
    obs.record(_record(429, "error", "rate_limited"))  # a tenant over its rate limit
    obs.record(_record(402, "error", "budget_exhausted"))
    obs.record(_record(200, "ok", upstream=200))
    assert (obs.targets["up"].requests, obs.targets["up"].errors) == (3, 0)
    obs.record(_record(502, "upstream_error", upstream=502))  # the upstream's own 5xx, passed through
    obs.record(_record(504, "error", "upstream_timeout"))
    assert obs.targets["up"].errors == 2
    latest = obs.last_errors[0]
    assert (latest["code"], latest["path"]) == ("upstream_timeout", "/v1/chat/completions")
    assert obs.last_errors[1]["message"] == "the upstream answered 502"


async def test_duplicates_that_join_a_failing_request_are_counted_as_coalesced(fake, gateway, clock):
    from tests.support.config import llm_config

    cfg = llm_config(fake.url).up(retry_matrix=NO_RETRY)
    client, _ = await gateway(cfg, env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    fake.plan(Fault(reset=True, delay_ms=200))  # the one request that runs fails (not retried); duplicates share it
    keyed = {"Idempotency-Key": "fails-once"}
    replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(), headers=keyed) for _ in range(3)))
    assert [r.status for r in replies] == [502, 502, 502] and len(fake.requests) == 1
    assert (await scrape(client))["reliapi_coalesced_total"] == {L(target="up"): 2}


async def test_a_replayed_or_cached_answer_does_not_repeat_its_cost(fake, gateway, clock):
    from tests.support.config import llm_config

    cfg = llm_config(fake.url).up(cache={"ttl_s": 60})
    client, logs = await gateway(cfg, env={"UP_KEY": "sk-up-xxxxxxxx"}, clock=clock)
    first = await client.post("/v1/chat/completions", json=chat("priced"))
    assert float(first.headers["X-ReliAPI-Cost-USD"]) == pytest.approx(logs[-1]["cost_usd"])
    hit = await client.post("/v1/chat/completions", json=chat("priced"))
    assert hit.headers["X-Cache"] == "HIT" and "X-ReliAPI-Cost-USD" not in hit.headers
    keyed = {"Idempotency-Key": "cost-once"}
    once = await client.post("/v1/chat/completions", json=chat("keyed"), headers={**keyed, "Cache-Control": "no-store"})
    again = await client.post("/v1/chat/completions", json=chat("keyed"), headers={**keyed, "Cache-Control": "no-store"})
    assert "X-ReliAPI-Cost-USD" in once.headers
    assert again.headers["Idempotent-Replayed"] == "true" and "X-ReliAPI-Cost-USD" not in again.headers


async def test_an_attempt_that_never_got_an_answer_is_timed_too(fake, gateway, clock):
    """upstream_duration_seconds counts every attempt: a refused connection (or a timeout) as well."""
    cfg = GatewayConfig().target("gone", "http://127.0.0.1:9/api", retry_matrix=NO_RETRY)
    client, _ = await gateway(cfg, clock=clock)
    resp = await client.get("/t/gone/things")
    assert resp.status == 502
    assert count(await scrape(client), "reliapi_upstream_duration_seconds") == {L(target="gone"): 1}


async def test_a_retry_the_open_circuit_would_refuse_is_neither_made_nor_counted(fake, gateway, clock):
    cfg = f"""
targets:
  brittle:
    base_url: {fake.url}/api
    retry_matrix: {{"5xx": {{attempts: 2}}, "429": {{attempts: 0}}, "net": {{attempts: 0}}, "timeout": {{attempts: 0}}}}
    circuit: {{error_threshold: 1, cooldown_s: 30}}
"""
    client, _ = await gateway(cfg, clock=clock)
    fake.plan(Fault(status=500), Fault(status=500), Fault(status=500))
    resp = await client.get("/t/brittle/things")
    assert resp.status == 500 and len(fake.requests) == 1  # the first failure opened the circuit: no retry waits
    m = await scrape(client)
    assert m.get("reliapi_retries_total", {}) == {}
    assert m["reliapi_circuit_breaker_transitions_total"] == {L(target="brittle", to="open"): 1}
