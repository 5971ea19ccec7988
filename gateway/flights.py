"""One upstream call for many identical requests: claim, record, fan out, replay.

Idempotency and the cache's single flight share this. A *flight* is keyed in the
store; the key holds either a lock (a flight in progress) or the finished entry:

    key  = b"L" + token + b" " + fingerprint        while the leader runs
         = b"D" + msgpack(Entry)                     once a storable answer is done
    key:log:<token>  the running answer as a list: head, chunks…, end  (fan-out)
    channel key      "a new log item" / "done" notifications

``join`` decides, in one atomic ``SET NX``, who leads. The leader runs the request in a
task of its own (a client that goes away must not cancel the answer others wait for),
relays it to its own client from memory, mirrors it to the log so waiters on *any*
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
the upstream call with it, and the key released without an answer (``["a"]`` in the log):
nothing is stored, and a duplicate arriving later runs the request itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from gateway import errors
from gateway.errors import GatewayError, StreamBroken
from gateway.exchange import Reply
from gateway.recording import Reader, Recording, headers_of
from gateway.store import Store, StoreError

log = logging.getLogger("reliapi")

_LOG_TTL_S = 60.0  # a finished run's log outlives it briefly, for followers still reading
_FLUSH_MAX = 256  # log items per store round trip
_RECHECK_S = 1.0  # a follower re-reads the key at least this often
_WAITERS_TTL_S = 3600.0  # a follower counted elsewhere; one whose instance died stops counting after this


class Entry(msgspec.Struct, array_like=True):
    """A finished answer, as stored for replay."""

    fp: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes | None
    chunks: list[bytes] | None
    created: float  # wall time of the run's start (TTLs count from the first request)
    vary: str = ""  # the cache's: which request the answer is for, beyond its key (``policies.cache``)


_encode = msgspec.msgpack.encode
_decode_entry = msgspec.msgpack.Decoder(Entry).decode
_decode_item = msgspec.msgpack.Decoder(list).decode

# Log items (msgpack arrays): ["h", status, headers, stream] · ["b", body] · ["c", chunk]
# · ["e"] clean end · ["x", code, message, reported] broken stream · ["g", code, message, retry_after, target, upstream_status]


class KeyMismatch(Exception):
    """The key is in use (or was used) for a request with another fingerprint."""


class StillRunning(Exception):
    """The leader did not finish within the follower's wait."""


_BY_CODE: dict[str, type[GatewayError]] = {}


def _error_classes(cls: type[GatewayError]) -> None:
    for sub in cls.__subclasses__():
        _BY_CODE.setdefault(sub.code, sub)
        _error_classes(sub)


_error_classes(errors.GatewayError)


