"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, Groq, OpenRouter, …).

Errors: ``{"error": {"message", "type", "code", "param"}}``, read by ``LLMProvider.classify``.

Streams: ``data: {chat.completion.chunk}`` events, ended by ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.failures import Failure
from providers.base import LLMProvider, Splicer, StreamReader, Usage, new_usage

# List prices, USD per 1M tokens (input, output), standard tier, text, late 2025; the key is a model
# name or the prefix of a family (``providers.pricing`` matches dated snapshots to it).
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.0), "gpt-5-mini": (0.25, 2.0), "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.0), "gpt-4o-mini": (0.15, 0.60), "chatgpt-4o-latest": (5.0, 15.0),
    "gpt-4-turbo": (10.0, 30.0), "gpt-4": (30.0, 60.0), "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.0, 60.0), "o1-mini": (1.10, 4.40), "o1-pro": (150.0, 600.0),
    "o3": (2.0, 8.0), "o3-mini": (1.10, 4.40), "o3-pro": (20.0, 80.0), "o4-mini": (1.10, 4.40),
    "gpt-5.1": (1.25, 10.0), "gpt-5-pro": (15.0, 120.0), "gpt-5-chat-latest": (1.25, 10.0), "gpt-4.5-preview": (75.0, 150.0),
    "o3-deep-research": (10.0, 40.0), "o4-mini-deep-research": (2.0, 8.0), "codex-mini-latest": (1.50, 6.0),
    "computer-use-preview": (3.0, 12.0),
    "gpt-5.2": (1.75, 14.0), "gpt-5.2-pro": (21.0, 168.0), "gpt-5-codex": (1.25, 10.0), "gpt-5.1-codex": (1.25, 10.0),
    "gpt-5.1-codex-mini": (0.25, 2.0),
    "text-embedding-3-small": (0.02, 0.0), "text-embedding-3-large": (0.13, 0.0), "text-embedding-ada-002": (0.10, 0.0),
    # snapshots billed above their family's rate (priced by the family they would be under-charged)
    "gpt-4o-2024-05-13": (5.0, 15.0), "gpt-3.5-turbo-instruct": (1.50, 2.0), "gpt-3.5-turbo-0613": (1.50, 2.0),
    "gpt-3.5-turbo-0301": (1.50, 2.0), "gpt-3.5-turbo-1106": (1.0, 2.0), "gpt-3.5-turbo-16k": (3.0, 4.0),
    "gpt-4-32k": (60.0, 120.0),
}
# Cached input, USD per 1M tokens (the prompt tokens read from OpenAI's prompt cache), by the same names; a
# model not listed has no cache discount. GPT-5: a tenth of input, GPT-4.1, o3 and o4-mini a quarter, GPT-4o and
# o1 half (OpenAI's price page, late 2025).
CACHED_INPUT: dict[str, float] = {
    "gpt-5": 0.125, "gpt-5-mini": 0.025, "gpt-5-nano": 0.005, "gpt-5-chat-latest": 0.125, "gpt-5-codex": 0.125,
    "gpt-5.1": 0.125, "gpt-5.1-codex": 0.125, "gpt-5.1-codex-mini": 0.025, "gpt-5.2": 0.175,
    "gpt-4.1": 0.50, "gpt-4.1-mini": 0.10, "gpt-4.1-nano": 0.025, "gpt-4o": 1.25, "gpt-4o-mini": 0.075,
    "o1": 7.50, "o1-mini": 0.55, "o3": 0.50, "o3-mini": 0.55, "o4-mini": 0.275, "o3-deep-research": 2.50,
    "o4-mini-deep-research": 0.50, "codex-mini-latest": 0.375, "gpt-4.5-preview": 37.50,
}
# Context windows (tokens a prompt can hold at most), by the same names: a spend reservation's bound
# for a prompt the body does not hold (``previous_response_id``, files). Unlisted: ``pricing.DEFAULT_CONTEXT``.
CONTEXT: dict[str, int] = {
    "gpt-5": 400_000, "gpt-5.1": 400_000, "gpt-5.2": 400_000, "gpt-4.1": 1_047_576, "gpt-4o": 128_000, "chatgpt-4o-latest": 128_000,
    "gpt-4-turbo": 128_000, "gpt-4": 8_192, "gpt-3.5-turbo": 16_385, "o1": 200_000, "o1-mini": 128_000,
    "o3": 200_000, "o3-mini": 200_000, "o4-mini": 200_000, "text-embedding-3-small": 8_192,
    "text-embedding-3-large": 8_192, "text-embedding-ada-002": 8_192,
}
# OpenAI's reasoning models: they take max_completion_tokens (not max_tokens), and bill reasoning tokens
# as output that a chat-completions stream never shows.
REASONING = ("o1", "o3", "o4", "gpt-5")


