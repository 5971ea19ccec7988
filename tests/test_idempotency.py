"""Idempotency keys (SPEC §5 "Idempotency", RELIABILITY-NOTES §1 and TC01–TC11).

A key (``Idempotency-Key``, ``X-Idempotency-Key`` or the body's ``idempotency_key``) makes a
POST run once per tenant: a repeat within ``ttl_s`` replays the first answer byte for byte
with ``Idempotent-Replayed: true``; concurrent duplicates — on this instance or another one
sharing the store — wait for the first and get the same answer (a stream's same bytes while
it still runs); the same key with another request is a 422; a duplicate still waiting after
``wait_s`` is a 409. Only final 2xx/4xx answers are kept: a 5xx, a reset, a cut stream or the
gateway's own refusal releases the key so the retry can succeed.

The fake upstream answers ``model: gpt-answer-<n>`` for its n-th call (``numbered``), so a
replay is told from a second execution by the body, not only by the call count.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from multidict import CIMultiDict

from gateway.flow.exchange import Reply
from gateway.state.flights import Entry, Flights, Lead
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import FakeUpstream, Fault

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
CLAUDE = {"model": "claude-test-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT_PATH = "/v1/chat/completions"
REPLAYED = "Idempotent-Replayed"

TENANTS = [{"name": "alpha", "api_key": "alpha-key-0001"}, {"name": "beta", "api_key": "beta-key-0002"}]
ALPHA = {"Authorization": "Bearer alpha-key-0001"}
BETA = {"X-API-Key": "beta-key-0002"}


def config(url: str, *, idem: dict | None = None, tenants: list[dict] = (), store: dict | None = None,
           **up_fields: object) -> GatewayConfig:
    """``up`` (OpenAI), ``claude`` (Anthropic) and ``rest`` (plain HTTP, echoes) at the fake,
    no retries (one client request = one upstream attempt), the idempotency block under test."""
    cfg = GatewayConfig(url, default_target="up").tenants(*tenants)
    if store:
        cfg.store(**store)
    cfg.up(timeout_ms=5000, **up_fields).claude().rest()
    return cfg.each(retry_matrix=NO_RETRY, idempotency=idem or {})


def numbered(fake: FakeUpstream, **fault: Any) -> None:
    """Every unplanned upstream call n answers as model ``gpt-answer-<n>`` (plus ``fault``)."""
    fake.script = lambda n, seen: Fault(model=f"gpt-answer-{n}", **fault)


def model_of(body: bytes) -> str:
    return msgspec.json.decode(body)["model"]


async def post(client, body: Any = CHAT, *, key: str | None = None, path: str = CHAT_PATH,
               headers: dict[str, str] | None = None, header: str = "Idempotency-Key"):
    h = dict(headers or {})
    if key is not None:
        h[header] = key
    return await client.post(path, json=body, headers=h)


async def call(client, body: Any = CHAT, **kwargs) -> tuple[int, CIMultiDict[str], bytes]:
    """POST and read the whole answer: (status, headers, body bytes)."""
    resp = await post(client, body, **kwargs)
    return resp.status, resp.headers, await resp.read()


def store_key(key: str, tenant: str = "-") -> str:
    """Where the policy keeps a key's record (gateway/state/flights.py, policies/idempotency.py)."""
    return f"idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def openai_error(body: bytes) -> dict:
    return msgspec.json.decode(body)["error"]


@pytest.fixture
def start(fake, gateway, clock):
    async def make(**options: Any):
        client, _ = await gateway(config(fake.url, **options), clock=clock)
        return client

    return make


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


# =============================================================== TC06 failures release the key


@pytest.mark.parametrize("upstream_status", [500, 503])
async def test_an_upstream_5xx_is_not_stored_and_the_retry_runs(fake, start, upstream_status):
    client = await start()
    fake.plan(Fault(status=upstream_status))
    numbered(fake)
    status1, headers1, _ = await call(client, key="k-5xx")
    assert status1 == upstream_status and REPLAYED not in headers1

    status2, headers2, body2 = await call(client, key="k-5xx")
    assert status2 == 200 and REPLAYED not in headers2
    assert model_of(body2) == "gpt-answer-2"
    assert len(fake.requests) == 2
    status3, headers3, body3 = await call(client, key="k-5xx")  # the success is kept
    assert status3 == 200 and body3 == body2 and headers3[REPLAYED] == "true"
    assert len(fake.requests) == 2


