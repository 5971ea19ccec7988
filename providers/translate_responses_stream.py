"""Chat Completions / Anthropic Messages streams → OpenAI Responses events (``providers.translate_responses``
does requests, ``providers.translate_responses_answer`` complete answers and errors).

``ResponsesEvents`` writes the Responses event sequence the openai SDK and its stream helper
(``client.responses.stream(...)``) expect — ``response.created``, ``response.in_progress``, per output item
``response.output_item.added``, for text ``response.content_part.added`` / ``response.output_text.delta`` … /
``.done`` / ``response.content_part.done``, for a call ``response.function_call_arguments.delta`` … / ``.done``,
then ``response.output_item.done``, and last ``response.completed`` (or ``response.incomplete``) with the whole
Response, usage included — a ``sequence_number`` on every event. The two readers below feed it from the
upstream's events, one at a time, and return the bytes for the client (b"" when an event has none).
An upstream's in-band error becomes the Responses ``error`` event.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.streaming.sse import unreadable
from providers import responses
from providers.translate_responses_answer import (
    INCOMPLETE,
    call_item,
    ids,
    response_object,
    usage_from_chat,
    usage_object,
)

_encode = msgspec.json.encode


class ResponsesEvents:
    """The Responses event sequence of one answer, written as the upstream's events come."""

    def __init__(self, echo: dict[str, Any] | None = None) -> None:
        self.echo = echo  # the request's settings the Response repeats
        self.seq = 0
        self.rid = "resp_"
        self.mid = "msg_"
        self.model: Any = None
        self.created = int(time.time())
        self.started = False
        self.done = False
        self.items: list[dict[str, Any]] = []  # the output so far, in order
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[Any, dict[str, Any]] = {}  # the upstream's key of a call (index) → its item
        self.index: dict[str, int] = {}  # an item's id → its output_index

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n"

    def _response(self, status: str, reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_object(self.rid, self.model, self.created, self.items, reason=reason, usage=usage,
                               status=status, echo=self.echo)

    def start(self, upstream_id: Any, prefix: str, model: Any) -> bytes:
        if self.started:
            return b""
        self.started = True
        self.rid, self.mid = ids(upstream_id, prefix)
        self.model = model
        return (self._event("response.created", {"response": self._response("in_progress")})
                + self._event("response.in_progress", {"response": self._response("in_progress")}))

    def _add(self, item: dict[str, Any]) -> bytes:
        self.index[item["id"]] = len(self.items)
        self.items.append(item)
        return self._event("response.output_item.added", {"output_index": len(self.items) - 1, "item": item})

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.index[item["id"]]}

    def text(self, delta: str) -> bytes:
        out = b""
        item = self.open
        if item is None or item["type"] != "message":
            out += self.close()
            item_id = self.mid if not self.items else f"{self.mid}_{len(self.items)}"
            item = self.open = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant",
                                "content": []}
            out += self._add(item)
            item["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
            out += self._event("response.content_part.added", {**self._where(item), "content_index": 0,
                                                               "part": item["content"][0]})
        item["content"][0]["text"] += delta
        return out + self._event("response.output_text.delta", {**self._where(item), "content_index": 0,
                                                                "delta": delta, "logprobs": []})

    def call(self, key: Any, call_id: Any, name: Any) -> bytes:
        out = self.close()
        item = self.open = call_item(str(call_id), str(name), "", "in_progress")
        self.calls[key] = item
        return out + self._add(item)

    def arguments(self, key: Any, delta: str) -> bytes:
        item = self.calls.get(key)
        if item is None or not delta:
            return b""
        item["arguments"] += delta
        return self._event("response.function_call_arguments.delta", {**self._where(item), "delta": delta})

    def close(self, status: str = "completed") -> bytes:
        """End the item being streamed (``status``: incomplete when the answer was cut short)."""
        item, self.open = self.open, None
        if item is None:
            return b""
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            out = self._event("response.output_text.done", {**where, "content_index": 0, "text": part["text"],
                                                            "logprobs": []})
            out += self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
        else:
            out = self._event("response.function_call_arguments.done", {**where, "name": item["name"],
                                                                        "arguments": item["arguments"]})
        item["status"] = status
        return out + self._event("response.output_item.done", {"output_index": where["output_index"], "item": item})

    def finish(self, reason: str | None, usage: dict[str, Any] | None) -> bytes:
        """The last events: the open item's end, and ``response.completed`` (``response.incomplete``: ``reason``)."""
        if self.done or not self.started:
            return b""
        self.done = True
        out = self.close("incomplete" if reason else "completed")
        status = "incomplete" if reason else "completed"
        return out + self._event(f"response.{status}", {"response": self._response(status, reason, usage)})

    def error(self, code: Any, message: Any) -> bytes:
        """The Responses ``error`` event, in the shapes the gateway's own has (``providers.responses``)."""
        self.done = True
        self.seq += 1
        return responses.error_event(code, str(message or "upstream error"), self.seq - 1)


def _decoded(data: bytes) -> dict[str, Any] | None:
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        unreadable(data)
        return None
    return doc if isinstance(doc, dict) else None


class ChatToResponsesStream:
    """OpenAI ``chat.completion.chunk`` events in, Responses events out."""

    def __init__(self, echo: dict[str, Any] | None = None) -> None:
        self.out = ResponsesEvents(echo)
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None  # until the upstream reports it: unknown, not 0/0/0

    def feed(self, name: bytes, data: bytes) -> bytes:
        if data == b"[DONE]":
            return self.out.finish(INCOMPLETE.get(self.finish_reason or ""), self.usage)
        chunk = _decoded(data)
        if chunk is None:
            return b""
        if "error" in chunk:
            error = chunk.get("error") or {}
            error = error if isinstance(error, dict) else {"message": str(error)}
            return self.out.error(error.get("code") or error.get("type"), error.get("message"))
        out = self.out.start(chunk.get("id"), "chatcmpl-", chunk.get("model"))
        u = chunk.get("usage")
        if isinstance(u, dict):
            self.usage = usage_from_chat(u)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self.out.text(delta["content"])
            for call in delta.get("tool_calls") or ():
                key = call.get("index", 0)
                fn = call.get("function") or {}
                if key not in self.out.calls:
                    out += self.out.call(key, call.get("id"), fn.get("name"))
                out += self.out.arguments(key, fn.get("arguments") or "")
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out


class MessagesToResponsesStream:
    """Anthropic Messages SSE events in, Responses events out."""

    def __init__(self, echo: dict[str, Any] | None = None) -> None:
        self.out = ResponsesEvents(echo)
        self.stop_reason: str | None = None
        self.prompt = self.cached = self.written = self.completion = 0

    def feed(self, name: bytes, data: bytes) -> bytes:
        ev = _decoded(data)
        if ev is None:
            return b""
        kind = ev.get("type")
        if kind == "message_start":
            msg = ev.get("message") or {}
            self._usage(msg.get("usage") or {})
            return self.out.start(msg.get("id"), "msg_", msg.get("model"))
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                return self.out.call(ev.get("index", 0), block.get("id"), block.get("name"))
            return b""
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self.out.text(delta.get("text", ""))
            if delta.get("type") == "input_json_delta":
                return self.out.arguments(ev.get("index", 0), delta.get("partial_json", ""))
            return b""  # thinking, signatures
        if kind == "content_block_stop":
            return self.out.close() if self.out.open is not None and self.out.open["type"] == "function_call" else b""
        if kind == "message_delta":
            self._usage(ev.get("usage") or {})
            self.stop_reason = (ev.get("delta") or {}).get("stop_reason") or self.stop_reason
            return b""
        if kind == "message_stop":
            return self.out.finish(INCOMPLETE.get(self.stop_reason or ""),
                                   usage_object(self.prompt, self.completion, self.cached, written=self.written))
        if kind == "error":
            error = ev.get("error") or {}
            return self.out.error(error.get("type"), error.get("message"))
        return b""  # ping

    def _usage(self, u: dict[str, Any]) -> None:
        if u.get("input_tokens") is not None or u.get("cache_read_input_tokens") is not None:
            self.cached = u.get("cache_read_input_tokens") or 0
            self.written = u.get("cache_creation_input_tokens") or 0
            self.prompt = (u.get("input_tokens") or 0) + self.written + self.cached
        if u.get("output_tokens") is not None:
            self.completion = u["output_tokens"]
