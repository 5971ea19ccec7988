"""What one request costs in store round trips on Redis (issue #17 point 5), counted by Redis itself.

A ``MONITOR`` connection sees every command the gateway sends under the test's key prefix (the commands a
script runs inside are marked ``lua`` and are not round trips). The stateful pipeline — a tenant with a rate
limit, idempotency, cache — costs: a cache HIT one round trip (the rate limit runs inside the cache, so a hit
takes no quota); a MISS with a new idempotency key two — ONE script for the idempotency claim, the cache claim
and the quota (``gateway.state.ahead``), and ONE for both answer writes (the cache entry and the idempotency
result, each fenced on its own lock, with their notifications); a miss without a key two (the cache claim and
the quota, then its answer); the idempotent replay one. ``bench/roundtrips.py`` prints the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from tests.support.config import NO_AUTH, GatewayConfig
from tests.support.gateway import settle
from tests.support.stores import REDIS_URL, drop, new_prefix, redis_store

TENANT = {"Authorization": "Bearer acme-key-123456"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


class Monitor:
    """Redis ``MONITOR``: the top-level commands naming ``prefix``, each as (command, kinds of key it names)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seen: list[tuple[str, frozenset[str]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitor:
        parts = urlsplit(REDIS_URL)
        reader, self._writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
        self._writer.write(b"MONITOR\r\n")
        assert (await reader.readline()).startswith(b"+OK")
        self._task = asyncio.ensure_future(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        mark = f'"{self.prefix}:'
        while line := (await reader.readline()).decode(errors="replace"):
            if mark in line and " lua]" not in line:
                words = line.split("] ", 1)[1].strip().split('" "')
                kinds = {w.strip('"')[len(self.prefix) + 1:].split(":", 1)[0] for w in words[1:] if w.startswith(mark[1:])}
                self.seen.append((words[0].strip('"'), frozenset(kinds)))

    async def take(self) -> list[tuple[str, frozenset[str]]]:
        """What came since the last take, after a moment for Redis to echo the last of it."""
        await asyncio.sleep(0.2)
        out, self.seen = self.seen, []
        return [(cmd, kinds) for cmd, kinds in out if "usage" not in kinds]  # usage rows: batched, in the background

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()


async def test_a_hit_costs_one_round_trip_and_a_miss_writes_its_answers_in_one_script(fake, gateway):
    prefix = new_prefix()
    store = await redis_store(prefix)
    cfg = GatewayConfig(fake.url, default_target="up").store(key_prefix=prefix)
    cfg.tenant("acme", api_key="acme-key-123456", rate_limit={"rpm": 6000, "burst": 100})
    cfg.up(auth=NO_AUTH, cache={"ttl_s": 60})
    client, _ = await gateway(cfg, store=store)
    try:
        # warm-up: the scripts are loaded (a first EVALSHA may be answered NOSCRIPT and sent again as EVAL)
        assert (await client.post("/v1/chat/completions", json={**CHAT, "user": "warm"},
                                  headers={**TENANT, "Idempotency-Key": "warm"})).status == 200
        await settle(client)
        async with Monitor(prefix) as monitor:
            await monitor.take()

            miss = await client.post("/v1/chat/completions", json=CHAT, headers={**TENANT, "Idempotency-Key": "k1"})
            assert miss.status == 200 and miss.headers["X-Cache"] == "MISS"
            await settle(client)
            sent = await monitor.take()
            assert sent == [("EVALSHA", {"idem", "cache", "rl"}),  # claim, claim, quota: one script
                            ("EVALSHA", {"idem", "cache"})], sent  # both answers and their notifications: one script

            hit = await client.post("/v1/chat/completions", json=CHAT, headers=TENANT)
            assert hit.headers["X-Cache"] == "HIT"
            # one script, nothing written: the claim found the entry, so the quota it names was not taken
            assert await monitor.take() == [("EVALSHA", {"cache", "rl"})]

            replay = await client.post("/v1/chat/completions", json=CHAT, headers={**TENANT, "Idempotency-Key": "k1"})
            assert replay.headers["Idempotent-Replayed"] == "true"
            await settle(client)
            assert await monitor.take() == [("EVALSHA", {"idem", "cache", "rl"})]  # found stored: nothing else tried

            other = await client.post("/v1/chat/completions", json={**CHAT, "user": "other"}, headers=TENANT)
            assert other.headers["X-Cache"] == "MISS"
            await settle(client)
            assert await monitor.take() == [("EVALSHA", {"cache", "rl"}), ("EVALSHA", {"cache"})]
        assert len(fake.requests) == 3  # the warm-up and the two misses
    finally:
        await client.close()
        await drop(await redis_store(prefix))
