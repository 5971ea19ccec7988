"""Redis Cluster routing for the store: each command to the primary that owns its key's slot.

The slot map comes from ``CLUSTER SLOTS`` (asked of any reachable node: known primaries first, then
the URL's seed nodes) and is refreshed when a node answers MOVED, or a node could not be reached (a
failover: its replica is being promoted). A MOVED or ASK answer means the command did not run, so
it is sent again to the node named; TRYAGAIN (a script whose keys are half migrated) is sent again after a
pause, for up to ``_TRYAGAIN_WITHIN_S``; a connection that failed is never retried here — the command
may have run, and only the caller knows whether it may run twice.

Every multi-key script keeps its keys in one slot (``base.one_slot``: a shared ``{hash tag}``),
so it runs atomically on one node as on a single Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from gateway.store.failures import unechoed
from gateway.store.resp import Endpoint, Refused, ReplyError, RespClient
from gateway.store.url import StoreURL, address

SLOTS = 16384
_REFRESH_GAP_S = 0.1  # at most this often while nodes keep failing
_REDIRECTS = 3
_TRYAGAIN_PAUSE_S = 0.01  # then doubling, at most 0.2 s between tries
_TRYAGAIN_WITHIN_S = 3.0  # a slot's keys moving take about this long at most before a command fails


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: str | bytes) -> int:
    """The Cluster hash slot of ``key``: CRC16 (XMODEM) of its hash tag — the text inside the first
    ``{…}`` when not empty — or of the whole key, mod 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


class Cluster:
    """The store's router on a Redis Cluster (see ``gateway.store.topology`` for the interface)."""

    def __init__(self, url: StoreURL, *, connect_timeout_s: float, timeout_s: float) -> None:
        self.template = Endpoint.of(url)
        self.seeds = list(url.nodes)
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self.slots: list[tuple[str, int] | None] = [None] * SLOTS
        self.nodes: dict[tuple[str, int], RespClient] = {}
        self.stale = True
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = -_REFRESH_GAP_S

    def client(self, node: tuple[str, int]) -> RespClient:
        found = self.nodes.get(node)
        if found is None:
            found = self.nodes[node] = RespClient(
                dataclasses.replace(self.template, host=node[0], port=node[1]),
                connect_timeout_s=self.connect_timeout_s, timeout_s=self.timeout_s)
        return found

    async def call(self, key: str | None, *args: Any) -> Any:
        if self.stale:
            await self.refresh()
        slot = 0 if key is None else key_slot(key)
        node, asking = self.slots[slot], False
        redirects, pause, waited = 0, _TRYAGAIN_PAUSE_S, 0.0
        while redirects < _REDIRECTS:
            if node is None:
                raise ConnectionError(f"no Cluster node serves slot {slot} (the cluster is not fully covered)")
            client = self.client(node)
            try:
                return await (client.execute_asking(*args) if asking else client.execute(*args))
            except ReplyError as e:
                kind, _, where = str(e).partition(" ")
                if kind == "TRYAGAIN" and waited < _TRYAGAIN_WITHIN_S:
                    # the slot is being migrated and this script's keys are on both sides for a moment: it did not
                    # run; once the keys have moved it runs (on the node an ASK names, or this one)
                    await asyncio.sleep(pause)
                    waited += pause
                    pause = min(pause * 2, 0.2)
                    node, asking, redirects = self.slots[slot], False, 0
                    continue
                if kind not in ("MOVED", "ASK"):
                    raise
                redirects += 1
                host, _, port = where.partition(" ")[2].rpartition(":")
                node, asking = (host or node[0], int(port)), kind == "ASK"
                if kind == "MOVED":
                    self.slots[slot] = node
                    self.stale = True
            except OSError:
                self.stale = True  # a failover may be under way: ask for the map before the next command
                raise
        raise ConnectionError(f"slot {slot} kept moving ({_REDIRECTS} redirects)")

    async def primaries(self) -> list[RespClient]:
        if self.stale:
            await self.refresh()
        return [self.client(node) for node in dict.fromkeys(n for n in self.slots if n is not None)]

    async def pubsub_endpoint(self) -> Endpoint:
        """Any primary: a PUBLISH on a Cluster reaches every node's subscribers."""
        clients = await self.primaries()
        if not clients:
            raise ConnectionError("the Cluster has no primary")
        return clients[0].endpoint  # type: ignore[return-value]

    async def refresh(self) -> None:
        """Read the slot map again: one refresh for every caller waiting on it, at most every 0.1 s."""
        if self._refreshing is None:
            if time.monotonic() - self._refreshed_at < _REFRESH_GAP_S and any(self.slots):
                return
            self._refreshing = asyncio.ensure_future(self._refresh())
        refreshing = self._refreshing
        try:
            await asyncio.shield(refreshing)
        finally:
            if self._refreshing is refreshing and refreshing.done():
                self._refreshing = None

    async def _refresh(self) -> None:
        self._refreshed_at = time.monotonic()
        known = dict.fromkeys([*(n for n in self.slots if n is not None), *self.seeds, *self.nodes])
        problems = []
        refused = False  # a node answered and refused us (AUTH, ACL): a misconfiguration, not an outage
        for node in known:
            try:
                reply = await self.client(node).execute("CLUSTER", "SLOTS")
            except ReplyError as e:
                text = str(e)
                if "cluster support disabled" in text or "unknown command" in text.lower():  # a single node, a sentinel
                    why = "cluster support disabled" if "cluster support disabled" in text else unechoed(e).strip()
                    raise Refused(f"{address(*node)} is not a Redis Cluster node ({why}): use redis:// (or a "
                                  "sentinel block) for anything else") from None
                refused = refused or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))
                problems.append(f"{address(*node)} answered: {unechoed(e)}")
                continue
            except OSError as e:
                refused = refused or isinstance(e, Refused)
                problems.append(str(e))  # (it names the node)
                continue
            slots: list[tuple[str, int] | None] = [None] * SLOTS
            for start, end, primary, *_ in reply:
                host = primary[0].decode() or node[0]
                slots[start:end + 1] = [(host, int(primary[1]))] * (end - start + 1)
            self.slots, self.stale = slots, False
            for gone in set(self.nodes) - set(slots) - set(self.seeds):
                await self.nodes.pop(gone).close()
            return
        raise (Refused if refused else ConnectionError)(f"no Cluster node answered CLUSTER SLOTS: {'; '.join(problems)}")

    async def close(self) -> None:
        for client in self.nodes.values():
            await client.close()
        self.nodes.clear()
