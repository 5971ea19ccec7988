"""Per-user rate limits and quotas (issue #14 point 4; seed 004 "per-user rate limiting", per minute and hour).

``rate_limit: {per_user: {rpm, rph}}`` at the top level (every tenant's users, or everyone's without
tenants) or in a tenant's ``rate_limit``; a tenant's own limit gets ``rph`` beside ``rpm``/``tpm``. The
user is ``X-ReliAPI-User``, else the body's ``user`` / ``user_id``; requests that name none share one
bucket. Every limit of a request is taken in one atomic step — refused by one, it uses up none — and
the quotas sit inside the cache and idempotency: a hit or a replay uses up nothing (the per-IP limit,
the door, still counts it).
"""

from __future__ import annotations

import json
import re

import pytest

from gateway.config import ConfigError, parse_config
from gateway.store.memory import MemoryStore
from tests.support.stores import drop, new_prefix, redis_store
from tests.test_rate_limit import CHAT, ENV, KEY_A, KEY_B, StillClock, auth, call, config, policy_of, remaining

PER_USER = {"per_user": {"rpm": 2}}


@pytest.fixture
def clock() -> StillClock:
    return StillClock()


@pytest.fixture
def start(fake, gateway, clock):
    async def make(cfg, store=None):
        return await gateway(cfg, env=ENV, clock=clock, store=store or MemoryStore(clock=clock.time))
    return make


def as_user(user: str, key: str | None = None) -> dict[str, str]:
    return {"X-ReliAPI-User": user, "Cache-Control": "no-store", **(auth(key) if key else {})}


def chat(**fields: object) -> dict:
    return {**CHAT, **fields}


async def test_one_user_using_up_its_limit_leaves_the_others_theirs(fake, start):
    client, logs = await start(config(fake.url).section("rate_limit", PER_USER))
    seen = [(await call(client, headers=as_user("alice")))[0] for _ in range(3)]
    assert seen == [200, 200, 429]
    status, headers, data = await call(client, headers=as_user("alice"))
    assert status == 429 and data["error"]["code"] == "rate_limited" and "per user" in data["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 30 and headers["X-RateLimit-Remaining"] == "0"
    assert policy_of(headers) == {"user": {"q": 2, "w": 60}}
    status, headers, _ = await call(client, headers=as_user("bob"))
    assert status == 200 and remaining(headers) == 1
    assert len(fake.requests) == 3
    assert logs[-2]["status"] == 429 and logs[-2]["error_code"] == "rate_limited"


async def test_the_user_comes_from_the_header_else_the_body_user_or_user_id(fake, start):
    client, _ = await start(config(fake.url).section("rate_limit", {"per_user": {"rpm": 1}}))
    nocache = {"Cache-Control": "no-store"}
    assert (await call(client, body=chat(user="carol"), headers=nocache))[0] == 200
    assert (await call(client, body=chat(user="carol"), headers=nocache))[0] == 429
    assert (await call(client, body=chat(user="dave"), headers=nocache))[0] == 200
    # the header wins over the body: "erin" is a fresh user even though the body says carol
    assert (await call(client, body=chat(user="carol"), headers=as_user("erin")))[0] == 200
    resp = await client.post("/v1/generate", json={"prompt": "hi", "model": "gpt-4o-mini", "user_id": 42}, headers=nocache)
    assert resp.status == 200
    resp = await client.post("/v1/generate", json={"prompt": "hi again", "model": "gpt-4o-mini", "user_id": 42}, headers=nocache)
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "rate_limited"


async def test_requests_naming_no_user_share_one_bucket(fake, start):
    """Leaving the user out is not a way around the per-user limit."""
    client, _ = await start(config(fake.url).section("rate_limit", PER_USER))
    nocache = {"Cache-Control": "no-store"}
    assert [(await call(client, headers=nocache))[0] for _ in range(3)] == [200, 200, 429]
    assert (await call(client, headers=as_user("frank")))[0] == 200


async def test_minute_and_hour_are_taken_together(fake, start, clock):
    """rpm 2, rph 3: the third request at t0 is refused by the minute and takes nothing from the hour,
    so a minute later one more fits — and then the hour is what refuses."""
    client, _ = await start(config(fake.url).section("rate_limit", {"per_user": {"rpm": 2, "rph": 3}}))
    statuses = [(await call(client, headers=as_user("gina")))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    clock.advance(60)
    status, headers, _ = await call(client, headers=as_user("gina"))
    assert status == 200
    assert policy_of(headers) == {"user": {"q": 2, "w": 60}, "user-hourly": {"q": 3, "w": 3600}}
    assert headers["RateLimit"].startswith('"user-hourly";r=0')  # the limit nearest exhaustion is shown
    clock.advance(60)
    status, headers, data = await call(client, headers=as_user("gina"))
    assert status == 429 and "3 requests per hour per user" in data["error"]["message"]
    assert int(headers["Retry-After"]) > 60
    assert len(fake.requests) == 3


async def test_a_tenant_hour_limit_and_its_users(fake, start):
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rph": 3, "per_user": {"rpm": 2}}},
               {"name": "b", "api_key": KEY_B}]
    client, _ = await start(config(fake.url, tenants=tenants).section("rate_limit", {"per_user": {"rpm": 1}}))
    # tenant a's users have its own per-user limit (2/min), tenant b's the top-level one (1/min)
    assert [(await call(client, headers=as_user("u1", KEY_A)))[0] for _ in range(3)] == [200, 200, 429]
    status, headers, data = await call(client, headers=as_user("u2", KEY_A))
    assert status == 200 and policy_of(headers) == {"hourly": {"q": 3, "w": 3600}, "user": {"q": 2, "w": 60}}
    status, _, data = await call(client, headers=as_user("u3", KEY_A))
    assert status == 429 and "3 requests per hour" in data["error"]["message"]  # the tenant's hour is used up
    # the same user name in another tenant is another user
    assert [(await call(client, headers=as_user("u1", KEY_B)))[0] for _ in range(2)] == [200, 429]


async def test_a_token_refusal_uses_up_no_request_quota(fake, start):
    """tpm and rpm in one step: a request too big for the token limit does not spend a request."""
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 2, "tpm": 100}}]
    client, _ = await start(config(fake.url, tenants=tenants))
    big = chat(max_tokens=45)
    assert (await call(client, body=big, headers=as_user("x", KEY_A)))[0] == 200
    assert (await call(client, body=big, headers=as_user("x", KEY_A)))[0] == 429  # tokens
    status, headers, _ = await call(client, body=chat(max_tokens=1), headers=as_user("x", KEY_A))
    assert status == 200 and headers["RateLimit-Policy"].startswith('"default";q=2;w=60')
    assert len(fake.requests) == 2


