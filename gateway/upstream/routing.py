"""Virtual models (``routing:``): a model name such as ``auto`` that is resolved per request, by ordered
rules, to a concrete model — and maybe a target — before the request goes anywhere (RouteLLM-style,
without weights: prompt size, tools, images, JSON mode, the last user message, tier, a header).

``Routes`` is built once per config (regexes compiled, the scorer imported); ``Routes.get`` is the only
per-request cost for a request naming a real model (one dict lookup). For a virtual one, ``read_facts``
reads what the rules need from the body (a pure function of the bytes, so a large body is read in a
helper process) and ``VirtualRoute.decide`` picks the first rule that applies, else the default. The edge
(``gateway.edge.routed``) rewrites the body's model, picks the target and reports the decision.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import msgspec

from gateway.config.model import Config, RouteRule, RouteWhen, VirtualModel
from providers import endpoints, estimate

SEARCH_MAX_CHARS = 100_000  # a regex reads at most this much of the last user message (a bound on its time)
JSON_FORMATS = frozenset(("json_object", "json_schema"))
TEXT_PARTS = frozenset(("text", "input_text"))
DEFAULT_RULE = "default"

log = logging.getLogger("reliapi")


class Facts:
    """What the rules may ask of a request body — read-only for a scorer too."""

    __slots__ = ("prompt_tokens", "has_tools", "has_images", "json_mode", "last_user")

    def __init__(self, prompt_tokens: int = 0, has_tools: bool = False, has_images: bool = False,
                 json_mode: bool = False, last_user: str = "") -> None:
        self.prompt_tokens = prompt_tokens  # the SPEC §5 estimate (only when a rule asks for it, else 0)
        self.has_tools = has_tools
        self.has_images = has_images
        self.json_mode = json_mode
        self.last_user = last_user  # the text of the last user message (at most SEARCH_MAX_CHARS)

    def __reduce__(self) -> tuple[Any, ...]:  # slots: picklable back from a helper process
        return Facts, (self.prompt_tokens, self.has_tools, self.has_images, self.json_mode, self.last_user)


class _Body(msgspec.Struct):
    messages: Any = None  # chat, messages
    input: Any = None  # responses
    tools: Any = None
    functions: Any = None  # the legacy chat form of tools
    response_format: Any = None  # chat: {type: json_object | json_schema}
    text: Any = None  # responses: {format: {type: …}}
    output_format: Any = None  # messages (structured outputs)


_decode_body = msgspec.json.Decoder(_Body).decode


def read_facts(body: bytes, billed: str, tokens: bool) -> Facts:
    """The facts of a request body to the ``billed`` endpoint; ``tokens``: estimate the prompt too. A body that
    is not a JSON object has none (every rule about it fails; the upstream says what is wrong with it)."""
    try:
        doc = _decode_body(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return Facts()
    messages = doc.messages if isinstance(doc.messages, list) else []
    if isinstance(doc.input, str):
        messages = [*messages, {"role": "user", "content": doc.input}]
    elif isinstance(doc.input, list):
        messages = [*messages, *doc.input]
    facts = Facts(
        has_tools=bool(doc.tools) or bool(doc.functions),
        has_images=any(isinstance(m, dict) and _has_image(m.get("content"), 0) for m in messages),
        json_mode=_json_mode(doc),
        last_user=_last_user(messages)[:SEARCH_MAX_CHARS],
    )
    if tokens:
        try:
            facts.prompt_tokens = estimate.read(body, billed or endpoints.CHAT).estimate_prompt()
        except estimate.NotReadable:
            pass
    return facts


def _has_image(content: Any, depth: int) -> bool:
    if not isinstance(content, list) or depth > 8:
        return False
    for part in content:
        if isinstance(part, dict):
            if part.get("type") in estimate.IMAGE_PARTS:
                return True
            if _has_image(part.get("content"), depth + 1):  # an Anthropic tool_result's own blocks
                return True
    return False


def _json_mode(doc: _Body) -> bool:
    for holder in (doc.response_format, doc.output_format, doc.text.get("format") if isinstance(doc.text, dict) else None):
        if isinstance(holder, dict) and holder.get("type") in JSON_FORMATS:
            return True
    return False


def _last_user(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(p["text"] for p in content
                                 if isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str))
            return ""
    return ""


class Decision(NamedTuple):
    """What a virtual model became for one request."""

    virtual: str  # the name the client sent
    rule: str  # the rule's name, or "default"
    model: str
    target: str | None  # the rule's target; None: the model's usual route


Headers = Mapping[str, str]
Scorer = Callable[[Facts, Headers, "str | None"], "str | None"]


class _Rule:
    __slots__ = ("name", "model", "target", "checks")

    def __init__(self, rule: RouteRule, index: int) -> None:
        self.name = rule.name or f"rules[{index}]"
        self.model = rule.model
        self.target = rule.target
        self.checks = _checks(rule.when)

    def applies(self, facts: Facts, headers: Headers, tier: str | None) -> bool:
        return all(check(facts, headers, tier) for check in self.checks)


Check = Callable[[Facts, Headers, "str | None"], bool]


def _checks(when: RouteWhen) -> list[Check]:
    """The rule's conditions as small predicates, the cheap ones first."""
    checks: list[Check] = []
    if when.tier is not None:
        tiers = frozenset([when.tier] if isinstance(when.tier, str) else when.tier)
        checks.append(lambda f, h, tier: tier in tiers)
    if when.header is not None:
        name, equals = when.header.name, when.header.equals
        pattern = re.compile(when.header.matches) if when.header.matches is not None else None
        if equals is not None:
            checks.append(lambda f, h, t: h.get(name) == equals)
        elif pattern is not None:
            checks.append(lambda f, h, t: (value := h.get(name)) is not None and pattern.search(value) is not None)
        else:
            checks.append(lambda f, h, t: name in h)
    for flag in ("has_tools", "has_images", "json_mode"):
        wanted = getattr(when, flag)
        if wanted is not None:
            checks.append(lambda f, h, t, flag=flag, wanted=wanted: getattr(f, flag) is wanted)
    low, high = when.min_prompt_tokens, when.max_prompt_tokens
    if low is not None:
        checks.append(lambda f, h, t: f.prompt_tokens >= low)
    if high is not None:
        checks.append(lambda f, h, t: f.prompt_tokens <= high)
    if when.last_user_matches is not None:
        text = re.compile(when.last_user_matches)
        checks.append(lambda f, h, t: text.search(f.last_user) is not None)
    return checks


