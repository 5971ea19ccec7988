"""Idempotency keys (SPEC §5 "Idempotency", RELIABILITY-NOTES §1 and TC01–TC11).

A key (``Idempotency-Key``, ``X-Idempotency-Key`` or the body's ``idempotency_key``) makes a
POST run once per tenant: a repeat within ``ttl_s`` replays the first answer byte for byte
with ``Idempotent-Replayed: true``; concurrent duplicates — on this instance or another one
sharing the store — wait for the first and get the same answer (a stream's same bytes while
it still runs); the same key with another request is a 422; a duplicate still waiting after
``wait_s`` is a 409. Only final 2xx/4xx answers are kept: a 5xx, a reset, a cut stream or the
gateway's own refusal releases the key so the retry can succeed.

The fake upstream answers ``model: gpt-answer-<n>`` for its n-th call (``numbered``), so a
replay is told from a second execution by the body, not only by the call count. This file: replay, a reused key,
the fingerprint, tenant scope, concurrent duplicates (TC01–TC05); ``tests/test_idempotency_outcomes.py`` the rest.
"""

from __future__ import annotations

import asyncio
import gzip

import msgspec
import pytest

from tests.support.fakes import Fault
from tests.support.idempotency import (
    ALPHA,
    BETA,
    CHAT,
    CHAT_PATH,
    CLAUDE,
    REPLAYED,
    STREAM,
    TENANTS,
    call,
    config,
    model_of,
    numbered,
    openai_error,
    starter,
    until,
)


@pytest.fixture
def start(fake, gateway, clock):
    return starter(fake, gateway, clock)


# =============================================================== TC01 replay


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_a_repeat_replays_the_first_answer_without_calling_upstream(fake, start, header):
    client = await start()
    numbered(fake)
    status1, headers1, body1 = await call(client, key="order-1", header=header)
    status2, headers2, body2 = await call(client, key="order-1", header=header)

    assert (status1, status2) == (200, 200)
    assert body2 == body1 and model_of(body1) == "gpt-answer-1"
    assert headers2[REPLAYED] == "true"
    assert REPLAYED not in headers1
    assert headers2["Content-Type"] == headers1["Content-Type"]
    assert len(fake.requests) == 1

    # another key is another request: it runs
    status3, headers3, body3 = await call(client, key="order-2", header=header)
    assert status3 == 200 and model_of(body3) == "gpt-answer-2" and REPLAYED not in headers3
    assert len(fake.requests) == 2