async def test_cache_hits_and_idempotent_replays_use_no_quota(fake, start):
    cfg = config(fake.url, tenants=[{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 2}}]).up(cache={"ttl_s": 60})
    client, _ = await start(cfg.section("rate_limit", {"per_user": {"rpm": 1}}))
    user = {"X-ReliAPI-User": "hana", **auth()}
    assert [(await call(client, headers=user))[0] for _ in range(5)] == [200] * 5
    assert len(fake.requests) == 1  # one miss, four hits: one request of quota
    keyed = {**user, "Idempotency-Key": "order-1", "Cache-Control": "no-store"}
    other = chat(messages=[{"role": "user", "content": "another question"}])
    assert [(await call(client, body=other, headers={**keyed, "X-ReliAPI-User": "ivan"}))[0]
            for _ in range(4)] == [200] * 4
    assert len(fake.requests) == 2  # one call, three replays
    # the tenant's two requests are now spent: a fresh question is refused
    fresh = chat(messages=[{"role": "user", "content": "a third question"}])
    status, _, data = await call(client, body=fresh, headers={**auth(), "X-ReliAPI-User": "jo"})
    assert status == 429 and "2 requests per minute" in data["error"]["message"]


async def test_the_per_ip_limit_still_counts_cache_hits(fake, start):
    cfg = config(fake.url, rate_limit_per_ip_rpm=3).up(cache={"ttl_s": 60})
    client, _ = await start(cfg.section("rate_limit", {"per_user": {"rpm": 100}}))
    results = [await call(client, headers={"X-ReliAPI-User": "kim"}) for _ in range(4)]
    assert [r[0] for r in results] == [200, 200, 200, 429]
    assert len(fake.requests) == 1
    # both policies' limits are named; the tighter (the IP's) is the one shown
    assert policy_of(results[0][1]) == {"user": {"q": 100, "w": 60}, "ip": {"q": 3, "w": 60}}
    assert results[0][1]["X-RateLimit-Limit"] == "3"


