"""Header rules shared by every proxy surface: what never crosses the gateway.

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields — the ones listed here
and every field named in ``Connection`` — in both directions. ``Host`` comes from
the target, never the client; ``Content-Length`` is recomputed by aiohttp from the
body we actually send.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy, istr

# Classic hop-by-hop list (RFC 2616 §13.5.1, RFC 9110 §7.6.1) plus Proxy-Connection.
HOP_BY_HOP: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)

# Never forwarded upstream: framing/routing the gateway owns, and its own control headers.
_REQUEST_DROP: frozenset[istr] = HOP_BY_HOP | {istr("Host"), istr("Content-Length")}
_RESPONSE_DROP: frozenset[istr] = HOP_BY_HOP | {istr("Content-Length")}

# Client credentials, removed when the gateway injects the target's own key.
CREDENTIAL_HEADERS: frozenset[istr] = frozenset(istr(h) for h in ("Authorization", "x-api-key", "api-key", "Cookie"))

_GATEWAY_PREFIX = "x-reliapi-"


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_request_headers(
    headers: CIMultiDictProxy[str], *, drop_credentials: bool
) -> CIMultiDict[str]:
    """The client's headers as they may go upstream (credentials are added by the provider)."""
    named = _connection_tokens(headers) if "Connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key in _REQUEST_DROP or (named and key.lower() in named):
            continue
        if key.lower().startswith(_GATEWAY_PREFIX):
            continue
        if drop_credentials and key in CREDENTIAL_HEADERS:
            continue
        out.add(key, value)
    return out


def client_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as they may go to the client."""
    named = _connection_tokens(headers) if "Connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key in _RESPONSE_DROP or (named and key.lower() in named):
            continue
        out.add(key, value)
    return out
