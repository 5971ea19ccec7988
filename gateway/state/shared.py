"""State several gateway instances must agree on — an open circuit, a cooling key — through the store.

The request path never reads the store for this: each instance keeps the state in memory
and decides locally. What changes is written to the store and announced on one channel;
every instance (one subscription per runtime, however many targets) applies what the
others announce. When a message may have been lost (the subscription reconnected, or a
quiet minute passed) each listener re-reads its records (``resync``), and does so once at
start, so a new or reloaded instance sees a circuit another one opened.

A store that is down costs nothing but the sharing: instances keep deciding alone (each
still opens its own circuit), writes are dropped with one log line, and the subscription
comes back by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from gateway.store import Store, StoreError
from gateway.store.redis_pubsub import stop

log = logging.getLogger("reliapi")

CHANNEL = "shared-state"
RESYNC_EVERY_S = 60.0
_LOG_EVERY_S = 30.0

Handler = Callable[[dict[str, Any]], None]
Resync = Callable[[], Awaitable[None]]


class SharedState:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.instance = os.urandom(6).hex()  # per runtime: a message from ourselves is ignored
        self._handlers: dict[str, Handler] = {}
        self._resyncs: list[Resync] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._pending: set[asyncio.Task[Any]] = set()
        self._logged_at = -_LOG_EVERY_S

    def on(self, kind: str, handler: Handler, resync: Resync) -> None:
        """Call ``handler(message)`` for messages of ``kind`` from other instances; ``resync``
        re-reads the store when messages may have been missed."""
        self._handlers[kind] = handler
        self._resyncs.append(resync)

    def publish(self, kind: str, message: dict[str, Any]) -> None:
        """Announce a change to the other instances (in the background: never delays a request)."""
        data = msgspec.json.encode({**message, "kind": kind, "from": self.instance})
        self.spawn(self.store.publish(CHANNEL, data), f"announce {kind}")

    def spawn(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        """Run a store write in the background; a failure is logged (at most every 30 s), not raised."""
        task = asyncio.ensure_future(self._guard(work, what))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def idle(self) -> None:
        """Until the background writes spawned so far are done (tests; shutdown waits in ``close``)."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    async def _guard(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            await work
        except StoreError as e:
            self._log_store_error(what, e)

    def _log_store_error(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("shared state: %s failed, deciding locally: %s", what, e)

    async def start(self) -> None:
        if self._handlers and self._task is None:
            try:  # before the first request: a reloaded runtime must not start with its circuits closed
                await self._resync()
            except StoreError as e:
                self._log_store_error("resync", e)
            except Exception:  # as in _run: a bug here must not stop the gateway from starting
                log.exception("shared state resync failed")
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await stop(self._task)
            self._task = None
        if self._pending:  # let the last announcements go out (a transition during shutdown)
            await asyncio.wait(list(self._pending), timeout=1.0)

    async def _run(self) -> None:
        delay = 0.5
        while not self._closing:  # (a store error a cancellation was turned into must not keep it looping)
            try:
                async with self.store.subscribe(CHANNEL) as sub:
                    await self._resync()
                    delay = 0.5
                    while not self._closing:
                        message = await sub.get(RESYNC_EVERY_S)
                        if message is None:
                            await self._resync()
                        else:
                            self._dispatch(message)
            except StoreError as e:
                self._log_store_error("subscription", e)
            except Exception:  # a bug here must not end sharing for the life of the process
                log.exception("shared state listener failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _resync(self) -> None:
        for resync in self._resyncs:
            await resync()

    def _dispatch(self, raw: bytes) -> None:
        try:
            message = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return
        if not isinstance(message, dict) or message.get("from") == self.instance:
            return
        handler = self._handlers.get(message.get("kind", ""))
        if handler is not None:
            try:
                handler(message)
            except Exception:
                log.exception("shared state message handler failed")
