"""The seed documents' environment variables (seeds 003 and 004), mapped onto the config.

Precedence is flags > environment > file, as for ``RELIAPI_*``; a ``RELIAPI_*`` variable wins over the
seed's spelling of the same thing. Each variable that took effect is named in the startup log
(``applied``); one that overrides a value the file set differently is a warning.

    PORT                         server.port (when neither --port nor RELIAPI_PORT is given)
    DEFAULT_PROVIDER             server.default_target: the first target of that provider (openai, anthropic, mistral)
    RATE_LIMIT_MAX               server.rate_limit_per_ip_rpm: RATE_LIMIT_MAX requests per RATE_LIMIT_WINDOW_MS
    RATE_LIMIT_WINDOW_MS           (default 60000), as a rate per minute (rounded up)
    RETRY_MAX_ATTEMPTS           every target's retries on 429, 5xx and network errors: attempts - 1 (the first try counts)
    IDEMPOTENCY_TTL_MS           every target's idempotency.ttl_s
    CACHE_TTL_SECONDS            turns the cache on for every LLM target, with this TTL
    COST_PER_TOKEN_GPT4          pricing of gpt-4 / gpt-3.5-turbo / claude (USD per token, input and output alike)
    COST_PER_TOKEN_GPT35
    COST_PER_TOKEN_CLAUDE
    MAX_REQUESTS_PER_MINUTE      rate_limit.per_user.rpm / .rph: every user's own limit, per minute and per hour
    MAX_REQUESTS_PER_HOUR          (a tenant's own rate_limit.per_user still wins for its users)

``LOG_LEVEL`` (any case) is read by the CLI itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.config.model import CacheConfig, Config, Price, RetryRule, ServerConfig, UserRateLimit

_COSTS = {"COST_PER_TOKEN_GPT4": "gpt-4", "COST_PER_TOKEN_GPT35": "gpt-3.5-turbo", "COST_PER_TOKEN_CLAUDE": "claude"}
_PER_USER = {"MAX_REQUESTS_PER_MINUTE": "rpm", "MAX_REQUESTS_PER_HOUR": "rph"}


class SeedEnvError(ValueError):
    """A seed variable whose value cannot be used (the message names it)."""


def _number(env: Mapping[str, str], name: str, kind: type = int, minimum: float = 0) -> Any:
    raw = env[name]
    try:
        value = kind(raw)
    except ValueError:
        raise SeedEnvError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if value < minimum or (isinstance(value, float) and not math.isfinite(value)):
        raise SeedEnvError(f"{name}: expected at least {minimum:g}, got {raw!r}")
    return value


def apply(config: Config, env: Mapping[str, str], *, port_given: bool) -> tuple[Config, list[str], list[str]]:
    """``config`` with the seed variables in ``env`` applied: (config, what took effect, warnings).
    ``port_given``: --port or RELIAPI_PORT was given (they win over PORT). Raises ``SeedEnvError``."""
    applied: list[str] = []
    warnings: list[str] = []
    server, targets, pricing, rate_limit = config.server, dict(config.targets), dict(config.pricing), config.rate_limit
    defaults = ServerConfig()

    def took(name: str, what: str, shown: object = "", *, file_value: Any = None, new_value: Any = None,
             default: Any = None) -> None:
        applied.append(f"{name} → {what} {shown}".rstrip())
        if file_value is not None and file_value != default and file_value != new_value:
            warnings.append(f"{name} overrides the config file's {what} ({file_value!r} → {new_value!r})")

    if "PORT" in env and not port_given:
        port = _number(env, "PORT")
        if port > 65535:
            raise SeedEnvError(f"PORT: expected a port number 0-65535, got {env['PORT']!r}")
        took("PORT", "server.port", port, file_value=server.port, new_value=port, default=defaults.port)
        server = msgspec.structs.replace(server, port=port)
    if "DEFAULT_PROVIDER" in env:
        provider = env["DEFAULT_PROVIDER"].strip().lower()
        name = next((n for n, t in targets.items() if t.provider == provider), None)
        if name is None:
            raise SeedEnvError(f"DEFAULT_PROVIDER: no target has provider {provider!r} "
                               f"(targets: {', '.join(f'{n} ({t.provider})' for n, t in targets.items()) or 'none'})")
        took("DEFAULT_PROVIDER", "server.default_target", name, file_value=server.default_target, new_value=name)
        server = msgspec.structs.replace(server, default_target=name)
    if "RATE_LIMIT_MAX" in env or "RATE_LIMIT_WINDOW_MS" in env:
        if "RATE_LIMIT_MAX" not in env:
            raise SeedEnvError("RATE_LIMIT_WINDOW_MS: give RATE_LIMIT_MAX (requests per window) with it")
        most = _number(env, "RATE_LIMIT_MAX", minimum=1)
        window_ms = _number(env, "RATE_LIMIT_WINDOW_MS", minimum=1) if "RATE_LIMIT_WINDOW_MS" in env else 60_000
        rpm = max(1, math.ceil(most * 60_000 / window_ms))
        took("RATE_LIMIT_MAX", "server.rate_limit_per_ip_rpm", rpm, file_value=server.rate_limit_per_ip_rpm,
             new_value=rpm)
        server = msgspec.structs.replace(server, rate_limit_per_ip_rpm=rpm)
        allowed = rpm * window_ms / 60_000  # what that rate lets through in the window
        if allowed > most * 1.1:  # a whole request a minute at least: a long window's small limit comes out looser
            warnings.append(f"RATE_LIMIT_MAX: {most:g} requests per {window_ms / 1000:g} s is {rpm} per minute, "
                            f"which allows about {allowed:,.0f} in that window; the per-IP limit counts whole "
                            "requests per minute (set server.rate_limit_per_ip_rpm, or a tenant rate_limit rph, for "
                            "a tighter one)")
        if config.tenants:
            warnings.append("RATE_LIMIT_MAX: the per-IP limit applies when no tenants are configured; "
                            "this config has tenants, whose own limits apply")
    if "RETRY_MAX_ATTEMPTS" in env:
        retries = max(0, _number(env, "RETRY_MAX_ATTEMPTS", minimum=1) - 1)
        for name, t in targets.items():
            matrix = dict(t.retry_matrix)
            for cls in ("429", "5xx", "net"):
                matrix[cls] = msgspec.structs.replace(matrix.get(cls, RetryRule()), attempts=retries)
            targets[name] = msgspec.structs.replace(t, retry_matrix=matrix)
        took("RETRY_MAX_ATTEMPTS", f"{retries} retries on 429, 5xx and network errors, every target")
    if "IDEMPOTENCY_TTL_MS" in env:
        ttl_s = _number(env, "IDEMPOTENCY_TTL_MS", minimum=1) / 1000
        for name, t in targets.items():
            targets[name] = msgspec.structs.replace(t, idempotency=msgspec.structs.replace(t.idempotency, ttl_s=ttl_s))
        took("IDEMPOTENCY_TTL_MS", f"idempotency.ttl_s {ttl_s:g}, every target")
    if "CACHE_TTL_SECONDS" in env:
        ttl = _number(env, "CACHE_TTL_SECONDS", float, minimum=0)
        llm = [n for n, t in targets.items() if t.kind == "llm"]
        for name in llm:
            t = targets[name]
            cache = t.cache if t.cache is not None else CacheConfig()
            targets[name] = msgspec.structs.replace(t, cache=msgspec.structs.replace(cache, enabled=True, ttl_s=ttl))
        took("CACHE_TTL_SECONDS", f"cache on, ttl_s {ttl:g}, LLM targets ({', '.join(llm) or 'none'})")
    for name, model in _COSTS.items():
        if name in env:
            per_token = _number(env, name, float, minimum=0)
            per_million = per_token * 1_000_000
            took(name, f"pricing.{model}", f"${per_million:g} per 1M tokens", file_value=pricing.get(model),
                 new_value=Price(input=per_million, output=per_million))
            pricing[model] = Price(input=per_million, output=per_million)
    for name, field in _PER_USER.items():
        if name in env:
            value = _number(env, name, minimum=1)
            per_user = rate_limit.per_user or UserRateLimit()
            took(name, f"rate_limit.per_user.{field}", value, file_value=getattr(per_user, field), new_value=value)
            rate_limit = msgspec.structs.replace(rate_limit, per_user=msgspec.structs.replace(per_user, **{field: value}))
    if applied:
        config = msgspec.structs.replace(config, server=server, targets=targets, pricing=pricing, rate_limit=rate_limit)
    return config, applied, warnings
