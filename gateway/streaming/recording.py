"""A leader's answer as it arrives, for every client that shares it (``gateway.state.flights``).

The leader of a flight pulls its upstream answer into a ``Recording``; its own client and
the followers on this instance each read it through a ``Reader`` from the first byte, at
their own pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from multidict import CIMultiDict

from gateway.errors import GatewayError, StreamBroken
from gateway.flow.exchange import Reply

_STUCK_S = 60.0  # a reader of a shared stream that does not move this long is let go
_WINDOW = 1 << 20  # past its size limit, a shared stream runs at most this far ahead of its slowest reader


def headers_of(pairs: list[tuple[str, str]] | list[list[str]]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in pairs)


class Recording:
    """A leader's answer as it arrives, readable from the start by any number of readers.

    Up to ``limit`` bytes every chunk is kept (the answer may be stored, and a follower that
    joins late still starts at the first byte). Past it the answer will not be stored: chunks
    every reader has passed are let go, new readers can no longer join (``joinable``), and the
    leader waits for the slowest reader whenever more than ``_WINDOW`` bytes are unread — the
    back-pressure a plain relay has — so memory stays bounded however large the stream.
    """

    __slots__ = ("status", "headers", "stream", "body", "chunks", "size", "ended", "error", "limit", "keep",
                 "base", "unread", "readers", "ttft_ms", "on_idle", "_evicted", "_changed", "_next_reader")

    def __init__(self, status: int, headers: list[tuple[str, str]], stream: bool, limit: int = 1 << 62) -> None:
        self.status = status
        self.headers = headers
        self.stream = stream
        self.ttft_ms: float | None = None  # the upstream's time to its first byte, when it streamed
        self.body: bytes | None = None
        self.chunks: list[bytes] = []  # chunks[0] is chunk number ``base`` of the stream
        self.size = 0  # bytes so far
        self.ended = False
        self.error: GatewayError | None = None
        self.limit = limit
        self.keep = True  # every chunk still held (the answer is under ``limit``)
        self.base = 0
        self.unread = 0  # bytes held in ``chunks``
        self.readers: dict[int, int] = {}  # reader id → the next chunk number it reads
        self.on_idle: Callable[[], None] | None = None  # called when the last reader leaves before the end
        self._evicted: set[int] = set()
        self._changed = asyncio.Event()
        self._next_reader = 0

    @property
    def joinable(self) -> bool:
        return self.keep or not self.stream

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.unread += len(chunk)
        if self.keep and self.size > self.limit:
            self.keep = False
        if not self.keep:
            self._trim()
        self._wake()

    def _trim(self) -> None:
        slowest = min(self.readers.values(), default=self.base + len(self.chunks))
        drop = slowest - self.base
        if drop > 0:
            self.unread -= sum(len(c) for c in self.chunks[:drop])
            del self.chunks[:drop]
            self.base = slowest

    async def backpressure(self) -> None:
        """Past the limit: wait while the slowest reader is more than ``_WINDOW`` bytes behind.
        A reader that does not move for ``_STUCK_S`` is let go (its client gets an error)."""
        while not self.keep and self.readers and self.unread > _WINDOW:
            try:
                async with asyncio.timeout(_STUCK_S):
                    await self._changed.wait()
            except TimeoutError:
                slowest = min(self.readers.values())
                for rid in [r for r, i in self.readers.items() if i == slowest]:
                    del self.readers[rid]
                    self._evicted.add(rid)
                self.idle_check()
            self._trim()

    def end(self, error: GatewayError | None = None) -> None:
        self.ended, self.error = True, error
        self.on_idle = None  # (never called once ended; it is its lead's method, and the lead holds this: a cycle)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def idle_check(self) -> None:
        if not self.readers and not self.ended and self.on_idle is not None:
            self.on_idle()

    def reply(self) -> Reply:
        if not self.stream:
            return Reply(self.status, headers_of(self.headers), body=self.body or b"", upstream_status=self.status)
        reply = Reply(self.status, headers_of(self.headers), chunks=Reader(self), upstream_status=self.status)
        reply.ttft_ms = self.ttft_ms
        return reply


class Reader:
    """One reader of a Recording, registered from its creation (so the chunks it has not read
    yet are kept) until it is read to the end or closed."""

    __slots__ = ("rec", "rid", "i")

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.rid = rec._next_reader
        rec._next_reader += 1
        self.i = rec.base
        rec.readers[self.rid] = self.i

    def __aiter__(self) -> Reader:
        return self

    async def __anext__(self) -> bytes:
        rec = self.rec
        while True:
            if self.rid not in rec.readers:
                if self.rid in rec._evicted:
                    raise StreamBroken("this client fell too far behind the shared stream")
                raise StopAsyncIteration  # closed
            offset = self.i - rec.base
            if offset < len(rec.chunks):
                self.i += 1
                rec.readers[self.rid] = self.i
                if not rec.keep:
                    rec._wake()  # the leader may be waiting for us to catch up
                return rec.chunks[offset]
            if rec.ended:
                self._leave()
                if rec.error is not None:
                    raise rec.error
                raise StopAsyncIteration
            await rec._changed.wait()

    def _leave(self) -> None:
        rec = self.rec
        if rec.readers.pop(self.rid, None) is not None:
            rec._wake()
            rec.idle_check()

    async def aclose(self) -> None:
        self._leave()


