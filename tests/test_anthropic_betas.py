"""Claude Code and the Anthropic SDK's betas through the gateway, driven with the real anthropic SDK.

``/v1/messages?beta=true`` with ``anthropic-beta`` headers (extended and interleaved thinking, 1M context,
tool-use betas, prompt caching) passes byte-exact both ways: the body the SDK sent, its query string and its
``anthropic-beta`` / ``anthropic-version`` headers reach the upstream unchanged; the answer, complete and
streamed — ``thinking`` (``thinking_delta``, ``signature_delta``), ``redacted_thinking``, ``server_tool_use``
blocks — reaches the SDK as the upstream sent it. Usage (cache reads and writes included) is still read, the
request is still a Messages request to budgets, and ``count_tokens`` passes through as a free endpoint."""

from __future__ import annotations

import aiohttp
import anthropic
import httpx2 as httpx
import pytest

from tests.support.config import NO_RETRY, PASSTHROUGH, llm_config
from tests.support.fakes import REDACTED, SIGNATURE, THINKING, Fault

ENV = {"UP_KEY": "sk-upstream-openai-123456", "CLAUDE_KEY": "sk-ant-upstream-654321"}
BETAS = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07", "fine-grained-tool-streaming-2025-05-14",
         "token-efficient-tools-2025-02-19", "prompt-caching-2024-07-31"]
MODEL = "claude-sonnet-4-5"
# A Claude Code-like turn: a cached system prompt, thinking enabled, a client tool.
TURN = {
    "model": MODEL, "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
    "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "Fix the failing test"}],
    "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}],
}
CACHE_USAGE = {"input_tokens": 5, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11}
CLAUDE_CODE = {"beta": "true"}  # Claude Code posts to /v1/messages?beta=true (this SDK does not add it itself)


