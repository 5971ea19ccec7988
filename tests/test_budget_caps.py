"""Per-request budget caps (issue #5 point 3, SPEC §5 Budget): the price table, the estimate,
the hard cap (400, no upstream call), the soft cap (max_tokens lowered, never below 16) and
the llm.max_tokens clamp — as a client of the gateway sees them."""

from __future__ import annotations

import pytest

from gateway.keys import RUNTIME
from gateway.observe.events import BudgetEvent
from providers.pricing import PriceTable, estimate_prompt_tokens
from tests.support.config import GatewayConfig

# gpt-4o-mini: $0.15 in / $0.60 out per 1M tokens. A 4,000-character prompt ≈ 1,000 + 4 + 3 tokens.
PROMPT = "x" * 4000
PROMPT_TOKENS = 1000 + 4 + 3


def chat(max_tokens: int | None = None, *, model: str = "gpt-4o-mini", field: str = "max_tokens") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        body[field] = max_tokens
    return body


def config(url: str, **llm: float) -> GatewayConfig:
    """``up`` (OpenAI: gpt-*, o*, mystery-*) and ``claude`` (Anthropic), both with the ``llm:`` caps under test."""
    return GatewayConfig(url, default_target="up").up(models=["gpt-*", "o*", "mystery-*"]).claude().each(llm=llm)


def cost(prompt: int, completion: int, price_in: float = 0.15, price_out: float = 0.60) -> float:
    return (prompt * price_in + completion * price_out) / 1e6


async def test_the_price_table_knows_snapshots_and_aliases_and_takes_overrides() -> None:
    class P:
        def __init__(self, i: float, o: float) -> None:
            self.input, self.output = i, o

    table = PriceTable({"gpt-4o-mini": P(1.0, 2.0), "house-model": P(3.0, 4.0)})
    assert table.price("gpt-4o-mini-2024-07-18").output == pytest.approx(2.0 / 1e6)  # override wins
    assert table.price("gpt-4o-2024-08-06").input == pytest.approx(2.5 / 1e6)  # not gpt-4o-mini's
    # a snapshot billed above its family is priced as billed: its family's rate would under-charge a budget
    assert table.price("gpt-4o-2024-05-13").output == pytest.approx(15.0 / 1e6)
    assert table.price("gpt-3.5-turbo-instruct-0914").input == pytest.approx(1.5 / 1e6)
    assert table.price("gpt-4-32k-0613").output == pytest.approx(120.0 / 1e6)
    assert table.price("claude-3-5-haiku-20241022").output == pytest.approx(4.0 / 1e6)
    assert table.price("mistral-small-latest").input == pytest.approx(0.10 / 1e6)
    assert table.price("openai/gpt-4.1-mini").input == pytest.approx(0.40 / 1e6)
    assert table.price("house-model").input == pytest.approx(3.0 / 1e6)
    assert table.price("gpt-4omni") is None and table.price("llama-3") is None and table.price(None) is None
    # newer models priced at their own rates, not their family's (gpt-5.2 is not gpt-5; Opus 4.5 is a third of 4's)
    assert table.price("gpt-5.2-2025-12-11").output == pytest.approx(14.0 / 1e6)
    assert table.price("gpt-5.1-codex-mini").input == pytest.approx(0.25 / 1e6)
    assert table.price("claude-opus-4-5-20251101").output == pytest.approx(25.0 / 1e6)


def test_the_prompt_estimate_is_chars_over_four_plus_message_overhead() -> None:
    assert estimate_prompt_tokens(chat()) == PROMPT_TOKENS
    anthropic = {"system": "y" * 400, "messages": [{"role": "user", "content": [{"type": "text", "text": "z" * 400}]}]}
    assert estimate_prompt_tokens(anthropic) == 200 + 4 + 3


