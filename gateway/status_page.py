"""The status page ``GET /`` and its data ``GET /status.json`` (``Observatory.snapshot``)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from gateway.keys import OBSERVATORY, RUNTIME


async def status_json(request: web.Request) -> web.Response:
    data = await request.app[OBSERVATORY].snapshot(request.app[RUNTIME].current)
    return web.Response(body=msgspec.json.encode(data), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def page(request: web.Request) -> web.Response:
    data = await request.app[OBSERVATORY].snapshot(request.app[RUNTIME].current)
    return web.Response(text=f"<pre>{msgspec.json.encode(data).decode()}</pre>", content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", page)
    app.router.add_get("/status.json", status_json)
