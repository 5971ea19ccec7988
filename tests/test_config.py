"""Configuration loading (SPEC §4, §1): seed forms load verbatim, errors name their paths.

The YAML string constants below are copied verbatim from the seed documents (each with a
comment naming its source); ``test_seed_constants_are_verbatim`` re-checks them against the
source files when those are present. Where a seed block is a fragment that needs more to be
a whole config (targets it refers to, a tenant key), the extra YAML is *appended* to the
verbatim text, never edited into it.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import msgspec
import pytest

from gateway.config import (
    AuthConfig,
    BudgetCaps,
    CacheConfig,
    CircuitConfig,
    ClientProfile,
    Config,
    ConfigError,
    FallbackEntry,
    KeyPool,
    PoolKey,
    Price,
    RetryRule,
    SpendBudget,
    TenantRateLimit,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO.parent / "shared" / "seeds"

DEFAULT_RETRY = {
    "429": RetryRule(attempts=3, backoff="exp-jitter", base_s=1.0, max_s=60.0),
    "5xx": RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0),
    "net": RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0),
    "timeout": RetryRule(attempts=0, backoff="exp-jitter", base_s=1.0, max_s=60.0),
}


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(text, env={} if env is None else env)


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={} if env is None else env)
    return info.value.errors


# Verbatim from the seed README (shared/seeds/002_7f183d1fd1c03f80.txt), "Minimal HTTP Target".
README_MINIMAL_HTTP_TARGET = """\
targets:
  my_api:
    base_url: "https://api.example.com"
    timeout_ms: 10000
    circuit:
      error_threshold: 5
      cooldown_s: 60
    cache:
      ttl_s: 300
      enabled: true
    auth:
      type: bearer_env
      env_var: API_KEY
"""

# Verbatim from the seed README (shared/seeds/002_7f183d1fd1c03f80.txt), "LLM Target with Budget Caps".
README_LLM_TARGET_WITH_BUDGET_CAPS = """\
targets:
  openai:
    base_url: "https://api.openai.com/v1"
    timeout_ms: 20000
    llm:
      provider: "openai"
      default_model: "gpt-4o-mini"
      max_tokens: 1024
      soft_cost_cap_usd: 0.01    # Throttle if exceeded
      hard_cost_cap_usd: 0.05    # Reject if exceeded
    cache:
      ttl_s: 3600
    auth:
      type: bearer_env
      env_var: OPENAI_API_KEY
"""

# Verbatim from the wiki Configuration page, structure block incl. provider_key_pools / client_profiles (wiki-config-forms.md §1).
WIKI_CONFIGURATION_STRUCTURE = """\
targets:
  target_name:
    base_url: "https://api.example.com"
    timeout_ms: 10000
    circuit:
      error_threshold: 5
      cooldown_s: 60
    cache:
      ttl_s: 300
      enabled: true
    auth:
      type: bearer_env
      env_var: API_KEY
    retry_matrix:
      "429": { attempts: 3, backoff: "exp-jitter", base_s: 1.0 }
      "5xx": { attempts: 2, backoff: "exp-jitter", base_s: 1.0 }
      "net": { attempts: 2, backoff: "exp-jitter", base_s: 1.0 }

# Provider Key Pools (optional, overrides targets.auth if present)
provider_key_pools:
  openai:
    keys:
      - id: "openai-main-1"
        api_key: "env:OPENAI_KEY_1"
        qps_limit: 3
      - id: "openai-main-2"
        api_key: "env:OPENAI_KEY_2"
        qps_limit: 3

# Client Profiles (optional)
client_profiles:
  cursor_default:
    max_parallel_requests: 4
    max_qps_per_tenant: 3
    max_qps_per_provider_key: 2
    burst_size: 2
    default_timeout_s: 60