async def test_over_the_hard_cap_is_400_budget_exceeded_and_never_sent(fake, gateway) -> None:
    client, logs = await gateway(config(fake.url, hard_cost_cap_usd=0.001))
    seen: list = []
    client.app[RUNTIME].current.events.subscribe(seen.append)
    over = cost(PROMPT_TOKENS, 2000)  # ≈ $0.00135 > $0.001
    assert over > 0.001
    resp = await client.post("/v1/chat/completions", json=chat(2000))
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "budget_exceeded"
    assert "hard cap" in body["error"]["message"] and body["error"]["param"] == "max_tokens"
    assert fake.requests == []
    assert [e.rule for e in seen if isinstance(e, BudgetEvent)] == ["hard_cap"]
    ok = await client.post("/v1/chat/completions", json=chat(100))  # ≈ $0.00021: under the cap
    assert ok.status == 200 and len(fake.requests) == 1


@pytest.mark.parametrize("more", [{"n": 64}, {"best_of": 20}], ids=["n", "best_of"])
async def test_the_hard_cap_holds_for_every_answer_a_request_asks_for(fake, gateway, more) -> None:
    """n=64 answers cost 64 times one: the cap is the request's, as the budget's reservation is."""
    client, _ = await gateway(config(fake.url, hard_cost_cap_usd=0.001))
    one = await client.post("/v1/chat/completions", json=chat(100))
    assert one.status == 200
    many = await client.post("/v1/chat/completions", json={**chat(100), **more})
    assert many.status == 400 and (await many.json())["error"]["code"] == "budget_exceeded"
    batch = {"model": "gpt-3.5-turbo-instruct", "prompt": ["a"] * 64, "max_tokens": 1200}
    refused = await client.post("/v1/completions", json=batch)
    assert refused.status == 400 and len(fake.requests) == 1


async def test_the_soft_cap_lowers_the_limit_of_each_of_n_answers_to_fit_together(fake, gateway) -> None:
    soft = 0.0008
    client, _ = await gateway(config(fake.url, soft_cost_cap_usd=soft))
    assert (await client.post("/v1/chat/completions", json={**chat(2000), "n": 4})).status == 200
    sent = fake.requests[0].json()["max_tokens"]
    assert sent == int((soft - cost(PROMPT_TOKENS, 0)) / (4 * 0.60 / 1e6))
    assert cost(PROMPT_TOKENS, 4 * sent) <= soft


async def test_the_hard_cap_answers_in_the_anthropic_dialect_too(fake, gateway) -> None:
    client, _ = await gateway(config(fake.url, hard_cost_cap_usd=0.0001))
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 1000, "messages": [{"role": "user", "content": PROMPT}]}
    resp = await client.post("/v1/messages", json=body)
    answer = await resp.json()
    assert resp.status == 400 and answer["type"] == "error" and "hard cap" in answer["error"]["message"]
    assert fake.requests == []


async def test_over_the_soft_cap_max_tokens_is_lowered_to_fit(fake, gateway) -> None:
    soft = 0.0008
    client, logs = await gateway(config(fake.url, soft_cost_cap_usd=soft))
    resp = await client.post("/v1/chat/completions", json=chat(2000))
    assert resp.status == 200
    sent = fake.requests[0].json()["max_tokens"]
    assert sent == int((soft - cost(PROMPT_TOKENS, 0)) / (0.60 / 1e6))  # the most that fits
    assert cost(PROMPT_TOKENS, sent) <= soft < cost(PROMPT_TOKENS, sent + 1)
    assert resp.headers["X-ReliAPI-Max-Tokens"] == f"2000->{sent}"
    line = logs[-1]
    assert line["cost_policy_applied"] == "soft_cap_reduced" and line["original_max_tokens"] == 2000
    assert line["cost_estimate_usd"] == pytest.approx(cost(PROMPT_TOKENS, sent), abs=1e-8)


