"""gateway/state/commit.py on its own: a nested lead's final writes ride with the enclosing lead's, and
are never lost or held long when the enclosing lead does not send them."""

from __future__ import annotations

import asyncio

import pytest

from gateway.state import commit as commit_mod
from gateway.state.commit import Writes
from gateway.store import Write
from gateway.store.memory import MemoryStore


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list[str]] = []

    async def commit(self, writes: list[Write]) -> list[bool]:
        self.commits.append([w.key for w in writes])
        return await super().commit(writes)


@pytest.fixture(autouse=True)
def short_handoff(monkeypatch) -> None:
    monkeypatch.setattr(commit_mod, "HANDOFF_S", 0.05)


async def nested(store: CountingStore) -> tuple[Writes, asyncio.Task[list[bool]]]:
    """An enclosing lead, and a task (as a lead's work runs) whose lead hands its writes over."""
    outer = Writes(store)

    async def inner_lead() -> list[bool]:
        inner = Writes(store)
        inner.settling = True
        return await inner.commit([Write("inner", b"i")])

    with outer.enter():
        task = asyncio.ensure_future(inner_lead())
    await asyncio.sleep(0)  # the inner lead is made (and registered) before the outer commits
    return outer, task


async def test_the_inner_writes_go_in_the_enclosing_leads_one_commit() -> None:
    store = CountingStore()
    outer, task = await nested(store)
    assert await outer.commit([Write("outer", b"o")]) == [True]
    assert await task == [True]
    assert store.commits == [["outer", "inner"]]  # one store call for both
    assert await store.get("inner") == b"i" and await store.get("outer") == b"o"


async def test_an_enclosing_lead_that_ends_without_committing_gives_the_writes_back() -> None:
    store = CountingStore()
    outer, task = await nested(store)
    await asyncio.sleep(0)  # handed over by now
    outer.close()  # e.g. its work failed and there is nothing of its own to write
    assert await task == [True]
    assert store.commits == [["inner"]]


async def test_an_enclosing_lead_that_does_not_commit_in_time_does_not_hold_the_writes() -> None:
    store = CountingStore()
    outer, task = await nested(store)
    assert await asyncio.wait_for(task, 5) == [True]  # sent alone after HANDOFF_S, the outer still open
    assert store.commits == [["inner"]]
    assert await outer.commit([Write("outer", b"o")]) == [True]  # and not sent twice
    assert store.commits == [["inner"], ["outer"]]


async def test_an_inner_lead_cancelled_while_it_waits_leaves_the_handed_writes_to_the_outer() -> None:
    store = CountingStore()
    outer, task = await nested(store)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await outer.commit([Write("outer", b"o")]) == [True]
    assert store.commits == [["outer", "inner"]]  # handed over before the cancel: still written
