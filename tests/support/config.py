"""One builder for the gateway configs the tests run on (instead of a YAML template per test file).

A ``GatewayConfig`` is a plain dict of the config's sections built up by chained calls; ``yaml()``
(also ``str()``) dumps it, ``load()`` parses it into a ``Config``, ``write()`` saves it for a reload.
The ``gateway`` fixture and ``CLI.write`` take one as it is; the ``make_config`` fixture is the class.
The suite's usual targets sit at a fake upstream's URL:

- ``up``: OpenAI at ``{url}/v1`` serving ``gpt-*``
- ``claude``: Anthropic at ``{url}`` serving ``claude-*``
- ``rest``: plain HTTP at ``{url}/api``

Field values are what the YAML would hold (dicts, lists, numbers); a field given as ``None`` is
left out, as if the line were not there.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Self

import yaml

from gateway.config import parse_config
from gateway.config.model import Config

# No retries anywhere, so one client request is one upstream attempt and counts are simple.
NO_RETRY = {"429": {"attempts": 0}, "5xx": {"attempts": 0}, "net": {"attempts": 0}, "timeout": {"attempts": 0}}
NO_5XX_RETRY = {"5xx": {"attempts": 0}}

PASSTHROUGH = {"type": "passthrough"}
NO_AUTH = {"type": "none"}


def bearer_env(var: str) -> dict[str, str]:
    """``auth: {type: bearer_env, env_var: VAR}``."""
    return {"type": "bearer_env", "env_var": var}


def header_env(header: str, var: str) -> dict[str, str]:
    """``auth: {type: header_env, header: HEADER, env_var: VAR}``."""
    return {"type": "header_env", "header": header, "env_var": var}


def _apply(mapping: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Set each of ``fields`` on ``mapping`` (a copy of the value); ``None`` removes the key."""
    for key, value in fields.items():
        if value is None:
            mapping.pop(key, None)
        else:
            mapping[key] = copy.deepcopy(value)
    return mapping


class GatewayConfig:
    """A gateway config, built up call by call::

        cfg = GatewayConfig(fake.url, default_target="up").up(retry_matrix=NO_RETRY).claude()
        cfg.rest(cache={"ttl_s": 60}).tenant("acme", api_key="acme-key-123456")
        client, logs = await gateway(cfg)  # or cfg.yaml(), cfg.load(env=...), cfg.write(path)

    ``url`` is the fake upstream the ``up``/``claude``/``rest`` shorthands point at; keyword
    arguments are ``server:`` fields. Every method returns the builder, so calls chain.
    """

    def __init__(self, url: str = "", **server: Any) -> None:
        self.url = url
        self.data: dict[str, Any] = {}
        if any(value is not None for value in server.values()):
            self.server(**server)

    # ---------------------------------------------------------------- sections

    def server(self, **fields: Any) -> Self:
        """Add ``server:`` fields (``None`` removes one)."""
        _apply(self.data.setdefault("server", {}), fields)
        return self

    def store(self, **fields: Any) -> Self:
        """Add ``store:`` fields (``url``, ``key_prefix``, ``fail_open``, ``rate_limit_on_error``, …)."""
        _apply(self.data.setdefault("store", {}), fields)
        return self

    def tenant(self, name: str, **fields: Any) -> Self:
        """Append a tenant (``api_key``, ``budget``, ``rate_limit``, …), or add fields to the one of that
        name (``None`` removes one)."""
        tenants = self.data.setdefault("tenants", [])
        for tenant in tenants:
            if tenant.get("name") == name:
                _apply(tenant, fields)
                return self
        tenants.append(_apply({"name": name}, fields))
        return self

    def tenants(self, *tenants: dict[str, Any]) -> Self:
        """Append tenants given as whole mappings (each with its ``name``)."""
        if tenants:
            self.data.setdefault("tenants", []).extend(copy.deepcopy(list(tenants)))
        return self

    def section(self, key: str, value: dict[str, Any]) -> Self:
        """Merge a top-level mapping such as ``pricing``, ``provider_key_pools``, ``client_profiles``."""
        self.data.setdefault(key, {}).update(copy.deepcopy(value))
        return self

    # ---------------------------------------------------------------- targets

    def target(self, name: str, base_url: str | None = None, **fields: Any) -> Self:
        """Add target ``name``, or add fields to it when it exists already (``None`` removes one)."""
        target = self.data.setdefault("targets", {}).setdefault(name, {})
        _apply(target, {"base_url": base_url} if base_url is not None else {})
        _apply(target, fields)
        return self

    def up(self, name: str = "up", **fields: Any) -> Self:
        """An OpenAI target at ``{url}/v1`` serving ``gpt-*`` (any field overrides); on an existing
        target, only adds ``fields`` (as do ``claude`` and ``rest``)."""
        return self._usual(name, {"base_url": f"{self.url}/v1", "provider": "openai", "models": ["gpt-*"]}, fields)

    def claude(self, name: str = "claude", **fields: Any) -> Self:
        """An Anthropic target at ``{url}`` serving ``claude-*`` (any field overrides)."""
        return self._usual(name, {"base_url": self.url, "provider": "anthropic", "models": ["claude-*"]}, fields)

    def rest(self, name: str = "rest", **fields: Any) -> Self:
        """A plain-HTTP target at ``{url}/api``."""
        return self._usual(name, {"base_url": f"{self.url}/api"}, fields)

    def _usual(self, name: str, defaults: dict[str, Any], fields: dict[str, Any]) -> Self:
        if name in self.data.get("targets", {}):
            return self.target(name, **fields)
        return self.target(name, **{**defaults, **fields})

    def each(self, **fields: Any) -> Self:
        """Add the same fields to every target added so far."""
        for name in self.data.get("targets", {}):
            self.target(name, **fields)
        return self

    # ---------------------------------------------------------------- output

    def yaml(self) -> str:
        """The config as YAML text (block style, sections and fields in the order they were added)."""
        return yaml.safe_dump(self.data, sort_keys=False, default_flow_style=False, allow_unicode=True)

    __str__ = yaml

    def load(self, env: dict[str, str] | None = None) -> Config:
        """The parsed ``Config`` (``env`` for ``${VAR}`` and ``env:`` references; default none)."""
        return parse_config(self.yaml(), env={} if env is None else env)

    def write(self, path: str | Path) -> Path:
        """Write the YAML to ``path`` (a file; returned as a Path) for the CLI or a reload."""
        path = Path(path)
        path.write_text(self.yaml())
        return path


def llm_config(url: str, **server: Any) -> GatewayConfig:
    """The suite's usual trio with upstream keys: ``up`` (``UP_KEY``), ``claude`` (``CLAUDE_KEY``) and
    ``rest`` (passthrough); ``server:`` is ``{default_target: up}`` plus ``server`` (``default_target=None``
    leaves it out)."""
    cfg = GatewayConfig(url, **{"default_target": "up", **server}).up(auth=bearer_env("UP_KEY"))
    return cfg.claude(auth=header_env("x-api-key", "CLAUDE_KEY")).rest(auth=PASSTHROUGH)
