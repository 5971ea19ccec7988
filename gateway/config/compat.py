"""Fold the seed documents' alternative config spellings into the canonical shape.

The seed README, wiki and architecture notes show several forms for the same
setting; each must load verbatim (SPEC §4). This module rewrites the raw YAML
tree before type checking, so the Structs in ``gateway.config.model`` have one shape:

- ``retry: {"429": {retries, backoff}, network: …}`` and ``retry: {max_attempts, backoff_ms}``
  → ``retry_matrix``; the class ``network`` → ``net``
- ``circuit_breaker: {failure_threshold, recovery_timeout[_s]}`` → ``circuit``
- top-level ``retry:`` / ``circuit_breaker:`` (seed 001) and ``defaults:`` (any target fields) → every
  target that does not set its own (in any spelling); ``cache: {ttl}`` → ``cache.ttl_s``
- ``auth: {type: api_key, header, env_var}`` → ``header_env``
- ``llm.model`` → ``llm.default_model``; ``llm.fallback_targets`` → the target's list
- ``fallback_targets: [name | {target, model}]`` → a list of ``{target, model}``
- tenants as a mapping ``{name: {...}}`` → a list; ``rate_limit_rpm`` → ``rate_limit.rpm``;
  flat ``budget_caps`` / list ``fallback_targets`` / number ``cache_ttl_override``
  → per-target maps under the key ``"*"`` (applies to every target)
- ``store: {sentinel | cluster: …}`` is another spelling of ``store.url`` (written into it after the type
  checks, ``gateway.config.store``): here, where a given ``url`` can still be told from the default, both is an error;
  so is a block left empty (``cluster:`` alone is null), and a value that is not valid text (a lone surrogate)

Anything of an unexpected type is left alone for the type checker to report.
"""

from __future__ import annotations

import copy
from typing import Any

_CAPS_KEYS = {"soft_cost_cap_usd", "hard_cost_cap_usd"}


# A target's own setting in any spelling: a default in another spelling must not override it.
_SAME = {"retry": ("retry", "retry_matrix"), "retry_matrix": ("retry", "retry_matrix"),
         "circuit_breaker": ("circuit_breaker", "circuit"), "circuit": ("circuit_breaker", "circuit")}


def normalize(raw: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    raw = dict(raw)
    for section, value in raw.items():  # (a tenant named so broke the log line, /metrics and the page for everyone)
        if section != "store":
            errors.extend(f"{path}: holds a character that is not valid text (a lone surrogate such as \\ud800; the "
                          "value is not shown)" for path in _not_text(value, str(section)))
    defaults = _defaults(raw, errors)
    if defaults:  # checked as written, whether or not a target takes them (a typo must not pass because all override)
        errors.extend(_defaults_errors(defaults))
    targets = raw.get("targets")
    if defaults and isinstance(targets, dict):
        raw["targets"] = targets = {name: _with_defaults(t, defaults) if isinstance(t, dict) else t
                                    for name, t in targets.items()}
    if isinstance(targets, dict):
        raw["targets"] = {
            name: _target(t, f"targets.{name}", errors) if isinstance(t, dict) else t for name, t in targets.items()
        }
    store = raw.get("store")
    if isinstance(store, dict):
        _store(store, errors)
    tenants = raw.get("tenants")
    if isinstance(tenants, dict):
        tenants = [{"name": name, **t} if isinstance(t, dict) else t for name, t in tenants.items()]
    if isinstance(tenants, list):
        raw["tenants"] = [_tenant(t, f"tenants[{i}]", errors) if isinstance(t, dict) else t for i, t in enumerate(tenants)]
    return raw


def _store(store: dict[str, Any], errors: list[str]) -> None:
    if "url" in store and ("sentinel" in store or "cluster" in store):
        block = "sentinel" if "sentinel" in store else "cluster"
        errors.append(f"store.url: give either url or a {block} block, not both")
    for block in ("sentinel", "cluster"):  # ``cluster:`` with nothing after it must not mean the memory store
        if block in store and store[block] is None:
            errors.append(f"store.{block}: expected a mapping, got null")
    errors.extend(f"{path}: holds a character that is not valid text (a lone surrogate such as \\ud800; the "
                  "value is not shown)" for path in _not_text(store, "store"))


def _not_text(value: Any, path: str) -> list[str]:
    """Where a string cannot be encoded (a YAML "\\ud800" escape): it would fail only when sent."""
    if isinstance(value, dict):
        found: list[str] = []
        for k, v in value.items():
            name = k
            if isinstance(k, str) and _not_text(k, path):  # a key that is no text: named by where it is, not shown
                found.append(f"{path} (a key)")
                name = "<key>"
            found.extend(_not_text(v, f"{path}.{name}"))
        return found
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _not_text(v, f"{path}[{i}]")]
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return [path]
    return []


