"""The shapes of the answers the gateway writes about itself, as msgspec Structs.

Health probes (``gateway.edge.probes``), the ``/v1`` operator and report endpoints
(``operator``, ``reports``) and the admin API (``admin``) encode these, and
``gateway.edge.openapi`` describes them from the same classes: ``/openapi.json`` cannot say
one thing while a handler sends another. A class's docstring is its description there, a
field's comment is for the reader of this file. A field that is ``UNSET`` is left out of the
answer; every other field is always there, ``null`` when it does not apply.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from msgspec import UNSET, Struct, UnsetType

T = TypeVar("T")
CircuitState = Literal["closed", "open", "half_open"]


# ---------------------------------------------------------------- probes and health


class Liveness(Struct):
    """The process is up and serving (``/healthz``, ``/livez``, ``/health``)."""

    status: Literal["ok"]
    version: str


class Readiness(Struct):
    """Whether this instance should get traffic: a config is loaded, the store answers and some target can
    serve. ``reason`` is there only when it is not ready."""

    status: Literal["ready", "not_ready"]
    config: Literal["loaded"]
    store: str  # the store backend: memory, redis
    targets: list[str]
    circuits: dict[str, CircuitState]  # each target's circuit, as this instance sees it
    reason: str | UnsetType = UNSET


class StoreState(Struct):
    backend: str
    healthy: bool
    error: str | None  # why it is not healthy (credentials scrubbed)


class TargetHealth(Struct):
    kind: str  # llm or http
    provider: str
    circuit: CircuitState


class Health(Struct):
    """The gateway, its store and each target's circuit: ``healthy``, or ``degraded`` (answered with 503) when
    the store is down or no circuit is closed."""

    status: Literal["healthy", "degraded"]
    version: str
    timestamp: str  # UTC, ISO 8601
    store: StoreState
    redis: bool | None  # the seed's field: the store's health when it is Redis
    targets: dict[str, TargetHealth]


class LimitView(Struct):
    name: str
    applies_to: Literal["user", "tenant", "ip"]  # whose bucket: the user's own, the tenant's, the caller's address
    unit: str  # requests or tokens
    limit: int  # the most that can be used at once (the bucket's capacity)
    quota: int  # units per window
    window_s: int
    remaining: int | None  # None when the store could not be asked
    reset_s: float | None  # seconds until the bucket is full again


class PerUserView(Struct):
    rpm: int | None  # each user's requests per minute
    rph: int | None  # ... and per hour


class RateLimitInfo(Struct):
    """Every limit a user's requests count against, as it stands (looked at, nothing taken): the user's own,
    the caller's tenant's, or without tenants the per-IP limit of the caller's address."""

    user_id: str
    tenant: str | None
    limits: list[LimitView]
    per_user: PerUserView | None  # the per-user limits that apply; None when there are none
    store_error: str | None


# ---------------------------------------------------------------- reports


class Pricing(Struct):
    input_per_1m_usd: float
    output_per_1m_usd: float


class Model(Struct):
    """A model a client can reach; ``owned_by`` is the target that serves it. ``pricing`` is left out for an
    unpriced model."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    pricing: Pricing | UnsetType = UNSET


class ModelList(Struct):
    """The gateway's model catalog, in OpenAI's list format."""

    object: Literal["list"]
    data: list[Model]


class UsageCounts(Struct):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | UnsetType = UNSET  # left out of a day with no priced request (always in a total)
    unpriced_requests: int | UnsetType = UNSET  # requests whose model has no price (left out when none)


class UsageDay(UsageCounts, kw_only=True):
    date: str  # YYYY-MM-DD, UTC


class UsageSummary(Struct):
    days: list[UsageDay]
    total: UsageCounts


class UserUsage(UsageSummary, kw_only=True):
    """A user's usage by day and in total (a tenant sees only its own users)."""

    user_id: str


class UsageReport(UsageSummary, kw_only=True):
    """Usage summed by day and in total, for a tenant and/or user, from ``since`` on."""

    tenant: str | None
    user: str | None
    since: str | None


# ---------------------------------------------------------------- the admin API


class AdminMeta(Struct):
    request_id: str


class AdminAnswer(Struct, Generic[T]):
    """The admin API's answer around its data."""

    success: Literal[True]
    data: T
    meta: AdminMeta


class Latency(Struct):
    p50: float | None  # milliseconds, over the recent requests; None before any
    p99: float | None


class TargetSummary(Struct):
    name: str
    kind: str
    provider: str
    circuit: CircuitState
    requests: int
    errors: int
    error_rate: float
    latency_ms: Latency
    inflight: int
    spend_today_usd: float


class Budget(Struct):
    daily_usd: float | None
    monthly_usd: float | None


class TenantSummary(Struct):
    name: str
    requests: int
    rate_limited: int
    spend_today_usd: float
    spend_month_usd: float | None  # None without a monthly budget
    budget: Budget | None


class Totals(Struct):
    requests: int  # refusals before a target was chosen too
    errors: int
    inflight: int
    spend_today_usd: float
    targets: int
    open_circuits: int  # circuits not closed (open or half open)


class Summary(Struct):
    """Version, uptime, store, and counts per target, per tenant and in total, since this instance started."""

    version: str
    started_at: str
    uptime_s: float
    store: StoreState
    totals: Totals
    targets: list[TargetSummary]
    tenants: list[TenantSummary]


class CacheTarget(Struct):
    target: str
    enabled: bool
    ttl_s: float | None
    hits: int
    misses: int
    hit_ratio: float | None  # None before any lookup
    entries: int | None  # answers stored; None when the store could not be asked


class CacheStats(Struct):
    """Per target: whether answers are cached, hits and misses, and the entries stored."""

    targets: list[CacheTarget]
    entries_total: int | None
    entries_truncated: bool  # the count stopped early (a very large store)
    store_error: str | None


class CacheCleared(Struct):
    """How many stored answers were dropped (every target's, or ``target``'s)."""

    target: str | None
    deleted: int


class CircuitView(Struct):
    """A target's circuit as this instance sees it; ``retry_after_s`` and ``reopens_at`` only while open."""

    target: str
    state: CircuitState
    failures: int
    error_threshold: int
    cooldown_s: float
    half_open_max_calls: int
    probes_in_flight: int
    retry_after_s: float | None
    reopens_at: str | None  # UTC, ISO 8601


class Circuits(Struct):
    """Every target's circuit."""

    circuits: list[CircuitView]


class CircuitReset(CircuitView, kw_only=True):
    """The circuit after it was closed, on every instance; ``shared`` is false when the store did not take
    the reset (this instance is closed anyway)."""

    was: CircuitState
    shared: bool


class BanView(Struct):
    """A subject refused until ``until`` (``policies.abuse``)."""

    id: str  # "ip:203.0.113.9", "key:<tenant>", "fp:<fingerprint>": what DELETE /admin/bans/{id} takes
    until: str  # UTC, ISO 8601
    remaining_s: float
    reason: str


class Bans(Struct):
    """The bans in force (``enabled`` false: no ``abuse`` block, so nothing is ever banned)."""

    enabled: bool
    bans: list[BanView]


class BanLifted(Struct):
    id: str
    lifted: bool  # false: there was no such ban


class Reloaded(Struct):
    """The config was read again and now serves (as on SIGHUP); ``all_workers``: every worker of a
    ``--workers N`` gateway was asked to do the same."""

    reloaded: Literal[True]
    errors: list[str]
    warnings: list[str]
    source: str | None  # where the config came from
    targets: list[str]
    all_workers: bool
