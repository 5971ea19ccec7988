"""What crosses the store seam (``gateway.store.base``): the operations' arguments and results, the GCRA arithmetic
both backends share, and the Cluster hash-slot rule every multi-key operation keeps."""

from __future__ import annotations

import math

import msgspec


class Take(msgspec.Struct, frozen=True):
    """One GCRA take of ``Store.take_all``: ``quantity`` from the bucket at ``key`` (see ``Store.take``)."""

    key: str
    rate_per_s: float
    burst: int
    quantity: int = 1


class Write(msgspec.Struct, frozen=True):
    """One write of ``Store.commit``. ``value`` None deletes the key. ``expected`` fences it: the write
    applies only while the key holds exactly those bytes (None: whatever it holds). ``ttl_s`` as in
    ``set``. ``notify``: a channel told ``b"done"`` (a value written) or ``b"released"`` (a key deleted)
    when the write applies — as ``compare_and_set`` / ``compare_and_delete`` do."""

    key: str
    value: bytes | None
    expected: bytes | None = None
    ttl_s: float | None = None
    notify: str | None = None


class Claim(msgspec.Struct, frozen=True):
    """One claim of ``Store.claim_first``: ``value`` at ``key`` for ``ttl_s`` unless the key is taken (``claim``)."""

    key: str
    value: bytes
    ttl_s: float


class TakeResult(msgspec.Struct, frozen=True):
    """Outcome of one GCRA ``Store.take`` (the redis-cell ``CL.THROTTLE`` reply).

    - ``limit``: requests that fit in an empty bucket at once (``burst + 1``).
    - ``remaining``: further requests of quantity 1 that would be allowed right now.
    - ``retry_after_s``: 0.0 when allowed; when limited, seconds until the same request
      would be allowed; ``math.inf`` when it never can be (quantity > limit).
    - ``reset_after_s``: seconds until the bucket is completely full again.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    reset_after_s: float


def gcra_params(rate_per_s: float, burst: int, quantity: int) -> tuple[float, float, float]:
    """Validate a take and return (emission interval, delay tolerance, increment).

    The same arithmetic runs in Python (memory) and Lua (Redis); only these
    derived numbers cross into the backend.
    """
    if not rate_per_s > 0 or burst < 0 or quantity < 0:
        raise ValueError(f"take needs rate_per_s > 0, burst >= 0, quantity >= 0; got {rate_per_s}, {burst}, {quantity}")
    interval = 1.0 / rate_per_s
    return interval, interval * (burst + 1), interval * quantity


def gcra_result(allowed: bool, retry_after_s: float, ttl_s: float, interval: float, burst: int) -> TakeResult:
    """Build the reply from the backend's raw (allowed, retry_after, ttl) triple.

    ``retry_after_s < 0`` is the backend's "never satisfiable" marker (as in
    redis-cell) and becomes ``math.inf``. The epsilon keeps float noise such as
    3.9999999 from costing a whole request in ``remaining``.
    """
    limit = burst + 1
    remaining = math.floor((interval * limit - ttl_s) / interval + 1e-9)
    return TakeResult(
        allowed=allowed,
        limit=limit,
        remaining=max(0, min(limit, remaining)),
        retry_after_s=math.inf if retry_after_s < 0 else retry_after_s,
        reset_after_s=max(0.0, ttl_s),
    )


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key``: the text in its first ``{…}`` when that is not empty, else all of it."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def one_slot(keys: list[str]) -> None:
    """Keys of one atomic operation (``take_all``, ``reserve``) must share a hash tag, so that on a
    Redis Cluster they live in one slot and one script can hold them. Checked on every backend, so a
    policy that builds them wrong fails its tests on the memory store too, not first in production."""
    if len({hash_tag(k) for k in keys}) > 1:
        raise ValueError(f"keys of one atomic store operation must share a {{hash tag}} (one Cluster slot): {keys}")
