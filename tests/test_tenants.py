"""Tenants (SPEC §4 ``tenants``, §3 401/403, RELIABILITY-NOTES §6 S3/S8, TC33, TC42, TC46).

Without a ``tenants`` block the gateway is open. With one, every proxied request needs a
tenant key (``Authorization: Bearer`` or ``X-API-Key``), a missing or wrong key is a 401 in
the client's dialect, a tenant outside its ``allowed_targets`` / ``allowed_models`` gets a
403 that never reaches the upstream, the key is compared by digest with
``hmac.compare_digest`` on hits and misses alike, the tenant key never goes upstream, and the
provider's own rate-limit headers (which describe the account every tenant shares) are not
passed back to clients.
"""

from __future__ import annotations

import hashlib

import pytest

import gateway.flow.tenants as tenants_module
from gateway.keys import RUNTIME
from tests.support.config import NO_RETRY, GatewayConfig, llm_config
from tests.support.fakes import Fault
from tests.support.gateway import raw_http

UP_SECRET = "sk-up-secret-1234"
CLAUDE_SECRET = "sk-ant-secret-5678"

ALPHA_KEY = "key-alpha-0001"  # literal api_key
BETA_KEY = "key-beta-00002"  # api_key_env
GAMMA_KEY = "key-gamma-0003"  # api_key_sha256
NARROW_KEY = "key-narrow-004"  # allowed_targets / allowed_models
ENV = {"UP_KEY": UP_SECRET, "CLAUDE_KEY": CLAUDE_SECRET, "BETA_KEY": BETA_KEY}

TENANTS = [
    {"name": "alpha", "api_key": ALPHA_KEY},
    {"name": "beta", "api_key_env": "BETA_KEY"},
    {"name": "gamma", "api_key_sha256": hashlib.sha256(GAMMA_KEY.encode()).hexdigest()},
    {"name": "narrow", "api_key": NARROW_KEY, "allowed_targets": ["up", "rest"], "allowed_models": ["gpt-4o*"]},
]

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "claude-test-1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}

PROVIDER_LIMITS = {
    "x-ratelimit-remaining-requests": "4999",
    "x-ratelimit-limit-tokens": "2000000",
    "X-RateLimit-Remaining": "777",
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-tokens-reset": "2030-01-01T00:00:00Z",
}
OTHER_HEADER = {"openai-processing-ms": "12"}  # not a rate-limit header: passes either way


def config(url: str, tenants: list[dict] | dict = TENANTS, **server: object) -> GatewayConfig:
    """The usual ``up``/``claude``/``rest`` with upstream keys, no retries; ``tenants`` as a list, or a
    mapping (the seed's form)."""
    cfg = llm_config(url, **server).each(retry_matrix=NO_RETRY)
    return cfg.section("tenants", tenants) if isinstance(tenants, dict) else cfg.tenants(*tenants)


@pytest.fixture
def start(fake, gateway, clock):
    async def make(tenants: list[dict] | dict = TENANTS, *, env: dict[str, str] | None = None, **server: object):
        return await gateway(config(fake.url, tenants, **server), env=ENV if env is None else env, clock=clock)

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# One request per client dialect: how to send it, and the target it reaches.
def send(client, dialect: str, headers: dict[str, str] | None = None, **kwargs):
    if dialect == "openai":
        return client.post("/v1/chat/completions", json=kwargs.get("body", CHAT), headers=headers)
    if dialect == "anthropic":
        return client.post("/v1/messages", json=kwargs.get("body", CLAUDE), headers=headers)
    return client.get("/t/rest/things?id=1", headers=headers)


TARGET = {"openai": "up", "anthropic": "claude", "envelope": "rest"}


def assert_dialect_error(dialect: str, data: dict, status: int, code: str) -> str:
    """The gateway's own error in the dialect of the surface called (SPEC §3); returns the message."""
    if dialect == "openai":
        assert set(data) == {"error"}
        err = data["error"]
        assert err["code"] == code and err["param"] is None
        assert err["type"] == {401: "authentication_error", 403: "permission_error"}[status]
        return err["message"]
    if dialect == "anthropic":
        assert data["type"] == "error"
        assert data["error"]["type"] == {401: "authentication_error", 403: "permission_error"}[status]
        return data["error"]["message"]
    assert data["success"] is False
    err = data["error"]
    assert err["code"] == code and err["type"] == "client_error"
    assert err["status_code"] == status and err["retryable"] is False
    assert data["meta"]["request_id"]
    return err["message"]


