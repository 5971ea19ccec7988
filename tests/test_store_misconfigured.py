"""A store that answers and refuses us is a misconfiguration (found by a black-box review of issue #17): --check
says so for every topology; a server started on it serves around it with /readyz saying why (Redis can be fixed
without a restart) and logs no traceback (one every few seconds, before); a reload onto it is rejected (the
running config stays)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import StoreMisconfigured, probe_store
from tests.support.cli_harness import CLI, assert_no_traceback, free_port, get_json
from tests.support.stores import PrivateRedis

TARGETS = "targets:\n  up: {base_url: 'http://127.0.0.1:9/v1', provider: openai}\n"


@pytest.fixture
def locked_redis():
    redis = PrivateRedis("--requirepass", "right-password-123")
    redis.start()
    yield redis
    redis.stop()


@pytest.mark.parametrize("url", [
    "redis+cluster://:wrong-password@127.0.0.1:{port}",  # every node refuses the password
    "redis+cluster://127.0.0.1:{port}",  # NOAUTH
    "redis+sentinel://127.0.0.1:{port}/mymaster/0",  # a node that is no sentinel
])
async def test_check_says_a_refusing_topology_is_misconfigured(locked_redis, url):
    with pytest.raises(StoreMisconfigured):
        await probe_store(url.format(port=locked_redis.port))


async def test_a_server_on_a_store_that_refuses_its_password_says_why_and_logs_no_traceback(locked_redis, cli: CLI):
    port = free_port()
    config = cli.write("gw.yaml", f"store: {{url: 'redis://:wrong-password@127.0.0.1:{locked_redis.port}/0'}}\n"
                                  f"server: {{port: {port}}}\n" + TARGETS)
    gw = cli.start("--config", str(config), port=port)
    await asyncio.to_thread(gw.wait_healthy)
    status, body = await asyncio.to_thread(get_json, port, "/readyz")
    assert status == 503 and "WRONGPASS" in body["reason"]
    await asyncio.sleep(6)  # the shared-state listener retried a few times meanwhile
    assert gw.terminate() == 0
    assert any("refuses the gateway" in m and "WRONGPASS" in m for m in gw.messages())
    assert not [r for r in gw.log_records() if r.get("stack")], "a traceback was logged"
    assert "wrong-password" not in gw.output
    assert_no_traceback(gw.stderr)


async def test_a_reload_onto_a_refusing_store_is_rejected_and_the_running_config_stays(locked_redis, cli: CLI):
    port = free_port()
    config = cli.write("gw.yaml", f"server: {{port: {port}}}\n" + TARGETS)
    gw = cli.start("--config", str(config), port=port)
    await asyncio.to_thread(gw.wait_healthy)
    cli.write("gw.yaml", f"store: {{url: 'redis://:wrong-password@127.0.0.1:{locked_redis.port}/0'}}\n"
                         f"server: {{port: {port}}}\n" + TARGETS)
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/admin/reload") as resp:
            body = await resp.json()
        assert resp.status >= 400 and "WRONGPASS" in str(body)
        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 200  # still the memory store it started with
    assert gw.terminate() == 0
    assert "wrong-password" not in gw.output
    assert_no_traceback(gw.stderr)
