"""The tenants of a config by key digest (``policies.tenants`` says what tenants are and may do).

Keys are configured literally, from an environment variable, or as SHA-256 only; the
lookup table holds nothing but digests. A presented key is hashed and the digest
compared with ``hmac.compare_digest``, so how long a check takes says nothing about how
close a wrong key was. ``authenticate`` is the edge's authentication step (``gateway.edge.steps``).

A tenant on a tier (``tiers:``) has its tier's settings where it sets none (``gateway.config.tiers``).
Marketplace tenants (``marketplaces.rapidapi``) have no key of their own: a request carrying the
marketplace's proxy secret is the tenant ``rapidapi/<X-RapidAPI-User>`` on the tier its
``X-RapidAPI-Subscription`` maps to (``gateway.flow.marketplace``), made for that request alone —
nothing is kept per marketplace user but what the store keeps (usage rows, budgets, limits).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs
from multidict import CIMultiDictProxy, istr

from gateway.config.model import TierFeatures
from gateway.config.tiers import effective, template
from gateway.errors import Forbidden, Unauthorized
from gateway.flow.marketplace import Marketplace

if TYPE_CHECKING:
    from gateway.config.model import Config, TenantConfig


X_API_KEY = istr("X-API-Key")


class Tenant:
    """One caller and its settings (its tier's filled in). ``plan`` names the settings the policies keep
    limits, budgets and chains under: the tenant's own name, or a marketplace tier's ``tier:<name>``."""

    __slots__ = ("name", "config", "digest", "plan", "tier", "features", "max_tokens", "marketplace",
                 "_targets", "_models", "_models_from")

    def __init__(self, config: TenantConfig, digest: bytes | None, tiers: Mapping[str, Any] | None = None) -> None:
        self.name = self.plan = config.name
        self.config = config
        self.digest = digest
        self.tier = config.tier
        tier = (tiers or {}).get(config.tier) if config.tier is not None else None
        self.features: TierFeatures = tier.features if tier is not None else _ALL_FEATURES
        self.max_tokens: int | None = tier.max_tokens if tier is not None else None
        self.marketplace = False
        self._targets = None if config.allowed_targets is None else frozenset(config.allowed_targets)
        self._models = None if config.allowed_models is None else [
            re.compile(fnmatch.translate(glob)) for glob in config.allowed_models
        ]
        self._models_from = "tenant"  # who restricts the models, for the refusal
        if tier is not None and tier.allowed_models is not None and config.allowed_models is tier.allowed_models:
            self._models_from = "tier"

    def named(self, name: str) -> Tenant:
        """This tier's settings for the marketplace user ``name``."""
        twin = object.__new__(Tenant)
        for slot in Tenant.__slots__:
            setattr(twin, slot, getattr(self, slot))
        twin.name, twin.marketplace = name, True
        return twin

    @property
    def restricted(self) -> bool:
        return self._targets is not None or self._models is not None

    def allows(self, target: str, model: str | None) -> bool:
        """May this tenant be answered by ``target`` with ``model`` (a fallback it could not ask for is not)."""
        return (self._targets is None or target in self._targets) and (
            self._models is None or model is None or any(m.match(model) for m in self._models))

    def check(self, target: str, model: str | None, names_a_model: bool = False, unread: str | None = None) -> None:
        """``names_a_model``: the request is one that says its model (an LLM call); without one it would be served
        whatever model the upstream defaults to — refused when this tenant may use some models only. ``unread``:
        an LLM call to an endpoint whose model the gateway does not read (a batch, a realtime session, a run: the
        model is nested, in a file, or the assistant's) — refused then too, as a spend budget refuses it."""
        if self._targets is not None and target not in self._targets:
            raise Forbidden(f"tenant {self.name!r} may not use target {target!r}")
        if self._models is not None and unread is not None:
            raise Forbidden(f"{unread}: tenant {self.name!r} may use only some models, and this endpoint's model is "
                            "not one the gateway can check, so it is not allowed for this tenant", target=target)
        if self._models is not None and model is None and names_a_model:
            allowed = ", ".join(self.config.allowed_models or ()) or f"those tier {self.tier!r} allows"
            raise Forbidden(f"tenant {self.name!r} may use only some models ({allowed}): name one in the request's "
                            "model field", param="model")
        if self._models is not None and model is not None and not any(m.match(model) for m in self._models):
            allowed = ", ".join(self.config.allowed_models or ())
            if self._models_from == "tier":
                raise Forbidden(f"tier {self.tier!r} (tenant {self.name!r}) does not allow model {model!r}; "
                                f"it allows {allowed}", param="model")
            raise Forbidden(f"tenant {self.name!r} may not use model {model!r}")


_ALL_FEATURES = TierFeatures()


def _digest(key: str) -> bytes:
    # aiohttp decodes header bytes with surrogateescape: a key that is not UTF-8 hashes as its bytes
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Tenants:
    """Every configured tenant by key digest (and by name, for the other policies), and the marketplace
    whose proxy vouches for its own users."""

    def __init__(self, config: Config, env: Mapping[str, str]) -> None:
        tiers = config.tiers
        rapidapi = config.marketplaces.rapidapi
        self.enabled = bool(config.tenants) or rapidapi is not None
        self.by_name: dict[str, Tenant] = {}
        self._by_digest: dict[bytes, Tenant] = {}
        for t in config.tenants:
            digest = None
            if t.api_key_sha256:
                digest = bytes.fromhex(t.api_key_sha256)
            elif t.api_key:
                digest = _digest(t.api_key)
            elif t.api_key_env:
                value = env.get(t.api_key_env)
                if value:  # (unset: no key is this tenant's — config_warnings says so at --check, start and reload)
                    digest = _digest(value)
            tenant = Tenant(effective(t, tiers), digest, tiers)
            self.by_name[t.name] = tenant
            if digest is not None:
                self._by_digest[digest] = tenant
        self._decoy = _digest("reliapi: no such tenant")
        # a tier's settings as a tenant of their own: what a marketplace user is
        self.tiers = {name: Tenant(template(name, tier), None, tiers) for name, tier in tiers.items()}
        self.marketplace = Marketplace(rapidapi, self.tiers, env) if rapidapi is not None else None

    def authenticate(self, headers: CIMultiDictProxy[str]) -> Tenant | None:
        """The calling tenant; None when no tenants are configured. Raises ``Unauthorized``."""
        if not self.enabled:
            return None
        marketplace = self.marketplace
        if marketplace is not None and marketplace.claims(headers):
            return marketplace.authenticate(headers)  # the marketplace's headers are the whole credential
        key = None
        auth = headers.get(hdrs.AUTHORIZATION)
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                key = value.strip()
        if not key:
            key = headers.get(X_API_KEY, "").strip()
        if not key:
            raise Unauthorized("missing tenant key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        digest = _digest(key)
        tenant = self._by_digest.get(digest)
        # compare_digest runs for a miss too, against a decoy, so both paths do the same work
        if not hmac.compare_digest(digest, tenant.digest if tenant is not None else self._decoy) or tenant is None:  # type: ignore[arg-type]
            raise Unauthorized("invalid tenant key")
        return tenant
