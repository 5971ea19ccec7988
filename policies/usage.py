"""Usage and cost accounting (SPEC §5 Usage; issue #5 point 5).

For every answer an LLM target actually produced (not a cache hit, not an idempotent
replay — those policies sit outside this one), the tokens come from the upstream's own
report: a complete answer's ``usage`` (OpenAI ``prompt_tokens``/``completion_tokens``,
Anthropic ``input_tokens`` (+ cache reads and writes)/``output_tokens``, the Responses API's
``input_tokens``/``output_tokens``), or a stream's usage chunk, ``message_delta`` or terminal
``response.completed`` / ``response.incomplete`` / ``response.failed``, read by the stream watcher
when the stream ends. A
stream that ended without a report (a client that left, a cut) is counted from what was
sent: the prompt estimate, and the text the client received at about 4 characters a token.
Failed answers (4xx/5xx) cost nothing.

The cost is the model's price (``providers.pricing``; unknown models are counted as
unpriced): prompt tokens read from or written to the provider's prompt cache at the model's
cache rates, reasoning tokens as the output they are billed as. Each answer adds one row per
tenant / user / target / model / UTC day to the store — ``requests``, ``prompt_tokens``,
``completion_tokens``, ``cost_usd`` — written in the background: a store that is down loses the row (logged), never the request. The user
is ``X-ReliAPI-User``, else the body's ``user`` or ``user_id``. The access log gets
``prompt_tokens``, ``completion_tokens`` and ``cost_usd``; a tenant's spend reservation
(``policies.budget``) is settled with the cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import GatewayError, UpstreamError
from gateway.flow.exchange import ANTHROPIC
from gateway.headers import X_RELIAPI_COST, X_RELIAPI_USER
from gateway.observe.events import Billed
from gateway.store import StoreError
from providers import endpoints, estimate, openai
from providers.base import Usage
from providers.dialects import DIALECTS, OTHER

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply

log = logging.getLogger("reliapi")
_logger = log  # (``record`` names the access line's fields ``log``)

USAGE_TTL_S = 400 * 86400  # a day's rows are kept for about 13 months


class NotJSON(Exception):
    """A provider's complete answer that says it is JSON and is not."""


def read_usage(body: bytes, dialect_name: str | None = "chat") -> Usage | None:
    """The usage of a complete answer in the named dialect (``Endpoint.dialect``: a translated answer is
    read after it was translated back); None without usage (the model is the one the client asked for:
    ``Exchange.model``). Raises ``NotJSON`` for a body that does not parse."""
    try:
        return DIALECTS.get(dialect_name, OTHER).read_usage(body)
    except msgspec.DecodeError:
        raise NotJSON() from None
    except RecursionError:  # valid, but nested past what can be read: no usage to count
        return None


