"""The memory store holds the cache's stored answers in at most ``store.memory_max_mb`` (oldest dropped first),
so unique cacheable requests cannot grow a gateway without bound; nothing else is ever dropped early."""

from __future__ import annotations

from gateway.store.memory import MemoryStore
from tests.support.config import GatewayConfig
from tests.support.config_helpers import errors_of

KB = b"x" * 1000


async def test_past_the_bound_the_oldest_answers_go_and_nothing_else_does() -> None:
    store = MemoryStore(max_cache_bytes=3500)
    for i in range(3):
        await store.set(f"cache:{i}", b"D" + KB, ttl_s=600)
    await store.set("idem:k", b"D" + KB * 5, ttl_s=600)  # an idempotency answer: never dropped early
    await store.set("cache:lock", b"L" + KB * 5, ttl_s=60)  # a flight's lock: not an answer
    assert store.cache_bytes == 3 * 1001
    await store.set("cache:3", b"D" + KB, ttl_s=600)  # over: the oldest answer goes
    assert await store.get("cache:0") is None and await store.get("cache:3") is not None
    assert await store.get("idem:k") is not None and await store.get("cache:lock") is not None
    assert store.cache_bytes == 3 * 1001
    await store.set("cache:1", b"D" + KB, ttl_s=600)  # written again: counted once, now the newest
    await store.set("cache:4", b"D" + KB, ttl_s=600)
    assert await store.get("cache:2") is None and await store.get("cache:1") is not None
    await store.delete("cache:4")  # a deleted answer no longer counts
    assert store.cache_bytes == 2 * 1001


async def test_answers_that_expired_or_were_cleared_free_their_bytes(clock) -> None:
    store = MemoryStore(clock=clock.time, max_cache_bytes=10_000)
    await store.set("cache:a", b"D" + KB, ttl_s=1)
    clock.advance(2)
    assert await store.get("cache:a") is None and store.cache_bytes == 0
    await store.set("cache:b", b"D" + KB, ttl_s=600)
    assert await store.delete_prefix("cache:") == 1 and store.cache_bytes == 0


async def test_a_gateway_on_the_memory_store_keeps_only_the_newest_answers_past_its_bound(fake, gateway):
    cfg = GatewayConfig(fake.url, default_target="up").up(cache={"ttl_s": 600}).section("store", {"memory_max_mb": 0.002})
    client, _ = await gateway(cfg)
    asks = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i} " + "x" * 300}]}
            for i in range(6)]
    for body in asks:
        assert (await client.post("/v1/chat/completions", json=body)).headers["X-Cache"] == "MISS"
    assert (await client.post("/v1/chat/completions", json=asks[-1])).headers["X-Cache"] == "HIT"  # the newest
    assert (await client.post("/v1/chat/completions", json=asks[0])).headers["X-Cache"] == "MISS"  # dropped
    assert len(fake.requests) == 7


def test_the_bound_is_a_size_and_only_for_the_memory_store() -> None:
    assert errors_of("store: {memory_max_mb: 0}\n") == ["store.memory_max_mb: expected a size in MB above 0, got 0"]
    assert errors_of('store: {url: "redis://127.0.0.1:6379/0", memory_max_mb: 64}\n') == [
        "store.memory_max_mb: bounds the memory:// store only — on Redis, set Redis's own maxmemory "
        "(docs/RUNBOOK.md, sizing)"]
