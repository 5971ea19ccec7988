"""What a request in one dialect carries to a target of the other, and what it is refused for (SPEC §6,
docs/API.md): a field or part that would change the answer and cannot cross is a 400 naming it — never dropped,
a fallback target that cannot take it skipped — and what has an equivalent crosses (documents, PDF files, one tool
call per turn, a tool's strict flag)."""

from __future__ import annotations

import pytest

from providers import translate
from tests.test_translate import config

TEXT_DOC = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Q3 revenue was 42"}}


@pytest.mark.parametrize(("fields", "param"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"top_k": 5}, "top_k"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}, {"type": "web_search_20250305", "name": "web_search"}]},
     "tools[1]"),
    ({"container": "c"}, "container"),
    ({"system": 5}, "system"),
    ({"model": None}, "model"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}]}]},
     "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "search_result", "content": []}]}]}, "messages[0].content[0]"),
])
async def test_what_an_openai_target_cannot_carry_is_refused_naming_the_field_never_dropped(fake, gateway, fields, param):
    """An Anthropic client on an OpenAI target: thinking, top_k, a server tool, a document by URL, … would be lost
    on the way and the answer silently wrong — a 400 in Anthropic's shape names the field, nothing is sent."""
    client, logs = await gateway(config(fake.url))
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **fields}
    resp = await client.post("/v1/messages", json=body)
    answer = await resp.json()
    assert resp.status == 400 and answer["type"] == "error", answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"].startswith(param)
    assert "Error:" not in answer["error"]["message"] and fake.requests == []


async def test_documents_disabled_thinking_and_one_tool_per_turn_reach_an_openai_target(fake, gateway):
    client, _ = await gateway(config(fake.url))
    pdf = {"type": "document", "title": "q3.pdf", "source": {"type": "base64", "media_type": "application/pdf",
                                                             "data": "JVBERi0x"}}
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "thinking": {"type": "disabled"},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "messages": [{"role": "user", "content": [TEXT_DOC, pdf, {"type": "text", "text": "What was Q3 revenue?"}]},
                         {"role": "assistant", "content": [{"type": "thinking", "thinking": "…", "signature": "s"},
                                                           {"type": "text", "text": "42"}]},
                         {"role": "user", "content": "thanks"}]}
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 200, await resp.text()
    sent = fake.requests[0].json()
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "Q3 revenue was 42"},
        {"type": "file", "file": {"filename": "q3.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}},
        {"type": "text", "text": "What was Q3 revenue?"}]
    assert sent["messages"][1] == {"role": "assistant", "content": "42"}  # the signed thinking only Anthropic reads
    assert sent["parallel_tool_calls"] is False and "thinking" not in sent


def test_one_tool_call_per_turn_reaches_anthropic_too() -> None:
    out = translate.openai_to_anthropic_request({
        "model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]}]},
     "messages"),
])
async def test_what_an_anthropic_target_cannot_carry_is_refused_naming_the_field(fake, gateway, fields, param):
    """The other way round too: a chat request for Claude with JSON mode, logprobs, audio, … was sent without them
    and answered 200 — plain text where JSON was asked for. A 400 in OpenAI's shape names the field."""
    client, _ = await gateway(config(fake.url))
    body = {"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "hi"}], **fields}
    resp = await client.post("/v1/chat/completions", json=body)
    answer = await resp.json()
    assert resp.status == 400 and answer["error"]["param"] == param and fake.requests == [], answer


async def test_a_pdf_file_part_and_plain_text_options_reach_an_anthropic_target(fake, gateway):
    client, _ = await gateway(config(fake.url))
    body = {"model": "claude-3-5-haiku-latest", "response_format": {"type": "text"}, "modalities": ["text"],
            "logprobs": False, "messages": [{"role": "user", "content": [
                {"type": "file", "file": {"filename": "q3.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}},
                {"type": "text", "text": "What was Q3 revenue?"}]}]}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    assert fake.requests[0].json()["messages"][0]["content"] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
        {"type": "text", "text": "What was Q3 revenue?"}]


async def test_a_documents_title_and_a_tools_strict_flag_reach_an_openai_target_and_citations_are_refused(fake, gateway):
    client, _ = await gateway(config(fake.url))
    doc = {**TEXT_DOC, "title": "Q3 report", "context": "internal"}
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": [doc]}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}, "strict": True}]}
    assert (await client.post("/v1/messages", json=body)).status == 200
    sent = fake.requests[0].json()
    assert sent["messages"][0]["content"] == "Q3 report\n\ninternal\n\nQ3 revenue was 42"
    assert sent["tools"][0]["function"]["strict"] is True
    cited = {**body, "messages": [{"role": "user", "content": [{**doc, "citations": {"enabled": True}}]}]}
    resp = await client.post("/v1/messages", json=cited)
    assert resp.status == 400 and "citations" in (await resp.json())["error"]["message"] and len(fake.requests) == 1


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"model": "claude-3-5-haiku-latest", "stop": 5,
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "claude-3-5-haiku-latest", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": ["x"]}]}),
    ("/v1/messages", {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": 5}]}),
    ("/v1/messages", {"model": "gpt-4o-mini", "max_tokens": 10, "metadata": "x",
                      "messages": [{"role": "user", "content": "hi"}]}),
])
async def test_a_request_the_translator_cannot_read_is_the_clients_400_in_its_dialect(fake, gateway, path, body):
    client, logs = await gateway(config(fake.url))
    resp = await client.post(path, json=body)
    answer = await resp.json()
    assert resp.status == 400, answer
    message = answer["error"]["message"]
    assert ("cannot be translated" in message or "must be a string or a list" in message)
    assert "Traceback" not in message and "Error:" not in message  # (no Python internals: "TypeError: 'int' …")
    assert (answer.get("type") == "error") is (path == "/v1/messages")  # Anthropic's error shape for /v1/messages
    assert fake.requests == [] and logs[-1]["error_code"] == "invalid_request"


async def test_asking_an_anthropic_target_for_several_choices_is_a_400_not_one_choice(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.post("/v1/chat/completions", json={
        "model": "claude-3-5-haiku-latest", "n": 2, "messages": [{"role": "user", "content": "hi"}]})
    answer = await resp.json()
    assert resp.status == 400 and answer["error"]["param"] == "n" and fake.requests == []
    ok = await client.post("/v1/chat/completions", json={
        "model": "claude-3-5-haiku-latest", "n": 1, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status == 200


@pytest.mark.parametrize("raw", [b"", b"[]", b'"hi"'])
async def test_a_body_that_is_no_json_object_is_never_sent_on_untranslated(fake, gateway, raw):
    client, _ = await gateway(config(fake.url))  # /v1/messages with no model goes to the default (OpenAI) target
    resp = await client.post("/v1/messages", data=raw, headers={"Content-Type": "application/json"})
    answer = await resp.json()
    assert resp.status == 400 and answer["type"] == "error" and fake.requests == []