def hides_reasoning(model: str | None) -> bool:
    return bool(model) and model.split("/")[-1].startswith(REASONING)  # type: ignore[union-attr]


# The most one image can cost in prompt tokens, where it is more than ``pricing.IMAGE_TOKENS``: gpt-4o-mini
# bills images at about 33× the tokens of gpt-4o (2,833 + 5,667 per tile, six tiles at most).
IMAGE_TOKENS: dict[str, int] = {"gpt-4o-mini": 36_835}


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None  # read from the prompt cache
    cache_write_tokens: int | None = None  # written to it


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # reasoning tokens included (completion_tokens_details says how many)
    prompt_tokens_details: _PromptDetails | None = None

    def read(self) -> Usage:
        d = self.prompt_tokens_details
        if d is None:
            return new_usage((self.prompt_tokens or 0, self.completion_tokens or 0, 0, 0, 0))
        return new_usage((self.prompt_tokens or 0, self.completion_tokens or 0, d.cached_tokens or 0,
                          d.cache_write_tokens or 0, 0))


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def read_usage(body: bytes) -> Usage | None:
    """The usage of a complete answer (chat completion, completion, embeddings); None without usage.
    Raises ``msgspec.DecodeError`` for a body that is not JSON."""
    try:
        u = _decode_answer(body).usage
    except msgspec.ValidationError:
        return None
    if u is None or (u.prompt_tokens is None and u.completion_tokens is None):
        return None
    return u.read()


# The ``error.type`` an OpenAI-style error of each status carries (else "server_error").
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error",
    413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    431: "invalid_request_error",
}


class OpenAIProvider(LLMProvider):
    name = "openai"
    otel_name = "openai"
    prices = PRICES
    reports_stream_usage = True
    also_speaks = frozenset(("responses",))  # POST /v1/responses: relayed as it is


# ------------------------------------------------------------------ streams


_ABSENT = msgspec.Raw(b"")
_NULL = msgspec.Raw(b"null")


# Decoded once per event of every stream: ``gc=False`` (a chunk read here never holds a cycle) spares
# the collector's bookkeeping for each of them (≈ 0.7k instructions an event).
class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: msgspec.Raw = _ABSENT  # whether there are any, and their size (Raw | None does not decode arrays)
    function_call: msgspec.Raw = _ABSENT
    refusal: Any = None
    reasoning_content: Any = None  # vLLM, DeepSeek and others stream the reasoning here
    reasoning: Any = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None  # legacy /completions
    finish_reason: str | None = None


