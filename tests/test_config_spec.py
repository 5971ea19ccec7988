"""Configuration as a whole (SPEC §4): the full example, the defaults, frozen results.

The SPEC §4 example loads with every field; blocks left out get their defaults; the built-in
default is ``config/gateway.yaml`` (commented options included); decoded configs are frozen and
decoding is deterministic.
"""

from __future__ import annotations

import os
import re

import msgspec
import pytest

from gateway.config import config_warnings, load_config
from gateway.config.model import (
    AuthConfig,
    BudgetCaps,
    CacheConfig,
    CircuitConfig,
    Config,
    FallbackEntry,
    Price,
    SpendBudget,
    TenantRateLimit,
)
from tests.support.config_helpers import DEFAULT_RETRY, REPO, load

SPEC_FULL = """
server:
  host: 0.0.0.0
  port: 9000
  default_target: openai
  max_body_mb: 10
  admin_key_env: RELIAPI_ADMIN_KEY
  shutdown_grace_s: 15
  trust_forwarded_for: false
store: {url: "redis://cache.internal:6379/0", key_prefix: reliapi}
tenants:
  - name: client-a
    api_key_env: CLIENT_A_KEY
    budget_caps: {soft_cost_cap_usd: 0.05, hard_cost_cap_usd: 0.20}
    budget: {daily_usd: 20, monthly_usd: 300}
    rate_limit_rpm: 1000
    fallback_targets: [anthropic]
    cache_ttl_override: 7200
    allowed_targets: [openai, anthropic]
    allowed_models: ["gpt-4o*", "claude-*"]
  - name: client-b
    api_key_sha256: "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    rate_limit: {rpm: 600, burst: 20, tpm: 100000}
  - name: client-c
    api_key: "sk-client-c"
targets:
  openai:
    base_url: https://api.openai.com/v1
    provider: openai
    models: ["gpt-*", "o*"]
    timeout_ms: 20000
    total_timeout_ms: 60000
    auth: {type: bearer_env, env_vars: [K1, K2, K3], qps_per_key: 5}
    retry_matrix:
      "429":  {attempts: 3, backoff: exp-jitter, base_s: 1.0, max_s: 60}
      "5xx":  {attempts: 2, backoff: exp-jitter, base_s: 1.0}
      "net":  {attempts: 2, backoff: exp-jitter, base_s: 1.0}
      "timeout": {attempts: 0}
    ttft_timeout_ms: 15000
    stream_idle_timeout_ms: 30000
    stream_recovery: continue
    circuit: {error_threshold: 5, cooldown_s: 60, half_open_max_calls: 1}
    cache: {enabled: true, ttl_s: 3600}
    idempotency: {ttl_s: 3600, wait_s: 30}
    fallback_targets: [{target: anthropic, model: claude-3-5-haiku-latest}, {target: openai, model: gpt-4o-mini}]
    fallback_on: [retryable, circuit_open, timeout, context_length_exceeded]
    max_concurrency: 256
    llm: {default_model: gpt-4o, max_tokens: 4096, temperature: 0.2, soft_cost_cap_usd: 0.05, hard_cost_cap_usd: 0.50}
  anthropic:
    base_url: https://api.anthropic.com
    models: ["claude-*"]
    auth: {type: header_env, header: x-api-key, env_var: ANTHROPIC_API_KEY}
    llm: {provider: anthropic}
  internal:
    base_url: http://10.0.0.5:8080/api
    auth: {type: bearer_static, token: "${INTERNAL_TOKEN}"}
pricing:
  gpt-4o-mini: {input: 0.15, output: 0.60}
"""


