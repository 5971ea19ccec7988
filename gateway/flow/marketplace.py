"""Marketplace tenants (``marketplaces.rapidapi``): callers a marketplace's proxy vouches for.

RapidAPI's proxy authenticates its consumers and adds ``X-RapidAPI-Proxy-Secret`` (the secret
the provider set up with RapidAPI), ``X-RapidAPI-User`` (the consumer) and
``X-RapidAPI-Subscription`` (the consumer's plan: BASIC, PRO, ULTRA, MEGA or a custom one). A
request carrying any of those three is the marketplace's to vouch for: with the right secret
(compared as SHA-256 digests with ``hmac.compare_digest``) it is the tenant
``rapidapi/<user>`` on the tier ``tier_map`` maps its subscription to (else ``default_tier``,
else 403 naming the subscription); with a wrong or missing secret it is 401, and neither the
user nor the subscription is read. No ``X-RapidAPI-*`` header ever goes upstream
(``policies.tenants``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, istr

from gateway.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from gateway.config.model import MarketplaceConfig

log = logging.getLogger("reliapi")

PROXY_SECRET = istr("X-RapidAPI-Proxy-Secret")
USER = istr("X-RapidAPI-User")
SUBSCRIPTION = istr("X-RapidAPI-Subscription")
HEADER_PREFIX = "x-rapidapi-"  # every header of the marketplace's: none goes upstream
TENANT_PREFIX = "rapidapi/"  # a marketplace tenant's name: configured tenants may not start with it
# A user name becomes part of store keys and the access log: a marketplace handle, nothing else.
_USER = re.compile(r"[A-Za-z0-9._@+\-]{1,128}")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class Marketplace:
    """RapidAPI's proxy as an authenticator; ``tiers`` are each tier's settings as a tenant
    (``gateway.flow.tenants.Tenant``), named for the user per request."""

    def __init__(self, config: MarketplaceConfig, tiers: Mapping[str, Any], env: Mapping[str, str]) -> None:
        secret = env.get(config.proxy_secret_env or "")
        if not secret:
            log.warning("marketplaces.rapidapi: environment variable %s is not set; every RapidAPI request is refused",
                        config.proxy_secret_env)
        self._secret = _digest(secret) if secret else None
        self._decoy = _digest("reliapi: no proxy secret")
        self._by_subscription = {sub: tiers[tier] for sub, tier in config.tier_map.items() if tier in tiers}
        self._default = tiers.get(config.default_tier) if config.default_tier is not None else None

    @staticmethod
    def claims(headers: CIMultiDictProxy[str]) -> bool:
        """Does the request say it comes through the marketplace (then only the marketplace can let it in)."""
        return PROXY_SECRET in headers or USER in headers or SUBSCRIPTION in headers

    def authenticate(self, headers: CIMultiDictProxy[str]) -> Any:
        presented = _digest(headers.get(PROXY_SECRET, ""))
        # compared against a decoy when no secret is configured, so every refusal does the same work
        right = hmac.compare_digest(presented, self._secret or self._decoy) and self._secret is not None
        if not right or PROXY_SECRET not in headers:
            raise Unauthorized("X-RapidAPI-* headers without the right X-RapidAPI-Proxy-Secret: not a RapidAPI request")
        user = headers.get(USER, "")
        if not _USER.fullmatch(user):
            raise Unauthorized("X-RapidAPI-User: missing, or not a user name (letters, digits, . _ @ + -, at most 128)")
        subscription = headers.get(SUBSCRIPTION, "")
        tier = self._by_subscription.get(subscription) or self._by_subscription.get(subscription.upper()) or self._default
        if tier is None:
            shown = repr(subscription[:64]) if subscription else "(none: no X-RapidAPI-Subscription)"
            raise Forbidden(f"RapidAPI subscription {shown} has no tier on this API")
        return tier.named(TENANT_PREFIX + user)


def strip_headers(headers: Any) -> Any:
    """The client's headers without the marketplace's (the proxy secret above all), for the upstream."""
    doomed = [k for k in headers if k[:11].lower() == HEADER_PREFIX]
    if not doomed:
        return headers
    out = CIMultiDict(headers)
    for name in doomed:
        out.popall(name, None)
    return out
