"""Configuration errors (SPEC §4): every error in a file is reported, each naming its path.

Covers wrong types, unknown keys, cross-references between sections, out-of-range numbers,
invalid YAML and duplicate keys, and ``${VAR}`` / ``${VAR:-default}`` expansion from the
environment mapping given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config
from tests.support.config_helpers import errors_of, load
from tests.support.config_samples import README_MINIMAL_HTTP_TARGET

# ------------------------------------------------------------------ errors


def test_wrong_type_names_path_exactly_like_the_spec() -> None:
    errs = errors_of(README_MINIMAL_HTTP_TARGET.replace("error_threshold: 5", 'error_threshold: "5"'))
    assert errs == ["targets.my_api.circuit.error_threshold: expected int, got str"]
    # the message ConfigError carries is the same text
    with pytest.raises(ConfigError, match=r"^targets\.my_api\.circuit\.error_threshold: expected int, got str$"):
        load(README_MINIMAL_HTTP_TARGET.replace("error_threshold: 5", "error_threshold: five"))


UNKNOWN_EVERYWHERE = """
serverr: {}
server: {hostt: x}
store: {urll: x}
tenants:
  - name: a
    api_key: k
    budgett: {}
    budget: {daily: 1}
    rate_limit: {rpmm: 1}
targets:
  t:
    base_url: https://x.example
    timeout: 5
    circuit: {threshold: 1}
    cache: {tll_s: 1}
    auth: {type: none, envvar: X}
    llm: {modell: x}
    idempotency: {ttl: 1}
    retry_matrix:
      "429": {attempt: 1}
      "4xx": {attempts: 1}
    fallback_targets: [{target: t, modell: x}]
pricing: {m: {input: 1, output: 2, cached: 3}}
provider_key_pools: {t: {keys: [{id: a, api_key: b, qps: 1}]}}
client_profiles: {p: {max_parallel: 1}}
"""


def test_unknown_keys_at_every_level_name_path_and_allowed_keys() -> None:
    errs = errors_of(UNKNOWN_EVERYWHERE)
    expected = {
        "serverr": "server",
        "server.hostt": "host",
        "store.urll": "url",
        "tenants[0].budgett": "budget_caps",
        "tenants[0].budget.daily": "daily_usd",
        "tenants[0].rate_limit.rpmm": "rpm",
        "targets.t.timeout": "timeout_ms",
        "targets.t.circuit.threshold": "error_threshold",
        "targets.t.cache.tll_s": "ttl_s",
        "targets.t.auth.envvar": "env_var",
        "targets.t.llm.modell": "default_model",
        "targets.t.idempotency.ttl": "wait_s",
        "targets.t.retry_matrix.429.attempt": "attempts",
        "targets.t.retry_matrix.4xx": "'timeout'",
        "targets.t.fallback_targets[0].modell": "model",
        "pricing.m.cached": "output",
        "provider_key_pools.t.keys[0].qps": "qps_limit",
        "client_profiles.p.max_parallel": "max_parallel_requests",
    }
    for path, allowed_word in expected.items():
        line = next((e for e in errs if e.startswith(f"{path}: unknown key (allowed: ")), None)
        assert line is not None, f"no unknown-key error for {path} in {errs}"
        assert allowed_word in line.split("(allowed: ", 1)[1]
    assert len(errs) == len(expected)
    (top,) = [e for e in errs if e.startswith("serverr: unknown key (allowed: ")]
    allowed = top.removeprefix("serverr: unknown key (allowed: ").removesuffix(")").split(", ")
    assert allowed == sorted(allowed) and {"abuse", "client_profiles", "pricing", "provider_key_pools", "rate_limit",
                                           "server", "store", "targets", "tenants"} <= set(allowed)


def test_all_errors_in_one_file_are_reported() -> None:
    errs = errors_of("""
server:
  port: eighty
  max_body_mb: -1
  typo: 1
targets:
  a:
    base_url: https://a.example
    timeout_ms: 1.5
    provider: openia
    circuit: {error_threshold: "5"}
    cache: {enabled: "yes please"}
    fallback_on: [timeout, sometimes]
  b: {}
  c: "not a mapping"
