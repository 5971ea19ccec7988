"""Circuit breaker (SPEC §5): stop sending to a target that keeps failing, probe it, come back.

One ``Breaker`` per target, an explicit state machine behind two calls — ``allow()``
before an attempt, ``record(ok)`` after it — on a monotonic clock:

- CLOSED: everything goes through; ``error_threshold`` consecutive failed attempts
  (5xx, timeout, connection failure, a stream cut or stalled mid-way) open it. Any other
  answer — 2xx, 4xx, 429 — resets the count; a stream counts when it ends. The gateway's
  own rejections, and streams the client abandons, count as nothing.
- OPEN: every attempt is refused at once with ``circuit_open`` and a ``Retry-After`` of
  the time left, for ``cooldown_s``; the fallback chain takes the request if it can.
- HALF_OPEN: after the cooldown, ``half_open_max_calls`` probe attempts go through and
  the rest are refused; a probe that succeeds closes the circuit, one that fails opens
  it again for a fresh cooldown.

It gates each attempt (it sits after ``retry`` in the pipeline), so a circuit that opens
while a request is retrying ends those retries too.

Shared between instances (``SharedCircuit``, via ``gateway.state.shared``): an opening or closing
is written to the store and announced, and the others follow at once — two gateways on one
Redis see the same open circuit. Probes are counted in the store, so a fleet sends
``half_open_max_calls`` probes in all, not one per instance. Consecutive failures are
counted per instance (no store write per request); whichever instance reaches the
threshold first opens the circuit for all. Transitions are emitted as events.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.clock import Clock
from gateway.config.model import CircuitConfig
from gateway.errors import CircuitOpen, GatewayError
from gateway.flow.exchange import Exchange, Reply
from gateway.observe.events import CircuitTransition, Events
from gateway.state.shared import SharedState
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.upstream.targets import Target

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}  # the Prometheus gauge's values (SPEC §7)

Transition = Callable[[str, str, str], None]


class Breaker:
    """The local state machine; ``on_transition(from, to, reason)`` hears every change."""

    __slots__ = ("target", "threshold", "cooldown_s", "half_open_max", "clock", "on_transition",
                 "state", "failures", "reopen_at", "probes")

    def __init__(self, target: str, cfg: CircuitConfig, clock: Clock, on_transition: Transition) -> None:
        self.target = target
        self.threshold = cfg.error_threshold
        self.cooldown_s = cfg.cooldown_s
        self.half_open_max = cfg.half_open_max_calls
        self.clock = clock
        self.on_transition = on_transition
        self.state = CLOSED
        self.failures = 0  # consecutive, while closed
        self.reopen_at = 0.0  # monotonic, while open
        self.probes = 0  # in flight, while half-open

    def retry_after_s(self) -> float:
        return max(0.0, self.reopen_at - self.clock.monotonic()) if self.state == OPEN else 1.0

    def shown(self) -> str:
        """The state as reported (the status page, /readyz, metrics, the admin API): an open circuit whose cooldown
        is over lets the next attempt through as a probe, so it is half-open — not "open" until a request happens to
        come, which a load balancer that stopped sending on /readyz's word would never send."""
        if self.state == OPEN and self.reopen_at <= self.clock.monotonic():
            return HALF_OPEN
        return self.state

    def allow(self) -> bool:
        """May an attempt go through now? Returns whether it is a half-open probe;
        raises ``CircuitOpen`` (with the time left as Retry-After) when it may not."""
        if self.state == CLOSED:
            return False
        if self.state == OPEN:
            left = self.reopen_at - self.clock.monotonic()
            if left > 0:
                raise self._refusal(left)
            self._move(HALF_OPEN, "cooldown over")
        if self.probes >= self.half_open_max:
            raise self._refusal(1.0)
        self.probes += 1
        return True

    def record(self, ok: bool, probe: bool) -> None:
        """The outcome of an attempt ``allow`` let through."""
        if probe:
            self.probes = max(0, self.probes - 1)
            if self.state == HALF_OPEN:
                if ok:
                    self.failures = 0
                    self._move(CLOSED, "probe succeeded")
                else:
                    self.open("probe failed")
            return
        if self.state != CLOSED:
            return  # an attempt admitted before the circuit opened: its news is stale
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.open(f"{self.failures} consecutive failures")

    def release(self, probe: bool) -> None:
        """An admitted attempt ended without telling anything (refused locally, client gone)."""
        if probe:
            self.probes = max(0, self.probes - 1)

    def open(self, reason: str, cooldown_s: float | None = None) -> None:
        self.failures = 0
        self.probes = 0
        self.reopen_at = self.clock.monotonic() + (self.cooldown_s if cooldown_s is None else cooldown_s)
        self._move(OPEN, reason)

    def close(self, reason: str) -> None:
        self.failures = 0
        self.probes = 0
        self._move(CLOSED, reason)

    def _move(self, to: str, reason: str) -> None:
        was, self.state = self.state, to
        if was != to:
            self.on_transition(was, to, reason)

    def _refusal(self, retry_after: float) -> CircuitOpen:
        return CircuitOpen(f"circuit for target {self.target} is open", target=self.target, retry_after=retry_after)


