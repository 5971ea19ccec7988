"""Tiers (issue #16 point 4): ``tiers: {free: {rate_limit, allowed_models, max_tokens, features, budget}}`` and
``tenants[].tier``.

A request its tier forbids is ``403 forbidden`` in the client's dialect, naming the tier and what it does not allow
(the real openai / anthropic SDKs raise ``PermissionDeniedError``) and never reaches the upstream; a ``max_tokens``
over the tier's cap is clamped (every output-limit field, ``X-ReliAPI-Max-Tokens`` says so); ``cache: false`` and
``fallback: false`` are not refusals but switch those off; the tier's rate limit and budget apply to a tenant that
sets none, and a tenant's own settings win field by field.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from gateway.config import ConfigError, parse_config
from tests.support.config import NO_RETRY, llm_config
from tests.support.fakes import Fault

ENV = {"UP_KEY": "sk-up-secret-1234", "CLAUDE_KEY": "sk-ant-secret-5678"}
FREE_KEY, PRO_KEY, OWN_KEY, PLAIN_KEY = "key-free-000001", "key-pro-0000002", "key-own-0000003", "key-plain-00004"

TIERS = {
    "free": {
        "rate_limit": {"rpm": 3},
        "allowed_models": ["gpt-4o-mini", "claude-test-*"],
        "max_tokens": 64,
        "features": {"stream": False, "tools": False, "idempotency": False, "cache": False, "fallback": False},
    },
    "pro": {"rate_limit": {"rpm": 1000}},
}
TENANTS = [
    {"name": "freebie", "api_key": FREE_KEY, "tier": "free"},
    {"name": "probie", "api_key": PRO_KEY, "tier": "pro"},
    # on the free tier, with its own rpm and models: those win, the rest (features, cap) is the tier's
    {"name": "owner", "api_key": OWN_KEY, "tier": "free", "rate_limit": {"rpm": 6}, "allowed_models": ["gpt-*"]},
    {"name": "plain", "api_key": PLAIN_KEY},
]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def config(url: str, tiers: dict = TIERS, tenants: list = TENANTS):
    cfg = llm_config(url).each(retry_matrix=NO_RETRY)
    return cfg.section("tiers", tiers).tenants(*tenants)


@pytest.fixture
def start(fake, gateway):
    async def make(cfg=None):
        return await gateway(cfg or config(fake.url), env=ENV)

    return make


@pytest.fixture
async def sdk():
    made = []

    def make(kind, client, key):
        if kind == "openai":
            c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)
        else:
            c = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key=key, max_retries=0)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# =============================================================== refusals through the SDKs


async def test_a_model_outside_the_tier_is_403_naming_tier_and_model_in_both_sdks(fake, start, sdk):
    client, logs = await start()
    with pytest.raises(openai.PermissionDeniedError) as info:
        await sdk("openai", client, FREE_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 403
    message = info.value.body["message"]
    assert "tier 'free'" in message and "'gpt-4o'" in message and "gpt-4o-mini" in message
    assert info.value.body["code"] == "forbidden" and info.value.body["param"] == "model"
    with pytest.raises(anthropic.PermissionDeniedError) as ainfo:
        await sdk("anthropic", client, FREE_KEY).messages.create(model="claude-big", max_tokens=10, messages=MESSAGES)
    assert "tier 'free'" in ainfo.value.message and "'claude-big'" in ainfo.value.message
    assert fake.requests == []  # refused before the upstream
    assert logs[-1]["status"] == 403 and logs[-1]["tenant"] == "freebie"
    # the allowed model passes
    ok = await sdk("openai", client, FREE_KEY).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ok.choices[0].message.content
    assert len(fake.requests) == 1


async def test_a_model_refusal_in_the_envelope_dialect(fake, start):
    client, _ = await start()
    resp = await client.post("/t/up/chat/completions", json={**CHAT, "model": "gpt-4o"}, headers=bearer(FREE_KEY))
    assert resp.status == 403
    data = await resp.json()
    assert data["success"] is False and data["error"]["code"] == "forbidden"
    assert "tier 'free'" in data["error"]["message"] and "gpt-4o" in data["error"]["message"]
    assert fake.requests == []


async def test_streaming_is_refused_on_a_tier_without_stream(fake, start, sdk):
    client, _ = await start()
    with pytest.raises(openai.PermissionDeniedError) as info:
        await sdk("openai", client, FREE_KEY).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert "tier 'free'" in info.value.body["message"] and "stream" in info.value.body["message"]
    assert info.value.body["param"] == "stream"
    with pytest.raises(anthropic.PermissionDeniedError) as ainfo:
        await sdk("anthropic", client, FREE_KEY).messages.create(
            model="claude-test-1", max_tokens=10, messages=MESSAGES, stream=True)
    assert "stream" in ainfo.value.message
    assert fake.requests == []
    # the pro tier streams
    stream = await sdk("openai", client, PRO_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text and len(fake.requests) == 1


async def test_tools_are_refused_on_a_tier_without_tools(fake, start, sdk):
    client, _ = await start()
    with pytest.raises(openai.PermissionDeniedError) as info:
        await sdk("openai", client, FREE_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=[TOOL])
    assert "tier 'free'" in info.value.body["message"] and "tools" in info.value.body["message"]
    with pytest.raises(anthropic.PermissionDeniedError):
        await sdk("anthropic", client, FREE_KEY).messages.create(
            model="claude-test-1", max_tokens=10, messages=MESSAGES,
            tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert fake.requests == []
    # an empty tools list is no tools; the pro tier has them
    resp = await client.post("/v1/chat/completions", json={**CHAT, "tools": []}, headers=bearer(FREE_KEY))
    assert resp.status == 200
    await sdk("openai", client, PRO_KEY).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[TOOL])
    assert len(fake.requests) == 2


async def test_an_idempotency_key_is_refused_on_a_tier_without_idempotency(fake, start):
    client, _ = await start()
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={**bearer(FREE_KEY), "Idempotency-Key": "k1"})
    assert resp.status == 403
    assert "idempotency" in (await resp.json())["error"]["message"]
    assert fake.requests == []
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={**bearer(PRO_KEY), "Idempotency-Key": "k1"})
    assert resp.status == 200


# =============================================================== switched off: cache and fallback


async def test_a_tier_without_cache_is_never_answered_from_the_cache(fake, start):
    client, _ = await start(config(fake.url).up(cache={"ttl_s": 60}))
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(FREE_KEY))
        assert resp.status == 200 and resp.headers["X-Cache"] == "BYPASS"
    assert len(fake.requests) == 2
    for _ in range(2):  # the pro tier caches: one upstream call for two requests
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(PRO_KEY))
    assert resp.headers["X-Cache"] == "HIT"
    assert len(fake.requests) == 3


async def test_a_tier_without_fallback_gets_no_fallback_chain(fake, start):
    cfg = config(fake.url).up(fallback_targets=[{"target": "claude", "model": "claude-test-1"}])
    client, _ = await start(cfg)
    fake.plan(Fault(status=500))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(FREE_KEY))
    assert resp.status == 500 and "X-ReliAPI-Fallback" not in resp.headers  # the upstream's own 500, relayed
    assert [r.path_qs for r in fake.requests] == ["/v1/chat/completions"]  # no try on claude
    fake.plan(Fault(status=500))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(PRO_KEY))
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "claude"
    assert [r.path_qs for r in fake.requests][1:] == ["/v1/chat/completions", "/v1/messages"]


# =============================================================== max_tokens: clamped


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 4000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 4000}, "max_completion_tokens"),
    ("/v1/messages", {"model": "claude-test-1", "max_tokens": 4000, "messages": MESSAGES}, "max_tokens"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 4000}, "max_output_tokens"),
])
async def test_an_output_limit_over_the_tiers_cap_is_clamped(fake, start, path, body, field):
    client, logs = await start()
    resp = await client.post(path, json=body, headers=bearer(FREE_KEY))
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-ReliAPI-Max-Tokens"] == "4000->64"
    assert fake.requests[-1].json()[field] == 64
    assert logs[-1]["cost_policy_applied"] == "tier_max_tokens" and logs[-1]["original_max_tokens"] == 4000


async def test_a_request_without_an_output_limit_gets_the_tiers_and_a_smaller_one_is_kept(fake, start, sdk):
    client, _ = await start()
    resp = await sdk("openai", client, FREE_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES)
    assert resp.headers["X-ReliAPI-Max-Tokens"] == "none->64"
    assert fake.requests[-1].json()["max_tokens"] == 64
    resp2 = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10}, headers=bearer(FREE_KEY))
    assert "X-ReliAPI-Max-Tokens" not in resp2.headers
    assert fake.requests[-1].json()["max_tokens"] == 10
    # no cap on the pro tier, nor for a tenant without a tier
    for key in (PRO_KEY, PLAIN_KEY):
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4000}, headers=bearer(key))
        assert fake.requests[-1].json()["max_tokens"] == 4000


# =============================================================== rate limit, overrides, budget


async def test_the_tiers_rate_limit_applies_and_a_tenants_own_wins(fake, start, sdk):
    client, _ = await start()
    free = sdk("openai", client, FREE_KEY)
    for _ in range(3):
        await free.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        await free.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.response.headers["X-RateLimit-Limit"] == "3"
    assert len(fake.requests) == 3
    # "owner" is on the free tier with rpm 6 of its own: six pass (its own bucket), the seventh is refused
    for _ in range(6):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(OWN_KEY))
        assert resp.status == 200
    assert resp.headers["X-RateLimit-Limit"] == "6"
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(OWN_KEY))
    assert resp.status == 429
    assert len(fake.requests) == 9


async def test_a_tenants_own_allowed_models_win_and_the_tiers_features_still_bind(fake, start):
    client, _ = await start()
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}, headers=bearer(OWN_KEY))
    assert resp.status == 200  # its own "gpt-*" instead of the tier's list
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(OWN_KEY))
    assert resp.status == 403 and "tier 'free'" in (await resp.json())["error"]["message"]
    assert len(fake.requests) == 1


async def test_the_tiers_budget_applies_per_tenant(fake, start):
    tiers = {"tiny": {"budget": {"daily_usd": 0.000001}}}
    tenants = [{"name": "t1", "api_key": FREE_KEY, "tier": "tiny"},
               {"name": "t2", "api_key": PRO_KEY, "tier": "tiny", "budget": {"daily_usd": 10}}]
    client, _ = await start(config(fake.url, tiers, tenants))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers=bearer(FREE_KEY))
    assert resp.status == 402
    assert "'t1'" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers=bearer(PRO_KEY))
    assert resp.status == 200  # its own budget wins
    assert len(fake.requests) == 1


# =============================================================== config errors


def _errors(tiers: dict, tenants: list, extra: str = "") -> list[str]:
    import yaml

    text = yaml.safe_dump({"targets": {"up": {"base_url": "http://x/v1", "provider": "openai"}},
                           "tiers": tiers, "tenants": tenants}) + extra
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    return info.value.errors


def test_unknown_tier_names_and_features_are_config_errors_with_their_path() -> None:
    errors = _errors({"free": {"features": {"stream": False}}}, [{"name": "a", "api_key": "k", "tier": "gold"}])
    assert errors == ["tenants[0].tier: no tier named 'gold' (tiers: free)"]
    errors = _errors({"free": {"features": {"teleport": False}}}, [])
    assert len(errors) == 1 and errors[0].startswith("tiers.free.features.teleport: unknown key")
    errors = _errors({"free": {"rate_limit": {"burst": 3}}}, [{"name": "tier:x", "api_key": "k"}])
    assert "tiers.free.rate_limit.burst: is the burst of rpm; set rpm too" in errors
    assert any(e.startswith("tenants[0].name: names starting with 'tier:'") for e in errors)


def test_a_tier_config_loads_and_merges() -> None:
    from gateway.config.tiers import effective

    text = """
