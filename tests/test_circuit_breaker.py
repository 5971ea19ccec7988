"""The circuit breaker (SPEC §5 "Circuit breaker", RELIABILITY-NOTES §3, TC26–TC29).

First the ``Breaker`` state machine on its own (a fake clock, a list of transitions), then
through a real gateway in front of a fake upstream: what a client sees while a target is
failing, open, probed and back; what counts as a failure and what never does; events and
the gateway's own log; the fallback taking an open target's traffic. The state shared
between instances is tested in ``test_circuit_shared.py``.

Every cooldown runs on a ``FakeClock`` (``advance``), so nothing waits for it; the only
real waits are short socket timeouts and the bounded polls for another instance to hear
an announcement.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.config.model import CircuitConfig
from gateway.errors import CircuitOpen
from gateway.keys import RUNTIME
from gateway.observe.events import FallbackUsed
from policies.circuit_breaker import Breaker
from tests.support.circuits import (
    CHAT,
    COOLDOWN,
    OPENAI_BODY,
    assert_circuit_open_openai,
    chat,
    config,
    eventually,
    moves,
    open_circuit,
    state,
    watch,
)
from tests.support.clock import FakeClock
from tests.support.fakes import Fault

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
        config(fake.url, circuit={"error_threshold": 2, "cooldown_s": COOLDOWN, "half_open_max_calls": 2}), clock=clock)
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
    client, _ = await gateway(config(fake.url, max_concurrency=1), clock=clock)
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
    client, _ = await gateway(config(fake.url, circuit={"error_threshold": 3, "cooldown_s": COOLDOWN},
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
