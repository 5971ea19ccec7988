"""OpenAI ⇄ Anthropic translation (issue #5 point 2): unit cases on recorded, realistic bodies and
SSE streams of both APIs, and end to end through the unchanged openai and anthropic SDKs."""

from __future__ import annotations

import anthropic
import msgspec
import openai
import pytest

from providers import translate, translate_stream
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault, scripted_sse

# ---------------------------------------------------------------- recorded shapes (API references)

OPENAI_TOOL_REQUEST = {
    "model": "gpt-4o", "max_completion_tokens": 300, "temperature": 1.5, "stop": ["\n\nHuman:"], "user": "u-1",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this image, and the weather in Paris?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18C, cloudy"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}],
    "tool_choice": "required",
}

ANTHROPIC_TOOL_ANSWER = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"city": "Paris"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 472, "output_tokens": 91, "cache_read_input_tokens": 8},
}

ANTHROPIC_STREAM = [
    ("message_start", {"type": "message_start", "message": {"id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message",
                                                            "role": "assistant", "model": "claude-3-5-haiku-20241022",
                                                            "content": [], "stop_reason": None, "stop_sequence": None,
                                                            "usage": {"input_tokens": 472, "output_tokens": 2}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", checking."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
]

OPENAI_STREAM = [
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                        "function": {"name": "lookup", "arguments": ""}}]},
                  "finish_reason": None}]},
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":1}"}}]},
                  "finish_reason": None}]},
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}},
]


def sse_data(raw: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
                out.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    return out


def test_an_openai_request_with_tools_images_and_tool_results_becomes_a_messages_request() -> None:
    out = translate.openai_to_anthropic_request(OPENAI_TOOL_REQUEST)
    assert out["system"] == "You are terse." and out["max_tokens"] == 300 and out["temperature"] == 1.0
    assert out["stop_sequences"] == ["\n\nHuman:"] and out["metadata"] == {"user_id": "u-1"}
    user, assistant, result = out["messages"]
    assert user["role"] == "user" and user["content"][1] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert assistant == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {"city": "Paris"}}]}
    assert result == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_abc",
                                                   "content": "18C, cloudy"}]}
    assert out["tools"][0]["input_schema"]["required"] == ["city"] and out["tool_choice"] == {"type": "any"}


