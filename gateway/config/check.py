"""Checks that need the whole config: cross-references (``cross_check``, errors) and what a valid
config asks for that this version cannot do, or leaves unusable (``config_warnings``).

``cross_check`` runs once every value has the right type (``gateway.config.parse``):
fallback targets exist, auth blocks are complete, caps are ordered, names are usable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.config.check_routing import routing_errors, routing_warnings
from gateway.config.check_tiers import tier_errors, tier_warnings
from gateway.config.store import store_errors
from gateway.observe.logs import hide_userinfo
from gateway.scrub import MIN_SECRET

if TYPE_CHECKING:
    from gateway.config.model import AuthConfig, Config, UserRateLimit


def cross_check(config: Config) -> list[str]:
    errors: list[str] = []
    names = set(config.targets)
    s = config.server
    if s.default_target is not None and s.default_target not in names:
        errors.append(f"server.default_target: no target named {s.default_target!r}")
    errors += store_errors(config.store)
    if s.cors is not None:
        if not s.cors.allow_origins:
            errors.append("server.cors.allow_origins: give the origins browsers may call from (or [\"*\"]); "
                          "without any, cors changes nothing")
        for i, origin in enumerate(s.cors.allow_origins):
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|null", origin):
                errors.append(f"server.cors.allow_origins[{i}]: {origin!r} is not an origin "
                              "(scheme://host[:port], no path or trailing slash) or \"*\"")
        for i, method in enumerate(s.cors.allow_methods):
            if not re.fullmatch(r"[A-Za-z]{1,16}", method):
                errors.append(f"server.cors.allow_methods[{i}]: {method!r} is not an HTTP method")
    for name, t in config.targets.items():
        p = f"targets.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            errors.append(f"{p}: target names may use letters, digits, '_', '-' and '.' only")
        errors.extend(_check_base_url(t.base_url, f"{p}.base_url"))
        for i, fb in enumerate(t.fallback_targets):
            if fb.target not in names:
                errors.append(f"{p}.fallback_targets[{i}]: no target named {fb.target!r}")
            elif fb.target == name and fb.model is None:
                errors.append(f"{p}.fallback_targets[{i}]: falling back to the same target needs another model")
        if t.stream_recovery == "continue" and t.kind == "http":
            errors.append(f"{p}.stream_recovery: continue needs an LLM target (provider openai, anthropic or mistral)")
        if t.auth is not None:
            errors.extend(_check_auth(t.auth, f"{p}.auth"))
        if t.llm and t.llm.provider and t.provider != t.llm.provider:
            errors.append(f"{p}.llm.provider: {t.llm.provider!r} contradicts the target's provider {t.provider!r}")
        if t.llm:
            errors.extend(_check_caps(t.llm.soft_cost_cap_usd, t.llm.hard_cost_cap_usd, f"{p}.llm"))
        if t.kind == "http":
            if t.llm is not None:
                errors.append(f"{p}.llm: needs an LLM target (provider openai, anthropic or mistral); this one is plain HTTP")
        elif t.retry_non_idempotent:
            errors.append(f"{p}.retry_non_idempotent: applies to plain-HTTP targets only (an LLM target retries its "
                          "POSTs by the retry_matrix)")
    seen: set[str] = set()
    keys: dict[str, str] = {}  # sha256 of a key → the tenant that has it
    for i, tenant in enumerate(config.tenants):
        p = f"tenants[{i}]"
        if tenant.name in seen:
            errors.append(f"{p}.name: duplicate tenant {tenant.name!r}")
        seen.add(tenant.name)
        digest = _key_digest(tenant)
        if digest is not None:  # one key, two tenants: whichever came last would silently get the other's requests
            if digest in keys:
                errors.append(f"{p}: has the same API key as tenant {keys[digest]!r} (each tenant needs its own)")
            keys.setdefault(digest, tenant.name)
        sources = [k for k in ("api_key_env", "api_key", "api_key_sha256") if getattr(tenant, k)]
        if len(sources) != 1:
            given = f" (got {', '.join(sources)})" if sources else ""
            errors.append(f"{p}: set exactly one of api_key_env, api_key, api_key_sha256{given}")
        if tenant.api_key_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", tenant.api_key_sha256):
            errors.append(f"{p}.api_key_sha256: expected 64 hex characters")
        for field in ("budget_caps", "fallback_targets", "cache_ttl_override"):
            for scope in getattr(tenant, field):
                if scope != "*" and scope not in names:
                    errors.append(f"{p}.{field}.{scope}: no target named {scope!r}")
        for scope, caps in tenant.budget_caps.items():
            where = "" if scope == "*" else f".{scope}"
            errors.extend(_check_caps(caps.soft_cost_cap_usd, caps.hard_cost_cap_usd, f"{p}.budget_caps{where}"))
        for scope, entries in tenant.fallback_targets.items():
            where = "" if scope == "*" else f".{scope}"
            for j, fb in enumerate(entries):
                if fb.target not in names:
                    errors.append(f"{p}.fallback_targets{where}[{j}]: no target named {fb.target!r}")
        for j, t in enumerate(tenant.allowed_targets or []):
            if t not in names:
                errors.append(f"{p}.allowed_targets[{j}]: no target named {t!r}")
        if tenant.profile is not None and tenant.profile not in config.client_profiles:
            errors.append(f"{p}.profile: no client profile named {tenant.profile!r}")
        for scope in tenant.budget_caps:
            if scope in names and config.targets[scope].kind == "http":
                errors.append(f"{p}.budget_caps.{scope}: {scope} is a plain-HTTP target, where nothing costs anything")
        for scope in tenant.cache_ttl_override:
            if scope in names and config.targets[scope].cache is None:
                errors.append(f"{p}.cache_ttl_override.{scope}: target {scope} has no cache block, so nothing is cached")
        rl = tenant.rate_limit
        if rl is not None:
            if rl.burst is not None and rl.rpm is None:
                errors.append(f"{p}.rate_limit.burst: is the burst of rpm; set rpm too")
            errors.extend(_check_per_user(rl.per_user, f"{p}.rate_limit.per_user"))
    errors.extend(_check_per_user(config.rate_limit.per_user, "rate_limit.per_user"))
    errors.extend(tier_errors(config))
    errors.extend(routing_errors(config))
    if config.abuse is not None:
        for i, cidr in enumerate(config.abuse.allow):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                errors.append(f"abuse.allow[{i}]: {cidr!r} is not an IP network (e.g. 10.0.0.0/8 or 203.0.113.7)")
    for name, profile in config.client_profiles.items():
        if profile.burst_size is not None and profile.max_qps_per_tenant is None:
            errors.append(f"client_profiles.{name}.burst_size: is the burst of max_qps_per_tenant; set that too")
    # Pools are keyed by provider in the seed wiki (`provider_key_pools: {openai: …}`) or by target name.
    from gateway.config.model import Provider

    providers = set(typing.get_args(Provider))
    for key in config.provider_key_pools:
        if key not in names and key not in providers:
            errors.append(
                f"provider_key_pools.{key}: no target or provider named {key!r} "
                f"(providers: {', '.join(sorted(providers))})"
            )
    return errors


DIALECTS = {"openai": "openai", "mistral": "openai", "anthropic": "anthropic", "http": "http"}


def dialect(provider: str | None) -> str:
    """The wire format a provider speaks: requests pass between two targets unchanged only if they match."""
    return DIALECTS[provider or "http"]


def config_warnings(config: Config, env: Mapping[str, str] = os.environ) -> list[str]:
    """Things a valid config asks for that cannot work; ``--check`` prints them and the server logs
    them at start. Today: a fallback between a plain-HTTP target and an LLM one (OpenAI and
    Anthropic targets are translated into each other; an HTTP API is not) — such entries are skipped;
    an admin API without a key on an address other clients can reach (it answers none of them); a
    key too short to be scrubbed; a client profile no tenant uses."""
    warnings: list[str] = _admin_warning(config, env) + _short_key_warnings(config, env) + _unmetered_warnings(config)
    warnings += tier_warnings(config, env)
    warnings += routing_warnings(config)
    for name, t in config.targets.items():
        for i, fb in enumerate(t.fallback_targets):
            warnings.extend(_dialect_warning(config, name, fb.target, f"targets.{name}.fallback_targets[{i}]"))
    used = {t.profile for t in config.tenants}
    for name in config.client_profiles:
        if name not in used:
            warnings.append(f"client_profiles.{name}: no tenant has profile: {name}, so it applies to nobody")
    for i, tenant in enumerate(config.tenants):
        if tenant.api_key_env and not env.get(tenant.api_key_env):  # (the server says it at start too)
            warnings.append(f"tenants[{i}].api_key_env: environment variable {tenant.api_key_env} is not set; tenant "
                            f"{tenant.name!r} cannot authenticate")
        for scope, entries in tenant.fallback_targets.items():
            if scope == "*":
                continue
            for j, fb in enumerate(entries):
                warnings.extend(_dialect_warning(config, scope, fb.target, f"tenants[{i}].fallback_targets.{scope}[{j}]"))
    return warnings


def _short_key_warnings(config: Config, env: Mapping[str, str]) -> list[str]:
    """Keys too short to be scrubbed from answers and logs (an upstream that quotes one shows it)."""
    found: list[tuple[str, str]] = []
    for name, t in config.targets.items():
        auth = t.auth
        if auth is None:
            continue
        if auth.token:
            found.append((f"targets.{name}.auth.token", auth.token))
        for var in [auth.env_var] if auth.env_var else auth.env_vars or []:
            found.append((f"targets.{name}.auth: {var}", env.get(var, "")))
    for i, tenant in enumerate(config.tenants):
        found.append((f"tenants[{i}].api_key", tenant.api_key or ""))
        if tenant.api_key_env:
            found.append((f"tenants[{i}].api_key_env: {tenant.api_key_env}", env.get(tenant.api_key_env, "")))
    for pool, keys in config.provider_key_pools.items():
        for key in keys.keys:
            value = env.get(key.api_key[4:], "") if key.api_key.startswith("env:") else key.api_key
            found.append((f"provider_key_pools.{pool}.{key.id}", value))
    return [f"{where}: the key is shorter than {MIN_SECRET} characters, so it is not scrubbed from answers "
            "and logs (an upstream that quotes it back shows it)" for where, value in found if 0 < len(value) < MIN_SECRET]


def _unmetered_warnings(config: Config) -> list[str]:
    """A tenant with a spend budget that can reach a plain-HTTP target: what it spends there is not metered
    (an LLM API configured without ``provider:`` is a plain-HTTP target to the gateway)."""
    plain = [name for name, t in config.targets.items() if t.kind == "http"]
    found = []
    for i, tenant in enumerate(config.tenants):
        if tenant.budget is None or (tenant.budget.daily_usd is None and tenant.budget.monthly_usd is None):
            continue
        reach = [n for n in plain if tenant.allowed_targets is None or n in tenant.allowed_targets]
        if reach:
            found.append(f"tenants[{i}] ({tenant.name}) has a spend budget and may call plain-HTTP target(s) "
                         f"{', '.join(reach)}, where nothing is metered; limit it with allowed_targets, or give an "
                         "LLM API its provider:")
    return found


def _admin_warning(config: Config, env: Mapping[str, str]) -> list[str]:
    host, name = config.server.host, config.server.admin_key_env
    if _is_loopback_host(host) or (name and env.get(name)):
        return []
    why = f"server.admin_key_env: {name} is empty" if name else "server.admin_key_env is not set"
    return [f"{why} and server.host {host!r} is not a loopback address: the admin API answers only loopback "
            "peers without forwarding headers; set server.admin_key_env to use it remotely"]


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "", a hostname (it may resolve to anything) or a LAN name
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _dialect_warning(config: Config, source: str, to: str, path: str) -> list[str]:
    a, b = config.targets[source].provider, config.targets[to].provider
    if (dialect(a) == "http") == (dialect(b) == "http"):
        return []
    return [f"{path}: target {to!r} speaks the {dialect(b)} dialect and {source!r} the {dialect(a)} one; "
            f"a plain-HTTP target and an LLM target cannot stand in for each other: this entry is skipped"]


def _key_digest(tenant: Any) -> str | None:
    """SHA-256 (hex) of a tenant's key, however it is given (an unset variable: none)."""
    if tenant.api_key_sha256:
        return tenant.api_key_sha256.lower()
    key = tenant.api_key or (os.environ.get(tenant.api_key_env) if tenant.api_key_env else None)
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest() if key else None


