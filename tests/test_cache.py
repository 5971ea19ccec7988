"""Response cache (SPEC §5 "Cache", RELIABILITY-NOTES §5, TC35–TC38).

Off unless a target has a ``cache:`` block. Plain-HTTP targets cache GET/HEAD; LLM targets
their chat/completions, embeddings and messages POSTs (never ``n > 1``). Entries are keyed
by the server-derived tenant, so one tenant never receives another's answer; a stream and a
non-stream never share one. Request ``Cache-Control`` (no-cache / no-store /
only-if-cached) is honoured; non-2xx answers, cut streams, upstream ``no-store`` /
``private`` and oversized answers are never stored. Concurrent identical misses make one
upstream call; entries expire after their TTL; a store that is down turns the cache into
a pass-through; gateways sharing a store share its entries.

Every answer says ``X-Cache: HIT|MISS|BYPASS``; a hit also ``X-Cached: true`` and ``Age``. This file: on and off,
LLM paths, tenant isolation (TC35), request ``Cache-Control`` (TC36); ``tests/test_cache_storing.py`` the rest.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.store.memory import MemoryStore
from tests.support.caching import (
    CACHE_ON,
    CHAT,
    KEY_A,
    KEY_B,
    MESSAGES,
    STREAM,
    Answer,
    assert_hit,
    assert_sse,
    bearer,
    chat,
    config,
    get,
    send,
    starter,
    tenants_block,
    upstream_request_id,
)
from tests.support.fakes import Fault
from tests.support.gateway import settle


@pytest.fixture
def start(fake, gateway, clock):
    return starter(fake, gateway, clock)


# =============================================================== on and off


async def test_without_a_cache_block_every_request_reaches_the_upstream(fake, start):
    client, _ = await start(cache=None)
    for _ in range(2):
        answers = [await chat(client), await get(client), await chat(client, STREAM)]
        for answer in answers:
            assert answer.status == 200 and answer.cache == "BYPASS" and answer.headers["X-Cached"] == "false", answer
    assert len(fake.requests) == 6


async def test_an_error_the_gateway_answers_after_a_miss_says_miss(fake, start):
    """SPEC §2: X-Cache on every proxied answer — the gateway's own errors too."""
    client, _ = await start(cache=CACHE_ON)
    fake.plan(*[Fault(reset=True)] * 3)  # every attempt reset: a 502 of the gateway's own
    answer = await chat(client)
    assert answer.status == 502 and answer.cache == "MISS" and answer.headers["X-Cached"] == "false", answer


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


async def test_repeated_parameters_keep_their_order_in_the_key(fake, start):
    """Parameters are keyed in order of name, but a repeated one's values in the order sent: ``sort=name&sort=date``
    and ``sort=date&sort=name`` are different requests."""
    client, _ = await start()
    assert (await get(client, "/t/rest/items?sort=name&sort=date")).cache == "MISS"
    assert (await get(client, "/t/rest/items?sort=date&sort=name")).cache == "MISS"
    assert_hit(await get(client, "/t/rest/items?sort=name&sort=date"))
    assert [r.path_qs for r in fake.requests] == ["/api/items?sort=name&sort=date", "/api/items?sort=date&sort=name"]


async def test_a_range_request_passes_the_cache_by_and_a_206_is_never_stored(fake, start):
    """A 206 is part of an answer: stored, it would be served to every later plain GET."""
    client, _ = await start()
    fake.plan(Fault(status=206, headers={"Content-Range": "bytes 0-9/1024"}))
    part = await get(client, headers={"Range": "bytes=0-9"})
    assert part.status == 206 and part.cache == "BYPASS"
    fake.plan(Fault(status=206, headers={"Content-Range": "bytes 0-9/1024"}))  # unasked-for: not stored either
    assert (await get(client)).status == 206
    whole = await get(client)
    assert whole.status == 200 and whole.cache == "MISS"
    assert_hit(await get(client))
    assert (await get(client, headers={"Range": "bytes=0-9"})).cache == "BYPASS"  # not served the stored whole
    assert len(fake.requests) == 4


