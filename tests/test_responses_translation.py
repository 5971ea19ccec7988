"""Responses → Chat Completions / Anthropic Messages (issue #15 point 2): the unchanged openai SDK's
``client.responses`` against Anthropic and chat-only targets — complete, streamed, through the stream helper —,
fallbacks between dialects, and 400s for what cannot be translated."""

from __future__ import annotations

from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web

from providers import translate_responses_stream
from tests.support.config import NO_RETRY, GatewayConfig
from tests.support.fakes import Fault

PNG = "data:image/png;base64,iVBORw0KGgo="


def config(url: str, **up: Any) -> GatewayConfig:
    """``up`` (OpenAI, ``gpt-*``), ``claude`` (Anthropic, ``claude-*``), ``mistral`` (chat only, ``mistral-*``)."""
    cfg = GatewayConfig(url, default_target="up").up(retry_matrix=NO_RETRY, **up).claude(retry_matrix=NO_RETRY)
    return cfg.target("mistral", f"{url}/v1", provider="mistral", models=["mistral-*"], retry_matrix=NO_RETRY)


def sdk(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-x", max_retries=0)


# ---------------------------------------------------------------- an upstream that replays recorded answers


class Recorded:
    """A loopback upstream whose ``/v1/messages`` and ``/v1/chat/completions`` answer the next planned
    (status, JSON) or list of SSE (event, data) pairs; every request body is kept."""

    def __init__(self) -> None:
        self.planned: list[Any] = []
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        planned = self.planned.pop(0)
        if isinstance(planned, tuple):
            status, body = planned
            if isinstance(body, bytes):  # not JSON: a proxy's HTML page
                return web.Response(status=status, body=body, content_type="text/html")
            return web.json_response(body, status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for name, data in planned:
            head = f"event: {name}\n".encode() if name else b""
            await resp.write(head + b"data: " + (data if isinstance(data, bytes) else msgspec.json.encode(data)) + b"\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def recorded(aiohttp_server: Any) -> Recorded:
    upstream = Recorded()
    app = web.Application()
    app.router.add_post("/v1/messages", upstream.answer)
    app.router.add_post("/v1/chat/completions", upstream.answer)
    server = await aiohttp_server(app)
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


# Shapes from Anthropic's API reference: a text block and a tool call, then the same as a stream.
TOOL_ANSWER = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01A09q90", "name": "get_weather", "input": {"city": "Paris"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 472, "output_tokens": 91, "cache_read_input_tokens": 8},
}
TOOL_STREAM = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_014p7gG3", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 2}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": ", checking."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
]
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather by city", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}}]
# A conversation that already called the tool once: the call and its output go back as items.
TOOL_TURNS = [
    {"role": "user", "content": [{"type": "input_text", "text": "What is in this image, and the weather in Paris?"},
                                 {"type": "input_image", "image_url": PNG, "detail": "auto"}]},
    {"type": "function_call", "call_id": "toolu_prev", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
    {"type": "function_call_output", "call_id": "toolu_prev", "output": "18C, cloudy"},
]


# ---------------------------------------------------------------- Anthropic target


async def test_responses_create_reaches_claude_with_instructions_turns_and_an_image(fake, gateway):
    client, logs = await gateway(config(fake.url))
    async with sdk(client) as api:
        response = await api.responses.create(
            model="claude-sonnet-4-5", instructions="You are terse.", max_output_tokens=300, temperature=0.5,
            input=[{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]},
                   {"role": "developer", "content": "Answer in French."},
                   {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                {"type": "input_image", "image_url": PNG, "detail": "auto"}]}])
    assert response.object == "response" and response.status == "completed" and response.id == "resp_fake"
    assert response.output_text == "Hello from the fake." and response.output[0].role == "assistant"
    # the Response repeats the request's settings, as OpenAI's does
    assert (response.instructions, response.max_output_tokens, response.temperature) == ("You are terse.", 300, 0.5)
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (5, 4, 9)
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/messages" and sent.headers["anthropic-version"] == "2023-06-01"
    body = sent.json()
    assert body["system"] == "You are terse.\n\nAnswer in French." and body["max_tokens"] == 300
    assert body["temperature"] == 0.5 and body["model"] == "claude-sonnet-4-5"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][2]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]
    line = logs[-1]
    assert line["status"] == 200 and line["target"] == "claude"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 4) and line["cost_usd"] > 0


