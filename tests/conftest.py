"""Shared fixtures: a real fake upstream on loopback and a gateway app in front of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.clock import Clock
from gateway.config import parse_config
from gateway.store import Store
from tests.support.cli_harness import CLI
from tests.support.clock import FakeClock
from tests.support.config import GatewayConfig
from tests.support.fakes import FakeUpstream
from tests.support.gateway import GatewayFactory, GatewayTestServer, JsonLines, Logs
from tests.support.stores import CREATED_PREFIXES, sweep


@pytest.fixture(scope="session", autouse=True)
def _sweep_redis_prefixes():
    """Every key a test wrote to Redis is gone when the session ends."""
    yield
    if CREATED_PREFIXES:
        asyncio.run(sweep(CREATED_PREFIXES))


@pytest.fixture
def clock() -> FakeClock:
    """The test's clock: pass it to ``gateway(..., clock=clock)``; every fake stamps requests with it."""
    return FakeClock()


@pytest.fixture
def upstreams(aiohttp_server: Any, clock: FakeClock) -> Callable[[], Awaitable[FakeUpstream]]:
    """``await upstreams()`` → another fake upstream on its own port (a primary, a fallback, …)."""

    async def make() -> FakeUpstream:
        upstream = FakeUpstream(clock=clock.monotonic)
        server: TestServer = await aiohttp_server(upstream.app())
        upstream.url = str(server.make_url("")).rstrip("/")
        upstream.server = server  # type: ignore[attr-defined]
        return upstream

    return make


@pytest.fixture
async def fake(upstreams: Callable[[], Awaitable[FakeUpstream]]) -> FakeUpstream:
    return await upstreams()


@pytest.fixture
def make_config() -> type[GatewayConfig]:
    """The config builder (tests/support/config.py): ``make_config(fake.url, default_target="up").up().claude()``;
    hand the result to ``gateway(...)`` as it is."""
    return GatewayConfig


@pytest.fixture
def gateway(aiohttp_client: Any) -> GatewayFactory:
    """``await gateway(config, env={...}, clock=..., store=...)`` → (client, access log lines);
    ``config`` is a ``GatewayConfig`` or YAML text."""

    async def make(
        config: GatewayConfig | str, *, env: dict[str, str] | None = None, clock: Clock | None = None,
        store: Store | None = None,
    ) -> tuple[TestClient, Logs]:
        env = env or {}
        parsed = parse_config(str(config), env=env)
        logs = Logs()
        app = create_app(parsed, env=env, access_log_write=logs.write, clock=clock, store=store)
        client = await aiohttp_client(GatewayTestServer(app))
        return client, logs

    return make


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CLI]:
    """The real CLI in a fresh working directory; every gateway it started is killed at teardown."""
    runner = CLI(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def gateway_log():
    logger = logging.getLogger("reliapi")
    handler, level = JsonLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
