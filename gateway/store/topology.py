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

import dataclasses
from collections.abc import Awaitable
from typing import Any

from gateway.store.resp import Endpoint, Refused, ReplyError, RespClient
from gateway.store.url import StoreURL

SENTINEL_TIMEOUT_S = 0.5  # per sentinel asked: a dead one must not eat a request's whole connect time


class Single:
    """One node (``redis://``, ``rediss://``, ``unix://``), or Sentinel's primary."""

    def __init__(self, url: StoreURL, *, connect_timeout_s: float, timeout_s: float) -> None:
        if url.topology == "sentinel":
            self.locate: Any = SentinelLocator(url)
            self.client = RespClient(self.locate, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s,
                                     primary_only=True)
        else:
            endpoint = Endpoint.of(url)
            self.client = RespClient(endpoint, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)
            self.locate = _fixed(endpoint)

    def call(self, key: str | None, *args: Any) -> Awaitable[Any]:
        return self.client.execute(*args)  # (the client's coroutine itself: no frame of its own per command)

    async def primaries(self) -> list[RespClient]:
        return [self.client]

    async def pubsub_endpoint(self) -> Endpoint:
        return await self.locate()

    async def close(self) -> None:
        await self.client.close()


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

    async def __call__(self) -> Endpoint:
        problems = []
        refused = False  # a node answered, and is no sentinel or refused our credentials: a misconfiguration
        for i, (host, port) in enumerate(list(self.sentinels)):
            sentinel = RespClient(dataclasses.replace(self.via, host=host, port=port),
                                  connect_timeout_s=SENTINEL_TIMEOUT_S, timeout_s=SENTINEL_TIMEOUT_S)
            try:
                reply = await sentinel.execute("SENTINEL", "get-master-addr-by-name", self.service)
            except (OSError, ReplyError) as e:
                refused = refused or isinstance(e, Refused) or (isinstance(e, ReplyError) and (
                    "unknown command" in str(e).lower() or str(e).startswith(("NOAUTH", "WRONGPASS", "NOPERM"))))
                problems.append(f"sentinel {host}:{port}: {e}")
                continue
            finally:
                await sentinel.close()
            if not reply:
                problems.append(f"sentinel {host}:{port} knows no primary named {self.service!r}")
                continue
            if i:
                self.sentinels.insert(0, self.sentinels.pop(i))
            return dataclasses.replace(self.primary, host=reply[0].decode(), port=int(reply[1]))
        raise (Refused if refused else ConnectionError)(
            f"no sentinel named the primary {self.service!r}: {'; '.join(problems)}")
