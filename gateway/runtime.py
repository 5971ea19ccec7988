"""Everything a loaded config turns into: targets, router, pipeline, store, logs.

Built once per config (at startup, and again on reload); the request path only
reads it. Resources with a lifetime (the store, each target's connection pool)
are opened by ``start`` and closed by ``close``. A reload builds a new Runtime,
swaps it into the ``RuntimeSlot`` between requests, and retires the old one once
the requests it is still serving had their grace period; an unchanged store is
handed over, so state kept in it survives.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import msgspec

from gateway.clock import Clock
from gateway.config.model import Config
from gateway.config.store import StoreConfig, memory_max_bytes
from gateway.edge.answers import Model
from gateway.errors import SHUTDOWN
from gateway.flow.build import build
from gateway.flow.chain import Handler
from gateway.flow.context import Context
from gateway.flow.tenants import Tenants
from gateway.observe.counters import Observatory
from gateway.observe.events import Events
from gateway.observe.logs import AccessLog
from gateway.observe.otel import SpanExport
from gateway.observe.trace import Tracing
from gateway.scrub import Scrubber
from gateway.state.shared import SharedState
from gateway.store import Store, StoreError, StoreMisconfigured, open_store
from gateway.store.memory import MemoryStore
from gateway.upstream.routing import Routes
from gateway.upstream.targets import Router, Target
from policies.door import Guard
from providers.pricing import PriceTable

log = logging.getLogger("reliapi")


_RELEASE_S = 1.0  # at shutdown, for cancelled leaders to release their keys in the store


class Call(Protocol):
    """What a runtime needs of a request running on it (``gateway.edge.call.Call``)."""

    task: asyncio.Task[Any] | None
    relaying: bool


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        env: Mapping[str, str] = os.environ,
        access_log_write: Callable[[str], Any] | None = None,
        store: Store | None = None,
        access_log: AccessLog | None = None,
        clock: Clock | None = None,
        events: Events | None = None,
        observatory: Observatory | None = None,
        spans: SpanExport | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.clock = clock or Clock()
        self.events = events or Events()
        if observatory is None:  # a Runtime of its own (tests); the app passes the one it keeps
            observatory = Observatory()
            observatory.listen(self.events)
        self.observatory = observatory
        self.spans = spans  # where recorded traces go (gateway.observe.otel; None: spans are not recorded)
        self.tracing = Tracing(config.tracing.sample_ratio, response_header=config.tracing.response_header,
                               recording=spans is not None)
        observatory.track(list(config.targets), [t.name for t in config.tenants])  # the status page's trends
        pools = config.provider_key_pools  # by target name, else by provider (the seed's form)
        self.targets = {
            name: Target(name, t, env, pools.get(name) or pools.get(t.provider or "http"))
            for name, t in config.targets.items()
        }
        self.router = Router(config, self.targets)
        self.routes = Routes(config)  # virtual models (routing:)
        self.tenants = Tenants(config, env)
        self.prices = PriceTable(config.pricing)
        self.catalog: list[Model] | None = None  # GET /v1/models, built on first use
        self.background: set[asyncio.Task[Any]] = set()  # work that outlives its request (a coalesced leader)
        self.calls: set[Call] = set()  # proxied requests running on this runtime (``gateway.edge.serve``)
        self.drained: asyncio.Future[None] | None = None  # set when the last one ends, once a reload retired it
        self.cutting = False  # the shutdown's grace period is over (``cut``)
        self.store = store or open_store(config.store.url, key_prefix=config.store.key_prefix,
                                         memory_max_bytes=memory_max_bytes(config.store))
        self.scrub = Scrubber(_secrets(config, env, self.targets.values()))
        self.access_log = access_log or AccessLog(access_log_write)
        self.max_body = int(config.server.max_body_mb * 1024 * 1024)
        self.shared = SharedState(self.store)
        context = Context(
            config=config, clock=self.clock, events=self.events, store=self.store, shared=self.shared,
            background=self.background, prices=self.prices, tenants=self.tenants, targets=self.targets,
        )
        self.guard = Guard.of(context)  # the door of the proxied surfaces: bans, per-IP limits (None: nothing to do)
        self.flow: Handler  # a parsed request's way through the policies to an upstream and back
        self.flow, owned = build(context, self.scrub)
        # What the policies own, for the admin API, metrics, the status page and shutdown.
        self.circuits = owned.circuits
        self.key_pools = owned.key_pools
        self.closers: list[Callable[[], Awaitable[None]]] = owned.closers  # their last writes
        self.usage_book_flush: Callable[[], Awaitable[None]] = owned.usage_flush  # the usage counts, now

    async def store_problem(self, timeout_s: float = 1.0) -> str | None:
        """None when the store answers a ping within ``timeout_s``; else why not (scrubbed of secrets) — for
        the probes, ``/v1/health`` and the status page."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.store.ping()
        except (StoreError, TimeoutError) as e:
            text = str(e) if isinstance(e, StoreError) else ""
            return self.scrub(text) if text else f"no answer within {timeout_s:g} s"
        return None

    def circuit_states(self) -> dict[str, str]:
        """Each target's circuit: closed, open or half_open (a target without a breaker is closed)."""
        circuits = self.circuits
        return {name: circuits[name].state if name in circuits else "closed" for name in sorted(self.targets)}

    async def start(self, *, strict: bool = False) -> None:
        """Connect what needs connecting. A store that refuses us (a wrong password, an untrusted certificate, no
        cluster node) is, like one that does not answer, served around at startup — /readyz says why, and Redis
        can be fixed without a restart; ``strict`` (a reload) raises it instead, so the running config stays."""
        for target in self.targets.values():
            await target.transport.start()
        try:
            await self.store.ping()
        except StoreMisconfigured as e:
            if strict:
                raise
            log.warning("store %s refuses the gateway: %s (not ready until that is fixed)", self.store.url_for_display, e)
        except StoreError as e:  # serve anyway: /readyz reports it, policies degrade per SPEC §8
            log.warning("store %s is not answering: %s", self.store.url_for_display, e)
        await self.shared.start()

    async def drain(self) -> None:
        """Until the proxied requests that started on this runtime have ended (a retired one's streams), and the
        work they led for others (a coalesced leader whose followers run on the new runtime)."""
        while self.calls or self.background:
            if self.calls:
                if self.drained is None or self.drained.done():
                    self.drained = asyncio.get_running_loop().create_future()
                await asyncio.shield(self.drained)  # (shared: a shutdown's wait and a reload's may both be on it)
            else:
                await asyncio.wait(list(self.background))

    @property
    def active(self) -> int:
        return len(self.calls)

    def request_ended(self, call: Call) -> None:
        calls = self.calls
        calls.discard(call)
        if not calls and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def cut(self) -> None:
        """The shutdown's grace period is over: a request not answered yet gets a 503 it can retry elsewhere
        (its task is cancelled, ``serve`` answers), a stream being relayed its in-band error event
        (``Transport.end_streams``), and work led for others stops."""
        self.cutting = True
        for call in list(self.calls):
            if not call.relaying and call.task is not None:
                call.task.cancel(SHUTDOWN)
        for task in list(self.background):
            task.cancel(SHUTDOWN)
        for target in self.targets.values():
            target.transport.end_streams()

    async def close(self, *, close_store: bool = True, close_log: bool = True) -> None:
        if self.background:  # answers others wait for (idempotency, cache) finish, within the grace period; once cut,
            # the leaders were cancelled: they only release their keys now (before the store closes under them)
            await asyncio.wait(list(self.background),
                               timeout=_RELEASE_S if self.cutting else max(self.config.server.shutdown_grace_s, 0.1))
        for closer in self.closers:
            try:
                await closer()
            except Exception:
                log.exception("closing a policy failed")
        await self.shared.close()
        for target in self.targets.values():
            await target.transport.close()
        if close_store:
            await self.store.close()
        if close_log:
            self.access_log.close()


