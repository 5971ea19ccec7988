"""Keeping configured secrets out of what clients and logs see (SPEC §7, §8).

``Scrubber`` replaces every configured key value — upstream keys, tenant keys, the admin
key — with ``***``: in the gateway's log lines and messages, and in every upstream error
answer before a client sees it (``scrub_error``): a complete body, and a streamed one (an
SSE or chunked error, or one too large to hold) scrubbed as it passes, a key split across
two chunks included. A compressed error body is decoded first and sent on decoded — its
bytes could not be scrubbed otherwise. A key quoted with any of its characters JSON-escaped is found
in the plain JSON (``unescaped``), which is then what is sent on. A 2xx event stream is scrubbed too
(``scrub_event_stream``): an in-band error event may quote a key as well.

A streamed body is scrubbed by holding back, between chunks, only the bytes that could be
the start of a secret: an SSE chunk ends with a blank line, so an event stream is never
delayed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

import msgspec
from aiohttp import hdrs

from gateway import encoding
from gateway.errors import StreamBroken

if TYPE_CHECKING:
    from gateway.flow.reply import Reply

log = logging.getLogger("reliapi")

MAX_DECODED_ERROR = 16 << 20  # an error body decoded to be scrubbed: more than this is cut off (streams: aborted)


MIN_SECRET = 6  # shorter values are too likely to be ordinary text: not scrubbed (``--check`` warns)


# What JSON encoders write as ``\\uXXXX`` beyond quotes and backslashes: Gson (Java's default) escapes these
# HTML-significant characters; some encoders escape every character that is not a letter or a digit.
_GSON = frozenset("<>&='")


def _u_escaped(secret: str, escape: Callable[[str], bool], upper: bool) -> str:
    form = "\\u{:04X}" if upper else "\\u{:04x}"
    return "".join(form.format(ord(c)) if escape(c) else ("\\" + c if c in '"\\' else c) for c in secret)


def spellings(secret: str) -> set[str]:
    """The ways an upstream may quote ``secret`` back: as it is, JSON-escaped (``\\/`` for ``/`` as PHP
    writes it, ``\\u002f``, escaped quotes and backslashes; ``\\u003d`` for ``=`` as Gson writes it; every
    character but letters and digits as ``\\uXXXX``, either case of hex) and percent-encoded (a URL or form
    echoed)."""
    json_text = msgspec.json.encode(secret).decode()[1:-1]
    found = {secret, json_text, json_text.replace("/", "\\/"), json_text.replace("/", "\\u002f"),
             quote(secret, safe=""), quote_plus(secret, safe="")}
    for upper in (False, True):
        found.add(_u_escaped(secret, _GSON.__contains__, upper))
        found.add(_u_escaped(secret, lambda c: not c.isalnum(), upper))
    return {f for f in found if f}


# A JSON escape of a printable ASCII character (never of a quote or backslash, which must stay escaped), or of "/";
# an escaped backslash is matched first so that "\\u0041" (a backslash, then text) is left alone.
_ESCAPE = re.compile(rb'\\\\|\\u00([2-7][0-9a-fA-F])|\\/')
_KEEP_ESCAPED = frozenset((0x22, 0x5C, 0x7F))


def _plain(m: re.Match[bytes]) -> bytes:
    hexa = m.group(1)
    if hexa is None:
        return m.group() if m.group() == b"\\\\" else b"/"
    code = int(hexa, 16)
    return m.group() if code in _KEEP_ESCAPED else bytes((code,))


def unescaped(data: bytes) -> bytes:
    """``data`` with JSON's escapes of printable ASCII written as the characters (the same JSON): an upstream may
    escape any one character of a key it quotes (``s\\u006b-…``), which no list of spellings covers."""
    return _ESCAPE.sub(_plain, data)


def _partial_escape(data: bytes) -> int:
    """How many bytes at the end of ``data`` are an escape cut short (``\\``, ``\\u``, … ``\\u00F``)."""
    i = data.rfind(b"\\", max(0, len(data) - 5))
    if i == -1:
        return 0
    run = len(data) - i
    j = i
    while j > 0 and data[j - 1] == 0x5C:  # an escaped backslash ends no escape
        j -= 1
    if (i - j) % 2:
        return 0
    rest = data[i + 1:]
    return run if rest[:1] in (b"", b"u") and all(c in b"0123456789abcdefABCDEF" for c in rest[1:]) else 0


class Scrubber:
    """Replaces configured secret values — each in every spelling an answer may quote it in — with ``***``
    in text shown or logged."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        plain = {s for s in secrets if len(s) >= MIN_SECRET}
        every = {v for s in plain for v in spellings(s)}
        self.secrets = sorted(every, key=len, reverse=True)
        # as configured, and percent-encoded (a URL in a Location header): how a header would carry one
        self.plain = sorted(plain | {quote(s, safe="") for s in plain} | {quote_plus(s, safe="") for s in plain},
                            key=len, reverse=True)
        self.shortest = min(map(len, self.plain), default=float("inf"))
        self._raw = [s.encode() for s in self.secrets]
        self.reach = 6 * max(map(len, self._raw), default=0)  # the longest key, every byte of it escaped

    def holds(self, text: str) -> bool:
        """Does ``text`` (a client's model name, request id) carry a configured key as written or percent-encoded?
        A text shorter than every key is answered without a search (the usual model name, every time)."""
        return len(text) >= self.shortest and any(secret in text for secret in self.plain)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    def bytes(self, data: bytes) -> bytes:
        if b"\\u" in data or b"\\/" in data:  # an escaped spelling: the plain JSON is what a client reads
            plain = unescaped(data)  # (the bytes are left as they came unless a key is in them)
            if plain != data and any(secret in plain for secret in self._raw):
                data = plain
        for secret in self._raw:
            if secret in data:
                data = data.replace(secret, b"***")
        return data

    def held(self, data: bytes) -> int:
        """How many bytes at the end of ``data`` could be the start of a secret (to wait for the next chunk)."""
        n, longest = len(data), 0
        for secret in self._raw:
            i = data.find(secret[:1], max(0, n - len(secret) + 1))
            while i != -1 and n - i > longest:
                if secret.startswith(data[i:]):
                    longest = n - i
                    break
                i = data.find(secret[:1], i + 1)
        return longest

    def feeder(self) -> _StreamScrub:
        return _StreamScrub(self)


