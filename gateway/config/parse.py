"""Reading a config: YAML text or file → a checked, resolved ``Config`` (or ``ConfigError`` with
every problem). The steps: YAML (``load``), ``${VAR}`` expansion, the seed documents' spellings
folded in (``compat``), retry defaults merged, path-aware type checks, decoding into the model
(``model``), derived defaults (each target's provider), whole-config checks (``check``)."""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gateway.config import compat as config_compat
from gateway.config.check import cross_check
from gateway.config.load import StrKeyLoader, check_types, expand_env, kind, msgspec_message, yaml_message
from gateway.config.model import Config, _default_retry_matrix
from gateway.config.store import resolve as resolve_store


class ConfigError(Exception):
    """Every problem found in one config, each line prefixed with its path."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        super().__init__("\n".join(errors))


DEFAULT_CONFIG_TEXT = (Path(__file__).with_name("default.yaml")).read_text()


def load_config(path: str | os.PathLike[str] | None = None, *, env: typing.Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (None: the built-in default) or raise ConfigError listing every problem."""
    if path is None:
        return parse_config(DEFAULT_CONFIG_TEXT, source="<built-in default>", env=env)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}"], source=str(path)) from None
    try:  # (YAML is UTF-8; nothing of a file that is not is shown: it may hold keys)
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"(file): not valid UTF-8 at byte {e.start} (line {line}); save it as UTF-8"],
                          source=str(path)) from None
    return parse_config(text, source=str(path), env=env)


def parse_config(text: str, *, source: str = "config", env: typing.Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    try:
        raw = yaml.load(text, Loader=StrKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError([yaml_message(e)], source=source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): expected a mapping, got {kind(raw)}"], source=source)
    errors: list[str] = []
    env_text: dict[str, str] = {}  # path → expanded text of a ${VAR} value re-read as a number/bool
    unset: set[str] = set()  # paths whose ${VAR} is unset (already reported; don't also report "got str")
    raw = expand_env(raw, "", env, errors, env_text, unset)
    raw = config_compat.normalize(raw, errors)
    _fill_retry_defaults(raw)
    check_errors: list[str] = []
    raw = check_types(raw, Config, "", check_errors, env_text)
    errors.extend(e for e in check_errors if e.split(": ", 1)[0] not in unset)
    said = {e[9:] for e in errors if e.startswith("defaults.")}
    if said:  # a mistake in defaults: once, there — not again for every target that took it
        prefixes = tuple(f"targets.{name}." for name in raw.get("targets") or {} if isinstance(name, str))
        errors = [e for e in errors if not any(e.startswith(p) and e[len(p):] in said for p in prefixes)]
    if errors:  # the rest is checked too, the bad values left out: every mistake at once (CONFIGURATION.md)
        errors.extend(e for e in _cross_check_without(raw, errors) if e not in errors)
        raise ConfigError(errors, source=source)
    try:
        config = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:  # a safety net: check_types should have caught it with a better message
        where = str(e).partition(" - at `$")[2].rstrip("`").lstrip(".")
        raise ConfigError([f"{where or '(top level)'}: {msgspec_message(e)}"], source=source) from None
    config = _resolve(config)
    errors = cross_check(config)
    if errors:
        raise ConfigError(errors, source=source)
    return config


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _cross_check_without(raw: dict[str, Any], errors: list[str]) -> list[str]:
    """``cross_check``'s errors of ``raw`` with the values ``errors`` name left out (defaults in their place); none
    when what is left is no config either (a required value was bad)."""
    trimmed = copy.deepcopy(raw)
    for error in errors:
        steps = [(k, int(i) if i else None) for k, i in _STEP.findall(error.split(": ", 1)[0])]
        node: Any = trimmed
        for n, (key, index) in enumerate(steps):
            last = n == len(steps) - 1
            if index is not None:
                if not isinstance(node, list) or index >= len(node):
                    break
                if last:
                    node[index] = None
                    break
                node = node[index]
            else:
                if not isinstance(node, dict) or key not in node:
                    break
                if last:
                    del node[key]
                    break
                node = node[key]
    try:
        found = cross_check(_resolve(msgspec.convert(trimmed, Config, strict=True)))
    except Exception:  # noqa: BLE001 — only a best effort: the errors already found are what counts
        return []
    bad = [e.split(": ", 1)[0] for e in errors]  # (a value left out is no second mistake where it was)
    return [e for e in found if not any(b.startswith(p) or p.startswith(b) for p in [e.split(": ", 1)[0]] for b in bad)]


def _fill_retry_defaults(raw: dict[str, Any]) -> None:
    """A target's ``retry_matrix`` overrides the defaults class by class and field by field.

    Classes the user leaves out keep their defaults (``timeout`` stays at 0 retries when
    only ``"429"``/``"5xx"``/``"net"`` are given), and so do the fields left out of a class.
    """
    targets = raw.get("targets")
    if not isinstance(targets, dict):
        return
    defaults = msgspec.to_builtins(_default_retry_matrix())
    for t in targets.values():
        if not isinstance(t, dict) or not isinstance(t.get("retry_matrix"), dict):
            continue
        given = t["retry_matrix"]
        merged: dict[str, Any] = {cls: dict(rule) for cls, rule in defaults.items()}
        for cls, rule in given.items():
            merged[cls] = {**merged[cls], **rule} if cls in merged and isinstance(rule, dict) else rule
        t["retry_matrix"] = merged


_PROVIDER_HOSTS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic", "api.mistral.ai": "mistral"}


def _resolve(config: Config) -> Config:
    """Fill in derived defaults: each target's effective provider; the store's URL from its block."""
    targets = {}
    for name, t in config.targets.items():
        provider = t.provider or (t.llm.provider if t.llm else None)
        if provider is None:
            host = re.sub(r"^[a-z]+://", "", t.base_url).split("/")[0].split(":")[0].lower()
            provider = _PROVIDER_HOSTS.get(host, "openai" if t.llm else "http")
        targets[name] = msgspec.structs.replace(t, provider=provider)
    return msgspec.structs.replace(config, targets=targets, store=resolve_store(config.store))



