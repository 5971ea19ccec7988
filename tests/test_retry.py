"""The retry policy through a real gateway (SPEC §5 "Retry", RELIABILITY-NOTES §2, TC12–TC24).

What a client and the upstream notice — how many attempts were made (``fake.requests``,
``X-ReliAPI-Attempt(s)``), how long the gateway waited (``FakeClock.sleeps``: waits are
recorded, never slept), and which answer the client finally got. The pieces the policy
decides with are tested on their own in ``test_retry_rules.py``.

Socket timeouts are real and short (≤ 500 ms); every backoff runs on the fake clock.
"""

from __future__ import annotations

import asyncio
import socket
from email.utils import formatdate

import aiohttp
import openai
import pytest

from gateway.keys import RUNTIME
from gateway.observe.events import RetryBudgetExhausted, RetryScheduled
from tests.support.clock import FakeClock
from tests.support.config import NO_AUTH, PASSTHROUGH, GatewayConfig
from tests.support.fakes import Fault

CHAT = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------- helpers


def chat_config(up: str, *, backup: str | None = None, timeout_ms: int = 2000, **up_fields: object) -> GatewayConfig:
    """An OpenAI target ``up`` (optionally falling back to ``backup``) and an Anthropic target ``claude``;
    ``up_fields``: more for ``up``."""
    cfg = GatewayConfig(up, default_target="up")
    cfg.up(auth=NO_AUTH, timeout_ms=timeout_ms,
           fallback_targets=[{"target": "backup", "model": "gpt-backup"}] if backup else None, **up_fields)
    cfg.claude(auth=NO_AUTH, timeout_ms=2000)
    return cfg.target("backup", f"{backup}/v1", provider="openai") if backup else cfg


def http_config(base: str, **fields: object) -> GatewayConfig:
    """One plain-HTTP target ``rest``, called as ``/t/rest/...`` (``fields``: more for it)."""
    return GatewayConfig(base, default_target="rest").rest(provider="http", auth=PASSTHROUGH, timeout_ms=2000, **fields)


def closed_port() -> int:
    """A loopback port nobody listens on (connection refused: the request never leaves)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listen(client, kind: type) -> list:
    """Collect the gateway's events of one kind."""
    seen: list = []
    client.app[RUNTIME].current.events.subscribe(lambda e: seen.append(e) if isinstance(e, kind) else None)
    return seen


def attempt_headers(fake) -> list[str]:
    return [r.headers["X-ReliAPI-Attempt"] for r in fake.requests]


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    return [e for e in (await resp.read()).split(b"\n\n") if e]


async def chat(client, **extra) -> aiohttp.ClientResponse:
    return await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": CHAT, **extra})


@pytest.fixture
async def sdk_for():
    """``sdk_for(client)`` → an openai SDK pointed at the gateway that never retries by itself."""
    made: list[openai.AsyncOpenAI] = []

    def make(client) -> openai.AsyncOpenAI:
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-client", max_retries=0)
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        await sdk.close()


# ================================================================ gateway: plain HTTP and methods (TC12, TC13)


async def test_plain_http_post_503_is_not_retried(fake, gateway, clock):
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.plan(Fault(status=503))
    resp = await client.post("/t/rest/orders", data=b'{"item": 1}')
    assert resp.status == 503
    assert (await resp.json())["method"] == "POST"  # the upstream's own answer, passed through
    assert len(fake.requests) == 1 and resp.headers["X-ReliAPI-Attempts"] == "1"
    assert clock.sleeps == []


async def test_plain_http_patch_503_is_not_retried(fake, gateway, clock):
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.plan(Fault(status=503))
    resp = await client.patch("/t/rest/orders/1", data=b'{"item": 2}')
    assert resp.status == 503 and len(fake.requests) == 1


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_plain_http_post_with_an_idempotency_key_is_retried(fake, gateway, clock, header):
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.plan(Fault(status=503))
    resp = await client.post("/t/rest/orders", data=b'{"item": 1}', headers={header: "order-42"})
    assert resp.status == 200
    assert resp.headers["X-ReliAPI-Attempts"] == "2" and len(fake.requests) == 2


