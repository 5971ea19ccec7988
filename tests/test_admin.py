"""The admin API (SPEC §2 ``/admin/…``): what each endpoint shows and does, and who may call it.

Every endpoint is driven through a real gateway in front of the fake upstream, after
scripted traffic: the summary and usage numbers, cache statistics and a clear that makes
the next request a MISS again, circuits listed and reset (traffic flows again, on every
instance sharing the store). Access: with an admin key, ``Authorization: Bearer`` is
required; without one, only direct loopback peers, whose requests carry no forwarding
headers (the test client is one; other peers are tried on the access check itself, since a
test cannot connect from elsewhere). Errors are in the envelope dialect (SPEC §3).
"""

from __future__ import annotations

import logging
import time
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.config import parse_config
from gateway.edge.admin import check_access
from gateway.errors import Forbidden, Unauthorized
from gateway.runtime import Runtime
from gateway.store.memory import MemoryStore
from policies import cache as cache_policy
from tests.support.circuits import COOLDOWN, assert_circuit_open_openai, chat, eventually, open_circuit, state
from tests.support.circuits import config as circuit_config
from tests.support.config import NO_5XX_RETRY, GatewayConfig
from tests.support.fakes import Fault
from tests.support.gateway import settle
from tests.support.stores import drop, new_prefix, redis_store

ADMIN_KEY = "adm-0123456789-secret"
LLM_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ACME = {"Authorization": "Bearer acme-key-123456"}
OTHER = {"Authorization": "Bearer other-key-123456"}

ZERO_TOTAL = {"completion_tokens": 0, "cost_usd": 0.0, "prompt_tokens": 0, "requests": 0}  # no rows: zeros, not {}


def config(url: str, *, tenants: bool = False, **server: str) -> GatewayConfig:
    """``up`` (OpenAI), ``rest`` and ``rest2`` (plain HTTP, both cached), ``plain`` (not cached)."""
    cfg = GatewayConfig(url, default_target="up", **server)
    if tenants:
        cfg.tenant("acme", api_key="acme-key-123456").tenant("other", api_key="other-key-123456")
    cfg.up(retry_matrix=NO_5XX_RETRY).rest(retry_matrix=NO_5XX_RETRY, cache={"ttl_s": 60})
    cfg.target("rest2", f"{url}/api2", cache={"ttl_s": 60})
    return cfg.target("plain", f"{url}/plain", retry_matrix=NO_5XX_RETRY)


