"""The hot paths leave no reference cycles behind: every request's objects are freed when it ends, by reference
counting, without the cycle collector. Garbage in cycles costs twice — the collector runs more often and longer
(its pauses land in stream first-byte tails), and the memory of 10,000 open streams waits for it — so a cycle
here is a regression even though nothing leaks. Each case failed before its fix: a ``Writes`` held the context
token that held it (every lead), an inner lead and its enclosing one named each other, a stream's close
callbacks closed over the reply that held them (every stream), a stream lead's recording held its lead's method.
"""

from __future__ import annotations

import contextlib
import gc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.memory import MemoryStore
from tests.support.caching import CHAT, KEY_A, STREAM, chat, config

ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(ROOT / d) for d in ("gateway", "policies", "providers"))


def ours(obj: object) -> str | None:
    """A name for a garbage object made by the gateway's code (its class, or a function of ours); None otherwise.
    A cycle of ours always holds one of these; the test client's own objects are not judged here."""
    code = getattr(obj, "__code__", None) or getattr(getattr(obj, "__func__", None), "__code__", None)
    if code is not None:
        return f"{code.co_qualname}()" if code.co_filename.startswith(OURS) else None
    module = type(obj).__module__ or ""
    return type(obj).__qualname__ if module.split(".")[0] in ("gateway", "policies", "providers") else None


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """What of ours only the cycle collector could free, of what ran inside the block."""
    found: list[str] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
    finally:
        gc.collect()
        found.extend(name for o in gc.garbage if (name := ours(o)) is not None)
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def unique(body: dict) -> dict:
    return {**body, "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex}"}]}


async def run(client, body: dict, n: int, *, headers: dict | None = None, key: bool = False) -> None:
    for _ in range(n):
        h = dict(headers or {})
        if key:
            h["Idempotency-Key"] = uuid.uuid4().hex
        answer = await chat(client, unique(body), headers=h)
        assert answer.status == 200, answer
        if body.get("stream"):
            assert answer.body.endswith(b"data: [DONE]\n\n"), answer


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["plain", "stream"])
async def test_a_request_or_stream_leaves_no_cycles(fake, gateway, clock, body) -> None:
    client, _ = await gateway(config(fake.url, cache=None), clock=clock)
    await run(client, body, 2)  # (start-up work done once is not judged)
    with collecting() as found:
        await run(client, body, 5)
    assert found == [], f"in cycles after 5 requests: {sorted(set(found))}"


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["plain", "stream"])
async def test_idempotency_cache_and_rate_limit_together_leave_no_cycles(fake, gateway, clock, body) -> None:
    tenants = [{"name": "a", "api_key": KEY_A, "rate_limit": {"rpm": 100000}}]
    client, _ = await gateway(config(fake.url, tenants=tenants), clock=clock, store=MemoryStore(clock=clock.time))
    headers = {"Authorization": f"Bearer {KEY_A}"}
    await run(client, body, 2, headers=headers, key=True)
    with collecting() as found:
        await run(client, body, 5, headers=headers, key=True)
    assert found == [], f"in cycles after 5 requests: {sorted(set(found))}"
    assert len(fake.requests) == 7  # every one a miss that ran: it led two flights (its key's, its entry's)
