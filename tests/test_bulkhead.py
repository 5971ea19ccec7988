"""Bulkhead (SPEC §5 "Bulkhead", TC30): at most ``max_concurrency`` requests in flight per target.

The next one gets 503 ``overloaded`` at once, in the client's dialect, and never reaches
the upstream. A slot is held for the whole request — every retry, and a stream until it
ends — and given back however the request ends. Overflow is the gateway's own refusal:
never a circuit failure, and a fallback target may take the request.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.keys import RUNTIME
from gateway.observe.events import BulkheadRejected, CircuitTransition, FallbackUsed
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault
from tests.support.gateway import until

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def config(url: str, *, limit: int = 2, timeout_ms: int = 2000, **up_fields: object) -> GatewayConfig:
    """``up``, ``claude`` and ``rest``, each at most ``limit`` requests in flight; ``up_fields``: more for ``up``."""
    cfg = GatewayConfig(url, default_target="up").up(timeout_ms=timeout_ms, **up_fields).claude().rest()
    return cfg.each(max_concurrency=limit)


@pytest.fixture
def start(fake, gateway, clock):
    async def make(**options):
        return await gateway(config(fake.url, **options), clock=clock)

    return make


def recorded(client) -> list:
    events: list = []
    client.app[RUNTIME].current.events.subscribe(events.append)
    return events


async def ask(client, body: dict = CHAT):
    return await client.post("/v1/chat/completions", json=body)


# One request per client dialect: (send, check the body of a 503 overloaded)
def _openai(client):
    return client.post("/v1/chat/completions", json=CHAT)


def _anthropic(client):
    return client.post("/v1/messages", json={"model": "claude-test-1", "max_tokens": 10,
                                             "messages": [{"role": "user", "content": "hi"}]})


def _envelope(client):
    return client.get("/t/rest/slow")


def _openai_overloaded(body: dict) -> None:
    assert body["error"]["code"] == "overloaded" and body["error"]["param"] is None
    assert "max_concurrency" in body["error"]["message"]


def _anthropic_overloaded(body: dict) -> None:
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "max_concurrency" in body["error"]["message"]


def _envelope_overloaded(body: dict) -> None:
    assert body["success"] is False
    assert body["error"]["code"] == "overloaded" and body["error"]["retryable"] is True
    assert body["error"]["target"] == "rest" and body["error"]["status_code"] == 503


DIALECTS = {
    "openai": (_openai, _openai_overloaded, "up"),
    "anthropic": (_anthropic, _anthropic_overloaded, "claude"),
    "envelope": (_envelope, _envelope_overloaded, "rest"),
}


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_third_concurrent_request_gets_503_overloaded_at_once(fake, start, dialect):
    send, check, target = DIALECTS[dialect]
    client, logs = await start(limit=2)
    events = recorded(client)
    fake.script = lambda n, seen: Fault(delay_ms=500)
    first = asyncio.ensure_future(send(client))
    second = asyncio.ensure_future(send(client))
    await until(lambda: len(fake.requests) == 2)

    third = await send(client)
    assert third.status == 503
    assert not first.done() and not second.done()  # refused while the two were still running, not queued
    check(await third.json())
    assert int(third.headers["Retry-After"]) >= 1
    assert third.headers["X-Request-Id"] and third.headers["X-ReliAPI-Target"] == target
    assert [e for e in events if isinstance(e, BulkheadRejected)] == [BulkheadRejected(target=target, limit=2)]
    assert logs[-1]["status"] == 503 and logs[-1]["error_code"] == "overloaded"

    assert [(await first).status, (await second).status] == [200, 200]
    assert len(fake.requests) == 2  # the refused request never reached the upstream

    # the refusal took no slot: two at once get through again
    again = await asyncio.gather(send(client), send(client))
    assert [r.status for r in again] == [200, 200]


async def test_a_stream_holds_its_slot_until_it_ends(fake, start):
    client, logs = await start(limit=1)
    fake.plan(Fault(chunks=4, interval_ms=150))
    stream = await ask(client, STREAM)
    assert stream.status == 200
    refused = await ask(client)
    assert refused.status == 503 and (await refused.json())["error"]["code"] == "overloaded"

    body = await stream.read()
    assert body.endswith(b"data: [DONE]\n\n")
    await until(lambda: any(line["stream"] for line in logs))  # the stream's request is over
    assert logs[-1]["outcome"] == "ok"
    assert (await ask(client)).status == 200
    assert len(fake.requests) == 2


async def test_a_client_that_disconnects_mid_stream_frees_its_slot(fake, start):
    client, logs = await start(limit=1)
    fake.plan(Fault(chunks=200, interval_ms=50))
    stream = await ask(client, STREAM)
    assert stream.status == 200
    assert await stream.content.readany()
    assert (await ask(client)).status == 503

    stream.close()
    await asyncio.wait_for(fake.client_gone.wait(), timeout=5)
    await until(lambda: any(line["stream"] for line in logs))
    assert (await ask(client)).status == 200
    assert fake.streams_finished == 0


async def test_overflow_is_not_a_circuit_failure(fake, start):
    client, _ = await start(limit=1, circuit={"error_threshold": 1, "cooldown_s": 60})
    events = recorded(client)
    fake.plan(Fault(delay_ms=500))
    slow = asyncio.ensure_future(ask(client))
    await until(lambda: len(fake.requests) == 1)
    for _ in range(3):
        assert (await ask(client)).status == 503
    assert (await slow).status == 200

    assert client.app[RUNTIME].current.circuits["up"].breaker.state == "closed"
    assert not [e for e in events if isinstance(e, CircuitTransition)]
    assert len([e for e in events if isinstance(e, BulkheadRejected)]) == 3
    resp = await ask(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Target"] == "up"
    assert len(fake.requests) == 2


async def test_overflow_goes_to_the_fallback_target(fake, upstreams, gateway, clock):
    backup = await upstreams()
    cfg = config(fake.url, limit=1, fallback_targets=[{"target": "backup", "model": "gpt-backup"}])
    client, logs = await gateway(cfg.target("backup", f"{backup.url}/v1", provider="openai", timeout_ms=2000),
                                 clock=clock)
    events = recorded(client)
    fake.plan(Fault(delay_ms=500))
    slow = asyncio.ensure_future(ask(client))
    await until(lambda: len(fake.requests) == 1)

    resp = await ask(client)
    assert resp.status == 200
    assert resp.headers["X-ReliAPI-Fallback"] == "backup" and resp.headers["X-ReliAPI-Target"] == "backup"
    assert (await resp.json())["model"] == "gpt-backup"
    assert len(backup.requests) == 1 and backup.requests[0].json()["model"] == "gpt-backup"
    assert [(e.target, e.to_target, e.reason) for e in events if isinstance(e, FallbackUsed)] == [
        ("up", "backup", "overloaded")]
    assert logs[-1]["fallback_target"] == "backup"

    first = await slow
    assert first.status == 200 and "X-ReliAPI-Fallback" not in first.headers
    assert len(fake.requests) == 1


async def test_slots_are_released_after_errors_timeouts_and_retries(fake, start, clock):
    client, _ = await start(limit=2, timeout_ms=300)
    fake.plan(
        Fault(status=503), Fault(status=503), Fault(status=503),  # retried twice, then the 503 passes
        Fault(status=500),  # retried once, then healthy
        Fault(),
        Fault(hang=True),  # times out (no retries for timeouts)
        Fault(reset=True), Fault(reset=True), Fault(reset=True),  # connection reset on every attempt
        Fault(status=400),  # passed through, never retried
        Fault(chunks=10, cut_after=3),  # a stream cut mid-way
        Fault(status=429, headers={"Retry-After": "1"}), Fault(),  # waited for, then healthy
    )
    assert (await ask(client)).status == 503
    assert (await ask(client)).status == 200
    assert (await ask(client)).status == 504
    assert (await ask(client)).status == 502
    assert (await ask(client)).status == 400
    cut = await ask(client, STREAM)
    assert b"stream_interrupted" in await cut.read()
    assert (await ask(client)).status == 200
    assert len(fake.requests) == 13 and clock.sleeps  # the retries did happen

    # exactly two slots, as before: two long streams get through, a third request is still refused
    # (streams: the 300 ms answer timeout bounds the first byte of a plain answer, not a stream's length)
    fake.script = lambda n, seen: Fault(chunks=3, interval_ms=200)
    both = await asyncio.gather(ask(client, STREAM), ask(client, STREAM))
    assert [r.status for r in both] == [200, 200]
    assert (await ask(client)).status == 503
    for r in both:
        assert (await r.read()).endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 15
