"""What a leader (``gateway.state.lead.Lead``) needs of the flights it belongs to (``gateway.state.flights.Flights``):
a protocol of its own, so that neither module imports the other for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.store import Store


class Flights(Protocol):
    """What a leader needs of its ``gateway.state.flights.Flights``."""

    store: Store
    namespace: str
    tasks: set[asyncio.Task[Any]]
    local: dict[str, Any]  # key → its ``gateway.state.lead.Lead``

    def now(self) -> float: ...

    def spawn(self, work: Awaitable[Any]) -> None: ...

    def keep_trying(self, attempt: Callable[[], Awaitable[Any]], within_s: float) -> None: ...

    def watch(self, lead: Any) -> None: ...
