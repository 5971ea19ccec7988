"""Idempotency keys with request coalescing (SPEC §5, RELIABILITY-NOTES §1).

The key comes from ``Idempotency-Key`` or ``X-Idempotency-Key`` (a bare token or the
IETF draft's quoted Structured-Field string — ``"abc"`` and ``abc`` are the same key),
else from an ``idempotency_key`` body field (removed before the body goes upstream:
providers reject unknown fields). It is scoped to the tenant, and recorded with a
fingerprint of the request: method, target, route, path, sorted query and the body
as canonical JSON (reordered keys and whitespace are the same request). Without tenants, on a
target that forwards the client's own credential, it is scoped to that credential (as the cache's
entries are): one API key never gets another's answer, nor learns that key was used.

- first request: runs (``gateway.state.flights`` — an atomic claim with a random token);
- concurrent duplicates, on this instance or any other sharing the store: wait and get
  the same answer; a stream's chunks from its first byte while it still runs;
- later duplicates within ``idempotency.ttl_s`` (from the first request): the stored
  answer, with ``Idempotent-Replayed: true`` and no upstream call;
- the same key with another fingerprint: 422 ``idempotency_key_reused``;
- still running after ``idempotency.wait_s``: 409 ``idempotency_in_progress``.

Stored: final 2xx and 4xx answers except 408/409/429 (with ``store_5xx: true`` upstream
5xx answers too, as Stripe does). Not stored: 5xx, transport failures, cut streams and
the gateway's own rejections — the key is released so a retry with the same key can
succeed. A holder that dies keeps the key for what is left of ``lock_ttl_s``: set it as
long as ``ttl_s`` to never run twice after a crash (WHOP's lock-until-expiry).

A client that leaves cancels its keyed LLM call (nobody else waiting), and the key is free
again; a keyed plain-HTTP request runs to its end all the same and its answer is stored, so
the retry gets it rather than a second execution.

Keys are ignored on GET/HEAD/OPTIONS. When the store is down the request gets a 503
``store_unavailable`` (``store.fail_open: true`` lets it run without idempotency instead).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING

import msgspec
from multidict import CIMultiDict

from gateway import jsonbody
from gateway.errors import GatewayError, IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest, StoreUnavailable
from gateway.headers import CREDENTIAL_HEADERS, IDEMPOTENCY_KEYS, QUOTA_HEADERS, X_CACHE, X_CACHED, X_RELIAPI_COST
from gateway.observe.events import Coalesced, IdempotentReplay, StoreDegraded
from gateway.state import ahead
from gateway.state.flights import Entry, Flights, KeyMismatch, Lead, StillRunning, replay
from gateway.store import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from typing import Any

    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply
    from gateway.upstream.targets import Target

log = logging.getLogger("reliapi")

IDEMPOTENT_REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
_NOT_STORED = frozenset((408, 409, 429))
_FOLLOW_ROUNDS = 3  # a flight that ends without an answer to share lets a follower claim the key


def keyed(ex: Exchange) -> bool:
    """Does this request carry an idempotency key the policy must look at (cheap: no parsing)?"""
    if ex.method in _SAFE_METHODS:
        return False
    headers = ex.headers
    return ex.idempotency_key is not None or IDEMPOTENCY_KEYS[0] in headers or IDEMPOTENCY_KEYS[1] in headers


def parse_key(value: str) -> str:
    """The key from a header value: a bare token or an SF string; 400 when empty or too long."""
    text = value.strip()
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise InvalidRequest("Idempotency-Key: malformed quoted string", param="Idempotency-Key")
        inner, out, escaped = text[1:-1], [], False
        for ch in inner:
            if escaped:
                if ch not in '"\\':
                    raise InvalidRequest("Idempotency-Key: malformed quoted string", param="Idempotency-Key")
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                raise InvalidRequest("Idempotency-Key: malformed quoted string", param="Idempotency-Key")
            else:
                out.append(ch)
        if escaped:
            raise InvalidRequest("Idempotency-Key: malformed quoted string", param="Idempotency-Key")
        text = "".join(out)
    return check_key(text, "Idempotency-Key")


def check_key(key: str, where: str) -> str:
    if not key:
        raise InvalidRequest(f"{where} must not be empty", param=where)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"{where} is longer than {MAX_KEY_LENGTH} characters", param=where)
    if not key.isprintable() or not key.isascii():
        raise InvalidRequest(f"{where} must be printable ASCII", param=where)
    return key


async def request_key(ex: Exchange) -> str | None:
    key = None
    for name in IDEMPOTENCY_KEYS:
        value = ex.headers.get(name)
        if value is not None:
            key = parse_key(value)
            break
    if ex.idempotency_key is not None:  # the field never goes upstream, whichever key wins
        field = check_key(ex.idempotency_key, "idempotency_key")
        if ex.route in ("v1", "t"):  # an envelope's key is not in the body it sends upstream
            ex.body = await jsonbody.edited(ex.body, drop=("idempotency_key",))
        key = key or field
    return key


CANONICAL_MAX_BYTES = 256 << 10  # a larger body is keyed by its exact bytes: its canonical form would hold the loop


def body_digest(ex: Exchange, *, strict: bool = True) -> bytes:
    """SHA-256 of the body as canonical JSON (sorted keys, no whitespace), or as sent when it is not JSON;
    made once per body (idempotency and the cache both key on it). ``strict``: an LLM target's body that is
    not JSON is a 400 (a plain-HTTP target's is keyed by its bytes: compressed, or JSON no parser takes). A body over ``CANONICAL_MAX_BYTES`` is hashed as sent (a retry
    sends the same bytes) — off the event loop, by ``digest_ready``."""
    made = ex.canonical
    if made is not None and made[0] is ex.body:
        return made[1]
    body = ex.body
    json_body = ex.target.kind == "llm" or "json" in ex.headers.get("Content-Type", "")
    if body and json_body and len(body) <= CANONICAL_MAX_BYTES:
        try:
            body = msgspec.json.encode(msgspec.json.decode(body), order="sorted")
        except RecursionError:  # nested past what can be read: keyed by its bytes as sent
            pass
        except msgspec.DecodeError:  # a plain-HTTP body is the API's business (compressed, …): keyed as sent
            if strict and ex.target.kind == "llm":
                raise InvalidRequest("request body is not valid JSON; a request with an idempotency key must have "
                                     "a JSON body on this path", param="Idempotency-Key") from None
            return hashlib.sha256(body).digest()
    digest = hashlib.sha256(body).digest()
    ex.canonical = (ex.body, digest)
    return digest


def digest_waits(ex: Exchange) -> bool:
    """Is the body too large to hash on the event loop, and not hashed yet (``digest_ready``)?"""
    made = ex.canonical
    return len(ex.body) > CANONICAL_MAX_BYTES and (made is None or made[0] is not ex.body)


async def digest_ready(ex: Exchange) -> None:
    """A large body hashed in a thread (hashlib lets go of the GIL): 10 MB would hold the loop ~20 ms."""
    if digest_waits(ex):
        body = ex.body
        ex.canonical = (body, await asyncio.to_thread(_sha256, body))


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def fingerprint(ex: Exchange) -> str:
    query = "&".join(sorted(ex.query.split("&"))) if ex.query else ""
    parts = (ex.method, ex.target.name, ex.route, ex.rel_path, query, "stream" if ex.stream else "", "")
    # the parts each followed by NUL, then the body's digest: one buffer, one update
    return hashlib.sha256("\0".join(parts).encode() + body_digest(ex)).hexdigest()


def client_credentials(target: Target) -> tuple[str, ...]:
    """The headers that carry the client's own credential to ``target``; none when the target uses its own."""
    if target.credential.drops_client_credentials:
        return ()
    auth = target.config.auth
    return (*CREDENTIAL_HEADERS, auth.header) if auth is not None and auth.header else CREDENTIAL_HEADERS


