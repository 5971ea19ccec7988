"""What a flight leaves in the store (``gateway.state.flights``): the finished entry, and the log of a
running answer that followers on other instances read.

    key  = b"L" + token + b" " + fingerprint        while the leader runs
         = b"D" + msgpack(Entry)                     once a storable answer is done
    key:log:<token>     the running answer as a list of ``Item``s: a ``Head`` then a ``Body``, or a
                        ``Head``, ``Chunk``s and an ``End`` or a ``Broken``; or one ``Failed`` (the
                        gateway's error), or one ``Abandoned`` (its client left and nobody waited)
    key:log:<token>:w   how many followers elsewhere wait on it

Items are tagged msgspec Structs, stored as msgpack arrays whose first element is the tag
(``["h", status, headers, stream]``, ``["c", chunk]``, …), so instances of one fleet read each other's logs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from gateway import errors
from gateway.errors import GatewayError, StreamBroken
from gateway.flow.exchange import Reply
from gateway.streaming.recording import headers_of

LOG_TTL_S = 60.0  # a finished run's log outlives it briefly, for followers still reading
FLUSH_MAX = 256  # log items per store round trip


class Entry(msgspec.Struct, array_like=True):
    """A finished answer, as stored for replay."""

    fp: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes | None
    chunks: list[bytes] | None
    created: float  # wall time of the run's start (TTLs count from the first request)
    vary: str = ""  # the cache's: which request the answer is for, beyond its key (``policies.cache``)


encode = msgspec.msgpack.encode
decode_entry = msgspec.msgpack.Decoder(Entry).decode


class Head(msgspec.Struct, tag="h", array_like=True):
    """The answer's status and (shareable) headers; ``stream``: chunks follow, else one ``Body``."""

    status: int
    headers: list[tuple[str, str]]
    stream: bool


class Body(msgspec.Struct, tag="b", array_like=True):
    body: bytes


class Chunk(msgspec.Struct, tag="c", array_like=True):
    chunk: bytes


class End(msgspec.Struct, tag="e", array_like=True):
    """The stream ended cleanly."""


class Broken(msgspec.Struct, tag="x", array_like=True):
    """The stream broke (or grew too large to share): followers end theirs with this error."""

    code: str
    message: str
    reported: bool


class Failed(msgspec.Struct, tag="g", array_like=True):
    """No answer: the gateway's error, rebuilt for every follower (``rebuild_error``)."""

    code: str
    message: str
    retry_after: float | None = None
    target: str | None = None
    upstream_status: int | None = None


class Abandoned(msgspec.Struct, tag="a", array_like=True):
    """Its client left and nobody waited: the run was given up, followers run it themselves."""


Item = Head | Body | Chunk | End | Broken | Failed | Abandoned
decode_item = msgspec.msgpack.Decoder(Item).decode
END, ABANDONED = End(), Abandoned()


class KeyMismatch(Exception):
    """The key is in use (or was used) for a request with another fingerprint."""


class StillRunning(Exception):
    """The leader did not finish within the follower's wait."""


_BY_CODE: dict[str, type[GatewayError]] = {}


def _error_classes(cls: type[GatewayError]) -> None:
    for sub in cls.__subclasses__():
        _BY_CODE.setdefault(sub.code, sub)
        _error_classes(sub)


_error_classes(errors.GatewayError)


def failed(e: GatewayError) -> Failed:
    return Failed(e.code, e.message, e.retry_after, e.target, e.upstream_status)


def rebuild_error(item: Failed) -> GatewayError:
    cls = _BY_CODE.get(item.code, errors.UpstreamError)
    err = cls.__new__(cls)  # without its own __init__: every field is the stored one
    GatewayError.__init__(err, item.message, retry_after=item.retry_after, target=item.target,
                          upstream_status=item.upstream_status)
    if isinstance(err, errors.UpstreamUnavailable):
        err.sent = True
    if isinstance(err, StreamBroken):
        err.reported = False
    return err


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def replay(entry: Entry) -> Reply:
    """A stored answer as a fresh Reply (a stream is replayed as the same chunks)."""
    headers = headers_of(entry.headers)
    if entry.chunks is not None:
        return Reply(entry.status, headers, chunks=_iterate(entry.chunks), upstream_status=entry.status)
    return Reply(entry.status, headers, body=entry.body or b"", upstream_status=entry.status)


