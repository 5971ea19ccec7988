"""A client that goes away cancels its upstream call at once — with a cache or an idempotency key
too — unless another request waits for the same answer (issue #12 row 3, SPEC §2).

A cached or keyed request runs in a task of its own so that followers are never cut off by the
leader's client. When nobody follows, that task must not outlive its client: the upstream stream
is dropped, nothing is stored, the key is free for a retry, and a tenant is billed only for
what was sent. Two gateways share one Redis where a follower on the other instance matters.
A keyed plain-HTTP request is the exception: its side effect is not undone by cancelling it, so it
runs to its end and its retry replays the answer.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.keys import RUNTIME
from gateway.store.memory import MemoryStore
from tests.support.config import NO_5XX_RETRY, GatewayConfig
from tests.support.fakes import Fault
from tests.support.stores import drop, new_prefix, redis_store

STREAM = {"model": "gpt-4o-mini", "max_tokens": 500, "stream": True,
          "messages": [{"role": "user", "content": "tell me a long story"}]}
CHAT = {**STREAM, "stream": False}
ACME = {"Authorization": "Bearer acme-key-123456"}


def config(url: str, *, budget: bool = False) -> GatewayConfig:
    """``up``, cached, never retried; with ``budget``, tenant ``acme`` has $10 a day."""
    cfg = GatewayConfig(url, default_target="up")
    if budget:
        cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 10})
    return cfg.up(cache={"ttl_s": 600}, retry_matrix={"5xx": {"attempts": 0}, "timeout": {"attempts": 0}})


async def eventually(condition, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def leave_after_first_event(client, body: dict, headers: dict | None = None) -> None:
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream


def idle(client) -> bool:
    return not client.app[RUNTIME].current.background


@pytest.mark.parametrize("keyed", [False, True], ids=["cache", "idempotency-key"])
async def test_a_cached_or_keyed_stream_is_cancelled_upstream_when_its_client_leaves(fake, gateway, keyed):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=200, interval_ms=20), Fault(chunks=3))
    headers = {"Idempotency-Key": "story-1"} if keyed else None
    await leave_after_first_event(client, STREAM, headers)
    await eventually(lambda: fake.disconnects == 1)  # the upstream saw its client go: long before 200 chunks
    assert fake.streams_finished == 0
    await eventually(lambda: idle(client))
    # nothing was stored, and the key is free: the same request runs again, at once, whole
    again = await client.post("/v1/chat/completions", json=STREAM, headers=headers)
    body = await again.read()
    assert again.status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert "Idempotent-Replayed" not in again.headers and again.headers["X-Cache"] == "MISS"
    assert len(fake.requests) == 2


async def test_a_keyed_complete_answer_is_cancelled_when_its_client_leaves(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(hang=True), Fault())
    headers = {"Idempotency-Key": "slow-1"}
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT, headers=headers), 0.3)
    await eventually(lambda: idle(client))  # the leader's work was cancelled, not left hanging an hour
    started = time.monotonic()
    again = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert again.status == 200 and "Idempotent-Replayed" not in again.headers
    assert time.monotonic() - started < 5  # not held back by a claim nobody runs under (idempotency.wait_s: 30)
    assert len(fake.requests) == 2


async def leader_leaves_while_a_follower_reads(client, fake) -> bytes:
    """A stream of 20 chunks whose first client leaves once a second reads it too: the second's whole body."""
    fake.plan(Fault(chunks=20, interval_ms=20))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    await resp.content.readuntil(b"\n\n")
    follower = asyncio.ensure_future(client.post("/v1/chat/completions", json=STREAM))
    await eventually(lambda: len(client.app[RUNTIME].current.background) >= 1)
    await asyncio.sleep(0.05)  # the follower is reading the leader's stream
    resp.close()
    return await (await follower).read()


async def test_while_a_follower_waits_the_stream_goes_on_for_it(fake, gateway):
    client, _ = await gateway(config(fake.url))
    body = await leader_leaves_while_a_follower_reads(client, fake)
    assert body.count(b"tok") == 20 and body.endswith(b"data: [DONE]\n\n")
    assert fake.streams_finished == 1 and fake.disconnects == 0 and len(fake.requests) == 1


@pytest.mark.parametrize("keyed", [False, True], ids=["cache", "idempotency-key"])
async def test_the_access_line_of_a_client_that_left_says_what_its_stream_was_billed(fake, gateway, keyed):
    """The flight's task ends the upstream call after the client left: the line waits for its tokens and cost."""
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(chunks=200, interval_ms=20))
    await leave_after_first_event(client, STREAM, {"Idempotency-Key": "told-1"} if keyed else None)
    await eventually(lambda: idle(client) and bool(logs))
    line = logs[-1]
    assert line["outcome"] == "client_closed"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] >= 0 and line["cost_usd"] > 0, line


