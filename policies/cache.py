"""Response cache (SPEC §5, RELIABILITY-NOTES §5): off unless a target has a ``cache:`` block.

What is cached: plain-HTTP targets' GET/HEAD; LLM targets' chat/completions,
completions, embeddings, messages and responses POSTs — never with ``n > 1`` (several samples are
not one answer). Only 2xx answers, never one whose upstream ``Cache-Control`` says
``no-store`` or ``private``, never a stream that did not end cleanly, nothing larger
than ``cache.max_entry_mb``. A stream is stored as its chunks and replayed as a stream.

The key starts with the server-derived tenant (a body can never forge another
tenant's entry) — without tenants, on a target that forwards the client's own credential,
a hash of every value of every credential-bearing header (``Authorization``, ``Cookie``,
``X-Api-Key``, ``Api-Key``, the target's ``auth.header``): two API keys never share an
answer —, then the target, whether the answer streams (stream and non-stream never share
an entry), and a hash of method, path, sorted query, ``Accept``, ``Accept-Encoding`` (plain
HTTP only: an LLM target is always asked for identity), the values of the target's
``cache.vary_headers`` and the body as canonical JSON.

The upstream's ``Vary`` is honoured: an answer that varies on a request header the key does
not already hold is stored with a tag of that header's values and served only to requests
with the same values (``Vary: *``: not stored); a request that would share a running flight's
answer which varies that way runs on its own instead.

``Set-Cookie`` is kept for the client whose request fetched the answer, and never stored or shared with
another.

Request ``Cache-Control``: ``no-cache`` (``max-age=0``, ``Pragma: no-cache``) skips the lookup and stores the
fresh answer; ``no-store`` skips lookup and store; ``only-if-cached`` answers 504 on a miss. A range or
conditional request passes the cache by. The
answer says ``X-Cache: HIT|MISS|BYPASS`` (``X-Cached: true`` and ``Age`` on a hit).

Concurrent identical misses are computed once (single flight, through the store, so
across instances too). TTL: the envelope's ``cache`` field (``ex.cache_ttl``), else the
tenant's ``cache_ttl_override``, else ``cache.ttl_s``. A store that is down turns the
cache into a pass-through (``X-Cache: BYPASS``), logged — it never fails a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs

from gateway.errors import GatewayError
from gateway.headers import CREDENTIAL_HEADERS, QUOTA_HEADERS, X_CACHE, X_CACHED, X_RELIAPI_COST
from gateway.observe.events import CacheHit, CacheMiss, Coalesced, StoreDegraded
from gateway.state import ahead
from gateway.state.flights import Entry, Flights, KeyMismatch, Lead, StillRunning, replay
from gateway.store import Claim, Store, StoreError
from policies.idempotency import body_digest, client_credentials, digest_ready, digest_waits, hash_values, scope

if TYPE_CHECKING:
    from gateway.config.model import CacheConfig
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply
    from gateway.upstream.targets import Target

log = logging.getLogger("reliapi")

LLM_PATHS = frozenset(("chat/completions", "completions", "embeddings", "messages", "responses"))
_LOG_EVERY_S = 30.0
_LOCK_TTL_S = 30.0
_WAIT_S = 30.0


class NotCached(GatewayError):
    """``Cache-Control: only-if-cached`` and nothing stored (RFC 9111 §5.2.1.7)."""

    status, code, type = 504, "not_cached", "client_error"


def _directives(headers: Any) -> set[str]:
    """A request's ``Cache-Control`` directive names; ``max-age=0`` asks for a fresh answer as ``no-cache`` does,
    and so does ``Pragma: no-cache`` without a ``Cache-Control`` (RFC 9111 §5.2.1.1, §5.4)."""
    found: set[str] = set()
    for value in headers.getall(hdrs.CACHE_CONTROL, ()):
        for d in value.split(","):
            name, _, arg = d.strip().partition("=")
            name = name.strip().lower()
            if name:
                found.add(name)
            if name == "max-age" and arg.strip().strip('"') == "0":
                found.add("no-cache")
    if not found and "no-cache" in headers.get(hdrs.PRAGMA, "").lower():
        found.add("no-cache")
    return found


# Request headers that ask for part of an answer or for an answer only under a condition: such a request is
# not the same request as a plain one (a 206 or a 304 must never be served for it), so it passes the cache by.
_CONDITIONAL = (hdrs.RANGE, hdrs.IF_RANGE, hdrs.IF_NONE_MATCH, hdrs.IF_MODIFIED_SINCE, hdrs.IF_MATCH,
                hdrs.IF_UNMODIFIED_SINCE)


def _conditional(headers: Any) -> bool:
    return any(name in headers for name in _CONDITIONAL)


def cacheable(ex: Exchange) -> bool:
    if ex.target.kind == "llm":
        return ex.method == "POST" and ex.endpoint.billed in LLM_PATHS and ex.choices == 1
    return ex.method in ("GET", "HEAD")


# An answer the upstream says must not be stored (SPEC §5). ``no-cache`` is not among them for an LLM target: every
# SSE answer carries it (OpenAI's streams too), and streams are cached as their chunks. A plain-HTTP answer that
# must be revalidated before each use (``no-cache``, ``max-age=0``, ``s-maxage=0``) is not stored either: the
# cache does not revalidate.
_NOT_STORED = frozenset(("no-store", "private"))
_NOT_STORED_HTTP = _NOT_STORED | {"no-cache", "max-age=0", "s-maxage=0", 'max-age="0"', 's-maxage="0"'}
# A stored or shared answer never carries another client's cookies (the client that made it gets them), nor the
# quota count of the request that made it.
PRIVATE_HEADERS = frozenset(("set-cookie", "set-cookie2")) | QUOTA_HEADERS


def storable(reply: Reply, not_stored: frozenset[str] = _NOT_STORED) -> bool:
    # (a 206 is part of an answer: never served for the whole; a failure: a 200 stream led by an error event)
    if not 200 <= reply.status < 300 or reply.status == 206 or reply.failure is not None:
        return False
    values = reply.headers.getall(hdrs.CACHE_CONTROL, ())
    if any(d.strip().lower().replace(" ", "") in not_stored for v in values for d in v.split(",")):
        return False
    return not any(name.strip() == "*" for value in reply.headers.getall(hdrs.VARY, ()) for name in value.split(","))


def storable_http(reply: Reply) -> bool:
    """``storable`` for a plain-HTTP target's answer: one to revalidate before each use is not stored."""
    return storable(reply, _NOT_STORED_HTTP)


