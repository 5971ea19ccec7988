"""Upstream credentials, resolved once at startup from a target's ``auth`` block.

``Credential.apply`` runs per request: it either keeps the client's own
credential headers (passthrough) or replaces them with the target's key. A key
named by an environment variable that is not set falls back to passthrough, so
the built-in default works both with a server-side key and with the client's.

Several keys (``auth.env_vars``, or a ``provider_key_pools`` entry named after the
target or its provider, which overrides the target's ``auth``) make a pool: the key
pool policy picks one per attempt (``policies.key_pool``). Each key has an ``id`` for
logs and the status page — the configured id or the variable's name, never the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping

from multidict import CIMultiDict

from gateway.config.model import AuthConfig, KeyPool
from providers.base import Provider

log = logging.getLogger("reliapi")


class PoolKey:
    __slots__ = ("id", "header", "value", "fingerprint", "qps")

    def __init__(self, id: str, header: str, value: str, secret: str, qps: float | None = None) -> None:
        self.id = id
        self.header = header
        self.value = value  # the header value, prefix included
        # Identifies this key's shared state in the store: a changed key starts clean.
        self.fingerprint = hashlib.sha256(secret.encode()).hexdigest()[:16]
        self.qps = qps


class Credential:
    __slots__ = ("mode", "drops_client_credentials", "keys", "_secrets")

    def __init__(self, mode: str, keys: list[PoolKey] | None = None, secrets: list[str] | None = None) -> None:
        self.mode = mode  # "inject" | "passthrough" | "none"
        self.drops_client_credentials = mode != "passthrough"
        self.keys = keys or []
        self._secrets = secrets or []

    @property
    def secrets(self) -> list[str]:
        """The configured key values, for scrubbing them from anything shown or logged."""
        return list(self._secrets)

    @property
    def is_pool(self) -> bool:
        return len(self.keys) > 1

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Add the target's (first) key to headers the client credentials were already removed from."""
        if self.mode == "inject":
            key = self.keys[0]
            headers[key.header] = key.value


def resolve(
    auth: AuthConfig | None, provider: Provider, target: str, env: Mapping[str, str] = os.environ,
    pool: KeyPool | None = None,
) -> Credential:
    if pool is not None:
        return _from_pool(pool, auth, provider, target, env)
    if auth is None or auth.type == "passthrough":
        return Credential("passthrough")
    if auth.type == "none":
        return Credential("none")
    if auth.type == "bearer_static":
        return _inject(provider, None, None, [("static", auth.token or "")], auth.qps_per_key)
    names = auth.env_vars or ([auth.env_var] if auth.env_var else [])
    keys = [(n, env[n]) for n in names if env.get(n)]
    if not keys:
        log.warning(
            "target %s: %s not set; passing the client's own credentials through",
            target, " / ".join(names),
        )
        return Credential("passthrough")
    missing = [n for n in names if not env.get(n)]
    if missing:
        log.warning("target %s: %s not set; the pool uses the other keys", target, " / ".join(missing))
    if auth.type == "header_env":
        return _inject(provider, auth.header, auth.prefix or "", keys, auth.qps_per_key)
    return _inject(provider, None, auth.prefix, keys, auth.qps_per_key)


def _from_pool(
    pool: KeyPool, auth: AuthConfig | None, provider: Provider, target: str, env: Mapping[str, str]
) -> Credential:
    """The seed's ``provider_key_pools`` form: ``{keys: [{id, api_key: "env:VAR" | literal, qps_limit}]}``."""
    keys: list[tuple[str, str]] = []
    qps: dict[str, float | None] = {}
    for k in pool.keys:
        value = env.get(k.api_key[4:], "") if k.api_key.startswith("env:") else k.api_key
        if not value:
            log.warning("target %s: key %s is not set (%s); the pool uses the other keys", target, k.id, k.api_key)
            continue
        keys.append((k.id, value))
        qps[k.id] = k.qps_limit
    if not keys:
        log.warning("target %s: no key of its pool is set; passing the client's own credentials through", target)
        return Credential("passthrough")
    header = auth.header if auth is not None and auth.type == "header_env" else None
    prefix = auth.prefix if auth is not None else None
    cred = _inject(provider, header, prefix, keys, None)
    for key in cred.keys:
        key.qps = qps[key.id]
    return cred


def _inject(
    provider: Provider, header: str | None, prefix: str | None, keys: list[tuple[str, str]], qps: float | None
) -> Credential:
    header = header or provider.key_header
    if prefix is None:
        prefix = provider.key_prefix if header.lower() == provider.key_header.lower() else ""
    pool = [PoolKey(kid, header, prefix + secret, secret, qps) for kid, secret in keys]
    return Credential("inject", pool, [secret for _, secret in keys])


__all__ = ["Credential", "PoolKey", "resolve"]
