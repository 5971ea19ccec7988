"""POST /proxy/http, the ReliAPI seed's envelope for any HTTP API (SPEC §2): the seed's README
example, the policies applied through it, and bad envelopes."""

from __future__ import annotations

import asyncio
import base64

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.support.config import GatewayConfig
from tests.support.fakes import Fault
from tests.support.gateway import settle


def config(url: str, cfg: GatewayConfig | None = None) -> GatewayConfig:
    """Tenant ``acme``; ``my_api`` (plain HTTP, a static upstream token, cached, one 5xx retry) — after
    the targets of ``cfg`` when given."""
    cfg = (cfg or GatewayConfig(url)).tenant("acme", api_key="acme-key-0001")
    return cfg.target("my_api", f"{url}/api", auth={"type": "bearer_static", "token": "sk-upstream-123"},
                      cache={"ttl_s": 60}, retry_matrix={"5xx": {"attempts": 1, "base_s": 0}})


KEY = {"X-API-Key": "acme-key-0001"}



async def test_the_seed_example(fake, gateway):
    client, logs = await gateway(config(fake.url))
    resp = await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "GET", "path": "/users/123", "idempotency_key": "req-123"})
    body = await resp.json()
    assert resp.status == 200 and body["success"] is True
    assert body["data"]["status_code"] == 200 and body["data"]["body"]["path_qs"] == "/api/users/123"
    assert body["meta"]["target"] == "my_api" and body["meta"]["retries"] == 0
    assert body["meta"]["request_id"] == resp.headers["X-Request-Id"]
    seen = fake.requests[0]
    assert seen.method == "GET" and seen.headers["Authorization"] == "Bearer sk-upstream-123"
    assert "acme-key-0001" not in str(seen.headers)
    assert logs[-1]["route"] == "proxy" and logs[-1]["tenant"] == "acme"


async def test_method_headers_query_and_json_body_reach_the_upstream(fake, gateway):
    client, _ = await gateway(config(fake.url))
    await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "post", "path": "orders", "query": {"expand": "items", "n": 2},
        "headers": {"X-Trace": "t-1"}, "body": {"sku": "A1", "qty": 3}})
    seen = fake.requests[0]
    assert seen.method == "POST" and seen.path_qs == "/api/orders?expand=items&n=2"
    assert seen.headers["X-Trace"] == "t-1" and seen.json() == {"sku": "A1", "qty": 3}


async def test_the_pipeline_applies_cache_retries_and_idempotency(fake, gateway):
    client, _ = await gateway(config(fake.url))
    envelope = {"target": "my_api", "method": "GET", "path": "/report"}
    first = await (await client.post("/proxy/http", headers=KEY, json=envelope)).json()
    await settle(client)
    second = await (await client.post("/proxy/http", headers=KEY, json=envelope)).json()
    assert first["meta"]["cache_hit"] is False and second["meta"]["cache_hit"] is True and len(fake.requests) == 1
    fake.plan(Fault(status=503), Fault())
    retried = await (await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "POST", "path": "/pay", "idempotency_key": "pay-1"})).json()
    assert retried["success"] is True and retried["meta"]["retries"] == 1
    replay = await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "POST", "path": "/pay", "idempotency_key": "pay-1"})
    assert (await replay.json())["meta"]["idempotent_hit"] is True and len(fake.requests) == 3


async def test_an_upstream_error_is_unsuccessful_and_keeps_its_status(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(status=404, error_message="no such user"))
    resp = await client.post("/proxy/http", headers=KEY, json={"target": "my_api", "method": "DELETE", "path": "/u/9"})
    body = await resp.json()
    assert resp.status == 404 and body["success"] is False and body["data"]["status_code"] == 404
    assert body["error"]["type"] == "client_error" and body["error"]["status_code"] == 404


@pytest.mark.parametrize(("envelope", "status", "code"), [
    ({"method": "GET", "path": "/x"}, 400, "invalid_request"),
    ({"target": "nope", "method": "GET", "path": "/x"}, 404, "unknown_target"),
    ({"target": "my_api", "method": "GET", "path": "/../admin"}, 400, "invalid_request"),
    ({"target": "my_api", "method": "GET", "path": "//evil.example/x"}, 400, "invalid_request"),
    ({"target": "my_api", "method": "BREW"}, 400, "invalid_request"),
    ({"target": "my_api", "method": "GET", "cache": -1}, 400, "invalid_request"),
    ({"target": "my_api", "method": "GET", "bogus": 1}, 400, "invalid_request"),
    ({"target": "my_api", "method": "GET", "path": "/x", "headers": {"X-A": "v\r\nInjected: 1"}}, 400, "invalid_request"),
    ({"target": "my_api", "method": "GET", "path": "/x", "headers": {"Bad Name": "v"}}, 400, "invalid_request"),
    ({"target": "my_api", "method": "GET", "path": "/x", "query": "a=1 HTTP/1.1\r\nX: y"}, 400, "invalid_request"),
])
async def test_bad_envelopes_never_reach_an_upstream(fake, gateway, envelope, status, code):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/http", headers=KEY, json=envelope)
    body = await resp.json()
    assert resp.status == status and body["success"] is False and body["error"]["code"] == code
    assert fake.requests == []