""")
    assert errs == [
        "server.typo: unknown key (allowed: admin_key_env, auth_failures_per_ip_rpm, body_deadline_s, body_timeout_s, cors, "
        "default_target, header_timeout_s, host, "
        "keepalive_timeout_s, max_body_mb, max_connections, port, rate_limit_per_ip_rpm, shutdown_grace_s, "
        "trust_forwarded_for, write_timeout_s)",
        "server.port: expected int, got str",
        "server.max_body_mb: expected float > 0.0, got -1",
        "targets.a.provider: expected one of openai, anthropic, mistral, http, got 'openia'",
        "targets.a.timeout_ms: expected int, got float",
        "targets.a.circuit.error_threshold: expected int, got str",
        "targets.a.cache.enabled: expected bool, got str",
        "targets.a.fallback_on[1]: expected one of retryable, circuit_open, timeout, context_length_exceeded, "
        "content_policy_violation, rate_limited, server_error, network, overloaded, got 'sometimes'",
        "targets.b.base_url: required",
        "targets.c: expected a mapping, got str",
    ]
    with pytest.raises(ConfigError) as info:
        load("server: {port: x, host: 1}")
    assert str(info.value) == "server.host: expected str, got int\nserver.port: expected int, got str"


def test_cross_reference_errors_are_all_reported() -> None:
    errs = errors_of("""
server: {default_target: nope}
tenants:
  - {name: a}
  - {name: b, api_key: x, api_key_env: Y}
  - name: c
    api_key: z
    allowed_targets: [t, ghost]
    fallback_targets: [ghost2]
    budget_caps: {ghost3: {hard_cost_cap_usd: 1}}
    profile: nobody
  - {name: c, api_key_sha256: "abc"}
targets:
  t: {base_url: "ftp://x", fallback_targets: [missing, t, {target: t, model: other}]}
  u: {base_url: "https://user:pw@host"}
  v: {base_url: "https://v.example/v1?key=sk-in-a-query-123"}
  w: {base_url: "https://w.example", auth: {type: header_env, env_var: W_KEY}}
  x: {base_url: "https://x.example", provider: openai, llm: {provider: anthropic, soft_cost_cap_usd: 2, hard_cost_cap_usd: 1}}
provider_key_pools:
  nowhere: {keys: [{id: k, api_key: "env:K"}]}
""")
    expected = [
        "server.default_target: no target named 'nope'",
        "targets.t.base_url: expected an absolute http(s) URL without query, fragment or credentials, got 'ftp://x'",
        "targets.t.fallback_targets[0]: no target named 'missing'",
        "targets.t.fallback_targets[1]: falling back to the same target needs another model",
        "targets.u.base_url: expected an absolute http(s) URL without query, fragment or credentials, "
        "got 'https://***@host'",
        "targets.v.base_url: expected an absolute http(s) URL without query, fragment or credentials, "
        "got 'https://v.example/v1?***'",  # a key in the query is not echoed either
        "targets.w.auth: type header_env needs header and env_var",
        "targets.x.llm.provider: 'anthropic' contradicts the target's provider 'openai'",
        "targets.x.llm.hard_cost_cap_usd: must be >= soft_cost_cap_usd (1 < 2)",
        "tenants[0]: set exactly one of api_key_env, api_key, api_key_sha256",
        "tenants[1]: set exactly one of api_key_env, api_key, api_key_sha256 (got api_key_env, api_key)",
        "tenants[2].budget_caps.ghost3: no target named 'ghost3'",
        "tenants[2].fallback_targets[0]: no target named 'ghost2'",
        "tenants[2].allowed_targets[1]: no target named 'ghost'",
        "tenants[2].profile: no client profile named 'nobody'",
        "tenants[3].name: duplicate tenant 'c'",
        "tenants[3].api_key_sha256: expected 64 hex characters",
        "provider_key_pools.nowhere: no target or provider named 'nowhere' (providers: anthropic, http, mistral, openai)",
    ]
    assert sorted(errs) == sorted(expected)


def test_a_file_that_is_not_utf8_is_one_error_that_shows_nothing_of_it(tmp_path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# caf\xe9\ntenants: [{name: a, api_key: brand-new-secret-777}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors == ["(file): not valid UTF-8 at byte 5 (line 1); save it as UTF-8"]
    assert "brand-new" not in str(e.value)


def test_defaults_and_the_top_level_blocks_are_checked_whether_or_not_a_target_takes_them() -> None:
    """A typo in retry: / circuit_breaker: / defaults: must not pass because every target sets its own — and is said
    once, under defaults, not again for every target that took it."""
    overridden = errors_of("""
retry: {429: {backof: 2}}
circuit_breaker: {nonsense: 1}
targets:
  a: {base_url: "https://a.example", retry_matrix: {"5xx": {attempts: 1}}, circuit: {error_threshold: 2}}
