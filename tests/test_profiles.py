"""Client profiles (issue #14 point 5; the wiki's ``client_profiles`` and a tenant's ``profile:``).

``max_parallel_requests`` refuses the one request too many at once (429, never queued), a stream
holding its place until it ends; ``max_qps_per_tenant`` + ``burst_size`` is a shared GCRA quota
beside the tenant's others; ``max_qps_per_provider_key`` limits the tenant's use of each upstream
key (a single key or a pool's); ``default_timeout_s`` is the tenant's deadline for an answer —
504 ``deadline_exceeded``, not the target's failure (no circuit count, no fallback).
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.keys import RUNTIME
from gateway.store.memory import MemoryStore
from tests.support.config import NO_RETRY
from tests.support.stores import drop, new_prefix, redis_store
from tests.test_rate_limit import CHAT, ENV, KEY_A, KEY_B, StillClock, auth, call, config, policy_of

NOCACHE = {"Cache-Control": "no-store"}


def profiled(url: str, profile: dict, **fields: object):
    """Tenant ``a`` with the profile ``p`` under test, tenant ``b`` without one."""
    tenants = [{"name": "a", "api_key": KEY_A, "profile": "p"}, {"name": "b", "api_key": KEY_B}]
    return config(url, tenants=tenants, **fields).section("client_profiles", {"p": profile})


def a(**extra: str) -> dict[str, str]:
    return {**auth(KEY_A), **NOCACHE, **extra}


def b(**extra: str) -> dict[str, str]:
    return {**auth(KEY_B), **NOCACHE, **extra}


async def test_max_parallel_requests_refuses_the_one_too_many_at_once(fake, gateway):
    client, logs = await gateway(profiled(fake.url, {"max_parallel_requests": 1}), env=ENV)
    slow = asyncio.create_task(call(client, headers=a(**{"X-Fake-Delay-Ms": "400"})))
    while not fake.requests:
        await asyncio.sleep(0.01)
    status, headers, data = await call(client, headers=a())
    assert status == 429 and data["error"]["code"] == "too_many_parallel_requests"
    assert headers["Retry-After"] == "1"
    assert (await call(client, headers=b()))[0] == 200  # another tenant is not held up
    assert (await slow)[0] == 200
    assert (await call(client, headers=a()))[0] == 200  # the place is free again
    assert len(fake.requests) == 3
    assert any(line["status"] == 429 and line["error_code"] == "too_many_parallel_requests" for line in logs)


async def test_a_stream_holds_its_place_until_it_ends(fake, gateway):
    client, _ = await gateway(profiled(fake.url, {"max_parallel_requests": 1}), env=ENV)
    stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                               headers=a(**{"X-Fake-Interval-Ms": "100", "X-Fake-Chunks": "3"}))
    assert stream.status == 200
    assert (await call(client, headers=a()))[0] == 429  # its headers are out, its body is not
    text = await stream.text()
    assert "[DONE]" in text
    for _ in range(50):  # the place is given back as the stream's response closes
        status = (await call(client, headers=a()))[0]
        if status == 200:
            break
        await asyncio.sleep(0.02)
    assert status == 200


async def test_max_qps_per_tenant_with_its_burst(fake, gateway):
    clock = StillClock()
    cfg = profiled(fake.url, {"max_qps_per_tenant": 2, "burst_size": 2})
    client, _ = await gateway(cfg, env=ENV, clock=clock, store=MemoryStore(clock=clock.time))
    results = [await call(client, headers=a()) for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 429]
    assert policy_of(results[0][1]) == {"qps": {"q": 2, "w": 1}}
    assert "2 requests per second" in results[2][2]["error"]["message"]
    assert (await call(client, headers=b()))[0] == 200
    clock.advance(0.5)
    assert (await call(client, headers=a()))[0] == 200  # one more every half second


async def test_a_fractional_qps_is_shown_per_minute(fake, gateway):
    clock = StillClock()
    cfg = profiled(fake.url, {"max_qps_per_tenant": 0.5, "burst_size": 1})
    client, _ = await gateway(cfg, env=ENV, clock=clock, store=MemoryStore(clock=clock.time))
    first, second = [await call(client, headers=a()) for _ in range(2)]
    assert first[0] == 200 and policy_of(first[1]) == {"qps": {"q": 30, "w": 60, "reliapi-burst": 1}}
    assert second[0] == 429 and int(second[1]["Retry-After"]) == 2


async def test_max_qps_per_tenant_is_shared_by_gateways_on_redis(fake, gateway):
    prefix = new_prefix()
    cfg = profiled(fake.url, {"max_qps_per_tenant": 1, "burst_size": 2})
    clients = []
    try:
        for _ in range(2):
            client, _ = await gateway(cfg, env=ENV, store=await redis_store(prefix))
            clients.append(client)
        one, two = clients
        assert [(await call(c, headers=a()))[0] for c in (one, two, one)] == [200, 200, 429]
    finally:
        for client in clients:
            await client.close()
        await drop(await redis_store(prefix))


async def test_max_qps_per_provider_key_on_a_single_key(fake, gateway):
    clock = StillClock()
    cfg = profiled(fake.url, {"max_qps_per_provider_key": 1})
    client, _ = await gateway(cfg, env=ENV, clock=clock, store=MemoryStore(clock=clock.time))
    assert (await call(client, headers=a()))[0] == 200
    status, _, data = await call(client, headers=a())
    assert status == 429 and "max_qps_per_provider_key" in data["error"]["message"]
    assert (await call(client, headers=b()))[0] == 200  # the key itself is not limited for others
    assert len(fake.requests) == 2
    assert all(r.headers["Authorization"] == "Bearer sk-up-secret" for r in fake.requests)


async def test_max_qps_per_provider_key_spreads_a_tenant_over_a_pool(fake, gateway):
    clock = StillClock()
    pools = {"up": {"keys": [{"id": "k1", "api_key": "env:K1"}, {"id": "k2", "api_key": "env:K2"}]}}
    cfg = profiled(fake.url, {"max_qps_per_provider_key": 1}).section("provider_key_pools", pools)
    env = {**ENV, "K1": "sk-pool-one-1111", "K2": "sk-pool-two-2222"}
    client, _ = await gateway(cfg, env=env, clock=clock, store=MemoryStore(clock=clock.time))
    assert [(await call(client, headers=a()))[0] for _ in range(3)] == [200, 200, 429]
    assert sorted(r.headers["Authorization"] for r in fake.requests) == ["Bearer sk-pool-one-1111",
                                                                          "Bearer sk-pool-two-2222"]


@pytest.mark.parametrize("retries", [NO_RETRY, {"5xx": {"attempts": 2}}], ids=["no-retry-policy", "retry-policy"])
async def test_default_timeout_is_the_clients_deadline_not_the_targets_failure(fake, upstreams, gateway, retries):
    backup = await upstreams()
    cfg = profiled(fake.url, {"default_timeout_s": 0.2}).up(
        circuit_breaker={"error_threshold": 1}, fallback_targets=["spare"], retry_matrix=retries)
    cfg.target("spare", base_url=f"{backup.url}/v1", provider="openai", models=["spare-*"], retry_matrix=NO_RETRY)
    client, logs = await gateway(cfg, env=ENV)
    for _ in range(2):
        status, _, data = await call(client, headers=a(**{"X-Fake-Delay-Ms": "1500"}))
        assert status == 504 and data["error"]["code"] == "deadline_exceeded"
    assert backup.requests == []  # no fallback: another target would not make the client's deadline longer
    assert client.app[RUNTIME].current.circuits["up"].breaker.state == "closed"
    status, _, _ = await call(client, headers=b(**{"X-Fake-Delay-Ms": "300"}))  # b has no deadline of its own
    assert status == 200
    assert logs[0]["status"] == 504 and logs[0]["error_code"] == "deadline_exceeded"


async def test_default_timeout_bounds_retries_too(fake, gateway):
    cfg = profiled(fake.url, {"default_timeout_s": 0.5}).up(
        retry_matrix={"5xx": {"attempts": 5, "backoff": "constant", "base_s": 0.3}})
    client, _ = await gateway(cfg, env=ENV)
    status, _, _ = await call(client, headers=a(**{"X-Fake-Status": "503"}))
    assert status == 503  # the upstream's answer, once the next wait would pass the deadline
    assert 1 <= len(fake.requests) <= 2  # not the 6 attempts the target's own rules would allow


@pytest.mark.parametrize("profile", [{"max_parallel_requests": 0}, {"burst_size": 0}, {"default_timeout_s": -1}])
def test_nonsense_profiles_are_refused_at_load(profile):
    from gateway.config import ConfigError, parse_config
    cfg = profiled("http://127.0.0.1:9", profile)
    with pytest.raises(ConfigError, match="client_profiles.p"):
        parse_config(str(cfg), env=ENV)


async def test_a_request_refused_for_parallelism_uses_no_quota(fake, gateway):
    """Found by a black-box review: the rpm bucket was taken before the parallel check refused."""
    tenants = [{"name": "a", "api_key": KEY_A, "profile": "p", "rate_limit": {"rpm": 2}}]
    cfg = config(fake.url, tenants=tenants).section("client_profiles", {"p": {"max_parallel_requests": 1}})
    client, _ = await gateway(cfg, env=ENV)
    slow = asyncio.create_task(call(client, headers=a(**{"X-Fake-Delay-Ms": "400"})))
    while not fake.requests:
        await asyncio.sleep(0.01)
    for _ in range(3):
        status, _, data = await call(client, headers=a())
        assert status == 429 and data["error"]["code"] == "too_many_parallel_requests"
    assert (await slow)[0] == 200
    assert (await call(client, headers=a()))[0] == 200  # the second of two a minute: the refusals took none