def _defaults(raw: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """``defaults:`` (any target fields) with the top-level ``retry:`` / ``circuit_breaker:`` blocks of seed 001
    folded in: what every target that does not set its own gets. Removed from ``raw``."""
    defaults = raw.pop("defaults", None)
    if defaults is None:
        defaults = {}
    elif not isinstance(defaults, dict):
        errors.append(f"defaults: expected a mapping of target fields, got {type(defaults).__name__}")
        defaults = {}
    defaults = dict(defaults)
    for key in ("retry", "circuit_breaker"):
        if key in raw:
            if any(k in defaults for k in _SAME[key]):
                errors.append(f"{key}: also given under defaults; give it once")
            defaults[key] = raw.pop(key)
    return defaults


def _defaults_errors(defaults: dict[str, Any]) -> list[str]:
    """``defaults`` (with the top-level ``retry:`` / ``circuit_breaker:``) checked as a target's fields, under
    ``defaults.`` (``parse_config`` drops a target's copy of the same error)."""
    from gateway.config.load import check_types
    from gateway.config.model import TargetConfig

    found: list[str] = []
    probe = _target({**copy.deepcopy(defaults), "base_url": "https://defaults.invalid"}, "defaults", found)
    check_types(probe, TargetConfig, "defaults", found, {})
    return found


def _with_defaults(t: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(t)
    for key, value in defaults.items():
        if not any(k in t for k in _SAME.get(key, (key,))):
            out[key] = copy.deepcopy(value)
    return out


def _target(t: dict[str, Any], path: str, errors: list[str]) -> dict[str, Any]:
    t = dict(t)
    cache = t.get("cache")
    if isinstance(cache, dict) and "ttl" in cache:  # seed 001: cache: {ttl: 300}
        cache = dict(cache)
        if "ttl_s" in cache:
            errors.append(f"{path}.cache.ttl: give either ttl or ttl_s, not both")
        cache["ttl_s"] = cache.pop("ttl")
        t["cache"] = cache
    if "circuit_breaker" in t:
        if "circuit" in t:
            errors.append(f"{path}.circuit_breaker: give either circuit or circuit_breaker, not both")
        cb = t.pop("circuit_breaker")
        if isinstance(cb, dict):
            cb = dict(cb)
            if "failure_threshold" in cb:
                cb["error_threshold"] = cb.pop("failure_threshold")
            for old in ("recovery_timeout", "recovery_timeout_s"):
                if old in cb:
                    cb["cooldown_s"] = cb.pop(old)
        t["circuit"] = cb
    if "retry" in t:
        if "retry_matrix" in t:
            errors.append(f"{path}.retry: give either retry_matrix or retry, not both")
        t["retry_matrix"] = _seed_retry(t.pop("retry"))
    if isinstance(t.get("retry_matrix"), dict):
        matrix = t["retry_matrix"]
        if "network" in matrix and "net" in matrix:
            errors.append(f"{path}.retry_matrix.network: give either net or network, not both")
        t["retry_matrix"] = {("net" if k == "network" else k): v for k, v in matrix.items()}
    auth = t.get("auth")
    if isinstance(auth, dict) and auth.get("type") == "api_key":
        t["auth"] = {**auth, "type": "header_env"}
    llm = t.get("llm")
    if isinstance(llm, dict):
        llm = dict(llm)
        if "model" in llm:
            if "default_model" in llm:
                errors.append(f"{path}.llm.model: give either model or default_model, not both")
            llm["default_model"] = llm.pop("model")
        if "fallback_targets" in llm:
            moved = llm.pop("fallback_targets")
            if "fallback_targets" in t:
                errors.append(f"{path}.llm.fallback_targets: already set on the target")
            else:
                t["fallback_targets"] = moved
        t["llm"] = llm
    if isinstance(t.get("fallback_targets"), list):
        t["fallback_targets"] = _fallbacks(t["fallback_targets"])
    return t


def _seed_retry(retry: Any) -> Any:
    """``{max_attempts, backoff_ms}`` or ``{class: {retries, backoff}}`` → retry_matrix."""
    if not isinstance(retry, dict):
        return retry
    if "max_attempts" in retry or "backoff_ms" in retry:
        # max_attempts counts the first try; attempts counts retries after it. A value of the
        # wrong type is passed on unchanged so the type checker reports it (instead of an
        # "unknown key max_attempts").
        rule: dict[str, Any] = {}
        if "max_attempts" in retry:
            n = retry["max_attempts"]
            rule["attempts"] = max(0, n - 1) if _is_number(n) and not isinstance(n, float) else n
        if "backoff_ms" in retry:
            ms = retry["backoff_ms"]
            rule["base_s"] = ms / 1000 if _is_number(ms) else ms
        extra = {k: v for k, v in retry.items() if k not in ("max_attempts", "backoff_ms")}
        return {cls: {**rule, **extra} for cls in ("429", "5xx", "net")}
    out = {}
    for cls, rule in retry.items():
        if isinstance(rule, dict):
            rule = dict(rule)
            if "retries" in rule:
                rule["attempts"] = rule.pop("retries")
            if _is_number(rule.get("backoff")):
                rule["base_s"] = rule.pop("backoff")
        out[cls] = rule
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fallbacks(entries: list[Any]) -> list[Any]:
    return [{"target": e} if isinstance(e, str) else e for e in entries]


def _tenant(t: dict[str, Any], path: str, errors: list[str]) -> dict[str, Any]:
    t = dict(t)
    if "rate_limit_rpm" in t:
        rl = t.get("rate_limit") if isinstance(t.get("rate_limit"), dict) else {}
        if "rpm" in rl:
            errors.append(f"{path}.rate_limit_rpm: give either rate_limit_rpm or rate_limit.rpm, not both")
        t["rate_limit"] = {**rl, "rpm": t.pop("rate_limit_rpm")}
    caps = t.get("budget_caps")
    # The wiki's flat form: a caps key (or any non-mapping value) at the top. Anything else is
    # the per-target form. A typo inside the flat form is then reported as an unknown caps key.
    if isinstance(caps, dict) and (
        not caps or set(caps) & _CAPS_KEYS or not any(isinstance(v, dict) for v in caps.values())
    ):
        t["budget_caps"] = {"*": caps} if caps else {}
    fbs = t.get("fallback_targets")
    if isinstance(fbs, list):
        t["fallback_targets"] = {"*": _fallbacks(fbs)}
    elif isinstance(fbs, dict):
        t["fallback_targets"] = {k: _fallbacks(v) if isinstance(v, list) else v for k, v in fbs.items()}
    ttl = t.get("cache_ttl_override")
    if _is_number(ttl):
        t["cache_ttl_override"] = {"*": ttl}
    return t