# request headers that pick an LLM API's version or betas, passed to the upstream as the client sent them
_API_VERSIONS = ("anthropic-beta", "anthropic-version", "openai-beta")


class Keying:
    """Which request headers split a target's entries, worked out once per target."""

    __slots__ = ("credentials", "vary", "covered", "encodings")

    def __init__(self, target: Target) -> None:
        auth = target.config.auth
        own = (auth.header,) if auth is not None and auth.header else ()
        # a target that forwards the client's own credential: each credential its own entries
        self.credentials = client_credentials(target)
        self.vary = tuple(target.config.cache.vary_headers) if target.config.cache is not None else ()
        if target.kind == "llm":  # forwarded as sent, and they change the answer (Anthropic's betas: thinking
            # interleaved or not, 1M context, tool streaming; OpenAI's for assistants): each its own entries
            self.vary += tuple(h for h in _API_VERSIONS if h not in {v.lower() for v in self.vary})
        # an LLM target is always asked for identity (``upstream_request_headers``) and its answers are stored
        # decoded: what the client accepts changes nothing, so an SDK that sends gzip and one that sends
        # nothing share entries
        self.encodings = target.kind != "llm"
        # headers an upstream Vary may name without a tag: already in the key, or never forwarded as sent
        self.covered = frozenset(n.lower() for n in (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, *CREDENTIAL_HEADERS, *own,
                                                     *self.vary))


def cache_key(flights: Flights, ex: Exchange, keying: Keying) -> str:
    # parameters in order of name, a repeated one's values as sent (``sort=name&sort=date`` is not ``sort=date&…``)
    query = "&".join(sorted(ex.query.split("&"), key=_param_name)) if ex.query else ""
    headers = ex.headers
    # Accept-Encoding too: bodies are stored as the upstream encoded them, and a client that did
    # not ask for gzip must never be served gzip
    encoding = headers.get(hdrs.ACCEPT_ENCODING, "identity").replace(" ", "").lower() if keying.encodings else ""
    # each part followed by NUL, in one update
    h = hashlib.sha256("\0".join((ex.method, ex.rel_path, query, headers.get(hdrs.ACCEPT, ""), encoding, "")).encode())
    if keying.vary:
        hash_values(h, headers, keying.vary)
    h.update(body_digest(ex, strict=False))
    return flights.key(scope(ex, keying.credentials), ex.target.name, "s" if ex.stream else "n", h.hexdigest()[:48])


def _param_name(param: str) -> str:
    return param.partition("=")[0]


def vary_tag(varies: Iterable[str], headers: Any, keying: Keying) -> str:
    """The tag of an answer whose ``Vary`` (the header's values) names request headers the key does
    not hold: a hash of those headers' values in ``headers``; "" when the key covers them all."""
    names = sorted({n.strip().lower() for value in varies for n in value.split(",")} - keying.covered - {""})
    if not names:
        return ""
    h = hashlib.sha256()
    hash_values(h, headers, tuple(names))
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- the admin API's view of the entries

