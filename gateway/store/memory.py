"""In-process store (``memory://``): the default for a single gateway process.

Every operation runs to completion without awaiting, so each is atomic with respect
to other tasks — the property the Redis backend buys with Lua scripts. State is
per process: with ``--workers N`` each worker limits, caches and counts on its own.

Expiry is lazy (an expired entry vanishes when touched) plus a bounded sweep: every
write pops at most ``_SWEEP_BATCH`` due deadlines from a heap, so keys nobody reads
again (old cache entries, idle rate-limit buckets) are still freed at O(log n) cost.

The cache's stored answers are also bounded in bytes (``max_cache_bytes``, ``store.memory_max_mb``):
past it the oldest are dropped first — a cache miss later, never lost state. Nothing else is
dropped early: a rate limit, a budget or an idempotency key that vanished under memory
pressure would let a request through that must not pass.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.store.base import (
    Claim,
    Store,
    StoreError,
    Subscription,
    Take,
    TakeResult,
    Write,
    gcra_params,
    gcra_result,
    one_slot,
)

_SWEEP_BATCH = 64
CACHE_ANSWERS = "cache:"  # the cache's keys (``policies.cache``: its flights' namespace); stored answers start b"D"

Value = bytes | dict[str, float] | list[bytes]


class MemoryStore(Store):
    """A dict with deadlines. ``clock`` is wall time (``time.time``) so that TTLs and
    ``take(now=...)`` mean what they mean on Redis; tests pass a fake clock."""

    backend = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time, max_cache_bytes: int | None = None) -> None:
        self._clock = clock
        self._data: dict[str, tuple[Value, float | None]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._channels: dict[str, set[Subscription]] = {}
        self.max_cache_bytes = max_cache_bytes  # None: unbounded
        # the cache's stored answers, oldest first: key → the value stored (an entry since replaced or deleted
        # is noticed when its turn comes), and the bytes they hold
        self._answers: OrderedDict[str, bytes] = OrderedDict()
        self.cache_bytes = 0

    @property
    def url_for_display(self) -> str:
        return "memory://"

    # -- internals -------------------------------------------------------------

    def _live(self, key: str) -> tuple[Value, float | None] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self._clock():
            self._drop(key)
            return None
        return entry

    def _typed(self, key: str, kind: type) -> tuple[Value, float | None] | None:
        entry = self._live(key)
        if entry is not None and not isinstance(entry[0], kind):
            raise StoreError(f"WRONGTYPE: key {key!r} holds another kind of value")
        return entry

    def _deadline(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self._clock() + ttl_s

    def _put(self, key: str, value: Value, expires_at: float | None) -> None:
        old = self._data.get(key)
        self._data[key] = (value, expires_at)
        if expires_at is not None and (old is None or old[1] != expires_at):
            heapq.heappush(self._deadlines, (expires_at, key))
        if self.max_cache_bytes is not None and key.startswith(CACHE_ANSWERS) and type(value) is bytes \
                and value[:1] == b"D":
            self._bound(key, value)
        self._sweep()

    def _drop(self, key: str) -> None:
        self._data.pop(key, None)
        if self._answers:
            stored = self._answers.pop(key, None)
            if stored is not None:
                self.cache_bytes -= len(stored)

    def _bound(self, key: str, value: bytes) -> None:
        """Count a stored answer of the cache; past ``max_cache_bytes``, drop the oldest."""
        answers = self._answers
        replaced = answers.pop(key, None)
        if replaced is not None:
            self.cache_bytes -= len(replaced)
        answers[key] = value
        self.cache_bytes += len(value)
        limit = self.max_cache_bytes or 0
        while self.cache_bytes > limit and answers:
            oldest, stored = answers.popitem(last=False)
            self.cache_bytes -= len(stored)
            entry = self._data.get(oldest)
            if entry is not None and entry[0] is stored:  # still that answer (not replaced, deleted or expired)
                del self._data[oldest]

    def _sweep(self) -> None:
        now, heap = self._clock(), self._deadlines
        for _ in range(_SWEEP_BATCH):
            if not heap or heap[0][0] > now:
                break
            at, key = heapq.heappop(heap)
            entry = self._data.get(key)
            if entry is not None and entry[1] == at:  # not re-set with a later deadline since
                self._drop(key)
        # Rewritten keys leave superseded deadlines behind; rebuild before they dominate.
        if len(heap) > 2 * len(self._data) + 1024:
            self._deadlines = [(e[1], k) for k, e in self._data.items() if e[1] is not None]
            heapq.heapify(self._deadlines)

    def _add(self, key: str, amount: int | float, ttl_s: float | None, parse: type) -> int | float:
        entry = self._typed(key, bytes)
        current, expires_at = (b"0", None) if entry is None else entry
        try:
            total = parse(current) + amount
        except ValueError as exc:
            raise StoreError(f"value at {key!r} is not a number") from exc
        if expires_at is None and ttl_s is not None:
            expires_at = self._deadline(ttl_s)
        self._put(key, str(total).encode(), expires_at)
        return total

    # -- key/value -------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._typed(key, bytes)
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._put(key, value, self._deadline(ttl_s))

    async def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, value, self._deadline(ttl_s))
        return True

    async def claim(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        return self._claim(key, value, ttl_s)

    def _claim(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        entry = self._typed(key, bytes)
        if entry is not None:
            return entry[0]  # type: ignore[return-value]
        self._put(key, value, self._deadline(ttl_s))
        return None

    async def claim_first(self, claims: list[Claim], takes: list[Take]) -> tuple[list[bytes | None], list[TakeResult] | None]:
        held: list[bytes | None] = []
        for c in claims:
            held.append(self._claim(c.key, c.value, c.ttl_s))
            if held[-1] is not None:
                return held, None
        if not takes:
            return held, None
        taken = self._take_all(takes, self._clock())
        if not all(r.allowed for r in taken):
            for c in claims:  # (given back before anyone could see them: nothing to announce)
                self._drop(c.key)
        return held, taken

    async def give_back(self, claims: list[Claim], takes: list[Take]) -> bool:
        if not await super().give_back(claims, takes):  # (the claims; then the takes, which this store can refund)
            return False
        now = self._clock()
        for take in takes:
            entry = self._typed(take.key, bytes)
            if entry is not None:
                back = float(entry[0]) - gcra_params(take.rate_per_s, take.burst, take.quantity)[2]  # type: ignore[arg-type]
                if back > now:
                    self._put(take.key, repr(back).encode(), self._deadline(back - now))
                else:
                    self._drop(take.key)
        return True

    async def delete(self, key: str) -> None:
        self._drop(key)

    async def compare_and_delete(self, key: str, expected: bytes, *, notify: str | None = None) -> bool:
        entry = self._typed(key, bytes)
        if entry is None or entry[0] != expected:
            return False
        self._drop(key)
        if notify is not None:
            await self.publish(notify, b"released")
        return True

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl_s: float | None, *, notify: str | None = None,
    ) -> bool:
        entry = self._typed(key, bytes)
        if entry is None or entry[0] != expected:
            return False
        self._put(key, value, self._deadline(ttl_s))
        if notify is not None:
            await self.publish(notify, b"done")
        return True

    async def commit(self, writes: list[Write]) -> list[bool]:
        done = []
        for w in writes:  # nothing awaits between the check and the write of each
            if w.expected is not None:
                entry = self._typed(w.key, bytes)
                if entry is None or entry[0] != w.expected:
                    done.append(False)
                    continue
            if w.value is None:
                self._drop(w.key)
            else:
                self._put(w.key, w.value, self._deadline(w.ttl_s))
            if w.notify is not None:
                await self.publish(w.notify, b"released" if w.value is None else b"done")
            done.append(True)
        return done

    # -- counters --------------------------------------------------------------

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        return int(self._add(key, amount, ttl_s, int))

    async def incr_float(self, key: str, amount: float, ttl_s: float | None = None) -> float:
        return float(self._add(key, amount, ttl_s, float))

    async def hincr(self, key: str, field: str, amount: float, ttl_s: float | None = None) -> float:
        entry = self._typed(key, dict)
        fields, expires_at = ({}, None) if entry is None else entry
        fields[field] = fields.get(field, 0.0) + amount  # type: ignore[union-attr,index]
        if expires_at is None and ttl_s is not None:
            expires_at = self._deadline(ttl_s)
        self._put(key, fields, expires_at)
        return fields[field]

    async def hincr_many(self, key: str, amounts: dict[str, float], ttl_s: float | None = None) -> None:
        for field, amount in amounts.items():
            await self.hincr(key, field, amount, ttl_s)

    async def reserve(self, keys: list[str], amount: float, limits: list[float], ttl_s: list[float]) -> int:
        one_slot(keys)
        now: list[float] = []
        for i, key in enumerate(keys):
            entry = self._typed(key, bytes)
            current = float(entry[0]) if entry is not None else 0.0  # type: ignore[arg-type]
            if current + amount > limits[i] + 1e-12:
                return i
            now.append(current)
        for key, ttl, current in zip(keys, ttl_s, now, strict=True):
            self._add(key, max(amount, -current), ttl, float)  # never below zero (a give-back to a lost counter)
        return -1

    async def hgetall(self, key: str) -> dict[str, float]:
        entry = self._typed(key, dict)
        return {} if entry is None else dict(entry[0])  # type: ignore[arg-type]

    # -- lists ---------------------------------------------------------------------

    async def append(self, key: str, items: list[bytes], ttl_s: float, *, notify: str | None = None) -> int:
        entry = self._typed(key, list)
        values: list[bytes] = [] if entry is None else entry[0]  # type: ignore[assignment]
        values.extend(items)
        self._put(key, values, self._deadline(ttl_s))
        if notify is not None:
            await self.publish(notify, str(len(values)).encode())
        return len(values)

    async def range(self, key: str, start: int = 0) -> list[bytes]:
        entry = self._typed(key, list)
        return [] if entry is None else list(entry[0][start:])  # type: ignore[index]

    async def take(
        self, key: str, *, rate_per_s: float, burst: int, quantity: int = 1, now: float | None = None
    ) -> TakeResult:
        return (await self.take_all([Take(key, rate_per_s, burst, quantity)], now=now))[0]

    async def take_all(self, takes: list[Take], *, now: float | None = None) -> list[TakeResult]:
        return self._take_all(takes, self._clock() if now is None else now)

    def _take_all(self, takes: list[Take], now: float) -> list[TakeResult]:
        if len(takes) > 1:
            one_slot([t.key for t in takes])
        results, writes = [], []
        allowed = True
        for take in takes:
            interval, tolerance, increment = gcra_params(take.rate_per_s, take.burst, take.quantity)
            entry = self._typed(take.key, bytes)
            tat = max(float(entry[0]) if entry else now, now)  # type: ignore[arg-type]
            new_tat = tat + increment
            allow_at = new_tat - tolerance
            if now < allow_at:
                allowed = False
                retry_after = allow_at - now if increment <= tolerance else -1.0
                results.append(gcra_result(False, retry_after, tat - now, interval, take.burst))
            else:
                results.append(gcra_result(True, 0.0, new_tat - now, interval, take.burst))
                if take.quantity:
                    writes.append((take.key, new_tat))
        if allowed:
            for key, new_tat in writes:
                self._put(key, repr(new_tat).encode(), self._deadline(new_tat - now))
        return results

    # -- prefixes --------------------------------------------------------------

    async def scan_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in [k for k in self._data if k.startswith(prefix)]:
            if self._live(key) is not None:
                yield key

    async def delete_prefix(self, prefix: str) -> int:
        candidates = [k for k in self._data if k.startswith(prefix)]
        doomed = [k for k in candidates if self._live(k) is not None]  # _live drops the expired
        for key in doomed:
            self._drop(key)
        return len(doomed)

    # -- notification ----------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        for sub in self._channels.get(channel, ()):
            sub.deliver(message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        sub = Subscription()
        subs = self._channels.setdefault(channel, set())
        subs.add(sub)
        try:
            yield sub
        finally:
            subs.discard(sub)
            if not subs:
                del self._channels[channel]

    # -- lifecycle -------------------------------------------------------------

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release: the dict dies with the store."""
