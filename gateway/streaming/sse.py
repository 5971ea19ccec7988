"""Server-sent events framing: where events end, and what one event says.

The relay forwards only whole events (``Aligner``): upstream chunks are usually
event-aligned already, so this costs a ``rfind`` per chunk and never delays a byte a
client could use. It matters when a stream breaks mid-event — the partial event is
dropped, so the in-band error (or a spliced continuation) that follows is not glued
onto half a JSON object, which an SDK would report as a parse error instead.

Events are separated by a blank line; lines end in ``\\n``, ``\\r\\n`` or a lone ``\\r`` (all three are
SSE's; a raw CR is never inside a line, so CR CR is a blank line).

Byte searches here run for every event, so they are ``find`` calls, not ``in``: on CPython 3.11
``needle in data`` first tries the needle as an integer, and raising and clearing that
``TypeError`` costs twice the search itself (≈ 1.5k instructions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Past this much data without an event boundary the upstream is not speaking SSE as we know it: a relay forwards
# what it has rather than hold it, a translation (which cannot read half an event) ends the stream in-band. One
# event can be large — a whole tool call in one Mistral chunk, a base64 partial image of a Responses stream —, so
# the bound is far above any real event, and only an event that big is ever held whole in memory.
MAX_PENDING = 16 << 20


class UnreadableEvent(Exception):
    """An event a stream's reader must understand and cannot: not JSON, or past ``MAX_PENDING`` unfinished."""


def unreadable(data: bytes) -> None:
    """An event's data a translation could not decode: nothing to say if it is blank (a keep-alive), else
    ``UnreadableEvent`` — dropped, the client would get a stream that looks complete with a part missing."""
    if data.strip():
        raise UnreadableEvent("an upstream event is not JSON")


def _boundary(buf: bytes) -> int:
    """Index just past the last complete event in ``buf`` (0 when there is none)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
    if end < len(buf) - 1:  # (not the usual chunk: a bare-CR stream's blank line is CR CR — CR CR LF when mixed)
        cr = buf.rfind(b"\r\r")
        if cr >= 0:
            end = max(end, cr + 3 if buf[cr + 2:cr + 3] == b"\n" else cr + 2)
    return end


class Aligner:
    """Turns arbitrary chunks into chunks of whole events."""

    __slots__ = ("pending", "strict")

    def __init__(self, strict: bool = False) -> None:
        self.pending = b""
        self.strict = strict  # (a translation's: an event it cannot have whole is an error, never passed on in halves)

    def feed(self, chunk: bytes) -> bytes:
        """The whole events now available (possibly b""); the rest waits for more data."""
        if not self.pending and chunk.endswith(b"\n\n"):  # the usual chunk: whole events, nothing held
            return chunk
        buf = self.pending + chunk if self.pending else chunk
        end = _boundary(buf)
        if end == len(buf):
            self.pending = b""
            return buf
        if end == 0 and len(buf) > MAX_PENDING:
            if self.strict:
                raise UnreadableEvent(f"an upstream event is larger than {MAX_PENDING >> 20} MB")
            self.pending = b""
            return buf
        self.pending = buf[end:]
        return buf[:end]


def events(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``(event name, data)`` for each event in a block of whole events.

    Multi-line data is joined with ``\\n`` as the SSE spec says; comments and events
    without data (keep-alives) are skipped. The name is b"" when the event has none.
    """
    if block.find(b"\r") >= 0:
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if block.startswith(b"data: ") and block.find(b"\n") == len(block) - 2:  # the usual chunk: one one-line event
        yield b"", block[6:-2]
        return
    for raw in block.split(b"\n\n"):
        if not raw:
            continue
        nl = raw.find(b"\n")
        if nl < 0:
            if raw.startswith(b"data: "):  # the common one-line OpenAI event
                yield b"", raw[6:]
                continue
        elif raw.startswith(b"event: ") and raw.startswith(b"data: ", nl + 1) and raw.find(b"\n", nl + 1) < 0:
            yield raw[7:nl], raw[nl + 7:]  # the common named one (Anthropic, Responses), without the line loop
            continue
        name, data = b"", []
        for line in raw.split(b"\n"):
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value
        if data:
            yield name, b"\n".join(data)


def feed_events(reader: Any, block: bytes) -> None:
    """``reader.feed(name, data)`` for each event of ``block`` (whole events): the usual chunk — one one-line
    ``data:`` event — without making an ``events`` generator for it (this runs for every chunk relayed)."""
    if block.startswith(b"data: ") and block.find(b"\n") == len(block) - 2 and block.find(b"\r") < 0:
        reader.feed(b"", block[6:-2])
        return
    for name, data in events(block):
        reader.feed(name, data)


def split_events(block: bytes) -> list[bytes]:
    """The raw bytes of each event in a block of whole events, separator included."""
    out: list[bytes] = []
    start = 0
    while start < len(block):
        lf = block.find(b"\n\n", start)
        crlf = block.find(b"\r\n\r\n", start)
        cr = block.find(b"\r\r", start)
        candidates = [i + 2 for i in (lf,) if i >= 0] + [i + 4 for i in (crlf,) if i >= 0]
        if cr >= 0:  # a bare-CR stream's blank line (CR CR LF when mixed)
            candidates.append(cr + 3 if block[cr + 2:cr + 3] == b"\n" else cr + 2)
        end = min(candidates) if candidates else len(block)
        out.append(block[start:end])
        start = end
    return out
