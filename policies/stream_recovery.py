"""``stream_recovery: continue`` (SPEC §5): a stream cut or stalled mid-answer is finished elsewhere.

When the upstream's stream breaks after the client has received part of the answer, the
gateway asks the same target again — else the next in the fallback chain — for the same
request with the text received so far as an assistant prefill, and splices that answer's
events into the client's stream: one complete stream, as if nothing had happened (the
provider's ``StreamReader.splicer`` renumbers ids and content blocks and drops the
duplicate start events).

Continuing needs a prefill the model will extend: Anthropic continues a final assistant
turn natively, Mistral with ``prefix: true`` (which is sent), vLLM-style servers do; the
OpenAI API accepts the request but may answer it as a new turn. Only a plain text answer
with one choice is continued (no tool calls, no thinking blocks).

Which target continues: a stream that *stalled* (silent for ``stream_idle_timeout_ms``) is
never asked of the target that stalled — it would most likely keep the client waiting
another whole idle window — so it goes straight to the next in the chain; with a healthy
fallback the client's stream completes within about 1.5 idle windows, and without one it
ends at 1 with the in-band error. A stream that was *cut* is asked of the same target
first. A candidate that refuses the prefill (any non-2xx answer), fails, or whose
continuation breaks before it added anything (its own in-band error event included, held
whatever its target's ``stream_recovery`` says) is skipped for the next one (a stalled one
also drops out); once a continuation has added text, its breaking ends the client's
stream. When none can continue, the client's stream ends with one in-band error naming
the original failure — not the refusal of the attempt to repair it; when the gateway's
shutdown grace ran out first, with the shutdown's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.errors import GatewayError, ShuttingDown, StreamBroken, StreamCutAtShutdown
from gateway.flow.exchange import Exchange, Reply
from gateway.observe.events import Events, StreamRecovered
from gateway.streaming.sse import events as sse_events
from gateway.streaming.sse import split_events
from providers.base import Splicer, StreamReader

if TYPE_CHECKING:
    from gateway.flow.chain import Handler
    from gateway.upstream.targets import Target

Entry = tuple["Target", "str | None"]


def recovering(
    ex: Exchange, reply: Reply, candidates: list[Entry], client_body: bytes, client_model: str | None,
    call_next: Handler, events: Events,
) -> AsyncIterator[bytes]:
    """Relay ``reply``'s chunks; if they break, continue on ``candidates`` (the answering target first).

    The reply's stream and reader are taken now: the caller replaces ``reply.chunks`` with the result."""
    chunks, reader = reply.chunks, reply.reader
    assert chunks is not None and reader is not None
    return _recovering(ex, chunks, reader, candidates, client_body, client_model, call_next, events)


async def _recovering(
    ex: Exchange, chunks: AsyncIterator[bytes], reader: StreamReader, candidates: list[Entry], client_body: bytes,
    client_model: str | None, call_next: Handler, events: Events,
) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
        return
    except StreamBroken as e:
        if e.reported or not reader.recoverable or isinstance(e, StreamCutAtShutdown):  # (the gateway stops)
            raise
        broken = e
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    # a stalled target would likely stall again: the next one continues (a cut one is asked again first)
    answering = candidates[0]
    remaining = candidates[1:] if broken.stalled else candidates
    while True:
        continuation, remaining = await _continue(ex, reader, broken, answering, remaining, client_body,
                                                  client_model, call_next, events)
        if continuation is None:
            raise StreamBroken(f"{broken.message} (stream_recovery could not continue it)", target=broken.target)
        splicer = reader.splicer()
        added = False
        try:
            async for chunk in continuation.chunks:  # type: ignore[union-attr]
                out = _splice(splicer, chunk)
                if out:
                    added = True
                    yield out
            return
        except StreamBroken as e:
            if added:
                raise StreamBroken(f"{broken.message}; its continuation failed too ({e.message})",
                                   target=broken.target) from None
            # it failed before adding anything: the next candidate (a stalled one is not asked again)
        finally:
            await continuation.aclose()


def _splice(splicer: Splicer, chunk: bytes) -> bytes:
    parts = []
    for raw in split_events(chunk):
        for name, data in sse_events(raw):
            parts.append(splicer.event(name, data, raw))
    return b"".join(parts)


async def _continue(
    ex: Exchange, reader: StreamReader, broken: StreamBroken, answering: Entry, candidates: list[Entry],
    client_body: bytes, client_model: str | None, call_next: Handler, events: Events,
) -> tuple[Reply | None, list[Entry]]:
    """The first of ``candidates`` that takes the continuation, and the candidates after it (``answering``:
    the entry whose stream broke)."""
    partial = reader.text
    first = ex.target
    for i, entry in enumerate(candidates):
        target, model = entry
        if entry is not answering:
            model = model or (target.config.llm.default_model if target.config.llm else None)
        else:
            model = ex.model if ex.model != client_model else None
        body = type(reader).continuation_body(client_body, partial, target.provider.name, model)
        if body is None:
            return None, []
        # (a continuation's own in-band error is held whatever its target says: the next candidate, or one error
        # event of the gateway's, follows it — never the upstream's and then the gateway's)
        attempt = ex.derive(target=target, body=body, model=model or client_model, deadline=None, key=None,
                            continuation=True)
        try:
            reply = await call_next(attempt)
        except ShuttingDown:  # the grace period ran out while it waited: the stream ends as the gateway stops
            raise StreamCutAtShutdown(target=broken.target) from None
        except GatewayError:
            continue
        finally:
            ex.attempts = attempt.attempts
        if reply.failure is not None or reply.status >= 300 or reply.chunks is None or reply.reader is None:
            await reply.aclose()  # e.g. a 400: this target will not take a prefill
            continue
        events.emit(StreamRecovered(target=first.name, to_target=target.name, reason=broken.message))
        ex.log["recovered_on"] = target.name
        return reply, candidates[i + 1:]
    return None, []
