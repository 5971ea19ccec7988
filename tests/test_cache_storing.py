"""Response cache, continued (SPEC §5 "Cache", TC37–TC38): what is never stored, streams, single flight, TTL,
the size bound, a store that is down, and gateways sharing a store (``tests/test_cache.py`` has the keying,
tenant isolation and request ``Cache-Control``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import yaml

from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from tests.support.caching import (
    CHAT,
    KEY_A,
    KEY_B,
    MESSAGES,
    STREAM,
    assert_hit,
    assert_sse,
    bearer,
    chat,
    config,
    eventually,
    get,
    starter,
    tenants_block,
)
from tests.support.fakes import Fault
from tests.support.gateway import settle
from tests.support.stores import drop, new_prefix, redis_store


@pytest.fixture
def start(fake, gateway, clock):
    return starter(fake, gateway, clock)


# =============================================================== TC37 never stored


async def test_tc37_an_upstream_500_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(status=500))
    failed = await chat(client)
    assert failed.status == 500 and failed.cache == "MISS"
    ok = await chat(client)
    assert ok.status == 200 and ok.cache == "MISS"
    assert_hit(await chat(client))
    assert len(fake.requests) == 2


async def test_tc37_a_404_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(status=404))
    missing = await get(client)
    assert missing.status == 404 and missing.cache == "MISS"
    found = await get(client)
    assert found.status == 200 and found.cache == "MISS"
    assert_hit(await get(client))
    assert len(fake.requests) == 2


async def test_tc37_a_stream_cut_mid_way_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, cut_after=2))
    cut = await chat(client, STREAM)
    assert cut.status == 200 and b"[DONE]" not in cut.body and b'"error"' in cut.body  # the in-band error
    await settle(client)
    whole = await chat(client, STREAM)
    assert_sse(whole)
    assert whole.cache == "MISS"
    assert len(fake.requests) == 2
    await settle(client)
    replay = await chat(client, STREAM)
    assert_hit(replay)
    assert replay.body == whole.body
    assert len(fake.requests) == 2


@pytest.mark.parametrize("directive", ["no-store", "private", "private, max-age=600", "max-age=60, no-store"])
async def test_tc37_upstream_no_store_or_private_is_not_stored(fake, start, directive):
    client, _ = await start()
    fake.plan(*[Fault(headers={"Cache-Control": directive})] * 4)
    chats = [await chat(client) for _ in range(2)]
    gets = [await get(client) for _ in range(2)]
    assert all(a.status == 200 and a.cache == "MISS" for a in chats + gets), chats + gets
    assert len(fake.requests) == 4


async def test_tc37_a_stream_with_upstream_no_store_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(headers={"Cache-Control": "no-store"}))
    first = await chat(client, STREAM)
    assert_sse(first)
    await settle(client)
    second = await chat(client, STREAM)
    assert_sse(second)
    assert first.cache == second.cache == "MISS"
    assert len(fake.requests) == 2


# =============================================================== TC38 streams


async def test_tc38_stream_and_non_stream_are_different_entries(fake, start):
    # (A stream is asked for by the body's "stream" or by Accept, both already in the key, so the
    # key's own stream flag cannot be told apart from outside: this checks what a client sees.)
    client, _ = await start()
    plain = await chat(client)
    assert plain.cache == "MISS" and plain.headers["Content-Type"].startswith("application/json")
    streamed = await chat(client, STREAM)
    assert_sse(streamed)
    assert streamed.cache == "MISS"
    assert len(fake.requests) == 2
    await settle(client)

    plain_hit, stream_hit = await chat(client), await chat(client, STREAM)
    assert_hit(plain_hit)
    assert_hit(stream_hit)
    assert plain_hit.body == plain.body and plain_hit.headers["Content-Type"].startswith("application/json")
    assert stream_hit.body == streamed.body
    assert len(fake.requests) == 2


async def test_tc38_stream_by_accept_header_is_not_served_the_json_entry(fake, start):
    client, _ = await start()
    assert (await chat(client)).cache == "MISS"
    sse = await chat(client, headers={"Accept": "text/event-stream"})  # same body, asks for a stream
    assert sse.cache == "MISS"
    assert len(fake.requests) == 2


async def test_tc38_a_cached_stream_replays_as_the_same_events(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, interval_ms=20))
    first = await chat(client, STREAM)
    assert_sse(first)
    assert first.cache == "MISS"
    assert first.body.count(b"tok") == 5
    await settle(client)

    replay = await chat(client, STREAM)
    assert_hit(replay)
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    assert replay.body == first.body  # every event, in order (a new upstream call would carry another id)
    assert len(fake.requests) == 1


async def test_anthropic_stream_is_cached_and_replayed(fake, start):
    client, _ = await start()
    body = {**MESSAGES, "stream": True}
    first = await chat(client, body, path="/v1/messages")
    assert first.status == 200 and first.cache == "MISS" and b"message_stop" in first.body
    await settle(client)
    replay = await chat(client, body, path="/v1/messages")
    assert_hit(replay)
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    assert replay.body == first.body
    assert len(fake.requests) == 1


# =============================================================== single flight


async def test_concurrent_identical_misses_make_one_upstream_call(fake, start):
    client, _ = await start()
    fake.plan(Fault(delay_ms=300))
    answers = await asyncio.gather(*(get(client) for _ in range(5)))
    assert len(fake.requests) == 1
    assert all(a.status == 200 for a in answers), answers
    assert len({a.body for a in answers}) == 1  # one echo (one upstream request id) for all
    assert all(a.cache in ("MISS", "HIT") for a in answers)
    assert_hit(await get(client))
    assert len(fake.requests) == 1


async def test_concurrent_identical_chat_misses_make_one_upstream_call(fake, start):
    client, _ = await start()
    fake.plan(Fault(delay_ms=300, model="the-one"))
    answers = await asyncio.gather(*(chat(client) for _ in range(5)))
    assert len(fake.requests) == 1
    assert all(a.status == 200 and a.json()["model"] == "the-one" for a in answers), answers
    assert len({a.body for a in answers}) == 1


async def test_concurrent_identical_stream_misses_share_one_upstream_stream(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, interval_ms=80))
    answers = await asyncio.gather(*(chat(client, STREAM) for _ in range(5)))
    assert len(fake.requests) == 1
    for answer in answers:
        assert_sse(answer)
    assert len({a.body for a in answers}) == 1
    assert answers[0].body.count(b"tok") == 5


async def test_concurrent_misses_that_fail_share_the_failure_and_a_retry_runs_again(fake, start):
    client, _ = await start()
    fake.plan(Fault(status=500, delay_ms=300))
    answers = await asyncio.gather(*(chat(client) for _ in range(3)))
    assert [a.status for a in answers] == [500, 500, 500]
    assert len(fake.requests) == 1
    await settle(client)
    assert (await chat(client)).status == 200
    assert len(fake.requests) == 2


async def test_different_requests_are_not_coalesced(fake, start):
    client, _ = await start()
    fake.script = lambda n, seen: Fault(delay_ms=200)
    answers = await asyncio.gather(*(get(client, f"/t/rest/items?i={i}") for i in range(4)))
    assert all(a.status == 200 and a.cache == "MISS" for a in answers)
    assert len(fake.requests) == 4


async def test_a_follower_gets_the_whole_stream_when_the_first_client_goes_away(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, interval_ms=80))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # the first client has its first event …
    follower = asyncio.ensure_future(chat(client, STREAM))
    await asyncio.sleep(0.05)
    resp.close()  # … and leaves; the follower waits for the same upstream answer
    answer = await follower
    assert_sse(answer)
    assert answer.body.count(b"tok") == 5 and answer.body.startswith(b'data: {"id":"chatcmpl-fake1"')
    assert len(fake.requests) == 1


# =============================================================== TTL


async def test_an_entry_expires_after_ttl_s(fake, start, clock):
    client, _ = await start()
    fake.plan(Fault(model="early"), Fault(model="late"))
    assert (await chat(client)).json()["model"] == "early"
    clock.advance(59)
    near_end = await chat(client)
    assert_hit(near_end)
    assert near_end.headers["Age"] == "59" and near_end.json()["model"] == "early"
    clock.advance(2)
    expired = await chat(client)
    assert expired.cache == "MISS" and expired.json()["model"] == "late"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("override", ['{"*": 5}', "{up: 5}", "5"])
async def test_a_tenant_cache_ttl_override_shortens_the_ttl(fake, start, clock, override):
    client, _ = await start(tenants=tenants_block(cache_ttl_override=yaml.safe_load(override)))
    for key in (KEY_A, KEY_B):
        assert (await chat(client, headers=bearer(key))).cache == "MISS"
    clock.advance(6)
    assert (await chat(client, headers=bearer(KEY_A))).cache == "MISS"  # a's 5 s are over
    assert_hit(await chat(client, headers=bearer(KEY_B)))  # b keeps the target's 60 s
    assert len(fake.requests) == 3


async def test_a_tenant_override_for_another_target_does_not_apply(fake, start, clock):
    client, _ = await start(tenants=tenants_block(cache_ttl_override={"rest": 5}))
    assert (await chat(client, headers=bearer(KEY_A))).cache == "MISS"
    assert (await get(client, headers=bearer(KEY_A))).cache == "MISS"
    clock.advance(6)
    assert_hit(await chat(client, headers=bearer(KEY_A)))
    assert (await get(client, headers=bearer(KEY_A))).cache == "MISS"
    assert len(fake.requests) == 3


async def test_ttl_zero_means_not_cached(fake, start):
    client, _ = await start(cache={"ttl_s": 0})
    answers = [await chat(client), await chat(client), await get(client), await get(client)]
    assert [a.cache for a in answers] == ["BYPASS"] * 4
    assert len(fake.requests) == 4


async def test_enabled_false_means_not_cached(fake, start):
    client, _ = await start(cache={"enabled": False, "ttl_s": 60})
    answers = [await chat(client), await chat(client)]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert len(fake.requests) == 2


async def test_a_tenant_override_of_zero_turns_the_cache_off_for_that_tenant(fake, start):
    client, _ = await start(tenants=tenants_block(cache_ttl_override={"*": 0}))
    answers = [await chat(client, headers=bearer(KEY_A)) for _ in range(2)]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert (await chat(client, headers=bearer(KEY_B))).cache == "MISS"
    assert_hit(await chat(client, headers=bearer(KEY_B)))
    assert len(fake.requests) == 3


# =============================================================== size bound


async def test_an_answer_larger_than_max_entry_mb_is_returned_but_not_stored(fake, start):
    client, _ = await start(cache={"ttl_s": 60, "max_entry_mb": 0.0001})  # ~105 bytes
    first = await get(client)
    assert first.status == 200 and len(first.body) > 105
    assert first.json()["path_qs"] == "/api/items?a=1"  # whole, not truncated
    second = await get(client)
    assert second.status == 200 and second.cache == "MISS"
    assert len(fake.requests) == 2


async def test_a_stream_larger_than_max_entry_mb_is_relayed_whole_but_not_stored(fake, start):
    client, _ = await start(cache={"ttl_s": 60, "max_entry_mb": 0.0001})
    fake.plan(Fault(chunks=5))
    first = await chat(client, STREAM)
    assert_sse(first)
    assert first.body.count(b"tok") == 5
    await settle(client)
    second = await chat(client, STREAM)
    assert_sse(second)
    assert second.cache == "MISS"
    assert len(fake.requests) == 2


# =============================================================== store down


class BrokenStore(MemoryStore):
    """A store whose every key operation fails, as an unreachable Redis would."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.failures = 0

    def _fail(self, *args, **kwargs):
        self.failures += 1
        raise StoreError("connection refused")

    async def _afail(self, *args, **kwargs):
        self._fail()

    get = set = set_nx = claim = delete = compare_and_set = compare_and_delete = _afail
    append = range = publish = incr = ping = _afail

    @asynccontextmanager
    async def subscribe(self, channel) -> AsyncIterator:
        self._fail()
        yield


