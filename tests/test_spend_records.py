"""What a request is charged and what every record of it says agree (docs/guides/budget-control.md): its access
line's tokens and cost, its usage row, the cost metric and ``X-ReliAPI-Cost-USD`` say what the spend budget was
charged — also where the cost could not be read and the charge is a bound. A client that leaves while nothing
billable is on its way is charged nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from policies.usage import PROMPT_FRAMING, day_of, usage_key
from tests.support.clock import FakeClock
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault
from tests.support.stores import PrivateRedis, new_prefix
from tests.test_spend_budget import ACTUAL, KEY, RESERVED, chat, config, settled, spend_key

PRICE_IN, PRICE_OUT = 0.15 / 1e6, 0.60 / 1e6  # gpt-4o-mini, per token


async def row(store: MemoryStore) -> dict:
    for _ in range(200):  # rows are written once a second, in the background
        found = await store.hgetall(usage_key(day_of(time.time()), "acme", None, "up", "gpt-4o-mini"))
        if found:
            return found
        await asyncio.sleep(0.02)
    return {}


def cost_metric(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("reliapi_llm_cost_usd_total{") and 'tenant="acme"' in line)


async def test_a_stream_cut_before_its_usage_report_is_charged_and_recorded_at_the_same_bound(fake, gateway):
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, daily=1.0), store=store)
    fake.plan(Fault(chunks=6, cut_after=3))
    body = chat(stream=True)
    async with client.post("/v1/chat/completions", json=body, headers=KEY) as resp:
        await resp.read()
    line = logs[-1]
    prompt, completion = line["prompt_tokens"], line["completion_tokens"]
    assert prompt >= len(body["messages"][0]["content"]) + PROMPT_FRAMING  # a token per byte: a bound
    assert completion > 0
    charged = prompt * PRICE_IN + completion * PRICE_OUT
    assert line["cost_usd"] == pytest.approx(charged)
    await settled(store, charged)
    assert (await row(store))["cost_usd"] == pytest.approx(charged)
    assert cost_metric(await (await client.get("/metrics")).text()) == pytest.approx(charged)


async def test_an_answer_without_usage_is_charged_its_reservation_and_every_record_says_so(aiohttp_server, gateway):
    async def no_usage(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "hi"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", no_usage)
    up = await aiohttp_server(app)
    store = MemoryStore()
    client, logs = await gateway(config(str(up.make_url("")).rstrip("/"), daily=1.0), store=store)
    resp = await client.post("/v1/chat/completions", json=chat(), headers=KEY)
    assert resp.status == 200
    assert float(resp.headers["X-ReliAPI-Cost-USD"]) == pytest.approx(RESERVED)
    assert logs[-1]["cost_usd"] == pytest.approx(RESERVED)
    await settled(store, RESERVED)
    found = await row(store)
    assert found["requests"] == 1 and found["cost_usd"] == pytest.approx(RESERVED)  # the answer has its row


class HeldClock(FakeClock):
    """A fake clock whose sleeps (a retry's backoff) last until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = asyncio.Event()

    async def sleep(self, seconds: float) -> None:  # type: ignore[override]
        self.sleeps.append(seconds)
        await self.hold.wait()


async def leave_when(client, condition) -> None:
    """Send the request; the client goes away once ``condition()`` holds."""
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(), headers=KEY))
    for _ in range(500):
        if condition():
            break
        await asyncio.sleep(0.01)
    assert condition()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_client_that_leaves_during_a_retry_wait_after_an_error_answer_is_charged_nothing(fake, gateway):
    clock = HeldClock()
    store = MemoryStore(clock=clock.time)
    cfg = GatewayConfig(fake.url, default_target="up")
    cfg.tenant("acme", api_key="acme-key-123456", budget={"daily_usd": 1.0, "monthly_usd": 100})
    cfg.up(retry_matrix={"5xx": {"attempts": 2, "base_s": 3, "max_s": 3}})
    client, logs = await gateway(cfg, clock=clock, store=store)
    fake.plan(Fault(status=500), Fault(status=500), Fault(status=500))
    await leave_when(client, lambda: bool(clock.sleeps))  # the 500 came back; the client leaves in the backoff
    for _ in range(100):
        if logs and logs[-1]["outcome"] == "cancelled":
            break
        await asyncio.sleep(0.01)
    assert len(fake.requests) == 1 and logs[-1]["cost_usd"] is None
    await settled(store, 0.0)
    clock.hold.set()


async def test_a_client_that_leaves_while_its_request_is_upstream_is_charged_its_reservation(fake, gateway):
    store = MemoryStore()
    client, logs = await gateway(config(fake.url, daily=1.0), store=store)
    fake.plan(Fault(delay_ms=3000))
    await leave_when(client, lambda: len(fake.requests) == 1)  # the upstream has it and may bill it
    await settled(store, RESERVED)
    for _ in range(100):
        if logs and logs[-1]["outcome"] == "cancelled":
            break
        await asyncio.sleep(0.01)
    assert logs[-1]["cost_usd"] == pytest.approx(RESERVED)  # the line says the charge


async def test_a_settlement_the_store_could_not_take_is_given_back_once_it_is_back(fake, gateway, tmp_path):
    """Redis restarts (from its append-only file) while a request runs: the give-back of what the answer did not
    cost waits for it, rather than leave the tenant charged its whole reservation for good."""
    redis = PrivateRedis("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    redis.start()
    prefix = new_prefix()
    store = RedisStore(redis.url, key_prefix=prefix)
    try:
        cfg = config(fake.url, daily=1.0, store={"url": redis.url, "key_prefix": prefix})
        client, logs = await gateway(cfg)
        fake.plan(Fault(delay_ms=400))
        task = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(), headers=KEY))
        for _ in range(300):
            if fake.requests:
                break
            await asyncio.sleep(0.01)
        assert float(await store.get(spend_key(time.time())) or 0) == pytest.approx(RESERVED)  # reserved
        await store.close()
        await asyncio.to_thread(redis.stop)  # down while the answer comes: the give-back cannot be written
        resp = await task
        assert resp.status == 200 and logs[-1]["cost_usd"] == pytest.approx(ACTUAL)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis.start)  # back, with what it had
        for _ in range(300):
            if float(await store.get(spend_key(time.time())) or 0) == pytest.approx(ACTUAL):
                break
            await asyncio.sleep(0.05)
        assert float(await store.get(spend_key(time.time())) or 0) == pytest.approx(ACTUAL)
    finally:
        await store.close()
        redis.stop()
