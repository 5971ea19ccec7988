"""The edge's steps before the request flow: the HTTP version, authentication, parsing.

Authentication comes before the body is read: an unknown caller costs no upload. Parsing
turns the request into an ``Exchange`` (a surface's parser: a validated path, a bounded
body, a chosen target), counts it in flight on its target and hands it to the request flow
(``gateway.flow``); a surface with a finisher gives the flow's reply its own shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway.edge.call import Call, EdgeHandler, EdgeStep
from gateway.errors import InvalidRequest, UnknownTarget

if TYPE_CHECKING:
    from gateway.flow.exchange import Exchange, Reply


def no_route(call: Call, call_next: EdgeHandler) -> Awaitable[Reply]:
    request = call.request
    raise UnknownTarget(f"no route for {request.method} {request.path}")


def from_http1(call: Call, call_next: EdgeHandler) -> Awaitable[Reply]:
    if call.request.version < (1, 0):  # HTTP/0.9 has no headers to carry a key, a type, a length
        raise InvalidRequest("HTTP/1.0 or newer is required")
    return call_next(call)


def authenticate(call: Call, call_next: EdgeHandler) -> Awaitable[Reply]:
    """The calling tenant (``policies.tenants``): a 401 for a missing or unknown key."""
    tenant = call.rt.tenants.authenticate(call.request.headers)
    if tenant is not None:
        call.tenant = tenant.name
    return call_next(call)


def parse_and_run(parser: Callable[[Call], Awaitable[Exchange]]) -> EdgeHandler:
    """The innermost edge step: the surface's ``Exchange``, counted in flight on its target, run
    through the request flow."""
    async def parse_and_run(call: Call) -> Reply:
        ex = call.ex = await parser(call)
        call.inflight = ex.target.name
        call.rt.observatory.enter(call.inflight)  # (left by the edge once the reply is written)
        return await call.rt.flow(ex)
    return parse_and_run


def finishing(finish: Callable[[Call, Reply], Awaitable[Reply]]) -> EdgeStep:
    """A step that hands the flow's reply to ``finish`` (an envelope surface's own answer shape)."""
    async def finishing(call: Call, call_next: EdgeHandler) -> Reply:
        return await finish(call, await call_next(call))
    return finishing