def test_spec_section_4_full_config() -> None:
    cfg = load(SPEC_FULL, env={"INTERNAL_TOKEN": "s3cret"})
    s = cfg.server
    assert (s.host, s.port, s.default_target, s.max_body_mb) == ("0.0.0.0", 9000, "openai", 10)
    assert (s.admin_key_env, s.shutdown_grace_s, s.trust_forwarded_for) == ("RELIAPI_ADMIN_KEY", 15, False)
    assert cfg.store.url == "redis://cache.internal:6379/0" and cfg.store.key_prefix == "reliapi"

    a, b, c = cfg.tenants
    assert a.api_key_env == "CLIENT_A_KEY"
    assert a.budget_caps == {"*": BudgetCaps(soft_cost_cap_usd=0.05, hard_cost_cap_usd=0.20)}
    assert a.budget == SpendBudget(daily_usd=20, monthly_usd=300)
    assert a.rate_limit == TenantRateLimit(rpm=1000)
    assert a.fallback_targets == {"*": [FallbackEntry("anthropic")]}
    assert a.cache_ttl_override == {"*": 7200}
    assert a.allowed_targets == ["openai", "anthropic"] and a.allowed_models == ["gpt-4o*", "claude-*"]
    assert b.api_key_sha256 is not None and b.rate_limit == TenantRateLimit(rpm=600, burst=20, tpm=100000)
    assert b.allowed_targets is None and b.budget_caps == {}
    assert c.api_key == "sk-client-c"

    o = cfg.targets["openai"]
    assert o.models == ["gpt-*", "o*"]
    assert (o.timeout_ms, o.total_timeout_ms, o.ttft_timeout_ms, o.stream_idle_timeout_ms) == (20000, 60000, 15000, 30000)
    assert o.auth == AuthConfig(type="bearer_env", env_vars=["K1", "K2", "K3"], qps_per_key=5.0)
    assert o.retry_matrix == DEFAULT_RETRY
    assert o.stream_recovery == "continue"
    assert o.circuit == CircuitConfig(error_threshold=5, cooldown_s=60, half_open_max_calls=1)
    assert o.idempotency.ttl_s == 3600 and o.idempotency.wait_s == 30
    assert o.fallback_targets == [
        FallbackEntry(target="anthropic", model="claude-3-5-haiku-latest"),
        FallbackEntry(target="openai", model="gpt-4o-mini"),  # same target, other model
    ]
    assert o.fallback_on == ["retryable", "circuit_open", "timeout", "context_length_exceeded"]
    assert o.max_concurrency == 256
    assert o.llm is not None and o.llm.default_model == "gpt-4o" and o.llm.temperature == 0.2
    assert cfg.targets["anthropic"].provider == "anthropic"  # from llm.provider
    assert cfg.targets["anthropic"].auth == AuthConfig(type="header_env", header="x-api-key", env_var="ANTHROPIC_API_KEY")
    internal = cfg.targets["internal"]
    assert internal.provider == "http" and internal.kind == "http"
    assert internal.auth == AuthConfig(type="bearer_static", token="s3cret")
    assert cfg.pricing == {"gpt-4o-mini": Price(input=0.15, output=0.60)}


def test_defaults_when_blocks_are_left_out() -> None:
    t = load("targets:\n  a: {base_url: 'https://a.example'}\n").targets["a"]
    assert t.timeout_ms == 20000
    assert t.cache is None  # no cache block → no caching
    assert t.fallback_on == ["retryable", "circuit_open", "timeout", "context_length_exceeded"]
    assert "content_policy_violation" not in t.fallback_on
    assert t.stream_recovery == "none"
    assert load("").targets == {}


# ------------------------------------------------------------------ the built-in default


def test_builtin_default_is_config_gateway_yaml() -> None:
    commented = REPO / "config" / "gateway.yaml"
    assert "#" in commented.read_text()
    default = load_config(None, env={})
    assert default == load_config(commented, env={})
    assert default.server.host == "127.0.0.1" and default.server.port == 8000
    assert default.server.default_target == "openai"
    assert default.store.url == "memory://"
    assert default.tenants == []
    assert list(default.targets) == ["openai", "anthropic", "mistral"]
    assert {n: t.provider for n, t in default.targets.items()} == {
        "openai": "openai", "anthropic": "anthropic", "mistral": "mistral",
    }
    assert default.targets["openai"].auth == AuthConfig(type="bearer_env", env_var="OPENAI_API_KEY")
    assert default.targets["anthropic"].auth == AuthConfig(type="header_env", header="x-api-key", env_var="ANTHROPIC_API_KEY")
    assert default.targets["mistral"].auth == AuthConfig(type="bearer_env", env_var="MISTRAL_API_KEY")
    assert all(t.kind == "llm" for t in default.targets.values())
    assert default.targets["openai"].retry_matrix == DEFAULT_RETRY


