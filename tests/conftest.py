"""Shared fixtures: a real fake upstream on loopback and a gateway app in front of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.clock import Clock
from gateway.config import parse_config
from gateway.edge.server import GatewayRunner
from gateway.observe.logs import JsonFormatter
from gateway.store import Store
from tests.cli_harness import CLI
from tests.clock import FakeClock
from tests.fakes import FakeUpstream
from tests.stores import CREATED_PREFIXES, sweep


class GatewayTestServer(TestServer):
    """A TestServer running the app with the gateway's own runner, as the CLI does."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **kwargs)


class Logs(list):
    """Access-log lines captured from a gateway under test."""

    def write(self, line: str) -> None:
        self.append(msgspec.json.decode(line))


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


GatewayFactory = Callable[..., Awaitable[tuple[TestClient, Logs]]]


@pytest.fixture
def gateway(aiohttp_client: Any) -> GatewayFactory:
    """``await gateway(yaml_text, env={...}, clock=..., store=...)`` → (client, access log lines)."""

    async def make(
        config_yaml: str, *, env: dict[str, str] | None = None, clock: Clock | None = None, store: Store | None = None,
    ) -> tuple[TestClient, Logs]:
        env = env or {}
        config = parse_config(config_yaml, env=env)
        logs = Logs()
        app = create_app(config, env=env, access_log_write=logs.write, clock=clock, store=store)
        client = await aiohttp_client(GatewayTestServer(app))
        return client, logs

    return make


async def raw_http(client: TestClient, request: bytes) -> bytes:
    """Send bytes exactly as written (no client-side normalisation) and read until the server closes."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def llm_config(fake_url: str, *, extra_target: str = "", server: str = "default_target: up") -> str:
    """One OpenAI-style target ``up`` at the fake, plus an Anthropic-style ``claude``."""
    return f"""
server: {{{server}}}
targets:
  up:
    base_url: {fake_url}/v1
    provider: openai
    models: ["gpt-*"]
    auth: {{type: bearer_env, env_var: UP_KEY}}
{extra_target}
  claude:
    base_url: {fake_url}
    provider: anthropic
    models: ["claude-*"]
    auth: {{type: header_env, header: x-api-key, env_var: CLAUDE_KEY}}
  rest:
    base_url: {fake_url}/api
    auth: {{type: passthrough}}
"""


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CLI]:
    """The real CLI in a fresh working directory; every gateway it started is killed at teardown."""
    runner = CLI(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


class JsonLines(logging.Handler):
    """The ``reliapi`` logger's records as the production formatter writes them, decoded."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))

    @property
    def lines(self) -> list[dict]:
        return [msgspec.json.decode(t) for t in self.text]


@pytest.fixture
def gateway_log():
    logger = logging.getLogger("reliapi")
    handler, level = JsonLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
