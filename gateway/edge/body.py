"""Reading a request body: bounded in size (413) and in the client's silence (408); decoded when compressed.

A handler reads the whole body before anything goes upstream (``gateway.handlers``).
A client that sends its headers and then trickles or stops sending the body would
otherwise hold the connection and a handler for as long as it likes (slowloris on
the body). Most bodies are already buffered when the handler starts: those are taken
as they are, and a timer exists only while the gateway actually waits for bytes.

A compressed JSON body (``Content-Encoding: gzip``, …) is decoded (``decoded``), so that routing,
limits, budgets and caps read what the upstream will; it then goes upstream decoded.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import encoding, offload
from gateway.errors import InvalidRequest, PayloadTooLarge, RequestTimeout


async def read_body(
    request: web.BaseRequest, max_bytes: int, idle_timeout_s: float, max_mb_for_message: float,
    deadline_s: float = math.inf,
) -> bytes:
    """The body, at most ``max_bytes``; ``idle_timeout_s``: the longest silence between its bytes;
    ``deadline_s``: how long all of it may take (a byte now and then cannot hold a connection for ever)."""
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
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        chunk = content.read_nowait()  # everything buffered so far; no timer
        if not chunk:
            if content.at_eof():
                break
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(min(idle_timeout_s, max(left, 0.0))):
                    chunk = await content.readany()
            except TimeoutError:
                raise _stalled(request, f"no bytes for {idle_timeout_s:g} s" if left > idle_timeout_s
                               else f"not complete within {deadline_s:g} s") from None
            if not chunk:
                break
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is larger than {max_mb_for_message:g} MB")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _stalled(request: web.BaseRequest, why: str) -> RequestTimeout:
    """The 408 for a client that stopped sending its body; its connection ends after the answer."""
    # The rest of this body is never read: without EOF aiohttp would wait (linger) for it after the
    # answer, and the connection must not serve another request whose start is lost in this body.
    request.content.feed_eof()
    request.protocol.close()
    return RequestTimeout(f"the request body stalled: {why}", headers={"Connection": "close"})


def is_json(request: web.BaseRequest, *, by_default: bool) -> bool:
    """/v1 bodies are JSON unless they are uploads; elsewhere only when labelled JSON."""
    ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
    if by_default:
        return not ctype.startswith(("multipart/", "application/octet-stream", "audio/"))
    return "json" in ctype


async def decoded(request: web.BaseRequest, body: bytes, max_bytes: int, *, json_by_default: bool) -> tuple[bytes, Any]:
    """A compressed JSON body decoded (at most ``max_bytes`` of it), with the headers it now goes upstream
    with. A coding the gateway does not read is left as it came (a policy that must read it refuses it)."""
    headers = request.headers
    coding = headers.get(hdrs.CONTENT_ENCODING)
    if coding is None or not body or not is_json(request, by_default=json_by_default):
        return body, headers
    try:
        body = await offload.run(encoding.decode, body, coding, max_bytes)  # (a large body: off the event loop)
    except encoding.Unsupported:
        return body, headers
    except encoding.Corrupt:
        raise InvalidRequest(f"the request body is not valid {coding} data (Content-Encoding)") from None
    except encoding.TooLarge:
        raise PayloadTooLarge(f"request body is larger than {max_bytes / (1 << 20):g} MB once decoded") from None
    plain = CIMultiDict(headers)
    del plain[hdrs.CONTENT_ENCODING]
    plain.popall(hdrs.CONTENT_LENGTH, None)
    return body, CIMultiDictProxy(plain)
