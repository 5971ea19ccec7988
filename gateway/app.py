"""The composition root: ``create_app(config)`` builds everything the gateway serves with.

Routes, the runtime (targets with their connection pools, router, pipeline,
store, logs) and its lifetime, all in one place. Tests drive exactly this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import HttpVersion11, hdrs, web

from gateway.clock import Clock
from gateway.config.model import Config, ServerConfig
from gateway.edge import admin, cors, docs, openapi, operator, probes, reports
from gateway.edge.ids import named
from gateway.edge.serve import serve
from gateway.errors import GatewayError
from gateway.keys import OBSERVATORY, RELOADER, RUNTIME, Reloader
from gateway.observe import metrics, otel
from gateway.observe import page as status_page
from gateway.observe.counters import Observatory
from gateway.observe.events import Events
from gateway.runtime import Runtime, RuntimeSlot
from gateway.store import Store

log = logging.getLogger("reliapi")


def handler_args(server: ServerConfig) -> dict[str, Any]:
    """aiohttp server settings every way of running the app shares (tests, CLI, workers): fixed when
    the app is built, so a reload does not change them (see ``gateway.edge.server`` for the rest)."""
    return {
        "handler_cancellation": True,  # a client that disconnects cancels its upstream request at once
        "auto_decompress": False,  # request bodies are forwarded exactly as sent
        "access_log": None,  # the gateway writes its own JSON access log
        "keepalive_timeout": server.keepalive_timeout_s,  # aiohttp's own default is an hour
    }


def create_app(
    config: Config,
    *,
    env: Mapping[str, str] = os.environ,
    access_log_write: Callable[[str], Any] | None = None,
    store: Store | None = None,
    clock: Clock | None = None,
    reload: Reloader | None = None,
) -> web.Application:
    """``reload`` reads the config again (``cli.resolve_config``): SIGHUP and ``POST /admin/reload``."""
    events = Events()
    observatory = Observatory(clock.time if clock is not None else time.time)
    observatory.listen(events)
    spans = otel.open_export(config.tracing, env)  # None unless spans are exported (OTEL_EXPORTER_OTLP_*)
    if spans is not None:
        events.subscribe(spans.on_event)  # retries, circuit changes, fallbacks …: events on the request's span
    runtime = Runtime(config, env=env, access_log_write=access_log_write, store=store, clock=clock,
                      events=events, observatory=observatory, spans=spans)
    app = web.Application(client_max_size=runtime.max_body, handler_args=handler_args(config.server))
    app[RUNTIME] = RuntimeSlot(runtime)
    app[OBSERVATORY] = observatory
    app[metrics.EXPOSITION] = metrics.Exposition()
    app[RELOADER] = reload
    app.cleanup_ctx.append(_runtime_lifetime)
    for path in ("/healthz", "/livez", "/health"):
        app.router.add_get(path, named(probes.liveness))
    app.router.add_get("/readyz", named(probes.readiness))
    app.router.add_get("/metrics", named(metrics.metrics))
    status_page.add_routes(app, wrap=named)
    openapi.add_routes(app)  # GET /openapi.json: every path the gateway answers itself (built here, once)
    docs.add_routes(app)  # GET /docs: that document rendered, with no file from anywhere else
    for resource in app.router.resources():  # any other method on these: a 405, never the proxy's catch-all
        resource.add_route("*", operator.get_only)
    admin.add_routes(app)
    # the /v1 paths the gateway answers itself (any other method: 405, never the proxy's catch-all below)
    operator.add_routes(app, fixed=(("GET", "/v1/models", reports.models),
                                    ("GET", "/v1/usage/{user_id:[^/]+}", reports.user_usage)))
    if config.server.cors is not None:
        cors.install(app, config.server.cors)
    for path in HOT_PATHS:  # the same handler as the catch-all below, found at once
        app.router.add_route("*", path, serve, expect_handler=_expect)
    # the proxied surfaces; any path, even with decoded CR/LF
    app.router.add_route("*", r"/{tail:[\s\S]*}", serve, expect_handler=_expect)
    return app


async def _expect(request: web.Request) -> None:
    """``Expect: 100-continue``: "send the body" only to a request that will not be refused before it is read — one
    without a valid tenant key, or declaring a body over ``max_body_mb``, gets its 401 / 413 at once (RFC 9110
    §10.1.1), not an invitation to upload what will be thrown away."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    rt = request.app[RUNTIME].current
    if request.content_length is not None and request.content_length > rt.max_body:
        return
    if rt.tenants.enabled:
        try:
            if rt.tenants.authenticate(request.headers) is None:
                return
        except GatewayError:
            return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # (the answer's own size starts after it)


# The paths nearly all proxied traffic takes, routed to ``serve`` by name: the catch-all is found only after
# aiohttp walked the path up segment by segment (a lookup each) and tried the admin catch-all's pattern
# first, ≈ 3 % of a plain request's CPU. Any other spelling of these paths still reaches ``serve`` through
# the catch-all, which decides everything from the raw path alone: the route changes nothing but its cost.
HOT_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings", "/v1/completions")


async def _runtime_lifetime(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME].current
    await runtime.start()
    flusher = asyncio.create_task(runtime.access_log.flush_periodically())
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await app[RUNTIME].close()
        spans = app[RUNTIME].current.spans
        if spans is not None:  # what is queued goes out, within a bound (off the event loop)
            await asyncio.to_thread(spans.close)
