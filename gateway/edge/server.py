"""The aiohttp runner the gateway serves with: malformed HTTP answered in the gateway's format,
slow and idle clients shed.

aiohttp rejects a request it cannot parse (bad request line, over-long header,
Content-Length together with Transfer-Encoding) before any route runs, with a
plain-text 400 and an error-level log line with a stack trace. Here those become
the envelope error every other rejection uses, with 431 for over-long headers
(RFC 6585) and one log line without a stack: bad client input is not a gateway bug.

A socket costs a file descriptor whatever it sends, so a client that sends nothing,
or a header byte now and then (slowloris), must not keep it for long:

- a request head (request line + headers) must be complete ``server.header_timeout_s``
  after accept — on a kept-alive connection, after its first byte. A partial head is
  answered 408 ``request_timeout``, a silent connection just closed;
- between requests aiohttp's keep-alive timer (``server.keepalive_timeout_s``) closes idle connections;
- beyond ``server.max_connections`` open connections a new one has its request head read
  (briefly), is answered 503 ``too_many_connections`` and closed: the open ones keep working,
  and held sockets can no longer lock every new client out by exhausting descriptors.

A request's body (``gateway.edge.body``) and a stream's writes (``gateway.edge.writer``) are timed
where they are read and written.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import sys
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from gateway.config.model import ServerConfig
from gateway.edge.ids import request_id as request_id_of
from gateway.edge.surfaces import surface_for
from gateway.edge.writer import error_body
from gateway.errors import GatewayError, InvalidRequest, RequestTimeout, TooManyConnections
from gateway.flow.exchange import ENVELOPE
from gateway.headers import X_REQUEST_ID
from gateway.keys import RUNTIME

log = logging.getLogger("reliapi")


class HeadersTooLarge(GatewayError):
    status, code, type = 431, "headers_too_large", "client_error"


# A connection over max_connections is answered after its request head, so that the client
# reads the 503 (closing a socket with unread bytes would reset it) — but only this long / this much,
# and only so many at once: beyond that it is closed at once, and the descriptors the cap leaves
# free stay free for upstream connections even under a flood of sockets that send nothing.
SHED_READ_S = 1.0
SHED_READ_BYTES = 8 * 1024
SHED_LOG_EVERY_S = 10.0  # a flood of refused connections is one warning per this, not one per socket


@dataclass(frozen=True, slots=True)
class Limits:
    """The listener settings of ``server:`` (fixed at start: a reload does not change them)."""

    header_timeout_s: float
    max_connections: int
    max_refusing: int  # connections over the cap being answered at one time (see SHED_READ_S)

    @classmethod
    def of(cls, server: ServerConfig) -> Limits:
        cap = server.max_connections or auto_max_connections()
        return cls(server.header_timeout_s, cap, max(4, min(cap // 8, 1024)))


RESERVED_FDS = 64  # the listening sockets, the store, logs, the helper process, a reload's second pools


def auto_max_connections() -> int:
    """Half of what the open-file soft limit leaves after ``RESERVED_FDS``: every client connection may
    need an upstream connection of its own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(16, (soft - RESERVED_FDS) // 2)


class _RequestHandler(web_protocol.RequestHandler):
    """One client connection (aiohttp's protocol), with the request head timed and the connection cap.

    The clock for a head starts at accept, or on a kept-alive connection at the first byte after the
    last request (and its body): bytes that arrive while a parsed request's body is still open
    are that body's, timed by whoever reads it. Every completed head stops the clock."""

    __slots__ = ("_limits", "_head_timer", "_head_started", "_last_body", "_shed", "_head_start")

    def __init__(self, manager: web_server.Server, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # bytes of the awaited request head have arrived
        self._last_body: StreamReader | None = None  # the body of the last request parsed
        self._shed: bytearray | None = None  # over the cap: the request head read so far
        self._head_start = b""  # the first bytes of the latest request head: its request line, for a refusal's dialect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._keepalive_handle is not None:  # until the first request, the head timer stands in for it
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        manager = self._manager
        assert isinstance(manager, _Server)
        if len(manager._connections) > self._limits.max_connections:
            if manager.refusing >= self._limits.max_refusing:
                self.force_close()
                return
            manager.refusing += 1
            self._shed = bytearray()
            self._head_timer = self._loop.call_later(SHED_READ_S, self._refuse)
            return
        self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._shed is not None:  # gone before it was answered
            self._shed = None
            self._manager.refusing -= 1  # type: ignore[union-attr]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._shed is not None:
            self._read_refused(data)
            return
        count = self._request_count
        # judged before these bytes are parsed: the ones that complete a body are that body's, not a new head's
        # (the clock started on them, and a client that had sent a whole request got a 408 it never asked for)
        between = not self._head_started and self._between_requests()
        if between:
            self._head_start = data[:512]
        super().data_received(data)
        if self._request_count != count:  # a head (or several, pipelined) is complete
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._head_started = False
            self._last_body = self._messages[-1][1] if self._messages else None
        elif data and between:
            self._start_head_clock()

    def idle(self) -> bool:
        """No request on this connection: none being answered, none queued, no head or body arriving."""
        return (self._current_request is None and not self._messages and not self._head_started
                and self._between_requests())

    def _between_requests(self) -> bool:
        body = self._last_body
        return (body is None or body.is_eof()) and not (self._close or self._force_close or self._upgraded)

    def _start_head_clock(self) -> None:
        self._head_started = True
        if self._head_timer is not None:  # a fresh connection: its clock runs from accept
            return
        self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_timed_out)
        if self._keepalive_handle is not None:  # no longer idle: the head timer rules until the head is read
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._close or self._force_close or self.transport is None:
            return
        waiter = self._waiter
        if waiter is None or waiter.done():  # still busy with a request (a pipelined head trickles in)
            self.close()  # the connection ends once that one is answered
            return
        if not self._head_started:  # not a byte: nobody to answer
            self.force_close()
            return
        # answered like a request the parser refused (handle_error below), then the connection closes
        message = f"the request head did not arrive within {self._limits.header_timeout_s:g} s"
        self._messages.append((web_protocol._ErrInfo(status=408, exc=TimeoutError(message), message=message),
                               EMPTY_PAYLOAD))
        waiter.set_result(None)
        self.close()  # no more bytes are parsed

    def _read_refused(self, data: bytes) -> None:
        head = self._shed
        assert head is not None
        start = max(0, len(head) - 3)
        head += data
        if len(head) >= SHED_READ_BYTES or head.find(b"\r\n\r\n", start) >= 0:
            self._refuse()

    def _refuse(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        manager = self._manager
        assert isinstance(manager, _Server) and self._shed is not None
        head, self._shed = bytes(self._shed), None
        manager.refusing -= 1
        if self._force_close or self.transport is None:
            return
        now = self._loop.time()
        if now - manager.refused_logged_at >= SHED_LOG_EVERY_S:
            manager.refused_logged_at = now
            log.warning("too many connections: %d open (server.max_connections %d); new ones get 503",
                        len(manager._connections) - 1, self._limits.max_connections)
        self.transport.write(_too_many_connections(head))
        self.force_close()  # after the write: asyncio sends what is buffered before closing

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        err: GatewayError
        if status == 408:  # _head_timed_out
            err = RequestTimeout(message or "request timeout")
        elif status == 400:
            err = (
                HeadersTooLarge("request header line too long") if isinstance(exc, LineTooLong)
                else HeadersTooLarge("too many request headers") if "Too many headers" in (message or "")
                else InvalidRequest(f"malformed HTTP request: {_first_line(message)}")
            )
        else:  # an unexpected failure inside aiohttp itself: keep its handling
            return super().handle_error(request, status, exc, message)
        try:
            request_id = request_id_of(request.headers)  # the client's, when its headers got that far and it is sane
        except Exception:
            request_id = request_id_of({})
        log.info("rejected %s request from %s: %s", "slow" if status == 408 else "malformed", request.remote,
                 err.message, extra={"fields": {"request_id": request_id}})
        # aiohttp hands a request its parser refused over without its path: the dialect its request line asks for
        body = error_body(err, _dialect_of(self._head_start), request_id, target=None, attempts=0, duration_ms=0.0)
        resp = web.Response(status=err.status, body=msgspec.json.encode(body), content_type="application/json",
                            headers={X_REQUEST_ID: request_id, "Connection": "close"})
        resp.force_close()
        return resp


_CLIENT_REQUEST_ID = re.compile(rb"\r\nx-request-id[ \t]*:[ \t]*([A-Za-z0-9._:\-]{1,128})[ \t]*\r\n", re.IGNORECASE)


def _first_line(message: str | None) -> str:
    return (message or "bad request").strip().splitlines()[0][:200]


def _dialect_of(head: bytes) -> str:
    """The error dialect a request line asks for (the envelope when there is none to read)."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(line) < 2 or not line[1].startswith("/"):
        return ENVELOPE
    return surface_for(line[0], line[1]).dialect_of(line[1])


def _too_many_connections(head: bytes) -> bytes:
    """The 503 for a connection over the cap, written straight to the socket (it never gets a
    request object), in the dialect its request line's path asks for."""
    dialect = _dialect_of(head)  # as the request would have been answered
    found = _CLIENT_REQUEST_ID.search(head)
    request_id = found.group(1).decode() if found else request_id_of({})
    err = TooManyConnections("the gateway has too many open connections; retry shortly", retry_after=1)
    body = msgspec.json.encode(error_body(err, dialect, request_id, target=None, attempts=0, duration_ms=0.0))
    return (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\n"
        f"{X_REQUEST_ID}: {request_id}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class _Server(web_server.Server):
    limits: Limits
    refusing = 0  # connections over the cap waiting for their 503
    refused_logged_at = float("-inf")

    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def close_idle(self) -> None:
        """Shutdown: close the connections no request is on. A busy one — a body still arriving included — goes
        on (its answer says ``Connection: close``); aiohttp's ``pre_shutdown`` would close it too, and a closed
        connection drops every byte that arrives after."""
        for conn in list(self._connections):
            if isinstance(conn, _RequestHandler) and conn.idle():
                conn.force_close()  # (``close`` alone leaves an idle connection's transport open on aiohttp 3.14)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use the handler above, with the listener limits of
    the config the app was built with."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same object and state, one method overridden
        server.limits = Limits.of(self.app[RUNTIME].current.config.server)  # type: ignore[attr-defined]
        return server
