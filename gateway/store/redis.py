"""Redis store: state shared by many gateway instances, on any Redis topology.

``redis://``, ``rediss://``, ``unix://`` (one node), ``redis+sentinel://`` (Sentinel's primary,
found again after a failover) and ``redis+cluster://`` (each key on its slot's primary), read by
``gateway.store.url``. Every command goes over the store's own pipelined RESP client
(``gateway.store.resp``), routed by ``gateway.store.topology`` / ``gateway.store.cluster``; pub/sub
(completion notifications for coalescing) over one connection of the same kind (``redis_pubsub``).

Every compound operation is one Lua script (registered once, sent by SHA), so it is atomic
across instances; a script's keys share one ``{hash tag}`` (``base.one_slot``), so on a Cluster it
runs on one node. GCRA reads the server clock (``TIME``) so instances with skewed clocks still
agree. Every socket/protocol error is translated to ``StoreError`` in ``_wrap_errors`` — policies
never see redis types — and no message holds a password (``RedisStore._error``).

Timeouts are short on purpose: a request must not hang on a dead Redis (SPEC §8 "Redis down").
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from gateway.scrub import MIN_SECRET
from gateway.store import scripts
from gateway.store.base import (
    Claim,
    Store,
    StoreError,
    StoreMisconfigured,
    Subscription,
    Take,
    TakeResult,
    Write,
    gcra_params,
    gcra_result,
    one_slot,
)
from gateway.store.cluster import Cluster, key_slot
from gateway.store.failures import unechoed
from gateway.store.redis_pubsub import ChannelHub
from gateway.store.resp import Refused, ReplyError, Stalled, tls_refusal
from gateway.store.scripts import Script
from gateway.store.topology import Single
from gateway.store.url import parse_store_url

_CONNECT_TIMEOUT_S = 1.0
_SOCKET_TIMEOUT_S = 2.0
_STALL_PAUSE_S = 1.0  # after a command timed out, others fail at once for this long (``_wrap_errors``)

def _ms(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s * 1000))


def _gcra_args(params: list[tuple[float, float, float]]) -> list[float]:
    """A take's ARGV in ``GCRA_ALL`` and ``CLAIM_FIRST``: its delay tolerance and increment."""
    return [x for _, tolerance, increment in params for x in (tolerance, increment)]


def _taken(takes: list[Take], params: list[tuple[float, float, float]], raw: list[Any]) -> list[TakeResult]:
    """The takes' results from the scripts' flat {allowed, retry_after, ttl} per take."""
    return [gcra_result(bool(raw[3 * i]), float(raw[3 * i + 1]), float(raw[3 * i + 2]), interval, take.burst)
            for i, (take, (interval, _, _)) in enumerate(zip(takes, params, strict=True))]


def _commit_args(writes: list[Write], name: Callable[[str], str]) -> list[bytes | str | int]:
    """``COMMIT``'s ARGV for ``writes``; ``name`` makes a channel's store name (the key prefix)."""
    args: list[bytes | str | int] = []
    for w in writes:
        args += ("D" if w.value is None else "S", "" if w.expected is None else "1", w.expected or b"",
                 w.value or b"", "" if w.ttl_s is None else _ms(w.ttl_s), "" if w.notify is None else name(w.notify))
    return args


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class _Errors:
    """Every socket/protocol error of one kind of command as a ``StoreError``. A context manager of its
    own, one per op kept by the store, rather than a ``@contextmanager`` generator made per call: it is
    around every command (the generator cost several thousand instructions each time)."""

    __slots__ = ("store", "op")

    def __init__(self, store: RedisStore, op: str) -> None:
        self.store = store
        self.op = op

    def __enter__(self) -> None:
        store = self.store
        if store._stalled_until and self.op != "ping" and time.monotonic() < store._stalled_until:
            # a Redis that stalls (rather than refuses) would cost every request the whole timeout: for a
            # moment after one timed out, calls fail at once; PING (readiness, resync) still probes
            skipped = StoreError(f"redis {self.op} skipped: the store did not answer within {_SOCKET_TIMEOUT_S:g} s just now")
            skipped.unsent = True
            raise skipped

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        store = self.store
        if exc is None:
            store._stalled_until = 0.0
        elif isinstance(exc, (ReplyError, OSError, UnicodeError)):  # OSError: socket errors, ConnectionError, TimeoutError
            if isinstance(exc, (Stalled, TimeoutError)):
                store._stalled_until = time.monotonic() + _STALL_PAUSE_S
            raise store._error(self.op, exc) from exc