async def admin(client, method: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    async with client.request(method, path, **kwargs) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def data(client, method: str, path: str, **kwargs) -> dict:
    status, headers, body = await admin(client, method, path, **kwargs)
    assert status == 200, body
    assert body["success"] is True and body["meta"]["request_id"] == headers["X-Request-Id"]
    return body["data"]


def assert_envelope_error(status: int, headers, body: dict, *, expected: int, code: str) -> None:
    assert status == expected, body
    assert body["success"] is False
    assert body["error"]["code"] == code and body["error"]["status_code"] == expected
    assert body["error"]["type"] in ("client_error", "internal_error")
    assert body["meta"]["request_id"] == headers["X-Request-Id"]


async def get(client, path: str, **kwargs) -> tuple[int, str | None]:
    async with client.get(path, **kwargs) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Cache")



# =============================================================== summary and usage


async def test_summary_counts_requests_errors_and_circuits_per_target(fake, gateway):
    client, _ = await gateway(config(fake.url))
    assert (await get(client, "/t/rest/a"))[0] == 200
    assert (await get(client, "/t/plain/b", headers={"X-Fake-Status": "503"}))[0] == 503
    assert (await client.post("/v1/chat/completions", json=LLM_BODY)).status == 200
    assert (await get(client, "/t/nope/x"))[0] == 404  # refused before a target was chosen: a request, not an error

    summary = await data(client, "GET", "/admin/summary")

    assert summary["version"] and summary["uptime_s"] >= 0 and summary["started_at"].endswith("Z")
    assert summary["store"] == {"backend": "memory", "healthy": True, "error": None}
    by_name = {t["name"]: t for t in summary["targets"]}
    assert set(by_name) == {"up", "rest", "rest2", "plain"}
    assert (by_name["rest"]["requests"], by_name["rest"]["errors"]) == (1, 0)
    assert (by_name["plain"]["requests"], by_name["plain"]["errors"]) == (1, 1)
    assert by_name["plain"]["error_rate"] == 1.0
    assert by_name["up"]["requests"] == 1 and by_name["up"]["circuit"] == "closed"
    assert summary["totals"] == {"requests": 4, "errors": 1, "inflight": 0, "targets": 4, "open_circuits": 0,
                                 "spend_today_usd": pytest.approx(by_name["up"]["spend_today_usd"])}
    assert "origin" not in by_name["up"]  # the summary is counts; /status.json has the rest


async def test_usage_sums_rows_by_tenant_user_and_since(fake, gateway):
    client, _ = await gateway(config(fake.url, tenants=True), store=MemoryStore())
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json={**LLM_BODY, "user": "dana"}, headers=ACME)).status == 200
    assert (await client.post("/v1/chat/completions", json={**LLM_BODY, "user": "eve"}, headers=ACME)).status == 200
    assert (await client.post("/v1/chat/completions", json={**LLM_BODY, "user": "dana"}, headers=OTHER)).status == 200

    everyone = await data(client, "GET", "/admin/usage")
    assert everyone["total"]["requests"] == 4 and everyone["total"]["prompt_tokens"] == 20  # 5 per answer
    acme = await data(client, "GET", "/admin/usage?tenant=acme")
    assert acme["tenant"] == "acme"
    assert acme["total"]["requests"] == 3 and acme["total"]["completion_tokens"] == 12
    assert acme["total"]["cost_usd"] == pytest.approx(3 * (5 * 0.15 + 4 * 0.60) / 1e6)
    dana = await data(client, "GET", "/admin/usage?user=dana")
    assert dana["total"]["requests"] == 3  # both tenants' dana
    acme_dana = await data(client, "GET", "/admin/usage?tenant=acme&user=dana")
    assert acme_dana["total"]["requests"] == 2
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert [d["date"] for d in acme_dana["days"]] == [today] and acme_dana["days"][0]["requests"] == 2
    assert (await data(client, "GET", f"/admin/usage?since={today}"))["total"]["requests"] == 4
    future = await data(client, "GET", "/admin/usage?since=2999-01-01")
    assert future["since"] == "2999-01-01" and future["days"] == [] and future["total"] == ZERO_TOTAL

    for bad in ("yesterday", "2024-13-01", "20240101"):
        status, headers, body = await admin(client, "GET", f"/admin/usage?since={bad}")
        assert_envelope_error(status, headers, body, expected=400, code="invalid_request")
        assert "since" in body["error"]["message"]


# =============================================================== cache


async def test_cache_stats_count_hits_misses_and_entries_and_a_clear_makes_the_next_request_a_miss(fake, gateway):
    client, _ = await gateway(config(fake.url))
    assert await get(client, "/t/rest/a") == (200, "MISS")
    await settle(client)
    assert await get(client, "/t/rest/a") == (200, "HIT")
    assert await get(client, "/t/rest/b") == (200, "MISS")
    assert await get(client, "/t/rest2/a") == (200, "MISS")
    await settle(client)

    stats = await data(client, "GET", "/admin/cache/stats")
    by_name = {t["target"]: t for t in stats["targets"]}
    assert by_name["rest"] == {"target": "rest", "enabled": True, "ttl_s": 60.0, "hits": 1, "misses": 2,
                               "hit_ratio": pytest.approx(1 / 3, abs=1e-4), "entries": 2}
    assert by_name["rest2"]["entries"] == 1 and by_name["rest2"]["misses"] == 1
    assert by_name["plain"] == {"target": "plain", "enabled": False, "ttl_s": None, "hits": 0, "misses": 0,
                                "hit_ratio": None, "entries": 0}
    assert stats["entries_total"] == 3 and stats["entries_truncated"] is False

    cleared = await data(client, "DELETE", "/admin/cache?target=rest")
    assert cleared == {"target": "rest", "deleted": 2}
    calls = len(fake.requests)
    assert await get(client, "/t/rest/a") == (200, "MISS")  # asked upstream again
    assert len(fake.requests) == calls + 1
    assert await get(client, "/t/rest2/a") == (200, "HIT")  # the other target kept its entry
    await settle(client)

    everything = await data(client, "DELETE", "/admin/cache")
    assert everything == {"target": None, "deleted": 2}
    assert await get(client, "/t/rest2/a") == (200, "MISS")
    stats = await data(client, "GET", "/admin/cache/stats")
    assert {t["target"]: t["hits"] for t in stats["targets"]}["rest2"] == 1  # counters are history, not entries


