"""Every deadline of one target's upstream calls on one timer (used by ``gateway.upstream.transport``)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp


class Deadlines:
    """The deadlines of one transport's calls, on one timer: an attempt waiting in ``send`` (connect, headers, a
    complete body or a stream's first byte within its timeout), a stream the client asked for that may never be
    silent longer than the idle timeout, and a long body relayed as it comes within the attempt's timeout.

    aiohttp's deadlines (``ClientTimeout.total``, ``sock_read``) and ``asyncio.timeout`` make a timer for each request,
    and ``sock_read`` makes and cancels one for every chunk received. Here a call notes its deadline and the timer
    fires at the earliest one — with calls ending in time, about once per timeout, never per request or per chunk.
    A late attempt is cancelled (``send`` answers ``UpstreamTimeout``); a stall or a late body is put into the
    stream (``Stalled``, ``Late``) as a cut is. Only a stream's wait is timed: a chunk already read is not
    silence."""

    __slots__ = ("sending", "_timed_out", "open", "closing", "_timer", "_due")

    def __init__(self) -> None:
        self.sending: dict[asyncio.Task[Any], float] = {}  # attempt → its deadline (loop time)
        self._timed_out: set[asyncio.Task[Any]] = set()
        self.open: dict[aiohttp.ClientResponse, Wait] = {}  # relayed streams
        self.closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf

    def start(self, task: asyncio.Task[Any], timeout_s: float) -> None:
        due = self.sending[task] = asyncio.get_running_loop().time() + timeout_s
        if due < self._due:
            self._arm(due)

    def done(self, task: asyncio.Task[Any]) -> None:
        del self.sending[task]
        if self._timed_out:
            self._timed_out.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Was ``task`` cancelled for its deadline (and by nobody else)? Takes that cancellation back."""
        if task not in self._timed_out:
            return False
        self._timed_out.discard(task)
        task.uncancel()
        return not task.cancelling()

    def add(self, resp: aiohttp.ClientResponse, idle_s: float | None, deadline: float = math.inf) -> Wait:
        wait = self.open[resp] = Wait(resp, idle_s if idle_s else math.inf, deadline)
        if self.closing:  # (the transport stopped before this relay began)
            resp.content.set_exception(Ended())
        elif deadline < self._due:
            self._arm(deadline)
        return wait

    def waiting(self, wait: Wait) -> None:
        """``wait`` starts waiting for its next chunk now."""
        wait.since = now = asyncio.get_running_loop().time()
        due = now + wait.idle_s
        if due < self._due:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        self._timer = asyncio.get_running_loop().call_at(due, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # (a timer may fire a hair early)
        soonest = math.inf
        for task, due in list(self.sending.items()):
            if due <= now:
                if task not in self._timed_out and not task.done():
                    self._timed_out.add(task)
                    task.cancel()
            elif due < soonest:
                soonest = due
        for wait in list(self.open.values()):
            if wait.deadline <= now:
                wait.deadline = wait.since = math.inf
                wait.resp.content.set_exception(Late())
                continue
            due = wait.since + wait.idle_s
            if due <= now:
                wait.since = math.inf
                wait.resp.content.set_exception(Stalled())
            elif due < soonest:
                soonest = due
            if wait.deadline < soonest:
                soonest = wait.deadline
        self._due = soonest
        self._timer = loop.call_at(soonest, self._check) if soonest < math.inf else None

    def end(self) -> None:
        """End every stream relayed now, and any that starts after; stop every attempt waiting for its answer in a
        stream already relayed (a ``stream_recovery`` continuation) that no cut stops yet (the gateway stops)."""
        self.closing = True
        for resp in list(self.open):
            resp.content.set_exception(Ended())
        for task in list(self.sending):
            if not task.cancelling():
                task.cancel(CUT_SEND)


class Wait:
    __slots__ = ("resp", "idle_s", "deadline", "since")

    def __init__(self, resp: aiohttp.ClientResponse, idle_s: float, deadline: float) -> None:
        self.resp = resp
        self.idle_s = idle_s
        self.deadline = deadline  # (loop time) the whole body's; inf: none
        self.since = math.inf  # (loop time) when it began waiting for a chunk; inf: not waiting


class Stalled(Exception):
    """Put into a relayed stream by ``Deadlines`` when it waited longer than its idle timeout."""


class Late(Exception):
    """Put into a relayed body by ``Deadlines`` when the attempt's deadline passed before its end."""


class Ended(aiohttp.ClientConnectionError):
    """Put into a relayed stream by ``Deadlines.end`` (the gateway stops)."""


# why an attempt waiting for its answer in a stream already relayed is cancelled at the end of the shutdown's grace
CUT_SEND = "reliapi: the shutdown's grace period is over (an attempt in a relayed stream)"