def hash_values(h: Any, headers: Any, names: tuple[str, ...]) -> None:
    """Every value of every header in ``names`` into ``h`` (a second Cookie header counts too)."""
    for name in names:
        h.update(name.encode())
        for value in headers.getall(name, ()):
            h.update(b"\1")
            h.update(value.encode("utf-8", "surrogateescape"))
        h.update(b"\0")


def scope(ex: Exchange, credentials: tuple[str, ...]) -> str:
    """Whose key or entry: the authenticated tenant; without tenants, on a target that forwards the client's
    own ``credentials``, that credential (every value of every credential header, hashed); else everyone's."""
    if ex.tenant is not None:
        return "t." + ex.tenant
    if not credentials:
        return "-"
    h = hashlib.sha256()
    hash_values(h, ex.headers, credentials)
    return "c." + h.hexdigest()[:24]


def storable(reply: Reply) -> bool:
    """Final answers: 2xx and 4xx but 408/409/429; not a 200 stream whose first event was an error."""
    if reply.status >= 500 or reply.status in _NOT_STORED:
        return False
    return reply.status >= 400 or reply.failure is None


def storable_with_5xx(reply: Reply) -> bool:
    """``store_5xx: true`` (Stripe's rule): an upstream 5xx is an answer too, replayed like the rest."""
    return reply.status >= 500 or storable(reply)


