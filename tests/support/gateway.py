"""Running a gateway in-process for a test: its server class, its captured logs, raw HTTP to it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient, TestServer

from gateway.edge.server import GatewayRunner
from gateway.observe.logs import JsonFormatter


class GatewayTestServer(TestServer):
    """A TestServer running the app with the gateway's own runner, as the CLI does."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **kwargs)


class Logs(list):
    """Access-log lines captured from a gateway under test."""

    def write(self, line: str) -> None:
        self.append(msgspec.json.decode(line))


GatewayFactory = Callable[..., Awaitable[tuple[TestClient, Logs]]]


async def raw_http(client: TestClient, request: bytes) -> bytes:
    """Send bytes exactly as written (no client-side normalisation) and read until the server closes."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


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


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll (real time, bounded) until ``condition()`` holds: state another task or instance updates in the background."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def settle(*clients: TestClient, timeout_s: float = 5.0) -> None:
    """Wait until every leader's background work (recording, the cache or idempotency store write) is done,
    so a following identical request meets the stored entry rather than the running flight."""
    from gateway.keys import RUNTIME

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for client in clients:
        background = client.app[RUNTIME].current.background
        while background:
            assert loop.time() < deadline, "background work still running"
            await asyncio.sleep(0.01)
