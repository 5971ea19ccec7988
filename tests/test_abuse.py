"""The door and abuse (issue #16 points 1-3): layered limits before authentication, auto-ban, anomalies.

The per-IP limit applies with tenants too and is taken before the key is looked at; failed
authentications have their own budget per IP; ``abuse`` bans an IP, tenant key or fingerprint
after ``ban_after`` violations within ``window_s`` — fleet-wide, lifted by the admin API; anomalies
(one key from many fingerprints, a tenant's rate jump) are events, metrics, and optionally throttled.
"""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest
from multidict import CIMultiDict

from gateway.keys import RUNTIME
from gateway.observe.events import AnomalyDetected, Banned
from gateway.store.memory import MemoryStore
from tests.support.stores import drop, new_prefix, redis_store
from tests.test_rate_limit import CHAT, ENV, KEY_A, KEY_B, StillClock, auth, call, config

WRONG = {"Authorization": "Bearer not-a-tenant-key-9"}
TENANTS = [{"name": "a", "api_key": KEY_A}, {"name": "b", "api_key": KEY_B}]


@pytest.fixture
def clock() -> StillClock:
    return StillClock()


@pytest.fixture
def start(fake, gateway, clock):
    async def make(cfg, store=None):
        return await gateway(cfg, env=ENV, clock=clock, store=store or MemoryStore(clock=clock.time))
    return make


def abused(url: str, abuse: dict | None = None, **server: object):
    cfg = config(url, tenants=TENANTS, **server)
    return cfg.section("abuse", abuse) if abuse is not None else cfg


async def idle(client) -> None:
    await client.app[RUNTIME].current.shared.idle()


def recorded(client) -> list:
    seen: list = []
    client.app[RUNTIME].current.events.subscribe(seen.append)
    return seen


# ---------------------------------------------------------------- layered limits


async def test_the_per_ip_limit_applies_with_tenants_before_the_key_is_looked_at(fake, start):
    client, logs = await start(abused(fake.url, rate_limit_per_ip_rpm=3))
    seen = [await call(client, headers=WRONG) for _ in range(2)]
    assert [s[0] for s in seen] == [401, 401]
    assert seen[0][1]["X-RateLimit-Limit"] == "3"  # a refusal carries the door's limit too
    status, headers, data = await call(client, headers=auth())  # the right key, the same address: the last one
    assert status == 200 and headers["X-RateLimit-Remaining"] == "0"
    status, headers, data = await call(client, headers=auth(KEY_B))
    assert status == 429 and data["error"]["code"] == "rate_limited" and headers["Retry-After"]
    assert len(fake.requests) == 1


async def test_failed_authentications_have_their_own_small_budget(fake, start, clock):
    client, _ = await start(abused(fake.url, auth_failures_per_ip_rpm=3))
    for _ in range(3):  # the budget: three failures a minute
        assert (await call(client, headers=WRONG))[0] == 401
        await idle(client)
    status, headers, data = await call(client, headers=auth())  # even the right key waits: no guessing
    assert status == 429 and "failed authentications" in data["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 20
    clock.advance(int(headers["Retry-After"]))
    assert (await call(client, headers=auth()))[0] == 200
    assert len(fake.requests) == 1


async def test_a_tenants_burst_limit_is_separate_from_its_sustained_rate(fake, start, clock):
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 600, "rps": 2}}]
    client, _ = await start(config(fake.url, tenants=tenants))
    results = [await call(client, headers=auth()) for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 429]
    assert "2 requests per second" in results[2][2]["error"]["message"]
    assert '"burst";q=2;w=1' in results[0][1]["RateLimit-Policy"]
    clock.advance(1)
    status, headers, _ = await call(client, headers=auth())
    assert status == 200  # the second is back; the minute's 600 were barely touched


# ---------------------------------------------------------------- auto-ban