class _StreamScrub:
    """Scrubs one stream chunk by chunk: ``feed`` returns what may be sent now, ``end`` the rest."""

    __slots__ = ("scrub", "tail")

    def __init__(self, scrub: Scrubber) -> None:
        self.scrub = scrub
        self.tail = b""

    def feed(self, data: bytes) -> bytes:
        if self.tail:
            data, self.tail = self.tail + data, b""
        data = self.scrub.bytes(data)
        cut = _partial_escape(data)  # an escape split across chunks may be part of a key's spelling: held with it
        body, rest = (data[:-cut], data[-cut:]) if cut else (data, b"")
        keep = self.scrub.held(body)
        end = body[-self.scrub.reach:]
        if b"\\u" in end or b"\\/" in end:  # a key's start spelled with escapes: held as the plain JSON it is
            plain = unescaped(body)
            if plain != body and self.scrub.held(plain) > keep:
                body, keep = plain, self.scrub.held(plain)
        data, keep = body + rest, keep + len(rest)
        if keep:
            data, self.tail = data[:-keep], data[-keep:]
        return data

    def end(self) -> bytes:
        tail, self.tail = self.tail, b""
        return tail


class _StreamDecode:
    __slots__ = ("decoder",)

    def __init__(self, coding: str) -> None:
        self.decoder = encoding.Decoder(coding, MAX_DECODED_ERROR)

    def feed(self, data: bytes) -> bytes:
        return self.decoder.feed(data)

    def end(self) -> bytes:
        return self.decoder.flush()


Stage = _StreamScrub | _StreamDecode


