"""What a flight leaves in the store (``gateway.state.flights``): the finished entry, and the log of a
running answer that followers on other instances read.

    key  = b"L" + token + b" " + fingerprint        while the leader runs
         = b"D" + msgpack(Entry)                     once a storable answer is done
    key:log:<token>     the running answer as a list of items (msgpack arrays):
                        ["h", status, headers, stream] · ["b", body] · ["c", chunk] · ["e"] clean end
                        · ["x", code, message, reported] broken stream
                        · ["g", code, message, retry_after, target, upstream_status] the gateway's error
                        · ["a"] abandoned: its client left and nobody waited
    key:log:<token>:w   how many followers elsewhere wait on it
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

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
decode_item = msgspec.msgpack.Decoder(list).decode


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


def rebuild_error(item: list[Any]) -> GatewayError:
    _, code, message, retry_after, target, upstream_status = item
    cls = _BY_CODE.get(code, errors.UpstreamError)
    err = object.__new__(cls)
    GatewayError.__init__(err, message, retry_after=retry_after, target=target, upstream_status=upstream_status)
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