def test_an_anthropic_tool_answer_becomes_a_chat_completion() -> None:
    out = translate.anthropic_to_openai_response(ANTHROPIC_TOOL_ANSWER)
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-01XFDUDYJgAACzvnptvVoYEL"
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check."
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9" and msgspec.json.decode(call["function"]["arguments"]) == {
        "city": "Paris"}
    assert out["usage"] == {"prompt_tokens": 480, "completion_tokens": 91, "total_tokens": 571,
                            "prompt_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0}}


def test_an_anthropic_stream_becomes_chat_completion_chunks() -> None:
    t = translate_stream.AnthropicToOpenAIStream(include_usage=True)
    raw = b"".join(t.feed(name.encode(), msgspec.json.encode(ev)) for name, ev in ANTHROPIC_STREAM)
    events = sse_data(raw)
    assert events[-1] == "[DONE]" and t.done
    chunks = [e for e in events if isinstance(e, dict)]
    assert {c["id"] for c in chunks} == {"chatcmpl-014p7gG3wDgGV9EUtLvnow3U"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Okay, checking."
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and
             "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "toolu_01T1x1fJ34qAmk2tNTrN7Up6" and calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == "{\"city\": \"Paris\"}"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["tool_calls"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 472, "completion_tokens": 89, "total_tokens": 561,
                                   "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}


def test_an_openai_stream_becomes_messages_events() -> None:
    t = translate_stream.OpenAIToAnthropicStream()
    raw = b"".join(t.feed(b"", msgspec.json.encode(c)) for c in OPENAI_STREAM) + t.feed(b"", b"[DONE]")
    names = [block.split(b"\n")[0][7:].decode() for block in raw.strip().split(b"\n\n")]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    events = sse_data(raw)
    assert events[1]["content_block"] == {"type": "text", "text": ""} and events[2]["delta"]["text"] == "Hello"
    assert events[4]["content_block"]["type"] == "tool_use" and events[4]["content_block"]["id"] == "call_1"
    assert events[5]["delta"] == {"type": "input_json_delta", "partial_json": "{\"q\":1}"}
    assert events[7]["delta"]["stop_reason"] == "tool_use" and events[7]["usage"] == {
        "input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 12}



def _tool_chunk(index: int, *, id: str | None = None, args: str = "") -> dict:
    fn = {"arguments": args} if id is None else {"name": f"f{index}", "arguments": args}
    call = {"index": index, "function": fn, **({"id": id, "type": "function"} if id else {})}
    return {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


def _blocks_of(raw: bytes) -> tuple[list[tuple[str, int | None]], dict[int, str]]:
    """(event name, block index) in order, and each tool block's arguments joined."""
    order, args = [], {}
    for event in sse_data(raw):
        order.append((event["type"], event.get("index")))
        if event["type"] == "content_block_delta":
            args[event["index"]] = args.get(event["index"], "") + event["delta"]["partial_json"]
    return order, args


def test_interleaved_parallel_tool_calls_become_whole_blocks_one_after_the_other() -> None:
    """OpenAI may interleave two tool calls' arguments; an Anthropic block ends before the next begins, and the
    SDK reads a block's input at its stop: the second call is held until the first's arguments are whole."""
    t = translate_stream.OpenAIToAnthropicStream()
    chunks = [_tool_chunk(0, id="call_a"), _tool_chunk(1, id="call_b"), _tool_chunk(0, args='{"city":'),
              _tool_chunk(1, args='{"city":"B"}'), _tool_chunk(0, args='"A"}'),
              {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    raw = b"".join(t.feed(b"", msgspec.json.encode(c)) for c in chunks) + t.feed(b"", b"[DONE]")
    order, args = _blocks_of(raw)
    blocks = [(name, i) for name, i in order if name.startswith("content_block")]
    assert blocks == [("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
                      ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
                      ("content_block_stop", 1)]
    assert args == {0: '{"city":"A"}', 1: '{"city":"B"}'}
    starts = [e["content_block"]["id"] for e in sse_data(raw) if e["type"] == "content_block_start"]
    assert starts == ["call_a", "call_b"]


def test_tool_calls_one_after_the_other_still_stream_as_they_come() -> None:
    t = translate_stream.OpenAIToAnthropicStream()
    first = t.feed(b"", msgspec.json.encode(_tool_chunk(0, id="call_a", args='{"q":1}')))
    second = t.feed(b"", msgspec.json.encode(_tool_chunk(1, id="call_b", args='{"q":')))
    assert b"content_block_start" in first and b"content_block_stop" in second  # the first ended, the second began
    assert b'"call_b"' in second and b"input_json_delta" in second  # not held for the end of the stream


def test_an_anthropic_request_becomes_a_chat_request_and_back() -> None:
    body = {"model": "gpt-4o", "max_tokens": 100, "system": "be brief", "stop_sequences": ["END"], "stream": True,
            "metadata": {"user_id": "u-2"}, "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "lookup"},
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup",
                                                            "input": {"q": 1}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}]}
    out = translate.anthropic_to_openai_request(body)
    assert out["messages"][0] == {"role": "system", "content": "be brief"}
    assert out["messages"][2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": "{\"q\":1}"}
    assert out["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "42"}
    assert out["stop"] == ["END"] and out["user"] == "u-2" and out["stream_options"] == {"include_usage": True}
    assert out["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    answer = translate.openai_to_anthropic_response({
        "id": "chatcmpl-9", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "length",
                                                            "message": {"role": "assistant", "content": "Hel"}}],
        "usage": {"prompt_tokens": 13, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 4}}})
    assert answer["content"] == [{"type": "text", "text": "Hel"}] and answer["stop_reason"] == "max_tokens"
    # OpenAI's prompt_tokens holds its cache reads; Anthropic's input_tokens does not
    assert answer["usage"] == {"input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4,
                               "output_tokens": 1} and answer["id"] == "msg_9"


# ---------------------------------------------------------------- end to end, through the SDKs


def config(url: str) -> GatewayConfig:
    return GatewayConfig(url, default_target="gpt").up("gpt").claude(llm={"max_tokens": 512})


async def test_the_openai_sdk_talks_to_an_anthropic_target(fake, gateway):
    client, logs = await gateway(config(fake.url))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-x", max_retries=0)
    done = await sdk.chat.completions.create(model="claude-3-5-haiku-latest", stop="END",
                                             messages=[{"role": "system", "content": "terse"},
                                                       {"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "Hello from the fake." and done.choices[0].finish_reason == "stop"
    assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 4)
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/messages" and sent.json()["system"] == "terse" and sent.json()["max_tokens"] == 512
    assert sent.json()["stop_sequences"] == ["END"]
    fake.plan(Fault(chunks=4))
    stream = await sdk.chat.completions.create(model="claude-3-5-haiku-latest", stream=True,
                                               stream_options={"include_usage": True},
                                               messages=[{"role": "user", "content": "hi"}])
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert logs[-1]["completion_tokens"] == 4 and logs[-1]["cost_usd"] > 0
    await sdk.close()


async def test_the_anthropic_sdk_talks_to_an_openai_target(fake, gateway):
    client, _ = await gateway(config(fake.url))
    sdk = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sk-x", max_retries=0)
    message = await sdk.messages.create(model="gpt-4o-mini", max_tokens=64, system="terse",
                                        messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from the fake." and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 4)
    sent = fake.requests[0]
    assert sent.path_qs == "/v1/chat/completions"
    assert sent.json()["messages"][0] == {"role": "system", "content": "terse"} and sent.json()["max_tokens"] == 64
    fake.plan(Fault(chunks=3))
    async with sdk.messages.stream(model="gpt-4o-mini", max_tokens=64,
                                   messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "tok0 tok1 tok2 " and final.stop_reason == "end_turn" and final.usage.output_tokens == 3
    await sdk.close()


async def test_the_anthropic_sdk_talks_to_a_mistral_target_with_only_fields_mistral_takes(fake, gateway):
    """Mistral's API refuses stream_options and user (422 extra_forbidden) and reports a stream's usage unasked."""
    cfg = config(fake.url).target("mistral", f"{fake.url}/v1", provider="mistral", models=["mistral-*"])
    client, logs = await gateway(cfg)
    sdk = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sk-x", max_retries=0)
    fake.plan(Fault(strict=True), Fault(strict=True, unasked_usage=True, chunks=3))
    message = await sdk.messages.create(model="mistral-small-latest", max_tokens=64, metadata={"user_id": "u-1"},
                                        messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from the fake."
    async with sdk.messages.stream(model="mistral-small-latest", max_tokens=64, metadata={"user_id": "u-1"},
                                   messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "tok0 tok1 tok2 " and (final.usage.input_tokens, final.usage.output_tokens) == (5, 3)
    assert "stream_options" not in fake.requests[1].json() and "user" not in fake.requests[1].json()
    assert logs[-1]["completion_tokens"] == 3
    await sdk.close()


def test_a_flat_error_of_a_chat_only_server_keeps_its_message_in_anthropics_shape():
    mistral = {"object": "error", "message": {"detail": [{"type": "extra_forbidden", "loc": ["body", "x"],
                                                          "msg": "Extra inputs are not permitted"}]},
               "type": "invalid_request_error", "param": None, "code": None}
    out = translate.anthropic_error_from_openai(mistral, 422)
    assert out["type"] == "error" and "Extra inputs are not permitted" in out["error"]["message"]
    assert translate.anthropic_error_from_openai({"detail": "Not Found"}, 404)["error"]["message"] == "Not Found"
    assert translate.anthropic_error_from_openai({"error": {"message": "bad"}}, 400)["error"]["message"] == "bad"


async def test_a_provider_error_reaches_the_sdk_in_its_own_dialect(fake, gateway):
    client, _ = await gateway(config(fake.url))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-x", max_retries=0)
    fake.plan(Fault(status=400, error_message="max_tokens: too large"))
    with pytest.raises(openai.BadRequestError, match="too large"):
        await sdk.chat.completions.create(model="claude-3-5-haiku-latest", messages=[{"role": "user", "content": "x"}])
    await sdk.close()


async def test_native_messages_to_an_anthropic_target_stay_byte_exact(aiohttp_server, gateway):
    from aiohttp import web

    answer = (b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":['
              b'{"type":"thinking","thinking":"hmm","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"},'
              b'{"type":"text","text":"Hi","citations":null}],"stop_reason":"end_turn","future_field":{"x":1},'
              b'"usage":{"input_tokens":5,"output_tokens":4}}')
    seen: list[bytes] = []

    async def messages(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    server = await aiohttp_server(app)
    client, _ = await gateway(f"""
targets:
  claude: {{base_url: "{str(server.make_url('')).rstrip('/')}", provider: anthropic, models: ["claude-*"]}}
""")
    raw = (b'{"model": "claude-sonnet-4-5", "max_tokens": 64, "thinking": {"type": "enabled", "budget_tokens": 32},'
           b' "messages": [{"role": "user", "content": "hi"}], "unknown_beta_field": [1, 2]}')
    resp = await client.post("/v1/messages", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200 and await resp.read() == answer  # the signature and unknown fields intact
    assert seen == [raw]


def _chat_chunk(content: str, finish: str | None = None) -> bytes:
    return b"data: " + msgspec.json.encode({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                                            "choices": [{"index": 0, "delta": {"content": content},
                                                         "finish_reason": finish}]}) + b"\n\n"


async def test_a_translated_stream_carries_an_event_larger_than_a_socket_read_whole(aiohttp_server, gateway):
    """A 300 KB delta (a tool call or a pasted file in one chunk), split across reads: the Anthropic client gets all
    of it — the translation never sees half an event, which it could not read and would drop."""
    big = _chat_chunk("y" * 300_000)
    server, _ = await scripted_sse(aiohttp_server, "/v1/chat/completions", [[
        _chat_chunk("Hi "), big[:280_000], big[280_000:], _chat_chunk("", "stop"), b"data: [DONE]\n\n"]])
    client, _ = await gateway(f"""
targets:
  up: {{base_url: "{str(server.make_url('')).rstrip('/')}/v1", provider: openai, models: ["gpt-*"]}}
""")
    sdk = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="sk-x", max_retries=0)
    async with sdk.messages.stream(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as st:
        text = "".join([t async for t in st.text_stream])
    assert text == "Hi " + "y" * 300_000
    await sdk.close()


async def test_a_translated_stream_with_an_event_it_cannot_read_ends_with_an_in_band_error(aiohttp_server, gateway):
    """Dropped, the event would leave a stream that ends cleanly with a part missing (SPEC §5)."""
    server, _ = await scripted_sse(aiohttp_server, "/v1/chat/completions", [[
        _chat_chunk("Hello "), b'data: {"choices": [{"delta": {"cont\n\n', _chat_chunk("world", "stop"),
        b"data: [DONE]\n\n"]])
    client, logs = await gateway(f"""
targets:
  up: {{base_url: "{str(server.make_url('')).rstrip('/')}/v1", provider: openai, models: ["gpt-*"]}}
""")
    resp = await client.post("/v1/messages", json={"model": "gpt-4o-mini", "max_tokens": 10, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    raw = await resp.read()
    assert resp.status == 200 and b"Hello " in raw and b"world" not in raw
    assert b"event: error" in raw and b"message_stop" not in raw
    assert logs[-1]["outcome"] == "stream_error"


def test_separate_anthropic_text_blocks_stay_separate_parts_for_openai() -> None:
    out = translate.anthropic_to_openai_request({
        "model": "gpt-4o-mini", "max_tokens": 10,
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "First paragraph."},
                                         {"type": "text", "text": "Second paragraph."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Un."}]},
            {"role": "user", "content": [{"type": "text", "text": "Encore."}]},
        ],
    })
    assert out["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."},
                                       {"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": [{"type": "text", "text": "First paragraph."},
                                     {"type": "text", "text": "Second paragraph."}]},
        {"role": "assistant", "content": "Un."},
        {"role": "user", "content": "Encore."},
    ]


@pytest.mark.parametrize(("status", "anthropic_type", "openai_type"), [
    (400, "invalid_request_error", "invalid_request_error"), (401, "authentication_error", "authentication_error"),
    (429, "rate_limit_error", "rate_limit_error"), (500, "api_error", "server_error"),
    (529, "overloaded_error", "server_error"),
])
def test_a_translated_error_takes_the_type_the_clients_api_gives_its_status(status, anthropic_type, openai_type):
    from_openai = translate.anthropic_error_from_openai(
        {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, status)
    assert from_openai == {"type": "error", "error": {"type": anthropic_type, "message": "Rate limit reached"}}
    from_anthropic = translate.openai_error_from_anthropic(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, status)
    assert from_anthropic["error"]["type"] == openai_type and from_anthropic["error"]["message"] == "Overloaded"


async def test_counting_tokens_on_an_openai_target_is_a_clear_400_in_anthropics_dialect(fake, gateway):
    client, logs = await gateway(config(fake.url))
    resp = await client.post("/v1/messages/count_tokens", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    answer = await resp.json()
    assert resp.status == 400 and answer["type"] == "error" and "count_tokens" in answer["error"]["message"]
    assert fake.requests == []
    assert logs[-1]["attempts"] == 0  # refused before anything was sent: no attempt