def scrub_error(reply: Reply, scrub: Scrubber) -> None:
    """An upstream error answer (status ≥ 400) as the client may see it: decoded when it is
    compressed in a coding the gateway reads, and without any configured secret in its body or
    its headers (``WWW-Authenticate: Bearer error=… token="…"``, a debug header)."""
    if scrub.secrets:
        _scrub_headers(reply, scrub)
    coding = reply.headers.get(hdrs.CONTENT_ENCODING)
    if coding is not None and not encoding.codings(coding):
        coding = None  # identity
    if reply.chunks is None:
        body = reply.body or b""
        if coding is not None:
            try:
                body = encoding.decode(body, coding, MAX_DECODED_ERROR)
            except (encoding.Unsupported, encoding.Corrupt) as e:
                if scrub.secrets:  # bytes that cannot be read cannot be scrubbed — and a client may read part of them
                    body = msgspec.json.encode({"error": {"message": f"the upstream error answer is not shown: its "
                                                                     f"content coding ({coding}) is {type(e).__name__.lower()}"}})
                    encoding.mark_decoded(reply.headers)
            except encoding.TooLarge:
                body = b'{"error": {"message": "the upstream error answer was too large to show"}}'
                encoding.mark_decoded(reply.headers)
            else:
                encoding.mark_decoded(reply.headers)
        reply.body = scrub.bytes(body) if scrub.secrets else body
        return
    stages: list[Stage] = []
    if coding is not None and encoding.supported(coding):
        stages.append(_StreamDecode(coding))
        encoding.mark_decoded(reply.headers)
    if scrub.secrets:
        stages.append(scrub.feeder())
    if stages:
        _restream(reply, stages)


def scrub_text_stream(reply: Reply, scrub: Scrubber) -> None:
    """A 2xx stream of text — SSE, NDJSON, chunked JSON — scrubbed as it passes: an in-band error event
    or line may quote a key. Compressed in a coding the gateway reads, it is decoded (and sent on decoded)."""
    if not scrub.secrets or not is_text(reply.headers):
        return
    stages: list[Stage] = []
    coding = reply.headers.get(hdrs.CONTENT_ENCODING)
    if coding is not None and encoding.codings(coding):
        if not encoding.supported(coding):
            return  # bytes the gateway cannot read; an SDK could not read an error out of them either
        stages.append(_StreamDecode(coding))
        encoding.mark_decoded(reply.headers)
    stages.append(scrub.feeder())
    _restream(reply, stages)


def is_text(headers: Any) -> bool:
    media = headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower()
    return media.startswith("text/") or media.endswith(("/json", "+json", "/x-ndjson", "/jsonl", "/x-jsonlines"))


def scrub_headers(reply: Reply, scrub: Scrubber) -> None:
    """Any answer's headers without a configured secret (a debug header that echoes the request's
    ``Authorization``): the client — a tenant — never learns the operator's upstream key, and the cache never
    stores it. A value shorter than every key (nearly all of them) is not searched."""
    if any(scrub.holds(value) for value in reply.headers.values()):
        _scrub_headers(reply, scrub)


def _scrub_headers(reply: Reply, scrub: Scrubber) -> None:
    headers = reply.headers
    if any(secret in value for value in headers.values() for secret in scrub.secrets):
        for name, value in list(headers.items()):
            clean = scrub(value)
            if clean != value:
                headers.popall(name)
                headers.add(name, clean)


def _restream(reply: Reply, stages: list[Stage]) -> None:
    """Run a stream through ``stages``; the reply's head (its first chunk, already received) and
    its chunks keep their contract: the chunks yield the head first."""

    def through(data: bytes) -> bytes:
        for stage in stages:
            data = stage.feed(data)
        return data

    def ending() -> bytes:
        data = b""
        for stage in stages:
            data = stage.feed(data) + stage.end() if data else stage.end()
        return data

    source = reply.chunks
    assert source is not None
    skip = bool(reply.head)
    head = through(reply.head) if skip else b""
    reply.head = head
    reply.chunks = _staged(source, head, skip, through, ending)


async def _staged(
    source: AsyncIterator[bytes], head: bytes, skip: bool, through: Callable[[bytes], bytes],
    ending: Callable[[], bytes],
) -> AsyncIterator[bytes]:
    it = source.__aiter__()
    try:
        if skip:
            await it.__anext__()  # the original head, already run through the stages
        if head:
            yield head
        try:
            async for chunk in it:
                out = through(chunk)
                if out:
                    yield out
            out = ending()
        except (encoding.Corrupt, encoding.TooLarge):
            raise StreamBroken("the upstream's compressed answer could not be decoded") from None
        if out:
            yield out
    finally:
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()
