"""Response cache (SPEC §5 "Cache", RELIABILITY-NOTES §5, TC35–TC38).

Off unless a target has a ``cache:`` block. Plain-HTTP targets cache GET/HEAD; LLM targets
their chat/completions, embeddings and messages POSTs (never ``n > 1``). Entries are keyed
by the server-derived tenant, so one tenant never receives another's answer; a stream and a
non-stream never share one. Request ``Cache-Control`` (no-cache / no-store /
only-if-cached) is honoured; non-2xx answers, cut streams, upstream ``no-store`` /
``private`` and oversized answers are never stored. Concurrent identical misses make one
upstream call; entries expire after their TTL; a store that is down turns the cache into
a pass-through; gateways sharing a store share its entries.

Every answer says ``X-Cache: HIT|MISS|BYPASS``; a hit also ``X-Cached: true`` and ``Age``.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from tests.support.config import NO_5XX_RETRY, PASSTHROUGH, GatewayConfig
from tests.support.fakes import Fault
from tests.support.gateway import settle
from tests.support.stores import drop, new_prefix, redis_store

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "what is the capital of France?"}],
        "temperature": 0}
STREAM = {**CHAT, "stream": True}
MESSAGES = {"model": "claude-test-1", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
CACHE_ON = {"ttl_s": 60}


def config(url: str, *, cache: dict | None = CACHE_ON, rest_cache: dict | None = ..., tenants: list[dict] = ()
           ) -> GatewayConfig:
    """Targets ``up`` (OpenAI), ``claude`` (Anthropic) and ``rest`` (plain HTTP echo), all with
    ``cache`` (``rest_cache`` instead for ``rest`` when given; ``None``: no block); 5xx answers are not retried."""
    cfg = GatewayConfig(url, default_target="up").tenants(*tenants)
    cfg.up(retry_matrix=NO_5XX_RETRY, cache=cache).claude(retry_matrix=NO_5XX_RETRY, cache=cache)
    return cfg.rest(auth=PASSTHROUGH, retry_matrix=NO_5XX_RETRY, cache=cache if rest_cache is ... else rest_cache)


def tenants_block(**a_fields: object) -> list[dict]:
    """Tenants ``a`` (with ``a_fields``) and ``b``."""
    return [{"name": "a", "api_key": KEY_A, **a_fields}, {"name": "b", "api_key": KEY_B}]


class Answer:
    """One response as the client saw it."""

    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def cache(self) -> str | None:
        return self.headers.get("X-Cache")

    def json(self) -> dict:
        return msgspec.json.decode(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, X-Cache={self.cache}, {self.body[:120]!r})"


async def send(client, method: str, path: str, *, json: dict | None = None, headers: dict | None = None) -> Answer:
    async with client.request(method, path, json=json, headers=headers) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


async def chat(client, body: dict = CHAT, *, path: str = "/v1/chat/completions", headers: dict | None = None) -> Answer:
    return await send(client, "POST", path, json=body, headers=headers)


async def get(client, path: str = "/t/rest/items?a=1", *, headers: dict | None = None) -> Answer:
    return await send(client, "GET", path, headers=headers)


def upstream_request_id(answer: Answer) -> str:
    """The request id the echo upstream received: which upstream call produced this body."""
    return {k.lower(): v for k, v in answer.json()["headers"].items()}["x-request-id"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)



def assert_hit(answer: Answer) -> None:
    assert answer.status == 200, answer
    assert answer.headers["X-Cache"] == "HIT" and answer.headers["X-Cached"] == "true", answer
    assert int(answer.headers["Age"]) >= 0


def assert_sse(answer: Answer) -> None:
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"].startswith("text/event-stream"), answer
    assert answer.body.endswith(b"data: [DONE]\n\n"), answer


@pytest.fixture
def start(fake, gateway, clock):
    async def make(**options):
        store = options.pop("store", None) or MemoryStore(clock=clock.time)
        client, logs = await gateway(config(fake.url, **options), clock=clock, store=store)
        return client, logs

    return make


# =============================================================== on and off


async def test_without_a_cache_block_every_request_reaches_the_upstream(fake, start):
    client, _ = await start(cache=None)
    for _ in range(2):
        answers = [await chat(client), await get(client), await chat(client, STREAM)]
        for answer in answers:
            assert answer.status == 200 and answer.cache == "BYPASS" and answer.headers["X-Cached"] == "false", answer
    assert len(fake.requests) == 6


async def test_a_target_without_a_cache_block_is_not_cached_when_another_target_is(fake, start):
    client, _ = await start(cache=CACHE_ON, rest_cache=None)  # no cache block for rest
    first, second = await get(client), await get(client)
    assert first.cache == second.cache == "BYPASS"
    assert len(fake.requests) == 2
    assert (await chat(client)).cache == "MISS" and (await chat(client)).cache == "HIT"
    assert len(fake.requests) == 3


async def test_get_is_a_miss_then_a_hit_with_the_same_body_and_one_upstream_call(fake, start, clock):
    client, logs = await start()
    miss = await get(client)
    assert miss.status == 200 and miss.cache == "MISS" and miss.headers["X-Cached"] == "false"
    assert "Age" not in miss.headers
    assert miss.json()["path_qs"] == "/api/items?a=1"

    clock.advance(7)
    hit = await get(client)
    assert_hit(hit)
    assert hit.body == miss.body  # the very bytes of the first answer (its echo carries the first request id)
    assert hit.headers["Age"] == "7"
    assert hit.headers["X-Upstream"] == "echo" and hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Request-Id"] != miss.headers["X-Request-Id"]  # its own id, not the stored one
    assert len(fake.requests) == 1
    assert [line.get("cache_hit") for line in logs] == [False, True]


async def test_query_order_does_not_matter_but_the_query_and_accept_do(fake, start):
    client, _ = await start()
    assert (await get(client, "/t/rest/items?a=1&b=2")).cache == "MISS"
    assert_hit(await get(client, "/t/rest/items?b=2&a=1"))
    assert (await get(client, "/t/rest/items?a=1&b=3")).cache == "MISS"
    assert (await get(client, "/t/rest/items?a=1&b=2", headers={"Accept": "text/csv"})).cache == "MISS"
    assert (await get(client, "/t/rest/other?a=1&b=2")).cache == "MISS"
    assert len(fake.requests) == 4


async def test_head_is_cached_apart_from_get(fake, start):
    client, _ = await start()
    got = await get(client)
    assert got.cache == "MISS" and got.body
    head = await send(client, "HEAD", "/t/rest/items?a=1")
    assert head.status == 200 and head.cache == "MISS" and head.body == b""  # not GET's entry
    assert [r.method for r in fake.requests] == ["GET", "HEAD"]
    again = await send(client, "HEAD", "/t/rest/items?a=1")
    assert_hit(again)
    assert again.body == b""
    assert_hit(await get(client))
    assert len(fake.requests) == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_other_methods_on_a_plain_http_target_are_never_cached(fake, start, method):
    client, _ = await start()
    answers = [await send(client, method, "/t/rest/items?a=1", json={"x": 1}) for _ in range(2)]
    assert [a.status for a in answers] == [200, 200]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert [r.method for r in fake.requests] == [method, method]
    assert (await get(client)).cache == "MISS"  # nor do they fill the GET entry


# =============================================================== LLM targets


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/t/up/chat/completions"])
async def test_identical_chat_posts_hit(fake, start, path):
    client, _ = await start()
    fake.plan(Fault(model="first-answer"))
    miss = await chat(client, path=path)
    assert miss.status == 200 and miss.cache == "MISS" and miss.json()["model"] == "first-answer"
    hit = await chat(client, path=path)
    assert_hit(hit)
    assert hit.body == miss.body and hit.json()["model"] == "first-answer"
    assert len(fake.requests) == 1


async def test_reordered_json_keys_hit_and_a_different_body_misses(fake, start):
    client, _ = await start()
    assert (await chat(client)).cache == "MISS"
    reordered = {"temperature": 0, "messages": [{"content": CHAT["messages"][0]["content"], "role": "user"}],
                 "model": "gpt-4o-mini"}
    raw = b'{ "temperature" : 0 ,"messages":[{"content":"what is the capital of France?","role":"user"}],\n "model":"gpt-4o-mini"}'
    assert_hit(await chat(client, reordered))
    async with client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
    assert len(fake.requests) == 1

    for other in ({**CHAT, "temperature": 1}, {**CHAT, "messages": [{"role": "user", "content": "and Spain?"}]},
                  {**CHAT, "model": "gpt-4o"}):
        assert (await chat(client, other)).cache == "MISS"
    assert len(fake.requests) == 4


async def test_n_greater_than_one_is_never_cached(fake, start):
    client, _ = await start()
    answers = [await chat(client, {**CHAT, "n": 2}) for _ in range(2)]
    assert [a.status for a in answers] == [200, 200]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert len(fake.requests) == 2
    assert (await chat(client, {**CHAT, "n": 1})).cache == "MISS"  # n: 1 is one answer: cached as usual
    assert_hit(await chat(client, {**CHAT, "n": 1}))
    assert len(fake.requests) == 3


async def test_embeddings_are_cached(fake, start):
    client, _ = await start()
    body = {"model": "text-embedding-3-small", "input": "hello"}
    miss = await chat(client, body, path="/v1/embeddings")
    assert miss.status == 200 and miss.cache == "MISS" and miss.json()["usage"]["prompt_tokens"] == 1
    assert fake.requests[0].path_qs == "/v1/embeddings"
    hit = await chat(client, body, path="/v1/embeddings")
    assert_hit(hit)
    assert hit.body == miss.body
    assert (await chat(client, {**body, "input": "bye"}, path="/v1/embeddings")).cache == "MISS"
    assert len(fake.requests) == 2


async def test_anthropic_messages_are_cached(fake, start):
    client, _ = await start()
    fake.plan(Fault(model="claude-first"))
    miss = await chat(client, MESSAGES, path="/v1/messages")
    assert miss.status == 200 and miss.cache == "MISS" and miss.json()["model"] == "claude-first"
    hit = await chat(client, MESSAGES, path="/v1/messages")
    assert_hit(hit)
    assert hit.body == miss.body
    assert len(fake.requests) == 1


async def test_other_llm_paths_are_not_cached(fake, start):
    client, _ = await start()
    answers = [await send(client, "POST", "/v1/files", json={"purpose": "x"}) for _ in range(2)]
    answers += [await send(client, "GET", "/v1/models/gpt-4o-mini") for _ in range(2)]
    assert [a.cache for a in answers] == ["BYPASS"] * 4
    assert len(fake.requests) == 4


async def test_a_non_json_body_on_a_cached_llm_path_still_reaches_the_upstream(fake, start):
    # (found by this test: the cache key once decoded every LLM body strictly and answered 400)
    client, _ = await start()
    async with client.post("/t/up/embeddings", data=b"input=hello", headers={"Content-Type": "text/plain"}) as resp:
        body = await resp.read()
        assert resp.status == 400 and b"could not parse the JSON body" in body, body  # the upstream's answer
    assert len(fake.requests) == 1 and fake.requests[0].body == b"input=hello"
    assert b"idempotency" not in body.lower()


# =============================================================== TC35 tenant isolation


async def test_tc35_another_tenant_never_gets_the_cached_answer(fake, start):
    client, logs = await start(tenants=tenants_block())
    fake.plan(Fault(model="answer-for-a"), Fault(model="answer-for-b"))
    a1 = await chat(client, headers=bearer(KEY_A))
    assert a1.status == 200 and a1.cache == "MISS" and a1.json()["model"] == "answer-for-a"
    assert_hit(await chat(client, headers=bearer(KEY_A)))

    b1 = await chat(client, headers={"X-API-Key": KEY_B})  # byte-identical body, other tenant
    assert b1.status == 200 and b1.cache == "MISS", b1
    assert b1.json()["model"] == "answer-for-b"
    assert len(fake.requests) == 2
    b2 = await chat(client, headers=bearer(KEY_B))
    assert_hit(b2)
    assert b2.json()["model"] == "answer-for-b"
    a2 = await chat(client, headers=bearer(KEY_A))
    assert_hit(a2)
    assert a2.json()["model"] == "answer-for-a"
    assert len(fake.requests) == 2
    assert [line["tenant"] for line in logs] == ["a", "a", "b", "b", "a"]


async def test_tc35_tenant_isolation_holds_for_streams(fake, start):
    client, _ = await start(tenants=tenants_block())
    fake.plan(Fault(model="stream-for-a"), Fault(model="stream-for-b"))
    a1 = await chat(client, STREAM, headers=bearer(KEY_A))
    assert_sse(a1)
    assert a1.cache == "MISS" and b"stream-for-a" in a1.body
    await settle(client)
    a2 = await chat(client, STREAM, headers=bearer(KEY_A))
    assert_hit(a2)
    assert a2.body == a1.body

    b1 = await chat(client, STREAM, headers=bearer(KEY_B))
    assert_sse(b1)
    assert b1.cache == "MISS" and b"stream-for-b" in b1.body and b"stream-for-a" not in b1.body
    assert len(fake.requests) == 2
    await settle(client)
    b2 = await chat(client, STREAM, headers=bearer(KEY_B))
    assert_hit(b2)
    assert b2.body == b1.body
    assert len(fake.requests) == 2


async def test_tc35_plain_http_entries_are_per_tenant_too(fake, start):
    client, _ = await start(tenants=tenants_block())
    a1 = await get(client, headers=bearer(KEY_A))
    b1 = await get(client, headers=bearer(KEY_B))
    assert a1.cache == b1.cache == "MISS"
    assert upstream_request_id(a1) != upstream_request_id(b1)  # two upstream answers
    assert (await get(client, headers=bearer(KEY_B))).body == b1.body
    assert (await get(client, headers=bearer(KEY_A))).body == a1.body
    assert len(fake.requests) == 2


async def compressing_upstream(aiohttp_server) -> tuple[str, list]:
    """A plain-HTTP upstream that gzips its answer when the request's Accept-Encoding allows it."""
    seen: list = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding"))
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(PLAIN_JSON), headers={"Content-Encoding": "gzip",
                                                                         "Content-Type": "application/json"})
        return web.Response(body=PLAIN_JSON, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


PLAIN_JSON = b'{"answer": "forty-two"}'


@pytest.mark.parametrize("second", [{"Accept-Encoding": "identity"}, {}], ids=["identity", "no-accept-encoding"])
async def test_a_gzip_entry_is_never_served_to_a_client_that_did_not_ask_for_gzip(aiohttp_server, gateway, clock, second):
    # Bodies are stored as the upstream encoded them (auto_decompress=False), so Accept-Encoding
    # is part of the key: an entry filled by a gzip-accepting client (every SDK) must never reach
    # a client that asked for identity (found by this test).
    url, seen = await compressing_upstream(aiohttp_server)
    client, _ = await gateway(config(url), clock=clock, store=MemoryStore(clock=clock.time))
    async with client.get("/t/rest/report", headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as resp:
        assert resp.status == 200 and resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == PLAIN_JSON

    skip = ("Accept-Encoding",) if not second else ()
    async with client.get("/t/rest/report", headers=second, skip_auto_headers=skip, auto_decompress=False) as resp:
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers.get("Content-Encoding", "identity") == "identity", (resp.headers.get("X-Cache"), body)
        assert body == PLAIN_JSON
    async with client.get("/t/rest/report", headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as resp:
        assert resp.headers["X-Cache"] == "HIT" and gzip.decompress(await resp.read()) == PLAIN_JSON
    assert seen == ["gzip", "identity"]


# =============================================================== TC36 request Cache-Control


async def test_tc36_no_cache_skips_the_lookup_and_replaces_the_entry(fake, start):
    client, _ = await start()
    fake.plan(Fault(model="old"), Fault(model="fresh"))
    assert (await chat(client)).json()["model"] == "old"
    assert_hit(await chat(client))

    fresh = await chat(client, headers={"Cache-Control": "no-cache"})
    assert fresh.status == 200 and fresh.cache == "MISS" and fresh.json()["model"] == "fresh"
    assert len(fake.requests) == 2
    after = await chat(client)
    assert_hit(after)
    assert after.json()["model"] == "fresh"
    assert len(fake.requests) == 2


async def test_tc36_a_failed_no_cache_refresh_keeps_the_good_entry(fake, start):
    client, _ = await start()
    fake.plan(Fault(model="good"), Fault(status=500))
    assert (await chat(client)).json()["model"] == "good"
    failed = await chat(client, headers={"Cache-Control": "no-cache"})
    assert failed.status == 500
    after = await chat(client)
    assert_hit(after)
    assert after.json()["model"] == "good" and len(fake.requests) == 2


async def test_without_tenants_two_passthrough_credentials_never_share_an_entry(fake, start):
    client, _ = await start()
    one = await get(client, headers={"Authorization": "Bearer sk-user-one"})
    other = await get(client, headers={"Authorization": "Bearer sk-user-two"})
    assert one.cache == other.cache == "MISS" and len(fake.requests) == 2
    assert_hit(await get(client, headers={"Authorization": "Bearer sk-user-one"}))
    assert len(fake.requests) == 2


async def test_without_tenants_a_second_cookie_header_splits_entries(fake, start):
    """Two users whose first Cookie header is the same and whose session is in a second one."""
    client, _ = await start()
    alice = await get(client, headers=CIMultiDict([("Cookie", "theme=dark"), ("Cookie", "session=alice")]))
    bob = await get(client, headers=CIMultiDict([("Cookie", "theme=dark"), ("Cookie", "session=bob")]))
    assert alice.cache == bob.cache == "MISS" and len(fake.requests) == 2
    assert fake.requests[1].headers.getall("Cookie") == ["theme=dark", "session=bob"]
    assert upstream_request_id(alice) != upstream_request_id(bob)
    again = await get(client, headers=CIMultiDict([("Cookie", "theme=dark"), ("Cookie", "session=alice")]))
    assert_hit(again)
    assert upstream_request_id(again) == upstream_request_id(alice)


async def test_a_header_listed_in_vary_headers_splits_entries(fake, start):
    """A passthrough API that authenticates with its own header: listed in cache.vary_headers."""
    client, _ = await start(rest_cache={"ttl_s": 60, "vary_headers": ["X-Auth-Token"]})
    alice = await get(client, headers={"X-Auth-Token": "alice-token"})
    bob = await get(client, headers={"X-Auth-Token": "bob-token"})
    assert alice.cache == bob.cache == "MISS" and len(fake.requests) == 2
    assert "bob-token" in str(bob.json()["headers"]) and "alice-token" not in str(bob.json()["headers"])
    assert_hit(await get(client, headers={"X-Auth-Token": "alice-token"}))
    assert len(fake.requests) == 2


async def test_the_upstreams_vary_is_honoured_for_a_header_the_key_does_not_hold(fake, start):
    fake.script = lambda n, seen: Fault(headers={"Vary": "Accept-Encoding, X-Auth-Token"})
    client, _ = await start()
    alice = await get(client, headers={"X-Auth-Token": "alice-token"})
    await settle(client)
    bob = await get(client, headers={"X-Auth-Token": "bob-token"})
    assert alice.cache == bob.cache == "MISS" and len(fake.requests) == 2
    assert "bob-token" in str(bob.json()["headers"]) and "alice-token" not in str(bob.json()["headers"])
    again = await get(client, headers={"X-Auth-Token": "alice-token"})
    assert_hit(again)
    assert "alice-token" in str(again.json()["headers"]) and len(fake.requests) == 2


async def test_a_concurrent_duplicate_does_not_share_an_answer_that_varies_on_its_own_header(fake, start):
    fake.script = lambda n, seen: Fault(headers={"Vary": "X-Auth-Token"}, delay_ms=100)
    client, _ = await start()
    alice, bob = await asyncio.gather(get(client, headers={"X-Auth-Token": "alice-token"}),
                                      get(client, headers={"X-Auth-Token": "bob-token"}))
    assert len(fake.requests) == 2
    assert "alice-token" in str(alice.json()["headers"]) and "bob-token" in str(bob.json()["headers"])


async def test_vary_star_is_never_stored(fake, start):
    fake.script = lambda n, seen: Fault(headers={"Vary": "*"})
    client, _ = await start()
    await get(client)
    await settle(client)
    assert (await get(client)).cache == "MISS" and len(fake.requests) == 2


async def test_set_cookie_goes_to_the_client_that_fetched_the_answer_never_to_another(fake, start):
    fake.script = lambda n, seen: Fault(headers={"Set-Cookie": f"session=SESS{n}; HttpOnly"}, delay_ms=100)
    client, _ = await start()
    first, follower = await asyncio.gather(get(client), get(client))  # the second coalesces with the first
    assert first.headers["Set-Cookie"] == "session=SESS1; HttpOnly"
    assert "Set-Cookie" not in follower.headers and upstream_request_id(follower) == upstream_request_id(first)
    await settle(client)
    client.session.cookie_jar.clear()  # another user: without the first one's cookie
    later = await get(client)
    assert_hit(later)
    assert "Set-Cookie" not in later.headers and len(fake.requests) == 1


async def test_a_stream_that_opens_with_an_error_event_is_not_stored(fake, start):
    client, _ = await start()
    body = {**CHAT, "stream": True}
    fake.plan(Fault(first_event_error="server_error"), Fault())
    await chat(client, body)
    await settle(client)
    assert (await chat(client, body)).cache == "MISS" and len(fake.requests) == 2


async def test_tc36_no_cache_on_a_miss_stores_the_answer(fake, start):
    client, _ = await start()
    first = await get(client, headers={"Cache-Control": "max-age=0, no-cache"})
    assert first.cache == "MISS"
    hit = await get(client)
    assert_hit(hit)
    assert hit.body == first.body
    assert len(fake.requests) == 1


async def test_tc36_no_store_calls_the_upstream_and_stores_nothing(fake, start):
    client, _ = await start()
    fake.plan(Fault(model="not-stored"), Fault(model="stored"))
    answer = await chat(client, headers={"Cache-Control": "no-store"})
    assert answer.status == 200 and answer.cache == "BYPASS" and answer.json()["model"] == "not-stored"
    later = await chat(client)
    assert later.cache == "MISS" and later.json()["model"] == "stored"
    assert len(fake.requests) == 2


async def test_tc36_no_store_leaves_an_existing_entry_alone(fake, start):
    client, _ = await start()
    fake.plan(Fault(model="cached"), Fault(model="uncached"))
    assert (await chat(client)).cache == "MISS"
    # SPEC §5: no-store skips read and write — the upstream answers, the entry stays as it was
    answer = await chat(client, headers={"Cache-Control": "no-store"})
    assert answer.cache == "BYPASS" and answer.json()["model"] == "uncached"
    after = await chat(client)
    assert_hit(after)
    assert after.json()["model"] == "cached"
    assert len(fake.requests) == 2


def _openai_not_cached(answer: Answer) -> None:
    error = answer.json()["error"]
    assert error["code"] == "not_cached" and "only-if-cached" in error["message"]


def _anthropic_not_cached(answer: Answer) -> None:
    body = answer.json()
    assert body["type"] == "error" and "only-if-cached" in body["error"]["message"]


def _envelope_not_cached(answer: Answer) -> None:
    body = answer.json()
    assert body["success"] is False and body["error"]["code"] == "not_cached"
    assert body["error"]["target"] == "rest"


ONLY_IF_CACHED = {
    "openai": (lambda c, h: chat(c, headers=h), _openai_not_cached),
    "anthropic": (lambda c, h: chat(c, MESSAGES, path="/v1/messages", headers=h), _anthropic_not_cached),
    "envelope": (lambda c, h: get(c, headers=h), _envelope_not_cached),
}


@pytest.mark.parametrize("dialect", list(ONLY_IF_CACHED))
async def test_tc36_only_if_cached_on_a_miss_is_504_without_an_upstream_call(fake, start, dialect):
    ask, check = ONLY_IF_CACHED[dialect]
    client, _ = await start()
    answer = await ask(client, {"Cache-Control": "only-if-cached"})
    assert answer.status == 504, answer
    check(answer)
    assert fake.requests == []

    stored = await ask(client, None)
    assert stored.status == 200 and stored.cache == "MISS"
    hit = await ask(client, {"Cache-Control": "only-if-cached"})
    assert_hit(hit)
    assert hit.body == stored.body
    assert len(fake.requests) == 1


# =============================================================== TC37 never stored


async def test_tc37_an_upstream_500_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(status=500))
    failed = await chat(client)
    assert failed.status == 500 and failed.cache == "MISS"
    ok = await chat(client)
    assert ok.status == 200 and ok.cache == "MISS"
    assert_hit(await chat(client))
    assert len(fake.requests) == 2


async def test_tc37_a_404_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(status=404))
    missing = await get(client)
    assert missing.status == 404 and missing.cache == "MISS"
    found = await get(client)
    assert found.status == 200 and found.cache == "MISS"
    assert_hit(await get(client))
    assert len(fake.requests) == 2


async def test_tc37_a_stream_cut_mid_way_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, cut_after=2))
    cut = await chat(client, STREAM)
    assert cut.status == 200 and b"[DONE]" not in cut.body and b'"error"' in cut.body  # the in-band error
    await settle(client)
    whole = await chat(client, STREAM)
    assert_sse(whole)
    assert whole.cache == "MISS"
    assert len(fake.requests) == 2
    await settle(client)
    replay = await chat(client, STREAM)
    assert_hit(replay)
    assert replay.body == whole.body
    assert len(fake.requests) == 2