# =============================================================== open gateway


@pytest.mark.parametrize("dialect", list(TARGET))
async def test_without_tenants_the_gateway_is_open(fake, start, dialect):
    client, logs = await start(tenants=[])
    resp = await send(client, dialect)
    assert resp.status == 200
    assert resp.headers["X-ReliAPI-Target"] == TARGET[dialect]
    assert len(fake.requests) == 1
    assert logs[-1]["tenant"] is None and logs[-1]["outcome"] == "ok"


async def test_without_tenants_a_client_key_is_not_checked_and_the_target_key_replaces_it(fake, start):
    client, _ = await start(tenants=[])
    resp = await send(client, "openai", bearer("anything-at-all"))
    assert resp.status == 200
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UP_SECRET}"


# =============================================================== 401 in every dialect

BAD_KEYS = {
    "missing": {},
    "wrong": bearer("totally-wrong-key"),
    "last_char": bearer(ALPHA_KEY[:-1] + "2"),  # equal length, one character off (TC46)
    "last_char_x_api_key": {"X-API-Key": ALPHA_KEY[:-1] + "9"},
    "empty_bearer": {"Authorization": "Bearer "},
    "other_scheme": {"Authorization": f"Basic {ALPHA_KEY}"},  # only Bearer carries a tenant key
    "prefix_of_key": bearer(ALPHA_KEY[:-1]),
}


@pytest.mark.parametrize("bad", list(BAD_KEYS))
@pytest.mark.parametrize("dialect", list(TARGET))
async def test_a_missing_or_wrong_key_gets_401_in_the_clients_dialect(fake, start, dialect, bad):
    client, logs = await start()
    resp = await send(client, dialect, BAD_KEYS[bad])
    assert resp.status == 401
    assert resp.headers["X-Request-Id"]
    message = assert_dialect_error(dialect, await resp.json(), 401, "unauthorized")
    assert ("missing" in message) == (bad in ("missing", "empty_bearer", "other_scheme"))
    assert ALPHA_KEY[:-1] not in message  # the presented key is never echoed
    assert fake.requests == []  # an unauthenticated caller never reaches the upstream
    assert logs[-1]["status"] == 401 and logs[-1]["error_code"] == "unauthorized"
    assert logs[-1]["tenant"] is None and logs[-1]["target"] is None


@pytest.mark.parametrize(("path", "dialect"), [
    ("/v1/Messages", "anthropic"), ("/v1/messages;v=1", "anthropic"), ("/v1/messages2", "openai"),
    ("/v1/messagesfoo/x", "openai"),
])
async def test_one_rule_says_which_v1_paths_speak_anthropic_before_and_after_the_request_is_read(
        fake, start, path, dialect):
    """A refusal before the body is read (401) and the request once read (an Anthropic client's call
    for a GPT model is translated to and from chat completions) agree on the dialect, however the
    path is spelled."""
    client, _ = await start()
    refused = await client.post(path, json=CLAUDE)
    assert_dialect_error(dialect, await refused.json(), 401, "unauthorized")
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    answer = await (await client.post(path, json=body, headers=bearer(ALPHA_KEY))).json()
    assert (answer.get("type") == "message") == (dialect == "anthropic"), answer


@pytest.mark.parametrize("header", [b"X-API-Key: k\xe9y-latin-1", b"Authorization: Bearer key-\xff\xfe"])
async def test_a_key_that_is_not_utf8_is_401_not_500(fake, start, header):
    # aiohttp decodes header bytes with surrogateescape: a strict .encode() of such a key raised
    # UnicodeEncodeError (a 500 with a logged stack trace for anyone) before this was fixed.
    client, logs = await start()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
               + header + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    raw = await raw_http(client, request)
    assert raw.startswith(b"HTTP/1.1 401 "), raw[:200]
    assert b'"code":"unauthorized"' in raw
    assert fake.requests == []
    assert logs[-1]["error_code"] == "unauthorized"


async def test_401_comes_before_the_body_is_read(fake, start):
    """Authentication runs before the body: an unknown caller with an oversize upload gets 401, not 413."""
    client, _ = await start(max_body_mb=0.001)
    big = {**CHAT, "pad": "x" * 5000}
    resp = await client.post("/v1/chat/completions", json=big, headers=bearer("nope-nope-nope"))
    assert resp.status == 401
    resp = await client.post("/v1/chat/completions", json=big, headers=bearer(ALPHA_KEY))
    assert resp.status == 413  # a known tenant does get to the body check
    assert fake.requests == []


