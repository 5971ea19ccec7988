"""YAML samples for the configuration tests (SPEC §4): seed and wiki blocks, copied verbatim.

Each constant carries a comment naming its source; ``test_config_seeds.test_seed_constants_are_verbatim``
re-checks the seed-file ones against ../shared/seeds when those are present. Where a block is a
fragment that needs more to be a whole config (targets it refers to, a tenant key), the extra YAML
lives in the appendices at the end and is *appended* to the verbatim text, never edited into it.
Trailing whitespace inside the blocks is part of the copy (the file-level ``ruff: noqa`` above allows it).
"""

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


# Verbatim from the seed architecture notes, "Circuit Breaker" → "Configuration" (a top-level block).
SEED_ARCHITECTURE_CIRCUIT_BREAKER = """\
circuit_breaker:
  failure_threshold: 5
  recovery_timeout: 30
"""

# Verbatim from the seed architecture notes, "Configuration-Driven Behavior".
SEED_ARCHITECTURE_CONFIG_DRIVEN = """\
targets:
  my_api:
    base_url: https://api.example.com
    cache:
      ttl: 300
    retry:
      max_attempts: 3
    circuit_breaker:
      failure_threshold: 5
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
