"""Completion notifications over Redis pub/sub: one connection per store, many waiters.

Request coalescing parks every duplicate request on a channel until the first one
finishes. A connection per waiter would exhaust Redis under a burst of duplicates,
so a ``ChannelHub`` holds ONE pub/sub connection (the store's own RESP code, the same
URL reading as its commands), subscribes each channel on the server once however many
local waiters share it, and fans the messages out to their ``Subscription`` queues as
they are read.

``subscribe`` returns only after the server confirmed the SUBSCRIBE — only then is a
publish made after it returns guaranteed to arrive — so "subscribe, check the key,
wait" cannot miss a completion that lands between the check and the wait.

When the connection breaks the hub reconnects at once (to wherever the store's router says:
Sentinel's new primary, another Cluster node) and subscribes every channel again, and every
waiter gets ``None`` ("re-check the key: a message may have been lost"); when Redis cannot
be reached, every waiter gets the ``StoreError`` at once and the hub keeps trying. On a Cluster, plain PUBLISH reaches the subscribers
of every node, so one connection to any node hears every channel (docs/OPERATIONS.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from gateway.store.base import StoreError, Subscription
from gateway.store.resp import Endpoint, ProtocolError, ReplyError, encode, handshake, reader

_CONFIRM_TIMEOUT_S = 2.0  # a SUBSCRIBE unconfirmed by then means the connection is stuck
_REPAIR_PAUSE_S = 0.25  # between reconnect attempts of a broken pub/sub connection
_PING_EVERY_S = 15.0  # an idle connection is probed this often: a peer gone silently is noticed


class _Channel:
    """Local waiters sharing one server-side subscription. ``ready`` resolves to None
    once the server confirmed SUBSCRIBE, or to the StoreError that prevented it."""

    def __init__(self, ready: asyncio.Future[StoreError | None]) -> None:
        self.ready = ready
        self.subs: set[Subscription] = set()

    @property
    def failed(self) -> bool:
        return self.ready.done() and self.ready.result() is not None


class _PubSubProtocol(asyncio.Protocol):
    """Reads replies and pushes; before subscribe mode (AUTH, SELECT) replies go to ``waiting``."""

    def __init__(self, hub: ChannelHub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.reader = reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        read = self.reader
        read.feed(data)
        try:
            while (value := read.gets()) is not False:
                if self.waiting:
                    fut = self.waiting.popleft()
                    if not fut.done():
                        (fut.set_exception if isinstance(value, ReplyError) else fut.set_result)(value)
                elif isinstance(value, list) and len(value) >= 2:
                    self.hub._push(self, value)
        except ProtocolError as e:
            self.close(ConnectionError(f"Redis protocol error: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"pub/sub connection to Redis lost: {exc or 'closed by the server'}"))

    def close(self, error: Exception) -> None:
        if self.lost:
            return
        self.lost = True
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(error)
        if self.transport is not None:
            self.transport.close()
        self.hub._lost(self, error)

    def send(self, *args: Any) -> None:
        assert self.transport is not None
        self.transport.write(encode(args))


class ChannelHub:
    """Multiplexes a store's channels over one lazily opened pub/sub connection.

    ``anchor`` is a channel subscribed for the connection's whole life, so the connection is in
    subscribe mode from the start and its confirmation says the connection works.
    """

    def __init__(
        self, locate: Callable[[], Awaitable[Endpoint]], *, anchor: str, connect_timeout_s: float,
        error: Callable[[str, BaseException], StoreError],
    ) -> None:
        self._locate, self._anchor, self._error = locate, anchor, error
        self._connect_timeout_s = connect_timeout_s
        self._proto: _PubSubProtocol | None = None
        self._connecting: asyncio.Future[_PubSubProtocol] | None = None
        self._repair: asyncio.Task[None] | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._closing = False
        self._channels: dict[str, _Channel] = {}
        # Futures awaiting the server's SUBSCRIBE confirmation, in send order per channel.
        self._pending: dict[str, deque[asyncio.Future[StoreError | None]]] = {}

    @asynccontextmanager
    async def subscribe(self, name: str) -> AsyncIterator[Subscription]:
        sub = Subscription()
        entry = self._channels.get(name)
        fresh = entry is None or entry.failed
        if fresh:
            old = entry
            entry = self._channels[name] = _Channel(asyncio.get_running_loop().create_future())
            if old is not None:
                entry.subs = old.subs  # their waiters keep hearing the channel
        assert entry is not None
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
                proto = self._proto
                if proto is not None and not proto.lost:
                    proto.send("UNSUBSCRIBE", name)  # a lost one only leaves messages the hub drops

    async def close(self) -> None:
        self._closing = True
        if self._repair is not None:
            self._repair.cancel()
            with suppress(asyncio.CancelledError):
                await self._repair
        if self._connecting is not None:
            self._connecting.cancel()
        if self._pinger is not None:
            self._pinger.cancel()
        if self._proto is not None:
            self._proto.close(ConnectionError("closed"))
            self._proto = None

    async def _send_subscribe(self, name: str, ready: asyncio.Future[StoreError | None]) -> None:
        try:
            proto = await self._connection()
        except StoreError as exc:
            if not ready.done():  # (a failed connection may have answered every waiting channel already)
                ready.set_result(exc)
            return
        self._pending.setdefault(name, deque()).append(ready)  # before sending: confirmations come in order
        proto.send("SUBSCRIBE", name)

    async def _connection(self) -> _PubSubProtocol:
        if self._proto is not None and not self._proto.lost:
            return self._proto
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except (OSError, ReplyError, UnicodeError) as exc:  # UnicodeError: a host name the resolver cannot encode
            raise self._error("subscribe", exc) from None
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _connect(self) -> _PubSubProtocol:
        loop = asyncio.get_running_loop()
        proto: _PubSubProtocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                ep = await self._locate()
                if ep.path is not None:
                    _, proto = await loop.create_unix_connection(lambda: _PubSubProtocol(self), ep.path)
                else:
                    _, proto = await loop.create_connection(lambda: _PubSubProtocol(self), ep.host, ep.port,
                                                            ssl=ep.ssl)
                await handshake(proto, ep, _request)
                ready = loop.create_future()
                self._pending.setdefault(self._anchor, deque()).appendleft(ready)
                # the anchor last: its confirmation comes after every channel's
                proto.send("SUBSCRIBE", *(c for c in self._channels if c != self._anchor), self._anchor)
                await ready
        except BaseException:
            if proto is not None:
                proto.close(ConnectionError("connect failed"))
            raise
        self._proto = proto
        self._schedule_ping(proto)
        return proto

    def _schedule_ping(self, proto: _PubSubProtocol) -> None:
        def ping() -> None:
            if proto.lost or self._closing:
                return
            proto.send("PING")
            self._pinger = asyncio.get_running_loop().call_later(_PING_EVERY_S, ping)

        self._pinger = asyncio.get_running_loop().call_later(_PING_EVERY_S, ping)

    def _push(self, proto: _PubSubProtocol, value: list[Any]) -> None:
        kind = value[0]
        name = value[1].decode() if isinstance(value[1], bytes) else ""
        if kind == b"message":
            entry = self._channels.get(name)
            for sub in entry.subs if entry else ():
                sub.deliver(value[2])
        elif kind == b"subscribe" and (pending := self._pending.get(name)):
            ready = pending.popleft()
            if not pending:
                del self._pending[name]
            if not ready.done():
                ready.set_result(None)

    def _lost(self, proto: _PubSubProtocol, error: Exception) -> None:
        if self._proto is not proto and self._proto is not None:
            return
        self._proto = None
        if self._pinger is not None:
            self._pinger.cancel()
        self._pending.clear()  # the channels are subscribed again as the connection is repaired
        failure = self._error("pub/sub", error)
        if self._closing or not self._channels:
            self._fail_waiters(failure)
        elif self._repair is None or self._repair.done():
            self._repair = asyncio.get_running_loop().create_task(self._repair_loop(failure),
                                                                  name="reliapi-store-pubsub")

    def _fail_waiters(self, failure: StoreError) -> None:
        for entry in self._channels.values():
            if not entry.ready.done():
                entry.ready.set_result(failure)
            for sub in entry.subs:
                sub.deliver(StoreError(failure.message))

    async def _repair_loop(self, failure: StoreError) -> None:
        """Reconnect at once (a killed connection is back before anyone notices); when that fails, every
        waiter gets the error now and the hub keeps trying while anyone waits. Once it is back, every
        waiter re-checks its key (``None``): a message may have been lost meanwhile."""
        reported = False
        while not self._closing and self._channels:
            try:
                await self._connection()
            except StoreError:
                if not reported:
                    self._fail_waiters(failure)
                    reported = True
                await asyncio.sleep(_REPAIR_PAUSE_S)
                continue
            for entry in self._channels.values():  # every channel was subscribed with the connection
                if entry.failed:
                    entry.ready = asyncio.get_running_loop().create_future()
                if not entry.ready.done():
                    entry.ready.set_result(None)
                for sub in entry.subs:
                    sub.deliver(None)
            return


async def _request(proto: _PubSubProtocol, args: tuple[Any, ...]) -> Any:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    proto.waiting.append(fut)
    proto.send(*args)
    return await fut


async def stop(task: asyncio.Task[None], grace_s: float = 2.0) -> None:
    """Cancel ``task`` and wait for it — but not forever: a library that turns a cancellation into a
    timeout it retries must not hang a shutdown."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:
        pass  # already reported by the task itself
