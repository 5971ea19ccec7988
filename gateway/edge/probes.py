"""Health probes: ``/healthz`` (and ``/livez``, ``/health``) and ``/readyz`` (SPEC §2).

Their answers are the ``Liveness`` and ``Readiness`` shapes of ``gateway.edge.answers``.
"""

from __future__ import annotations

import msgspec
from aiohttp import web
from msgspec import UNSET

from gateway import __version__
from gateway.edge.answers import Liveness, Readiness
from gateway.keys import RUNTIME

_LIVE = msgspec.json.encode(Liveness("ok", __version__))  # the same bytes every time


async def liveness(request: web.Request) -> web.Response:
    return web.Response(body=_LIVE, content_type="application/json")


READY_STORE_TIMEOUT_S = 1.0  # a store that hangs makes /readyz say so, not hang with it


async def readiness(request: web.Request) -> web.Response:
    """GET /readyz (SPEC §2): 200 when a config is loaded (it is, once the app serves), the store answers
    within ``READY_STORE_TIMEOUT_S`` and some target can serve (not every circuit open); 503 naming the
    reason otherwise. Each target's circuit is listed (``circuits``)."""
    rt = request.app[RUNTIME].current
    store = rt.store
    circuits = rt.circuit_states()
    problem = await rt.store_problem(READY_STORE_TIMEOUT_S)
    reason: str | None = None
    if problem is not None:
        reason = f"store unavailable ({store.url_for_display}): {problem}"
    elif circuits and all(state == "open" for state in circuits.values()):
        reason = "every target's circuit is open"
    answer = Readiness("ready" if reason is None else "not_ready", "loaded", store.backend, list(circuits),
                       circuits, reason=UNSET if reason is None else reason)
    return web.Response(body=msgspec.json.encode(answer), content_type="application/json",
                        status=200 if reason is None else 503)