async def test_an_ip_with_too_many_violations_is_banned_then_lifted_by_the_admin_api(fake, start, clock):
    client, logs = await start(abused(fake.url, {"ban_after": 3, "window_s": 60, "ban_s": 120}))
    events = recorded(client)
    for _ in range(3):
        assert (await call(client, headers=WRONG))[0] == 401
        await idle(client)
    status, headers, data = await call(client, headers=auth())  # the right key, but the address is banned
    assert status == 403 and data["error"]["code"] == "forbidden" and "banned" in data["error"]["message"]
    assert 100 <= int(headers["Retry-After"]) <= 120 and headers["X-ReliAPI-Banned"] == "ip"
    assert fake.requests == []
    assert [type(e) for e in events if isinstance(e, Banned)] == [Banned]
    assert (await client.get("/healthz")).status == 200  # the gateway's own surfaces stay open
    listed = await (await client.get("/admin/bans")).json()
    (ban,) = listed["data"]["bans"]
    assert ban["id"] == "ip:127.0.0.1" and "3 violations" in ban["reason"]
    page = await (await client.get("/status.json")).json()
    assert [b["id"] for b in page["bans"]] == ["ip:127.0.0.x"]  # the public page does not publish who
    html = await (await client.get("/")).text()
    assert "ip:127.0.0.x" in html and "ip:127.0.0.1" not in html
    metrics = await (await client.get("/metrics")).text()
    assert 'reliapi_bans_total{subject="ip"} 1' in metrics
    assert 'reliapi_abuse_violations_total{reason="unauthorized",subject="ip"} 3' in metrics
    lifted = await (await client.delete("/admin/bans/ip:127.0.0.1")).json()
    assert lifted["data"] == {"id": "ip:127.0.0.1", "lifted": True}
    assert (await call(client, headers=auth()))[0] == 200
    assert logs[3]["status"] == 403 and logs[3]["error_code"] == "forbidden"


async def test_a_ban_ends_by_itself(fake, start, clock):
    client, _ = await start(abused(fake.url, {"ban_after": 2, "window_s": 60, "ban_s": 30}))
    for _ in range(2):
        await call(client, headers=WRONG)
        await idle(client)
    assert (await call(client, headers=auth()))[0] == 403
    clock.advance(31)
    assert (await call(client, headers=auth()))[0] == 200


async def test_every_kind_of_violation_counts(fake, start):
    """429s from a limit, 401s, and requests refused as malformed (400) — not the upstream's own errors."""
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 1}}]
    client, _ = await start(config(fake.url, tenants=tenants).section("abuse", {"ban_after": 3}))
    assert (await call(client, headers=auth()))[0] == 200
    assert (await call(client, headers=auth()))[0] == 429
    await idle(client)
    bad = await client.post("/v1/chat/completions", data=b"{not json", headers={**auth(), "Content-Type": "application/json"})
    assert bad.status == 400
    await idle(client)
    upstream_error = await client.post("/v1/chat/completions", json=CHAT, headers={**auth(), "X-Fake-Status": "400"})
    assert upstream_error.status in (400, 429)  # (the rate limit may answer first: it is a violation either way)
    await idle(client)
    assert (await call(client, headers=auth()))[0] == 403


async def test_the_upstreams_own_errors_are_not_violations(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 2}))
    for _ in range(4):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={**auth(), "X-Fake-Status": "400"})
        assert resp.status == 400
        await idle(client)
    assert (await call(client, headers=auth()))[0] == 200


async def test_the_allow_list_is_never_banned(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 2, "allow": ["127.0.0.0/8"]}))
    for _ in range(5):
        assert (await call(client, headers=WRONG))[0] == 401
        await idle(client)
    assert (await call(client, headers=auth()))[0] == 200


async def test_a_spoofed_forwarded_for_does_not_change_who_is_banned(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 2}))  # trust_forwarded_for is off
    for i in range(2):
        await call(client, headers={**WRONG, "X-Forwarded-For": f"10.9.9.{i}"})
        await idle(client)
    assert (await call(client, headers={**auth(), "X-Forwarded-For": "10.1.1.1"}))[0] == 403


