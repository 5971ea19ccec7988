"""A 10 MB body with half a million keys does not hold the event loop (issue #12 row 7, point 7).

What stalled everyone else was decoding such a body into Python objects — half a million dicts
and strings built, sorted and encoded again, in one piece of work the loop cannot interrupt —
once per policy that read it. The policies now read bodies with typed decoders that skip what
they do not need, change a field without decoding the rest, and key a body over 256 KiB by its
bytes. How long the loop is held is measured in ``bench/large_bodies.py`` (a test does not time
the machine); what a test can tell deterministically is whether the body was decoded into
objects at all: that costs many times the body's size in memory, and reading it does not.
"""

from __future__ import annotations

import tracemalloc

import msgspec
import pytest
from aiohttp import web

from tests.support.config import GatewayConfig

ANSWER = msgspec.json.encode({
    "id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
})


@pytest.fixture
async def upstream(aiohttp_server):
    """An OpenAI-style upstream that reads the body as bytes (never parses it) and answers."""
    seen: list[int] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


def config(url: str) -> GatewayConfig:
    """12 MB bodies; tenant ``acme`` with a roomy budget; ``up`` cached, with caps and max_tokens."""
    cfg = GatewayConfig(url, default_target="up", max_body_mb=12)
    cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 1000})
    return cfg.up(models=None, cache={"ttl_s": 60},
                  llm={"max_tokens": 500, "soft_cost_cap_usd": 50, "hard_cost_cap_usd": 100})


@pytest.mark.parametrize("where", ["nested", "top-level"])
async def test_every_policy_reads_a_ten_megabyte_body_without_decoding_it_into_objects(upstream, gateway, where):
    url, seen = upstream
    client, _ = await gateway(config(url))
    keys = {f"k{i}": "v" * 8 for i in range(500_000)}
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    doc = {**doc, "metadata": keys} if where == "nested" else {**doc, **keys}
    body = msgspec.json.encode(doc)
    assert len(body) > 10_000_000
    headers = {"Authorization": "Bearer acme-key-123456", "Idempotency-Key": f"big-{where}",
               "Content-Type": "application/json"}
    tracemalloc.start()
    try:
        resp = await client.post("/v1/chat/completions", data=body, headers=headers)
        assert resp.status == 200, await resp.text()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen and seen[0] > 10_000_000  # the whole body went upstream (max_tokens written into it)
    # the body is copied a few times on its way (read, rewritten, sent): a decode into objects is ~8x its size
    assert peak < 5 * len(body), f"peak {peak / 1e6:.0f} MB for a {len(body) / 1e6:.0f} MB body"