class _Record(msgspec.Struct):
    until: float  # wall time the cooldown ends, so instances agree without sharing a monotonic clock


class SharedCircuit:
    """A Breaker whose openings and closings are shared with the other instances."""

    def __init__(self, target: str, cfg: CircuitConfig, clock: Clock, events: Events, shared: SharedState,
                 probe_ttl_s: float) -> None:
        self.target = target
        self.clock = clock
        self.events = events
        self.shared = shared
        self.store = shared.store
        self.key = f"circuit:{target}"
        self.probe_key = f"circuit:{target}:probes"
        self.probe_ttl_s = probe_ttl_s
        self._remote = False  # the transition under way was announced by another instance
        self._adopting = False  # the first resync: the state found in the store is taken over silently
        self._synced = False
        self.breaker = Breaker(target, cfg, clock, self._transitioned)
        shared.on(f"circuit:{target}", self._on_message, self.resync)

    @property
    def state(self) -> str:
        return self.breaker.shown()

    async def admit(self) -> bool:
        """``allow`` for a circuit that is not closed; a probe also needs one of the fleet's slots."""
        probe = self.breaker.allow()
        if not probe:
            return False
        try:
            claimed = await self.store.incr(self.probe_key, 1, ttl_s=self.probe_ttl_s)
        except StoreError:
            return True  # store down: this instance probes on its own
        if claimed > self.breaker.half_open_max:
            self.breaker.release(probe)
            self.shared.spawn(self.store.incr(self.probe_key, -1), "probe release")
            raise self.breaker._refusal(1.0)
        return True

    def release(self, probe: bool) -> None:
        self.breaker.release(probe)
        if probe:
            self.shared.spawn(self.store.incr(self.probe_key, -1), "probe release")

    async def reset(self, reason: str = "reset by the admin API") -> bool:
        """Close the circuit now, here and — as any closing is — on every other instance; the
        closed record is written before this returns (a reload right after must not reopen it
        from the store). False when the store did not take it (this instance is closed anyway)."""
        self._remote = True  # the write and the announcement are done below, not in the background
        try:
            self.breaker.close(reason)
        finally:
            self._remote = False
        try:
            await self._write_closed()
        except StoreError:
            return False
        self.shared.publish(f"circuit:{self.target}", {"state": CLOSED})
        return True

    def _transitioned(self, was: str, to: str, reason: str) -> None:
        if self._adopting:  # taking over the shared state at start (or on reload) is not a transition
            return
        self.events.emit(CircuitTransition(target=self.target, from_state=was, to_state=to, reason=reason))
        if self._remote or to == HALF_OPEN:  # half-open is each instance's own reading of the clock
            return
        if to == OPEN:
            until = self.clock.time() + self.breaker.retry_after_s()
            ttl = max(1.0, until - self.clock.time()) + 60
            self.shared.spawn(self._write_open(until, ttl), "circuit open")
            self.shared.publish(f"circuit:{self.target}", {"state": OPEN, "until": until})
        else:
            self.shared.spawn(self._write_closed(), "circuit close")
            self.shared.publish(f"circuit:{self.target}", {"state": CLOSED})

    async def _write_open(self, until: float, ttl: float) -> None:
        await self.store.set(self.key, msgspec.json.encode(_Record(until=until)), ttl)
        await self.store.delete(self.probe_key)

    async def _write_closed(self) -> None:
        await self.store.delete(self.key)
        await self.store.delete(self.probe_key)

    def _on_message(self, message: dict[str, Any]) -> None:
        state = message.get("state")
        if state == OPEN:
            until = message.get("until")
            if isinstance(until, (int, float)) and math.isfinite(until):
                self._apply_open(until, "opened by another instance")
        elif state == CLOSED and self.breaker.state != CLOSED:
            self._remote = True
            try:
                self.breaker.close("closed by another instance")
            finally:
                self._remote = False

    def _apply_open(self, until: float, reason: str) -> None:
        left = until - self.clock.time()
        if left <= 0 or (self.breaker.state == OPEN and self.breaker.reopen_at >= self.clock.monotonic() + left - 0.5):
            return
        self._remote = True
        try:
            self.breaker.open(reason, cooldown_s=left)
        finally:
            self._remote = False

    async def resync(self) -> None:
        first, self._synced = not self._synced, True
        raw = await self.store.get(self.key)
        if raw is None:
            return
        try:
            record = msgspec.json.decode(raw, type=_Record)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self._adopting = first
        try:
            self._apply_open(record.until, "open in the shared store")
        finally:
            self._adopting = False


