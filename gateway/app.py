"""The composition root: ``create_app(config)`` builds everything the gateway serves with.

Routes, the runtime (targets with their connection pools, router, pipeline,
store, logs) and its lifetime, all in one place. Tests drive exactly this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from gateway import handlers
from gateway.clock import Clock
from gateway.config import Config
from gateway.keys import RUNTIME
from gateway.runtime import Runtime, RuntimeSlot
from gateway.store import Store

log = logging.getLogger("reliapi")

# aiohttp server settings every way of running the app shares (tests, CLI, workers).
HANDLER_ARGS = {
    "handler_cancellation": True,  # a client that disconnects cancels its upstream request at once
    "auto_decompress": False,  # request bodies are forwarded exactly as sent
    "access_log": None,  # the gateway writes its own JSON access log
}


def create_app(
    config: Config,
    *,
    env: Mapping[str, str] = os.environ,
    access_log_write: Callable[[str], Any] | None = None,
    store: Store | None = None,
    clock: Clock | None = None,
) -> web.Application:
    runtime = Runtime(config, env=env, access_log_write=access_log_write, store=store, clock=clock)
    app = web.Application(client_max_size=runtime.max_body, handler_args=HANDLER_ARGS)
    app[RUNTIME] = RuntimeSlot(runtime)
    app.cleanup_ctx.append(_runtime_lifetime)
    for path in ("/healthz", "/livez", "/health"):
        app.router.add_get(path, handlers.liveness)
    app.router.add_get("/readyz", handlers.readiness)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/v1/usage/{user_id}", handlers.user_usage)
    app.router.add_route("*", r"/{tail:[\s\S]*}", handlers.dispatch)  # any path, even with decoded CR/LF
    return app


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
