"""POST /proxy/llm, the ReliAPI seed's LLM envelope (SPEC §2): the provider's own request for
OpenAI and Anthropic targets, the envelope answer with its meta, and SSE meta/chunk/done/error."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from tests.support.config import GatewayConfig
from tests.support.fakes import Fault


def config(url: str) -> GatewayConfig:
    """``openai`` (cached, a tiny soft cap), ``claude`` (max_tokens 200), ``rest``; no default target."""
    cfg = GatewayConfig(url).up("openai", models=None, cache={"ttl_s": 60},
                                llm={"default_model": "gpt-4o-mini", "soft_cost_cap_usd": 0.0001})
    return cfg.claude(models=None, llm={"default_model": "claude-3-5-haiku-latest", "max_tokens": 200}).rest()


def sse(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.strip().split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        out.append((lines[b"event"].decode(), msgspec.json.decode(lines[b"data"])))
    return out


async def test_the_seed_example_on_an_openai_target(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/llm", json={
        "target": "openai", "messages": [{"role": "user", "content": "Hello"}], "model": "gpt-4o-mini",
        "idempotency_key": "chat-123"})
    body = await resp.json()
    assert resp.status == 200 and body["success"] is True
    data, meta = body["data"], body["meta"]
    assert data["content"] == "Hello from the fake." and data["role"] == "assistant" and data["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert meta["target"] == "openai" and meta["retries"] == 0 and meta["fallback_used"] is False
    assert meta["cost_usd"] == pytest.approx((5 * 0.15 + 4 * 0.60) / 1e6) and meta["cost_estimate_usd"] > 0
    assert meta["idempotent_hit"] is False and meta["cache_hit"] is False
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/chat/completions" and sent.json()["messages"] == [{"role": "user", "content": "Hello"}]
    again = await (await client.post("/proxy/llm", json={
        "target": "openai", "messages": [{"role": "user", "content": "Hello"}], "model": "gpt-4o-mini",
        "idempotency_key": "chat-123"})).json()
    assert again["meta"]["idempotent_hit"] is True and again["data"] == data and len(fake.requests) == 1
    assert again["meta"]["cost_usd"] == 0.0  # a replay costs nothing (and is charged nothing)


async def test_the_soft_cap_is_reported_in_meta(fake, gateway):
    client, _ = await gateway(config(fake.url))
    body = await (await client.post("/proxy/llm", json={
        "target": "openai", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 4000})).json()
    assert body["meta"]["cost_policy_applied"] == "soft_cap_reduced" and body["meta"]["original_max_tokens"] == 4000
    assert fake.requests[0].json()["max_tokens"] < 4000


async def test_an_anthropic_target_gets_a_messages_request(fake, gateway):
    client, _ = await gateway(config(fake.url))
    body = await (await client.post("/proxy/llm", json={
        "target": "claude", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "stop": "END", "temperature": 0.2})).json()
    assert body["success"] is True and body["data"]["content"] == "Hello from the fake."
    assert body["data"]["finish_reason"] == "stop"
    assert body["data"]["id"] == "msg_fake"  # Anthropic's own id, as its records have it
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/messages"
    assert sent.json() == {"model": "claude-3-5-haiku-latest",
                           "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                           "system": "be brief", "max_tokens": 200, "stop_sequences": ["END"], "temperature": 0.2}
    assert sent.headers["anthropic-version"] == "2023-06-01"  # the Messages API refuses a request without it


@pytest.mark.parametrize("target", ["openai", "claude"])
async def test_streaming_answers_meta_chunks_and_done(fake, gateway, target):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=3))
    resp = await client.post("/proxy/llm", json={"target": target, "messages": [{"role": "user", "content": "hi"}],
                                                 "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse(await resp.read())
    assert events[0][0] == "meta" and events[0][1]["target"] == target
    assert [e for e, _ in events[1:-1]] == ["chunk"] * 3
    assert "".join(d["delta"] for _, d in events[1:-1]) == "tok0 tok1 tok2 "
    name, done = events[-1]
    assert name == "done" and done["finish_reason"] == "stop" and done["usage"]["completion_tokens"] == 3
    assert done["cost_usd"] > 0
    assert done["cost_usd"] == round(done["cost_usd"], 10)  # rounded as the complete answer's meta, no float dust
    if target != "openai":
        return  # (only openai has a cache here)
    replay = sse(await (await client.post("/proxy/llm", json={  # the same again: from the cache
        "target": target, "messages": [{"role": "user", "content": "hi"}], "stream": True})).read())
    assert replay[0][1]["cache_hit"] is True and len(fake.requests) == 1
    assert replay[-1][1]["usage"] == done["usage"] and replay[-1][1]["cost_usd"] == done["cost_usd"]  # not lost


async def test_a_cut_stream_ends_with_an_error_event(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=10, cut_after=3))
    resp = await client.post("/proxy/llm", json={"target": "openai", "messages": [{"role": "user", "content": "hi"}],
                                                 "stream": True})
    events = sse(await resp.read())
    assert events[0][0] == "meta" and events[-1][0] == "error"
    assert events[-1][1]["success"] is False and events[-1][1]["error"]["type"] == "upstream_error"
    assert "done" not in [e for e, _ in events]


@pytest.mark.parametrize(("envelope", "status", "param"), [
    ({"target": "openai"}, 400, "messages"),
    ({"target": "openai", "messages": []}, 400, "messages"),
    ({"target": "openai", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"target": "openai", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"target": "rest", "messages": [{"role": "user", "content": "x"}]}, 400, "target"),
    ({"target": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, None),
])
async def test_bad_llm_envelopes_are_refused_before_any_upstream(fake, gateway, envelope, status, param):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/llm", json=envelope)
    body = await resp.json()
    assert resp.status == status and body["success"] is False and fake.requests == []
    if param:
        assert body["error"]["message"] and param.split("[")[0] in body["error"]["message"]


async def test_an_upstream_refusal_is_an_envelope_error_with_its_status(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(status=400, error_message="bad temperature"))
    resp = await client.post("/proxy/llm", json={"target": "openai", "messages": [{"role": "user", "content": "x"}]})
    body = await resp.json()
    assert resp.status == 400 and body["success"] is False and "bad temperature" in body["error"]["message"]


async def test_an_anthropic_target_gets_tool_results_and_images_as_content_blocks(fake, gateway):
    """The envelope's messages are OpenAI-shaped: for Anthropic they are translated like /v1/chat/completions."""
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/proxy/llm", json={"target": "claude", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    ]})
    assert resp.status == 200
    sent = fake.requests[0].json()["messages"]
    assert sent[0]["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                 "data": "iVBORw0KGgo="}}
    assert sent[1] == {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "look",
                                                         "input": {"zoom": 2}}]}
    assert sent[2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"}]}


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_the_idempotency_headers_work_like_the_body_field(fake, gateway, header):
    """Seed 002's own example: duplicates with the header are one upstream call, the rest replays of it."""
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(delay_ms=200))
    body = {"target": "claude", "messages": [{"role": "user", "content": "charge it"}]}

    async def call() -> dict:
        return await (await client.post("/proxy/llm", json=body, headers={header: "order-77"})).json()

    answers = await asyncio.gather(call(), call(), call())
    assert len(fake.requests) == 1 and all(a["success"] for a in answers)
    assert sorted(a["meta"]["idempotent_hit"] for a in answers) == [False, True, True]
    later = await call()
    assert later["meta"]["idempotent_hit"] is True and len(fake.requests) == 1
    changed = await client.post("/proxy/llm", headers={header: "order-77"},
                                json={**body, "messages": [{"role": "user", "content": "another"}]})
    assert changed.status == 422 and (await changed.json())["error"]["code"] == "idempotency_key_reused"


