"""The store seam: the one async interface every piece of shared state goes through.

Cache, idempotency (claim, fenced result write, coalescing), rate limit, circuit
state, budgets and usage all talk to a ``Store``; ``open_store(url)`` picks the
backend (``memory://`` for one process, ``redis://`` for many instances acting as
one). The contract lives here and in ``tests/test_store_contract.py``, which runs
against every backend; a policy never imports a backend.

Keys and channels are passed un-prefixed; a backend namespaces them
(``key_prefix + ":"`` on Redis). Failures of the backend surface as ``StoreError``
only — a ``StoreUnavailable`` (503, retryable) — so policies can decide whether to
degrade (cache, usage) or fail closed (idempotency, budgets) without knowing redis.

Time is wall-clock seconds (``time.time()`` / Redis ``TIME``) wherever a ``now`` is
accepted, so an injected clock and the Redis server clock mean the same thing.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

from gateway.errors import StoreUnavailable
from gateway.store.values import Claim, Take, TakeResult, Write, gcra_params, gcra_result, hash_tag, one_slot


class StoreError(StoreUnavailable):
    """The backend failed or is unreachable. The message never carries credentials. ``unsent``: the command
    never left (no connection could be made, or a stalled store was not asked): it was not applied, and sending
    it again later applies it once."""

    unsent = False


async def until_sent(attempt: Callable[[], Awaitable[Any]], within_s: float, *, pause_s: float = 0.2) -> Any:
    """``attempt()``, again while it fails without having reached the store (``StoreError.unsent``: a write
    that must not be lost — a budget's settlement), for at most ``within_s``. A failure after the command may
    have been applied is raised at once: sent twice it would count twice."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await attempt()
        except StoreError as e:
            if not e.unsent or time.monotonic() + pause_s > deadline:
                raise
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 5.0)


class StoreMisconfigured(StoreError):
    """The backend answered, but not as configured: a refused password or ACL user, a TLS certificate
    not trusted, a cluster URL on a node without cluster support. Waiting will not fix it."""


__all__ = ["Claim", "Store", "StoreError", "StoreMisconfigured", "Subscription", "Take", "TakeResult", "Write",
           "gcra_params", "gcra_result", "hash_tag", "one_slot", "until_sent"]


