"""The single seam to upstream HTTP: ``Transport.send(...) -> Reply``.

One ``Transport`` per target owns that target's ``aiohttp.ClientSession`` and
connection pool, opened at startup and closed at shutdown. aiohttp's exceptions
stop here and become the gateway's own (``UpstreamTimeout``, ``UpstreamUnavailable``,
``StreamBroken``).

Honest streams (SPEC §5): for a streaming response, ``send`` returns only after
the upstream's first body byte arrived, so until then a slow first token or an
early failure can still be retried or fall back — the client has seen nothing.
"""

from __future__ import annotations

import asyncio
import errno
import math
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    Overloaded,
    ShuttingDown,
    StreamBroken,
    StreamCutAtShutdown,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.flow.reply import Reply
from gateway.headers import client_response_headers, is_event_stream
from gateway.upstream.deadlines import CUT_SEND, Deadlines, Ended, Late, Stalled

_STREAMED = ("text/event-stream", "application/x-ndjson")  # media types ignore case: "Text/Event-Stream" too

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))
_NO_CONTENT_TYPE = (hdrs.CONTENT_TYPE,)

# Complete responses larger than this are relayed as streams instead of buffered.
MAX_BUFFERED_BYTES = 1 << 20


def is_streaming(resp: aiohttp.ClientResponse, method: str) -> bool:
    """Relay chunk by chunk (never buffer, never compress): SSE, ndjson, unknown or large length."""
    if method == "HEAD" or resp.status in (204, 304):
        return False
    ctype = resp.headers.get(hdrs.CONTENT_TYPE, "")
    if ctype.startswith(_STREAMED) or (not ctype.islower() and ctype.lower().startswith(_STREAMED)):
        return True
    length = resp.headers.get(hdrs.CONTENT_LENGTH)
    return length is None or not length.isdigit() or int(length) > MAX_BUFFERED_BYTES


async def _read_first(resp: aiohttp.ClientResponse, method: str) -> tuple[bytes | None, bytes]:
    """A complete body (released to the pool), or ``(None, first chunk)`` of a stream."""
    if not is_streaming(resp, method):
        data = await resp.read()
        resp.release()
        return data, b""
    if resp.status >= 400 and not is_event_stream(resp.headers):
        # an error body of unknown length: read it whole (bounded) so it can be classified and retried
        buf = bytearray()
        while len(buf) <= MAX_BUFFERED_BYTES:
            chunk = await resp.content.readany()
            if not chunk:
                resp.release()
                return bytes(buf), b""
            buf += chunk
        return None, bytes(buf)
    return None, await resp.content.readany()