@pytest.mark.parametrize("directive", ["no-store", "private", "private, max-age=600", "max-age=60, no-store"])
async def test_tc37_upstream_no_store_or_private_is_not_stored(fake, start, directive):
    client, _ = await start()
    fake.plan(*[Fault(headers={"Cache-Control": directive})] * 4)
    chats = [await chat(client) for _ in range(2)]
    gets = [await get(client) for _ in range(2)]
    assert all(a.status == 200 and a.cache == "MISS" for a in chats + gets), chats + gets
    assert len(fake.requests) == 4


async def test_tc37_a_stream_with_upstream_no_store_is_not_stored(fake, start):
    client, _ = await start()
    fake.plan(Fault(headers={"Cache-Control": "no-store"}))
    first = await chat(client, STREAM)
    assert_sse(first)
    await settle(client)
    second = await chat(client, STREAM)
    assert_sse(second)
    assert first.cache == second.cache == "MISS"
    assert len(fake.requests) == 2


# =============================================================== TC38 streams


async def test_tc38_stream_and_non_stream_are_different_entries(fake, start):
    # (A stream is asked for by the body's "stream" or by Accept, both already in the key, so the
    # key's own stream flag cannot be told apart from outside: this checks what a client sees.)
    client, _ = await start()
    plain = await chat(client)
    assert plain.cache == "MISS" and plain.headers["Content-Type"].startswith("application/json")
    streamed = await chat(client, STREAM)
    assert_sse(streamed)
    assert streamed.cache == "MISS"
    assert len(fake.requests) == 2
    await settle(client)

    plain_hit, stream_hit = await chat(client), await chat(client, STREAM)
    assert_hit(plain_hit)
    assert_hit(stream_hit)
    assert plain_hit.body == plain.body and plain_hit.headers["Content-Type"].startswith("application/json")
    assert stream_hit.body == streamed.body
    assert len(fake.requests) == 2


