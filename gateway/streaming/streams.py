"""Honest streams: a relayed SSE stream is complete, finalised, or reported broken — never cut quietly.

``watch`` sits between the upstream relay and everything downstream of it. It forwards
whole events only (``gateway.streaming.sse.Aligner``), lets the format's ``StreamReader`` read each
one, and decides how the stream ends:

- the format's end marker arrived (``[DONE]``, ``message_stop``): the stream ends as sent;
- the answer is complete but the marker is missing — the upstream closed, was cut, or went
  quiet after the last choice finished (and the usage chunk, if the client asked for it, came): the
  marker is added and the stream ends at once, not after ``stream_idle_timeout_ms``;
- the upstream sent its own in-band error event: it was relayed as sent, and the stream
  ends there (``StreamBroken(reported=True)``: nothing is added to it);
- anything else — EOF, a cut or a stall before the answer was complete — is
  ``StreamBroken``: the writer ends the client's stream with an in-band error event in
  its dialect, or ``stream_recovery: continue`` picks it up.

An event whose data cannot be parsed is relayed untouched; reading it is best effort and
never breaks the stream. Usage seen on the way goes into the access log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec

from gateway.errors import StreamBroken
from gateway.flow.exchange import Exchange
from gateway.streaming.sse import Aligner, events, feed_events, split_events
from providers.base import StreamReader

# How long a settled answer may wait for its end marker before the gateway adds it.
SETTLE_GRACE_S = 0.5


def read_head(reader: StreamReader, aligner: Aligner, head: bytes) -> bytes:
    """Feed the first chunk (already received) to the reader; returns the whole events in it."""
    out = aligner.feed(head)
    if out:
        feed_events(reader, out)
    return out


def has_event(block: bytes) -> bool:
    """Whether ``block`` (whole events) holds an event with data — not only comments (``: PROCESSING``, which
    OpenRouter sends while a model has not begun) or keep-alives."""
    for _ in events(block):
        return True
    return False


async def read_preamble(reader: StreamReader, aligner: Aligner, it: AsyncIterator[bytes], first: bytes,
                        timeout_s: float) -> bytes:
    """Go on reading the head while it holds only lifecycle events (``StreamReader.preamble``: a Responses
    stream opens with ``response.created`` at once, an Anthropic one with ``message_start``, whatever follows) or
    only comments: the first byte of an answer is the
    first event that is not one, and until it comes nothing is sent to the client — a stall is a timeout
    of the first byte, an error event a failure still retried or fallen back from. Returns the events read
    (``first`` and more). Raises ``TimeoutError`` after ``timeout_s``, ``StreamBroken`` for a cut or a stall."""
    seen = has_event(first)  # comments only so far: no answer has begun either
    async with asyncio.timeout(timeout_s) as timer:
        while (reader.preamble or not seen) and reader.error is None and not reader.done:
            if seen and not reader.preamble_timed:
                timer.reschedule(None)  # its first event came: from here on its idle timeout (in ``it``) times it
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                break
            more = read_head(reader, aligner, chunk)
            seen = seen or has_event(more)
            first += more
    return first


async def watch(
    chunks: AsyncIterator[bytes], reader: StreamReader, aligner: Aligner, first: bytes, *,
    skip_head: bool, ex: Exchange, target: str, hold_errors: bool = False, strip_usage: bool = False,
) -> AsyncIterator[bytes]:
    """Relay ``chunks`` (whose first item, the head, was read by ``read_head`` and gave ``first``).

    ``hold_errors``: an upstream in-band error event is not relayed but raised as
    ``StreamBroken``, so a continuation can take over (``stream_recovery: continue``).
    ``strip_usage``: the gateway asked for the usage chunk, the client did not: it is read,
    not relayed.
    """
    it = chunks.__aiter__()
    # the client asked for the usage chunk itself (``stream_options.include_usage``): without it the answer is not
    # complete, so a stream that ends before it is broken, not finalised (the one the gateway asked for is its own)
    usage_owed = ex.include_usage
    head_error = reader.error is not None  # an error in the head was relayed: it is the client's answer
    hold_errors = hold_errors and not head_error
    try:
        if skip_head:
            await it.__anext__()  # the head itself; read_head already produced ``first`` from it
        if first:
            yield first
        while True:
            try:
                if reader.finished and reader.settled and not reader.done:  # (finished first: settled is a property)
                    async with asyncio.timeout(SETTLE_GRACE_S):
                        chunk = await it.__anext__()
                else:
                    chunk = await it.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:  # settled and quiet: the end marker is all that is missing
                yield reader.terminator
                return
            except StreamBroken as e:
                if reader.finished and not reader.done and reader.error is None and (reader.usage_seen or not usage_owed):
                    yield reader.terminator  # cut or stalled after the answer was complete
                    return
                raise type(e)(e.message, target=target, stalled=e.stalled) from None  # (its kind kept: a shutdown's cut)
            out = aligner.feed(chunk)
            if not out:
                continue
            if hold_errors:
                out = _until_error(reader, out)
                if reader.error is not None:
                    if out:
                        yield out
                    raise StreamBroken(f"upstream stream failed: {reader.error}", target=target)
                if strip_usage and out.find(b'"usage"') >= 0:  # (find: see gateway.streaming.sse)
                    out = strip_usage_chunks(out)
            elif strip_usage and out.find(b'"usage"') >= 0:  # the gateway asked for the usage chunk: read, not relayed
                out = _without_asked_usage(reader, out)
            else:
                feed_events(reader, out)
            if out:
                yield out
        tail = aligner.pending
        if tail:  # a last event without its blank line: relayed as sent
            for name, data in events(tail + b"\n\n"):
                reader.feed(name, data)
            yield tail
        if reader.done:
            return
        if reader.error is not None:  # relayed as the upstream sent it: nothing to add
            raise StreamBroken(f"upstream stream failed: {reader.error}", target=target, reported=True)
        if reader.finished and (reader.usage_seen or not usage_owed):
            yield reader.terminator
            return
        raise StreamBroken("upstream stream ended before the answer was complete", target=target)
    finally:
        if reader.prompt_tokens is not None:
            ex.log["prompt_tokens"] = reader.prompt_tokens
        if reader.completion_tokens is not None:
            ex.log["completion_tokens"] = reader.completion_tokens
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()


# Once asked for the usage chunk, OpenAI also puts ``"usage":null`` in every other chunk: the client that did not
# ask gets its chunks without it, byte for byte as it would have. (Safe on the bytes: inside a JSON string every
# quote is escaped, so ``,"usage":null`` with bare quotes is only ever the member itself.)
USAGE_NULL = b',"usage":null'
USAGE_NULL_SPACED = b', "usage": null'  # (an OpenAI-compatible server that writes JSON with spaces: vLLM, Python's json)


async def whole_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An event stream of a format the gateway does not read, relayed in whole events: cut mid-event, the partial
    one is dropped, so the in-band error that follows is an event of its own; a clean end relays its last bytes as
    sent."""
    aligner = Aligner()
    it = chunks.__aiter__()
    try:
        async for chunk in it:
            out = aligner.feed(chunk)
            if out:
                yield out
        if aligner.pending:
            yield aligner.pending
    finally:
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()


