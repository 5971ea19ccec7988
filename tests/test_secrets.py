"""Secrets never show (SPEC §7, §8): no configured key, tenant key, admin key, client Authorization,
x-api-key or cookie value appears in the access log, the gateway's own log, an error answer,
``/metrics``, ``/status.json`` or the status page.

Every secret is recognisable (``…SECRET…``); the traffic is made to put them where a careless
gateway would: an upstream that quotes the key back in its errors, a key pool whose keys cool and
get disabled, wrong tenant and admin keys, client headers full of credentials, a store URL with a
password. The gateway's own log is read through the production formatter with no scrubber
(``setup_logging`` installs none), so nothing is hidden at the last moment.
"""

from __future__ import annotations

import json
import logging

import pytest

from gateway.config import ConfigError, parse_config
from gateway.keys import RUNTIME
from tests.support.config import NO_5XX_RETRY, GatewayConfig, bearer_env, header_env
from tests.support.fakes import Fault

SECRETS = {
    "UP_KEY": "sk-up-SECRET-0a1b2c3d",
    "CLAUDE_KEY": "sk-ant-SECRET-4e5f6a7b",
    "REST_KEY": "rest-SECRET-8c9d0e1f",
    "K1": "sk-pool-SECRET-one-1111",
    "K2": "sk-pool-SECRET-two-2222",
    "ACME_KEY": "tenant-SECRET-acme-3333",
    "ADMIN_KEY": "admin-SECRET-4444",
}
STATIC = "static-SECRET-5555"  # bearer_static token, written in the config itself
LITERAL_TENANT = "tenant-SECRET-literal-6666"  # a tenant api_key written in the config
CLIENT = {  # what clients send along that must not be repeated anywhere
    "x-api-key": "client-xapikey-SECRET-8888",
    "Cookie": "session=cookie-SECRET-9999; theme=dark",
}
WRONG = ["wrong-tenant-SECRET-aaaa", "wrong-admin-SECRET-bbbb"]
ALL = [*SECRETS.values(), STATIC, LITERAL_TENANT, "cookie-SECRET-9999", CLIENT["x-api-key"], *WRONG]


def config(url: str) -> GatewayConfig:
    """Every place a secret can sit: an admin key, tenant keys (from the environment and literal),
    upstream keys (bearer, x-api-key, a pool of two, a static token) for ``up``, ``claude``, ``pooled``,
    ``static`` and ``rest``."""
    cfg = GatewayConfig(url, default_target="up", admin_key_env="ADMIN_KEY")
    cfg.tenant("acme", api_key_env="ACME_KEY").tenant("literal", api_key=LITERAL_TENANT)
    cfg.up(auth=bearer_env("UP_KEY"), retry_matrix={"5xx": {"attempts": 1}, "429": {"attempts": 0}},
           circuit={"error_threshold": 2, "cooldown_s": 60})
    cfg.claude(auth=header_env("x-api-key", "CLAUDE_KEY"))
    cfg.up("pooled", models=None, auth={"type": "bearer_env", "env_vars": ["K1", "K2"]},
           retry_matrix={"429": {"attempts": 0}, "5xx": {"attempts": 0}})
    cfg.up("static", models=None, auth={"type": "bearer_static", "token": STATIC}, retry_matrix=NO_5XX_RETRY)
    return cfg.rest(auth=bearer_env("REST_KEY"), retry_matrix=NO_5XX_RETRY)


