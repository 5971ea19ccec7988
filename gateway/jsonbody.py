"""Top-level edits of a JSON request body, without parsing what its values hold.

A policy that must change a field (a lowered ``max_tokens``, a fallback's ``model``, a
removed ``idempotency_key``) re-encodes the object with every other value carried over as
the raw bytes it was sent as: a 10 MB prompt is copied, not decoded into Python objects and
encoded again. Only the top level is decoded — which for a body with a great many top-level
keys is still real work, so ``edited`` does it off the event loop for a large body. A key the client sent twice comes out once, with the value the gateway read
(the last), so the upstream reads exactly what the gateway decided on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from gateway import offload

_decode = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_encode = msgspec.json.encode


class NotAnObject(ValueError):
    """The body is not a JSON object."""


def edit(body: bytes, set_fields: Mapping[str, Any] | None = None, drop: Iterable[str] = ()) -> bytes:
    """``body`` with ``set_fields`` set (any JSON-encodable values) and ``drop`` removed; raises ``NotAnObject``."""
    try:
        doc = _decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise NotAnObject() from None
    for name in drop:
        doc.pop(name, None)
    for name, value in (set_fields or {}).items():
        doc[name] = msgspec.Raw(_encode(value))
    return _encode(doc)


async def edited(body: bytes, set_fields: Mapping[str, Any] | None = None, drop: Iterable[str] = ()) -> bytes:
    """``edit``, in the helper process for a large body (``gateway.offload``): the loop never waits on it."""
    return await offload.run(edit, body, set_fields, tuple(drop))
