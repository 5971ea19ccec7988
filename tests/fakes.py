"""A scriptable fake OpenAI / Anthropic / plain-HTTP upstream, served on a real loopback socket.

Behaviour is chosen per request by ``X-Fake-*`` headers, which the gateway
forwards like any other header:

- ``X-Fake-Status: 503``          answer with this status (an error body in the dialect)
- ``X-Fake-Chunks: 5``            stream this many content chunks (default 3)
- ``X-Fake-Interval-Ms: 50``      pause between chunks
- ``X-Fake-Delay-Ms: 100``        pause before the response headers
- ``X-Fake-First-Delay-Ms: 100``  pause after the headers, before the first chunk
- ``X-Fake-Cut-After: 2``         drop the connection after this many chunks (no terminator)

Every request is recorded (method, raw path with query, headers, body), and the
fake notes when a client went away in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from multidict import CIMultiDict

_json = msgspec.json.encode


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeUpstream:
    requests: list[Seen] = field(default_factory=list)
    disconnects: int = 0
    streams_finished: int = 0
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, handler_args={"auto_decompress": False})
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.requests.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        delay = int(request.headers.get("X-Fake-Delay-Ms", "0"))
        if delay:
            await asyncio.sleep(delay / 1000)
        return body

    # ------------------------------------------------------------ OpenAI

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await self._record(request))
        status = int(request.headers.get("X-Fake-Status", "200"))
        if status != 200:
            message = f"fake error {status}"
            if "X-Fake-Echo-Auth" in request.headers:  # a careless upstream that quotes the key back
                message += f": bad key {request.headers.get('Authorization', '')}"
            return web.json_response(
                {"error": {"message": message, "type": "server_error", "code": None, "param": None}},
                status=status,
            )
        model = body.get("model", "gpt-4o-mini")
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            })
        events = [
            b"data: " + _json({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
            }) + b"\n\n"
            for i in range(int(request.headers.get("X-Fake-Chunks", "3")))
        ]
        events.append(b"data: " + _json({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    # ------------------------------------------------------------ Anthropic

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await self._record(request))
        status = int(request.headers.get("X-Fake-Status", "200"))
        if status != 200:
            return web.json_response(
                {"type": "error", "error": {"type": "overloaded_error", "message": f"fake error {status}"}},
                status=status,
            )
        model = body.get("model", "claude-test-1")
        if not body.get("stream"):
            return web.json_response({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Hello from the fake."}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 4},
            })

        def ev(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _json(data) + b"\n\n"

        events = [ev("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
        for i in range(int(request.headers.get("X-Fake-Chunks", "3"))):
            events.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": f"tok{i} "}}))
        events += [
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": 4}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
        return await self._stream(request, events)

    # ------------------------------------------------------------ streaming core

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        interval = int(request.headers.get("X-Fake-Interval-Ms", "0")) / 1000
        first_delay = int(request.headers.get("X-Fake-First-Delay-Ms", "0")) / 1000
        cut_after = request.headers.get("X-Fake-Cut-After")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.stream_started.set()
        try:
            if first_delay:
                await asyncio.sleep(first_delay)
            for i, event in enumerate(events):
                if cut_after is not None and i == int(cut_after):
                    assert request.transport is not None
                    request.transport.abort()  # a cut with no terminator
                    return resp
                if i and interval:
                    await asyncio.sleep(interval)
                await resp.write(event)
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
        body = await self._record(request)
        status = int(request.headers.get("X-Fake-Status", "200"))
        return web.Response(
            status=status,
            body=_json({
                "method": request.method, "path_qs": request.raw_path, "headers": dict(request.headers),
                "body_b64": base64.b64encode(body).decode(),
            }),
            headers={"Content-Type": "application/json", "X-Upstream": "echo",
                     "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5"},
        )
