"""What comes back for an ``Exchange``: either complete (status, headers, body) or a stream
(status, headers, an async iterator of chunks that already yielded its first chunk's worth of
waiting — see ``gateway.upstream.transport``). Policies may wrap a stream (tee it into a cache,
count its usage) but never write to aiohttp: ``gateway.edge.writer`` is the only place that does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict

if TYPE_CHECKING:
    from gateway.failures import Failure
    from providers.base import StreamReader

CloseCallback = Callable[[BaseException | None], None]


class Reply:
    """A complete response (``body``) or a stream (``chunks``); never both.

    ``failure`` is the provider's classification of an error answer (None for a good
    one); ``head`` is the first chunk of a stream, already received, which ``chunks``
    yields first — a policy may look at it (an error in the first SSE event) without
    consuming the stream. ``reader`` is the stream's format reader (what the client has
    been sent so far, for ``stream_recovery: continue``).
    """

    __slots__ = ("status", "headers", "body", "chunks", "upstream_status", "ttft_ms", "failure", "head", "reader",
                 "_closers")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str],
        *,
        body: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
        upstream_status: int | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.chunks = chunks
        self.upstream_status = upstream_status
        self.ttft_ms: float | None = None
        self.failure: Failure | None = None
        self.head = b""
        self.reader: StreamReader | None = None  # set when the stream's format is known (gateway.streaming.streams)
        self._closers: list[CloseCallback] | None = None

    @property
    def is_stream(self) -> bool:
        return self.chunks is not None

    def on_close(self, callback: CloseCallback) -> None:
        """Run ``callback(error)`` exactly once when a stream is done with: read to its end
        (``error`` None), broken (the exception), or abandoned before its end — the client
        went away, or a policy let it go (an ``asyncio.CancelledError``). For a complete
        reply it runs at once, with None."""
        if self.chunks is None:
            callback(None)
            return
        if self._closers is None:
            self._closers = [callback]
            self.chunks = _Guarded(self.chunks, self._closers)
        else:
            self._closers.append(callback)

    async def aclose(self) -> None:
        """Release the upstream side of a stream the client will not read to the end."""
        close = getattr(self.chunks, "aclose", None)
        if close is not None:
            await close()

    async def settled(self) -> Reply:
        """A failed answer set aside while another attempt runs: a stream becomes the complete
        reply of what it had sent (its head: the error event), and its connection is let go."""
        if self.chunks is None:
            return self
        await self.aclose()
        done = Reply(self.status, self.headers, body=self.head, upstream_status=self.upstream_status)
        done.failure, done.ttft_ms = self.failure, self.ttft_ms
        return done


class _Guarded:
    """Wraps a stream so its close callbacks run once, however the stream ends."""

    __slots__ = ("_it", "_closers", "_done")

    def __init__(self, it: AsyncIterator[bytes], closers: list[CloseCallback]) -> None:
        self._it = it
        self._closers = closers
        self._done = False

    def __aiter__(self) -> _Guarded:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self._finish(None)
            raise
        except Exception as e:
            self._finish(e)
            raise
        except BaseException:  # cancelled: the client went away
            self._finish(asyncio.CancelledError())
            raise

    async def aclose(self) -> None:
        try:
            close = getattr(self._it, "aclose", None)
            if close is not None:
                await close()
        finally:
            self._finish(asyncio.CancelledError())  # a no-op when the stream already ended

    def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        closers = self._closers
        for callback in closers:
            callback(error)
        closers.clear()  # (they close over the reply that holds this list: no cycle left for the collector)
