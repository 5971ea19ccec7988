"""Typed keys for everything the application object carries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.app import Reloader
    from gateway.observe.counters import Observatory
    from gateway.observe.metrics import Exposition
    from gateway.runtime import RuntimeSlot

RUNTIME: web.AppKey[RuntimeSlot] = web.AppKey("runtime")
OBSERVATORY: web.AppKey[Observatory] = web.AppKey("observatory")
RELOADER: web.AppKey[Reloader | None] = web.AppKey("reloader")  # reads the config again (None: cannot)
EXPOSITION: web.AppKey[Exposition] = web.AppKey("exposition")  # the app's own Prometheus registry