class Subscription:
    """Messages published on one channel after ``Store.subscribe`` returned.

    Besides messages, a backend may deliver a ``StoreError`` (the connection carrying
    the subscription broke) or ``None`` (it was re-established, messages may have been
    lost), so a waiter reacts at once rather than at its timeout.
    """

    def __init__(self) -> None:
        self._items: deque[bytes | StoreError | None] = deque()
        self._waiter: asyncio.Future[bytes | StoreError | None] | None = None

    def deliver(self, item: bytes | StoreError | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self._items.append(item)

    async def get(self, timeout_s: float) -> bytes | None:
        """The next message; None after ``timeout_s``, or earlier when one may have been lost.

        Timed with a plain timer rather than ``asyncio.timeout``: on Python 3.11 a cancellation that
        lands as the timeout expires can come out as the timeout, and a cancelled waiter that takes
        it for "no message yet" never stops (shutdown hung on one)."""
        if self._items:
            item = self._items.popleft()
        else:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                item = await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if isinstance(item, StoreError):
            raise item
        return item


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Store(abc.ABC):
    """A small async key-value store with the few atomic operations the policies need.

    Every method may raise ``StoreError``. Values are bytes; counters are stored as
    their decimal text (``get`` after ``incr`` returns e.g. ``b"3"``).
    """

    backend: ClassVar[str]  # "memory" or "redis", for /readyz and the status page
    # does ``claim_first`` cost one round trip? Where it does not (nothing is remote, or the keys live on different
    # Cluster nodes), each policy asks the store for itself rather than carry the others' claims (``gateway.state.ahead``)
    claims_together = False

    @property
    @abc.abstractmethod
    def url_for_display(self) -> str:
        """The store URL with any password masked — safe for logs and pages."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store ``value``; ``ttl_s=None`` means no expiry."""

    @abc.abstractmethod
    async def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Atomic claim: True if the key was absent and now holds ``value``."""

    @abc.abstractmethod
    async def claim(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        """``set_nx`` and, when the key is taken, its current value — in one atomic step
        (one round trip): None means the key is now ours."""

    async def claim_first(self, claims: list[Claim], takes: list[Take]) -> tuple[list[bytes | None], list[TakeResult] | None]:
        """``claim`` each of ``claims`` in order while the one before was free, then — when every one was —
        ``take_all(takes)``; a take refused gives this call's claims back (published ``released`` on the
        key, as a lead's release is). Returns what held each claim tried (None: ours now; only the last may
        be taken) and the takes' results (None when they were not tried). One atomic round trip where the
        backend can (``gateway.state.ahead``: a request's idempotency key, cache entry and quota at once);
        this default, one call each, is correct but not faster."""
        held: list[bytes | None] = []
        for c in claims:
            held.append(await self.claim(c.key, c.value, c.ttl_s))
            if held[-1] is not None:
                return held, None
        if not takes:
            return held, None
        taken = await self.take_all(takes)
        if not all(r.allowed for r in taken):
            for c in claims:
                await self.compare_and_delete(c.key, c.value, notify=c.key)
        return held, taken

    async def give_back(self, claims: list[Claim], takes: list[Take]) -> bool:
        """Undo a ``claim_first`` whose answer never came (it timed out, its caller left): it may have been
        applied after all — a stalled Redis runs what it read once it resumes. Each claim still there and ours is
        deleted (``released`` published); the takes are given back when the last claim was ours, since that is
        exactly when they were taken. Returns whether it was. This default gives back the claims only: it is
        for a backend whose ``claim_first`` sends nothing ahead of an answer (one call each)."""
        ours = False
        for c in claims:
            ours = await self.compare_and_delete(c.key, c.value, notify=c.key)
        return ours

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def compare_and_delete(self, key: str, expected: bytes, *, notify: str | None = None) -> bool:
        """Delete only if the current value is ``expected`` (lock release by its token holder).
        With ``notify``, a successful delete also publishes ``b"released"`` there, atomically."""

    @abc.abstractmethod
    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl_s: float | None, *, notify: str | None = None,
    ) -> bool:
        """Replace only if the current value is ``expected`` (a fenced write by the
        token holder); ``ttl_s`` applies to the new value as in ``set``. With ``notify``, a
        successful write also publishes ``b"done"`` there, atomically."""

    async def commit(self, writes: list[Write]) -> list[bool]:
        """Several (fenced) writes in one round trip: each applies on its own key, atomically, as its
        ``compare_and_set`` / ``compare_and_delete`` / ``set`` / ``delete`` would, whether or not the
        others do; returns whether each applied, in order. The answer writes of a request that leads
        more than one flight (``gateway.state.commit``). A backend sends them as one script where it
        can; this default, one call per write, is correct but not faster."""
        done = []
        for w in writes:
            if w.expected is None:
                await (self.delete(w.key) if w.value is None else self.set(w.key, w.value, w.ttl_s))
                if w.notify is not None:
                    await self.publish(w.notify, b"released" if w.value is None else b"done")
                done.append(True)
            elif w.value is None:
                done.append(await self.compare_and_delete(w.key, w.expected, notify=w.notify))
            else:
                done.append(await self.compare_and_set(w.key, w.expected, w.value, w.ttl_s, notify=w.notify))
        return done

    @abc.abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        """Add to an integer counter; ``ttl_s`` is set when the counter has no expiry
        yet (normally at its first increment), so a window counts from its first use."""

    @abc.abstractmethod
    async def incr_float(self, key: str, amount: float, ttl_s: float | None = None) -> float:
        """As ``incr`` for a float counter (spend in USD)."""

    @abc.abstractmethod
    async def hincr(self, key: str, field: str, amount: float, ttl_s: float | None = None) -> float:
        """Add to one float field of a hash (usage rows); ``ttl_s`` as in ``incr``."""

    @abc.abstractmethod
    async def hincr_many(self, key: str, amounts: dict[str, float], ttl_s: float | None = None) -> None:
        """``hincr`` of several fields at once, atomically (one usage row per request)."""

    @abc.abstractmethod
    async def reserve(self, keys: list[str], amount: float, limits: list[float], ttl_s: list[float]) -> int:
        """Add ``amount`` to every float counter in ``keys`` only if each stays within its
        limit, atomically (a spend reservation across day and month windows). Returns -1 when
        reserved, else the index of the first counter it would overrun (nothing is added).
        A counter's ``ttl_s`` is set at its first use, as in ``incr``. The keys share a hash tag
        (``one_slot``): ``spend:{tenant:acme}:d:20250101``."""

    @abc.abstractmethod
    async def hgetall(self, key: str) -> dict[str, float]:
        """All fields of a ``hincr`` hash; empty when the key is absent."""

    @abc.abstractmethod
    async def append(self, key: str, items: list[bytes], ttl_s: float, *, notify: str | None = None) -> int:
        """Add ``items`` to the end of the list at ``key`` and (re)set its expiry; returns the
        new length. With ``notify``, publish that length on the channel ``notify`` in the same
        atomic step, so a reader woken by it always finds the items (a stream's fan-out log)."""

    @abc.abstractmethod
    async def range(self, key: str, start: int = 0) -> list[bytes]:
        """The items of the list at ``key`` from index ``start`` on; empty when absent."""

    @abc.abstractmethod
    async def take(
        self, key: str, *, rate_per_s: float, burst: int, quantity: int = 1, now: float | None = None
    ) -> TakeResult:
        """GCRA rate limit, exactly redis-cell's ``CL.THROTTLE key burst rate 1 quantity``.

        ``burst`` is redis-cell's ``max_burst`` (nginx ``limit_req burst=``): how many
        requests beyond the steady one may arrive at once, so an idle key admits
        ``burst + 1`` requests immediately and then one every ``1 / rate_per_s`` s.
        With ``burst=4, rate_per_s=1``: five requests at t0 are allowed with remaining
        4..0, the sixth waits 1 s, and a quantity of 6 is never allowed
        (``retry_after_s == math.inf``). ``quantity=0`` only peeks and writes nothing.

        ``now`` (wall-clock seconds) is for tests; by default the backend's own clock
        decides — the Redis server's, so every instance agrees. Do not mix injected
        and real time on one key.
        """

    @abc.abstractmethod
    async def take_all(self, takes: list[Take], *, now: float | None = None) -> list[TakeResult]:
        """Several ``take`` s in one atomic step, all or nothing: when every one is allowed each is
        taken; when any is refused none is (nothing is written) — a request counted against its minute
        and its hour window, its tenant and its user, is counted against all of them or none. The
        results are in the order of ``takes``, each as ``take`` would report it on its own. The keys share a
        hash tag (``one_slot``): ``rl:{tenant:acme}``, ``rlh:{tenant:acme}``."""

    @abc.abstractmethod
    def scan_prefix(self, prefix: str) -> AsyncIterator[str]:
        """Un-prefixed keys starting with ``prefix``, in no particular order."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; returns how many were deleted."""

    @abc.abstractmethod
    async def publish(self, channel: str, message: bytes) -> None: ...

    @abc.abstractmethod
    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Listen on ``channel``. Messages published after entry are delivered, so

            async with store.subscribe(ch) as sub:
                if (done := await store.get(key)) is None:
                    done = await sub.get(timeout_s)

        cannot miss a publish that lands between the check and the wait. ``None`` means
        "nothing seen — re-check the key", like a condition variable's wakeup: it comes
        at the timeout, or early when a reconnect may have lost messages. So waiters
        loop (check key, wait for the rest of their deadline) until their own deadline.
        """

    async def wait(self, channel: str, timeout_s: float) -> bytes | None:
        """Subscribe, wait for one message, unsubscribe; None on timeout."""
        async with self.subscribe(channel) as sub:
            return await sub.get(timeout_s)

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise ``StoreError`` otherwise."""

    @abc.abstractmethod
    async def close(self) -> None: ...