async def test_tc38_stream_by_accept_header_is_not_served_the_json_entry(fake, start):
    client, _ = await start()
    assert (await chat(client)).cache == "MISS"
    sse = await chat(client, headers={"Accept": "text/event-stream"})  # same body, asks for a stream
    assert sse.cache == "MISS"
    assert len(fake.requests) == 2


async def test_tc38_a_cached_stream_replays_as_the_same_events(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, interval_ms=20))
    first = await chat(client, STREAM)
    assert_sse(first)
    assert first.cache == "MISS"
    assert first.body.count(b"tok") == 5
    await settle(client)

    replay = await chat(client, STREAM)
    assert_hit(replay)
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    assert replay.body == first.body  # every event, in order (a new upstream call would carry another id)
    assert len(fake.requests) == 1


async def test_anthropic_stream_is_cached_and_replayed(fake, start):
    client, _ = await start()
    body = {**MESSAGES, "stream": True}
    first = await chat(client, body, path="/v1/messages")
    assert first.status == 200 and first.cache == "MISS" and b"message_stop" in first.body
    await settle(client)
    replay = await chat(client, body, path="/v1/messages")
    assert_hit(replay)
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    assert replay.body == first.body
    assert len(fake.requests) == 1


# =============================================================== single flight


async def test_concurrent_identical_misses_make_one_upstream_call(fake, start):
    client, _ = await start()
    fake.plan(Fault(delay_ms=300))
    answers = await asyncio.gather(*(get(client) for _ in range(5)))
    assert len(fake.requests) == 1
    assert all(a.status == 200 for a in answers), answers
    assert len({a.body for a in answers}) == 1  # one echo (one upstream request id) for all
    assert all(a.cache in ("MISS", "HIT") for a in answers)
    assert_hit(await get(client))
    assert len(fake.requests) == 1


