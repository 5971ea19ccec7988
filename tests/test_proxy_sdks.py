"""The unchanged openai and anthropic SDKs work through the gateway, streaming included."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.support.config import llm_config

ENV = {"UP_KEY": "sk-upstream-openai-123456", "CLAUDE_KEY": "sk-ant-upstream-654321"}


@pytest.fixture
async def gw(fake, gateway):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    return client, logs


@pytest.fixture
async def sdk():
    """SDK clients bound to a gateway test client, closed after the test."""
    made = []

    def make(kind, client):
        if kind == "openai":
            c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-client-key", max_retries=0)
        else:
            c = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sk-client-ant", max_retries=0)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def test_openai_sdk_chat_non_stream(gw, fake, sdk):
    client, logs = gw
    resp = await sdk('openai', client).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = resp.parse()
    assert completion.choices[0].message.content == "Hello from the fake."
    assert completion.usage.total_tokens == 9
    assert resp.headers["X-ReliAPI-Target"] == "up"
    assert resp.headers["X-ReliAPI-Attempts"] == "1"
    assert resp.headers["X-Request-Id"]
    assert resp.headers["X-Cache"] == "BYPASS"
    (seen,) = fake.requests
    assert seen.path_qs == "/v1/chat/completions"
    # the target's key replaced the client's
    assert seen.headers["Authorization"] == "Bearer sk-upstream-openai-123456"
    assert seen.headers["X-ReliAPI-Attempt"] == "1"
    assert seen.headers["Host"] == fake.url.split("//")[1]  # httpx sends lower-case "host": still replaced
    assert "x-stainless-retry-count" in seen.headers  # the SDK's own headers pass through
    assert logs[-1]["outcome"] == "ok" and logs[-1]["model"] == "gpt-4o-mini" and logs[-1]["target"] == "up"


async def test_openai_sdk_chat_stream(gw, fake, sdk):
    client, logs = gw
    stream = await sdk('openai', client).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "tok0 tok1 tok2 "
    assert fake.streams_finished == 1
    assert logs[-1]["stream"] is True and logs[-1]["outcome"] == "ok" and logs[-1]["ttft_ms"] is not None


async def test_openai_sdk_sees_upstream_errors_as_sent(gw, fake, sdk):
    client, _ = gw
    with pytest.raises(openai.RateLimitError) as info:
        await sdk('openai', client).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Fake-Status": "429"},
        )
    assert info.value.status_code == 429
    assert info.value.body["message"] == "fake error 429"
    with pytest.raises(openai.InternalServerError):
        await sdk('openai', client).chat.completions.create(
            model="gpt-4o-mini", messages=[], extra_headers={"X-Fake-Status": "500"}
        )


async def test_anthropic_sdk_messages_non_stream(gw, fake, sdk):
    client, logs = gw
    msg = await sdk('anthropic', client).messages.create(
        model="claude-test-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].text == "Hello from the fake."
    (seen,) = fake.requests
    assert seen.path_qs == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-ant-upstream-654321"
    assert "Authorization" not in seen.headers
    assert seen.headers["anthropic-version"]  # the SDK's own headers pass through
    assert logs[-1]["target"] == "claude"


async def test_anthropic_sdk_messages_stream(gw, fake, sdk):
    client, _ = gw
    async with sdk('anthropic', client).messages.stream(
        model="claude-test-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "tok0 tok1 tok2 "
    assert final.stop_reason == "end_turn"


async def test_anthropic_errors_are_in_anthropic_dialect(gw, sdk):
    client, _ = gw
    with pytest.raises(anthropic.NotFoundError) as info:
        await sdk('anthropic', client).messages.create(
            model="claude-test-1", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-ReliAPI-Target": "nope"},
        )
    assert info.value.body == {"type": "error", "error": {"type": "not_found_error", "message": "unknown target 'nope'"}}


async def test_passthrough_key_when_env_unset(fake, gateway, sdk):
    client, _ = await gateway(llm_config(fake.url), env={})  # UP_KEY not set → the client's key goes through
    await sdk('openai', client).chat.completions.create(model="gpt-4o-mini", messages=[])
    assert fake.requests[0].headers["Authorization"] == "Bearer sk-client-key"
