"""Configuration: YAML → frozen msgspec Structs, decoded once at startup (SPEC §4).

Loading runs in four steps, each collecting every error with its path instead of
stopping at the first (``targets.my_api.circuit.error_threshold: expected int, got str``):

1. parse YAML (all mapping keys become strings: ``429:`` and ``"429":`` are one key);
2. expand ``${VAR}`` / ``${VAR:-default}`` in string values (a value that is exactly
   one reference is re-read as a YAML scalar, so ``port: ${PORT:-8000}`` is an int,
   while a str field keeps the text: ``api_key: ${KEY}`` with ``KEY=12345`` is "12345");
3. fold the seed documents' alternative spellings into the canonical shape
   (``gateway.config.compat``), and merge each ``retry_matrix`` over the defaults
   (classes and fields left out keep their default values);
4. check types field by field against the Structs (unknown keys are errors), then,
   once every value has the right type, check cross-references (fallback targets
   exist, auth is complete, …).

The Structs below are the documentation of every option; ``config/gateway.yaml``
is the built-in default written out with comments.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from gateway.config.store import StoreConfig
from gateway.config.tracing import TracingConfig
from providers import kind_of

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]


class _Base(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# ---------------------------------------------------------------- server (the store: gateway.config.store)


class CorsConfig(_Base):
    """Browsers on other origins (``server.cors``): preflights answered by the gateway, ``Access-Control-*`` on
    every answer to an allowed origin. Read at start (a reload keeps the running one)."""

    allow_origins: list[str] = []  # exact origins ("https://app.example.com"), or ["*"] for any
    allow_methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    allow_headers: list[str] = msgspec.field(default_factory=lambda: ["*"])  # "*": whatever the preflight asks
    expose_headers: list[str] = msgspec.field(default_factory=lambda: [
        "X-Request-Id", "X-ReliAPI-Target", "X-ReliAPI-Attempts", "X-Cache", "Retry-After",
        "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit", "RateLimit-Policy",
        "X-ReliAPI-Trace-Id", "X-ReliAPI-Routed-Model", "X-ReliAPI-Banned"])
    allow_credentials: bool = False  # with ["*"], the caller's own origin is echoed (a browser refuses "*" then)
    max_age_s: Annotated[int, Meta(ge=0, le=86400)] = 600


class ServerConfig(_Base):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    default_target: str | None = None  # /v1/* requests no header or model glob routes
    max_body_mb: PositiveFloat = 10  # request bodies over this get 413, enforced while reading
    admin_key_env: str | None = None  # env var holding the /admin bearer key; unset = loopback only
    shutdown_grace_s: NonNegFloat = 30  # SIGTERM: how long in-flight requests and streams may finish
    trust_forwarded_for: bool = False  # take the client IP from X-Forwarded-For
    rate_limit_per_ip_rpm: PositiveInt | None = None  # per client IP, before authentication (with tenants too)
    auth_failures_per_ip_rpm: PositiveInt = 30  # failed tenant-key checks per IP per minute; then 429 before checking
    # Slow and idle clients (slowloris) must not hold connections. The listener settings
    # (header_timeout_s, keepalive_timeout_s, max_connections) take effect at start: a reload keeps the old ones.
    header_timeout_s: PositiveFloat = 10  # a new connection's request head (line + headers) must arrive
    # within this from accept; on a kept-alive connection from the first byte of the next request.
    # A partial head then gets 408 request_timeout and the connection is closed; a silent one is just closed.
    body_timeout_s: PositiveFloat = 30  # longest silence between request body bytes → 408, connection closed
    body_deadline_s: PositiveFloat = 120  # the whole body must have arrived by then (a trickle can't hold on) → 408
    keepalive_timeout_s: PositiveFloat = 75  # an idle kept-alive connection is closed after this
    # open client connections per process; null = half of the open-file soft limit (ulimit -n) less 64 (each
    # client may need an upstream connection too), at least 16.
    # A connection beyond it gets 503 too_many_connections (Retry-After: 1); open ones keep working.
    max_connections: PositiveInt | None = None
    write_timeout_s: PositiveFloat = 60  # a streamed answer whose client reads nothing this long is aborted
    cors: CorsConfig | None = None  # no block: no Access-Control-* headers (a preflight is still never proxied)


# ---------------------------------------------------------------- targets

Provider = Literal["openai", "anthropic", "mistral", "http"]
AuthType = Literal["bearer_env", "bearer_static", "header_env", "passthrough", "none"]


class AuthConfig(_Base):
    type: AuthType
    env_var: str | None = None  # bearer_env / header_env: the variable holding the key
    env_vars: list[str] | None = None  # bearer_env key pool: several variables, round-robin
    qps_per_key: PositiveFloat | None = None
    token: str | None = None  # bearer_static
    header: str | None = None  # header_env: the header carrying the key (e.g. x-api-key)
    prefix: str | None = None  # header_env: text before the key, e.g. "Bearer "


class RetryRule(_Base):
    attempts: NonNegInt = 0  # retries after the first try
    backoff: Literal["exp-jitter", "exp", "linear", "constant"] = "exp-jitter"
    base_s: NonNegFloat = 1.0
    max_s: NonNegFloat = 60.0


RetryClass = Literal["429", "5xx", "net", "timeout"]


def _default_retry_matrix() -> dict[str, RetryRule]:
    return {"429": RetryRule(attempts=3, base_s=1.0, max_s=60.0), "5xx": RetryRule(attempts=2, base_s=1.0),
            "net": RetryRule(attempts=2, base_s=1.0), "timeout": RetryRule(attempts=0)}


class RetryBudgetConfig(_Base):
    """Envoy's retry budget: requests in their retry phase ≤ percent of the target's active requests."""

    percent: Annotated[float, Meta(gt=0, le=100)] = 20
    min_concurrent: NonNegInt = 3  # always allowed, however few requests are active


class CircuitConfig(_Base):
    error_threshold: PositiveInt = 5  # consecutive failures (5xx, timeout, net) that open it
    cooldown_s: NonNegFloat = 60
    half_open_max_calls: PositiveInt = 1


HeaderName = Annotated[str, Meta(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]


class CacheConfig(_Base):
    enabled: bool = True
    ttl_s: NonNegFloat = 3600
    max_entry_mb: PositiveFloat = 1
    # request headers whose values split entries, beyond the credentials the gateway always keys on
    # (Authorization, Cookie, X-Api-Key, Api-Key, the target's auth.header): list the header a
    # passthrough API authenticates with (X-Auth-Token, …) so two users never share an answer
    vary_headers: list[HeaderName] = []


class IdempotencyConfig(_Base):
    ttl_s: PositiveFloat = 3600  # how long a finished answer is replayed, counted from the first request
    wait_s: NonNegFloat = 30  # how long a concurrent duplicate waits for the first before 409
    lock_ttl_s: PositiveFloat = 30  # a running request's claim, renewed while it runs: a dead holder frees the key this soon
    max_entry_mb: PositiveFloat = 10  # larger answers are returned but not stored
    store_5xx: bool = False  # also store (and replay) upstream 5xx answers, as Stripe does


class FallbackEntry(_Base):
    target: str
    model: str | None = None


FallbackOn = Literal[
    "retryable", "circuit_open", "timeout", "context_length_exceeded",
    "content_policy_violation", "rate_limited", "server_error", "network", "overloaded",
]
DEFAULT_FALLBACK_ON: tuple[str, ...] = ("retryable", "circuit_open", "timeout", "context_length_exceeded")


class LLMConfig(_Base):
    provider: Provider | None = None
    default_model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    soft_cost_cap_usd: NonNegFloat | None = None
    hard_cost_cap_usd: NonNegFloat | None = None


class TargetConfig(_Base):
    base_url: str
    provider: Provider | None = None  # default: llm.provider, else guessed from the host, else http
    models: list[str] = []  # globs routing /v1/* requests by their "model"
    timeout_ms: PositiveInt = 20000  # per attempt
    total_timeout_ms: PositiveInt | None = None  # all attempts and backoff together
    connect_timeout_ms: PositiveInt = 5000
    auth: AuthConfig | None = None
    retry_matrix: dict[RetryClass, RetryRule] = msgspec.field(default_factory=_default_retry_matrix)
    retry_non_idempotent: bool = False  # plain-HTTP targets: also retry POST/PATCH after they may have been sent
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    ttft_timeout_ms: PositiveInt = 15000
    stream_idle_timeout_ms: PositiveInt = 30000
    stream_recovery: Literal["none", "continue"] = "none"
    circuit: CircuitConfig = CircuitConfig()
    cache: CacheConfig | None = None  # no block = no caching for this target
    idempotency: IdempotencyConfig = IdempotencyConfig()
    fallback_targets: list[FallbackEntry] = []
    fallback_on: list[FallbackOn] = msgspec.field(default_factory=lambda: list(DEFAULT_FALLBACK_ON))
    max_concurrency: PositiveInt | None = None  # bulkhead; none = unbounded
    llm: LLMConfig | None = None

    @property
    def kind(self) -> str:
        return "llm" if self.provider is None else kind_of(self.provider)


# ---------------------------------------------------------------- tenants


class BudgetCaps(_Base):
    soft_cost_cap_usd: NonNegFloat | None = None
    hard_cost_cap_usd: NonNegFloat | None = None


class SpendBudget(_Base):
    daily_usd: NonNegFloat | None = None
    monthly_usd: NonNegFloat | None = None


class UserRateLimit(_Base):
    """Each end user's own limit (``policies.rate_limit``): requests per minute and per hour."""

    rpm: PositiveInt | None = None
    rph: PositiveInt | None = None