async def test_a_streamed_response_from_claude_is_the_real_event_sequence(fake, gateway):
    client, logs = await gateway(config(fake.url))
    async with sdk(client) as api:
        stream = await api.responses.create(model="claude-sonnet-4-5", input="Hi", stream=True)
        events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 3, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "tok0 tok1 tok2 "
    final = events[-1].response
    assert final.output_text == "tok0 tok1 tok2 " and final.id == events[0].response.id == "resp_fake1"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 3)
    assert fake.requests[0].json()["stream"] is True
    assert logs[-1]["completion_tokens"] == 3 and logs[-1]["prompt_tokens"] == 5


async def test_the_sdks_stream_helper_gets_its_final_response_from_claude(fake, gateway):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(chunks=4))
    async with sdk(client) as api:
        async with api.responses.stream(model="claude-sonnet-4-5", input="Hi", instructions="terse",
                                        max_output_tokens=200, metadata={"run": "7"}) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert "".join(deltas) == "tok0 tok1 tok2 tok3 " == final.output_text
    assert (final.instructions, final.max_output_tokens, final.metadata) == ("terse", 200, {"run": "7"})
    assert final.status == "completed" and final.usage.output_tokens == 4
    assert fake.requests[0].json()["system"] == "terse"


async def test_function_tools_tool_choice_and_a_tool_output_turn_reach_claude_and_its_call_comes_back(recorded, gateway):
    client, _ = await gateway(config(recorded.url))
    recorded.planned.append((200, TOOL_ANSWER))
    async with sdk(client) as api:
        response = await api.responses.create(
            model="claude-sonnet-4-5", input=TOOL_TURNS, tools=TOOLS, parallel_tool_calls=False,
            tool_choice={"type": "function", "name": "get_weather"})
    message, call = response.output
    assert message.type == "message" and message.content[0].text == "Let me check."
    assert call.type == "function_call" and call.call_id == "toolu_01A09q90" and call.name == "get_weather"
    assert msgspec.json.decode(call.arguments) == {"city": "Paris"} and response.status == "completed"
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens) == (480, 8)
    sent = recorded.bodies[0]
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather by city",
                              "input_schema": TOOLS[0]["parameters"]}]
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    user, assistant, result = sent["messages"]
    assert user["content"][1]["type"] == "image"
    assert assistant == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_prev", "name": "get_weather", "input": {"city": "Paris"}}]}
    assert result == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_prev",
                                                   "content": "18C, cloudy"}]}


async def test_a_streamed_tool_call_from_claude_reaches_the_stream_helper(recorded, gateway):
    client, logs = await gateway(config(recorded.url))
    recorded.planned.append(TOOL_STREAM)
    async with sdk(client) as api:
        async with api.responses.stream(model="claude-sonnet-4-5", input="weather?", tools=TOOLS,
                                        tool_choice="required") as stream:
            kinds = [e.type async for e in stream]
            final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    message, call = final.output
    assert message.content[0].text == "Okay, checking." and call.call_id == "toolu_01T1x1fJ"
    assert call.arguments == "{\"city\": \"Paris\"}" and call.parsed_arguments == {"city": "Paris"}
    assert recorded.bodies[0]["tool_choice"] == {"type": "any"}
    assert (logs[-1]["prompt_tokens"], logs[-1]["completion_tokens"]) == (472, 89)


