"""Stores for tests: a real Redis when one answers, else a visible skip (a failure in CI).

Redis comes from ``REDIS_URL`` (default redis://127.0.0.1:6379/0). When it does not
answer, the Redis cases skip with the reason — or fail when ``RELIAPI_REQUIRE_REDIS=1``
(``.ci/run`` sets it). Each test works under its own random key prefix
(``redis_store(new_prefix())``) and deletes it afterwards (``drop``).
"""

from __future__ import annotations

import os
import uuid

import pytest

from gateway.store import StoreError
from gateway.store.redis import RedisStore

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
