"""POST /v1/generate, the "LLM Gateway API" seed's surface (SPEC §2): one prompt in, the seed's
response shape out, for OpenAI and Anthropic targets, with the pipeline's policies applied."""

from __future__ import annotations

import pytest

from tests.support.config import GatewayConfig
from tests.support.fakes import Fault


def config(url: str) -> GatewayConfig:
    """``up`` (cached) and ``claude`` (max_tokens 300)."""
    return GatewayConfig(url, default_target="up").up(cache={"ttl_s": 60}).claude(llm={"max_tokens": 300})


async def test_generate_on_an_openai_target(fake, gateway):
    client, logs = await gateway(config(fake.url))
    resp = await client.post("/v1/generate", json={"prompt": "Explain transformers", "model": "gpt-4o-mini",
                                                   "temperature": 0.7, "max_tokens": 50, "user_id": "user123"})
    body = await resp.json()
    assert resp.status == 200
    assert body["completion"] == "Hello from the fake." and body["model"] == "gpt-4o-mini"
    assert (body["prompt_tokens"], body["completion_tokens"], body["total_tokens"]) == (5, 4, 9)
    assert body["cost_usd"] == pytest.approx((5 * 0.15 + 4 * 0.60) / 1e6)
    assert body["cached"] is False and body["latency_ms"] >= 0 and body["request_id"] == resp.headers["X-Request-Id"]
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/chat/completions"
    assert sent.json() == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Explain transformers"}],
                           "temperature": 0.7, "max_tokens": 50, "user": "user123"}
    assert logs[-1]["route"] == "generate" and logs[-1]["target"] == "up"
    again = await (await client.post("/v1/generate", json={"prompt": "Explain transformers", "model": "gpt-4o-mini",
                                                           "temperature": 0.7, "max_tokens": 50,
                                                           "user_id": "user123"})).json()
    assert again["cached"] is True and again["completion"] == body["completion"] and len(fake.requests) == 1


async def test_generate_on_an_anthropic_target_writes_a_messages_request(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/v1/generate", json={"prompt": "hi", "model": "claude-3-5-haiku-latest"})
    body = await resp.json()
    assert resp.status == 200 and body["completion"] == "Hello from the fake."
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/messages"
    assert sent.json() == {"model": "claude-3-5-haiku-latest",  # as a chat completion would be translated
                           "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                           "max_tokens": 300}
    assert sent.headers["anthropic-version"] == "2023-06-01"  # the Messages API refuses a request without it
    assert body["cost_usd"] == pytest.approx((5 * 0.80 + 4 * 4.0) / 1e6)


@pytest.mark.parametrize(("payload", "param"), [
    ({"model": "gpt-4o-mini"}, "prompt"),
    ({"prompt": "", "model": "gpt-4o-mini"}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "temperature": 9}, "temperature"),
    ({"prompt": "x", "surprise": 1}, None),
])
async def test_bad_generate_requests_are_400(fake, gateway, payload, param):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/v1/generate", json=payload)
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_request" and fake.requests == []
    if param:
        assert body["error"]["param"] == param


async def test_an_upstream_refusal_keeps_its_status_and_message(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(status=400, error_message="prompt is too long"))
    resp = await client.post("/v1/generate", json={"prompt": "x", "model": "gpt-4o-mini"})
    body = await resp.json()
    assert resp.status == 400 and "prompt is too long" in body["error"]["message"]
