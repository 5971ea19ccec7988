"""Two real gateway processes on one real Redis (issue #4 §5), and Redis stopped mid-run (SPEC §8).

Each gateway is ``python -m gateway`` in its own process (tests/support/cli_harness.py), in front of
the in-process fake upstream; the test talks to them over HTTP like any client would.
The shared-state tests use the machine's Redis under a fresh key prefix; the fault test
starts a private ``redis-server`` on a free port so it can stop and restart it without
touching anyone else's Redis.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from gateway.store.redis import RedisStore
from tests.support.cli_harness import CLI, Gateway, assert_no_traceback, free_port
from tests.support.config import NO_AUTH, GatewayConfig
from tests.support.fakes import FakeUpstream, Fault
from tests.support.stores import REDIS_URL, PrivateRedis, drop, new_prefix, redis_store

TENANT = {"Authorization": "Bearer acme-key-123456"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def config(fake_url: str, store_url: str, prefix: str, **store: object) -> GatewayConfig:
    """Shared state in ``store_url`` under ``prefix`` (``store``: more ``store:`` fields); tenant ``acme``
    with a rate limit; ``up`` (cached, idempotency waits 10 s) and ``rest`` (cached)."""
    cfg = GatewayConfig(fake_url, default_target="up").store(url=store_url, key_prefix=prefix, **store)
    cfg.tenant("acme", api_key="acme-key-123456", rate_limit={"rpm": 600, "burst": 5})
    cfg.up(auth=NO_AUTH, cache={"ttl_s": 60}, idempotency={"wait_s": 10})
    return cfg.rest(auth=NO_AUTH, cache={"ttl_s": 60})


async def cache_entries(store_url: str, prefix: str, *, at_least: int, timeout_s: float = 5.0) -> None:
    """Wait until the store holds ``at_least`` finished cache entries: a leader answers its client
    first and writes the entry just after, so an immediate duplicate may still be following it."""
    store = RedisStore(store_url, key_prefix=prefix)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            done = 0
            async for key in store.scan_prefix("cache:"):
                if ((await store.get(key)) or b"")[:1] == b"D":
                    done += 1
            if done >= at_least:
                return
            assert time.monotonic() < deadline, f"only {done} cache entries written"
            await asyncio.sleep(0.02)
    finally:
        await store.close()


async def start(cli: CLI, name: str, config: GatewayConfig) -> Gateway:
    cli.write(name, config)
    port = free_port()
    gw = cli.start("--config", name, "--port", str(port), port=port)
    await asyncio.to_thread(gw.wait_healthy)
    return gw


def url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def redis_prefix():
    store = await redis_store(new_prefix())  # skips (or fails in CI) when Redis is down
    prefix = store._prefix.rstrip(":")
    yield prefix
    await drop(store)


async def test_a_rate_limit_is_global_across_two_instances(cli, fake: FakeUpstream, http, redis_prefix):
    cfg = config(fake.url, REDIS_URL, redis_prefix)
    one, two = await start(cli, "one.yaml", cfg), await start(cli, "two.yaml", cfg)
    statuses = []
    for gw in (one, two, one, two, one, two):  # burst 5 shared: the sixth is refused, on whichever instance
        async with http.get(url(gw, "/t/rest/ping"), headers={**TENANT, "Cache-Control": "no-store"}) as resp:
            statuses.append(resp.status)
            last = resp
    assert statuses == [200, 200, 200, 200, 200, 429]
    assert int(last.headers["Retry-After"]) >= 1 and last.headers["X-RateLimit-Remaining"] == "0"
    assert len(fake.requests) == 5


async def test_ten_duplicates_across_two_instances_make_one_upstream_call(cli, fake: FakeUpstream, http, redis_prefix):
    cfg = config(fake.url, REDIS_URL, redis_prefix).tenant("acme", rate_limit={"rpm": 600, "burst": 100})
    one, two = await start(cli, "one.yaml", cfg), await start(cli, "two.yaml", cfg)
    fake.plan(Fault(delay_ms=400))
    headers = {**TENANT, "Idempotency-Key": "order-42", "Cache-Control": "no-store"}

    async def call(gw: Gateway) -> tuple[int, bytes]:
        async with http.post(url(gw, "/v1/chat/completions"), json=CHAT, headers=headers) as resp:
            return resp.status, await resp.read()

    results = await asyncio.gather(*(call(one if i % 2 else two) for i in range(10)))
    assert [status for status, _ in results] == [200] * 10
    assert len({body for _, body in results}) == 1
    assert len(fake.requests) == 1
    status, body = await call(two)  # and later: a replay, still one call
    assert (status, body) == results[0] and len(fake.requests) == 1


async def test_a_stream_duplicated_on_another_instance_receives_the_same_bytes(cli, fake, http, redis_prefix):
    cfg = config(fake.url, REDIS_URL, redis_prefix)
    one, two = await start(cli, "one.yaml", cfg), await start(cli, "two.yaml", cfg)
    fake.plan(Fault(chunks=6, interval_ms=80))
    headers = {**TENANT, "Idempotency-Key": "stream-7", "Cache-Control": "no-store"}
    body = {**CHAT, "stream": True}

    async def call(gw: Gateway, delay: float) -> bytes:
        await asyncio.sleep(delay)
        async with http.post(url(gw, "/v1/chat/completions"), json=body, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            return await resp.read()

    first, second = await asyncio.gather(call(one, 0), call(two, 0.15))  # joins while the first streams
    assert first == second and first.rstrip().endswith(b"data: [DONE]")
    assert len(fake.requests) == 1


async def test_a_cache_entry_written_by_one_instance_is_a_hit_on_the_other(cli, fake, http, redis_prefix):
    cfg = config(fake.url, REDIS_URL, redis_prefix)
    one, two = await start(cli, "one.yaml", cfg), await start(cli, "two.yaml", cfg)
    async with http.get(url(one, "/t/rest/users/1"), headers=TENANT) as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
        written = await resp.read()
    await cache_entries(REDIS_URL, redis_prefix, at_least=1)
    async with http.get(url(two, "/t/rest/users/1"), headers=TENANT) as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "HIT" and resp.headers["X-Cached"] == "true"
        assert await resp.read() == written
    assert len(fake.requests) == 1


# ---------------------------------------------------------------- Redis stopped mid-run


@pytest.fixture
def private_redis():
    redis = PrivateRedis()
    redis.start()
    yield redis
    redis.stop()


async def poll(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_redis_down_degrades_as_specified_and_everything_recovers(cli, fake, http, private_redis):
    prefix = new_prefix()
    strict = await start(cli, "strict.yaml", config(fake.url, private_redis.url, prefix))  # defaults: fail closed, local limits
    lenient = await start(cli, "lenient.yaml", config(
        fake.url, private_redis.url, prefix, fail_open=True, rate_limit_on_error="deny"))

    async def get(gw: Gateway, path: str, **kw) -> tuple[int, dict, dict]:
        async with http.get(url(gw, path), **kw) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    async def post(gw: Gateway, key: str | None) -> tuple[int, dict, dict]:
        headers = {**TENANT, "Cache-Control": "no-store", **({"Idempotency-Key": key} if key else {})}
        async with http.post(url(gw, "/v1/chat/completions"), json=CHAT, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.json()

    # healthy: cache and idempotency work through Redis
    assert (await get(strict, "/readyz"))[0] == 200
    assert (await get(strict, "/t/rest/a", headers=TENANT))[1]["X-Cache"] == "MISS"
    await cache_entries(private_redis.url, prefix, at_least=1)
    assert (await get(strict, "/t/rest/a", headers=TENANT))[1]["X-Cache"] == "HIT"
    assert (await post(strict, "before"))[0] == 200
    calls = len(fake.requests)

    private_redis.stop()

    status, _, body = await get(strict, "/readyz")
    assert status == 503 and body["status"] == "not_ready" and "store unavailable" in body["reason"]
    # cache: pass-through
    status, headers, _ = await get(strict, "/t/rest/a", headers=TENANT)
    assert status == 200 and headers["X-Cache"] == "BYPASS" and len(fake.requests) == calls + 1
    # idempotency: fails closed with a clear 503 by default …
    status, headers, body = await post(strict, "during")
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    assert "idempotency" in body["error"]["message"] and headers["Retry-After"] == "1"
    # … requests without a key are served, and the rate limit keeps limiting per instance (local)
    status, headers, _ = await post(strict, None)
    assert status == 200 and "RateLimit" in headers
    # store.fail_open: the keyed request runs; rate_limit_on_error: deny refuses limited requests
    status, _, body = await post(lenient, "during")
    assert status == 503 and body["error"]["code"] == "store_unavailable" and "rate limit" in body["error"]["message"]
    lenient_no_limit = config(fake.url, private_redis.url, prefix, fail_open=True).tenant("acme", rate_limit=None)
    open_gw = await start(cli, "open.yaml", lenient_no_limit)
    assert (await post(open_gw, "during"))[0] == 200
    assert (await get(open_gw, "/readyz"))[0] == 503

    private_redis.start()  # same port: every gateway reconnects by itself

    async def ready() -> bool:
        return (await get(strict, "/readyz"))[0] == 200

    await poll(ready)
    status, headers, _ = await get(strict, "/t/rest/b", headers=TENANT)
    assert status == 200 and headers["X-Cache"] == "MISS"
    await cache_entries(private_redis.url, prefix, at_least=1)  # the restarted Redis started empty
    assert (await get(lenient, "/t/rest/b", headers=TENANT))[1]["X-Cache"] == "HIT"
    first = await post(strict, "after")
    again = await post(lenient, "after")
    assert first[0] == again[0] == 200 and again[1].get("Idempotent-Replayed") == "true" and first[2] == again[2]

    for gw in (strict, lenient, open_gw):
        assert gw.proc.poll() is None, gw.output  # nothing crashed
        assert_no_traceback(gw.stderr + gw.stdout)
    assert any("store" in m and "unavailable" in m for m in strict.messages())  # the degradation was logged