"""

# Verbatim from the wiki Configuration page, LLM target example with fallback_targets and block-style retry_matrix (wiki-config-forms.md §3).
WIKI_LLM_TARGET_EXAMPLE = """\
targets:
  openai:
    base_url: "https://api.openai.com/v1"
    timeout_ms: 20000
    
    circuit:
      error_threshold: 5
      cooldown_s: 60
    
    llm:
      provider: "openai"                    # Explicit provider
      default_model: "gpt-4o-mini"          # Default model
      max_tokens: 1024                      # Max tokens limit
      temperature: 0.7                      # Temperature limit
      
      # Budget control
      soft_cost_cap_usd: 0.01              # Throttle if exceeded
      hard_cost_cap_usd: 0.05              # Reject if exceeded
    
    cache:
      ttl_s: 3600                          # Cache for 1 hour
      enabled: true
    
    auth:
      type: bearer_env
      env_var: OPENAI_API_KEY
    
    fallback_targets: ["anthropic", "mistral"]  # Fallback chain
    
    retry_matrix:
      "429":
        attempts: 3
        backoff: "exp-jitter"
        base_s: 1.0
        max_s: 60.0
      "5xx":
        attempts: 2
        backoff: "exp-jitter"
        base_s: 1.0
      "net":
        attempts: 2
        backoff: "exp-jitter"
        base_s: 1.0
"""

# Verbatim from the repo config.yaml, payments_api target (auth type api_key; retry_matrix flow style) (wiki-config-forms.md §4).
REPO_CONFIG_PAYMENTS_API = """\
  # Example: Generic HTTP API (not LLM)
  payments_api:
    base_url: "https://api.payments.example.com"
    timeout_ms: 12000
    circuit:
      error_threshold: 3
      cooldown_s: 30
    cache:
      ttl_s: 300
      enabled: true
    auth:
      type: api_key
      header: "X-API-Key"
      env_var: PAYMENTS_API_KEY
    retry_matrix:
      "429": {attempts: 3, backoff: "exp-jitter", base_s: 1.0}   # elided here: block style in the file
      "5xx": {attempts: 2, backoff: "exp-jitter", base_s: 1.0}   # elided here: block style in the file
"""

# Verbatim from the wiki Multi-Tenant-Mode, full example (wiki-config-forms.md §7).
WIKI_MULTI_TENANT_FULL = """\
tenants:
  - name: "client-a"
    api_key: "sk-client-a-secret-key-123"
    budget_caps:
      soft_cost_cap_usd: 10.0
      hard_cost_cap_usd: 50.0
    fallback_targets:
      - "openai-secondary"
    rate_limit_rpm: 1000
    cache_ttl_override: 7200  # Optional: override default cache TTL

  - name: "client-b"
    api_key: "sk-client-b-secret-key-456"
    budget_caps:
      soft_cost_cap_usd: 5.0
      hard_cost_cap_usd: 20.0
    fallback_targets:
      - "anthropic-backup"
    rate_limit_rpm: 500

targets:
  openai-primary:
    base_url: https://api.openai.com/v1
    llm:
      provider: openai
      model: gpt-4

  openai-secondary:
    base_url: https://api.openai.com/v1
    llm:
      provider: openai
      model: gpt-3.5-turbo

  anthropic-backup:
    base_url: https://api.anthropic.com/v1
    llm:
      provider: anthropic
      model: claude-3-opus
"""

# Verbatim from the wiki Multi-Tenant-Mode, "Example: SaaS Use Case" (wiki-config-forms.md §7).
WIKI_MULTI_TENANT_SAAS = """\
tenants:
  # Free tier
  - name: "free-user-123"
    api_key: "sk-free-..."
    budget_caps:
      soft_cost_cap_usd: 1.0
      hard_cost_cap_usd: 5.0
    rate_limit_rpm: 100
    fallback_targets: []  # No fallback for free tier

  # Pro tier
  - name: "pro-user-456"
    api_key: "sk-pro-..."
    budget_caps:
      soft_cost_cap_usd: 50.0
      hard_cost_cap_usd: 200.0
    rate_limit_rpm: 5000
    fallback_targets: ["openai-secondary", "anthropic-backup"]

  # Enterprise tier
  - name: "enterprise-789"
    api_key: "sk-enterprise-..."
    budget_caps:
      soft_cost_cap_usd: 500.0
      hard_cost_cap_usd: 2000.0
    rate_limit_rpm: 50000
    fallback_targets: ["openai-secondary", "anthropic-backup", "mistral-backup"]
    cache_ttl_override: 86400  # 24 hours
