"""Abuse: violations counted per subject, bans that every instance enforces, and anomalies (issue #16).

A *violation* is a request the gateway itself refused for the caller's behaviour: a 429 from
any of its limits, a failed authentication, a request refused as malformed (400). Each counts
against the request's *subjects* — ``abuse.subjects``: its client IP, the tenant key it
authenticated with, and/or its fingerprint (IP, User-Agent and presented key, hashed) — in a
GCRA bucket of ``ban_after`` violations refilled over ``window_s``, in the store, so the whole
fleet counts together. A subject whose bucket runs dry is banned for ``ban_s``: the edge refuses
it with ``403 forbidden`` ("banned", ``Retry-After``) before any other step — no policy runs, no
upstream is asked. The ban is written to the store (expiring by itself) and announced to the
other instances (``gateway.state.shared``), which keep the bans in memory: checking one costs no
store round trip. The admin API lists and lifts them. An address in ``abuse.allow`` (CIDRs) is
never counted or banned; nothing else is exempt, loopback included.

*Anomalies* break no limit (``abuse.anomalies``), counted per instance in memory: one tenant key
seen from more than ``max_fingerprints_per_key`` fingerprints within ``window_s`` (a shared or
leaked key), and a tenant whose last minute is ``rate_jump_factor``× its trailing per-minute
average (and at least ``min_rpm``). Each is an event (log line, metric) once per window; with
``throttle: true`` the tenant's requests are refused with 429 ``anomaly`` while it lasts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import Forbidden, RateLimited
from gateway.observe.events import AbuseViolation, AnomalyDetected, Banned
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.config.model import AbuseConfig, AnomalyConfig
    from gateway.observe.events import Events
    from gateway.state.shared import SharedState

log = logging.getLogger("reliapi")

BAN_PREFIX = "ban:"


class BannedError(Forbidden):
    """A subject with too many violations, refused until its ban ends."""


class AnomalyThrottled(RateLimited):
    code = "anomaly"


class Ban(msgspec.Struct):
    subject: str  # "ip:203.0.113.9", "key:<tenant>", "fp:<hash>"
    until: float  # wall time
    reason: str


def fingerprint(ip: str | None, user_agent: str | None, presented_key: str | None) -> str:
    """A short, stable, non-reversible name for (IP, User-Agent, presented key): the key is hashed in, never kept."""
    h = hashlib.sha256(f"{ip or '-'}\x00{user_agent or '-'}\x00{presented_key or '-'}".encode())
    return h.hexdigest()[:16]


class Bans:
    """The bans in force, in memory, kept in step with the store and the other instances."""

    def __init__(self, config: AbuseConfig, clock: Clock, events: Events, shared: SharedState) -> None:
        self.config = config
        self.clock = clock
        self.events = events
        self.shared = shared
        self.store = shared.store
        self.by_subject: dict[str, Ban] = {}
        self.allow = [ipaddress.ip_network(c, strict=False) for c in config.allow]
        self.rate = config.ban_after / config.window_s
        self.burst = config.ban_after - 1
        shared.on("bans", self._on_message, self.resync)

    # -- the request path ------------------------------------------------------

    def allowed(self, ip: str | None) -> bool:
        if not self.allow or not ip:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.allow)

    def check(self, subjects: list[str]) -> None:
        """Raise ``BannedError`` when any of the subjects is banned."""
        by_subject = self.by_subject
        if not by_subject:
            return
        now = self.clock.time()
        for subject in subjects:
            ban = by_subject.get(subject)
            if ban is None:
                continue
            if ban.until <= now:
                del by_subject[subject]
                continue
            wait = ban.until - now
            raise BannedError(f"banned: {ban.reason}; retry after {math.ceil(wait)}s", retry_after=wait,
                              headers={"X-ReliAPI-Banned": subject.partition(":")[0]})

    async def violation(self, subjects: list[str], reason: str) -> None:
        """Count one violation against each subject; ban the ones over ``ban_after`` within ``window_s``."""
        for subject in subjects:
            self.events.emit(AbuseViolation(target="", subject=subject.partition(":")[0], reason=reason))
            try:
                got = await self.store.take(f"abuse:{subject}", rate_per_s=self.rate, burst=self.burst)
            except StoreError as e:
                log.warning("abuse: store unavailable, violations not counted: %s", e)
                return
            if (not got.allowed or got.remaining == 0) and subject not in self.by_subject:  # the ban_after-th
                await self.ban(subject, f"{self.config.ban_after} violations within {self.config.window_s:g}s "
                                        f"(last: {reason})", self.config.ban_s)

    # -- bans --------------------------------------------------------------------

    async def ban(self, subject: str, reason: str, seconds: float) -> Ban:
        ban = Ban(subject, self.clock.time() + seconds, reason)
        self.by_subject[subject] = ban
        self.events.emit(Banned(target="", subject=subject.partition(":")[0], ban_s=seconds))
        log.warning("abuse: %s banned for %gs: %s", subject, seconds, reason)
        self.shared.spawn(self.store.set(BAN_PREFIX + subject, msgspec.json.encode(ban), seconds), "ban")
        self.shared.publish("bans", {"ban": msgspec.to_builtins(ban)})
        return ban

    async def lift(self, subject: str) -> bool:
        """End a ban now, everywhere; False when there was none."""
        known = self.by_subject.pop(subject, None)
        stored = await self.store.get(BAN_PREFIX + subject)
        await self.store.delete(BAN_PREFIX + subject)
        await self.store.delete(f"abuse:{subject}")  # a fresh start, not one violation from the next ban
        self.shared.publish("bans", {"lift": subject})
        return known is not None or stored is not None

    def active(self) -> list[Ban]:
        now = self.clock.time()
        return sorted((b for b in self.by_subject.values() if b.until > now), key=lambda b: b.until)

    def _on_message(self, message: dict[str, Any]) -> None:
        if "lift" in message:
            self.by_subject.pop(str(message["lift"]), None)
            return
        try:
            ban = msgspec.convert(message.get("ban"), Ban)
        except msgspec.ValidationError:
            return
        self.by_subject[ban.subject] = ban

    async def resync(self) -> None:
        found: dict[str, Ban] = {}
        async for key in self.store.scan_prefix(BAN_PREFIX):
            raw = await self.store.get(key)
            if raw is None:
                continue
            try:
                ban = msgspec.json.decode(raw, type=Ban)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            found[ban.subject] = ban
        self.by_subject = found


class Anomalies:
    """Per-instance detectors of account sharing and rate jumps, per tenant."""

    def __init__(self, config: AnomalyConfig, clock: Clock, events: Events) -> None:
        self.config = config
        self.clock = clock
        self.events = events
        self.seen: dict[str, dict[str, float]] = {}  # tenant → fingerprint → last seen (monotonic)
        self.minutes: dict[str, deque[list[int]]] = {}  # tenant → [minute index, count] for window_s
        self.first: dict[str, int] = {}  # tenant → the minute it was first seen (a jump needs a whole window before)
        self.flagged: dict[tuple[str, str], float] = {}  # (tenant, kind) → until (monotonic)

    def observe(self, tenant: str, print_: str) -> None:
        """Count one request of ``tenant`` from ``print_``; raise ``AnomalyThrottled`` when throttling one."""
        cfg, now = self.config, self.clock.monotonic()
        if cfg.max_fingerprints_per_key is not None:
            prints = self.seen.setdefault(tenant, {})
            prints[print_] = now
            if len(prints) > cfg.max_fingerprints_per_key:
                for fp, at in list(prints.items()):
                    if now - at > cfg.window_s:
                        del prints[fp]
                if len(prints) > cfg.max_fingerprints_per_key:
                    self._flag(tenant, "key_sharing", f"one key from {len(prints)} fingerprints within "
                                                      f"{cfg.window_s:g}s", now)
        if cfg.rate_jump_factor is not None:
            self._count(tenant, now)
        if cfg.throttle:
            for kind in ("key_sharing", "rate_jump"):
                until = self.flagged.get((tenant, kind))
                if until is not None and until > now:
                    raise AnomalyThrottled(f"refused while an anomaly lasts ({kind.replace('_', ' ')})",
                                           retry_after=min(60.0, until - now))

    def _count(self, tenant: str, now: float) -> None:
        cfg = self.config
        minute = math.floor(now / 60)
        history = self.minutes.setdefault(tenant, deque())
        first = self.first.setdefault(tenant, minute)
        if history and history[-1][0] == minute:
            history[-1][1] += 1
        else:
            history.append([minute, 1])
        keep = max(2, int(cfg.window_s // 60))
        while history and history[0][0] <= minute - keep:
            history.popleft()
        current = history[-1][1]
        if current < cfg.min_rpm or minute - first < keep - 1:
            return
        earlier = sum(c for m, c in history if m != minute)
        average = earlier / (keep - 1)
        assert cfg.rate_jump_factor is not None
        if current > cfg.rate_jump_factor * max(average, 1.0):
            self._flag(tenant, "rate_jump", f"{current} requests this minute, {average:.1f} a minute before",
                       now)

    def _flag(self, tenant: str, kind: str, detail: str, now: float) -> None:
        key = (tenant, kind)
        until = self.flagged.get(key)
        if until is not None and until > now:
            return  # reported once per window
        self.flagged[key] = now + (60.0 if kind == "rate_jump" else self.config.window_s)
        self.events.emit(AnomalyDetected(target="", tenant=tenant, kind=kind))
        log.warning("abuse: anomaly for tenant %s: %s", tenant, detail)
