"""Bad input on the LLM paths (issue #5): a clear 400 naming the field, before anything is sent;
a provider answer that is not JSON is a 502 in the client's dialect, never a crash."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from tests.support.config import GatewayConfig

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-3-5-haiku-latest", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def config(url: str) -> GatewayConfig:
    return GatewayConfig(url, default_target="up").up().claude()


@pytest.mark.parametrize(("change", "param"), [
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 0}, "n"),
])
async def test_a_malformed_chat_request_is_400_naming_the_field(fake, gateway, change, param):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/v1/chat/completions", json={**CHAT, **change})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] == param and param.split("[")[0] in body["error"]["message"]
    assert fake.requests == []


async def test_an_anthropic_message_with_a_system_role_is_400_in_its_dialect(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/v1/messages", json={**MESSAGES, "messages": [{"role": "system", "content": "x"}]})
    body = await resp.json()
    assert resp.status == 400 and body["type"] == "error" and "messages[0].role" in body["error"]["message"]
    assert fake.requests == []


async def test_a_provider_answer_that_is_not_json_is_a_502(aiohttp_server, gateway, caplog):
    async def broken(request: web.Request) -> web.Response:
        return web.Response(body=b'{"id": "chatcmpl-1", "choices": [', content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    server = await aiohttp_server(app)
    client, logs = await gateway(config(str(server.make_url("")).rstrip("/")))
    with caplog.at_level(logging.WARNING, logger="reliapi"):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-broken-1"})
    body = await resp.json()
    assert resp.status == 502 and body["error"]["code"] == "upstream_error" and "not valid JSON" in body["error"]["message"]
    # logged once: the access line, with the request id, the code and what went wrong; no second line, no stack
    assert logs[-1]["request_id"] == "req-broken-1" and logs[-1]["error_code"] == "upstream_error"
    assert "not valid JSON" in logs[-1]["error_message"] and logs[-1]["upstream_status"] == 200
    assert not [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "req-broken-1"]


async def test_a_priced_complete_answer_says_what_it_cost(fake, gateway):
    capped = config(fake.url).up(llm={"hard_cost_cap_usd": 1})
    client, logs = await gateway(capped)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert float(resp.headers["X-ReliAPI-Cost-USD"]) == pytest.approx((5 * 0.15 + 4 * 0.60) / 1e6)
    assert logs[-1]["cost_usd"] == pytest.approx((5 * 0.15 + 4 * 0.60) / 1e6)
    assert resp.headers["X-ReliAPI-Cost-USD"] == "0.00000315"  # plain decimal, not 3.15e-06
    plain, logs = await gateway(config(fake.url))  # no caps, no budget: known before the body is sent, so said
    resp = await plain.post("/v1/chat/completions", json=CHAT)
    assert float(resp.headers["X-ReliAPI-Cost-USD"]) == pytest.approx(logs[-1]["cost_usd"])
    stream = await plain.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await stream.read()
    assert "X-ReliAPI-Cost-USD" not in stream.headers  # a stream's cost is known only after its headers


@pytest.mark.parametrize(("path", "raw"), [
    ("/v1/chat/completions", b'{"a":' * 1100 + b"1" + b"}" * 1100),  # nested past what can be read
    ("/v1/completions", b'{"model": "gpt-4o-mini", "messages": 1}'),
    ("/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x", "tool_calls": 1}]}'),
])
async def test_odd_shapes_are_never_a_500(fake, gateway, path, raw):
    capped = config(fake.url).up(llm={"hard_cost_cap_usd": 1})
    client, _ = await gateway(capped)
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status < 500, await resp.text()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_body_that_is_not_utf8_is_400_and_never_sent(fake, gateway, path):
    """JSON is UTF-8 (RFC 8259 §8.1): bytes that are not are refused, even in a field the gateway does not read."""
    client, _ = await gateway(config(fake.url))
    raw = b'{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"\xff\xfe bad"}]}'
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400 and "UTF-8" in body["error"]["message"]
    assert fake.requests == []


async def test_a_body_in_a_coding_the_gateway_cannot_read_and_routed_by_model_is_415(fake, gateway):
    client, _ = await gateway(GatewayConfig(fake.url).up())  # no default target: the model decides
    resp = await client.post("/v1/chat/completions", data=b"\x00\x01compressed?",
                             headers={"Content-Type": "application/json", "Content-Encoding": "foo"})
    body = await resp.json()
    assert resp.status == 415 and body["error"]["code"] == "unsupported_media_type"
    assert "X-ReliAPI-Target" in body["error"]["message"] and fake.requests == []


@pytest.mark.parametrize(("path", "body"), [
    ("/proxy/llm", {"target": "up", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/generate", {"prompt": "hi", "model": "gpt-4o-mini"}),
    ("/v1/chat/completions", {**CHAT, "model": "claude-3-5-haiku-latest"}),  # translated
    ("/v1/messages", {**MESSAGES, "model": "gpt-4o-mini"}),  # translated
])
async def test_a_2xx_json_answer_with_no_answer_in_it_is_a_502_where_the_gateway_must_read_it(
        aiohttp_server, gateway, path, body):
    """Nothing to put in an envelope or a translation: not an empty "success" (API.md: 502 upstream_error)."""
    async def odd(request: web.Request) -> web.Response:
        return web.json_response({"status": "queued", "id": "job-1"})

    app = web.Application()
    for route in ("/v1/chat/completions", "/v1/messages"):
        app.router.add_post(route, odd)
    server = await aiohttp_server(app)
    client, logs = await gateway(config(str(server.make_url("")).rstrip("/")))
    resp = await client.post(path, json=body)
    answer = await resp.json()
    assert resp.status == 502, answer
    assert "not a" in str(answer) and logs[-1]["error_code"] == "upstream_error"
    if path == "/proxy/llm":
        assert answer["error"]["status_code"] == 502  # the gateway's refusal of it, not the upstream's 200