async def test_the_soft_cap_never_goes_below_16_and_keeps_the_clients_field(fake, gateway) -> None:
    client, _ = await gateway(config(fake.url, soft_cost_cap_usd=0.000001))  # less than the prompt alone
    resp = await client.post("/v1/chat/completions", json=chat(500, field="max_completion_tokens"))
    sent = fake.requests[0].json()
    assert resp.status == 200 and sent["max_completion_tokens"] == 16 and "max_tokens" not in sent
    assert resp.headers["X-ReliAPI-Max-Tokens"] == "500->16"


async def test_under_the_caps_the_body_is_sent_byte_for_byte(fake, gateway) -> None:
    client, _ = await gateway(config(fake.url, soft_cost_cap_usd=1, hard_cost_cap_usd=2, max_tokens=4096))
    raw = b'{"messages": [{"role": "user", "content": "hi"}],   "model": "gpt-4o-mini", "max_tokens": 50}'
    resp = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200 and fake.requests[0].body == raw
    assert "X-ReliAPI-Max-Tokens" not in resp.headers


async def test_max_tokens_above_the_targets_limit_is_clamped(fake, gateway) -> None:
    client, _ = await gateway(config(fake.url, max_tokens=256))
    await client.post("/v1/chat/completions", json=chat(10_000))
    await client.post("/v1/chat/completions", json=chat(100))
    assert [r.json()["max_tokens"] for r in fake.requests] == [256, 100]


async def test_without_max_tokens_the_estimate_uses_the_targets_limit(fake, gateway) -> None:
    client, _ = await gateway(config(fake.url, max_tokens=4000, hard_cost_cap_usd=0.002))
    resp = await client.post("/v1/chat/completions", json=chat())  # ≈ $0.00255 with 4,000 output tokens
    assert resp.status == 400 and fake.requests == []


async def test_a_tenants_caps_override_the_targets(fake, gateway) -> None:
    cfg = config(fake.url, hard_cost_cap_usd=0.001)
    cfg.tenant("frugal", api_key="frugal-key-0001", budget_caps={"up": {"hard_cost_cap_usd": 0.0003}})
    cfg.tenant("roomy", api_key="roomy-key-0002", budget_caps={"hard_cost_cap_usd": 1.0})
    client, _ = await gateway(cfg.tenant("plain", api_key="plain-key-0003"))
    statuses = []
    for key in ("frugal-key-0001", "roomy-key-0002", "plain-key-0003"):
        resp = await client.post("/v1/chat/completions", json=chat(1000), headers={"Authorization": f"Bearer {key}"})
        statuses.append(resp.status)
    assert cost(PROMPT_TOKENS, 1000) == pytest.approx(0.00075, rel=0.01)
    assert statuses == [400, 200, 200]  # 0.00075 > 0.0003 (own cap); < 1.0 (own "*"); < 0.001 (the target's)


async def test_an_unpriced_model_is_served_uncapped(fake, gateway) -> None:
    client, logs = await gateway(config(fake.url, hard_cost_cap_usd=0.000001, max_tokens=64))
    resp = await client.post("/v1/chat/completions", json=chat(500, model="mystery-7b"))
    assert resp.status == 200 and fake.requests[0].json()["max_tokens"] == 64  # still clamped
    assert "cost_estimate_usd" not in logs[-1]


async def test_pricing_from_the_config_changes_the_estimate(fake, gateway) -> None:
    cfg = config(fake.url, hard_cost_cap_usd=0.01).section("pricing", {"mystery-7b": {"input": 1000, "output": 1000}})
    client, _ = await gateway(cfg)
    resp = await client.post("/v1/chat/completions", json=chat(10, model="mystery-7b"))
    assert resp.status == 400 and fake.requests == []


async def test_without_max_tokens_the_hard_cap_still_holds_the_answer_is_bounded_to_fit(fake, gateway) -> None:
    """An answer with no max_tokens is not free: the gateway sets the largest size that fits the hard cap."""
    hard = 0.001
    client, logs = await gateway(config(fake.url, hard_cost_cap_usd=hard))
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200
    sent = fake.requests[0].json()["max_tokens"]
    assert sent == int((hard - cost(PROMPT_TOKENS, 0)) / (0.60 / 1e6))
    assert cost(PROMPT_TOKENS, sent) <= hard
    assert logs[-1]["cost_estimate_usd"] <= hard