async def test_concurrent_identical_chat_misses_make_one_upstream_call(fake, start):
    client, _ = await start()
    fake.plan(Fault(delay_ms=300, model="the-one"))
    answers = await asyncio.gather(*(chat(client) for _ in range(5)))
    assert len(fake.requests) == 1
    assert all(a.status == 200 and a.json()["model"] == "the-one" for a in answers), answers
    assert len({a.body for a in answers}) == 1


async def test_concurrent_identical_stream_misses_share_one_upstream_stream(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, interval_ms=80))
    answers = await asyncio.gather(*(chat(client, STREAM) for _ in range(5)))
    assert len(fake.requests) == 1
    for answer in answers:
        assert_sse(answer)
    assert len({a.body for a in answers}) == 1
    assert answers[0].body.count(b"tok") == 5


async def test_concurrent_misses_that_fail_share_the_failure_and_a_retry_runs_again(fake, start):
    client, _ = await start()
    fake.plan(Fault(status=500, delay_ms=300))
    answers = await asyncio.gather(*(chat(client) for _ in range(3)))
    assert [a.status for a in answers] == [500, 500, 500]
    assert len(fake.requests) == 1
    await settle(client)
    assert (await chat(client)).status == 200
    assert len(fake.requests) == 2


async def test_different_requests_are_not_coalesced(fake, start):
    client, _ = await start()
    fake.script = lambda n, seen: Fault(delay_ms=200)
    answers = await asyncio.gather(*(get(client, f"/t/rest/items?i={i}") for i in range(4)))
    assert all(a.status == 200 and a.cache == "MISS" for a in answers)
    assert len(fake.requests) == 4


