"""Circuit state shared between gateway instances (SPEC §1 "any number of instances act as one").

Two gateways on one store — the in-process store shared by two apps, and a real Redis with
one client per gateway — agree on an open circuit and on its closing; an instance started
while the circuit is open sees it; the fleet sends ``half_open_max_calls`` probes in all;
and a store that is down costs only the sharing, never a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.circuits import (
    COOLDOWN,
    assert_circuit_open_openai,
    chat,
    config,
    eventually,
    moves,
    open_circuit,
    state,
    watch,
)
from tests.support.fakes import Fault
from tests.support.stores import drop, new_prefix, redis_store

# =============================================================== shared between instances


async def test_two_gateways_on_one_memory_store_share_an_open_circuit(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    a, _ = await gateway(config(fake.url), clock=clock, store=store)
    b, _ = await gateway(config(fake.url), clock=clock, store=store)
    seen_b = watch(b)
    await open_circuit(a, fake)
    assert state(a) == "open"

    assert await eventually(lambda: state(b) == "open"), "B never heard that A opened the circuit"
    assert moves(seen_b) == [("closed", "open")]
    status, headers, data = await chat(b)
    assert_circuit_open_openai(status, headers, data)
    assert len(fake.requests) == 2  # B refused without calling the upstream

    clock.advance(COOLDOWN + 1)
    status, _, _ = await chat(a)  # A's probe closes it …
    assert status == 200 and state(a) == "closed" and len(fake.requests) == 3
    assert await eventually(lambda: state(b) == "closed"), "B never heard that A closed the circuit"
    assert moves(seen_b)[-1] == ("open", "closed")
    status, _, _ = await chat(b)  # … for B too
    assert status == 200 and len(fake.requests) == 4


async def test_a_gateway_started_after_the_circuit_opened_sees_it_open(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    a, _ = await gateway(config(fake.url), clock=clock, store=store)
    await open_circuit(a, fake)
    clock.advance(10)

    c, _ = await gateway(config(fake.url), clock=clock, store=store)
    assert await eventually(lambda: state(c) == "open"), "a new instance did not read the open circuit at start"
    status, headers, data = await chat(c)
    assert_circuit_open_openai(status, headers, data, retry_after=(COOLDOWN - 11, COOLDOWN - 10))  # A's cooldown, not a new one
    assert len(fake.requests) == 2

    clock.advance(COOLDOWN - 10 + 1)
    status, _, _ = await chat(c)  # and it ends when A's cooldown ends
    assert status == 200 and len(fake.requests) == 3


async def test_two_gateways_on_redis_share_an_open_circuit(fake, gateway, clock):
    prefix = new_prefix()
    clients = []

    async def instance():
        """Another gateway instance: its own RedisStore (connection) on the same Redis and prefix."""
        client, _ = await gateway(config(fake.url), clock=clock, store=await redis_store(prefix))
        clients.append(client)
        return client

    try:
        a, b = await instance(), await instance()
        seen_b = watch(b)
        await open_circuit(a, fake)
        assert state(a) == "open"

        assert await eventually(lambda: state(b) == "open"), "B never heard through Redis that A opened the circuit"
        assert moves(seen_b) == [("closed", "open")]
        status, headers, data = await chat(b)
        assert_circuit_open_openai(status, headers, data)
        assert len(fake.requests) == 2

        clock.advance(COOLDOWN + 1)
        status, _, _ = await chat(a)
        assert status == 200 and state(a) == "closed" and len(fake.requests) == 3
        assert await eventually(lambda: state(b) == "closed"), "B never heard through Redis that A closed it"
        status, _, _ = await chat(b)
        assert status == 200 and len(fake.requests) == 4

        # B opens it this time, and an instance started while it is open reads it from Redis
        fake.plan(Fault(status=503), Fault(status=503))
        for _ in range(2):
            assert (await chat(b))[0] == 503
        assert state(b) == "open"
        assert await eventually(lambda: state(a) == "open")
        c = await instance()
        assert await eventually(lambda: state(c) == "open"), "a new instance did not read the open circuit from Redis"
        assert (await chat(c))[0] == 503 and (await chat(a))[0] == 503
        assert len(fake.requests) == 6
    finally:
        for client in clients:
            await client.close()  # each gateway closes its own store
        await drop(await redis_store(prefix))


async def test_half_open_probes_are_limited_fleet_wide(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    a, _ = await gateway(config(fake.url), clock=clock, store=store)
    b, _ = await gateway(config(fake.url), clock=clock, store=store)
    await open_circuit(a, fake)
    assert await eventually(lambda: state(b) == "open")

    clock.advance(COOLDOWN + 1)  # both instances are past the cooldown
    fake.plan(Fault(delay_ms=300))
    results = await asyncio.gather(chat(a), chat(b))
    assert sorted(r[0] for r in results) == [200, 503]
    refused = next(r for r in results if r[0] == 503)
    assert refused[2]["error"]["code"] == "circuit_open"
    assert len(fake.requests) == 3  # one probe for the fleet, not one per instance
    assert await eventually(lambda: state(a) == "closed" and state(b) == "closed")


class DownStore(MemoryStore):
    """A store whose every call fails, as a dead Redis would."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def _down(self) -> StoreError:
        self.calls += 1
        return StoreError("store is down")

    async def get(self, key):
        raise self._down()

    async def set(self, key, value, ttl_s=None):
        raise self._down()

    async def set_nx(self, key, value, ttl_s):
        raise self._down()

    async def delete(self, key):
        raise self._down()

    async def incr(self, key, amount=1, ttl_s=None):
        raise self._down()

    async def publish(self, channel, message):
        raise self._down()

    async def ping(self):
        raise self._down()

    @asynccontextmanager
    async def subscribe(self, channel) -> AsyncIterator:
        raise self._down()
        yield


@pytest.mark.parametrize("backend", ["failing-memory", "dead-redis"])
async def test_a_store_that_is_down_never_fails_a_request_and_the_circuit_still_works(fake, gateway, clock, backend):
    if backend == "failing-memory":
        store = DownStore(clock=clock.time)
    else:
        store = RedisStore("redis://127.0.0.1:1/0", key_prefix=new_prefix())
    client, logs = await gateway(config(fake.url), clock=clock, store=store)
    seen = watch(client)
    assert (await chat(client))[0] == 200
    await open_circuit(client, fake)
    assert moves(seen) == [("closed", "open")]
    status, headers, data = await chat(client)
    assert_circuit_open_openai(status, headers, data)  # its own circuit, not a store error
    assert len(fake.requests) == 3

    clock.advance(COOLDOWN + 1)
    fake.plan(Fault(status=503, error_message="probe failed upstream"))
    status, _, data = await chat(client)  # the probe (its slot cannot be counted in the store: probed locally)
    assert status == 503 and data["error"]["message"] == "probe failed upstream" and len(fake.requests) == 4
    assert moves(seen)[-2:] == [("open", "half_open"), ("half_open", "open")]
    status, _, data = await chat(client)
    assert status == 503 and data["error"]["code"] == "circuit_open" and len(fake.requests) == 4

    clock.advance(COOLDOWN + 1)
    status, _, _ = await chat(client)
    assert status == 200 and state(client) == "closed" and len(fake.requests) == 5
    assert (await chat(client))[0] == 200
    assert all(line["error_code"] != "store_unavailable" for line in logs)
    if isinstance(store, DownStore):
        assert store.calls > 0  # the store was asked, and failed
