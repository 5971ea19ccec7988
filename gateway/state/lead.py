"""The one request of a flight that runs (``gateway.state.flights``): it does the work in a task of its own,
shares the answer as it arrives, and stores it — or gives it up when its client left and nobody waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import errors
from gateway.errors import SHUTDOWN, GatewayError, ShuttingDown, StreamBroken, StreamCutAtShutdown
from gateway.flow.exchange import Reply
from gateway.state.commit import Writes
from gateway.state.crew import Flights
from gateway.state.flightlog import (
    ABANDONED,
    END,
    FLUSH_MAX,
    LOG_TTL_S,
    Body,
    Broken,
    Chunk,
    Entry,
    Head,
    Item,
    StillRunning,
    encode,
    failed,
)
from gateway.store import StoreError, Write
from gateway.streaming.recording import Reader, Recording, headers_of

log = logging.getLogger("reliapi")

StoreEntry = Callable[[Reply], bool]


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
        loop = asyncio.get_running_loop()
        self._outcome: asyncio.Future[Recording | GatewayError | None] = loop.create_future()
        # the same, for the leader's own client alone: its disconnect may cancel this one (``shield`` would
        # protect the shared one at the cost of a future and two callbacks of its own per lead)
        self._mine: asyncio.Future[Recording | GatewayError | None] = loop.create_future()
        self.renew_due = math.inf  # (loop time) when the lock is renewed next (``Flights.watch``)
        self._pending: list[bytes] = []
        self._flushing: asyncio.Task[None] | None = None
        self._mirror = True
        self._share_failed = False  # the store stopped taking the log: what followers elsewhere read has a gap
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
        self.private: frozenset[str] = frozenset()  # headers (lower case) only the leader's own client gets
        self._own_headers: Any = None
        self._finish_alone = False  # the work goes on to its end (and is stored) when its client leaves
        self._writes: Writes | None = None  # the final writes, with an enclosing lead's when there is one

    async def run(
        self, work: Callable[[], Awaitable[Reply]], *, storable: StoreEntry, ttl_s: float, max_bytes: int,
        request_id: str | None = None, finish_alone: bool = False, owner: Any = None,
    ) -> Reply:
        """Run ``work`` in its own task (shielded from this client's disconnect) and return
        the answer for this client; followers get the same. ``request_id``: the leading
        request's, for the log line of a failure. ``finish_alone``: when the client leaves and
        nobody follows, the work still runs to its end and its answer is stored (a request
        with side effects: its retry must get the answer, not run it twice). ``owner``: the leading
        request's exchange, told the task (``Exchange.running``: its access line waits for it)."""
        self.request_id = request_id
        self._finish_alone = finish_alone
        flights = self.flights
        flights.local[self.key] = self
        self._writes = writes = Writes(flights.store)
        with writes.enter():  # a lead started by the work hands its final writes to this one
            task = self._task = asyncio.get_running_loop().create_task(self._run(work, storable, ttl_s, max_bytes))
        flights.tasks.add(task)
        task.add_done_callback(flights.tasks.discard)
        if owner is not None and owner.running is None:  # (the outermost lead's: it ends last)
            owner.running = task
        try:
            outcome = await self._mine  # a disconnect cancels this wait, not the work
        except asyncio.CancelledError:
            self._own_gone = True
            if self._own is not None:
                self._own._leave()  # nobody will read it: never hold the shared stream back for it
            self._give_up_if_alone()
            raise
        if isinstance(outcome, GatewayError):
            raise outcome
        assert outcome is not None  # abandoned only once this client is gone
        # this client's own headers as the work answered them (nobody else holds them: what is shared is
        # ``outcome.headers``, copied in ``_lead``), else the shared ones'
        headers = self._own_headers if self._own_headers is not None else headers_of(outcome.headers)
        if self._own is not None:  # this client's reader, registered before the first chunk
            reply = Reply(outcome.status, headers, chunks=self._own, upstream_status=outcome.status)
            reply.ttft_ms = outcome.ttft_ms
            return reply
        return Reply(outcome.status, headers, body=outcome.body or b"", upstream_status=outcome.status)

    async def follow(self, wait_s: float) -> Reply | None:
        """A follower on this instance: the answer as it arrives (None: abandoned, run it yourself)."""
        if self._failed_before_it_came():
            # not stored, and the key is released next: wait for that, then run anew (as a retry just after
            # the release would) rather than be handed a failure it never waited for
            task = self._task
            if task is not None and not task.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await asyncio.shield(task)
            return None
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

    def _failed_before_it_came(self) -> bool:
        if not self._outcome.done():
            return False
        outcome = self._outcome.result()
        return isinstance(outcome, GatewayError) or (
            isinstance(outcome, Recording) and outcome.ended and outcome.error is not None)

    # ---------------------------------------------------------------- giving up when nobody waits

    def _reader_left(self) -> None:
        """Every reader of the stream left before its end (the leader's client among them)."""
        self._own_gone = True
        self._give_up_if_alone()

    def _give_up_if_alone(self) -> None:
        """The leader's client is gone: cancel the work unless a follower still waits for it."""
        if self._finish_alone or self._finished or self._checking or self._task is None or self._task.done():
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
        self.flights.watch(self)
        assert self._writes is not None
        try:
            await self._lead(work, storable, ttl_s, max_bytes)
        except asyncio.CancelledError as e:  # given up: its client left and nobody else waits (or the gateway stops)
            self._writes.settling = True
            if e.args == (SHUTDOWN,):
                cut = StreamCutAtShutdown()
                if self._rec is not None and not self._rec.ended:
                    self._rec.end(cut)
                    self._log(Broken(cut.code, cut.message, False))
                else:
                    self._log(ABANDONED)  # nothing shared yet: a follower elsewhere runs it itself
                self._publish(ShuttingDown() if self._rec is None else None)
            else:
                if self._rec is not None and not self._rec.ended:
                    self._rec.end(StreamBroken("abandoned by its client"))
                self._publish(None)
                self._log(ABANDONED)
            # the release must reach the store even if this task is cancelled again meanwhile (at shutdown a nested
            # lead is cancelled with its enclosing one): in a task of its own, which a shutdown waits for
            release = asyncio.get_running_loop().create_task(self._release())
            self.flights.tasks.add(release)
            release.add_done_callback(self.flights.tasks.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(release)
        except Exception:
            log.exception("%s: leader failed", self.flights.namespace)
            self._writes.settling = True
            await self._release()
        finally:
            self._writes.close()
            self._finished = True
            if self.flights.local.get(self.key) is self:
                del self.flights.local[self.key]
            if not self._outcome.done():  # a bug: never leave followers hanging
                self._publish(errors.InternalError("internal error"))

    async def _lead(self, work: Callable[[], Awaitable[Reply]], storable: StoreEntry, ttl_s: float, max_bytes: int) -> None:
        assert self._writes is not None
        try:
            reply = await work()
        except GatewayError as e:
            self._writes.settling = True
            self._publish(e)
            self._log(failed(e))
            await self._release()
            return
        except Exception:
            log.exception("internal error", extra={"fields": {"request_id": self.request_id}})
            err = errors.InternalError("internal error")
            self._writes.settling = True
            self._publish(err)
            self._log(failed(err))
            await self._release()
            return
        self._own_headers = reply.headers  # this client gets them all; what is shared and stored may not
        private = self.private
        headers = [(str(k), v) for k, v in reply.headers.items() if not private or k.lower() not in private]
        rec = self._rec = Recording(reply.status, headers, reply.chunks is not None, max_bytes)
        if rec.stream:
            rec.ttft_ms = reply.ttft_ms
            rec.on_idle = self._reader_left
            if not self._own_gone:
                self._own = Reader(rec)
        if not rec.stream:
            rec.body = reply.body or b""
            rec.ended = True
            self._writes.settling = True
            self._publish(rec)
            if storable(reply) and len(rec.body) <= max_bytes:
                await self._store(rec, ttl_s)  # the stored entry is what followers read
            else:
                self._log(Head(reply.status, headers, False))
                self._log(Body(rec.body))
                await self._release()
            return
        self._log(Head(reply.status, headers, True))
        self._publish(rec)
        error: GatewayError | None = None
        try:
            assert reply.chunks is not None
            async for chunk in reply.chunks:
                rec.add(chunk)
                if rec.keep:
                    self._log(Chunk(chunk))
                else:
                    if self._mirror:  # too large to share through the store: followers elsewhere stop here
                        self._log(Broken("stream_too_large", "the answer is too large to share; send the request again", False))
                        self._mirror = False
                    await rec.backpressure()
        except GatewayError as e:
            error = e if isinstance(e, StreamBroken) else StreamBroken(e.message)
        except Exception:
            log.exception("stream recording failed")
            error = StreamBroken("the upstream stream failed")
        finally:
            await reply.aclose()
        self._writes.settling = True
        rec.end(error)
        if error is not None:
            self._log(Broken(error.code, error.message, getattr(error, "reported", False)))
            await self._release()
        elif storable(reply) and rec.size <= max_bytes:
            self._log(END)
            await self._store(rec, ttl_s)
        else:
            self._log(END)
            await self._release()

    def _publish(self, outcome: Recording | GatewayError | None) -> None:
        if not self._outcome.done():
            self._outcome.set_result(outcome)
        if not self._mine.done():
            self._mine.set_result(outcome)

    # ---------------------------------------------------------------- store side

    def _log(self, item: Item) -> None:
        """Mirror one item to the store log, batched in the background: the relay to this
        client never waits for the store."""
        if not self._mirror:
            return
        self._pending.append(encode(item))
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:FLUSH_MAX], self._pending[FLUSH_MAX:]
                await self.flights.store.append(self.log_key, batch, LOG_TTL_S, notify=self.key)
        except StoreError as e:
            self._mirror = False
            self._share_failed = True  # (told to followers once the flight ends: ``_settle_later``)
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
        release = Write(self.key, None, self.lock, notify=self.key)
        if self.entry_key is not None:  # a refresh: the new entry beside the lock, which goes
            writes = [Write(self.entry_key, b"D" + encode(entry), ttl_s=left), release] if left > 0 else [release]
        else:  # the answer replaces the lock (a fenced write: not if the lock was taken over)
            writes = [Write(self.key, b"D" + encode(entry), self.lock, left, self.key)] if left > 0 else [release]
        assert self._writes is not None
        try:
            done = await self._writes.commit(writes)
        except StoreError as e:
            log.warning("%s: answer not stored yet, trying again: %s", self.flights.namespace, e)
            self._settle_later(writes)
            return
        self._tell_followers_of_the_gap()
        if self.entry_key is None and left > 0 and not done[0]:
            log.warning("%s: lock expired before the answer was stored (not stored)", self.flights.namespace)

    async def _release(self) -> None:
        await self._drain()
        assert self._writes is not None
        writes = [Write(self.key, None, self.lock, notify=self.key)]
        try:
            await self._writes.commit(writes)
        except StoreError as e:
            log.warning("%s: release failed, trying again: %s", self.flights.namespace, e)
            self._settle_later(writes)
            return
        self._tell_followers_of_the_gap()

    def _settle_later(self, writes: list[Write]) -> None:
        """The final writes the store did not take (it paused, or failed over): again, in the background, until
        it does — the answer stored, or the lock released — for as long as the lock could still hold. Each is
        fenced on the lock, so one the store did apply before it timed out is not applied twice. Otherwise every
        duplicate would wait on a lock nobody runs under, and the key run again once it expired."""
        async def commit() -> None:
            await self.flights.store.commit(writes)
            log.info("%s: the answer writes went through once the store answered again", self.flights.namespace)
            self._tell_followers_of_the_gap()

        self.flights.keep_trying(commit, max(self.lock_ttl_s, 1.0))

    def _tell_followers_of_the_gap(self) -> None:
        """The log stopped (the store did not take it): its followers end now with an error they can retry on
        (it is stored, or its key free), not at their idle timeout."""
        if self._share_failed:
            self._share_failed = False
            marker = encode(Broken("stream_interrupted", "the answer could not be shared through the store; send the "
                                   "request again", False))
            self.flights.spawn(self.flights.store.append(self.log_key, [marker], LOG_TTL_S, notify=self.key))

    def beat(self) -> None:
        """Renew the lock (``Flights.watch`` calls this every third of its TTL while the work runs)."""
        task = asyncio.ensure_future(self._renew())
        self.flights.tasks.add(task)
        task.add_done_callback(self.flights.tasks.discard)

    async def _renew(self) -> None:
        try:
            if not await self.flights.store.compare_and_set(self.key, self.lock, self.lock, self.lock_ttl_s):
                self.renew_due = math.inf  # taken over (we were presumed dead): the fenced write will refuse us
                return
        except StoreError:
            pass
        if self._own_gone and not self._finished:  # followers elsewhere may have left since
            self._give_up_if_alone()
