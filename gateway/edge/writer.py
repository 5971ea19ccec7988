"""The one place that turns the gateway's results into aiohttp responses.

``error_response`` renders a ``GatewayError`` in the client's dialect (SPEC §3).
``write_reply`` sends a complete ``Reply`` at once, or relays a streaming one chunk
by chunk as it arrives. Once the first byte is out there is no envelope any more:
an upstream cut or stall becomes an in-band error event in the client's dialect
(SSE), or an aborted connection (other bodies) — never a truncated stream that
looks complete. A client that stops reading a stream for ``server.write_timeout_s``
is cut off; only a write that may have to wait for it is timed, so most start no timer.
The error bodies are msgspec Structs: ``gateway.edge.openapi`` describes them from the same classes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import msgspec
from aiohttp import HttpVersion11 as HTTP11
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import GatewayError, InternalError, StreamBroken
from gateway.flow.exchange import ANTHROPIC, ENVELOPE, OPENAI, Exchange, Reply
from gateway.headers import is_event_stream
from gateway.keys import RUNTIME
from providers import anthropic, openai, responses

log = logging.getLogger("reliapi")
_encode = msgspec.json.encode

_OPENAI_TYPES = openai.ERROR_TYPES
_ANTHROPIC_TYPES = anthropic.ERROR_TYPES


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_error, server_error, …
    code: str | None
    param: str | None  # the request field at fault, when one is


class OpenAIError(msgspec.Struct):
    """An error in OpenAI's dialect, as OpenAI's SDKs parse it (``/v1`` surfaces)."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(msgspec.Struct):
    type: str  # invalid_request_error, authentication_error, rate_limit_error, api_error, …
    message: str


class AnthropicError(msgspec.Struct):
    """An error in Anthropic's dialect (``/v1/messages``, ``/v1/messages/count_tokens``)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class EnvelopeErrorDetail(msgspec.Struct):
    type: str  # the coarse class: client_error, upstream_error, budget_error, internal_error
    code: str  # the exact error (SPEC §3): invalid_request, unknown_target, rate_limited, …
    message: str  # what went wrong; names the field at fault for a bad request
    retryable: bool  # whether the same request sent again later may succeed
    target: str | None
    status_code: int  # the upstream's status when it refused, else the gateway's
    errors: list[str] | msgspec.UnsetType = msgspec.UNSET  # POST /admin/reload: every problem of the new config


class ErrorMeta(msgspec.Struct):
    request_id: str
    target: str | None
    retries: int
    duration_ms: float


class EnvelopeError(msgspec.Struct):
    """An error of the gateway's own surfaces (``/proxy/*``, ``/t/*``, ``/admin/*``): SPEC §3."""

    success: Literal[False]
    error: EnvelopeErrorDetail
    meta: ErrorMeta


ErrorBody = OpenAIError | AnthropicError | EnvelopeError


def error_body(err: GatewayError, dialect: str, request_id: str, *, target: str | None, attempts: int,
               duration_ms: float) -> ErrorBody:
    if dialect == OPENAI:
        return OpenAIError(OpenAIErrorDetail(err.message, _OPENAI_TYPES.get(err.status, "server_error"), err.code,
                                             err.param))
    if dialect == ANTHROPIC:
        return AnthropicError("error", AnthropicErrorDetail(_ANTHROPIC_TYPES.get(err.status, "api_error"), err.message))
    target = err.target or target
    return EnvelopeError(
        False,
        EnvelopeErrorDetail(err.type, err.code, err.message, err.retryable, target, err.upstream_status or err.status),
        ErrorMeta(request_id, target, max(0, attempts - 1), round(duration_ms, 1)),
    )


def error_response(
    err: GatewayError, dialect: str, request_id: str, *, target: str | None = None, attempts: int = 0,
    duration_ms: float = 0.0,
) -> web.Response:
    headers = CIMultiDict(err.headers)
    headers["X-Request-Id"] = request_id
    if target:  # (routed: a proxied request's answer, the gateway's own too, says where it went and how often)
        headers["X-ReliAPI-Target"] = target
        headers["X-ReliAPI-Attempts"] = str(attempts)
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(err.retry_after + 0.999)))
    body = error_body(err, dialect, request_id, target=target, attempts=attempts, duration_ms=duration_ms)
    return web.Response(status=err.status, body=_encode(body), headers=headers, content_type="application/json")


def stream_error_event(err: GatewayError, dialect: str, request_id: str, *, sequence_number: int | None = None) -> bytes:
    """The in-band SSE event that ends a broken stream, in the client's dialect (``sequence_number``: the
    event's in a Responses API stream, whose own ``error`` event it then is)."""
    if sequence_number is not None and dialect == OPENAI:
        return responses.error_event(err.code, err.message, sequence_number)
    if dialect == ANTHROPIC:
        anthropic_body = AnthropicError("error", AnthropicErrorDetail("api_error", err.message))
        return b"event: error\ndata: " + _encode(anthropic_body) + b"\n\n"
    if dialect == OPENAI:
        return b"data: " + _encode(OpenAIError(OpenAIErrorDetail(err.message, "server_error", err.code, None))) + b"\n\n"
    body = error_body(err, ENVELOPE, request_id, target=err.target, attempts=0, duration_ms=0.0)
    return b"event: error\ndata: " + _encode(body) + b"\n\n"