# ``cache:{scope}:{target}:{s|n}:{hash}`` (``cache_key``). A scope may hold ':' (a tenant's name), a
# target never does, so the target is the segment before ``:s|n:hash``. Keys with a suffix
# (``:refresh`` locks, ``:log:<token>`` fan-out logs) belong to flights in progress and expire alone.
_ENTRY_KEY = re.compile(r"cache:.+:([A-Za-z0-9_.\-]+):[sn]:[0-9a-f]{48}")
SCAN_LIMIT = 100_000  # keys an admin count looks at; more than that is reported as a lower bound


def entry_target(key: str) -> str | None:
    """The target a cache key belongs to; None for a key that is not an entry's."""
    found = _ENTRY_KEY.fullmatch(key)
    return found.group(1) if found is not None else None


async def count_entries(store: Store, *, limit: int = SCAN_LIMIT) -> tuple[dict[str, int], bool]:
    """Entries per target (an answer stored, or a first request still running for it), and
    whether the scan stopped at ``limit`` keys (the counts are then lower bounds)."""
    counts: dict[str, int] = {}
    seen = 0
    async for key in store.scan_prefix("cache:"):
        seen += 1
        if seen > limit:
            return counts, True
        target = entry_target(key)
        if target is not None:
            counts[target] = counts.get(target, 0) + 1
    return counts, False


async def clear_entries(store: Store, target: str | None = None) -> int:
    """Delete every stored answer (of one target, or all); returns how many. The next request
    for one is a miss. A first request still running keeps its claim and stores its answer."""
    keys = [key async for key in store.scan_prefix("cache:")
            if (owner := entry_target(key)) is not None and (target is None or owner == target)]

    async def drop(key: str) -> bool:
        raw = await store.get(key)  # an answer ("D…"), not a running flight's lock
        return raw is not None and raw[:1] == b"D" and await store.compare_and_delete(key, raw)

    deleted = 0
    for start in range(0, len(keys), 100):  # a bounded number of store calls in flight at once
        deleted += sum(await asyncio.gather(*(drop(key) for key in keys[start:start + 100])))
    return deleted