async def test_without_max_tokens_a_translated_claude_request_is_bounded_by_the_caps_too(fake, gateway) -> None:
    """/v1/chat/completions for a Claude model, no max_tokens: not the translation's 4,096 over the caps."""
    client, _ = await gateway(config(fake.url, soft_cost_cap_usd=0.005, hard_cost_cap_usd=0.01))
    resp = await client.post("/v1/chat/completions", json=chat(model="claude-3-5-sonnet-latest"))
    assert resp.status == 200
    sent = fake.requests[0].json()["max_tokens"]  # claude-3-5-sonnet: $3 in, $15 out per 1M tokens
    assert sent == int((0.005 - PROMPT_TOKENS * 3.0 / 1e6) / (15.0 / 1e6))
    assert resp.headers["X-ReliAPI-Max-Tokens"] == f"none->{sent}"


async def test_the_soft_cap_header_names_what_the_client_asked_for_even_when_clamped_first(fake, gateway) -> None:
    client, logs = await gateway(config(fake.url, soft_cost_cap_usd=0.0008, max_tokens=2000))
    resp = await client.post("/v1/chat/completions", json=chat(5000))
    sent = fake.requests[0].json()["max_tokens"]
    assert resp.headers["X-ReliAPI-Max-Tokens"] == f"5000->{sent}" and logs[-1]["original_max_tokens"] == 5000


async def test_a_fallback_target_is_held_to_its_own_caps_at_its_own_models_price(upstreams, gateway):
    """The caps were applied for the target asked for only: a fallback to a pricier model cost more than the
    tenant's hard cap, and one with a lower llm.max_tokens was sent the primary's limit."""
    from tests.support.fakes import Fault

    up, fb = await upstreams(), await upstreams()
    key = {"Authorization": "Bearer acme-key-123456"}

    def chain(hard: float) -> GatewayConfig:
        cfg = GatewayConfig(up.url, default_target="up")
        cfg.tenant("acme", api_key="acme-key-123456", budget_caps={"hard_cost_cap_usd": hard})
        cfg.up(retry_matrix={"5xx": {"attempts": 0}}, fallback_targets=[{"target": "fb", "model": "gpt-4o"}])
        return cfg.target("fb", f"{fb.url}/v1", provider="openai", llm={"max_tokens": 300})

    up.script = lambda n, seen: Fault(status=500)
    client, _ = await gateway(chain(hard=cost(PROMPT_TOKENS, 1000) * 1.01))  # gpt-4o-mini with 1,000 tokens fits
    resp = await client.post("/v1/chat/completions", json=chat(1000), headers=key)
    assert resp.status == 500 and fb.requests == []  # gpt-4o, even at 300 tokens, is over it: never sent
    client, _ = await gateway(chain(hard=1.0))
    resp = await client.post("/v1/chat/completions", json=chat(1000), headers=key)
    assert resp.status == 200 and resp.headers["X-ReliAPI-Fallback"] == "fb"
    assert fb.requests[-1].json()["max_tokens"] == 300 and fb.requests[-1].json()["model"] == "gpt-4o"
    soft = chain(hard=1.0)
    soft.tenant("acme", api_key="acme-key-123456", budget_caps={"fb": {"soft_cost_cap_usd": 0.003}})
    client, _ = await gateway(soft)
    resp = await client.post("/v1/chat/completions", json=chat(1000), headers=key)
    lowered = fb.requests[-1].json()["max_tokens"]
    assert resp.status == 200 and 16 <= lowered < 300  # gpt-4o's prompt alone is ~$0.0025: the soft cap lowers it
    assert resp.headers["X-ReliAPI-Max-Tokens"] == f"1000->{lowered}"  # said, as for the target asked for
