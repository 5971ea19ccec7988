"""Bulkhead (SPEC §5): at most ``max_concurrency`` requests in flight per target; the next gets 503 at once.

A request holds its slot through all its attempts and, for a stream, until the stream
ends — a long answer occupies the upstream as long as it runs. Overflow never queues
(a queue in front of a saturated upstream only adds latency) and is the gateway's own
rejection: it never counts against the circuit, and a fallback may take the request.
Counted per process, like Envoy's per-worker circuit-breaker thresholds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import Overloaded
from gateway.flow.exchange import Exchange, Reply
from gateway.observe.events import BulkheadRejected

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.upstream.targets import Target


class Bulkhead:
    __slots__ = ("limit", "active")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def release(self, _error: BaseException | None = None) -> None:
        self.active -= 1


def policy(ctx: Context, target: Target) -> Policy | None:
    limit = target.config.max_concurrency
    if limit is None:
        return None
    name, events = target.name, ctx.events
    slots = Bulkhead(limit)

    async def bulkhead(ex: Exchange, call_next: Handler) -> Reply:
        if slots.active >= limit:
            events.emit(BulkheadRejected(target=name, limit=limit))
            raise Overloaded(f"target {name} is at its max_concurrency ({limit})", target=name, retry_after=1)
        slots.active += 1
        try:
            reply = await call_next(ex)
        except BaseException:
            slots.active -= 1
            raise
        reply.on_close(slots.release)  # a stream keeps its slot until it ends
        return reply

    bulkhead.slots = slots  # type: ignore[attr-defined]
    return bulkhead