class RateLimitConfig(_Base):
    """Top-level ``rate_limit:``: the per-user limit of every tenant that does not set its own."""

    per_user: UserRateLimit | None = None


class TenantRateLimit(_Base):
    rpm: PositiveInt | None = None
    burst: PositiveInt | None = None
    rps: PositiveInt | None = None  # the burst limit: at most this many in any second, apart from rpm's sustained rate
    rph: PositiveInt | None = None
    tpm: PositiveInt | None = None
    per_user: UserRateLimit | None = None  # this tenant's users (else the top-level rate_limit.per_user)


class TenantConfig(_Base):
    name: str
    api_key_env: str | None = None
    api_key: str | None = None
    api_key_sha256: str | None = None
    # Per-target maps; the key "*" holds the wiki's flat form that applies to every target.
    budget_caps: dict[str, BudgetCaps] = {}
    budget: SpendBudget | None = None
    rate_limit: TenantRateLimit | None = None
    fallback_targets: dict[str, list[FallbackEntry]] = {}
    cache_ttl_override: dict[str, NonNegFloat] = {}
    allowed_targets: list[str] | None = None
    allowed_models: list[str] | None = None
    profile: str | None = None
    tier: str | None = None  # a name under tiers: its settings fill in what this tenant does not set itself


class TierFeatures(_Base):
    """What a tier may use (``policies.tiers``); a feature set false is refused with 403 forbidden naming it
    (stream, tools, idempotency) or quietly not applied (cache, fallback)."""

    stream: bool = True  # false: a streamed request ("stream": true, Accept: text/event-stream) is refused
    tools: bool = True  # false: a request with function tools ("tools", "functions") is refused
    idempotency: bool = True  # false: a request with an idempotency key is refused (it would not be deduplicated)
    cache: bool = True  # false: never answered from the cache, never written to it
    fallback: bool = True  # false: only the target asked for answers, no fallback chain


