"""Typed keys for everything the application object carries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.runtime import RuntimeSlot

RUNTIME: web.AppKey[RuntimeSlot] = web.AppKey("runtime")
