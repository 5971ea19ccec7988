"""OpenAI's Responses API (``POST /v1/responses``) as a first-class dialect (issue #15 point 1), and prompt-cache
pricing for every dialect (point 4): the real openai SDK against a fake that speaks the real event sequence."""

from __future__ import annotations

import asyncio
import time

import msgspec
import openai
import pytest
from aiohttp import web

from gateway.store.memory import MemoryStore
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import Fault

# gpt-4o-mini: $0.15 in, $0.075 cached in, $0.60 out per 1M tokens
IN, CACHED, OUT = 0.15e-6, 0.075e-6, 0.60e-6
KEY = {"Authorization": "Bearer acme-key-123456"}


def config(url: str, **up) -> GatewayConfig:
    return GatewayConfig(url, default_target="up").up(**{"retry_matrix": NO_RETRY, **up})


@pytest.fixture
async def sdk():
    made = []

    def make(client, **kw):
        c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-client", max_retries=0, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def line_for(logs, n: int = 1) -> dict:
    """The n-th access line, once written (a stream's is written after its last byte)."""
    for _ in range(200):
        if len(logs) >= n:
            return logs[n - 1]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access line {n}: {logs}")


# ------------------------------------------------------------------ usage and cost


async def test_a_complete_answer_is_priced_from_its_usage_cached_input_at_its_own_rate(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(usage={"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 800}, "output_tokens": 50,
                           "output_tokens_details": {"reasoning_tokens": 30}}))
    raw = await sdk(client).responses.with_raw_response.create(model="gpt-4o-mini", input="hi")
    answer = raw.parse()
    assert answer.output_text == "Hello from the fake." and answer.usage.input_tokens == 1000
    line = await line_for(logs)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (1000, 50)  # reasoning is output
    expected = 200 * IN + 800 * CACHED + 50 * OUT
    assert line["cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert float(raw.headers["X-ReliAPI-Cost-USD"]) == pytest.approx(expected, rel=1e-6)


async def test_a_stream_is_priced_from_its_terminal_event(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(chunks=4, usage={"input_tokens": 40, "input_tokens_details": {"cached_tokens": 20}}))
    stream = await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    line = await line_for(logs)
    assert line["outcome"] == "ok" and line["stream"] is True
    assert (line["prompt_tokens"], line["completion_tokens"]) == (40, 4)
    assert line["cost_usd"] == pytest.approx(20 * IN + 20 * CACHED + 4 * OUT, rel=1e-9)


async def test_the_stream_helper_gets_its_final_response(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    async with sdk(client).responses.stream(model="gpt-4o-mini", input="hi") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "tok0 tok1 tok2 "
    assert final.usage.output_tokens == 3
    line = await line_for(logs)
    assert line["outcome"] == "ok" and line["completion_tokens"] == 3


async def test_an_incomplete_response_is_a_complete_stream_and_billed(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(terminal="response.incomplete"))
    stream = await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True, max_output_tokens=3)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    line = await line_for(logs)
    assert line["outcome"] == "ok" and line["completion_tokens"] == 3 and line["cost_usd"] > 0


UNKNOWN = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
    b'"object":"response","created_at":1,"status":"in_progress","model":"gpt-4o-mini","output":[],'
    b'"parallel_tool_calls":true,"tool_choice":"auto","tools":[]}}\n\n'
    b': keep-alive\n\n'
    b'event: response.future_thing.added\ndata: {"type":"response.future_thing.added","sequence_number":1,'
    b'"thing":{"shape":"nobody knows yet"}}\n\n'
    b'event: response.future_thing.delta\ndata: {"type":"response.future_thing.delta","sequence_number":2,'
    b'"delta":{"not":"a string"}}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":3,"response":{"id":"resp_1",'
    b'"object":"response","created_at":1,"status":"completed","model":"gpt-4o-mini","output":[],'
    b'"parallel_tool_calls":true,"tool_choice":"auto","tools":[],"usage":{"input_tokens":7,"output_tokens":2}}}\n\n'
)


