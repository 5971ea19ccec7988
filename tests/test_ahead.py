"""Claims sent ahead (``gateway.state.ahead``): a miss asks the store once for its idempotency key, its cache entry
and its quota — and behaves as if each policy had asked in turn.

What a user would notice if it did not: a request refused by a policy between the cache and the quota (a tenant's
limit on parallel requests) using up quota; a request the quota refuses leaving its idempotency key or cache entry
locked, so that its retry waits or is told "in progress"; a hit or a replay taking quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from gateway.store import StoreError, Take
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.gateway import settle
from tests.support.stores import PrivateRedis, drop, new_prefix, redis_store
from tests.test_rate_limit import CHAT, ENV, KEY_A, StillClock, auth, call, config

CACHED = {"cache": {"ttl_s": 60}}


def ask(n: int) -> dict:
    return {**CHAT, "messages": [{"role": "user", "content": f"question {n}"}]}


def keyed(key: str) -> dict[str, str]:
    return {**auth(KEY_A), "Idempotency-Key": key}


@pytest.fixture(params=["memory", "redis"])
async def store_of(request):
    """The memory store on the test's clock (each policy asks the store itself), or Redis under a fresh prefix (the
    claims and the quota of a miss go in one call)."""
    made = []

    async def make(clock: StillClock):
        if request.param == "memory":
            return MemoryStore(clock=clock.time)
        made.append(await redis_store(new_prefix()))
        return made[-1]

    yield make
    for store in made:
        await drop(store)


async def test_a_request_the_parallel_limit_refuses_takes_no_quota(fake, gateway, store_of):
    """The quota is taken after the parallel limit passed the request, as if the store were asked in turn."""
    clock = StillClock()
    tenants = [{"name": "a", "api_key": KEY_A, "profile": "p"}]
    cfg = config(fake.url, tenants=tenants, up=CACHED).section(
        "client_profiles", {"p": {"max_parallel_requests": 1, "max_qps_per_tenant": 0.1, "burst_size": 2}})
    client, _ = await gateway(cfg, env=ENV, clock=clock, store=await store_of(clock))
    slow = asyncio.create_task(call(client, headers={**keyed("k1"), "X-Fake-Delay-Ms": "300"}, body=ask(1)))
    while not fake.requests:
        await asyncio.sleep(0.01)
    status, _, data = await call(client, headers=keyed("k2"), body=ask(2))
    assert status == 429 and data["error"]["code"] == "too_many_parallel_requests"
    assert (await slow)[0] == 200
    status, headers, _ = await call(client, headers=keyed("k3"), body=ask(3))
    assert status == 200, headers  # the second of two: the refused one took none
    assert headers["X-RateLimit-Remaining"] == "0"
    assert (await call(client, headers=keyed("k4"), body=ask(4)))[0] == 429  # and now they are used up
    assert len(fake.requests) == 2


async def test_a_request_over_its_quota_leaves_its_key_and_entry_free(fake, gateway, store_of):
    clock = StillClock()
    store = await store_of(clock)
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 1, "burst": 1}}]
    client, _ = await gateway(config(fake.url, tenants=tenants, up=CACHED), env=ENV, clock=clock, store=store)
    assert (await call(client, headers=keyed("k1"), body=ask(1)))[0] == 200
    await settle(client)
    status, headers, data = await call(client, headers=keyed("k2"), body=ask(2))
    assert status == 429 and data["error"]["code"] == "rate_limited"
    assert headers["X-RateLimit-Remaining"] == "0" and "Retry-After" in headers
    # no lock was left for its key or its answer: the retry is refused by the quota again, not told "in progress"
    flights = [key async for key in store.scan_prefix("") if key.startswith(("idem:", "cache:")) and ":log:" not in key]
    locks = [key for key in flights if (await store.get(key) or b"")[:1] == b"L"]
    assert flights and locks == []  # (the first request's answers are there, stored)
    status, _, data = await call(client, headers=keyed("k2"), body=ask(2))
    assert status == 429 and data["error"]["code"] == "rate_limited"
    # a cache hit and a replay take no quota, over it or not
    hit = await call(client, headers=auth(KEY_A), body=ask(1))
    assert hit[0] == 200 and hit[1]["X-Cache"] == "HIT"
    replay = await call(client, headers=keyed("k1"), body=ask(1))
    assert replay[0] == 200 and replay[1]["Idempotent-Replayed"] == "true"
    assert len(fake.requests) == 1


async def test_a_hit_a_replay_and_a_coalesced_answer_show_no_quota_they_did_not_take(fake, gateway, store_of):
    """The stored and shared copies of an answer leave the quota's headers out: the first request's count, shown on
    a hit minutes later, would tell a client throttling itself on it that it has quota it may not have."""
    clock = StillClock()
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 60, "burst": 10}}]
    cfg = config(fake.url, tenants=tenants, up=CACHED, rate_limit_per_ip_rpm=1000)
    client, _ = await gateway(cfg, env=ENV, clock=clock, store=await store_of(clock))
    leader = asyncio.create_task(call(client, headers={**keyed("k1"), "X-Fake-Delay-Ms": "300"}, body=ask(1)))
    while not fake.requests:
        await asyncio.sleep(0.01)
    second = await call(client, headers=auth(KEY_A), body=ask(1))  # the same body, no key: it follows the first
    first = await leader
    assert first[0] == second[0] == 200 and len(fake.requests) == 1
    assert second[1]["X-ReliAPI-Attempts"] == "0"  # (coalesced: it made no attempt of its own)
    assert first[1]["RateLimit"] == '"default";r=9;t=1' and first[1]["X-RateLimit-Remaining"] == "9"
    await settle(client)
    hit = await call(client, headers=auth(KEY_A), body=ask(1))
    replay = await call(client, headers=keyed("k1"), body=ask(1))
    assert hit[1]["X-Cache"] == "HIT" and replay[1]["Idempotent-Replayed"] == "true"
    for headers in (second[1], hit[1], replay[1]):
        assert "default" not in headers.get("RateLimit-Policy", ""), headers  # the tenant's quota: not taken
        assert headers["RateLimit-Policy"].startswith('"ip"')  # the door's per-IP limit counts every request
    assert (await call(client, headers=keyed("k2"), body=ask(2)))[1]["RateLimit"].startswith('"default";r=8;')


async def test_requests_answered_503_while_redis_stalled_keep_no_quota_taken(fake, gateway):
    """A stalled Redis runs the claims and takes it read once it resumes; the requests were answered 503 long before
    (or their clients left): their keys, entries and quota are given back, so their retries run."""
    redis = PrivateRedis()
    redis.start()
    try:
        store = RedisStore(redis.url, key_prefix=new_prefix())
        tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 5, "burst": 5}}]
        client, _ = await gateway(config(fake.url, tenants=tenants, up=CACHED), env=ENV, store=store)
        assert (await call(client, headers=keyed("warm"), body=ask(0)))[0] == 200  # connected, scripts loaded
        await settle(client)
        os.kill(redis.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            stalled = await asyncio.gather(*(call(client, headers=keyed(f"k{i}"), body=ask(i)) for i in range(1, 5)))
            assert [s for s, _, _ in stalled] == [503] * 4
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        peek = Take("rl:{tenant:a}", rate_per_s=5 / 60, burst=4, quantity=0)
        for _ in range(100):  # the give-backs go out once the store answers again
            with contextlib.suppress(StoreError):
                if (await store.take_all([peek]))[0].remaining >= 4:
                    break
            await asyncio.sleep(0.1)
        retried = [await call(client, headers=keyed(f"k{i}"), body=ask(i)) for i in range(1, 5)]
        assert [s for s, _, _ in retried] == [200] * 4, retried[-1][2]  # the warm-up's one and these four: five
        assert len(fake.requests) == 5
    finally:
        redis.stop()