async def test_behind_a_trusted_proxy_each_client_address_is_its_own(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 2}, trust_forwarded_for=True))
    for _ in range(2):
        await call(client, headers={**WRONG, "X-Forwarded-For": "10.9.9.9"})
        await idle(client)
    assert (await call(client, headers={**auth(), "X-Forwarded-For": "10.9.9.9"}))[0] == 403
    for spelled in ("10.9.9.9:1234", "::ffff:10.9.9.9", "[::ffff:10.9.9.9]"):  # the same address, as proxies write it
        assert (await call(client, headers={**auth(), "X-Forwarded-For": spelled}))[0] == 403, spelled
    assert (await call(client, headers={**auth(), "X-Forwarded-For": "10.1.1.1"}))[0] == 200


async def test_an_ipv6_ban_holds_for_the_whole_64(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 2}, trust_forwarded_for=True))
    for i in range(2):
        await call(client, headers={**WRONG, "X-Forwarded-For": f"2001:db8:7:7::{i + 1}"})
        await idle(client)
    assert (await call(client, headers={**auth(), "X-Forwarded-For": "2001:db8:7:7::99"}))[0] == 403  # a new address
    assert (await call(client, headers={**auth(), "X-Forwarded-For": "2001:db8:7:8::1"}))[0] == 200  # another /64


async def test_a_tenant_key_can_be_the_banned_subject(fake, start):
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 1}}, {"name": "b", "api_key": KEY_B}]
    client, _ = await start(config(fake.url, tenants=tenants, trust_forwarded_for=True).section(
        "abuse", {"ban_after": 2, "subjects": ["key"]}))
    assert (await call(client, headers={**auth(), "X-Forwarded-For": "10.0.0.1"}))[0] == 200
    for i in range(2):
        assert (await call(client, headers={**auth(), "X-Forwarded-For": f"10.0.0.{i + 2}"}))[0] == 429
        await idle(client)
    status, headers, _ = await call(client, headers={**auth(), "X-Forwarded-For": "10.0.0.9"})
    assert status == 403 and headers["X-ReliAPI-Banned"] == "key"  # from any address
    assert (await call(client, headers={**auth(KEY_B), "X-Forwarded-For": "10.0.0.2"}))[0] == 200


async def test_a_fingerprint_can_be_the_banned_subject(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 2, "subjects": ["fingerprint"]}))
    for _ in range(2):
        await call(client, headers={**WRONG, "User-Agent": "scanner/1.0"})
        await idle(client)
    assert (await call(client, headers={**WRONG, "User-Agent": "scanner/1.0"}))[0] == 403
    assert (await call(client, headers={**auth(), "User-Agent": "my-app/2.1"}))[0] == 200  # same IP, another print


async def test_bans_are_shared_by_gateways_on_redis(fake, gateway):
    prefix = new_prefix()
    cfg = abused(fake.url, {"ban_after": 2, "ban_s": 60})
    clients = []
    try:
        for _ in range(2):
            client, _ = await gateway(cfg, env=ENV, store=await redis_store(prefix))
            clients.append(client)
        one, two = clients
        for _ in range(2):
            await call(one, headers=WRONG)
            await idle(one)
        assert (await call(one, headers=auth()))[0] == 403
        for _ in range(100):  # announced over pub/sub: the other instance learns it without a store read
            if (await call(two, headers=auth()))[0] == 403:
                break
            await asyncio.sleep(0.02)
        assert (await call(two, headers=auth()))[0] == 403
        assert (await (await two.delete("/admin/bans/ip:127.0.0.1")).json())["data"]["lifted"] is True
        for _ in range(100):
            if (await call(one, headers=auth()))[0] == 200:
                break
            await asyncio.sleep(0.02)
        assert (await call(one, headers=auth()))[0] == 200
    finally:
        for client in clients:
            await client.close()
        await drop(await redis_store(prefix))


