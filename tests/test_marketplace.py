"""Marketplace tenants (issue #16 point 5): ``marketplaces: {rapidapi: {proxy_secret_env, tier_map, default_tier}}``.

A request with the right ``X-RapidAPI-Proxy-Secret`` is the tenant ``rapidapi/<X-RapidAPI-User>`` on the tier its
``X-RapidAPI-Subscription`` maps to; a wrong or missing secret with X-RapidAPI-* headers is 401 and nothing is
forwarded; the user header alone never makes a tenant; no X-RapidAPI-* header goes upstream; usage, limits and
budgets are per marketplace user. A config with only a marketplace turns authentication on.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from gateway.config import ConfigError, parse_config
from tests.support.config import NO_RETRY, llm_config

SECRET = "rapid-proxy-secret-0123456789"
ENV = {"UP_KEY": "sk-up-secret-1234", "CLAUDE_KEY": "sk-ant-secret-5678", "RAPID_SECRET": SECRET}
TENANT_KEY = "key-direct-00001"
TIERS = {
    "free": {"rate_limit": {"rpm": 2}, "allowed_models": ["gpt-4o-mini", "claude-test-*"], "max_tokens": 32,
             "features": {"stream": False}},
    "pro": {"rate_limit": {"rpm": 1000}},
}
RAPIDAPI = {"proxy_secret_env": "RAPID_SECRET", "tier_map": {"BASIC": "free", "PRO": "pro"}}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = [{"role": "user", "content": "hi"}]


def rapid(user: str = "alice", subscription: str = "BASIC", secret: str | None = SECRET) -> dict[str, str]:
    headers = {"X-RapidAPI-User": user, "X-RapidAPI-Subscription": subscription,
               "X-RapidAPI-Host": "reliapi.p.rapidapi.com", "X-RapidAPI-Version": "1.0"}
    if secret is not None:
        headers["X-RapidAPI-Proxy-Secret"] = secret
    return headers


def config(url: str, rapidapi: dict = RAPIDAPI, tenants: list | None = None):
    cfg = llm_config(url).each(retry_matrix=NO_RETRY).section("tiers", TIERS)
    cfg.section("marketplaces", {"rapidapi": rapidapi})
    return cfg.tenants(*tenants) if tenants else cfg


@pytest.fixture
def start(fake, gateway):
    async def make(cfg=None, env=ENV):
        return await gateway(cfg or config(fake.url), env=env)

    return make


@pytest.fixture
async def sdk():
    made = []

    def make(kind, client, headers):
        if kind == "openai":
            c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0,
                                   default_headers=headers)
        else:
            c = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="unused", max_retries=0,
                                         default_headers=headers)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


# =============================================================== the right secret


async def test_the_right_secret_makes_the_user_a_tenant_on_its_tier_and_nothing_rapid_goes_upstream(
        fake, start, sdk):
    client, logs = await start()
    answer = await sdk("openai", client, rapid()).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=500)
    assert answer.status_code == 200
    assert answer.headers["X-ReliAPI-Max-Tokens"] == "500->32"  # the free tier's cap (BASIC → free)
    assert answer.headers["X-RateLimit-Limit"] == "2"  # the free tier's rpm
    (seen,) = fake.requests
    assert not [k for k in seen.headers if k.lower().startswith("x-rapidapi-")]
    assert SECRET not in str(dict(seen.headers)) and SECRET.encode() not in seen.body
    assert seen.headers["Authorization"] == "Bearer sk-up-secret-1234"  # the target's own key
    assert logs[-1]["tenant"] == "rapidapi/alice" and logs[-1]["status"] == 200
    # the Anthropic SDK too
    msg = await sdk("anthropic", client, rapid("bob", "PRO")).messages.create(
        model="claude-test-1", max_tokens=500, messages=MESSAGES)
    assert msg.content[0].text
    assert fake.requests[-1].json()["max_tokens"] == 500  # PRO → pro: no cap
    assert not [k for k in fake.requests[-1].headers if k.lower().startswith("x-rapidapi-")]
    assert logs[-1]["tenant"] == "rapidapi/bob"


async def test_a_tier_refusal_for_a_marketplace_user_in_both_sdks(fake, start, sdk):
    client, _ = await start()
    with pytest.raises(openai.PermissionDeniedError) as info:
        await sdk("openai", client, rapid()).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "tier 'free'" in info.value.body["message"] and "'gpt-4o'" in info.value.body["message"]
    assert "rapidapi/alice" in info.value.body["message"]
    with pytest.raises(anthropic.PermissionDeniedError) as ainfo:
        await sdk("anthropic", client, rapid()).messages.create(
            model="claude-test-1", max_tokens=10, messages=MESSAGES, stream=True)
    assert "stream" in ainfo.value.message
    assert fake.requests == []


async def test_rate_limits_and_usage_are_per_marketplace_user(fake, start):
    client, _ = await start()
    for user in ("alice", "carol"):  # each has the free tier's 2 a minute of its own
        for _ in range(2):
            resp = await client.post("/v1/chat/completions", json=CHAT, headers=rapid(user))
            assert resp.status == 200
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=rapid(user))
        assert resp.status == 429
    assert len(fake.requests) == 4
    async with client.get("/admin/usage?tenant=rapidapi/alice") as r:
        alice = (await r.json())["data"]
    async with client.get("/admin/usage?tenant=rapidapi/carol") as r:
        carol = (await r.json())["data"]
    assert alice["total"]["requests"] == 2 and carol["total"]["requests"] == 2
    assert alice["total"]["prompt_tokens"] > 0
    # the metrics count marketplace users together: their names are no label values (bounded series)
    async with client.get("/metrics") as r:
        metrics = await r.text()
    assert 'tenant="rapidapi/*"' in metrics and "rapidapi/alice" not in metrics and "rapidapi/carol" not in metrics


async def test_a_tier_budget_is_spent_per_marketplace_user(fake, start):
    cfg = config(fake.url)
    cfg.data["tiers"]["free"]["budget"] = {"daily_usd": 0.00005}  # a few requests of gpt-4o-mini
    del cfg.data["tiers"]["free"]["rate_limit"]
    client, _ = await start(cfg)
    statuses = [(await client.post("/v1/chat/completions", json=CHAT, headers=rapid("dora"))).status
                for _ in range(30)]
    assert 200 in statuses and statuses[-1] == 402  # dora's budget ran out
    used = statuses.count(200)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=rapid("erin"))
    assert resp.status == 200  # erin's is her own
    assert len(fake.requests) == used + 1


# =============================================================== the wrong secret


@pytest.mark.parametrize("secret", [None, "", "wrong-secret", SECRET[:-1] + "X", SECRET + "0"])
async def test_a_wrong_or_missing_secret_is_401_and_nothing_is_forwarded(fake, start, sdk, secret):
    client, logs = await start()
    with pytest.raises(openai.AuthenticationError) as info:
        await sdk("openai", client, rapid(secret=secret)).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 401 and "X-RapidAPI-Proxy-Secret" in info.value.body["message"]
    with pytest.raises(anthropic.AuthenticationError):
        await sdk("anthropic", client, rapid(secret=secret)).messages.create(
            model="claude-test-1", max_tokens=10, messages=MESSAGES)
    assert fake.requests == []
    assert logs[-1]["status"] == 401 and logs[-1]["tenant"] is None


async def test_the_user_header_alone_never_makes_a_tenant_even_beside_a_tenant_key(fake, start):
    client, logs = await start(config(fake.url, tenants=[{"name": "direct", "api_key": TENANT_KEY}]))
    for headers in ({"X-RapidAPI-User": "mallory"}, {"X-RapidAPI-Subscription": "PRO"},
                    {"X-RapidAPI-User": "mallory", "Authorization": f"Bearer {TENANT_KEY}"}):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert resp.status == 401
        assert logs[-1]["tenant"] is None
    assert fake.requests == []
    # a direct tenant with its own key passes; another X-RapidAPI-* header (the consumer's host) is not a claim,
    # and still never goes upstream
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {TENANT_KEY}", "X-RapidAPI-Host": "x"})
    assert resp.status == 200 and logs[-1]["tenant"] == "direct"
    assert "X-RapidAPI-Host" not in fake.requests[-1].headers


async def test_an_unmapped_subscription_is_403_naming_it_or_gets_the_default_tier(fake, start):
    client, _ = await start()
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=rapid(subscription="ULTRA"))
    assert resp.status == 403 and "'ULTRA'" in (await resp.json())["error"]["message"]
    assert fake.requests == []
    client, _ = await start(config(fake.url, {**RAPIDAPI, "default_tier": "free"}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 99}, headers=rapid(subscription="ULTRA"))
    assert resp.status == 200 and resp.headers["X-ReliAPI-Max-Tokens"] == "99->32"


@pytest.mark.parametrize("user", ["", "a:b", "a/b", "x" * 129, "caf\u00e9"])
async def test_a_user_that_is_not_a_handle_is_refused(fake, start, user):
    client, _ = await start()
    headers = rapid()
    headers["X-RapidAPI-User"] = user.encode("utf-8").decode("latin-1")
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert resp.status == 401 and "X-RapidAPI-User" in (await resp.json())["error"]["message"]
    assert fake.requests == []


async def test_an_unset_secret_refuses_every_marketplace_request(fake, start):
    client, _ = await start(env={k: v for k, v in ENV.items() if k != "RAPID_SECRET"})
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=rapid(secret=""))
    assert resp.status == 401
    resp = await client.post("/v1/chat/completions", json=CHAT)  # no key at all: authentication is on
    assert resp.status == 401
    assert fake.requests == []


async def test_the_proxy_secret_is_one_of_the_secrets_scrubbed_from_answers_and_logs(start):
    from gateway.keys import RUNTIME

    client, _ = await start()
    scrub = client.app[RUNTIME].current.scrub
    assert SECRET not in scrub(f"upstream said: {SECRET}")


# =============================================================== config


def test_marketplace_config_errors_name_their_path() -> None:
    text = """
targets: {up: {base_url: "http://x/v1", provider: openai}}
tiers: {free: {}}
marketplaces: {rapidapi: {tier_map: {BASIC: free, PRO: gold}, default_tier: silver}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    errors = info.value.errors
    assert any(e.startswith("marketplaces.rapidapi.proxy_secret_env: required") for e in errors)
    assert "marketplaces.rapidapi.tier_map.PRO: no tier named 'gold' (tiers: free)" in errors
    assert "marketplaces.rapidapi.default_tier: no tier named 'silver' (tiers: free)" in errors
    assert len(errors) == 3
