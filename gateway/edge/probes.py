"""Health probes: ``/healthz`` (and ``/livez``, ``/health``) and ``/readyz`` (SPEC §2)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.keys import RUNTIME


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


READY_STORE_TIMEOUT_S = 1.0  # a store that hangs makes /readyz say so, not hang with it


async def readiness(request: web.Request) -> web.Response:
    """GET /readyz (SPEC §2): 200 when a config is loaded (it is, once the app serves), the store answers
    within ``READY_STORE_TIMEOUT_S`` and some target can serve (not every circuit open); 503 naming the
    reason otherwise. Each target's circuit is listed (``circuits``)."""
    rt = request.app[RUNTIME].current
    store = rt.store
    circuits = rt.circuit_states()
    body: dict[str, Any] = {"config": "loaded", "store": store.backend, "targets": list(circuits),
                            "circuits": circuits}
    problem = await rt.store_problem(READY_STORE_TIMEOUT_S)
    if problem is not None:
        reason = f"store unavailable ({store.url_for_display}): {problem}"
        return web.json_response({"status": "not_ready", "reason": reason, **body}, status=503)
    if circuits and all(state == "open" for state in circuits.values()):
        return web.json_response({"status": "not_ready", "reason": "every target's circuit is open", **body},
                                 status=503)
    return web.json_response({"status": "ready", **body})