async def test_the_access_line_of_a_leader_that_left_a_shared_stream_counts_the_whole_answer(fake, gateway):
    client, logs = await gateway(config(fake.url))
    await leader_leaves_while_a_follower_reads(client, fake)
    await eventually(lambda: len(logs) == 2)
    leader = next(line for line in logs if line["outcome"] == "client_closed")
    assert (leader["prompt_tokens"], leader["completion_tokens"]) == (5, 20) and leader["cost_usd"] > 0


async def test_an_abandoned_stream_bills_only_what_was_sent(fake, gateway):
    store = MemoryStore()
    client, _ = await gateway(config(fake.url, budget=True), store=store)
    fake.plan(Fault(chunks=200, interval_ms=20))
    await leave_after_first_event(client, STREAM, {**ACME, "Idempotency-Key": "billed-1"})
    await eventually(lambda: fake.disconnects == 1)
    key = f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime())}"
    await eventually(lambda: idle(client))
    for _ in range(100):
        charged = float(await store.get(key) or 0)
        if charged:
            break
        await asyncio.sleep(0.01)
    whole = (200 * 0.60) / 1e6
    assert 0 < charged < whole / 4  # the prompt and a few tokens, not the 200-token answer


@pytest.fixture
async def redis_pair(gateway, fake):
    prefix = new_prefix()
    stores = [await redis_store(prefix), await redis_store(prefix)]
    clients = [(await gateway(config(fake.url), store=s))[0] for s in stores]
    yield clients
    await drop(stores[0])
    await stores[1].close()


async def test_on_two_gateways_a_follower_on_the_other_keeps_the_stream_going(fake, redis_pair):
    a, b = redis_pair
    fake.plan(Fault(chunks=20, interval_ms=30))
    headers = {"Idempotency-Key": "shared-story"}
    resp = await a.post("/v1/chat/completions", json=STREAM, headers=headers)
    await resp.content.readuntil(b"\n\n")
    follower = asyncio.ensure_future(b.post("/v1/chat/completions", json=STREAM, headers=headers))
    await asyncio.sleep(0.2)  # b follows a's run through the store
    resp.close()
    answer = await follower
    body = await answer.read()
    assert body.count(b"tok") == 20 and body.endswith(b"data: [DONE]\n\n")
    assert fake.disconnects == 0 and len(fake.requests) == 1


async def test_on_two_gateways_nobody_following_means_the_upstream_is_cancelled(fake, redis_pair):
    a, b = redis_pair
    fake.plan(Fault(chunks=200, interval_ms=20), Fault(chunks=3))
    headers = {"Idempotency-Key": "lonely-story"}
    await leave_after_first_event(a, STREAM, headers)
    await eventually(lambda: fake.disconnects == 1)
    await eventually(lambda: idle(a))
    again = await b.post("/v1/chat/completions", json=STREAM, headers=headers)  # the key is free on b too
    assert again.status == 200 and (await again.read()).endswith(b"data: [DONE]\n\n")
    assert "Idempotent-Replayed" not in again.headers and len(fake.requests) == 2


async def test_an_abandoned_stream_without_usage_is_charged_the_bound_of_what_was_sent_not_a_guess(fake, gateway):
    """A stream cut before its usage report: the budget is charged the prompt at a token per byte (3,000
    CJK characters are 9,000 bytes: chars/4 would say 750 tokens) and the text sent at a token per byte."""
    store = MemoryStore()
    client, _ = await gateway(config(fake.url, budget=True), store=store)
    fake.plan(Fault(chunks=200, interval_ms=20))
    body = {**STREAM, "messages": [{"role": "user", "content": "漢" * 3000}]}
    await leave_after_first_event(client, body, {**ACME, "Idempotency-Key": "cjk-1"})
    await eventually(lambda: idle(client))
    key = f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime())}"
    charged = 0.0
    for _ in range(100):
        charged = float(await store.get(key) or 0)
        if charged:
            break
        await asyncio.sleep(0.01)
    sent = len(json.dumps(body).encode())  # (json.dumps escapes each character as \\uXXXX: 6 bytes)
    assert charged >= sent * 0.15 / 1e6  # at least the prompt's bytes at gpt-4o-mini's input price
    assert charged < (sent + 64 + 1000) * 0.15 / 1e6 + 100 * 0.60 / 1e6  # and a few tokens of text, not 500


async def charged_after(store, client, logs) -> float:
    """The day's spend once the request has been settled: its access line written and no task left
    (the reservation is in the store from the start; the settlement replaces it)."""
    await eventually(lambda: bool(logs))
    await eventually(lambda: idle(client))
    key = f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime())}"
    return float(await store.get(key) or 0)


