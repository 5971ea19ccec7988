"""OpenAI Responses requests → Chat Completions / Anthropic Messages requests (SPEC §6).

Used when a ``POST /v1/responses`` reaches a target that does not serve the Responses API — Anthropic
(``client.responses.create(model="claude-…")``, or a fallback) or a chat-only one (Mistral). The request
becomes a Chat Completions request (``to_chat_request``), and for Anthropic goes on through the existing
Chat → Messages translation (``providers.translate``); the answer comes back as a Response object
(``providers.translate_responses_answer``), a stream event by event (``providers.translate_responses_stream``).

Mapped: ``instructions`` and system/developer items → the system prompt; ``input`` (a string, or items:
messages with text and images — http or data URLs —, ``function_call`` and ``function_call_output``) → the
turns; function tools, ``tool_choice`` (also ``allowed_tools``: the tools offered are narrowed to them),
``parallel_tool_calls``; ``max_output_tokens``, ``temperature``, ``top_p``, ``user`` / ``safety_identifier``;
for chat targets ``text.format`` (JSON schema / object), ``text.verbosity`` and ``reasoning.effort`` as chat's
own fields.

What needs OpenAI's own state or servers is refused with a 400 naming the field, never dropped:
``previous_response_id``, ``conversation``, ``prompt``, ``background``, item references, files by id,
built-in tools (web search, file search, code interpreter, computer use, MCP, …), logprobs, ``truncation:
auto``, and any field this module does not know. Hints that change no answer are dropped: ``store`` and
``metadata`` (nothing is stored), ``prompt_cache_*``, ``service_tier``, ``stream_options``,
``max_tool_calls`` (it bounds built-in tools only), ``reasoning.summary``, and reasoning items of earlier
turns (OpenAI's encrypted reasoning, which no other provider can read: the visible turns are sent).
"""

from __future__ import annotations

from typing import Any

import msgspec

from providers import translate
from providers.translate import Untranslatable
from providers.translate_messages import chat_head

_encode = msgspec.json.encode


# Fields that need what only OpenAI keeps (stored responses, prompts, background runs, …): refused when set.
_OPENAI_ONLY = {
    "previous_response_id": "continues a response stored by OpenAI, and target {target} keeps no responses: "
                            "send the whole conversation as input",
    "conversation": "continues a conversation stored by OpenAI, and target {target} keeps none: send the whole "
                    "conversation as input",
    "prompt": "a prompt template stored by OpenAI cannot be used by target {target}: send instructions and input",
    "background": "a background response is stored and polled for later, and target {target} keeps no responses",
    "background_options": "a background response is stored and polled for later, and target {target} keeps none",
    "context_management": "server-side compaction runs on OpenAI's servers only, not on target {target}",
    "moderation": "OpenAI's moderation of a response runs on OpenAI's servers only, not on target {target}",
    "access_programs": "OpenAI's access programs do not apply to target {target}",
    "top_logprobs": "log probabilities are not translated for target {target}",
}
# Fields read below, and hints dropped on purpose (see the docstring); any other field is refused.
_KNOWN = frozenset((
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools", "tool_choice",
    "parallel_tool_calls", "text", "reasoning", "user", "safety_identifier", "include", "truncation",
    "store", "metadata", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "service_tier",
    "stream_options", "max_tool_calls", "image",
))
# ``include`` entries with nothing to add when no built-in tool runs and no reasoning is kept.
_VACUOUS_INCLUDES = frozenset((
    "reasoning.encrypted_content", "message.input_image.image_url", "computer_call_output.output.image_url",
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "code_interpreter_call.outputs",
))
_CONTENT_TEXT = ("input_text", "output_text", "text")


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == 0


def to_chat_request(body: dict[str, Any], *, anthropic: bool, stream_usage: bool) -> dict[str, Any]:
    """A Responses request as a Chat Completions request; raises ``Untranslatable``. ``anthropic``: it goes on
    to Messages, which has no JSON modes, verbosity or reasoning effort; ``stream_usage``: the target reports a
    stream's usage when asked (``stream_options``)."""
    for field, value in body.items():
        if field in _OPENAI_ONLY:
            if not _unset(value):
                raise Untranslatable(field, f"{field}: " + _OPENAI_ONLY[field])
        elif field not in _KNOWN:
            raise Untranslatable(field, f"{field}: not translated for target {{target}}; leave it out")
    if body.get("truncation") not in (None, "disabled"):
        raise Untranslatable("truncation", "truncation: auto drops input items on OpenAI's servers only, not on "
                                           "target {target}: leave it out or send disabled")
    for entry in body.get("include") or ():
        if entry not in _VACUOUS_INCLUDES:
            raise Untranslatable("include", f"include: {entry} is not translated for target {{target}}")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        if not isinstance(instructions, str):
            raise Untranslatable("instructions", "instructions must be a string")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for i, item in enumerate(given):
            _add_item(messages, item, f"input[{i}]")
    elif given is not None:
        raise Untranslatable("input", "input must be a string or a list of items")
    user = body.get("safety_identifier") or body.get("user")
    # (the user becomes metadata.user_id for Anthropic; a chat-only API such as Mistral's refuses fields it lacks)
    out = chat_head(body, body.get("model"), messages, body.get("max_output_tokens"), ask_usage=stream_usage,
                    user=user if anthropic else None)
    _add_tools(out, body, anthropic)
    _add_text_and_reasoning(out, body, anthropic)
    return out


