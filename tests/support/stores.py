"""Stores for tests: a real Redis when one answers, else a visible skip (a failure in CI).

Redis comes from ``REDIS_URL`` (default redis://127.0.0.1:6379/0). When it does not
answer, the Redis cases skip with the reason — or fail when ``RELIAPI_REQUIRE_REDIS=1``
(``.ci/run`` sets it). Each test works under its own random key prefix
(``redis_store(new_prefix())``) and deletes it afterwards (``drop``). A test that must stop
Redis, or needs one with a password, users or a unix socket, runs its own (``PrivateRedis``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from gateway.store import StoreError
from gateway.store.redis import RedisStore
from tests.support.cli_harness import free_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
_redis_down: dict[str, str] = {}  # url -> reason, so an absent Redis is probed once


def new_prefix() -> str:
    return "test:" + uuid.uuid4().hex


def unavailable(reason: str) -> None:
    if os.environ.get("RELIAPI_REQUIRE_REDIS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


CREATED_PREFIXES: set[str] = set()  # swept again at the end of the session (tests/conftest.py)


async def redis_store(prefix: str) -> RedisStore:
    """A RedisStore under ``prefix``, or skip/fail the test when Redis does not answer."""
    CREATED_PREFIXES.add(prefix)
    if REDIS_URL in _redis_down:
        unavailable(_redis_down[REDIS_URL])
    store = RedisStore(REDIS_URL, key_prefix=prefix)
    try:
        await store.ping()
    except StoreError as exc:
        await store.close()
        _redis_down[REDIS_URL] = f"Redis not reachable at {store.url_for_display}: {exc}"
        unavailable(_redis_down[REDIS_URL])
    return store


async def sweep(prefixes: set[str]) -> None:
    """Delete what gateways wrote under the tests' prefixes after the tests' own cleanup — the
    usage counts a gateway flushes when its app closes, after the test body ended."""
    for prefix in prefixes:
        store = RedisStore(REDIS_URL, key_prefix=prefix)
        try:
            await store.delete_prefix("")
        except StoreError:
            pass
        finally:
            await store.close()


async def drop(store: RedisStore) -> None:
    """Delete everything under the store's prefix and close it."""
    try:
        await store.delete_prefix("")
    finally:
        await store.close()


class PrivateRedis:
    """A redis-server of our own on a free loopback port, to stop and start at will; ``args`` are
    more of its flags (``--requirepass``, ``--user``, ``--unixsocket`` …). Stopped by its PID."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = args
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed: cannot run a Redis of our own")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.proc.poll() is None, f"private redis-server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def _answers(self) -> bool:
        """Any reply to PING: +PONG, or -NOAUTH from one that wants a password."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