async def test_a_mistral_target_gets_only_fields_its_api_takes(fake, gateway):
    """Mistral refuses user and stream_options (422 extra_forbidden) and reports a stream's usage unasked."""
    cfg = config(fake.url).target("mistral", f"{fake.url}/v1", provider="mistral", models=None,
                                  llm={"default_model": "mistral-small-latest"})
    client, _ = await gateway(cfg)
    fake.plan(Fault(strict=True), Fault(strict=True, unasked_usage=True, chunks=2))
    envelope = {"target": "mistral", "user": "u-7", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/proxy/llm", json=envelope)
    assert resp.status == 200 and (await resp.json())["data"]["content"] == "Hello from the fake."
    events = sse(await (await client.post("/proxy/llm", json={**envelope, "stream": True})).read())
    assert events[-1][0] == "done" and events[-1][1]["usage"]["completion_tokens"] == 2
    assert all("user" not in s.json() and "stream_options" not in s.json() for s in fake.requests)


async def test_a_compressed_envelope_is_read_and_one_in_a_coding_the_gateway_cannot_read_is_a_415(fake, gateway):
    import gzip

    import msgspec

    client, _ = await gateway(config(fake.url))
    envelope = {"target": "openai", "messages": [{"role": "user", "content": "hi"}]}
    packed = gzip.compress(msgspec.json.encode(envelope))
    resp = await client.post("/proxy/llm", data=packed, headers={"Content-Type": "application/json",
                                                                  "Content-Encoding": "gzip"})
    assert resp.status == 200 and (await resp.json())["data"]["content"] == "Hello from the fake."
    generated = await client.post("/v1/generate", data=gzip.compress(b'{"prompt": "hi", "model": "gpt-4o-mini"}'),
                                  headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                                           "X-ReliAPI-Target": "openai"})
    assert generated.status == 200, await generated.text()
    refused = await client.post("/proxy/llm", data=msgspec.json.encode(envelope),
                                headers={"Content-Type": "application/json", "Content-Encoding": "foo"})
    assert refused.status == 415 and (await refused.json())["error"]["code"] == "unsupported_media_type"
    assert len(fake.requests) == 2