"""

# Verbatim from the wiki Budget-Caps, per-target caps (wiki-config-forms.md §8, first block).
WIKI_BUDGET_CAPS_TARGET = """\
targets:
  openai:
    llm:
      soft_cost_cap_usd: 0.10   # Throttle if exceeded
      hard_cost_cap_usd: 0.50    # Reject if exceeded
"""

# Verbatim from the wiki Budget-Caps, per-target tenant form (wiki-config-forms.md §8, second block).
WIKI_BUDGET_CAPS_TENANT = """\
tenants:
  - name: "client-a"
    budget_caps:
      openai:
        soft_cost_cap_usd: 10.0
        hard_cost_cap_usd: 50.0
"""

# Verbatim from the kiku-jw/reliapi tests/test_multi_tenant.py fixture (wiki-config-forms.md §9).
KIKU_TEST_FIXTURE_TENANT = """\
tenants:
  - name: "client-a"
    api_key: "sk-client-a-123"
    budget_caps:
      openai:
        soft_cost_cap_usd: 10.0
        hard_cost_cap_usd: 50.0
    fallback_targets:
      openai: ["openai-secondary"]
    rate_limit_rpm: 1000
"""

# Verbatim from the wiki Usage-Guides "Fallback Chains", fallback_targets inside llm: (wiki-config-forms.md §10).
WIKI_USAGE_GUIDES_LLM_FALLBACK = """\
targets:
  openai-primary:
    base_url: https://api.openai.com/v1
    llm:
      provider: openai
      fallback_targets: ["openai-secondary", "anthropic-backup"]
"""

# Verbatim from the wiki Deploy-Guide legacy names llm.model / retry / circuit_breaker (wiki-config-forms.md §10).
WIKI_DEPLOY_GUIDE_LEGACY = """\
targets:
  openai:
    base_url: https://api.openai.com/v1
    llm:
      provider: openai
      model: gpt-4
      soft_cost_cap_usd: 0.10
      hard_cost_cap_usd: 0.50
    cache:
      enabled: true
      ttl_s: 3600
    retry:
      max_attempts: 3
      backoff_ms: 1000
    circuit_breaker:
      failure_threshold: 5
      recovery_timeout_s: 60
"""

# Verbatim from the seed architecture notes (shared/seeds/001_2a44cef62a9f18da.txt), "Retry matrix by error type".
SEED_ARCHITECTURE_RETRY = """\
retry:
  429: {retries: 5, backoff: 2.0}  # Rate limit
  5xx: {retries: 3, backoff: 1.5}  # Server errors
  timeout: {retries: 3, backoff: 2.0}
  network: {retries: 2, backoff: 1.0}
"""


# Appended after WIKI_LLM_TARGET_EXAMPLE (same indentation, so it continues its `targets:`
# mapping): the two targets its fallback_targets name.
FALLBACK_TARGETS_APPENDIX = """\
  anthropic:
    base_url: "https://api.anthropic.com"
  mistral:
    base_url: "https://api.mistral.ai/v1"
"""

# Appended after tenants-only blocks that refer to these targets.
BACKUP_TARGETS_APPENDIX = """\
targets:
  openai:
    base_url: https://api.openai.com/v1
  openai-primary:
    base_url: https://api.openai.com/v1
  openai-secondary:
    base_url: https://api.openai.com/v1
    llm:
      provider: openai
  anthropic-backup:
    base_url: https://api.anthropic.com/v1
    llm:
      provider: anthropic
  mistral-backup:
    base_url: https://api.mistral.ai/v1
