"""Cross-checks of ``routing:`` (virtual models), run with the others (``gateway.config.check``).

Errors: a target that does not exist or is plain HTTP, a model nothing serves, a rule model that is itself
virtual (one step of resolution only), a regex that does not compile, a header condition with both
``equals`` and ``matches``, ``min_prompt_tokens`` over ``max_prompt_tokens``, a tier no ``tiers:`` entry
defines, two rules of one name, a scorer that cannot be imported. Warning: a virtual name that a target's
``models`` glob also matches — the virtual model wins (it is resolved before any glob routes), so a real
model of that name is only reached through a rule that names it.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config.model import Config, RouteWhen

CATCH_ALL = frozenset(("*", "**"))


def routing_errors(config: Config) -> list[str]:
    errors: list[str] = []
    for name, vm in config.routing.items():
        p = f"routing.{name}"
        if not name.strip():
            errors.append(f"{p}: a virtual model needs a name")
        seen: set[str] = set()
        for i, rule in enumerate(vm.rules):
            rp = f"{p}.rules[{i}]"
            label = rule.name or f"rules[{i}]"
            if label in seen:
                errors.append(f"{rp}.name: duplicate rule name {label!r}")
            seen.add(label)
            errors.extend(_check_choice(config, rule.model, rule.target, rp, "model", "target"))
            errors.extend(_check_when(config, rule.when, f"{rp}.when"))
        errors.extend(_check_choice(config, vm.default, vm.default_target, p, "default", "default_target"))
        if vm.scorer is not None:
            from gateway.upstream.routing import load_scorer

            try:
                load_scorer(vm.scorer)
            except ValueError as e:
                errors.append(f"{p}.scorer: {e}")
    return errors


def routing_warnings(config: Config) -> list[str]:
    warnings = []
    for name in config.routing:
        for target, t in config.targets.items():
            glob = next((g for g in t.models if g not in CATCH_ALL and fnmatch.fnmatchcase(name, g)), None)
            if glob is not None:
                warnings.append(f"routing.{name}: targets.{target}.models {glob!r} matches it too; requests naming "
                                f"{name!r} are resolved by its rules (a rule may still name {name!r} itself)")
    return warnings


def _check_choice(config: Config, model: str, target: str | None, p: str, model_field: str,
                  target_field: str) -> list[str]:
    """A rule's (or the default's) model and target: the model concrete, the target an existing LLM target."""
    if model in config.routing:
        return [f"{p}.{model_field}: {model!r} is a virtual model itself; name a concrete model"]
    if target is not None:
        if target not in config.targets:
            return [f"{p}.{target_field}: no target named {target!r}"]
        routed_to = target
    else:
        routed_to = _route(config, model)
        if routed_to is None:
            return [f"{p}.{model_field}: no target serves model {model!r} (no models glob matches it and there is "
                    f"no server.default_target); give {target_field}"]
    if config.targets[routed_to].kind == "http":
        where = f"{p}.{target_field}" if target is not None else f"{p}.{model_field}"
        return [f"{where}: target {routed_to!r} is plain HTTP; a virtual model needs an LLM target"]
    return []


def _route(config: Config, model: str) -> str | None:
    """The target a concrete model goes to on ``/v1`` (``gateway.upstream.targets.Router.for_v1``)."""
    for name, t in config.targets.items():
        if any(fnmatch.fnmatchcase(model, g) for g in t.models):
            return name
    default = config.server.default_target
    return default if default in config.targets else None


def _check_when(config: Config, when: RouteWhen, p: str) -> list[str]:
    errors = []
    for field, pattern in (("last_user_matches", when.last_user_matches),
                           ("header.matches", when.header.matches if when.header else None)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                errors.append(f"{p}.{field}: not a regular expression: {e}")
    if when.header is not None and when.header.equals is not None and when.header.matches is not None:
        errors.append(f"{p}.header: give equals or matches, not both")
    low, high = when.min_prompt_tokens, when.max_prompt_tokens
    if low is not None and high is not None and low > high:
        errors.append(f"{p}.min_prompt_tokens: is over max_prompt_tokens ({low} > {high}): the rule never applies")
    tiers = getattr(config, "tiers", None)
    if when.tier is not None and isinstance(tiers, dict):
        for tier in [when.tier] if isinstance(when.tier, str) else when.tier:
            if tier not in tiers:
                errors.append(f"{p}.tier: no tier named {tier!r}")
    return errors
