"""Health probes: ``/healthz`` (and ``/livez``, ``/health``) and ``/readyz`` (SPEC §2)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.keys import RUNTIME
from gateway.store import StoreError


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


READY_STORE_TIMEOUT_S = 1.0  # a store that hangs makes /readyz say so, not hang with it


async def readiness(request: web.Request) -> web.Response:
    """GET /readyz (SPEC §2): 200 when a config is loaded (it is, once the app serves), the store answers
    within ``READY_STORE_TIMEOUT_S`` and some target can serve (not every circuit open); 503 naming the
    reason otherwise. Each target's circuit is listed (``circuits``)."""
    rt = request.app[RUNTIME].current
    store = rt.store
    circuits = {name: rt.circuits[name].state if name in rt.circuits else "closed" for name in sorted(rt.targets)}
    body: dict[str, Any] = {"config": "loaded", "store": store.backend, "targets": list(circuits),
                            "circuits": circuits}
    try:
        async with asyncio.timeout(READY_STORE_TIMEOUT_S):
            await store.ping()
    except (StoreError, TimeoutError) as e:
        why = rt.scrub(str(e)) if isinstance(e, StoreError) else f"no answer within {READY_STORE_TIMEOUT_S:g} s"
        reason = f"store unavailable ({store.url_for_display}): {why}"
        return web.json_response({"status": "not_ready", "reason": reason, **body}, status=503)
    if circuits and all(state == "open" for state in circuits.values()):
        return web.json_response({"status": "not_ready", "reason": "every target's circuit is open", **body},
                                 status=503)
    return web.json_response({"status": "ready", **body})
