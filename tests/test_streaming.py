"""Streams are relayed as they arrive, held until the first byte, cancelled with the client,
and never silently truncated (SPEC §2 Streaming, §5 Honest streams)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.support.config import llm_config
from tests.support.fakes import scripted_sse

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def _events(resp) -> list[bytes]:
    body = await resp.read()
    return [e for e in body.split(b"\n\n") if e]


async def test_stream_is_incremental(fake, gateway):
    client, _ = await gateway(llm_config(fake.url))
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Fake-Chunks": "5", "X-Fake-Interval-Ms": "200"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert b'"role":"assistant"' in await resp.content.readuntil(b"\n\n")
    first = await resp.content.readuntil(b"\n\n")
    assert b"tok0" in first
    # the client holds chunk 1 while the upstream is still producing the rest
    assert fake.streams_finished == 0
    rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert fake.streams_finished == 1


async def test_client_disconnect_cancels_upstream(fake, gateway):
    client, logs = await gateway(llm_config(fake.url))
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Fake-Chunks": "50", "X-Fake-Interval-Ms": "100"})
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(fake.client_gone.wait(), timeout=5)
    assert fake.disconnects == 1 and fake.streams_finished == 0
    for _ in range(50):  # the access log line is written as the handler unwinds
        if logs:
            break
        await asyncio.sleep(0.02)
    assert logs[-1]["outcome"] == "client_closed"


async def test_client_disconnect_before_first_byte_cancels_upstream(fake, gateway):
    client, _ = await gateway(llm_config(fake.url))
    task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT,
                                           headers={"X-Fake-First-Delay-Ms": "5000"}))
    await asyncio.wait_for(fake.stream_started.wait(), timeout=5)
    task.cancel()  # the client gives up while the gateway is still waiting for the first token
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.client_gone.wait(), timeout=5)
    assert fake.disconnects == 1


async def test_headers_held_until_first_byte(fake, gateway):
    cfg = llm_config(fake.url).up(ttft_timeout_ms=300)
    client, logs = await gateway(cfg)
    # upstream sends 200 + headers at once but the first token only after 3 s
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Fake-First-Delay-Ms": "3000"})
    # the client never saw the slow upstream's 200: it gets a clean, retryable error instead
    assert resp.status == 504
    body = await resp.json()
    assert body["error"]["code"] == "upstream_timeout"
    assert logs[-1]["error_code"] == "upstream_timeout"


async def test_cut_stream_ends_with_inband_error_openai(fake, gateway):
    client, logs = await gateway(llm_config(fake.url))
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Fake-Chunks": "6", "X-Fake-Cut-After": "3"})
    assert resp.status == 200
    events = await _events(resp)
    assert [b"tok0" in events[1], b"tok1" in events[2]] == [True, True]
    assert len(events) == 4  # role, tok0, tok1, then the gateway's error event
    assert events[-1].startswith(b'data: {"error"')
    assert b"stream_interrupted" in events[-1]
    assert not any(e == b"data: [DONE]" for e in events)
    assert logs[-1]["outcome"] == "stream_error"


async def test_cut_stream_raises_in_openai_sdk(fake, gateway):
    client, _ = await gateway(llm_config(fake.url))
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="k", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[], stream=True,
            extra_headers={"X-Fake-Chunks": "6", "X-Fake-Cut-After": "3"},
        )
        got = []
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                got.append(chunk)
        assert len(got) == 3


async def test_cut_stream_ends_with_inband_error_anthropic(fake, gateway):
    client, _ = await gateway(llm_config(fake.url))
    resp = await client.post("/v1/messages", json={"model": "claude-test-1", "max_tokens": 5, "messages": [],
                                                   "stream": True},
                             headers={"X-Fake-Cut-After": "3"})
    events = await _events(resp)
    assert events[-1].startswith(b"event: error\ndata: ")
    assert b'"type":"error"' in events[-1]
    assert not any(b"message_stop" in e for e in events)


async def test_stalled_stream_ends_with_inband_error(fake, gateway):
    cfg = llm_config(fake.url).up(stream_idle_timeout_ms=200)
    client, logs = await gateway(cfg)
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Fake-Chunks": "3", "X-Fake-Interval-Ms": "3000"})
    events = await _events(resp)
    assert len(events) == 2 and b'"role":"assistant"' in events[0]  # then 3 s of silence
    assert b"stalled" in events[-1] and events[-1].startswith(b'data: {"error"')
    # the gateway stays healthy for the next call
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert resp.status == 200


async def test_envelope_dialect_inband_error_on_t_route(fake, gateway):
    client, _ = await gateway(llm_config(fake.url))
    resp = await client.post("/t/up/chat/completions", json=CHAT, headers={"X-Fake-Cut-After": "1"})
    events = await _events(resp)
    assert events[-1].startswith(b"event: error\ndata: ")
    assert b'"success":false' in events[-1]


async def test_stream_without_done_but_complete_is_relayed_whole(fake, gateway):
    # the Anthropic stream has no [DONE]: it ends with message_stop and a clean close
    client, logs = await gateway(llm_config(fake.url))
    resp = await client.post("/v1/messages", json={"model": "claude-test-1", "max_tokens": 5, "messages": [],
                                                   "stream": True})
    events = await _events(resp)
    assert b"message_stop" in events[-1]
    assert logs[-1]["outcome"] == "ok"


async def test_non_sse_chunked_cut_is_not_made_to_look_complete(aiohttp_server, gateway):
    from aiohttp import web

    async def download(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"part-1;")
        await asyncio.sleep(0.05)
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/files/big", download)
    server = await aiohttp_server(app)
    client, logs = await gateway(f"targets:\n  files: {{base_url: '{server.make_url('')}'}}\n")
    resp = await client.get("/t/files/files/big")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def _sse_server(aiohttp_server, events: int, interval_s: float):
    from aiohttp import web

    async def events_handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(events):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(interval_s)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", events_handler)
    return await aiohttp_server(app)


async def test_sse_client_stream_outlives_the_attempt_timeout(aiohttp_server, gateway):
    server = await _sse_server(aiohttp_server, events=6, interval_s=0.15)  # ~0.9 s in all
    client, logs = await gateway(f"targets:\n  feed: {{base_url: '{server.make_url('')}', timeout_ms: 400}}\n")
    resp = await client.get("/t/feed/events", headers={"Accept": "text/event-stream"})
    events = await _events(resp)
    assert events == [f"data: {i}".encode() for i in range(6)]  # timed by idle gaps, not the 400 ms budget
    assert logs[-1]["stream"] is True and logs[-1]["outcome"] == "ok"


async def test_unasked_for_stream_is_bounded_by_the_attempt_timeout(aiohttp_server, gateway):
    server = await _sse_server(aiohttp_server, events=20, interval_s=0.15)  # ~3 s in all
    client, logs = await gateway(f"targets:\n  feed: {{base_url: '{server.make_url('')}', timeout_ms: 400}}\n")
    resp = await client.get("/t/feed/events")  # no Accept: text/event-stream
    events = await _events(resp)
    assert events[0] == b"data: 0"
    assert events[-1].startswith(b"event: error\ndata: ")  # cut in-band at the attempt deadline
    assert b"exceeded the attempt timeout" in events[-1]
    assert len(events) < 10
    assert logs[-1]["outcome"] == "stream_error"


async def test_one_stall_timer_cuts_the_stalled_stream_and_not_the_flowing_ones(fake, gateway):
    """The silences of every stream of a target are timed by one timer (``transport.Relays``): a stream that stalls is
    cut at its idle timeout while others on the same target, their chunks coming faster than it, run to their end
    however long they take, and a client reading slowly is not taken for an upstream that stalls."""
    cfg = llm_config(fake.url).up(stream_idle_timeout_ms=300)
    client, _ = await gateway(cfg)

    async def flowing() -> bytes:  # 1.2 s in all, never silent for 300 ms
        resp = await client.post("/v1/chat/completions", json=CHAT,
                                 headers={"X-Fake-Chunks": "12", "X-Fake-Interval-Ms": "100"})
        return await resp.read()

    async def slow_reader() -> bytes:  # all sent at once, read after 800 ms: buffered, not silent
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Fake-Chunks": "3"})
        await asyncio.sleep(0.8)
        return await resp.read()

    async def stalled() -> bytes:
        resp = await client.post("/v1/chat/completions", json=CHAT,
                                 headers={"X-Fake-Chunks": "3", "X-Fake-Interval-Ms": "3000"})
        return await resp.read()

    flows, slow, stall = await asyncio.gather(asyncio.gather(flowing(), flowing()), slow_reader(), stalled())
    for body in (*flows, slow):
        assert body.endswith(b"data: [DONE]\n\n") and b"stalled" not in body
    assert b"stalled for 0.3s" in stall and not stall.endswith(b"data: [DONE]\n\n")


async def test_a_long_body_nobody_asked_to_stream_is_cut_at_the_attempts_deadline(aiohttp_server, gateway):
    """A plain-HTTP answer of unknown length is relayed as it comes, within the attempt's ``timeout_ms`` (the
    whole body, not each silence): one that trickles on past it is cut — the client sees an incomplete body,
    never a complete-looking one — and the upstream connection is dropped."""
    from aiohttp import web

    ended: list[str] = []

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        try:
            for _ in range(40):  # 4 s in all, never silent for long
                await resp.write(b"x" * 100)
                await asyncio.sleep(0.1)
            await resp.write_eof()
            ended.append("whole")
        except (ConnectionError, asyncio.CancelledError):
            ended.append("dropped")
            raise
        return resp

    app = web.Application()
    app.router.add_get("/api/file", trickle)
    server = await aiohttp_server(app)
    cfg = llm_config(str(server.make_url(""))).rest(timeout_ms=600)
    client, logs = await gateway(cfg)
    resp = await client.get("/t/rest/file")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    for _ in range(50):
        if ended:
            break
        await asyncio.sleep(0.05)
    assert ended == ["dropped"]
    assert logs[-1]["outcome"] == "stream_error"


async def test_the_first_byte_has_the_ttft_timeout_not_the_idle_one(fake, gateway):
    """``stream_idle_timeout_ms`` times the silences after a stream's first byte; before it, an upstream that sent its
    headers at once has ``ttft_timeout_ms`` (it was cut at the idle timeout: aiohttp's read timeout ran from the
    headers on)."""
    cfg = llm_config(fake.url).up(stream_idle_timeout_ms=300, ttft_timeout_ms=3000)
    client, logs = await gateway(cfg)
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Fake-Chunks": "2", "X-Fake-First-Delay-Ms": "800"})
    assert resp.status == 200
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 1 and logs[-1]["outcome"] == "ok"
    late = await client.post("/v1/chat/completions", json=CHAT,  # past the TTFT timeout it is one all the same
                             headers={"X-Fake-Chunks": "2", "X-Fake-First-Delay-Ms": "5000"})
    assert late.status == 504


async def test_a_plain_http_event_stream_cut_mid_event_ends_with_its_own_error_event(aiohttp_server, gateway):
    """Relayed in whole events like an LLM's: the half event is dropped, not glued onto the in-band error."""
    from aiohttp import web

    async def half(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\ndata: {"n": 2}\n\n')
        await asyncio.sleep(0.05)
        await resp.write(b'data: {"n": 3, "text": "cut he')
        await asyncio.sleep(0.05)
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/events", half)
    server = await aiohttp_server(app)
    client, logs = await gateway(f"targets:\n  feed: {{base_url: '{server.make_url('')}'}}\n")
    events = await _events(await client.get("/t/feed/events", headers={"Accept": "text/event-stream"}))
    assert events[:2] == [b'data: {"n": 1}', b'data: {"n": 2}'] and len(events) == 3
    assert events[2].startswith(b"event: error\ndata: ") and b"cut he" not in events[2]
    assert logs[-1]["outcome"] == "stream_error"


async def test_an_event_stream_framed_with_bare_cr_is_relayed_live_and_complete(aiohttp_server, gateway):
    """CR alone ends an SSE line too (the openai SDK reads it): each event goes on as it comes, and [DONE]
    is seen — the stream is complete, not broken."""
    from aiohttp import web

    read_first = asyncio.Event()  # the rest is sent only once the client has the first event: held, it never would

    async def chat(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\r\r")
            await asyncio.wait_for(read_first.wait(), 5)
        await resp.write(b"data: [DONE]\r\r")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    client, logs = await gateway(llm_config(str(server.make_url("")).rstrip("/")))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    first = await asyncio.wait_for(resp.content.readuntil(b"\r\r"), 5)
    assert b"w0" in first
    read_first.set()
    rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\r\r") and b"error" not in rest
    assert logs[-1]["outcome"] == "ok"


# =============================================================== what counts as the first byte of an answer


_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":'
          b'"assistant","model":"claude-3-5-haiku-latest","content":[],"usage":{"input_tokens":5,"output_tokens":1}}}\n\n')
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_OVERLOADED = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
_ANSWER = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text",'
           b'"text":""}}\n\nevent: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":'
           b'"text_delta","text":"Hi"}}\n\nevent: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
           b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":'
           b'{"output_tokens":1}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/responses"])
async def test_an_overload_right_after_message_start_is_retried_before_the_client_sees_a_byte(aiohttp_server, gateway,
                                                                                               path):
    """Anthropic sends message_start at once and its overloaded_error often right after: nothing was answered yet,
    so it is retried like an error in the first event — natively and translated (chat, Responses)."""
    server, calls = await scripted_sse(aiohttp_server, "/v1/messages", [[_START, _PING, _OVERLOADED], [_START, _ANSWER]])
    client, logs = await gateway(f"""
targets:
  claude: {{base_url: "{str(server.make_url('')).rstrip('/')}", provider: anthropic, models: ["claude-*"],
            retry_matrix: {{"5xx": {{attempts: 2, base_s: 0}}}}}}
""")
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/responses":
        body = {"model": "claude-3-5-haiku-latest", "input": "hi", "stream": True}
    resp = await client.post(path, json=body)
    raw = await resp.read()
    assert resp.status == 200 and len(calls) == 2 and resp.headers["X-ReliAPI-Attempts"] == "2"
    assert b"Overloaded" not in raw and b"Hi" in raw
    assert logs[-1]["outcome"] == "ok"


async def test_comments_before_the_first_event_do_not_count_as_its_first_byte(aiohttp_server, gateway):
    """OpenRouter writes ``: OPENROUTER PROCESSING`` while a model has not begun: an error after it is still
    retried (the client has been sent nothing), and the first-byte timeout still runs."""
    err = b'data: {"error":{"message":"Provider returned error","code":502}}\n\n'
    ok = (b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"Hi"},'
          b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    server, calls = await scripted_sse(aiohttp_server, "/v1/chat/completions",
                                        [[b": OPENROUTER PROCESSING\n\n", err], [b": OPENROUTER PROCESSING\n\n", ok]])
    client, _ = await gateway(f"""
targets:
  up: {{base_url: "{str(server.make_url('')).rstrip('/')}/v1", provider: openai, models: ["gpt-*"],
        retry_matrix: {{"5xx": {{attempts: 2, base_s: 0}}}}}}
""")
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "stream": True,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    raw = await resp.read()
    assert resp.status == 200 and len(calls) == 2 and b"Provider returned error" not in raw and b"Hi" in raw


async def test_after_message_start_a_slow_model_is_timed_by_the_idle_timeout_not_the_first_byte_one(aiohttp_server,
                                                                                                     gateway):
    """message_start is the upstream's first byte: a model that then thinks for longer than ttft_timeout_ms, pinging,
    is not cut and asked again — only a silence longer than stream_idle_timeout_ms would be."""
    server, calls = await scripted_sse(aiohttp_server, "/v1/messages", [[_START, *[_PING] * 40, _ANSWER]])
    client, _ = await gateway(f"""
targets:
  claude: {{base_url: "{str(server.make_url('')).rstrip('/')}", provider: anthropic, models: ["claude-*"],
            ttft_timeout_ms: 150, stream_idle_timeout_ms: 2000}}
""")
    resp = await client.post("/v1/messages", json={"model": "claude-3-5-haiku-latest", "max_tokens": 10, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    raw = await resp.read()
    assert resp.status == 200 and b"Hi" in raw and len(calls) == 1
