"""Header rules shared by every proxy surface: what never crosses the gateway.

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields — the ones listed here
and every field named in ``Connection`` — in both directions. ``Host`` comes from
the target, never the client; ``Content-Length`` is recomputed by aiohttp from the
body we actually send.
"""

from __future__ import annotations

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

# The gateway's own header names, as istr: multidict then skips case-folding them on every use.
X_REQUEST_ID = istr("X-Request-Id")
X_RELIAPI_TARGET = istr("X-ReliAPI-Target")
X_RELIAPI_ATTEMPT = istr("X-ReliAPI-Attempt")  # to upstream: which attempt this is
X_RELIAPI_ATTEMPTS = istr("X-ReliAPI-Attempts")  # to the client: how many were made
X_CACHE = istr("X-Cache")
X_CACHED = istr("X-Cached")

# Classic hop-by-hop list (RFC 2616 §13.5.1, RFC 9110 §7.6.1) plus Proxy-Connection.
# Lower case: header names are compared case-insensitively (SDKs send "connection").
HOP_BY_HOP: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})

# Never forwarded upstream: framing/routing the gateway owns.
_REQUEST_DROP: frozenset[str] = HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP: frozenset[str] = HOP_BY_HOP | {"content-length"}

# Client credentials, removed when the gateway injects the target's own key.
CREDENTIAL_HEADERS: frozenset[str] = frozenset({"authorization", "x-api-key", "api-key", "cookie"})

_REQUEST_DROP_WITH_CREDENTIALS: frozenset[str] = _REQUEST_DROP | CREDENTIAL_HEADERS

# The gateway's own control headers (X-ReliAPI-Target, …) stop here.
_GATEWAY_PREFIX = "x-reliapi-"


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_request_headers(
    headers: CIMultiDictProxy[str], *, drop_credentials: bool
) -> CIMultiDict[str]:
    """The client's headers as they may go upstream (credentials are added by the provider)."""
    drop = _REQUEST_DROP_WITH_CREDENTIALS if drop_credentials else _REQUEST_DROP
    if hdrs.CONNECTION in headers:
        drop = drop | _connection_tokens(headers)
    out = CIMultiDict([
        (k, v) for k, v in headers.items()
        if (n := k.lower()) not in drop and not n.startswith(_GATEWAY_PREFIX)
    ])
    if hdrs.ACCEPT_ENCODING not in out:
        # aiohttp would ask for gzip on the client's behalf; bodies pass through undecoded, so a
        # client that did not ask for compression must not receive it
        out[hdrs.ACCEPT_ENCODING] = "identity"
    return out


def client_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as they may go to the client."""
    drop = _RESPONSE_DROP
    if hdrs.CONNECTION in headers:
        drop = drop | _connection_tokens(headers)
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])