def day_of(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def _part(name: str) -> str:
    """A tenant or user as one segment of a usage key: its ``:`` (the key's separator) and ``%`` escaped, so that
    tenant ``acme:bob`` is never tenant ``acme`` with user ``bob`` (nor user ``a:b`` user ``a_b``)."""
    return name.replace("%", "%25").replace(":", "%3A") if ":" in name or "%" in name else name


def usage_key(day: str, tenant: str | None, user: str | None, target: str, model: str | None) -> str:
    return f"usage:{day}:{_part(tenant) if tenant else '-'}:{_part(user) if user else '-'}:{target}:{model or '-'}"


async def summary(store: Any, *, tenant: str | None = None, user: str | None = None,
                  since_day: str | None = None) -> dict[str, Any]:
    """Usage rows summed by day (and in total) for a tenant and/or user, from ``since_day``
    (YYYYMMDD) on — for ``GET /v1/usage/{user}`` and the admin API."""
    days: dict[str, dict[str, float]] = {}
    async for key in store.scan_prefix("usage:"):
        _, day, row_tenant, row_user, *_ = key.split(":", 5) + [""] * 2
        if (tenant is not None and row_tenant != _part(tenant)) or (user is not None and row_user != _part(user)):
            continue
        if since_day is not None and day < since_day:
            continue
        into = days.setdefault(day, {})
        for field, value in (await store.hgetall(key)).items():
            into[field] = into.get(field, 0.0) + value
    total: dict[str, float] = {"requests": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0, "cost_usd": 0.0}
    for row in days.values():
        for field, value in row.items():
            total[field] = total.get(field, 0.0) + value
    return {"days": [{"date": f"{d[:4]}-{d[4:6]}-{d[6:]}", **_ints(days[d])} for d in sorted(days)],
            "total": _ints(total)}


def _ints(row: dict[str, float]) -> dict[str, float | int]:
    return {k: (round(v, 8) if k == "cost_usd" else int(v)) for k, v in sorted(row.items())}


def user_of(ex: Exchange) -> str | None:
    user = ex.headers.get(X_RELIAPI_USER)
    if user:
        return user[:128]
    return ex.user


def policy(ctx: Context) -> tuple[Policy, UsageBook] | None:
    """The policy, and its book of counts (flushed for reports, closed with the runtime); None
    without an LLM target."""
    if not any(t.kind == "llm" for t in ctx.targets.values()):
        return None
    prices = ctx.prices
    clock = ctx.clock
    book = UsageBook(ctx.store, clock.time)
    live = book.live

    price_of = prices.price
    emit = ctx.events.emit

    def record(ex: Exchange, usage: Usage, model: str | None, *, reserved: bool = False) -> float | None:
        """Book an answer: its line's tokens and cost, a usage row, the metrics, and a spend budget's settlement
        — all the same charge. ``reserved``: its cost cannot be read (no usage in it, a stream of a format not
        read, reasoning billed and not streamed): a spend budget is charged its whole reservation, the most the
        answer could have cost, and every record says that charge."""
        model = ex.model or model  # the name the client asked for, not the dated snapshot that answered
        prompt, completion = max(0, usage.prompt), max(0, usage.completion)  # an upstream reporting less than nothing
        price = price_of(model)
        log = ex.log
        log["prompt_tokens"] = prompt
        log["completion_tokens"] = completion
        cost = None
        settlement = ex.settlement
        if reserved:  # (without a budget to charge it is not known: the row counts it among the unpriced)
            if settlement is not None:
                cost = settlement.reserved / settlement.factor
                log["cost_usd"] = cost
        elif price is not None:
            cost = price.charge(usage)
            if settlement is not None and cost * settlement.factor > settlement.reserved + 1e-12:
                # more than the request could cost: the budget is charged its reservation, and every record of
                # the answer (this line, usage rows, metrics, X-ReliAPI-Cost-USD) says that same charge
                _logger.warning("spend: an answer reported $%.8f, more than its reservation of $%.8f; it is charged "
                                   "the reservation", cost * settlement.factor, settlement.reserved)
                cost = settlement.reserved / settlement.factor
            log["cost_usd"] = cost
        if settlement is not None:
            settlement.settle(cost or 0.0)
        emit(Billed(ex.target.name, ex.model or "", ex.tenant, prompt, completion, cost))  # (metrics, status page)
        # summed here under a tuple key; the store key (with the day) is made once a second, when folded
        key = (ex.tenant, user_of(ex), log.get("fallback_target") or ex.target.name, model)  # (the header wins)
        row = live.get(key)
        if row is None:
            if len(live) >= book.MAX_KEYS:
                return cost
            row = live[key] = [0, 0, 0, 0.0, 0]
            book.wake()
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        if cost is None:
            row[4] += 1
        else:
            row[3] += cost
        return cost

    def unbilled(ex: Exchange) -> None:
        if ex.settlement is not None:
            ex.settlement.settle(0.0)

    def unmeasured(ex: Exchange) -> None:
        """Its client left while an attempt was on its way, or after one the upstream may still finish and bill
        (a timeout, a reset): a spend budget is charged its reservation, and the line and a usage row say so."""
        if ex.settlement is not None:
            record(ex, Usage(_prompt_estimate(ex), 0), None, reserved=True)

    def stream_ended(ex: Exchange, reply: Reply) -> None:
        prompt, completion = ex.log.get("prompt_tokens"), ex.log.get("completion_tokens")
        if reply.status >= 400:
            unbilled(ex)
            return
        reader = reply.reader
        if reader is None:  # a stream of a format the gateway does not read
            record(ex, Usage(prompt if prompt is not None else _prompt_estimate(ex), completion or 0), None,
                   reserved=True)
            return
        if not reader.usage_seen:  # no final usage report (cut, abandoned, not asked for)
            # What was sent, at a token per byte of the content relayed (text, tool arguments, refusals,
            # thinking): it is charged that bound, not a guess and not the running count of an Anthropic
            # message_start — but the prompt at least at the input message_start reported (a document or
            # image by URL is a short body and many tokens). Reasoning a model bills but does not stream
            # cannot be counted: the reservation.
            sent = max(len(ex.body) + PROMPT_FRAMING, reader.prompt_tokens or 0)
            record(ex, Usage(sent, reader.generated, reader.cached_tokens, reader.written_tokens,
                             reader.written_long_tokens), None, reserved=openai.hides_reasoning(ex.model))
            return
        if prompt is None:
            prompt = _prompt_estimate(ex)
        record(ex, Usage(prompt, completion or 0, reader.cached_tokens, reader.written_tokens, reader.written_long_tokens),
               None)

    async def usage(ex: Exchange, call_next: Handler) -> Reply:
        if ex.target.kind != "llm":
            return await call_next(ex)
        if ex.settlement is not None:  # from here on this policy settles the spend reservation, however it ends
            ex.settlement.owned = True
        if ex.stream and not ex.include_usage and ex.dialect != ANTHROPIC and ex.endpoint.billed in _CHAT_PATHS:
            ex.ask_usage = True  # where the upstream can be asked (providers.translators)
        try:
            reply = await call_next(ex)
        except asyncio.CancelledError:  # the client left before an answer: one sent upstream may still be billed
            (unmeasured if ex.unanswered else unbilled)(ex)  # (not one every attempt of which had its error answer)
            raise
        except BaseException as e:  # no answer (an error): nothing billed — but a 2xx it could not use, as any
            if isinstance(e, GatewayError) and e.answered:  # answer of unknown cost
                record(ex, Usage(_prompt_estimate(ex), 0), None, reserved=True)
            else:
                unbilled(ex)
            raise
        if reply.chunks is not None:
            reply.on_close(lambda error: _guarded(stream_ended, ex, reply))  # settled when the stream ends
            return reply
        found = None
        if 200 <= reply.status < 300 and reply.body:
            try:
                found = read_usage(reply.body, ex.endpoint.dialect)
            except NotJSON:
                if reply.headers.get("Content-Type", "").startswith("application/json"):
                    unbilled(ex)  # logged once, by the access line (error_code upstream_error, its message)
                    raise UpstreamError(
                        "the upstream's answer is not valid JSON", target=ex.target.name, upstream_status=reply.status,
                    ) from None
        if found is None and not 200 <= reply.status < 300:
            unbilled(ex)
            return reply
        # an answer with no usage in it costs what it could have (the reservation), and is said so
        cost = record(ex, found, None) if found is not None else record(ex, Usage(_prompt_estimate(ex), 0), None,
                                                                       reserved=True)
        if cost is not None:  # SPEC §2: said whenever it is known before the body is sent
            reply.headers[X_RELIAPI_COST] = f"{cost:.10f}".rstrip("0").rstrip(".") or "0"
        return reply

    return usage, book


_CHAT_PATHS = frozenset(("chat/completions", "completions"))
PROMPT_FRAMING = 64  # tokens of role and reply framing a bound on a prompt's bytes allows for
FLUSH_EVERY_S = 1.0


class UsageBook:
    """Usage rows summed in memory and written to the store once a second, one ``hincr_many``
    per row key: no store call, no task and no string per request. A row is dated when it is
    folded (so an answer in the last second of a UTC day may count on the next). A crash
    loses at most the last second of counts; a store that is down keeps them until it is
    back (bounded)."""

    MAX_KEYS = 100_000
    FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "unpriced_requests")

    def __init__(self, store: Any, now: Any = time.time) -> None:
        self.store = store
        self.now = now
        self.rows: dict[str, dict[str, float]] = {}
        self.counts: dict[str, list[float]] = {}  # key → FIELDS
        # the hot path's form: (tenant, user, target, model) → FIELDS, dated when folded
        self.live: dict[tuple[Any, ...], list[Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self._logged_at = -30.0

    def wake(self) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())

    def _fold(self) -> None:
        day = day_of(self.now())
        live = self.live
        for (tenant, user, target, model), row in live.items():
            into = self.counts.setdefault(usage_key(day, tenant, user[:128] if user else None, target, model),
                                          [0.0, 0.0, 0.0, 0.0, 0.0])
            for i, value in enumerate(row):
                into[i] += value
        live.clear()  # the same dict: the hot path holds it
        counts, self.counts = self.counts, {}
        for key, row in counts.items():
            self.add_quietly(key, {f: v for f, v in zip(self.FIELDS, row, strict=True)
                                   if v or f in ("requests", "prompt_tokens", "completion_tokens")})

    async def _run(self) -> None:
        while self.rows or self.counts or self.live:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.flush()
        self.task = None

    async def flush(self) -> None:
        self._fold()
        rows, self.rows = self.rows, {}
        pending = list(rows.items())
        while pending:
            key, row = pending[-1]
            try:
                await self.store.hincr_many(key, row, USAGE_TTL_S)
            except StoreError as e:
                for key, row in pending:  # keep what is not written for the next flush
                    self.add_quietly(key, row)
                now = time.monotonic()
                if now - self._logged_at >= 30:
                    self._logged_at = now
                    log.warning("usage: store unavailable, keeping counts in memory: %s", e)
                return
            pending.pop()

    def add_quietly(self, key: str, row: dict[str, float]) -> None:
        into = self.rows.setdefault(key, {})
        for field, amount in row.items():
            into[field] = into.get(field, 0.0) + amount

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.rows or self.counts or self.live:
            await self.flush()


def _guarded(fn: Any, *args: Any) -> None:
    """Accounting runs as a stream closes: a bug in it must never break the client's stream."""
    try:
        fn(*args)
    except Exception:
        log.exception("usage accounting failed")


def _prompt_estimate(ex: Exchange) -> int:
    """The prompt's estimated tokens, for a stream that ended without a usage report."""
    try:
        return estimate.read(ex.body, ex.endpoint.billed or endpoints.CHAT).estimate_prompt()
    except estimate.NotReadable:
        return 0
