"""The circuit breaker (SPEC §5 "Circuit breaker", RELIABILITY-NOTES §3, TC26–TC29).

First the ``Breaker`` state machine on its own (a fake clock, a list of transitions), then
through a real gateway in front of a fake upstream: what a client sees while a target is
failing, open, probed and back; what counts as a failure and what never does; events and
the gateway's own log; the fallback taking an open target's traffic. Last, the state shared
between instances: two gateways on one store (in-process and a real Redis) agree on an open
circuit, a new instance sees it at start, the fleet sends one probe, and a store that is
down costs only the sharing.

Every cooldown runs on a ``FakeClock`` (``advance``), so nothing waits for it; the only
real waits are short socket timeouts and the bounded polls for another instance to hear
an announcement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.config import CircuitConfig
from gateway.errors import CircuitOpen
from gateway.events import CircuitTransition, FallbackUsed
from gateway.keys import RUNTIME
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from policies.circuit_breaker import Breaker
from tests.clock import FakeClock
from tests.fakes import Fault
from tests.stores import drop, new_prefix, redis_store

CHAT = [{"role": "user", "content": "hi"}]
OPENAI_BODY = {"model": "gpt-4o-mini", "messages": CHAT}
COOLDOWN = 30

# No retries anywhere, so one client request is one upstream attempt and counts are simple.
NO_RETRY = '{"429": {attempts: 0}, "5xx": {attempts: 0}, "net": {attempts: 0}, "timeout": {attempts: 0}}'


def config(up: str, *, circuit: str = f"{{error_threshold: 2, cooldown_s: {COOLDOWN}}}", up_extra: str = "",
           backup: str | None = None, timeout_ms: int = 2000) -> str:
    """Target ``up`` (OpenAI) and ``claude`` (Anthropic) at the fake, with the circuit under test;
    optionally a fallback ``backup`` on a second fake."""
    chain = "    fallback_targets: [backup]\n" if backup else ""
    backup_target = f"""
  backup:
    base_url: {backup}/v1
    provider: openai
    retry_matrix: {NO_RETRY}
""" if backup else ""
    return f"""
