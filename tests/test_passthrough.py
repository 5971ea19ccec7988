"""/t/{target}/{path} and /v1/* forwarding rules: methods, queries, bodies, headers, errors (SPEC §2)."""

from __future__ import annotations

import base64

import msgspec
import pytest

from tests.support.config import llm_config
from tests.support.fakes import Fault
from tests.support.gateway import raw_http

ENV = {"UP_KEY": "sk-upstream-openai-123456", "CLAUDE_KEY": "sk-ant-upstream-654321"}


@pytest.fixture
async def gw(fake, gateway):
    return await gateway(llm_config(fake.url), env=ENV)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_methods_paths_and_queries_pass_through(gw, fake, method):
    client, logs = gw
    body = b'{"a": 1,  "b":[2]}' if method in ("POST", "PUT", "PATCH") else b""
    resp = await client.request(method, "/t/rest/users/42/items?b=2&a=1&a=0&q=x%20y", data=body)
    assert resp.status == 200
    echoed = await resp.json()
    assert echoed["method"] == method
    assert echoed["path_qs"] == "/api/users/42/items?b=2&a=1&a=0&q=x%20y"  # query order and encoding unchanged
    assert base64.b64decode(echoed["body_b64"]) == body  # byte for byte
    assert resp.headers["X-ReliAPI-Target"] == "rest"
    assert logs[-1]["route"] == "t" and logs[-1]["kind"] == "http"



