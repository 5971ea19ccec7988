"""``GET /readyz`` (SPEC §2, §8): 200 only when the config is loaded and the store answers;
otherwise 503 with a reason naming the store — also when the store hangs rather than
refuses, within the probe's bound (a load balancer's probe must never hang with it)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.edge.probes import READY_STORE_TIMEOUT_S
from gateway.store.memory import MemoryStore
from tests.support.cli_harness import free_port
from tests.support.clock import FakeClock
from tests.support.config import GatewayConfig
from tests.support.stores import REDIS_URL, drop, new_prefix, redis_store

PROBE = aiohttp.ClientTimeout(total=10 * READY_STORE_TIMEOUT_S + 5)  # far past the bound: a hang fails the test


def config(store_url: str | None = None) -> GatewayConfig:
    """Targets ``b`` and ``a`` (nothing listens there); with ``store_url``, a store under a fresh prefix."""
    cfg = GatewayConfig()
    if store_url:
        cfg.store(url=store_url, key_prefix=new_prefix())
    return cfg.target("b", "http://127.0.0.1:9/b").target("a", "http://127.0.0.1:9/a")


async def readyz(client) -> tuple[int, dict]:
    async with client.get("/readyz", timeout=PROBE) as resp:
        return resp.status, await resp.json()


async def test_ready_with_the_memory_store_and_a_loaded_config(gateway):
    client, _ = await gateway(config())
    status, body = await readyz(client)
    assert status == 200
    assert body == {"status": "ready", "config": "loaded", "store": "memory", "targets": ["a", "b"],
                    "circuits": {"a": "closed", "b": "closed"}}


async def test_ready_with_a_redis_store_that_answers(gateway):
    store = await redis_store(new_prefix())  # skips (fails in CI) without Redis
    try:
        client, _ = await gateway(config(REDIS_URL), store=store)
        status, body = await readyz(client)
        assert status == 200 and body["store"] == "redis"
    finally:
        await drop(store)


async def test_a_redis_store_nobody_listens_on_is_503_naming_the_store(gateway):
    port = free_port()  # nothing listens there: connections are refused
    client, _ = await gateway(config(f"redis://:hunter2-password@127.0.0.1:{port}/0"))
    status, body = await readyz(client)
    assert status == 503 and body["status"] == "not_ready"
    assert body["reason"].startswith("store unavailable") and f"127.0.0.1:{port}" in body["reason"]
    assert body["store"] == "redis" and body["config"] == "loaded"
    assert "hunter2-password" not in str(body)  # the URL is shown with its password masked
    assert (await client.get("/healthz")).status == 200  # alive, just not ready


async def test_a_redis_that_accepts_and_never_answers_is_503_not_a_hang(gateway):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection, answer nothing, until the client leaves
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client, _ = await gateway(config(f"redis://127.0.0.1:{port}/0"))
        status, body = await readyz(client)
        assert status == 503 and f"127.0.0.1:{port}" in body["reason"], body
    finally:
        server.close()


class HangingStore(MemoryStore):
    """A store whose ping, once ``hang`` is set, never returns (no timeout of its own)."""

    hang = False

    async def ping(self) -> None:
        if self.hang:
            await asyncio.Event().wait()


async def test_a_store_that_hangs_is_cut_off_by_the_probe_bound(gateway):
    store = HangingStore()
    client, _ = await gateway(config(), store=store)
    assert (await readyz(client))[0] == 200
    store.hang = True
    status, body = await readyz(client)
    assert status == 503 and body["status"] == "not_ready"
    assert body["reason"] == f"store unavailable (memory://): no answer within {READY_STORE_TIMEOUT_S:g} s"
    store.hang = False
    assert (await readyz(client))[0] == 200  # and ready again once it answers


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/health", "/readyz", "/metrics", "/", "/status.json"])
async def test_every_gateway_answer_carries_a_request_id(gateway, path):
    """Seed 003: "all responses include" X-Request-Id — the fixed endpoints too, the client's own when it is sane."""
    client, _ = await gateway(GatewayConfig("http://127.0.0.1:9").rest())
    resp = await client.get(path)
    assert resp.status == 200 and resp.headers["X-Request-Id"].startswith("req_")
    resp = await client.get(path, headers={"X-Request-Id": "trace-42"})
    assert resp.headers["X-Request-Id"] == "trace-42"


async def test_not_ready_when_no_target_can_serve(gateway):
    """Each target's circuit is listed; when every one is open, nothing can be served: 503 saying so."""
    cfg = config().each(circuit={"error_threshold": 1, "cooldown_s": 600}, retry_matrix={"net": {"attempts": 0}})
    client, _ = await gateway(cfg)
    assert (await client.get("/t/a/x")).status == 502  # nothing listens there: the circuit opens
    status, body = await readyz(client)
    assert status == 200 and body["circuits"] == {"a": "open", "b": "closed"}
    assert (await client.get("/t/b/x")).status == 502
    status, body = await readyz(client)
    assert status == 503 and body["circuits"] == {"a": "open", "b": "open"}
    assert body["status"] == "not_ready" and "circuit" in body["reason"]



async def test_once_the_cooldown_is_over_a_circuit_is_half_open_and_the_gateway_ready_again(gateway):
    """A load balancer that stopped sending traffic on /readyz's 503 sends no request to move the circuit on: once
    the cooldown is over the circuit lets a probe through, and /readyz, the metric and the admin API say so."""
    clock = FakeClock()
    cfg = config().each(circuit={"error_threshold": 1, "cooldown_s": 30}, retry_matrix={"net": {"attempts": 0}})
    client, _ = await gateway(cfg, clock=clock)
    assert (await client.get("/t/a/x")).status == 502
    assert (await client.get("/t/b/x")).status == 502
    assert (await readyz(client))[0] == 503
    clock.advance(31)  # nothing was sent meanwhile
    status, body = await readyz(client)
    assert status == 200 and body["circuits"] == {"a": "half_open", "b": "half_open"}
    metrics = await (await client.get("/metrics")).text()
    assert 'reliapi_circuit_breaker_state{target="a"} 2' in metrics
    view = await (await client.get("/admin/circuits")).json()
    assert {c["target"]: c["state"] for c in view["data"]["circuits"]} == {"a": "half_open", "b": "half_open"}