def policy(ctx: Context, plan_ahead: ahead.Plan) -> tuple[Policy, Flights] | None:
    """The policy, and its flights (closed with the runtime); None when no target caches. ``plan_ahead``: how it
    claims, for an idempotency flight to send along with its own (``gateway.state.ahead``)."""
    if not any(t.config.cache is not None and t.config.cache.enabled for t in ctx.targets.values()):
        return None
    flights = Flights(ctx.store, "cache", ctx.background, ctx.clock.time)
    keyings = {name: Keying(t) for name, t in ctx.targets.items() if t.config.cache is not None}
    clock = ctx.clock
    logged_at = [-_LOG_EVERY_S]

    def ttl_for(ex: Exchange, cfg: CacheConfig) -> float:
        if ex.cache_ttl is not None:
            return ex.cache_ttl
        if ex.account is not None:
            overrides = ex.account.config.cache_ttl_override
            ttl = overrides.get(ex.target.name, overrides.get("*"))
            if ttl is not None:
                return ttl
        return cfg.ttl_s

    events = ctx.events

    def degraded(ex: Exchange, e: StoreError) -> None:
        events.emit(StoreDegraded(target=ex.target.name, policy="cache", error=str(e)))
        now = time.monotonic()
        if now - logged_at[0] >= _LOG_EVERY_S:
            logged_at[0] = now
            log.warning("cache: store unavailable, passing requests through: %s", e)

    def use(ex: Exchange) -> tuple[CacheConfig, float] | None:
        """The target's cache config and this request's TTL when the cache is used for it at all."""
        cfg = ex.target.config.cache
        if cfg is None or not cfg.enabled or not cacheable(ex):
            return None
        if ex.account is not None and not ex.account.features.cache:  # a tier without it: never read or written
            return cfg, 0.0
        return cfg, ttl_for(ex, cfg)

    def plan(ex: Exchange) -> tuple[Flights, Claim] | object | None:
        """The claim the policy will send for ``ex`` when it only joins its entry (``gateway.state.ahead``);
        PASS when it asks the store nothing; None when it asks another way (a Cache-Control, a budget refusal)."""
        used = use(ex)
        if used is None or used[1] <= 0 or _conditional(ex.headers):
            return ahead.PASS
        headers = ex.headers
        if hdrs.CACHE_CONTROL in headers or hdrs.PRAGMA in headers or ex.refused is not None or digest_waits(ex):
            return None
        return flights, flights.ask(cache_key(flights, ex, keyings[ex.target.name]), "", _LOCK_TTL_S)

    plan_ahead.cache = plan

    async def cache(ex: Exchange, call_next: Handler) -> Reply:
        used = use(ex)
        if used is None:
            return await call_next(ex)
        cfg, ttl = used
        directives = _directives(ex.headers) if hdrs.CACHE_CONTROL in ex.headers or hdrs.PRAGMA in ex.headers else ()
        if "no-store" in directives or ttl <= 0 or _conditional(ex.headers):
            return _mark(await call_next(ex), "BYPASS")
        keying = keyings[ex.target.name]
        sent = ex.ahead.cache if ex.ahead is not None else None  # its claim, sent ahead by the idempotency flight
        if sent is not None:
            key = sent.key
        else:
            await digest_ready(ex)
            key = cache_key(flights, ex, keying)
        lead = None
        try:
            if "no-cache" in directives:  # revalidate: run, and replace the entry only with a good answer
                lead = await flights.claim(key + ":refresh", "", _LOCK_TTL_S, force=True, entry_key=key)
            else:
                for round_ in range(3):
                    if "only-if-cached" in directives:
                        found = await flights.lookup(key)  # a read, never a claim
                        if not isinstance(found, Entry):
                            raise NotCached("not in the cache (Cache-Control: only-if-cached)", target=ex.target.name)
                    elif ex.refused is None:
                        found = ex.ahead.cache_answer() if sent is not None and round_ == 0 else None
                        if found is None:  # not asked ahead: ask now, with the takes of the quota inside
                            found = await (plan_ahead.join(flights, key, "", _LOCK_TTL_S, ex, cache=True) if round_ == 0
                                           else flights.join(key, "", _LOCK_TTL_S))
                        if found is None or found is ahead.GIVEN_BACK:
                            break  # a take was refused: no flight, the rate limit answers
                    else:  # the budget refused it unless a stored or running answer serves it: it never leads
                        found = await flights.lookup(key)
                        if found is None:
                            break
                    if isinstance(found, Lead):
                        lead = found
                        break
                    if isinstance(found, Entry):
                        if found.vary and found.vary != vary_tag(
                                (v for k, v in found.headers if k.lower() == "vary"), ex.headers, keying):
                            break  # stored for other values of a header the upstream varies on: run it, uncached
                        events.emit(CacheHit(target=ex.target.name))
                        return _hit(ex, replay(found), clock.time() - found.created)
                    try:
                        reply = await flights.follow(key, found, "", wait_s=_WAIT_S, idle_s=ex.target.idle_timeout_s)
                    except (KeyMismatch, StillRunning):
                        break  # run it ourselves, uncached
                    except GatewayError:  # the leader's own failure, shared: this duplicate still joined it
                        events.emit(Coalesced(target=ex.target.name, policy="cache"))
                        raise
                    if reply is not None:
                        if vary_tag(reply.headers.getall(hdrs.VARY, ()), ex.headers, keying):
                            await reply.aclose()  # varies on a header whose leader's value is not known here
                            break
                        events.emit(Coalesced(target=ex.target.name, policy="cache"))
                        reply.headers.popall(X_RELIAPI_COST, None)  # the leader's request paid for it
                        return _mark(reply, "MISS")
        except StoreError as e:
            degraded(ex, e)
            return _mark(await call_next(ex), "BYPASS")
        events.emit(CacheMiss(target=ex.target.name))
        ex.cache_status = "MISS"
        if lead is None:
            return _mark(await call_next(ex), "MISS")
        headers = ex.headers
        lead.tag = lambda answer: vary_tag((v for k, v in answer if k.lower() == "vary"), headers, keying)
        lead.private = PRIVATE_HEADERS
        reply = await lead.run(
            lambda: call_next(ex), storable=storable if ex.target.kind == "llm" else storable_http, ttl_s=ttl, max_bytes=int(cfg.max_entry_mb * 1024 * 1024),
            request_id=ex.request_id, owner=ex,
        )
        return _mark(reply, "MISS")

    return cache, flights


def _mark(reply: Reply, status: str) -> Reply:
    reply.headers[X_CACHE] = status
    return reply


def _hit(ex: Exchange, reply: Reply, age_s: float) -> Reply:
    ex.log["cache_hit"] = True
    headers = reply.headers
    headers[X_CACHE] = "HIT"
    headers[X_CACHED] = "true"
    headers.popall(X_RELIAPI_COST, None)  # a hit costs nothing: the stored answer's cost is not said again
    headers[hdrs.AGE] = str(max(0, int(age_s)))
    return reply
