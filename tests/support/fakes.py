"""A scriptable, fault-injecting fake OpenAI / Anthropic / plain-HTTP upstream on a real loopback socket.

What each request gets is a ``Fault`` (the name of the thing a test wants to go wrong;
``Fault()`` is a healthy answer). In order of precedence:

1. ``fake.plan(Fault(status=503), Fault(reset=True))`` — consumed one per request;
2. ``fake.script = lambda n, seen: Fault(...)`` — decides from the request number (1-based)
   and the request (e.g. "503 while the test clock says t < 60");
3. ``X-Fake-*`` request headers, which the gateway forwards like any other:
   ``X-Fake-Status: 503``, ``X-Fake-Chunks: 5``, ``X-Fake-Interval-Ms: 50``,
   ``X-Fake-Delay-Ms: 100`` (before the headers), ``X-Fake-First-Delay-Ms: 100`` (after the
   headers, before the first chunk), ``X-Fake-Cut-After: 2`` (drop the connection after
   that many events), ``X-Fake-Echo-Auth`` (quote the caller's key in an error).

Streams are deterministic: content chunk i is ``"tok{i} "``. A request whose last message is
an assistant prefill of k such tokens is continued from ``tok{k}``, so a spliced recovery
can be checked word for word. Every request is recorded with the fake's clock reading.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from multidict import CIMultiDict

_json = msgspec.json.encode


@dataclass
class Fault:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (Retry-After, …)
    error_code: str | None = None  # OpenAI error code / Anthropic error type in an error body
    error_message: str | None = None
    delay_ms: int = 0  # before the response headers
    hang: bool = False  # accept the request and never answer
    reset: bool = False  # TCP reset before any response byte
    chunks: int = 3  # content chunks of a stream
    interval_ms: int = 0  # between events
    first_delay_ms: int = 0  # after the headers, before the first event
    cut_after: int | None = None  # drop the connection after this many events, no terminator
    stall_after: int | None = None  # stop after this many events, connection kept open
    malformed_at: int | None = None  # an event whose data is not JSON, before event i
    no_done: bool = False  # complete answer, but no [DONE] / message_stop
    hold_ms: int = 0  # with no_done: keep the connection open this long before closing
    first_event_error: str | None = None  # a 200 stream whose first event is an error of this type
    error_after: int | None = None  # after this many events, an in-band error event (overloaded), then close
    tool_calls: bool = False  # stream tool-call deltas instead of text
    model: str | None = None  # answer as this model (default: the one asked for)
    echo_auth: bool = False
    usage: dict | None = None  # fields merged into the reported usage (cached tokens, details, …)
    terminal: str = "response.completed"  # /v1/responses: the stream's last event (response.incomplete, …)
    start_input_tokens: int = 5  # Anthropic stream: message_start's input_tokens
    unasked_usage: bool = False  # chat stream: usage in the last chunk, unasked (as Mistral's API does)
    strict: bool = False  # chat: refuse fields OpenAI has and Mistral's API lacks, with its 422 extra_forbidden


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    at: float = 0.0  # the fake's clock when the request arrived

    def json(self) -> dict:
        return msgspec.json.decode(self.body)


def _fault_from_headers(headers) -> Fault:
    cut = headers.get("X-Fake-Cut-After")
    return Fault(
        status=int(headers.get("X-Fake-Status", "200")),
        chunks=int(headers.get("X-Fake-Chunks", "3")),
        interval_ms=int(headers.get("X-Fake-Interval-Ms", "0")),
        delay_ms=int(headers.get("X-Fake-Delay-Ms", "0")),
        first_delay_ms=int(headers.get("X-Fake-First-Delay-Ms", "0")),
        cut_after=int(cut) if cut is not None else None,
        echo_auth="X-Fake-Echo-Auth" in headers,
    )


def _prefill_tokens(body: dict) -> int:
    """How many ``tokN`` words the request's final assistant prefill already holds."""
    messages = body.get("messages") or []
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return 0
    content = messages[-1].get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return len([w for w in str(content or "").split() if w.startswith("tok")])