async def test_claude_stopping_at_max_tokens_is_an_incomplete_response(recorded, gateway):
    client, _ = await gateway(config(recorded.url))
    cut = {**TOOL_ANSWER, "content": [{"type": "text", "text": "Once upon"}], "stop_reason": "max_tokens"}
    stream = [e for e in TOOL_STREAM[:5]] + [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"})]
    recorded.planned += [(200, cut), stream]
    async with sdk(client) as api:
        response = await api.responses.create(model="claude-sonnet-4-5", input="a story", max_output_tokens=2)
        events = [e async for e in await api.responses.create(model="claude-sonnet-4-5", input="a story",
                                                              max_output_tokens=2, stream=True)]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Once upon" and response.output[0].status == "incomplete"
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert recorded.bodies[0]["max_tokens"] == 2


@pytest.mark.parametrize(("status", "kind", "error"), [
    (400, "invalid_request_error", openai.BadRequestError),
    (429, "rate_limit_error", openai.RateLimitError),
    (529, "overloaded_error", openai.InternalServerError),
    (500, "api_error", openai.InternalServerError),
])
async def test_an_error_from_claude_is_the_sdks_own_error(fake, gateway, status, kind, error):
    client, _ = await gateway(config(fake.url))
    fake.plan(Fault(status=status, error_code=kind, error_message="the fake says no"))
    async with sdk(client) as api:
        with pytest.raises(error, match="the fake says no") as raised:
            await api.responses.create(model="claude-sonnet-4-5", input="Hi")
    assert raised.value.status_code == status
    assert raised.value.body["message"] == "the fake says no" and raised.value.code == kind


async def stream_events(client: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = await client.post("/v1/responses", json={**body, "stream": True})
    raw = await resp.read()
    return [msgspec.json.decode(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]


@pytest.mark.parametrize(("fault", "message"), [
    (Fault(chunks=5, error_after=4), "Overloaded"),  # Anthropic's own error event, mid-answer
    (Fault(chunks=5, cut_after=4), "upstream stream was cut"),  # the connection dropped, no error event
])
async def test_a_translated_stream_failing_mid_answer_ends_with_the_responses_error_event(fake, gateway, fault, message):
    client, logs = await gateway(config(fake.url))
    fake.plan(fault, fault)
    events = await stream_events(client, {"model": "claude-sonnet-4-5", "input": "Hi"})
    error = events[-1]
    assert error["type"] == "error" and message in error["message"] and message in error["error"]["message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))  # numbered after the last sent
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "tok0 tok1 "
    assert not any(e["type"] == "response.completed" for e in events)
    assert logs[-1]["error_code"] == "stream_interrupted"
    async with sdk(client) as api:  # and the SDK raises on it, after the text it received
        stream = await api.responses.create(model="claude-sonnet-4-5", input="Hi", stream=True)
        received = []
        with pytest.raises(openai.APIError, match=message):
            async for event in stream:
                received.append(event.type)
    assert received.count("response.output_text.delta") == 2


async def test_a_translated_stream_is_not_spliced_by_stream_recovery_but_ends_with_the_error_event(fake, gateway):
    client, _ = await gateway(config(fake.url).claude(stream_recovery="continue"))
    fake.plan(Fault(chunks=5, cut_after=4))
    events = await stream_events(client, {"model": "claude-sonnet-4-5", "input": "Hi"})
    assert events[-1]["type"] == "error" and [e["type"] for e in events].count("response.created") == 1
    assert len(fake.requests) == 1  # a Responses body is no Messages body a prefill could continue


async def test_an_error_page_that_is_not_json_is_the_clients_own_error_json(recorded, gateway):
    """A 502 HTML page from a proxy in front of Claude: the openai SDK gets OpenAI's error JSON (chat and
    Responses), the anthropic-dialect client of an OpenAI target Anthropic's."""
    client, _ = await gateway(config(recorded.url))
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    recorded.planned += [(502, page), (502, page), (400, b"bad request")]
    async with sdk(client) as api:
        with pytest.raises(openai.InternalServerError) as chat:
            await api.chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.InternalServerError) as responses:
            await api.responses.create(model="claude-sonnet-4-5", input="Hi")
    for error in (chat.value, responses.value):
        assert isinstance(error.body, dict) and "502 Bad Gateway" in error.body["message"], error.body
        assert "not JSON (text/html)" in error.body["message"]
    resp = await client.post("/v1/messages", json={"model": "mistral-small-latest", "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": "Hi"}]})
    body = await resp.json()
    assert resp.status == 400 and body["type"] == "error" and "bad request" in body["error"]["message"]


async def test_a_chat_stream_without_a_usage_report_has_no_usage_not_zeros(recorded, gateway):
    """Unknown is null: 0/0/0 would say the answer cost nothing."""
    client, _ = await gateway(config(recorded.url))
    chunk = {"id": "x1", "object": "chat.completion.chunk", "model": "mistral-small-latest",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Bonjour"}, "finish_reason": None}]}
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    recorded.planned += [(200, {"id": "x0", "object": "chat.completion", "model": "mistral-small-latest",
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Salut"},
                                             "finish_reason": "stop"}]}),
                         [(None, chunk), (None, last), (None, b"[DONE]")]]
    async with sdk(client) as api:
        response = await api.responses.create(model="mistral-small-latest", input="Hi")
        async with api.responses.stream(model="mistral-small-latest", input="Hi") as stream:
            final = await stream.get_final_response()
    assert response.output_text == "Salut" and response.usage is None
    assert final.output_text == "Bonjour" and final.status == "completed" and final.usage is None