""")
    assert sorted(overridden) == [
        "defaults.circuit.nonsense: unknown key (allowed: cooldown_s, error_threshold, half_open_max_calls)",
        "defaults.retry_matrix.429.backof: unknown key (allowed: attempts, backoff, base_s, max_s)",
    ]
    taken = errors_of("""
defaults: {timeout_ms: "x"}
targets: {a: {base_url: "https://a.example"}, b: {base_url: "https://b.example"}}
""")
    assert taken == ["defaults.timeout_ms: expected int, got str"]


def test_two_tenants_with_one_key_is_an_error_naming_both(monkeypatch) -> None:
    """Whichever came last would silently get the other's requests — and its rights and its bill."""
    import hashlib

    monkeypatch.setenv("SHARED_TENANT_KEY", "shared-key-000000001")
    digest = hashlib.sha256(b"shared-key-000000001").hexdigest().upper()
    errs = errors_of(f"""
targets: {{a: {{base_url: "https://a.example"}}}}
tenants:
  - {{name: small, api_key: shared-key-000000001}}
  - {{name: big, api_key: shared-key-000000001}}
  - {{name: hashed, api_key_sha256: "{digest}"}}
  - {{name: from_env, api_key_env: SHARED_TENANT_KEY}}
  - {{name: other, api_key: other-key-0000000002}}
""")
    assert sorted(errs) == [f"tenants[{i}]: has the same API key as tenant 'small' (each tenant needs its own)"
                            for i in (1, 2, 3)]


def test_a_value_or_key_that_is_not_text_is_an_error_anywhere_without_showing_it() -> None:
    errs = errors_of('targets: {a: {base_url: "https://a.example"}}\n'
                     'tenants: [{name: "bad\\ud800name", api_key: tenant-sur-key-00001}]\n'
                     'pricing: {"m\\udc80": {input: 1, output: 1}}\n')
    assert sorted(errs) == [
        "pricing (a key): holds a character that is not valid text (a lone surrogate such as \\ud800; the value is "
        "not shown)",
        "tenants[0].name: holds a character that is not valid text (a lone surrogate such as \\ud800; the value is "
        "not shown)",
    ]


@pytest.mark.parametrize(
    ("snippet", "path"),
    [
        ("targets: {a: {base_url: 'https://a.example', timeout_ms: -1}}", "targets.a.timeout_ms"),
        ("targets: {a: {base_url: 'https://a.example', timeout_ms: 0}}", "targets.a.timeout_ms"),
        ("targets: {a: {base_url: 'https://a.example', circuit: {cooldown_s: -5}}}", "targets.a.circuit.cooldown_s"),
        ("targets: {a: {base_url: 'https://a.example', circuit: {error_threshold: 0}}}", "targets.a.circuit.error_threshold"),
        ("targets: {a: {base_url: 'https://a.example', cache: {ttl_s: -1}}}", "targets.a.cache.ttl_s"),
        ("targets: {a: {base_url: 'https://a.example', max_concurrency: -3}}", "targets.a.max_concurrency"),
        ("targets: {a: {base_url: 'https://a.example', retry_matrix: {'429': {attempts: -1}}}}",
         "targets.a.retry_matrix.429.attempts"),
        ("targets: {a: {base_url: 'https://a.example', llm: {max_tokens: 0}}}", "targets.a.llm.max_tokens"),
        ("targets: {a: {base_url: 'https://a.example', llm: {temperature: 3}}}", "targets.a.llm.temperature"),
        ("targets: {a: {base_url: 'https://a.example', llm: {hard_cost_cap_usd: -0.5}}}", "targets.a.llm.hard_cost_cap_usd"),
        ("server: {port: 70000}", "server.port"),
        ("server: {port: -1}", "server.port"),
        ("tenants: [{name: a, api_key: k, budget: {daily_usd: -1}}]", "tenants[0].budget.daily_usd"),
        ("tenants: [{name: a, api_key: k, rate_limit_rpm: 0}]", "tenants[0].rate_limit.rpm"),
        ("tenants: [{name: a, api_key: k, cache_ttl_override: -10}]", "tenants[0].cache_ttl_override.*"),
        ("pricing: {m: {input: -1, output: 1}}", "pricing.m.input"),
    ],
)
def test_negative_and_out_of_range_numbers_are_rejected(snippet: str, path: str) -> None:
    errs = errors_of(snippet)
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"{path}: expected ")
    assert ", got " in errs[0]  # the offending value is shown


