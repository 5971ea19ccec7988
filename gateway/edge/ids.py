"""Request ids: the client's ``X-Request-Id`` when it is sane, else a new one."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from gateway.headers import X_REQUEST_ID

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# A random per-process prefix and a counter: unique without a syscall per request.
_ids = itertools.count(1)
_id_prefix = "req_" + os.urandom(6).hex()


def _new_id_prefix() -> None:  # forked workers must not repeat each other's ids
    global _id_prefix
    _id_prefix = "req_" + os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


def request_id(headers: Mapping[str, str], span_id: str | None = None,
               refused: Callable[[str], bool] | None = None) -> str:
    """The client's id (letters, digits, ``._:-``, at most 128; not one ``refused`` names — a configured key) or a new
    one: ``req_<span_id>`` when the request has a span (its 64 random bits, already drawn: ``gateway.observe.trace``),
    else from a counter."""
    rid = headers.get(X_REQUEST_ID)
    if rid and _REQUEST_ID.fullmatch(rid) and (refused is None or not refused(rid)):
        return rid
    if span_id is not None:
        return "req_" + span_id
    return f"{_id_prefix}{next(_ids):010x}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def named(handler: Handler) -> Handler:
    """A fixed gateway endpoint's handler whose every answer carries ``X-Request-Id`` too (the client's, or a
    new one), as the proxied surfaces' answers do."""
    async def with_request_id(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if X_REQUEST_ID not in response.headers:
            response.headers[X_REQUEST_ID] = request_id(request.headers)
        return response
    return with_request_id