async def test_the_body_field_key_replays_and_never_reaches_the_upstream(fake, start):
    client = await start()
    numbered(fake)
    keyed = {**CHAT, "temperature": 0.2, "idempotency_key": "body-key-1"}
    status1, _, body1 = await call(client, keyed)
    assert status1 == 200
    sent = fake.requests[0].json()
    assert "idempotency_key" not in sent  # OpenAI rejects unknown fields
    assert sent == {**CHAT, "temperature": 0.2}

    status2, headers2, body2 = await call(client, keyed)
    assert status2 == 200 and body2 == body1 and headers2[REPLAYED] == "true"
    # the same key in the header, same request without the field: the same record
    status3, headers3, body3 = await call(client, {**CHAT, "temperature": 0.2}, key="body-key-1")
    assert status3 == 200 and body3 == body1 and headers3[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_the_body_field_is_removed_even_when_a_header_carries_the_key(fake, start):
    # A client sending both (an SDK header plus the body field) must not get the provider's 400
    # for an unknown field (found by this test).
    client = await start()
    status, _, _ = await call(client, {**CHAT, "idempotency_key": "k-both"}, key="k-both")
    assert status == 200
    assert "idempotency_key" not in fake.requests[0].json()  # the provider would answer 400 for it


async def test_anthropic_requests_replay_too(fake, start):
    client = await start()
    status1, _, body1 = await call(client, CLAUDE, key="msg-1", path="/v1/messages")
    status2, headers2, body2 = await call(client, CLAUDE, key="msg-1", path="/v1/messages")
    assert (status1, status2) == (200, 200)
    assert body2 == body1 and headers2[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_a_replay_says_it_is_a_stored_answer_not_a_cache_miss(fake, start):
    """On a target that caches too, the first run was a cache MISS; its replay is no cache lookup at all."""
    client = await start(cache={"ttl_s": 60})
    numbered(fake)
    _, first, _ = await call(client, key="order-1")
    _, again, _ = await call(client, key="order-1")
    assert first["X-Cache"] == "MISS" and first["X-Cached"] == "false"
    assert again[REPLAYED] == "true" and again["X-Cached"] == "true" and again["X-Cache"] == "BYPASS"


# =============================================================== TC02 same key, other request


def _openai_reused(body: bytes) -> None:
    err = openai_error(body)
    assert err["code"] == "idempotency_key_reused" and err["type"] == "invalid_request_error"
    assert "different request" in err["message"]


def _anthropic_reused(body: bytes) -> None:
    doc = msgspec.json.decode(body)
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "idempotency key" in doc["error"]["message"]


def _envelope_reused(body: bytes) -> None:
    doc = msgspec.json.decode(body)
    assert doc["success"] is False
    assert doc["error"]["code"] == "idempotency_key_reused" and doc["error"]["status_code"] == 422
    assert doc["error"]["type"] == "client_error" and doc["error"]["retryable"] is False


REUSE = {
    "openai": (CHAT_PATH, CHAT, {**CHAT, "temperature": 1.0}, _openai_reused),
    "anthropic": ("/v1/messages", CLAUDE, {**CLAUDE, "max_tokens": 11}, _anthropic_reused),
    "envelope": ("/t/rest/orders", {"item": "book", "qty": 1}, {"item": "book", "qty": 2}, _envelope_reused),
}


@pytest.mark.parametrize("dialect", list(REUSE))
async def test_the_same_key_for_another_request_is_422_and_keeps_the_first_answer(fake, start, dialect):
    path, first, other, check = REUSE[dialect]
    client = await start()
    status1, _, body1 = await call(client, first, key="k-reuse", path=path)
    assert status1 == 200

    status2, headers2, body2 = await call(client, other, key="k-reuse", path=path)
    assert status2 == 422
    check(body2)
    assert headers2["X-Request-Id"] and REPLAYED not in headers2
    assert len(fake.requests) == 1  # the other request never ran

    status3, headers3, body3 = await call(client, first, key="k-reuse", path=path)
    assert status3 == 200 and body3 == body1 and headers3[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_the_same_key_on_another_path_target_or_stream_mode_is_422(fake, start):
    client = await start()
    assert (await call(client, CHAT, key="k-where"))[0] == 200
    assert (await call(client, CHAT, key="k-where", path="/t/rest/chat/completions"))[0] == 422
    assert (await call(client, STREAM, key="k-where"))[0] == 422  # same body but a stream: another request
    assert (await call(client, CHAT, key="k-where", path="/v1/chat/completions?x=1"))[0] == 422
    assert len(fake.requests) == 1


async def test_the_same_key_for_another_request_is_422_while_the_first_still_runs(fake, start):
    client = await start()
    fake.plan(Fault(delay_ms=500))
    first = asyncio.ensure_future(call(client, key="k-race"))
    await until(lambda: len(fake.requests) == 1)
    status, _, body = await call(client, {**CHAT, "temperature": 1.0}, key="k-race")
    assert status == 422 and openai_error(body)["code"] == "idempotency_key_reused"
    assert not first.done()  # refused at once, not after waiting for the first
    assert (await first)[0] == 200
    assert len(fake.requests) == 1


# =============================================================== TC03 canonical fingerprint


async def test_reordered_keys_and_whitespace_are_the_same_request(fake, start):
    client = await start()
    numbered(fake)
    compact = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":0.5}'
    spaced = b'{\n  "temperature" : 0.5,\n\t"messages": [ {"content": "hi",  "role": "user"} ],\n "model":"gpt-4o-mini" }\n'
    json_headers = {"Content-Type": "application/json", "Idempotency-Key": "k-canon"}

    r1 = await client.post(CHAT_PATH, data=compact, headers=json_headers)
    body1 = await r1.read()
    r2 = await client.post(CHAT_PATH, data=spaced, headers=json_headers)
    assert r1.status == r2.status == 200
    assert await r2.read() == body1 and r2.headers[REPLAYED] == "true"

    changed = spaced.replace(b"0.5", b"0.6")  # a different value is a different request
    r3 = await client.post(CHAT_PATH, data=changed, headers=json_headers)
    assert r3.status == 422
    assert len(fake.requests) == 1


async def test_query_order_does_not_matter_but_query_values_do(fake, start):
    client = await start()
    status1, _, body1 = await call(client, {"a": 1}, key="k-q", path="/t/rest/orders?a=1&b=2")
    status2, headers2, body2 = await call(client, {"a": 1}, key="k-q", path="/t/rest/orders?b=2&a=1")
    assert (status1, status2) == (200, 200)
    assert body2 == body1 and headers2[REPLAYED] == "true"
    assert (await call(client, {"a": 1}, key="k-q", path="/t/rest/orders?a=1&b=3"))[0] == 422
    assert len(fake.requests) == 1


async def test_a_non_json_plain_http_body_is_fingerprinted_as_sent(fake, start):
    client = await start()
    text = {"Content-Type": "text/plain", "Idempotency-Key": "k-text"}
    r1 = await client.post("/t/rest/upload", data=b"line one\n", headers=text)
    body1 = await r1.read()
    r2 = await client.post("/t/rest/upload", data=b"line one\n", headers=text)
    assert r1.status == r2.status == 200
    assert await r2.read() == body1 and r2.headers[REPLAYED] == "true"
    r3 = await client.post("/t/rest/upload", data=b"line two\n", headers=text)
    assert r3.status == 422
    assert len(fake.requests) == 1


@pytest.mark.parametrize("body, headers", [
    (gzip.compress(b'{"amount": 100}'), {"Content-Encoding": "gzip"}),
    (b'{"amount": 1e400}', {}),
], ids=["gzip", "number-out-of-range"])
async def test_a_keyed_plain_http_json_body_no_parser_reads_is_keyed_as_sent(fake, start, body, headers):
    """A plain-HTTP API's body is its own business: compressed, or JSON beyond what the gateway parses, it is sent
    and keyed by its bytes — not refused as "not JSON"."""
    client = await start()
    sent = {"Content-Type": "application/json", "Idempotency-Key": "k-gz", **headers}
    r1 = await client.post("/t/rest/charge", data=body, headers=sent)
    r2 = await client.post("/t/rest/charge", data=body, headers=sent)
    assert r1.status == r2.status == 200 and r2.headers[REPLAYED] == "true"
    assert len(fake.requests) == 1 and fake.requests[0].body == body


# =============================================================== TC04 tenant scope


async def test_the_same_key_from_two_tenants_names_two_requests(fake, gateway):
    client, _ = await gateway(config(fake.url, tenants=TENANTS))
    numbered(fake)
    status_a, headers_a, body_a = await call(client, key="shared-key", headers=ALPHA)
    status_b, headers_b, body_b = await call(client, key="shared-key", headers=BETA)
    assert (status_a, status_b) == (200, 200)
    assert model_of(body_a) == "gpt-answer-1" and model_of(body_b) == "gpt-answer-2"
    assert REPLAYED not in headers_a and REPLAYED not in headers_b
    assert len(fake.requests) == 2

    # each replays its own answer, never the other's
    _, again_a_headers, again_a = await call(client, key="shared-key", headers=ALPHA)
    _, again_b_headers, again_b = await call(client, key="shared-key", headers=BETA)
    assert again_a == body_a and again_b == body_b
    assert again_a_headers[REPLAYED] == again_b_headers[REPLAYED] == "true"
    assert len(fake.requests) == 2

    # a key's fingerprint is per tenant too: beta may use alpha's key for another request
    assert (await call(client, CHAT, key="k-2", headers=ALPHA))[0] == 200
    status, _, body = await call(client, {**CHAT, "temperature": 0}, key="k-2", headers=BETA)
    assert status == 200 and model_of(body) == "gpt-answer-4"
    assert len(fake.requests) == 4


@pytest.mark.parametrize("path", ["/t/rest/orders", CHAT_PATH])
async def test_without_tenants_two_passthrough_credentials_never_share_a_key(fake, start, path):
    """A target that forwards the client's own key: the key is that credential's, as the cache's entries are —
    Bob never gets Alice's answer, nor a 422 telling him her key exists."""
    client = await start()
    numbered(fake)
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    status_a, _, body_a = await call(client, key="op-42", path=path, headers=alice)
    status_b, headers_b, body_b = await call(client, {**CHAT, "temperature": 1}, key="op-42", path=path, headers=bob)
    assert (status_a, status_b) == (200, 200)
    assert REPLAYED not in headers_b and body_b != body_a
    assert len(fake.requests) == 2
    status, headers, again = await call(client, key="op-42", path=path, headers=alice)
    assert status == 200 and headers[REPLAYED] == "true" and again == body_a
    assert len(fake.requests) == 2


async def test_a_replay_still_authenticates_the_caller(fake, gateway):
    client, _ = await gateway(config(fake.url, tenants=TENANTS))
    assert (await call(client, key="k-auth", headers=ALPHA))[0] == 200
    assert (await call(client, key="k-auth"))[0] == 401
    assert (await call(client, key="k-auth", headers={"Authorization": "Bearer alpha-key-0009"}))[0] == 401
    status, headers, _ = await call(client, key="k-auth", headers=ALPHA)
    assert status == 200 and headers[REPLAYED] == "true"
    assert len(fake.requests) == 1


# =============================================================== TC05 concurrent duplicates


async def test_concurrent_duplicates_share_one_upstream_call(fake, start):
    client = await start()
    numbered(fake, delay_ms=300)
    answers = await asyncio.gather(*[call(client, key="k-burst") for _ in range(5)])

    assert [status for status, _, _ in answers] == [200] * 5
    assert len({body for _, _, body in answers}) == 1
    assert model_of(answers[0][2]) == "gpt-answer-1"
    assert len(fake.requests) == 1
    assert sorted(REPLAYED in headers for _, headers, _ in answers) == [False, True, True, True, True]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_a_duplicate_still_running_after_wait_s_is_409_then_replays(fake, start, dialect):
    path, body = (CHAT_PATH, CHAT) if dialect == "openai" else ("/v1/messages", CLAUDE)
    client = await start(idem={"wait_s": 0.2})
    fake.plan(Fault(delay_ms=600))
    first = asyncio.ensure_future(call(client, body, key="k-slow", path=path))
    await until(lambda: len(fake.requests) == 1)

    status, headers, conflict = await call(client, body, key="k-slow", path=path)
    assert status == 409
    assert headers["Retry-After"] == "1"
    doc = msgspec.json.decode(conflict)
    if dialect == "openai":
        assert doc["error"]["code"] == "idempotency_in_progress"
        assert "in progress" in doc["error"]["message"]
    else:
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
        assert "in progress" in doc["error"]["message"]
    assert not first.done()

    status1, _, body1 = await first
    assert status1 == 200
    status3, headers3, body3 = await call(client, body, key="k-slow", path=path)
    assert status3 == 200 and body3 == body1 and headers3[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_a_slow_leader_keeps_its_claim_past_the_lock_ttl(fake, start):
    # the lock (0.2 s) is renewed while the request runs (0.7 s): a duplicate never takes over
    client = await start(idem={"wait_s": 0.1, "lock_ttl_s": 0.2})
    fake.plan(Fault(delay_ms=700))
    first = asyncio.ensure_future(call(client, key="k-long"))
    await until(lambda: len(fake.requests) == 1)
    await asyncio.sleep(0.4)
    assert (await call(client, key="k-long"))[0] == 409
    assert (await first)[0] == 200
    assert len(fake.requests) == 1


async def test_a_leader_whose_client_leaves_still_answers_its_followers_and_stores(fake, start):
    client = await start()
    numbered(fake, delay_ms=400)
    leader = asyncio.ensure_future(call(client, key="k-gone"))
    await until(lambda: len(fake.requests) == 1)
    follower = asyncio.ensure_future(call(client, key="k-gone"))
    await asyncio.sleep(0.05)
    leader.cancel()  # the first client gives up before the answer came
    with pytest.raises(asyncio.CancelledError):
        await leader

    status, _, body = await follower
    assert status == 200 and model_of(body) == "gpt-answer-1"
    status, headers, again = await call(client, key="k-gone")
    assert status == 200 and again == body and headers[REPLAYED] == "true"
    assert len(fake.requests) == 1