async def test_events_the_gateway_does_not_know_are_relayed_untouched(aiohttp_server, gateway, sdk):
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in UNKNOWN.split(b"\n\n")[:-1]:
            await resp.write(event + b"\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    server = await aiohttp_server(app)
    client, logs = await gateway(config(str(server.make_url("")).rstrip("/")))
    resp = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "stream": True})
    assert await resp.read() == UNKNOWN  # byte for byte, comments and unknown events included
    line = await line_for(logs)
    assert line["outcome"] == "ok" and (line["prompt_tokens"], line["completion_tokens"]) == (7, 2)
    types = [e.type async for e in await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True)]
    assert types == ["response.created", "response.future_thing.added", "response.future_thing.delta",
                     "response.completed"]


# ------------------------------------------------------------------ caps and budgets


async def test_the_soft_cap_lowers_max_output_tokens(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url, llm={"soft_cost_cap_usd": 0.0006}))
    raw = await sdk(client).responses.with_raw_response.create(
        model="gpt-4o-mini", input="x" * 400, instructions="be brief", max_output_tokens=4000)
    sent = fake.requests[0].json()
    assert "max_tokens" not in sent and sent["max_output_tokens"] < 4000
    assert raw.headers["X-ReliAPI-Max-Tokens"] == f"4000->{sent['max_output_tokens']}"
    line = await line_for(logs)
    assert line["cost_policy_applied"] == "soft_cap_reduced" and line["original_max_tokens"] == 4000
    # the estimate read input and instructions: (400 + 8) / 4 characters a token, + 3
    assert line["cost_estimate_usd"] == pytest.approx((102 + 3) * IN + sent["max_output_tokens"] * OUT, abs=1e-8)


async def test_the_hard_cap_refuses_a_responses_request_before_it_is_sent(fake, gateway, sdk):
    client, _ = await gateway(config(fake.url, llm={"hard_cost_cap_usd": 0.0001}))
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(client).responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=100_000)
    assert info.value.body["code"] == "budget_exceeded" and info.value.body["param"] == "max_output_tokens"
    assert fake.requests == []


async def test_a_spend_budget_is_settled_to_the_responses_cost(fake, gateway):
    store = MemoryStore()
    cfg = config(fake.url).tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 1.0})
    client, logs = await gateway(cfg, store=store)
    fake.plan(Fault(usage={"input_tokens": 100, "output_tokens": 10}), Fault(usage={"input_tokens": 100}))
    body = {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 500}
    assert (await client.post("/v1/responses", json=body, headers=KEY)).status == 200
    resp = await client.post("/v1/responses", json={**body, "stream": True}, headers=KEY)
    assert resp.status == 200 and b"response.completed" in await resp.read()
    await line_for(logs, 2)
    key = f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime())}"
    expected = (100 * IN + 10 * OUT) + (100 * IN + 3 * OUT)  # the settled costs, not the reservations
    for _ in range(100):
        if float(await store.get(key) or 0) == pytest.approx(expected, abs=1e-12):
            break
        await asyncio.sleep(0.01)
    assert float(await store.get(key) or 0) == pytest.approx(expected, abs=1e-12)
    assert fake.requests[0].json()["max_output_tokens"] == 500


# ------------------------------------------------------------------ broken streams


async def test_a_cut_stream_ends_with_the_responses_error_event_and_the_sdk_raises(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(chunks=5, cut_after=6))  # created, in_progress, item, part, two deltas: then nothing
    stream = await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True)
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for event in stream:
            seen.append(event)
    assert [e.type for e in seen][-1] == "response.output_text.delta" and len(seen) == 6
    assert "cut" in info.value.message
    assert info.value.body["code"] == "stream_interrupted"
    line = await line_for(logs)
    assert line["outcome"] == "stream_error" and line["error_code"] == "stream_interrupted"