async def test_cache_clear_of_an_unknown_target_is_a_404_and_clears_nothing(fake, gateway):
    client, _ = await gateway(config(fake.url))
    assert await get(client, "/t/rest/a") == (200, "MISS")
    await settle(client)
    status, headers, body = await admin(client, "DELETE", "/admin/cache?target=nope")
    assert_envelope_error(status, headers, body, expected=404, code="unknown_target")
    assert "nope" in body["error"]["message"]
    status, headers, body = await admin(client, "DELETE", "/admin/cache?target=")
    assert_envelope_error(status, headers, body, expected=400, code="invalid_request")
    assert await get(client, "/t/rest/a") == (200, "HIT")


async def test_cache_stats_and_clear_on_redis(fake, gateway):
    store = await redis_store(new_prefix())  # skips (fails in CI) without Redis
    try:
        client, _ = await gateway(config(fake.url), store=store)
        assert await get(client, "/t/rest/a") == (200, "MISS")
        assert await get(client, "/t/rest2/a") == (200, "MISS")
        await settle(client)
        assert await get(client, "/t/rest/a") == (200, "HIT")
        stats = await data(client, "GET", "/admin/cache/stats")
        assert {t["target"]: t["entries"] for t in stats["targets"]} == {"up": 0, "rest": 1, "rest2": 1, "plain": 0}
        assert await data(client, "DELETE", "/admin/cache?target=rest") == {"target": "rest", "deleted": 1}
        assert await get(client, "/t/rest/a") == (200, "MISS")
        assert await get(client, "/t/rest2/a") == (200, "HIT")
    finally:
        await drop(store)


async def test_cache_keys_are_told_apart_by_target_whatever_the_tenant_is_called():
    store = MemoryStore()
    h = "0123456789abcdef" * 3
    await store.set(f"cache:t.acme:eu:rest:n:{h}", b"D-answer")  # a tenant name with the separator in it
    await store.set(f"cache:-:rest2:s:{h}", b"D-answer")
    await store.set(f"cache:c.0a1b:rest:n:{h}", b"Lt0ken fp")  # a first request still running
    await store.set(f"cache:-:rest2:s:{h}:refresh", b"Lt0ken fp")  # a refresh's lock: not an entry
    await store.append(f"cache:-:rest2:s:{h}:log:t0ken", [b"x"], 60)  # a flight's fan-out log
    await store.set("idem:-:rest:k", b"D-answer")  # another namespace altogether

    assert await cache_policy.count_entries(store) == ({"rest": 2, "rest2": 1}, False)
    counts, truncated = await cache_policy.count_entries(store, limit=2)
    assert truncated and sum(counts.values()) <= 2
    assert await cache_policy.clear_entries(store, "rest") == 1  # the answer; the running flight keeps its claim
    assert await store.get(f"cache:c.0a1b:rest:n:{h}") == b"Lt0ken fp"
    assert await store.get(f"cache:-:rest2:s:{h}") == b"D-answer"
    assert await cache_policy.clear_entries(store) == 1
    assert await store.get("idem:-:rest:k") == b"D-answer"


# =============================================================== circuits


