"""The shared-state policies announce what they did as events (issue #6's metrics subscribe to these)."""

from __future__ import annotations

import asyncio

from gateway.keys import RUNTIME
from gateway.observe.events import CacheHit, CacheMiss, Coalesced, IdempotentReplay, RateLimitRefused, StoreDegraded
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
KEY = {"Authorization": "Bearer acme-key-123456"}


def config(url: str) -> GatewayConfig:
    cfg = GatewayConfig(url, default_target="up").tenant("acme", api_key="acme-key-123456", rate_limit={"rpm": 60, "burst": 6})
    return cfg.up(cache={"ttl_s": 60})


def recorder(client) -> list:
    seen: list = []
    client.app[RUNTIME].current.events.subscribe(seen.append)
    return seen


async def test_cache_idempotency_and_rate_limit_events(fake, gateway):
    client, _ = await gateway(config(fake.url))
    seen = recorder(client)
    await client.post("/v1/chat/completions", json=CHAT, headers=KEY)  # miss
    await client.post("/v1/chat/completions", json=CHAT, headers=KEY)  # hit
    fake.plan(Fault(delay_ms=200))
    keyed = {**KEY, "Idempotency-Key": "k1", "Cache-Control": "no-store"}
    body = {**CHAT, "temperature": 0}
    await asyncio.gather(*(client.post("/v1/chat/completions", json=body, headers=keyed) for _ in range(2)))
    await client.post("/v1/chat/completions", json=body, headers=keyed)  # replay
    # a hit, a coalesced follower and a replay use no quota: two of the burst of 6 are spent, four are left
    fresh = {**KEY, "Cache-Control": "no-store"}
    refused = [await client.post("/v1/chat/completions", json=CHAT, headers=fresh) for _ in range(5)]
    assert [r.status for r in refused] == [200, 200, 200, 200, 429]
    kinds = [type(e) for e in seen]
    assert kinds.count(CacheMiss) == 1 and kinds.count(CacheHit) == 1
    assert [e.policy for e in seen if isinstance(e, Coalesced)] == ["idempotency"]
    assert kinds.count(IdempotentReplay) == 1
    limited = [e for e in seen if isinstance(e, RateLimitRefused)]
    assert limited and all(e.tenant == "acme" and e.limit == "default" and e.target == "up" for e in limited)


class DownStore(MemoryStore):
    async def claim(self, *args, **kwargs):
        raise StoreError("redis claim failed: ConnectionError: refused")

    async def claim_first(self, *args, **kwargs):  # (a miss's claims and quota, in one call)
        raise StoreError("redis claim failed: ConnectionError: refused")


async def test_a_degraded_store_is_announced(fake, gateway):
    client, _ = await gateway(config(fake.url), store=DownStore())
    seen = recorder(client)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=KEY)
    assert resp.status == 200 and resp.headers["X-Cache"] == "BYPASS"
    (event,) = [e for e in seen if isinstance(e, StoreDegraded)]
    assert event.policy == "cache" and event.target == "up" and "refused" in event.error