"""


def _seed_texts() -> str:
    texts = []
    for p in [SEEDS / "002_7f183d1fd1c03f80.txt", SEEDS / "001_2a44cef62a9f18da.txt"]:
        if not p.is_file():
            pytest.skip(f"{p} not available (the seeds live in ../shared beside the repo)")
        texts.append(p.read_text())
    return "\n".join(texts)


def test_seed_constants_are_verbatim() -> None:
    """The blocks taken from the seed documents in ../shared are exact copies (the wiki blocks are
    quoted from the public ReliAPI wiki, which is not part of this workspace)."""
    sources = _seed_texts()
    verbatim = [README_MINIMAL_HTTP_TARGET, README_LLM_TARGET_WITH_BUDGET_CAPS, SEED_ARCHITECTURE_RETRY]
    for text in verbatim:
        assert text in sources, f"not a verbatim copy of its seed block:\n{text}"


# ------------------------------------------------------------------ 1. seed blocks load verbatim


def test_readme_minimal_http_target() -> None:
    cfg = load(README_MINIMAL_HTTP_TARGET)
    t = cfg.targets["my_api"]
    assert list(cfg.targets) == ["my_api"]
    assert t.base_url == "https://api.example.com"
    assert t.timeout_ms == 10000
    assert t.circuit == CircuitConfig(error_threshold=5, cooldown_s=60, half_open_max_calls=1)
    assert t.cache == CacheConfig(enabled=True, ttl_s=300)
    assert t.auth == AuthConfig(type="bearer_env", env_var="API_KEY")
    assert t.provider == "http"
    assert t.kind == "http"
    assert t.llm is None
    assert t.retry_matrix == DEFAULT_RETRY
    assert t.fallback_targets == []


def test_readme_llm_target_with_budget_caps() -> None:
    t = load(README_LLM_TARGET_WITH_BUDGET_CAPS).targets["openai"]
    assert t.provider == "openai"
    assert t.kind == "llm"
    assert t.timeout_ms == 20000
    assert t.llm is not None
    assert t.llm.provider == "openai"
    assert t.llm.default_model == "gpt-4o-mini"
    assert t.llm.max_tokens == 1024
    assert t.llm.soft_cost_cap_usd == 0.01
    assert t.llm.hard_cost_cap_usd == 0.05
    assert t.cache == CacheConfig(enabled=True, ttl_s=3600)  # enabled by default once a cache block exists
    assert t.auth == AuthConfig(type="bearer_env", env_var="OPENAI_API_KEY")


def test_wiki_configuration_structure_block() -> None:
    cfg = load(WIKI_CONFIGURATION_STRUCTURE)
    t = cfg.targets["target_name"]
    assert t.timeout_ms == 10000
    assert t.provider == "http"
    assert t.cache == CacheConfig(enabled=True, ttl_s=300)
    # flow-style retry_matrix; max_s and the whole "timeout" class are left out → defaults
    assert t.retry_matrix == {
        "429": RetryRule(attempts=3, backoff="exp-jitter", base_s=1.0, max_s=60.0),
        "5xx": RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0),
        "net": RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0),
        "timeout": RetryRule(attempts=0),
    }
    # pools are keyed by provider name here (no target is called "openai")
    assert cfg.provider_key_pools == {
        "openai": KeyPool(keys=[
            PoolKey(id="openai-main-1", api_key="env:OPENAI_KEY_1", qps_limit=3.0),
            PoolKey(id="openai-main-2", api_key="env:OPENAI_KEY_2", qps_limit=3.0),
        ])
    }
    assert cfg.client_profiles == {
        "cursor_default": ClientProfile(
            max_parallel_requests=4, max_qps_per_tenant=3.0, max_qps_per_provider_key=2.0,
            burst_size=2, default_timeout_s=60.0,
        )
    }


def test_wiki_llm_target_example_with_fallback_targets() -> None:
    cfg = load(WIKI_LLM_TARGET_EXAMPLE + FALLBACK_TARGETS_APPENDIX)
    t = cfg.targets["openai"]
    assert t.fallback_targets == [FallbackEntry(target="anthropic"), FallbackEntry(target="mistral")]
    assert t.llm is not None and t.llm.temperature == 0.7 and t.llm.max_tokens == 1024
    assert (t.llm.soft_cost_cap_usd, t.llm.hard_cost_cap_usd) == (0.01, 0.05)
    assert t.cache == CacheConfig(enabled=True, ttl_s=3600)
    assert t.circuit.error_threshold == 5 and t.circuit.cooldown_s == 60
    # block-style retry_matrix; "timeout" is not given → keeps its default of no retries
    assert t.retry_matrix == DEFAULT_RETRY
    assert t.retry_matrix["timeout"].attempts == 0
    assert cfg.targets["anthropic"].provider == "anthropic"
    assert cfg.targets["mistral"].provider == "mistral"


def test_wiki_llm_target_example_alone_names_missing_fallbacks() -> None:
    errs = errors_of(WIKI_LLM_TARGET_EXAMPLE)
    assert errs == [
        "targets.openai.fallback_targets[0]: no target named 'anthropic'",
        "targets.openai.fallback_targets[1]: no target named 'mistral'",
    ]


def test_flow_and_block_retry_matrix_agree() -> None:
    flow = load(WIKI_CONFIGURATION_STRUCTURE).targets["target_name"].retry_matrix
    block = load(WIKI_LLM_TARGET_EXAMPLE + FALLBACK_TARGETS_APPENDIX).targets["openai"].retry_matrix
    assert flow == block


def test_retry_matrix_keeps_defaults_for_omitted_classes_and_fields() -> None:
    cfg = load("""
