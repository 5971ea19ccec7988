"""Idempotency keys, continued (SPEC §5 "Idempotency", TC06–TC11): what releases a key and what keeps it —
failures, the gateway's own rejections, lock expiry and fencing, TTL, key syntax, which upstream answers are
stored, streams, a store that is down, and two gateways on one store (``tests/test_idempotency.py`` has TC01–TC05).

The fake upstream answers ``model: gpt-answer-<n>`` for its n-th call (``numbered``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from multidict import CIMultiDict

from gateway.flow.exchange import Reply
from gateway.state.flights import Entry, Flights, Lead
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from tests.support.fakes import Fault
from tests.support.idempotency import (
    ALPHA,
    CHAT,
    CHAT_PATH,
    CLAUDE,
    REPLAYED,
    STREAM,
    call,
    config,
    model_of,
    numbered,
    openai_error,
    post,
    starter,
    store_key,
    until,
)


@pytest.fixture
def start(fake, gateway, clock):
    return starter(fake, gateway, clock)


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


class PausingStore(MemoryStore):
    """A store that does not take a flight's log or final writes while ``paused`` — as a Redis that paused (or
    failed over) mid-stream; reads and claims still answer."""

    paused = False

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        if self.paused:
            raise StoreError("redis append skipped: the store did not answer within 2 s just now")
        return await super().append(*args, **kwargs)

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.paused:
            raise StoreError("redis commit skipped: the store did not answer within 2 s just now")
        return await super().commit(*args, **kwargs)


async def test_a_stream_whose_store_paused_mid_flight_is_stored_once_it_answers_and_never_run_twice(fake, gateway):
    """The final writes are tried again once the store answers: a duplicate then gets the whole answer replayed
    (it used to wait 30 s on a lock nobody ran under, get half the stream, and run the key again later), and a
    follower reading the log that stopped is told at once, not at its idle timeout."""
    store = PausingStore()
    a, _ = await gateway(config(fake.url), store=store)
    b, _ = await gateway(config(fake.url), store=store)  # another gateway on the same store
    fake.plan(Fault(chunks=12, interval_ms=40))
    leader = await post(a, STREAM, key="paused-1")
    await leader.content.readuntil(b"tok0")
    follower = await post(b, STREAM, key="paused-1")  # joins on the other gateway: reads the log
    assert follower.status == 200
    await follower.content.readuntil(b"tok1")
    store.paused = True
    assert (await leader.read()).endswith(b"data: [DONE]\n\n")  # the leader's own client gets all of it
    store.paused = False
    rest = await asyncio.wait_for(follower.read(), 5)  # ended now, not after an idle timeout
    assert b"could not be shared" in rest and b"[DONE]" not in rest
    await until(lambda: store._data.get(store_key("paused-1"), (b"",))[0][:1] == b"D")  # stored once it answered
    status, headers, body = await call(b, STREAM, key="paused-1")
    assert status == 200 and headers[REPLAYED] == "true" and body.count(b"tok") == 12 and body.endswith(b"[DONE]\n\n")
    assert len(fake.requests) == 1


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
