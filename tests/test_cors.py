"""CORS (issue #14 point 7): preflights are the gateway's to answer and never reach an upstream (where they would go
with a target's key); allowed origins get Access-Control-* on every answer — complete, streamed, errors."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.support.browser import Browser, need_browser
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault

APP = "https://app.example.com"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def config(url: str, **cors: object) -> GatewayConfig:
    cfg = GatewayConfig(url, default_target="up").up(auth={"type": "bearer_env", "env_var": "OPENAI_KEY"}).rest()
    if cors:
        cfg.server(cors=cors)
    return cfg


ENV = {"OPENAI_KEY": "sk-upstream-secret"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/t/rest/x", "/proxy/llm", "/v1/models", "/nowhere"])
async def test_without_cors_a_preflight_is_answered_and_never_proxied(fake, gateway, path):
    client, _ = await gateway(config(fake.url), env=ENV)
    resp = await client.options(path, headers=PREFLIGHT)
    assert resp.status in (204, 405) and fake.requests == []
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    plain = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert plain.status == 200 and "Access-Control-Allow-Origin" not in plain.headers


async def test_an_allowed_origins_preflight_and_answers_carry_the_cors_headers(fake, gateway):
    client, _ = await gateway(config(fake.url, allow_origins=[APP], max_age_s=300), env=ENV)
    pre = await client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert pre.status == 204 and fake.requests == []
    assert pre.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert pre.headers["Access-Control-Max-Age"] == "300"
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == APP
    exposed = resp.headers["Access-Control-Expose-Headers"]
    assert "X-Request-Id" in exposed and "X-RateLimit-Remaining" in exposed and "Origin" in resp.headers["Vary"]
    assert {"X-ReliAPI-Trace-Id", "RateLimit-Policy", "X-ReliAPI-Routed-Model"} <= set(exposed.split(", "))
    fake.plan(Fault(chunks=3))
    stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Origin": APP})
    assert stream.headers["Access-Control-Allow-Origin"] == APP and b"[DONE]" in await stream.read()
    error = await client.post("/v1/chat/completions", data=b"{", headers={"Origin": APP, "Content-Type": "application/json"})
    assert error.status == 400 and error.headers["Access-Control-Allow-Origin"] == APP
    models = await client.get("/v1/models", headers={"Origin": APP})
    assert models.headers["Access-Control-Allow-Origin"] == APP


async def test_another_origin_gets_no_cors_headers(fake, gateway):
    client, _ = await gateway(config(fake.url, allow_origins=[APP]), env=ENV)
    pre = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert pre.status == 204 and "Access-Control-Allow-Origin" not in pre.headers and fake.requests == []
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_any_origin_is_a_star_unless_credentials_are_allowed(fake, gateway):
    client, _ = await gateway(config(fake.url, allow_origins=["*"]), env=ENV)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    client, _ = await gateway(config(fake.url, allow_origins=["*"], allow_credentials=True), env=ENV)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"


async def test_a_plain_options_request_still_reaches_a_plain_http_target(fake, gateway):
    """Only a preflight (Access-Control-Request-Method) is the gateway's: an API's own OPTIONS is relayed."""
    client, _ = await gateway(config(fake.url), env=ENV)
    resp = await client.options("/t/rest/things")
    assert resp.status == 200 and [r.method for r in fake.requests] == ["OPTIONS"]


# ---------------------------------------------------------------- a real browser on another origin

PAGE = """<!doctype html><title>other origin</title><script>
fetch(%(url)s, {method: "POST", headers: {"Content-Type": "application/json", "Authorization": "Bearer sk-client"},
                body: JSON.stringify({model: "gpt-4o-mini", messages: [{role: "user", content: "hi"}]})})
  .then(async r => { window.result = {status: r.status, requestId: r.headers.get("X-Request-Id"),
                                      remaining: r.headers.get("X-RateLimit-Remaining"),
                                      content: (await r.json()).choices[0].message.content}; })
  .catch(e => { window.result = {error: String(e)}; });
</script>"""


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_page_on_another_origin_calls_the_gateway_with_fetch(fake, gateway, aiohttp_server, allowed):
    """Headless Chromium: a page served from http://localhost:<p> fetches http://127.0.0.1:<q>/v1/chat/completions
    (JSON + Authorization: a preflight first) and reads the answer, X-Request-Id and the rate-limit headers;
    from an origin not in allow_origins the browser refuses it — and nothing reached the upstream."""
    chromium = need_browser()
    target: dict[str, str] = {}

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE % {"url": repr(target["url"])}, content_type="text/html")

    page_app = web.Application()
    page_app.router.add_get("/", page)
    page_server = await aiohttp_server(page_app)
    origin = f"http://localhost:{page_server.port}"
    cfg = config(fake.url, allow_origins=[origin if allowed else "https://elsewhere.example"])
    client, _ = await gateway(cfg.server(rate_limit_per_ip_rpm=100), env=ENV)
    target["url"] = str(client.make_url("/v1/chat/completions"))
    async with Browser.launch(chromium) as browser:
        await browser.navigate(f"{origin}/")
        result = await browser.wait_for("window.result")
    if allowed:
        assert result["status"] == 200 and result["content"] == "Hello from the fake."
        assert result["requestId"].startswith("req_") and result["remaining"] is not None
        assert len(fake.requests) == 1 and fake.requests[0].method == "POST"  # the preflight stayed here
    else:
        assert "error" in result and fake.requests == []