THINKING = "Let me think step by step."
SIGNATURE = "EqQBCkgIARABGAIiQFakeSignature=="
REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aFake"


def _extended_blocks(body: dict) -> list[tuple[dict, dict, list[dict]]]:
    """The blocks a Messages answer holds before its text, as (whole block, its content_block_start, its deltas):
    with ``thinking`` enabled a thinking block (streamed as thinking_delta then signature_delta) and a
    redacted_thinking one; with a ``web_search_*`` server tool a server_tool_use block and its result."""
    blocks: list[tuple[dict, dict, list[dict]]] = []
    if isinstance(body.get("thinking"), dict) and body["thinking"].get("type") == "enabled":
        half = len(THINKING) // 2
        blocks.append(({"type": "thinking", "thinking": THINKING, "signature": SIGNATURE},
                       {"type": "thinking", "thinking": "", "signature": ""},
                       [{"type": "thinking_delta", "thinking": THINKING[:half]},
                        {"type": "thinking_delta", "thinking": THINKING[half:]},
                        {"type": "signature_delta", "signature": SIGNATURE}]))
        redacted = {"type": "redacted_thinking", "data": REDACTED}
        blocks.append((redacted, redacted, []))
    if any(isinstance(t, dict) and str(t.get("type", "")).startswith("web_search") for t in body.get("tools") or ()):
        use = {"type": "server_tool_use", "id": "srvtoolu_fake1", "name": "web_search", "input": {"query": "fake"}}
        blocks.append((use, {**use, "input": {}}, [{"type": "input_json_delta", "partial_json": '{"query": "fake"}'}]))
        result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_fake1", "content": [
            {"type": "web_search_result", "title": "Fake", "url": "https://example.com/", "encrypted_content": "Zm9v",
             "page_age": None}]}
        blocks.append((result, result, []))
    return blocks