# =============================================================== every key form authenticates


@pytest.mark.parametrize(("tenant", "key"), [("alpha", ALPHA_KEY), ("beta", BETA_KEY), ("gamma", GAMMA_KEY)],
                         ids=["api_key", "api_key_env", "api_key_sha256"])
@pytest.mark.parametrize("how", ["bearer", "x-api-key", "lowercase-bearer"])
async def test_every_key_form_authenticates_by_bearer_and_by_x_api_key(fake, start, tenant, key, how):
    client, logs = await start()
    headers = {"bearer": bearer(key), "x-api-key": {"x-api-key": key},
               "lowercase-bearer": {"Authorization": f"bearer {key}"}}[how]
    resp = await send(client, "openai", headers)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "Hello from the fake."
    assert len(fake.requests) == 1
    assert logs[-1]["tenant"] == tenant  # the access log names the caller


async def test_an_api_key_env_that_is_not_set_refuses_that_tenant_but_not_the_others(fake, start):
    client, _ = await start(env={"UP_KEY": UP_SECRET, "CLAUDE_KEY": CLAUDE_SECRET})  # BETA_KEY unset
    assert (await send(client, "openai", bearer(BETA_KEY))).status == 401
    assert (await send(client, "openai", bearer(""))).status == 401
    assert (await send(client, "openai", bearer(ALPHA_KEY))).status == 200
    assert len(fake.requests) == 1


async def test_the_gateway_keeps_digests_not_keys(start):
    """TC46: what the gateway looks keys up by is their SHA-256 (the sha256 form never knew the key)."""
    client, _ = await start()
    tenants = client.app[RUNTIME].current.tenants
    for name, key in (("alpha", ALPHA_KEY), ("beta", BETA_KEY), ("gamma", GAMMA_KEY)):
        tenant = tenants.by_name[name]
        assert tenant.digest == hashlib.sha256(key.encode()).digest()


async def test_compare_digest_runs_on_a_hit_and_on_a_miss(start, monkeypatch):
    """TC46: the comparison path calls ``hmac.compare_digest`` on a hit and on a miss of equal length."""
    client, _ = await start()
    calls: list[tuple[bytes, bytes]] = []
    real = tenants_module.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tenants_module.hmac, "compare_digest", counting)

    assert (await send(client, "openai", bearer(ALPHA_KEY))).status == 200
    assert len(calls) == 1
    assert calls[0][0] == calls[0][1] == hashlib.sha256(ALPHA_KEY.encode()).digest()

    miss = ALPHA_KEY[:-1] + "X"
    assert (await send(client, "openai", bearer(miss))).status == 401
    assert len(calls) == 2
    presented, against = calls[1]
    assert presented == hashlib.sha256(miss.encode()).digest()
    assert len(against) == 32 and against != presented  # a decoy digest of the same size

    assert (await send(client, "openai", {"X-API-Key": "short"})).status == 401
    assert len(calls) == 3  # a miss by X-API-Key too, whatever its length


# =============================================================== the tenant key never goes upstream


def assert_key_absent(seen, key: str) -> None:
    for name, value in seen.headers.items():
        assert key not in value, f"tenant key forwarded upstream in {name}"
    assert key.encode() not in seen.body


@pytest.mark.parametrize("how", ["bearer", "x-api-key"])
async def test_the_tenant_key_never_reaches_an_openai_target(fake, start, how):
    client, _ = await start()
    headers = bearer(ALPHA_KEY) if how == "bearer" else {"X-API-Key": ALPHA_KEY}
    assert (await send(client, "openai", headers)).status == 200
    seen = fake.requests[-1]
    assert seen.headers.getall("Authorization") == [f"Bearer {UP_SECRET}"]  # only the target's own credential
    assert "X-API-Key" not in seen.headers
    assert_key_absent(seen, ALPHA_KEY)


@pytest.mark.parametrize("how", ["bearer", "x-api-key"])
async def test_the_tenant_key_never_reaches_an_anthropic_target(fake, start, how):
    client, _ = await start()
    headers = bearer(ALPHA_KEY) if how == "bearer" else {"x-api-key": ALPHA_KEY}
    assert (await send(client, "anthropic", headers)).status == 200
    seen = fake.requests[-1]
    assert seen.headers.getall("x-api-key") == [CLAUDE_SECRET]
    assert "Authorization" not in seen.headers
    assert_key_absent(seen, ALPHA_KEY)