def policy(ctx: Context, plan_ahead: ahead.Plan) -> tuple[Policy, Flights]:
    """The policy, and its flights (closed with the runtime: their leaders finish first). ``plan_ahead``: what the
    policies inside ask the store, sent with its claim (``gateway.state.ahead``)."""
    flights = Flights(ctx.store, "idem", ctx.background, ctx.clock.time)
    fail_open = ctx.config.store.fail_open
    events = ctx.events
    credentials = {name: client_credentials(t) for name, t in ctx.targets.items()}

    def idempotency(ex: Exchange, call_next: Handler) -> Awaitable[Reply]:
        if not keyed(ex):  # (a safe method, or no key: most requests pass straight on, no frame of their own)
            return call_next(ex)
        return keyed_request(ex, call_next)

    async def keyed_request(ex: Exchange, call_next: Handler) -> Reply:
        key = await request_key(ex)
        if key is None:
            return await call_next(ex)
        await digest_ready(ex)
        fp = fingerprint(ex)
        cfg = ex.target.config.idempotency
        who = ex.tenant if ex.tenant is not None else scope(ex, credentials[ex.target.name])
        store_key = flights.key(who, hashlib.sha256(key.encode()).hexdigest()[:40])
        lead = None
        try:
            for round_ in range(_FOLLOW_ROUNDS):
                if ex.refused is None:  # (the first time with what the policies inside will ask: one round trip)
                    found = await (plan_ahead.join(flights, store_key, fp, cfg.lock_ttl_s, ex) if round_ == 0
                                   else flights.join(store_key, fp, cfg.lock_ttl_s))
                    if found is None:
                        break  # a take of the quota was refused: no flight, the rate limit answers
                else:  # the budget refused it unless a stored or running answer serves it: it never leads
                    found = await flights.lookup(store_key)
                    if found is None:
                        break  # (on to the cache, whose hit is free too, else the budget's refusal)
                if isinstance(found, Lead):
                    lead = found
                    break
                if isinstance(found, Entry):
                    if found.fp != fp:
                        raise KeyMismatch()
                    events.emit(IdempotentReplay(target=ex.target.name))
                    return _replayed(ex, replay(found))
                try:
                    reply = await flights.follow(store_key, found, fp, wait_s=cfg.wait_s,
                                                 idle_s=ex.target.idle_timeout_s)
                except GatewayError:  # the leader's own failure, shared: this duplicate still joined it
                    events.emit(Coalesced(target=ex.target.name, policy="idempotency"))
                    raise
                if reply is not None:
                    events.emit(Coalesced(target=ex.target.name, policy="idempotency"))
                    return _replayed(ex, reply)
            else:
                raise StillRunning()
        except KeyMismatch:
            raise IdempotencyKeyReused(
                "this idempotency key was already used for a different request; use a new key for a new request",
                param="Idempotency-Key",
            ) from None
        except StillRunning:
            raise IdempotencyInProgress(
                "a request with this idempotency key is still in progress; retry shortly", retry_after=1.0,
            ) from None
        except StoreError as e:
            events.emit(StoreDegraded(target=ex.target.name, policy="idempotency", error=str(e)))
            if fail_open:
                log.warning("idempotency: store unavailable, running without it (store.fail_open): %s", e)
                return await call_next(ex)
            raise StoreUnavailable(
                "idempotency store unavailable: cannot guarantee this request runs once; retry shortly, "
                "or send it without an idempotency key", retry_after=1.0,
            ) from None
        # outside the try: an error of the request itself is not the store failing
        if lead is None:  # (refused by the budget, nothing stored or running for its key, or a take refused: above)
            return await call_next(ex)
        work = (lambda: call_next(ex)) if ex.ahead is None else (lambda: ahead.within(ex, call_next))
        lead.private = QUOTA_HEADERS  # a replay took no quota: the first request's count is not said again
        return await lead.run(
            work, storable=storable_with_5xx if cfg.store_5xx else storable, ttl_s=cfg.ttl_s,
            max_bytes=int(cfg.max_entry_mb * 1024 * 1024), request_id=ex.request_id,
            # a plain-HTTP request changes something upstream: once sent, cancelling it would not undo
            # that, only lose the answer its retry must replay. An LLM call is cancelled: nothing but
            # its cost is lost, and that is what a client leaving saves.
            finish_alone=ex.target.kind != "llm", owner=ex,
        )

    return idempotency, flights


def _replayed(ex: Exchange, reply: Reply) -> Reply:
    headers: CIMultiDict[str] = reply.headers
    headers[IDEMPOTENT_REPLAYED] = "true"
    headers[X_CACHED] = "true"
    headers[X_CACHE] = "BYPASS"  # the stored answer, not the response cache's (its first run's MISS said nothing now)
    headers.popall(X_RELIAPI_COST, None)  # a replay costs nothing: the first answer's cost is not said twice
    ex.log["idempotent_hit"] = True
    return reply
