"""gateway/state/flights.py on its own: a shared stream's memory stays bounded past its size limit; running leads keep their locks."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import StreamBroken
from gateway.streaming import recording as flights
from gateway.streaming.recording import Recording


async def drain(reader, into: list[bytes], pause_s: float = 0.0) -> None:
    async for chunk in reader:
        into.append(chunk)
        if pause_s:
            await asyncio.sleep(pause_s)


async def test_under_its_limit_a_recording_keeps_every_chunk_for_late_readers() -> None:
    rec = Recording(200, [], True, limit=100)
    first = rec.reply().chunks
    for i in range(5):
        rec.add(b"%d" % i)
    late = rec.reply().chunks  # joins after five chunks: still starts at the first byte
    rec.end()
    got_first, got_late = [], []
    await asyncio.gather(drain(first, got_first), drain(late, got_late))
    assert got_first == got_late == [b"0", b"1", b"2", b"3", b"4"]
    assert rec.keep and rec.joinable


async def test_past_its_limit_read_chunks_are_let_go_and_late_readers_cannot_join(monkeypatch) -> None:
    monkeypatch.setattr(flights, "_WINDOW", 10)
    rec = Recording(200, [], True, limit=20)
    reader = rec.reply().chunks
    got: list[bytes] = []
    consumer = asyncio.ensure_future(drain(reader, got))
    held = []
    for _ in range(50):
        rec.add(b"x" * 5)
        await rec.backpressure()  # the leader waits for its slowest reader
        held.append(rec.unread)
        await asyncio.sleep(0)
    rec.end()
    await consumer
    assert b"".join(got) == b"x" * 250  # the reader got everything, in order
    assert not rec.keep and not rec.joinable
    assert max(held) <= 20  # up to the limit everything is kept …
    assert max(held[5:]) <= 10 + 5  # … past it never more than the window (plus the chunk just added)
    assert len(rec.chunks) <= 3


async def test_a_slow_reader_holds_the_leader_back_instead_of_memory_growing(monkeypatch) -> None:
    monkeypatch.setattr(flights, "_WINDOW", 8)
    rec = Recording(200, [], True, limit=0)
    reader = rec.reply().chunks
    produced = 0

    async def produce() -> None:
        nonlocal produced
        for _ in range(20):
            rec.add(b"abcd")
            produced += 1
            await rec.backpressure()
        rec.end()

    producer = asyncio.ensure_future(produce())
    await asyncio.sleep(0.05)
    assert produced <= 3  # nobody read yet: the leader stopped at the window
    got: list[bytes] = []
    await drain(reader, got)
    await producer
    assert len(got) == 20


async def test_a_reader_stuck_past_the_limit_is_let_go_with_an_error(monkeypatch) -> None:
    monkeypatch.setattr(flights, "_WINDOW", 4)
    monkeypatch.setattr(flights, "_STUCK_S", 0.05)
    rec = Recording(200, [], True, limit=0)
    stuck = rec.reply().chunks
    for _ in range(5):
        rec.add(b"abcd")
        await rec.backpressure()  # returns once the stuck reader is evicted
    rec.end()
    with pytest.raises(StreamBroken, match="too far behind"):
        await stuck.__anext__()


async def test_a_closed_reader_never_holds_the_stream_back(monkeypatch) -> None:
    monkeypatch.setattr(flights, "_WINDOW", 4)
    rec = Recording(200, [], True, limit=0)
    gone = rec.reply().chunks
    await gone.aclose()  # a client that left before reading
    for _ in range(100):
        rec.add(b"abcd")
        await asyncio.wait_for(rec.backpressure(), 1)
    assert rec.readers == {} and len(rec.chunks) == 0


async def test_running_leads_of_different_lock_ttls_keep_their_locks_until_their_answers_are_stored() -> None:
    # one renewal timer serves every running lead: the one with the short lock (0.3 s) is renewed on its
    # own schedule, not the long one's (30 s); a lock never renewed would be free again after 0.3 s
    from gateway.flow.exchange import Reply
    from gateway.state.flights import Entry, Flights, Lead
    from gateway.store.memory import MemoryStore

    store = MemoryStore()
    flights = Flights(store, "t", set())
    short, long = await flights.join("t:short", "fp", 0.3), await flights.join("t:long", "fp", 30.0)
    assert isinstance(short, Lead) and isinstance(long, Lead)
    release = asyncio.Event()

    async def work() -> Reply:
        await release.wait()
        return Reply(200, {"content-type": "text/plain"}, body=b"done")

    runs = [asyncio.ensure_future(lead.run(work, storable=lambda r: True, ttl_s=60, max_bytes=1000))
            for lead in (short, long)]
    await asyncio.sleep(0.8)  # well past the short lock's TTL
    assert await store.get("t:short") == short.lock and await store.get("t:long") == long.lock
    release.set()
    assert [r.body for r in await asyncio.gather(*runs)] == [b"done", b"done"]
    assert isinstance(await flights.lookup("t:short"), Entry)
    await flights.close()


async def test_a_lead_still_running_when_its_flights_close_keeps_its_lock() -> None:
    # a reload closes the old runtime's flights while a stream it leads goes on: a duplicate must still
    # follow it, not find the key free and run the upstream call a second time
    from gateway.flow.exchange import Reply
    from gateway.state.flights import Flights, Lead
    from gateway.store.memory import MemoryStore

    store = MemoryStore()
    flights = Flights(store, "t", set())
    lead = await flights.join("t:k", "fp", 0.3)
    assert isinstance(lead, Lead)
    release = asyncio.Event()

    async def work() -> Reply:
        await release.wait()
        return Reply(200, {"content-type": "text/plain"}, body=b"done")

    run = asyncio.ensure_future(lead.run(work, storable=lambda r: True, ttl_s=60, max_bytes=1000))
    await asyncio.sleep(0.05)
    await flights.close()
    await asyncio.sleep(0.8)  # past the lock's TTL
    assert await store.get("t:k") == lead.lock
    assert not isinstance(await flights.join("t:k", "fp", 0.3), Lead)
    release.set()
    assert (await run).body == b"done"
