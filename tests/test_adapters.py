"""Provider adapters: one fixed shape each (credentials, error classes, usage from an answer
and from a stream, prices), checked on the providers' own JSON and SSE formats."""

from __future__ import annotations

import msgspec
import pytest
from multidict import CIMultiDict

from gateway.streaming.sse import events
from policies.usage import NotJSON, read_usage
from providers import get_provider
from providers.anthropic import MessagesStream
from providers.dialects import dialect
from providers.endpoints import endpoint
from providers.openai import ChatStream
from providers.pricing import PriceTable

OPENAI_ANSWER = b"""{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,
"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!","refusal":null,
"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,
"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":
{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},
"service_tier":"default"}"""

ANTHROPIC_ANSWER = b"""{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant",
"model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hi! My name is Claude."}],
"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,"output_tokens":503,
"cache_creation_input_tokens":100,"cache_read_input_tokens":1000}}"""

OPENAI_STREAM = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}\n\n'
    b"data: [DONE]\n\n"
)

ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
    b'"content":[],"model":"claude-haiku-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,'
    b'"cache_creation_input_tokens":5,"cache_read_input_tokens":70,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b"event: ping\ndata: {\"type\": \"ping\"}\n\n"
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("name", ["openai", "anthropic", "mistral", "http"])
def test_every_adapter_has_the_same_shape(name: str) -> None:
    p = get_provider(name)
    assert p.name == name
    assert isinstance(p.key_header, str) and isinstance(p.key_prefix, str)
    assert p.classify(200, CIMultiDict(), b"", 0.0) is None
    assert p.classify(500, CIMultiDict(), b"", 0.0).reason == "server_error"
    llm = name != "http"
    assert bool(p.prices) is llm
    assert p.kind == ("llm" if llm else "http")
    assert (p.speaks is not None) is llm  # plain HTTP: no dialect, nothing read or translated
    if llm:  # usage and streams are read by the dialect the provider speaks
        speaks = dialect(p.speaks)
        assert speaks.stream is not None
        assert speaks.read_usage(OPENAI_ANSWER if name != "anthropic" else ANTHROPIC_ANSWER)[:2] == (
            (19, 10) if name != "anthropic" else (2095 + 100 + 1000, 503)
        )


def test_each_adapter_attaches_its_key_its_own_way() -> None:
    assert (get_provider("openai").key_header, get_provider("openai").key_prefix) == ("Authorization", "Bearer ")
    assert (get_provider("anthropic").key_header, get_provider("anthropic").key_prefix) == ("x-api-key", "")
    assert get_provider("mistral").key_prefix == "Bearer "


def test_prices_are_each_adapters_own_and_the_table_merges_them() -> None:
    table = PriceTable()
    for name, model in (("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-haiku"), ("mistral", "mistral-small")):
        assert model in get_provider(name).prices
        assert table.per_million[model] == get_provider(name).prices[model]
    assert "gpt-4o" not in get_provider("anthropic").prices
    assert table.price("claude-3-5-haiku-20241022").cost(1_000_000, 0) == pytest.approx(0.80)


def test_usage_of_an_answer_is_read_in_the_dialect_of_its_path() -> None:
    assert read_usage(OPENAI_ANSWER, "chat/completions") == (19, 10, 0, 0, 0)
    # cache writes and reads are input, and said apart to be priced at their own rates
    assert read_usage(ANTHROPIC_ANSWER, "messages") == (3195, 503, 1000, 100, 0)
    assert read_usage(b'{"id":"x","choices":[]}', "chat/completions") is None
    assert read_usage(b'{"usage":"n/a"}', "messages") is None  # not a usage object: unbilled, not a crash
    with pytest.raises(NotJSON):
        read_usage(b"<html>502 Bad Gateway</html>", "chat/completions")


def _read(reader, raw: bytes):
    for name, data in events(raw):
        reader.feed(name, data)
    return reader


def test_usage_of_a_stream_is_read_by_the_format_of_its_path() -> None:
    assert dialect(endpoint("chat/completions").dialect).stream is ChatStream
    assert dialect(get_provider("openai").speaks).stream is ChatStream
    assert dialect(endpoint("messages").dialect).stream is MessagesStream
    assert dialect(get_provider("anthropic").speaks).stream is MessagesStream
    chat = _read(ChatStream(include_usage=True), OPENAI_STREAM)
    assert (chat.prompt_tokens, chat.completion_tokens, chat.done, chat.text) == (12, 3, True, "Hi")
    msgs = _read(MessagesStream(), ANTHROPIC_STREAM)
    assert (msgs.prompt_tokens, msgs.completion_tokens, msgs.done, msgs.text) == (25 + 5 + 70, 15, True, "Hello")


def _err(kind: str, message: str) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": kind, "param": None, "code": kind}})


def _anthropic_err(kind: str, message: str) -> bytes:
    return msgspec.json.encode({"type": "error", "error": {"type": kind, "message": message}})


@pytest.mark.parametrize(("provider", "status", "body", "reason", "retry_class", "trips"), [
    ("openai", 429, _err("rate_limit_exceeded", "Rate limit reached for gpt-4o"), "rate_limited", "429", False),
    ("openai", 429, _err("insufficient_quota", "You exceeded your current quota"), "quota_exhausted", None, False),
    ("openai", 400, _err("context_length_exceeded", "This model's maximum context length is 128000 tokens"),
     "context_length_exceeded", None, False),
    ("openai", 400, _err("content_policy_violation", "rejected by our safety system"),
     "content_policy_violation", None, False),
    ("openai", 401, _err("invalid_api_key", "Incorrect API key provided"), "auth", None, False),
    ("openai", 503, _err("server_error", "The server is overloaded"), "server_error", "5xx", True),
    ("anthropic", 529, _anthropic_err("overloaded_error", "Overloaded"), "upstream_overloaded", "5xx", True),
    ("anthropic", 429, _anthropic_err("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
     "rate_limited", "429", False),
    ("anthropic", 400, _anthropic_err("invalid_request_error", "prompt is too long: 215000 tokens > 200000 maximum"),
     "context_length_exceeded", None, False),
    ("anthropic", 401, _anthropic_err("authentication_error", "invalid x-api-key"), "auth", None, False),
    ("anthropic", 403, _anthropic_err("permission_error", "Your API key does not have permission"), "auth", None, False),
    ("mistral", 429, b'{"message":"Requests rate limit exceeded"}', "rate_limited", "429", False),
])
def test_each_adapter_classifies_its_errors(provider, status, body, reason, retry_class, trips) -> None:
    f = get_provider(provider).classify(status, CIMultiDict(), body, 0.0)
    assert (f.reason, f.retry_class, f.trips_breaker) == (reason, retry_class, trips)


def test_an_overloaded_anthropic_target_is_retryable_and_its_own_fallback_reason() -> None:
    f = get_provider("anthropic").classify(529, CIMultiDict(), _anthropic_err("overloaded_error", "Overloaded"), 0.0)
    for name in ("overloaded", "retryable", "server_error"):
        assert f.falls_back_on(frozenset({name}))
    plain = get_provider("openai").classify(500, CIMultiDict(), b"{}", 0.0)
    assert not plain.falls_back_on(frozenset({"overloaded"}))