@pytest.mark.parametrize("how", ["bearer", "x-api-key"])
async def test_the_tenant_key_never_reaches_a_passthrough_target(fake, start, how):
    """``auth: passthrough`` forwards the client's credential — but never a gateway tenant key."""
    client, _ = await start()
    headers = bearer(ALPHA_KEY) if how == "bearer" else {"X-API-Key": ALPHA_KEY}
    assert (await send(client, "envelope", headers)).status == 200
    seen = fake.requests[-1]
    assert "Authorization" not in seen.headers and "X-API-Key" not in seen.headers
    assert_key_absent(seen, ALPHA_KEY)


async def test_the_tenant_key_never_reaches_upstream_in_a_stream_either(fake, start):
    client, _ = await start()
    resp = await send(client, "openai", {"X-API-Key": GAMMA_KEY}, body={**CHAT, "stream": True})
    assert resp.status == 200
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    seen = fake.requests[-1]
    assert seen.headers["Authorization"] == f"Bearer {UP_SECRET}"
    assert_key_absent(seen, GAMMA_KEY)


# =============================================================== allowed_targets / allowed_models


async def test_a_target_outside_allowed_targets_is_403_and_never_called(fake, start):
    client, logs = await start()
    resp = await send(client, "anthropic", bearer(NARROW_KEY))  # routed to claude by its model
    assert resp.status == 403
    message = assert_dialect_error("anthropic", await resp.json(), 403, "forbidden")
    assert "claude" in message
    assert fake.requests == []
    assert logs[-1]["tenant"] == "narrow" and logs[-1]["error_code"] == "forbidden"

    # the same target for a tenant without restrictions
    assert (await send(client, "anthropic", bearer(ALPHA_KEY))).status == 200
    assert len(fake.requests) == 1


async def test_a_target_outside_allowed_targets_is_403_by_explicit_target_too(fake, start):
    client, _ = await start()
    resp = await client.post("/t/claude/v1/messages", json=CLAUDE, headers=bearer(NARROW_KEY))
    assert resp.status == 403
    assert_dialect_error("envelope", await resp.json(), 403, "forbidden")
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={**bearer(NARROW_KEY), "X-ReliAPI-Target": "claude"})
    assert resp.status == 403
    assert fake.requests == []

    resp = await send(client, "envelope", bearer(NARROW_KEY))  # rest is allowed
    assert resp.status == 200 and len(fake.requests) == 1