class StreamOutcome:
    """How a relayed stream ended, for the access log."""

    __slots__ = ("ok", "error", "client_gone")

    def __init__(self) -> None:
        self.ok = False
        self.error: GatewayError | None = None
        self.client_gone = False


def check_sendable(headers: CIMultiDict[str]) -> None:
    """Raise ValueError for a header aiohttp would refuse to send (a line break: only a bug in the
    gateway makes one; an upstream's are refused by the parser). Checked before anything is written,
    because a response that fails to start leaves the connection's writer unusable for the error."""
    joined = "".join([*headers.values(), *headers])  # (one join of a list made in C: ≈ 2 k instructions less)
    if "\n" in joined or "\r" in joined:
        raise ValueError("a reply header holds a line break")


def complete_response(reply: Reply, outcome: StreamOutcome) -> web.Response:
    """A complete Reply as one response (no coroutine: this is most requests)."""
    outcome.ok = True
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)


async def write_reply(request: web.Request, ex: Exchange, reply: Reply, outcome: StreamOutcome) -> web.StreamResponse:
    if reply.chunks is None:
        return complete_response(reply, outcome)
    resp = web.StreamResponse(status=reply.status, headers=reply.headers)
    if request.app[RUNTIME].stopping or request.version < HTTP11:
        # draining for shutdown; or an HTTP/1.0 client, which has no chunked framing: the end of a stream is the
        # end of the connection (kept alive, it waited for the keep-alive timeout to see the stream was over)
        resp.force_close()
    is_sse = is_event_stream(reply.headers)
    transport = request.transport
    high = _high_water(transport)
    chunk = b""  # the last one sent: a Responses error event follows its sequence number
    try:
        await resp.prepare(request)
        async for chunk in reply.chunks:
            if transport is not None and transport.get_write_buffer_size() + len(chunk) > high:
                await _write_waiting(request, resp, chunk)  # this write may wait for the client: timed
            else:
                await resp.write(chunk)
    except StreamBroken as e:
        outcome.error = e
        if not is_sse:
            _abort(request)  # the client sees an incomplete body, not a complete-looking one
            return resp
        try:
            if not e.reported:  # else the upstream's own error event, relayed, already ends it
                await _write_waiting(request, resp, _in_band(e, ex, reply, chunk))
        except ConnectionError:
            outcome.client_gone = True
            return resp
    except asyncio.CancelledError:
        outcome.client_gone = True  # the upstream side is closed below, at once
        raise
    except ConnectionError:
        outcome.client_gone = True
        return resp
    except Exception:  # a bug while relaying: logged once, and the client told in-band, never a silent cut
        if not resp.prepared:
            raise  # nothing sent yet: the handler answers with a 500 error (and logs it)
        log.exception("internal error while streaming", extra={"fields": {"request_id": ex.request_id}})
        err = InternalError("internal error while streaming the answer")
        outcome.error = err
        if not is_sse:
            _abort(request)
            return resp
        try:
            await _write_waiting(request, resp, _in_band(err, ex, reply, chunk))
        except ConnectionError:
            outcome.client_gone = True
            return resp
    finally:
        await reply.aclose()
    try:
        if transport is not None and transport.get_write_buffer_size() > high:
            await _write_waiting(request, resp, None)
        else:
            await resp.write_eof()
    except ConnectionError:
        outcome.client_gone = True
        return resp
    outcome.ok = outcome.error is None
    return resp


def _in_band(err: GatewayError, ex: Exchange, reply: Reply, last: bytes) -> bytes:
    """The event that ends a broken stream: a Responses API stream's is numbered after the last event sent
    (its reader's count, else the last chunk's: a translated or replayed stream)."""
    sequence = None
    if ex.endpoint.dialect == "responses":
        sequence = responses.next_sequence(reply.reader, last)
    return stream_error_event(err, ex.dialect, ex.request_id, sequence_number=sequence)


_HIGH_WATER = 64 * 1024  # asyncio's default, for a transport that does not say


def _high_water(transport: asyncio.Transport | None) -> int:
    """Above this many unsent bytes the transport stops taking writes: only then can a write wait."""
    try:
        return transport.get_write_buffer_limits()[1] if transport is not None else _HIGH_WATER
    except (AttributeError, NotImplementedError):
        return _HIGH_WATER


async def _write_waiting(request: web.Request, resp: web.StreamResponse, data: bytes | None) -> None:
    """A write (``None``: the end) that may wait for a client reading slowly: one that reads
    nothing for ``server.write_timeout_s`` is cut off, as if it had gone (it holds a
    connection, a handler and the upstream stream)."""
    timeout = request.app[RUNTIME].current.config.server.write_timeout_s
    try:
        async with asyncio.timeout(timeout):
            await (resp.write_eof() if data is None else resp.write(data))
    except TimeoutError:
        _abort(request)
        raise ConnectionResetError(f"the client read nothing for {timeout:g} s") from None


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