async def test_a_follower_gets_the_whole_stream_when_the_first_client_goes_away(fake, start):
    client, _ = await start()
    fake.plan(Fault(chunks=5, interval_ms=80))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # the first client has its first event …
    follower = asyncio.ensure_future(chat(client, STREAM))
    await asyncio.sleep(0.05)
    resp.close()  # … and leaves; the follower waits for the same upstream answer
    answer = await follower
    assert_sse(answer)
    assert answer.body.count(b"tok") == 5 and answer.body.startswith(b'data: {"id":"chatcmpl-fake1"')
    assert len(fake.requests) == 1


# =============================================================== TTL


async def test_an_entry_expires_after_ttl_s(fake, start, clock):
    client, _ = await start()
    fake.plan(Fault(model="early"), Fault(model="late"))
    assert (await chat(client)).json()["model"] == "early"
    clock.advance(59)
    near_end = await chat(client)
    assert_hit(near_end)
    assert near_end.headers["Age"] == "59" and near_end.json()["model"] == "early"
    clock.advance(2)
    expired = await chat(client)
    assert expired.cache == "MISS" and expired.json()["model"] == "late"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("override", ['{"*": 5}', "{up: 5}", "5"])
async def test_a_tenant_cache_ttl_override_shortens_the_ttl(fake, start, clock, override):
    client, _ = await start(tenants=tenants_block(cache_ttl_override=yaml.safe_load(override)))
    for key in (KEY_A, KEY_B):
        assert (await chat(client, headers=bearer(key))).cache == "MISS"
    clock.advance(6)
    assert (await chat(client, headers=bearer(KEY_A))).cache == "MISS"  # a's 5 s are over
    assert_hit(await chat(client, headers=bearer(KEY_B)))  # b keeps the target's 60 s
    assert len(fake.requests) == 3