async def test_with_store_5xx_an_upstream_5xx_is_replayed_like_any_answer(fake, start):
    client = await start(idem={"store_5xx": True})
    fake.plan(Fault(status=503, error_message="upstream busy"))
    numbered(fake)
    status1, _, body1 = await call(client, key="k-stripe")
    status2, headers2, body2 = await call(client, key="k-stripe")
    assert status1 == status2 == 503 and body2 == body1 and headers2[REPLAYED] == "true"
    assert len(fake.requests) == 1  # Stripe's rule: the retry gets the recorded 5xx, nothing runs again


async def test_duplicates_of_a_failing_run_share_its_503_and_the_key_is_released(fake, start):
    client = await start()
    fake.plan(Fault(status=503, delay_ms=300, error_message="upstream busy"))
    numbered(fake)
    answers = await asyncio.gather(*[call(client, key="k-fail") for _ in range(3)])
    assert [status for status, _, _ in answers] == [503] * 3
    assert len({body for _, _, body in answers}) == 1
    assert b"upstream busy" in answers[0][2]
    assert len(fake.requests) == 1

    status, headers, body = await call(client, key="k-fail")
    assert status == 200 and REPLAYED not in headers and model_of(body) == "gpt-answer-2"
    assert len(fake.requests) == 2


async def test_a_connection_reset_is_not_stored_and_the_retry_runs(fake, start):
    client = await start()
    fake.plan(Fault(reset=True))
    numbered(fake)
    status1, _, body1 = await call(client, key="k-reset")
    assert status1 == 502 and openai_error(body1)["code"] == "upstream_unavailable"
    status2, headers2, body2 = await call(client, key="k-reset")
    assert status2 == 200 and REPLAYED not in headers2 and model_of(body2) == "gpt-answer-2"
    assert len(fake.requests) == 2


# =============================================================== TC07 gateway rejections store nothing


async def test_a_request_the_gateway_rejects_stores_nothing(fake, start):
    client = await start()
    json_headers = {"Content-Type": "application/json", "Idempotency-Key": "k-bad"}
    bad = await client.post(CHAT_PATH, data=b'{"model": "gpt-4o-mini", "messages": [', headers=json_headers)
    assert bad.status == 400 and openai_error(await bad.read())["code"] == "invalid_request"
    wrong = await client.post(CHAT_PATH, data=b'{"model": "gpt-4o-mini", "stream": "yes"}', headers=json_headers)
    assert wrong.status == 400
    assert fake.requests == []

    status, headers, _ = await call(client, key="k-bad")  # the corrected request runs
    assert status == 200 and REPLAYED not in headers
    assert len(fake.requests) == 1


