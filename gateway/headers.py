"""Header rules shared by every proxy surface: what never crosses the gateway.

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields — the ones listed here
and every field named in ``Connection`` — in both directions. ``Host`` comes from
the target, never the client; ``Content-Length`` is recomputed by aiohttp from the
body we actually send.
"""

from __future__ import annotations

import math
from datetime import UTC
from email.utils import parsedate_to_datetime

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

# The gateway's own header names, as istr: multidict then skips case-folding them on every use.
X_REQUEST_ID = istr("X-Request-Id")
X_RELIAPI_TARGET = istr("X-ReliAPI-Target")
X_RELIAPI_USER = istr("X-ReliAPI-User")  # from the client: the end user (usage rows, per-user limits)
X_RELIAPI_ATTEMPT = istr("X-ReliAPI-Attempt")  # to upstream: which attempt this is
X_RELIAPI_ATTEMPTS = istr("X-ReliAPI-Attempts")  # to the client: how many were made
X_RELIAPI_FALLBACK = istr("X-ReliAPI-Fallback")  # to the client: the fallback target that answered
X_RELIAPI_ROUTED_MODEL = istr("X-ReliAPI-Routed-Model")  # to the client: what a virtual model became (routing:)
X_CACHE = istr("X-Cache")
X_CACHED = istr("X-Cached")
X_RELIAPI_COST = istr("X-ReliAPI-Cost-USD")  # to the client: what a complete answer cost (not on replays)
RETRY_AFTER = istr("Retry-After")
RETRY_AFTER_MS = istr("retry-after-ms")  # OpenAI's finer-grained variant
X_SHOULD_RETRY = istr("x-should-retry")  # OpenAI/Anthropic: the upstream's own verdict
IDEMPOTENCY_KEYS = (istr("Idempotency-Key"), istr("X-Idempotency-Key"))
# The quota's headers (``policies.rate_limit``), lower case: they describe the request that took the quota, so the
# stored or shared copy of its answer leaves them out — a cache hit, a replay or a coalesced duplicate took none,
# and must not show the first request's count as if it were theirs (``Lead.private``).
QUOTA_HEADERS = frozenset(("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy",
                           "ratelimit"))

# Classic hop-by-hop list (RFC 2616 §13.5.1, RFC 9110 §7.6.1) plus Proxy-Connection.
HOP_BY_HOP: tuple[istr, ...] = tuple(istr(h) for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade",
))

# Never forwarded upstream: framing/routing the gateway owns. (The trace context is replaced per attempt:
# ``gateway.flow.send``.)
_REQUEST_DROP = HOP_BY_HOP + (hdrs.HOST, hdrs.CONTENT_LENGTH)
# The headers the gateway says itself (SPEC §2), never an upstream's: a CDN's "X-Cache: HIT" on a fresh call, or
# another gateway's "Idempotent-Replayed", would tell the client what did not happen here.
_GATEWAY_SAYS: tuple[istr, ...] = (
    X_CACHE, X_CACHED, istr("Idempotent-Replayed"), X_RELIAPI_COST, X_RELIAPI_FALLBACK, X_RELIAPI_ROUTED_MODEL,
    istr("X-ReliAPI-Trace-Id"),
)
_RESPONSE_DROP = HOP_BY_HOP + (hdrs.CONTENT_LENGTH,) + _GATEWAY_SAYS

# Client credentials, removed when the gateway injects the target's own key.
CREDENTIAL_HEADERS: tuple[istr, ...] = (hdrs.AUTHORIZATION, istr("x-api-key"), istr("api-key"), hdrs.COOKIE)
_REQUEST_DROP_WITH_CREDENTIALS = _REQUEST_DROP + CREDENTIAL_HEADERS

# The gateway's own control headers (X-ReliAPI-Target, …) stop here.
_GATEWAY_PREFIX = "x-reliapi-"
_OVERRIDES = frozenset(("x-http-method-override", "x-http-method", "x-method-override"))


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, ()):
        tokens.update(t.strip() for t in value.split(",") if t.strip())
    return tokens


def _without(headers: CIMultiDictProxy[str], drop: tuple[istr, ...]) -> CIMultiDict[str]:
    """A copy minus ``drop`` and minus whatever ``Connection`` names.

    One C-level copy and a few deletions: far cheaper than rebuilding the mapping
    header by header, and this runs twice per request.
    """
    out = CIMultiDict(headers)
    for name in drop:
        if name in out:
            del out[name]
    if hdrs.CONNECTION in headers:
        for name in _connection_tokens(headers):
            out.popall(name, None)
    return out


def upstream_request_headers(
    headers: CIMultiDictProxy[str], *, drop_credentials: bool, llm: bool = False,
) -> CIMultiDict[str]:
    """The client's headers as they may go upstream (credentials are added by the provider). ``llm``:
    an LLM target, whose answers the gateway reads (asked for uncompressed) and whose calls it meters
    by method (a method-override header would make a PUT a POST behind the gateway's back)."""
    out = _without(headers, _REQUEST_DROP_WITH_CREDENTIALS if drop_credentials else _REQUEST_DROP)
    control = [k for k in out if k[0] in "xX"
               and (k[:10].lower() == _GATEWAY_PREFIX or (llm and k.lower() in _OVERRIDES))]
    for name in control:
        out.popall(name, None)
    if llm or hdrs.ACCEPT_ENCODING not in out:
        # aiohttp would ask for gzip on the client's behalf; bodies pass through undecoded, so a
        # client that did not ask for compression must not receive it
        out[hdrs.ACCEPT_ENCODING] = "identity"
    return out


def is_event_stream(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> bool:
    """An SSE answer: relayed event by event, read by the stream watchers (media types ignore case)."""
    return headers.get(hdrs.CONTENT_TYPE, "")[:17].lower() == "text/event-stream"


def client_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as they may go to the client."""
    return _without(headers, _RESPONSE_DROP)


def retry_after_s(headers: CIMultiDict[str] | CIMultiDictProxy[str], now: float) -> float | None:
    """How long the upstream asks us to wait, in seconds, or None.

    ``retry-after-ms`` first (OpenAI), then ``Retry-After`` as delay-seconds or an HTTP-date
    (RFC 9110 §10.2.3); ``now`` is wall time for the date form. A date in the past is 0;
    a value that parses as neither is ignored (the caller's backoff applies).
    """
    ms = headers.get(RETRY_AFTER_MS)
    if ms:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = -1.0
        if 0 <= value < math.inf:
            return value
    text = headers.get(RETRY_AFTER)
    if not text:
        return None
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are always GMT
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    return value if 0 <= value < math.inf else None


def should_retry(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> bool | None:
    """The upstream's ``x-should-retry: true|false`` verdict, which wins over status rules."""
    value = headers.get(X_SHOULD_RETRY)
    if value is None:
        return None
    value = value.strip().lower()
    return True if value == "true" else False if value == "false" else None