async def test_plain_http_post_with_retry_non_idempotent_replays_the_same_body(fake, gateway, clock):
    client, _ = await gateway(http_config(fake.url, retry_non_idempotent=True), clock=clock)
    fake.plan(Fault(status=503))
    body = bytes(range(256)) * 2  # 512 bytes, not all text
    resp = await client.post("/t/rest/orders", data=body)
    assert resp.status == 200
    assert resp.headers["X-ReliAPI-Attempts"] == "2"
    first, second = fake.requests
    assert first.body == second.body == body
    assert attempt_headers(fake) == ["1", "2"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_plain_http_idempotent_methods_are_retried_on_503(fake, gateway, clock, method):
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.plan(Fault(status=503))
    resp = await client.request(method, "/t/rest/things/1")
    assert resp.status == 200 and (await resp.json())["method"] == method
    assert resp.headers["X-ReliAPI-Attempts"] == "2" and attempt_headers(fake) == ["1", "2"]
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] < 1.0  # default 5xx rule: jitter in [0, 1 s)


async def test_plain_http_get_503_every_time_stops_after_the_5xx_rule(fake, gateway, clock):
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.script = lambda n, seen: Fault(status=503)
    resp = await client.get("/t/rest/things/1")
    assert resp.status == 503 and (await resp.json())["method"] == "GET"
    assert resp.headers["X-ReliAPI-Attempts"] == "3" and attempt_headers(fake) == ["1", "2", "3"]
    assert len(clock.sleeps) == 2


async def test_plain_http_post_to_a_closed_port_is_retried_then_502(gateway):
    clock = FakeClock()
    client, logs = await gateway(http_config(f"http://127.0.0.1:{closed_port()}"), clock=clock)
    retries = listen(client, RetryScheduled)
    resp = await client.post("/t/rest/orders", data=b'{"item": 1}')
    assert resp.status == 502
    body = await resp.json()
    assert body["success"] is False
    assert body["error"]["code"] == "upstream_unavailable" and body["error"]["type"] == "upstream_error"
    assert body["meta"]["retries"] == 2  # the default net rule: 2 retries, the request never left
    assert resp.headers["X-ReliAPI-Attempts"] == "3" and resp.headers["X-ReliAPI-Target"] == "rest"  # its own error too
    assert (resp.headers["X-Cache"], resp.headers["X-Cached"]) == ("BYPASS", "false")  # (a POST: never cached)
    # the first retry after a broken connection is immediate, the second backs off in [0, base)
    assert [e.delay_s for e in retries][0] == 0 and len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] < 1.0
    assert [e.reason for e in retries] == ["net", "net"]
    assert logs[-1]["attempts"] == 3


async def test_plain_http_post_reset_after_the_body_was_sent_is_not_retried(fake, gateway, clock):
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.plan(Fault(reset=True))
    resp = await client.post("/t/rest/orders", data=b'{"item": 1}')
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert len(fake.requests) == 1  # the upstream may have acted on it
    assert clock.sleeps == []


async def test_plain_http_get_reset_every_time_is_attempted_once_per_retry(fake, gateway, clock):
    """The gateway's retries are the only ones: no hidden extra attempt at the HTTP-client level."""
    client, _ = await gateway(http_config(fake.url), clock=clock)
    fake.script = lambda n, seen: Fault(reset=True)
    resp = await client.get("/t/rest/things/1")
    assert resp.status == 502
    assert attempt_headers(fake) == ["1", "2", "3"]