def strip_usage_chunks(out: bytes) -> bytes:
    """``out`` without OpenAI's usage-only chunk (``"choices": []`` and a ``usage``) and the ``"usage":null`` of
    the others."""
    if out.find(b'"usage"') < 0:
        return out
    out = out.replace(USAGE_NULL, b"")
    if out.find(b'"usage"') < 0:
        return out
    out = out.replace(USAGE_NULL_SPACED, b"")
    kept = []
    for raw in split_events(out):
        if not any(_usage_only(data) for _, data in events(raw)):
            kept.append(raw)
    return b"".join(kept)


def _without_asked_usage(reader: StreamReader, out: bytes) -> bytes:
    """Feed the events of ``out`` to ``reader``; return them as they would have been had the gateway not asked
    for the usage chunk (``USAGE_NULL``)."""
    out = out.replace(USAGE_NULL, b"")
    if out.find(b'"usage"') < 0:
        feed_events(reader, out)
        return out
    return _read_without_usage(reader, out.replace(USAGE_NULL_SPACED, b""))


def _read_without_usage(reader: StreamReader, out: bytes) -> bytes:
    """Feed the events of ``out`` to ``reader``; return them without the usage-only chunk (told by the reader that
    decoded it, where it says: ``StreamReader.marks_usage_only``)."""
    kept = []
    for raw in split_events(out):
        usage_only = False
        for name, data in events(raw):
            reader.feed(name, data)
            usage_only = usage_only or (reader.usage_only if reader.marks_usage_only else _usage_only(data))
        if not usage_only:
            kept.append(raw)
    return b"".join(kept)


def _usage_only(data: bytes) -> bool:
    if data.find(b'"usage"') < 0:
        return False
    try:
        chunk = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False
    return isinstance(chunk, dict) and not chunk.get("choices") and bool(chunk.get("usage"))


def _until_error(reader: StreamReader, out: bytes) -> bytes:
    """Feed events one by one; return the bytes before the first error event (all if none)."""
    kept = 0
    for raw in split_events(out):
        for name, data in events(raw):
            reader.feed(name, data)
        if reader.error is not None:
            return out[:kept]
        kept += len(raw)
    return out