async def test_the_envelope_needs_the_tenant_key(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/http", json={"target": "my_api"})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"


async def test_a_deeply_nested_envelope_body_is_a_400_not_a_500(fake, gateway):
    client, _ = await gateway(config(fake.url))
    deep = b'{"target": "my_api", "path": "/x", "body": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    resp = await client.post("/proxy/http", headers={**KEY, "Content-Type": "application/json"}, data=deep)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"
    assert fake.requests == []


async def test_a_non_ascii_query_reaches_the_upstream_percent_encoded_as_utf8(fake, gateway):
    client, _ = await gateway(config(fake.url))
    await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "GET", "path": "/search", "query": "q=café au lait&tag=#x&lang=中文&n=100%&kept=%C3%A9&ok=a/b?c"})
    await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "GET", "path": "/search", "query": {"café": "中 文", "tags": ["é", "a&b"]}})
    assert [seen.path_qs for seen in fake.requests] == [
        "/api/search?q=caf%C3%A9%20au%20lait&tag=%23x&lang=%E4%B8%AD%E6%96%87&n=100%25&kept=%C3%A9&ok=a/b?c",
        "/api/search?caf%C3%A9=%E4%B8%AD+%E6%96%87&tags=%C3%A9&tags=a%26b",
    ]


@pytest.mark.parametrize("value", ["\x85", "a\rb", "a\nX-Injected: 1", "\x00"])
async def test_a_header_value_http_cannot_carry_is_a_400_naming_the_header(fake, gateway, value):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "GET", "path": "/x", "headers": {"X-Ok": "fine\tvalue", "X-Title": value}})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_request", body
    assert "headers.X-Title" in body["error"]["message"] and body["meta"]["request_id"] == resp.headers["X-Request-Id"]
    assert fake.requests == []


@pytest.mark.parametrize("value", ["café", "\u4e2d\u6587", "MyApp/1.0 (José)"])
async def test_utf8_text_in_a_header_value_is_relayed_as_utf8(fake, gateway, value):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/http", headers=KEY, json={
        "target": "my_api", "method": "GET", "path": "/x", "headers": {"X-Title": value}})
    assert resp.status == 200, await resp.text()
    assert fake.requests[0].headers["X-Title"].encode("utf-8", "surrogateescape") == value.encode()


async def test_a_streamed_2xx_answer_is_carried_whole_in_the_envelope(fake, gateway):
    """An SSE (or any chunked) answer through /proxy/http: read to its end into data.body, never null."""
    client, _ = await gateway(config(fake.url, GatewayConfig(fake.url).up("llm", models=None)))
    envelope = {"target": "llm", "method": "POST", "path": "chat/completions",
                "body": {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}}
    resp = await client.post("/proxy/http", json=envelope, headers=KEY)
    out = await resp.json()
    assert resp.status == 200 and out["success"] is True
    body = out["data"]["body"]
    assert isinstance(body, str) and body.count("tok") == 3 and body.endswith("data: [DONE]\n\n")


async def _odd_upstream(aiohttp_server):
    """Answers ``/api/binary`` with every byte value and ``/api/cookies`` with repeated headers."""
    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)), content_type="application/octet-stream")

    async def cookies(request: web.Request) -> web.Response:
        headers = CIMultiDict([("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"),
                               ("X-Multi", "one"), ("x-multi", "two")])
        return web.Response(text="ok", headers=headers)

    app = web.Application()
    app.router.add_get("/api/binary", binary)
    app.router.add_get("/api/cookies", cookies)
    return await aiohttp_server(app)


async def test_a_body_that_is_no_text_comes_back_base64_byte_for_byte(aiohttp_server, gateway):
    up = await _odd_upstream(aiohttp_server)
    client, _ = await gateway(config(str(up.make_url(""))))
    resp = await client.post("/proxy/http", headers=KEY, json={"target": "my_api", "method": "GET", "path": "/binary"})
    data = (await resp.json())["data"]
    assert data["body_encoding"] == "base64" and base64.b64decode(data["body"]) == bytes(range(256))
    text = await client.post("/proxy/http", headers=KEY, json={"target": "my_api", "method": "GET", "path": "/cookies"})
    assert "body_encoding" not in (await text.json())["data"]  # text stays text


async def test_a_repeated_answer_header_keeps_every_value(aiohttp_server, gateway):
    up = await _odd_upstream(aiohttp_server)
    client, _ = await gateway(config(str(up.make_url(""))))
    resp = await client.post("/proxy/http", headers=KEY, json={"target": "my_api", "method": "GET", "path": "/cookies"})
    headers = (await resp.json())["data"]["headers"]
    assert headers["Set-Cookie"] == "a=1; Path=/, b=2; HttpOnly" and headers["X-Multi"] == "one, two"


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_the_idempotency_headers_work_like_the_body_field(fake, gateway, header):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(delay_ms=200))
    envelope = {"target": "my_api", "method": "POST", "path": "/pay", "body": {"amount": 5}}

    async def call() -> dict:
        return await (await client.post("/proxy/http", json=envelope, headers={**KEY, header: "pay-9"})).json()

    answers = await asyncio.gather(call(), call())
    assert len(fake.requests) == 1 and sorted(a["meta"]["idempotent_hit"] for a in answers) == [False, True]
    assert (await call())["meta"]["idempotent_hit"] is True and len(fake.requests) == 1


async def test_an_envelope_without_a_method_is_a_400_naming_it(fake, gateway):
    """SPEC §2 lists ``method`` as required: no silent GET in its place."""
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/http", headers=KEY, json={"target": "my_api", "path": "/orders"})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_request" and "method" in body["error"]["message"]
    assert fake.requests == []
    resp = await client.post("/proxy/http", headers=KEY, json={"target": "my_api", "method": "GET /x", "path": "/"})
    assert resp.status == 400 and "method" in (await resp.json())["error"]["message"] and fake.requests == []