def _reset(request: web.Request) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or overloaded server would."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass
class FakeUpstream:
    requests: list[Seen] = field(default_factory=list)
    disconnects: int = 0
    streams_finished: int = 0
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    planned: list[Fault] = field(default_factory=list)
    script: Callable[[int, Seen], Fault | None] | None = None
    clock: Callable[[], float] = time.monotonic
    url: str = ""

    def plan(self, *faults: Fault) -> None:
        self.planned.extend(faults)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, handler_args={"auto_decompress": False})
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/embeddings", self.embeddings)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def _record(self, request: web.Request) -> tuple[bytes, Fault | None]:
        """Record the request and play the fault's pre-response part; None: the fault already answered."""
        body = await request.read()
        seen = Seen(request.method, request.raw_path, CIMultiDict(request.headers), body, self.clock())
        self.requests.append(seen)
        fault = None
        if self.planned:
            fault = self.planned.pop(0)
        elif self.script is not None:
            fault = self.script(len(self.requests), seen)
        if fault is None:
            fault = _fault_from_headers(request.headers)
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.hang:
            await asyncio.sleep(3600)
        if fault.reset:
            _reset(request)
            return body, None
        return body, fault

    # ------------------------------------------------------------ OpenAI

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw, fault = await self._record(request)
        if fault is None:
            return web.Response()  # never sent: the connection is gone
        body = msgspec.json.decode(raw)
        extra = [f for f in ("stream_options", "user", "verbosity", "store", "metadata") if f in body]
        if fault.strict and extra:  # Mistral's answer to a field its schema lacks
            return web.json_response({"object": "error", "message": {"detail": [
                {"type": "extra_forbidden", "loc": ["body", f], "msg": "Extra inputs are not permitted"} for f in extra]},
                "type": "invalid_request_error", "param": None, "code": None}, status=422)
        if fault.status != 200:
            message = fault.error_message or f"fake error {fault.status}"
            if fault.echo_auth:  # a careless upstream that quotes the key back
                message += f": bad key {request.headers.get('Authorization', '')}"
            return web.json_response(
                {"error": {"message": message, "type": "server_error" if fault.status >= 500 else "invalid_request_error",
                           "code": fault.error_code, "param": None}},
                status=fault.status, headers=fault.headers,
            )
        model = fault.model or body.get("model", "gpt-4o-mini")
        start = _prefill_tokens(body)
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9, **(fault.usage or {})},
            }, headers=fault.headers)

        asked_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            out = {"id": f"chatcmpl-fake{len(self.requests)}", "object": "chat.completion.chunk",
                   "created": 1700000000 + len(self.requests), "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if asked_usage:  # as OpenAI: every chunk then has "usage": null, the last one the usage
                out["usage"] = None
            if finish and fault.unasked_usage:
                out["usage"] = {"prompt_tokens": 5, "completion_tokens": fault.chunks - start,
                                "total_tokens": 5 + fault.chunks - start, **(fault.usage or {})}
            return b"data: " + _json(out) + b"\n\n"

        events = []
        if fault.first_event_error:
            events.append(b"data: " + _json({"error": {"message": "fake stream error", "type": fault.first_event_error,
                                                      "code": None, "param": None}}) + b"\n\n")
        events.append(chunk({"role": "assistant", "content": ""}))
        if fault.tool_calls:
            events.append(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                 "function": {"name": "lookup", "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": f'{{"n{i}":{i}'}}]})
                       for i in range(start, fault.chunks)]
        else:
            events += [chunk({"content": f"tok{i} "}) for i in range(start, fault.chunks)]
        events.append(chunk({}, "tool_calls" if fault.tool_calls else "stop"))
        if asked_usage:
            events.append(b"data: " + _json({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": fault.chunks - start,
                                         "total_tokens": 5 + fault.chunks - start, **(fault.usage or {})},
            }) + b"\n\n")
        if not fault.no_done:
            events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events, fault)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's embeddings answer: a vector per input (``dimensions`` long, else 8; base64 when asked, as the
        SDK does by default), usage with ``prompt_tokens`` = ``total_tokens`` (a token per word or token id)."""
        raw, fault = await self._record(request)
        if fault is None:
            return web.Response()
        if fault.status != 200:
            return web.json_response(
                {"error": {"message": fault.error_message or f"fake error {fault.status}", "type": "invalid_request_error",
                           "code": fault.error_code, "param": None}}, status=fault.status, headers=fault.headers)
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:  # as OpenAI answers a body that is not JSON
            return web.json_response({"error": {"message": "We could not parse the JSON body of your request.",
                                                "type": "invalid_request_error", "param": None, "code": None}}, status=400)
        given = body["input"]
        items = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
        size = body.get("dimensions") or 8
        data, tokens = [], 0
        for i, item in enumerate(items):
            tokens += len(item.split()) or 1 if isinstance(item, str) else len(item)
            seed = zlib.crc32(_json(item))
            vector = [((seed >> (k % 24)) % 1000) / 1000 - 0.5 for k in range(size)]
            encoded = (base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
                       if body.get("encoding_format") == "base64" else vector)
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        return web.json_response({"object": "list", "data": data, "model": fault.model or body.get("model"),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens, **(fault.usage or {})}},
                                 headers=fault.headers)

    # ------------------------------------------------------------ Anthropic

    async def count_tokens(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, N about the body's bytes / 4."""
        raw, fault = await self._record(request)
        if fault is None:
            return web.Response()
        return web.json_response({"input_tokens": max(1, len(raw) // 4)}, headers=fault.headers)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw, fault = await self._record(request)
        if fault is None:
            return web.Response()
        body = msgspec.json.decode(raw)
        if fault.status != 200:
            return web.json_response(
                {"type": "error", "error": {"type": fault.error_code or "overloaded_error",
                                            "message": fault.error_message or f"fake error {fault.status}"}},
                status=fault.status, headers=fault.headers,
            )
        model = fault.model or body.get("model", "claude-test-1")
        start = _prefill_tokens(body)
        extended = _extended_blocks(body)  # thinking, server tools: only when the request asks for them
        if not body.get("stream"):
            return web.json_response({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [*(block for block, _, _ in extended), {"type": "text", "text": "Hello from the fake."}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 4, **(fault.usage or {})},
            }, headers=fault.headers)

        def ev(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _json(data) + b"\n\n"

        events = []
        if fault.first_event_error:
            events.append(ev("error", {"type": "error", "error": {"type": fault.first_event_error,
                                                                   "message": "fake stream error"}}))
        events += [ev("message_start", {"type": "message_start", "message": {
            "id": f"msg_fake{len(self.requests)}", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": fault.start_input_tokens, "output_tokens": 1}}})]
        if extended:
            events.append(ev("ping", {"type": "ping"}))
        for index, (_, opening, deltas) in enumerate(extended):
            events.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": opening}))
            events += [ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                       for delta in deltas]
            events.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
        text = len(extended)
        events.append(ev("content_block_start", {"type": "content_block_start", "index": text,
                                                 "content_block": {"type": "text", "text": ""}}))
        for i in range(start, fault.chunks):
            events.append(ev("content_block_delta", {"type": "content_block_delta", "index": text,
                                                     "delta": {"type": "text_delta", "text": f"tok{i} "}}))
        events += [
            ev("content_block_stop", {"type": "content_block_stop", "index": text}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": fault.chunks - start, **(fault.usage or {})}}),
        ]
        if not fault.no_done:
            events.append(ev("message_stop", {"type": "message_stop"}))
        return await self._stream(request, events, fault)

    # ------------------------------------------------------------ OpenAI Responses

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: a complete ``response`` object, or the real event sequence
        (``response.created`` … ``response.output_text.delta`` … ``response.completed``, no ``[DONE]``).
        ``first_event_error`` ends the stream with an ``error`` event of that code right after
        ``response.created`` and ``response.in_progress`` (as the API fails a response before it answers),
        ``error_after`` after that many events — both in the shape the API sends (details nested under
        ``error``); ``terminal`` picks the last event."""
        raw, fault = await self._record(request)
        if fault is None:
            return web.Response()
        body = msgspec.json.decode(raw)
        if fault.status != 200:
            return web.json_response(
                {"error": {"message": fault.error_message or f"fake error {fault.status}",
                           "type": "server_error" if fault.status >= 500 else "invalid_request_error",
                           "code": fault.error_code, "param": None}},
                status=fault.status, headers=fault.headers,
            )
        model = fault.model or body.get("model", "gpt-4o-mini")
        n = len(self.requests)
        rid, mid = f"resp_fake{n}", f"msg_fake{n}"
        text = "".join(f"tok{i} " for i in range(fault.chunks)) if body.get("stream") else "Hello from the fake."
        usage = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": fault.chunks if body.get("stream") else 4,
                 "output_tokens_details": {"reasoning_tokens": 0}, **(fault.usage or {})}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        status = {"response.incomplete": "incomplete", "response.failed": "failed"}.get(fault.terminal, "completed")
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}

        def response(state: str, output: list, usage: dict | None) -> dict:
            return {
                "id": rid, "object": "response", "created_at": 1700000000 + n, "status": state, "model": model,
                "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "error": {"code": "server_error", "message": "fake failure"} if state == "failed" else None,
                "incomplete_details": {"reason": "max_output_tokens"} if state == "incomplete" else None,
                "usage": usage,
            }

        if not body.get("stream"):
            return web.json_response(response(status, [message], usage), headers=fault.headers)
        seq = iter(range(1_000_000))

        def ev(kind: str, **data: object) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + _json({"type": kind, "sequence_number": next(seq), **data}) + b"\n\n"

        at = {"item_id": mid, "output_index": 0, "content_index": 0}
        events = [
            ev("response.created", response=response("in_progress", [], None)),
            ev("response.in_progress", response=response("in_progress", [], None)),
        ]
        if fault.first_event_error:
            events.append(ev("error", error={"type": fault.first_event_error, "code": fault.first_event_error,
                                             "message": "fake stream error", "param": None}))
            return await self._stream(request, events, fault)
        events += [
            ev("response.output_item.added", output_index=0,
               item={**message, "status": "in_progress", "content": []}),
            ev("response.content_part.added", **at, part={**part, "text": ""}),
        ]
        events += [ev("response.output_text.delta", **at, delta=f"tok{i} ", logprobs=[]) for i in range(fault.chunks)]
        events += [
            ev("response.output_text.done", **at, text=text, logprobs=[]),
            ev("response.content_part.done", **at, part=part),
            ev("response.output_item.done", output_index=0, item=message),
        ]
        if not fault.no_done:
            events.append(ev(fault.terminal, response=response(status, [message], usage)))
        return await self._stream(request, events, fault)

    # ------------------------------------------------------------ streaming core

    async def _stream(self, request: web.Request, events: list[bytes], fault: Fault) -> web.StreamResponse:
        if fault.error_after is not None:
            overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            error = (b"event: error\ndata: " + _json(overloaded) if request.path.endswith("/messages")
                     else b"data: " + _json({"error": {"message": "Overloaded", "type": "server_error",
                                                       "code": None, "param": None}})) + b"\n\n"
            if request.path.endswith("/responses"):  # the shape the API sends mid-stream: details nested
                error = b"event: error\ndata: " + _json({"type": "error", "sequence_number": fault.error_after, "error": {
                    "type": "server_error", "code": "server_error", "message": "Overloaded", "param": None}}) + b"\n\n"
            events = [*events[:fault.error_after], error]
        if fault.malformed_at is not None:
            events.insert(fault.malformed_at, b'data: {"choices": [{"delta": {"content": "tok\n\n')
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **fault.headers})
        await resp.prepare(request)
        self.stream_started.set()
        try:
            if fault.first_delay_ms:
                await asyncio.sleep(fault.first_delay_ms / 1000)
            for i, event in enumerate(events):
                if fault.cut_after is not None and i == fault.cut_after:
                    assert request.transport is not None
                    request.transport.abort()  # a cut with no terminator
                    return resp
                if fault.stall_after is not None and i == fault.stall_after:
                    await asyncio.sleep(3600)  # silent, connection open, until the client gives up
                if i and fault.interval_ms:
                    await asyncio.sleep(fault.interval_ms / 1000)
                await resp.write(event)
            if fault.hold_ms:
                await asyncio.sleep(fault.hold_ms / 1000)
            await resp.write_eof()
            self.streams_finished += 1
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects += 1
            self.client_gone.set()
            raise
        return resp

    # ------------------------------------------------------------ plain HTTP

    async def redirect(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"})

    async def echo(self, request: web.Request) -> web.Response:
        body, fault = await self._record(request)
        if fault is None:
            return web.Response()
        return web.Response(
            status=fault.status,
            body=_json({
                "method": request.method, "path_qs": request.raw_path, "headers": dict(request.headers),
                "body_b64": base64.b64encode(body).decode(),
            }),
            headers={"Content-Type": "application/json", "X-Upstream": "echo",
                     "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
                     **fault.headers},
        )


async def scripted_sse(aiohttp_server, path: str, attempts: list[list[bytes]]):
    """A raw SSE upstream at ``path`` whose n-th call writes the parts of ``attempts[n]`` as they are, each its own
    write (the last attempt's again after that): events split anywhere, comments, anything a real one may send.
    Returns the server and the list its calls are counted in."""
    calls: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        parts = attempts[min(len(calls), len(attempts) - 1)]
        calls.append(1)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(path, handler)
    return await aiohttp_server(app), calls
