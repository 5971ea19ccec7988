"""OpenAI streams are asked for their usage chunk (SPEC §5 Budget): the cost of a stream is
exact, and a client that did not ask for the usage chunk does not get it."""

from __future__ import annotations

import msgspec
import pytest

from tests.support.config import GatewayConfig
from tests.support.fakes import Fault, scripted_sse

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def config(url: str) -> GatewayConfig:
    return GatewayConfig(url, default_target="up").up().up("mistral", provider="mistral", models=["mistral-*"])


def data_events(raw: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    return out


@pytest.mark.parametrize("interval_ms", [0, 15], ids=["in-the-head", "in-a-later-read"])
async def test_the_usage_chunk_is_asked_for_read_and_not_relayed(fake, gateway, interval_ms):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(chunks=4, interval_ms=interval_ms))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    raw = await resp.read()
    events = data_events(raw)
    sent = fake.requests[0].json()
    assert sent["stream_options"] == {"include_usage": True}  # asked upstream …
    assert events[-1] == "[DONE]"
    # … not relayed: neither the usage chunk nor the "usage": null OpenAI then puts in every other chunk
    assert b'"usage"' not in raw
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == "tok0 tok1 tok2 tok3 "
    assert (logs[-1]["prompt_tokens"], logs[-1]["completion_tokens"]) == (5, 4)  # … but counted
    assert logs[-1]["cost_usd"] > 0


async def test_a_server_that_writes_json_with_spaces_gets_its_usage_null_dropped_too(aiohttp_server, gateway):
    """vLLM and other OpenAI-compatible servers write ``"usage": null`` with a space: a client that did not ask for
    usage sees none of it either way."""
    import json

    chunks = [b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [
        {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": finish}], "usage": None}).encode() + b"\n\n"
              for i, finish in ((0, None), (1, "stop"))]
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    chunks.append(b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                                          "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
    server, _ = await scripted_sse(aiohttp_server, "/v1/chat/completions", [chunks])
    client, logs = await gateway(config(str(server.make_url("")).rstrip("/")))
    raw = await (await client.post("/v1/chat/completions", json=CHAT)).read()
    assert b'"usage"' not in raw and b"tok0 " in raw and b"tok1 " in raw and raw.endswith(b"data: [DONE]\n\n")
    assert logs[-1]["completion_tokens"] == 2


async def test_a_client_that_asked_for_usage_gets_it_and_its_body_unchanged(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=3))
    raw = msgspec.json.encode({**CHAT, "stream_options": {"include_usage": True}})
    resp = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    events = data_events(await resp.read())
    assert fake.requests[0].body == raw
    usage = [e for e in events if isinstance(e, dict) and e.get("usage") and not e.get("choices")]
    assert usage and usage[0]["usage"]["completion_tokens"] == 3
    assert all(e["usage"] is None for e in events[:-1] if isinstance(e, dict) and e.get("choices"))  # as sent


async def test_other_stream_options_are_kept_and_other_providers_are_not_asked(fake, gateway):
    client, _ = await gateway(config(fake.url))
    await (await client.post("/v1/chat/completions", json={**CHAT, "stream_options": {"x": 1}})).read()
    assert fake.requests[0].json()["stream_options"] == {"x": 1, "include_usage": True}
    await (await client.post("/v1/chat/completions", json={**CHAT, "model": "mistral-small-latest"})).read()
    assert "stream_options" not in fake.requests[1].json()


async def test_a_stream_cut_before_the_usage_chunk_its_client_asked_for_is_broken_not_finished(fake, gateway):
    """The client asked for the usage chunk: a stream cut after the last choice finished but before it came is not
    complete — it ends with the in-band error and is not cached (it was given a [DONE], logged ok, and stored without
    the usage chunk, found by a black-box review). A client that did not ask has its whole answer: [DONE] is added."""
    client, logs = await gateway(config(fake.url).up(cache={"ttl_s": 60}))
    asked = {**CHAT, "stream_options": {"include_usage": True}}
    fake.plan(Fault(chunks=3, cut_after=5))  # role, three tokens, the finish chunk; cut before the usage chunk
    events = data_events(await (await client.post("/v1/chat/completions", json=asked)).read())
    assert "[DONE]" not in events and isinstance(events[-1], dict) and "error" in events[-1]
    assert logs[-1]["outcome"] == "stream_error"
    again = await client.post("/v1/chat/completions", json=asked)  # not stored: asked again, it runs again
    assert again.headers["X-Cache"] == "MISS" and data_events(await again.read())[-1] == "[DONE]"
    assert len(fake.requests) == 2
    fake.plan(Fault(chunks=3, cut_after=5))
    events = data_events(await (await client.post("/v1/chat/completions", json={**CHAT, "user": "u2"})).read())
    assert events[-1] == "[DONE]" and logs[-1]["outcome"] == "ok"  # the usage chunk was the gateway's own ask


async def test_a_server_that_refuses_the_added_stream_options_is_asked_again_without_it(aiohttp_server, gateway):
    """The client never sent stream_options: a 400 for it is the gateway's to take back, not the client's to get.
    The target is not asked for usage again (no second refusal per stream)."""
    from aiohttp import web

    bodies: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if "stream_options" in body:
            return web.json_response({"error": {"message": "Unrecognized request argument supplied: stream_options",
                                                "type": "invalid_request_error"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,'
                         b'"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    client, logs = await gateway(config(str(server.make_url("")).rstrip("/")))
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        raw = await resp.read()
        assert resp.status == 200 and b"Hi" in raw and b"stream_options" not in raw
    assert ["stream_options" in b for b in bodies] == [True, False, False]
    assert logs[-1]["completion_tokens"] is not None  # estimated, as for a server that reports none