async def test_the_sdks_raise_permission_denied_for_a_ban(fake, start):
    client, _ = await start(abused(fake.url, {"ban_after": 1}))
    await call(client, headers=WRONG)
    await idle(client)
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
    assert "banned" in str(raised.value)
    claude = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key=KEY_A, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        await claude.messages.create(model="claude-test-1", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    await oai.close()
    await claude.close()


# ---------------------------------------------------------------- anomalies


async def test_one_key_from_many_fingerprints_is_reported_then_throttled(fake, start):
    anomalies = {"max_fingerprints_per_key": 2, "window_s": 600, "throttle": True}
    client, _ = await start(abused(fake.url, {"anomalies": anomalies}))
    events = recorded(client)
    for agent in ("laptop", "phone"):
        assert (await call(client, headers={**auth(), "User-Agent": agent}))[0] == 200
    status, _, data = await call(client, headers={**auth(), "User-Agent": "someone-else"})
    assert status == 429 and data["error"]["code"] == "anomaly"
    assert [(e.tenant, e.kind) for e in events if isinstance(e, AnomalyDetected)] == [("a", "key_sharing")]
    assert (await call(client, headers={**auth(KEY_B), "User-Agent": "x"}))[0] == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'reliapi_anomalies_total{kind="key_sharing",tenant="a"} 1' in metrics


async def test_a_rate_jump_over_the_trailing_average_is_reported(fake, start, clock):
    anomalies = {"rate_jump_factor": 3, "min_rpm": 5, "window_s": 180}
    client, _ = await start(abused(fake.url, {"anomalies": anomalies}))
    events = recorded(client)
    clock.advance(60 - clock.monotonic() % 60)  # the start of a minute
    for _ in range(2):  # two quiet minutes: one request each
        assert (await call(client, headers=auth()))[0] == 200
        clock.advance(60)
    for _ in range(5):  # then five in a minute: over 3× the average of 1, and at least min_rpm
        assert (await call(client, headers=auth()))[0] == 200  # reported, not throttled
    assert [(e.tenant, e.kind) for e in events if isinstance(e, AnomalyDetected)] == [("a", "rate_jump")]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("abuse", "error"), [
    ({"allow": ["not-a-cidr"]}, "abuse.allow[0]"),
    ({"subjects": ["cookie"]}, "abuse.subjects"),
    ({"ban_after": 0}, "abuse.ban_after"),
    ({"anomalies": {"rate_jump_factor": 1}}, "abuse.anomalies.rate_jump_factor"),
])
def test_bad_abuse_settings_are_errors_naming_them(abuse, error):
    from gateway.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_config(str(abused("http://127.0.0.1:9", abuse)), env=ENV)


