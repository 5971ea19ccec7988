"""Typed keys for everything the application object carries (the Prometheus registry's is
``gateway.observe.metrics.EXPOSITION``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.config.model import Config
    from gateway.observe.counters import Observatory
    from gateway.runtime import RuntimeSlot

Reloader = Callable[[], "tuple[Config, str]"]  # reads the config again: (config, where from)

RUNTIME: web.AppKey[RuntimeSlot] = web.AppKey("runtime")
OBSERVATORY: web.AppKey[Observatory] = web.AppKey("observatory")
RELOADER: web.AppKey[Reloader | None] = web.AppKey("reloader")  # reads the config again (None: cannot)
