"""Seed 004's operator surfaces under /v1 (issue #14 point 2): answered by the gateway, never forwarded upstream
with the target's key, whatever the method; the admin ones with the admin API's access rules."""

from __future__ import annotations

import pytest

from tests.support.cli_harness import free_port
from tests.support.config import GatewayConfig
from tests.support.gateway import settle

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ADMIN_KEY = "admin-key-0123456789"


def config(url: str, **server: object) -> GatewayConfig:
    return GatewayConfig(url, default_target="up", **server).up(cache={"ttl_s": 60}, auth={"type": "bearer_env",
                                                                                          "env_var": "OPENAI_KEY"})



@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/v1/health", "/v1/rate-limit/user123", "/v1/cache/stats", "/v1/cache/clear",
                                  "/v1/admin/summary", "/v1/models", "/v1/usage/user123"])
async def test_an_operator_path_never_reaches_the_upstream(fake, gateway, path, method):
    client, _ = await gateway(config(fake.url), env={"OPENAI_KEY": "sk-secret-upstream-key"})
    resp = await client.request(method, path)
    assert resp.status < 500 and "X-Request-Id" in resp.headers
    assert "sk-secret-upstream-key" not in await resp.text()
    assert fake.requests == []


async def test_health_names_the_store_and_each_circuit(fake, gateway):
    client, _ = await gateway(config(fake.url), env={"OPENAI_KEY": "sk-x"})
    body = await (await client.get("/v1/health")).json()
    assert body["status"] == "healthy" and body["store"] == {"backend": "memory", "healthy": True, "error": None}
    assert body["targets"] == {"up": {"kind": "llm", "provider": "openai", "circuit": "closed"}}


async def test_health_is_503_degraded_when_the_store_does_not_answer(fake, gateway):
    cfg = config(fake.url).store(url=f"redis://127.0.0.1:{free_port()}/0")
    client, _ = await gateway(cfg, env={"OPENAI_KEY": "sk-x"})
    resp = await client.get("/v1/health")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "degraded" and body["store"]["healthy"] is False
    assert body["redis"] is False


async def test_cache_clear_empties_the_cache_and_stats_count_it(fake, gateway):
    client, _ = await gateway(config(fake.url), env={"OPENAI_KEY": "sk-x"})
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        await settle(client)
    assert len(fake.requests) == 1  # the second was a hit
    stats = (await (await client.get("/v1/cache/stats")).json())["data"]
    assert stats["entries_total"] == 1 and stats["targets"][0]["hits"] == 1
    cleared = await client.delete("/v1/cache/clear", params={"target": "up"})
    assert cleared.status == 200 and (await cleared.json())["data"] == {"target": "up", "deleted": 1}
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert len(fake.requests) == 2  # no longer cached
    unknown = await client.delete("/v1/cache/clear", params={"target": "nope"})
    assert unknown.status == 404


async def test_the_admin_surfaces_keep_the_admin_apis_access_rules(fake, gateway):
    client, _ = await gateway(config(fake.url, admin_key_env="ADMIN_KEY"), env={"OPENAI_KEY": "sk-x",
                                                                                "ADMIN_KEY": ADMIN_KEY})
    for method, path in (("GET", "/v1/admin/summary"), ("GET", "/v1/cache/stats"), ("DELETE", "/v1/cache/clear")):
        refused = await client.request(method, path)
        assert refused.status == 401, path
        allowed = await client.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert allowed.status == 200 and (await allowed.json())["success"] is True, path
    assert fake.requests == []


async def test_another_method_on_a_gateway_path_is_405_in_openais_dialect(fake, gateway):
    client, _ = await gateway(config(fake.url), env={"OPENAI_KEY": "sk-x"})
    resp = await client.post("/v1/models", json={})
    body = await resp.json()
    assert resp.status == 405 and resp.headers["Allow"] == "GET" and body["error"]["code"] == "method_not_allowed"
    assert body["error"]["type"] == "invalid_request_error"  # the caller's mistake, not a server error


@pytest.mark.parametrize(("method", "path"), [("POST", "/metrics"), ("POST", "/healthz"), ("DELETE", "/livez"),
                                              ("POST", "/health"), ("PUT", "/readyz"), ("POST", "/status.json"),
                                              ("POST", "/"), ("POST", "/docs"), ("PATCH", "/openapi.json")])
async def test_another_method_on_a_probe_or_page_is_405_and_never_proxied(fake, gateway, method, path):
    client, _ = await gateway(config(fake.url), env={"OPENAI_KEY": "sk-x"})
    resp = await client.request(method, path, json={})
    body = await resp.json()
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD" and body["error"]["code"] == "method_not_allowed"
    assert (await client.head(path)).status == 200 and fake.requests == []


async def test_rate_limit_info_shows_the_callers_tenant_limit_as_it_stands(fake, gateway):
    cfg = config(fake.url).tenant("acme", api_key="acme-key-123456", rate_limit={"rpm": 3})
    client, _ = await gateway(cfg, env={"OPENAI_KEY": "sk-x"})
    key = {"Authorization": "Bearer acme-key-123456"}
    assert (await client.post("/v1/chat/completions", json=CHAT, headers={**key, "Cache-Control": "no-store"})).status == 200
    resp = await client.get("/v1/rate-limit/user123", headers=key)
    body = await resp.json()
    assert resp.status == 200 and body["user_id"] == "user123" and body["tenant"] == "acme"
    assert [(x["name"], x["applies_to"], x["limit"], x["remaining"]) for x in body["limits"]] == [("default", "tenant", 3, 2)]
    again = await (await client.get("/v1/rate-limit/user123", headers=key)).json()
    assert again["limits"][0]["remaining"] == 2  # looking takes nothing
    refused = await client.get("/v1/rate-limit/user123")
    assert refused.status == 401 and (await refused.json())["error"]["code"] == "unauthorized"
    assert len(fake.requests) == 1


async def test_rate_limit_info_without_tenants_is_the_per_ip_limit(fake, gateway):
    client, _ = await gateway(config(fake.url, rate_limit_per_ip_rpm=10), env={"OPENAI_KEY": "sk-x"})
    body = await (await client.get("/v1/rate-limit/someone")).json()
    # (the request itself passed the door, whose per-IP limit counts every request: one of ten is used)
    assert [(x["applies_to"], x["limit"], x["remaining"]) for x in body["limits"]] == [("ip", 10, 9)]
    assert body["per_user"] is None and body["tenant"] is None


@pytest.mark.parametrize("spelling", ["/v1/rate-limit/%7Bx%7D", "/v1/rate-limit/a%7D", "/v1/usage/%7Bx%7D",
                                      "/v1/rate-limit/", "/v1/health/", "/v1/cache/stats/", "/v1/admin/summary/",
                                      "/v1/Health", "/v1/cache/clear/"])
async def test_no_spelling_of_a_gateway_path_is_proxied(fake, gateway, spelling):
    """Found by a black-box review: {…} in a path segment and a trailing slash missed the gateway's routes
    and went upstream with the target's key."""
    client, _ = await gateway(config(fake.url), env={"OPENAI_KEY": "sk-x"})
    for method in ("GET", "DELETE"):
        resp = await client.request(method, spelling)
        assert resp.status in (200, 401, 403, 404, 405), (method, spelling, resp.status)
    assert fake.requests == []