async def test_circuits_show_an_open_circuit_and_a_reset_lets_traffic_through_again(fake, gateway, clock):
    client, _ = await gateway(circuit_config(fake.url), clock=clock)
    await open_circuit(client, fake)
    assert_circuit_open_openai(*await chat(client))

    listed = {c["target"]: c for c in (await data(client, "GET", "/admin/circuits"))["circuits"]}
    up = listed["up"]
    assert up["state"] == "open" and up["error_threshold"] == 2 and up["cooldown_s"] == COOLDOWN
    assert COOLDOWN - 1 <= up["retry_after_s"] <= COOLDOWN and up["reopens_at"].endswith("Z")
    assert listed["claude"]["state"] == "closed" and listed["claude"]["retry_after_s"] is None

    reset = await data(client, "POST", "/admin/circuits/up/reset")
    assert reset["was"] == "open" and reset["state"] == "closed" and reset["shared"] is True
    calls = len(fake.requests)
    status, _, _ = await chat(client)
    assert status == 200 and len(fake.requests) == calls + 1  # the upstream is called again
    assert {c["target"]: c["state"] for c in (await data(client, "GET", "/admin/circuits"))["circuits"]}["up"] == "closed"


async def test_a_reset_closes_the_circuit_on_every_instance_sharing_the_store(fake, gateway, clock):
    store = MemoryStore(clock=clock.time)
    a, _ = await gateway(circuit_config(fake.url), clock=clock, store=store)
    b, _ = await gateway(circuit_config(fake.url), clock=clock, store=store)
    await open_circuit(a, fake)
    assert await eventually(lambda: state(b) == "open")

    await data(a, "POST", "/admin/circuits/up/reset")

    assert await eventually(lambda: state(b) == "closed"), "B never heard of the reset"
    assert await store.get("circuit:up") is None  # a gateway started now finds it closed too
    calls = len(fake.requests)
    assert (await chat(b))[0] == 200 and len(fake.requests) == calls + 1


async def test_resetting_an_unknown_circuit_is_a_404(fake, gateway):
    client, _ = await gateway(config(fake.url))
    status, headers, body = await admin(client, "POST", "/admin/circuits/nope/reset")
    assert_envelope_error(status, headers, body, expected=404, code="unknown_target")


# =============================================================== reload, routes, errors


async def test_reload_of_a_gateway_not_started_from_a_file_is_refused_clearly(fake, gateway):
    client, _ = await gateway(config(fake.url))
    status, headers, body = await admin(client, "POST", "/admin/reload")
    assert_envelope_error(status, headers, body, expected=409, code="reload_unavailable")
    assert "config" in body["error"]["message"]


async def test_unknown_admin_paths_and_wrong_methods_answer_in_the_envelope_and_are_never_proxied(fake, gateway):
    client, _ = await gateway(config(fake.url))
    for path in ("/admin", "/admin/", "/admin/nope", "/admin/cache/stats/x", "/admin/circuits/up"):
        status, headers, body = await admin(client, "GET", path, headers={"X-Request-Id": "rid-1"})
        assert_envelope_error(status, headers, body, expected=404, code="unknown_target")
        assert headers["X-Request-Id"] == "rid-1"
    status, headers, body = await admin(client, "GET", "/admin/reload")
    assert_envelope_error(status, headers, body, expected=405, code="method_not_allowed")
    assert headers["Allow"] == "POST"
    status, headers, body = await admin(client, "POST", "/admin/summary")
    assert status == 405 and headers["Allow"] == "GET"
    assert fake.requests == []


# =============================================================== who may call