def _rebuild_error(item: list[Any]) -> GatewayError:
    _, code, message, retry_after, target, upstream_status = item
    cls = _BY_CODE.get(code, errors.UpstreamError)
    err = object.__new__(cls)
    GatewayError.__init__(err, message, retry_after=retry_after, target=target, upstream_status=upstream_status)
    if isinstance(err, errors.UpstreamUnavailable):
        err.sent = True
    if isinstance(err, StreamBroken):
        err.reported = False
    return err


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def replay(entry: Entry) -> Reply:
    """A stored answer as a fresh Reply (a stream is replayed as the same chunks)."""
    headers = headers_of(entry.headers)
    if entry.chunks is not None:
        return Reply(entry.status, headers, chunks=_iterate(entry.chunks), upstream_status=entry.status)
    return Reply(entry.status, headers, body=entry.body or b"", upstream_status=entry.status)


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
        self.cleanups: set[asyncio.Task[None]] = set()  # locks to take back once the store answers (``_unclaim``)

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
                return _decode_entry(raw[1:])
            except msgspec.DecodeError:
                return None
        return raw

    async def join(self, key: str, fp: str, lock_ttl_s: float) -> Lead | Entry | bytes:
        """In one round trip: the lead (the key was free and is now ours), the stored entry,
        or the lock of the flight that runs (to ``follow``)."""
        token = os.urandom(8).hex()
        lock = b"L" + token.encode() + b" " + fp.encode()
        try:
            held = await self.store.claim(key, lock, lock_ttl_s)
        except (StoreError, asyncio.CancelledError):  # (cancelled: the client left while the claim was on its way)
            self._unclaim(key, lock, lock_ttl_s)
            raise
        if held is None:
            return Lead(self, key, lock, token, fp, lock_ttl_s)
        if held[:1] == b"D":
            try:
                return _decode_entry(held[1:])
            except msgspec.DecodeError:  # not ours to read (another version): treat as running
                return held
        return held

    async def claim(
        self, key: str, fp: str, lock_ttl_s: float, *, force: bool = False, entry_key: str | None = None,
    ) -> Lead | None:
        """Become the leader for ``key``; None when another flight or an entry holds it.
        ``force`` takes it regardless. ``entry_key``: store the answer there rather than under
        the lock (a cache refresh: the old entry serves until a good new one replaces it)."""
        token = os.urandom(8).hex()
        lock = b"L" + token.encode() + b" " + fp.encode()
        try:
            if force:
                await self.store.set(key, lock, lock_ttl_s)
            elif not await self.store.set_nx(key, lock, lock_ttl_s):
                return None
        except (StoreError, asyncio.CancelledError):
            self._unclaim(key, lock, lock_ttl_s)
            raise
        lead = Lead(self, key, lock, token, fp, lock_ttl_s)
        lead.entry_key = entry_key
        return lead

    def _unclaim(self, key: str, lock: bytes, lock_ttl_s: float) -> None:
        """A claim whose answer never came (the store timed out) may still have been applied: a lock
        nobody runs under would hold every duplicate back until it expires. Take it back, if it is
        there and ours, as soon as the store answers again."""
        async def take_back() -> None:
            deadline = time.monotonic() + lock_ttl_s
            pause = 0.5
            while time.monotonic() < deadline:
                try:
                    await self.store.compare_and_delete(key, lock)
                    return
                except StoreError:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)

        task = asyncio.ensure_future(take_back())
        self.cleanups.add(task)  # not awaited at shutdown: a store that stays down must not hold it up
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
        async with self.store.subscribe(key) as sub:
            while True:
                items = await self.store.range(log_key)
                if items:
                    head = _decode_item(items[0])
                    if head[0] == "a":
                        return None  # its client left and nobody was waiting yet: run it ourselves
                    if len(items) > 1 or head[0] == "g" or head[3]:
                        return self._from_log(key, log_key, lock, items, idle_s, waiters)
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
        head = _decode_item(items[0])
        if head[0] == "g":
            raise _rebuild_error(head)
        _, status, headers, stream = head
        if not stream:
            body = _decode_item(items[1])[1]
            return Reply(status, headers_of(headers), body=body, upstream_status=status)
        return Reply(status, headers_of(headers), chunks=self._tail(key, log_key, lock, items, idle_s, waiters),
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
                        item = _decode_item(raw)
                        kind = item[0]
                        if kind == "c":
                            yield item[1]
                        elif kind == "e":
                            return
                        elif kind == "x":
                            raise StreamBroken(item[2], reported=item[3])
                        elif kind == "g":
                            raise _rebuild_error(item)
                        elif kind == "a":
                            raise StreamBroken("the request this one was coalesced with was abandoned by its client")
                    pending = await self.store.range(log_key, seen)
                    if pending:
                        continue
                    if await sub.get(idle_s) is None:
                        pending = await self.store.range(log_key, seen)
                        if not pending and await self.store.get(key) != lock:
                            raise StreamBroken("the request this one was coalesced with stopped before its stream ended")
        finally:
            waiters.leave()


def _fingerprint(lock: bytes) -> str:
    return lock[1:].split(b" ", 1)[1].decode() if b" " in lock else ""


StoreEntry = Callable[[Reply], bool]


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


class Lead:
    """The claim of the one request that runs; ``run`` does the work and shares it."""

    def __init__(self, flights: Flights, key: str, lock: bytes, token: str, fp: str, lock_ttl_s: float) -> None:
        self.flights = flights
        self.key = key
        self.lock = lock
        self.token = token
        self.fp = fp
        self.lock_ttl_s = lock_ttl_s
        self.started = flights.now()
        self.log_key = f"{key}:log:{token}"
        # the answer as shared: a Recording, the GatewayError it failed with, or None when it was abandoned
        self._outcome: asyncio.Future[Recording | GatewayError | None] = asyncio.get_running_loop().create_future()
        self._beat: asyncio.TimerHandle | None = None
        self._pending: list[bytes] = []
        self._flushing: asyncio.Task[None] | None = None
        self._mirror = True
        self._finished = False  # finished: no more lock renewals
        self.entry_key: str | None = None  # store the answer here, not under the lock (claim)
        self._own: Reader | None = None  # the leader's client's reader of a stream
        self._own_gone = False  # the leader's client went away
        self._waiting = 0  # followers on this instance waiting for the answer
        self._rec: Recording | None = None
        self._task: asyncio.Task[None] | None = None
        self._checking = False  # asking the store whether followers elsewhere wait
        self.request_id: str | None = None
        self.tag: Callable[[list[tuple[str, str]]], str] | None = None  # the answer's headers → ``Entry.vary``

    async def run(
        self, work: Callable[[], Awaitable[Reply]], *, storable: StoreEntry, ttl_s: float, max_bytes: int,
        request_id: str | None = None,
    ) -> Reply:
        """Run ``work`` in its own task (shielded from this client's disconnect) and return
        the answer for this client; followers get the same. ``request_id``: the leading
        request's, for the log line of a failure."""
        self.request_id = request_id
        flights = self.flights
        flights.local[self.key] = self
        task = self._task = asyncio.ensure_future(self._run(work, storable, ttl_s, max_bytes))
        flights.tasks.add(task)
        task.add_done_callback(flights.tasks.discard)
        try:
            outcome = await asyncio.shield(self._outcome)  # a disconnect cancels this wait, not the work
        except asyncio.CancelledError:
            self._own_gone = True
            if self._own is not None:
                self._own._leave()  # nobody will read it: never hold the shared stream back for it
            self._give_up_if_alone()
            raise
        if isinstance(outcome, GatewayError):
            raise outcome
        assert outcome is not None  # abandoned only once this client is gone
        if self._own is not None:  # this client's reader, registered before the first chunk
            reply = Reply(outcome.status, headers_of(outcome.headers), chunks=self._own, upstream_status=outcome.status)
            reply.ttft_ms = outcome.ttft_ms
            return reply
        return outcome.reply()

    async def follow(self, wait_s: float) -> Reply | None:
        """A follower on this instance: the answer as it arrives (None: abandoned, run it yourself)."""
        self._waiting += 1
        try:
            try:
                async with asyncio.timeout(wait_s):
                    outcome = await asyncio.shield(self._outcome)
            except TimeoutError:
                raise StillRunning() from None
            if outcome is None:
                return None
            if isinstance(outcome, GatewayError):
                raise outcome
            if not outcome.joinable:
                raise StillRunning()  # past its size limit the start of the answer is gone
            return outcome.reply()  # (a stream's reader is registered before this follower stops counting)
        finally:
            self._waiting -= 1
            if self._own_gone:
                self._give_up_if_alone()

    # ---------------------------------------------------------------- giving up when nobody waits

    def _reader_left(self) -> None:
        """Every reader of the stream left before its end (the leader's client among them)."""
        self._own_gone = True
        self._give_up_if_alone()

    def _give_up_if_alone(self) -> None:
        """The leader's client is gone: cancel the work unless a follower still waits for it."""
        if self._finished or self._checking or self._task is None or self._task.done():
            return
        if self._waiting or (self._rec is not None and self._rec.readers):
            return
        self._checking = True
        self.flights.spawn(self._give_up_unless_followed())

    async def _give_up_unless_followed(self) -> None:
        try:
            followers = int(await self.flights.store.get(f"{self.log_key}:w") or 0)
        except (StoreError, ValueError):
            followers = 0  # a store that does not answer carries no followers either
        finally:
            self._checking = False
        if followers > 0 or self._waiting or (self._rec is not None and self._rec.readers):
            return  # others wait: it goes on for them (the lock renewal asks again)
        if self._task is not None and not self._finished:
            self._task.cancel()

    async def _run(self, work: Callable[[], Awaitable[Reply]], storable: StoreEntry, ttl_s: float, max_bytes: int) -> None:
        self._schedule_beat()
        try:
            await self._lead(work, storable, ttl_s, max_bytes)
        except asyncio.CancelledError:  # given up: its client left and nobody else waits
            if self._rec is not None and not self._rec.ended:
                self._rec.end(StreamBroken("abandoned by its client"))
            self._publish(None)
            self._log(["a"])
            await self._release()
        except Exception:
            log.exception("%s: leader failed", self.flights.namespace)
            await self._release()
        finally:
            self._finished = True
            if self._beat is not None:
                self._beat.cancel()
            if self.flights.local.get(self.key) is self:
                del self.flights.local[self.key]
            if not self._outcome.done():  # a bug: never leave followers hanging
                self._outcome.set_result(errors.InternalError("internal error"))

    async def _lead(self, work: Callable[[], Awaitable[Reply]], storable: StoreEntry, ttl_s: float, max_bytes: int) -> None:
        try:
            reply = await work()
        except GatewayError as e:
            self._publish(e)
            self._log(["g", e.code, e.message, e.retry_after, e.target, e.upstream_status])
            await self._release()
            return
        except Exception:
            log.exception("internal error", extra={"fields": {"request_id": self.request_id}})
            err = errors.InternalError("internal error")
            self._publish(err)
            self._log(["g", err.code, err.message, None, None, None])
            await self._release()
            return
        headers = [(str(k), v) for k, v in reply.headers.items()]  # istr keys do not encode
        rec = self._rec = Recording(reply.status, headers, reply.chunks is not None, max_bytes)
        if rec.stream:
            rec.ttft_ms = reply.ttft_ms
            rec.on_idle = self._reader_left
            if not self._own_gone:
                self._own = Reader(rec)
        head = ["h", reply.status, headers, rec.stream]
        if not rec.stream:
            rec.body = reply.body or b""
            rec.ended = True
            self._publish(rec)
            if storable(reply) and len(rec.body) <= max_bytes:
                await self._store(rec, ttl_s)  # the stored entry is what followers read
            else:
                self._log(head)
                self._log(["b", rec.body])
                await self._release()
            return
        self._log(head)
        self._publish(rec)
        error: GatewayError | None = None
        try:
            assert reply.chunks is not None
            async for chunk in reply.chunks:
                rec.add(chunk)
                if rec.keep:
                    self._log(["c", chunk])
                else:
                    if self._mirror:  # too large to share through the store: followers elsewhere stop here
                        self._log(["x", "stream_too_large", "the answer is too large to share; send the request again", False])
                        self._mirror = False
                    await rec.backpressure()
        except GatewayError as e:
            error = e if isinstance(e, StreamBroken) else StreamBroken(e.message)
        except Exception:
            log.exception("stream recording failed")
            error = StreamBroken("the upstream stream failed")
        finally:
            await reply.aclose()
        rec.end(error)
        if error is not None:
            self._log(["x", error.code, error.message, getattr(error, "reported", False)])
            await self._release()
        elif storable(reply) and rec.size <= max_bytes:
            self._log(["e"])
            await self._store(rec, ttl_s)
        else:
            self._log(["e"])
            await self._release()

    def _publish(self, outcome: Recording | GatewayError | None) -> None:
        if not self._outcome.done():
            self._outcome.set_result(outcome)

    # ---------------------------------------------------------------- store side

    def _log(self, item: list[Any]) -> None:
        """Mirror one item to the store log, batched in the background: the relay to this
        client never waits for the store."""
        if not self._mirror:
            return
        self._pending.append(_encode(item))
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:_FLUSH_MAX], self._pending[_FLUSH_MAX:]
                await self.flights.store.append(self.log_key, batch, _LOG_TTL_S, notify=self.key)
        except StoreError as e:
            self._mirror = False
            self._pending.clear()
            log.warning("%s: cannot share a running answer through the store: %s", self.flights.namespace, e)
        finally:
            self._flushing = None

    async def _drain(self) -> None:
        while self._flushing is not None:
            await asyncio.shield(self._flushing)

    async def _store(self, rec: Recording, ttl_s: float) -> None:
        await self._drain()
        entry = Entry(self.fp, rec.status, rec.headers, rec.body if not rec.stream else None,
                      rec.chunks if rec.stream else None, self.started,
                      self.tag(rec.headers) if self.tag is not None else "")
        left = ttl_s - (self.flights.now() - self.started)
        store = self.flights.store
        try:
            if self.entry_key is not None:
                if left > 0:
                    await store.set(self.entry_key, b"D" + _encode(entry), left)
                await store.compare_and_delete(self.key, self.lock, notify=self.key)
                return
            if left > 0 and await store.compare_and_set(
                self.key, self.lock, b"D" + _encode(entry), left, notify=self.key,
            ):
                return
            if left > 0:
                log.warning("%s: lock expired before the answer was stored (not stored)", self.flights.namespace)
            await store.compare_and_delete(self.key, self.lock, notify=self.key)
        except StoreError as e:
            log.warning("%s: answer not stored: %s", self.flights.namespace, e)

    async def _release(self) -> None:
        await self._drain()
        store = self.flights.store
        try:
            await store.compare_and_delete(self.key, self.lock, notify=self.key)
        except StoreError as e:  # the lock expires by itself
            log.warning("%s: release failed: %s", self.flights.namespace, e)

    def _schedule_beat(self) -> None:
        """Renew the lock every third of its TTL while the work runs: a timer, not a task, since
        almost every request is done long before the first renewal is due."""
        self._beat = asyncio.get_running_loop().call_later(self.lock_ttl_s / 3, self._beat_now)

    def _beat_now(self) -> None:
        task = asyncio.ensure_future(self._renew())
        self.flights.tasks.add(task)
        task.add_done_callback(self.flights.tasks.discard)

    async def _renew(self) -> None:
        try:
            if not await self.flights.store.compare_and_set(self.key, self.lock, self.lock, self.lock_ttl_s):
                return  # taken over (we were presumed dead): the fenced write will refuse us
        except StoreError:
            pass
        if self._beat is not None and not self._finished:
            self._schedule_beat()
            if self._own_gone:  # followers elsewhere may have left since
                self._give_up_if_alone()
