"""Tenant spend budgets that hold under concurrency and across instances, and usage accounting
(issue #5 points 4 and 5): reserve the estimate atomically, settle to the real cost."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from policies.usage import day_of, usage_key
from tests.support.config import NO_5XX_RETRY, GatewayConfig
from tests.support.fakes import Fault
from tests.support.stores import drop, new_prefix, redis_store

PROMPT = "x" * 4000  # ≈ 1,007 prompt tokens by the gateway's estimate
ACTUAL = (5 * 0.15 + 4 * 0.60) / 1e6  # what the fake reports: 5 prompt + 4 completion tokens
KEY = {"Authorization": "Bearer acme-key-123456"}


def chat(**extra) -> dict:
    return {"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": PROMPT}], **extra}


# What each request reserves: the most it can cost — a token per byte of the body (plus the framing of
# its one message) and its whole max_tokens, at gpt-4o-mini's prices (≈ $0.0012)
RESERVED = ((len(json.dumps(chat()).encode()) + 4 + 3) * 0.15 + 1000 * 0.60) / 1e6


def config(url: str, *, daily: float, store: dict | None = None, others: list[dict] = ()) -> GatewayConfig:
    """``up`` (no 5xx retries); tenants ``acme`` (a daily budget and $100 a month), ``others``, ``free``;
    ``store``: ``store:`` fields."""
    cfg = GatewayConfig(url, default_target="up")
    if store:
        cfg.store(**store)
    cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": daily, "monthly_usd": 100})
    cfg.tenants(*others).tenant("free", api_key="free-key-123456")
    return cfg.up(retry_matrix=NO_5XX_RETRY)


def spend_key(now: float) -> str:
    return f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime(now))}"


async def spent(store, now: float | None = None) -> float:
    return float(await store.get(spend_key(now or time.time())) or 0)


async def settled(store, expected: float) -> None:
    for _ in range(200):  # settlements are written in the background
        if await spent(store) == pytest.approx(expected, abs=1e-9):
            return
        await asyncio.sleep(0.01)
    assert await spent(store) == pytest.approx(expected, abs=1e-9)


async def burst(clients, n: int) -> list[int]:
    async def one(i: int) -> int:
        async with clients[i % len(clients)].post("/v1/chat/completions", json=chat(), headers=KEY) as resp:
            await resp.read()
            return resp.status

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_fifty_concurrent_requests_against_a_budget_for_ten_send_ten(fake, gateway):
    store = MemoryStore()
    client, _ = await gateway(config(fake.url, daily=RESERVED * 10.5), store=store)
    fake.script = lambda n, seen: Fault(delay_ms=300)  # all fifty in flight together
    statuses = await burst([client], 50)
    assert statuses.count(200) == 10 and statuses.count(402) == 40
    assert len(fake.requests) == 10
    await settled(store, 10 * ACTUAL)  # each reservation settled to the real cost
    assert (await burst([client], 1)) == [200]  # the refunds made room again


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_two_gateways_sharing_a_store_hold_one_budget(fake, gateway, backend):
    if backend == "memory":
        shared = MemoryStore()
        stores = [shared, shared]
    else:
        prefix = new_prefix()
        stores = [await redis_store(prefix), await redis_store(prefix)]
    try:
        clients = [(await gateway(config(fake.url, daily=RESERVED * 10.5), store=s))[0] for s in stores]
        fake.script = lambda n, seen: Fault(delay_ms=300)
        statuses = await burst(clients, 50)
        assert statuses.count(200) == 10 and len(fake.requests) == 10
        await settled(stores[0], 10 * ACTUAL)
    finally:
        if backend == "redis":
            await drop(stores[0])
            await stores[1].close()


async def test_an_exhausted_budget_is_402_with_what_is_left_and_the_reset_time(fake, gateway):
    client, _ = await gateway(config(fake.url, daily=RESERVED * 1.5))
    fake.script = lambda n, seen: Fault(hang=True)  # the first one holds its reservation
    first = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(), headers=KEY))
    while not fake.requests:
        await asyncio.sleep(0.01)
    resp = await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    body = await resp.json()
    assert resp.status == 402 and body["error"]["code"] == "budget_exhausted"
    message = body["error"]["message"]
    assert f"has ${RESERVED * 0.5:.6f} of its daily budget" in message and f"up to ${RESERVED:.6f}" in message
    assert "lower max_tokens" in message and message.rstrip("Z").endswith("T00:00:00")
    assert 1 <= int(resp.headers["Retry-After"]) <= 86400
    assert len(fake.requests) == 1
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    fake.script = None
    free = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer free-key-123456"})
    assert free.status == 200  # a tenant without a budget is not metered


async def test_a_request_that_can_never_fit_the_budget_says_so_and_not_to_wait(fake, gateway):
    client, _ = await gateway(config(fake.url, daily=RESERVED * 0.5))
    resp = await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    body = await resp.json()
    assert resp.status == 402 and body["error"]["code"] == "budget_exhausted"
    assert "more than the whole daily budget" in body["error"]["message"]
    assert body["error"]["param"] == "max_tokens" and "Retry-After" not in resp.headers
    assert fake.requests == []


async def test_failed_answers_are_not_charged(fake, gateway):
    store = MemoryStore()
    client, _ = await gateway(config(fake.url, daily=1.0), store=store)
    fake.plan(Fault(status=503))
    resp = await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    assert resp.status == 503
    await settled(store, 0.0)


async def test_a_stream_is_settled_with_its_reported_usage(fake, gateway):
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, daily=1.0), store=store)
    fake.plan(Fault(chunks=6))
    body = chat(stream=True, stream_options={"include_usage": True})
    async with client.post("/v1/chat/completions", json=body, headers=KEY) as resp:
        assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
    await settled(store, (5 * 0.15 + 6 * 0.60) / 1e6)
    assert logs[-1]["completion_tokens"] == 6 and logs[-1]["cost_usd"] == pytest.approx((5 * 0.15 + 6 * 0.60) / 1e6)


async def test_an_abandoned_stream_is_settled_from_what_was_sent(fake, gateway):
    store = MemoryStore()
    client, _ = await gateway(config(fake.url, daily=1.0), store=store)
    fake.plan(Fault(chunks=50, interval_ms=50))
    async with client.post("/v1/chat/completions", json=chat(stream=True), headers=KEY) as resp:
        await resp.content.readline()  # the first event, then the client leaves
    charged = 0.0
    for _ in range(200):
        charged = await spent(store)
        if 0 < charged < RESERVED:
            break
        await asyncio.sleep(0.01)
    assert 0 < charged < RESERVED  # the prompt and the text sent so far, not the whole reservation


async def test_usage_rows_per_tenant_user_target_model_and_day(fake, gateway):
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, daily=1.0), store=store)
    await client.post("/v1/chat/completions", json=chat(user="alice"), headers=KEY)
    await client.post("/v1/chat/completions", json=chat(), headers={**KEY, "X-ReliAPI-User": "bob"})
    await client.post("/v1/chat/completions", json=chat(user="alice"), headers=KEY)
    line = logs[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 4) and line["cost_usd"] == pytest.approx(ACTUAL)
    day = day_of(time.time())
    for _ in range(100):
        alice = await store.hgetall(usage_key(day, "acme", "alice", "up", "gpt-4o-mini"))
        if alice.get("requests") == 2:
            break
        await asyncio.sleep(0.01)
    assert alice["requests"] == 2 and alice["prompt_tokens"] == 10 and alice["completion_tokens"] == 8
    assert alice["cost_usd"] == pytest.approx(2 * ACTUAL)
    bob = await store.hgetall(usage_key(day, "acme", "bob", "up", "gpt-4o-mini"))
    assert bob["requests"] == 1


async def test_an_unknown_model_is_served_and_counted_unpriced(fake, gateway):
    store = MemoryStore()
    cfg = config(fake.url, daily=1.0).up(models=["gpt-*", "house-*"])
    client, logs = await gateway(cfg, store=store)
    free = {"Authorization": "Bearer free-key-123456"}  # a tenant without a budget
    resp = await client.post("/v1/chat/completions", json=chat(model="house-7b"), headers=free)
    assert resp.status == 200 and logs[-1]["cost_usd"] is None
    for _ in range(100):
        row = await store.hgetall(usage_key(day_of(time.time()), "free", None, "up", "house-7b"))
        if row:
            break
        await asyncio.sleep(0.01)
    assert row == {"requests": 1.0, "prompt_tokens": 5.0, "completion_tokens": 4.0, "unpriced_requests": 1.0}


async def test_a_budgeted_tenant_may_not_use_a_model_without_a_price(fake, gateway):
    """Unpriced is unmetered: for a tenant with a spend budget that would be a way around it."""
    cfg = config(fake.url, daily=1.0).up(models=["gpt-*", "house-*", "ft:*"])
    client, _ = await gateway(cfg)
    for model in ("house-7b", "ft:gpt-4o-mini-2024-07-18:acme::abc123"):
        resp = await client.post("/v1/chat/completions", json=chat(model=model), headers=KEY)
        body = await resp.json()
        assert resp.status == 403 and "has no price" in body["error"]["message"] and "pricing:" in body["error"]["message"]
    assert fake.requests == []
    cfg.section("pricing", {"house-7b": {"input": 0, "output": 0}})  # a self-hosted model: free, said so
    priced, _ = await gateway(cfg)
    assert (await priced.post("/v1/chat/completions", json=chat(model="house-7b"), headers=KEY)).status == 200


class DownStore(MemoryStore):
    async def reserve(self, *args, **kwargs):
        raise StoreError("redis reserve failed: ConnectionError: refused")


async def test_a_store_that_is_down_fails_budgeted_requests_closed_unless_fail_open(fake, gateway):
    client, _ = await gateway(config(fake.url, daily=1.0), store=DownStore())
    resp = await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "store_unavailable" and "budget" in body["error"]["message"]
    assert fake.requests == []
    open_client, _ = await gateway(config(fake.url, daily=1.0, store={"fail_open": True}), store=DownStore())
    assert (await open_client.post("/v1/chat/completions", json=chat(), headers=KEY)).status == 200


async def test_a_cache_hit_is_neither_usage_nor_spend(fake, gateway):
    store = MemoryStore()
    cfg = config(fake.url, daily=1.0).up(cache={"ttl_s": 60})
    client, _ = await gateway(cfg, store=store)
    await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    await settled(store, ACTUAL)
    hit = await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    assert hit.headers["X-Cache"] == "HIT"
    await settled(store, ACTUAL)  # the hit's reservation was refunded in full


class FlakyUsageStore(MemoryStore):
    down = True

    async def hincr_many(self, *args, **kwargs):
        if self.down:
            raise StoreError("redis hincr_many failed: ConnectionError: refused")
        return await super().hincr_many(*args, **kwargs)


async def test_usage_counts_survive_a_store_outage_and_are_written_once_it_is_back(fake, gateway):
    store = FlakyUsageStore()
    client, _ = await gateway(config(fake.url, daily=1.0).tenant("acme", budget=None), store=store)
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=chat(user="carol"), headers=KEY)).status == 200
    await asyncio.sleep(1.2)  # one flush fails: the counts are kept
    store.down = False
    key = usage_key(day_of(time.time()), "acme", "carol", "up", "gpt-4o-mini")
    for _ in range(300):
        row = await store.hgetall(key)
        if row:
            break
        await asyncio.sleep(0.01)
    assert row["requests"] == 3 and row["completion_tokens"] == 12


async def test_a_report_counts_requests_with_an_idempotency_key_at_once(fake, gateway):
    """A report writes the counts of the last moments first — of every request (keyed ones went
    through a chain of their own, whose counts a report did not write)."""
    client, _ = await gateway(config(fake.url, daily=1.0), store=MemoryStore())
    await client.post("/v1/chat/completions", json=chat(user="erin"), headers={**KEY, "Idempotency-Key": "e-1"})
    await client.post("/v1/chat/completions", json=chat(user="erin"), headers=KEY)
    body = await (await client.get("/v1/usage/erin", headers=KEY)).json()
    assert body["total"]["requests"] == 2


async def test_a_users_usage_by_day_and_in_total(fake, gateway):
    cfg = config(fake.url, daily=1.0, others=[{"name": "other", "api_key": "other-key-123456"}])
    client, _ = await gateway(cfg, store=MemoryStore())
    for _ in range(2):
        await client.post("/v1/chat/completions", json=chat(user="dana"), headers=KEY)
    await client.post("/v1/chat/completions", json=chat(user="dana"), headers={"Authorization": "Bearer other-key-123456"})
    resp = await client.get("/v1/usage/dana", headers=KEY)
    body = await resp.json()
    assert resp.status == 200 and body["user_id"] == "dana"
    assert body["total"] == {"completion_tokens": 8, "cost_usd": pytest.approx(2 * ACTUAL), "prompt_tokens": 10,
                             "requests": 2}  # acme's two requests only: the other tenant's dana is not acme's
    assert len(body["days"]) == 1 and body["days"][0]["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert (await client.get("/v1/usage/dana")).status == 401
    future = await (await client.get("/v1/usage/dana?since=2999-01-01", headers=KEY)).json()
    assert future["total"] == {"completion_tokens": 0, "cost_usd": 0.0, "prompt_tokens": 0, "requests": 0} and future["days"] == []
    for bad in ("yesterday", "2026-02-30", "2026-13-45", "0000-00-00", "20260102", ""):
        assert (await client.get(f"/v1/usage/dana?since={bad}", headers=KEY)).status == 400, bad


async def test_a_tenant_whose_name_holds_a_colon_never_shares_usage_rows_with_another(fake, gateway):
    """Tenant ``acme:bob`` with user ``alice`` is not tenant ``acme`` with user ``bob``: the key's separator is escaped."""
    cfg = config(fake.url, daily=1.0, others=[{"name": "acme:bob", "api_key": "acmebob-key-0002"}])
    client, _ = await gateway(cfg, store=MemoryStore())
    other = {"Authorization": "Bearer acmebob-key-0002"}
    assert (await client.post("/v1/chat/completions", json=chat(user="alice"), headers=other)).status == 200
    assert (await (await client.get("/v1/usage/bob", headers=KEY)).json())["total"]["requests"] == 0
    assert (await (await client.get("/v1/usage/alice", headers=other)).json())["total"]["requests"] == 1
    assert (await (await client.get("/v1/usage/a:b", headers=other)).json())["total"]["requests"] == 0