async def test_the_in_band_error_event_is_the_responses_dialect_numbered_after_the_last(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=5, cut_after=6))
    resp = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "stream": True})
    events = (await resp.read()).split(b"\n\n")
    last = events[-2]
    assert last.startswith(b"event: error\ndata: ")
    import json
    data = json.loads(last.split(b"data: ", 1)[1])
    assert data["type"] == "error" and data["sequence_number"] == 6 and data["code"] == "stream_interrupted"
    assert data["param"] is None and data["error"]["message"] == data["message"]  # both shapes the SDK reads
    assert b'"error": {' not in last and b"data: {\"error\"" not in last  # not the chat-completions shape


async def test_a_stall_mid_answer_is_an_in_band_error_not_a_hang(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url, stream_idle_timeout_ms=300))
    fake.plan(Fault(chunks=5, stall_after=6))
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        async with sdk(client).responses.stream(model="gpt-4o-mini", input="hi") as stream:
            async for _ in stream:
                pass
    assert time.monotonic() - started < 3
    assert "stalled" in info.value.message
    assert (await line_for(logs))["outcome"] == "stream_error"


async def test_a_stream_that_ends_without_a_terminal_event_is_not_complete(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(no_done=True))  # every event but response.completed, then a clean close
    with pytest.raises(openai.APIError):
        async for _ in await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True):
            pass
    line = await line_for(logs)
    # charged, and so said, at a token per byte of what was relayed: "tok0 tok1 tok2 " (docs/guides/budget-control.md)
    assert line["outcome"] == "stream_error" and line["completion_tokens"] == 15


async def test_a_failed_response_mid_stream_is_relayed_as_sent_and_logged_a_stream_error(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(terminal="response.failed"))
    events = [e async for e in await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True)]
    assert events[-1].type == "response.failed" and events[-1].response.error.message == "fake failure"
    assert len(fake.requests) == 1  # not retried: the answer had begun
    line = await line_for(logs)
    assert line["outcome"] == "stream_error"


# ------------------------------------------------------------------ retries and fallback before the first byte


def chain(url_a: str, url_b: str, **up) -> GatewayConfig:
    cfg = GatewayConfig(url_a, default_target="up").up(models=None, fallback_targets=["fb"], **up)
    return cfg.target("fb", f"{url_b}/v1", provider="openai", retry_matrix=NO_RETRY)


