"""A small pipelined Redis client for the store's hot path (RESP2 over one connection).

Why not redis-py here: every command through redis.asyncio goes through a connection
pool, a retry wrapper, observability hooks and a ``wait_for`` per read — about 100 µs
of CPU per command, which made the store the most expensive thing in a request. The
gateway needs a handful of commands (GET/SET, EVALSHA of its own scripts, SCAN …), so
this client writes each command to one shared connection as soon as it is issued and
matches replies to callers in order (Redis answers in order on one connection), which
also pipelines concurrent requests for free. Pub/sub stays on redis-py
(``gateway.store.redis_pubsub``).

The URL is read by redis-py's own parser (the connection it would open for it), so the
commands here and redis-py's pub/sub always reach the same server, database and user.

Failures: a refused or broken connection raises ``ConnectionError`` (the store turns it
into ``StoreError``) for the commands in flight; the next command reconnects. A command
unanswered after ``timeout_s`` closes the connection (its state is unknown); so does a
refused AUTH or SELECT.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

from redis.asyncio.connection import ConnectionPool, SSLConnection, UnixDomainSocketConnection


class Stalled(ConnectionError):
    """Redis took the whole timeout without answering (or accepting): it may be stalled, not gone."""


class ReplyError(Exception):
    """Redis answered with an error (``-ERR …``)."""


class _Incomplete(Exception):
    pass


_INCOMPLETE = _Incomplete()


def encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply from ``buf`` at ``pos``: (value, next position); raises _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _INCOMPLETE
    kind = buf[pos]
    line = bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == 0x2B:  # +simple
        return line, pos
    if kind == 0x3A:  # :integer
        return int(line), pos
    if kind == 0x24:  # $bulk
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _INCOMPLETE
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == 0x2A:  # *array
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2D:  # -error
        return ReplyError(line.decode(errors="replace")), pos
    raise ConnectionError(f"unexpected reply byte {kind!r} from Redis")


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        waiting = self.waiting
        try:
            while pos < len(buf):
                value, pos = parse(buf, pos)
                if not waiting:
                    raise ConnectionError("a reply nobody asked for")
                fut = waiting.popleft()
                if not fut.done():
                    if isinstance(value, ReplyError):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
        except _Incomplete:
            pass
        except (ConnectionError, ValueError) as e:
            self.fail(ConnectionError(f"Redis protocol error: {e}"))
            return
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def fail(self, error: Exception) -> None:
        self.lost = True
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(error)
        if self.transport is not None:
            self.transport.close()
        self.client._lost(self)


class RespClient:
    """One pipelined connection to the Redis at ``url`` (redis://, rediss://, unix://)."""

    def __init__(self, url: str, *, connect_timeout_s: float, timeout_s: float) -> None:
        # what redis-py makes of the URL (a connection object, never connected): one parser for both clients
        conn = ConnectionPool.from_url(url).make_connection()
        self.path: str | None = conn.path if isinstance(conn, UnixDomainSocketConnection) else None
        self.host: str | None = getattr(conn, "host", None)
        self.port: int | None = getattr(conn, "port", None)
        self.db = int(conn.db)
        self.username: str | None = conn.username
        self.password: str | None = conn.password
        self.ssl: ssl.SSLContext | None = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    transport, proto = await loop.create_unix_connection(lambda: _Protocol(self), self.path)
                else:
                    transport, proto = await loop.create_connection(
                        lambda: _Protocol(self), self.host, self.port, ssl=self.ssl,
                    )
                if self.username or self.password:  # as redis-py sends it
                    user = (self.username,) if self.username else ()
                    await self._send(proto, ("AUTH", *user, self.password or ""))
                if self.db:
                    await self._send(proto, ("SELECT", self.db))
        except BaseException:  # refused AUTH or SELECT, timeout, cancel: nobody will use or close it
            if transport is not None:
                transport.close()
            raise
        return proto

    async def _protocol(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._connecting is None:  # one connect for every caller waiting on it
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            proto = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            raise Stalled(f"Redis did not accept a connection within {self.connect_timeout_s:g}s") from None
        except OSError as e:
            raise ConnectionError(f"cannot connect to Redis: {e}") from None
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._proto = proto
        return proto

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiting.append(fut)
        assert proto.transport is not None
        proto.transport.write(encode(args))
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, proto, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _expire(self, proto: _Protocol, fut: asyncio.Future[Any]) -> None:
        if not fut.done():  # its reply never came: the connection's state is unknown
            proto.fail(Stalled(f"Redis did not answer within {self.timeout_s:g}s"))

    async def execute(self, *args: Any) -> Any:
        return await self._send(await self._protocol(), args)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        proto = self._proto
        self._proto = None
        if proto is not None and proto.transport is not None:
            proto.transport.close()


class Script:
    """A Lua script run by its SHA1; loaded on first use (and again after a Redis restart)."""

    def __init__(self, client: RespClient, text: str) -> None:
        import hashlib

        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA1

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except ReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self.client.execute("EVAL", self.text, len(keys), *keys, *args)