async def test_a_flat_error_from_a_chat_only_server_is_openais_error_shape(recorded, gateway):
    client, _ = await gateway(config(recorded.url))
    recorded.planned.append((422, {"object": "error", "message": "Extra inputs are not permitted",
                                   "type": "invalid_request_error", "param": None, "code": None}))
    recorded.planned.append((422, {"detail": [{"loc": ["body", "x"], "msg": "extra fields not permitted"}]}))
    async with sdk(client) as api:
        with pytest.raises(openai.UnprocessableEntityError, match="Extra inputs are not permitted") as first:
            await api.responses.create(model="mistral-small-latest", input="Hi")
        with pytest.raises(openai.UnprocessableEntityError, match="extra fields not permitted") as second:
            await api.responses.create(model="mistral-small-latest", input="Hi")
    assert first.value.body["type"] == "invalid_request_error" and second.value.body["type"] == "invalid_request_error"


# ---------------------------------------------------------------- fallback, chat-only targets, native OpenAI


async def test_a_responses_call_falls_back_from_openai_to_claude(upstreams, gateway):
    primary, claude = await upstreams(), await upstreams()
    cfg = GatewayConfig(primary.url).up(retry_matrix=NO_RETRY, fallback_targets=[
        {"target": "claude", "model": "claude-sonnet-4-5"}]).target("claude", claude.url, provider="anthropic")
    client, logs = await gateway(cfg)
    primary.plan(Fault(status=503), Fault(status=503))
    async with sdk(client) as api:
        response = await api.responses.create(model="gpt-4o-mini", input="Hi")
        async with api.responses.stream(model="gpt-4o-mini", input="Hi") as stream:
            final = await stream.get_final_response()
    assert [s.path_qs for s in primary.requests] == ["/v1/responses", "/v1/responses"]  # OpenAI's own API
    assert [s.path_qs for s in claude.requests] == ["/v1/messages", "/v1/messages"]
    assert response.output_text == "Hello from the fake." and response.model == "claude-sonnet-4-5"
    assert final.output_text == "tok0 tok1 tok2 " and final.status == "completed"
    assert logs[-1]["fallback_target"] == "claude" and logs[-1]["completion_tokens"] == 3


async def test_a_responses_call_to_openai_is_relayed_untranslated(fake, gateway):
    client, _ = await gateway(config(fake.url))
    async with sdk(client) as api:
        await api.responses.create(model="gpt-4o-mini", input="Hi", tools=[{"type": "web_search"}])
    assert fake.requests[0].path_qs == "/v1/responses" and fake.requests[0].json()["tools"] == [{"type": "web_search"}]


async def test_a_chat_only_target_gets_chat_completions(fake, gateway):
    client, logs = await gateway(config(fake.url))
    async with sdk(client) as api:
        response = await api.responses.create(
            model="mistral-small-latest", instructions="terse", input=TOOL_TURNS, tools=TOOLS,
            tool_choice={"type": "allowed_tools", "mode": "required",
                         "tools": [{"type": "function", "name": "get_weather"}]},
            text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}})
        fake.plan(Fault(tool_calls=True, chunks=2))
        async with api.responses.stream(model="mistral-small-latest", input="Hi") as stream:
            final = await stream.get_final_response()
    assert response.output_text == "Hello from the fake." and response.id == "resp_fake"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 4)
    assert response.tools[0].name == "get_weather" and response.text.format.type == "json_schema"
    assert response.tool_choice.mode == "required"
    first, second = (s.json() for s in fake.requests)
    assert fake.requests[0].path_qs == "/v1/chat/completions"
    assert first["messages"] == [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this image, and the weather in Paris?"},
            {"type": "image_url", "image_url": {"url": PNG}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_prev", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_prev", "content": "18C, cloudy"}]
    assert first["tool_choice"] == "required" and first["tools"][0]["function"]["strict"] is True
    assert first["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object"}, "strict": True}}
    assert "stream_options" not in second  # Mistral is not asked for OpenAI's usage chunk
    (call,) = final.output
    assert call.type == "function_call" and call.call_id == "call_1" and call.arguments == '{"n0":0{"n1":1'
    assert logs[-1]["target"] == "mistral" and logs[-1]["status"] == 200


