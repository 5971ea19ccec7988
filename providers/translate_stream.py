"""OpenAI Chat Completions ⇄ Anthropic Messages streams, event by event (``providers.translate``
does requests, complete answers and errors). Each class is fed one upstream SSE event at a time
and returns the bytes of the client's dialect for it (b"" when it has no equivalent)."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.streaming.sse import unreadable
from providers.translate import FINISH_OF_STOP, STOP_OF_FINISH, anthropic_usage

_encode = msgspec.json.encode


class AnthropicToOpenAIStream:
    """Anthropic Messages SSE events in, OpenAI ``chat.completion.chunk`` events out."""

    def __init__(self, *, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.id = "chatcmpl-"
        self.model: str | None = None
        self.created = int(time.time())
        self.prompt = 0  # all of it: input, cache reads and cache writes, as OpenAI counts it
        self.cached = self.written = 0
        self.completion = 0
        self.tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool call index
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model,
                                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            chunk["choices"] = []
            chunk["usage"] = usage
        return b"data: " + _encode(chunk) + b"\n\n"

    def feed(self, name: bytes, data: bytes) -> bytes:
        try:
            ev = msgspec.json.decode(data)
        except msgspec.DecodeError:
            unreadable(data)
            return b""
        if not isinstance(ev, dict):
            return b""
        kind = ev.get("type")
        if kind == "message_start":
            msg = ev.get("message") or {}
            self.id = "chatcmpl-" + str(msg.get("id") or "").removeprefix("msg_")
            self.model = msg.get("model")
            self._prompt(msg.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                n = self.tool_index.setdefault(ev.get("index", 0), len(self.tool_index))
                return self._chunk({"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                                                    "function": {"name": block.get("name"), "arguments": ""}}]})
            return b""
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                n = self.tool_index.get(ev.get("index", 0), 0)
                return self._chunk({"tool_calls": [{"index": n, "function": {"arguments": delta.get("partial_json", "")}}]})
            return b""
        if kind == "message_delta":
            usage = ev.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.completion = usage["output_tokens"]
            if usage.get("input_tokens") or usage.get("cache_read_input_tokens"):  # (cumulative, where sent)
                self._prompt(usage)
            reason = (ev.get("delta") or {}).get("stop_reason")
            out = self._chunk({}, FINISH_OF_STOP.get(reason or "", "stop"))
            if self.include_usage:
                out += self._chunk({}, usage={"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                                              "total_tokens": self.prompt + self.completion,
                                              "prompt_tokens_details": {"cached_tokens": self.cached,
                                                                        "cache_write_tokens": self.written}})
            return out
        if kind == "message_stop":
            self.done = True
            return b"data: [DONE]\n\n"
        if kind == "error":
            error = ev.get("error") or {}
            body = {"error": {"message": error.get("message", "upstream error"), "type": error.get("type", "api_error"),
                              "code": None, "param": None}}
            return b"data: " + _encode(body) + b"\n\n"
        return b""  # ping, content_block_stop, thinking deltas

    def _prompt(self, usage: dict[str, Any]) -> None:
        self.cached = usage.get("cache_read_input_tokens") or 0
        self.written = usage.get("cache_creation_input_tokens") or 0
        self.prompt = (usage.get("input_tokens") or 0) + self.cached + self.written


class OpenAIToAnthropicStream:
    """OpenAI ``chat.completion.chunk`` events in, Anthropic Messages SSE events out."""

    def __init__(self) -> None:
        self.started = False
        self.block: int = -1
        self.block_kind: str | None = None
        self.tools: dict[int, int] = {}  # OpenAI tool call index → Anthropic block index
        self.args: dict[int, str] = {}  # OpenAI tool call index → its arguments so far
        self.open_tool: int | None = None  # the OpenAI tool call whose block is open
        # tool calls that began while another's arguments were still coming (OpenAI may interleave them; an
        # Anthropic block ends before the next begins): their start and arguments, until that one is complete
        self.held: dict[int, tuple[dict[str, Any], list[str]]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}  # OpenAI's usage chunk, when it came
        self.done = False

    @staticmethod
    def _event(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"

    def _close_block(self) -> bytes:
        if self.block_kind is None:
            return b""
        self.block_kind = None
        self.open_tool = None
        return self._event("content_block_stop", {"type": "content_block_stop", "index": self.block})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self.block += 1
        self.block_kind = kind
        return out + self._event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                         "content_block": block})

    def _open_tool(self, i: int, block: dict[str, Any]) -> bytes:
        out = self._open_block("tool", block)
        self.tools[i], self.open_tool, self.args[i] = self.block, i, ""
        return out

    def _arguments(self, i: int, args: str) -> bytes:
        if not args:
            return b""
        self.args[i] += args
        return self._event("content_block_delta", {"type": "content_block_delta", "index": self.tools[i],
                                                   "delta": {"type": "input_json_delta", "partial_json": args}})

    def _release(self, *, force: bool = False) -> bytes:
        """The held tool calls, in order, each once the one before is complete (all of them: ``force``)."""
        out = b""
        while self.held and (force or self.open_tool is None or _complete(self.args[self.open_tool])):
            i = next(iter(self.held))
            block, parts = self.held.pop(i)
            out += self._open_tool(i, block) + self._arguments(i, "".join(parts))
        return out

    def feed(self, name: bytes, data: bytes) -> bytes:
        if data == b"[DONE]":
            return self._finish()
        try:
            chunk = msgspec.json.decode(data)
        except msgspec.DecodeError:
            unreadable(data)
            return b""
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            error = chunk.get("error") or {}
            return self._event("error", {"type": "error", "error": {"type": "api_error",
                                                                    "message": error.get("message", "upstream error")}})
        out = b""
        if not self.started:
            self.started = True
            out += self._event("message_start", {"type": "message_start", "message": {
                "id": "msg_" + str(chunk.get("id") or "").removeprefix("chatcmpl-"), "type": "message",
                "role": "assistant", "model": chunk.get("model"), "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.block_kind != "text":
                    out += self._release(force=True) + self._open_block("text", {"type": "text", "text": ""})
                out += self._event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                           "delta": {"type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or ():
                i = call.get("index", 0)
                fn = call.get("function") or {}
                args = fn.get("arguments") or ""
                if i in self.held:
                    self.held[i][1].append(args)
                elif i not in self.tools and self.open_tool is not None and not _complete(self.args[self.open_tool]):
                    self.held[i] = ({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}},
                                    [args])
                else:
                    if i not in self.tools:
                        out += self._open_tool(i, {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                                                   "input": {}})
                    out += self._arguments(i, args)
                    if self.held and i == self.open_tool:
                        out += self._release()
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def _finish(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out = self._release(force=True) + self._close_block()
        out += self._event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": STOP_OF_FINISH.get(self.finish or "", "end_turn"), "stop_sequence": None},
            "usage": anthropic_usage(self.usage)})
        return out + self._event("message_stop", {"type": "message_stop"})


def _complete(arguments: str) -> bool:
    """Are a tool call's arguments so far a whole JSON value (nothing more can follow)?"""
    try:
        msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return False
    return True
