"""A misbehaving provider, scenario by scenario (issue #3's table), through the real openai SDK.

The SDK runs with ``max_retries=0`` so what is measured is the gateway's behaviour. The
primary ``up`` and the fallback ``backup`` are separate fake upstreams; backoff sleeps run
on a fake clock (recorded, not waited), socket timeouts are real and short.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from gateway.keys import RUNTIME
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault

CHAT = [{"role": "user", "content": "hi"}]


def config(up: str, backup: str, *, fallback: bool = True, timeout_ms: int = 2000, **up_fields: object) -> GatewayConfig:
    """``up`` at the primary fake, falling back (unless ``fallback`` is false) to ``backup`` with model gpt-backup."""
    cfg = GatewayConfig(up, default_target="up")
    cfg.up(timeout_ms=timeout_ms, fallback_targets=[{"target": "backup", "model": "gpt-backup"}] if fallback else None,
           **up_fields)
    return cfg.target("backup", f"{backup}/v1", provider="openai", timeout_ms=2000)


@pytest.fixture
async def pair(upstreams, gateway, clock):
    """(primary fake, backup fake, clock, make(...) → gateway client, access log, openai SDK)."""
    up, backup = await upstreams(), await upstreams()

    async def make(**options):
        client, logs = await gateway(config(up.url, backup.url, **options), clock=clock)
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-client", max_retries=0)
        made.append(sdk)
        return client, logs, sdk

    made: list[openai.AsyncOpenAI] = []
    yield up, backup, clock, make
    for sdk in made:
        await sdk.close()


async def _events(resp: aiohttp.ClientResponse) -> list[bytes]:
    return [e for e in (await resp.read()).split(b"\n\n") if e]


def _text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_429_with_retry_after_is_honoured(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make()
    up.plan(Fault(status=429, headers={"Retry-After": "2"}))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.parse().choices[0].message.content == "Hello from the fake."
    assert raw.headers["X-ReliAPI-Attempts"] == "2" and raw.headers["X-ReliAPI-Target"] == "up"
    first, second = up.requests
    assert second.at - first.at >= 2.0  # honoured, not a tight loop
    assert clock.sleeps == [2.0]
    assert [r.headers["X-ReliAPI-Attempt"] for r in up.requests] == ["1", "2"]
    assert backup.requests == []


async def test_429_without_retry_after_backs_off_with_jitter_then_falls_back(pair):
    up, backup, clock, make = pair
    _, logs, sdk = await make()
    up.script = lambda n, seen: Fault(status=429)
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    completion = raw.parse()
    assert raw.headers["X-ReliAPI-Fallback"] == "backup" and raw.headers["X-ReliAPI-Target"] == "backup"
    assert completion.model == "gpt-backup" and completion.usage.total_tokens == 9
    t0 = up.requests[0].at
    assert sum(1 for r in up.requests if r.at - t0 <= 3.0) <= 4 and len(up.requests) <= 6
    assert len(up.requests) == 4  # the default 429 rule: 3 retries
    assert len(clock.sleeps) == 3
    for n, slept in enumerate(clock.sleeps):  # full jitter: uniform in [0, base·2^n)
        assert 0 <= slept < 1.0 * 2**n
    assert len(set(clock.sleeps)) == 3  # jittered, not a fixed schedule
    assert backup.requests[0].json()["model"] == "gpt-backup"
    assert logs[-1]["fallback_target"] == "backup" and logs[-1]["attempts"] == 5


async def test_500_once_then_healthy_same_target(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make()
    up.plan(Fault(status=500))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.parse().choices[0].message.content == "Hello from the fake."
    assert raw.headers["X-ReliAPI-Target"] == "up" and "X-ReliAPI-Fallback" not in raw.headers
    assert len(up.requests) == 2 and backup.requests == []


async def test_503_every_time_bounded_then_fallback(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make()
    up.script = lambda n, seen: Fault(status=503)
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.headers["X-ReliAPI-Fallback"] == "backup"
    assert len(up.requests) == 3  # the first try and the 5xx rule's 2 retries
    assert len(backup.requests) == 1


async def test_503_every_time_without_fallback_passes_the_upstream_503_through(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make(fallback=False)
    up.script = lambda n, seen: Fault(status=503, error_message="the fake is down")
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    assert info.value.status_code == 503
    assert info.value.body["message"] == "the fake is down"  # the upstream's body, as sent
    assert info.value.response.headers["X-ReliAPI-Attempts"] == "3"
    assert len(up.requests) == 3


async def test_tcp_reset_before_any_response_byte_is_retried(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make()
    up.plan(Fault(reset=True))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.parse().choices[0].message.content == "Hello from the fake."
    assert raw.headers["X-ReliAPI-Target"] == "up" and raw.headers["X-ReliAPI-Attempts"] == "2"
    assert len(up.requests) == 2


async def test_silent_upstream_times_out_once_and_falls_back(pair):
    up, backup, clock, make = pair
    _, logs, sdk = await make(timeout_ms=300)
    up.plan(Fault(hang=True))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.headers["X-ReliAPI-Fallback"] == "backup"
    assert len(up.requests) == 1  # the timeout class has 0 retries by default: never the same silent route
    assert clock.sleeps == []
    assert logs[-1]["outcome"] == "ok" and logs[-1]["attempts"] == 2


async def test_slow_first_token_falls_back_before_any_header_reaches_the_client(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make(ttft_timeout_ms=300)
    up.plan(Fault(first_delay_ms=20000, headers={"X-Slow-Primary": "1"}))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT, stream=True)
    assert raw.headers["X-ReliAPI-Target"] == "backup" and raw.headers["X-ReliAPI-Fallback"] == "backup"
    assert "X-Slow-Primary" not in raw.headers  # the slow primary's headers never reached the client
    chunks = [c async for c in raw.parse()]
    assert _text(chunks) == "tok0 tok1 tok2 " and chunks[0].model == "gpt-backup"


async def test_cut_stream_ends_with_an_inband_error_and_no_done(pair):
    up, backup, clock, make = pair
    client, logs, sdk = await make()
    up.plan(Fault(chunks=60, cut_after=41))  # the role chunk and 40 tokens, then the connection drops
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="cut"):
        async for chunk in stream:
            got.append(chunk)
    assert _text(got) == "".join(f"tok{i} " for i in range(40))

    up.plan(Fault(chunks=60, cut_after=41))
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": CHAT, "stream": True})
    events = await _events(resp)
    assert events[-1].startswith(b'data: {"error"') and b"stream_interrupted" in events[-1]
    assert b"data: [DONE]" not in events and len(events) == 42
    assert logs[-1]["outcome"] == "stream_error"
    assert backup.requests == []  # after the first byte there is no fallback (without stream_recovery)


async def test_stalled_stream_ends_in_band_and_the_gateway_stays_healthy(pair):
    up, backup, clock, make = pair
    client, _, sdk = await make(stream_idle_timeout_ms=300)
    up.plan(Fault(chunks=60, stall_after=21))
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="stalled"):
        async for chunk in stream:
            got.append(chunk)
    assert _text(got) == "".join(f"tok{i} " for i in range(20))
    assert (await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT)).choices[0].message.content
    assert await client.get("/healthz")


async def test_malformed_event_mid_stream_is_relayed_and_the_stream_completes(pair):
    up, backup, clock, make = pair
    client, logs, _ = await make()
    up.plan(Fault(chunks=8, malformed_at=5))
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": CHAT, "stream": True})
    events = await _events(resp)
    assert events[5].startswith(b'data: {"choices": [{"delta": {"content": "tok')  # as the upstream sent it
    assert events[-1] == b"data: [DONE]" and sum(b"tok" in e for e in events) == 9
    assert logs[-1]["outcome"] == "ok"
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": CHAT})
    assert resp.status == 200


async def test_complete_stream_without_done_is_finalised_and_usage_recorded(pair):
    up, backup, clock, make = pair
    client, logs, sdk = await make()
    up.plan(Fault(chunks=5, no_done=True))  # finish_reason and usage, then a clean close without [DONE]
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                               stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert _text(chunks) == "tok0 tok1 tok2 tok3 tok4 " and chunks[-1].usage.completion_tokens == 5
    assert logs[-1]["outcome"] == "ok" and logs[-1]["completion_tokens"] == 5 and logs[-1]["prompt_tokens"] == 5

    # the same, but the upstream keeps the connection open: finalised at once, not at the idle timeout
    up.plan(Fault(chunks=5, no_done=True, hold_ms=20000))
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": CHAT, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    events = await asyncio.wait_for(_events(resp), timeout=10)
    assert events[-1] == b"data: [DONE]" and b'"usage"' in events[-2]
    assert logs[-1]["outcome"] == "ok" and logs[-1]["completion_tokens"] == 5
    await asyncio.wait_for(up.client_gone.wait(), timeout=5)  # and the upstream connection was let go


async def test_context_length_exceeded_falls_back_after_one_attempt(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make()
    up.plan(Fault(status=400, error_code="context_length_exceeded",
                  error_message="This model's maximum context length is 8192 tokens."))
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.headers["X-ReliAPI-Fallback"] == "backup" and raw.parse().model == "gpt-backup"
    assert len(up.requests) == 1


async def test_content_policy_violation_is_passed_through_without_fallback(pair):
    up, backup, clock, make = pair
    _, _, sdk = await make()
    up.plan(Fault(status=400, error_code="content_policy_violation", error_message="Your request was rejected."))
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    assert info.value.code == "content_policy_violation" and info.value.message.endswith("Your request was rejected.")
    assert len(up.requests) == 1 and backup.requests == []


async def test_outage_opens_the_circuit_fallback_serves_and_traffic_returns_after_recovery(pair):
    up, backup, clock, make = pair
    client, logs, sdk = await make(circuit={"error_threshold": 5, "cooldown_s": 20})
    transitions = []
    client.app[RUNTIME].current.events.subscribe(
        lambda e: transitions.append((clock.monotonic() - start, e.to_state)) if hasattr(e, "to_state") else None)
    start = clock.monotonic()
    up.script = lambda n, seen: Fault(status=503) if seen.at - start < 60 else None
    served_by = []
    for _ in range(30):  # a request every 4 s for two minutes
        t = clock.monotonic() - start
        raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
        assert raw.http_response.status_code == 200  # every request is answered
        served_by.append((t, raw.headers["X-ReliAPI-Target"]))
        clock.advance(4 - (clock.monotonic() - start - t) % 4)
    assert [s for t, s in served_by if t < 60] == ["backup"] * len([t for t, s in served_by if t < 60])
    back = next(t for t, s in served_by if s == "up")
    assert 60 <= back <= 60 + 20 + 4  # within cooldown_s of recovery (plus one request interval)
    assert all(s == "up" for t, s in served_by if t > back)
    states = [s for _, s in transitions]
    assert states[0] == "open" and "half_open" in states and states[-1] == "closed"
    # while open, the primary saw probes only, not the traffic
    during = [r for r in up.requests if r.at - start < 60]
    assert len(during) < 2 * 3 + 60 / 20 * 3 + 3


async def test_the_seed_spellings_drive_the_policies(upstreams, gateway, clock):
    """The architecture doc's ``retry: {5xx: {retries, backoff}}`` and ``circuit_breaker:
    {failure_threshold, recovery_timeout}`` are not only accepted: they are what runs."""
    up = await upstreams()
    client, _ = await gateway(f"""
targets:
  my_api:
    base_url: {up.url}/api
    retry:
      5xx: {{retries: 1, backoff: 0.5}}
    circuit_breaker:
      failure_threshold: 4
      recovery_timeout: 30
""", clock=clock)
    up.script = lambda n, seen: Fault(status=503)
    first = await client.get("/t/my_api/users/1")
    assert first.status == 503 and first.headers["X-ReliAPI-Attempts"] == "2"  # retries: 1
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] < 0.5  # backoff: 0.5 is the base
    await client.get("/t/my_api/users/1")  # the 4th consecutive failure opens the circuit
    refused = await client.get("/t/my_api/users/1")
    assert refused.status == 503 and (await refused.json())["error"]["code"] == "circuit_open"
    assert 25 <= int(refused.headers["Retry-After"]) <= 30 and len(up.requests) == 4
