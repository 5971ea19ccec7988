"""The flights' store log is a list of tagged items; its wire form is what instances of one fleet
(possibly of different versions during a rollout) read from each other."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest

from gateway.errors import UpstreamTimeout
from gateway.state.flightlog import (
    ABANDONED,
    END,
    Body,
    Broken,
    Chunk,
    Failed,
    Head,
    decode_item,
    encode,
    failed,
    rebuild_error,
)
from tests.support.cli_harness import free_port
from tests.support.config import GatewayConfig
from tests.support.fakes import Fault
from tests.support.stores import REDIS_URL, drop, new_prefix, redis_store


@pytest.mark.parametrize(("item", "wire"), [
    (Head(200, [("content-type", "text/event-stream")], True), ["h", 200, [["content-type", "text/event-stream"]], True]),
    (Body(b"{}"), ["b", b"{}"]),
    (Chunk(b"data: x\n\n"), ["c", b"data: x\n\n"]),
    (END, ["e"]),
    (Broken("stream_broken", "cut", False), ["x", "stream_broken", "cut", False]),
    (Failed("upstream_timeout", "slow", 2.0, "openai", None), ["g", "upstream_timeout", "slow", 2.0, "openai", None]),
    (ABANDONED, ["a"]),
])
def test_each_item_is_a_tagged_array_on_the_wire(item, wire) -> None:
    assert msgspec.msgpack.decode(encode(item)) == wire
    assert decode_item(msgspec.msgpack.encode(wire)) == item


def test_a_failed_run_is_rebuilt_as_the_same_error_for_a_follower() -> None:
    err = rebuild_error(decode_item(encode(failed(UpstreamTimeout("slow", target="openai", retry_after=3.0)))))
    assert isinstance(err, UpstreamTimeout)
    assert (err.message, err.target, err.retry_after) == ("slow", "openai", 3.0)


def test_an_unknown_item_is_refused_not_misread() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_item(msgspec.msgpack.encode(["z", 1]))


@pytest.fixture
async def redis_prefix():
    store = await redis_store(new_prefix())  # skips (or fails in CI) when Redis is down
    yield store._prefix.rstrip(":")
    await drop(store)


async def test_a_leaders_error_reaches_a_follower_on_another_instance_as_itself(cli, fake, redis_prefix):
    """A duplicate waiting on another instance gets the leader's own error (504 upstream_timeout), not a 500:
    rebuilding the error from the log used to raise TypeError (object.__new__ on an exception class)."""
    cfg = (GatewayConfig(fake.url, default_target="up").store(url=REDIS_URL, key_prefix=redis_prefix)
           .up(auth={"type": "none"}, models=None, timeout_ms=600, idempotency={"wait_s": 10}))
    gateways = []
    for name in ("one.yaml", "two.yaml"):
        cli.write(name, cfg)
        port = free_port()
        gw = cli.start("--config", name, "--port", str(port), port=port)
        await asyncio.to_thread(gw.wait_healthy)
        gateways.append(gw)
    fake.plan(Fault(delay_ms=3000))
    headers = {"Idempotency-Key": "order-7", "Cache-Control": "no-store"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as http:
        async def call(gw, after_s: float):
            await asyncio.sleep(after_s)  # the first instance leads, the second follows through the store
            async with http.post(f"http://127.0.0.1:{gw.port}/v1/chat/completions", json=chat, headers=headers) as r:
                return r.status, (await r.json())["error"]["code"]

        results = await asyncio.gather(call(gateways[0], 0), call(gateways[1], 0.2))
    assert results == [(504, "upstream_timeout"), (504, "upstream_timeout")]
    assert len(fake.requests) == 1
