"""A small pipelined Redis client for the store's hot path (RESP2 over one connection).

Why not redis-py here: every command through redis.asyncio goes through a connection
pool, a retry wrapper, observability hooks and a ``wait_for`` per read — about 100 µs
of CPU per command, which made the store the most expensive thing in a request. The
gateway needs a handful of commands (GET/SET, EVALSHA of its own scripts, SCAN …), so
this client writes each command to one shared connection as soon as it is issued and
matches replies to callers in order (Redis answers in order on one connection), which
also pipelines concurrent requests for free. Measured (32 concurrent callers, one core): about
5-8 µs of CPU per GET or EVALSHA here, 45-50 µs through redis.asyncio even with hiredis
(docs/OPERATIONS.md "Redis topologies and failover").

Where to connect comes from ``gateway.store.url`` (one parser for commands and pub/sub, see
``gateway.store.redis_pubsub``); Sentinel and Cluster build on this client (``gateway.store.topology``).

Failures: a refused or broken connection raises ``ConnectionError`` (the store turns it into ``StoreError``) for
the commands in flight; the next command reconnects. A command unanswered after ``timeout_s`` closes the connection
(its state is unknown); so does a refused AUTH or SELECT, a TLS refusal (a certificate, the server's alert about
ours), or the wrong protocol on the port (``gateway.store.failures``; every message names the node) — and that
refusal is remembered for ``REFUSED_PAUSE_S``, so a wrong password is one clear error, not one per command.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import hiredis

from gateway.store import failures
from gateway.store.failures import Refused, Stalled, Unlocated, reason, tls_refusal, unechoed
from gateway.store.url import StoreURL, address, parse_store_url

REFUSED_PAUSE_S = 2.0  # a refused AUTH is answered from memory this long: one clear error, not a socket per command


class ReplyError(Exception):
    """Redis answered with an error (``-ERR …``)."""


class ProtocolError(ConnectionError):
    """Bytes that are not RESP: the connection cannot be trusted any more."""


# Commands are packed, and replies parsed, by hiredis (C): in Python these two were a third of the
# store client's CPU (``encode`` alone ≈ 0.6 µs per argument; a miss sends ≈ 40). Same bytes out
# (floats as ``repr``), same values in: bytes, int, None, lists, and a ``ReplyError`` for ``-ERR …``.
encode: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


def reader() -> hiredis.Reader:
    """A parser for one connection's replies: ``feed`` bytes, then ``gets()`` until it returns False."""
    return hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)