def _add_item(messages: list[dict[str, Any]], item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise Untranslatable(where, f"{where} must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise Untranslatable(f"{where}.role", f"{where}.role must be user, assistant, system or developer")
        content = _content(item.get("content"), f"{where}.content")
        if role == "assistant" and messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
            messages[-1]["content"] = _joined(messages[-1]["content"], content)
        else:
            messages.append({"role": "system" if role == "developer" else role, "content": content})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # one turn: its text and its (parallel) calls
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            output = "".join(_text_part(p, f"{where}.output[{j}]") for j, p in enumerate(output))
        elif not isinstance(output, str):
            raise Untranslatable(f"{where}.output", f"{where}.output must be a string or a list of parts")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
    elif kind == "reasoning":
        pass  # OpenAI's own (encrypted) reasoning of an earlier turn: no other provider can read it
    elif kind == "item_reference":
        raise Untranslatable(where, f"{where}: an item_reference points at an item stored by OpenAI, and target "
                                    "{target} keeps none: send the item itself")
    else:
        raise Untranslatable(where, f"{where}: a {kind} item (a built-in tool's) is not translated for target "
                                    "{target}")


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Untranslatable(where, f"{where} must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise Untranslatable(at, f"{at}: an image by file_id is a file stored by OpenAI, which target "
                                         "{target} cannot read: send its image_url (an http or data URL)")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": _text_part(part, at)})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _text_part(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _CONTENT_TEXT:
        text = part.get("text")
        if not isinstance(text, str):
            raise Untranslatable(f"{where}.text", f"{where}.text must be a string")
        return text
    if kind == "refusal":
        return str(part.get("refusal") or "")
    raise Untranslatable(where, f"{where}: a {kind} part is not translated for target {{target}} (text and "
                                "images are)")


def _joined(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str):
        return a + b
    as_parts = [{"type": "text", "text": x} if isinstance(x, str) else x for x in (a, b)]
    return [p for x in as_parts for p in (x if isinstance(x, list) else [x]) if p.get("text") != ""]


def _add_tools(out: dict[str, Any], body: dict[str, Any], anthropic: bool) -> None:
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(body.get("tools") or ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise Untranslatable(f"tools[{i}]", f"tools[{i}]: the built-in tool {kind} runs on OpenAI's servers, "
                                                "and target {target} has none: offer a function tool instead")
        fn = {"name": tool.get("name"), "description": tool.get("description") or "",
              "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("strict") is not None and not anthropic:
            fn["strict"] = tool["strict"]
        tools.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind == "allowed_tools":  # offered: only these, with the mode's choice
            names = set()
            for t in choice.get("tools") or ():
                if not isinstance(t, dict) or t.get("type") != "function":
                    raise Untranslatable("tool_choice", "tool_choice: allowed_tools may only name function tools "
                                                        "for target {target}")
                names.add(t.get("name"))
            tools = [t for t in tools if t["function"]["name"] in names]
            choice = choice.get("mode") or "auto"
        else:
            raise Untranslatable("tool_choice", f"tool_choice: {kind} is a built-in tool, and target {{target}} "
                                                "has none")
    elif choice not in (None, "auto", "none", "required"):
        raise Untranslatable("tool_choice", "tool_choice must be auto, none, required or a function")
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        if body.get("parallel_tool_calls") is not None:
            out["parallel_tool_calls"] = body["parallel_tool_calls"]


def _add_text_and_reasoning(out: dict[str, Any], body: dict[str, Any], anthropic: bool) -> None:
    text = body.get("text") or {}
    fmt = (text.get("format") or {}) if isinstance(text, dict) else {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_schema", "json_object"):
        if anthropic:
            raise Untranslatable("text.format", f"text.format: {kind} is not translated for target {{target}} "
                                                "(Anthropic): describe the JSON in the instructions, or use a tool")
        if kind == "json_object":
            out["response_format"] = {"type": "json_object"}
        else:
            schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
            out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind not in (None, "text"):
        raise Untranslatable("text.format", f"text.format: {kind} is not translated for target {{target}}")
    verbosity = text.get("verbosity") if isinstance(text, dict) else None
    if verbosity not in (None, "medium"):  # OpenAI's alone: Anthropic has none, Mistral refuses the field
        raise Untranslatable("text.verbosity", "text.verbosity is not translated for target {target}: leave it out")
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort not in (None, "none"):
        if anthropic:
            raise Untranslatable("reasoning", "reasoning: extended thinking is not translated for target {target} "
                                              "(Anthropic): call /v1/messages with thinking, or leave it out")
        out["reasoning_effort"] = effort


def request_body(body: bytes, to: str, default_max_tokens: int | None,
                 stream_usage: bool) -> tuple[bytes | None, tuple[str | None, str]]:
    """A Responses request ``body`` for the ``to`` dialect (``chat``, ``messages``): (the bytes, ("", "")), or
    (None, (param, message)) with ``{target}`` in the message — a plain function of bytes (it may run in
    another process, ``gateway.offload``)."""
    label = "Anthropic" if to == "messages" else "OpenAI Chat Completions"
    try:
        doc: Any = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return None, (None, f"the request body must be a JSON object to be sent to target {{target}} ({label})")
    try:
        out = to_chat_request(doc, anthropic=to == "messages", stream_usage=stream_usage)
        if to == "messages":
            parallel = out.get("parallel_tool_calls")
            out = translate.openai_to_anthropic_request(out, default_max_tokens=default_max_tokens)
            if parallel is False and out.get("tools"):
                out.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
        return _encode(out), ("", "")
    except Untranslatable as e:
        return None, (e.param, e.why)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError):
        return None, (None, f"the request cannot be translated for target {{target}} ({label}): a field has the "
                            "wrong type or shape")