async def test_an_error_event_after_the_lifecycle_events_is_retried(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url, retry_matrix={"5xx": {"attempts": 1, "base_s": 0.01}}))
    fake.plan(Fault(first_event_error="server_error"))
    async with sdk(client).responses.stream(model="gpt-4o-mini", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 " and len(fake.requests) == 2
    line = await line_for(logs)
    assert line["outcome"] == "ok" and line["attempts"] == 2


async def test_a_failed_response_before_any_output_falls_back(fake, upstreams, gateway, sdk):
    backup = await upstreams()
    client, logs = await gateway(chain(fake.url, backup.url, retry_matrix=NO_RETRY))
    fake.plan(Fault(first_event_error="rate_limit_exceeded"))
    async with sdk(client).responses.stream(model="gpt-4o-mini", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 "
    assert len(fake.requests) == 1 and len(backup.requests) == 1
    line = await line_for(logs)
    assert line["fallback_target"] == "fb" and line["outcome"] == "ok"


async def test_a_stall_after_response_created_is_a_first_byte_timeout_and_falls_back(fake, upstreams, gateway, sdk):
    backup = await upstreams()
    client, logs = await gateway(chain(fake.url, backup.url, retry_matrix=NO_RETRY, ttft_timeout_ms=300))
    fake.plan(Fault(stall_after=2))  # response.created and response.in_progress at once, then silence
    started = time.monotonic()
    async with sdk(client).responses.stream(model="gpt-4o-mini", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 " and time.monotonic() - started < 2
    assert (await line_for(logs))["fallback_target"] == "fb"


async def test_an_error_in_the_head_with_nowhere_to_go_reaches_the_sdk(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(first_event_error="server_error"))
    with pytest.raises(openai.APIError) as info:
        async for _ in await sdk(client).responses.create(model="gpt-4o-mini", input="hi", stream=True):
            pass
    assert info.value.message == "fake stream error"
    assert (await line_for(logs))["outcome"] != "ok"


# ------------------------------------------------------------------ cache and idempotency


async def test_a_cached_responses_stream_is_replayed_as_a_stream(fake, gateway, sdk):
    client, logs = await gateway(config(fake.url, cache={"ttl_s": 60}))
    texts = []
    for _ in range(2):
        async with sdk(client).responses.stream(model="gpt-4o-mini", input="same") as stream:
            texts.append((await stream.get_final_response()).output_text)
    assert texts == ["tok0 tok1 tok2 "] * 2 and len(fake.requests) == 1
    raw = await sdk(client).responses.with_raw_response.create(model="gpt-4o-mini", input="same", stream=True)
    assert raw.headers["X-Cache"] == "HIT" and raw.headers["Content-Type"].startswith("text/event-stream")
    events = [e async for e in raw.parse()]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert len(fake.requests) == 1
    assert [line["cache_hit"] for line in logs] == [False, True, True]


async def test_a_broken_stream_is_not_cached(fake, gateway, sdk):
    client, _ = await gateway(config(fake.url, cache={"ttl_s": 60}))
    fake.plan(Fault(no_done=True))
    body = {"model": "gpt-4o-mini", "input": "same", "stream": True}
    assert b"event: error" in await (await client.post("/v1/responses", json=body)).read()
    second = await client.post("/v1/responses", json=body)
    assert second.headers["X-Cache"] == "MISS" and b"response.completed" in await second.read()
    assert len(fake.requests) == 2


async def test_an_idempotent_responses_stream_is_replayed(fake, gateway, sdk):
    client, _ = await gateway(config(fake.url, idempotency={"ttl_s": 60}))
    raws = []
    for _ in range(2):
        raw = await sdk(client).responses.with_raw_response.create(
            model="gpt-4o-mini", input="hi", stream=True, extra_headers={"Idempotency-Key": "k-1"})
        raws.append((raw.headers, [e.type async for e in raw.parse()]))
    assert len(fake.requests) == 1
    assert raws[1][0].get("Idempotent-Replayed") == "true" and raws[0][1] == raws[1][1]
    assert raws[1][1][-1] == "response.completed"


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt-4o-mini", "input": 5}, "input"),
    ({"model": "gpt-4o-mini", "input": {"role": "user"}}, "input"),
    ({"model": "gpt-4o-mini", "input": [{"type": "message", "role": "user", "content": "a"}, {"type": "bogus"}]},
     "input[1].type"),
    ({"model": "gpt-4o-mini", "input": ["just a string"]}, "input[0]"),
    ({"model": "gpt-4o-mini", "input": [{"role": "robot", "content": "a"}]}, "input[0].role"),
    ({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": -5}, "max_output_tokens"),
])
async def test_a_malformed_responses_body_is_a_400_naming_the_field(fake, gateway, sdk, body, param):
    client, _ = await gateway(config(fake.url))
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(client).responses.create(**body)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and info.value.body["code"] == "invalid_request"
    assert param.split("[")[0] in info.value.body["message"]
    assert fake.requests == []


async def test_every_input_item_type_the_sdk_knows_passes(fake, gateway, sdk):
    client, _ = await gateway(config(fake.url))
    items = [{"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "42"}, {"id": "msg_1"},
             {"type": "item_reference", "id": "msg_2"}, {"type": "reasoning", "id": "rs_1", "summary": []}]
    answer = await sdk(client).responses.create(model="gpt-4o-mini", input=items)
    assert answer.output_text == "Hello from the fake." and len(fake.requests) == 1


# ------------------------------------------------------------------ prompt-cache pricing, every dialect


async def test_openai_cached_prompt_tokens_are_priced_at_the_cached_rate(fake, gateway):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(usage={"prompt_tokens": 2000, "completion_tokens": 10,
                           "prompt_tokens_details": {"cached_tokens": 1536}}))
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    line = await line_for(logs)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (2000, 10)
    assert line["cost_usd"] == pytest.approx(464 * IN + 1536 * CACHED + 10 * OUT, rel=1e-9)


async def test_openai_cached_tokens_in_a_stream_usage_chunk_too(fake, gateway):
    client, logs = await gateway(config(fake.url, models=["gpt-*"]))
    fake.plan(Fault(usage={"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 1000}}))
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    resp = await client.post("/v1/chat/completions", json=body)
    assert b"[DONE]" in await resp.read()
    line = await line_for(logs)
    assert line["cost_usd"] == pytest.approx(1000 * 0.50e-6 + 3 * 8e-6, rel=1e-9)  # gpt-4.1: a quarter of $2


async def test_anthropic_cache_reads_and_writes_are_priced_at_their_own_rates(fake, gateway):
    cfg = GatewayConfig(fake.url, default_target="claude").claude(retry_matrix=NO_RETRY)
    client, logs = await gateway(cfg)
    usage = {"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 1000,
             "cache_read_input_tokens": 5000}
    fake.plan(Fault(usage=usage), Fault(usage={**usage, "cache_creation": {"ephemeral_5m_input_tokens": 400,
                                                                           "ephemeral_1h_input_tokens": 600}}))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/messages", json=body)).status == 200
    assert (await client.post("/v1/messages", json={**body, "stream": True})).status == 200
    first, second = await line_for(logs, 1), await line_for(logs, 2)
    i, o = 3e-6, 15e-6  # Sonnet 4.5
    assert (first["prompt_tokens"], first["completion_tokens"]) == (6100, 20)  # every input token, as before
    assert first["cost_usd"] == pytest.approx(100 * i + 1000 * 1.25 * i + 5000 * 0.1 * i + 20 * o, rel=1e-9)
    # the stream's message_start and message_delta say the same; an hour-long write costs twice the input
    assert second["prompt_tokens"] == 6100
    assert second["cost_usd"] == pytest.approx(100 * i + 400 * 1.25 * i + 600 * 2 * i + 5000 * 0.1 * i + 20 * o,
                                               rel=1e-9)



async def test_a_chat_request_answered_by_claude_keeps_its_cache_pricing(fake, gateway):
    cfg = GatewayConfig(fake.url, default_target="claude").claude(retry_matrix=NO_RETRY)
    client, logs = await gateway(cfg)
    fake.plan(Fault(usage={"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 1000,
                           "cache_read_input_tokens": 5000}))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    answer = await (await client.post("/v1/chat/completions", json=body)).json()
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 5000, "cache_write_tokens": 1000}
    i, o = 3e-6, 15e-6
    line = await line_for(logs)
    assert line["prompt_tokens"] == 6100
    assert line["cost_usd"] == pytest.approx(100 * i + 1000 * 1.25 * i + 5000 * 0.1 * i + 20 * o, rel=1e-9)


async def test_a_chat_stream_answered_by_claude_reports_its_whole_prompt_in_the_usage_chunk(fake, gateway):
    """message_delta repeats the input counts, cache reads and writes apart: the chunk sums them, as OpenAI does."""
    cfg = GatewayConfig(fake.url, default_target="claude").claude(retry_matrix=NO_RETRY)
    client, _ = await gateway(cfg)
    fake.plan(Fault(usage={"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 1000,
                           "cache_read_input_tokens": 5000}))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}],
            "stream": True, "stream_options": {"include_usage": True}}
    raw = await (await client.post("/v1/chat/completions", json=body)).read()
    usage = [msgspec.json.decode(line[6:])["usage"] for line in raw.split(b"\n")
             if line.startswith(b"data: {") and b'"usage"' in line][-1]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (6100, 20)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 5000, "cache_write_tokens": 1000}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_responses_request_answered_by_claude_keeps_its_cache_pricing(fake, gateway, sdk, stream):
    cfg = GatewayConfig(fake.url, default_target="claude").claude(retry_matrix=NO_RETRY)
    client, logs = await gateway(cfg)
    fake.plan(Fault(usage={"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 1000,
                           "cache_read_input_tokens": 5000}))
    api = sdk(client)
    if stream:
        async with api.responses.stream(model="claude-sonnet-4-5", input="hi") as events:
            answer = await events.get_final_response()
    else:
        answer = await api.responses.create(model="claude-sonnet-4-5", input="hi")
    details = answer.usage.input_tokens_details
    assert (answer.usage.input_tokens, details.cached_tokens, details.cache_write_tokens) == (6100, 5000, 1000)
    i, o = 3e-6, 15e-6
    line = await line_for(logs)
    assert line["cost_usd"] == pytest.approx(100 * i + 1000 * 1.25 * i + 5000 * 0.1 * i + 20 * o, rel=1e-9)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_messages_request_answered_by_openai_keeps_its_cached_tokens(fake, gateway, stream):
    client, logs = await gateway(config(fake.url))
    fake.plan(Fault(usage={"prompt_tokens": 2000, "completion_tokens": 10,
                           "prompt_tokens_details": {"cached_tokens": 1536}}))
    body = {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    resp = await client.post("/v1/messages", json=body)
    raw = await resp.read()
    if stream:
        usage = next(msgspec.json.decode(line[6:]) for line in raw.split(b"\n")
                     if line.startswith(b"data: ") and b"message_delta" in line)["usage"]
    else:
        usage = msgspec.json.decode(raw)["usage"]
    # Anthropic's input_tokens is the prompt apart from its cache reads, each priced at its own rate
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["output_tokens"]) == (464, 1536, 10)
    line = await line_for(logs)
    assert line["prompt_tokens"] == 2000
    assert line["cost_usd"] == pytest.approx(464 * IN + 1536 * CACHED + 10 * OUT, rel=1e-9)


# ------------------------------------------------------------------ the reader, event by event


def test_the_reader_takes_both_shapes_of_the_error_event_and_classifies_them():
    from providers.responses import ResponsesStream

    flat, nested = ResponsesStream(), ResponsesStream()
    flat.feed(b"error", b'{"type":"error","sequence_number":4,"code":"rate_limit_exceeded","message":"slow down","param":null}')
    nested.feed(b"error", b'{"type":"error","sequence_number":2,"error":{"type":"invalid_request_error",'
                          b'"code":"invalid_prompt","message":"no","param":"input"}}')
    assert (flat.error, flat.error_failure.reason, flat.error_failure.retry_class) == ("slow down", "rate_limited", "429")
    assert (nested.error, nested.error_failure.reason) == ("no", "client_error")
    assert flat.sequence == 4 and not flat.done and not nested.done


def test_the_reader_judges_completeness_by_the_terminal_events_only():
    from providers.responses import ResponsesStream

    for terminal, complete in (("response.completed", True), ("response.incomplete", True),
                               ("response.failed", False), ("response.output_item.done", False)):
        reader = ResponsesStream()
        reader.feed(b"response.created", b'{"type":"response.created","sequence_number":0,"response":{"usage":null}}')
        assert reader.preamble
        reader.feed(b"response.output_text.delta", b'{"type":"response.output_text.delta","sequence_number":1,'
                                                   b'"output_index":0,"delta":"hi"}')
        assert not reader.preamble and reader.text == "hi"
        reader.feed(terminal.encode(), b'{"type":"%s","sequence_number":2,"response":{"usage":{"input_tokens":9,'
                                       b'"output_tokens":5,"input_tokens_details":{"cached_tokens":4}},'
                                       b'"error":{"code":"server_error","message":"boom"}}}' % terminal.encode())
        assert (reader.done, reader.finished) == (complete, complete), terminal
        assert (reader.error is not None) == (terminal == "response.failed")
        if terminal != "response.output_item.done":
            assert reader.usage() == (9, 5, 4, 0, 0)
