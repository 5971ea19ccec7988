"""The router at the end of the request chain, and the fallback chains it walks (SPEC §5).

``router`` is the request chain's innermost step: it runs the chain of the target the exchange
points at (that target's policies and the upstream call, ``gateway.flow.build``) and, when the
target fails after its retries or its circuit is open, the next entry of its fallback chain.

The chain is the target's ``fallback_targets`` — or, for a tenant with its own list for
this target (or for every target, ``"*"``), the tenant's. Each entry is a target and
optionally a model; the same target with another model is allowed. Moving on needs a
failure named in the primary's ``fallback_on`` (default: retryable failures, an open
circuit, timeouts, and a prompt over the context window — never a content-policy
refusal, which another model should not be asked to get round).

The answer that reaches the client is the first success; otherwise the last target's
answer as it sent it — unless that last one is only the gateway's own refusal (an open
circuit, a full bulkhead) and an earlier target did answer, in which case the earlier
answer stands. ``X-ReliAPI-Fallback`` names the fallback target whose answer it is.

A fallback entry's ``model`` (else the target's ``llm.default_model``) replaces the
request's ``model``. OpenAI-style and Anthropic targets stand in for each other (the request
and its answer are translated, ``providers.translators``); a plain-HTTP target and an LLM one
cannot, so such an entry is skipped (``--check`` and the startup log say so). This is also
where a broken stream is continued when its target has ``stream_recovery: continue``
(``policies.stream_recovery``)."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING

from gateway import jsonbody
from gateway.config import dialect
from gateway.errors import GatewayError, UpstreamError
from gateway.failures import Failure, failure_of
from gateway.flow.exchange import Exchange, Reply
from gateway.headers import X_RELIAPI_FALLBACK
from gateway.observe.events import FallbackUsed
from policies import stream_recovery
from policies.retry import resend_unsafe

if TYPE_CHECKING:
    from gateway.flow.chain import Handler
    from gateway.flow.context import Context
    from gateway.upstream.targets import Target

Entry = tuple["Target", str | None]  # a target and the model to ask it for (None: the client's)

async def with_model(body: bytes, model: str | None) -> bytes:
    """The JSON request body asking for ``model`` instead (unchanged when there is nothing to change)."""
    if model is None or not body:
        return body
    try:
        return await jsonbody.edited(body, {"model": model})
    except jsonbody.NotAnObject:
        return body


class _Outcome:
    """One target's answer: a reply, or the error it raised."""

    __slots__ = ("index", "entry", "body", "model", "reply", "error")

    def __init__(
        self, index: int, entry: Entry, body: bytes, model: str | None, reply: Reply | None, error: GatewayError | None
    ) -> None:
        self.index, self.entry, self.body, self.model = index, entry, body, model
        self.reply, self.error = reply, error

    @property
    def from_upstream(self) -> bool:
        return self.reply is not None or isinstance(self.error, UpstreamError)


class Chains:
    """Every target's fallback chain, and each tenant's own, worked out once per runtime."""

    def __init__(self, ctx: Context) -> None:
        targets = ctx.targets

        def entries(raw: list, primary: Target) -> list[Entry]:
            # OpenAI and Anthropic targets stand in for each other (providers.translators); a plain-HTTP
            # target and an LLM one cannot: skipped, as --check warns
            plain = dialect(primary.config.provider) == "http"
            return [(targets[e.target], e.model) for e in raw
                    if (dialect(targets[e.target].config.provider) == "http") == plain]

        self.chains = {name: entries(t.config.fallback_targets, t) for name, t in targets.items()}
        # A tenant's chains by primary target; its "*" chain applies to every target.
        self.tenant_chains: dict[str, dict[str, list[Entry]]] = {}
        for tenant in ctx.config.tenants:
            if not tenant.fallback_targets:
                continue
            every = tenant.fallback_targets.get("*")
            self.tenant_chains[tenant.name] = {
                name: entries(tenant.fallback_targets.get(name, every or []), t)
                for name, t in targets.items() if name in tenant.fallback_targets or every is not None
            }
        self.recovering = {name for name, t in targets.items() if t.config.stream_recovery == "continue"}

    @property
    def any(self) -> bool:
        return bool(self.recovering or self.tenant_chains or any(self.chains.values()))

    def chain_for(self, ex: Exchange, primary: Target) -> list[Entry]:
        """The fallback chain of this request: its tenant's own, else its target's — without the entries
        the tenant may not use (``allowed_targets`` / ``allowed_models`` bind a fallback too); none for a
        tenant whose tier has no ``fallback`` feature."""
        chain = self.chains[primary.name]
        tenant = ex.account
        if tenant is not None:
            if not tenant.features.fallback:
                return []
            own = self.tenant_chains.get(tenant.plan)
            if own is not None and primary.name in own:
                chain = own[primary.name]
            if chain and tenant.restricted:
                chain = [(t, m) for t, m in chain
                         if tenant.allows(t.name, m or (t.config.llm.default_model if t.config.llm else None) or ex.model)]
        return chain

    def candidates(self, ex: Exchange) -> list[Entry]:
        """Every (target, model) this request may be answered by, the model as each would be asked
        (an entry's ``model``, else its target's ``llm.default_model``, else the client's)."""
        primary = ex.target
        out: list[Entry] = [(primary, ex.model)]
        for target, model in self.chain_for(ex, primary):
            out.append((target, model or (target.config.llm.default_model if target.config.llm else None) or ex.model))
        return out


