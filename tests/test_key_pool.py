"""Key pool (SPEC §5 "Key pool"): several upstream keys for one target, round-robin, each with its own health.

What is checked is what a user of the gateway notices: which key the fake provider was
called with (its ``Authorization`` header), the client's status, body and headers, the
pool's per-key states as the status page shows them, events and log lines — and that
a key's value never shows up in any of them. Cooldowns and waits run on a FakeClock;
the store is an in-process MemoryStore on the same clock (a real Redis where named).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

import pytest

from gateway.keys import RUNTIME
from gateway.observe.events import KeyCooldown, KeyDisabled, RetryScheduled
from gateway.store.memory import MemoryStore
from tests.support.clock import FakeClock
from tests.support.config import GatewayConfig, bearer_env
from tests.support.fakes import Fault
from tests.support.gateway import until
from tests.support.stores import drop, new_prefix, redis_store

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
SECRETS = {"K1": "sk-pool-alpha-1111", "K2": "sk-pool-bravo-2222", "K3": "sk-pool-charlie-3333"}
POOL = {"type": "bearer_env", "env_vars": ["K1", "K2", "K3"]}


def config(url: str, *, auth: dict = POOL, pools: dict | None = None, **up_fields: object) -> GatewayConfig:
    """One target ``up`` with the key pool ``auth`` (more fields for it in ``up_fields``); ``pools``:
    a top-level ``provider_key_pools``."""
    cfg = GatewayConfig(url, default_target="up").up(timeout_ms=2000, auth=auth, **up_fields)
    return cfg.section("provider_key_pools", pools) if pools else cfg


@pytest.fixture
def start(fake, gateway, clock):
    """``await start(**config options, env=...)`` → (client, access log) on a store sharing the test clock."""

    async def make(*, env: dict[str, str] | None = None, store=None, **options):
        return await gateway(
            config(fake.url, **options), env=SECRETS if env is None else env, clock=clock,
            store=store or MemoryStore(clock=clock.time),
        )

    return make


def used(fake, secrets: dict[str, str] = SECRETS) -> list[str]:
    """The id of the key each upstream request carried ("?" for anything else)."""
    by_header = {f"Bearer {v}": k for k, v in secrets.items()}
    return [by_header.get(r.headers.get("Authorization", ""), "?") for r in fake.requests]


def pool(client, target: str = "up"):
    return client.app[RUNTIME].current.key_pools[target]


def recorded(client) -> list:
    events: list = []
    client.app[RUNTIME].current.events.subscribe(events.append)
    return events


async def ask(client, **headers: str):
    return await client.post("/v1/chat/completions", json=CHAT, headers=headers)


# ---------------------------------------------------------------- rotation


async def test_keys_are_used_round_robin(fake, start):
    client, logs = await start()
    for _ in range(4):
        resp = await ask(client)
        assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "1"
    assert [r.headers["Authorization"] for r in fake.requests] == [
        "Bearer sk-pool-alpha-1111", "Bearer sk-pool-bravo-2222", "Bearer sk-pool-charlie-3333",
        "Bearer sk-pool-alpha-1111",
    ]
    assert pool(client).states() == {"K1": "healthy", "K2": "healthy", "K3": "healthy"}


async def test_the_clients_own_key_is_replaced_by_the_pools(fake, start):
    client, _ = await start()
    resp = await ask(client, Authorization="Bearer sk-client-own")
    assert resp.status == 200
    assert [r.headers.getall("Authorization") for r in fake.requests] == [["Bearer sk-pool-alpha-1111"]]


# ---------------------------------------------------------------- 429: cooldown


async def test_429_answers_the_same_request_with_the_next_key_at_once(fake, start, clock):
    client, logs = await start()
    events = recorded(client)
    fake.plan(Fault(status=429, headers={"Retry-After": "5"}))
    resp = await ask(client)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "Hello from the fake."
    assert resp.headers["X-ReliAPI-Attempts"] == "2"
    assert used(fake) == ["K1", "K2"]
    assert clock.sleeps == []  # no backoff: the other key is not limited
    assert [e for e in events if isinstance(e, KeyCooldown)] == [KeyCooldown(target="up", key_id="K1", cooldown_s=5.0)]
    retries = [e for e in events if isinstance(e, RetryScheduled)]
    assert [(e.reason, e.attempt, e.delay_s) for e in retries] == [("key", 2, 0.0)]
    assert logs[-1]["status"] == 200 and logs[-1]["attempts"] == 2


async def test_a_cooling_key_is_skipped_until_its_retry_after_has_passed(fake, start, clock):
    client, _ = await start()
    fake.plan(Fault(status=429, headers={"Retry-After": "5"}))
    assert (await ask(client)).status == 200
    assert pool(client).states() == {"K1": "cooling", "K2": "healthy", "K3": "healthy"}
    for _ in range(4):
        resp = await ask(client)
        assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "1"
    assert used(fake) == ["K1", "K2", "K3", "K2", "K3", "K2"]

    clock.advance(5)
    assert pool(client).states()["K1"] == "healthy"
    for _ in range(3):
        assert (await ask(client)).status == 200
    assert sorted(used(fake)[6:]) == ["K1", "K2", "K3"]  # K1 is back in the rotation
    assert clock.sleeps == []


async def test_a_429_without_retry_after_cools_the_key_for_one_second(fake, start, clock):
    client, _ = await start()
    events = recorded(client)
    fake.plan(Fault(status=429))
    resp = await ask(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "2"
    assert used(fake) == ["K1", "K2"]
    assert [e.cooldown_s for e in events if isinstance(e, KeyCooldown)] == [1.0]
    assert pool(client).states()["K1"] == "cooling"
    clock.advance(1)
    assert pool(client).states()["K1"] == "healthy"


async def test_a_spent_quota_cools_the_key_for_at_least_a_minute(fake, start, clock):
    client, _ = await start()
    events = recorded(client)
    fake.plan(Fault(status=429, error_code="insufficient_quota", error_message="You exceeded your current quota"))
    resp = await ask(client)
    assert resp.status == 200 and used(fake) == ["K1", "K2"] and clock.sleeps == []
    assert [e.cooldown_s for e in events if isinstance(e, KeyCooldown)] == [60.0]
    clock.advance(30)
    assert pool(client).states()["K1"] == "cooling"
    clock.advance(30)
    assert pool(client).states()["K1"] == "healthy"


async def test_an_anthropic_pool_rotates_the_x_api_key_header(fake, gateway, clock):
    client, _ = await gateway(f"""