async def test_a_rate_limited_request_stores_nothing(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    alpha = {"name": "alpha", "api_key": "alpha-key-0001", "rate_limit": {"rpm": 1}}
    client, _ = await gateway(config(fake.url, tenants=[alpha]), clock=clock, store=store)
    numbered(fake)
    assert (await call(client, headers=ALPHA))[0] == 200  # uses up the minute
    status, headers, body = await call(client, key="k-rl", headers=ALPHA)
    assert status == 429 and openai_error(body)["code"] == "rate_limited" and "Retry-After" in headers
    assert len(fake.requests) == 1

    clock.advance(61)
    status, headers, body = await call(client, key="k-rl", headers=ALPHA)
    assert status == 200 and REPLAYED not in headers and model_of(body) == "gpt-answer-2"
    clock.advance(61)
    status, headers, again = await call(client, key="k-rl", headers=ALPHA)
    assert status == 200 and again == body and headers[REPLAYED] == "true"
    assert len(fake.requests) == 2


async def test_a_bulkhead_overflow_after_the_claim_stores_nothing(fake, start):
    client = await start(max_concurrency=1)
    fake.plan(Fault(delay_ms=500))
    numbered(fake)
    slow = asyncio.ensure_future(call(client))
    await until(lambda: len(fake.requests) == 1)
    status, _, body = await call(client, key="k-full")
    assert status == 503 and openai_error(body)["code"] == "overloaded"
    assert (await slow)[0] == 200

    status, headers, body = await call(client, key="k-full")
    assert status == 200 and REPLAYED not in headers and model_of(body) == "gpt-answer-2"
    assert len(fake.requests) == 2


# =============================================================== TC08 lock expiry and fencing


async def test_a_dead_holders_lock_expires_and_a_late_write_is_refused(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    client, _ = await gateway(config(fake.url, idem={"wait_s": 0.2}), clock=clock, store=store)
    numbered(fake)
    # the request's fingerprint, as the gateway records it (a probe under another key)
    assert (await call(client, key="probe"))[0] == 200
    fp = msgspec.msgpack.decode((await store.get(store_key("probe")))[1:], type=Entry).fp

    # a holder that claimed "k-dead" and died: its lock lives 1 s and is never renewed
    dead_lock = b"L" + b"0badc0de0badc0de" + b" " + fp.encode()
    assert await store.set_nx(store_key("k-dead"), dead_lock, 1.0)
    assert (await call(client, key="k-dead"))[0] == 409  # still held
    assert len(fake.requests) == 1

    clock.advance(1.5)
    status, headers, body = await call(client, key="k-dead")  # taken over: runs
    assert status == 200 and REPLAYED not in headers and model_of(body) == "gpt-answer-2"
    assert len(fake.requests) == 2

    # the old holder wakes up and tries to write its answer with its old token: refused
    stale = Entry(fp, 200, [("Content-Type", "application/json")], b'{"model": "stale"}', None, clock.time())
    assert not await store.compare_and_set(store_key("k-dead"), dead_lock, b"D" + msgspec.msgpack.encode(stale), 60)
    status, headers, again = await call(client, key="k-dead")
    assert status == 200 and again == body and headers[REPLAYED] == "true"
    assert len(fake.requests) == 2


def _reply(body: bytes) -> Callable[[], Any]:
    async def work() -> Reply:
        return Reply(200, CIMultiDict({"Content-Type": "application/json"}), body=body, upstream_status=200)

    return work


async def test_flights_fence_an_expired_leaders_write(clock):
    store = MemoryStore(clock=clock.time)
    tasks: set[asyncio.Task[Any]] = set()
    flights = Flights(store, "idem", tasks, clock.time)
    key = "idem:-:fenced"
    old = await flights.join(key, "fp1", 1.0)
    assert isinstance(old, Lead)
    assert not isinstance(await flights.join(key, "fp1", 1.0), Lead)  # held

    clock.advance(1.5)  # the old leader's lock expired (it stopped renewing it)
    new = await flights.join(key, "fp1", 30.0)
    assert isinstance(new, Lead)
    reply = await new.run(_reply(b"new"), storable=lambda r: True, ttl_s=60, max_bytes=1 << 20)
    assert reply.body == b"new"
    await asyncio.gather(*list(tasks))

    late = await old.run(_reply(b"old"), storable=lambda r: True, ttl_s=60, max_bytes=1 << 20)
    assert late.body == b"old"  # its own caller still gets its answer …
    await asyncio.gather(*list(tasks))
    stored = await flights.lookup(key)
    assert isinstance(stored, Entry) and stored.body == b"new"  # … but it cannot overwrite the new one


# =============================================================== TC09 TTL


async def test_a_stored_answer_expires_ttl_s_after_the_first_request(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    client, _ = await gateway(config(fake.url, idem={"ttl_s": 60}), clock=clock, store=store)
    numbered(fake)
    _, _, body1 = await call(client, key="k-ttl")
    clock.advance(30)
    status, headers, body2 = await call(client, key="k-ttl")
    assert status == 200 and body2 == body1 and headers[REPLAYED] == "true"

    clock.advance(31)  # 61 s after the first request (a replay does not extend it)
    status, headers, body3 = await call(client, key="k-ttl")
    assert status == 200 and REPLAYED not in headers and model_of(body3) == "gpt-answer-2"
    assert len(fake.requests) == 2
    status, headers, body4 = await call(client, key="k-ttl")
    assert body4 == body3 and headers[REPLAYED] == "true"
    assert len(fake.requests) == 2


async def test_the_ttl_counts_from_the_start_of_a_slow_first_request(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    client, _ = await gateway(config(fake.url, idem={"ttl_s": 60, "lock_ttl_s": 600}), clock=clock, store=store)
    numbered(fake, delay_ms=200)
    first = asyncio.ensure_future(call(client, key="k-ttl-slow"))
    await until(lambda: len(fake.requests) == 1)
    clock.advance(40)  # the first request takes 40 s (of the test clock)
    _, _, body1 = await first
    clock.advance(10)
    status, headers, body2 = await call(client, key="k-ttl-slow")
    assert body2 == body1 and headers[REPLAYED] == "true"
    clock.advance(11)  # 61 s after the first request began, 21 s after its answer was stored
    status, headers, body3 = await call(client, key="k-ttl-slow")
    assert status == 200 and REPLAYED not in headers and model_of(body3) == "gpt-answer-2"
    assert len(fake.requests) == 2


# =============================================================== TC10 key syntax


@pytest.mark.parametrize("value, why", [
    ("", "empty"),
    ("   ", "empty"),
    ("k" * 256, "longer than 255"),
    ('"abc', "malformed"),
    ('"a"b"', "malformed"),
    ('"a\\x"', "malformed"),
    ('""', "empty"),
])
async def test_a_bad_key_is_400(fake, start, value, why):
    client = await start()
    status, headers, body = await call(client, key=value)
    assert status == 400
    err = openai_error(body)
    assert err["code"] == "invalid_request" and err["param"] == "Idempotency-Key"
    assert why in err["message"] and "Idempotency-Key" in err["message"]
    assert headers["X-Request-Id"]
    assert fake.requests == []


@pytest.mark.parametrize("value", ["", "k" * 256, "ключ"])
async def test_a_bad_body_field_key_is_400(fake, start, value):
    client = await start()
    status, _, body = await call(client, {**CHAT, "idempotency_key": value})
    assert status == 400
    err = openai_error(body)
    assert err["code"] == "invalid_request" and err["param"] == "idempotency_key"
    assert fake.requests == []


async def test_a_255_character_key_is_accepted(fake, start):
    client = await start()
    assert (await call(client, key="k" * 255))[0] == 200
    status, headers, _ = await call(client, key="k" * 255)
    assert status == 200 and headers[REPLAYED] == "true"
    assert len(fake.requests) == 1


async def test_quoted_and_bare_keys_address_the_same_record(fake, start):
    client = await start()
    _, _, body1 = await call(client, key='"abc"')
    for value, header in [("abc", "Idempotency-Key"), ('"abc"', "X-Idempotency-Key"), (" abc ", "Idempotency-Key")]:
        status, headers, body = await call(client, key=value, header=header)
        assert status == 200 and body == body1 and headers[REPLAYED] == "true", value
    _, _, escaped = await call(client, key='"a\\"b"')  # SF escapes: this is the key a"b
    status, headers, bare = await call(client, key='a"b')
    assert bare == escaped and headers[REPLAYED] == "true"
    assert len(fake.requests) == 2


async def test_keys_are_ignored_on_get_and_head(fake, start):
    client = await start()
    for method in ("GET", "HEAD"):
        for value in ("k-get", "k-get", ""):  # even a key that would be a 400 on a POST
            resp = await client.request(method, "/t/rest/items?x=1", headers={"Idempotency-Key": value})
            assert resp.status == 200, (method, value)
            assert REPLAYED not in resp.headers
    assert [seen.method for seen in fake.requests] == ["GET"] * 3 + ["HEAD"] * 3


async def test_a_non_json_body_with_a_key_on_an_llm_path_is_400(fake, start):
    client = await start()
    resp = await client.post("/t/up/chat/completions", data=b"hello, not json",
                             headers={"Content-Type": "text/plain", "Idempotency-Key": "k-text"})
    assert resp.status == 400
    doc = msgspec.json.decode(await resp.read())
    assert doc["success"] is False and doc["error"]["code"] == "invalid_request"
    assert "not valid JSON" in doc["error"]["message"] and "idempotency key" in doc["error"]["message"]
    assert fake.requests == []


# =============================================================== stored / not stored upstream answers


@pytest.mark.parametrize("path, body, upstream_status", [
    (CHAT_PATH, CHAT, 400), (CHAT_PATH, CHAT, 404), (CHAT_PATH, CHAT, 422), ("/t/rest/orders", {"qty": 1}, 404),
])
async def test_an_upstream_4xx_is_stored_and_replayed(fake, start, path, body, upstream_status):
    # Every upstream 4xx carries a classified failure; it is still a final answer (SPEC §5, NOTES I4).
    client = await start()
    fake.plan(Fault(status=upstream_status, error_message="no such thing, says the upstream"))
    status1, _, body1 = await call(client, body, key="k-4xx", path=path)
    assert status1 == upstream_status
    status2, headers2, body2 = await call(client, body, key="k-4xx", path=path)
    assert status2 == upstream_status and body2 == body1 and headers2.get(REPLAYED) == "true"
    assert len(fake.requests) == 1


@pytest.mark.parametrize("upstream_status", [408, 409, 429])
async def test_an_upstream_408_409_or_429_is_not_stored(fake, start, upstream_status):
    client = await start()
    fake.plan(Fault(status=upstream_status, headers={"Retry-After": "1"}))
    numbered(fake)
    assert (await call(client, key="k-later"))[0] == upstream_status
    status, headers, body = await call(client, key="k-later")
    assert status == 200 and REPLAYED not in headers and model_of(body) == "gpt-answer-2"
    assert len(fake.requests) == 2


async def test_an_answer_over_max_entry_mb_is_returned_but_not_stored(fake, start):
    client = await start(idem={"max_entry_mb": 0.0001})  # ~100 bytes; the fake's answer is larger
    numbered(fake)
    status1, _, body1 = await call(client, key="k-big")
    assert status1 == 200 and len(body1) > 105
    status2, headers2, body2 = await call(client, key="k-big")
    assert status2 == 200 and REPLAYED not in headers2 and model_of(body2) == "gpt-answer-2"
    assert len(fake.requests) == 2


async def test_a_200_stream_that_starts_with_an_error_event_is_not_stored(fake, start):
    client = await start()
    fake.plan(Fault(first_event_error="server_error"))
    first = await post(client, STREAM, key="k-error-led")
    assert b"fake stream error" in await first.read()
    again = await post(client, STREAM, key="k-error-led")
    raw = await again.read()
    assert again.status == 200 and REPLAYED not in again.headers
    assert b"fake stream error" not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 2


# =============================================================== TC11 streams


async def _read_events(resp) -> list[bytes]:
    return [e for e in (await resp.read()).split(b"\n\n") if e]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_a_completed_stream_replays_the_same_sse_bytes(fake, start, dialect):
    path, body = (CHAT_PATH, STREAM) if dialect == "openai" else ("/v1/messages", {**CLAUDE, "stream": True})
    client = await start()
    fake.plan(Fault(chunks=4))
    first = await post(client, body, key="k-stream", path=path)
    raw1 = await first.read()
    second = await post(client, body, key="k-stream", path=path)
    raw2 = await second.read()

    assert first.status == second.status == 200
    assert second.headers["Content-Type"].startswith("text/event-stream")
    assert second.headers[REPLAYED] == "true"
    assert raw2 == raw1 and b"tok3" in raw1
    assert raw1.endswith(b"data: [DONE]\n\n" if dialect == "openai" else b'{"type":"message_stop"}\n\n')
    assert len(fake.requests) == 1


async def test_duplicates_of_a_running_stream_get_its_bytes_while_it_runs(fake, start):
    client = await start()
    fake.plan(Fault(chunks=5, interval_ms=80))
    leader = await post(client, STREAM, key="k-live")
    assert leader.status == 200
    followers = [await post(client, STREAM, key="k-live") for _ in range(3)]
    for f in followers:
        assert f.status == 200 and f.headers["Content-Type"].startswith("text/event-stream")
        assert b'"role":"assistant"' in await f.content.readuntil(b"\n\n")
    assert fake.streams_finished == 0  # the followers are served while the upstream still streams

    raw = await leader.read()
    assert raw.endswith(b"data: [DONE]\n\n") and b"tok4" in raw
    for f in followers:
        first_event = raw.split(b"\n\n")[0] + b"\n\n"
        assert first_event + await f.read() == raw
    assert len(fake.requests) == 1


async def test_a_cut_stream_is_not_stored_and_the_retry_runs(fake, start):
    client = await start()
    fake.plan(Fault(chunks=6, cut_after=3, interval_ms=80))
    cut = await post(client, STREAM, key="k-cut")
    follower = await post(client, STREAM, key="k-cut")  # joins while it runs: shares the cut
    raw_cut = await cut.read()
    assert b"stream_interrupted" in raw_cut and not raw_cut.endswith(b"data: [DONE]\n\n")
    assert await follower.read() == raw_cut
    assert len(fake.requests) == 1

    again = await post(client, STREAM, key="k-cut")
    raw = await again.read()
    assert again.status == 200 and REPLAYED not in again.headers
    assert raw.endswith(b"data: [DONE]\n\n") and b"tok2" in raw
    assert b"chatcmpl-fake2" in raw  # the second upstream call's stream
    assert len(fake.requests) == 2
    third = await post(client, STREAM, key="k-cut")
    assert await third.read() == raw and third.headers[REPLAYED] == "true"
    assert len(fake.requests) == 2


async def test_a_leader_whose_client_leaves_mid_stream_finishes_for_its_followers(fake, start):
    client = await start()
    fake.plan(Fault(chunks=6, interval_ms=80))
    leader = await post(client, STREAM, key="k-left")
    await leader.content.readuntil(b"\n\n")
    follower = await post(client, STREAM, key="k-left")
    assert follower.status == 200
    leader.close()  # the first client goes away mid-stream

    raw = await follower.read()
    assert raw.endswith(b"data: [DONE]\n\n") and b"tok5" in raw
    assert b"stream_interrupted" not in raw
    await until(lambda: fake.streams_finished == 1)
    assert fake.disconnects == 0  # the upstream stream was not cancelled

    replay = await post(client, STREAM, key="k-left")
    assert await replay.read() == raw and replay.headers[REPLAYED] == "true"
    assert len(fake.requests) == 1


# =============================================================== store unavailable


_STORE_METHODS = frozenset((
    "get", "set", "set_nx", "claim", "delete", "compare_and_delete", "compare_and_set", "incr", "incr_float",
    "hincr", "hgetall", "append", "range", "take", "publish", "scan_prefix", "delete_prefix", "ping",
))


async def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise StoreError("connection refused (test store is down)")


def _refuse_subscribe(*args: Any, **kwargs: Any) -> Any:
    raise StoreError("connection refused (test store is down)")


class FlakyStore(MemoryStore):
    """A memory store that fails every call with ``StoreError`` while ``down``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.down = False

    def __getattribute__(self, name: str) -> Any:
        if name in _STORE_METHODS or name == "subscribe":
            if object.__getattribute__(self, "down"):
                return _refuse_subscribe if name == "subscribe" else _refuse
        return super().__getattribute__(name)


async def test_a_keyed_request_gets_503_while_the_store_is_down(fake, gateway):
    store = FlakyStore()
    client, _ = await gateway(config(fake.url), store=store)
    store.down = True
    status, headers, body = await call(client, key="k-down")
    assert status == 503
    err = openai_error(body)
    assert err["code"] == "store_unavailable"
    assert "idempotency store unavailable" in err["message"] and "without an idempotency key" in err["message"]
    assert headers["Retry-After"] == "1"
    assert fake.requests == []

    assert (await call(client))[0] == 200  # without a key nothing needs the store
    assert len(fake.requests) == 1
    store.down = False
    assert (await call(client, key="k-down"))[0] == 200
    assert len(fake.requests) == 2


async def test_fail_open_runs_keyed_requests_without_idempotency_while_the_store_is_down(fake, gateway):
    store = FlakyStore()
    client, _ = await gateway(config(fake.url, store={"fail_open": True}), store=store)
    store.down = True
    for _ in range(2):
        status, headers, _ = await call(client, key="k-open")
        assert status == 200 and REPLAYED not in headers
    assert (await call(client))[0] == 200
    assert len(fake.requests) == 3


# =============================================================== two gateways on one store


async def test_a_deeply_nested_json_body_with_a_key_is_never_a_500(fake, gateway):
    client, _ = await gateway(f"""
targets:
  api: {{base_url: "{fake.url}/api", idempotency: {{ttl_s: 60}}}}
""")
    deep = b"[" * 5000 + b"]" * 5000
    headers = {"Content-Type": "application/json", "Idempotency-Key": "deep-1"}
    first = await client.post("/t/api/things", data=deep, headers=headers)
    again = await client.post("/t/api/things", data=deep, headers=headers)
    assert first.status == 200 and again.status == 200 and len(fake.requests) == 1
