"""One HTTP request at the edge (``Call``: the aiohttp request and what the edge's steps learned of
it), and the shapes of those steps, which run before there is an ``Exchange``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.flow.exchange import Exchange, Reply
    from gateway.observe.trace import Trace
    from gateway.runtime import Runtime


class Surface(Protocol):
    """What a call knows of its surface (``gateway.edge.surfaces.Surface``)."""

    name: str  # the access log's "route"

    def dialect_of(self, raw_path: str) -> str: ...


class Call:
    __slots__ = ("request", "rt", "surface", "request_id", "started", "tenant", "account", "ex", "inflight", "ip", "exempt",
                 "fingerprint", "limit_headers", "trace", "task", "relaying")

    def __init__(self, request: web.Request, rt: Runtime, surface: Surface, request_id: str, started: float,
                 trace: Trace) -> None:
        self.request = request
        self.rt = rt  # the runtime of the config the request started under (a reload does not change it)
        self.surface = surface
        self.request_id = request_id
        self.started = started  # monotonic
        self.tenant: str | None = None  # the authenticated tenant's name
        self.account: Any = None  # that tenant (``gateway.flow.tenants.Tenant``), for the exchange
        self.ex: Exchange | None = None  # the parsed request
        self.inflight: str | None = None  # the target counted in flight for it
        # what the door learned (``policies.door``; unset without one)
        self.ip: str | None = None
        self.exempt = True  # on the abuse allow-list (or no bans configured)
        self.fingerprint: str | None = None
        self.limit_headers: dict[str, str] | None = None  # the per-IP limit's, for the answer
        self.trace = trace  # the caller's trace continued, or a new one
        self.task: asyncio.Task[Any] | None = None  # the task serving it (cancelled when the shutdown's grace is over)
        self.relaying = False  # its answer is being streamed (a shutdown ends it in-band instead)

    def elapsed_ms(self, now: float) -> float:
        return (now - self.started) * 1000


# The edge's steps, in the order a surface runs them (``gateway.edge.serve``): checks, made before the
# body is read (they refuse by raising), the surface's parser (the request as an ``Exchange``), the
# request flow, and the surface's finisher when its answers have a shape of their own.
Check = Callable[[Call], None]
Parser = Callable[[Call], Awaitable["Exchange"]]
Finisher = Callable[[Call, "Reply"], Awaitable["Reply"]]
