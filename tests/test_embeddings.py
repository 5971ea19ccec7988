"""``POST /v1/embeddings`` through the gateway, driven with the real openai SDK: routed by model, usage and
cost read from the answer (embeddings have no completion tokens), a tenant's spend budget reserved from the
``input`` and settled with the real cost, answers cached (the key holds input, model, dimensions and
encoding_format), and a bad ``input`` a 400 in OpenAI's dialect naming the field, never sent upstream."""

from __future__ import annotations

import aiohttp
import msgspec
import openai
import pytest

from tests.support.config import NO_RETRY, llm_config
from tests.support.fakes import Fault

ENV = {"UP_KEY": "sk-upstream-openai-123456", "CLAUDE_KEY": "sk-ant-upstream-654321", "MISTRAL_KEY": "mk-123456"}
EMBEDDING_MODELS = ["gpt-*", "text-embedding-*"]


def config(fake, mistral=None, **up):
    cfg = llm_config(fake.url).up(models=EMBEDDING_MODELS, retry_matrix=NO_RETRY, **up)
    if mistral is not None:
        cfg.target("mis", f"{mistral.url}/v1", provider="mistral", models=["mistral-*", "codestral-*"],
                   auth={"type": "bearer_env", "env_var": "MISTRAL_KEY"})
    return cfg


@pytest.fixture
async def sdk():
    made = []

    def make(client, key="sk-client-key"):
        c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def test_usage_and_cost_of_an_embeddings_call_are_logged(fake, gateway, sdk):
    client, logs = await gateway(config(fake), env=ENV)
    raw = await sdk(client).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["hello big world", "foo bar"])
    answer = raw.parse()
    assert [len(d.embedding) for d in answer.data] == [8, 8]  # the SDK asked for base64 and decoded it
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 5
    assert raw.headers["X-ReliAPI-Target"] == "up"
    (seen,) = fake.requests
    assert seen.path_qs == "/v1/embeddings"
    assert seen.json()["input"] == ["hello big world", "foo bar"]
    assert raw.http_response.content == await _upstream_answer(fake, seen)  # byte for byte
    line = logs[-1]
    assert line["outcome"] == "ok" and line["model"] == "text-embedding-3-small"
    assert line["prompt_tokens"] == 5 and line["completion_tokens"] == 0
    assert line["cost_usd"] == pytest.approx(5 * 0.02 / 1e6)


async def test_token_arrays_and_the_large_model_are_priced(fake, gateway, sdk):
    client, logs = await gateway(config(fake), env=ENV)
    answer = await sdk(client).embeddings.create(model="text-embedding-3-large", input=[[1, 2, 3], [4, 5]],
                                                 dimensions=4, encoding_format="float")
    assert [len(d.embedding) for d in answer.data] == [4, 4]
    assert logs[-1]["prompt_tokens"] == 5 and logs[-1]["cost_usd"] == pytest.approx(5 * 0.13 / 1e6)
    answer = await sdk(client).embeddings.create(model="text-embedding-ada-002", input="one two three four")
    assert logs[-1]["prompt_tokens"] == 4 and logs[-1]["cost_usd"] == pytest.approx(4 * 0.10 / 1e6)


async def test_embeddings_are_routed_by_model(fake, upstreams, gateway, sdk):
    mistral = await upstreams()
    client, logs = await gateway(config(fake, mistral), env=ENV)
    raw = await sdk(client).embeddings.with_raw_response.create(model="mistral-embed", input="bonjour le monde")
    assert raw.headers["X-ReliAPI-Target"] == "mis"
    assert not fake.requests
    (seen,) = mistral.requests
    assert seen.path_qs == "/v1/embeddings" and seen.headers["Authorization"] == "Bearer mk-123456"
    assert logs[-1]["target"] == "mis" and logs[-1]["prompt_tokens"] == 3
    assert logs[-1]["cost_usd"] == pytest.approx(3 * 0.10 / 1e6)
    raw = await sdk(client).embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    assert raw.headers["X-ReliAPI-Target"] == "up" and len(fake.requests) == 1
    await sdk(client).embeddings.create(model="codestral-embed", input="def f(): pass")  # not codestral's price
    assert logs[-1]["target"] == "mis" and logs[-1]["cost_usd"] == pytest.approx(3 * 0.15 / 1e6)


async def test_a_tenant_budget_reserves_from_the_input_and_settles_with_the_real_cost(fake, gateway, sdk):
    # text-embedding-3-small at $0.02/1M: the reservation is the body at a token per byte (about 840 bytes:
    # $0.0000168); the answer reports 800 tokens ($0.000016); the budget holds $0.000025.
    cfg = config(fake).tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 0.000025})
    client, logs = await gateway(cfg, env=ENV)
    text = "word " * 160
    fake.plan(Fault(usage={"prompt_tokens": 800, "total_tokens": 800}))
    await sdk(client, "acme-key-123456").embeddings.create(model="text-embedding-3-small", input=text)
    assert logs[-1]["cost_usd"] == pytest.approx(800 * 0.02 / 1e6)
    with pytest.raises(openai.APIStatusError) as info:  # $0.000009 left: the same call may cost more
        await sdk(client, "acme-key-123456").embeddings.create(model="text-embedding-3-small", input=text)
    assert info.value.status_code == 402
    assert info.value.body["code"] == "budget_exhausted"
    assert "has $0.000009 of its daily budget" in info.value.body["message"]
    assert len(fake.requests) == 1  # never sent
    small = await sdk(client, "acme-key-123456").embeddings.create(model="text-embedding-3-small", input="hi")
    assert small.usage.prompt_tokens == 1 and len(fake.requests) == 2  # a small one still fits


