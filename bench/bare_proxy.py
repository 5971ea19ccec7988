"""Bare aiohttp pass-through proxy: the floor for any aiohttp-based gateway design."""
import argparse

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                 "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"))


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
    url = request.app["upstream"] + request.rel_url.path_qs
    async with request.app["session"].request(request.method, url, data=body, headers=headers) as up:
        rh = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
        if up.content_type != "text/event-stream":
            return web.Response(status=up.status, body=await up.read(), headers=rh)
        resp = web.StreamResponse(status=up.status, headers=rh)
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def session_ctx(app: web.Application):
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as app["session"]:
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000 (path is kept)")
    a = ap.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)  # large bodies pass (bench/large_bodies.py)
    app["upstream"] = a.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None, backlog=4096,
                shutdown_timeout=2.0, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