class Sent:
    """What an SDK put on the wire: each request, with its body bytes (an httpx event hook)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def hook(self, request: httpx.Request) -> None:
        await request.aread()
        self.requests.append(request)


@pytest.fixture
async def sdk():
    made = []

    def make(client, sent: Sent, **auth):
        auth = auth or {"api_key": "sk-client-ant"}
        http = httpx.AsyncClient(event_hooks={"request": [sent.hook]})
        c = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), max_retries=0, http_client=http, **auth)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def upstream_answer(fake, seen) -> bytes:
    """The bytes the fake sent for the request it saw: it is deterministic, so asking it again, as the
    same request number, gives them again."""
    fake.requests.remove(seen)
    headers = {k: v for k, v in seen.headers.items() if k.lower() not in ("host", "content-length")}
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
            f"{fake.url}{seen.path_qs}", data=seen.body, headers=headers) as resp:
        body = await resp.read()
    fake.requests[-1:] = [seen]  # the replay's record goes, the original stays
    return body


def assert_passed_unchanged(sent: Sent, seen) -> None:
    (request,) = sent.requests
    assert seen.body == request.content  # byte for byte
    assert seen.path_qs == request.url.raw_path.decode()  # /v1/messages?beta=true
    for name in ("anthropic-beta", "anthropic-version"):
        assert seen.headers[name] == request.headers[name]


async def test_a_beta_call_with_thinking_passes_byte_exact(fake, gateway, sdk):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    sent = Sent()
    fake.plan(Fault(usage=CACHE_USAGE))
    raw = await sdk(client, sent).beta.messages.with_raw_response.create(**TURN, betas=BETAS, extra_query=CLAUDE_CODE)
    (seen,) = fake.requests
    assert_passed_unchanged(sent, seen)
    assert seen.path_qs == "/v1/messages?beta=true"
    assert seen.headers["anthropic-beta"] == ",".join(BETAS)
    assert seen.headers["x-api-key"] == ENV["CLAUDE_KEY"]  # the target's key, not the client's
    fake.plan(Fault(usage=CACHE_USAGE))
    assert raw.http_response.content == await upstream_answer(fake, seen)
    message = await raw.parse()
    assert [b.type for b in message.content] == ["thinking", "redacted_thinking", "text"]
    assert message.content[0].thinking == THINKING and message.content[0].signature == SIGNATURE
    assert message.content[1].data == REDACTED
    line = logs[-1]
    assert line["outcome"] == "ok" and line["target"] == "claude" and line["model"] == MODEL
    assert line["prompt_tokens"] == 5 + 7 + 11 and line["completion_tokens"] == 4  # cache reads and writes count
    assert line["cost_usd"] > 0


async def test_a_streamed_beta_call_with_thinking_reaches_the_sdk_unchanged(fake, gateway, sdk):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    sent = Sent()
    fake.plan(Fault(usage=CACHE_USAGE, chunks=4))
    async with sdk(client, sent).beta.messages.with_streaming_response.create(
            **TURN, betas=BETAS, stream=True, extra_query=CLAUDE_CODE) as resp:
        got = await resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
    (seen,) = fake.requests
    assert_passed_unchanged(sent, seen)
    fake.plan(Fault(usage=CACHE_USAGE, chunks=4))
    assert got == await upstream_answer(fake, seen)
    for part in (b"thinking_delta", b"signature_delta", b'"redacted_thinking"', b"event: ping"):
        assert part in got
    line = logs[-1]
    assert line["stream"] is True and line["outcome"] == "ok"
    assert line["prompt_tokens"] == 23 and line["completion_tokens"] == 4 and line["cost_usd"] > 0


async def test_the_sdk_stream_helper_assembles_thinking_and_server_tool_blocks(fake, gateway, sdk):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    turn = {**TURN, "tools": [*TURN["tools"], {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]}
    async with sdk(client, Sent()).beta.messages.stream(**turn, betas=BETAS, extra_query=CLAUDE_CODE) as stream:
        thinking = [e.thinking async for e in stream if e.type == "thinking"]
        final = await stream.get_final_message()
    assert "".join(thinking) == THINKING
    assert [b.type for b in final.content] == [
        "thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result", "text"]
    assert final.content[0].signature == SIGNATURE
    assert final.content[2].input == {"query": "fake"}
    assert final.content[4].text == "tok0 tok1 tok2 "
    assert logs[-1]["outcome"] == "ok" and logs[-1]["completion_tokens"] == 3


async def test_the_ga_stream_helper_with_thinking(fake, gateway, sdk):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    turn = {k: v for k, v in TURN.items() if k != "tools"}
    async with sdk(client, Sent()).messages.stream(**turn) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "redacted_thinking", "text"]
    assert final.content[0].thinking == THINKING
    (seen,) = fake.requests
    assert seen.path_qs == "/v1/messages" and "anthropic-beta" not in seen.headers


async def test_claude_code_credentials_pass_through(fake, gateway, sdk):
    """Claude Code signed in with a token sends ``Authorization: Bearer``; with an API key, ``x-api-key``: on a
    passthrough target either reaches the upstream as sent."""
    client, _ = await gateway(llm_config(fake.url).claude(auth=PASSTHROUGH), env=ENV)
    sent = Sent()
    hi = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "extra_query": CLAUDE_CODE}
    await sdk(client, sent, auth_token="sk-ant-oat01-client-token").beta.messages.create(**hi, betas=["oauth-2025-04-20"])
    await sdk(client, sent, api_key=None, default_headers={"x-api-key": "sk-ant-api03-client-key"}).beta.messages.create(
        **hi, betas=BETAS[:1])
    first, second = fake.requests
    assert first.headers["Authorization"] == "Bearer sk-ant-oat01-client-token"
    assert first.headers["anthropic-beta"] == "oauth-2025-04-20"
    assert second.headers["x-api-key"] == "sk-ant-api03-client-key" and "Authorization" not in second.headers
    assert [s.body for s in fake.requests] == [r.content for r in sent.requests]
    assert [s.path_qs for s in fake.requests] == ["/v1/messages?beta=true"] * 2


async def test_count_tokens_passes_through(fake, gateway, sdk):
    client, logs = await gateway(llm_config(fake.url), env=ENV)
    sent = Sent()
    api = sdk(client, sent)
    counted = await api.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    beta = await api.beta.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                thinking={"type": "enabled", "budget_tokens": 1024}, betas=BETAS[:2],
                                                extra_query=CLAUDE_CODE)
    first, second = fake.requests
    assert first.path_qs == "/v1/messages/count_tokens"
    assert second.path_qs == "/v1/messages/count_tokens?beta=true"
    assert counted.input_tokens == len(first.body) // 4 and beta.input_tokens == len(second.body) // 4
    assert [s.body for s in fake.requests] == [r.content for r in sent.requests]
    for seen, request in zip(fake.requests, sent.requests, strict=True):
        assert seen.headers.get("anthropic-beta") == request.headers.get("anthropic-beta")
    assert second.headers["anthropic-beta"].startswith(",".join(BETAS[:2]))  # (the SDK adds token-counting's)
    assert logs[-1]["outcome"] == "ok" and not logs[-1]["cost_usd"]  # free


async def test_a_beta_call_is_still_a_messages_call_to_a_tenant_budget(fake, gateway, sdk):
    """``?beta=true`` does not hide the endpoint: the spend budget holds it (count_tokens stays free)."""
    cfg = llm_config(fake.url).claude(retry_matrix=NO_RETRY).tenant(
        "coder", api_key="coder-key-123456", budget={"daily_usd": 0.001})
    client, _ = await gateway(cfg, env=ENV)
    api = sdk(client, Sent(), api_key="coder-key-123456")
    with pytest.raises(anthropic.APIStatusError) as info:  # 2,048 output tokens at $15/1M: over $0.001
        await api.beta.messages.create(**TURN, betas=BETAS, extra_query=CLAUDE_CODE)
    assert info.value.status_code == 402
    error = info.value.body
    assert error["type"] == "error" and error["error"]["type"] == "billing_error"  # Anthropic's dialect
    assert "more than the whole daily budget" in error["error"]["message"]
    assert not fake.requests
    counted = await api.beta.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   betas=BETAS[:1], extra_query=CLAUDE_CODE)
    assert counted.input_tokens > 0 and len(fake.requests) == 1
