"""Content codings (RFC 9110 §8.4): reading a body a client or an upstream compressed.

The gateway forwards bodies as they were sent. It decodes one only when it must read it:
a request body that a budget, a cap or a token limit has to see (``policies.budget``), and
an upstream error body that must be scrubbed of keys before a client sees it
(``gateway.scrub``). Decoding is bounded: output past ``limit`` bytes raises ``TooLarge``
(a small zip bomb costs nothing), a coding the gateway cannot read raises ``Unsupported``,
and bytes that do not decode raise ``Corrupt``.

gzip and deflate come with Python; br needs ``Brotli`` and zstd ``backports.zstd`` (both
installed with the gateway; without them those codings are ``Unsupported``).
"""

from __future__ import annotations

import zlib
from typing import Any

try:
    import brotli
except ImportError:  # pragma: no cover - an install without the optional codec
    brotli = None
try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
except ImportError:
    try:
        from backports import zstd  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover
        zstd = None

IDENTITY = frozenset(("", "identity"))
_STEP = 1 << 16  # output produced per decompress call, so the limit is checked as it grows


class Unsupported(Exception):
    """A content coding the gateway cannot decode."""


class TooLarge(Exception):
    """The decoded body is larger than the limit."""


class Corrupt(Exception):
    """The bytes are not valid data of their coding."""


def codings(header: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` value in the order they were applied (identity dropped)."""
    if not header:
        return []
    return [c for c in (p.strip().lower() for p in header.split(",")) if c not in IDENTITY]


def supported(header: str | None) -> bool:
    try:
        for coding in codings(header):
            _new(coding)
    except Unsupported:
        return False
    return True


class Decoder:
    """Decodes one coded body as its pieces arrive: ``feed(data)`` then ``flush()``."""

    def __init__(self, header: str, limit: int) -> None:
        self._stages = [_new(c) for c in reversed(codings(header))]  # the last coding applied is undone first
        self.limit = limit
        self.size = 0

    def feed(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = stage.feed(data, self.limit - self.size)
        self.size += len(data)
        return data

    def flush(self) -> bytes:
        data = b""
        for stage in self._stages:
            data = stage.feed(data, self.limit - self.size) + stage.flush()
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge()
        return data


MAX_DECODED_ANSWER = 64 << 20


def mark_decoded(headers: Any) -> None:
    """The headers of a body now sent on decoded."""
    del headers["Content-Encoding"]
    headers.popall("Content-Length", None)


def decode_answer(reply: Any) -> None:
    """A complete answer the gateway must read (``Reply``), decoded — an LLM upstream that compresses
    although the gateway asked for identity. One that cannot be decoded is left as it came."""
    try:
        reply.body = decode(reply.body or b"", reply.headers["Content-Encoding"], MAX_DECODED_ANSWER)
    except (Unsupported, Corrupt, TooLarge):
        return
    mark_decoded(reply.headers)


def decode(body: bytes, header: str, limit: int) -> bytes:
    """A whole coded body, decoded; raises ``Unsupported``, ``TooLarge`` or ``Corrupt``."""
    decoder = Decoder(header, limit)
    return decoder.feed(body) + decoder.flush()


class _Zlib:
    """gzip (several members too) and deflate (zlib-wrapped as RFC 9110 says, or raw as some servers send it)."""

    def __init__(self, coding: str) -> None:
        self.gzip = coding in ("gzip", "x-gzip")
        self.obj: Any = zlib.decompressobj(31) if self.gzip else None

    def feed(self, data: bytes, room: int) -> bytes:
        if self.obj is None:  # deflate: a zlib header says which of the two it is
            if not data:
                return b""
            self.obj = zlib.decompressobj(15 if _zlib_header(data) else -15)
        out = bytearray()
        try:
            while data:
                piece = self.obj.decompress(data, _STEP)
                out += piece
                if len(out) > room:
                    raise TooLarge()
                data = self.obj.unconsumed_tail
                if self.obj.eof:
                    rest = self.obj.unused_data
                    if not self.gzip or not rest.strip(b"\0"):
                        break
                    self.obj = zlib.decompressobj(31)  # another gzip member follows
                    data = rest
        except zlib.error as e:
            raise Corrupt(str(e)) from None
        return bytes(out)

    def flush(self) -> bytes:
        if self.obj is None:
            return b""
        if not self.obj.eof and self.gzip:
            raise Corrupt("truncated gzip data")
        try:
            return self.obj.flush()
        except zlib.error as e:
            raise Corrupt(str(e)) from None


class _Brotli:
    def __init__(self) -> None:
        self.obj = brotli.Decompressor()

    def feed(self, data: bytes, room: int) -> bytes:
        if not data:
            return b""
        try:
            out = bytearray(self.obj.process(data, output_buffer_limit=_STEP))
            while len(out) <= room and not self.obj.is_finished():  # drain what this input holds, a step at a time
                piece = self.obj.process(b"", output_buffer_limit=_STEP)
                if not piece:
                    break
                out += piece
        except brotli.error as e:
            raise Corrupt(str(e)) from None
        if len(out) > room:
            raise TooLarge()
        return bytes(out)

    def flush(self) -> bytes:
        if not self.obj.is_finished():
            raise Corrupt("truncated brotli data")
        return b""


class _Zstd:
    def __init__(self) -> None:
        self.obj = zstd.ZstdDecompressor()

    def feed(self, data: bytes, room: int) -> bytes:
        out = bytearray()
        try:
            while True:
                if self.obj.eof:
                    data = self.obj.unused_data + data
                    if not data:
                        break
                    self.obj = zstd.ZstdDecompressor()  # another frame follows
                if not data and self.obj.needs_input:
                    break
                out += self.obj.decompress(data, max_length=_STEP)
                data = b""
                if len(out) > room:
                    raise TooLarge()
        except zstd.ZstdError as e:
            raise Corrupt(str(e)) from None
        return bytes(out)

    def flush(self) -> bytes:
        if not self.obj.eof:
            raise Corrupt("truncated zstd data")
        return b""


def _zlib_header(data: bytes) -> bool:
    """RFC 1950: compression method 8 in the first byte, the first two bytes a multiple of 31."""
    if data[0] & 0x0F != 8:
        return False
    return len(data) < 2 or (data[0] << 8 | data[1]) % 31 == 0


def _new(coding: str) -> Any:
    if coding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(coding)
    if coding == "br" and brotli is not None:
        return _Brotli()
    if coding == "zstd" and zstd is not None:
        return _Zstd()
    raise Unsupported(coding)