@pytest.mark.parametrize("path", ["/t/rest/x", "/v1/chat/completions", "/t/up/chat/completions"])
@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
async def test_trace_is_never_proxied_it_would_echo_the_targets_key(gw, fake, path, method):
    """An upstream that answers TRACE (RFC 9110) echoes the request as it got it — with the key the gateway put
    in: a tenant would read the operator's key. 405, in the surface's dialect; nothing is sent."""
    client, logs = gw
    raw = await raw_http(client, f"{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert fake.requests == [] and b"X-Request-Id" in head, raw
    if method == "TRACK":  # (not a method the HTTP parser takes: a 400 before any surface)
        assert head.startswith(b"HTTP/1.0 400"), raw
        return
    assert head.startswith(b"HTTP/1.1 405") and b"never proxied" in body, raw
    assert (b'"success"' in body) is path.startswith("/t/")

@pytest.mark.parametrize("body", [b"", b"raw=1"], ids=["empty", "raw"])
async def test_a_body_sent_without_a_content_type_goes_up_without_one(gw, fake, body):
    """Headers go upstream as sent: no ``application/octet-stream`` label the client never gave."""
    client, _ = gw
    resp = await client.post("/t/rest/items", data=body, skip_auto_headers=["Content-Type"])
    assert resp.status == 200
    seen = fake.requests[0]
    assert "Content-Type" not in seen.headers and seen.body == body
    await client.post("/t/rest/items", data=b"x", headers={"Content-Type": "text/csv"})
    assert fake.requests[1].headers["Content-Type"] == "text/csv"


async def test_head_request(gw, fake):
    client, _ = gw
    resp = await client.head("/t/rest/thing")
    assert resp.status == 200
    assert fake.requests[0].method == "HEAD"
    assert int(resp.headers["Content-Length"]) > 100  # the upstream's: the size a GET gets (RFC 9110 §9.3.2)


async def test_upstream_4xx_5xx_returned_as_sent(gw):
    client, _ = gw
    for status in (400, 404, 409, 503):
        resp = await client.get("/t/rest/x", headers={"X-Fake-Status": str(status)})
        assert resp.status == status
        assert (await resp.json())["method"] == "GET"  # the upstream's own body, not a gateway envelope
        assert resp.headers["X-Upstream"] == "echo"


async def test_redirects_are_not_followed(gw, fake):
    client, _ = gw
    # the fake serves /redirect at its root; reach it through a target whose base is the root
    resp = await client.get("/t/claude/redirect", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "http://169.254.169.254/latest/meta-data"
    assert [r.path_qs for r in fake.requests] == ["/redirect"]  # the gateway did not go there


async def test_hop_by_hop_headers_stripped_both_ways(gw, fake):
    client, _ = gw
    resp = await client.get(
        "/t/rest/h",
        headers={
            "Connection": "keep-alive, X-Foo", "X-Foo": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
            "Upgrade": "h2c", "Proxy-Authorization": "Basic abc", "Proxy-Connection": "keep-alive",
            "X-Kept": "yes", "X-ReliAPI-Internal": "no",
        },
    )
    assert resp.status == 200
    seen = fake.requests[0].headers
    for name in ("X-Foo", "Keep-Alive", "TE", "Upgrade", "Proxy-Authorization", "Proxy-Connection",
                 "X-ReliAPI-Internal"):
        assert name not in seen, name
    assert seen["X-Kept"] == "yes"
    assert seen["Host"] == fake.url.split("//")[1]  # Host comes from the target
    # response side: the fake named X-Secret-Hop in Connection and sent Keep-Alive
    assert "X-Secret-Hop" not in resp.headers
    assert "Keep-Alive" not in resp.headers
    assert resp.headers["X-Upstream"] == "echo"


@pytest.mark.parametrize("path", ["/t/rest/h", "/v1/chat/completions"])
async def test_an_upstreams_own_status_headers_never_speak_for_the_gateway(gw, fake, path):
    """A CDN's ``X-Cache: HIT`` or another gateway's ``Idempotent-Replayed`` on a fresh call: the client is told
    what happened here (SPEC §2), not there."""
    client, _ = gw
    fake.plan(Fault(headers={"X-Cache": "HIT", "X-Cached": "true", "Idempotent-Replayed": "true",
                             "X-ReliAPI-Cost-USD": "9.99", "X-ReliAPI-Fallback": "elsewhere",
                             "X-ReliAPI-Routed-Model": "gpt-x", "X-ReliAPI-Trace-Id": "f" * 32}))
    resp = await client.post(path, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert resp.headers.getall("X-Cache") == ["BYPASS"] and resp.headers.getall("X-Cached") == ["false"]
    for name in ("Idempotent-Replayed", "X-ReliAPI-Fallback", "X-ReliAPI-Routed-Model"):
        assert name not in resp.headers, name
    assert resp.headers.getall("X-ReliAPI-Trace-Id") != ["f" * 32]
    assert "9.99" not in resp.headers.getall("X-ReliAPI-Cost-USD", [])


async def test_hop_by_hop_matching_ignores_case(gw, fake):
    client, _ = gw
    await client.get("/t/rest/h", headers={"connection": "keep-alive, x-foo", "x-foo": "1", "te": "trailers",
                                           "upgrade": "h2c", "x-reliapi-target": "up", "x-kept": "yes"})
    seen = fake.requests[0].headers
    assert "x-foo" not in seen and "te" not in seen and "upgrade" not in seen and "x-reliapi-target" not in seen
    assert seen["x-kept"] == "yes"


async def test_client_host_header_does_not_choose_target(gw, fake):
    client, _ = gw
    await client.get("/t/rest/h", headers={"Host": "169.254.169.254"})
    assert fake.requests[0].headers["Host"] == fake.url.split("//")[1]


async def test_configured_key_replaces_client_credentials(gw, fake):
    client, _ = gw
    await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []},
        headers={"Authorization": "Bearer client-key", "x-api-key": "client-x", "api-key": "client-azure",
                 "Cookie": "session=abc"},
    )
    seen = fake.requests[0].headers
    assert seen["Authorization"] == "Bearer sk-upstream-openai-123456"
    assert "x-api-key" not in seen and "api-key" not in seen and "Cookie" not in seen


async def test_passthrough_target_forwards_client_credentials(gw, fake):
    client, _ = gw
    await client.get("/t/rest/x", headers={"Authorization": "Bearer client-key", "Cookie": "a=b"})
    seen = fake.requests[0].headers
    assert seen["Authorization"] == "Bearer client-key" and seen["Cookie"] == "a=b"


async def test_compressed_bodies_pass_through_untouched(gw, fake):
    import gzip

    client, _ = gw
    raw = gzip.compress(b'{"hello": "world"}')
    resp = await client.post("/t/rest/gz", data=raw, headers={"Content-Encoding": "gzip",
                                                              "Content-Type": "application/json"})
    echoed = await resp.json()
    assert base64.b64decode(echoed["body_b64"]) == raw
    assert fake.requests[0].headers["Content-Encoding"] == "gzip"


async def test_routing_by_header_model_and_default(fake, gateway):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    # model glob
    await client.post("/v1/messages", json={"model": "claude-test-1", "max_tokens": 5, "messages": []})
    assert logs[-1]["target"] == "claude"
    # header beats model
    await client.post("/v1/chat/completions", json={"model": "claude-test-1", "messages": []},
                      headers={"X-ReliAPI-Target": "up"})
    assert logs[-1]["target"] == "up"
    # unknown model → default target
    await client.post("/v1/chat/completions", json={"model": "llama-3", "messages": []})
    assert logs[-1]["target"] == "up"
    # GET without a body → default target
    await client.get("/v1/models/gpt-4o-mini")  # (GET /v1/models itself is the gateway's catalog)
    assert fake.requests[-1].path_qs == "/v1/models/gpt-4o-mini"


async def test_no_route_for_model_without_default(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, default_target=None, port=0), env=ENV)
    resp = await client.post("/v1/chat/completions", json={"model": "llama-3", "messages": []})
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "unknown_target" and "llama-3" in body["error"]["message"]
    assert resp.headers["X-Request-Id"]
    assert fake.requests == []


async def test_unknown_target_404_in_envelope(gw, fake):
    client, _ = gw
    resp = await client.get("/t/nope/x", headers={"X-Request-Id": "my-req-1"})
    assert resp.status == 404
    body = await resp.json()
    assert body["success"] is False
    assert body["error"]["code"] == "unknown_target" and body["error"]["type"] == "client_error"
    assert body["meta"]["request_id"] == "my-req-1"
    assert resp.headers["X-Request-Id"] == "my-req-1"
    assert fake.requests == []