class _Error(msgspec.Struct, gc=False):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _NextChunk(msgspec.Struct, gc=False):
    """A chunk once the stream's id is known: its id, model and created are not decoded again (≈ 1k
    instructions an event)."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


class _Chunk(_NextChunk, gc=False):
    id: str | None = None
    model: str | None = None
    created: int | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_next = msgspec.json.Decoder(_NextChunk).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.encode

DONE = b"data: [DONE]\n\n"


def _stream_error_failure(err: _Error) -> Failure:
    """An error event inside a 200 stream, read like the status it stands for."""
    kind = f"{err.type or ''} {err.code or ''}".lower()
    if "context_length" in kind:
        return Failure("context_length_exceeded")
    if "content_filter" in kind or "content_policy" in kind:
        return Failure("content_policy_violation")
    if "rate_limit" in kind or "429" in kind:
        return Failure("rate_limited", "429")
    if "invalid_request" in kind or "authentication" in kind or "permission" in kind:
        return Failure("client_error")
    return Failure("server_error", "5xx", trips_breaker=True)


class ChatStream(StreamReader):
    terminator = DONE
    marks_usage_only = True

    def __init__(self, *, choices: int = 1, include_usage: bool = False) -> None:
        super().__init__(choices=choices, include_usage=include_usage)
        self._finished: set[int] = set()
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None

    def feed(self, name: bytes, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            self.usage_only = False
            return
        first = self.id is None
        try:
            chunk = _decode_chunk(data) if first else _decode_next(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed += 1
            self.usage_only = False
            return
        self.usage_only = not chunk.choices and chunk.usage is not None
        if chunk.error is not None:
            self.error = chunk.error.message or "upstream stream error"
            self.error_failure = _stream_error_failure(chunk.error)
            return
        if first and isinstance(chunk, _Chunk) and chunk.id:
            self.id, self.model, self.created = chunk.id, chunk.model, chunk.created
        for c in chunk.choices:
            if c.index != 0 or c.text is not None:
                self.recoverable = False
            delta = c.delta
            if delta is not None:
                content = delta.content
                if content:
                    self.parts.append(content)
                    self.generated += len(content.encode())
                if (delta.tool_calls and delta.tool_calls != _NULL) or (delta.function_call and delta.function_call != _NULL):
                    self.recoverable = False
                    self.generated += len(delta.tool_calls) + len(delta.function_call)
                if delta.refusal is not None or delta.reasoning_content is not None or delta.reasoning is not None:
                    for extra in (delta.refusal, delta.reasoning_content, delta.reasoning):
                        if isinstance(extra, str):
                            self.generated += len(extra.encode())
            if c.finish_reason is not None:
                self.finish_reasons.append(c.finish_reason)
                self._finished.add(c.index)
                self.finished = len(self._finished) >= self.choices
        if chunk.usage is not None:
            self.usage_seen = True
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            _, _, self.cached_tokens, self.written_tokens, _ = chunk.usage.read()

    @staticmethod
    def continuation_body(body: bytes, partial: str, provider: str, model: str | None) -> bytes | None:
        try:
            req = _decode_any(body)
        except msgspec.DecodeError:
            return None
        if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
            return None
        prefill: dict = {"role": "assistant", "content": partial}
        if provider == "mistral":
            prefill["prefix"] = True  # Mistral continues a final assistant message only when asked
        req["messages"] = [*req["messages"], prefill] if partial else req["messages"]
        req.pop("n", None)
        if model:
            req["model"] = model
        return _encode(req)

    def splicer(self) -> Splicer:
        return ChatSplicer(self)


class ChatSplicer(Splicer):
    """A continuation's chunks under the original's id, model and created; no second role chunk."""

    original: ChatStream

    def event(self, name: bytes, data: bytes, raw: bytes) -> bytes:
        if data == b"[DONE]":
            return DONE
        try:
            chunk = _decode_any(data)
        except msgspec.DecodeError:
            return raw
        if not isinstance(chunk, dict) or "error" in chunk:
            return raw
        o = self.original
        for field, value in (("id", o.id), ("model", o.model), ("created", o.created)):
            if value is not None and field in chunk:
                chunk[field] = value
        keep = bool(chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if isinstance(delta, dict):
                delta.pop("role", None)
                if any(delta.values()):
                    keep = True
            if choice.get("finish_reason") is not None:
                keep = True
        if not keep:
            return b""
        return b"data: " + _encode(chunk) + b"\n\n"
