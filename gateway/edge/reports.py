"""The gateway's own reports on the ``/v1`` surface: its model catalog and a user's usage.

Fixed routes (``gateway.app``), answered in the OpenAI dialect; the caller is authenticated
as on the proxied paths, and a tenant sees only its own. The answers are ``ModelList`` and
``UserUsage`` of ``gateway.edge.answers``.
"""

from __future__ import annotations

import datetime

import msgspec
from aiohttp import web

from gateway.edge import catalog
from gateway.edge.answers import ModelList, UserUsage
from gateway.edge.ids import request_id as request_id_of
from gateway.edge.writer import error_response
from gateway.errors import GatewayError, InvalidRequest
from gateway.flow.exchange import OPENAI
from gateway.headers import X_REQUEST_ID
from gateway.keys import RUNTIME
from policies.usage import summary as usage_summary


async def models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: the gateway's own catalog (``gateway.edge.catalog``), in the OpenAI dialect."""
    rt = request.app[RUNTIME].current
    request_id = request_id_of(request.headers)
    try:
        tenant = rt.tenants.authenticate(request.headers)
    except GatewayError as e:
        return error_response(e, OPENAI, request_id)
    if rt.catalog is None:
        rt.catalog = catalog.build(rt)
    answer = ModelList("list", catalog.visible(rt.catalog, tenant))
    return web.Response(body=msgspec.json.encode(answer), content_type="application/json",
                        headers={X_REQUEST_ID: request_id})


def since_day(since: str | None) -> str | None:
    """A report's ``?since=``: a real date as YYYY-MM-DD (present but empty, 2026-02-30 or 20260102 are 400s)."""
    if since is None:
        return None
    try:
        day = datetime.date.fromisoformat(since)
    except ValueError:
        day = None
    if day is None or len(since) != 10:  # (fromisoformat also takes 20240102)
        raise InvalidRequest("since: expected a date, YYYY-MM-DD", param="since")
    return day.isoformat()


async def user_usage(request: web.Request) -> web.StreamResponse:
    """GET /v1/usage/{user_id} (the "LLM Gateway API" seed): a user's usage by day and in total.
    With tenants, a tenant sees only its own users."""
    rt = request.app[RUNTIME].current
    request_id = request_id_of(request.headers)
    try:
        tenant = rt.tenants.authenticate(request.headers)
        since = since_day(request.query.get("since"))
        await rt.usage_book_flush()
        found = await usage_summary(rt.store, tenant=tenant.name if tenant else None,
                                    user=request.match_info["user_id"], since_day=since.replace("-", "") if since else None)
    except GatewayError as e:
        return error_response(e, OPENAI, request_id)
    answer = msgspec.convert({**found, "user_id": request.match_info["user_id"]}, UserUsage)
    return web.Response(body=msgspec.json.encode(answer), content_type="application/json",
                        headers={X_REQUEST_ID: request_id})