def _secrets(config: Config, env: Mapping[str, str], targets: Any) -> list[str]:
    """Every configured secret value: upstream keys, tenant keys, the admin key, a marketplace's proxy secret."""
    found = [s for t in targets for s in t.credential.secrets]
    for tenant in config.tenants:
        found.append(tenant.api_key or "")
        if tenant.api_key_env:
            found.append(env.get(tenant.api_key_env, ""))
    if config.server.admin_key_env:
        found.append(env.get(config.server.admin_key_env, ""))
    rapidapi = config.marketplaces.rapidapi
    if rapidapi is not None and rapidapi.proxy_secret_env:
        found.append(env.get(rapidapi.proxy_secret_env, ""))
    return [s for s in found if s]


class RuntimeSlot:
    """Holds the live Runtime; requests read ``slot.current`` once, when they start."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: set[Runtime] = set()  # replaced by a reload, still finishing their requests
        self.stopping = False  # draining for shutdown: every answer says ``Connection: close``

    async def reload(self, config: Config) -> Runtime:
        old = self.current
        same_store = _store_proper(config.store) == _store_proper(old.config.store)
        if same_store and isinstance(old.store, MemoryStore):  # a new bound for the same store: its state stays
            old.store.max_cache_bytes = memory_max_bytes(config.store)
        new = Runtime(
            config, env=old.env, store=old.store if same_store else None, access_log=old.access_log,
            clock=old.clock, events=old.events, observatory=old.observatory, spans=old.spans,
        )
        try:
            await new.start(strict=True)
        except StoreMisconfigured:  # the running config stays (``gateway.reload`` says why)
            await new.close(close_store=not same_store, close_log=False)
            raise
        self.current = new
        task = asyncio.create_task(self._retire(old, close_store=not same_store))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return new

    async def drain(self) -> None:
        """Until no proxied request runs, on the current runtime or on one a reload replaced (shutdown)."""
        for rt in [self.current, *self._retired]:
            await rt.drain()

    def cut(self) -> None:
        """The shutdown's grace period is over (``Runtime.cut``), on every runtime still serving."""
        for rt in [self.current, *self._retired]:
            rt.cut()

    async def _retire(self, old: Runtime, *, close_store: bool) -> None:
        """Requests that started on the old runtime end on it, with its pools, however long a stream of theirs
        goes on (each is bounded by its own timeouts): a reload never cuts one. Then it is closed — or when the
        gateway shuts down first, whose grace period bounds them all (a stream still open then ends with an
        in-band error, ``Transport.close``)."""
        self._retired.add(old)
        try:
            await old.drain()
        finally:  # also when shutdown cuts the wait short: pools closed, last usage counts written
            self._retired.discard(old)
            await old.close(close_store=close_store, close_log=False)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.current.close()


def _store_proper(store: StoreConfig) -> StoreConfig:
    """What decides which store a config opens (a memory store's bound can change without a new store)."""
    return msgspec.structs.replace(store, memory_max_mb=None)
