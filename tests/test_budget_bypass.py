"""A tenant's spend budget can't be walked around, and recorded spend never passes it (issue #12 rows 1-2).

Every test runs two gateways on one Redis (on one memory store where noted). Row 1: a tenant
whose budget is spent tries every other door — the Responses API, embeddings, a trailing
slash and other spellings of the path, ``/t/``, a gzip-compressed body, an endpoint whose
cost nothing bounds. Row 2: fifty concurrent requests with ``n: 5``, or whose real prompt is
larger than the estimate, against a budget that fits ten — recorded spend stays under it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import time

import msgspec
import pytest
from aiohttp import web

from gateway.store.memory import MemoryStore
from tests.support.config import NO_5XX_RETRY, GatewayConfig
from tests.support.stores import drop, new_prefix, redis_store

KEY = {"Authorization": "Bearer acme-key-123456"}
CHAT = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hello there"}]}


def config(url: str, *, daily: float) -> GatewayConfig:
    """Tenant ``acme`` with a daily budget; ``up`` (chat and embeddings models) and ``full``, a base URL
    that already names the endpoint: POST /t/full is a chat completion."""
    cfg = GatewayConfig(url, default_target="up").tenant("acme", api_key="acme-key-123456", budget={"daily_usd": daily})
    cfg.up(models=["gpt-*", "text-embedding-*"], retry_matrix=NO_5XX_RETRY)
    return cfg.target("full", f"{url}/v1/chat/completions", provider="openai", llm={"default_model": "gpt-4o-mini"})


class Metered:
    """An OpenAI-style upstream that bills like the real one: the prompt as its UTF-8 bytes (the most
    a tokenizer can make of it) and every output token it was allowed, times n."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.headers: list[dict[str, str]] = []
        self.delay_s = 0.0
        self.usage_factor = 1  # > 1: an upstream that reports more than any request could cost
        self.report_usage = True

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("POST", "/{tail:.*}", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        self.requests.append((request.path, body))
        self.headers.append(dict(request.headers))
        await asyncio.sleep(self.delay_s)
        prompt = sum(len(_text(m["content"]).encode()) for m in body.get("messages", []))
        if isinstance(body.get("input"), str):
            prompt += len(body["input"].encode())
        output = int(float(body.get("max_tokens") or body.get("max_output_tokens") or 0)) * int(float(body.get("n") or 1))
        factor = self.usage_factor
        usage = {"prompt_tokens": prompt * factor, "completion_tokens": output * factor,
                 "input_tokens": prompt * factor, "output_tokens": output * factor}
        answer = {"id": "x", "object": "chat.completion", "model": body.get("model"),
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        if self.report_usage:
            answer["usage"] = usage
        return web.json_response(answer)


def _text(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


@pytest.fixture
async def metered(aiohttp_server):
    upstream = Metered()
    server = await aiohttp_server(upstream.app())
    upstream.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return upstream


@pytest.fixture
async def on_redis():
    stores = []

    async def make(n: int = 2):
        prefix = new_prefix()
        for _ in range(n):
            stores.append(await redis_store(prefix))
        return stores

    yield make
    if stores:
        await drop(stores[0])
        for store in stores[1:]:
            await store.close()


def spend_key() -> str:
    return f"spend:{{tenant:acme}}:d:{time.strftime('%Y%m%d', time.gmtime())}"


async def exhaust(store, daily: float) -> None:
    await store.set(spend_key(), str(daily).encode(), 86400)


async def spent(store) -> float:
    return float(await store.get(spend_key()) or 0)


# ============================================================= row 1: every door is metered


DOORS = [
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hello there"}, {}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello there"}, {}),
    ("/v1/chat/completions/", CHAT, {}),
    ("/v1/Chat/Completions", CHAT, {}),
    ("/v1/chat/%63ompletions", CHAT, {}),
    ("/v1/chat/completions;v=1", CHAT, {}),
    ("/t/up/chat/completions", CHAT, {}),
    ("/t/up/v1/chat/completions", CHAT, {"Content-Type": "text/plain"}),  # unlabelled JSON: read all the same
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hello"}, {}),
    ("/v1/messages", {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, {}),
    ("/t/full", CHAT, {}),  # the base URL names the endpoint
]


@pytest.mark.parametrize(("path", "body", "headers"), DOORS, ids=[d[0] + str(i) for i, d in enumerate(DOORS)])
async def test_a_spent_budget_is_402_through_every_billable_door(metered, gateway, on_redis, path, body, headers):
    stores = await on_redis()
    (a, _), (b, _) = [await gateway(config(metered.url, daily=0.01), store=s) for s in stores]
    await exhaust(stores[0], 0.01)  # the day's budget, all spent (through a)
    raw = json.dumps(body).encode()
    resp = await b.post(path, data=raw, headers={**KEY, "Content-Type": "application/json", **headers})
    assert resp.status == 402, await resp.text()
    assert "X-Request-Id" in resp.headers
    assert metered.requests == []


async def test_a_gzip_body_is_read_for_the_budget_and_sent_decoded(metered, gateway, on_redis):
    stores = await on_redis()
    (a, _), (b, _) = [await gateway(config(metered.url, daily=0.01), store=s) for s in stores]
    packed = gzip.compress(json.dumps(CHAT).encode())
    gz = {**KEY, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await a.post("/v1/chat/completions", data=packed, headers=gz)
    assert resp.status == 200, await resp.text()
    assert metered.requests[0][1] == CHAT  # what the budget read is what the upstream got
    await exhaust(stores[0], 0.01)
    resp = await b.post("/v1/chat/completions", data=packed, headers=gz)
    assert resp.status == 402 and len(metered.requests) == 1


async def test_a_body_the_budget_cannot_read_is_refused_not_waved_through(metered, gateway):
    client, _ = await gateway(config(metered.url, daily=1.0))
    odd = await client.post("/v1/chat/completions", data=b"\x1f\x8b not really", headers={
        **KEY, "Content-Type": "application/json", "Content-Encoding": "compress"})
    assert odd.status == 415 and (await odd.json())["error"]["code"] == "unsupported_media_type"
    broken = await client.post("/v1/chat/completions", data=b"\x1f\x8b not gzip", headers={
        **KEY, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert broken.status == 400
    text = await client.post("/t/up/chat/completions", data=b"model=gpt-4o-mini&max_tokens=5", headers={
        **KEY, "Content-Type": "application/x-www-form-urlencoded"})
    assert text.status == 400 and "JSON object" in (await text.json())["error"]["message"]
    assert metered.requests == []


async def test_an_endpoint_the_budget_cannot_bound_is_forbidden_for_a_budgeted_tenant(metered, gateway):
    """Fail closed: only endpoints the gateway meters, or knows to be free, are open to a budgeted tenant."""
    client, _ = await gateway(config(metered.url, daily=1.0))
    for path in ("/v1/images/generations", "/v1/batches", "/v1/audio/speech", "/v1/messages/batches",
                 "/v1/responses/compact", "/v1/threads/t1/runs", "/v1/conversations/c1/runs",
                 "/v1/chat/completions/x/y", "/v1/some/new/endpoint"):
        resp = await client.post(path, json={"model": "gpt-4o-mini", "prompt": "a cat"}, headers=KEY)
        assert resp.status == 403, path
        assert "not one whose cost the gateway can bound" in (await resp.json())["error"]["message"]
    free = ["/v1/vector_stores", "/v1/conversations", "/v1/chat/completions/chatcmpl-1"]  # a stored one's metadata
    for path in free:
        resp = await client.post(path, json={"name": "docs"}, headers=KEY)
        assert resp.status == 200, path  # costs nothing per call: not the budget's business
    assert [p for p, _ in metered.requests] == free


async def test_a_request_without_an_output_limit_gets_one_written_into_it(metered, gateway):
    client, _ = await gateway(config(metered.url, daily=1.0))
    await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"}, headers=KEY)
    await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"}]}, headers=KEY)
    await client.post("/v1/chat/completions", json={"model": "o3-mini", "messages": [
        {"role": "user", "content": "hi"}]}, headers=KEY)
    sent = [body for _, body in metered.requests]
    assert sent[0]["max_output_tokens"] == 4096
    assert sent[1]["max_tokens"] == 4096
    assert sent[2]["max_completion_tokens"] == 4096 and "max_tokens" not in sent[2]  # what o-series accept


# ============================================================= row 2: recorded spend never passes the budget


def bound(body: dict, n: int = 1) -> float:
    """What the gateway reserves for ``body`` at gpt-4o-mini's prices: a token per body byte + framing,
    and all of max_tokens × n."""
    return ((len(json.dumps(body).encode()) + 4 * len(body["messages"]) + 3) * 0.15
            + body["max_tokens"] * n * 0.60) / 1e6


async def burst(clients, body: dict, n: int) -> list[int]:
    async def one(i: int) -> int:
        async with clients[i % len(clients)].post("/v1/chat/completions", json=body, headers=KEY) as resp:
            await resp.read()
            return resp.status

    return await asyncio.gather(*(one(i) for i in range(n)))


async def until_settled(store, admitted: int, cost: float) -> float:
    for _ in range(300):
        now = await spent(store)
        if now == pytest.approx(admitted * cost, rel=1e-6):
            return now
        await asyncio.sleep(0.01)
    return await spent(store)


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_fifty_concurrent_requests_with_n_5_never_record_more_than_the_budget(
        metered, gateway, on_redis, backend):
    body = {**CHAT, "n": 5}
    daily = bound(body, 5) * 10.5  # room for ten
    stores = await on_redis() if backend == "redis" else [MemoryStore()] * 2
    clients = [(await gateway(config(metered.url, daily=daily), store=s))[0] for s in stores]
    metered.delay_s = 0.3  # all fifty in flight together
    statuses = await burst(clients, body, 50)
    assert statuses.count(200) == 10 and statuses.count(402) == 40
    real = (len(CHAT["messages"][0]["content"]) * 0.15 + 100 * 5 * 0.60) / 1e6  # what the upstream billed each
    recorded = await until_settled(stores[0], 10, real)
    assert recorded == pytest.approx(10 * real, rel=1e-6) and recorded <= daily


async def test_prompts_larger_than_their_estimate_never_record_more_than_the_budget(metered, gateway, on_redis):
    """Multi-byte text: 4,000 CJK characters are ≈ 1,000 tokens by the chars/4 estimate, and up to
    12,000 bytes — what the upstream bills here."""
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "漢" * 4000}]}
    daily = bound(body) * 10.5
    stores = await on_redis()
    clients = [(await gateway(config(metered.url, daily=daily), store=s))[0] for s in stores]
    metered.delay_s = 0.3
    statuses = await burst(clients, body, 50)
    assert statuses.count(200) == 10
    real = (12_000 * 0.15 + 10 * 0.60) / 1e6
    recorded = await until_settled(stores[0], 10, real)
    assert recorded <= daily and recorded == pytest.approx(10 * real, rel=1e-6)


async def test_an_upstream_that_reports_more_than_any_request_could_cost_is_charged_its_reservation(
        metered, gateway, on_redis):
    stores = await on_redis()
    daily = bound(CHAT) * 3.5
    pairs = [await gateway(config(metered.url, daily=daily), store=s) for s in stores]
    clients = [client for client, _ in pairs]
    metered.usage_factor = 1000
    statuses = await burst(clients, CHAT, 6)
    assert statuses.count(200) == 3  # three reservations fit
    recorded = await until_settled(stores[0], 3, bound(CHAT))
    assert recorded <= daily
    # every record of those answers says that same charge, not the reported cost (it used to be 1000× the budget)
    charged = sum(line["cost_usd"] for _, logs in pairs for line in logs if line.get("cost_usd"))
    assert charged == pytest.approx(recorded, rel=1e-6)


async def test_a_responses_answer_is_charged_its_real_usage(metered, gateway, on_redis):
    stores = await on_redis()
    (a, _), _ = [await gateway(config(metered.url, daily=1.0), store=s) for s in stores]
    resp = await a.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hello there", "max_output_tokens": 50},
                        headers=KEY)
    assert resp.status == 200
    real = (len("hello there") * 0.15 + 50 * 0.60) / 1e6  # usage.input_tokens / output_tokens
    assert await until_settled(stores[0], 1, real) == pytest.approx(real, rel=1e-6)


async def test_an_answer_whose_cost_cannot_be_read_is_charged_its_reservation(metered, gateway, on_redis):
    """No usage in the answer: not free — the budget is charged the most it could have cost."""
    stores = await on_redis()
    (a, _), _ = [await gateway(config(metered.url, daily=1.0), store=s) for s in stores]
    metered.report_usage = False
    resp = await a.post("/v1/chat/completions", json=CHAT, headers=KEY)
    assert resp.status == 200
    assert await until_settled(stores[0], 1, bound(CHAT)) == pytest.approx(bound(CHAT), rel=1e-6)


async def test_counts_sent_as_strings_or_floats_are_reserved_as_the_upstream_reads_them(metered, gateway):
    """n: "5" (or 5.0) is five answers to an upstream that coerces like pydantic: reserved as five."""
    body = {**CHAT, "n": "5"}
    client, _ = await gateway(config(metered.url, daily=bound(CHAT) * 2))  # room for two single answers
    resp = await client.post("/t/up/chat/completions", data=json.dumps(body),
                             headers={**KEY, "Content-Type": "text/plain"})  # unlabelled: the router does not read it
    assert resp.status == 402 and metered.requests == []
    resp = await client.post("/v1/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "x",
                                                      "max_tokens": 100, "best_of": 5.0}, headers=KEY)
    assert resp.status == 402 and metered.requests == []