async def test_a_tenant_override_for_another_target_does_not_apply(fake, start, clock):
    client, _ = await start(tenants=tenants_block(cache_ttl_override={"rest": 5}))
    assert (await chat(client, headers=bearer(KEY_A))).cache == "MISS"
    assert (await get(client, headers=bearer(KEY_A))).cache == "MISS"
    clock.advance(6)
    assert_hit(await chat(client, headers=bearer(KEY_A)))
    assert (await get(client, headers=bearer(KEY_A))).cache == "MISS"
    assert len(fake.requests) == 3


async def test_ttl_zero_means_not_cached(fake, start):
    client, _ = await start(cache={"ttl_s": 0})
    answers = [await chat(client), await chat(client), await get(client), await get(client)]
    assert [a.cache for a in answers] == ["BYPASS"] * 4
    assert len(fake.requests) == 4


async def test_enabled_false_means_not_cached(fake, start):
    client, _ = await start(cache={"enabled": False, "ttl_s": 60})
    answers = [await chat(client), await chat(client)]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert len(fake.requests) == 2


async def test_a_tenant_override_of_zero_turns_the_cache_off_for_that_tenant(fake, start):
    client, _ = await start(tenants=tenants_block(cache_ttl_override={"*": 0}))
    answers = [await chat(client, headers=bearer(KEY_A)) for _ in range(2)]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert (await chat(client, headers=bearer(KEY_B))).cache == "MISS"
    assert_hit(await chat(client, headers=bearer(KEY_B)))
    assert len(fake.requests) == 3


