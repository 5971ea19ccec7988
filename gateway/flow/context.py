"""What a policy factory is given: the runtime's shared services, read-only.

A factory (``policies.*.policy``) reads its own config from ``config`` and the services it
needs from here, and *returns* what it owns (a circuit, a key pool, a book to flush and
close); ``gateway.flow.build`` registers those with the runtime. No factory writes into the
context or reads another policy's state through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.config.model import Config
    from gateway.flow.tenants import Tenants
    from gateway.observe.events import Events
    from gateway.state.shared import SharedState
    from gateway.store import Store
    from gateway.upstream.targets import Target
    from providers.pricing import PriceTable


class Context:
    __slots__ = ("config", "clock", "events", "store", "shared", "background", "prices", "tenants", "targets")

    def __init__(
        self, *, config: Config, clock: Clock, events: Events, store: Store, shared: SharedState,
        background: set[asyncio.Task[Any]], prices: PriceTable, tenants: Tenants, targets: Mapping[str, Target],
    ) -> None:
        self.config = config
        self.clock = clock
        self.events = events
        self.store = store
        self.shared = shared  # state instances agree on through the store (circuits, cooling keys)
        self.background = background  # work that outlives its request (a coalesced leader): drained on close
        self.prices = prices
        self.tenants = tenants
        self.targets = targets