targets:
  a:
    base_url: https://a.example
    retry_matrix:
      "429": {attempts: 5, max_s: 30}
      "timeout": {base_s: 2}
  b:
    base_url: https://b.example
    retry_matrix:
      429: {backoff: linear}
      network: {attempts: 1}
  c:
    base_url: https://c.example
    retry_matrix: {}
""")
    a = cfg.targets["a"].retry_matrix
    assert a["429"] == RetryRule(attempts=5, backoff="exp-jitter", base_s=1.0, max_s=30.0)
    assert a["5xx"] == DEFAULT_RETRY["5xx"]
    assert a["net"] == DEFAULT_RETRY["net"]
    assert a["timeout"] == RetryRule(attempts=0, base_s=2.0)  # still no retries on a timeout
    b = cfg.targets["b"].retry_matrix
    assert b["429"] == RetryRule(attempts=3, backoff="linear", base_s=1.0, max_s=60.0)  # unquoted 429 == "429"
    assert b["net"].attempts == 1  # "network" is the seed's name for "net"
    assert set(b) == {"429", "5xx", "net", "timeout"}
    assert cfg.targets["c"].retry_matrix == DEFAULT_RETRY


def test_repo_config_payments_api_auth_api_key() -> None:
    t = load("targets:\n" + REPO_CONFIG_PAYMENTS_API).targets["payments_api"]
    assert t.auth == AuthConfig(type="header_env", header="X-API-Key", env_var="PAYMENTS_API_KEY")
    assert t.timeout_ms == 12000
    assert t.circuit.error_threshold == 3 and t.circuit.cooldown_s == 30
    assert t.provider == "http" and t.kind == "http"
    assert t.retry_matrix["429"] == DEFAULT_RETRY["429"]
    assert t.retry_matrix["timeout"].attempts == 0


def test_wiki_multi_tenant_full_example() -> None:
    cfg = load(WIKI_MULTI_TENANT_FULL)
    a, b = cfg.tenants
    assert a.name == "client-a" and a.api_key == "sk-client-a-secret-key-123"
    assert a.budget_caps == {"*": BudgetCaps(soft_cost_cap_usd=10.0, hard_cost_cap_usd=50.0)}
    assert a.fallback_targets == {"*": [FallbackEntry(target="openai-secondary")]}
    assert a.rate_limit is not None and a.rate_limit.rpm == 1000
    assert a.cache_ttl_override == {"*": 7200}
    assert b.name == "client-b"
    assert b.budget_caps == {"*": BudgetCaps(soft_cost_cap_usd=5.0, hard_cost_cap_usd=20.0)}
    assert b.fallback_targets == {"*": [FallbackEntry(target="anthropic-backup")]}
    assert b.rate_limit == TenantRateLimit(rpm=500)
    assert b.cache_ttl_override == {}
    t = cfg.targets
    assert list(t) == ["openai-primary", "openai-secondary", "anthropic-backup"]
    assert t["openai-primary"].llm is not None and t["openai-primary"].llm.default_model == "gpt-4"
    assert t["openai-secondary"].llm is not None and t["openai-secondary"].llm.default_model == "gpt-3.5-turbo"
    assert t["anthropic-backup"].llm is not None and t["anthropic-backup"].llm.default_model == "claude-3-opus"
    assert [x.provider for x in t.values()] == ["openai", "openai", "anthropic"]


def test_wiki_multi_tenant_saas_example() -> None:
    cfg = load(WIKI_MULTI_TENANT_SAAS + BACKUP_TARGETS_APPENDIX)
    free, pro, ent = cfg.tenants
    assert free.fallback_targets == {"*": []}  # "No fallback for free tier": an explicit empty chain
    assert free.rate_limit == TenantRateLimit(rpm=100)
    assert pro.fallback_targets == {"*": [FallbackEntry("openai-secondary"), FallbackEntry("anthropic-backup")]}
    assert ent.fallback_targets["*"][-1] == FallbackEntry("mistral-backup")
    assert ent.cache_ttl_override == {"*": 86400}
    assert ent.budget_caps["*"] == BudgetCaps(soft_cost_cap_usd=500.0, hard_cost_cap_usd=2000.0)


def test_wiki_budget_caps_per_target_forms() -> None:
    # Both Budget-Caps blocks are fragments: the target has no base_url and the tenant no key.
    errs = errors_of(WIKI_BUDGET_CAPS_TARGET + WIKI_BUDGET_CAPS_TENANT)
    assert errs == ["targets.openai.base_url: required"]
    errs = errors_of(WIKI_BUDGET_CAPS_TARGET + "    base_url: https://api.openai.com/v1\n" + WIKI_BUDGET_CAPS_TENANT)
    assert errs == ["tenants[0]: set exactly one of api_key_env, api_key, api_key_sha256"]
    # Completed by appending one line to each (indentation continues the block's own mapping):
    cfg = load(
        WIKI_BUDGET_CAPS_TARGET + "    base_url: https://api.openai.com/v1\n"
        + WIKI_BUDGET_CAPS_TENANT + "    api_key: sk-client-a\n"
    )
    llm = cfg.targets["openai"].llm
    assert llm is not None and (llm.soft_cost_cap_usd, llm.hard_cost_cap_usd) == (0.10, 0.50)
    assert cfg.targets["openai"].provider == "openai"  # from the host
    assert cfg.tenants[0].budget_caps == {"openai": BudgetCaps(soft_cost_cap_usd=10.0, hard_cost_cap_usd=50.0)}


def test_kiku_fixture_tenant_form() -> None:
    cfg = load(KIKU_TEST_FIXTURE_TENANT + BACKUP_TARGETS_APPENDIX)
    (a,) = cfg.tenants
    assert a.api_key == "sk-client-a-123"
    assert a.budget_caps == {"openai": BudgetCaps(soft_cost_cap_usd=10.0, hard_cost_cap_usd=50.0)}
    assert a.fallback_targets == {"openai": [FallbackEntry(target="openai-secondary")]}
    assert a.rate_limit == TenantRateLimit(rpm=1000)
    # the fixture's other form: a nested per-target chain
    cfg = load("""
