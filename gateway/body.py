"""Reading a request body: bounded in size (413) and in the client's silence (408).

A handler reads the whole body before anything goes upstream (``gateway.handlers``).
A client that sends its headers and then trickles or stops sending the body would
otherwise hold the connection and a handler for as long as it likes (slowloris on
the body). Most bodies are already buffered when the handler starts: those are taken
as they are, and a timer exists only while the gateway actually waits for bytes.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.errors import PayloadTooLarge, RequestTimeout


async def read_body(request: web.BaseRequest, max_bytes: int, idle_timeout_s: float, max_mb_for_message: float) -> bytes:
    """The body, at most ``max_bytes``; ``idle_timeout_s``: the longest silence between its bytes."""
    # (Content-Length together with Transfer-Encoding never gets here: the HTTP parser rejects it.)
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_mb_for_message:g} MB")
    if not request.body_exists:
        return b""
    content = request.content
    first = content.read_nowait()  # the usual case: the whole body is already here
    if len(first) > max_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_mb_for_message:g} MB")
    if content.at_eof():
        return first
    content.set_read_chunk_size(max_bytes)  # fewer pause/resume rounds on large uploads (as request.read())
    chunks: list[bytes] = [first] if first else []
    size = len(first)
    while True:
        chunk = content.read_nowait()  # everything buffered so far; no timer
        if not chunk:
            if content.at_eof():
                break
            try:
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await content.readany()
            except TimeoutError:
                raise _stalled(request, idle_timeout_s) from None
            if not chunk:
                break
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is larger than {max_mb_for_message:g} MB")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _stalled(request: web.BaseRequest, idle_timeout_s: float) -> RequestTimeout:
    """The 408 for a client that stopped sending its body; its connection ends after the answer."""
    # The rest of this body is never read: without EOF aiohttp would wait (linger) for it after the
    # answer, and the connection must not serve another request whose start is lost in this body.
    request.content.feed_eof()
    request.protocol.close()
    return RequestTimeout(f"the request body stalled: no bytes for {idle_timeout_s:g} s",
                          headers={"Connection": "close"})