class RedisStore(Store):
    """``Store`` on Redis, whatever its topology. Keys and channels are namespaced ``key_prefix:``;
    construction does not connect — ``ping()`` does. A URL it cannot use raises ``StoreURLError``."""

    backend = "redis"

    def __init__(self, url: str, *, key_prefix: str) -> None:
        parsed = parse_store_url(url)
        if parsed.tls is not None:
            parsed.tls.context  # noqa: B018 - the CA and client certificate files, read once here (or StoreURLError)
        self.topology = parsed.topology
        self.claims_together = self.topology != "cluster"  # (a Cluster: one call per claim, each on its slot's node)
        self._display, self._secrets = parsed.display, parsed.secrets
        self._prefix = key_prefix + ":"
        self._stalled_until = 0.0
        self._guards: dict[str, _Errors] = {}
        router_of = Cluster if parsed.topology == "cluster" else Single
        self._router = router_of(parsed, connect_timeout_s=_CONNECT_TIMEOUT_S, timeout_s=_SOCKET_TIMEOUT_S)
        self._call = self._router.call
        run = self._run_script
        self._cad = Script(run, scripts.COMPARE_AND_DELETE)
        self._cas = Script(run, scripts.COMPARE_AND_SET)
        self._commit = Script(run, scripts.COMMIT)
        self._counter = Script(run, scripts.COUNTER)
        self._gcra_all = Script(run, scripts.GCRA_ALL)
        self._append = Script(run, scripts.APPEND)
        self._claim = Script(run, scripts.CLAIM)
        self._claim_first = Script(run, scripts.CLAIM_FIRST)
        self._give_back = Script(run, scripts.GIVE_BACK)
        self._hincr_many = Script(run, scripts.HINCR_MANY)
        self._reserve = Script(run, scripts.RESERVE)
        self._hub = ChannelHub(self._router.pubsub_endpoint, anchor=self._prefix + "__store_anchor__",
                               connect_timeout_s=_CONNECT_TIMEOUT_S, error=self._error)

    def _run_script(self, command: str, sha_or_text: str, nkeys: int, *rest: Any) -> Any:
        return self._call(rest[0] if nkeys else None, command, sha_or_text, nkeys, *rest)

    @property
    def url_for_display(self) -> str:
        return self._display

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _error(self, op: str, exc: BaseException) -> StoreError:
        """``exc`` as a ``StoreError`` a user reads (``/readyz``, the status page, ``--check``, logs): its own words,
        which name the node (``gateway.store.failures``), no Python class name.

        No message is built from the raw URL (only from host:port, or the display URL), so none holds the
        password; replacing the password wherever it occurs in free text would instead reveal it (a password
        "Connect" turns "ConnectionError" into "***ionError"). What a server could quote back is an argument
        of a command it did not take, cut off in ``unechoed``; as a last guard only that exact quoted form
        (``'password'``) and the URL's userinfo form (``:password@``) are masked, and only for a password long
        enough (``MIN_SECRET``) not to be ordinary text."""
        if isinstance(exc, ssl.SSLError):  # the pub/sub connection's own
            exc = tls_refusal(exc) or exc
        text = f"redis {op} failed: {unechoed(exc) or ('no answer in time' if isinstance(exc, TimeoutError) else 'no reason given')}"
        for secret in self._secrets:
            if len(secret) >= MIN_SECRET:
                text = text.replace(f"'{secret}'", "'***'").replace(f":{secret}@", ":***@")
        wrong = isinstance(exc, (Refused, ssl.SSLError)) or (isinstance(exc, ReplyError) and str(exc).startswith(
            ("WRONGPASS", "NOAUTH", "NOPERM")))
        error = (StoreMisconfigured if wrong else StoreError)(text)
        error.unsent = getattr(exc, "unsent", False)
        return error

    def _wrap_errors(self, op: str) -> _Errors:
        """``with self._wrap_errors(op):`` around a command: its failure as a ``StoreError``."""
        guard = self._guards.get(op)
        if guard is None:
            guard = self._guards[op] = _Errors(self, op)
        return guard

    # -- key/value -------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        with self._wrap_errors("get"):
            return await self._call(self._k(key), "GET", self._k(key))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        with self._wrap_errors("set"):
            if ttl_s is None:
                await self._call(self._k(key), "SET", self._k(key), value)
            else:
                await self._call(self._k(key), "SET", self._k(key), value, "PX", _ms(ttl_s))

    async def set_nx(self, key: str, value: bytes, ttl_s: float) -> bool:
        with self._wrap_errors("set_nx"):
            return await self._call(self._k(key), "SET", self._k(key), value, "PX", _ms(ttl_s), "NX") is not None

    async def claim(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        with self._wrap_errors("claim"):
            return await self._claim(keys=[self._k(key)], args=[value, _ms(ttl_s)])

    async def delete(self, key: str) -> None:
        with self._wrap_errors("delete"):
            await self._call(self._k(key), "DEL", self._k(key))

    async def compare_and_delete(self, key: str, expected: bytes, *, notify: str | None = None) -> bool:
        channel = "" if notify is None else self._k(notify)
        with self._wrap_errors("compare_and_delete"):
            return bool(await self._cad(keys=[self._k(key)], args=[expected, channel]))

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl_s: float | None, *, notify: str | None = None,
    ) -> bool:
        ttl = "" if ttl_s is None else _ms(ttl_s)
        channel = "" if notify is None else self._k(notify)
        with self._wrap_errors("compare_and_set"):
            return bool(await self._cas(keys=[self._k(key)], args=[expected, value, ttl, channel]))

    async def commit(self, writes: list[Write]) -> list[bool]:
        # one script on one node; on a Cluster one per slot, all sent at once (a script's keys must share a
        # slot, and each write applies on its own key, so the split loses nothing)
        if self.topology != "cluster":  # (no gather: it would make a task for the one script)
            with self._wrap_errors("commit"):
                return [bool(applied) for applied in await self._commit(
                    keys=[self._k(w.key) for w in writes], args=_commit_args(writes, self._k))]
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(writes):
            groups[key_slot(self._k(w.key))].append(i)
        with self._wrap_errors("commit"):
            replies = await asyncio.gather(*(
                self._commit(keys=[self._k(writes[i].key) for i in group],
                             args=_commit_args([writes[i] for i in group], self._k))
                for group in groups.values()))
        done = [False] * len(writes)
        for group, reply in zip(groups.values(), replies, strict=True):
            for i, applied in zip(group, reply, strict=True):
                done[i] = bool(applied)
        return done

    # -- counters --------------------------------------------------------------

    async def _count(self, key: str, command: str, ttl_s: float | None, *args: str | float) -> bytes | int:
        ttl = "" if ttl_s is None else _ms(ttl_s)
        with self._wrap_errors(command.lower()):
            return await self._counter(keys=[self._k(key)], args=[command, ttl, *args])

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        return int(await self._count(key, "INCRBY", ttl_s, amount))

    async def incr_float(self, key: str, amount: float, ttl_s: float | None = None) -> float:
        return float(await self._count(key, "INCRBYFLOAT", ttl_s, amount))

    async def hincr(self, key: str, field: str, amount: float, ttl_s: float | None = None) -> float:
        return float(await self._count(key, "HINCRBYFLOAT", ttl_s, field, amount))

    async def hincr_many(self, key: str, amounts: dict[str, float], ttl_s: float | None = None) -> None:
        args: list[str | float | int] = ["" if ttl_s is None else _ms(ttl_s)]
        for field, amount in amounts.items():
            args += [field, amount]
        with self._wrap_errors("hincr_many"):
            await self._hincr_many(keys=[self._k(key)], args=args)

    async def reserve(self, keys: list[str], amount: float, limits: list[float], ttl_s: list[float]) -> int:
        args: list[float | int] = [amount]
        for limit, ttl in zip(limits, ttl_s, strict=True):
            args += [limit, _ms(ttl)]
        one_slot(keys)
        with self._wrap_errors("reserve"):
            return int(await self._reserve(keys=[self._k(k) for k in keys], args=args))

    async def hgetall(self, key: str) -> dict[str, float]:
        with self._wrap_errors("hgetall"):
            raw = await self._call(self._k(key), "HGETALL", self._k(key))
        return {raw[i].decode(): float(raw[i + 1]) for i in range(0, len(raw), 2)}

    # -- lists ---------------------------------------------------------------------

    async def append(self, key: str, items: list[bytes], ttl_s: float, *, notify: str | None = None) -> int:
        channel = "" if notify is None else self._k(notify)
        with self._wrap_errors("append"):
            return int(await self._append(keys=[self._k(key)], args=[_ms(ttl_s), channel, *items]))

    async def range(self, key: str, start: int = 0) -> list[bytes]:
        with self._wrap_errors("range"):
            return await self._call(self._k(key), "LRANGE", self._k(key), start, -1)

    async def take(
        self, key: str, *, rate_per_s: float, burst: int, quantity: int = 1, now: float | None = None
    ) -> TakeResult:
        return (await self.take_all([Take(key, rate_per_s, burst, quantity)], now=now))[0]

    async def take_all(self, takes: list[Take], *, now: float | None = None) -> list[TakeResult]:
        params = [gcra_params(t.rate_per_s, t.burst, t.quantity) for t in takes]
        one_slot([t.key for t in takes])
        with self._wrap_errors("take"):
            raw = await self._gcra_all(keys=[self._k(t.key) for t in takes], args=["" if now is None else now,
                                                                                    *_gcra_args(params)])
        return _taken(takes, params, raw)

    async def claim_first(self, claims: list[Claim], takes: list[Take]) -> tuple[list[bytes | None], list[TakeResult] | None]:
        if self.topology == "cluster":  # keys of many slots (each flight's its own): one call each, in order
            return await super().claim_first(claims, takes)
        params = [gcra_params(t.rate_per_s, t.burst, t.quantity) for t in takes]
        args: list[Any] = [len(claims), ""]
        for c in claims:
            args += (c.value, _ms(c.ttl_s))
        if takes:
            one_slot([t.key for t in takes])
        with self._wrap_errors("claim"):
            raw = await self._claim_first(keys=[self._k(k.key) for k in (*claims, *takes)], args=[*args, *_gcra_args(params)])
        return raw[0], _taken(takes, params, raw[1]) if len(raw) > 1 else None

    async def give_back(self, claims: list[Claim], takes: list[Take]) -> bool:
        if self.topology == "cluster":
            return await super().give_back(claims, takes)
        args: list[Any] = [len(claims), *(c.value for c in claims),
                           *(increment for _, _, increment in (gcra_params(t.rate_per_s, t.burst, t.quantity) for t in takes))]
        with self._wrap_errors("give_back"):
            return bool(await self._give_back(keys=[self._k(k.key) for k in (*claims, *takes)], args=args))

    # -- prefixes --------------------------------------------------------------

    async def _scan_pages(self, prefix: str) -> AsyncIterator[list[bytes]]:
        pattern = _glob_escape(self._k(prefix)) + "*"
        with self._wrap_errors("scan"):
            nodes = await self._router.primaries()
        for node in nodes:  # every primary of a Cluster holds its own part of the keys
            cursor = 0
            while True:
                with self._wrap_errors("scan"):
                    raw_cursor, keys = await node.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 500)
                cursor = int(raw_cursor)
                yield keys
                if cursor == 0:
                    break

    async def scan_prefix(self, prefix: str) -> AsyncIterator[str]:
        async for page in self._scan_pages(prefix):
            for key in page:
                yield key.decode()[len(self._prefix) :]

    async def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        async for page in self._scan_pages(prefix):
            by_slot: dict[int, list[bytes]] = defaultdict(list)  # one UNLINK per slot: a Cluster refuses more
            for key in page:
                by_slot[key_slot(key) if self.topology == "cluster" else 0].append(key)
            for keys in by_slot.values():
                with self._wrap_errors("delete_prefix"):
                    deleted += await self._call(keys[0].decode(), "UNLINK", *keys)
        return deleted

    # -- notification ----------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        with self._wrap_errors("publish"):
            await self._call(channel, "PUBLISH", self._k(channel), message)

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        return self._hub.subscribe(self._k(channel))

    # -- lifecycle -------------------------------------------------------------

    async def ping(self) -> None:
        """Every primary answers PING (a Cluster's all of them: a slot range without one is down)."""
        with self._wrap_errors("ping"):
            for node in await self._router.primaries():
                await node.execute("PING")

    async def close(self) -> None:
        await self._hub.close()
        await self._router.close()
