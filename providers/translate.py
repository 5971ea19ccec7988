"""OpenAI Chat Completions ⇄ Anthropic Messages, both directions, complete and streamed (SPEC §6).

Used when a request in one dialect reaches a target of the other — routed there by its
model, or by a fallback. The request is rewritten for the target; the answer (body, or
SSE stream event by event) is rewritten back, so the client's SDK parses what it expects.

Mapped: system prompts (OpenAI system/developer messages ⇄ Anthropic ``system``), text and
image content (data URLs ⇄ base64 sources, http URLs ⇄ url sources), tools and tool choice,
assistant tool calls ⇄ ``tool_use`` blocks, tool results ⇄ ``tool_result`` blocks,
``stop`` ⇄ ``stop_sequences``, ``max_tokens``/``max_completion_tokens`` (Anthropic requires
one: ``llm.max_tokens`` or 4,096), ``temperature``, ``top_p``, ``user`` ⇄
``metadata.user_id``; answers: ids, roles, text, tool calls (arguments as a JSON string),
stop reasons ⇄ finish reasons, usage; Anthropic's text and PDF documents, ``disable_parallel_tool_use`` ⇄
``parallel_tool_calls: false``. A Messages request's field an OpenAI target cannot carry (enabled thinking,
``top_k``, server tools, documents by URL, unknown blocks or fields) is refused (``Untranslatable``: the
client's 400 naming it), never dropped; so is an OpenAI request's field that changes the answer and has no
Anthropic equivalent (``response_format`` JSON modes, ``logprobs``, audio, ``web_search_options``, ``logit_bias``,
``reasoning_effort``, a content part other than text, image or PDF file); hints that change no answer are dropped.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from providers import anthropic, openai
from providers.translate_messages import Untranslatable, anthropic_to_openai_request  # noqa: F401

_encode = msgspec.json.encode
DEFAULT_MAX_TOKENS = 4096

FINISH_OF_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "pause_turn": "stop", "refusal": "content_filter"}
STOP_OF_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                  "content_filter": "refusal"}


# ---------------------------------------------------------------- OpenAI request → Anthropic


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", None))
    return "" if content is None else str(content)


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, _, data = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                out.append(_image_block(url))
        elif kind == "file" and isinstance(part.get("file"), dict) and str(part["file"].get("file_data", "")).startswith(
                "data:application/pdf;base64,"):
            data = part["file"]["file_data"].partition(";base64,")[2]
            out.append({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}})
        else:  # audio, a file by id, a part this module does not know: said, not dropped
            raise Untranslatable("messages", f"messages: a {kind} content part is not translated for target {{target}} "
                                             "(Anthropic): text, images and PDF files (file_data) are")
    return out


# Chat fields that change the answer and have no Anthropic equivalent: refused when set, never dropped.
_CHAT_ONLY = {
    "response_format": "structured output (JSON mode, a JSON schema) is not translated for target {target} "
                       "(Anthropic): leave it out, or ask for JSON in the prompt",
    "logprobs": "log probabilities are not translated for target {target} (Anthropic)",
    "top_logprobs": "log probabilities are not translated for target {target} (Anthropic)",
    "audio": "audio output is not translated for target {target} (Anthropic)",
    "web_search_options": "web search runs on OpenAI's servers, not on target {target} (Anthropic)",
    "logit_bias": "logit_bias has no equivalent on target {target} (Anthropic)",
    "reasoning_effort": "reasoning_effort has no equivalent on target {target} (Anthropic); leave it out",
}


def _refuse_chat_only(body: dict[str, Any]) -> None:
    for field, why in _CHAT_ONLY.items():
        value = body.get(field)
        if value is None or (value in (False, 0, [], {}) and field != "web_search_options") or (
                field == "response_format" and isinstance(value, dict) and value.get("type") == "text"):
            continue  # (web_search_options: {} turns web search on)
        raise Untranslatable(field, f"{field}: {why}")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise Untranslatable("modalities", "modalities: target {target} (Anthropic) answers in text only")


def _loads(text: Any) -> Any:
    if not isinstance(text, str):
        return text if text is not None else {}
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return {"_raw": text}


def openai_to_anthropic_request(body: dict[str, Any], *, default_max_tokens: int | None = None) -> dict[str, Any]:
    _refuse_chat_only(body)
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:  # Anthropic wants turns to alternate
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content")))
        elif role == "user":
            push("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": _loads(fn.get("arguments"))})
            push("assistant", blocks)
        elif role in ("tool", "function"):
            push("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id") or m.get("name"),
                           "content": _text_of(m.get("content"))}])
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if system:
        out["system"] = "\n\n".join(s for s in system if s)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = limit or default_max_tokens or DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for field in ("temperature", "top_p", "stream"):
        if body.get(field) is not None:
            out[field] = body[field]
    if isinstance(out.get("temperature"), (int, float)):
        out["temperature"] = min(out["temperature"], 1.0)  # OpenAI allows up to 2
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    tools = [t.get("function") for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        out["tools"] = [{"name": f.get("name"), "description": f.get("description", ""),
                         "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
                        for f in tools if isinstance(f, dict)]
        choice = body.get("tool_choice")
        if choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif choice == "none":
            out["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict) and choice.get("type") == "function":
            out["tool_choice"] = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
        if body.get("parallel_tool_calls") is False and out.get("tool_choice", {}).get("type") != "none":
            # at most one tool call per turn, as Anthropic says it
            out.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    return out


# ---------------------------------------------------------------- Anthropic answer → OpenAI


def anthropic_to_openai_response(body: dict[str, Any]) -> dict[str, Any]:
    text, calls = [], []
    for block in body.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": _encode(block.get("input", {})).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    usage = body.get("usage") or {}
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) \
        + (usage.get("cache_read_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    # the prompt's cache reads and writes, as OpenAI reports them: priced at the model's own cache rates
    details = {"cached_tokens": usage.get("cache_read_input_tokens") or 0,
               "cache_write_tokens": usage.get("cache_creation_input_tokens") or 0}
    return {
        "id": "chatcmpl-" + str(body.get("id") or "").removeprefix("msg_"), "object": "chat.completion",
        "created": int(time.time()), "model": body.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH_OF_STOP.get(body.get("stop_reason") or "", "stop")}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": details},
    }


# ---------------------------------------------------------------- OpenAI answer → Anthropic


def openai_to_anthropic_response(body: dict[str, Any]) -> dict[str, Any]:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": _text_of(message["content"])})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": _loads(fn.get("arguments"))})
    return {
        "id": "msg_" + str(body.get("id") or "").removeprefix("chatcmpl-"), "type": "message", "role": "assistant",
        "model": body.get("model"), "content": content,
        "stop_reason": STOP_OF_FINISH.get(choice.get("finish_reason") or "", "end_turn"), "stop_sequence": None,
        "usage": anthropic_usage(body.get("usage") or {}),
    }


def anthropic_usage(usage: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage as Anthropic's: OpenAI's ``prompt_tokens`` holds the prompt's cache reads and writes,
    Anthropic's ``input_tokens`` is the rest of the prompt (so each is priced at its own rate, as billed)."""
    details = usage.get("prompt_tokens_details") or {}
    cached, written = details.get("cached_tokens") or 0, details.get("cache_write_tokens") or 0
    return {"input_tokens": max(0, (usage.get("prompt_tokens") or 0) - cached - written),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached,
            "output_tokens": usage.get("completion_tokens") or 0}


def openai_error_from_anthropic(body: dict[str, Any], status: int) -> dict[str, Any]:
    """An Anthropic error answer as OpenAI's, its type the one OpenAI gives that status."""
    error = body.get("error") or {}
    error = error if isinstance(error, dict) else {}
    return {"error": {"message": error.get("message", ""), "type": openai.ERROR_TYPES.get(status, "server_error"),
                      "code": error.get("type"), "param": None}}


def anthropic_error_from_openai(body: dict[str, Any], status: int) -> dict[str, Any]:
    """An OpenAI error answer as Anthropic's, its type the one Anthropic gives that status. OpenAI-compatible
    servers that answer flat (Mistral: ``{"object": "error", "message": …}``, the message a validation's
    ``detail`` list at times) or with a bare ``detail`` are said too."""
    error = body.get("error")
    said = error.get("message", "") if isinstance(error, dict) else (body.get("message") or error or body.get("detail"))
    message = said if isinstance(said, str) else _encode(said).decode() if said is not None else ""
    return {"type": "error", "error": {"type": anthropic.ERROR_TYPES.get(status, "api_error"), "message": message}}