targets:
  claude:
    base_url: {fake.url}
    provider: anthropic
    models: ["claude-*"]
    auth: {{type: header_env, header: x-api-key, env_vars: [A1, A2]}}
""", env={"A1": "sk-ant-one-eeee", "A2": "sk-ant-two-ffff"}, clock=clock)
    fake.plan(Fault(status=429, headers={"Retry-After": "5"}))
    body = {"model": "claude-test-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        resp = await client.post("/v1/messages", json=body, headers={"x-api-key": "sk-client-own"})
        assert resp.status == 200
    assert [r.headers.getall("x-api-key") for r in fake.requests] == [
        ["sk-ant-one-eeee"], ["sk-ant-two-ffff"], ["sk-ant-two-ffff"]]  # A1 cooling: A2 twice
    assert all("Authorization" not in r.headers for r in fake.requests)
    assert pool(client, "claude").states() == {"A1": "cooling", "A2": "healthy"}


# ---------------------------------------------------------------- every key cooling


def _three_429s(*retry_after: int) -> Callable:
    """The first requests answer 429 with these Retry-After values, every later one 200."""

    def script(n: int, seen) -> Fault | None:
        if n <= len(retry_after):
            return Fault(status=429, headers={"Retry-After": str(retry_after[n - 1])})
        return None

    return script


async def test_every_key_cooling_waits_for_the_soonest_key_without_calling_the_upstream(fake, start, clock):
    client, _ = await start(retry_matrix={"429": {"max_s": 20}})
    fake.script = _three_429s(30, 40, 50)
    first = await ask(client)  # every key answers 429, the last one's Retry-After is over max_s: passed through
    assert first.status == 429 and used(fake) == ["K1", "K2", "K3"]
    assert pool(client).states() == {"K1": "cooling", "K2": "cooling", "K3": "cooling"}
    assert clock.sleeps == []

    clock.advance(15)  # K1 is free in ~15 s: within max_s
    resp = await ask(client)
    assert resp.status == 200
    assert len(clock.sleeps) == 1 and clock.sleeps[0] == pytest.approx(15, abs=0.5)
    assert used(fake) == ["K1", "K2", "K3", "K1"]  # nothing was sent while every key was cooling
    assert fake.requests[3].at - fake.requests[0].at >= 30 - 0.05
    assert resp.headers["X-ReliAPI-Attempts"] == "1"


async def test_every_key_cooling_beyond_max_s_answers_429_rate_limited_with_retry_after(fake, start, clock):
    client, logs = await start(retry_matrix={"429": {"max_s": 20}})
    fake.script = _three_429s(30, 40, 50)
    assert (await ask(client)).status == 429
    resp = await ask(client)
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "rate_limited" and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["param"] is None and "up" in body["error"]["message"]
    assert 29 <= int(resp.headers["Retry-After"]) <= 30  # the soonest key's remaining cooldown
    assert resp.headers["X-Request-Id"]
    assert len(fake.requests) == 3  # the upstream was not asked again
    assert clock.sleeps == []
    assert logs[-1]["status"] == 429 and logs[-1]["error_code"] == "rate_limited"


async def test_when_the_last_key_is_limited_too_the_request_waits_for_the_soonest_key(fake, start, clock):
    # K1 is free again in 10 s; only the last key tried (K3) wants longer than the 429 rule's max_s (60)
    client, _ = await start()
    fake.script = _three_429s(10, 20, 90)
    resp = await ask(client)
    assert resp.status == 200, "a key frees up within max_s: the request should wait for it, not fail"
    assert len(clock.sleeps) == 1 and clock.sleeps[0] == pytest.approx(10, abs=0.5)
    assert used(fake) == ["K1", "K2", "K3", "K1"]
    assert resp.headers["X-ReliAPI-Attempts"] == "4"



class EarlyClock(FakeClock):
    """Sleeps end half a millisecond early, as an event loop's millisecond timers may."""

    async def sleep(self, seconds: float) -> None:  # type: ignore[override]
        self.sleeps.append(seconds)
        self.offset += max(0.0, seconds - 0.0005)
        await asyncio.sleep(0)