class TierConfig(_Base):
    """A plan (``tiers.<name>``) tenants are on by ``tenants[].tier`` or a marketplace's ``tier_map``. A tenant's
    own settings win: each rate_limit and budget field it sets, its allowed_models when it sets them."""

    rate_limit: TenantRateLimit | None = None
    allowed_models: list[str] | None = None  # globs; a model outside them is 403 forbidden naming the tier
    max_tokens: PositiveInt | None = None  # output limit: a larger one (or none) is lowered to it (clamped)
    features: TierFeatures = TierFeatures()
    budget: SpendBudget | None = None


class MarketplaceConfig(_Base):
    """A marketplace whose proxy authenticates the callers (``marketplaces.rapidapi``): a request with the right
    proxy secret is the tenant ``rapidapi/<X-RapidAPI-User>`` on the tier its subscription maps to."""

    proxy_secret_env: str | None = None  # env var holding the X-RapidAPI-Proxy-Secret (required)
    tier_map: dict[str, str] = {}  # subscription (X-RapidAPI-Subscription: BASIC, PRO, ULTRA, MEGA) → tier name
    default_tier: str | None = None  # the tier of a subscription tier_map does not name; none: 403


class MarketplacesConfig(_Base):
    rapidapi: MarketplaceConfig | None = None


# ---------------------------------------------------------------- seed extras


class PoolKey(_Base):
    id: str
    api_key: str  # "env:VAR" reads the variable
    qps_limit: PositiveFloat | None = None