async def test_rate_limit_info_shows_a_users_own_limits_and_only_within_its_tenant(fake, start):
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 10, "per_user": {"rpm": 2, "rph": 5}}},
               {"name": "b", "api_key": KEY_B, "rate_limit": {"per_user": {"rpm": 2}}}]
    client, _ = await start(config(fake.url, tenants=tenants))
    assert (await call(client, headers=as_user("lee", KEY_A)))[0] == 200
    body = await (await client.get("/v1/rate-limit/lee", headers=auth(KEY_A))).json()
    assert body["tenant"] == "a" and body["per_user"] == {"rpm": 2, "rph": 5}
    assert [(x["name"], x["applies_to"], x["window_s"], x["remaining"]) for x in body["limits"]] == [
        ("default", "tenant", 60, 9), ("user", "user", 60, 1), ("user-hourly", "user", 3600, 4)]
    # tenant b looking at "lee" sees its own user of that name, untouched
    body = await (await client.get("/v1/rate-limit/lee", headers=auth(KEY_B))).json()
    assert body["tenant"] == "b" and [(x["name"], x["remaining"]) for x in body["limits"]] == [("user", 2)]
    assert (await client.get("/v1/rate-limit/lee")).status == 401


async def test_two_gateways_on_redis_share_a_users_limit(fake, gateway, clock):
    prefix = new_prefix()
    cfg = config(fake.url).section("rate_limit", {"per_user": {"rpm": 2, "rph": 10}})
    clients = []
    try:
        for _ in range(2):
            client, _ = await gateway(cfg, env=ENV, clock=clock, store=await redis_store(prefix))
            clients.append(client)
        a, b = clients
        assert [(await call(c, headers=as_user("mo")))[0] for c in (a, b, a)] == [200, 200, 429]
        assert (await call(b, headers=as_user("ned")))[0] == 200
    finally:
        for client in clients:
            await client.close()
        await drop(await redis_store(prefix))


@pytest.mark.parametrize(("doc", "named"), [
    ({"rate_limit": {"per_user": {"rpm": 0}}}, "rate_limit.per_user.rpm"),
    ({"tenants": [{"name": "t", "api_key": "k" * 16, "rate_limit": {"rph": -1}}]}, "rate_limit.rph"),
    ({"rate_limit": {"per_usr": {"rpm": 1}}}, "per_usr"),
])
def test_per_user_limits_are_checked_at_load(doc, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_config(json.dumps({"targets": {"up": {"base_url": "http://127.0.0.1:9/v1", "provider": "openai"}}, **doc}))


async def test_the_envelopes_take_the_user_from_the_header_too(fake, start):
    """Found by a black-box review: /proxy/llm's users named in X-ReliAPI-User shared the anonymous bucket,
    and a long body user was not cut to 128 characters as on /v1."""
    client, _ = await start(config(fake.url).section("rate_limit", {"per_user": {"rpm": 1}}))
    llm = {"target": "up", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def proxy_llm(headers=None, **fields):
        return (await client.post("/proxy/llm", json={**llm, **fields}, headers=headers or {})).status
    assert await proxy_llm({"X-ReliAPI-User": "olga"}) == 200
    assert await proxy_llm({"X-ReliAPI-User": "olga"}) == 429
    assert await proxy_llm({"X-ReliAPI-User": "pete"}) == 200  # another user, not the anonymous bucket
    assert await proxy_llm() == 200  # the anonymous bucket was never touched
    long_user = "v" * 130
    assert await proxy_llm(user=long_user + "1") == 200
    assert await proxy_llm(user=long_user + "2") == 429  # the same first 128 characters: the same user
    http = {"target": "up", "method": "POST", "path": "/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    assert (await client.post("/proxy/http", json=http, headers={"X-ReliAPI-User": "quinn"})).status == 200
    assert (await client.post("/proxy/http", json=http, headers={"X-ReliAPI-User": "quinn"})).status == 429
