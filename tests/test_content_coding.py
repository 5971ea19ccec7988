"""Compressed bodies: answers the gateway must read, and request bodies it must read to enforce limits.

Every SDK sends ``Accept-Encoding: gzip, deflate``; an LLM upstream behind a CDN compresses its
JSON when allowed. The gateway reads LLM answers (usage, cost, translation), so it asks LLM
upstreams for identity, and decodes an answer that comes compressed anyway.
"""

from __future__ import annotations

import gzip

import msgspec
import pytest
from aiohttp import web

from tests.support.config import PASSTHROUGH, GatewayConfig

ANSWER = msgspec.json.encode({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
})


@pytest.fixture
async def compressing(aiohttp_server):
    """An OpenAI-style upstream that gzips when the request allows it — or always, with ``always``."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept-Encoding", "")
        seen.append(accept)
        if "gzip" in accept or request.path.startswith("/always"):
            return web.Response(body=gzip.compress(ANSWER),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/always/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


def config(url: str) -> GatewayConfig:
    """``up`` and ``always`` (OpenAI, the client's own key passed through)."""
    cfg = GatewayConfig(url, default_target="up").up(models=None, auth=PASSTHROUGH)
    return cfg.target("always", f"{url}/always/v1", provider="openai", auth=PASSTHROUGH)


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_an_sdk_that_accepts_gzip_gets_its_answer_and_the_usage_is_counted(compressing, gateway) -> None:
    url, seen = compressing
    client, logs = await gateway(config(url))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Accept-Encoding": "gzip, deflate"})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == msgspec.json.decode(ANSWER)
    assert seen == ["identity"]  # the gateway must read the answer: it asks for it uncompressed
    assert logs[-1]["prompt_tokens"] == 5 and logs[-1]["completion_tokens"] == 2


async def test_an_llm_answer_compressed_anyway_is_decoded(compressing, gateway) -> None:
    url, _ = compressing
    client, logs = await gateway(config(url))
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"Accept-Encoding": "gzip", "X-ReliAPI-Target": "always"}, auto_decompress=False)
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == ANSWER
    assert logs[-1]["completion_tokens"] == 2