async def test_with_an_admin_key_the_bearer_key_is_required(fake, gateway, caplog):
    caplog.set_level(logging.DEBUG)
    client, _ = await gateway(config(fake.url, admin_key_env="ADMIN_KEY"), env={"ADMIN_KEY": ADMIN_KEY})
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": ADMIN_KEY},
                    {"Authorization": f"Basic {ADMIN_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}x"}):
        for method, path in (("GET", "/admin/summary"), ("POST", "/admin/circuits/up/reset"), ("GET", "/admin/nope")):
            status, resp_headers, body = await admin(client, method, path, headers=headers)
            assert_envelope_error(status, resp_headers, body, expected=401, code="unauthorized")
            assert ADMIN_KEY not in str(body)
    assert (await data(client, "GET", "/admin/summary", headers={"Authorization": f"Bearer {ADMIN_KEY}"}))["version"]
    assert (await data(client, "GET", "/admin/circuits", headers={"Authorization": f"bearer {ADMIN_KEY}"}))
    assert ADMIN_KEY not in caplog.text


def _request(remote: str | None, headers: dict | None = None):
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (remote, 40000) if name == "peername" and remote is not None else default)
    return make_mocked_request("GET", "/admin/summary", headers=headers or {}, transport=transport)


def _runtime(server: str = "", env: dict | None = None) -> Runtime:
    text = f"server: {{{server}}}\ntargets: {{a: {{base_url: 'http://127.0.0.1:9'}}}}"
    return Runtime(parse_config(text, env={}), env=env or {})


def test_without_an_admin_key_only_loopback_peers_may_call():
    rt = _runtime()
    for remote in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        check_access(_request(remote), rt)  # allowed: no exception
    for remote in ("203.0.113.7", "10.0.0.2", "::ffff:192.0.2.1", "2001:db8::1", None):
        with pytest.raises(Forbidden) as info:
            check_access(_request(remote), rt)
        assert info.value.status == 403 and "loopback" in info.value.message


