"""OpenAI's Responses API (``POST /v1/responses``): what its answers cost and how its streams end.

A complete answer is a ``response`` object; its ``usage`` has ``input_tokens`` (of them
``input_tokens_details.cached_tokens`` read from the prompt cache) and ``output_tokens`` (reasoning
included: ``output_tokens_details.reasoning_tokens``).

A stream is named events, each with a ``type`` and a rising ``sequence_number``:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` …, the ``.done`` events, and one
terminal event carrying the whole response and its usage — ``response.completed``,
``response.incomplete`` (a complete answer cut short by ``max_output_tokens`` or a content filter) or
``response.failed``. No ``[DONE]`` follows. An ``error`` event may come at any time; OpenAI documents
its fields flat (``code``, ``message``, ``param``) and sends them nested under ``error`` — both are read,
and the one the gateway writes itself (``error_event``) carries both, so that every SDK raises.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.failures import Failure
from providers.base import StreamReader, Usage

# The item types a request's ``input`` list may hold (an item without one is a message, or an item reference).
INPUT_ITEM_TYPES = (
    "message", "item_reference", "function_call", "function_call_output", "custom_tool_call",
    "custom_tool_call_output", "reasoning", "compaction", "compaction_trigger", "file_search_call", "web_search_call",
    "computer_call", "computer_call_output", "code_interpreter_call", "image_generation_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output",
    "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "mcp_call", "tool_search_call",
    "tool_search_output", "additional_tools", "configuration_update", "program", "program_output",
)
ROLES = ("user", "assistant", "system", "developer")
TERMINAL = frozenset(("response.completed", "response.incomplete"))
LIFECYCLE = frozenset(("response.created", "response.queued", "response.in_progress"))  # nothing answered yet
FAILED = "response.failed"
TEXT_DELTA = "response.output_text.delta"


class _InputDetails(msgspec.Struct):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None  # reasoning tokens included
    input_tokens_details: _InputDetails | None = None

    def read(self) -> Usage:
        d = self.input_tokens_details
        cached, written = (d.cached_tokens or 0, d.cache_write_tokens or 0) if d is not None else (0, 0)
        return Usage(self.input_tokens or 0, self.output_tokens or 0, cached, written)


class _Error(msgspec.Struct):
    code: str | int | None = None
    message: str | None = None
    type: str | None = None


class _Response(msgspec.Struct):
    usage: _Usage | None = None
    error: _Error | None = None


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def read_usage(body: bytes) -> Usage | None:
    """The usage of a complete Responses answer; None without usage. Raises ``msgspec.DecodeError``
    for a body that is not JSON."""
    try:
        u = _decode_answer(body).usage
    except msgspec.ValidationError:
        return None
    if u is None or (u.input_tokens is None and u.output_tokens is None):
        return None
    return u.read()


# Decoded once per event of every stream: ``gc=False`` (an event read here never holds a cycle) spares the
# collector's bookkeeping for each of them.
class _Item(msgspec.Struct, gc=False):
    type: str | None = None


class _Event(msgspec.Struct, gc=False):
    type: str = ""
    sequence_number: int | None = None
    output_index: int = 0
    delta: Any = None
    item: _Item | None = None
    response: _Response | None = None
    error: _Error | None = None  # the error event as sent: nested
    code: str | int | None = None  # … and as documented: flat
    message: str | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


def _failure(err: _Error) -> Failure:
    """An error event (or a failed response) in a 200 stream, read like the status it stands for."""
    kind = f"{err.type or ''} {err.code or ''}".lower()
    if "context_length" in kind:
        return Failure("context_length_exceeded")
    if "content_filter" in kind or "content_policy" in kind:
        return Failure("content_policy_violation")
    if "rate_limit" in kind or "429" in kind:
        return Failure("rate_limited", "429")
    if "invalid" in kind or "authentication" in kind or "permission" in kind or "not_found" in kind:
        return Failure("client_error")
    return Failure("server_error", "5xx", trips_breaker=True)


class ResponsesStream(StreamReader):
    """Reads a Responses stream: complete (``done`` and ``finished`` at once) only when
    ``response.completed`` or ``response.incomplete`` arrives; ``response.failed`` and ``error`` are
    the upstream's own error (``error``), relayed as sent. Events it does not know pass untouched."""

    terminator = b""  # nothing can stand in for a terminal event: it carries the whole response

    def __init__(self, *, choices: int = 1, include_usage: bool = False) -> None:
        super().__init__(choices=1, include_usage=False)
        self.sequence = -1  # the last sequence_number relayed
        self.preamble = True

    def feed(self, name: bytes, data: bytes) -> None:
        try:
            ev = _decode_event(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed += 1
            return
        if ev.sequence_number is not None and ev.sequence_number > self.sequence:
            self.sequence = ev.sequence_number
        kind = ev.type
        if self.preamble and kind not in LIFECYCLE:
            self.preamble = False
        if kind.endswith(".delta"):
            if isinstance(ev.delta, str):
                self.generated += len(ev.delta.encode())
                if kind == TEXT_DELTA and ev.output_index == 0:
                    self.parts.append(ev.delta)
            if kind != TEXT_DELTA or ev.output_index != 0:
                self.recoverable = False  # tool arguments, reasoning, a second item: no prefill resumes them
        elif kind == "response.output_item.added":
            if ev.item is None or ev.item.type != "message":
                self.recoverable = False
        elif kind in TERMINAL or kind == FAILED:
            self._usage(ev.response)
            if kind == FAILED:
                err = (ev.response.error if ev.response is not None else None) or _Error(code="server_error")
                self._error(err)
            else:
                self.finished = self.done = True
        elif kind == "error":
            self._error(ev.error or _Error(code=ev.code, message=ev.message))

    def _usage(self, response: _Response | None) -> None:
        u = response.usage if response is not None else None
        if u is None:
            return
        self.usage_seen = True
        self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.written_tokens, _ = u.read()

    def _error(self, err: _Error) -> None:
        self.error = err.message or str(err.code or "") or "upstream stream error"
        self.error_failure = _failure(err)


def error_event(code: str, message: str, sequence_number: int, error_type: str = "server_error") -> bytes:
    """The Responses dialect's ``error`` event, in both its shapes at once: the documented flat fields
    (``ResponseErrorEvent``) and the ``error`` object the API sends, on which OpenAI's SDKs raise."""
    detail = {"type": error_type, "code": code, "message": message, "param": None}
    body = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": sequence_number,
            "error": detail}
    return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"


_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def next_sequence(reader: StreamReader | None, last: bytes) -> int:
    """The sequence number an event added after ``last`` (the last bytes relayed) takes."""
    if isinstance(reader, ResponsesStream) and reader.sequence >= 0:
        return reader.sequence + 1
    found = _SEQUENCE.findall(last)
    return int(found[-1]) + 1 if found else 0
