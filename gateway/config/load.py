"""The generic half of config loading: YAML, ``${VAR}`` expansion and path-aware type checks.

``gateway.config.model`` owns the Structs and the rules about them; this module knows
nothing of their meaning. It turns YAML text into plain data (every mapping key a
string), expands environment references, and checks plain data against a type
annotation field by field, collecting every error with its path instead of
stopping at the first one as ``msgspec.convert`` would.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Struct


def yaml_message(e: yaml.YAMLError) -> str:
    """One line: where the YAML broke and why (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or problem is None:
        return f"invalid YAML: {' '.join(str(e).split())}"
    text = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {context_mark.line + 1}" if context_mark is not None else "") + ")"
    return text


class StrKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mapping keys are always strings (``429:`` == ``"429":``)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[str, Any]:
    # A key written twice in one mapping (e.g. two `targets:` blocks) would silently drop the
    # first one; YAML forbids it, so it is an error. Keys pulled in by a `<<:` merge may be
    # overridden, so only the mapping's own keys are compared.
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = _key_str(loader.construct_object(key_node, deep=True))
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[_key_str(key)] = loader.construct_object(value_node, deep=True)
    return out


def _key_str(key: Any) -> str:
    return "" if key is None else str(key).lower() if isinstance(key, bool) else str(key)


StrKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(
    value: Any, path: str, env: typing.Mapping[str, str], errors: list[str],
    env_text: dict[str, str], unset: set[str],
) -> Any:
    if isinstance(value, dict):
        return {k: expand_env(v, join(path, k), env, errors, env_text, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", env, errors, env_text, unset) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if default is not None:  # ${VAR:-default}: the default when VAR is unset or empty, as in a shell
            return env.get(name) or default
        if name in env:
            return env[name]
        where = path or "(top level)"
        errors.append(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} for a default)")
        unset.add(where)
        return ""

    expanded = _ENV_REF.sub(sub, value)
    if _ENV_REF.fullmatch(value):
        try:
            scalar = yaml.safe_load(expanded) if expanded else ""
        except yaml.YAMLError:
            return expanded
        if isinstance(scalar, (int, float, bool)):
            # Kept as text too: a str field (a numeric API key, say) gets the text back in check_types.
            env_text[path] = expanded
            return scalar
    return expanded


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "str", int: "int", float: "float", bool: "bool", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def check_types(value: Any, typ: Any, path: str, errors: list[str], env_text: typing.Mapping[str, str]) -> Any:
    """Type-check ``value`` against ``typ`` recursively, appending every error with its path.

    Returns the value, where a ``${VAR}`` that was re-read as a number or bool but sits in a
    str field is given back as the text (``api_key: ${KEY}`` with ``KEY=12345``).
    """
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if isinstance(typ, type) and issubclass(typ, Struct):
        if not isinstance(value, dict):
            errors.append(f"{path or '(top level)'}: expected a mapping, got {kind(value)}")
            return value
        hints = typing.get_type_hints(typ, include_extras=True)
        fields = {f.encode_name: f for f in msgspec.structs.fields(typ)}
        out = dict(value)
        for key in value:
            if key not in fields:
                errors.append(f"{join(path, key)}: unknown key (allowed: {', '.join(sorted(fields))})")
        for name, f in fields.items():
            if name in value:
                out[name] = check_types(value[name], hints[f.name], join(path, name), errors, env_text)
            elif f.required:
                errors.append(f"{join(path, name)}: required")
        return out
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return value
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return check_types(value, rest[0], path, errors, env_text)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {kind(value)}")
            return value
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            if typing.get_origin(key_type) is Literal and k not in typing.get_args(key_type):
                allowed = ", ".join(repr(a) for a in typing.get_args(key_type))
                errors.append(f"{join(path, k)}: unknown key (allowed: {allowed})")
                continue
            out[k] = check_types(v, value_type, join(path, k), errors, env_text)
        return out
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {kind(value)}")
            return value
        return [check_types(item, args[0], f"{path}[{i}]", errors, env_text) for i, item in enumerate(value)]
    try:
        msgspec.convert(value, typ, strict=True)
        return value
    except msgspec.ValidationError as e:
        if path in env_text:
            try:
                msgspec.convert(env_text[path], typ, strict=True)
                return env_text[path]
            except msgspec.ValidationError:
                pass
        errors.append(f"{path}: {_leaf_message(e, value, typ)}")
        return value


def _leaf_message(e: msgspec.ValidationError, value: Any, typ: Any) -> str:
    base = typ
    while typing.get_origin(base) is Annotated:
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is Literal and isinstance(value, str):
        return f"expected one of {', '.join(map(str, typing.get_args(base)))}, got {value!r}"
    msg = msgspec_message(e)
    if ", got " not in msg:  # a Meta constraint: "expected int >= 1" → "expected int >= 1, got -5"
        msg += f", got {value!r}"
    return msg


def msgspec_message(e: msgspec.ValidationError) -> str:
    msg = str(e).split(" - at `$")[0].replace("`", "")
    return msg[:1].lower() + msg[1:]