async def test_a_store_that_is_down_turns_the_cache_into_a_pass_through(fake, start, clock, caplog):
    caplog.set_level(logging.WARNING, logger="reliapi")
    store = BrokenStore(clock=clock.time)
    client, logs = await start(store=store)
    fake.plan(Fault(model="one"), Fault(model="two"))
    answers = [await chat(client), await chat(client)]
    assert [a.status for a in answers] == [200, 200]
    assert [a.json()["model"] for a in answers] == ["one", "two"]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    streamed = await chat(client, STREAM)
    assert_sse(streamed)
    assert streamed.cache == "BYPASS"
    got = await get(client)
    assert got.status == 200 and got.cache == "BYPASS"
    only = await chat(client, headers={"Cache-Control": "no-cache"})
    assert only.status == 200 and only.cache == "BYPASS"
    assert len(fake.requests) == 5
    assert store.failures >= 5
    assert all(line["status"] == 200 and line["error_code"] is None for line in logs)
    warnings = [r for r in caplog.records if r.name == "reliapi" and r.levelno == logging.WARNING
                and "cache" in r.getMessage() and "store" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]


# =============================================================== shared between gateways


async def test_two_gateways_on_one_memory_store_share_entries(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    one, _ = await gateway(config(fake.url), clock=clock, store=store)
    two, _ = await gateway(config(fake.url), clock=clock, store=store)
    fake.plan(Fault(model="from-one"))
    first = await chat(one)
    assert first.cache == "MISS"
    hit = await chat(two)
    assert_hit(hit)
    assert hit.body == first.body and hit.json()["model"] == "from-one"

    streamed = await chat(two, STREAM)
    assert streamed.cache == "MISS"
    await settle(one, two)
    replay = await chat(one, STREAM)
    assert_hit(replay)
    assert replay.body == streamed.body
    assert len(fake.requests) == 2


async def test_two_gateways_on_one_memory_store_coalesce_concurrent_misses(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    one, _ = await gateway(config(fake.url), clock=clock, store=store)
    two, _ = await gateway(config(fake.url), clock=clock, store=store)
    fake.plan(Fault(chunks=5, interval_ms=80))
    leader = asyncio.ensure_future(chat(one, STREAM))
    await eventually(lambda: len(fake.requests) == 1)
    followers = await asyncio.gather(*(chat(two, STREAM) for _ in range(2)))
    first = await leader
    assert len(fake.requests) == 1
    for answer in (first, *followers):
        assert_sse(answer)
    assert followers[0].body == followers[1].body == first.body


async def test_two_gateways_on_redis_share_entries(fake, gateway, clock):
    prefix = new_prefix()
    clients = []

    async def instance():
        """Another gateway instance: its own RedisStore (connection) on the same Redis and prefix."""
        client, _ = await gateway(config(fake.url), clock=clock, store=await redis_store(prefix))
        clients.append(client)
        return client

    try:
        one, two = await instance(), await instance()
        fake.plan(Fault(model="from-one"), Fault(chunks=5, interval_ms=20))
        first = await chat(one)
        assert first.cache == "MISS"
        await settle(one)
        hit = await chat(two)
        assert_hit(hit)
        assert hit.body == first.body and hit.json()["model"] == "from-one"

        streamed = await chat(one, STREAM)
        assert_sse(streamed)
        await settle(one)
        replay = await chat(two, STREAM)
        assert_hit(replay)
        assert replay.body == streamed.body

        got = await get(two)
        await settle(two)
        assert_hit(await get(one))
        assert got.cache == "MISS"
        assert len(fake.requests) == 3
    finally:
        for client in clients:
            await client.close()  # each gateway closes its own store
        await drop(await redis_store(prefix))


async def test_two_gateways_on_redis_coalesce_a_running_stream(fake, gateway, clock):
    prefix = new_prefix()
    clients = []

    async def instance():
        client, _ = await gateway(config(fake.url), clock=clock, store=await redis_store(prefix))
        clients.append(client)
        return client

    try:
        one, two = await instance(), await instance()
        fake.plan(Fault(chunks=5, interval_ms=80))
        leader = asyncio.ensure_future(chat(one, STREAM))
        await eventually(lambda: len(fake.requests) == 1)
        follower = await chat(two, STREAM)  # reads gateway one's answer from the Redis log
        first = await leader
        assert len(fake.requests) == 1
        assert_sse(first)
        assert_sse(follower)
        assert follower.body == first.body
    finally:
        for client in clients:
            await client.close()
        await drop(await redis_store(prefix))


class _LateClaimStore(MemoryStore):
    """A store that, once, applies a claim but answers too late (the client timed out): the lock is there,
    nobody holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.stall_next_claim = True

    async def claim(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        held = await super().claim(key, value, ttl_s)
        if self.stall_next_claim:
            self.stall_next_claim = False
            raise StoreError("timed out")
        return held


async def test_a_claim_the_store_applied_too_late_does_not_hold_the_next_request_back(fake, gateway):
    store = _LateClaimStore()
    client, _ = await gateway(config(fake.url), store=store)
    first = await client.post("/v1/chat/completions", json=CHAT)
    assert first.status == 200 and first.headers["X-Cache"] == "BYPASS"  # the store failed: passed through
    # the orphaned lock is taken back at once; without that, this request would wait on it for 30 s
    second = await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT), timeout=10)
    assert second.status == 200 and second.headers["X-Cache"] == "MISS"
