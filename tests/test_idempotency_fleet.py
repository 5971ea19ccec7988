"""Idempotency across gateways sharing one store (two apps on one MemoryStore, or two Redis clients under one
prefix, as two processes would be), and the moment between a failed flight and its key's release."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.state.flights import Lead
from gateway.store.memory import MemoryStore
from tests.support.fakes import Fault
from tests.support.idempotency import REPLAYED, STREAM, call, config, model_of, numbered, openai_error, post, until
from tests.support.stores import drop, new_prefix, redis_store


@pytest.fixture(params=["memory", "redis"])
async def pair(request, fake, gateway, clock) -> AsyncIterator[Callable[..., Any]]:
    """``await pair(idem=...)`` → two gateway instances on one store: one MemoryStore shared by
    two apps, or two RedisStore clients under one prefix (as two processes would be)."""
    prefix = new_prefix()
    clients: list[Any] = []

    async def make(idem: dict | None = None) -> tuple[Any, Any]:
        cfg = config(fake.url, idem=idem)
        shared = MemoryStore()
        for _ in range(2):
            store = shared if request.param == "memory" else await redis_store(prefix)
            client, _ = await gateway(cfg, clock=clock, store=store)
            clients.append(client)
        return clients[0], clients[1]

    try:
        yield make
    finally:
        if request.param == "redis" and clients:
            for client in clients:
                await client.close()  # each gateway closes its own store
            await drop(await redis_store(prefix))


async def test_ten_duplicates_across_two_gateways_make_one_upstream_call(fake, pair):
    a, b = await pair()
    numbered(fake, delay_ms=300)
    answers = await asyncio.gather(*[call(a if i % 2 else b, key="k-fleet") for i in range(10)])
    assert [status for status, _, _ in answers] == [200] * 10
    assert len({body for _, _, body in answers}) == 1
    assert model_of(answers[0][2]) == "gpt-answer-1"
    assert len(fake.requests) == 1
    assert sum(REPLAYED in headers for _, headers, _ in answers) == 9


async def test_a_stream_is_shared_with_a_follower_on_the_other_gateway(fake, pair):
    a, b = await pair()
    fake.plan(Fault(chunks=5, interval_ms=80))
    leader = await post(a, STREAM, key="k-fan")
    assert leader.status == 200
    follower = await post(b, STREAM, key="k-fan")
    assert follower.status == 200 and follower.headers["Content-Type"].startswith("text/event-stream")
    first = await follower.content.readuntil(b"\n\n")
    assert fake.streams_finished == 0  # served from the other instance while it still runs

    raw = await leader.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert first + await follower.read() == raw
    replay = await post(b, STREAM, key="k-fan")
    assert await replay.read() == raw and replay.headers[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_a_failing_run_is_shared_across_gateways_and_then_released(fake, pair):
    a, b = await pair()
    fake.plan(Fault(status=503, delay_ms=300))
    numbered(fake)
    leader = asyncio.ensure_future(call(a, key="k-fleet-fail"))
    await until(lambda: len(fake.requests) == 1)
    status_b, _, body_b = await call(b, key="k-fleet-fail")
    status_a, _, body_a = await leader
    assert status_a == status_b == 503 and body_b == body_a
    assert len(fake.requests) == 1

    status, headers, body = await call(b, key="k-fleet-fail")
    assert status == 200 and REPLAYED not in headers and model_of(body) == "gpt-answer-2"
    assert len(fake.requests) == 2


async def test_a_duplicate_on_the_other_gateway_gets_409_after_wait_s(fake, pair):
    a, b = await pair(idem={"wait_s": 0.2})
    fake.plan(Fault(delay_ms=600))
    leader = asyncio.ensure_future(call(a, key="k-fleet-slow"))
    await until(lambda: len(fake.requests) == 1)
    status, headers, body = await call(b, key="k-fleet-slow")
    assert status == 409 and headers["Retry-After"] == "1"
    assert openai_error(body)["code"] == "idempotency_in_progress"
    status_a, _, body_a = await leader
    assert status_a == 200
    status, headers, again = await call(b, key="k-fleet-slow")
    assert status == 200 and again == body_a and headers[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_a_cut_stream_is_shared_across_gateways_and_then_released(fake, pair):
    a, b = await pair()
    fake.plan(Fault(chunks=6, cut_after=3, interval_ms=80))
    leader = await post(a, STREAM, key="k-fleet-cut")
    follower = await post(b, STREAM, key="k-fleet-cut")
    raw_leader = await leader.read()
    raw_follower = await follower.read()
    assert b"stream_interrupted" in raw_leader and b"stream_interrupted" in raw_follower
    assert not raw_follower.endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 1

    again = await post(b, STREAM, key="k-fleet-cut")
    raw = await again.read()
    assert again.status == 200 and REPLAYED not in again.headers and raw.endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 2


async def test_a_retry_that_comes_while_a_failed_flight_is_being_released_runs_anew(fake, pair, monkeypatch):
    """The window between a leader's failure reaching the log and its key's release: a retry that joins then
    (it saw nothing of the flight) must not be handed the old failure — it waits for the release and runs."""
    released = asyncio.Event()
    release = Lead._release

    async def slow_release(self):
        await released.wait()  # held until the retry below has joined the failed flight
        await release(self)

    monkeypatch.setattr(Lead, "_release", slow_release)
    a, b = await pair()
    fake.plan(Fault(chunks=6, cut_after=3, interval_ms=20))
    leader = await post(a, STREAM, key="k-late-retry")
    assert b"stream_interrupted" in await leader.read()
    retry = asyncio.ensure_future(post(b, STREAM, key="k-late-retry"))
    await asyncio.sleep(0.2)  # it found the key still held, its log ending in the failure
    assert not retry.done()
    released.set()
    again = await retry
    raw = await again.read()
    assert again.status == 200 and REPLAYED not in again.headers and raw.endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 2


async def test_a_retry_on_the_same_gateway_while_a_failed_flight_is_being_released_runs_anew(
        fake, gateway, monkeypatch):
    released = asyncio.Event()
    release = Lead._release

    async def slow_release(self):
        await released.wait()
        await release(self)

    monkeypatch.setattr(Lead, "_release", slow_release)
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=6, cut_after=3, interval_ms=20))
    leader = await post(client, STREAM, key="k-late-local")
    assert b"stream_interrupted" in await leader.read()
    retry = asyncio.ensure_future(post(client, STREAM, key="k-late-local"))
    await asyncio.sleep(0.2)  # it found the flight still running here, its recording ended in the failure
    assert not retry.done()
    released.set()
    again = await retry
    raw = await again.read()
    assert again.status == 200 and REPLAYED not in again.headers and raw.endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 2