async def test_one_embeddings_call_larger_than_the_whole_budget_is_refused(fake, gateway, sdk):
    cfg = config(fake).tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 0.000001})
    client, _ = await gateway(cfg, env=ENV)
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(client, "acme-key-123456").embeddings.create(model="text-embedding-3-small", input=["word " * 20] * 10)
    assert info.value.status_code == 402 and "more than the whole daily budget" in info.value.body["message"]
    assert "a shorter input" in info.value.body["message"] and not fake.requests
    assert "output limit" not in info.value.body["message"]  # an embedding has none


async def test_repeated_embeddings_are_served_from_the_cache(fake, gateway, sdk):
    client, logs = await gateway(config(fake, cache={"ttl_s": 60}), env=ENV)
    api = sdk(client).embeddings
    first = await api.with_raw_response.create(model="text-embedding-3-small", input=["a b", "c"])
    again = await api.with_raw_response.create(model="text-embedding-3-small", input=["a b", "c"])
    assert first.headers["X-Cache"] == "MISS" and again.headers["X-Cache"] == "HIT"
    assert again.http_response.content == first.http_response.content
    assert len(fake.requests) == 1
    assert logs[-1]["cache_hit"] is True and not logs[-1]["cost_usd"]  # a hit costs nothing
    # every field that changes the answer is in the key
    for changed in ({"input": ["a b", "d"]}, {"model": "text-embedding-3-large"}, {"dimensions": 4},
                    {"encoding_format": "float"}):
        args = {"model": "text-embedding-3-small", "input": ["a b", "c"], **changed}
        raw = await api.with_raw_response.create(**args)
        assert raw.headers["X-Cache"] == "MISS", changed
    assert len(fake.requests) == 5


@pytest.mark.parametrize(("given", "param"), [
    (123, "input"), ("", "input"), ([], "input"), ([""], "input[0]"), ([[]], "input[0]"), ([1, "a"], "input"),
    ([True], "input[0]"), ([-1], "input[0]"), ({"text": "hi"}, "input"),
])
async def test_bad_input_is_a_400_naming_the_field(fake, gateway, sdk, given, param):
    client, logs = await gateway(config(fake), env=ENV)
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(client).embeddings.create(model="text-embedding-3-small", input=given, encoding_format="float")
    body = info.value.body
    assert body["param"] == param and body["code"] == "invalid_request"
    assert "input must be a non-empty string" in body["message"]
    assert not fake.requests
    assert logs[-1]["status"] == 400


async def test_bad_input_on_the_explicit_target_path_too(fake, gateway):
    client, _ = await gateway(config(fake), env=ENV)
    resp = await client.post("/t/up/embeddings", json={"model": "text-embedding-3-small", "input": []})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == "invalid_request" and "input" in body["error"]["message"]
    assert not fake.requests


async def _upstream_answer(fake, seen) -> bytes:
    """What the fake answers to the request it saw, fetched again straight from it."""
    async with aiohttp.ClientSession() as session, session.post(
            f"{fake.url}/v1/embeddings", data=seen.body, headers={"Content-Type": "application/json"}) as resp:
        body = await resp.read()
    fake.requests.pop()
    assert msgspec.json.decode(body)["usage"]
    return body


async def test_a_hard_cap_counts_token_ids_not_their_digits(fake, gateway, sdk):
    # $0.000001 at $0.02/1M holds 50 tokens: 60 one-digit token ids are 60 tokens (121 characters of JSON)
    client, _ = await gateway(config(fake, llm={"hard_cost_cap_usd": 0.000001}), env=ENV)
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(client).embeddings.create(model="text-embedding-3-small", input=[7] * 60)
    assert info.value.body["code"] == "budget_exceeded" and not fake.requests
    answer = await sdk(client).embeddings.create(model="text-embedding-3-small", input=[7] * 40)
    assert answer.usage.prompt_tokens == 40 and len(fake.requests) == 1


async def test_an_embeddings_request_without_input_is_a_400_unless_it_has_a_prompt(fake, gateway):
    """Found by a black-box review: a missing input went upstream (and an upstream 500 on it, retried, could
    open the circuit); a legacy body with ``prompt`` (Ollama's api/embeddings) still goes."""
    client, _ = await gateway(config(fake), env=ENV)
    resp = await client.post("/v1/embeddings", json={"model": "text-embedding-3-small"})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "input"
    assert fake.requests == []
    await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "prompt": "hello"})
    assert len(fake.requests) == 1 and fake.requests[0].json()["prompt"] == "hello"  # the upstream decides
