"""Upstream credentials, resolved once at startup from a target's ``auth`` block.

``Credential.apply`` runs per request: it either keeps the client's own
credential headers (passthrough) or replaces them with the target's key. A key
named by an environment variable that is not set falls back to passthrough, so
the built-in default works both with a server-side key and with the client's.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping

from multidict import CIMultiDict

from gateway.config import AuthConfig
from providers.base import Provider

log = logging.getLogger("reliapi")


class Credential:
    __slots__ = ("mode", "drops_client_credentials", "header", "_values", "_keys", "_cycle")

    def __init__(
        self, mode: str, header: str | None = None, values: list[str] | None = None, keys: list[str] | None = None
    ) -> None:
        self.mode = mode  # "inject" | "passthrough" | "none"
        self.drops_client_credentials = mode != "passthrough"
        self.header = header
        self._values = values or []  # header values, prefix included
        self._keys = keys or []
        self._cycle = itertools.cycle(self._values) if len(self._values) > 1 else None

    @property
    def secrets(self) -> list[str]:
        """The configured key values, for scrubbing them from anything shown or logged."""
        return list(self._keys)

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Add the target's key to headers the client credentials were already removed from."""
        if self.mode == "inject":
            value = next(self._cycle) if self._cycle is not None else self._values[0]
            headers[self.header] = value  # type: ignore[index]


def resolve(auth: AuthConfig | None, provider: Provider, target: str, env: Mapping[str, str] = os.environ) -> Credential:
    if auth is None or auth.type == "passthrough":
        return Credential("passthrough")
    if auth.type == "none":
        return Credential("none")
    if auth.type == "bearer_static":
        return _inject(provider, None, None, [auth.token or ""])
    names = auth.env_vars or ([auth.env_var] if auth.env_var else [])
    keys = [env[n] for n in names if env.get(n)]
    if not keys:
        log.warning(
            "target %s: %s not set; passing the client's own credentials through",
            target, " / ".join(names),
        )
        return Credential("passthrough")
    if auth.type == "header_env":
        return _inject(provider, auth.header, auth.prefix or "", keys)
    return _inject(provider, None, auth.prefix, keys)


def _inject(provider: Provider, header: str | None, prefix: str | None, keys: list[str]) -> Credential:
    header = header or provider.key_header
    if prefix is None:
        prefix = provider.key_prefix if header.lower() == provider.key_header.lower() else ""
    return Credential("inject", header, [prefix + k for k in keys], keys)


__all__ = ["Credential", "resolve"]
