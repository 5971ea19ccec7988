"""Key pool (SPEC §5): several upstream keys for one target, used round-robin, each with its own health.

Per attempt, the next usable key in turn:
- a 429 puts that key on cooldown for the answer's ``Retry-After`` (1 s without one; a
  spent quota for at least a minute) and the attempt is made again at once with the
  next key — no backoff, the other keys are not limited;
- a 401 disables the key for an hour (logged, an event, shown on the status page) and
  the next key is tried at once;
- a key with ``qps_per_key`` / ``qps_limit`` takes a GCRA token from the store per use
  (shared by every instance); a key at its limit is skipped. A tenant whose client profile
  has ``max_qps_per_provider_key`` also takes from its own bucket for that key, in the same
  atomic step — on any target, a single key too (``policies.profiles``).

When every key is cooling down, the attempt is refused with ``KeysExhausted`` (429, with
the soonest key's Retry-After): the retry policy waits for it or the fallback chain moves
on, and the upstream is not asked again meanwhile. When every key is disabled they are
used anyway, so the client sees the provider's own 401. Cooldowns and disabled keys are
shared with the other instances (``gateway.state.shared``), keyed by a fingerprint of the key —
a replaced key starts clean.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.clock import Clock
from gateway.errors import KeysExhausted
from gateway.flow.exchange import Exchange, Reply
from gateway.observe.events import Events, KeyCooldown, KeyDisabled, RetryScheduled
from gateway.state.shared import SharedState
from gateway.store import StoreError, Take
from policies import profiles
from providers.auth import PoolKey

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.upstream.targets import Target

DEFAULT_COOLDOWN_S = 1.0
QUOTA_COOLDOWN_S = 60.0
DISABLE_S = 3600.0


class _Record(msgspec.Struct):
    until: float  # wall time
    disabled: bool = False


class KeyHealth:
    __slots__ = ("key", "cool_until", "disabled_until")

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.cool_until = 0.0  # monotonic
        self.disabled_until = 0.0

    def state(self, now: float) -> str:
        if now < self.disabled_until:
            return "disabled"
        return "cooling" if now < self.cool_until else "healthy"


# A wait for the first key back may end a hair before its cooldown does (the event loop's timers have millisecond
# granularity): that key is usable, not refused — which cost one of the 429 rule's retries without an upstream call.
TIMER_SLACK_S = 0.005


class KeyPool:
    def __init__(self, target: str, keys: list[PoolKey], clock: Clock, events: Events, shared: SharedState) -> None:
        self.target = target
        self.keys = [KeyHealth(k) for k in keys]
        self._by_fp = {h.key.fingerprint: h for h in self.keys}
        self.clock = clock
        self.events = events
        self.shared = shared
        self.store = shared.store
        self._next = 0
        shared.on(f"keys:{target}", self._on_message, self.resync)

    def states(self) -> dict[str, str]:
        """Each key's health by id (for the status page; never the key itself)."""
        now = self.clock.monotonic()
        return {h.key.id: h.state(now) for h in self.keys}

    async def pick(self, tried: set[str], tenant: tuple[str, float] | None = None) -> PoolKey:
        """The next usable key; ``tenant``: (name, its max_qps_per_provider_key) when it has one."""
        now = self.clock.monotonic()
        n = len(self.keys)
        soonest = math.inf
        for i in range(n):
            health = self.keys[(self._next + i) % n]
            key = health.key
            if key.id in tried or now < health.disabled_until:
                continue
            if now + TIMER_SLACK_S < health.cool_until:
                soonest = min(soonest, health.cool_until - now)
                continue
            if key.qps is not None or tenant is not None:
                wait = await self._over_qps(key, tenant)
                if wait:
                    soonest = min(soonest, wait)
                    continue
            self._next = (self._next + i + 1) % n
            return key
        if soonest < math.inf:
            limited = "rate limited" if tenant is None else \
                f"rate limited or at this client's max_qps_per_provider_key ({tenant[1]:g}/s)"
            raise KeysExhausted(f"every key of target {self.target} is {limited}", target=self.target, retry_after=soonest)
        # every key disabled (or already tried): use the next one anyway and let the provider answer
        health = self.keys[self._next % n]
        self._next = (self._next + 1) % n
        return health.key

    def soonest_s(self) -> float | None:
        """Seconds until the first cooling (not disabled) key is usable again; None if none cools."""
        now = self.clock.monotonic()
        waits = [h.cool_until - now for h in self.keys if h.cool_until > now and now >= h.disabled_until]
        return min(waits) if waits else None

    def usable(self, tried: set[str]) -> bool:
        now = self.clock.monotonic()
        return any(h.key.id not in tried and now + TIMER_SLACK_S >= h.cool_until and now >= h.disabled_until
                   for h in self.keys)

    async def _over_qps(self, key: PoolKey, tenant: tuple[str, float] | None) -> float:
        """0 when the key may be used now, else seconds until it may: its own QPS limit and the tenant's
        for it, taken together (refused by one, it takes from neither)."""
        bucket = f"keys:{{{self.target}:{key.fingerprint}}}:qps"  # one hash tag: one Cluster slot
        takes = [] if key.qps is None else [Take(bucket, key.qps, max(0, math.ceil(key.qps) - 1))]
        if tenant is not None:
            name, qps = tenant
            takes.append(Take(f"{bucket}:{name}", qps, max(0, math.ceil(qps) - 1)))
        try:
            results = await self.store.take_all(takes)
        except StoreError:
            return 0.0  # store down: the provider's own 429 will tell
        refused = [r.retry_after_s for r in results if not r.allowed]
        return max(max(refused), 0.001) if refused else 0.0

    def cool(self, key: PoolKey, seconds: float) -> None:
        health = self._by_fp[key.fingerprint]
        health.cool_until = max(health.cool_until, self.clock.monotonic() + seconds)
        self.events.emit(KeyCooldown(target=self.target, key_id=key.id, cooldown_s=seconds))
        self._share(key, seconds, disabled=False)

    def disable(self, key: PoolKey, reason: str) -> None:
        health = self._by_fp[key.fingerprint]
        health.disabled_until = self.clock.monotonic() + DISABLE_S
        self.events.emit(KeyDisabled(target=self.target, key_id=key.id, reason=reason))
        self._share(key, DISABLE_S, disabled=True)

    def _share(self, key: PoolKey, seconds: float, *, disabled: bool) -> None:
        until = self.clock.time() + seconds
        record = msgspec.json.encode(_Record(until=until, disabled=disabled))
        self.shared.spawn(self.store.set(f"keys:{self.target}:{key.fingerprint}", record, seconds + 1), "key state")
        self.shared.publish(f"keys:{self.target}", {"fp": key.fingerprint, "until": until, "disabled": disabled})

    def _apply(self, fp: Any, until: Any, disabled: Any) -> None:
        health = self._by_fp.get(fp)
        if health is None or not isinstance(until, (int, float)) or not math.isfinite(until):
            return
        at = self.clock.monotonic() + (until - self.clock.time())
        if disabled:
            health.disabled_until = max(health.disabled_until, at)
        else:
            health.cool_until = max(health.cool_until, at)

    def _on_message(self, message: dict[str, Any]) -> None:
        self._apply(message.get("fp"), message.get("until"), message.get("disabled"))

    async def resync(self) -> None:
        for health in self.keys:
            raw = await self.store.get(f"keys:{self.target}:{health.key.fingerprint}")
            if raw is None:
                continue
            try:
                record = msgspec.json.decode(raw, type=_Record)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            self._apply(health.key.fingerprint, record.until, record.disabled)