@pytest.mark.parametrize(
    "text",
    [
        "targets: [unclosed\n",
        "targets:\n  a: {base_url: x\n",
        "targets:\n\ta: 1\n",
        "server:\n  host: a\n host: b\n",
        'targets:\n  a:\n    base_url: "https://a\n',
    ],
)
def test_invalid_yaml_is_one_clear_error(text: str) -> None:
    errs = errors_of(text)
    assert len(errs) == 1
    assert errs[0].startswith("invalid YAML at line ")
    assert "\n" not in errs[0] and "Traceback" not in errs[0]


def test_not_a_mapping_and_unreadable_file(tmp_path: Path) -> None:
    assert errors_of("- a\n- b\n") == ["(top level): expected a mapping, got list"]
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", env={})
    assert info.value.errors[0].startswith(f"cannot read {tmp_path / 'missing.yaml'}: ")


def test_duplicate_keys_are_errors_not_silently_dropped() -> None:
    # Appending a second `targets:` block would otherwise silently discard the first one.
    errs = errors_of(README_MINIMAL_HTTP_TARGET + "targets:\n  other: {base_url: 'https://o.example'}\n")
    assert len(errs) == 1 and "duplicate key 'targets'" in errs[0] and "line 14" in errs[0]
    errs = errors_of('targets:\n  a:\n    base_url: https://a.example\n    retry_matrix:\n'
                     '      429: {attempts: 1}\n      "429": {attempts: 2}\n')
    assert "duplicate key '429'" in errs[0]
    # a `<<:` merge may be overridden: that is not a duplicate
    cfg = load("""
targets:
  a: &a {base_url: "https://a.example", timeout_ms: 5000}
  b:
    <<: *a
    timeout_ms: 7000
""")
    assert cfg.targets["b"].timeout_ms == 7000 and cfg.targets["b"].base_url == "https://a.example"


def test_type_errors_and_the_checks_across_fields_are_reported_at_once() -> None:
    """A bad value does not hide the other mistakes: the rest is checked with it left out."""
    errs = errors_of("""
server: {port: "abc"}
targets:
  a: {base_url: "ftp://x", fallback_targets: [nowhere], circuit: {error_threshold: "5"}}
  b: {base_url: ""}
""")
    assert errs == [
        "server.port: expected int, got str",
        "targets.a.circuit.error_threshold: expected int, got str",
        "targets.a.base_url: expected an absolute http(s) URL without query, fragment or credentials, got 'ftp://x'",
        "targets.a.fallback_targets[0]: no target named 'nowhere'",
        "targets.b.base_url: expected an absolute http(s) URL without query, fragment or credentials, got ''",
    ]


# ------------------------------------------------------------------ environment expansion


def test_env_reference_and_default() -> None:
    text = """
server:
  host: ${HOST}
  port: ${PORT:-8000}
  admin_key_env: ${ADMIN_ENV:-RELIAPI_ADMIN_KEY}
"""
    cfg = load(text, env={"HOST": "0.0.0.0"})
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.port == 8000 and isinstance(cfg.server.port, int)
    assert cfg.server.admin_key_env == "RELIAPI_ADMIN_KEY"
    cfg = load(text, env={"HOST": "::", "PORT": "9001", "ADMIN_ENV": "MY_ADMIN"})
    assert (cfg.server.host, cfg.server.port, cfg.server.admin_key_env) == ("::", 9001, "MY_ADMIN")
    cfg = load(text, env={"HOST": "::", "PORT": "", "ADMIN_ENV": ""})  # set but empty: the default, as in a shell
    assert (cfg.server.port, cfg.server.admin_key_env) == (8000, "RELIAPI_ADMIN_KEY")


def test_env_values_are_typed_by_the_field() -> None:
    cfg = load("""
server:
  trust_forwarded_for: ${TFF:-false}
  max_body_mb: ${MB}
tenants:
  - name: a
    api_key: ${KEY}
targets:
  a:
    base_url: https://a.example
    models: ["${M1}", "gpt-${V:-4}o"]
    auth: {type: bearer_static, token: "${TOKEN}"}
""", env={"MB": "2.5", "KEY": "12345", "M1": "on", "TOKEN": "0x1F"})
    assert cfg.server.trust_forwarded_for is False
    assert cfg.server.max_body_mb == 2.5
    assert cfg.tenants[0].api_key == "12345"  # a numeric secret stays text in a str field
    assert cfg.targets["a"].models == ["on", "gpt-4o"]
    assert cfg.targets["a"].auth is not None and cfg.targets["a"].auth.token == "0x1F"
    assert errors_of("server:\n  port: ${PORT}\n", env={"PORT": "http"}) == ["server.port: expected int, got str"]


