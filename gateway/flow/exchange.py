"""The gateway's own request type; policies see only it and ``Reply`` (``gateway.flow.reply``).

An ``Exchange`` is one client request on its way through the pipeline: what the
client sent (already validated), where it is going, and what the policies learned
on the way (the access-log fields).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

if TYPE_CHECKING:
    import asyncio

    from gateway.observe.trace import Trace
    from gateway.upstream.targets import Target
    from providers.auth import PoolKey

# Which error/event dialect the client speaks (SPEC §3).
OPENAI, ANTHROPIC, ENVELOPE = "openai", "anthropic", "envelope"


class Exchange:
    __slots__ = (
        "request_id", "method", "route", "dialect", "rel_path", "v1", "query", "headers", "body",
        "target", "model", "stream", "tenant", "client_ip", "attempts", "log",
        "choices", "include_usage", "deadline", "client_deadline", "key", "max_tokens", "idempotency_key", "cache_ttl",
        "user", "settlement", "ask_usage", "prepared", "canonical", "endpoint", "account", "trace", "continuation",
        "running", "cache_status", "refused", "unanswered", "caps", "ahead",
    )

    def __init__(
        self,
        *,
        request_id: str,
        method: str,
        route: str,
        dialect: str,
        rel_path: str,
        v1: bool,
        query: str,
        headers: CIMultiDict[str],
        body: bytes,
        target: Target,
        model: str | None = None,
        stream: bool = False,
        client_ip: str | None = None,
        choices: int = 1,
        include_usage: bool = False,
        tenant: str | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.route = route  # "v1" | "t" | … — the surface, for logs and metrics
        self.dialect = dialect
        self.rel_path = rel_path  # validated, still percent-encoded, below the surface prefix
        self.endpoint = target.base.endpoint(rel_path, v1=v1)  # which endpoint the upstream sees, however spelled
        self.v1 = v1  # /v1/{path}: the target's base gets /v1 unless it already ends with it
        self.query = query  # raw query string, forwarded unchanged
        self.headers = headers  # client headers minus hop-by-hop, Host and gateway controls
        self.body = body
        self.target = target
        self.model = model
        self.stream = stream
        self.tenant = tenant  # the authenticated tenant's name; None when the gateway is open
        self.account: Any = None  # that tenant (``gateway.flow.tenants.Tenant``): its tier, features and plan
        self.client_ip = client_ip
        self.attempts = 0
        self.unanswered = 0  # attempts sent that got no error answer back (one may still be billed)
        self.caps: Any = None  # a fallback target's caps, applied to the request for it (policies.budget)
        self.ahead: Any = None  # the store's answers to what a policy asked for those inside it (gateway.state.ahead)
        self.log: dict[str, Any] = {}  # extra access-log fields set by policies
        self.choices = choices  # the body's "n": a stream is complete when this many choices finished
        self.include_usage = include_usage  # stream_options.include_usage: a usage chunk ends the stream
        self.deadline: float | None = None  # monotonic: the current target's total_timeout_ms (retry policy)
        self.client_deadline: float | None = None  # monotonic: the tenant's default_timeout_s (policies.profiles)
        self.key: PoolKey | None = None  # the pool key for the current attempt (key pool policy)
        self.max_tokens = max_tokens  # the body's max_tokens / max_completion_tokens
        self.idempotency_key = idempotency_key  # the body's idempotency_key field (headers are read by the policy)
        self.cache_ttl: float | None = None  # an envelope's "cache" TTL override
        self.user: str | None = None  # the body's user / user_id (usage accounting)
        self.settlement: Any = None  # a tenant spend reservation to settle (policies.budget)
        # ask the upstream for a stream's usage report where it can (policies.usage): the cost becomes
        # exact, and the report the client did not ask for is read, not relayed (providers.translators)
        self.ask_usage = False
        # (body, translator, what it made of the body): the upstream's body, made once per body
        self.prepared: tuple[bytes, Any, bytes | None] | None = None
        self.canonical: tuple[bytes, bytes] | None = None  # (body, its canonical digest) for fingerprints and cache keys
        self.trace: Trace | None = None  # the request's place in its trace (gateway.observe.trace; set by the edge)
        self.continuation = False  # a stream_recovery continuation: its upstream's error events are held, not relayed
        # the task of the flight doing this request's work (a cache or idempotency lead): it may outlive the client
        self.running: asyncio.Task[Any] | None = None
        self.cache_status: str | None = None  # MISS once the cache looked and ran it: an error answer says so too
        # the budget's refusal, held while a stored or running answer may still serve it free (policies.budget)
        self.refused: Exception | None = None

    def url(self) -> str:
        return self.target.base.url(self.rel_path, self.query, v1=self.v1)

    def derive(self, **changes: Any) -> Exchange:
        """A copy for another try of the same client request (a stream continuation)."""
        twin = object.__new__(Exchange)
        for name in Exchange.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.log = {}
        for name, value in changes.items():
            setattr(twin, name, value)
        return twin


# The answer type, importable from here too (most steps take an Exchange and give a Reply).
from gateway.flow.reply import Reply  # noqa: E402

__all__ = ["ANTHROPIC", "ENVELOPE", "OPENAI", "Exchange", "Reply"]
