"""Configuration loading (SPEC §4): the seed and wiki forms load verbatim.

The YAML blocks come from ``tests/support/config_samples.py`` (copied verbatim from the seed documents
and the wiki); blocks that are fragments are completed by appending YAML, never by editing them.
Legacy spellings found in the seeds (``retry``, ``circuit_breaker``, ``llm.model``) load too, and
mixing them with the canonical spelling is an error.
"""

from __future__ import annotations

import textwrap

import msgspec
import pytest

from gateway.config import config_warnings
from gateway.config.model import (
    AuthConfig,
    BudgetCaps,
    CacheConfig,
    CircuitConfig,
    ClientProfile,
    FallbackEntry,
    KeyPool,
    PoolKey,
    RetryRule,
    TenantRateLimit,
)
from tests.support.config_helpers import DEFAULT_RETRY, SEEDS, errors_of, load
from tests.support.config_samples import (
    BACKUP_TARGETS_APPENDIX,
    FALLBACK_TARGETS_APPENDIX,
    KIKU_TEST_FIXTURE_TENANT,
    README_LLM_TARGET_WITH_BUDGET_CAPS,
    README_MINIMAL_HTTP_TARGET,
    REPO_CONFIG_PAYMENTS_API,
    SEED_ARCHITECTURE_CIRCUIT_BREAKER,
    SEED_ARCHITECTURE_CONFIG_DRIVEN,
    SEED_ARCHITECTURE_RETRY,
    WIKI_BUDGET_CAPS_TARGET,
    WIKI_BUDGET_CAPS_TENANT,
    WIKI_CONFIGURATION_STRUCTURE,
    WIKI_DEPLOY_GUIDE_LEGACY,
    WIKI_LLM_TARGET_EXAMPLE,
    WIKI_MULTI_TENANT_FULL,
    WIKI_MULTI_TENANT_SAAS,
    WIKI_USAGE_GUIDES_LLM_FALLBACK,
)


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


# ------------------------------------------------------------------ seed blocks load verbatim


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


def test_seed_architecture_config_driven_block_loads_verbatim() -> None:
    """Seed 001's "Configuration-Driven Behavior" block: ``cache: {ttl: 300}`` is the cache's ttl_s."""
    t = load(SEED_ARCHITECTURE_CONFIG_DRIVEN).targets["my_api"]
    assert t.cache is not None and t.cache.ttl_s == 300
    assert t.retry_matrix["5xx"].attempts == 2  # max_attempts counts the first try
    assert t.circuit.error_threshold == 5
    assert "give either ttl or ttl_s" in " ".join(errors_of(
        "targets:\n  a:\n    base_url: https://a.example\n    cache: {ttl: 5, ttl_s: 6}\n"))


def test_top_level_retry_and_circuit_breaker_blocks_apply_to_every_target_without_its_own() -> None:
    """Seed 001 shows ``retry:`` and ``circuit_breaker:`` as top-level blocks: every target that does not set
    its own (in either spelling) gets them; ``defaults:`` does the same for any target field."""
    text = (SEED_ARCHITECTURE_RETRY + SEED_ARCHITECTURE_CIRCUIT_BREAKER + "defaults: {timeout_ms: 9000}\n"
            "targets:\n  a:\n    base_url: https://a.example\n"
            "  b:\n    base_url: https://b.example\n    retry_matrix: {'5xx': {attempts: 0}}\n"
            "    circuit: {error_threshold: 9}\n    timeout_ms: 1000\n")
    config = load(text)
    a, b = config.targets["a"], config.targets["b"]
    assert a.retry_matrix["429"] == RetryRule(attempts=5, base_s=2.0, max_s=60.0)
    assert a.retry_matrix["net"] == RetryRule(attempts=2, base_s=1.0)
    assert (a.circuit.error_threshold, a.circuit.cooldown_s) == (5, 30)
    assert a.timeout_ms == 9000
    assert b.retry_matrix["5xx"].attempts == 0 and b.retry_matrix["429"] == DEFAULT_RETRY["429"]  # its own
    assert b.circuit.error_threshold == 9 and b.timeout_ms == 1000
    assert "retry: also given under defaults" in " ".join(errors_of(
        SEED_ARCHITECTURE_RETRY + "defaults: {retry_matrix: {}}\ntargets:\n  a:\n    base_url: https://a.example\n"))


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



def test_client_profiles_load_and_one_no_tenant_uses_is_named() -> None:
    """The wiki's profiles are enforced (tests/test_profiles.py); its sample gives no tenant the profile, and a
    profile that applies to nobody is said so, rather than looking like protection."""
    config = load(WIKI_CONFIGURATION_STRUCTURE)
    assert [w for w in config_warnings(config) if "client_profiles" in w] == [
        "client_profiles.cursor_default: no tenant has profile: cursor_default, so it applies to nobody"]