def test_env_embedded_references() -> None:
    text = 'targets:\n  a:\n    base_url: "https://${HOST}/v1"\n    models: ["${PREFIX:-gpt}-*"]\n'
    t = load(text, env={"HOST": "api.example.com"}).targets["a"]
    assert t.base_url == "https://api.example.com/v1"
    assert t.models == ["gpt-*"]
    t = load('targets:\n  a:\n    base_url: "http://${H:-localhost}:${P:-9000}/api"\n').targets["a"]
    assert t.base_url == "http://localhost:9000/api"


def test_unset_env_is_an_error_naming_path_and_variable() -> None:
    errs = errors_of("server:\n  port: ${PORT}\n  hostt: x\ntargets:\n  a:\n    base_url: https://${API_HOST}/v1\n")
    assert "server.port: environment variable PORT is not set (write ${PORT:-default} for a default)" in errs
    assert any(e.startswith("targets.a.base_url: environment variable API_HOST is not set") for e in errs)
    assert any(e.startswith("server.hostt: unknown key") for e in errs)  # other errors still reported
    assert not any(e.startswith("server.port: expected") for e in errs)  # no second error for the same value
    assert len(errs) == 3


def test_env_comes_only_from_the_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELIAPI_TEST_ONLY_IN_OS_ENV", "from-os")
    text = "server:\n  host: ${RELIAPI_TEST_ONLY_IN_OS_ENV}\n"
    assert errors_of(text, env={}) == [
        "server.host: environment variable RELIAPI_TEST_ONLY_IN_OS_ENV is not set "
        "(write ${RELIAPI_TEST_ONLY_IN_OS_ENV:-default} for a default)"
    ]
    assert load(text, env={"RELIAPI_TEST_ONLY_IN_OS_ENV": "given"}).server.host == "given"
    assert parse_config(text).server.host == "from-os"  # env=None → the process environment



# ---- a setting that would validate and then change nothing is an error naming it (issue #14 point 5)

_LLM = "    base_url: https://api.openai.com/v1\n    provider: openai\n"
_HTTP = "    base_url: https://api.example.com\n"
_TENANT = "tenants:\n  - name: t\n    api_key: tenant-key-0001\n"


@pytest.mark.parametrize(("text", "error"), [
    ("targets:\n  a:\n" + _LLM + "    auth: {type: bearer_env, env_var: K, token: sk-unused-000}\n",
     "targets.a.auth.token: type bearer_env does not use it"),
    ("targets:\n  a:\n" + _LLM + "    auth: {type: passthrough, header: x-api-key}\n",
     "targets.a.auth.header: type passthrough does not use it"),
    ("targets:\n  a:\n" + _LLM + "    auth: {type: bearer_env, env_var: K, env_vars: [K1, K2]}\n",
     "targets.a.auth: give env_var (one key) or env_vars (a pool), not both"),
    ("targets:\n  a:\n" + _LLM + "    retry_non_idempotent: true\n",
     "targets.a.retry_non_idempotent: applies to plain-HTTP targets only (an LLM target retries its POSTs by the "
     "retry_matrix)"),
    ("targets:\n  h:\n" + _HTTP + _TENANT + "    budget_caps: {h: {hard_cost_cap_usd: 1}}\n",
     "tenants[0].budget_caps.h: h is a plain-HTTP target, where nothing costs anything"),
    ("targets:\n  a:\n" + _LLM + _TENANT + "    cache_ttl_override: {a: 60}\n",
     "tenants[0].cache_ttl_override.a: target a has no cache block, so nothing is cached"),
    ("targets:\n  a:\n" + _LLM + _TENANT + "    rate_limit: {burst: 10}\n",
     "tenants[0].rate_limit.burst: is the burst of rpm; set rpm too"),
    ("targets:\n  a:\n" + _LLM + "rate_limit: {per_user: {}}\n", "rate_limit.per_user: give rpm and/or rph"),
    ("targets:\n  a:\n" + _LLM + "client_profiles: {p: {burst_size: 3}}\n",
     "client_profiles.p.burst_size: is the burst of max_qps_per_tenant; set that too"),
    ("targets:\n  a:\n" + _LLM + "server: {cors: {allow_credentials: true}}\n",
     'server.cors.allow_origins: give the origins browsers may call from (or ["*"]); without any, cors changes nothing'),
])
def test_a_setting_that_would_do_nothing_is_an_error(text: str, error: str) -> None:
    assert error in errors_of(text, env={"K": "sk-env-key-0001"})