# =============================================================== size bound


async def test_an_answer_larger_than_max_entry_mb_is_returned_but_not_stored(fake, start):
    client, _ = await start(cache={"ttl_s": 60, "max_entry_mb": 0.0001})  # ~105 bytes
    first = await get(client)
    assert first.status == 200 and len(first.body) > 105
    assert first.json()["path_qs"] == "/api/items?a=1"  # whole, not truncated
    second = await get(client)
    assert second.status == 200 and second.cache == "MISS"
    assert len(fake.requests) == 2


async def test_a_stream_larger_than_max_entry_mb_is_relayed_whole_but_not_stored(fake, start):
    client, _ = await start(cache={"ttl_s": 60, "max_entry_mb": 0.0001})
    fake.plan(Fault(chunks=5))
    first = await chat(client, STREAM)
    assert_sse(first)
    assert first.body.count(b"tok") == 5
    await settle(client)
    second = await chat(client, STREAM)
    assert_sse(second)
    assert second.cache == "MISS"
    assert len(fake.requests) == 2


# =============================================================== store down


class BrokenStore(MemoryStore):
    """A store whose every key operation fails, as an unreachable Redis would."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.failures = 0

    def _fail(self, *args, **kwargs):
        self.failures += 1
        raise StoreError("connection refused")

    async def _afail(self, *args, **kwargs):
        self._fail()

    get = set = set_nx = claim = delete = compare_and_set = compare_and_delete = _afail
    append = range = publish = incr = ping = _afail

    @asynccontextmanager
    async def subscribe(self, channel) -> AsyncIterator:
        self._fail()
        yield


async def test_a_store_that_is_down_turns_the_cache_into_a_pass_through(fake, start, clock, caplog):
    caplog.set_level(logging.WARNING, logger="reliapi")
    store = BrokenStore(clock=clock.time)
    client, logs = await start(store=store)
    fake.plan(Fault(model="one"), Fault(model="two"))
    answers = [await chat(client), await chat(client)]
    assert [a.status for a in answers] == [200, 200]
    assert [a.json()["model"] for a in answers] == ["one", "two"]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    streamed = await chat(client, STREAM)
    assert_sse(streamed)
    assert streamed.cache == "BYPASS"
    got = await get(client)
    assert got.status == 200 and got.cache == "BYPASS"
    only = await chat(client, headers={"Cache-Control": "no-cache"})
    assert only.status == 200 and only.cache == "BYPASS"
    assert len(fake.requests) == 5
    assert store.failures >= 5
    assert all(line["status"] == 200 and line["error_code"] is None for line in logs)
    warnings = [r for r in caplog.records if r.name == "reliapi" and r.levelno == logging.WARNING
                and "cache" in r.getMessage() and "store" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]


# =============================================================== shared between gateways


async def test_two_gateways_on_one_memory_store_share_entries(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    one, _ = await gateway(config(fake.url), clock=clock, store=store)
    two, _ = await gateway(config(fake.url), clock=clock, store=store)
    fake.plan(Fault(model="from-one"))
    first = await chat(one)
    assert first.cache == "MISS"
    hit = await chat(two)
    assert_hit(hit)
    assert hit.body == first.body and hit.json()["model"] == "from-one"

    streamed = await chat(two, STREAM)
    assert streamed.cache == "MISS"
    await settle(one, two)
    replay = await chat(one, STREAM)
    assert_hit(replay)
    assert replay.body == streamed.body
    assert len(fake.requests) == 2


async def test_two_gateways_on_one_memory_store_coalesce_concurrent_misses(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    one, _ = await gateway(config(fake.url), clock=clock, store=store)
    two, _ = await gateway(config(fake.url), clock=clock, store=store)
    fake.plan(Fault(chunks=5, interval_ms=80))
    leader = asyncio.ensure_future(chat(one, STREAM))
    await eventually(lambda: len(fake.requests) == 1)
    followers = await asyncio.gather(*(chat(two, STREAM) for _ in range(2)))
    first = await leader
    assert len(fake.requests) == 1
    for answer in (first, *followers):
        assert_sse(answer)
    assert followers[0].body == followers[1].body == first.body


async def test_two_gateways_on_redis_share_entries(fake, gateway, clock):
    prefix = new_prefix()
    clients = []

    async def instance():
        """Another gateway instance: its own RedisStore (connection) on the same Redis and prefix."""
        client, _ = await gateway(config(fake.url), clock=clock, store=await redis_store(prefix))
        clients.append(client)
        return client

    try:
        one, two = await instance(), await instance()
        fake.plan(Fault(model="from-one"), Fault(chunks=5, interval_ms=20))
        first = await chat(one)
        assert first.cache == "MISS"
        await settle(one)
        hit = await chat(two)
        assert_hit(hit)
        assert hit.body == first.body and hit.json()["model"] == "from-one"

        streamed = await chat(one, STREAM)
        assert_sse(streamed)
        await settle(one)
        replay = await chat(two, STREAM)
        assert_hit(replay)
        assert replay.body == streamed.body

        got = await get(two)
        await settle(two)
        assert_hit(await get(one))
        assert got.cache == "MISS"
        assert len(fake.requests) == 3
    finally:
        for client in clients:
            await client.close()  # each gateway closes its own store
        await drop(await redis_store(prefix))


async def test_two_gateways_on_redis_coalesce_a_running_stream(fake, gateway, clock):
    prefix = new_prefix()
    clients = []

    async def instance():
        client, _ = await gateway(config(fake.url), clock=clock, store=await redis_store(prefix))
        clients.append(client)
        return client

    try:
        one, two = await instance(), await instance()
        fake.plan(Fault(chunks=5, interval_ms=80))
        leader = asyncio.ensure_future(chat(one, STREAM))
        await eventually(lambda: len(fake.requests) == 1)
        follower = await chat(two, STREAM)  # reads gateway one's answer from the Redis log
        first = await leader
        assert len(fake.requests) == 1
        assert_sse(first)
        assert_sse(follower)
        assert follower.body == first.body
    finally:
        for client in clients:
            await client.close()
        await drop(await redis_store(prefix))


class _LateClaimStore(MemoryStore):
    """A store that, once, applies a claim but answers too late (the client timed out): the lock is there,
    nobody holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.stall_next_claim = True

    async def claim(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        held = await super().claim(key, value, ttl_s)
        if self.stall_next_claim:
            self.stall_next_claim = False
            raise StoreError("timed out")
        return held


async def test_a_claim_the_store_applied_too_late_does_not_hold_the_next_request_back(fake, gateway):
    store = _LateClaimStore()
    client, _ = await gateway(config(fake.url), store=store)
    first = await client.post("/v1/chat/completions", json=CHAT)
    assert first.status == 200 and first.headers["X-Cache"] == "BYPASS"  # the store failed: passed through
    # the orphaned lock is taken back at once; without that, this request would wait on it for 30 s
    second = await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT), timeout=10)
    assert second.status == 200 and second.headers["X-Cache"] == "MISS"