def test_forwarded_for_never_makes_a_remote_caller_local():
    rt = _runtime("trust_forwarded_for: true")
    for header in ({"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}):
        with pytest.raises(Forbidden):
            check_access(_request("198.51.100.4", header), rt)


FORWARDING = ({"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
              {"X-Real-IP": "198.51.100.4"}, {"x-real-ip": ""}, {"Via": "1.1 proxy"}, {"X-Forwarded-Host": "gw"},
              {"X-Forwarded-Proto": "https"}, {"CF-Connecting-IP": "203.0.113.7"}, {"True-Client-IP": "203.0.113.7"},
              {"X-Client-IP": "203.0.113.7"})


async def test_a_loopback_peer_relaying_for_someone_needs_the_admin_key(fake, gateway):
    """A reverse proxy on the same host connects from loopback for every client: a request that
    carries forwarding headers is not trusted as local; with an admin key they do not matter."""
    client, _ = await gateway(config(fake.url))
    for headers in FORWARDING:
        status, resp_headers, body = await admin(client, "GET", "/admin/summary", headers=headers)
        assert_envelope_error(status, resp_headers, body, expected=403, code="forbidden")
        assert "proxy" in body["error"]["message"] and "set server.admin_key_env" in body["error"]["message"]
    assert (await data(client, "GET", "/admin/summary"))["version"]  # the same peer, direct: allowed
    keyed, _ = await gateway(config(fake.url, admin_key_env="ADMIN_KEY"), env={"ADMIN_KEY": ADMIN_KEY})
    for headers in FORWARDING:
        assert (await data(keyed, "GET", "/admin/summary",
                           headers={**headers, "Authorization": f"Bearer {ADMIN_KEY}"}))["version"]
        status, resp_headers, body = await admin(keyed, "GET", "/admin/summary", headers=headers)
        assert_envelope_error(status, resp_headers, body, expected=401, code="unauthorized")


def test_forwarding_headers_from_a_loopback_peer_are_refused_whatever_their_value():
    rt = _runtime("admin_key_env: ADMIN_KEY", env={"ADMIN_KEY": ""})
    for remote in ("127.0.0.1", "::1"):
        for headers in FORWARDING:
            with pytest.raises(Forbidden) as info:
                check_access(_request(remote, headers), rt)
            assert "ADMIN_KEY is empty" in info.value.message and "proxy" in info.value.message



@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},  # a page elsewhere posting to 127.0.0.1
    {"Origin": "http://evil.example", "Host": "127.0.0.1:8000"},
    {"Host": "attacker.example:8000"},  # DNS rebinding: the page's own name, now pointing at 127.0.0.1
    {"Sec-Fetch-Site": "same-site", "Host": "localhost:8000", "Origin": "http://app.localhost:3000"},
    {"X-Cluster-Client-IP": "203.0.113.7"}, {"Fastly-Client-IP": "203.0.113.7"},
    {"X-Envoy-External-Address": "203.0.113.7"}, {"X-Forwarded": "for=1.2.3.4"}, {"Forwarded-For": "1.2.3.4"},
    {"X-Original-Host": "evil.com"}, {"X-Envoy-Original-Dst-Host": "10.0.0.1:80"},
])
def test_without_an_admin_key_a_web_page_is_not_the_operator_even_from_loopback(headers):
    """Any page the operator's browser opens can send to 127.0.0.1 (a form POST to /admin/reload) or rebind its
    own name to it and read /admin/summary: refused; curl, scripts and the same-origin page are not."""
    rt = _runtime()
    with pytest.raises(Forbidden) as info:
        check_access(_request("127.0.0.1", headers), rt)
    assert info.value.status == 403 and "admin_key_env" in info.value.message
    for allowed in ({}, {"Host": "127.0.0.1:8000"}, {"Host": "localhost:8000"}, {"Host": "[::1]:8000"},
                    {"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}):
        check_access(_request("127.0.0.1", allowed), rt)
    keyed = _runtime("admin_key_env: ADMIN_KEY", env={"ADMIN_KEY": ADMIN_KEY})  # with the key, the key decides
    check_access(_request("127.0.0.1", {**headers, "Authorization": f"Bearer {ADMIN_KEY}"}), keyed)

def test_an_admin_key_env_naming_an_empty_variable_falls_back_to_loopback_only():
    rt = _runtime("admin_key_env: ADMIN_KEY", env={"ADMIN_KEY": ""})
    check_access(_request("127.0.0.1"), rt)
    with pytest.raises(Forbidden) as info:
        check_access(_request("203.0.113.7", {"Authorization": "Bearer "}), rt)
    assert "ADMIN_KEY is empty" in info.value.message


def test_with_an_admin_key_a_remote_caller_with_the_key_may_call():
    rt = _runtime("admin_key_env: ADMIN_KEY", env={"ADMIN_KEY": ADMIN_KEY})
    check_access(_request("203.0.113.7", {"Authorization": f"Bearer {ADMIN_KEY}"}), rt)
    with pytest.raises(Unauthorized):
        check_access(_request("127.0.0.1"), rt)  # loopback without the key: the key is required


async def test_admin_calls_are_not_counted_as_traffic(fake, gateway):
    """An admin call is not a proxied request: the summary counts only what went to targets."""
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(status=503))
    assert (await get(client, "/t/plain/x"))[0] == 503
    for _ in range(3):
        await data(client, "GET", "/admin/summary")
    summary = await data(client, "GET", "/admin/summary")
    assert summary["totals"]["requests"] == 1


async def test_admin_calls_and_refusals_leave_an_access_line(fake, gateway):
    cfg = f"""
server: {{admin_key_env: ADMIN_LOG_KEY}}
targets:
  up: {{base_url: "{fake.url}/v1", provider: openai}}
"""
    client, logs = await gateway(cfg, env={"ADMIN_LOG_KEY": "adm-log-key-123456"})
    assert (await client.get("/admin/circuits", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/admin/circuits", headers={"Authorization": "Bearer adm-log-key-123456"})).status == 200
    refused, served = logs[-2], logs[-1]
    assert (refused["route"], refused["path"], refused["status"], refused["error_code"]) == (
        "admin", "/admin/circuits", 401, "unauthorized")
    assert (served["route"], served["status"], served["outcome"]) == ("admin", 200, "ok")
    assert not any("adm-log-key-123456" in str(line) or "wrong" in str(line.get("error_message")) for line in logs)
