"""GET /v1/models: the gateway's model catalog with prices (SPEC §2), as the openai SDK reads it."""

from __future__ import annotations

import openai

from tests.support.config import GatewayConfig


def config(url: str, tenants: list[dict] = ()) -> GatewayConfig:
    """``up`` (OpenAI models incl. a priced house-7b), ``claude`` (default model haiku), ``rest``."""
    cfg = GatewayConfig(url, default_target="up").tenants(*tenants)
    cfg.section("pricing", {"house-7b": {"input": 1.0, "output": 2.0}})
    cfg.up(models=["gpt-4o*", "house-7b", "my-finetune"])
    return cfg.claude(models=["claude-3-5-*"], llm={"default_model": "claude-3-5-haiku-latest"}).rest()


async def test_the_catalog_lists_routed_and_priced_models_with_their_target(fake, gateway):
    client, _ = await gateway(config(fake.url))
    resp = await client.get("/v1/models")
    body = await resp.json()
    assert resp.status == 200 and body["object"] == "list" and fake.requests == []
    by_id = {(m["id"], m["owned_by"]): m for m in body["data"]}
    assert by_id[("gpt-4o-mini", "up")]["pricing"] == {"input_per_1m_usd": 0.15, "output_per_1m_usd": 0.6}
    assert by_id[("house-7b", "up")]["pricing"] == {"input_per_1m_usd": 1.0, "output_per_1m_usd": 2.0}
    assert "pricing" not in by_id[("my-finetune", "up")]  # routed but unpriced
    assert by_id[("claude-3-5-haiku-latest", "claude")]["pricing"]["output_per_1m_usd"] == 4.0
    assert ("claude-3-5-sonnet", "claude") in by_id and ("claude-3-opus", "claude") not in by_id
    assert not any(owner == "rest" for _, owner in by_id) and ("gpt-4.1", "up") not in by_id


async def test_the_openai_sdk_lists_it(fake, gateway):
    client, _ = await gateway(config(fake.url))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-x", max_retries=0)
    ids = {m.id async for m in sdk.models.list()}
    assert {"gpt-4o", "gpt-4o-mini", "house-7b", "claude-3-5-haiku-latest"} <= ids
    await sdk.close()


async def test_with_tenants_the_caller_authenticates_and_sees_its_own_models(fake, gateway):
    tenants = [{"name": "narrow", "api_key": "narrow-key-001", "allowed_targets": ["claude"]}]
    client, _ = await gateway(config(fake.url, tenants))
    assert (await client.get("/v1/models")).status == 401
    body = await (await client.get("/v1/models", headers={"Authorization": "Bearer narrow-key-001"})).json()
    assert body["data"] and {m["owned_by"] for m in body["data"]} == {"claude"}
