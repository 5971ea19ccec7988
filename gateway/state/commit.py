"""One script for the answer writes of one request, however many flights it leads.

A request with an idempotency key that misses the cache leads two flights (``gateway.state.lead``):
its key's, and inside it (``policies.cache`` runs within ``policies.idempotency``) its cache entry's.
Each ends with a fenced write — the answer stored under its lock, or the lock released — that tells
its followers it is done. Both answers are ready at about the same moment, so rather than one script
each, the inner lead hands its writes to the enclosing one, which sends them all as one
``Store.commit``: one round trip, and each write still fenced on its own lock.

How they find each other: a lead runs its work in a task of its own, started inside its ``Writes.enter``,
so a lead started within that work (a task inherits the context) sees the enclosing one. A hand-off
never holds a write back for long: the inner lead waits at most ``HANDOFF_S`` for the enclosing one to
commit (its client may be reading a long answer slowly) and otherwise takes its writes back and sends
them itself; an enclosing lead that ends without committing gives them back at once.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar, Token
from typing import Any

from gateway.store import Store, StoreError, Write

HANDOFF_S = 0.25  # longest an inner lead's writes wait for the enclosing lead's commit

_ENCLOSING: ContextVar[Writes | None] = ContextVar("reliapi_enclosing_lead", default=None)

# writes handed over, and where their results go (None: not written, send them yourself)
Handed = tuple[list[Write], "asyncio.Future[list[bool] | None]"]


class Writes:
    """The final writes of one lead: sent alone, or with those of the leads nested in it, or handed
    to the lead it is nested in. Made when the lead starts to run."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.outer = _ENCLOSING.get()
        self.inner: list[Writes] = []  # nested leads that may hand writes over
        self.handed: list[Handed] = []  # what they handed over, not sent yet
        self.accepting = True  # takes hand-offs until it sends its own writes
        self.settling = False  # its work is over: its writes come next
        self.ready = asyncio.get_running_loop().create_future()  # done once it handed over or will not
        self._token: Token[Writes | None] | None = None
        if self.outer is not None and self.outer.accepting:
            self.outer.inner.append(self)

    def enter(self) -> Writes:
        """``with writes.enter():`` tasks started inside see this lead as their enclosing one. (A context
        manager of its own, not a ``@contextmanager`` generator: two per request lead two flights.)"""
        return self

    def __enter__(self) -> None:
        self._token = _ENCLOSING.set(self)

    def __exit__(self, *exc: object) -> None:
        _ENCLOSING.reset(self._token)
        self._token = None  # (the token holds the context that holds this: a cycle for the collector per lead)

    async def commit(self, writes: list[Write]) -> list[bool]:
        """Apply ``writes`` with those handed over by nested leads: through the enclosing lead while it
        takes them, else as one ``Store.commit``. Raises ``StoreError``."""
        for inner in self.inner:  # a nested lead whose work is over hands over in a moment: wait for it
            if inner.settling and not inner.ready.done():
                await _within(inner.ready, HANDOFF_S)
        self.accepting = False
        handed, self.handed = self.handed, []
        batch = writes + [w for ws, _ in handed for w in ws]
        try:
            results = await self._send(batch)
        except BaseException as e:
            for _, fut in handed:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, StoreError) else StoreError("the answer writes failed"))
            raise
        finally:
            self.close()
        at = len(writes)
        for ws, fut in handed:
            if not fut.done():
                fut.set_result(results[at:at + len(ws)])
            at += len(ws)
        return results[:len(writes)]

    async def _send(self, batch: list[Write]) -> list[bool]:
        outer = self.outer
        if outer is None or not outer.accepting:
            return await self.store.commit(batch)
        fut: asyncio.Future[list[bool] | None] = asyncio.get_running_loop().create_future()
        entry = (batch, fut)
        outer.handed.append(entry)
        self.ready.set_result(None)
        if await _within(fut, HANDOFF_S):
            results = fut.result()
        elif entry in outer.handed:  # not taken yet: take it back and send it alone
            outer.handed.remove(entry)
            return await self.store.commit(batch)
        else:
            results = await fut  # on its way with the enclosing lead's: wait for it
        return results if results is not None else await self.store.commit(batch)

    def close(self) -> None:
        """No more hand-offs: the lead has sent its writes, or ended without any. Writes handed over
        and not sent go back to their leads."""
        self.accepting = False
        if not self.ready.done():
            self.ready.set_result(None)
        self.outer = None  # (an inner lead and its enclosing one refer to each other: no cycle left for the collector)
        self.inner = []
        handed, self.handed = self.handed, []
        for _, fut in handed:
            if not fut.done():
                fut.set_result(None)


async def _within(fut: asyncio.Future[Any], timeout_s: float) -> bool:
    """Wait until ``fut`` is done (True) or ``timeout_s`` passed (False), without cancelling ``fut`` —
    ``wait_for(shield(fut))`` without its extra future, task-like bookkeeping and exception: this runs
    twice for every request that leads two flights."""
    if fut.done():
        return True
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    fut.add_done_callback(wake)
    timer = asyncio.get_running_loop().call_later(timeout_s, wake)
    try:
        await waiter  # (cancelling this wait cancels the waiter, never ``fut``)
    finally:
        timer.cancel()
        fut.remove_done_callback(wake)
    return fut.done()
