"""Any plain HTTP API: bytes in, bytes out, bearer keys by default."""

from __future__ import annotations

from providers.base import Provider


class HttpProvider(Provider):
    name = "http"