async def test_malformed_json_on_llm_path_is_400_naming_the_problem(gw, fake):
    client, logs = gw
    resp = await client.post("/v1/chat/completions", data=b'{"model": "gpt-4o-mini", "messages": [',
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == "invalid_request"
    assert "not valid JSON" in body["error"]["message"]
    resp = await client.post("/v1/chat/completions", json={"model": 5, "messages": []})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "model" and "model" in body["error"]["message"]
    resp = await client.post("/v1/chat/completions", json=["not", "an", "object"])
    assert resp.status == 400
    assert fake.requests == []
    assert logs[-1]["outcome"] == "error" and logs[-1]["error_code"] == "invalid_request"


async def test_body_over_limit_is_413(fake, gateway):
    client, _ = await gateway(llm_config(fake.url, max_body_mb=0.001), env=ENV)
    resp = await client.post("/t/rest/upload", data=b"x" * 5000)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"

    async def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"y" * 1000

    resp = await client.post("/t/rest/upload", data=chunked())
    assert resp.status == 413
    resp = await client.post("/v1/chat/completions", data=b"{" + b" " * 5000 + b"}")
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"
    assert fake.requests == []


async def test_unreachable_upstream_is_502_in_dialect(gateway):
    cfg = """
server: {default_target: dead}
targets:
  dead: {base_url: "http://127.0.0.1:1/v1", provider: openai}
"""
    client, logs = await gateway(cfg)
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert "127.0.0.1" not in body["error"]["message"]  # no internal addresses in errors
    resp = await client.get("/t/dead/x")
    body = await resp.json()
    assert resp.status == 502 and body["error"]["type"] == "upstream_error" and body["error"]["retryable"] is True


async def test_unknown_gateway_path_is_404_json(gw):
    client, _ = gw
    resp = await client.get("/nothing/here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unknown_target"


async def test_health_endpoints(gw):
    client, _ = gw
    for path in ("/healthz", "/livez", "/health"):
        resp = await client.get(path)
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["store"] == "memory"


async def test_upstream_error_echoing_the_key_is_scrubbed(gw, fake):
    client, logs = gw
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []},
                             headers={"X-Fake-Status": "401", "X-Fake-Echo-Auth": "1"})
    assert resp.status == 401
    text = await resp.text()
    assert "sk-upstream-openai-123456" not in text
    assert "bad key Bearer ***" in text
    assert "sk-upstream-openai-123456" not in str(logs)


async def test_content_length_with_transfer_encoding_is_400(gw, fake):
    client, _ = gw
    data = await raw_http(client, b"POST /t/rest/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
                 b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.endswith(b" 400 Bad Request")  # rejected by the HTTP parser, answered in the envelope
    assert b'"code":"invalid_request"' in rest
    assert fake.requests == []


async def test_lower_case_hop_headers_on_the_wire_are_dropped(gw, fake):
    client, _ = gw
    data = await raw_http(client, b"GET /t/rest/h HTTP/1.1\r\nhost: 169.254.169.254\r\nconnection: close, x-foo\r\nx-foo: 1\r\n"
                 b"te: trailers\r\nproxy-authorization: Basic x\r\nx-kept: yes\r\n\r\n")
    assert b" 200 OK" in data.split(b"\r\n", 1)[0]
    seen = fake.requests[0].headers
    assert seen["Host"] == fake.url.split("//")[1]
    for name in ("x-foo", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-kept"] == "yes"


async def test_over_long_header_is_431_in_gateway_format(gw, fake):
    client, _ = gw
    data = await raw_http(client, b"GET /t/rest/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].endswith(b" 431 Request Header Fields Too Large")
    assert b'"code":"headers_too_large"' in body and b"Traceback" not in data
    assert fake.requests == []


async def test_no_content_response_passes_through(gw, fake):
    client, _ = gw
    resp = await client.delete("/t/rest/items/1", headers={"X-Fake-Status": "204"})
    assert resp.status == 204
    assert await resp.read() == b""
    assert "Transfer-Encoding" not in resp.headers


async def test_no_compression_unless_the_client_asked(gw, fake):
    client, _ = gw
    await raw_http(client, b"GET /t/rest/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert fake.requests[0].headers["Accept-Encoding"] == "identity"  # not aiohttp's "gzip, deflate"
    await client.get("/t/rest/gz", headers={"Accept-Encoding": "br"})
    assert fake.requests[1].headers["Accept-Encoding"] == "br"


async def test_a_request_the_http_parser_refuses_is_answered_with_a_request_id(gw, fake):
    """aiohttp hands such a request over without its path; the answer is in the dialect its request line asks
    for (Anthropic's, for /v1/messages), with the request id."""
    client, _ = gw
    data = await raw_http(client, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    rid = next(line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:"))
    answer = msgspec.json.decode(body)
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error" and rid.decode() != ""
    assert fake.requests == []


async def test_an_http_0_9_request_is_refused_not_proxied(fake, gateway):
    client, _ = await gateway(llm_config(fake.url))
    out = await raw_http(client, b"GET /t/rest/q\r\n\r\n")
    assert b" 400 " in out.split(b"\r\n", 1)[0] and b"HTTP/1.0 or newer" in out
    assert fake.requests == []
