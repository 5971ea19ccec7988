"""The gateway's own request and response types; policies see only these.

An ``Exchange`` is one client request on its way through the pipeline: what the
client sent (already validated), where it is going, and what the policies learned
on the way (the access-log fields). A ``Reply`` is what comes back: either
complete (status, headers, body) or a stream (status, headers, an async iterator
of chunks that already yielded its first chunk's worth of waiting — see
``gateway.upstream``). Policies may wrap a stream (tee it into a cache, count its
usage) but never write to aiohttp: ``gateway.writer`` is the only place that does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

if TYPE_CHECKING:
    from gateway.targets import Target

# Which error/event dialect the client speaks (SPEC §3).
OPENAI, ANTHROPIC, ENVELOPE = "openai", "anthropic", "envelope"


class Exchange:
    __slots__ = (
        "request_id", "method", "route", "dialect", "rel_path", "v1", "query", "headers", "body",
        "target", "model", "stream", "tenant", "client_ip", "attempts", "log",
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
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.route = route  # "v1" | "t" | … — the surface, for logs and metrics
        self.dialect = dialect
        self.rel_path = rel_path  # validated, still percent-encoded, below the surface prefix
        self.v1 = v1  # /v1/{path}: the target's base gets /v1 unless it already ends with it
        self.query = query  # raw query string, forwarded unchanged
        self.headers = headers  # client headers minus hop-by-hop, Host and gateway controls
        self.body = body
        self.target = target
        self.model = model
        self.stream = stream
        self.tenant: str | None = None
        self.client_ip = client_ip
        self.attempts = 0
        self.log: dict[str, Any] = {}  # extra access-log fields set by policies

    def url(self) -> str:
        return self.target.base.url(self.rel_path, self.query, v1=self.v1)


class Reply:
    """A complete response (``body``) or a stream (``chunks``); never both."""

    __slots__ = ("status", "headers", "body", "chunks", "upstream_status", "ttft_ms")

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

    @property
    def is_stream(self) -> bool:
        return self.chunks is not None

    async def aclose(self) -> None:
        """Release the upstream side of a stream the client will not read to the end."""
        close = getattr(self.chunks, "aclose", None)
        if close is not None:
            await close()
