"""Tenants: who is calling, and what they may reach (SPEC §4 ``tenants``, §3 401/403).

Without a ``tenants`` block the gateway is open (single-tenant). With one, every
proxied request carries a tenant key — ``Authorization: Bearer <key>`` (the OpenAI
SDK's ``api_key``) or ``X-API-Key: <key>`` (the Anthropic SDK, the seed) — and the key
never goes further: the upstream only ever sees the target's own credential.

Keys are configured literally, from an environment variable, or as SHA-256 only; the
lookup table holds nothing but digests. A presented key is hashed and the digest
compared with ``hmac.compare_digest``, so how long a check takes says nothing about how
close a wrong key was.

The registry of keys (``gateway.flow.tenants``) authenticates in the edge's own step,
before the body is read (an unknown caller costs no upload); the request policy here
checks ``allowed_targets`` / ``allowed_models`` (a tier's, when the tenant sets none: ``policies.tiers``
checks the rest of what a tier allows) and drops a marketplace's ``X-RapidAPI-*`` headers, the proxy
secret among them, so that no upstream sees them; ``provider_limits``, further in (inside
the cache and the gateway's own quotas), removes the provider's own rate-limit headers,
which describe the account all tenants share.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from multidict import istr

from gateway.errors import GatewayError
from gateway.flow.marketplace import strip_headers

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply

log = logging.getLogger("reliapi")

X_API_KEY = istr("X-API-Key")
_READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "DELETE"))  # (as the budget's: none of them runs a model)
_PROVIDER_LIMIT_HEADERS = re.compile(r"(x-ratelimit-|anthropic-ratelimit-)", re.IGNORECASE)


def policy(ctx: Context) -> Policy | None:
    tenants = ctx.tenants
    if not tenants.enabled:
        return None
    marketplace = tenants.marketplace is not None

    async def tenant_access(ex: Exchange, call_next: Handler) -> Reply:
        endpoint = ex.endpoint
        call = ex.target.kind == "llm" and ex.method not in _READ_METHODS  # an LLM call: it runs some model
        unread = call and endpoint.billed is None and not endpoint.free
        ex.account.check(ex.target.name, ex.model, call and endpoint.billed is not None,  # authenticated at the edge
                         f"{ex.method} /{endpoint.path}" if unread else None)
        if marketplace:
            ex.headers = strip_headers(ex.headers)
        return await call_next(ex)

    return tenant_access


def provider_limits(ctx: Context) -> Policy | None:
    """Drop the provider's rate-limit headers from what the upstream answered (inside the gateway's
    own limits, whose headers of the same names are the ones a tenant should read)."""
    if not ctx.tenants.enabled:
        return None

    async def own_limits_only(ex: Exchange, call_next: Handler) -> Reply:
        try:
            reply = await call_next(ex)
        except GatewayError as e:
            _drop_provider_limits(e.headers)
            raise
        _drop_provider_limits(reply.headers)
        return reply

    return own_limits_only


def _drop_provider_limits(headers: Mapping[str, str]) -> None:
    doomed = [k for k in headers if _PROVIDER_LIMIT_HEADERS.match(k)]
    for name in doomed:
        del headers[name]  # type: ignore[attr-defined]
