"""Anthropic Messages requests → OpenAI Chat Completions requests (part of ``providers.translate``, SPEC §6).

Carried: the system prompt, text, images (url or base64), text documents and base64 PDFs (OpenAI's ``file``
part), client tools and tool choice (``disable_parallel_tool_use`` ⇄ ``parallel_tool_calls: false``), tool calls
and their results, ``stop_sequences``, ``max_tokens``, ``temperature``, ``top_p``, ``metadata.user_id``. What an
OpenAI target cannot carry — enabled thinking, ``top_k``, server tools, documents by URL or file, tool results with
images, unknown blocks or fields — raises ``Untranslatable`` (the client's 400 naming the field), never dropped.
"""

from __future__ import annotations

from typing import Any

import msgspec

_encode = msgspec.json.encode


def _text_parts(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text block becomes a plain string; several stay separate parts (OpenAI takes content
    arrays for system, user and assistant messages), never run together into one string."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def anthropic_to_openai_request(body: dict[str, Any], *, openai_fields: bool = True) -> dict[str, Any]:
    """``openai_fields``: the target takes OpenAI's own ``stream_options``, ``user`` and PDF ``file`` parts (a
    chat-only API such as Mistral's refuses fields it lacks with a 422, and reports a stream's usage unasked).
    Raises ``Untranslatable`` for what the target cannot carry (see the module's docstring)."""
    for field in body:
        if field not in _ANTHROPIC_KNOWN:
            raise Untranslatable(field, f"{field}: not translated for target {{target}} (OpenAI); leave it out")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Untranslatable("model", "model: required, a string")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise Untranslatable("thinking", "thinking: extended thinking is Anthropic's, and target {target} (OpenAI) "
                                         "has no equivalent for it; leave it out or disable it")
    if body.get("top_k") is not None:
        raise Untranslatable("top_k", "top_k: target {target} (OpenAI) has no top_k; leave it out")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, list):
        if not all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in system):
            raise Untranslatable("system", "system: only text blocks are translated for target {target}")
        system = _text_parts([{"type": "text", "text": b["text"]} for b in system]) if system else None
    elif system is not None and not isinstance(system, str):
        raise Untranslatable("system", "system must be a string or a list of text blocks")
    if system:
        messages.append({"role": "system", "content": system})
    turns = body.get("messages")
    if not isinstance(turns, list):
        raise Untranslatable("messages", "messages must be a list")
    for i, m in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise Untranslatable(f"{where}.role", f"{where}.role must be user or assistant")
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise Untranslatable(f"{where}.content", f"{where}.content must be a string or a list of blocks")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": _string(block, "text", at)})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), at)}})
            elif kind == "document":
                parts.append(_document(block, at, openai_fields))
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": _string(block, "id", at), "type": "function",
                              "function": {"name": _string(block, "name", at),
                                           "arguments": _encode(block.get("input", {})).decode()}})
            elif kind == "tool_result" and role == "user":
                messages.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", at),
                                 "content": _tool_output(block.get("content"), at)})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # an earlier turn's signed thinking: only Anthropic can read it (its visible turn is sent)
            else:
                raise Untranslatable(at, f"{at}: a {kind} block is not translated for target {{target}} (OpenAI)")
        if role == "assistant":
            said = [p for p in parts if p["type"] == "text"]  # an assistant turn carries no images in OpenAI's shape
            message: dict[str, Any] = {"role": "assistant", "content": _text_parts(said) if said else None}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
        elif parts:
            messages.append({"role": role, "content": _text_parts(parts)})
    out = chat_head(body, model, messages, body.get("max_tokens"), stop=body.get("stop_sequences"),
                    ask_usage=openai_fields, user=(body.get("metadata") or {}).get("user_id") if openai_fields else None)
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if tools and kind == "any":
        out["tool_choice"] = "required"
    elif tools and kind == "none":
        out["tool_choice"] = "none"
    elif tools and kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if tools and isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False  # (the same promise: at most one tool call per turn)
    return out