def policy(ctx: Context, target: Target) -> tuple[Policy, KeyPool] | None:
    """The target's key picker, and its pool (the runtime's, for the admin API and metrics); None
    for a single key without a QPS limit, its own or a tenant's."""
    credential = target.credential
    per_tenant = {name: p.max_qps_per_provider_key for name, p in profiles.by_tenant(ctx.config).items()
                  if p.max_qps_per_provider_key is not None} if ctx.tenants.enabled else {}
    if not credential.keys or (not credential.is_pool and not any(k.qps for k in credential.keys) and not per_tenant):
        return None  # (a target without a key of its own, passing the client's through: nothing to pick)
    pool = KeyPool(target.name, credential.keys, ctx.clock, ctx.events, ctx.shared)
    events, name = ctx.events, target.name

    async def key_pool(ex: Exchange, call_next: Handler) -> Reply:
        tried: set[str] = set()
        while True:
            qps = per_tenant.get(ex.tenant) if per_tenant else None  # type: ignore[arg-type]
            key = ex.key = await pool.pick(tried, None if qps is None else (ex.tenant, qps))  # type: ignore[arg-type]
            try:
                reply = await call_next(ex)
            finally:
                ex.key = None
            failure = reply.failure
            if failure is None:
                return reply
            if failure.reason == "rate_limited":
                pool.cool(key, failure.retry_after_s or DEFAULT_COOLDOWN_S)
            elif failure.reason == "quota_exhausted":
                pool.cool(key, max(QUOTA_COOLDOWN_S, failure.retry_after_s or 0.0))
            elif reply.status == 401:
                pool.disable(key, "upstream answered 401")
            else:
                return reply
            tried.add(key.id)
            if not pool.usable(tried):
                soonest = pool.soonest_s()
                if soonest is not None and failure.reason in ("rate_limited", "quota_exhausted"):
                    failure.retry_after_s = soonest  # the retry policy waits for the first key back, not this one
                return reply  # no other key to try now: the retry policy decides what comes next
            await reply.aclose()
            events.emit(RetryScheduled(target=name, reason="key", attempt=ex.attempts + 1, delay_s=0.0))

    return key_pool, pool