class _Protocol(asyncio.Protocol):
    """One connection: commands go out in order and their replies come back in order; ``waiting``
    holds the callers' futures, ``due`` the loop time by which each reply must have come.

    One watchdog timer per connection checks the oldest command's deadline (re-armed for the next one)
    instead of a timer per command: a uvloop timer made and cancelled per command cost more CPU than
    the command's bytes. A reply late for any command means the connection is stuck: it is failed."""

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.due: deque[float] = deque()
        self.watchdog: asyncio.TimerHandle | None = None
        self.lost = False
        self.answered = False  # a reply came (a closed connection that never answered: maybe the wrong protocol)
        self.diagnosis: asyncio.Future[Refused | None] | None = None  # then one probe for all its waiting commands
        self.error: Exception | None = None  # why it was lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = Batched(transport)  # type: ignore[assignment]

    def send(self, args: tuple[Any, ...], timeout_s: float) -> asyncio.Future[Any]:
        """Send one command; its reply (or the connection's failure) resolves the future."""
        data = encode(args)  # first: a command that cannot be packed must not leave a caller queued for a reply
        fut = self.loop.create_future()
        if self.lost:  # (nothing would answer it, and the watchdog no longer looks)
            fut.set_exception(self.error or ConnectionError(f"connection to {self.client.who} lost"))
            return fut
        self.waiting.append(fut)
        self.due.append(self.loop.time() + timeout_s)
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(timeout_s, self._check)
        assert self.transport is not None
        self.transport.write(data)
        return fut

    def _check(self) -> None:
        self.watchdog = None
        if self.lost or not self.due:
            return
        if self.due[0] <= self.loop.time():  # its reply never came: the connection's state is unknown
            client = self.client
            self.fail(Stalled(f"{client.who} did not answer within {client.timeout_s:g}s"))
        else:  # the oldest command still waiting is a later one: check it when it is due
            self.watchdog = self.loop.call_at(self.due[0], self._check)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        read = self.reader
        read.feed(data)
        waiting, due = self.waiting, self.due
        try:
            while (value := read.gets()) is not False:
                if not waiting:
                    raise ProtocolError("a reply nobody asked for")
                fut = waiting.popleft()
                due.popleft()
                if not fut.done():
                    if isinstance(value, ReplyError):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
        except ProtocolError as e:
            self.fail(ConnectionError(f"Redis protocol error: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        who = self.client.who
        refused = tls_refusal(exc, who) if isinstance(exc, ssl.SSLError) else None  # TLS 1.3: its alert comes after
        self.fail(refused or ConnectionError(f"connection to {who} lost: {reason(exc) if exc else 'closed by the server'}"))

    def fail(self, error: Exception) -> None:
        self.lost = True
        self.error = self.error or error
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.due.clear()
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(error)
        if self.transport is not None:
            self.transport.close()
        self.client._lost(self)


@dataclass(frozen=True)
class Endpoint:
    """Where one connection goes and how it introduces itself (from ``gateway.store.url``)."""

    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix socket
    ssl: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    @property
    def where(self) -> str:
        return self.path or address(self.host, self.port)

    @classmethod
    def of(cls, url: StoreURL, node: tuple[str, int] | None = None) -> Endpoint:
        host, port = node or (url.nodes[0] if url.nodes else (None, None))
        return cls(host=None if url.path else host, port=None if url.path else port, path=url.path,
                   ssl=url.tls.context if url.tls else None, username=url.username, password=url.password, db=url.db)


Locate = Callable[[], Awaitable[Endpoint]]


class Batched:
    """A transport whose writes within one turn of the event loop go out as one ``send``.

    Concurrent requests each issue their commands in the same loop turn (32 clients: dozens at
    once); written one by one, every command is a syscall here and a wakeup and a read in Redis —
    on a loaded machine that cost more than the commands themselves. Batched, Redis reads them in
    one go and answers them in one write (what ioredis calls auto-pipelining). The order of the
    commands, and so of the replies, is kept."""

    __slots__ = ("transport", "pending", "_loop")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self.pending:
            self._loop.call_soon(self.flush)
        self.pending.append(data)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending and not self.transport.is_closing():
            self.transport.write(b"".join(pending))

    def close(self) -> None:
        self.pending = []
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class RespClient:
    """One pipelined connection to one Redis node: ``target`` is a store URL, an ``Endpoint``, or an
    async ``locate()`` asked for the endpoint at every (re)connect — Sentinel's current primary. With
    ``primary_only`` a node that says it is a replica (ROLE) is refused, and a READONLY reply drops the
    connection, so the next command finds the primary again."""

    def __init__(self, target: str | Endpoint | Locate, *, connect_timeout_s: float, timeout_s: float,
                 primary_only: bool = False, label: str = "Redis at {at}",
                 on_connect: Callable[[Callable[..., Awaitable[Any]], Any, RespClient], Awaitable[None]] | None = None,
                 single_node: bool = False) -> None:
        if isinstance(target, str):
            target = Endpoint.of(parse_store_url(target))
        self.endpoint: Endpoint | None = target if isinstance(target, Endpoint) else None
        self._locate: Locate | None = None if isinstance(target, Endpoint) else target
        self.primary_only = primary_only
        self.single_node = single_node  # a redis:// URL's node: a replica's or a Cluster node's refusals are a misconfiguration
        self.on_connect = on_connect  # (send, proto, client): more to ask of a new connection after AUTH and SELECT
        self.label = label  # how messages name it: "Redis at {at}", "sentinel at {at}" … ({at}: host:port)
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._refused: tuple[float, ConnectionError] | None = None  # (until, why): a refused AUTH, remembered

    # what the connection is made from (for a located client: the last endpoint found)
    host = property(lambda self: self.endpoint and self.endpoint.host)
    port = property(lambda self: self.endpoint and self.endpoint.port)
    path = property(lambda self: self.endpoint and self.endpoint.path)
    db = property(lambda self: self.endpoint.db if self.endpoint else 0)
    username = property(lambda self: self.endpoint and self.endpoint.username)
    password = property(lambda self: self.endpoint and self.endpoint.password)
    ssl = property(lambda self: self.endpoint and self.endpoint.ssl)

    who = property(lambda self: self.label.format(at=self.endpoint.where if self.endpoint else "(not located yet)"))

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._locate is not None:
                    self.endpoint = await self._locate()
                ep = self.endpoint
                assert ep is not None
                if ep.path is not None:
                    transport, proto = await loop.create_unix_connection(lambda: _Protocol(self), ep.path)
                else:
                    transport, proto = await loop.create_connection(
                        lambda: _Protocol(self), ep.host, ep.port, ssl=ep.ssl,
                    )
                await handshake(proto, ep, self._send)
                if self.on_connect is not None:
                    await self.on_connect(self._send, proto, self)
                if self.primary_only:
                    role = await self._send(proto, ("ROLE",))
                    if role[0] != b"master":
                        raise ConnectionError(f"{self.who} is a replica, not the primary (a failover is under way)")
                if proto.lost:  # closed before anything was asked of it: a TLS 1.3 server's alert comes so
                    raise proto.error or ConnectionError(f"connection to {self.who} lost")
        except BaseException as e:  # timeout, cancel, a replica, a refusal: nobody will use or close it
            if transport is not None:
                transport.close()
            refused = (Refused(f"{self.who} refused the connection: {unechoed(e)}") if isinstance(e, ReplyError)
                       else tls_refusal(e, self.who) if isinstance(e, ssl.SSLError)
                       else e if isinstance(e, Refused) else None)
            ep = self.endpoint
            if refused is None and isinstance(e, TimeoutError) and transport is None and ep and ep.ssl and ep.host:
                refused = await failures.wrong_protocol(ep.host, ep.port or 0, tls=True, who=self.who)  # no TLS answer
            if refused is None and isinstance(e, TimeoutError) and transport is not None:  # connected, then silence
                raise Stalled(f"{self.who} did not answer within {self.connect_timeout_s:g}s") from None
            if refused is None:
                raise
            self._refused = (time.monotonic() + REFUSED_PAUSE_S, refused)  # the same answer for a while, without
            raise refused from None                                          # a connection each
        self._refused = None
        return proto

    async def _protocol(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._refused is not None and time.monotonic() < self._refused[0]:
            raise self._refused[1]
        if self._connecting is None:  # one connect for every caller waiting on it
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            proto = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            hint = " (does the server speak TLS on this port?)" if self.ssl else ""
            raise Stalled(f"{self.who} did not accept a connection within {self.connect_timeout_s:g}s{hint}") from None
        except (Refused, Stalled, Unlocated):  # each says what is wrong better than a wrapper could
            raise
        except ssl.SSLError as e:  # a TLS failure of no known kind: as before, not something a retry fixes
            raise Refused(f"TLS with {self.who} failed: {e}") from None
        except (OSError, UnicodeError) as e:  # UnicodeError: a host name the resolver cannot encode
            raise ConnectionError(f"cannot connect to {self.who}: {reason(e)}") from None
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        if proto.lost:  # between its connect and this caller's turn
            raise proto.error or ConnectionError(f"connection to {self.who} lost")
        self._proto = proto
        return proto

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        try:
            return await proto.send(args, self.timeout_s)
        except ReplyError as e:
            if self.primary_only and str(e).startswith("READONLY"):  # demoted under us: find the primary again
                proto.fail(ConnectionError(f"the primary became a replica: {e}"))
            elif self.single_node and str(e).startswith(("READONLY", "MOVED", "ASK ", "CLUSTERDOWN")):
                # a replica or a Cluster node after all (an ACL user without ROLE could not be told at connect):
                # said once, as the refusal it is — /readyz, --check — not command by command
                kind = "a read-only replica" if str(e).startswith("READONLY") else "a Redis Cluster node"
                refused = Refused(f"{self.who} is {kind}: point the URL at the primary, or use redis+sentinel:// or "
                                  f"redis+cluster:// (it answered: {unechoed(e)})")
                self._refused = (time.monotonic() + REFUSED_PAUSE_S, refused)
                proto.fail(refused)
                raise refused from None
            raise
        except ConnectionError as e:  # closed before any answer: why (TLS-only port, our certificate refused),
            ep = self.endpoint        # found out once for the connection and remembered a while
            if type(e) is not ConnectionError or proto.answered or not ep or not ep.host:
                raise
            if proto.diagnosis is None:
                proto.diagnosis = asyncio.ensure_future(failures.closed_early(ep.host, ep.port or 0, ep.ssl, who=self.who))
            refused = await asyncio.shield(proto.diagnosis)
            if refused is None:
                raise
            self._refused = (time.monotonic() + REFUSED_PAUSE_S, refused)
            raise refused from None

    async def execute(self, *args: Any) -> Any:
        proto = self._proto
        if proto is None or proto.lost:  # (connected, the usual case, costs no coroutine of its own)
            try:
                proto = await self._protocol()
            except OSError as e:
                e.unsent = True  # type: ignore[attr-defined]  # no connection: the command never left
                raise
        return await self._send(proto, args)

    async def execute_asking(self, *args: Any) -> Any:
        """ASKING then the command, back to back on one connection (a Cluster slot being migrated)."""
        proto = await self._protocol()
        asking = proto.send(("ASKING",), self.timeout_s)  # written now, so before the command (a task would not be)
        asking.add_done_callback(lambda f: f.cancelled() or f.exception())  # (its failure is the command's too)
        return await self._send(proto, args)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        proto = self._proto
        self._proto = None
        if proto is not None and proto.transport is not None:
            proto.transport.close()


async def handshake(proto: Any, ep: Endpoint, send: Callable[[Any, tuple[Any, ...]], Awaitable[Any]]) -> None:
    """AUTH (as redis-py sends it) and SELECT on a new connection."""
    if ep.username or ep.password:
        user = (ep.username,) if ep.username else ()
        await send(proto, ("AUTH", *user, ep.password or ""))
    if ep.db:
        await send(proto, ("SELECT", ep.db))