tenants:
  - name: "client-a"
    api_key: "sk-client-a-123"
    fallback_targets:
      openai-primary: ["openai-secondary", "anthropic-backup"]
""" + BACKUP_TARGETS_APPENDIX)
    assert cfg.tenants[0].fallback_targets == {
        "openai-primary": [FallbackEntry("openai-secondary"), FallbackEntry("anthropic-backup")]
    }


def test_tenants_as_a_mapping_keyed_by_name() -> None:
    cfg = load("""
tenants:
  client-a: {api_key: k1, budget_caps: {openai: {hard_cost_cap_usd: 1.0}}}
  client-b: {api_key_env: CLIENT_B_KEY}
targets:
  openai: {base_url: https://api.openai.com/v1}
""")
    assert [t.name for t in cfg.tenants] == ["client-a", "client-b"]
    assert cfg.tenants[0].budget_caps == {"openai": BudgetCaps(hard_cost_cap_usd=1.0)}


def test_usage_guides_fallback_targets_inside_llm() -> None:
    # Appended (continuing the block's `targets:` mapping): the two targets the page also defines.
    cfg = load(WIKI_USAGE_GUIDES_LLM_FALLBACK + """\
  openai-secondary:
    base_url: https://api.openai.com/v1
    llm:
      provider: openai
  anthropic-backup:
    base_url: https://api.anthropic.com/v1
    llm:
      provider: anthropic
""")
    t = cfg.targets["openai-primary"]
    assert t.fallback_targets == [FallbackEntry("openai-secondary"), FallbackEntry("anthropic-backup")]
    assert t.llm is not None and t.llm.provider == "openai"
    assert "fallback_targets" not in msgspec.structs.asdict(t.llm)  # moved up to the target
    both = WIKI_USAGE_GUIDES_LLM_FALLBACK + "    fallback_targets: [openai-primary]\n"
    assert "targets.openai-primary.llm.fallback_targets: already set on the target" in errors_of(both)


def test_seed_architecture_retry_form() -> None:
    text = "targets:\n  api:\n    base_url: https://api.example.com\n" + textwrap.indent(SEED_ARCHITECTURE_RETRY, "    ")
    m = load(text).targets["api"].retry_matrix
    assert m["429"] == RetryRule(attempts=5, base_s=2.0, max_s=60.0)
    assert m["5xx"] == RetryRule(attempts=3, base_s=1.5, max_s=60.0)
    assert m["timeout"] == RetryRule(attempts=3, base_s=2.0)  # given explicitly, so it wins over the default 0
    assert m["net"] == RetryRule(attempts=2, base_s=1.0)  # network → net
    assert "network" not in m


def test_deploy_guide_legacy_forms() -> None:
    t = load(WIKI_DEPLOY_GUIDE_LEGACY).targets["openai"]
    assert t.llm is not None and t.llm.default_model == "gpt-4"  # llm.model
    assert (t.llm.soft_cost_cap_usd, t.llm.hard_cost_cap_usd) == (0.10, 0.50)
    assert t.cache == CacheConfig(enabled=True, ttl_s=3600)
    # retry: {max_attempts: 3, backoff_ms: 1000} → 2 retries after the first try, 1 s base
    for cls in ("429", "5xx", "net"):
        assert t.retry_matrix[cls] == RetryRule(attempts=2, backoff="exp-jitter", base_s=1.0, max_s=60.0)
    assert t.retry_matrix["timeout"].attempts == 0
    # circuit_breaker: {failure_threshold: 5, recovery_timeout_s: 60}
    assert t.circuit == CircuitConfig(error_threshold=5, cooldown_s=60)


def test_legacy_and_canonical_spellings_together_are_errors() -> None:
    errs = errors_of("""
targets:
  a:
    base_url: https://a.example
    retry: {max_attempts: 2}
    retry_matrix: {"429": {attempts: 1}}
    circuit: {error_threshold: 2}
    circuit_breaker: {failure_threshold: 3}
    llm: {model: x, default_model: y}
  b:
    base_url: https://b.example
    retry_matrix: {net: {attempts: 1}, network: {attempts: 4}}
tenants:
  - {name: t, api_key: k, rate_limit_rpm: 5, rate_limit: {rpm: 7}}
""")
    assert "targets.a.retry: give either retry_matrix or retry, not both" in errs
    assert "targets.a.circuit_breaker: give either circuit or circuit_breaker, not both" in errs
    assert "targets.a.llm.model: give either model or default_model, not both" in errs
    assert "targets.b.retry_matrix.network: give either net or network, not both" in errs
    assert "tenants[0].rate_limit_rpm: give either rate_limit_rpm or rate_limit.rpm, not both" in errs
    assert len(errs) == 5


def test_typo_in_flat_tenant_budget_caps_is_an_unknown_key() -> None:
    errs = errors_of("tenants: [{name: a, api_key: k, budget_caps: {soft_cost_cap_usd: 1, hard_cap: 2}}]")
    assert errs == ["tenants[0].budget_caps.*.hard_cap: unknown key (allowed: hard_cost_cap_usd, soft_cost_cap_usd)"]


def test_legacy_retry_wrong_type_is_a_type_error() -> None:
    errs = errors_of("targets:\n  a:\n    base_url: https://a.example\n    retry: {max_attempts: three}\n")
    assert "targets.a.retry_matrix.429.attempts: expected int, got str" in errs
    assert not any("unknown key" in e for e in errs)


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


# ------------------------------------------------------------------ 2. errors


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
    cache: {ttl: 1}
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
        "targets.t.cache.ttl": "ttl_s",
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
    assert "serverr: unknown key (allowed: client_profiles, pricing, provider_key_pools, server, store, targets, tenants)" in errs


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
        "server.typo: unknown key (allowed: admin_key_env, default_target, host, max_body_mb, port, "
        "rate_limit_per_ip_rpm, shutdown_grace_s, trust_forwarded_for)",
        "server.port: expected int, got str",
        "server.max_body_mb: expected float > 0.0, got -1",
        "targets.a.provider: expected one of openai, anthropic, mistral, http, got 'openia'",
        "targets.a.timeout_ms: expected int, got float",
        "targets.a.circuit.error_threshold: expected int, got str",
        "targets.a.cache.enabled: expected bool, got str",
        "targets.a.fallback_on[1]: expected one of retryable, circuit_open, timeout, context_length_exceeded, "
        "content_policy_violation, rate_limited, server_error, network, got 'sometimes'",
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
  v: {base_url: "https://v.example/v1?x=1"}
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
        "got 'https://user:pw@host'",
        "targets.v.base_url: expected an absolute http(s) URL without query, fragment or credentials, "
        "got 'https://v.example/v1?x=1'",
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


# ------------------------------------------------------------------ 3. environment expansion


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


# ------------------------------------------------------------------ 4. the built-in default


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
    assert o.fallback_targets == [FallbackEntry(target="anthropic", model="claude-3-5-haiku-latest")]
    assert o.cache == CacheConfig(ttl_s=3600)
    assert cfg.tenants[0].name == "client-a" and cfg.tenants[0].budget == SpendBudget(daily_usd=20, monthly_usd=300)
    assert cfg.pricing["gpt-4o-mini"] == Price(input=0.15, output=0.60)


# ------------------------------------------------------------------ 5. frozen and deterministic


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