async def test_a_wait_for_the_first_key_back_that_ends_a_hair_early_still_gets_that_key(fake, gateway):
    """Every key cooling: the request waits for the soonest one. A wake-up a hair before its cooldown ended found it
    still cooling, and that spent one of the 429 rule's retries without an upstream call (a review saw 4 to 13
    upstream calls for the same request)."""
    clock = EarlyClock()
    client, _ = await gateway(config(fake.url, retry_matrix={"429": {"attempts": 1, "max_s": 20}}), env=SECRETS,
                              clock=clock, store=MemoryStore(clock=clock.time))
    fake.script = _three_429s(10, 20, 30)
    resp = await ask(client)
    assert resp.status == 200 and used(fake) == ["K1", "K2", "K3", "K1"]  # the one retry went to the first key back
    assert len(clock.sleeps) == 1

# ---------------------------------------------------------------- 401: disabled key


async def test_401_disables_the_key_and_the_next_key_answers(fake, start, clock, caplog):
    caplog.set_level(logging.INFO, logger="reliapi")
    client, _ = await start()
    events = recorded(client)
    fake.plan(Fault(status=401, error_code="invalid_api_key", error_message="Incorrect API key provided"))
    resp = await ask(client)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "2"
    assert used(fake) == ["K1", "K2"]
    assert clock.sleeps == []
    disabled = [e for e in events if isinstance(e, KeyDisabled)]
    assert [(e.target, e.key_id) for e in disabled] == [("up", "K1")]
    errors = [r for r in caplog.records if r.name == "reliapi" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "K1" in json.dumps(getattr(errors[0], "fields", {})) + errors[0].getMessage()
    assert pool(client).states() == {"K1": "disabled", "K2": "healthy", "K3": "healthy"}

    for _ in range(4):
        assert (await ask(client)).status == 200
    clock.advance(600)  # a disabled key stays out well past any cooldown
    for _ in range(3):
        assert (await ask(client)).status == 200
    assert used(fake)[2:] == ["K3", "K2", "K3", "K2", "K3", "K2", "K3"]
    assert pool(client).states()["K1"] == "disabled"


async def test_every_key_disabled_passes_the_providers_own_401_through(fake, start):
    client, _ = await start()
    fake.script = lambda n, seen: Fault(status=401, error_code="invalid_api_key",
                                        error_message="Incorrect API key provided")
    resp = await ask(client)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["message"] == "Incorrect API key provided" and body["error"]["code"] == "invalid_api_key"
    assert used(fake) == ["K1", "K2", "K3"] and resp.headers["X-ReliAPI-Attempts"] == "3"
    assert pool(client).states() == {"K1": "disabled", "K2": "disabled", "K3": "disabled"}

    again = await ask(client)  # all disabled: a key is used anyway, so the client hears the provider
    assert again.status == 401
    assert (await again.json())["error"]["code"] == "invalid_api_key"
    assert len(fake.requests) == 4 and used(fake)[3] in SECRETS


# ---------------------------------------------------------------- the seed's provider_key_pools form

SEED_ENV = {"OPENAI_KEY_1": "sk-seed-one-aaaa", "OPENAI_KEY_2": "sk-seed-two-bbbb", "UP_KEY": "sk-target-own"}
SEED_POOLS = {"openai": {"keys": [{"id": "openai-main-1", "api_key": "env:OPENAI_KEY_1", "qps_limit": 1},
                                  {"id": "openai-main-2", "api_key": "env:OPENAI_KEY_2", "qps_limit": 1}]}}


async def test_seed_provider_key_pools_form_rotates_the_keys_by_id(fake, start, clock):
    client, _ = await start(env=SEED_ENV, auth=bearer_env("UP_KEY"), pools=SEED_POOLS)
    events = recorded(client)
    assert pool(client).states() == {"openai-main-1": "healthy", "openai-main-2": "healthy"}
    for _ in range(3):
        assert (await ask(client)).status == 200
    names = {"openai-main-1": "sk-seed-one-aaaa", "openai-main-2": "sk-seed-two-bbbb"}
    assert used(fake, names) == ["openai-main-1", "openai-main-2", "openai-main-1"]  # the pool overrides auth
    assert len(clock.sleeps) == 1 and 0 < clock.sleeps[0] <= 1.0  # qps_limit 1: the third waited for a key

    fake.plan(Fault(status=429, headers={"Retry-After": "7"}))
    clock.advance(2)
    assert (await ask(client)).status == 200
    assert [(e.key_id, e.cooldown_s) for e in events if isinstance(e, KeyCooldown)] == [("openai-main-2", 7.0)]
    assert pool(client).states() == {"openai-main-1": "healthy", "openai-main-2": "cooling"}


async def test_a_pool_keyed_by_target_name_wins_over_the_providers(fake, gateway, clock):
    pools = {**SEED_POOLS, "up": {"keys": [{"id": "up-a", "api_key": "env:UP_A"}, {"id": "up-b", "api_key": "env:UP_B"}]}}
    env = {**SEED_ENV, "UP_A": "sk-up-a-cccc", "UP_B": "sk-up-b-dddd"}
    client, _ = await gateway(config(fake.url, pools=pools).up("other", models=["o-*"]), env=env, clock=clock,
                              store=MemoryStore(clock=clock.time))
    for _ in range(2):
        assert (await ask(client)).status == 200
    assert used(fake, {"up-a": "sk-up-a-cccc", "up-b": "sk-up-b-dddd"}) == ["up-a", "up-b"]
    assert pool(client, "up").states() == {"up-a": "healthy", "up-b": "healthy"}
    # a target without a pool of its own gets its provider's
    assert (await ask(client, **{"X-ReliAPI-Target": "other"})).status == 200
    assert fake.requests[-1].headers["Authorization"] == "Bearer sk-seed-one-aaaa"
    assert pool(client, "other").states() == {"openai-main-1": "healthy", "openai-main-2": "healthy"}


# ---------------------------------------------------------------- qps_per_key

QPS_POOL = {"type": "bearer_env", "env_vars": ["K1", "K2"], "qps_per_key": 1}


async def test_qps_per_key_waits_when_every_key_is_at_its_limit(fake, start, clock):
    client, _ = await start(auth=QPS_POOL)
    for _ in range(3):  # three quick requests: the third finds both keys at their limit
        assert (await ask(client)).status == 200
    assert len(clock.sleeps) == 1 and 0 < clock.sleeps[0] <= 1.0  # KeysExhausted: the retry waited for a key
    assert used(fake) == ["K1", "K2", "K1"]
    assert fake.requests[2].at - fake.requests[0].at >= 1.0 - 0.05


async def test_qps_per_key_without_retries_answers_429_with_retry_after(fake, start, clock):
    client, _ = await start(auth=QPS_POOL, retry_matrix={"429": {"attempts": 0}})
    assert (await ask(client)).status == 200
    assert (await ask(client)).status == 200
    resp = await ask(client)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "rate_limited"
    assert resp.headers["Retry-After"] == "1"
    assert used(fake) == ["K1", "K2"] and clock.sleeps == []
    clock.advance(1)
    assert (await ask(client)).status == 200
    assert used(fake) == ["K1", "K2", "K1"]


def _gaps(fake, key: str) -> list[float]:
    times = [r.at for r, k in zip(fake.requests, used(fake), strict=True) if k == key]
    return [b - a for a, b in pairwise(times)]


async def test_keys_never_exceed_their_rate(fake, start, clock):
    client, _ = await start(auth=QPS_POOL)
    for _ in range(8):
        assert (await ask(client)).status == 200
    assert Counter(used(fake)) == {"K1": 4, "K2": 4}
    for key in ("K1", "K2"):
        assert min(_gaps(fake, key)) >= 1.0 - 0.05, f"{key} used faster than 1/s: {_gaps(fake, key)}"


async def test_concurrent_requests_do_not_push_a_key_over_its_rate(fake, start, clock):
    client, _ = await start(auth=QPS_POOL)
    began = clock.monotonic()
    # five at once: more would exceed the retry budget (min_concurrent 3 retrying requests)
    resps = await asyncio.gather(*(ask(client) for _ in range(5)))
    assert [r.status for r in resps] == [200] * 5
    elapsed = clock.monotonic() - began  # virtual time: the waits the gateway made
    counts = Counter(used(fake))
    assert sum(counts.values()) == 5 and set(counts) == {"K1", "K2"}
    for key, n in counts.items():
        assert n <= 1 + elapsed + 0.05, f"{key} used {n} times in {elapsed:.2f} s at 1/s"
    assert clock.sleeps


# ---------------------------------------------------------------- secrecy


async def test_key_values_never_appear_in_logs_events_states_or_error_bodies(fake, start, clock, caplog):
    caplog.set_level(logging.DEBUG, logger="reliapi")
    client, logs = await start()
    events = recorded(client)
    bodies = []
    fake.plan(
        Fault(status=429, echo_auth=True),  # K1 cools
        Fault(status=401, echo_auth=True),  # K2 disabled
        Fault(status=400, echo_auth=True, error_message="bad request"),  # K3: passed through
    )
    resp = await ask(client)
    assert resp.status == 400
    bodies.append(await resp.text())
    assert "bad key Bearer" in bodies[-1]  # the fake did quote the key back

    clock.advance(2)
    fake.script = lambda n, seen: Fault(status=429, headers={"Retry-After": "100"}, echo_auth=True)
    resp = await ask(client)  # K3 and K1 answer 429 with a Retry-After over max_s: the upstream 429 passes
    assert resp.status == 429
    bodies.append(await resp.text())
    resp = await ask(client)  # every key cooling or disabled: the gateway's own 429
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "rate_limited"
    bodies.append(await resp.text())

    shown = {
        "bodies": bodies,
        "access log": json.dumps(logs),
        "events": repr(events),
        "states": repr(pool(client).states()),
        "log records": [(r.getMessage(), repr(getattr(r, "fields", None))) for r in caplog.records],
    }
    assert {e.key_id for e in events if isinstance(e, (KeyCooldown, KeyDisabled))} == {"K1", "K2", "K3"}
    text = repr(shown)
    for secret in SECRETS.values():
        assert secret not in text


# ---------------------------------------------------------------- shared between instances


@pytest.fixture(params=["memory", "redis"])
async def shared_stores(request, clock):
    """Two stores that reach the same state: one MemoryStore object twice, or two RedisStores on one prefix."""
    if request.param == "memory":
        store = MemoryStore(clock=clock.time)
        yield store, store
        return
    prefix = new_prefix()
    a = await redis_store(prefix)
    b = await redis_store(prefix)
    try:
        yield a, b  # each gateway closes its own store at shutdown
    finally:
        await drop(await redis_store(prefix))


async def test_a_429_seen_by_one_instance_cools_the_key_on_the_other(fake, start, clock, shared_stores):
    store_a, store_b = shared_stores
    a, _ = await start(store=store_a)
    b, _ = await start(store=store_b)
    fake.plan(Fault(status=429, headers={"Retry-After": "30"}))
    assert (await ask(a)).status == 200
    assert used(fake) == ["K1", "K2"]

    await until(lambda: pool(b).states()["K1"] == "cooling")
    assert pool(b).states() == {"K1": "cooling", "K2": "healthy", "K3": "healthy"}
    for _ in range(4):
        resp = await ask(b)
        assert resp.status == 200 and resp.headers["X-ReliAPI-Attempts"] == "1"
    assert "K1" not in used(fake)[2:]

    clock.advance(30)
    assert pool(b).states()["K1"] == "healthy"
    for _ in range(3):
        assert (await ask(b)).status == 200
    assert "K1" in used(fake)[6:]


async def test_a_key_disabled_by_one_instance_is_not_used_by_the_other(fake, start, clock, shared_stores):
    store_a, store_b = shared_stores
    a, _ = await start(store=store_a)
    b, _ = await start(store=store_b)
    fake.plan(Fault(status=401))
    assert (await ask(a)).status == 200
    await until(lambda: pool(b).states()["K1"] == "disabled")
    for _ in range(4):
        assert (await ask(b)).status == 200
    assert "K1" not in used(fake)[2:]


async def test_qps_per_key_works_on_a_static_token_too(fake, start, clock):
    """It used to validate and be dropped for ``bearer_static`` (issue #14 point 5's audit)."""
    client, _ = await start(auth={"type": "bearer_static", "token": "sk-static-token-1", "qps_per_key": 1},
                            retry_matrix={"429": {"attempts": 0}})
    assert (await ask(client)).status == 200
    assert (await ask(client)).status == 429  # the one key is at its limit: the gateway's own 429, not sent
    assert len(fake.requests) == 1