async def test_allowed_models_globs(fake, start):
    client, _ = await start()
    ok = await send(client, "openai", bearer(NARROW_KEY), body={**CHAT, "model": "gpt-4o-2024-08-06"})
    assert ok.status == 200
    refused = await send(client, "openai", bearer(NARROW_KEY), body={**CHAT, "model": "gpt-3.5-turbo"})
    assert refused.status == 403
    message = assert_dialect_error("openai", await refused.json(), 403, "forbidden")
    assert "gpt-3.5-turbo" in message
    assert len(fake.requests) == 1
    # another tenant may use that model
    assert (await send(client, "openai", bearer(ALPHA_KEY), body={**CHAT, "model": "gpt-3.5-turbo"})).status == 200
    # no model at all is no way round the list: an upstream that defaults one would serve any
    modelless = {k: v for k, v in CHAT.items() if k != "model"}
    for body in (modelless, {**CHAT, "model": None}):
        refused = await send(client, "openai", bearer(NARROW_KEY), body=body)
        assert refused.status == 403 and "name one" in (await refused.json())["error"]["message"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize("path, body", [
    ("/v1/realtime/client_secrets", {"session": {"type": "realtime", "model": "gpt-realtime"}}),
    ("/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    ("/v1/evals/e1/runs", {"data_source": {"type": "completions", "model": "o3-pro"}}),
    ("/t/up/v1/threads/thread_1/runs", {"assistant_id": "asst_1"}),
])
async def test_a_model_restricted_tenant_cannot_call_an_endpoint_whose_model_is_not_read(fake, start, path, body):
    """A batch, a realtime session, an eval or an assistant's run names its model where the gateway does not read
    it (nested, in a file, the assistant's): for a tenant held to some models it is refused, as a budget refuses it."""
    client, _ = await start()
    resp = await client.post(path, json=body, headers={**bearer(NARROW_KEY), "X-ReliAPI-Target": "up"})
    assert resp.status == 403 and "not one the gateway can check" in str(await resp.json())
    assert fake.requests == []
    assert (await client.post(path, json=body, headers={**bearer(ALPHA_KEY), "X-ReliAPI-Target": "up"})).status == 200
    free = await client.post("/v1/files", data=b"x", headers={**bearer(NARROW_KEY), "X-ReliAPI-Target": "up"})
    assert free.status == 200  # an endpoint known to run no model stays open


# =============================================================== provider rate-limit headers (TC33)


def provider_limit_headers(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(("x-ratelimit-", "anthropic-ratelimit-"))}


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "envelope"])
async def test_provider_rate_limit_headers_are_dropped_when_tenants_are_configured(fake, start, dialect):
    client, _ = await start()
    fake.plan(Fault(headers={**PROVIDER_LIMITS, **OTHER_HEADER}))
    resp = await send(client, dialect, bearer(ALPHA_KEY))
    assert resp.status == 200
    assert provider_limit_headers(resp.headers) == {}
    assert resp.headers["openai-processing-ms"] == "12"  # only the rate-limit headers go


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "envelope"])
async def test_provider_rate_limit_headers_pass_without_tenants(fake, start, dialect):
    client, _ = await start(tenants=[])
    fake.plan(Fault(headers={**PROVIDER_LIMITS, **OTHER_HEADER}))
    resp = await send(client, dialect)
    assert resp.status == 200
    assert provider_limit_headers(resp.headers) == {k.lower(): v for k, v in PROVIDER_LIMITS.items()}
    assert resp.headers["openai-processing-ms"] == "12"


async def test_provider_rate_limit_headers_are_dropped_from_streams_and_upstream_errors(fake, start):
    client, _ = await start()
    fake.plan(Fault(headers=PROVIDER_LIMITS),  # a stream
              Fault(status=429, headers=PROVIDER_LIMITS),  # an upstream 429, passed through (no retries)
              Fault(status=400, headers=PROVIDER_LIMITS))
    stream = await send(client, "openai", bearer(ALPHA_KEY), body={**CHAT, "stream": True})
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    assert provider_limit_headers(stream.headers) == {}
    await stream.read()

    limited = await send(client, "anthropic", bearer(ALPHA_KEY))
    assert limited.status == 429
    assert provider_limit_headers(limited.headers) == {}

    bad = await send(client, "openai", bearer(ALPHA_KEY))
    assert bad.status == 400
    assert provider_limit_headers(bad.headers) == {}
    assert len(fake.requests) == 3


async def test_provider_headers_dropped_but_the_gateways_own_rate_limit_headers_kept(fake, start):
    tenants = [{"name": "alpha", "api_key": ALPHA_KEY, "rate_limit_rpm": 10}]
    client, _ = await start(tenants)
    fake.plan(Fault(headers=PROVIDER_LIMITS))
    resp = await send(client, "openai", bearer(ALPHA_KEY))
    assert resp.status == 200
    assert resp.headers["X-RateLimit-Limit"] == "10"
    assert resp.headers["X-RateLimit-Remaining"] == "9"  # ours, not the provider's 777
    assert "x-ratelimit-remaining-requests" not in resp.headers
    assert "anthropic-ratelimit-requests-remaining" not in resp.headers


# =============================================================== seed mapping form


async def test_seed_tenants_mapping_form(fake, start):
    """The seed's ``tenants: {name: {api_key, rate_limit_rpm}}`` (gateway/config/compat.py)."""
    tenants = {"client-a": {"api_key": ALPHA_KEY, "rate_limit_rpm": 2}, "client-b": {"api_key_env": "BETA_KEY"}}
    client, logs = await start(tenants)
    assert (await send(client, "openai")).status == 401
    statuses = [(await send(client, "openai", bearer(ALPHA_KEY))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert [line["tenant"] for line in logs[-3:]] == ["client-a"] * 3
    resp = await send(client, "anthropic", {"X-API-Key": BETA_KEY})
    assert resp.status == 200  # client-b has no limit
    assert logs[-1]["tenant"] == "client-b" and logs[-1]["target"] == "claude"
    assert len(fake.requests) == 3
