"""The policy pipeline: policies run outermost first, may answer early, change the request
or wrap the reply — and are added without touching the handlers."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway.errors import RateLimited
from gateway.flow import build, chain
from gateway.flow.exchange import Reply
from tests.support.config import llm_config


async def test_compose_runs_policies_outermost_first():
    order: list[str] = []

    def named(name):
        async def policy(ex, call_next):
            order.append(f"{name}>")
            reply = await call_next(ex)
            order.append(f"<{name}")
            return reply
        return policy

    async def innermost(ex):
        order.append("upstream")
        return Reply(200, CIMultiDict(), body=b"ok")

    handler = chain.compose([named("a"), named("b"), named("c")], innermost)
    reply = await handler(object())
    assert reply.body == b"ok"
    assert order == ["a>", "b>", "c>", "upstream", "<c", "<b", "<a"]


async def test_policies_plug_into_the_real_app(fake, gateway, monkeypatch):
    async def tag_request(ex, call_next):  # changes the request on the way in
        ex.log["tagged"] = True
        return await call_next(ex)

    async def add_header(ex, call_next):  # wraps what comes back
        reply = await call_next(ex)
        reply.headers["X-Policy"] = "seen"
        return reply

    async def reject_secret(ex, call_next):  # answers early, upstream never called
        if ex.rel_path.startswith("secret"):
            raise RateLimited("slow down", retry_after=7)
        return await call_next(ex)

    monkeypatch.setattr(build, "request_policies", lambda ctx, owned: [tag_request, add_header])
    monkeypatch.setattr(build, "target_policies", lambda ctx, target, owned: [reject_secret])
    client, logs = await gateway(llm_config(fake.url))

    resp = await client.get("/t/rest/ok")
    assert resp.status == 200 and resp.headers["X-Policy"] == "seen"
    assert logs[-1]["tagged"] is True

    resp = await client.get("/t/rest/secret")
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    body = await resp.json()
    assert body["error"]["code"] == "rate_limited" and body["error"]["retryable"] is True
    assert [r.path_qs for r in fake.requests] == ["/api/ok"]


async def test_internal_errors_never_leak_a_stack(fake, gateway, monkeypatch):
    async def boom(ex, call_next):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(build, "request_policies", lambda ctx, owned: [boom])
    client, logs = await gateway(llm_config(fake.url))
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert resp.status == 500
    text = await resp.text()
    assert "Traceback" not in text and "secret internals" not in text and "ZeroDivision" not in text
    assert (await resp.json())["error"]["code"] == "internal_error"
    assert resp.headers["X-Request-Id"] == logs[-1]["request_id"]


async def test_every_request_policy_is_built_once_per_config(fake, gateway, monkeypatch):
    """One chain for every request: a keyed one too (two chains meant two usage books, two local
    rate-limit buckets, two cache flights)."""
    from policies import cache, idempotency, rate_limit, usage

    built: list[str] = []
    for module in (cache, idempotency, rate_limit, usage):
        real = module.policy
        monkeypatch.setattr(module, "policy", lambda ctx, *plan, _real=real, _name=module.__name__: (
            built.append(_name), _real(ctx, *plan))[1])
    await gateway(llm_config(fake.url).rest(cache={"ttl_s": 60}))
    assert sorted(built) == ["policies.cache", "policies.idempotency", "policies.rate_limit", "policies.usage"]
