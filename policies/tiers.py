"""What a tier does not allow (``tiers.<name>.features``; issue #16 point 4).

A tenant on a tier (``tenants[].tier``, or a marketplace user on the tier its subscription maps to)
may use every feature its tier does not set false. This policy runs right after the tenant's
access check (``policies.tenants``, which refuses a model outside the tier's ``allowed_models``),
before anything is read from the store or sent upstream, and refuses with ``403 forbidden`` in the
client's dialect, naming the tier and the feature:

- ``stream: false`` — a streamed request (``"stream": true``, or ``Accept: text/event-stream``);
- ``tools: false`` — a request with tools (``tools`` or the legacy ``functions``, non-empty);
- ``idempotency: false`` — a request with an idempotency key (refused, not quietly run without the
  deduplication the client asked for).

The other two are not refusals: ``cache: false`` — the cache neither answers nor stores the tier's
requests (``policies.cache``); ``fallback: false`` — only the target asked for answers
(``policies.fallback``). The tier's ``max_tokens`` is a clamp, in ``policies.budget``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from gateway.errors import Forbidden
from policies.idempotency import keyed

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply

REFUSED = ("stream", "tools", "idempotency")  # the features a request is refused for (the others are skipped)


class _Tools(msgspec.Struct):
    tools: list[msgspec.Raw] | None = None  # (each tool left unread)
    functions: list[msgspec.Raw] | None = None


_read_tools = msgspec.json.Decoder(_Tools).decode


def has_tools(body: bytes) -> bool:
    """Does a JSON request body carry tools (one that does not parse is left to the rest of the flow)?"""
    if b'"tools"' not in body and b'"functions"' not in body and b"\\u" not in body:
        return False  # (a key can be spelt with escapes, "tool\u0073": then the body is read)
    try:
        found = _read_tools(body)
    except (msgspec.DecodeError, RecursionError):
        return False
    return bool(found.tools or found.functions)


def refusal(ex: Exchange) -> tuple[str, str | None] | None:
    """What the tenant's tier does not allow in this request, in words, and the request field at
    fault; None when it allows it all."""
    features = ex.account.features
    if not features.stream and ex.stream:
        return "streaming (\"stream\": true)", "stream"
    if not features.idempotency and keyed(ex):
        return "idempotency keys", None
    if not features.tools and ex.target.kind == "llm" and has_tools(ex.body):
        return "tools", "tools"
    return None


def policy(ctx: Context) -> Policy | None:
    tiers = ctx.config.tiers
    if not ctx.tenants.enabled or not any(
            not getattr(tier.features, feature) for tier in tiers.values() for feature in REFUSED):
        return None

    async def tier_features(ex: Exchange, call_next: Handler) -> Reply:
        account = ex.account
        if account is not None and account.tier is not None:
            refused = refusal(ex)
            if refused is not None:
                what, param = refused
                raise Forbidden(f"tier {account.tier!r} (tenant {account.name!r}) does not allow {what}",
                                param=param, target=ex.target.name)
        return await call_next(ex)

    return tier_features