async def test_a_cut_anthropic_stream_is_charged_what_was_sent_not_message_starts_running_count(fake, gateway):
    """message_start carries output_tokens: 1; a client that reads the answer and leaves before message_delta
    must not pay for one token."""
    store = MemoryStore()
    cfg = GatewayConfig(fake.url, default_target="claude").claude(retry_matrix=NO_5XX_RETRY).up()
    client, logs = await gateway(cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 10}), store=store)
    fake.plan(Fault(chunks=200, interval_ms=5))
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": "a long one"}]}
    resp = await client.post("/v1/messages", json=body, headers=ACME)
    for _ in range(60):  # message_start, content_block_start and some 58 deltas ("tokN ")
        await resp.content.readuntil(b"\n\n")
    resp.close()
    charged = await charged_after(store, client, logs)
    at_least = (58 * len("tok0 ")) * 4.0 / 1e6  # the text it got, at a token per byte, haiku's output price
    reserved = ((len(json.dumps(body)) + 64) * 0.80 + 4000 * 4.0) / 1e6
    assert at_least <= charged < reserved / 2, charged


async def test_a_cut_anthropic_stream_is_charged_at_least_the_input_message_start_reported(fake, gateway):
    """A short body can be a long prompt (a document or an image by URL): message_start's input_tokens
    is a floor under the prompt's byte bound."""
    store = MemoryStore()
    cfg = GatewayConfig(fake.url, default_target="claude").claude(retry_matrix=NO_5XX_RETRY).up()
    client, logs = await gateway(cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 10}), store=store)
    fake.plan(Fault(chunks=200, interval_ms=5, start_input_tokens=10_000))
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "url", "url": "https://example.com/long.pdf"}}]}]}
    resp = await client.post("/v1/messages", json=body, headers=ACME)
    for _ in range(10):
        await resp.content.readuntil(b"\n\n")
    resp.close()
    charged = await charged_after(store, client, logs)
    assert charged >= 10_000 * 0.80 / 1e6, charged  # haiku's input price, for what message_start said


async def test_a_cut_stream_of_tool_call_arguments_is_charged_them(fake, gateway):
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, budget=True), store=store)
    fake.plan(Fault(chunks=200, interval_ms=5, tool_calls=True))
    resp = await client.post("/v1/chat/completions", json=STREAM, headers=ACME)
    for _ in range(40):
        await resp.content.readuntil(b"\n\n")
    resp.close()
    charged = await charged_after(store, client, logs)
    prompt_only = (len(json.dumps(STREAM)) + 64) * 0.15 / 1e6
    assert charged > prompt_only + 30 * 0.60 / 1e6  # the arguments streamed count as output


async def test_a_complete_answer_abandoned_after_it_was_sent_upstream_is_charged_its_reservation(fake, gateway):
    """The upstream may finish and bill it: what nobody can read is charged at the most it could cost."""
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, budget=True), store=store)
    fake.plan(Fault(hang=True))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT, headers=ACME), 0.3)
    reserved = ((len(json.dumps(CHAT)) + 4 + 3) * 0.15 + 500 * 0.60) / 1e6
    assert await charged_after(store, client, logs) == pytest.approx(reserved, rel=1e-6)


async def test_a_keyed_plain_http_post_runs_to_its_end_when_its_client_leaves_and_the_retry_replays(fake, gateway):
    """A payment sent upstream is not undone by cancelling it: the answer is kept for the retry, which
    must not charge the card twice."""
    client, _ = await gateway(f"""
targets:
  pay:
    base_url: {fake.url}
    retry_matrix: {{"5xx": {{attempts: 0}}}}
""")
    fake.plan(Fault(delay_ms=300))
    headers = {"Idempotency-Key": "charge-42", "Content-Type": "application/json"}
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.post("/t/pay/charges", data=b'{"amount": 100}', headers=headers), 0.1)
    await eventually(lambda: idle(client))
    assert fake.disconnects == 0 and len(fake.requests) == 1
    again = await client.post("/t/pay/charges", data=b'{"amount": 100}', headers=headers)
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert len(fake.requests) == 1  # charged once


async def test_a_cut_stream_of_a_model_that_hides_its_reasoning_is_charged_its_reservation(fake, gateway):
    """gpt-5 and the o-series bill reasoning tokens a chat stream never shows: what was sent is no bound."""
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, budget=True), store=store)
    fake.plan(Fault(chunks=200, interval_ms=5))
    body = {**STREAM, "model": "gpt-5-mini"}
    resp = await client.post("/v1/chat/completions", json=body, headers=ACME)
    for _ in range(10):
        await resp.content.readuntil(b"\n\n")
    resp.close()
    reserved = ((len(json.dumps(body)) + 4 + 3) * 0.25 + 500 * 2.0) / 1e6
    assert await charged_after(store, client, logs) == pytest.approx(reserved, rel=1e-6)
