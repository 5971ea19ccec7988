"""Which node a store command goes to: one node, Sentinel's current primary, or a Cluster's slot owner.

A router has one small surface that ``RedisStore`` uses whatever the topology:
``call(key, *args)`` (the key picks the node on a Cluster, and is ignored elsewhere),
``primaries()`` (every node holding data: SCAN, PING), ``pubsub_endpoint()`` (where the
store's one pub/sub connection goes) and ``close()``.

Sentinel: the primary's address is asked of the sentinels (``SENTINEL get-master-addr-by-name``)
at every (re)connect, and the node must say ``ROLE`` master; a READONLY reply drops the connection.
So after a failover the next command that finds the old primary gone asks again and reaches the
new one — no restart, no background task. Cluster routing is in ``gateway.store.cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.store.failures import unechoed
from gateway.store.resp import Endpoint, Refused, ReplyError, RespClient, Unlocated
from gateway.store.url import StoreURL, address

SENTINEL_TIMEOUT_S = 0.5  # per sentinel asked: a dead one must not eat a request's whole connect time
SENTINEL_WATCH_S = 0.5  # how often the sentinels are asked which node is the primary (``Single._watch_sentinels``)
log = logging.getLogger("reliapi")


class Single:
    """One node (``redis://``, ``rediss://``, ``unix://``), or Sentinel's primary."""

    def __init__(self, url: StoreURL, *, connect_timeout_s: float, timeout_s: float) -> None:
        self._watch: asyncio.Task[None] | None = None
        if url.topology == "sentinel":
            self.locate: Any = SentinelLocator(url)
            self.client = RespClient(self._located, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s,
                                     primary_only=True, label="the primary at {at} (named by the sentinels)")
        else:
            endpoint = Endpoint.of(url)
            self.client = RespClient(endpoint, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s,
                                     on_connect=standalone_only, single_node=True)
            self.locate = _fixed(endpoint)

    def call(self, key: str | None, *args: Any) -> Awaitable[Any]:
        return self.client.execute(*args)  # (the client's coroutine itself: no frame of its own per command)

    async def primaries(self) -> list[RespClient]:
        return [self.client]

    async def pubsub_endpoint(self) -> Endpoint:
        return await self.locate()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if isinstance(self.locate, SentinelLocator):
            await self.locate.close()
        await self.client.close()

    async def _located(self) -> Endpoint:
        """Sentinel's primary, at each (re)connect; the first one starts the watch on the sentinels."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_sentinels())
        return await self.locate()

    async def _watch_sentinels(self) -> None:
        """Ask the sentinels every ``SENTINEL_WATCH_S`` which node is the primary, and leave the one connected to
        as soon as they name another. A failover whose old primary stays up (a manual ``SENTINEL FAILOVER``, one
        that was only paused) leaves it a writable primary until the sentinels reconfigure it, ~10 s later: every
        write it took meanwhile — an idempotency key's claim, a budget's spend — is discarded then, and the key
        runs twice, the budget overshoots. Commands in flight on it fail (``store_unavailable``); the next
        command connects to the new primary."""
        client, locate = self.client, self.locate
        while True:
            await asyncio.sleep(SENTINEL_WATCH_S)
            proto, ep = client._proto, client.endpoint
            if proto is None or proto.lost or ep is None:
                continue
            named = await locate.named()
            if named is not None and named != (ep.host, ep.port) and client._proto is proto:
                log.warning("store: the sentinels name %s:%s the primary now, not %s:%s: reconnecting", *named,
                            ep.host, ep.port)
                proto.fail(ConnectionError(f"the sentinels named another primary than {client.who} (a failover)"))


async def standalone_only(send: Callable[..., Awaitable[Any]], proto: Any, client: RespClient) -> None:
    """A ``redis://`` URL's node, at each connect: raise ``Refused`` when it is a Sentinel, a replica or a Cluster
    node (each would take some commands and refuse others: ready, then requests failing one by one). A user whose
    ACL does not allow ROLE or INFO is not refused for that: what cannot be asked is not held against the node."""
    try:
        role = await send(proto, ("ROLE",))
    except ReplyError as e:
        if str(e).startswith(("NOAUTH", "WRONGPASS")):  # (said as a refusal that names the node)
            raise
        return
    kind = role[0] if isinstance(role, list) and role else b""
    at = f"{client.host}:{client.port}" if client.host else "host:port"
    if kind == b"sentinel":
        raise Refused(f"{client.who} is a Sentinel, not a Redis server: write redis+sentinel://{at}/<primary name>")
    if kind != b"master":
        raise Refused(f"{client.who} is a read-only replica: point the URL at its primary, or let Sentinel find it "
                      "(redis+sentinel://)")
    try:
        info = await send(proto, ("INFO", "cluster"))
    except ReplyError:
        return
    if isinstance(info, bytes) and info.find(b"cluster_enabled:1") >= 0:
        raise Refused(f"{client.who} is a Redis Cluster node: write redis+cluster://{at} (each key then goes to the "
                      "node that holds its slot)")


def _fixed(endpoint: Endpoint) -> Any:
    async def locate() -> Endpoint:
        return endpoint

    return locate


class SentinelLocator:
    """Asks the sentinels, in order, for the primary named ``url.service``; the one that answered
    is asked first next time."""

    def __init__(self, url: StoreURL) -> None:
        self.sentinels = list(url.nodes)
        self.service = url.service or ""
        self.primary = Endpoint.of(url)
        self.via = dataclasses.replace(self.primary, username=url.sentinel_username,
                                       password=url.sentinel_password, db=0)
        self._watching: RespClient | None = None  # ``named``'s connection to a sentinel

    async def named(self) -> tuple[str, int] | None:
        """The primary's address as a sentinel names it now, over one connection kept for this (None: no sentinel
        answered — the watch keeps what it has)."""
        for _ in range(len(self.sentinels)):
            if self._watching is None:
                host, port = self.sentinels[0]
                self._watching = RespClient(dataclasses.replace(self.via, host=host, port=port),
                                            label="sentinel at {at}", connect_timeout_s=SENTINEL_TIMEOUT_S,
                                            timeout_s=SENTINEL_TIMEOUT_S)
            try:
                reply = await self._watching.execute("SENTINEL", "get-master-addr-by-name", self.service)
            except (OSError, ReplyError):
                await self._watching.close()
                self._watching = None
                self.sentinels.append(self.sentinels.pop(0))  # the next one, next time
                continue
            return (reply[0].decode(), int(reply[1])) if reply else None
        return None

    async def close(self) -> None:
        if self._watching is not None:
            await self._watching.close()
            self._watching = None

    async def __call__(self) -> Endpoint:
        problems, asked = [], []
        refused = False  # a node answered, and is no sentinel or refused our credentials: a misconfiguration
        for i, (host, port) in enumerate(list(self.sentinels)):
            sentinel = RespClient(dataclasses.replace(self.via, host=host, port=port), label="sentinel at {at}",
                                  connect_timeout_s=SENTINEL_TIMEOUT_S, timeout_s=SENTINEL_TIMEOUT_S)
            try:
                reply = await sentinel.execute("SENTINEL", "get-master-addr-by-name", self.service)
            except ReplyError as e:
                refused = refused or "unknown command" in str(e).lower() or str(e).startswith(
                    ("NOAUTH", "WRONGPASS", "NOPERM"))
                problems.append(f"sentinel at {address(host, port)} answered: {unechoed(e)}")
                continue
            except OSError as e:
                refused = refused or isinstance(e, Refused)
                problems.append(str(e))
                continue
            finally:
                await sentinel.close()
            if not reply:  # it answered: it knows no such primary
                asked.append(address(host, port))
                continue
            if i:
                self.sentinels.insert(0, self.sentinels.pop(i))
            return dataclasses.replace(self.primary, host=reply[0].decode(), port=int(reply[1]))
        if asked:  # a sentinel answered and knows no such name: a wrong master, not an outage
            others = f"; {'; '.join(problems)}" if problems else ""
            raise Refused(f"no sentinel knows a primary named {self.service!r} (asked: {', '.join(asked)}){others}")
        raise (Refused if refused else Unlocated)(
            f"no sentinel named the primary {self.service!r}: {'; '.join(problems)}")


async def refusals_of_every_seed(url: StoreURL) -> list[str]:
    """``--check``: what each sentinel or Cluster seed of ``url`` refuses (a wrong password, a node of the wrong
    kind, a primary it does not know) — a node that does not answer now is not counted: it may be up later. In
    service only the first that answers is asked; a misconfigured second would be found at the worst moment, a
    failover."""
    problems: list[str] = []
    for host, port in url.nodes:
        where = address(host, port)
        if url.topology == "sentinel":
            via = dataclasses.replace(Endpoint.of(url), host=host, port=port, username=url.sentinel_username,
                                      password=url.sentinel_password, db=0)
            client = RespClient(via, label="sentinel at {at}", connect_timeout_s=SENTINEL_TIMEOUT_S,
                                timeout_s=SENTINEL_TIMEOUT_S)
            ask: tuple[Any, ...] = ("SENTINEL", "get-master-addr-by-name", url.service or "")
        else:
            client = RespClient(Endpoint.of(url, (host, port)), label="Cluster seed at {at}", connect_timeout_s=1.0,
                                timeout_s=1.0)
            ask = ("INFO", "cluster")
        try:
            reply = await client.execute(*ask)
        except ReplyError as e:
            problems.append(f"{where} answered: {unechoed(e)}")
            continue
        except Refused as e:
            problems.append(str(e))
            continue
        except OSError:
            continue  # not reachable now: a warning's matter, not a misconfiguration
        finally:
            await client.close()
        if url.topology == "sentinel" and not reply:
            problems.append(f"the sentinel at {where} knows no primary named {url.service!r}")
        elif url.topology == "cluster" and (not isinstance(reply, bytes) or reply.find(b"cluster_enabled:1") < 0):
            problems.append(f"{where} is not a Redis Cluster node (cluster_enabled is not 1)")
    return problems
