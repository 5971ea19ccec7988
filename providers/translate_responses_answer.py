"""Chat Completions / Anthropic Messages answers → OpenAI Responses: the Response object, complete answers and
errors (``providers.translate_responses`` does requests, ``providers.translate_responses_stream`` streams).

A complete answer becomes a Response (``openai.types.responses.Response``): text → a ``message`` item, tool
calls → ``function_call`` items (the text said before a call stays before it), usage with cached and
reasoning tokens, finish/stop reasons → ``status`` and ``incomplete_details`` (length / max_tokens →
incomplete, ``max_output_tokens``; a content filter or refusal → incomplete, ``content_filter``). An
upstream's error answer becomes OpenAI's error JSON.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from providers import openai, translate

_encode = msgspec.json.encode


def response_object(rid: str, model: Any, created: float, output: list[dict[str, Any]], *,
                    reason: str | None = None, usage: dict[str, Any] | None = None,
                    status: str | None = None, echo: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Response object (``openai.types.responses.Response``); ``reason``: why it is incomplete; ``echo``:
    the request's settings the Response repeats (``echoed``)."""
    if status is None:
        status = "incomplete" if reason else "completed"
    out = {
        "id": rid, "object": "response", "created_at": created, "status": status, "background": False,
        "error": None, "incomplete_details": {"reason": reason} if reason else None, "instructions": None,
        "max_output_tokens": None, "model": model, "output": output, "parallel_tool_calls": True,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
        "temperature": None, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": None, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }
    if echo:
        out.update(echo)
    return out


class _Echo(msgspec.Struct):
    """The settings of a Responses request its Response repeats, as OpenAI's does (anything else is skipped
    unread)."""

    instructions: Any = None
    max_output_tokens: Any = None
    max_tool_calls: Any = None
    metadata: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    reasoning: Any = None
    safety_identifier: Any = None
    temperature: Any = None
    text: Any = None
    tool_choice: Any = None
    tools: Any = None
    top_p: Any = None
    truncation: Any = None
    user: Any = None


_read_echo = msgspec.json.Decoder(_Echo).decode


def echoed(body: bytes) -> dict[str, Any]:
    """The settings of the client's Responses request a translated Response repeats (those it gave)."""
    try:
        echo = _read_echo(body)
    except (msgspec.DecodeError, RecursionError):
        return {}
    return {f: v for f in echo.__struct_fields__ if (v := getattr(echo, f)) is not None}


def usage_object(prompt: int, completion: int, cached: int = 0, reasoning: int = 0, written: int = 0) -> dict[str, Any]:
    """``prompt``: all of it, cache reads (``cached``) and writes (``written``) included, as OpenAI counts it."""
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def usage_from_chat(u: dict[str, Any]) -> dict[str, Any]:
    details = u.get("prompt_tokens_details") or {}
    return usage_object(u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0, details.get("cached_tokens") or 0,
                        (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0,
                        details.get("cache_write_tokens") or 0)


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": "fc_" + call_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


# Why an answer stopped short, by finish reason (chat) and stop reason (Anthropic); any other: completed.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter", "max_tokens": "max_output_tokens",
              "model_context_window_exceeded": "max_output_tokens", "refusal": "content_filter"}


def ids(upstream_id: Any, prefix: str) -> tuple[str, str]:
    """(the response's id, its message item's) from the upstream answer's id."""
    core = str(upstream_id or "").removeprefix(prefix)
    return "resp_" + core, "msg_" + core


def response_from_chat(body: dict[str, Any], echo: dict[str, Any] | None = None) -> dict[str, Any]:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    rid, mid = ids(body.get("id"), "chatcmpl-")
    reason = INCOMPLETE.get(choice.get("finish_reason") or "")
    output: list[dict[str, Any]] = []
    text = translate._text_of(message.get("content"))
    if text or message.get("refusal"):
        output.append(message_item(mid, text or str(message.get("refusal")), "incomplete" if reason else "completed"))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        output.append(call_item(str(call.get("id")), str(fn.get("name")), fn.get("arguments") or ""))
    u = body.get("usage")
    usage = None  # not reported: unknown, not 0/0/0
    if isinstance(u, dict):
        usage = usage_from_chat(u)
    return response_object(rid, body.get("model"), body.get("created") or int(time.time()), output, reason=reason,
                           usage=usage, echo=echo)


def response_from_messages(body: dict[str, Any], echo: dict[str, Any] | None = None) -> dict[str, Any]:
    rid, mid = ids(body.get("id"), "msg_")
    reason = INCOMPLETE.get(body.get("stop_reason") or "")
    output: list[dict[str, Any]] = []
    text: list[str] = []
    for block in body.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            if text:  # the text said before the call stays before it
                output.append(message_item(mid if not output else f"{mid}_{len(output)}", "".join(text)))
                text = []
            output.append(call_item(str(block.get("id")), str(block.get("name")),
                                    _encode(block.get("input", {})).decode()))
    if text:
        output.append(message_item(mid if not output else f"{mid}_{len(output)}", "".join(text),
                                   "incomplete" if reason else "completed"))
    u = body.get("usage") or {}
    cached, written = u.get("cache_read_input_tokens") or 0, u.get("cache_creation_input_tokens") or 0
    prompt = (u.get("input_tokens") or 0) + written + cached
    return response_object(rid, body.get("model"), int(time.time()), output, reason=reason,
                           usage=usage_object(prompt, u.get("output_tokens") or 0, cached, written=written), echo=echo)


def openai_error(body: dict[str, Any], status: int, from_anthropic: bool) -> dict[str, Any]:
    """An upstream's error answer as OpenAI's (``{"error": {message, type, code, param}}``)."""
    if from_anthropic:
        return translate.openai_error_from_anthropic(body, status)
    error = body.get("error")
    if isinstance(error, dict):
        return body  # OpenAI's shape already
    # OpenAI-compatible servers that answer flat (Mistral: {"object": "error", "message": …, "type": …}) or
    # with a validation "detail"
    said = body.get("message") or error or body.get("detail") or ""
    message = said if isinstance(said, str) else _encode(said).decode()
    return {"error": {"message": message, "type": body.get("type") or openai.ERROR_TYPES.get(status, "server_error"),
                      "code": body.get("code"), "param": body.get("param")}}