server: {{default_target: up}}
targets:
  up:
    base_url: {up}/v1
    provider: openai
    models: ["gpt-*"]
    timeout_ms: {timeout_ms}
    retry_matrix: {NO_RETRY}
    circuit: {circuit}
{chain}{up_extra}
  claude:
    base_url: {up}
    provider: anthropic
    models: ["claude-*"]
    retry_matrix: {NO_RETRY}
    circuit: {circuit}
{backup_target}"""


async def chat(client, path: str = "/v1/chat/completions", body: dict | None = None, **kwargs):
    """POST a chat request; returns (status, headers, decoded JSON body or None)."""
    resp = await client.post(path, json=body or OPENAI_BODY, **kwargs)
    raw = await resp.read()
    try:
        data = await resp.json(content_type=None) if raw else None
    except ValueError:
        data = None
    return resp.status, resp.headers, data


def watch(client) -> list[CircuitTransition]:
    """Every circuit transition the gateway emits from now on."""
    seen: list[CircuitTransition] = []
    client.app[RUNTIME].current.events.subscribe(lambda e: seen.append(e) if isinstance(e, CircuitTransition) else None)
    return seen


def moves(transitions: list[CircuitTransition], target: str = "up") -> list[tuple[str, str]]:
    return [(t.from_state, t.to_state) for t in transitions if t.target == target]


def state(client, target: str = "up") -> str:
    return client.app[RUNTIME].current.circuits[target].breaker.state


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` (real time) passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def assert_circuit_open_openai(status, headers, data, *, retry_after: tuple[int, int] = (COOLDOWN - 1, COOLDOWN)):
    assert status == 503
    assert data["error"]["code"] == "circuit_open"
    assert retry_after[0] <= int(headers["Retry-After"]) <= retry_after[1]
    assert headers["X-Request-Id"]


# =============================================================== the state machine alone


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, was: str, to: str, reason: str) -> None:
        self.calls.append((was, to, reason))

    @property
    def moves(self) -> list[tuple[str, str]]:
        return [(was, to) for was, to, _ in self.calls]


def make_breaker(threshold: int = 3, cooldown_s: float = 30, half_open: int = 1) -> tuple[Breaker, FakeClock, Recorder]:
    clock, rec = FakeClock(), Recorder()
    cfg = CircuitConfig(error_threshold=threshold, cooldown_s=cooldown_s, half_open_max_calls=half_open)
    return Breaker("t", cfg, clock, rec), clock, rec


def fail_n(breaker: Breaker, n: int) -> None:
    for _ in range(n):
        assert breaker.allow() is False  # closed: not a probe
        breaker.record(False, False)


def test_opens_after_exactly_threshold_consecutive_failures():
    breaker, _, rec = make_breaker(threshold=3)
    fail_n(breaker, 2)
    assert breaker.state == "closed" and rec.calls == []
    assert breaker.allow() is False  # still lets attempts through
    breaker.record(False, False)
    assert breaker.state == "open"
    assert rec.moves == [("closed", "open")]
    with pytest.raises(CircuitOpen):
        breaker.allow()


def test_a_success_in_between_resets_the_count():
    breaker, _, rec = make_breaker(threshold=3)
    fail_n(breaker, 2)
    breaker.allow()
    breaker.record(True, False)
    fail_n(breaker, 2)
    assert breaker.state == "closed" and rec.calls == []  # 2 + 2 failures, never 3 in a row
    fail_n(breaker, 1)
    assert breaker.state == "open" and rec.moves == [("closed", "open")]


def test_open_refuses_with_the_time_left_as_retry_after():
    breaker, clock, _ = make_breaker(threshold=1, cooldown_s=30)
    fail_n(breaker, 1)
    with pytest.raises(CircuitOpen) as info:
        breaker.allow()
    assert info.value.retry_after == pytest.approx(30, abs=0.5)
    assert info.value.status == 503 and info.value.code == "circuit_open" and info.value.target == "t"
    assert not info.value.trips_breaker  # its own refusal is never an upstream failure
    clock.advance(10)
    with pytest.raises(CircuitOpen) as info:
        breaker.allow()
    assert info.value.retry_after == pytest.approx(20, abs=0.5)
    assert breaker.retry_after_s() == pytest.approx(20, abs=0.5)
    clock.advance(19)
    with pytest.raises(CircuitOpen) as info:
        breaker.allow()
    assert 0 < info.value.retry_after <= 1.5
    assert breaker.state == "open"


def test_after_the_cooldown_one_probe_goes_through_half_open():
    breaker, clock, rec = make_breaker(threshold=1, cooldown_s=30)
    fail_n(breaker, 1)
    clock.advance(30)
    assert breaker.allow() is True  # a probe
    assert breaker.state == "half_open"
    assert rec.moves == [("closed", "open"), ("open", "half_open")]
    with pytest.raises(CircuitOpen) as info:  # a concurrent second attempt: refused
        breaker.allow()
    assert info.value.retry_after is not None and info.value.retry_after > 0
    assert breaker.state == "half_open" and len(rec.calls) == 2


def test_half_open_admits_half_open_max_calls_probes():
    breaker, clock, _ = make_breaker(threshold=1, cooldown_s=5, half_open=2)
    fail_n(breaker, 1)
    clock.advance(5)
    assert breaker.allow() is True and breaker.allow() is True
    with pytest.raises(CircuitOpen):
        breaker.allow()


def test_probe_success_closes_and_counting_starts_afresh():
    breaker, clock, rec = make_breaker(threshold=2, cooldown_s=30)
    fail_n(breaker, 2)
    clock.advance(30)
    assert breaker.allow() is True
    breaker.record(True, True)
    assert breaker.state == "closed"
    assert rec.moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert breaker.allow() is False  # traffic flows, no probe bookkeeping
    breaker.record(False, False)
    assert breaker.state == "closed"  # one failure after closing is not two
    fail_n(breaker, 1)
    assert breaker.state == "open"


def test_probe_failure_reopens_with_a_fresh_cooldown():
    breaker, clock, rec = make_breaker(threshold=1, cooldown_s=30)
    fail_n(breaker, 1)
    clock.advance(30)
    assert breaker.allow() is True
    clock.advance(5)  # the probe takes a while
    breaker.record(False, True)
    assert breaker.state == "open"
    assert rec.moves == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]
    with pytest.raises(CircuitOpen) as info:
        breaker.allow()
    assert info.value.retry_after == pytest.approx(30, abs=0.5)  # counted from the failed probe
    clock.advance(29)
    with pytest.raises(CircuitOpen):
        breaker.allow()
    clock.advance(1.5)
    assert breaker.allow() is True
    assert breaker.state == "half_open"


def test_records_of_attempts_admitted_before_the_circuit_opened_are_ignored():
    breaker, clock, rec = make_breaker(threshold=2, cooldown_s=30)
    for _ in range(8):  # eight attempts in flight while closed
        assert breaker.allow() is False
    breaker.record(False, False)
    breaker.record(False, False)
    assert breaker.state == "open"
    reopen_at = breaker.reopen_at
    clock.advance(3)
    breaker.record(False, False)  # the other in-flight failures: stale, no fresh cooldown
    breaker.record(False, False)
    assert breaker.state == "open" and breaker.reopen_at == reopen_at
    with pytest.raises(CircuitOpen) as info:
        breaker.allow()
    assert info.value.retry_after == pytest.approx(27, abs=0.5)
    breaker.record(True, False)  # the fifth succeeded late: does not close it either
    assert breaker.state == "open"
    assert rec.moves == [("closed", "open")]

    # the same in half-open: only the probe's answer decides
    clock.advance(27.5)
    assert breaker.allow() is True  # the probe
    breaker.record(True, False)  # the last three of the early attempts end during the probe
    breaker.record(False, False)
    breaker.record(False, False)
    assert breaker.state == "half_open"
    breaker.record(True, True)
    assert breaker.state == "closed"
    assert rec.moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_release_frees_a_probe_slot_without_a_transition():
    breaker, clock, rec = make_breaker(threshold=1, cooldown_s=30)
    fail_n(breaker, 1)
    clock.advance(30)
    assert breaker.allow() is True
    with pytest.raises(CircuitOpen):
        breaker.allow()
    before = list(rec.calls)
    breaker.release(True)  # the probe ended without an answer (client gone, refused locally)
    assert breaker.state == "half_open" and rec.calls == before
    assert breaker.allow() is True  # the slot is free again
    breaker.release(False)  # a non-probe release changes nothing
    with pytest.raises(CircuitOpen):
        breaker.allow()
    assert rec.calls == before


def test_every_transition_is_reported_with_from_to_and_reason():
    breaker, clock, rec = make_breaker(threshold=2, cooldown_s=10)
    fail_n(breaker, 2)
    clock.advance(10)
    breaker.allow()
    breaker.record(False, True)
    clock.advance(10)
    breaker.allow()
    breaker.record(True, True)
    assert rec.moves == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open"), ("half_open", "closed"),
    ]
    for was, to, reason in rec.calls:
        assert isinstance(reason, str) and reason.strip(), (was, to, reason)
    assert "2" in rec.calls[0][2]  # names the failures that opened it
    # why it went half-open, why it reopened, why it closed: three different reasons
    assert len({rec.calls[i][2] for i in (1, 2, 4)}) == 3


# =============================================================== through the gateway


async def open_circuit(client, fake, path: str = "/v1/chat/completions", body: dict | None = None) -> None:
    """Two upstream 503s (threshold 2) — each passed through to the client as sent."""
    fake.plan(Fault(status=503), Fault(status=503))
    for _ in range(2):
        status, _, _ = await chat(client, path, body)
        assert status == 503
    assert not fake.planned


async def test_two_503s_open_it_and_the_next_request_is_refused_without_touching_the_upstream(fake, gateway, clock):
    client, logs = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    await open_circuit(client, fake)
    assert len(fake.requests) == 2
    assert moves(seen) == [("closed", "open")]

    status, headers, data = await chat(client)
    assert_circuit_open_openai(status, headers, data)
    assert data["error"]["type"] == "server_error"
    assert headers["X-ReliAPI-Target"] == "up"
    assert len(fake.requests) == 2  # not called
    assert logs[-1]["error_code"] == "circuit_open" and logs[-1]["target"] == "up"

    # the /t/ surface of the same target: the seed envelope
    resp = await client.post("/t/up/chat/completions", json=OPENAI_BODY)
    body = await resp.json()
    assert resp.status == 503 and COOLDOWN - 1 <= int(resp.headers["Retry-After"]) <= COOLDOWN
    assert body["success"] is False
    assert body["error"]["code"] == "circuit_open" and body["error"]["type"] == "upstream_error"
    assert body["error"]["retryable"] is True and body["error"]["target"] == "up"
    assert body["meta"]["request_id"] == resp.headers["X-Request-Id"]
    assert len(fake.requests) == 2

    # some time later: the Retry-After counts down
    clock.advance(20)
    status, headers, _ = await chat(client)
    assert status == 503 and 9 <= int(headers["Retry-After"]) <= 10
    assert len(fake.requests) == 2


async def test_anthropic_surface_gets_circuit_open_in_its_own_dialect(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    body = {"model": "claude-test-1", "max_tokens": 16, "messages": CHAT}
    await open_circuit(client, fake, "/v1/messages", body)
    assert state(client, "claude") == "open" and state(client, "up") == "closed"  # per target
    status, headers, data = await chat(client, "/v1/messages", body)
    assert status == 503 and COOLDOWN - 1 <= int(headers["Retry-After"]) <= COOLDOWN
    assert data["type"] == "error" and data["error"]["type"] == "overloaded_error"
    assert "claude" in data["error"]["message"]
    assert len(fake.requests) == 2
    status, _, _ = await chat(client)  # the other target is unaffected
    assert status == 200 and len(fake.requests) == 3


async def test_after_the_cooldown_one_probe_reaches_the_upstream_and_success_closes_it(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    await open_circuit(client, fake)
    clock.advance(COOLDOWN - 1)
    status, _, _ = await chat(client)
    assert status == 503 and len(fake.requests) == 2  # not yet

    clock.advance(1.5)
    status, headers, data = await chat(client)
    assert status == 200 and data["choices"][0]["message"]["content"] == "Hello from the fake."
    assert len(fake.requests) == 3  # the probe
    assert moves(seen) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert state(client) == "closed"
    for _ in range(3):  # traffic flows again
        status, _, _ = await chat(client)
        assert status == 200
    assert len(fake.requests) == 6


async def test_a_failed_probe_reopens_it_for_a_fresh_cooldown(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    await open_circuit(client, fake)
    clock.advance(COOLDOWN + 1)
    fake.plan(Fault(status=503, error_message="still down"))
    status, _, data = await chat(client)
    assert status == 503 and data["error"]["message"] == "still down"  # the probe's own answer
    assert len(fake.requests) == 3
    assert moves(seen) == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]

    status, headers, data = await chat(client)
    assert_circuit_open_openai(status, headers, data)  # a whole new cooldown, not what was left of the old
    assert len(fake.requests) == 3
    clock.advance(COOLDOWN - 2)
    status, _, _ = await chat(client)
    assert status == 503 and len(fake.requests) == 3
    clock.advance(3)
    status, _, _ = await chat(client)
    assert status == 200 and len(fake.requests) == 4


async def test_half_open_admits_only_half_open_max_calls_concurrent_probes(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    await open_circuit(client, fake)
    clock.advance(COOLDOWN + 1)
    fake.plan(Fault(delay_ms=300))  # the probe takes a while
    results = await asyncio.gather(chat(client), chat(client))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 503]
    _, headers, data = next(r for r in results if r[0] == 503)
    assert data["error"]["code"] == "circuit_open" and int(headers["Retry-After"]) >= 1
    assert len(fake.requests) == 3  # one probe reached the upstream
    assert state(client) == "closed"


async def test_two_probes_allowed_with_half_open_max_calls_2(fake, gateway, clock):
    client, _ = await gateway(
        config(fake.url, circuit=f"{{error_threshold: 2, cooldown_s: {COOLDOWN}, half_open_max_calls: 2}}"), clock=clock)
    await open_circuit(client, fake)
    clock.advance(COOLDOWN + 1)
    fake.plan(Fault(delay_ms=300), Fault(delay_ms=300))
    results = await asyncio.gather(chat(client), chat(client), chat(client))
    assert sorted(r[0] for r in results) == [200, 200, 503]
    assert len(fake.requests) == 4


async def test_4xx_and_429_never_open_it_even_many_in_a_row(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    # one real failure first: any 4xx/429 that counted would now open the circuit (threshold 2)
    fake.plan(Fault(status=503))
    fake.plan(*[Fault(status=429, headers={"Retry-After": "1"}) for _ in range(6)])
    fake.plan(*[Fault(status=400, error_code="invalid_value") for _ in range(6)])
    fake.plan(*[Fault(status=401, error_code="invalid_api_key") for _ in range(6)])
    fake.plan(Fault(status=404), Fault(status=422))
    expected = [503] + [429] * 6 + [400] * 6 + [401] * 6 + [404, 422]
    got = []
    for _ in expected:
        status, _, _ = await chat(client)
        got.append(status)
    assert got == expected  # each passed through as the upstream sent it, none refused by the gateway
    assert len(fake.requests) == len(expected)
    assert seen == [] and state(client) == "closed"
    status, _, _ = await chat(client)
    assert status == 200 and len(fake.requests) == len(expected) + 1


async def test_bulkhead_overflow_never_counts_as_a_failure(fake, gateway, clock):
    client, _ = await gateway(config(fake.url, up_extra="    max_concurrency: 1\n"), clock=clock)
    seen = watch(client)
    fake.plan(Fault(status=503, delay_ms=300))  # the one in flight: a real failure (count 1 of 2)
    slow = asyncio.ensure_future(chat(client))
    assert await eventually(lambda: len(fake.requests) == 1)
    overflow = await asyncio.gather(*(chat(client) for _ in range(3)))
    for status, _, data in overflow:
        assert status == 503 and data["error"]["code"] == "overloaded"
    status, _, _ = await slow
    assert status == 503
    assert len(fake.requests) == 1
    assert seen == [] and state(client) == "closed"
    status, _, _ = await chat(client)
    assert status == 200 and len(fake.requests) == 2


async def test_timeouts_count_as_failures(fake, gateway, clock):
    client, _ = await gateway(config(fake.url, timeout_ms=200), clock=clock)
    seen = watch(client)
    fake.plan(Fault(hang=True), Fault(hang=True))
    for _ in range(2):
        status, _, data = await chat(client)
        assert status == 504 and data["error"]["code"] == "upstream_timeout"
    assert moves(seen) == [("closed", "open")]
    status, headers, data = await chat(client)
    assert_circuit_open_openai(status, headers, data)
    assert len(fake.requests) == 2


async def test_connection_resets_count_as_failures(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    fake.plan(Fault(reset=True), Fault(reset=True))
    for _ in range(2):
        status, _, data = await chat(client)
        assert status == 502 and data["error"]["code"] == "upstream_unavailable"
    assert moves(seen) == [("closed", "open")]
    status, headers, data = await chat(client)
    assert_circuit_open_openai(status, headers, data)
    assert len(fake.requests) == 2


async def test_a_mixture_of_5xx_timeout_and_reset_counts_as_consecutive(fake, gateway, clock):
    client, _ = await gateway(config(fake.url, circuit=f"{{error_threshold: 3, cooldown_s: {COOLDOWN}}}",
                                     timeout_ms=200), clock=clock)
    fake.plan(Fault(status=502), Fault(hang=True), Fault(reset=True))
    assert [(await chat(client))[0] for _ in range(3)] == [502, 504, 502]
    status, _, data = await chat(client)
    assert status == 503 and data["error"]["code"] == "circuit_open"
    assert len(fake.requests) == 3


async def test_a_stream_cut_after_its_first_byte_counts_as_a_failure(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    stream_body = {**OPENAI_BODY, "stream": True}
    fake.plan(Fault(chunks=5, cut_after=2), Fault(chunks=5, cut_after=2))
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=stream_body)
        assert resp.status == 200  # the headers went out with the first byte
        text = await resp.read()
        assert b"tok0" in text and b"[DONE]" not in text and b'"error"' in text  # cut, ended in-band
    assert len(fake.requests) == 2
    assert moves(seen) == [("closed", "open")], "two streams cut mid-way should open the circuit (threshold 2)"
    status, headers, data = await chat(client)
    assert_circuit_open_openai(status, headers, data)
    assert len(fake.requests) == 2


async def test_a_complete_stream_does_not_count(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), clock=clock)
    fake.plan(Fault(status=503))
    assert (await chat(client))[0] == 503
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "stream": True})
    assert resp.status == 200 and (await resp.read()).rstrip().endswith(b"data: [DONE]")
    fake.plan(Fault(status=503))
    assert (await chat(client))[0] == 503  # 503, good stream, 503: not two in a row
    assert state(client) == "closed"
    assert (await chat(client))[0] == 200


async def test_transitions_are_emitted_as_events_and_logged(fake, gateway, clock, caplog):
    caplog.set_level(logging.WARNING, logger="reliapi")
    client, _ = await gateway(config(fake.url), clock=clock)
    seen = watch(client)
    await open_circuit(client, fake)
    clock.advance(COOLDOWN + 1)
    assert (await chat(client))[0] == 200

    assert [(t.target, t.from_state, t.to_state) for t in seen] == [
        ("up", "closed", "open"), ("up", "open", "half_open"), ("up", "half_open", "closed"),
    ]
    assert all(t.reason for t in seen)

    logged = [r for r in caplog.records if r.name == "reliapi" and r.getMessage() == "circuit transition"]
    assert [r.levelno for r in logged] == [logging.WARNING] * 3
    fields = [r.fields for r in logged]
    assert [(f["target"], f["from_state"], f["to_state"]) for f in fields] == [
        ("up", "closed", "open"), ("up", "open", "half_open"), ("up", "half_open", "closed"),
    ]
    assert fields[0]["reason"] == seen[0].reason


async def test_an_open_circuit_sends_requests_straight_to_the_fallback(fake, upstreams, gateway, clock):
    backup = await upstreams()
    client, logs = await gateway(config(fake.url, backup=backup.url), clock=clock)
    seen = watch(client)
    used: list[FallbackUsed] = []
    client.app[RUNTIME].current.events.subscribe(lambda e: used.append(e) if isinstance(e, FallbackUsed) else None)

    fake.plan(Fault(status=503), Fault(status=503))
    for _ in range(2):  # the primary fails, the backup answers
        status, headers, _ = await chat(client)
        assert status == 200 and headers["X-ReliAPI-Fallback"] == "backup"
    assert moves(seen) == [("closed", "open")]
    assert len(fake.requests) == 2 and len(backup.requests) == 2

    for _ in range(3):
        status, headers, data = await chat(client)
        assert status == 200 and headers["X-ReliAPI-Fallback"] == "backup"
        assert headers["X-ReliAPI-Target"] == "backup"
        assert data["choices"][0]["message"]["content"] == "Hello from the fake."
    assert len(fake.requests) == 2  # the primary is not called while open
    assert len(backup.requests) == 5
    assert [u.reason for u in used[-3:]] == ["circuit_open"] * 3
    assert logs[-1]["fallback_target"] == "backup"

    clock.advance(COOLDOWN + 1)  # after the cooldown the primary is probed and takes the traffic back
    status, headers, _ = await chat(client)
    assert status == 200 and "X-ReliAPI-Fallback" not in headers and headers["X-ReliAPI-Target"] == "up"
    assert len(fake.requests) == 3 and len(backup.requests) == 5


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
