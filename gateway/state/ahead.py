"""Claims sent ahead: a miss of the stateful pipeline asks the store once, not once per policy.

A request with an idempotency key, to a target that caches, from a tenant with a rate limit, asks the store three
times before its upstream is called — its key is claimed (``policies.idempotency``), then inside that flight its
cache entry (``policies.cache``), then its quota is taken (``policies.rate_limit``) — each a round trip that waits
for the one before: a turn of the event loop here and a script in Redis each time. The outermost of these policies
sends what the ones inside it will ask with its own claim, in one ``Store.claim_first`` (each claim only while the
one before it was free; the takes only when every claim was, and given back with the claims when one is refused),
and leaves the answers on the exchange (``Exchange.ahead``) for each policy to take up as if it had asked itself.
On Redis a miss makes two round trips (this one, and the answer writes) instead of four; a cache HIT and an
idempotent replay still make one, and take no quota (a claim that is held stops everything after it). Where it
would save no round trip — the memory store, or a Redis Cluster, whose keys live on different nodes — each policy
asks for itself, as before.

Only what is sure to be asked next goes ahead: the cache's join of its entry when nothing in the request changes
how the cache reads it (no ``Cache-Control`` / ``Pragma``, no budget refusal waiting for a stored answer), and the
rate limit's takes unless a policy between them could still refuse the request first (a tenant's limit on parallel
requests, ``policies.profiles``: a refusal there takes no quota). A cache claim sent ahead that its policy never
took up (the work stopped before it) is given back when the work ends.

The wiring is made once per flow (``gateway.flow.build``): each policy puts into the ``Plan`` how it would ask.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.store import Claim, Store, StoreError, Take

if TYPE_CHECKING:
    from gateway.flow.chain import Handler
    from gateway.flow.exchange import Exchange, Reply
    from gateway.state.flights import Entry, Flights, Lead

PASS = object()  # the cache has nothing to ask of the store for this request: what comes after it may go ahead
GIVEN_BACK = object()  # a claim sent ahead, given back because a take was refused: run without a flight

Found = Any  # Lead | Entry | bytes (what ``Flights.answer`` says), or GIVEN_BACK


class Plan:
    """How the policies inside an idempotency flight would ask the store, filled in as the flow is built. Nothing
    goes ahead on a store where that saves no round trip (``Store.claims_together``: memory, a Redis Cluster)."""

    def __init__(self, store: Store) -> None:
        self.active = store.claims_together
        # the cache's claim for a request (with its flights), PASS, or None: it asks in its own way, or not yet
        self.cache: Callable[[Exchange], tuple[Flights, Claim] | object | None] | None = None
        # the rate limit's takes for a request: (what it judges them by, the takes), or None: it takes nothing
        self.takes: Callable[[Exchange], tuple[Any, list[Take]] | None] | None = None
        self.parallel: frozenset[str] = frozenset()  # tenants a policy before the rate limit may still refuse

    def inside(self, ex: Exchange, *, cache: bool) -> Ahead | None:
        """What goes ahead of the policies inside the one asking (``cache``: the cache asks, so only the takes)."""
        ahead = Ahead()
        if not cache and self.cache is not None:
            asked = self.cache(ex)
            if asked is None:
                return None  # nothing past the cache goes ahead: it may answer in a way not known yet
            if asked is not PASS:
                ahead.cache_flights, ahead.cache = asked  # type: ignore[misc]
        if self.takes is not None and ex.tenant not in self.parallel:
            planned = self.takes(ex)
            if planned is not None:
                ahead.chosen, ahead.takes = planned
        return ahead if ahead.cache is not None or ahead.takes else None

    async def join(self, flights: Flights, key: str, fp: str, lock_ttl_s: float, ex: Exchange, *,
                   cache: bool = False) -> Lead | Entry | bytes | None:
        """``flights.join``, with the claims and takes of the policies inside sent along (``Exchange.ahead``).
        None: a take was refused and every claim given back — the request runs without a flight and the rate
        limit refuses it."""
        ahead = self.inside(ex, cache=cache) if self.active else None
        if ahead is None:
            return await flights.join(key, fp, lock_ttl_s)
        own = flights.ask(key, fp, lock_ttl_s)
        claims = [own] if ahead.cache is None else [own, ahead.cache]
        try:
            held, taken = await flights.store.claim_first(claims, ahead.takes)
        except (StoreError, asyncio.CancelledError):  # maybe applied (a stalled Redis runs it when it resumes):
            # the claims, and the takes with them, given back once the store answers — a request answered 503 or
            # abandoned must not keep its quota taken, nor its key and entry locked
            store = flights.store
            flights.keep_trying(lambda: store.give_back(claims, ahead.takes), lock_ttl_s, pause_s=0.5, wait_first=False)
            raise
        if held[0] is not None:  # a replay, or a flight to follow: nothing after it was asked
            return flights.answer(own, fp, held[0])
        ahead.taken = taken
        ex.ahead = ahead
        if taken is not None and not all(t.allowed for t in taken):
            ahead.found = GIVEN_BACK
            return None
        if ahead.cache is not None:
            ahead.found = ahead.cache_flights.answer(ahead.cache, "", held[1])
        return flights.answer(own, fp, None)


class Ahead:
    """One request's answers from the store to what was asked ahead, until each policy takes its own up."""

    __slots__ = ("cache", "cache_flights", "found", "chosen", "takes", "taken")

    def __init__(self) -> None:
        self.cache: Claim | None = None  # the cache's claim, sent ahead
        self.cache_flights: Any = None
        self.found: Found = None  # the answer to it: a Lead, Entry or lock (``Flights.answer``), or GIVEN_BACK
        self.chosen: Any = None  # what the rate limit judges its takes by (``policies.rate_limit``)
        self.takes: list[Take] = []
        self.taken: Any = None  # the takes' results (None: not tried, a claim was held)

    def cache_answer(self) -> Found:
        """The answer to the cache's claim (taken up once)."""
        self.cache = None
        found, self.found = self.found, None
        return found

    def leftover(self) -> None:
        """The work is over: a cache claim sent ahead and never taken up is given back (not left to expire,
        with every duplicate waiting on it)."""
        if self.cache is not None and self.found is not GIVEN_BACK:
            self.cache_flights.unclaim(self.cache)
            self.cache = None


async def within(ex: Exchange, call_next: Handler) -> Reply:
    """``call_next(ex)`` for a flight whose exchange has claims ahead: what was not taken up is given back after."""
    try:
        return await call_next(ex)
    finally:
        ahead = ex.ahead
        if ahead is not None:
            ahead.leftover()