async def test_the_header_names_the_user_a_usage_row_counts_for_before_the_body(fake, gateway):
    """X-ReliAPI-User, else the body's user: as the per-user rate limit reads it."""
    client, _ = await gateway(config(fake.url, daily=1.0), store=MemoryStore())
    await client.post("/v1/chat/completions", json=chat(user="body-bob"), headers={**KEY, "X-ReliAPI-User": "hdr-alice"})
    alice = await (await client.get("/v1/usage/hdr-alice", headers=KEY)).json()
    bob = await (await client.get("/v1/usage/body-bob", headers=KEY)).json()
    assert alice["total"]["requests"] == 1 and bob["total"]["requests"] == 0


async def test_near_the_end_of_a_budget_a_replay_a_cache_hit_and_duplicates_in_flight_still_answer(fake, gateway):
    """A replay or a cache hit costs nothing (budget-control.md), so the budget cannot refuse it: a request whose
    reservation does not fit is refused only if it would run — not when a stored or running answer serves it."""
    store = MemoryStore()
    cfg = GatewayConfig(fake.url, default_target="up")
    cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 3 * RESERVED})
    client, _ = await gateway(cfg.up(retry_matrix=NO_5XX_RETRY, cache={"ttl_s": 600}), store=store)
    stored = await client.post("/v1/chat/completions", json=chat(), headers={**KEY, "Idempotency-Key": "paid-1"})
    assert stored.status == 200
    cached = await client.post("/v1/chat/completions", json=chat(user="c"), headers=KEY)
    assert cached.status == 200 and cached.headers["X-Cache"] == "MISS"
    await store.set(spend_key(time.time()), str(3 * RESERVED - RESERVED / 2).encode())  # room for no reservation
    again = await client.post("/v1/chat/completions", json=chat(), headers={**KEY, "Idempotency-Key": "paid-1"})
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    hit = await client.post("/v1/chat/completions", json=chat(user="c"), headers=KEY)
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    new = await client.post("/v1/chat/completions", json=chat(user="new"), headers=KEY)
    assert new.status == 402 and (await new.json())["error"]["code"] == "budget_exhausted"
    assert len(fake.requests) == 2  # the replay and the hit reached no upstream; the refused one neither
    # room for one reservation: the first of 10 duplicates runs, the other 9 join it rather than get a 402
    await store.set(spend_key(time.time()), str(3 * RESERVED - 1.5 * RESERVED).encode())
    fake.plan(Fault(delay_ms=300))
    answers = await asyncio.gather(*[client.post("/v1/chat/completions", json=chat(user="dup"),
                                                 headers={**KEY, "Idempotency-Key": "dup-1"}) for _ in range(10)])
    assert [a.status for a in answers] == [200] * 10 and len(fake.requests) == 3


class ClaimCounting(MemoryStore):
    """Counts the flights' claims (a request that would lead its key or cache entry)."""

    claims = 0

    async def claim(self, *args, **kwargs):
        self.claims += 1
        return await super().claim(*args, **kwargs)


async def test_a_request_the_budget_refused_never_leads_a_flight(fake, gateway):
    """It may only be served (a replay, a hit, a running duplicate): were it to claim the key or the cache entry,
    a duplicate that did fit its budget could arrive to find it leading, and share its 402."""
    store = ClaimCounting()
    cfg = GatewayConfig(fake.url, default_target="up")
    cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 3 * RESERVED})
    client, _ = await gateway(cfg.up(retry_matrix=NO_5XX_RETRY, cache={"ttl_s": 600}), store=store)
    await store.set(spend_key(time.time()), str(3 * RESERVED - RESERVED / 2).encode())  # room for no reservation
    refused = await client.post("/v1/chat/completions", json=chat(user="n"), headers={**KEY, "Idempotency-Key": "n-1"})
    assert refused.status == 402 and store.claims == 0 and fake.requests == []
