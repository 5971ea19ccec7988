"""Rate limits (SPEC §5 "Rate limit", RELIABILITY-NOTES §4, TC31–TC34).

GCRA per tenant (``rpm``, ``burst``, ``tpm``) or per client IP when there are no tenants,
taken atomically in the store, so gateways sharing a store enforce one limit. Every response
where a limit applies carries ``X-RateLimit-*`` and the IETF ``RateLimit-Policy`` /
``RateLimit``; a refusal is a 429 ``rate_limited`` with ``Retry-After`` in the client's
dialect that never reaches the upstream (so it never counts against a circuit). When the
store fails, ``store.rate_limit_on_error`` decides: local / allow / deny.

The memory store runs on the test's fake clock (``MemoryStore(clock=clock.time)``): the policy
calls ``store.take`` without ``now``, so the store's clock is the one that decides. Here that
clock's wall time stands still unless the test advances it, so the GCRA numbers are exact.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import UTC, datetime

import pytest

from gateway.keys import RUNTIME
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.clock import FakeClock
from tests.support.config import NO_RETRY, GatewayConfig, llm_config
from tests.support.fakes import Fault
from tests.support.stores import drop, new_prefix, redis_store

ENV = {"UP_KEY": "sk-up-secret", "CLAUDE_KEY": "sk-ant-secret"}
KEY_A = "tenant-a-key-01"
KEY_B = "tenant-b-key-02"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "claude-test-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit-Policy", "RateLimit")


def config(url: str, *, tenants: list[dict] = (), store_fields: dict | None = None, up: dict | None = None,
           **server: object) -> GatewayConfig:
    """The usual ``up``/``claude``/``rest`` (upstream keys, ``rest`` without an auth block), no retries;
    ``server`` fields beside ``default_target: up``, ``store_fields``, ``up`` fields, ``tenants``."""
    cfg = llm_config(url, **server).rest(auth=None).each(retry_matrix=NO_RETRY).up(**(up or {}))
    if store_fields:
        cfg.store(**store_fields)
    return cfg.tenants(*tenants)


def tenants(a: dict, b: dict | None = None) -> list[dict]:
    """Tenant ``a`` with the rate limit under test, ``b`` with a roomy one."""
    return [{"name": "a", "api_key": KEY_A, "rate_limit": a},
            {"name": "b", "api_key": KEY_B, "rate_limit": b or {"rpm": 1000}}]


FREE = {"name": "free", "api_key": "free-key-00003"}  # a third tenant, without any limit


class StillClock(FakeClock):
    """The fake clock with wall time frozen at its creation (plus whatever the test advances)."""

    def __init__(self) -> None:
        super().__init__()
        self._epoch = float(int(time.time()))

    def time(self) -> float:  # type: ignore[override]
        return self._epoch + self.offset


@pytest.fixture
def clock() -> StillClock:
    return StillClock()


@pytest.fixture
def start(fake, gateway, clock):
    """A gateway on a memory store running on the fake clock."""

    async def make(*, store=None, cfg=None, **options):
        store = store if store is not None else MemoryStore(clock=clock.time)
        return await gateway(cfg or config(fake.url, **options), env=ENV, clock=clock, store=store)

    return make


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def send(client, dialect: str = "openai", headers: dict[str, str] | None = None, body: dict | None = None):
    if dialect == "openai":
        return client.post("/v1/chat/completions", json=body or CHAT, headers=headers)
    if dialect == "anthropic":
        return client.post("/v1/messages", json=body or CLAUDE, headers=headers)
    return client.get("/t/rest/items", headers=headers)


async def call(client, dialect: str = "openai", headers: dict[str, str] | None = None, body: dict | None = None):
    """(status, headers, decoded JSON body)."""
    resp = await send(client, dialect, headers, body)
    return resp.status, resp.headers, await resp.json(content_type=None)


def remaining(headers) -> int:
    return int(headers["X-RateLimit-Remaining"])


# ---- a strict reading of the Structured Field Lists these headers are (RFC 8941), enough for ours

_PARAM = r';(?P<key>[a-z*][a-z0-9_.*-]*)(?:=(?P<value>-?\d{1,15}|"[^"\\]*"|[A-Za-z*][A-Za-z0-9:/!#$%&\'*+.^_`|~-]*))?'
_ITEM = re.compile(r'"(?P<name>[^"\\]*)"(?P<params>(?:' + _PARAM.replace("?P<key>", "?:").replace("?P<value>", "?:")
                   + r')*)')


def sf_list(text: str) -> list[tuple[str, dict[str, int | str | bool]]]:
    """Parse an SF List of String items with parameters; anything malformed fails the test."""
    items, pos = [], 0
    while True:
        m = _ITEM.match(text, pos)
        assert m, f"not a structured field list item at {text[pos:]!r} in {text!r}"
        params: dict[str, int | str | bool] = {}
        for p in re.finditer(_PARAM, m["params"]):
            key, value = p["key"], p["value"]
            assert key not in params, f"duplicate parameter {key} in {text!r}"
            params[key] = True if value is None else value[1:-1] if value.startswith('"') else int(value) \
                if re.fullmatch(r"-?\d+", value) else value
        items.append((m["name"], params))
        pos = m.end()
        if pos == len(text):
            return items
        sep = re.compile(r"[ \t]*,[ \t]*").match(text, pos)
        assert sep, f"bad list separator in {text!r}"
        pos = sep.end()


def policy_of(headers) -> dict[str, dict]:
    return dict(sf_list(headers["RateLimit-Policy"]))


def ratelimit_of(headers) -> tuple[str, dict]:
    (item,) = sf_list(headers["RateLimit"])
    return item


def reset_at(headers) -> float:
    text = headers["X-RateLimit-Reset"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text  # ISO-8601 UTC, seconds, Z
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def circuit_state(client, target: str = "up") -> str:
    return client.app[RUNTIME].current.circuits[target].breaker.state


# =============================================================== TC31: the GCRA table through the gateway


async def test_gcra_burst_then_one_per_interval(fake, start, clock):
    """TC31: rpm 60 (one per second) with burst 5: five at t0 with remaining 4..0, the sixth
    429 with Retry-After 1; at t0+3 s one more is allowed with remaining 2."""
    client, _ = await start(tenants=tenants({"rpm": 60, "burst": 5}))
    seen = []
    for _ in range(5):
        status, headers, _ = await call(client, headers=auth())
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "5"
        seen.append(remaining(headers))
    assert seen == [4, 3, 2, 1, 0]

    status, headers, data = await call(client, headers=auth())
    assert status == 429
    assert data["error"]["code"] == "rate_limited" and data["error"]["type"] == "rate_limit_error"
    assert headers["Retry-After"] == "1"
    assert remaining(headers) == 0
    assert ratelimit_of(headers) == ("default", {"r": 0, "t": 1})
    assert len(fake.requests) == 5  # the refused request never reached the upstream

    clock.advance(3)
    status, headers, _ = await call(client, headers=auth())
    assert status == 200 and remaining(headers) == 2
    assert len(fake.requests) == 6

    clock.advance(60)  # idle long enough: the whole burst is back
    status, headers, _ = await call(client, headers=auth())
    assert status == 200 and remaining(headers) == 4


async def test_rpm_without_burst_admits_a_minutes_worth_then_one_per_interval(fake, start, clock):
    client, _ = await start(tenants=tenants({"rpm": 3}))
    assert [remaining((await call(client, headers=auth()))[1]) for _ in range(3)] == [2, 1, 0]
    status, headers, _ = await call(client, headers=auth())
    assert status == 429 and headers["Retry-After"] == "20"  # one request per 20 s
    clock.advance(10)
    assert (await call(client, headers=auth()))[0] == 429  # not yet
    clock.advance(10.5)
    status, headers, _ = await call(client, headers=auth())
    assert status == 200 and remaining(headers) == 0
    assert len(fake.requests) == 4


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "envelope"])
async def test_429_rate_limited_in_the_clients_dialect(fake, start, clock, dialect):
    client, logs = await start(tenants=tenants({"rpm": 1}))
    assert (await call(client, dialect, auth()))[0] == 200
    status, headers, data = await call(client, dialect, auth())
    assert status == 429
    assert headers["Retry-After"] == "60"
    assert headers["X-Request-Id"]
    if dialect == "openai":
        assert data["error"]["code"] == "rate_limited" and data["error"]["type"] == "rate_limit_error"
        assert data["error"]["param"] is None
        message = data["error"]["message"]
    elif dialect == "anthropic":
        assert data["type"] == "error" and data["error"]["type"] == "rate_limit_error"
        message = data["error"]["message"]
    else:
        assert data["success"] is False
        err = data["error"]
        assert err["code"] == "rate_limited" and err["retryable"] is True and err["status_code"] == 429
        assert err["target"] == "rest"
        message = err["message"]
    assert "rate limit" in message
    assert len(fake.requests) == 1
    assert logs[-1]["status"] == 429 and logs[-1]["error_code"] == "rate_limited" and logs[-1]["tenant"] == "a"

    clock.advance(61)
    assert (await call(client, dialect, auth()))[0] == 200
    assert len(fake.requests) == 2


async def test_rate_limited_requests_never_reach_upstream_nor_count_toward_the_circuit(fake, start, clock):
    client, _ = await start(tenants=tenants({"rpm": 1}),
                            up={"circuit": {"error_threshold": 1, "cooldown_s": 600}})
    assert (await call(client, headers=auth()))[0] == 200
    for _ in range(10):
        assert (await call(client, headers=auth()))[0] == 429
    assert circuit_state(client) == "closed"
    assert len(fake.requests) == 1

    clock.advance(61)
    status, headers, _ = await call(client, headers=auth())
    assert status == 200 and headers["X-ReliAPI-Target"] == "up"  # the circuit let it through

    # the breaker is live: one real upstream failure does open it at this threshold
    clock.advance(61)
    fake.plan(Fault(status=503))
    assert (await call(client, headers=auth()))[0] == 503
    assert circuit_state(client) == "open"
    assert len(fake.requests) == 3


# =============================================================== TC32: headers


async def test_headers_on_allowed_responses(fake, start, clock):
    client, _ = await start(tenants=tenants({"rpm": 3}))
    status, headers, _ = await call(client, headers=auth())
    assert status == 200
    assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "2"
    assert policy_of(headers) == {"default": {"q": 3, "w": 60}}
    assert headers["RateLimit-Policy"] == '"default";q=3;w=60'
    assert ratelimit_of(headers) == ("default", {"r": 2, "t": 20})  # full again in one interval (20 s)
    assert reset_at(headers) == clock.time() + 20

    status, headers, _ = await call(client, headers=auth())
    assert ratelimit_of(headers) == ("default", {"r": 1, "t": 40})
    assert reset_at(headers) == clock.time() + 40

    clock.advance(30)  # 1.5 intervals refilled, one more taken: full again 30 s from now
    status, headers, _ = await call(client, headers=auth())
    assert ratelimit_of(headers) == ("default", {"r": 1, "t": 30}) and remaining(headers) == 1
    assert reset_at(headers) == clock.time() + 30


async def test_headers_with_burst_and_tokens_name_both_policies(fake, start):
    client, _ = await start(tenants=tenants({"rpm": 60, "burst": 10, "tpm": 100000}))
    status, headers, _ = await call(client, headers=auth())
    assert status == 200
    assert policy_of(headers) == {
        "default": {"q": 60, "w": 60, "reliapi-burst": 10},
        "tokens": {"q": 100000, "w": 60, "reliapi-unit": "tokens"},
    }
    name, params = ratelimit_of(headers)
    assert name == "default" and params["r"] == 9  # requests are the tighter limit here


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "envelope"])
async def test_headers_on_429(fake, start, clock, dialect):
    client, _ = await start(tenants=tenants({"rpm": 2}))
    for _ in range(2):
        assert (await call(client, dialect, auth()))[0] == 200
    status, headers, _ = await call(client, dialect, auth())
    assert status == 429
    assert headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Remaining"] == "0"
    assert policy_of(headers) == {"default": {"q": 2, "w": 60}}
    assert ratelimit_of(headers) == ("default", {"r": 0, "t": 30})
    assert int(headers["Retry-After"]) >= 30  # Retry-After never earlier than t
    assert reset_at(headers) == clock.time() + 60  # when the bucket is full again


async def test_headers_on_upstream_errors(fake, start):
    client, _ = await start(tenants=tenants({"rpm": 5}))
    fake.plan(Fault(reset=True), Fault(status=500), Fault(status=400))
    status, headers, data = await call(client, headers=auth())
    assert status == 502 and data["error"]["code"] == "upstream_unavailable"
    assert remaining(headers) == 4 and all(h in headers for h in RATE_HEADERS)

    status, headers, _ = await call(client, headers=auth())
    assert status == 500 and remaining(headers) == 3 and all(h in headers for h in RATE_HEADERS)

    status, headers, _ = await call(client, "anthropic", auth())
    assert status == 400 and remaining(headers) == 2 and all(h in headers for h in RATE_HEADERS)


async def test_no_rate_limit_headers_for_a_tenant_without_a_limit(fake, start):
    client, _ = await start(tenants=tenants({"rpm": 1}) + [FREE])
    for _ in range(3):
        status, headers, _ = await call(client, headers=auth("free-key-00003"))
        assert status == 200
        assert not [h for h in RATE_HEADERS if h in headers]


# =============================================================== TC34: per tenant


async def test_one_tenant_exhausted_another_unaffected(fake, start):
    client, logs = await start(tenants=tenants({"rpm": 2}, {"rpm": 2}))
    assert [(await call(client, headers=auth(KEY_A)))[0] for _ in range(3)] == [200, 200, 429]
    status, headers, _ = await call(client, headers=auth(KEY_B))
    assert status == 200 and remaining(headers) == 1  # b's own bucket, untouched by a
    # a client header cannot move a into another bucket: the partition is the authenticated tenant
    for extra in ({"X-Forwarded-For": "203.0.113.9"}, {"X-ReliAPI-User": "someone-else"}):
        assert (await call(client, headers={**auth(KEY_A), **extra}))[0] == 429
    assert (await call(client, headers=auth(KEY_B)))[0] == 200
    assert (await call(client, headers=auth(KEY_B)))[0] == 429
    assert len(fake.requests) == 4
    assert [line["tenant"] for line in logs if line["status"] == 429] == ["a", "a", "a", "b"]


async def test_seed_rate_limit_rpm_form(fake, start):
    client, _ = await start(cfg=config(fake.url).section("tenants", {"client-a": {"api_key": KEY_A, "rate_limit_rpm": 2}}))
    results = [await call(client, headers=auth()) for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 429]
    assert results[0][1]["RateLimit-Policy"] == '"default";q=2;w=60'
    assert results[2][1]["Retry-After"]


# =============================================================== tpm


def tokens_estimate(body: dict) -> int:
    """What the gateway estimates: body characters / 4 plus max_tokens (aiohttp's json= encoding)."""
    return len(json.dumps(body).encode()) // 4 + body.get("max_tokens", 0)


async def test_tpm_refuses_a_request_whose_tokens_do_not_fit(fake, start, clock):
    client, _ = await start(tenants=tenants({"tpm": 1000}))
    big = {**CHAT, "max_tokens": 600}
    status, headers, _ = await call(client, headers=auth(), body=big)
    assert status == 200
    assert headers["X-RateLimit-Limit"] == "1000"
    assert 1000 - tokens_estimate(big) - 1 <= remaining(headers) <= 1000 - tokens_estimate(big)
    assert policy_of(headers) == {"tokens": {"q": 1000, "w": 60, "reliapi-unit": "tokens"}}
    assert ratelimit_of(headers)[0] == "tokens"

    status, headers, data = await call(client, headers=auth(), body=big)
    assert status == 429 and data["error"]["code"] == "rate_limited"
    # it fits again once 2×estimate − 1000 tokens have refilled at 1000 per minute
    expected = (2 * tokens_estimate(big) - 1000) * 60 / 1000
    assert int(headers["Retry-After"]) == math.ceil(expected - 1e-6)
    assert len(fake.requests) == 1

    small = {**CHAT, "max_tokens": 10}
    assert (await call(client, headers=auth(), body=small))[0] == 200  # a small one still fits

    clock.advance(60)
    assert (await call(client, headers=auth(), body=big))[0] == 200
    assert len(fake.requests) == 3


async def test_tpm_counts_each_of_n_answers(fake, start, clock):
    """n=128 asks for 128 answers of max_tokens each: counted as one, it walked round the limit."""
    client, _ = await start(tenants=tenants({"tpm": 2000}))
    status, _, data = await call(client, headers=auth(), body={**CHAT, "max_tokens": 100, "n": 128})
    assert status == 429 and "never" in data["error"]["message"]  # 12,800 tokens: more than the whole limit
    status, headers, _ = await call(client, headers=auth(), body={**CHAT, "max_tokens": 100, "n": 4})
    assert status == 200 and remaining(headers) <= 2000 - 400
    assert len(fake.requests) == 1


async def test_tpm_a_request_larger_than_the_whole_limit_is_never_allowed(fake, start, clock):
    client, _ = await start(tenants=tenants({"tpm": 1000}))
    huge = {**CHAT, "max_tokens": 5000}
    for dialect, body in (("openai", huge), ("anthropic", {**CLAUDE, "max_tokens": 5000})):
        status, headers, data = await call(client, dialect, auth(), body=body)
        assert status == 429
        assert "Retry-After" not in headers  # waiting would not help
        message = data["error"]["message"]
        assert "never" in message
        assert all(h in headers for h in RATE_HEADERS)
    assert fake.requests == []
    clock.advance(3600)
    assert (await call(client, headers=auth(), body=huge))[0] == 429

    status, headers, _ = await call(client, headers=auth())  # nothing was taken by the refusals
    assert status == 200 and remaining(headers) >= 1000 - tokens_estimate(CHAT) - 1


async def test_tpm_does_not_apply_to_plain_http_targets(fake, start):
    client, _ = await start(tenants=tenants({"tpm": 10}))
    for _ in range(5):
        status, headers, _ = await call(client, "envelope", auth())
        assert status == 200
        assert not [h for h in RATE_HEADERS if h in headers]
    assert (await call(client, headers=auth(), body={**CHAT, "max_tokens": 100}))[0] == 429


# =============================================================== per IP


async def test_per_ip_limit_without_tenants(fake, start):
    client, logs = await start(rate_limit_per_ip_rpm=2)
    results = [await call(client) for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 429]
    assert [remaining(r[1]) for r in results] == [1, 0, 0]
    assert results[0][1]["RateLimit-Policy"] == '"ip";q=2;w=60'  # its own name: never two "default"s
    assert results[2][1]["Retry-After"]
    assert len(fake.requests) == 2
    # every surface shares the caller's bucket
    assert (await call(client, "envelope"))[0] == 429
    assert logs[-1]["tenant"] is None


async def test_per_ip_limit_applies_with_tenants_too(fake, start):
    """Issue #16 point 1: the door's limit counts every request from the address, whichever key it carries
    (tests/test_abuse.py: also before the key is looked at)."""
    client, _ = await start(rate_limit_per_ip_rpm=1, tenants=[{"name": "a", "api_key": KEY_A}])
    status, headers, _ = await call(client, headers=auth())
    assert status == 200 and headers["RateLimit-Policy"] == '"ip";q=1;w=60'
    status, _, data = await call(client, headers=auth())
    assert status == 429 and data["error"]["code"] == "rate_limited"


async def test_without_any_limit_there_are_no_rate_limit_headers(fake, start):
    client, _ = await start()
    for _ in range(3):
        status, headers, _ = await call(client)
        assert status == 200
        assert not [h for h in RATE_HEADERS if h in headers]


async def test_trust_forwarded_for_keys_on_the_last_hop(fake, start):
    client, _ = await start(rate_limit_per_ip_rpm=2, trust_forwarded_for=True)
    one = {"X-Forwarded-For": "198.51.100.7, 10.0.0.1"}
    two = {"X-Forwarded-For": "198.51.100.7, 10.0.0.2"}
    assert [(await call(client, headers=one))[0] for _ in range(3)] == [200, 200, 429]
    status, headers, _ = await call(client, headers=two)
    assert status == 200 and remaining(headers) == 1  # another client behind the proxy: its own bucket
    # the first hops are the client's to forge; only the last one (our proxy's view) counts
    assert (await call(client, headers={"X-Forwarded-For": "192.0.2.1, 10.0.0.1"}))[0] == 429
    assert (await call(client, headers={"X-Forwarded-For": "10.0.0.1"}))[0] == 429
    assert len(fake.requests) == 3


async def test_the_same_address_spelled_by_a_proxy_with_a_port_or_ipv4_mapped_is_one_client(fake, start):
    """Some proxies write ``ip:port`` (a new port per connection) or an IPv4-mapped IPv6 address."""
    client, _ = await start(rate_limit_per_ip_rpm=2, trust_forwarded_for=True)
    spellings = ["203.0.113.7", "203.0.113.7:50001", "203.0.113.7:50002", "::ffff:203.0.113.7", "::FFFF:203.0.113.7",
                 "[::ffff:203.0.113.7]:443"]
    statuses = [(await call(client, headers={"X-Forwarded-For": f"192.0.2.9, {ip}"}))[0] for ip in spellings]
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert len(fake.requests) == 2


async def test_an_ipv6_client_counts_by_its_64_not_by_each_address(fake, start):
    """A client given a /64 has 2^64 addresses: one bucket for them all; another /64 is another client."""
    client, _ = await start(rate_limit_per_ip_rpm=2, trust_forwarded_for=True)
    statuses = [(await call(client, headers={"X-Forwarded-For": f"2001:db8:1:1::{i}"}))[0] for i in range(1, 5)]
    assert statuses == [200, 200, 429, 429]
    assert (await call(client, headers={"X-Forwarded-For": "2001:db8:1:2::1"}))[0] == 200
    assert len(fake.requests) == 3


async def test_forwarded_for_is_ignored_unless_trusted(fake, start):
    client, _ = await start(rate_limit_per_ip_rpm=2)
    statuses = [(await call(client, headers={"X-Forwarded-For": f"10.0.0.{i}"}))[0] for i in range(3)]
    assert statuses == [200, 200, 429]  # all from the one peer, whatever they claim
    assert len(fake.requests) == 2


# =============================================================== store down


class TakeFails(MemoryStore):
    """A store whose rate-limit operation fails, as a Redis that went away would; the rest works."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempts = 0

    async def take(self, key, *, rate_per_s, burst, quantity=1, now=None):
        self.attempts += 1
        raise StoreError("connection refused (test)")

    async def take_all(self, takes, *, now=None):
        self.attempts += 1
        raise StoreError("connection refused (test)")


def on_error(mode: str) -> dict[str, str]:
    return {"rate_limit_on_error": mode}


async def test_store_down_local_keeps_limiting_from_memory(fake, start, clock):
    down = TakeFails(clock=clock.time)
    client, _ = await start(tenants=tenants({"rpm": 2}), store=down)  # local is the default
    results = [await call(client, headers=auth()) for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 429]
    assert [remaining(r[1]) for r in results] == [1, 0, 0]
    assert results[2][1]["Retry-After"] and results[2][2]["error"]["code"] == "rate_limited"
    assert down.attempts == 3  # the shared store was asked every time
    assert len(fake.requests) == 2
    assert (await call(client, headers=auth(KEY_B)))[0] == 200  # still per tenant


async def test_store_down_local_explicitly(fake, start, clock):
    client, _ = await start(tenants=tenants({"rpm": 1}), store=TakeFails(clock=clock.time),
                            store_fields=on_error("local"))
    assert [(await call(client, headers=auth()))[0] for _ in range(2)] == [200, 429]


async def test_store_down_allow_lets_everything_through_without_headers(fake, start, clock):
    down = TakeFails(clock=clock.time)
    client, _ = await start(tenants=tenants({"rpm": 1}), store=down, store_fields=on_error("allow"))
    for _ in range(4):
        status, headers, _ = await call(client, headers=auth())
        assert status == 200
        assert not [h for h in RATE_HEADERS if h in headers]  # no limit is known, so none is claimed
    assert down.attempts == 4 and len(fake.requests) == 4


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "envelope"])
async def test_store_down_deny_answers_503_store_unavailable(fake, start, clock, dialect):
    client, logs = await start(tenants=tenants({"rpm": 100}), store=TakeFails(clock=clock.time),
                               store_fields=on_error("deny"))
    status, headers, data = await call(client, dialect, auth())
    assert status == 503
    assert headers["Retry-After"] == "1"
    if dialect == "openai":
        assert data["error"]["code"] == "store_unavailable"
    elif dialect == "anthropic":
        assert data["type"] == "error" and data["error"]["type"] == "overloaded_error"
    else:
        assert data["error"]["code"] == "store_unavailable" and data["error"]["retryable"] is True
    assert fake.requests == []
    assert logs[-1]["error_code"] == "store_unavailable"


async def test_store_down_deny_spares_tenants_without_a_limit(fake, start, clock):
    client, _ = await start(tenants=tenants({"rpm": 100}) + [FREE], store=TakeFails(clock=clock.time), store_fields=on_error("deny"))
    assert (await call(client, headers=auth("free-key-00003")))[0] == 200
    assert (await call(client, headers=auth()))[0] == 503


@pytest.mark.parametrize(("mode", "expected"), [
    ("local", [(200, "1"), (200, "0"), (429, "0")]),
    ("allow", [(200, None), (200, None), (200, None)]),
    ("deny", [(503, None), (503, None), (503, None)]),
])
async def test_store_modes_with_a_redis_that_is_not_there(fake, gateway, clock, mode, expected):
    """The same three modes when the store is a real RedisStore whose server refuses connections."""
    store = RedisStore("redis://127.0.0.1:1/0", key_prefix=new_prefix())
    client, _ = await gateway(config(fake.url, tenants=tenants({"rpm": 2}), store_fields=on_error(mode)),
                              env=ENV, clock=clock, store=store)
    seen = []
    for _ in range(3):
        status, headers, _ = await call(client, headers=auth())
        seen.append((status, headers.get("X-RateLimit-Remaining")))
    assert seen == expected
    assert len(fake.requests) == sum(1 for status, _ in expected if status == 200)


async def test_a_local_limit_is_one_bucket_for_requests_with_and_without_an_idempotency_key(fake, gateway, clock):
    """While the store is down each instance limits in memory — one bucket per tenant, whichever way its
    requests go (a keyed request took a chain of its own, with its own buckets: twice the rate)."""
    store = RedisStore("redis://127.0.0.1:1/0", key_prefix=new_prefix())
    client, _ = await gateway(config(fake.url, tenants=tenants({"rpm": 2}),
                                     store_fields={"rate_limit_on_error": "local", "fail_open": True}),
                              env=ENV, clock=clock, store=store)
    keyed = [await call(client, headers={**auth(), "Idempotency-Key": f"k-{i}"}) for i in range(2)]
    assert [status for status, _, _ in keyed] == [200, 200]
    assert (await call(client, headers=auth()))[0] == 429


# =============================================================== one limit across gateways


async def test_two_gateways_on_one_memory_store_share_one_limit(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    cfg = config(fake.url, tenants=tenants({"rpm": 3}))
    a, _ = await gateway(cfg, env=ENV, clock=clock, store=store)
    b, _ = await gateway(cfg, env=ENV, clock=clock, store=store)
    seen = []
    for client in (a, b, a):
        status, headers, _ = await call(client, headers=auth())
        assert status == 200
        seen.append(remaining(headers))
    assert seen == [2, 1, 0]
    assert (await call(b, headers=auth()))[0] == 429
    assert (await call(a, headers=auth()))[0] == 429
    assert (await call(b, headers=auth(KEY_B)))[0] == 200
    assert len(fake.requests) == 4


async def test_two_gateways_on_redis_share_one_limit(fake, gateway, clock):
    prefix = new_prefix()
    clients = []
    cfg = config(fake.url, tenants=tenants({"rpm": 3}))
    try:
        for _ in range(2):  # two instances: each its own RedisStore (connection) on one Redis and prefix
            client, _ = await gateway(cfg, env=ENV, clock=clock, store=await redis_store(prefix))
            clients.append(client)
        a, b = clients
        seen = []
        for client in (a, b, a):
            status, headers, _ = await call(client, headers=auth())
            assert status == 200
            seen.append(remaining(headers))
        assert seen == [2, 1, 0]
        status, headers, data = await call(b, headers=auth())
        assert status == 429 and data["error"]["code"] == "rate_limited"
        assert 1 <= int(headers["Retry-After"]) <= 20
        assert (await call(a, "anthropic", auth()))[0] == 429
        assert (await call(b, headers=auth(KEY_B)))[0] == 200
        assert len(fake.requests) == 4
    finally:
        for client in clients:
            await client.close()  # each gateway closes its own store
        await drop(await redis_store(prefix))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.9999994, 0.9999996])
def test_the_reset_header_is_the_instant_to_the_second_as_datetime_says_it(fraction) -> None:
    """``X-RateLimit-Reset`` is formatted once per second (a cache); it must still name the second datetime
    names for the exact instant — which rounds to the microsecond first (x.9999996 is the next second)."""
    from gateway.store import TakeResult
    from policies.rate_limit import Limit, Limits, _headers

    limit = Limit("default", "rl:", 60)
    result = TakeResult(allowed=True, limit=60, remaining=59, retry_after_s=0.0, reset_after_s=1.0)
    now = 1_765_000_000.0 + fraction - 1.0
    expected = datetime.fromtimestamp(now + result.reset_after_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    assert _headers(Limits([limit]), limit, result, now)["X-RateLimit-Reset"] == expected