def router(ctx: Context, target_chains: Mapping[str, Handler]) -> Handler:
    """The last step of the request chain: runs the chain of the target the exchange points at
    (its policies and the upstream call), and on a failure the next target of its fallback chain."""
    targets = ctx.targets
    known = Chains(ctx)
    fallback_on = {name: frozenset(t.config.fallback_on) for name, t in targets.items()}
    recovering = known.recovering
    events = ctx.events
    chain_for = known.chain_for

    def run(ex: Exchange) -> Awaitable[Reply]:  # the chain of the target the exchange points at
        return target_chains[ex.target.name](ex)

    if not known.any:
        return run  # no target has anywhere to fall back to

    async def fallback(ex: Exchange) -> Reply:
        primary = ex.target
        chain = chain_for(ex, primary)
        if not chain and primary.name not in recovering:
            return await target_chains[primary.name](ex)  # the common case: one target, nothing to add
        candidates: list[Entry] = [(primary, None), *chain]
        client_body, client_model = ex.body, ex.model
        allowed = fallback_on[primary.name]
        answered: _Outcome | None = None  # the latest answer a target gave (a reply or an upstream error)
        refused: _Outcome | None = None  # the first of the gateway's own refusals (open circuit, full bulkhead)
        failure: Failure | None = None
        for i, entry in enumerate(candidates):
            target, model = entry
            if i:
                model = model or (target.config.llm.default_model if target.config.llm else None)
                ex.target, ex.model = target, model or client_model
                ex.body = await with_model(client_body, model)
                events.emit(FallbackUsed(target=candidates[i - 1][0].name, to_target=target.name,
                                         reason=failure.reason if failure else "unknown"))
            try:
                if i and ex.caps is not None:  # its own caps and ceiling, at its model's price (BudgetExceeded: skipped)
                    await ex.caps(ex)
                reply = await run(ex)
                error = None
                failure = reply.failure
            except GatewayError as e:
                if e.reason != "client_error":
                    reply, error, failure = None, e, failure_of(e)
                elif i == 0:
                    raise  # not the target's failure: nothing another target would do better
                else:  # this fallback cannot take the request (a field it cannot translate, …): it never masks the
                    continue  # failure before it with a 400 the client's retry would not fix — on to the next

            if failure is None:
                assert reply is not None
                if answered is not None and answered.reply is not None:
                    await answered.reply.aclose()
                _mark(ex, reply, i, target)
                if i:
                    ex.log["primary_target"] = primary.name  # the access line's target is the one that answered
                if reply.chunks is not None and reply.reader is not None and target.name in recovering:
                    reply.chunks = stream_recovery.recovering(
                        ex, reply, candidates[i:], client_body, client_model, run, events,
                    )
                return reply
            if reply is not None:
                reply = await reply.settled()  # let a failed stream's connection go while others are tried
            outcome = _Outcome(i, entry, ex.body, ex.model, reply, error)
            if outcome.from_upstream:
                if answered is not None and answered.reply is not None:
                    await answered.reply.aclose()
                answered = outcome
            elif refused is None:
                refused = outcome
            if not failure.falls_back_on(allowed):
                break
            if failure.sent and outcome.from_upstream and resend_unsafe(ex, target):
                break  # it may have been acted on: another target must not do it a second time
        final = answered or refused
        assert final is not None
        target = final.entry[0]
        ex.target, ex.body, ex.model = target, final.body, final.model
        if final.index:  # the access line names the target asked for too
            ex.log["primary_target"] = primary.name
        if final.reply is not None:
            _mark(ex, final.reply, final.index, target)
            return final.reply
        assert final.error is not None
        if final.index:
            final.error.headers[X_RELIAPI_FALLBACK] = target.name
            ex.log["fallback_target"] = target.name
        raise final.error

    return fallback


def _mark(ex: Exchange, reply: Reply, index: int, target: Target) -> None:
    if index:  # a fallback entry answered (possibly the same target with another model)
        reply.headers[X_RELIAPI_FALLBACK] = target.name
        ex.log["fallback_target"] = target.name