def policy(ctx: Context, target: Target) -> tuple[Policy, SharedCircuit]:
    """The target's breaker, and its circuit (the runtime's, for the admin API, metrics and retries)."""
    cfg = target.config
    probe_ttl = max(target.timeout_s, target.ttft_timeout_s) + 5  # a probe holder that dies frees its slot
    circuit = SharedCircuit(target.name, cfg.circuit, ctx.clock, ctx.events, ctx.shared, probe_ttl)
    breaker = circuit.breaker

    async def circuit_breaker(ex: Exchange, call_next: Handler) -> Reply:
        probe = False if breaker.state == CLOSED else await circuit.admit()
        try:
            reply = await call_next(ex)
        except GatewayError as e:
            if e.trips_breaker:
                breaker.record(False, probe)
            else:
                circuit.release(probe)
            raise
        except BaseException:  # cancelled: the client left, the upstream told us nothing
            circuit.release(probe)
            raise
        failure = reply.failure
        if failure is None and not probe:
            if reply.chunks is not None:  # a stream is judged when it ends: one cut mid-way is a failure
                reply.on_close(partial(_stream_ended, breaker))
            elif breaker.failures:
                breaker.record(True, False)
            return reply  # the common case: a good answer on a closed circuit, nothing to write down
        if failure is None and reply.chunks is not None:
            reply.on_close(partial(_stream_cut, breaker))  # a probe decides at its first byte
        breaker.record(failure is None or not failure.trips_breaker, probe)
        return reply

    return circuit_breaker, circuit


def _stream_ended(breaker: Breaker, error: BaseException | None) -> None:
    if error is None:
        breaker.record(True, False)
    else:
        _stream_cut(breaker, error)  # abandoned by the client: it tells nothing about the upstream


def _stream_cut(breaker: Breaker, error: BaseException | None) -> None:
    if isinstance(error, GatewayError) and error.trips_breaker:
        breaker.record(False, False)