async def test_an_image_in_a_tool_output_and_a_server_side_tool_are_reserved(metered, gateway):
    """An image returned by a tool is billed like any image; a web search pulls pages into the prompt
    that the body does not hold: both bounded (the latter by the model's context window)."""
    plain = {"model": "gpt-4o-mini", "input": [{"type": "function_call_output", "call_id": "c", "output": "sunny"}],
             "max_output_tokens": 10}
    image = {**plain, "input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_image", "image_url": "https://example.com/chart.png"}]}]}
    search = {"model": "gpt-4o-mini", "input": "news", "tools": [{"type": "web_search"}], "max_output_tokens": 10}
    client, _ = await gateway(config(metered.url, daily=0.0005))  # fits the plain request, not 6,000 image tokens
    assert (await client.post("/v1/responses", json=plain, headers=KEY)).status == 200
    assert (await client.post("/v1/responses", json=image, headers=KEY)).status == 402
    assert (await client.post("/v1/responses", json=search, headers=KEY)).status == 402
    assert len(metered.requests) == 1


@pytest.mark.parametrize("dialect", ["chat", "messages", "responses"])
async def test_an_inline_image_is_reserved_as_an_image_not_once_more_as_text(metered, gateway, dialect):
    """A 300 KB base64 photo is one image (at most 6,000 tokens), not 300,000 tokens of text: a budget
    that fits the image and the text is not refused for the photo's bytes."""
    data = base64.b64encode(os.urandom(225_000)).decode()
    if dialect == "chat":
        path, model = "/v1/chat/completions", "gpt-4o"
        content = [{"type": "text", "text": "what is this?"},
                   {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}", "detail": "high"}}]
        body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": content}]}
    elif dialect == "messages":
        path, model = "/v1/messages", "claude-3-5-haiku-latest"
        content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                   {"type": "text", "text": "what is this?"}]
        body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": content}]}
    else:
        path, model = "/v1/responses", "gpt-4o"
        body = {"model": model, "max_output_tokens": 100, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{data}"}]}]}
    price_in, price_out = (0.80, 4.0) if dialect == "messages" else (2.50, 10.0)
    fits = ((1000 + 6000) * price_in + 100 * price_out) / 1e6  # the text and framing, one image, the answer
    client, _ = await gateway(config(metered.url, daily=fits).claude())
    resp = await client.post(path, json=body, headers={**KEY, "anthropic-version": "2023-06-01"})
    assert resp.status == 200, await resp.text()
    assert len(metered.requests) == 1


async def test_priority_processing_is_reserved_at_its_price(metered, gateway):
    body = {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 100}
    one = ((len(json.dumps(body)) + 7) * 0.15 + 100 * 0.60) / 1e6
    client, _ = await gateway(config(metered.url, daily=one * 1.5))
    resp = await client.post("/v1/responses", json={**body, "service_tier": "priority"}, headers=KEY)
    assert resp.status == 402 and metered.requests == []


async def test_negative_usage_from_an_upstream_refills_no_budget(metered, gateway, on_redis):
    stores = await on_redis()
    (a, _), _ = [await gateway(config(metered.url, daily=1.0), store=s) for s in stores]
    metered.usage_factor = -1000
    assert (await a.post("/v1/chat/completions", json=CHAT, headers=KEY)).status == 200
    await asyncio.sleep(0.1)
    assert await spent(stores[0]) == 0.0  # not below zero: nothing to spend twice


async def test_priority_processing_is_settled_at_its_price_too(metered, gateway, on_redis):
    stores = await on_redis()
    (a, _), _ = [await gateway(config(metered.url, daily=1.0), store=s) for s in stores]
    body = {**CHAT, "service_tier": "priority"}
    assert (await a.post("/v1/chat/completions", json=body, headers=KEY)).status == 200
    real = (len(CHAT["messages"][0]["content"]) * 0.15 + 100 * 0.60) / 1e6 * 2  # the usage, at twice the rate
    assert await until_settled(stores[0], 1, real) == pytest.approx(real, rel=1e-6)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_another_method_or_a_method_override_does_not_skip_the_budget(metered, gateway, on_redis, method):
    stores = await on_redis()
    (a, _), _ = [await gateway(config(metered.url, daily=0.01), store=s) for s in stores]
    await exhaust(stores[0], 0.01)
    resp = await a.request(method, "/v1/chat/completions", json=CHAT,
                           headers={**KEY, "X-HTTP-Method-Override": "POST"})
    assert resp.status == 402 and metered.requests == []
    await stores[0].set(spend_key(), b"0", 86400)
    free = await a.post("/v1/chat/completions", json=CHAT, headers={**KEY, "X-HTTP-Method-Override": "PUT"})
    assert free.status == 200
    assert "X-HTTP-Method-Override" not in metered.headers[-1]  # no upstream reads a PUT as a POST behind the budget


def test_a_budgeted_tenant_that_can_reach_a_plain_http_target_is_warned_about() -> None:
    from gateway.config import config_warnings, parse_config

    cfg = parse_config("""
tenants:
  - {name: metered, api_key: metered-key-1234, budget: {daily_usd: 1}}
  - {name: fenced, api_key: fenced-key-12345, budget: {daily_usd: 1}, allowed_targets: [llm]}
targets:
  llm: {base_url: "https://api.openai.com/v1"}
  groq: {base_url: "https://api.groq.com/openai/v1"}
""")
    warned = [w for w in config_warnings(cfg) if "spend budget" in w]
    assert len(warned) == 1 and "(metered)" in warned[0] and "groq" in warned[0] and "provider:" in warned[0]