def _check_caps(soft: float | None, hard: float | None, path: str) -> list[str]:
    if soft is not None and hard is not None and hard < soft:
        return [f"{path}.hard_cost_cap_usd: must be >= soft_cost_cap_usd ({hard:g} < {soft:g})"]
    return []


def _check_base_url(url: str, path: str) -> list[str]:
    m = re.fullmatch(r"(https?)://([^/?#@\s]+)(/[^?#\s]*)?", url)
    if not m:
        shown = re.sub(r"([?#]).*", r"\1***", hide_userinfo(url), flags=re.S)  # a password or key in it: never echoed
        return [f"{path}: expected an absolute http(s) URL without query, fragment or credentials, got {shown!r}"]
    return []


_AUTH_FIELDS = {  # what each auth type reads
    "bearer_env": {"env_var", "env_vars", "prefix", "qps_per_key"},
    "bearer_static": {"token", "qps_per_key"},
    "header_env": {"header", "env_var", "env_vars", "prefix", "qps_per_key"},
    "passthrough": set(),
    "none": set(),
}


def _check_auth(auth: AuthConfig, path: str) -> list[str]:
    needs = {
        "bearer_env": ("env_var or env_vars", auth.env_var or auth.env_vars),
        "bearer_static": ("token", auth.token),
        "header_env": ("header and env_var", auth.header and (auth.env_var or auth.env_vars)),
    }
    if auth.type in needs and not needs[auth.type][1]:
        return [f"{path}: type {auth.type} needs {needs[auth.type][0]}"]
    errors = [f"{path}.{field}: type {auth.type} does not use it" for field in auth.__struct_fields__
              if field != "type" and getattr(auth, field) is not None and field not in _AUTH_FIELDS[auth.type]]
    if auth.env_var and auth.env_vars:
        errors.append(f"{path}: give env_var (one key) or env_vars (a pool), not both")
    return errors


def _check_per_user(per_user: UserRateLimit | None, path: str) -> list[str]:
    if per_user is not None and per_user.rpm is None and per_user.rph is None:
        return [f"{path}: give rpm and/or rph"]
    return []
