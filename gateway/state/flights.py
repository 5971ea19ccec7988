"""One upstream call for many identical requests: claim, record, fan out, replay.

Idempotency and the cache's single flight share this. A *flight* is keyed in the
store; the key holds either a lock (a flight in progress) or the finished entry, and a
running answer is mirrored to a log beside it (``gateway.state.flightlog`` has the formats); the
key's channel carries "a new log item" / "done" notifications.

``join`` decides, in one atomic ``SET NX``, who leads. The leader runs the request in a
task of its own (a client that goes away must not cancel the answer others wait for),
relays it to its own client from memory (``gateway.state.lead``), mirrors it to the log so waiters on *any*
instance receive the same bytes while it is still running, and finally writes the
entry with a compare-and-set on its lock (a fenced write: a leader whose lock expired
and was taken over cannot overwrite the new holder's answer). A lock is kept alive by
a renewal timer, so a leader that dies releases the key within ``lock_ttl_s``.

Followers on the same instance read the leader's recording directly; followers
elsewhere read the log. An answer that may not be stored (a 5xx, a cut stream, a
gateway error) is still shared with the followers that were waiting for it — one
upstream call for all — but the key is released, so a later retry runs again.

A leader whose client goes away goes on only for others: when no follower waits — none
on this instance (awaiting the answer or reading the stream) and none elsewhere (each
counts itself in ``key:log:<token>:w`` while it follows) — the work is cancelled at once,
the upstream call with it, and the key released without an answer (``Abandoned`` in the log):
nothing is stored, and a duplicate arriving later runs the request itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from gateway.errors import StreamBroken
from gateway.flow.exchange import Reply
from gateway.state.flightlog import (
    Abandoned,
    Body,
    Broken,
    Chunk,
    End,
    Entry,
    Failed,
    Head,
    KeyMismatch,
    StillRunning,
    decode_entry,
    decode_item,
    rebuild_error,
    replay,
)
from gateway.state.lead import Lead
from gateway.store import Claim, Store, StoreError
from gateway.streaming.recording import headers_of

log = logging.getLogger("reliapi")

_RECHECK_S = 1.0  # a follower re-reads the key at least this often
_WAITERS_TTL_S = 3600.0  # a follower counted elsewhere; one whose instance died stops counting after this


def new_token() -> str:
    """A lock's identity: 64 random bits, as hex. Only uniqueness matters (a fenced write compares it), not
    secrecy: ``random`` (seeded from the OS per process, and again in a forked worker) gives that without a
    ``getrandom`` system call per request, which ``os.urandom`` made."""
    return f"{random.getrandbits(64):016x}"


class Flights:
    """Flights of one kind (``namespace``) in one store; ``tasks`` collects leader work for
    a graceful shutdown."""

    def __init__(
        self, store: Store, namespace: str, tasks: set[asyncio.Task[Any]], now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.now = now
        self.namespace = namespace
        self.tasks = tasks
        self.local: dict[str, Lead] = {}  # key → the flight this instance leads
        self.cleanups: set[asyncio.Task[None]] = set()  # locks to take back once the store answers (``unclaim``)
        self._renewals: asyncio.TimerHandle | None = None  # ``watch``: one timer for every running lead's lock
        self._renewals_at = math.inf

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # ---------------------------------------------------------------- lookup / claim

    async def lookup(self, key: str) -> Entry | bytes | None:
        """The stored entry, the lock of a running flight, or None."""
        raw = await self.store.get(key)
        if raw is None:
            return None
        if raw[:1] == b"D":
            try:
                return decode_entry(raw[1:])
            except msgspec.DecodeError:
                return None
        return raw

    async def join(self, key: str, fp: str, lock_ttl_s: float) -> Lead | Entry | bytes:
        """In one round trip: the lead (the key was free and is now ours), the stored entry,
        or the lock of the flight that runs (to ``follow``)."""
        claim = self.ask(key, fp, lock_ttl_s)
        try:
            held = await self.store.claim(key, claim.value, lock_ttl_s)
        except (StoreError, asyncio.CancelledError):  # (cancelled: the client left while the claim was on its way)
            self.unclaim(claim)
            raise
        return self.answer(claim, fp, held)

    def ask(self, key: str, fp: str, lock_ttl_s: float) -> Claim:
        """The claim ``join`` sends for ``key``: a lock with a new token (``gateway.state.ahead`` sends it with
        others)."""
        return Claim(key, b"L" + new_token().encode() + b" " + fp.encode(), lock_ttl_s)

    def answer(self, claim: Claim, fp: str, held: bytes | None) -> Lead | Entry | bytes:
        """What the store's answer to ``claim`` means: the lead (None: the key is ours), the stored entry, or
        the lock of the flight that runs."""
        if held is None:
            return Lead(self, claim.key, claim.value, claim.value[1:17].decode(), fp, claim.ttl_s)
        if held[:1] == b"D":
            try:
                return decode_entry(held[1:])
            except msgspec.DecodeError:  # not ours to read (another version): treat as running
                return held
        return held

    def unclaim(self, claim: Claim) -> None:
        """A claim whose answer never came (the store timed out, the client left) may still have been applied:
        a lock nobody runs under would hold every duplicate back until it expires. Taken back, if it is there
        and ours, as soon as the store answers again."""
        self.keep_trying(lambda: self.store.compare_and_delete(claim.key, claim.value, notify=claim.key),
                         claim.ttl_s, pause_s=0.5, wait_first=False)

    async def claim(
        self, key: str, fp: str, lock_ttl_s: float, *, force: bool = False, entry_key: str | None = None,
    ) -> Lead | None:
        """Become the leader for ``key``; None when another flight or an entry holds it.
        ``force`` takes it regardless. ``entry_key``: store the answer there rather than under
        the lock (a cache refresh: the old entry serves until a good new one replaces it)."""
        token = new_token()
        lock = b"L" + token.encode() + b" " + fp.encode()
        try:
            if force:
                await self.store.set(key, lock, lock_ttl_s)
            elif not await self.store.set_nx(key, lock, lock_ttl_s):
                return None
        except (StoreError, asyncio.CancelledError):
            self.unclaim(Claim(key, lock, lock_ttl_s))
            raise
        lead = Lead(self, key, lock, token, fp, lock_ttl_s)
        lead.entry_key = entry_key
        return lead

    def watch(self, lead: Lead) -> None:
        """Keep a running lead's lock alive: renewed every third of its TTL until its work is over.

        One timer per kind of flight looks at the leads running here (``local``) when the next renewal is
        due, rather than a timer per lead: almost every request ends long before its first renewal, and a
        timer made and cancelled for each cost more than the rest of the bookkeeping of a lead."""
        loop = asyncio.get_running_loop()
        lead.renew_due = due = loop.time() + lead.lock_ttl_s / 3
        if due < self._renewals_at:
            if self._renewals is not None:
                self._renewals.cancel()
            self._renewals_at = due
            self._renewals = loop.call_at(due, self._renew_due)

    def _renew_due(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # (a timer may fire a hair early)
        soonest = math.inf
        for lead in list(self.local.values()):
            if lead.renew_due <= now:
                lead.renew_due = now + lead.lock_ttl_s / 3
                lead.beat()
            soonest = min(soonest, lead.renew_due)
        self._renewals_at = soonest
        self._renewals = loop.call_at(soonest, self._renew_due) if soonest < math.inf else None

    def keep_trying(self, attempt: Callable[[], Awaitable[Any]], within_s: float, *, pause_s: float = 0.2,
                    wait_first: bool = True) -> None:
        """Store work no request waits for, in the background: ``attempt`` again (pauses doubling from ``pause_s``, at
        most ten times it) until it raises no ``StoreError``, for at most ``within_s``. Not awaited at shutdown:
        a store that stays down must not hold it up."""
        async def again() -> None:
            deadline = time.monotonic() + within_s
            pause = pause_s
            if wait_first:
                await asyncio.sleep(pause)
            while True:
                try:
                    await attempt()
                    return
                except StoreError:
                    if time.monotonic() + pause >= deadline:
                        return
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, pause_s * 10)

        task = asyncio.ensure_future(again())
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    def spawn(self, work: Awaitable[Any]) -> None:
        """Store work in the background (a store that fails it is not this request's problem)."""
        async def guarded() -> None:
            with contextlib.suppress(StoreError):
                await work

        task = asyncio.ensure_future(guarded())
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    async def close(self) -> None:
        # (the renewal timer is left alone: leads still running keep their locks until they end — a reload
        # retires the old runtime while its streams go on — and it stops by itself once none runs)
        for task in list(self.cleanups):
            task.cancel()
        for task in list(self.cleanups):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def follow(self, key: str, lock: bytes, fp: str, *, wait_s: float, idle_s: float) -> Reply | None:
        """Wait for the flight holding ``lock`` and return its answer; None when it ended
        without one to share (the caller may claim and run itself). Raises ``KeyMismatch``
        or ``StillRunning``."""
        if _fingerprint(lock) != fp:
            raise KeyMismatch()
        local = self.local.get(key)
        if local is not None and local.lock == lock:
            return await local.follow(wait_s)
        return await self._follow_store(key, lock, wait_s=wait_s, idle_s=idle_s)

    async def _follow_store(self, key: str, lock: bytes, *, wait_s: float, idle_s: float) -> Reply | None:
        token = lock[1:].split(b" ", 1)[0].decode()
        log_key = f"{key}:log:{token}"
        waiters = Waiters(self, f"{log_key}:w")
        await waiters.join()  # counted until it has its answer (a stream: until it has read it or left)
        try:
            reply = await self._wait_in_store(key, lock, log_key, waiters, wait_s=wait_s, idle_s=idle_s)
        except BaseException:
            waiters.leave()
            raise
        if reply is None or reply.chunks is None:
            waiters.leave()
        return reply

    async def _wait_in_store(
        self, key: str, lock: bytes, log_key: str, waiters: Waiters, *, wait_s: float, idle_s: float,
    ) -> Reply | None:
        deadline = time.monotonic() + wait_s
        seen_running = False  # this follower waited while the flight ran (so its failure is this one's too)
        async with self.store.subscribe(key) as sub:
            while True:
                items = await self.store.range(log_key)
                # failed before this request came: a failure is not stored and its key is released next —
                # wait for that below, then run anew (as a retry just after the release would)
                over = bool(items) and not seen_running and _failed(items[-1])
                if items and not over:
                    head = decode_item(items[0])
                    if isinstance(head, Abandoned):
                        return None  # its client left and nobody was waiting yet: run it ourselves
                    if len(items) > 1 or isinstance(head, Failed) or (isinstance(head, Head) and head.stream):
                        return self._from_log(key, log_key, lock, items, idle_s, waiters)
                seen_running = not over
                now = await self.lookup(key)
                if isinstance(now, Entry):
                    return replay(now)
                if now != lock:
                    return None  # released without an answer to share, or taken over
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StillRunning()
                await sub.get(min(left, _RECHECK_S))  # re-check now and then: a dead holder's lock expires silently

    def _from_log(self, key: str, log_key: str, lock: bytes, items: list[bytes], idle_s: float,
                  waiters: Waiters) -> Reply:
        head = decode_item(items[0])
        if isinstance(head, Failed):
            raise rebuild_error(head)
        if not isinstance(head, Head):
            raise StreamBroken("the request this one was coalesced with left an unreadable log")
        status, headers = head.status, headers_of(head.headers)
        if not head.stream:
            body = decode_item(items[1])
            return Reply(status, headers, body=body.body if isinstance(body, Body) else b"", upstream_status=status)
        return Reply(status, headers, chunks=self._tail(key, log_key, lock, items, idle_s, waiters),
                     upstream_status=status)

    async def _tail(
        self, key: str, log_key: str, lock: bytes, items: list[bytes], idle_s: float, waiters: Waiters,
    ) -> AsyncIterator[bytes]:
        """A running stream's chunks from its log: what is there, then each item as it lands."""
        seen = 1
        try:
            async with self.store.subscribe(key) as sub:
                pending = items[1:]
                while True:
                    for raw in pending:
                        seen += 1
                        item = decode_item(raw)
                        if isinstance(item, Chunk):
                            yield item.chunk
                        elif isinstance(item, End):
                            return
                        elif isinstance(item, Broken):
                            raise StreamBroken(item.message, reported=item.reported)
                        elif isinstance(item, Failed):
                            raise rebuild_error(item)
                        elif isinstance(item, Abandoned):
                            raise StreamBroken("the request this one was coalesced with was abandoned by its client")
                    pending = await self.store.range(log_key, seen)
                    if pending:
                        continue
                    if await sub.get(idle_s) is None:
                        pending = await self.store.range(log_key, seen)
                        if not pending and await self.store.get(key) != lock:
                            raise StreamBroken("the request this one was coalesced with stopped before its stream ended")
        except StoreError:  # said in-band like any cut (the key is stored or freed once the store answers again)
            raise StreamBroken("the store stopped answering while this answer was shared; send the request "
                               "again") from None
        finally:
            waiters.leave()


def _failed(raw: bytes) -> bool:
    """Is this log item the end of a flight that failed (nothing stored: its key is released next)?"""
    return isinstance(decode_item(raw), Broken | Failed | Abandoned)


def _fingerprint(lock: bytes) -> str:
    return lock[1:].split(b" ", 1)[1].decode() if b" " in lock else ""


class Waiters:
    """Followers on other instances of one flight, counted in the store (``Lead`` asks before it gives up)."""

    def __init__(self, flights: Flights, key: str) -> None:
        self.flights = flights
        self.key = key
        self.counted = False

    async def join(self) -> None:
        try:
            await self.flights.store.incr(self.key, 1, _WAITERS_TTL_S)
            self.counted = True
        except StoreError:
            pass  # uncounted: should the leader's client leave, the leader may give up, and this one runs itself

    def leave(self) -> None:
        if self.counted:
            self.counted = False
            self.flights.spawn(self.flights.store.incr(self.key, -1, _WAITERS_TTL_S))




__all__ = ["Entry", "Flights", "KeyMismatch", "Lead", "StillRunning", "Waiters", "replay"]