async def test_every_refusal_of_the_door_as_the_sdks_raise_it(fake, start):
    """What a client library shows for each: the per-IP limit and the failed-authentication budget are
    RateLimitError (429, the SDKs retry them with Retry-After), a ban PermissionDeniedError (403)."""
    client, _ = await start(abused(fake.url, {"ban_after": 50}, rate_limit_per_ip_rpm=4, auth_failures_per_ip_rpm=2))
    base = str(client.make_url(""))
    wrong_oai = openai.AsyncOpenAI(base_url=base + "/v1", api_key="not-a-tenant-key-9", max_retries=0)
    right_oai = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0)
    right_claude = anthropic.AsyncAnthropic(base_url=base, api_key=KEY_A, max_retries=0)
    ask = {"model": "gpt-4o-mini", "messages": CHAT["messages"]}
    for _ in range(2):
        with pytest.raises(openai.AuthenticationError):
            await wrong_oai.chat.completions.create(**ask)
        await idle(client)
    with pytest.raises(openai.RateLimitError) as raised:  # the budget of failures is spent: even the right key
        await right_oai.chat.completions.create(**ask)
    assert "failed authentications" in str(raised.value)
    with pytest.raises(anthropic.RateLimitError) as limited:  # and the per-IP limit (4/min) is used up now too
        await right_claude.messages.create(model="claude-test-1", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert limited.value.response.headers["Retry-After"]
    for sdk in (wrong_oai, right_oai, right_claude):
        await sdk.close()
    assert fake.requests == []


async def test_failed_authentications_are_counted_fleet_wide_on_redis(fake, gateway):
    prefix = new_prefix()
    cfg = abused(fake.url, auth_failures_per_ip_rpm=2)
    clients = []
    try:
        for _ in range(2):
            client, _ = await gateway(cfg, env=ENV, store=await redis_store(prefix))
            clients.append(client)
        one, two = clients
        for client in (one, two):  # the budget's two failures, one on each instance: counted together
            assert (await call(client, headers=WRONG))[0] == 401
            await idle(client)
        status, _, data = await call(two, headers=auth())
        assert status == 429 and "failed authentications" in data["error"]["message"]
        for _ in range(100):  # the lock is announced: the other instance refuses too (best effort: were the
            if (await call(one, headers=auth()))[0] == 429:  # message lost, its own next failure would lock it)
                break
            await asyncio.sleep(0.02)
        assert (await call(one, headers=auth()))[0] == 429
    finally:
        for client in clients:
            await client.close()
        await drop(await redis_store(prefix))


# ---------------------------------------------------------------- found by a black-box review


async def test_guessing_keys_on_the_gateways_own_tenant_paths_is_counted_too(fake, start):
    """/v1/models, /v1/usage/{user} and /v1/rate-limit/{user} take a tenant key: they pass the door too,
    or they would be a free oracle for guessing keys (401 vs 200)."""
    client, _ = await start(abused(fake.url, {"ban_after": 5}, auth_failures_per_ip_rpm=3))
    for path in ("/v1/models", "/v1/usage/x", "/v1/rate-limit/x"):
        assert (await client.get(path, headers=WRONG)).status == 401
        await idle(client)
    resp = await client.get("/v1/models", headers=auth())  # the right key, but the address's budget is spent
    assert resp.status == 429 and "failed authentications" in (await resp.json())["error"]["message"]
    await idle(client)
    assert (await call(client, headers=auth()))[0] == 429
    await idle(client)
    resp = await client.get("/v1/rate-limit/x", headers=auth())  # five violations: banned, on these paths too
    assert resp.status == 403 and "banned" in (await resp.json())["error"]["message"]


async def test_the_gateways_own_tenant_paths_write_an_access_line_and_count_refusals_too(fake, start):
    """Guessing keys on /v1/models, /v1/usage/{user} or /v1/rate-limit/{user} is on record, as on the proxy."""
    client, logs = await start(abused(fake.url))
    for path in ("/v1/models", "/v1/usage/x", "/v1/rate-limit/x"):
        resp = await client.get(path, headers={**WRONG, "X-Request-Id": f"guess-{path[4:8]}"})
        assert resp.status == 401
        line = logs[-1]
        assert (line["status"], line["error_code"], line["path"], line["request_id"]) == (
            401, "unauthorized", path, f"guess-{path[4:8]}")
    resp = await client.get("/v1/models", headers=auth())
    assert resp.status == 200 and logs[-1]["status"] == 200 and logs[-1]["tenant"] == "a" and logs[-1]["outcome"] == "ok"
    metrics = await (await client.get("/metrics")).text()
    assert 'status="401"' in metrics


async def test_a_second_forwarded_for_line_cannot_choose_the_address(fake, start):
    """Several X-Forwarded-For lines are one list: the trusted proxy's entry is the last of the last line."""
    client, _ = await start(abused(fake.url, rate_limit_per_ip_rpm=2, trust_forwarded_for=True))
    statuses = []
    for i in range(3):
        headers = CIMultiDict([("Authorization", f"Bearer {KEY_A}"), ("X-Forwarded-For", f"6.6.6.{i}"),
                               ("X-Forwarded-For", "5.5.5.5")])
        statuses.append((await client.post("/v1/chat/completions", json=CHAT, headers=headers)).status)
    assert statuses == [200, 200, 429]
