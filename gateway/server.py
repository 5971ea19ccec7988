"""The aiohttp runner the gateway serves with: malformed HTTP answered in the gateway's format.

aiohttp rejects a request it cannot parse (bad request line, over-long header,
Content-Length together with Transfer-Encoding) before any route runs, with a
plain-text 400 and an error-level log line with a stack trace. Here those become
the envelope error every other rejection uses, with 431 for over-long headers
(RFC 6585) and one log line without a stack: bad client input is not a gateway bug.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import LineTooLong

from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange import ENVELOPE
from gateway.handlers import _request_id
from gateway.headers import X_REQUEST_ID
from gateway.writer import error_body

log = logging.getLogger("reliapi")


class HeadersTooLarge(GatewayError):
    status, code, type = 431, "headers_too_large", "client_error"


class _RequestHandler(web_protocol.RequestHandler):
    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400:  # an unexpected failure inside aiohttp itself: keep its handling
            return super().handle_error(request, status, exc, message)
        err: GatewayError = (
            HeadersTooLarge("request header line too long") if isinstance(exc, LineTooLong)
            else InvalidRequest(f"malformed HTTP request: {_first_line(message)}")
        )
        try:
            request_id = _request_id(request)  # the client's, when its headers got that far and it is sane
        except Exception:
            request_id = _request_id(_NO_HEADERS)
        log.info("rejected malformed request from %s: %s", request.remote, err.message,
                 extra={"fields": {"request_id": request_id}})
        # aiohttp hands a request its parser refused over without its path: the gateway's own dialect
        body = error_body(err, ENVELOPE, request_id, target=None, attempts=0, duration_ms=0.0)
        resp = web.Response(status=err.status, body=msgspec.json.encode(body), content_type="application/json",
                            headers={X_REQUEST_ID: request_id})
        resp.force_close()
        return resp


class _NoHeaders:
    headers: dict[str, str] = {}


_NO_HEADERS: Any = _NoHeaders()


def _first_line(message: str | None) -> str:
    return (message or "bad request").strip().splitlines()[0][:200]


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use the handler above."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same object and state, one method overridden
        return server
