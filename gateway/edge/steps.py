"""The edge's checks, made before the body is read (an unknown caller costs no upload): each
refuses a request by raising, or fills in the call (``gateway.edge.call.Check``)."""

from __future__ import annotations

from multidict import istr

from gateway.edge.call import Call
from gateway.errors import InvalidRequest, MethodNotAllowed, UnknownTarget


def no_route(call: Call) -> None:
    request = call.request
    raise UnknownTarget(f"no route for {request.method} {request.path}")


_REFLECTING = frozenset(("TRACE", "TRACK", "CONNECT"))
_OVERRIDES = (istr("X-HTTP-Method-Override"), istr("X-HTTP-Method"), istr("X-Method-Override"))  # (istr: no casefold each)


def proxiable(call: Call) -> None:
    """HTTP/1.0 or newer, and no method (asked for, or by an override header) that would echo the request back."""
    request = call.request
    if request.version < (1, 0):  # HTTP/0.9 has no headers to carry a key, a type, a length
        raise InvalidRequest("HTTP/1.0 or newer is required")
    if request.method in _REFLECTING:  # TRACE echoes the request as the upstream got it, the target's key with it
        raise MethodNotAllowed(f"{request.method} is never proxied (an upstream that answers TRACE would show the "
                               "request it got, credentials and all)")
    headers = request.headers
    for name in _OVERRIDES:  # the same asked for by a method override a framework upstream may honour
        if name in headers and headers[name].strip().upper() in _REFLECTING:
            raise MethodNotAllowed(f"{name}: {headers[name].strip().upper()} is never proxied (an upstream that "
                                   "answers TRACE would show the request it got, credentials and all)")


def authenticate(call: Call) -> None:
    """The calling tenant (``gateway.flow.tenants``): a 401 for a missing or unknown key."""
    tenants = call.rt.tenants
    if tenants.enabled:
        tenant = tenants.authenticate(call.request.headers)
        if tenant is not None:
            call.tenant, call.account = tenant.name, tenant