def test_builtin_default_commented_options_are_valid() -> None:
    """Uncommenting every option shown in config/gateway.yaml gives a valid config."""
    lines = (REPO / "config" / "gateway.yaml").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    out = lines[:first]
    for line in lines[first:]:
        m = re.fullmatch(r'(\s*)# (\s*(?:- )?"?[A-Za-z0-9_.-]+"?:(?: .*)?)', line)
        out.append(m.group(1) + m.group(2) if m else line)
    text = "\n".join(out)
    assert "\n  admin_key_env: RELIAPI_ADMIN_KEY" in text and "\ntenants:" in text and "\npricing:" in text
    cfg = load(text)
    o = cfg.targets["openai"]
    assert o.retry_matrix == DEFAULT_RETRY  # "(these are the defaults)"
    assert o.fallback_targets == [FallbackEntry(target="mistral", model="mistral-small-latest")]
    assert o.stream_recovery == "continue" and o.max_concurrency == 256 and o.total_timeout_ms == 300000
    # every example shown works as it is (its tenant's key variable set, as its comment asks)
    assert config_warnings(cfg, {**os.environ, "CLIENT_A_KEY": "client-a-key-0123456789"}) == []
    assert o.cache == CacheConfig(ttl_s=3600)
    assert cfg.tenants[0].name == "client-a" and cfg.tenants[0].budget == SpendBudget(daily_usd=20, monthly_usd=300)
    assert cfg.pricing["gpt-4o-mini"] == Price(input=0.15, output=0.60)


# ------------------------------------------------------------------ frozen and deterministic


def test_configs_are_frozen() -> None:
    cfg = load(SPEC_FULL, env={"INTERNAL_TOKEN": "t"})
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.targets["openai"].timeout_ms = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.tenants[0].name = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.targets["openai"].retry_matrix["429"].attempts = 9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.server = cfg.server  # type: ignore[misc]


def test_decode_is_deterministic() -> None:
    env = {"INTERNAL_TOKEN": "t"}
    first, second = load(SPEC_FULL, env=env), load(SPEC_FULL, env=env)
    assert first == second
    assert msgspec.json.encode(first) == msgspec.json.encode(second)
    assert list(first.targets) == ["openai", "anthropic", "internal"]  # file order is kept
    assert load_config(None, env={}) == load_config(None, env={})


def test_examples_config_loads_and_shows_every_option() -> None:
    """Seed 002 points at examples/config.yaml for "full configuration examples": it loads as it is, and every
    field of the config model (every Struct, however deep) is named in it."""
    import msgspec.inspect as mi

    text = (REPO / "examples" / "config.yaml").read_text()
    config = load(text)
    assert set(config.targets) == {"openai", "anthropic", "payments"}
    seen: set[str] = set()
    missing: list[str] = []

    def walk(info: object, path: str) -> None:
        if isinstance(info, mi.StructType):
            if info.cls in seen:
                return
            seen.add(info.cls)
            for field in info.fields:
                if not re.search(rf"(^|[\s{{,]){re.escape(field.encode_name)}:", text, re.M):
                    missing.append(f"{path}.{field.encode_name}")
                walk(field.type, f"{path}.{field.encode_name}")
        for attr in ("types", "item_type", "value_type"):
            inner = getattr(info, attr, None)
            for t in inner if isinstance(inner, tuple) else (inner,) if inner is not None else ():
                walk(t, path)

    walk(mi.type_info(Config), "")
    assert missing == []