# ---------------------------------------------------------------- what cannot be translated


@pytest.mark.parametrize(("model", "fields", "param"), [
    ("claude-sonnet-4-5", {"tools": [{"type": "web_search"}]}, "tools[0]"),
    ("claude-sonnet-4-5", {"tools": [*TOOLS, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[1]"),
    ("mistral-small-latest", {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0]"),
    ("claude-sonnet-4-5", {"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ("claude-sonnet-4-5", {"previous_response_id": "resp_123"}, "previous_response_id"),
    ("mistral-small-latest", {"conversation": "conv_123"}, "conversation"),
    ("claude-sonnet-4-5", {"background": True}, "background"),
    ("claude-sonnet-4-5", {"prompt": {"id": "pmpt_1"}}, "prompt"),
    ("claude-sonnet-4-5", {"truncation": "auto"}, "truncation"),
    ("claude-sonnet-4-5", {"include": ["message.output_text.logprobs"]}, "include"),
    ("claude-sonnet-4-5", {"reasoning": {"effort": "high"}}, "reasoning"),
    ("claude-sonnet-4-5", {"text": {"format": {"type": "json_object"}}}, "text.format"),
    ("claude-sonnet-4-5", {"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ("claude-sonnet-4-5", {"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input[0]"),
    ("claude-sonnet-4-5", {"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1", "detail": "auto"}]}]}, "input[0].content[0]"),
    ("claude-sonnet-4-5", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-1"}]}]}, "input[0].content[0]"),
    ("claude-sonnet-4-5", {"some_future_field": 1}, "some_future_field"),
    ("mistral-small-latest", {"text": {"verbosity": "low"}}, "text.verbosity"),  # Mistral refuses unknown fields
])
async def test_what_cannot_be_translated_is_a_400_naming_the_field(fake, gateway, model, fields, param):
    client, logs = await gateway(config(fake.url))
    async with sdk(client) as api:
        with pytest.raises(openai.BadRequestError) as raised:
            await api.responses.create(model=model, input="Hi", extra_body=fields)  # as sent, whatever the SDK knows
    error = raised.value.body
    assert error["param"] == param and error["message"].startswith(param) and error["type"] == "invalid_request_error"
    assert ("claude" if model.startswith("claude") else "mistral") in error["message"]  # the target is named
    assert fake.requests == [] and logs[-1]["attempts"] == 0


async def test_hints_without_an_equivalent_do_not_block_the_call(fake, gateway):
    client, _ = await gateway(config(fake.url))
    async with sdk(client) as api:
        response = await api.responses.create(
            model="claude-sonnet-4-5", input="Hi", store=False, metadata={"k": "v"}, prompt_cache_key="k1",
            include=["reasoning.encrypted_content"], reasoning={"summary": "auto"}, background=False,
            truncation="disabled", service_tier="auto", user="u-1")
        await api.responses.create(model="mistral-small-latest", input="Hi", user="u-1", safety_identifier="s-1",
                                   metadata={"k": "v"}, store=False)
    assert response.status == "completed"
    assert fake.requests[0].json()["metadata"] == {"user_id": "u-1"}
    # Mistral's API refuses a field it does not know (422 extra_forbidden): a hint it has no field for stays here
    assert set(fake.requests[1].json()) == {"model", "messages"}


# ---------------------------------------------------------------- the stream translator on its own


def test_chat_chunks_with_parallel_tool_calls_become_responses_items() -> None:
    t = translate_responses_stream.ChatToResponsesStream()

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return msgspec.json.encode({"id": "chatcmpl-9", "model": "m", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    raw = b"".join(t.feed(b"", data) for data in [
        chunk({"role": "assistant", "content": "Hm. "}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": "{\"x\":"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
        msgspec.json.encode({"id": "chatcmpl-9", "choices": [], "usage": {
            "prompt_tokens": 9, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 4}}}),
        b"[DONE]"])
    events = [msgspec.json.decode(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
    done = events[-1]
    assert done["type"] == "response.completed" and done["response"]["id"] == "resp_9"
    assert [(i["type"], i.get("call_id"), i.get("arguments")) for i in done["response"]["output"]] == [
        ("message", None, None), ("function_call", "call_a", "{\"x\":1}"), ("function_call", "call_b", "{}")]
    assert done["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 4
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    finished = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == finished == [0, 1, 2]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))