async def test_llm_post_503_is_retried(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=503))
    resp = await chat(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "2"
    assert fake.requests[0].body == fake.requests[1].body
    assert attempt_headers(fake) == ["1", "2"]


# ================================================================ gateway: what is never retried (TC14, TC15)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_are_attempted_exactly_once(fake, gateway, clock, status):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.script = lambda n, seen: Fault(status=status, error_message=f"nope {status}")
    resp = await chat(client)
    assert resp.status == status
    assert (await resp.json())["error"]["message"] == f"nope {status}"  # the upstream's answer, as sent
    assert len(fake.requests) == 1 and resp.headers["X-ReliAPI-Attempts"] == "1"
    assert clock.sleeps == []


async def test_x_should_retry_false_stops_a_retryable_503(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=503, headers={"x-should-retry": "false"}))
    resp = await chat(client)
    assert resp.status == 503 and len(fake.requests) == 1
    assert clock.sleeps == []


async def test_x_should_retry_true_retries_a_400(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=400, headers={"x-should-retry": "true"}))
    resp = await chat(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "2"
    assert len(fake.requests) == 2


async def test_x_should_retry_false_stops_a_429(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=429, headers={"x-should-retry": "false", "Retry-After": "1"}))
    resp = await chat(client)
    assert resp.status == 429 and len(fake.requests) == 1 and clock.sleeps == []


# ================================================================ gateway: Retry-After (TC16–TC18)


async def test_429_retry_after_seconds_is_waited_exactly(fake, gateway, clock, sdk_for):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=429, headers={"Retry-After": "2"}))
    raw = await sdk_for(client).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    assert raw.parse().choices[0].message.content == "Hello from the fake."
    assert raw.headers["X-ReliAPI-Attempts"] == "2"
    assert clock.sleeps == [2.0]
    first, second = fake.requests
    assert second.at - first.at >= 2.0


async def test_retry_after_ms_is_honoured(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=429, headers={"retry-after-ms": "350", "Retry-After": "1"}))
    resp = await chat(client)
    assert resp.status == 200 and clock.sleeps == [0.35]


async def test_503_retry_after_is_honoured_too(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=503, headers={"Retry-After": "5"}))
    resp = await chat(client)
    assert resp.status == 200 and clock.sleeps == [5.0]