class Transport:
    def __init__(self, target: str, *, connect_timeout_s: float) -> None:
        self.target = target
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        # the attempts waiting in ``send`` and the streams being relayed, with one timer for all their deadlines
        # (``end_streams`` stops them all: aiohttp closing its session leaves a reader waiting for ever)
        self._deadlines = Deadlines()
        self.closing = False  # the shutdown's grace period is over: no new attempt

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies pass through byte for byte, Content-Encoding and all
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
            trust_env=False,
            requote_redirect_url=False,
        )
        # aiohttp re-sends an idempotent request once, silently, when its connection drops. Every
        # attempt must be the retry policy's to decide and count (budget, circuit, X-ReliAPI-Attempt),
        # so that is off; there is no public switch (aiohttp's own TestClient does the same).
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False

    def end_streams(self) -> None:
        """End every stream still relayed: each relay raises ``StreamCutAtShutdown`` at once, so its client gets
        the stream's in-band error event (the gateway stops). So does an attempt still waiting for its answer in a
        stream already relayed (a ``stream_recovery`` continuation); one whose request is being cancelled already
        (``Runtime.cut``: it is answered 503) is left to that."""
        self.closing = True
        self._deadlines.end()

    async def close(self) -> None:
        self.end_streams()  # (closing aiohttp's session alone would leave their readers waiting for ever)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        timeout_s: float,
        idle_timeout_s: float,
        stream: bool = False,
    ) -> Reply:
        """One attempt. Within ``timeout_s`` a complete response must arrive whole, or a
        streaming one its first body byte; after that a stream may never be silent longer
        than ``idle_timeout_s``. ``stream`` says the client asked for a stream."""
        assert self._session is not None, "transport not started"
        if self.closing:  # (a retry or a continuation after the shutdown's grace period: not sent)
            raise ShuttingDown()
        started = time.monotonic()
        resp: aiohttp.ClientResponse | None = None
        target_url = self._urls.get(url)
        if target_url is None:
            target_url = URL(url, encoded=True)
            if len(self._urls) < 1024:  # LLM traffic reuses a handful of URLs; build each once
                self._urls[url] = target_url
        task = asyncio.current_task()
        assert task is not None
        deadlines = self._deadlines
        deadlines.start(task, timeout_s)  # our deadline covers connect, headers and a complete body or the first byte
        try:
            resp = await self._session.request(
                method, target_url, headers=headers, data=body or None, allow_redirects=False,
                # aiohttp would label a request the client sent without a Content-Type "application/octet-stream"
                skip_auto_headers=_NO_CONTENT_TYPE if method in _BODY_METHODS and hdrs.CONTENT_TYPE not in headers
                else None,
            )
            data, first = await _read_first(resp, method)
            headers_out = client_response_headers(resp.headers)
            if method == "HEAD" and hdrs.CONTENT_LENGTH in resp.headers:  # the size of what a GET would get
                headers_out[hdrs.CONTENT_LENGTH] = resp.headers[hdrs.CONTENT_LENGTH]
            if data is not None:
                return Reply(resp.status, headers_out, body=data, upstream_status=resp.status)
            if stream:  # from the first byte on, only its silences are timed (``Deadlines.waiting``)
                deadline = math.inf
            else:  # a long body the client did not ask to stream: the attempt's deadline covers all of it
                deadline = asyncio.get_running_loop().time() + timeout_s - (time.monotonic() - started)
            reply = Reply(
                resp.status, headers_out,
                chunks=_relay(resp, first, idle_timeout_s, self.target, stream, deadlines, deadline),
                upstream_status=resp.status,
            )
            reply.head = first
            reply.ttft_ms = (time.monotonic() - started) * 1000
            return reply
        except aiohttp.ConnectionTimeoutError:
            _discard(resp)  # the TCP connection never came up: nothing was sent
            raise UpstreamUnavailable(
                f"target {self.target} is unreachable (connection timed out)", target=self.target, sent=False
            ) from None
        except TimeoutError:  # (none of aiohttp's timers but sock_connect runs; any other timeout is the upstream's)
            _discard(resp)
            raise UpstreamTimeout(f"target {self.target} did not answer in time", target=self.target) from None
        except (aiohttp.ClientError, OSError) as e:
            _discard(resp)
            if _out_of_descriptors(e):  # the gateway's own limit, not the upstream's failure: never a circuit count
                raise Overloaded(f"no file descriptor left for a connection to target {self.target}; retry shortly",
                                 retry_after=1.0, target=self.target) from None
            raise UpstreamUnavailable(
                f"target {self.target} is unreachable ({_describe(e)})", target=self.target,
                sent=not isinstance(e, aiohttp.ClientConnectorError),
            ) from None
        except asyncio.CancelledError as e:
            _discard(resp)  # cancelled (client gone): drop the upstream connection at once
            if deadlines.expired(task):  # our deadline: unless someone else cancelled this request too
                raise UpstreamTimeout(f"target {self.target} did not answer in time", target=self.target) from None
            if e.args != (CUT_SEND,):
                raise
            task.uncancel()
            raise ShuttingDown() from None  # (in a relayed stream: its recovery gives up, the stream ends in-band)
        except BaseException:
            _discard(resp)
            raise
        finally:
            deadlines.done(task)


async def _relay(
    resp: aiohttp.ClientResponse, first: bytes, idle_timeout_s: float, target: str, asked: bool,
    deadlines: Deadlines | None = None, deadline: float = math.inf,
) -> AsyncIterator[bytes]:
    """``asked``: the client asked for a stream, so only the idle timeout runs (a timeout is a stall); an unasked-for
    one is relayed within the attempt's ``deadline`` (loop time) alone."""
    finished = False
    wait = deadlines.add(resp, idle_timeout_s if asked else None, deadline) if deadlines is not None else None
    try:
        if first:
            yield first
        content = resp.content
        waiting = deadlines.waiting if deadlines is not None and asked else None
        while True:
            if waiting is not None:
                waiting(wait)  # type: ignore[arg-type]
            try:
                chunk = await content.readany()
            except (Stalled, TimeoutError):  # (a read timeout, whatever raised it, is a stall too)
                raise StreamBroken(f"upstream stream stalled for {idle_timeout_s:g}s", target=target, stalled=True) from None
            except Late:
                raise StreamBroken("upstream stream exceeded the attempt timeout", target=target) from None
            except Ended:
                raise StreamCutAtShutdown(target=target) from None
            except (aiohttp.ClientError, OSError) as e:
                raise StreamBroken(f"upstream stream was cut ({_describe(e)})", target=target) from None
            if wait is not None:
                wait.since = math.inf
            if not chunk:
                finished = True
                return
            yield chunk
    finally:
        if deadlines is not None:
            deadlines.open.pop(resp, None)
        if finished:
            resp.release()
        else:
            resp.close()


def _out_of_descriptors(e: BaseException) -> bool:
    error = e.os_error if isinstance(e, aiohttp.ClientConnectorError) else e
    return isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)


def _discard(resp: aiohttp.ClientResponse | None) -> None:
    if resp is not None:
        resp.close()


def _describe(e: BaseException) -> str:
    """A short reason without URLs or addresses (those stay in the debug log only)."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return "connection failed"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "incomplete response body"
    if isinstance(e, (aiohttp.ClientOSError, ConnectionResetError)):
        return "connection reset"
    if isinstance(e, aiohttp.ClientResponseError):
        return "malformed response"
    return type(e).__name__
