"""The gateway's own request and response types; policies see only these.

An ``Exchange`` is one client request on its way through the pipeline: what the
client sent (already validated), where it is going, and what the policies learned
on the way (the access-log fields). A ``Reply`` is what comes back: either
complete (status, headers, body) or a stream (status, headers, an async iterator
of chunks that already yielded its first chunk's worth of waiting — see
``gateway.upstream.transport``). Policies may wrap a stream (tee it into a cache, count its
usage) but never write to aiohttp: ``gateway.edge.writer`` is the only place that does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

if TYPE_CHECKING:
    from gateway.failures import Failure
    from gateway.upstream.targets import Target
    from providers.auth import PoolKey
    from providers.base import StreamReader

# Which error/event dialect the client speaks (SPEC §3).
OPENAI, ANTHROPIC, ENVELOPE = "openai", "anthropic", "envelope"


class Exchange:
    __slots__ = (
        "request_id", "method", "route", "dialect", "rel_path", "v1", "query", "headers", "body",
        "target", "model", "stream", "tenant", "client_ip", "attempts", "log",
        "choices", "include_usage", "deadline", "key", "max_tokens", "idempotency_key", "cache_ttl",
        "user", "settlement", "ask_usage", "prepared", "canonical", "endpoint",
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
        self.client_ip = client_ip
        self.attempts = 0
        self.log: dict[str, Any] = {}  # extra access-log fields set by policies
        self.choices = choices  # the body's "n": a stream is complete when this many choices finished
        self.include_usage = include_usage  # stream_options.include_usage: a usage chunk ends the stream
        self.deadline: float | None = None  # monotonic: the current target's total_timeout_ms (retry policy)
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


CloseCallback = Callable[[BaseException | None], None]


class Reply:
    """A complete response (``body``) or a stream (``chunks``); never both.

    ``failure`` is the provider's classification of an error answer (None for a good
    one); ``head`` is the first chunk of a stream, already received, which ``chunks``
    yields first — a policy may look at it (an error in the first SSE event) without
    consuming the stream. ``reader`` is the stream's format reader (what the client has
    been sent so far, for ``stream_recovery: continue``).
    """

    __slots__ = ("status", "headers", "body", "chunks", "upstream_status", "ttft_ms", "failure", "head", "reader",
                 "_closers")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str],
        *,
        body: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
        upstream_status: int | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.chunks = chunks
        self.upstream_status = upstream_status
        self.ttft_ms: float | None = None
        self.failure: Failure | None = None
        self.head = b""
        self.reader: StreamReader | None = None  # set when the stream's format is known (gateway.streaming.streams)
        self._closers: list[CloseCallback] | None = None

    @property
    def is_stream(self) -> bool:
        return self.chunks is not None

    def on_close(self, callback: CloseCallback) -> None:
        """Run ``callback(error)`` exactly once when a stream is done with: read to its end
        (``error`` None), broken (the exception), or abandoned before its end — the client
        went away, or a policy let it go (an ``asyncio.CancelledError``). For a complete
        reply it runs at once, with None."""
        if self.chunks is None:
            callback(None)
            return
        if self._closers is None:
            self._closers = [callback]
            self.chunks = _Guarded(self.chunks, self._closers)
        else:
            self._closers.append(callback)

    async def aclose(self) -> None:
        """Release the upstream side of a stream the client will not read to the end."""
        close = getattr(self.chunks, "aclose", None)
        if close is not None:
            await close()

    async def settled(self) -> Reply:
        """A failed answer set aside while another attempt runs: a stream becomes the complete
        reply of what it had sent (its head: the error event), and its connection is let go."""
        if self.chunks is None:
            return self
        await self.aclose()
        done = Reply(self.status, self.headers, body=self.head, upstream_status=self.upstream_status)
        done.failure, done.ttft_ms = self.failure, self.ttft_ms
        return done


class _Guarded:
    """Wraps a stream so its close callbacks run once, however the stream ends."""

    __slots__ = ("_it", "_closers", "_done")

    def __init__(self, it: AsyncIterator[bytes], closers: list[CloseCallback]) -> None:
        self._it = it
        self._closers = closers
        self._done = False

    def __aiter__(self) -> _Guarded:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self._finish(None)
            raise
        except Exception as e:
            self._finish(e)
            raise
        except BaseException:  # cancelled: the client went away
            self._finish(asyncio.CancelledError())
            raise

    async def aclose(self) -> None:
        try:
            close = getattr(self._it, "aclose", None)
            if close is not None:
                await close()
        finally:
            self._finish(asyncio.CancelledError())  # a no-op when the stream already ended

    def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        for callback in self._closers:
            callback(error)