@pytest.mark.parametrize("header", [{"If-None-Match": '"v1"'}, {"If-Modified-Since": "Mon, 07 Dec 2026 00:00:00 GMT"},
                                    {"If-Range": '"v1"'}], ids=["if-none-match", "if-modified-since", "if-range"])
async def test_a_conditional_request_never_shares_a_flight_or_an_entry(fake, start, header):
    """A 304 for a client that holds a copy must never reach one that does not, nor a stored 200 replace the 304."""
    client, _ = await start()
    fake.plan(Fault(status=304, delay_ms=200))
    conditional = asyncio.create_task(get(client, headers=header))
    await asyncio.sleep(0.05)
    plain = await get(client)
    assert plain.status == 200 and plain.body and plain.cache == "MISS"
    answer = await conditional
    assert answer.status == 304 and answer.cache == "BYPASS"
    assert_hit(await get(client))
    assert len(fake.requests) == 2


@pytest.mark.parametrize("value", ["no-cache", "max-age=0", "s-maxage=0, public", "private, max-age=60", "no-store"])
async def test_a_plain_http_answer_to_revalidate_before_each_use_is_not_stored(fake, start, value):
    client, _ = await start()
    fake.plan(Fault(headers={"Cache-Control": value}))
    assert (await get(client)).cache == "MISS"
    assert (await get(client)).cache == "MISS"
    assert len(fake.requests) == 2


async def test_an_llm_answer_marked_no_cache_is_still_stored(fake, start):
    """Every SSE answer (OpenAI's too) says ``no-cache``: for an LLM target it does not keep the answer out."""
    client, _ = await start()
    fake.plan(Fault(headers={"Cache-Control": "no-cache"}))
    assert (await chat(client)).cache == "MISS"
    assert_hit(await chat(client))


@pytest.mark.parametrize("header", [{"Cache-Control": "max-age=0"}, {"Pragma": "no-cache"}], ids=["max-age-0", "pragma"])
async def test_a_request_asking_for_a_fresh_answer_skips_the_lookup_and_stores_it(fake, start, header):
    client, _ = await start()
    first = await get(client)
    fresh = await get(client, headers=header)
    assert fresh.status == 200 and fresh.cache == "MISS" and fresh.body != first.body  # the upstream's new answer
    again = await get(client)
    assert_hit(again)
    assert again.body == fresh.body
    assert len(fake.requests) == 2


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


async def test_llm_answers_hit_whatever_encoding_the_client_accepts(fake, start):
    """An LLM target is always asked for identity and its answer stored decoded: the openai SDK (gzip, deflate)
    and curl (no Accept-Encoding) get the same entry."""
    client, _ = await start()
    miss = await chat(client, headers={"Accept-Encoding": "gzip, deflate"})
    assert miss.cache == "MISS"
    hit = await chat(client, headers={"Accept-Encoding": "identity"})
    assert_hit(hit)
    assert hit.body == miss.body and "Content-Encoding" not in hit.headers
    assert len(fake.requests) == 1
    assert fake.requests[0].headers["Accept-Encoding"] == "identity"


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



async def test_anthropic_betas_and_versions_split_messages_entries(fake, start):
    """A beta changes the answer (interleaved thinking, 1M context, tool streaming): a request with one is never
    served the answer to the same body without it, nor to another beta; the same betas again hit."""
    client, _ = await start()
    plain = await chat(client, MESSAGES, path="/v1/messages")
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14"}
    thinking = await chat(client, MESSAGES, path="/v1/messages", headers=beta)
    other = await chat(client, MESSAGES, path="/v1/messages", headers={"anthropic-beta": "context-1m-2025-08-07"})
    older = await chat(client, MESSAGES, path="/v1/messages", headers={"anthropic-version": "2023-01-01"})
    assert [plain.cache, thinking.cache, other.cache, older.cache] == ["MISS"] * 4 and len(fake.requests) == 4
    assert fake.requests[1].headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert_hit(await chat(client, MESSAGES, path="/v1/messages", headers=beta))
    assert_hit(await chat(client, MESSAGES, path="/v1/messages"))
    assert len(fake.requests) == 4

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