def chat(**extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


def leaks(where: str, text: str, secrets: list[str] = ALL) -> list[str]:
    return [f"{s} in {where}" for s in secrets if s in text]


async def test_no_secret_shows_anywhere(fake, gateway, clock, gateway_log):
    client, logs = await gateway(config(fake.url), env=SECRETS, clock=clock)
    tenant = {"Authorization": f"Bearer {SECRETS['ACME_KEY']}", **CLIENT}
    answers: list[tuple[int, str]] = []  # (status, body) of every answer that was an error

    async def ask(method: str, path: str, expect: int, **kwargs) -> str:
        resp = await client.request(method, path, **kwargs)
        body = await resp.text()
        assert resp.status == expect, body
        if resp.status >= 400:
            answers.append((resp.status, body))
        return body

    v1 = "/v1/chat/completions"
    # upstreams that quote the configured key back in their errors
    fake.plan(Fault(status=401, echo_auth=True))
    body = await ask("POST", v1, 401, json=chat(), headers=tenant)
    assert "bad key Bearer ***" in body  # the fake did quote it: the gateway scrubbed it
    fake.plan(Fault(status=503, echo_auth=True), Fault(status=503, echo_auth=True))
    await ask("POST", v1, 503, json=chat(), headers=tenant)  # retried, then passed on; the circuit opens
    await ask("POST", v1, 503, json=chat(), headers=tenant)  # circuit_open, the gateway's own error
    fake.plan(Fault(status=500, echo_auth=True))
    await ask("POST", v1, 500, json=chat(stream=True), headers={**tenant, "X-ReliAPI-Target": "static"})
    await ask("GET", "/t/rest/things", 500, headers={**tenant, "X-Fake-Status": "500"})  # echoes every header
    await ask("POST", "/v1/messages", 200, headers=tenant,
              json={"model": "claude-3-5-haiku-latest", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    # a key pool: K1 cools on a 429, K2 is disabled on a 401 — both quoted back
    fake.plan(Fault(status=429, echo_auth=True), Fault(status=401, echo_auth=True))
    await ask("POST", v1, 401, json=chat(), headers={**tenant, "X-ReliAPI-Target": "pooled"})
    # wrong keys, and credentials in odd places
    await ask("POST", v1, 401, json=chat(), headers={"Authorization": f"Bearer {WRONG[0]}", **CLIENT})
    await ask("POST", v1, 401, json=chat(), headers={"x-api-key": WRONG[0]})
    await ask("POST", "/proxy/http", 400, headers=tenant, json={
        "target": "rest", "path": "/x", "headers": {"Authorization": f"Bearer {SECRETS['REST_KEY']}"}, "nope": 1})
    await ask("POST", v1, 400, headers=tenant, data=json.dumps({"model": SECRETS["ACME_KEY"], "messages": "x"}))
    await ask("GET", "/admin/summary", 401, headers={"Authorization": f"Bearer {WRONG[1]}", **CLIENT})
    await ask("GET", "/admin/summary", 200, headers={"Authorization": f"Bearer {SECRETS['ADMIN_KEY']}"})
    await ask("GET", "/admin/circuits", 200, headers={"Authorization": f"Bearer {SECRETS['ADMIN_KEY']}"})

    assert [r.headers.get("Authorization") for r in fake.requests if r.path_qs.startswith("/v1/chat")][:1] == [
        f"Bearer {SECRETS['UP_KEY']}"]  # the upstream did get the key: it is only never shown
    assert not [r for r in fake.requests
                if any(s in json.dumps(dict(r.headers)) for s in (SECRETS["ACME_KEY"], *CLIENT.values()))]

    shown = {
        "error answers": json.dumps(answers),
        "access log": json.dumps(list(logs)),
        "gateway log": "\n".join(gateway_log.text),
        "/metrics": await (await client.get("/metrics")).text(),
        "/status.json": await (await client.get("/status.json")).text(),
        "/": await (await client.get("/")).text(),
        "/readyz": await (await client.get("/readyz")).text(),
        "/v1/models": await (await client.get("/v1/models", headers=tenant)).text(),
    }
    # admin calls have their own lines, and so does the /v1/models read above
    proxied = [line for line in logs if line["route"] != "admin" and line.get("path") != "/v1/models"]
    assert len(answers) == 11 and len(proxied) == 11  # every proxied call has its line
    assert any("key disabled" in line for line in gateway_log.text)  # the pool's story was logged…
    found = [leak for where, text in shown.items() for leak in leaks(where, text)]
    assert sum("Bearer ***" in body for _, body in answers) == 5  # the upstreams did quote the keys back
    assert not found  # …and no secret anywhere


async def test_a_store_password_never_shows(fake, gateway, gateway_log):
    password = "redis-SECRET-cccc"
    yaml = f"""
server: {{default_target: up}}
store: {{url: "redis://:{password}@127.0.0.1:1/0"}}
targets:
  up: {{base_url: "{fake.url}/v1", provider: openai, models: ["gpt-*"], cache: {{ttl_s: 60}}}}
"""
    client, logs = await gateway(yaml)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200 and resp.headers["X-Cache"] == "BYPASS"  # the cache degraded to pass-through
    ready = await client.get("/readyz")
    assert ready.status == 503
    status = await (await client.get("/status.json")).json()
    assert status["store"]["healthy"] is False
    shown = {
        "/readyz": await ready.text(), "/status.json": json.dumps(status), "/": await (await client.get("/")).text(),
        "/metrics": await (await client.get("/metrics")).text(), "access log": json.dumps(list(logs)),
        "gateway log": "\n".join(gateway_log.text),
    }
    assert gateway_log.text  # the store trouble was logged
    assert not [leak for where, text in shown.items() for leak in leaks(where, text, [password])]



@pytest.mark.parametrize("path", ["/v1/chat/completions", "/t/pooled/chat/completions", "/t/rest/items"])
async def test_an_upstream_key_echoed_in_a_good_answers_headers_never_reaches_the_client_or_the_cache(
        fake, gateway, clock, path):
    """A tenant must not learn the operator's upstream key from a debug header of a 200 (errors were scrubbed)."""
    cfg = config(fake.url).up(cache={"ttl_s": 60}).rest(auth=bearer_env("REST_KEY"), cache={"ttl_s": 60})
    client, _ = await gateway(cfg, env=SECRETS, clock=clock)
    fake.script = lambda n, seen: Fault(headers={"X-Echo-Auth": seen.headers.get("Authorization", ""),
                                                 "X-Upstream-Id": "abc"})
    tenant = {"Authorization": f"Bearer {SECRETS['ACME_KEY']}"}
    for _ in range(2):  # the second from the cache, where the store has it
        resp = await (client.post(path, json=chat(), headers=tenant) if path.startswith("/v1") or "pooled" in path
                      else client.get(path, headers=tenant))
        await resp.read()
        assert resp.status == 200 and resp.headers["X-Upstream-Id"] == "abc"
        assert not leaks("headers", str(dict(resp.headers))), dict(resp.headers)
        assert resp.headers["X-Echo-Auth"] == "Bearer ***"


async def test_an_error_that_quotes_what_the_client_sent_never_quotes_a_configured_key(fake, gateway, clock):
    """A client that sends a key where a target name or a role belongs is told so without the key in the words
    (the log and the page were scrubbed already; the answer was not)."""
    client, logs = await gateway(config(fake.url), env=SECRETS, clock=clock)
    tenant = {"Authorization": f"Bearer {SECRETS['ACME_KEY']}"}
    unknown = await client.post("/v1/chat/completions", json=chat(), headers={**tenant, "X-ReliAPI-Target": SECRETS["UP_KEY"]})
    assert unknown.status == 404 and "unknown target" in (text := await unknown.text()) and not leaks("answer", text)
    envelope = await client.post("/proxy/llm", headers=tenant, json={
        "target": "up", "messages": [{"role": SECRETS["ADMIN_KEY"], "content": "hi"}]})
    assert envelope.status == 400 and not leaks("answer", await envelope.text())
    as_model = await client.post("/v1/chat/completions", json=chat(model=SECRETS["UP_KEY"]), headers=tenant)
    await as_model.read()
    assert not leaks("access log", json.dumps(logs[-1]))
    assert not leaks("metrics", await (await client.get("/metrics")).text())
    as_id = await client.post("/v1/chat/completions", json=chat(), headers={**tenant, "X-Request-Id": SECRETS["ACME_KEY"]})
    assert as_id.status == 200 and as_id.headers["X-Request-Id"].startswith("req_")  # not the key, echoed and logged
    assert SECRETS["ACME_KEY"] not in fake.requests[-1].headers.get("X-Request-Id", "")


async def test_a_percent_encoded_key_in_a_good_answers_headers_is_scrubbed(fake, gateway, clock):
    """Keys with / + = (base64 tokens, Azure keys) travel percent-encoded in URLs: a Location header quoting one."""
    from urllib.parse import quote

    env = {**SECRETS, "REST_KEY": "hk/SECRET+abc=def0123456"}
    client, _ = await gateway(config(fake.url), env=env, clock=clock)
    fake.script = lambda n, seen: Fault(headers={"Location": "https://cb.example/?k=" + quote(env["REST_KEY"], safe="")})
    resp = await client.get("/t/rest/cb", allow_redirects=False,
                            headers={"Authorization": f"Bearer {SECRETS['ACME_KEY']}"})
    assert resp.status == 200, (resp.status, dict(resp.headers), len(fake.requests))
    assert "SECRET" not in resp.headers["Location"], resp.headers["Location"]


@pytest.mark.parametrize("override", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
async def test_trace_asked_for_by_a_method_override_is_not_proxied_either(fake, gateway, clock, override):
    client, _ = await gateway(config(fake.url), env=SECRETS, clock=clock)
    resp = await client.post("/t/rest/x", headers={override: "trace", "Authorization": f"Bearer {SECRETS['ACME_KEY']}"})
    assert resp.status == 405 and fake.requests == []

async def test_the_circuit_and_key_pool_views_name_keys_by_id_only(fake, gateway, clock):
    client, _ = await gateway(config(fake.url), env=SECRETS, clock=clock)
    pool = client.app[RUNTIME].current.key_pools["pooled"]
    assert set(pool.states()) == {"K1", "K2"}
    data = await (await client.get("/status.json")).json()
    (pooled,) = [t for t in data["targets"] if t["name"] == "pooled"]
    assert pooled["key_pool"] == {"total": 2, "active": 2, "cooling": 0, "disabled": 0,
                                  "keys": {"K1": "active", "K2": "active"}}


def test_a_config_error_does_not_quote_a_base_url_password():
    password = "userinfo-SECRET-7777"
    with pytest.raises(ConfigError) as caught:
        parse_config(f"targets: {{t: {{base_url: 'http://svc:{password}@127.0.0.1:9/api'}}}}")
    assert "base_url" in str(caught.value) and password not in str(caught.value)


def test_the_gateways_own_log_lines_are_scrubbed_of_the_running_configs_keys(capsys):
    """``python -m gateway`` hands the runtime's scrubber (upstream, tenant and admin keys) to the JSON log handler."""

    from gateway.config import parse_config
    from gateway.observe.logs import setup_logging, use_scrubber
    from gateway.runtime import Runtime

    cfg = parse_config(
        "server: {admin_key_env: ADMIN_K}\n"
        "targets:\n  up: {base_url: 'http://127.0.0.1:9/v1', auth: {type: bearer_env, env_var: UP_K}}\n"
        "tenants:\n  - {name: acme, api_key_env: ACME_K}\n"
    )
    env = {"UP_K": "sk-upstream-LOGLEAK-1", "ACME_K": "tenant-LOGLEAK-2", "ADMIN_K": "admin-LOGLEAK-3"}
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info")
        use_scrubber(Runtime(cfg, env=env, access_log_write=lambda line: None).scrub)
        logging.getLogger("reliapi").warning("keys: %s %s %s", *env.values())
        out = capsys.readouterr().out
    finally:
        root.handlers[:], root.level = saved
    assert "keys: *** *** ***" in out
    assert "LOGLEAK" not in out


def test_a_key_too_short_to_scrub_is_warned_about() -> None:
    from gateway.config import config_warnings

    config = parse_config("""
tenants:
  - {name: t, api_key: tk123}
targets:
  a: {base_url: "http://x", auth: {type: bearer_static, token: k1234}}
  b: {base_url: "http://y", auth: {type: bearer_env, env_var: SHORT}}
  c: {base_url: "http://z", auth: {type: bearer_env, env_var: LONG}}
""", env={"SHORT": "abc", "LONG": "long-enough-key"})
    warned = [w for w in config_warnings(config, env={"SHORT": "abc", "LONG": "long-enough-key"}) if "shorter" in w]
    assert [w.split(":")[0] for w in warned] == ["targets.a.auth.token", "targets.b.auth", "tenants[0].api_key"]
    assert all("not scrubbed" in w for w in warned)