targets: {up: {base_url: "http://x/v1", provider: openai}}
tiers: {free: {rate_limit: {rpm: 10, rph: 100}, budget: {daily_usd: 1, monthly_usd: 5}, allowed_models: [a]}}
tenants: [{name: a, api_key: k, tier: free, rate_limit: {rpm: 20}, budget: {daily_usd: 2}}]
"""
    config = parse_config(text, env={})
    merged = effective(config.tenants[0], config.tiers)
    assert (merged.rate_limit.rpm, merged.rate_limit.rph) == (20, 100)
    assert (merged.budget.daily_usd, merged.budget.monthly_usd) == (2, 5)
    assert merged.allowed_models == ["a"]


# =============================================================== found by a black-box review


async def test_an_escaped_tools_key_is_still_tools(fake, start):
    """JSON lets a key be spelt with escapes ("tool\\u0073"): the upstream reads it as tools, so must the tier."""
    client, _ = await start()
    raw = (b'{"model":"gpt-4o-mini","tool\\u0073":[{"type":"function","function":{"name":"f","parameters":{}}}],'
           b'"messages":[{"role":"user","content":"x"}]}')
    resp = await client.post("/v1/chat/completions", data=raw, headers={**bearer(FREE_KEY), "Content-Type": "application/json"})
    assert resp.status == 403 and "tools" in (await resp.json())["error"]["message"]
    assert fake.requests == []


async def test_proxy_http_to_an_llm_target_keeps_to_the_allowed_models(fake, start):
    """An LLM call in /proxy/http's envelope is checked like one on /v1: the tier's models (and a tenant's own)."""
    client, _ = await start()
    envelope = {"target": "up", "method": "POST", "path": "/chat/completions",
                "body": {"model": "gpt-4o", "messages": MESSAGES}}
    resp = await client.post("/proxy/http", json=envelope, headers=bearer(FREE_KEY))
    body = await resp.json()
    assert resp.status == 403 and body["error"]["code"] == "forbidden" and "gpt-4o" in body["error"]["message"]
    assert fake.requests == []
    allowed = {**envelope, "body": {"model": "gpt-4o-mini", "messages": MESSAGES}}
    assert (await client.post("/proxy/http", json=allowed, headers=bearer(FREE_KEY))).status == 200