def chat_head(body: dict[str, Any], model: Any, messages: list[dict[str, Any]], max_tokens: Any, *, stop: Any = None,
              ask_usage: bool, user: Any) -> dict[str, Any]:
    """The start of a Chat Completions request made from another dialect's ``body`` (a Messages request here, a
    Responses request in ``providers.translate_responses``): the limit, stop sequences, the sampling fields as
    they are, a stream's usage asked for (``ask_usage``), the end user."""
    out: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if stop:
        out["stop"] = stop
    for field in ("temperature", "top_p", "stream"):
        if body.get(field) is not None:
            out[field] = body[field]
    if body.get("stream") and ask_usage:
        out["stream_options"] = {"include_usage": True}
    if user:
        out["user"] = user
    return out


class Untranslatable(ValueError):
    """A field of the request that the target cannot honour: the client's 400, naming it (``{target}`` in the
    message: the target's name)."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(why)
        self.param = param
        self.why = why


# A Messages request's fields: translated, or hints that change no answer (``service_tier``: OpenAI's own
# tiers are its account's; ``metadata``: only ``user_id`` has an equivalent). Any other is refused.
_ANTHROPIC_KNOWN = frozenset((
    "model", "messages", "system", "max_tokens", "metadata", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "tools", "tool_choice", "thinking", "service_tier",
))


def _string(block: dict[str, Any], field: str, at: str) -> str:
    value = block.get(field)
    if not isinstance(value, str):
        raise Untranslatable(f"{at}.{field}", f"{at}.{field} must be a string")
    return value


def _image_url(source: Any, at: str) -> str:
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("media_type"), str) \
            and isinstance(source.get("data"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    raise Untranslatable(f"{at}.source", f"{at}.source: an image by url or base64 data (with its media_type) is "
                                         "translated for target {target} (OpenAI); a file by id is not")


def _document(block: dict[str, Any], at: str, files: bool) -> dict[str, Any]:
    """A document block: plain text as a text part, a base64 PDF as OpenAI's ``file`` part."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if isinstance(block.get("citations"), dict) and block["citations"].get("enabled"):
        raise Untranslatable(f"{at}.citations", f"{at}.citations: citations are Anthropic's; target {{target}} "
                                                "(OpenAI) answers without them: leave them off")
    if kind == "text" and isinstance(source.get("data"), str):  # its title and context, as the model would see them
        said = [str(block[f]) for f in ("title", "context") if isinstance(block.get(f), str) and block[f]]
        return {"type": "text", "text": "\n\n".join([*said, source["data"]])}
    if files and kind == "base64" and source.get("media_type") == "application/pdf" \
            and isinstance(source.get("data"), str):
        name = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
        return {"type": "file", "file": {"filename": name,
                                         "file_data": f"data:application/pdf;base64,{source['data']}"}}
    raise Untranslatable(f"{at}.source", f"{at}.source: a {kind} document is not translated for target {{target}} "
                                         "(plain text is; a base64 PDF for OpenAI's own API)")


def _tool_output(content: Any, at: str) -> str:
    """A tool result's content as the text of OpenAI's tool message (which takes text only)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(b.get("text", "") for b in content)
    raise Untranslatable(f"{at}.content", f"{at}.content: a tool result of text is translated for target {{target}} "
                                          "(OpenAI's tool messages take text only)")


def _tool(tool: Any, at: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise Untranslatable(at, f"{at}: the server tool {kind} runs on Anthropic's servers, not on target "
                                 "{target} (OpenAI); only client tools (name and input_schema) are translated")
    function = {"name": _string(tool, "name", at), "description": tool.get("description", ""),
                "parameters": tool.get("input_schema") or {}}
    if isinstance(tool.get("strict"), bool):  # structured tool inputs: OpenAI's own flag of the same name
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}