class VirtualRoute:
    """One virtual model's rules, compiled."""

    __slots__ = ("name", "rules", "by_name", "default", "default_target", "tokens", "scorer")

    def __init__(self, name: str, vm: VirtualModel, scorer: Scorer | None) -> None:
        self.name = name
        self.rules = [_Rule(rule, i) for i, rule in enumerate(vm.rules)]
        self.by_name = {rule.name: rule for rule in self.rules}
        self.default = vm.default
        self.default_target = vm.default_target
        self.tokens = any(r.min_prompt_tokens is not None or r.max_prompt_tokens is not None
                          for r in (rule.when for rule in vm.rules)) or scorer is not None
        self.scorer = scorer

    def decide(self, facts: Facts, headers: Headers, tier: str | None) -> Decision:
        if self.scorer is not None:
            try:
                named = self.scorer(facts, headers, tier)
            except Exception:  # a broken scorer must not fail the request: the rules decide
                log.exception("routing scorer failed", extra={"fields": {"virtual_model": self.name}})
                named = None
            picked = self.by_name.get(named) if isinstance(named, str) else None
            if picked is not None:
                return Decision(self.name, picked.name, picked.model, picked.target)
        for rule in self.rules:
            if rule.applies(facts, headers, tier):
                return Decision(self.name, rule.name, rule.model, rule.target)
        return Decision(self.name, DEFAULT_RULE, self.default, self.default_target)


class Routes:
    """Every virtual model of a config by name."""

    def __init__(self, config: Config) -> None:
        self._routes = {name: VirtualRoute(name, vm, load_scorer(vm.scorer) if vm.scorer else None)
                        for name, vm in config.routing.items()}
        self.names = frozenset(self._routes)  # a membership test on the hot path: most requests name a real model

    def get(self, model: str | None) -> VirtualRoute | None:
        return self._routes.get(model) if model is not None and self._routes else None


def load_scorer(spec: str) -> Scorer:
    """``package.module:callable`` → the callable; raises ``ValueError`` saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected package.module:callable, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an ImportError, or whatever the module raised while importing
        raise ValueError(f"cannot import {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn  # type: ignore[return-value]