class KeyPool(_Base):
    keys: list[PoolKey]


class ClientProfile(_Base):
    max_parallel_requests: PositiveInt = 10
    max_qps_per_tenant: PositiveFloat | None = None
    max_qps_per_provider_key: PositiveFloat | None = None
    burst_size: PositiveInt | None = None  # with max_qps_per_tenant: how many at once (default 5)
    default_timeout_s: PositiveFloat | None = None


AbuseSubject = Literal["ip", "key", "fingerprint"]


class AnomalyConfig(_Base):
    """What looks wrong without breaking a limit (``policies.abuse``): reported as events, optionally throttled."""

    max_fingerprints_per_key: PositiveInt | None = None  # distinct fingerprints one tenant key comes from in window_s
    rate_jump_factor: Annotated[float, Meta(gt=1)] | None = None  # a tenant's last minute over k× its trailing average
    min_rpm: PositiveInt = 30  # a jump counts only from this many requests a minute (a quiet tenant's noise is no attack)
    window_s: PositiveFloat = 3600  # the trailing window of both
    throttle: bool = False  # while detected, refuse the tenant's requests (429 anomaly) instead of only reporting


class AbuseConfig(_Base):
    """Auto-ban (``policies.abuse``): ``ban_after`` violations within ``window_s`` ban the subject for ``ban_s``."""

    ban_after: PositiveInt = 20
    window_s: PositiveFloat = 600
    ban_s: PositiveFloat = 900
    subjects: list[AbuseSubject] = msgspec.field(default_factory=lambda: ["ip"])  # what violations count against
    allow: list[str] = []  # CIDRs never banned (nothing is exempt otherwise, loopback included)
    anomalies: AnomalyConfig | None = None


class Price(_Base):
    input: NonNegFloat  # USD per 1M prompt tokens
    output: NonNegFloat  # USD per 1M completion tokens


# ---------------------------------------------------------------- model routing


class HeaderMatch(_Base):
    """A request header a routing rule looks at: present (neither ``equals`` nor ``matches``), equal to a value,
    or matching a regular expression (searched)."""

    name: HeaderName
    equals: str | None = None
    matches: str | None = None


class RouteWhen(_Base):
    """What a request must look like for a rule to apply: every condition given holds (none given: any request)."""

    min_prompt_tokens: NonNegInt | None = None  # the estimated prompt (characters / 4 + per-message overhead) ≥ this
    max_prompt_tokens: NonNegInt | None = None  # … ≤ this
    has_tools: bool | None = None  # the request offers tools (tools, functions) — or, false, offers none
    has_images: bool | None = None  # a message holds an image part
    json_mode: bool | None = None  # JSON output asked (response_format, Responses text.format, output_format)
    last_user_matches: str | None = None  # a regex searched in the last user message's text
    tier: str | list[str] | None = None  # the caller's tenant tier is (one of) these
    header: HeaderMatch | None = None


class RouteRule(_Base):
    model: str  # the concrete model the request is sent with
    target: str | None = None  # where it goes; default the model's usual route (models globs, default_target)
    when: RouteWhen = RouteWhen()
    name: str | None = None  # for the log and the metric; default rules[i]


class VirtualModel(_Base):
    """A model name clients may send (``routing.auto``) that the gateway resolves per request: the first rule
    that applies names the concrete model (and maybe the target), else ``default``."""

    default: str  # the model when no rule applies
    default_target: str | None = None
    rules: list[RouteRule] = []
    scorer: str | None = None  # "package.module:callable" asked first; it returns a rule's name, or None


class Config(_Base):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    tenants: list[TenantConfig] = []
    targets: dict[str, TargetConfig] = {}
    rate_limit: RateLimitConfig = RateLimitConfig()
    tiers: dict[str, TierConfig] = {}
    marketplaces: MarketplacesConfig = MarketplacesConfig()  # no block: X-RapidAPI-* headers mean nothing
    abuse: AbuseConfig | None = None  # no block: no bans (the limits still apply)
    pricing: dict[str, Price] = {}
    provider_key_pools: dict[str, KeyPool] = {}
    client_profiles: dict[str, ClientProfile] = {}
    routing: dict[str, VirtualModel] = {}  # virtual model names (e.g. "auto") and their rules
    tracing: TracingConfig = TracingConfig()  # W3C trace context, span export (gateway.config.tracing)
