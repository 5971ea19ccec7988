"""``GET /docs``: ``/openapi.json`` rendered by Swagger UI, every byte of it served by the gateway.

Swagger UI's files come from the ``swagger-ui-bundle`` package installed with the gateway and are
answered under ``/docs/assets/``, with the page's own small script; the page names nothing on
another host, so it works where there is no internet access and tells no CDN who reads the docs.
Its Content-Security-Policy makes the browser hold to that (and keeps Swagger UI from asking
an online validator about the document). The page and its script use relative URLs, so they
work behind a proxy that serves the gateway under a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from gateway.edge.ids import named, request_id
from gateway.edge.writer import error_response
from gateway.errors import UnknownTarget
from gateway.flow.exchange import ENVELOPE

_SCRIPT = "reliapi-docs.js"
# Only the files the page uses: not the package's demo index.html, whose initializer points at a
# petstore on the internet (nor the source maps, which only a browser's developer tools ask for).
ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
    _SCRIPT: "text/javascript",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ReliAPI — API reference</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" sizes="32x32" href="docs/assets/favicon-32x32.png">
<link rel="icon" type="image/png" sizes="16x16" href="docs/assets/favicon-16x16.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/reliapi-docs.js"></script>
</body>
</html>
"""
# A file, not an inline script: the policy allows scripts from the gateway only. ``validatorUrl: null``:
# Swagger UI would otherwise send the document to an online validator for its badge.
SCRIPT = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});
"""
_CACHE = "public, max-age=86400"  # the files change only with the installed package


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


def _asset_handler(root: Path):
    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        media = ASSETS.get(name)
        if media is None:
            return error_response(UnknownTarget(f"no docs asset named {name[:64]!r}"), ENVELOPE,
                                  request_id(request.headers))
        headers = {"Content-Type": media, "Cache-Control": _CACHE, "X-Content-Type-Options": "nosniff"}
        if name == _SCRIPT:
            return web.Response(body=SCRIPT.encode(), headers=headers)
        return web.FileResponse(root / name, headers=headers)
    return asset


def add_routes(app: web.Application) -> None:
    app.router.add_get("/docs", named(page))
    app.router.add_get("/docs/assets/{name}", named(_asset_handler(Path(str(swagger_ui_path)))))
