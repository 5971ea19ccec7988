"""One HTTP request at the edge, and the shape of the edge's steps.

An edge step is ``step(call, call_next) -> Awaitable[Reply]``, like a policy of the request
flow but over the ``Call`` (the aiohttp request and what the steps learned of it), since it
runs before there is an ``Exchange``: a step may refuse (raise), fill in the call, or wrap the
reply the rest of the steps return.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.flow.exchange import Exchange, Reply
    from gateway.runtime import Runtime


class Surface(Protocol):
    """What a call knows of its surface (``gateway.edge.surfaces.Surface``)."""

    name: str  # the access log's "route"
    handler: EdgeHandler

    def dialect_of(self, raw_path: str) -> str: ...


class Call:
    __slots__ = ("request", "rt", "surface", "request_id", "started", "tenant", "ex", "inflight")

    def __init__(self, request: web.Request, rt: Runtime, surface: Surface, request_id: str, started: float) -> None:
        self.request = request
        self.rt = rt  # the runtime of the config the request started under (a reload does not change it)
        self.surface = surface
        self.request_id = request_id
        self.started = started  # monotonic
        self.tenant: str | None = None  # the authenticated tenant's name
        self.ex: Exchange | None = None  # the parsed request
        self.inflight: str | None = None  # the target counted in flight for it

    def elapsed_ms(self, now: float) -> float:
        return (now - self.started) * 1000


EdgeHandler = Callable[[Call], Awaitable["Reply"]]
EdgeStep = Callable[[Call, EdgeHandler], Awaitable["Reply"]]


def compose(steps: Sequence[EdgeStep], innermost: EdgeHandler) -> EdgeHandler:
    handler = innermost
    for step in reversed(steps):
        handler = _bind(step, handler)
    return handler


def _bind(step: EdgeStep, call_next: EdgeHandler) -> EdgeHandler:
    def bound(call: Call) -> Awaitable[Reply]:
        return step(call, call_next)
    return bound