async def test_retry_after_http_date_ahead_is_waited_until(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    # the date is written when the request arrives, against the gateway's (fake) wall clock
    fake.script = lambda n, seen: Fault(status=429, headers={"Retry-After": formatdate(clock.time() + 3, usegmt=True)}) if n == 1 else None
    resp = await chat(client)
    assert resp.status == 200 and len(fake.requests) == 2
    assert len(clock.sleeps) == 1
    assert 1.9 <= clock.sleeps[0] <= 3.0  # whole seconds on the wire: ≈ 3 s


async def test_retry_after_http_date_in_the_past_retries_at_once(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    retries = listen(client, RetryScheduled)
    fake.plan(Fault(status=429, headers={"Retry-After": formatdate(clock.time() - 60, usegmt=True)}))
    resp = await chat(client)
    assert resp.status == 200 and len(fake.requests) == 2
    assert sum(clock.sleeps) == 0
    assert [e.delay_s for e in retries] == [0.0]


async def test_unreadable_retry_after_falls_back_to_jittered_backoff(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(status=429, headers={"Retry-After": "abc"}))
    resp = await chat(client)
    assert resp.status == 200 and len(fake.requests) == 2
    assert len(clock.sleeps) == 1 and 0 < clock.sleeps[0] < 1.0  # the 429 rule: base 1 s, first retry


async def test_retry_after_over_max_s_is_passed_to_the_client_without_waiting(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)  # default 429 rule: max_s 60
    fake.plan(Fault(status=429, headers={"Retry-After": "600"}, error_message="slow down"))
    resp = await chat(client)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "600"
    assert (await resp.json())["error"]["message"] == "slow down"
    assert len(fake.requests) == 1 and clock.sleeps == []


async def test_retry_after_over_max_s_falls_back_without_waiting(upstreams, gateway):
    up, backup = await upstreams(), await upstreams()
    clock = FakeClock()
    client, _ = await gateway(chat_config(up.url, backup=backup.url), clock=clock)
    up.plan(Fault(status=429, headers={"Retry-After": "600"}))
    resp = await chat(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "backup"
    assert len(up.requests) == 1 and len(backup.requests) == 1
    assert clock.sleeps == []


async def test_retry_after_beyond_the_total_timeout_ends_the_retries(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url, total_timeout_ms=1000), clock=clock)
    fake.plan(Fault(status=429, headers={"Retry-After": "2"}))
    resp = await chat(client)
    assert resp.status == 429 and resp.headers["Retry-After"] == "2"
    assert len(fake.requests) == 1 and clock.sleeps == []


# ================================================================ gateway: spent quota (TC19)


async def test_openai_insufficient_quota_is_attempted_once(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.script = lambda n, seen: Fault(status=429, error_code="insufficient_quota",
                                        error_message="You exceeded your current quota.")
    resp = await chat(client)
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "insufficient_quota"
    assert len(fake.requests) == 1 and clock.sleeps == []


async def test_openai_insufficient_quota_goes_to_the_fallback(upstreams, gateway):
    up, backup = await upstreams(), await upstreams()
    clock = FakeClock()
    client, _ = await gateway(chat_config(up.url, backup=backup.url), clock=clock)
    up.script = lambda n, seen: Fault(status=429, error_code="insufficient_quota")
    resp = await chat(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "backup"
    assert (await resp.json())["model"] == "gpt-backup"
    assert len(up.requests) == 1 and clock.sleeps == []


async def test_anthropic_spend_limit_is_attempted_once(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.script = lambda n, seen: Fault(status=429, error_code="rate_limit_error",
                                        error_message="enforced_spend_limit_reached: your workspace spend limit")
    resp = await client.post("/v1/messages", json={"model": "claude-test-1", "max_tokens": 16, "messages": CHAT})
    assert resp.status == 429
    assert len(fake.requests) == 1 and clock.sleeps == []


async def test_anthropic_spend_limit_goes_to_the_fallback(upstreams, gateway):
    primary, backup = await upstreams(), await upstreams()
    clock = FakeClock()
    cfg = GatewayConfig(primary.url, default_target="claude")
    cfg.claude(auth=NO_AUTH, fallback_targets=[{"target": "claude-backup", "model": "claude-backup-1"}])
    cfg.target("claude-backup", backup.url, provider="anthropic", auth=NO_AUTH)
    client, _ = await gateway(cfg, clock=clock)
    primary.script = lambda n, seen: Fault(status=429, error_code="rate_limit_error",
                                           error_message="enforced_spend_limit_reached")
    resp = await client.post("/v1/messages", json={"model": "claude-test-1", "max_tokens": 16, "messages": CHAT})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "claude-backup"
    assert (await resp.json())["model"] == "claude-backup-1"
    assert len(primary.requests) == 1 and len(backup.requests) == 1 and clock.sleeps == []


# ================================================================ gateway: deadline (TC21)


async def test_total_timeout_bounds_the_attempts_of_a_silent_upstream(fake, gateway, clock):
    cfg = chat_config(fake.url, total_timeout_ms=500, timeout_ms=200,
                      retry_matrix={"timeout": {"attempts": 5, "backoff": "constant", "base_s": 0}})
    client, logs = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(hang=True)
    started = clock.monotonic()
    resp = await chat(client)
    assert resp.status == 504 and (await resp.json())["error"]["code"] == "upstream_timeout"
    assert 1 < len(fake.requests) <= 3  # 200 + 200 + what is left: the deadline, not the rule, ended it
    assert all(r.at - started < 0.5 for r in fake.requests)  # no attempt started after the deadline
    assert logs[-1]["attempts"] == len(fake.requests)


# ================================================================ gateway: retry budget (TC22)


async def test_retry_budget_lets_only_a_share_of_concurrent_requests_retry(fake, gateway, clock):
    cfg = chat_config(fake.url, retry_budget={"percent": 20, "min_concurrent": 0}, circuit={"error_threshold": 100})
    client, _ = await gateway(cfg, clock=clock)
    skipped = listen(client, RetryBudgetExhausted)
    scheduled = listen(client, RetryScheduled)
    fake.script = lambda n, seen: Fault(status=503, delay_ms=300)
    responses = await asyncio.gather(*(chat(client) for _ in range(5)))
    assert [r.status for r in responses] == [503] * 5
    attempts = sorted(int(r.headers["X-ReliAPI-Attempts"]) for r in responses)
    assert attempts == [1, 1, 1, 1, 3]  # one request retried (the 5xx rule: 2 retries), the rest did not
    assert len(fake.requests) == 7
    assert len(skipped) == 4 and all(e.target == "up" and e.reason == "5xx" for e in skipped)
    assert len(scheduled) == 2


# ================================================================ gateway: streams (TC23, TC24, first-event errors)


async def test_stream_cut_after_events_is_not_retried(fake, gateway, clock):
    client, logs = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(chunks=10, cut_after=3))
    resp = await chat(client, stream=True)
    assert resp.status == 200
    events = await sse_events(resp)
    assert len(events) == 4 and b'"tok1 "' in events[2]  # role chunk, tok0, tok1 — then the gateway's error
    assert events[-1].startswith(b'data: {"error"')
    assert b"data: [DONE]" not in events
    assert len(fake.requests) == 1 and clock.sleeps == []
    assert logs[-1]["outcome"] == "stream_error"


async def test_stream_reset_before_any_byte_is_retried_into_one_clean_stream(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(reset=True))
    resp = await chat(client, stream=True)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "2"
    events = await sse_events(resp)
    assert events.count(b"data: [DONE]") == 1 and events[-1] == b"data: [DONE]"
    assert not any(b'"error"' in e for e in events)
    assert sum(b"tok" in e for e in events) == 3
    assert attempt_headers(fake) == ["1", "2"]


async def test_stream_first_event_error_is_retried_like_a_5xx(fake, gateway, clock, sdk_for):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    retries = listen(client, RetryScheduled)
    fake.plan(Fault(first_event_error="server_error"))
    raw = await sdk_for(client).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=CHAT, stream=True)
    assert raw.headers["X-ReliAPI-Attempts"] == "2"
    chunks = [c async for c in raw.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 "
    assert [e.reason for e in retries] == ["5xx"]


async def test_anthropic_stream_first_event_overloaded_is_retried(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.plan(Fault(first_event_error="overloaded_error"))
    resp = await client.post("/v1/messages", json={
        "model": "claude-test-1", "max_tokens": 16, "messages": CHAT, "stream": True})
    assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "2"
    events = await sse_events(resp)
    assert not any(e.startswith(b"event: error") for e in events)
    assert events[-1].startswith(b"event: message_stop") and sum(e.startswith(b"event: message_stop") for e in events) == 1
    assert len(fake.requests) == 2


async def test_stream_first_event_error_every_time_relays_the_last_error(fake, gateway, clock):
    client, _ = await gateway(chat_config(fake.url), clock=clock)
    fake.script = lambda n, seen: Fault(first_event_error="server_error")
    resp = await chat(client, stream=True)
    assert resp.headers["X-ReliAPI-Attempts"] == "3" and len(fake.requests) == 3
    events = await sse_events(resp)
    assert events and events[0].startswith(b'data: {"error"') and b"fake stream error" in events[0]


# ================================================================ gateway: per-class rules


async def test_each_retry_class_has_its_own_count_and_backoff(fake, gateway, clock):
    cfg = chat_config(fake.url, retry_matrix={"5xx": {"attempts": 1, "backoff": "exp", "base_s": 10},
                                              "429": {"attempts": 3, "backoff": "exp", "base_s": 1}})
    client, _ = await gateway(cfg, clock=clock)
    retries = listen(client, RetryScheduled)
    fake.plan(Fault(status=503), Fault(status=429), Fault(status=429), Fault(status=503, error_message="down again"))
    resp = await chat(client)
    # 503 → its one 5xx retry; two 429s → two of three 429 retries; the second 503 → 5xx rule spent
    assert resp.status == 503 and (await resp.json())["error"]["message"] == "down again"
    assert len(fake.requests) == 4 and resp.headers["X-ReliAPI-Attempts"] == "4"
    assert [e.reason for e in retries] == ["5xx", "429", "429"]
    assert clock.sleeps == [10.0, 1.0, 2.0]  # each class counts its own n: 10·2⁰, then 1·2⁰, 1·2¹


async def test_a_5xx_rule_of_one_retry_is_respected(fake, gateway, clock):
    cfg = chat_config(fake.url, retry_matrix={"5xx": {"attempts": 1}, "429": {"attempts": 3}})
    client, _ = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(status=503)
    resp = await chat(client)
    assert resp.status == 503 and len(fake.requests) == 2


async def test_a_429_rule_of_three_retries_is_respected(fake, gateway, clock):
    cfg = chat_config(fake.url, retry_matrix={"5xx": {"attempts": 1}, "429": {"attempts": 3}})
    client, _ = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(status=429)
    resp = await chat(client)
    assert resp.status == 429 and len(fake.requests) == 4 and len(clock.sleeps) == 3


async def test_mixed_failures_never_exceed_the_largest_class(fake, gateway, clock):
    cfg = chat_config(fake.url, retry_matrix={"5xx": {"attempts": 2}, "429": {"attempts": 2}, "net": {"attempts": 2}})
    client, _ = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(status=429 if n % 2 else 503)  # alternating: each class alone allows 2
    resp = await chat(client)
    assert len(fake.requests) == 3  # 1 + max(2, 2, 2), not 1 + 2 + 2
    assert resp.status == 429


async def test_zero_attempts_everywhere_means_a_single_try(fake, gateway, clock):
    cfg = chat_config(fake.url, retry_matrix={"5xx": {"attempts": 0}, "429": {"attempts": 0},
                                              "net": {"attempts": 0}, "timeout": {"attempts": 0}})
    client, _ = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(status=503)
    resp = await chat(client)
    assert resp.status == 503 and len(fake.requests) == 1 and clock.sleeps == []


# ================================================================ gateway: circuit opening mid-retries


async def test_circuit_opening_during_retries_leaves_the_last_upstream_answer(fake, gateway, clock):
    cfg = chat_config(fake.url, circuit={"error_threshold": 2, "cooldown_s": 30},
                      retry_matrix={"5xx": {"attempts": 3}})
    client, _ = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(status=503, error_message=f"the fake is down ({n})")
    resp = await chat(client)
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["message"] == "the fake is down (2)"  # the upstream's own 503, not circuit_open
    assert body["error"]["code"] != "circuit_open"
    assert len(fake.requests) == 2 and resp.headers["X-ReliAPI-Attempts"] == "2"
    assert client.app[RUNTIME].current.circuits["up"].breaker.state == "open"

    resp = await chat(client)  # the next request meets the open circuit
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "circuit_open"
    assert len(fake.requests) == 2


async def test_circuit_opening_during_stream_retries_leaves_the_last_stream_error(fake, gateway, clock):
    cfg = chat_config(fake.url, circuit={"error_threshold": 2, "cooldown_s": 30},
                      retry_matrix={"5xx": {"attempts": 3}})
    client, _ = await gateway(cfg, clock=clock)
    fake.script = lambda n, seen: Fault(first_event_error="server_error")
    resp = await chat(client, stream=True)
    assert len(fake.requests) == 2
    events = await sse_events(resp)
    assert events and events[0].startswith(b'data: {"error"') and b"fake stream error" in events[0]
