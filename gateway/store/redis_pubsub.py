"""Completion notifications over Redis pub/sub: one connection per store, many waiters.

Request coalescing parks every duplicate request on a channel until the first one
finishes. A connection per waiter would exhaust Redis under a burst of duplicates,
so a ``ChannelHub`` holds ONE pub/sub connection, subscribes each channel on the
server once however many local waiters share it, and a single reader task fans
messages out to their ``Subscription`` queues.

``subscribe`` returns only after the server confirmed the SUBSCRIBE — only then is a
publish made after it returns guaranteed to arrive — so "subscribe, check the key,
wait" cannot miss a completion that lands between the check and the wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from gateway.store.base import StoreError, Subscription

_CONFIRM_TIMEOUT_S = 2.0  # a SUBSCRIBE unconfirmed by then means the connection is stuck
_POLL_S = 1.0  # the reader wakes this often so redis-py can run its connection health check
_REPAIR_PAUSE_S = 0.5  # between reconnect attempts of a broken pub/sub connection


class _Channel:
    """Local waiters sharing one server-side subscription. ``ready`` resolves to None
    once the server confirmed SUBSCRIBE, or to the StoreError that prevented it."""

    def __init__(self, ready: asyncio.Future[StoreError | None]) -> None:
        self.ready = ready
        self.subs: set[Subscription] = set()

    @property
    def failed(self) -> bool:
        return self.ready.done() and self.ready.result() is not None


class ChannelHub:
    """Multiplexes a store's channels over one lazily opened pub/sub connection.

    ``anchor`` is a channel subscribed for the hub's whole life: it keeps redis-py
    from health-checking (PING, then read the reply) inside later subscribe calls,
    which would race the reader task for replies; and its re-confirmation tells the
    reader that redis-py reconnected, so messages may have been lost.
    """

    def __init__(
        self, client: aioredis.Redis, *, anchor: str, error: Callable[[str, BaseException], StoreError]
    ) -> None:
        self._client, self._anchor, self._error = client, anchor, error
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_lock = asyncio.Lock()
        self._closing = False
        self._anchor_confirmations = 0
        self._channels: dict[str, _Channel] = {}
        # Futures awaiting the server's SUBSCRIBE confirmation, in send order per channel.
        self._pending: dict[str, deque[asyncio.Future[StoreError | None]]] = {}

    @asynccontextmanager
    async def subscribe(self, name: str) -> AsyncIterator[Subscription]:
        sub = Subscription()
        entry = self._channels.get(name)
        fresh = entry is None or entry.failed
        if fresh:
            entry = self._channels[name] = _Channel(asyncio.get_running_loop().create_future())
        entry.subs.add(sub)
        try:
            if fresh:
                await self._send_subscribe(name, entry.ready)
            try:
                error = await asyncio.wait_for(asyncio.shield(entry.ready), _CONFIRM_TIMEOUT_S)
            except TimeoutError as exc:
                raise self._error("subscribe", exc) from exc
            if error is not None:
                raise StoreError(error.message)
            yield sub
        finally:
            entry.subs.discard(sub)
            if not entry.subs and self._channels.get(name) is entry:
                del self._channels[name]
                await self._unsubscribe(name)

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            await stop(self._reader)
            self._reader = None
        if self._pubsub is not None:
            with suppress(RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None

    async def _send_subscribe(self, name: str, ready: asyncio.Future[StoreError | None]) -> None:
        try:
            pubsub = await self._ensure_reader()
        except StoreError as exc:
            ready.set_result(exc)
            return
        pending = self._pending.setdefault(name, deque())
        pending.append(ready)  # before sending: the reader may see the confirmation first
        try:
            await pubsub.subscribe(name)
        except (RedisError, OSError) as exc:
            with suppress(ValueError):
                pending.remove(ready)
            if not ready.done():
                ready.set_result(self._error("subscribe", exc))

    async def _unsubscribe(self, name: str) -> None:
        if self._pubsub is None:
            return
        # A failed UNSUBSCRIBE only leaves a server-side subscription whose messages the
        # reader drops; an outage itself is reported to waiters by the reader.
        with suppress(RedisError, OSError):
            await self._pubsub.unsubscribe(name)

    async def _ensure_reader(self) -> PubSub:
        async with self._reader_lock:
            if self._pubsub is None:
                pubsub = self._client.pubsub()
                try:
                    await pubsub.subscribe(self._anchor)
                except (RedisError, OSError) as exc:
                    await pubsub.aclose()
                    raise self._error("subscribe", exc) from exc
                self._pubsub = pubsub
                self._reader = asyncio.create_task(self._read_loop(pubsub), name="reliapi-store-pubsub")
            return self._pubsub

    async def _read_loop(self, pubsub: PubSub) -> None:
        while not self._closing:  # (also checked: a cancellation a client library swallows must not keep it alive)
            try:
                message = await pubsub.get_message(timeout=_POLL_S)
            except (RedisError, OSError) as exc:
                self._interrupt(self._error("pub/sub", exc))
                await asyncio.sleep(_REPAIR_PAUSE_S)  # redis-py reconnects and resubscribes on the next read
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict) -> None:
        name = message["channel"].decode()
        if message["type"] == "message":
            entry = self._channels.get(name)
            for sub in entry.subs if entry else ():
                sub.deliver(message["data"])
        elif message["type"] == "subscribe" and name == self._anchor:
            self._anchor_confirmations += 1
            if self._anchor_confirmations > 1:
                self._interrupt(None)
        elif message["type"] == "subscribe" and (pending := self._pending.get(name)):
            ready = pending.popleft()
            if not pending:
                del self._pending[name]
            if not ready.done():
                ready.set_result(None)

    def _interrupt(self, error: StoreError | None) -> None:
        """Messages may have been lost: wake every waiter now instead of at its timeout —
        with the error while Redis is unreachable, with None (re-check the key) once
        redis-py has reconnected and resubscribed every channel in one command."""
        if error is not None:
            for pending in self._pending.values():
                for ready in pending:
                    if not ready.done():
                        ready.set_result(error)
            self._pending.clear()
        for entry in self._channels.values():
            for sub in entry.subs:
                sub.deliver(None if error is None else StoreError(error.message))


async def stop(task: asyncio.Task[None], grace_s: float = 2.0) -> None:
    """Cancel ``task`` and wait for it — but not forever: a library that turns a cancellation into a
    timeout it retries (seen with redis-py's reads) must not hang a shutdown."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:
        pass  # already reported by the task itself
