"""Anthropic Messages API: keys travel in ``x-api-key``, not ``Authorization``.

Errors: ``{"type": "error", "error": {"type", "message"}}``; 529 ``overloaded_error`` is a
server error (retried, counts against the circuit), a prompt over the context window is
an ``invalid_request_error`` saying "prompt is too long".

Streams: named events ``message_start``, ``content_block_start``/``_delta``/``_stop``,
``message_delta`` (stop reason, output usage), ``message_stop``; ``ping`` and ``error``
may come at any time.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.failures import Failure
from providers.base import LLMProvider, Splicer, StreamReader, Usage

# List prices, USD per 1M tokens (input, output), standard tier, text, late 2025; the key is a model
# name or the prefix of a family (``providers.pricing`` matches dated snapshots to it).
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4": (15.0, 75.0), "claude-opus-4-1": (15.0, 75.0), "claude-sonnet-4": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0), "claude-haiku-4-5": (1.0, 5.0), "claude-opus-4-5": (5.0, 25.0),
    "claude-3-7-sonnet": (3.0, 15.0), "claude-3-5-sonnet": (3.0, 15.0), "claude-3-5-haiku": (0.80, 4.0),
    "claude-3-opus": (15.0, 75.0), "claude-3-sonnet": (3.0, 15.0), "claude-3-haiku": (0.25, 1.25),
}
# Prompt caching, as multiples of a model's input price (every Claude model): a cache read costs a tenth, a
# write 1.25× for the default 5-minute cache and 2× for the 1-hour one (Anthropic's pricing page).
CACHE_READ, CACHE_WRITE, CACHE_WRITE_1H = 0.1, 1.25, 2.0
# Context windows (see ``providers.openai.CONTEXT``); Sonnet 4 and 4.5 take 1M tokens with a beta header.
CONTEXT: dict[str, int] = {"claude": 200_000, "claude-sonnet-4": 1_000_000, "claude-sonnet-4-5": 1_000_000}


# The ``error.type`` an Anthropic error of each status carries (else "api_error").
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 408: "invalid_request_error", 409: "invalid_request_error", 413: "request_too_large",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
API_VERSION = "2023-06-01"  # ``anthropic-version`` for requests the gateway writes itself (translated, envelopes)


class AnthropicProvider(LLMProvider):
    name = "anthropic"
    otel_name = "anthropic"
    key_header = "x-api-key"
    key_prefix = ""
    prices = PRICES
    speaks = "messages"
    requires_max_tokens = True


# ------------------------------------------------------------------ streams


class _CacheCreation(msgspec.Struct):
    ephemeral_1h_input_tokens: int | None = None  # of the cache writes: those kept an hour (billed 2×)


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None  # prompt tokens written to / read from the prompt cache
    cache_read_input_tokens: int | None = None
    cache_creation: _CacheCreation | None = None

    def cache(self) -> tuple[int, int, int]:
        """(read, written for 5 minutes, written for an hour) prompt tokens."""
        written = self.cache_creation_input_tokens or 0
        long = min(written, (self.cache_creation.ephemeral_1h_input_tokens or 0) if self.cache_creation else 0)
        return self.cache_read_input_tokens or 0, written - long, long

    @property
    def prompt(self) -> int | None:
        """Every input token of the request: uncached, written to and read from the cache."""
        if self.input_tokens is None and self.cache_creation_input_tokens is None and self.cache_read_input_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.cache_creation_input_tokens or 0) + (self.cache_read_input_tokens or 0)


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def read_usage(body: bytes) -> Usage | None:
    """The usage of a complete Messages answer (the prompt: input, cache writes and reads); None without
    usage. Raises ``msgspec.DecodeError`` for a body that is not JSON."""
    try:
        u = _decode_answer(body).usage
    except msgspec.ValidationError:
        return None
    if u is None or (u.prompt is None and u.output_tokens is None):
        return None
    return Usage(u.prompt or 0, u.output_tokens or 0, *u.cache())


# Decoded once per event of every stream: ``gc=False`` (an event read here never holds a cycle) spares the
# collector's bookkeeping for each of them.
class _Message(msgspec.Struct, gc=False):
    id: str | None = None
    model: str | None = None
    usage: _Usage | None = None


class _Block(msgspec.Struct, gc=False):
    type: str = ""


class _Delta(msgspec.Struct, gc=False):
    type: str | None = None
    text: str | None = None
    partial_json: Any = None  # a tool call's input, streamed
    thinking: Any = None
    stop_reason: str | None = None


class _Error(msgspec.Struct, gc=False):
    type: str = ""
    message: str = ""


class _Event(msgspec.Struct, gc=False):
    type: str = ""
    index: int = 0
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _Error | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.encode

MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

_ERROR_FAILURES = {
    "overloaded_error": ("upstream_overloaded", "5xx", True),
    "api_error": ("server_error", "5xx", True),
    "rate_limit_error": ("rate_limited", "429", False),
}


class MessagesStream(StreamReader):
    terminator = MESSAGE_STOP
    preamble_timed = False  # message_start is the upstream's first byte: then only the idle timeout (pings)

    def __init__(self, *, choices: int = 1, include_usage: bool = False) -> None:
        super().__init__(choices=1, include_usage=False)
        self.open_block: int | None = None  # index of a content block started and not yet stopped
        self.last_block = -1
        # message_start comes at once, and Anthropic's overloaded_error often right after it: until the first
        # content the client has been sent nothing, and such an error is retried or falls back like any other
        self.preamble = True

    def feed(self, name: bytes, data: bytes) -> None:
        try:
            ev = _decode_event(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed += 1
            return
        kind = ev.type
        if self.preamble and kind != "message_start" and kind != "ping":
            self.preamble = False
        if kind == "content_block_delta":
            d = ev.delta
            if d is not None and d.type == "text_delta" and d.text:
                self.parts.append(d.text)
                self.generated += len(d.text.encode())
            elif d is None or d.type != "text_delta":
                self.recoverable = False  # tool input, thinking: not something a prefill can resume
                for extra in (d.partial_json, d.thinking) if d is not None else ():
                    if isinstance(extra, str):
                        self.generated += len(extra.encode())
        elif kind == "content_block_start":
            self.open_block = self.last_block = ev.index
            if ev.content_block is None or ev.content_block.type != "text":
                self.recoverable = False
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "message_start":
            if ev.message is not None:
                self.model = ev.message.model
            usage = ev.message.usage if ev.message else None
            if usage is not None:
                self.prompt_tokens = usage.prompt
                self.completion_tokens = usage.output_tokens
                self.cached_tokens, self.written_tokens, self.written_long_tokens = usage.cache()
        elif kind == "message_delta":
            if ev.delta is not None and ev.delta.stop_reason is not None:
                self.finish_reasons.append(ev.delta.stop_reason)
                self.finished = True
            if ev.usage is not None:
                self.usage_seen = True
                if ev.usage.output_tokens is not None:
                    self.completion_tokens = ev.usage.output_tokens
                if ev.usage.prompt is not None:
                    self.prompt_tokens = ev.usage.prompt
                    self.cached_tokens, self.written_tokens, self.written_long_tokens = ev.usage.cache()
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            err = ev.error or _Error()
            self.error = err.message or err.type or "upstream stream error"
            reason, cls, trips = _ERROR_FAILURES.get(err.type, ("client_error", None, False))
            self.error_failure = Failure(reason, cls, trips_breaker=trips)

    @staticmethod
    def continuation_body(body: bytes, partial: str, provider: str, model: str | None) -> bytes | None:
        try:
            req = _decode_any(body)
        except msgspec.DecodeError:
            return None
        if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
            return None
        # Anthropic refuses a final assistant turn that ends in whitespace; the splicer drops
        # the same whitespace from the front of the continuation, so the client sees it once.
        prefill = partial.rstrip()
        messages = list(req["messages"])
        if prefill:
            last = messages[-1] if messages else None
            if isinstance(last, dict) and last.get("role") == "assistant":  # the client's own prefill
                content = last.get("content")
                if isinstance(content, str):
                    messages[-1] = {**last, "content": (content + prefill).rstrip()}
                elif isinstance(content, list):
                    messages[-1] = {**last, "content": [*content, {"type": "text", "text": prefill}]}
                else:
                    return None
            else:
                messages.append({"role": "assistant", "content": prefill})
        req["messages"] = messages
        if model:
            req["model"] = model
        return _encode(req)

    def splicer(self) -> Splicer:
        return MessagesSplicer(self)


class MessagesSplicer(Splicer):
    """Continuation events renumbered into the original message: its ``message_start`` and the
    start of its first text block are dropped when the client's text block is still open."""

    original: MessagesStream

    def __init__(self, original: MessagesStream) -> None:
        super().__init__(original)
        self.joined = original.open_block is not None  # continue inside the open block
        self.offset = original.open_block if self.joined else original.last_block + 1
        text = original.text
        self.skip = text[len(text.rstrip()):]  # whitespace the prefill had to leave out

    def event(self, name: bytes, data: bytes, raw: bytes) -> bytes:
        try:
            ev = _decode_any(data)
        except msgspec.DecodeError:
            return raw
        if not isinstance(ev, dict):
            return raw
        kind = ev.get("type")
        if kind == "message_start":
            return b""
        if kind in ("content_block_start", "content_block_delta", "content_block_stop"):
            index = ev.get("index", 0)
            if kind == "content_block_start" and index == 0 and self.joined:
                return b""
            ev["index"] = index + self.offset
            if kind == "content_block_delta" and self.skip:
                delta = ev.get("delta") or {}
                text = delta.get("text")
                if isinstance(text, str):
                    n = len(text) - len(text.lstrip())
                    cut = min(n, len(self.skip))
                    delta["text"], self.skip = text[cut:], ""
                    if not delta["text"]:
                        return b""
        return b"event: " + str(kind).encode() + b"\ndata: " + _encode(ev) + b"\n\n"
